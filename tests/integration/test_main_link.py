"""An HTTP worker's end of the control socket (:mod:`clinic_voice.main_link`) against a real
unix socket whose other end plays ``serve``: the worker's /readyz check of ``serve``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from clinic_voice import main_link
from clinic_voice.http_workers import encode
from clinic_voice.main_link import MainLink
from clinic_voice.metrics import Metrics

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]

STATE: dict[str, object] = {
    "op": "state",
    "channels": {"sms": True},
    "checks": {"redis": True},
    "warming": [],
}


class Serve:
    """The ``serve`` end: answers hello with a state, then says it when told to."""

    def __init__(self) -> None:
        self.writer: asyncio.StreamWriter | None = None
        self.connected = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = orjson.loads(await reader.readline())
        assert hello == {"op": "hello", "index": 1}
        self.writer = writer
        self.say(STATE)
        self.connected.set()
        while await reader.readline():  # the worker's metrics: not this test's subject
            pass

    def say(self, message: dict[str, object]) -> None:
        assert self.writer is not None
        self.writer.write(encode(message))


@pytest.fixture
async def linked(tmp_path: Path) -> AsyncIterator[tuple[Serve, MainLink]]:
    serve = Serve()
    path = tmp_path / "control.sock"
    server = await asyncio.start_unix_server(serve.handle, path=str(path))
    link = MainLink(path, 1, Metrics())
    try:
        await link.start()
        await serve.connected.wait()
        yield serve, link
    finally:
        await link.stop()
        if serve.writer is not None:
            serve.writer.close()
            await serve.writer.wait_closed()
        server.close()
        await server.wait_closed()


async def test_a_serve_that_stops_saying_its_state_is_not_ready(
    linked: tuple[Serve, MainLink], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A serve stopped (SIGSTOP), swapping or blocked keeps its connection open and says
    # nothing: the worker's /readyz must not go on saying it is ready.
    monkeypatch.setattr(main_link, "STATE_STALE_S", 0.3)
    serve, link = linked
    assert link.main_ready()
    await asyncio.sleep(0.5)
    assert not link.main_ready(), "no state for longer than STATE_STALE_S"
    assert not link.lost.is_set(), "the connection itself is still there"
    serve.say(STATE)
    await asyncio.sleep(0.05)
    assert link.main_ready(), "serve speaks again"
    serve.say({**STATE, "checks": {"redis": False}})
    await asyncio.sleep(0.05)
    assert not link.main_ready(), "serve's own checks count"
