"""The flash-call agent's socket takes requests from anyone and answers them (OPTIONS, a
stray INVITE, a BYE) with their Via, From, To and Call-ID copied: a head with a control
character must be dropped there, as at the front (RFC 3261 25.1)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from sip_config.clock import FakeClock
from tests.conftest import sip_settings
from voice.sip.flash_uac import FlashUac


def options(call_id: bytes, via_extra: bytes = b"") -> bytes:
    return (
        b"OPTIONS sip:probe@127.0.0.1 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK-" + call_id + via_extra + b"\r\n"
        b"From: <sip:probe@127.0.0.1>;tag=1\r\n"
        b"To: <sip:flash@127.0.0.1>\r\n"
        b"Call-ID: " + call_id + b"\r\n"
        b"CSeq: 1 OPTIONS\r\n"
        b"Content-Length: 0\r\n\r\n"
    )


@pytest.fixture
async def uac() -> AsyncIterator[FlashUac]:
    agent = FlashUac(sip_settings(1, route="sip:{e164}@127.0.0.1:5060"), FakeClock())
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop()


@pytest.fixture
def probe() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


@pytest.mark.parametrize("bad", [b"\r", b"\x00", b"\x1b"])
async def test_a_request_with_a_control_character_gets_no_answer(
    uac: FlashUac, probe: socket.socket, bad: bytes
) -> None:
    # A lone CR in the Via was copied into the 200's Via: a line break ("Evil: 1") for a
    # peer that ends lines at a CR. f07bb99 made only the front parse strictly.
    where = (uac.address.host, uac.address.port)
    probe.sendto(options(b"bad", bad + b"Evil: 1"), where)
    probe.sendto(options(b"good"), where)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(3):
        data, _ = await loop.sock_recvfrom(probe, 65535)
    assert b"Call-ID: good" in data, data  # the first answer is the clean request's
    assert b"Evil" not in data
