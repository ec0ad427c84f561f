"""The redirect front's choice of worker spreads a burst of INVITEs over the workers."""

from __future__ import annotations

import itertools
import logging
from collections import Counter

import pytest

from sip_config.clock import FakeClock
from sip_config.settings import HostPort
from tests.conftest import sip_settings
from voice.sip.outcome import SipStatus
from voice.sip.pool import SipPool

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
