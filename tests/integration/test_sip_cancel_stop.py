"""A SIP worker stopped while its outbound call still rings, and a restart still starting at
the stop.

At the stop a worker hangs up its calls: a ringing outbound call (a flash call, a voice code's
call) gets a CANCEL, and the far end answers it 200 and its INVITE 487, which pjsip's INVITE
transaction ACKs. pjsua reports the call DISCONNECTED as the CANCEL leaves, and the worker
went on to ``libDestroy`` at once: the 487 came to a worker gone, and the far end sent it
again and again for 32 s (Timer H), never ACKed. Now the stop pumps pjsua until the answer has
come (``STOP_ANSWERS_S`` at most).

A worker whose restart was under way as the stop began, and which was still starting when its
``WORKER_STOP_S`` ran out, was killed as a worker that had not stopped (-9), and ``serve``
exited 1 for a worker that never had a call. Now it is killed and counts for nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
from pathlib import Path
from typing import Any

import pytest

from clinic_voice.metrics import Metrics
from clinic_voice.wiring import new_sip_pool
from sip_config.clock import SystemClock
from sip_config.settings import SipSettings
from tests.conftest import sip_settings
from tests.integration.test_sip_pool import (
    CALLER,
    Sipp,
    sipp_uas,
    stop_during_a_held_restart,
    until_ready,
)
from voice.sip import message
from voice.sip import pool as pool_module
from voice.sip.pjsua import STOP_ANSWERS_S, UNREGISTER_S
from voice.sip.pool import (
    STOP_TAIL_S,
    WORKER_EXITED_AT_STOP,
    WORKER_KILLED_STARTING_AT_STOP,
    WORKER_STOP_S,
    CallHandle,
    OutboundCall,
    SipPool,
)
from voice.sip.protocol import CallEvent, CallState

pytestmark = pytest.mark.integration


def _exits(caplog: pytest.LogCaptureFixture) -> list[tuple[object, object]]:
    """(index, status) of each WORKER_EXITED_AT_STOP line (its arguments: index, pid,
    status, note)."""
    args = [r.args for r in caplog.records if r.msg == WORKER_EXITED_AT_STOP]
    return [(a[0], a[2]) for a in args if isinstance(a, tuple)]


async def _ringing(pool: SipPool, uas: Sipp, *, flash: bool) -> CallHandle:
    """A call placed to ``uas`` that rings (its 180 came), its ring time far away."""
    handle = await pool.place_call(
        OutboundCall(target_uri=uas.uri(), caller_id=CALLER, flash=flash, ring_s=60)
    )
    async with asyncio.timeout(5):
        async for ev in handle.events:
            if isinstance(ev, CallEvent) and ev.state is CallState.RINGING:
                return handle
    raise AssertionError("the call ended before it rang")


async def _stop_timed(pool: SipPool) -> float:
    loop = asyncio.get_running_loop()
    began = loop.time()
    await pool.stop()
    return loop.time() - began


@pytest.mark.parametrize(
    ("scenario", "flash"),
    [
        ("sipp_uas_ring.xml", True),
        ("sipp_uas_ring.xml", False),
        # The 487 1 s after the CANCEL's 200: a PBX passing the CANCEL on to the phone.
        ("sipp_uas_ring_late_487.xml", True),
    ],
    ids=["flash-call", "voice-call", "487-1s-late"],
)
async def test_a_stop_while_a_call_rings_acks_the_487_of_its_cancel(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, scenario: str, flash: bool
) -> None:
    caplog.set_level(logging.INFO, logger="voice.sip.pool")
    pool = SipPool(sip_settings(1), clock=SystemClock())
    await pool.start()
    try:
        async with sipp_uas(scenario, tmp_path) as uas:
            handle = await _ringing(pool, uas, flash=flash)
            took = await _stop_timed(pool)
            # The scenario ends with <recv request="ACK">: sipp exits 0 once the ACK came;
            # without it, sipp sent its 487 again and again, waiting for it (killed here).
            try:
                status: int | None = await uas.finish(timeout=5)
            except AssertionError:
                status = None
            acks = uas.received("ACK")
    finally:
        await pool.stop()
    assert acks, "the 487 to the CANCELled INVITE was never ACKed"
    assert status == 0, f"sipp's scenario did not complete (exit {status})"
    assert handle.outcome is not None, "the call's end was not reported"
    assert _exits(caplog) == [(0, 0)], f"the worker's exit at the stop: {caplog.messages}"
    assert took < WORKER_STOP_S, f"the stop took {took:.2f} s"


async def test_a_far_end_that_never_answers_the_cancel_holds_the_stop_only_so_long(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="voice.sip.pool")
    pool = SipPool(sip_settings(1), clock=SystemClock())
    await pool.start()
    try:
        async with sipp_uas("sipp_uas_ring_cancel_unanswered.xml", tmp_path) as uas:
            await _ringing(pool, uas, flash=True)
            took = await _stop_timed(pool)
            cancels = uas.received("CANCEL")
    finally:
        await pool.stop()
    assert cancels, "no CANCEL was sent"
    # It waited for the answer (it may yet come), and no longer than its bound: the worker
    # ends on its own, well before the pool would kill it.
    assert STOP_ANSWERS_S <= took < STOP_ANSWERS_S + 1.5, f"the stop took {took:.2f} s"
    assert took < WORKER_STOP_S
    assert _exits(caplog) == [(0, 0)], f"the worker's exit at the stop: {caplog.messages}"


async def test_a_restart_still_starting_when_its_stop_time_ends_is_killed_as_no_defect(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker died; its restart's process exists but is not up when the stop begins, and
    its start outlasts WORKER_STOP_S (a SIGSTOP stands in for a start slow on a loaded
    host). It is killed at that deadline as before, but it never had a call: the stop's
    result has no defect (serve exits 0), where it had a -9 (serve exited 1)."""
    monkeypatch.setattr(pool_module, "WORKER_STOP_S", 1.5)  # the test's time; the same logic
    pool = new_sip_pool(sip_settings(1), Metrics(), SystemClock())
    await pool.start()
    caplog.set_level(logging.INFO, "voice.sip.pool")
    proc = await stop_during_a_held_restart(pool, monkeypatch, still_starting=True)
    assert pool.exits_at_stop == (), f"counted as a defect of the stop: {pool.exits_at_stop}"
    assert proc.returncode == -signal.SIGKILL, "the worker still starting was not killed"
    killed = [r for r in caplog.records if r.msg == WORKER_KILLED_STARTING_AT_STOP]
    assert [r.levelno for r in killed] == [logging.WARNING], caplog.messages
    assert _exits(caplog) == [], "its kill was reported as a worker's exit at the stop"


class _Udp(asyncio.DatagramProtocol):
    """A UDP socket whose datagrams land in a queue."""

    def __init__(self) -> None:
        self.got: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.got.put_nowait(data)


async def invite_answers(port: int, within: float) -> list[message.SipMessage]:
    """Send an INVITE to 127.0.0.1:``port`` from a socket of its own: the answers, up to
    the first final one (ACKed) or ``within`` seconds."""
    loop = asyncio.get_running_loop()
    transport, udp = await loop.create_datagram_endpoint(_Udp, local_addr=("127.0.0.1", 0))
    here = transport.get_extra_info("sockname")[1]
    head = (
        f"Via: SIP/2.0/UDP 127.0.0.1:{here};branch=z9hG4bK-stop-{here};rport\r\n"
        f"From: <sip:{CALLER}@127.0.0.1:{here}>;tag=stop{here}\r\n"
        f"To: <sip:6000@127.0.0.1:{port}>\r\n"
        f"Call-ID: during-the-stop-{here}@127.0.0.1\r\n"
    )
    invite = (
        f"INVITE sip:6000@127.0.0.1:{port} SIP/2.0\r\n{head}CSeq: 1 INVITE\r\n"
        f"Contact: <sip:{CALLER}@127.0.0.1:{here}>\r\nMax-Forwards: 70\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    answers: list[message.SipMessage] = []
    try:
        transport.sendto(invite.encode(), ("127.0.0.1", port))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while not answers or answers[-1].status < 200:
                    answer = message.parse(await udp.got.get())
                    answers.append(answer)
                    if answer.status >= 200:  # RFC 3261 section 17.1.1.3: its ACK
                        to = answer.get("To") or ""
                        ack = head.replace(f"To: <sip:6000@127.0.0.1:{port}>", f"To: {to}")
                        transport.sendto(
                            f"ACK sip:6000@127.0.0.1:{port} SIP/2.0\r\n{ack}CSeq: 1 ACK\r\n"
                            "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n".encode(),
                            ("127.0.0.1", port),
                        )
    finally:
        transport.close()
    return answers


async def test_an_invite_during_the_stops_wait_for_answers_gets_503(tmp_path: Path) -> None:
    """The stop waits up to STOP_ANSWERS_S for a far end's answer to a CANCEL; an INVITE that
    comes meanwhile (a PBX, a caller redirected just before) is refused 503 at once. It was
    rung (180), held the wait to its end, and was then declined by libDestroy's hang-up (603:
    a PBX tries no other server after it)."""
    pool = SipPool(sip_settings(1), clock=SystemClock())
    await pool.start()
    [worker] = pool.worker_addresses()
    try:
        async with sipp_uas("sipp_uas_ring_cancel_unanswered.xml", tmp_path) as uas:
            await _ringing(pool, uas, flash=True)
            stop = asyncio.create_task(pool.stop())
            for _ in range(50):  # its CANCEL gone (within 1 s): the worker is in the wait
                if uas.received("CANCEL"):
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("no CANCEL within 1 s of the stop")
            answers = await invite_answers(worker.port, within=STOP_ANSWERS_S + 1)
            await stop
    finally:
        await pool.stop()
    statuses = [a.status for a in answers]
    assert statuses and statuses[-1] == 503, f"the INVITE's answers: {statuses}"
    assert 180 not in statuses, f"rung at the stop: {statuses}"
    # When to try again (RFC 3261 21.5.4): the rest of a stop after the workers' Shutdown.
    assert answers[-1].get("Retry-After") == str(math.ceil(STOP_TAIL_S)), answers[-1]


async def test_an_inbound_call_still_ringing_at_the_stop_gets_503() -> None:
    """A caller whose INVITE the handler has not answered yet when the stop comes: 503 (a
    PBX tries another server), as every caller the stop refuses; it was declined (603)."""
    arrived = asyncio.Event()

    async def never_answers(call: CallHandle) -> None:
        arrived.set()
        await asyncio.Event().wait()  # cancelled at the stop

    pool = SipPool(sip_settings(1), clock=SystemClock())
    pool.on_incoming(never_answers)
    await pool.start()
    [worker] = pool.worker_addresses()
    try:
        answers = asyncio.create_task(invite_answers(worker.port, within=WORKER_STOP_S + 2))
        async with asyncio.timeout(5):
            await arrived.wait()
        await pool.stop()
        got = await answers
    finally:
        await pool.stop()
    statuses = [a.status for a in got]
    assert statuses and statuses[-1] == 503, f"the INVITE's answers: {statuses}"
    assert got[-1].get("Retry-After") == str(math.ceil(STOP_TAIL_S)), got[-1]


def _registered_settings(registrar: Sipp) -> SipSettings:
    return sip_settings(
        1, registrar=f"sip:127.0.0.1:{registrar.port}", user="clinic-bot", password="s3cret"
    )


async def test_an_invite_during_the_stops_unregister_gets_503(tmp_path: Path) -> None:
    """Behind a registrar the stop waits up to UNREGISTER_S for the un-REGISTER's answer; an
    INVITE that comes meanwhile (the PBX still holds the contact: it is what the un-REGISTER
    takes out) is refused 503, as during the wait for the calls' answers. That wait came
    after the calls' and answered nothing: the INVITE's Call was freed by the stop, whose
    pjsua2 destructor declined it (603: a PBX tries no other server after it)."""
    async with sipp_uas("sipp_uas_register_unregister_unanswered.xml", tmp_path) as registrar:
        pool = SipPool(_registered_settings(registrar), clock=SystemClock())
        await pool.start()
        [worker] = pool.worker_addresses()
        try:
            await until_ready(pool)
            stop = asyncio.create_task(pool.stop())
            for _ in range(50):  # the un-REGISTER out (within 1 s): the worker is in the wait
                if [r for r in registrar.received("REGISTER") if r.msg.get("Expires") == "0"]:
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("no un-REGISTER within 1 s of the stop")
            answers = await invite_answers(worker.port, within=UNREGISTER_S + 1)
            await stop
        finally:
            await pool.stop()
    statuses = [a.status for a in answers]
    assert statuses and statuses[-1] == 503, f"the INVITE's answers: {statuses}"
    assert answers[-1].get("Retry-After") == str(math.ceil(STOP_TAIL_S)), answers[-1]


async def test_an_unanswered_unregister_adds_nothing_to_the_wait_for_a_cancels_answer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A registrar that never answers the un-REGISTER and a far end that never answers the
    CANCEL: the stop waits STOP_ANSWERS_S for both, not that and UNREGISTER_S more. One
    after the other they took 3 s of the worker's WORKER_STOP_S (5 s), and left pjsua's
    teardown and the exit 2 s, where a loaded host needed the 3 s they had
    (tests/unit/test_systemd_unit.py): a worker killed -9 as it stopped, serve exiting 1."""
    caplog.set_level(logging.INFO, logger="voice.sip.pool")
    async with sipp_uas("sipp_uas_register_unregister_unanswered.xml", tmp_path) as registrar:
        pool = SipPool(_registered_settings(registrar), clock=SystemClock())
        await pool.start()
        try:
            await until_ready(pool)
            async with sipp_uas("sipp_uas_ring_cancel_unanswered.xml", tmp_path) as uas:
                await _ringing(pool, uas, flash=True)
                took = await _stop_timed(pool)
                cancels = uas.received("CANCEL")
        finally:
            await pool.stop()
        unregisters = [r for r in registrar.received("REGISTER") if r.msg.get("Expires") == "0"]
    assert cancels, "no CANCEL was sent"
    assert unregisters, "no un-REGISTER was sent"
    assert STOP_ANSWERS_S <= took < STOP_ANSWERS_S + UNREGISTER_S, f"the stop took {took:.2f} s"
    assert _exits(caplog) == [(0, 0)], f"the worker's exit at the stop: {caplog.messages}"
