"""``GET /v1/calls`` (recent, paginated), ``GET /v1/calls/{id}``,
``GET /v1/calls/{id}/voicemail`` and ``DELETE /v1/calls/{id}`` (erasure): clinic-line call
records and their voicemail."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from aiohttp import web

from verification.errors import (
    InvalidRequest,
    NotFound,
    RetryLater,
    StoreUnavailable,
    VerificationError,
)
from voice.ivr.cursor import Cursor, CursorInvalid
from voice.ivr.erasure import CallErasure, CallUnderWay, ErasureIncomplete
from voice.ivr.follow_up import for_staff, needs_call_back
from voice.ivr.store import CallRecordUnreadable, CallStore, CallStoreUnavailable
from voice.ivr.voicemail import NAME, Voicemails, VoicemailUnreadable

_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# GET /v1/calls?needs_call_back=true: only the calls the clinic still owes a call back
# (voice/ivr/follow_up.py), at most EXAMINED_MAX read for a page (voice/ivr/store.py).
NEEDS_CALL_BACK = "needs_call_back"
# How long staff are asked to wait before erasing a call still under way: most calls take a
# few minutes, and a retry costs nothing.
CALL_UNDER_WAY_RETRY_S = 60
# PUT/DELETE /v1/calls/{id}/handled for a call Redis holds no record of: each thing that can
# mean (README, "The clinic line"); a call not saved yet can be marked once Redis holds it.
NOT_IN_REDIS = (
    "Redis holds no record of this call: there never was one, it is past its retention, it "
    "was erased, or it is not saved yet (still under way, or its record waits on disk until "
    "Redis takes it: waiting_on_disk in GET /v1/calls)"
)


class RecordUnreadable(VerificationError):
    """A call record that does not open with this service's keys (a fault of the data, not a
    bug: no traceback)."""

    status = 500
    slug = "internal"
    title = "Internal error"
    logged_at_source = True


class MessageUnreadable(VerificationError):
    """A voicemail file that is there but does not open (logged once by
    :class:`~voice.ivr.voicemail.Voicemails`): not "no voicemail"."""

    status = 500
    slug = "voicemail-unreadable"
    title = "The voicemail cannot be read"
    logged_at_source = True


class CallInProgress(RetryLater):
    """An erasure of a call still under way: tried again once it ended."""

    status = 409
    slug = "call-in-progress"
    title = "The call is still under way"


class ErasureNotFinished(VerificationError):
    """The call is gone from Redis and marked erased, but a file of it could not be deleted
    (logged): the same DELETE again finishes it."""

    status = 500
    slug = "erasure-incomplete"
    title = "The erasure is not finished"
    logged_at_source = True


class CallsApi:
    """Call records for clinic staff: read, and erase (bearer auth like every /v1 route)."""

    def __init__(
        self,
        store: Callable[[], CallStore],
        voicemails: Callable[[], Voicemails],
        erasure: Callable[[], CallErasure],
        on_disk: Callable[[], int | None] = lambda: None,
    ) -> None:
        self._store = store
        self._voicemails = voicemails
        self._erasure = erasure
        # How many call records wait on disk, not in the list (voice/ivr/journal.py's
        # RecordsOnDisk); None while unknown (no clinic line counts them): not said.
        self._on_disk = on_disk

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/calls", self.list),
            web.get("/v1/calls/{id}", self.get),
            web.delete("/v1/calls/{id}", self.erase),
            web.get("/v1/calls/{id}/voicemail", self.voicemail),
            web.put("/v1/calls/{id}/handled", self.handled),
            web.delete("/v1/calls/{id}/handled", self.handled),
        ]

    async def list(self, request: web.Request) -> web.Response:
        q = request.query
        unknown = sorted(set(q) - {"limit", "cursor", NEEDS_CALL_BACK})
        if unknown:
            raise InvalidRequest(f"unknown parameter(s): {', '.join(unknown)}", fields=unknown)
        for name in ("limit", "cursor", NEEDS_CALL_BACK):
            # Which of two counts differs between readers (a proxy, a log, this service): a
            # 'needs_call_back=true' read as false lists every call as owed none.
            if len(q.getall(name, ())) > 1:
                raise InvalidRequest(f"'{name}' is given more than once", field=name)
        limit_raw = q.get("limit", "20")
        if not re.fullmatch(r"[0-9]{1,3}", limit_raw) or not 1 <= int(limit_raw) <= 100:
            raise InvalidRequest("'limit' must be 1..100", field="limit")
        after: Cursor | None = None
        if "cursor" in q:
            try:
                after = Cursor.parse(q["cursor"])
            except CursorInvalid:
                raise InvalidRequest(
                    "'cursor' is not one this API gave out", field="cursor"
                ) from None
        only_owed = q.get(NEEDS_CALL_BACK, "false")
        if only_owed not in {"true", "false"}:
            raise InvalidRequest(
                f"'{NEEDS_CALL_BACK}' must be true or false", field=NEEDS_CALL_BACK
            )
        keep = needs_call_back if only_owed == "true" else None
        try:
            page = await self._store().recent(int(limit_raw), after, keep)
        except CallStoreUnavailable as exc:
            raise StoreUnavailable(str(exc)) from exc
        following = None if page.next_cursor is None else str(page.next_cursor)
        answer: dict[str, Any] = {
            "calls": [for_staff(c, page.handled.get(c["id"])) for c in page.calls],
            "next": following,
        }
        waiting = self._on_disk()
        if waiting is not None:  # staff must know the list is incomplete
            answer["waiting_on_disk"] = waiting
        return web.json_response(answer)

    async def get(self, request: web.Request) -> web.Response:
        return web.json_response(await self._shown(await self._record(request)))

    async def handled(self, request: web.Request) -> web.Response:
        """PUT: staff mark the call handled (its call back made, its message dealt with);
        DELETE: not handled after all. The record as shown, with ``handled_at``."""
        # The record is opened before the mark is written: one that does not open answers as
        # GET /v1/calls/{id} does (500, logged once per call) and changes nothing, where a
        # mark written first stayed behind a failed request.
        doc = await self._record(request, missing=NOT_IN_REDIS)
        try:
            found = await self._store().mark_handled(doc["id"], request.method == "PUT")
        except CallStoreUnavailable as exc:
            raise StoreUnavailable(str(exc)) from exc
        if not found:  # expired or erased since it was read
            raise NotFound(NOT_IN_REDIS)
        return web.json_response(await self._shown(doc))

    async def _shown(self, doc: dict[str, Any]) -> dict[str, Any]:
        """A record as staff read it: :func:`for_staff`, with when it was marked handled."""
        try:
            handled = await self._store().handled_at([doc["id"]])
        except CallStoreUnavailable as exc:
            raise StoreUnavailable(str(exc)) from exc
        return for_staff(doc, handled.get(doc["id"]))

    async def voicemail(self, request: web.Request) -> web.Response:
        """The call's recorded message as WAV (8 kHz, 16-bit mono)."""
        doc = await self._record(request)
        values = doc.get("values") or {}
        names = [v for v in values.values() if isinstance(v, str) and NAME.fullmatch(v)]
        # Then the call's messages its record does not name: serve killed after a message was
        # written, before the call's live record was rewritten to name it, leaves a record of
        # the cut call without its name (voice/ivr/journal.py), and the message stays the
        # call's (its file name, which its seal is bound to, says so).
        names += [n for n in await self._voicemails().names(doc["id"]) if n not in names]
        unreadable: VoicemailUnreadable | None = None
        for name in names:
            try:
                wav = await self._voicemails().wav(doc["id"], name)
            except VoicemailUnreadable as exc:
                unreadable = unreadable or exc
                continue  # another message of the call may open
            if wav is not None:
                return web.Response(
                    body=wav, content_type="audio/wav", headers={"Cache-Control": "no-store"}
                )
        if unreadable is not None:
            raise MessageUnreadable(
                "this call's voicemail is there but does not open (sealed under a "
                "CLINIC_SECRET not in CLINIC_PREVIOUS_SECRETS, damaged, or not readable by the "
                "service): see the log"
            ) from unreadable
        raise NotFound("this call left no voicemail (or it is past its retention)")

    async def erase(self, request: web.Request) -> web.Response:
        """Erase the call: its record, index entry, voicemail and copies on disk (204)."""
        call_id = _call_id(request)
        try:
            erased = await self._erasure().erase(call_id)
        except CallUnderWay as exc:
            raise CallInProgress(
                "the call is still under way: erase it once it has ended",
                CALL_UNDER_WAY_RETRY_S,
            ) from exc
        except CallStoreUnavailable as exc:
            raise StoreUnavailable(str(exc)) from exc
        except ErasureIncomplete as exc:
            raise ErasureNotFinished(
                "the call record is erased, but a file of the call could not be deleted "
                "(see the log): send the same request again"
            ) from exc
        if erased is None:
            raise NotFound("no such call")
        return web.Response(status=204)

    async def _record(
        self, request: web.Request, *, missing: str = "no such call"
    ) -> dict[str, Any]:
        """The call's record, opened; 404 with ``missing`` when Redis holds none."""
        call_id = _call_id(request)
        try:
            doc = await self._store().get(call_id)
        except CallStoreUnavailable as exc:
            raise StoreUnavailable(str(exc)) from exc
        except CallRecordUnreadable as exc:
            raise RecordUnreadable(
                "this call record does not open with the service's keys (sealed under a "
                "CLINIC_SECRET not in CLINIC_PREVIOUS_SECRETS?)"
            ) from exc
        if doc is None:
            raise NotFound(missing)
        return doc


def _call_id(request: web.Request) -> str:
    """The call id of the path; 404 for one no call can have."""
    call_id = request.match_info["id"]
    if not _ID.fullmatch(call_id):
        raise NotFound("no such call")
    return call_id
