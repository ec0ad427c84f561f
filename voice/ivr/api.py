"""``GET /v1/calls`` (recent, paginated), ``GET /v1/calls/{id}`` and
``GET /v1/calls/{id}/voicemail``: clinic-line call records and their voicemail."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from aiohttp import web

from verification.errors import InvalidRequest, NotFound, StoreUnavailable, VerificationError
from voice.ivr.store import CallRecordUnreadable, CallStore, CallStoreUnavailable
from voice.ivr.voicemail import NAME, Voicemails

_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class RecordUnreadable(VerificationError):
    """A call record that does not open with this service's key (a fault of the data, not a
    bug: no traceback)."""

    status = 500
    slug = "internal"
    title = "Internal error"


class CallsApi:
    """Read-only access to call records (bearer auth like every /v1 route)."""

    def __init__(
        self, store: Callable[[], CallStore], voicemails: Callable[[], Voicemails]
    ) -> None:
        self._store = store
        self._voicemails = voicemails

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/calls", self.list),
            web.get("/v1/calls/{id}", self.get),
            web.get("/v1/calls/{id}/voicemail", self.voicemail),
        ]

    async def list(self, request: web.Request) -> web.Response:
        q = request.query
        unknown = sorted(set(q) - {"limit", "cursor"})
        if unknown:
            raise InvalidRequest(f"unknown parameter(s): {', '.join(unknown)}")
        limit_raw = q.get("limit", "20")
        if not re.fullmatch(r"[0-9]{1,3}", limit_raw) or not 1 <= int(limit_raw) <= 100:
            raise InvalidRequest("'limit' must be 1..100")
        cursor = q.get("cursor")
        before: float | None = None
        if cursor is not None:
            if not re.fullmatch(r"[0-9]{1,12}(\.[0-9]{1,9})?", cursor):
                raise InvalidRequest("'cursor' is not one this API gave out")
            before = float(cursor)
        try:
            page = await self._store().recent(int(limit_raw), before)
        except CallStoreUnavailable as exc:
            raise StoreUnavailable(str(exc)) from exc
        return web.json_response({"calls": page.calls, "next": page.next_cursor})

    async def get(self, request: web.Request) -> web.Response:
        return web.json_response(await self._record(request))

    async def voicemail(self, request: web.Request) -> web.Response:
        """The call's recorded message as WAV (8 kHz, 16-bit mono)."""
        doc = await self._record(request)
        values = doc.get("values") or {}
        names = [v for v in values.values() if isinstance(v, str) and NAME.fullmatch(v)]
        for name in names:
            wav = await self._voicemails().wav(doc["id"], name)
            if wav is not None:
                return web.Response(
                    body=wav, content_type="audio/wav", headers={"Cache-Control": "no-store"}
                )
        raise NotFound("this call left no voicemail (or it is past its retention)")

    async def _record(self, request: web.Request) -> dict[str, Any]:
        call_id = request.match_info["id"]
        if not _ID.fullmatch(call_id):
            raise NotFound("no such call")
        try:
            doc = await self._store().get(call_id)
        except CallStoreUnavailable as exc:
            raise StoreUnavailable(str(exc)) from exc
        except CallRecordUnreadable as exc:
            raise RecordUnreadable(
                "this call record does not open with the service's key (sealed under another "
                "CLINIC_SECRET?)"
            ) from exc
        if doc is None:
            raise NotFound("no such call")
        return doc
