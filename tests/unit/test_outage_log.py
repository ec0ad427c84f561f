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
        (logging.ERROR, "timers: working again after 0.0 s (2 attempts failed)"),
    ]
    assert caplog.records[0].exc_info is not None


def _defect(kind: type[Exception] = KeyError, what: str = "doc") -> Exception:
    """An exception raised (with its traceback) from one place: one defect."""
    try:
        raise kind(what)
    except Exception as exc:
        return exc


def _other_defect() -> Exception:
    try:
        raise KeyError("doc")  # the same type and message, raised elsewhere
    except KeyError as exc:
        return exc


def test_a_lasting_defect_is_counted_every_30_s_without_its_traceback_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(start=1_800_000_000.0)  # 08:00:00 UTC
    faults = OutageLog(log, "webhooks", clock, faults=True)
    caplog.set_level(logging.WARNING, logger="test.outage")
    for _ in range(160):  # 32 s of polls every 0.2 s
        faults.failed(_defect())
        clock.advance(0.2)
    faults.ok()
    first, again, back = caplog.records
    assert first.getMessage() == "webhooks: unexpected error: 'doc'" and first.exc_info
    assert again.exc_info is None
    assert again.getMessage().startswith(
        "webhooks: unexpected error again, 150 times since 08:00:00 UTC (KeyError at "
        "test_outage_log.py:"
    )
    assert again.getMessage().endswith(", traceback logged at 08:00:00 UTC): 'doc'")
    assert back.getMessage() == "webhooks: working again after 32.0 s (160 attempts failed)"


def test_a_new_defect_in_the_same_streak_gets_its_own_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    faults = OutageLog(log, "timers", clock, faults=True)
    caplog.set_level(logging.WARNING, logger="test.outage")
    faults.failed(_defect())
    clock.advance(0.2)
    faults.failed(_defect())
    clock.advance(0.2)
    faults.failed(_defect(ValueError, "bad step"))
    clock.advance(0.2)
    faults.failed(_other_defect())
    traced = [r.getMessage() for r in caplog.records if r.exc_info]
    assert traced == [
        "timers: unexpected error: 'doc'",
        "timers: unexpected error: bad step",
        "timers: unexpected error: 'doc'",
    ]
    assert len(caplog.records) == 3


def test_a_defect_that_comes_and_goes_is_counted_not_logged_at_every_poll(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every other poll fails (a bad record, say): each was a new streak, and logged its
    traceback and a "working again" line, five times a second."""
    clock = FakeClock(start=1_800_000_000.0)
    faults = OutageLog(log, "timers", clock, faults=True)
    caplog.set_level(logging.WARNING, logger="test.outage")
    for _ in range(121):  # 60 s: a failed poll, then a good one, 0.25 s apart
        faults.failed(_defect())
        clock.advance(0.25)
        faults.ok()
        clock.advance(0.25)
    messages = caplog.messages
    assert len(messages) == 6, messages
    assert [r.exc_info is not None for r in caplog.records] == [True] + [False] * 5
    assert messages[1] == messages[3] == messages[5]
    assert messages[1] == "timers: working again after 0.2 s (1 attempts failed)"
    # 30 s after the traceback, the 60 failures since, said once; then the next 60
    assert messages[2].startswith("timers: unexpected error again, 60 times since 08:00:00 UTC")
    assert messages[4].startswith("timers: unexpected error again, 60 times since 08:00:30 UTC")
