"""The pool's side of its workers, pure: the choice of worker (a burst of INVITEs spread
over the workers, a quiet worker passed over), the watch of frozen workers going on past a
failing round, and a command to a worker whose pipe has closed."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from types import SimpleNamespace
from typing import Any, cast

import pytest

from sip_config.clock import FakeClock
from sip_config.settings import HostPort
from tests.conftest import sip_settings
from voice.sip import pool as pool_module
from voice.sip.outcome import SipStatus
from voice.sip.pool import SipPool
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
