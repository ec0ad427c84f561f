"""The pool's side of its workers, pure: the choice of worker (a burst of INVITEs spread
over the workers, a quiet worker passed over), the watch of frozen workers going on past a
failing round, and a command to a worker whose pipe has closed."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import Counter
from types import SimpleNamespace
from typing import Any, cast

import pytest

from sip_config.clock import FakeClock
from sip_config.settings import HostPort
from tests.conftest import sip_settings
from voice.sip import message, transaction
from voice.sip import pool as pool_module
from voice.sip.front import RedirectFront
from voice.sip.outcome import SipStatus
from voice.sip.pool import CallHandle, SipPool
from voice.sip.protocol import IncomingCall, Ping

_ids = (f"call-{n}@peer" for n in itertools.count())
BUSY = SipStatus.BUSY_HERE


def _pool(workers: int, clock: FakeClock) -> SipPool:
    settings = sip_settings(workers)
    pool = SipPool(settings, clock=clock)
    for i, w in enumerate(pool._workers):  # as if each had started and reported 4 free slots
        w.up, w.free_slots, w.port = True, 4, 6000 + i
    return pool


def test_a_burst_is_spread_and_capped_by_free_slots() -> None:
    clock = FakeClock()
    pool = _pool(3, clock)
    picks = [pool.pick_inbound(next(_ids)) for _ in range(6)]
    assert all(isinstance(p, HostPort) for p in picks)
    per_port = Counter(p.port for p in picks if isinstance(p, HostPort))
    assert sorted(per_port.values()) == [2, 2, 2], per_port
    picks += [pool.pick_inbound(next(_ids)) for _ in range(6)]
    assert all(isinstance(p, HostPort) for p in picks), "12 slots for 12 callers"
    assert pool.pick_inbound(next(_ids)) == BUSY, "a 13th caller gets 486 from the front"


def _arrives(pool: SipPool, sip_call_id: str, free: int) -> None:
    """A redirected INVITE reaches worker 0, as the worker tells it: the call with its
    INVITE's Call-ID and the worker's free slots, this call counted."""
    w = pool._workers[0]
    pool._dispatch(w, IncomingCall(f"in-{sip_call_id}", "", "6000", free, (), sip_call_id))


def test_an_arriving_call_takes_its_own_reservation_not_the_oldest() -> None:
    """Caller A is redirected first, B a second later; B's INVITE reaches the worker first.
    B's reservation became a call and A's stays until A comes or lapses. Taking the oldest
    dropped A's and left B's (a call already) held a second longer."""
    clock = FakeClock()
    pool = _pool(1, clock)
    pool._workers[0].free_slots = 2
    assert isinstance(pool.pick_inbound("a@peer"), HostPort)
    clock.advance(1.0)
    assert isinstance(pool.pick_inbound("b@peer"), HostPort)
    clock.advance(0.1)
    _arrives(pool, "b@peer", free=1)
    assert list(pool._workers[0].reserved) == ["a@peer"]
    assert pool.pick_inbound(next(_ids)) == BUSY, "the last slot is A's"
    clock.advance(1.0)  # A never came: its slot is free again, B's was never a slot
    assert pool.occupancy().reserved == 0
    assert isinstance(pool.pick_inbound(next(_ids)), HostPort)


def test_a_call_without_a_reservation_leaves_a_redirected_caller_its_slot() -> None:
    """A call the front did not redirect (a PBX's, or a caller slower than its reservation)
    reaches a worker while caller A is on the way there: A's slot must not go to a third
    caller, who would then reach a worker with one slot for two calls."""
    clock = FakeClock()
    pool = _pool(1, clock)
    pool._workers[0].free_slots = 2
    assert isinstance(pool.pick_inbound("a@peer"), HostPort)
    _arrives(pool, "direct@pbx", free=1)
    assert pool.pick_inbound(next(_ids)) == BUSY, "the one free slot is A's"
    _arrives(pool, "a@peer", free=0)
    assert pool.occupancy().reserved == 0


def test_a_call_under_a_new_call_id_frees_a_reservation_its_worker_cannot_hold() -> None:
    """A UA that re-sends the redirected INVITE under a new Call-ID: once the worker's free
    slots cannot hold every reservation, the oldest was that call's and goes."""
    clock = FakeClock()
    pool = _pool(1, clock)
    pool._workers[0].free_slots = 1
    assert isinstance(pool.pick_inbound("a@peer"), HostPort)
    _arrives(pool, "a-again@peer", free=0)
    assert pool.occupancy().reserved == 0
    assert pool.occupancy().free == 0


def test_a_reservation_lapses_when_the_caller_never_comes() -> None:
    clock = FakeClock()
    pool = _pool(1, clock)
    for _ in range(4):
        assert isinstance(pool.pick_inbound(next(_ids)), HostPort)
    assert pool.pick_inbound(next(_ids)) == BUSY
    clock.advance(2.5)
    assert isinstance(pool.pick_inbound(next(_ids)), HostPort)


def test_a_retransmitted_invite_takes_no_second_slot() -> None:
    clock = FakeClock()
    pool = _pool(2, clock)
    first = pool.pick_inbound("same@peer")
    assert all(pool.pick_inbound("same@peer") == first for _ in range(9))
    # 7 slots left for 7 other callers
    assert all(isinstance(pool.pick_inbound(next(_ids)), HostPort) for _ in range(7))
    assert pool.pick_inbound(next(_ids)) == BUSY


def test_lapsed_reservations_do_not_block_outbound_calls() -> None:
    clock = FakeClock()
    pool = _pool(2, clock)
    for _ in range(8):  # every slot reserved by callers who never follow the 302
        pool.pick_inbound(next(_ids))
    assert pool._pick_outbound() is None
    clock.advance(2.5)
    assert pool._pick_outbound() is not None


def test_a_stopping_service_refuses_new_callers_with_503() -> None:
    clock = FakeClock()
    pool = _pool(2, clock)
    first = pool.pick_inbound("before@peer")
    assert isinstance(first, HostPort)
    pool.refuse_new_calls()
    # A proxy tries another instance on 503 (486 would tell the caller the clinic is busy),
    # also for a retransmission of an INVITE redirected before.
    assert pool.pick_inbound(next(_ids)) == SipStatus.SERVICE_UNAVAILABLE
    assert pool.pick_inbound("before@peer") == SipStatus.SERVICE_UNAVAILABLE


def test_callers_refused_for_want_of_a_slot_are_counted_and_logged_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A full line refuses every caller: each is counted (serve's clinic_calls_total), and
    the log says so at once, then at most once a minute with the count since."""
    caplog.set_level(logging.WARNING, logger="voice.sip.pool")
    clock = FakeClock()
    busy: list[None] = []
    pool = SipPool(sip_settings(1), clock=clock, on_busy=lambda: busy.append(None))
    w = pool._workers[0]
    w.up, w.free_slots, w.port = True, 0, 6000  # as if 4 calls were up
    for _ in range(5):
        assert pool.pick_inbound(next(_ids)) == BUSY
    clock.advance(59.9)
    assert pool.pick_inbound(next(_ids)) == BUSY
    clock.advance(0.1)
    assert pool.pick_inbound(next(_ids)) == BUSY
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "1 inbound call(s) refused with 486" in lines[0], lines
    assert "6 inbound call(s) refused with 486" in lines[1], lines
    assert len(busy) == pool.stats()["refused_busy"] == 7
    w.free_slots = 1
    assert isinstance(pool.pick_inbound(next(_ids)), HostPort)
    assert len(busy) == 7, "a caller given a slot is not refused"


async def test_a_failing_round_of_the_worker_watch_does_not_end_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A round that raises (a pipe closing under a Ping) is logged; the next rounds run, or
    a frozen worker would go unnoticed for the rest of the process."""
    monkeypatch.setattr(pool_module, "PING_EVERY_S", 0.01)
    pool = _pool(1, FakeClock())
    pool._running = True
    rounds: list[float] = []

    def round_(now: float, last: float) -> float:
        rounds.append(now)
        if len(rounds) == 1:
            raise RuntimeError("unable to perform operation on a closed transport")
        return now

    monkeypatch.setattr(pool, "_watch_round", round_)
    watch = asyncio.create_task(pool._watch())
    async with asyncio.timeout(5):
        while len(rounds) < 3:  # noqa: ASYNC110 (rounds the watch appends to)
            await asyncio.sleep(0.01)
    pool._running = False
    await watch
    assert "SIP worker watch: a round failed" in caplog.text


class _HungProcess:
    """A worker process that never writes a line (as one hung in its start-up)."""

    pid = 4242
    returncode: int | None = None
    stdin = None
    stdout = None

    def __init__(self) -> None:
        self.killed = 0

    def kill(self) -> None:
        self.killed += 1


async def test_a_restarted_worker_is_not_judged_by_its_predecessors_silence(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From hreview3. The worker's silence was reset only by its reader's first step, a
    task that runs after _spawn returns: a watch round due in that same loop iteration saw
    the new process (not up) with the last line of the old one, killed as frozen 30 s or
    more before, and killed the new worker as 'did not start within 40 s' at once."""
    pool = SipPool(sip_settings(1), clock=FakeClock())
    pool._running = True
    w = pool._workers[0]
    loop = asyncio.get_running_loop()
    w.heard_at = loop.time() - 40.0  # the old process's last line
    proc = _HungProcess()

    async def exec_(*argv: object, **kwargs: object) -> _HungProcess:
        return proc

    async def reader(w: pool_module._Worker, p: object) -> None:
        await asyncio.Event().wait()  # its first step has not run yet

    monkeypatch.setattr(asyncio, "create_subprocess_exec", exec_)
    monkeypatch.setattr(pool, "_read", reader)
    await pool._spawn(w)
    try:
        now = loop.time()
        pool._watch_round(now, now)  # a round before the reader's first step
        assert proc.killed == 0, "a worker killed as it was spawned"
    finally:
        assert w.reader is not None
        w.reader.cancel()


async def test_a_worker_killed_before_it_was_ever_up_backs_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From hreview3. A worker that never came up, killed by the watch after the start-up
    limit (30 s), had 'lived' longer than _HEALTHY_AFTER_S (30 s): its failures were reset
    and it was restarted at the first backoff (0.2 s) every time, never more."""
    clock = FakeClock()
    pool = SipPool(sip_settings(1), clock=clock)
    pool._running = True
    w = pool._workers[0]
    w.failures = 2
    w.started_at = clock.monotonic()
    clock.advance(pool_module._START_TIMEOUT_S + 1.0)
    restarts: list[float] = []

    async def restart(w: pool_module._Worker, delay: float) -> None:
        restarts.append(delay)

    monkeypatch.setattr(pool, "_restart", restart)
    pool._on_exit(w, -9)  # killed, never up
    await asyncio.sleep(0)
    assert w.failures == 3
    assert restarts == [min(pool_module._BACKOFF_MAX_S, pool_module._BACKOFF_FIRST_S * 4)]


def test_a_quiet_worker_gets_new_calls_only_when_no_other_has_room() -> None:
    """A worker whose Ping has gone unanswered (quiet: its owner thread blocked, or frozen
    until the watch kills it) may never answer a caller sent to it: callers and outbound
    calls go to the others while they have room, and to it rather than a refusal."""
    clock = FakeClock()
    pool = _pool(2, clock)
    quiet, other = pool._workers
    quiet.quiet, other.free_slots = True, 1  # the quiet one has more room
    first = pool.pick_inbound(next(_ids))
    assert isinstance(first, HostPort) and first.port == other.port
    picked = pool._pick_outbound()
    assert picked is quiet, "no room left elsewhere: the quiet worker, not a refusal"
    second = pool.pick_inbound(next(_ids))
    assert isinstance(second, HostPort) and second.port == quiet.port


def test_the_watch_marks_a_worker_quiet_while_its_ping_is_unanswered() -> None:
    pool = _pool(1, FakeClock())
    [w] = pool._workers
    w.process = cast(Any, SimpleNamespace(returncode=None, pid=1, stdin=None))
    w.heard_at = 100.0
    pool._watch_round(100.0 + pool_module.QUIET_AFTER_S - 0.5, 100.0 + 1.5)
    assert not w.quiet
    pool._watch_round(100.0 + pool_module.QUIET_AFTER_S, 100.0 + 2.5)
    assert pool._workers[0].quiet  # (not w.quiet: mypy holds it False since the assert)
    assert pool.pick_inbound(next(_ids)) != BUSY, "its room is still used when it is the only"


def test_a_command_to_a_worker_whose_pipe_closed_raises_at_no_caller() -> None:
    """Under uvloop (serve's loop) a write to the stdin of a worker that has just died raises
    RuntimeError ("unable to perform operation on <WriteUnixTransport closed=True>") until
    its exit is handled: it went up into the call session, which recorded the call as the
    service's fault, or lost its record."""

    def write(data: bytes) -> None:
        raise RuntimeError("unable to perform operation on <WriteUnixTransport closed=True>")

    pool = _pool(1, FakeClock())
    [w] = pool._workers
    w.process = cast(
        Any, SimpleNamespace(returncode=None, pid=1, stdin=SimpleNamespace(write=write))
    )
    w.send(Ping())  # no exception


def test_a_worker_gets_its_full_ping_grace_after_the_pools_loop_stalled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """serve's loop held up (a host starved of CPU, a long GC): the round that shows the
    stall pings. A worker pinged then must get what any first Ping gets (WORKER_SILENT_S -
    PING_EVERY_S), not one round: counted from its last line before the stall, it was
    killed at the next round, its calls with it, as a frozen one. The rounds' times are
    given, as the watch gives them from the loop's clock."""
    monkeypatch.setattr(pool_module, "WORKER_SILENT_S", 5.0)
    pool = _pool(1, FakeClock())
    [w] = pool._workers
    killed: list[int] = []
    monkeypatch.setattr(pool, "_kill", lambda worker: killed.append(worker.index))
    w.process = cast(Any, SimpleNamespace(returncode=None, pid=1, stdin=None))
    w.heard_at = 100.0  # its last line; then the loop stalls 3 s
    last = pool._watch_round(100.5, 100.0)  # an ordinary round: not silent yet
    last = pool._watch_round(103.6, last)  # the stalled one: pinged, judged from now - 1 s
    last = pool._watch_round(104.6, last)
    last = pool._watch_round(105.6, last)  # 5.6 s after its last line, 3 s after the Ping
    assert not killed, "a worker pinged after a stall was killed before its grace"
    last = pool._watch_round(106.6, last)
    pool._watch_round(107.7, last)  # answered nothing for 5 s after the stall: frozen
    assert killed == [0]


# -- the front's 302s and the slots they hold -------------------------------------------------


def _front(pool: SipPool, clock: FakeClock) -> RedirectFront:
    return RedirectFront(
        HostPort("127.0.0.1", 0), pool.pick_inbound, clock=clock, reservations=pool
    )


def _request(call_id: str, method: str = "INVITE") -> bytes:
    """A caller's request to the front: each copy is the same transaction (17.2.3)."""
    return (
        f"{method} sip:6000@127.0.0.1:5060 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-1;rport\r\n"
        "From: <sip:+447700900123@127.0.0.1>;tag=abc\r\nTo: <sip:6000@127.0.0.1:5060>\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 1 {method}\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def _named(out: bytes | None) -> int:
    """The worker port a 302 names (0 for another answer)."""
    assert out is not None
    answer = message.parse(out)
    if answer.status != SipStatus.MOVED_TEMPORARILY:
        return 0
    return int((answer.get("Contact") or "").rstrip(">").rpartition(":")[2])


_TIMER_A = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)  # an INVITE's copies: 0.5, 1.5, 3.5, ... 31.5 s


@pytest.mark.parametrize("lost", range(1, len(_TIMER_A) + 1), ids=lambda n: f"{n} lost")
def test_a_caller_whose_302s_were_lost_finds_its_slot_on_the_worker_named(lost: int) -> None:
    """Caller A's 302 (to worker 0, whose one slot it holds) is lost ``lost`` times; each
    copy of A's INVITE gets the same 302 (17.2.1), the last one gets through. Just before
    each copy another caller comes. The slot was held for 2 s from the first 302 only: a
    caller after that was sent to worker 0 too, and A, following its 302 at last, found
    worker 0 full (pjsua's 486 Busy Here) while worker 1 had room."""
    clock = FakeClock()
    pool = _pool(2, clock)
    for w in pool._workers:
        w.free_slots = 1
    front = _front(pool, clock)
    first = front._answer_udp(_request("a@peer"))
    assert _named(first) == 6000
    named = []
    for n, gap in enumerate(_TIMER_A[:lost]):
        clock.advance(gap - 0.1)
        named.append(_named(front._answer_udp(_request(f"other-{n}@peer"))))
        clock.advance(0.1)
        assert front._answer_udp(_request("a@peer")) == first, "a copy gets the same 302"
    assert 6000 not in named, f"A's slot went to another caller: {named}"
    assert "a@peer" in pool._workers[0].reserved, "A's slot is held while A is on the way"
    _arrives(pool, "a@peer", free=0)
    assert "a@peer" not in pool._workers[0].reserved


def test_copies_hold_the_slot_no_longer_than_the_302_can_be_repeated() -> None:
    """However many copies of the INVITE come (a UA's, or forged), the slot is held until
    the front forgets the 302 (Timer H from the first, 32 s) and 2 s more, then is free."""
    clock = FakeClock()
    pool = _pool(1, clock)
    pool._workers[0].free_slots = 1
    front = _front(pool, clock)
    first = front._answer_udp(_request("a@peer"))
    for _ in range(319):  # a copy every 0.1 s up to 31.9 s
        clock.advance(0.1)
        assert front._answer_udp(_request("a@peer")) == first
    assert pool.pick_inbound(next(_ids)) == BUSY, "held for A"
    clock.advance(transaction.TIMER_H_S + 2.0 - 31.9 - 0.01)
    assert pool.occupancy().reserved == 1
    clock.advance(0.02)
    assert pool.occupancy().reserved == 0, "held past the 302's Timer H and 2 s"
    assert isinstance(pool.pick_inbound(next(_ids)), HostPort)


def test_copies_past_timer_h_do_not_hold_the_slot_for_ever() -> None:
    """Copies that go on after the front forgot the 302 (a forged stream: a UA stops at
    timer B) made a new transaction of the same Call-ID, which the pool sent to the slot
    still held, and the next copy renewed that slot for 34 s more: one datagram a second
    held a slot for good. A slot is held at most Timer H and 2 s from its 302."""
    clock = FakeClock()
    pool = _pool(1, clock)
    pool._workers[0].free_slots = 1
    front = _front(pool, clock)
    front._answer_udp(_request("a@peer"))
    for _ in range(40):  # a copy every second, past Timer H
        clock.advance(1.0)
        front._answer_udp(_request("a@peer"))
    assert pool.occupancy().reserved == 0, "held 40 s after the 302"
    assert isinstance(pool.pick_inbound(next(_ids)), HostPort)


def test_a_cancel_of_a_redirected_invite_frees_its_slot_for_good() -> None:
    """A UAC cancels only before a final answer: its 302 was lost, and the caller who hung
    up will not follow it. The slot was held for 2 s all the same (the CANCEL got 200);
    now it is free at once, and a later copy of the INVITE (the UAC goes on sending them
    until a final answer, 9.1) gets its 302 but holds no slot again."""
    clock = FakeClock()
    pool = _pool(1, clock)
    pool._workers[0].free_slots = 1
    front = _front(pool, clock)
    first = front._answer_udp(_request("a@peer"))
    clock.advance(0.3)
    cancel = front._answer_udp(_request("a@peer", "CANCEL"))
    assert cancel is not None and cancel.startswith(b"SIP/2.0 200 OK\r\n")
    assert pool.occupancy().reserved == 0
    clock.advance(0.2)
    assert front._answer_udp(_request("a@peer")) == first
    assert front._answer_udp(_request("a@peer", "CANCEL")) == cancel
    assert pool.occupancy().reserved == 0
    assert isinstance(pool.pick_inbound(next(_ids)), HostPort), "the slot is free"


def test_a_copy_after_its_call_arrived_or_its_slot_lapsed_holds_no_slot() -> None:
    """A late copy of an INVITE whose call reached the worker already, or whose slot
    lapsed (every copy lost for 2 s), is answered with its 302 and takes no slot: the call
    has one, or the caller finds the worker as it is."""
    clock = FakeClock()
    pool = _pool(1, clock)
    pool._workers[0].free_slots = 2
    front = _front(pool, clock)
    arrived = front._answer_udp(_request("a@peer"))
    _arrives(pool, "a@peer", free=1)
    lapsed = front._answer_udp(_request("b@peer"))
    clock.advance(2.5)
    assert front._answer_udp(_request("a@peer")) == arrived
    assert front._answer_udp(_request("b@peer")) == lapsed
    assert pool.occupancy().reserved == 0


async def test_a_call_stuck_winding_up_does_not_hold_the_pools_stop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """pool.stop cancels the calls' tasks and waited for them without a bound: a call whose
    record was being kept on disk (shielded, as the call session does) on a disk that hangs
    held the stop, and so serve's, for as long. Now it waits CALLS_WIND_UP_S, cancels once
    more (which ends the session's wait for its write) and says so."""
    monkeypatch.setattr(pool_module, "CALLS_WIND_UP_S", 0.2)
    monkeypatch.setattr(pool_module, "TASKS_LEFT_S", 0.2)
    pool = _pool(1, FakeClock())
    pool._running = True
    disk = threading.Event()  # the write to a hung disk, until the test ends

    async def handler(call: CallHandle) -> None:
        try:
            await asyncio.sleep(3600)
        finally:  # the record kept on disk, shielded from the first cancellation
            await asyncio.shield(asyncio.to_thread(disk.wait, 30))

    pool.on_incoming(handler)
    _arrives(pool, "a@peer", free=3)
    await asyncio.sleep(0)  # the call's task begins
    try:
        async with asyncio.timeout(5):
            await pool.stop()
    finally:
        disk.set()
    said = [r.getMessage() for r in caplog.records if r.name == "voice.sip.pool"]
    assert any("still winding up" in m and "call-in-a@peer" in m for m in said), said
    assert not pool._tasks


async def test_a_worker_that_died_comes_back_without_the_slots_held_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Slots held for callers redirected to a worker that then died are nobody's: the
    restarted worker (the same entry, the same port) has all its room. Kept, they counted
    against it until they lapsed, up to 34 s with copies of an INVITE renewing them."""
    clock = FakeClock()
    pool = _pool(2, clock)
    pool._running = True
    dead, other = pool._workers
    other.free_slots = 0
    for _ in range(3):
        picked = pool.pick_inbound(next(_ids))
        assert isinstance(picked, HostPort) and picked.port == dead.port

    async def restart(w: pool_module._Worker, delay: float) -> None:
        return None

    monkeypatch.setattr(pool, "_restart", restart)
    pool._on_exit(dead, -9)
    await asyncio.sleep(0)
    dead.up, dead.free_slots = True, 4  # restarted: it reports its 4 free slots
    assert pool.occupancy().reserved == 0
    assert dead.available == 4
