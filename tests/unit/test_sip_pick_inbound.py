"""The redirect front's choice of worker spreads a burst of INVITEs over the workers."""

from __future__ import annotations

from collections import Counter

from sip_config.clock import FakeClock
from tests.conftest import sip_settings
from voice.sip.pool import SipPool


def _pool(workers: int, clock: FakeClock) -> SipPool:
    settings = sip_settings(workers)
    pool = SipPool(settings, clock=clock)
    for i, w in enumerate(pool._workers):  # as if each had started and reported 4 free slots
        w.up, w.free_slots, w.port = True, 4, 6000 + i
    return pool


def test_a_burst_is_spread_and_capped_by_free_slots() -> None:
    clock = FakeClock()
    pool = _pool(3, clock)
    picks = [pool.pick_inbound() for _ in range(6)]
    assert all(p is not None for p in picks)
    per_port = Counter(p.port for p in picks if p is not None)
    assert sorted(per_port.values()) == [2, 2, 2], per_port
    picks += [pool.pick_inbound() for _ in range(6)]
    assert None not in picks, "12 slots for 12 callers"
    assert pool.pick_inbound() is None, "a 13th caller gets 486 from the front"


def test_a_reservation_lapses_when_the_caller_never_comes() -> None:
    clock = FakeClock()
    pool = _pool(1, clock)
    for _ in range(4):
        assert pool.pick_inbound() is not None
    assert pool.pick_inbound() is None
    clock.advance(2.5)
    assert pool.pick_inbound() is not None
