"""The SIP front under a flood of INVITEs that never follow their 302, over real sockets.

sipp plays tests/peers/sipp_uac_redirect.xml: an INVITE with a new Call-ID, the 302 ACKed,
never followed. Each such 302 held a slot on the worker for 2 s (34 s with copies), so a
few forged INVITEs a second from one address kept every slot, and patients got 486 Busy
Here. Now one address holds at most ``redirect_source.MAX_UNFOLLOWED`` of them; callers
who follow their 302 (pjsua2 softphones, all from 127.0.0.1 as behind a PBX or trunk), more
of them at once than that cap, get through. The numbers derive from the cap.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sip_config.clock import FakeClock, SystemClock
from sip_config.settings import SIP_CALLS_PER_WORKER, HostPort
from tests.conftest import SIPP_OTHER_SOCKETS, free_port, sip_settings
from tests.integration.test_sip_inbound import PEERS, front_as_serve_wires, run_softphone
from voice.sip import message, redirect_source
from voice.sip.front import RedirectFront
from voice.sip.pool import CallHandle, SipPool

pytestmark = pytest.mark.integration

CAP = redirect_source.MAX_UNFOLLOWED
FLOOD_CALLS = 2 * CAP
# Workers enough for the flood's cap of slots and more: the cap refuses, not a full line.
WORKERS = CAP // SIP_CALLS_PER_WORKER + 1
PATIENT_HOST = "127.0.0.2"  # another source on the loopback (Linux routes 127/8 there)


@pytest.fixture
async def line() -> AsyncIterator[tuple[SipPool, RedirectFront]]:
    """WORKERS workers (more slots than one address's cap) behind a front that holds its
    302s' slots, as serve wires it."""
    pool = SipPool(sip_settings(WORKERS), clock=SystemClock())
    async with front_as_serve_wires(pool) as front:
        yield pool, front


def _invite_from(host: str, front: HostPort, call_id: str) -> message.SipMessage:
    """One INVITE to the front from ``host``; its answer."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        s.settimeout(3)
        here = s.getsockname()[1]
        req = (
            f"INVITE sip:6000@{front} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {host}:{here};branch=z9hG4bK-{call_id}\r\n"
            f"From: <sip:patient@{host}>;tag=1\r\nTo: <sip:6000@{front}>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n"
            "Content-Length: 0\r\n\r\n"
        )
        s.sendto(req.encode(), (front.host, front.port))
        data, _ = s.recvfrom(65536)
    return message.parse(data)


def _calls_answered(trace: str, status: int) -> set[str]:
    """The Call-IDs of the calls that got ``status`` in sipp's message trace (it may trace
    a message twice: an unexpected one is traced again)."""
    calls = set()
    for block in trace.split("message received")[1:]:
        if re.search(rf"^SIP/2\.0 {status} ", block, re.MULTILINE):
            found = re.search(r"^Call-ID: *(\S+)", block, re.MULTILINE | re.IGNORECASE)
            assert found is not None, block
            calls.add(found.group(1))
    return calls


async def test_a_flood_that_never_follows_its_302s_leaves_the_slots_to_patients(
    line: tuple[SipPool, RedirectFront], tmp_path: Path
) -> None:
    """Twice the cap of INVITEs from sipp's one address, 302s ACKed and never followed: the
    cap of them get a 302 (and hold a slot), the rest 503 with Retry-After; a patient from
    another address gets a 302, where every slot had been the flood's and the patient got
    486. Once the flood's 302s lapsed (the Retry-After), its address gets a 302 again."""
    pool, front = line
    trace = tmp_path / "flood.log"
    proc = await asyncio.create_subprocess_exec(
        "sipp", str(front.address), "-sf", str(PEERS / "sipp_uac_redirect.xml"),
        "-i", "127.0.0.1", "-p", str(free_port()), *SIPP_OTHER_SOCKETS,
        "-s", "6000", "-m", str(FLOOD_CALLS), "-r", "50", "-l", str(FLOOD_CALLS), "-nostdin",
        "-trace_msg", "-message_file", str(trace), "-timeout", "10",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    async with asyncio.timeout(20):
        code = await proc.wait()
    text = trace.read_text(errors="replace") if trace.exists() else "(no trace)"
    moved, refused = _calls_answered(text, 302), _calls_answered(text, 503)
    assert (len(moved), len(refused)) == (CAP, FLOOD_CALLS - CAP), text
    assert f"Retry-After: {redirect_source.RETRY_AFTER_S}" in text, text
    assert code != 0, "sipp counts the 503s as failed calls"
    assert pool.occupancy().reserved == CAP, "the flood holds its cap of slots, no more"

    loop = asyncio.get_running_loop()
    patient = await loop.run_in_executor(None, _invite_from, PATIENT_HOST, front.address, "p1")
    assert patient.status == 302, f"{patient.status} {patient.reason}"
    assert pool.stats()["refused_busy"] == 0, "nobody was turned away for want of a slot"

    await asyncio.sleep(redirect_source.RETRY_AFTER_S + 0.2)  # the flood's 302s lapse
    again = await loop.run_in_executor(None, _invite_from, "127.0.0.1", front.address, "r1")
    assert again.status == 302, f"after the Retry-After: {again.status} {again.reason}"


async def test_callers_from_one_address_who_follow_their_302s_all_get_through(
    line: tuple[SipPool, RedirectFront],
) -> None:
    """As behind a PBX or trunk: one caller more than the cap from 127.0.0.1 at once, each
    following its 302 at once (pjsua2 softphones): all are taken, their 302s leaving the
    count as they arrive."""
    pool, front = line

    async def handler(call: CallHandle) -> None:
        await call.answer()
        await call.wait_ended()

    pool.on_incoming(handler)
    caller = ("--call", f"sip:6000@{front.address}", "--duration", "1")
    results = await asyncio.gather(*(run_softphone(*caller) for _ in range(CAP + 1)))
    for events in results:
        assert "confirmed" in [e["event"] for e in events], events
    assert pool.stats()["refused_busy"] == 0


async def test_over_tcp_the_cap_goes_by_the_peers_address() -> None:
    """Over TCP the source is the connection's peer: the cap and one more INVITEs on one
    connection from 127.0.0.3, never followed, get the cap of 302s and then 503 with
    Retry-After, whatever their Via says; a connection from 127.0.0.4 still gets a 302.
    (Workers set up by hand, as in the unit tests: the front's sockets are what is tested.)"""
    clock = FakeClock()
    pool = SipPool(sip_settings(WORKERS), clock=clock)
    for i, w in enumerate(pool._workers):
        w.up, w.free_slots, w.port = True, SIP_CALLS_PER_WORKER, 6000 + i
    front = RedirectFront(
        HostPort("127.0.0.1", 0), pool.pick_inbound, clock=clock, reservations=pool
    )
    await front.start()

    async def invites(host: str, n: int) -> list[message.SipMessage]:
        reader, writer = await asyncio.open_connection(
            front.address.host, front.address.port, local_addr=(host, 0)
        )
        try:
            for k in range(n):
                writer.write(
                    f"INVITE sip:6000@{front.address} SIP/2.0\r\n"
                    f"Via: SIP/2.0/TCP 192.0.2.{k}:5060;branch=z9hG4bK-t{host}-{k}\r\n"
                    f"From: <sip:patient@{host}>;tag=1\r\nTo: <sip:6000@{front.address}>\r\n"
                    f"Call-ID: tcp-{host}-{k}\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n"
                    "Content-Length: 0\r\n\r\n".encode()
                )
            await writer.drain()
            async with asyncio.timeout(5):
                return [message.parse(await reader.readuntil(b"\r\n\r\n")) for _ in range(n)]
        finally:
            writer.close()

    try:
        got = await invites("127.0.0.3", CAP + 1)
        assert [a.status for a in got] == [302] * CAP + [503], [a.status for a in got]
        assert got[-1].get("Retry-After") == str(redirect_source.RETRY_AFTER_S)
        (other,) = await invites("127.0.0.4", 1)
        assert other.status == 302, f"{other.status} {other.reason}"
    finally:
        await front.stop()
