"""A real HTTP SMS gateway for the tests: an aiohttp server on 127.0.0.1 that records every
``POST {"to", "text"}`` it receives and answers according to its :class:`GatewayMode`.

The recorded texts are how a test learns a code, exactly as a phone would: by reading the SMS.
The peer never logs a text (it holds a code).

Run by hand it is a phone's screen for trying the API without an SMS provider:
``.venv/bin/python -m tests.peers.sms_gateway --port 9090`` prints every SMS it is sent (to
its terminal, not to a log), for ``CLINIC_SMS_HTTP_URL=http://127.0.0.1:9090/sms``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from dataclasses import dataclass
from enum import StrEnum

from aiohttp import web

from tests.peers.loopback_http import serve_on_loopback


class GatewayMode(StrEnum):
    """How the gateway answers."""

    OK = "ok"  # 202 Accepted
    FAIL = "fail"  # 500: the service should retry, then give up
    HANG = "hang"  # never answers: the service's timeout must fire
    REJECT = "reject"  # 400: undeliverable at once, no retry
    HOLD = "hold"  # holds each request until release(), then 202 Accepted


@dataclass(frozen=True, slots=True)
class Sms:
    """One POST as received (``to``/``text`` are empty when the body was not as expected)."""

    to: str
    text: str
    authorization: str
    content_type: str
    idempotency_key: str = ""


class SmsGateway:
    """The gateway peer. ``await start()``, read :attr:`url`, ``await stop()``."""

    def __init__(self, mode: GatewayMode = GatewayMode.OK, port: int = 0) -> None:
        self.mode = mode
        self.received: list[Sms] = []
        self._arrived = asyncio.Condition()
        self._release = asyncio.Event()  # lets hanging handlers end at stop()
        self._held = asyncio.Event()  # lets held handlers answer (release())
        self._runner: web.AppRunner | None = None
        self.port = port  # 0: any free port, read once started

    @property
    def url(self) -> str:
        """Where the service should POST."""
        return f"http://127.0.0.1:{self.port}/sms"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/sms", self._handle)
        # shutdown_timeout: a hanging request must not hold the test's teardown.
        self._runner, self.port = await serve_on_loopback(app, port=self.port, shutdown_timeout=0.5)

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def release(self) -> None:
        """Answer the requests held in :attr:`GatewayMode.HOLD` (202), and later ones at once."""
        self._held.set()

    async def wait_for(self, count: int, deadline_s: float = 10.0) -> list[Sms]:
        """Wait until ``count`` POSTs arrived; fail with what did arrive."""
        try:
            async with asyncio.timeout(deadline_s):
                async with self._arrived:
                    await self._arrived.wait_for(lambda: len(self.received) >= count)
        except TimeoutError:
            raise AssertionError(
                f"the SMS gateway got {len(self.received)} POST(s) in {deadline_s} s, "
                f"expected {count}"
            ) from None
        return list(self.received)

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        to = text = ""
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if isinstance(body, dict):
            to = str(body.get("to", ""))
            text = str(body.get("text", ""))
        sms = Sms(
            to,
            text,
            request.headers.get("Authorization", ""),
            request.content_type,
            request.headers.get("Idempotency-Key", ""),
        )
        async with self._arrived:
            self.received.append(sms)
            self._arrived.notify_all()
        if self.mode is GatewayMode.HANG:
            await self._release.wait()
            return web.Response(status=503, text="stopped")
        if self.mode is GatewayMode.HOLD:
            await self._held.wait()
        if self.mode is GatewayMode.FAIL:
            return web.json_response({"error": "upstream down"}, status=500)
        if self.mode is GatewayMode.REJECT:
            return web.json_response({"error": "bad destination"}, status=400)
        return web.json_response({"id": f"msg-{len(self.received)}"}, status=202)


async def _show(port: int) -> None:
    gateway = SmsGateway(port=port)
    await gateway.start()
    print(f"SMS gateway stand-in: set CLINIC_SMS_HTTP_URL={gateway.url} (Ctrl-C stops it)")
    shown = 0
    try:
        while True:
            with contextlib.suppress(AssertionError):  # an hour without one
                await gateway.wait_for(shown + 1, 3600)
            for sms in gateway.received[shown:]:
                print(f"to {sms.to}: {sms.text}", flush=True)
            shown = len(gateway.received)
    finally:
        await gateway.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="a local SMS gateway that prints what it gets")
    parser.add_argument("--port", type=int, default=9090)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_show(args.port))


if __name__ == "__main__":
    main()
