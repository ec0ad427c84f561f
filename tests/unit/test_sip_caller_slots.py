"""Call slots kept for callers (``CLINIC_SIP_CALLER_SLOTS``): an outbound call, always a
verification's, takes a slot only when that many stay free after it; a caller may take any.

A review found a burst of voice-code verifications taking every slot, and patients phoning
the clinic then got 486 Busy Here, while each verification had SMS to fall back to. These
tests drive the pool's pure parts (its choice of worker) with workers set up as if each had
started and reported its free slots; ``tests/integration/test_ivr_capacity.py`` shows the
same on real SIP.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import pytest

from sip_config.clock import FakeClock
from sip_config.settings import SIP_CALLS_PER_WORKER, HostPort
from tests.conftest import sip_settings
from voice.sip.outcome import SipStatus
from voice.sip.pool import OutboundCall, PoolBusyError, SipPool

_ids = (f"call-{n}@peer" for n in itertools.count())


@dataclass(frozen=True, slots=True)
class W:
    """One worker as the pool sees it."""

    free: int = 4  # what its last WorkerStatus said
    pending: int = 0  # PlaceCalls its last status does not count yet
    reserved: int = 0  # slots the front holds for redirected callers on their way
    up: bool = True


def _pool(workers: list[W], caller_slots: int, clock: FakeClock | None = None) -> SipPool:
    settings = sip_settings(len(workers), caller_slots=caller_slots)
    clock = clock or FakeClock()
    pool = SipPool(settings, clock=clock, queue_timeout_s=0)
    pool._slots_max = 4
    for i, (w, spec) in enumerate(zip(pool._workers, workers, strict=True)):
        w.up, w.free_slots, w.pending, w.port = spec.up, spec.free, spec.pending, 6000 + i
        w.reserved = {f"r{i}-{n}": clock.monotonic() + 2.0 for n in range(spec.reserved)}
    return pool


def _take_outbound(pool: SipPool) -> int:
    """How many outbound calls the pool gives a slot, each taking it as place_call does
    (pending until the worker's status counts it)."""
    taken = 0
    while (w := pool._pick_outbound()) is not None:
        w.pending += 1
        taken += 1
        assert taken <= 4 * len(pool._workers), "more outbound calls than slots"
    return taken


@pytest.mark.parametrize(
    ("workers", "caller_slots", "outbound"),
    [
        ([W()], 0, 4),  # 0: first come, first served, as before
        ([W()], 1, 3),  # the review's case: one worker, one slot kept for a caller
        ([W()], 4, 0),  # every slot kept: verifications never take one
        ([W(), W(), W(), W()], 4, 12),  # the default: a quarter of the slots (one per worker)
        # The reserve is counted across workers, not per worker: 2 + 2 + 2 free, 5 kept.
        ([W(free=2), W(free=2), W(free=2)], 5, 1),
        ([W(free=2), W(free=2), W(free=2)], 6, 0),
        # Calls already up (a low free count) and calls being placed count as taken.
        ([W(free=1), W(free=4, pending=2)], 1, 2),
        # A slot the front holds for a redirected caller is a caller's already.
        ([W(reserved=2)], 1, 1),
        ([W(reserved=3)], 1, 0),
        # A worker that is down (restarting) has no free slot: the reserve comes out of
        # the workers that are up, so verifications lose their slots before callers do.
        ([W(up=False), W()], 2, 2),
        ([W(up=False), W(up=False), W()], 4, 0),
    ],
)
def test_outbound_calls_leave_the_callers_their_slots(
    workers: list[W], caller_slots: int, outbound: int
) -> None:
    pool = _pool(workers, caller_slots)
    assert _take_outbound(pool) == outbound


@pytest.mark.parametrize("caller_slots", [0, 1, 4])
def test_a_caller_may_take_every_slot_left(caller_slots: int) -> None:
    pool = _pool([W()], caller_slots)
    outbound = _take_outbound(pool)
    callers = [pool.pick_inbound(next(_ids)) for _ in range(4 - outbound)]
    assert all(isinstance(c, HostPort) for c in callers), callers
    assert pool.pick_inbound(next(_ids)) == SipStatus.BUSY_HERE, "every slot is taken"


def test_a_slot_freed_goes_to_a_waiting_verification_only_past_the_reserve() -> None:
    pool = _pool([W(free=1), W(free=1)], 1)
    assert _take_outbound(pool) == 1
    placed = next(w for w in pool._workers if w.pending)
    other = next(w for w in pool._workers if w is not placed)
    placed.free_slots, placed.pending = 0, 0  # the worker acknowledged the call
    assert _take_outbound(pool) == 0, "one slot free, and it is the callers'"
    other.free_slots = 2  # a call on the other worker ended
    assert _take_outbound(pool) == 1


def test_behind_a_pbx_the_rule_holds_on_the_workers_own_counts() -> None:
    # A PBX hunts over the workers itself (no front, no reservation), but each worker tells
    # the pool its free slots with each IncomingCall and after each call's end: the calls
    # the PBX sent are taken slots, and the reserve is kept from what is left.
    pool = _pool([W(), W()], 2)
    pool._workers[0].free_slots = 1  # three PBX calls up on worker 0
    assert _take_outbound(pool) == 3
    assert pool._workers[1].pending == 3
    pool._workers[0].free_slots = 3  # two of them ended
    assert _take_outbound(pool) == 2


def test_the_pick_still_spreads_calls_over_the_workers() -> None:
    pool = _pool([W(), W(), W()], 3)
    picked = []
    while (w := pool._pick_outbound()) is not None:
        w.pending += 1
        picked.append(w.index)
    assert len(picked) == 9
    assert sorted(picked.count(i) for i in range(3)) == [3, 3, 3], picked


async def test_a_verification_call_kept_from_the_callers_slots_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="voice.sip.pool")
    pool = _pool([W(free=1)], 1)
    pool._running = True  # as if started; queue_timeout_s=0: the first look decides
    with pytest.raises(PoolBusyError, match="kept for callers") as err:
        await pool.place_call(OutboundCall("sip:+447911123456@127.0.0.1", "clinic", flash=False))
    # The channel reports it as the undeliverable detail "no SIP capacity: ...".
    assert str(err.value) == "the free call slots are kept for callers (CLINIC_SIP_CALLER_SLOTS)"
    stats = pool.stats()
    assert (stats["free_slots"], stats["caller_slots"], stats["kept_for_callers"]) == (1, 1, 1)
    assert any("kept for callers" in r.getMessage() for r in caplog.records), caplog.records
    # With no slot free at all the pool is full, as before, and nothing was kept.
    pool._workers[0].free_slots = 0
    with pytest.raises(PoolBusyError, match="all 1 SIP workers are full"):
        await pool.place_call(OutboundCall("sip:+447911123456@127.0.0.1", "clinic", flash=False))
    assert pool.stats()["kept_for_callers"] == 1


def test_the_settings_know_how_many_calls_a_worker_holds() -> None:
    from voice.sip.pjsua import MAX_CALLS  # imports pjsua2: only here

    assert SIP_CALLS_PER_WORKER == MAX_CALLS
