"""The redirect front's choice of worker spreads a burst of INVITEs over the workers."""

from __future__ import annotations

import itertools
from collections import Counter

from sip_config.clock import FakeClock
from tests.conftest import sip_settings
from voice.sip.pool import SipPool

_ids = (f"call-{n}@peer" for n in itertools.count())


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
    assert all(p is not None for p in picks)
    per_port = Counter(p.port for p in picks if p is not None)
    assert sorted(per_port.values()) == [2, 2, 2], per_port
    picks += [pool.pick_inbound(next(_ids)) for _ in range(6)]
    assert None not in picks, "12 slots for 12 callers"
    assert pool.pick_inbound(next(_ids)) is None, "a 13th caller gets 486 from the front"


def test_a_reservation_lapses_when_the_caller_never_comes() -> None:
    clock = FakeClock()
    pool = _pool(1, clock)
    for _ in range(4):
        assert pool.pick_inbound(next(_ids)) is not None
    assert pool.pick_inbound(next(_ids)) is None
    clock.advance(2.5)
    assert pool.pick_inbound(next(_ids)) is not None


def test_a_retransmitted_invite_takes_no_second_slot() -> None:
    clock = FakeClock()
    pool = _pool(2, clock)
    first = pool.pick_inbound("same@peer")
    assert all(pool.pick_inbound("same@peer") == first for _ in range(9))
    # 7 slots left for 7 other callers
    assert None not in [pool.pick_inbound(next(_ids)) for _ in range(7)]
    assert pool.pick_inbound(next(_ids)) is None


def test_lapsed_reservations_do_not_block_outbound_calls() -> None:
    clock = FakeClock()
    pool = _pool(2, clock)
    for _ in range(8):  # every slot reserved by callers who never follow the 302
        pool.pick_inbound(next(_ids))
    assert pool._pick_outbound() is None
    clock.advance(2.5)
    assert pool._pick_outbound() is not None
