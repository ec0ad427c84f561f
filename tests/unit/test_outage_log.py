"""An outage of the store is logged when it starts, every 30 s while it lasts, and when it
ends: not on every poll."""

from __future__ import annotations

import logging

import pytest

from sip_config.clock import FakeClock
from verification.errors import StoreUnavailable
from verification.outage_log import OutageLog

log = logging.getLogger("test.outage")


def test_one_line_at_start_then_every_30_s_then_one_at_the_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    outage = OutageLog(log, "timers", clock)
    caplog.set_level(logging.WARNING, logger="test.outage")
    outage.ok()
    assert caplog.messages == []
    for _ in range(160):  # 32 s of polls every 0.2 s
        outage.failed(StoreUnavailable("connection refused"))
        clock.advance(0.2)
    assert caplog.messages[0] == "timers: store unavailable: connection refused"
    assert len(caplog.messages) == 2
    assert caplog.messages[1].startswith("timers: store still unavailable after 30 s (15")
    assert caplog.messages[1].endswith(" attempts failed): connection refused")
    outage.ok()
    outage.ok()
    assert not outage.down
    assert caplog.messages[2].startswith("timers: store available again after 32.")
    assert len(caplog.messages) == 3


def test_a_new_outage_is_reported_from_its_own_start(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    outage = OutageLog(log, "webhooks", clock)
    caplog.set_level(logging.WARNING, logger="test.outage")
    outage.failed(StoreUnavailable("a"))
    outage.ok()
    clock.advance(100)
    outage.failed(StoreUnavailable("b"))
    assert caplog.messages[-1] == "webhooks: store unavailable: b"


def test_a_fault_log_is_an_error_with_the_first_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    faults = OutageLog(log, "timers", clock, faults=True)
    caplog.set_level(logging.WARNING, logger="test.outage")
    for _ in range(2):
        try:
            raise KeyError("doc")
        except KeyError as exc:
            faults.failed(exc)
    faults.ok()
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.ERROR, "timers: unexpected error: 'doc'"),
        (logging.ERROR, "timers: working again after 0.0 s"),
    ]
    assert caplog.records[0].exc_info is not None
