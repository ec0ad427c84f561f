"""A real webhook receiver for the tests: an aiohttp server on 127.0.0.1 that records every POST
(raw body and headers) and answers 500 to the first ``fail_first`` of them, 204 afterwards;
500 also to any whose JSON ``caller`` is one of ``fail_callers`` (calls placed at once, each
with a caller of its own, get the answer each is about whatever order their requests take).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.peers.loopback_http import serve_on_loopback


@dataclass(frozen=True, slots=True)
class Hook:
    """One POST as received."""

    path: str
    body: bytes
    headers: dict[str, str]
    answered: int

    def json(self) -> dict[str, Any]:
        data = json.loads(self.body)
        assert isinstance(data, dict), f"webhook body is not a JSON object: {self.body!r}"
        return data


class WebhookReceiver:
    """The receiver peer. ``await start()``, read :attr:`url`, ``await stop()``."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.reply: dict[str, str] | None = None  # set: 200 with this JSON instead of 204
        self.delay_s = 0.0  # how long each answer waits (a slow receiver)
        self.fail_callers: set[str] = set()
        self.received: list[Hook] = []
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    def url(self, path: str = "/hook") -> str:
        """A URL on this receiver (any path is accepted and recorded)."""
        return f"http://127.0.0.1:{self.port}{path}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner, self.port = await serve_on_loopback(app, shutdown_timeout=0.5)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def accepted(self) -> list[Hook]:
        """The POSTs answered with success."""
        return [h for h in self.received if h.answered < 300]

    async def wait_until(self, what: str, predicate: Any, deadline_s: float = 10.0) -> list[Hook]:
        """Wait until ``predicate(received)`` holds; fail naming ``what``."""
        try:
            async with asyncio.timeout(deadline_s):
                async with self._arrived:
                    await self._arrived.wait_for(lambda: bool(predicate(self.received)))
        except TimeoutError:
            kinds = [h.json().get("event", {}).get("type") for h in self.received]
            raise AssertionError(
                f"webhook receiver: no {what} in {deadline_s} s; got {len(kinds)}: {kinds}"
            ) from None
        return list(self.received)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        failing = len(self.received) < self.fail_first or self._from_failing_caller(body)
        status = 500 if failing else 204
        reply = self.reply if status == 204 else None
        if reply is not None:
            status = 200
        async with self._arrived:
            self.received.append(Hook(request.path, body, dict(request.headers), status))
            self._arrived.notify_all()
        await asyncio.sleep(self.delay_s)
        if reply is not None:
            return web.json_response(reply)
        return web.Response(status=status)

    def _from_failing_caller(self, body: bytes) -> bool:
        if not self.fail_callers:
            return False
        try:
            data = json.loads(body)
        except ValueError:
            return False
        return isinstance(data, dict) and data.get("caller") in self.fail_callers
