"""The HTTP client's pool without sockets: connections over a fake transport."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from verification import http_client as hc
from verification.http_client import HttpClient

URL = "http://gateway.test/send"
KEYED = {"Idempotency-Key": "send-1"}
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class _Transport:
    """Records what is written; ``closed_raises``: a write after the close raises, as
    uvloop's transports do (asyncio's drop it)."""

    def __init__(self, conn: hc._Connection, *, closed_raises: bool) -> None:
        self.conn = conn
        self.writes: list[bytes] = []
        self.is_closed = False
        self.closed_raises = closed_raises

    def write(self, data: bytes) -> None:
        if self.is_closed:
            if self.closed_raises:
                raise RuntimeError("unable to perform operation; the handler is closed")
            return
        self.writes.append(data)

    def close(self) -> None:
        if not self.is_closed:
            self.is_closed = True
            asyncio.get_running_loop().call_soon(self.conn.connection_lost, None)


@pytest.mark.parametrize("closed_raises", [False, True], ids=["asyncio", "uvloop"])
async def test_a_connection_handed_over_and_closed_before_its_turn_is_not_sent_on(
    monkeypatch: pytest.MonkeyPatch, closed_raises: bool
) -> None:
    """max 1 per origin: the second POST waits and is handed the first one's connection; the
    server's close of it (its idle timeout) is handled before the second POST's task runs.
    The POST went out on that closed connection: under asyncio it waited, unsent, for its
    whole deadline (TimeoutError); under uvloop the write raised RuntimeError before the
    request's try, and the pool's only slot was never given back (every later POST waited)."""
    client = HttpClient(max_per_origin=1)
    opened: list[_Transport] = []

    async def connect(origin: Any) -> hc._Connection:
        conn = hc._Connection(origin)
        transport = _Transport(conn, closed_raises=closed_raises)
        conn.connection_made(transport)  # type: ignore[arg-type]
        opened.append(transport)
        return conn

    monkeypatch.setattr(client, "_connect", connect)
    release = client._release

    def release_then_fin(pool: Any, conn: hc._Connection) -> None:
        handed = bool(pool.waiters) and conn.reusable
        release(pool, conn)
        if handed:  # the server's FIN, read in the same loop round as the hand-over
            transport = opened[-1] if opened[-1].conn is conn else None
            assert transport is not None
            transport.is_closed = True  # connection_lost comes once, now
            conn.connection_lost(None)

    monkeypatch.setattr(client, "_release", release_then_fin)

    answered: dict[int, int] = {}  # transport: requests answered on it

    async def answer_each() -> None:
        while True:
            await asyncio.sleep(0)
            for t in opened:
                while len(t.writes) > answered.get(id(t), 0):
                    answered[id(t)] = answered.get(id(t), 0) + 1
                    t.conn.data_received(OK)

    server = asyncio.ensure_future(answer_each())
    try:
        async with asyncio.timeout(3):
            first, second = await asyncio.gather(
                client.post(URL, b"1", KEYED, timeout_s=2),
                client.post(URL, b"2", KEYED, timeout_s=2),
                return_exceptions=True,
            )
            assert not isinstance(first, BaseException), first
            assert not isinstance(second, BaseException), repr(second)
            assert first.status == second.status == 200
            # The slot came back: a third POST goes through.
            third = await client.post(URL, b"3", KEYED, timeout_s=2)
            assert third.status == 200
    finally:
        server.cancel()
        await client.close()
