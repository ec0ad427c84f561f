"""The caller's audio for a sipp call: a UDP socket that answers the service's RTP.

sipp places the call with this socket's port in its SDP (PCMU). The service hangs up a call
that sends it no audio (``voice.sip.pjsua.NO_MEDIA_S``), so from the service's first packet
on this sends 20 ms of µ-law silence every 20 ms back to where that packet came from
(symmetric RTP), and keeps what it hears, decoded to PCM16, for the test to read.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from array import array
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import cast

from sip_config.tasks import cancel_and_wait
from voice.media.pcm import Pcm

RATE_HZ = 8000
_FRAME = 160  # samples in 20 ms
_PCMU = 0
_SILENCE = b"\xff" * _FRAME  # µ-law zero


def _ulaw_table() -> tuple[int, ...]:
    """G.711 µ-law byte to linear PCM16 (ITU-T G.711, as every decoder does it)."""
    out = []
    for byte in range(256):
        u = ~byte & 0xFF
        sign, exponent, mantissa = u & 0x80, (u >> 4) & 0x07, u & 0x0F
        magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
        out.append(-magnitude if sign else magnitude)
    return tuple(out)


_ULAW = _ulaw_table()


@dataclass
class RtpPeer(asyncio.DatagramProtocol):
    """What the caller heard, and the socket that heard it."""

    heard: array[int] = field(default_factory=lambda: array("h"))
    packets: int = 0
    remote: tuple[str, int] | None = None
    transport: asyncio.DatagramTransport | None = None
    first: asyncio.Event = field(default_factory=asyncio.Event)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) < 12 or data[1] & 0x7F != _PCMU:
            return  # too short for RTP, or not audio (telephone-event)
        cc = data[0] & 0x0F
        self.heard.extend(_ULAW[b] for b in data[12 + 4 * cc :])
        self.packets += 1
        if self.remote is None:
            self.remote = addr
            self.first.set()

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def pcm(self) -> Pcm:
        """Everything heard so far, as 8 kHz PCM16."""
        return Pcm(array("h", self.heard), RATE_HZ)

    async def _send(self) -> None:
        await self.first.wait()
        seq, ts = 0, 0
        loop = asyncio.get_running_loop()
        start = loop.time()
        while self.transport is not None and not self.transport.is_closing():
            header = struct.pack("!BBHII", 0x80, _PCMU, seq & 0xFFFF, ts & 0xFFFFFFFF, 0x1234)
            assert self.remote is not None
            self.transport.sendto(header + _SILENCE, self.remote)
            seq, ts = seq + 1, ts + _FRAME
            await asyncio.sleep(max(0.0, start + seq * 0.02 - loop.time()))


@contextlib.asynccontextmanager
async def rtp_peer() -> AsyncIterator[RtpPeer]:
    """An :class:`RtpPeer` on 127.0.0.1 (a free port), closed after."""
    loop = asyncio.get_running_loop()
    _, peer = await loop.create_datagram_endpoint(RtpPeer, local_addr=("127.0.0.1", 0))
    sender = asyncio.create_task(peer._send())
    try:
        yield peer
    finally:
        failed = await cancel_and_wait(sender)  # the test's own cancellation is raised
        assert failed is None, f"the RTP sender failed: {failed!r}"
        if peer.transport is not None:
            peer.transport.close()
