"""The suite's check of the SIP workers' exits (tests/conftest.py): a worker that exits
non-zero at its pool's stop fails the test that stopped it, unless the test says it may."""

from __future__ import annotations

import pytest

from sip_config.clock import FakeClock
from tests import conftest
from tests.conftest import sip_settings, workers_exited_non_zero
from voice.sip.pool import SipPool


class _Item:
    """What the hook reads of a test: its ``sip_worker_exit_ok`` marker."""

    def __init__(self, *, exit_ok: bool) -> None:
        self._exit_ok = exit_ok

    def get_closest_marker(self, name: str) -> object | None:
        return object() if self._exit_ok and name == "sip_worker_exit_ok" else None


def _teardown_with_exit(status: int, *, exit_ok: bool = False) -> None:
    """A test's teardown during which its pool's stop saw its worker exit with ``status``."""
    item = _Item(exit_ok=exit_ok)
    teardown = conftest.pytest_runtest_teardown(item, None)  # type: ignore[arg-type]
    next(teardown)
    pool = SipPool(sip_settings(1), clock=FakeClock())  # never started: as in its stop
    pool._on_exit(pool._workers[0], status)
    with pytest.raises(StopIteration):
        teardown.send(None)


def test_a_worker_that_aborted_at_its_pools_stop_fails_the_test() -> None:
    # Its ERROR line alone went unseen: an abort at a transfer test's every stop did.
    line = r"SIP worker 0 \(pid 0\) exited with status -6 at the stop \(SIGABRT\)"
    with pytest.raises(pytest.fail.Exception, match=line):
        _teardown_with_exit(-6)


def test_a_restart_that_could_not_start_at_the_stop_fails_the_test() -> None:
    # serve exits 1 for it, as for a worker that exited non-zero; the check read only those.
    item = _Item(exit_ok=False)
    teardown = conftest.pytest_runtest_teardown(item, None)  # type: ignore[arg-type]
    next(teardown)
    pool = SipPool(sip_settings(1), clock=FakeClock())  # never started: as in its stop
    pool._spawn_failed(pool._workers[0], BlockingIOError(11, "Resource temporarily unavailable"))
    line = r"SIP worker 0 could not be started at the stop: \[Errno 11\]"
    with pytest.raises(pytest.fail.Exception, match=line):
        teardown.send(None)


def test_a_worker_that_stopped_cleanly_fails_nothing() -> None:
    _teardown_with_exit(0)


def test_a_test_that_lets_a_worker_exit_non_zero_says_so() -> None:
    _teardown_with_exit(-9, exit_ok=True)


def test_the_exits_of_a_serve_of_its_own_are_read_from_its_log() -> None:
    log = (
        "2026-12-07 01:00:00,001 INFO voice.sip.pool: SIP worker 1 (pid 41) exited with "
        "status 0 at the stop\n"
        "2026-12-07 01:00:00,002 ERROR voice.sip.pool: SIP worker 0 (pid 40) exited with "
        "status -9 at the stop (SIGKILL: killed, it had not stopped by its deadline)\n"
        "2026-12-07 01:00:00,003 ERROR voice.sip.pool: SIP worker 2 (pid 42) exited with "
        "status 1 at the stop\n"
        "2026-12-07 01:00:00,004 ERROR voice.sip.pool: SIP worker 3 could not be started at "
        "the stop: [Errno 11] Resource temporarily unavailable\n"
    )
    assert workers_exited_non_zero(log) == [
        "SIP worker 0 (pid 40) exited with status -9 at the stop (SIGKILL: killed, it had not "
        "stopped by its deadline)",
        "SIP worker 2 (pid 42) exited with status 1 at the stop",
        "SIP worker 3 could not be started at the stop: [Errno 11] Resource temporarily "
        "unavailable",
    ]
