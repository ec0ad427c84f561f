"""What ``/metrics`` shows of the SIP pool (``SipPool.occupancy``, rendered by
``clinic_voice.wiring.show_sip_pool``): the workers by state and the call slots by use.

An operator had only the count of callers already refused (``refused_busy``) to go by: no
view of how full the line is before that, nor of a worker down. The pool's pure parts are
driven with workers set up as if started; ``tests/integration/test_ivr_capacity.py`` shows
the gauges move on real SIP.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, cast

import pytest

from clinic_voice.metrics import Metrics
from clinic_voice.wiring import show_sip_pool, watch_sip_pool
from sip_config.clock import FakeClock
from sip_config.settings import HostPort
from tests.conftest import sip_settings
from tests.unit.test_metrics import parse
from voice.sip.outcome import SipStatus
from voice.sip.pool import CallHandle, OutboundCall, SipPool, WorkerState
from voice.sip.protocol import (
    CallEvent,
    CallState,
    Command,
    Event,
    IncomingCall,
    PlaceCall,
    PlaceFailed,
    Registered,
    WorkerStatus,
    decode,
)

_ids = (f"call-{n}@peer" for n in itertools.count())


class _Running:
    """A worker's process that has not exited."""

    returncode: int | None = None


def _pool(workers: int, *, caller_slots: int = 0, registrar: str = "") -> SipPool:
    settings = sip_settings(workers, caller_slots=caller_slots, registrar=registrar)
    pool = SipPool(settings, clock=FakeClock(), queue_timeout_s=0)
    pool._slots_max = 4
    for i, w in enumerate(pool._workers):  # as if each had started and reported 4 free slots
        w.up, w.registered, w.free_slots, w.port = True, True, 4, 6000 + i
    return pool


def _calls(pool: SipPool, index: int, n: int) -> None:
    """``n`` calls up on worker ``index``, as the worker then reports them."""
    w = pool._workers[index]
    for _ in range(n):
        call_id = next(_ids)
        w.calls[call_id] = CallHandle(pool, w, call_id)
    w.free_slots -= n


def _gauges(pool: SipPool) -> dict[tuple[str, str], float]:
    metrics = Metrics()
    metrics.on_render(lambda: show_sip_pool(metrics, pool))
    return {
        (name, labels.get("state", "")): value
        for name, labels, value in parse(metrics.render())
        if name.startswith("clinic_sip_")
    }


def test_slots_in_use_reserved_and_free_add_up_to_the_workers_up() -> None:
    pool = _pool(2, caller_slots=1)
    assert _gauges(pool) == {
        ("clinic_sip_workers", "up"): 2,
        ("clinic_sip_workers", "unregistered"): 0,
        ("clinic_sip_workers", "starting"): 0,
        ("clinic_sip_workers", "stopping"): 0,
        ("clinic_sip_workers", "down"): 0,
        ("clinic_sip_slots", "in_use"): 0,
        ("clinic_sip_slots", "reserved"): 0,
        ("clinic_sip_slots", "free"): 8,
        ("clinic_sip_slots_kept_for_callers", ""): 1,
    }
    _calls(pool, 0, 3)
    assert isinstance(pool.pick_inbound(next(_ids)), HostPort)  # a caller on the way
    now = _gauges(pool)
    assert (now["clinic_sip_slots", "in_use"], now["clinic_sip_slots", "reserved"]) == (3, 1)
    assert now["clinic_sip_slots", "free"] == 4
    # The calls end: the worker says so, and the gauges drop back.
    for call_id in list(pool._workers[0].calls):
        del pool._workers[0].calls[call_id]
    pool._workers[0].free_slots = 4
    assert _gauges(pool)["clinic_sip_slots", "in_use"] == 0


def test_a_caller_who_never_came_holds_no_slot_in_the_gauges() -> None:
    pool = _pool(1)
    clock = cast(FakeClock, pool._clock)
    assert isinstance(pool.pick_inbound(next(_ids)), HostPort)
    assert _gauges(pool)["clinic_sip_slots", "reserved"] == 1
    clock.advance(3.0)  # the redirected INVITE never arrived (reserved for 2 s)
    now = _gauges(pool)
    assert (now["clinic_sip_slots", "reserved"], now["clinic_sip_slots", "free"]) == (0, 4)


def test_workers_by_state() -> None:
    pool = _pool(4, registrar="sip:pbx.example:5060")
    w_unregistered, w_starting, w_down = pool._workers[1:]
    w_unregistered.registered = False  # its REGISTER failed: a PBX sends it no calls
    running: Any = _Running()
    w_starting.up, w_starting.free_slots, w_starting.process = False, 0, running
    w_down.up, w_down.free_slots = False, 0  # died: its restart waits out the backoff
    occupancy = pool.occupancy()
    assert dict(occupancy.workers) == {
        WorkerState.UP: 1,
        WorkerState.UNREGISTERED: 1,
        WorkerState.STARTING: 1,
        WorkerState.STOPPING: 0,
        WorkerState.DOWN: 1,
    }
    assert occupancy.free == 8, "the slots of the workers that are up"
    now = _gauges(pool)
    assert [now["clinic_sip_workers", s] for s in ("up", "unregistered", "starting", "down")] == [
        1,
        1,
        1,
        1,
    ]


def test_a_worker_asked_to_stop_is_stopping_with_its_calls_until_its_exit() -> None:
    """Sent SIGTERM by someone else, a worker's calls are closed for up to
    CLINIC_CALL_DRAIN_S + 20 s: it takes no call, and was shown as "starting" all that time
    (an alert on workers that do not start fired, none on a worker being stopped)."""
    pool = _pool(2)
    w = pool._workers[1]
    process = _Running()
    w.process = cast(Any, process)
    w.calls["in-1"] = CallHandle(pool, w, "in-1")
    w.up, w.leaving = False, True  # StopAsked
    now = _gauges(pool)
    states = ("up", "starting", "stopping", "down")
    assert [now["clinic_sip_workers", s] for s in states] == [1, 0, 1, 0]
    assert (now["clinic_sip_slots", "in_use"], now["clinic_sip_slots", "free"]) == (1, 4)
    w.leaving, w.stopping = False, True  # it hangs up by itself (Stopping)
    assert _gauges(pool)["clinic_sip_workers", "stopping"] == 1
    process.returncode = 0  # exited: down until its restart (stopping is kept till then)
    now = _gauges(pool)
    assert [now["clinic_sip_workers", s] for s in states] == [1, 0, 0, 1]


def test_the_gauges_go_with_the_pool() -> None:
    pool = _pool(1)
    metrics = Metrics()
    stop = watch_sip_pool(metrics, pool)
    assert 'clinic_sip_slots{state="free"} 4\n' in metrics.render()
    stop()  # the pool stops
    text = metrics.render()
    assert "# TYPE clinic_sip_slots gauge\n" in text
    assert "clinic_sip_slots{" not in text


async def _sent(commands: list[Command], n: int) -> str:
    """The Call-ID of the ``n``-th PlaceCall the pool sent, once it is sent."""
    async with asyncio.timeout(1):
        while len(commands) < n:  # noqa: ASYNC110 (no I/O: a few turns of the loop)
            await asyncio.sleep(0)
    cmd = commands[n - 1]
    assert isinstance(cmd, PlaceCall), cmd
    return cmd.call_id


class _Stdin:
    """A worker's stdin: the commands the pool wrote to it, decoded."""

    def __init__(self) -> None:
        self.commands: list[Command] = []

    def write(self, line: bytes) -> None:
        cmd = decode(line)
        assert not isinstance(cmd, Event)
        self.commands.append(cmd)


class _Worker(_Running):
    def __init__(self) -> None:
        self.stdin = _Stdin()


async def test_a_call_being_placed_takes_one_slot_at_every_step() -> None:
    """The worker reports its free slots, the new call taken, just before it acknowledges
    the call. The pool's count of calls being placed dropped only at that ack, so between
    the two lines (read apart when the worker's write reached the pool in two pieces) the
    call was counted twice: clinic_sip_slots{state="free"} and the choice of worker were
    one short. The status now says how many PlaceCalls it counts, so both move at once."""
    pool = _pool(1)
    pool._running = True  # as if started
    w = pool._workers[0]
    process: Any = _Worker()
    w.process = process
    commands = process.stdin.commands
    call = OutboundCall("sip:+447911123456@127.0.0.1", "clinic", flash=False)

    def free() -> tuple[int, int]:
        occupancy = pool.occupancy()
        return occupancy.in_use, occupancy.free

    placing = asyncio.create_task(pool.place_call(call))
    call_id = await _sent(commands, 1)
    assert free() == (1, 3), "sent: counted as being placed"
    pool._dispatch(w, WorkerStatus(free_slots=3, port=w.port, placed=1))
    assert free() == (1, 3), "in the worker's free slots: no longer as being placed too"
    assert _gauges(pool)["clinic_sip_slots", "free"] == 3
    pool._dispatch(w, CallEvent(call_id, CallState.TRYING, 0, None, 0.0))
    handle = await placing
    assert handle.id == call_id and free() == (1, 3)

    # A PlaceCall the worker refuses (full after all): its status, then PlaceFailed. The
    # pool sends the call again, and that time it is taken.
    placing = asyncio.create_task(pool.place_call(call))
    refused = await _sent(commands, 2)
    assert free() == (2, 2)
    pool._dispatch(w, WorkerStatus(free_slots=3, port=w.port, placed=2))
    assert free() == (2, 3), "refused: it takes nothing"
    pool._dispatch(w, PlaceFailed(refused, "worker full", retryable=True))
    assert await _sent(commands, 3) == refused and free() == (2, 2), "sent again"
    pool._dispatch(w, WorkerStatus(free_slots=2, port=w.port, placed=3))
    assert free() == (2, 2) and w.pending == 0
    pool._dispatch(w, CallEvent(refused, CallState.TRYING, 0, None, 0.0))
    assert (await placing).id == refused and free() == (2, 2)


def _slots(pool: SipPool) -> tuple[int, int, int]:
    occupancy = pool.occupancy()
    return occupancy.in_use, occupancy.reserved, occupancy.free


@pytest.mark.parametrize(
    ("redirected", "sip_call_id", "late_s", "then"),
    [
        (("a@peer",), "a@peer", 0.0, (1, 0, 3)),
        (("a@peer",), "direct@pbx", 0.0, (1, 1, 2)),
        (("a@peer",), "a@peer", 2.5, (1, 0, 3)),
        ((), "direct@pbx", 0.0, (1, 0, 3)),
    ],
    ids=["redirected", "from a PBX, a caller on the way", "reservation lapsed", "from a PBX"],
)
def test_an_inbound_call_takes_one_slot_at_every_step(
    redirected: tuple[str, ...], sip_call_id: str, late_s: float, then: tuple[int, int, int]
) -> None:
    """A call reaching a worker moves from reserved (if the front redirected it) to in use.

    The worker reported its free slots, the call counted, in a WorkerStatus just before the
    IncomingCall, and the reservation went only with the IncomingCall: between the two lines
    the slot was counted as taken and as reserved, clinic_sip_slots{state="free"} and the
    choice of worker one short. The IncomingCall now carries the free slots: one step. A
    call with no reservation (a PBX's, a caller slower than its reservation) takes none,
    and never frees a slot that a caller on the way holds."""
    pool = _pool(1)
    clock = cast(FakeClock, pool._clock)
    w = pool._workers[0]
    for caller in redirected:
        assert isinstance(pool.pick_inbound(caller), HostPort)
    clock.advance(late_s)
    assert sum(_slots(pool)) == 4
    # Every line the worker sends for the call, with what the pool must show after each.
    pool._dispatch(w, IncomingCall("in-1", "+447700900123", "6000", 3, (), sip_call_id))
    assert _slots(pool) == then and sum(then) == 4
    gauges = _gauges(pool)
    assert [gauges["clinic_sip_slots", s] for s in ("in_use", "reserved", "free")] == list(then)
    free = then[2]
    takers = [pool.pick_inbound(next(_ids)) for _ in range(free + 1)]
    assert all(isinstance(t, HostPort) for t in takers[:free]), "every free slot is given"
    assert takers[free] == SipStatus.BUSY_HERE, "and not one more"


@pytest.mark.parametrize("registrar", ["", "sip:pbx.example"])
def test_serving_wants_every_worker_at_start_then_one(registrar: str) -> None:
    """serve's /readyz ``sip_workers`` (``SipPool.serving``): not ready until every worker
    has come up (and registered, with a registrar); then one worker restarting (asked to
    stop, or dead) leaves it ready while another takes calls, and none up is not ready.
    Before, it was ``ready()``: every worker, always, so one worker's restart (up to
    CLINIC_CALL_DRAIN_S + 20 s) pulled the whole API from a balancer."""
    pool = SipPool(sip_settings(2, registrar=registrar), clock=FakeClock(), queue_timeout_s=0)
    pool._running = True
    first, second = pool._workers

    def comes_up(w: Any) -> None:
        pool._dispatch(w, WorkerStatus(port=6000 + w.index, free_slots=4, placed=0))
        if registrar:
            assert not pool.serving(), "up, not registered yet"
            pool._dispatch(w, Registered(ok=True, sip_status=200))

    comes_up(first)
    assert not pool.serving(), "one of two workers up at start"
    comes_up(second)
    assert pool.serving() and pool.ready()
    first.up = first.registered = False  # asked to stop, or dead: restarted later
    assert pool.serving() and not pool.ready()
    second.up = second.registered = False
    assert not pool.serving(), "no worker takes calls"
    comes_up(first)
    assert pool.serving()
