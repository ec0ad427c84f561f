"""serve's exit after its stop (clinic_voice/cli.py ``_raise_if_failed``): a configuration
fault is exit 2, a defect (a task that died, a worker that did not stop as asked) exit 1;
and what a worker's exit at the stop says (sip_config/worker_exit.py)."""

from __future__ import annotations

import asyncio
import errno
import signal
from pathlib import Path

import pytest
import uvloop
from aiohttp import web

from clinic_voice import cli
from clinic_voice.app import RUNTIME, Runtime
from clinic_voice.cli import ServiceFailed, ServiceMisconfigured, _raise_if_failed
from clinic_voice.metrics import Metrics
from sip_config.clock import FakeClock, SystemClock
from sip_config.settings import Settings
from sip_config.worker_exit import WorkerExit, as_asked, status_note
from tests.conftest import sip_settings
from voice.sip import pool as pool_module
from voice.sip.pool import SipPool

KILLED = WorkerExit("SIP worker 0", 4242, -9, killed=True)
KILLED_SAYS = (
    "SIP worker 0 (pid 4242) exited with status -9 at the stop "
    "(SIGKILL: killed, it had not stopped by its deadline)"
)
ABORTED = WorkerExit("HTTP worker 1", 4343, -6)
ABORTED_SAYS = "HTTP worker 1 (pid 4343) exited with status -6 at the stop (SIGABRT)"


def _stopped(
    *, misconfigured: str = "", failed: str = "", exits: tuple[WorkerExit, ...] = ()
) -> web.Application:
    """An app whose runtime ended its stop so."""
    app = web.Application()
    rt = Runtime(settings=Settings.from_env({}), clock=SystemClock(), metrics=Metrics())
    rt.misconfigured, rt.failed = misconfigured, failed
    rt.worker_exits.extend(exits)
    app[RUNTIME] = rt
    return app


def test_a_stop_as_asked_raises_nothing() -> None:
    _raise_if_failed(_stopped())  # exit 0


@pytest.mark.parametrize(
    ("exits", "says"),
    [
        ((KILLED,), KILLED_SAYS),
        ((KILLED, ABORTED), f"{KILLED_SAYS}; {ABORTED_SAYS}"),
    ],
)
def test_a_worker_that_did_not_stop_as_asked_is_a_defect(
    exits: tuple[WorkerExit, ...], says: str
) -> None:
    with pytest.raises(ServiceFailed) as raised:  # exit 1
        _raise_if_failed(_stopped(exits=exits))
    assert str(raised.value) == says


def test_a_task_that_died_is_named_first() -> None:
    with pytest.raises(ServiceFailed) as raised:
        _raise_if_failed(_stopped(failed="the step timers", exits=(KILLED,)))
    assert str(raised.value) == (
        f"the step timers failed (its traceback is in the log); {KILLED_SAYS}"
    )


def test_a_configuration_fault_wins_over_a_worker_exit() -> None:
    with pytest.raises(ServiceMisconfigured, match="another CLINIC_SECRET"):  # exit 2
        _raise_if_failed(_stopped(misconfigured="another CLINIC_SECRET", exits=(KILLED,)))


@pytest.mark.parametrize(
    ("status", "sent", "asked"),
    [
        (0, None, True),
        (0, signal.SIGTERM, True),
        (-15, signal.SIGTERM, True),  # an HTTP worker still loading: SIGTERM's default
        (-15, None, False),  # a SIP worker is stopped by its stdin, never by a signal
        (-9, signal.SIGTERM, False),  # its supervisor's SIGKILL, past the deadline
        (-6, signal.SIGTERM, False),  # an abort at the teardown
        (1, signal.SIGTERM, False),
        (2, None, False),
    ],
)
def test_a_stop_as_asked_is_0_or_the_signal_sent(
    status: int, sent: signal.Signals | None, asked: bool
) -> None:
    assert as_asked(status, sent) is asked


@pytest.mark.parametrize(
    ("status", "killed", "note"),
    [
        (0, False, ""),
        (1, False, ""),
        (-6, False, " (SIGABRT)"),
        (-9, False, " (SIGKILL)"),  # someone else's
        (-9, True, " (SIGKILL: killed, it had not stopped by its deadline)"),
        (-99, False, " (signal 99)"),
    ],
)
def test_what_an_exit_status_says(status: int, killed: bool, note: str) -> None:
    assert status_note(status, killed=killed) == note


def test_a_worker_whose_start_failed_says_why_not_a_status() -> None:
    failed = WorkerExit("SIP worker 1", 0, None, not_started="[Errno 12] Cannot allocate memory")
    assert (
        str(failed)
        == "SIP worker 1 could not be started at the stop: [Errno 12] Cannot allocate memory"
    )


@pytest.mark.sip_worker_exit_ok  # on purpose, and the suite's own check would fail it
@pytest.mark.parametrize("status", [0, -6, 1])
def test_the_pool_keeps_the_exits_at_its_stop_that_were_not_0(status: int) -> None:
    pool = SipPool(sip_settings(1), clock=FakeClock())  # never started: as in its stop
    pool._on_exit(pool._workers[0], status)
    expected = () if status == 0 else (WorkerExit("SIP worker 0", 0, status),)
    assert pool.exits_at_stop == expected


@pytest.mark.sip_worker_exit_ok
def test_the_pool_says_which_worker_it_killed_for_not_stopping() -> None:
    pool = SipPool(sip_settings(1), clock=FakeClock())
    worker = pool._workers[0]
    worker.pid, worker.killed = 4242, True  # as _stopped() leaves it before its SIGKILL
    pool._on_exit(worker, -9)
    assert pool.exits_at_stop == (KILLED,)
    assert str(pool.exits_at_stop[0]) == KILLED_SAYS


async def test_a_worker_killed_as_frozen_while_running_does_not_count_at_a_stop_right_after() -> (
    None
):
    # The watch kills a frozen worker (SIGKILL) while the pool runs; the stop begins before
    # the worker's reader has seen it die (a loop step later, or the child watcher's thread
    # late on a loaded host). That death was the run's, as one a step earlier would have
    # been (logged, restarted): it is no exit at the stop, and serve must not exit 1 for it.
    pool = SipPool(sip_settings(1), clock=FakeClock())
    pool._running = True  # as start() leaves it
    worker = pool._workers[0]
    proc = await asyncio.create_subprocess_exec(
        "sleep", "60", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    worker.process, worker.pid = proc, proc.pid
    worker.reader = asyncio.create_task(pool._read(worker, proc))
    await asyncio.sleep(0)  # the reader waits for its line
    pool._kill(worker)  # the watch round: frozen, killed
    await pool.stop()
    assert proc.returncode == -signal.SIGKILL
    assert pool.exits_at_stop == ()


SHIPPED_FLOWS = Path(__file__).resolve().parents[2] / "ivr_flows"
ROTATED = "n" * 40


@pytest.mark.parametrize(
    ("env", "says"),
    [
        # README, "Changing the secret", step 2: listing the current secret is refused.
        (
            {"CLINIC_SECRET": ROTATED, "CLINIC_PREVIOUS_SECRETS": f"{'o' * 40},{ROTATED}"},
            "CLINIC_PREVIOUS_SECRETS lists the current secret (CLINIC_SECRET)",
        ),
        # A configured key that the generated call records key file also holds (copied).
        (
            {"CLINIC_API_KEYS": "k" * 20, "data/calls-api-key": "k" * 20},
            "the API key and the call records API key must differ",
        ),
    ],
)
def test_a_setting_refused_once_serve_reads_its_data_dir_is_exit_2(
    env: dict[str, str],
    says: str,
    elsewhere: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Before, these SettingsErrors of build_app (they need the data dir's generated secret
    or keys) escaped cli.main: a traceback and exit 1, which a service manager restarts
    again and again, where the README's exit table says 2, `configuration error: ...`."""
    for name, value in env.items():
        if name.startswith("data/"):
            (elsewhere / "data").mkdir(mode=0o700, exist_ok=True)
            (elsewhere / name).write_text(value + "\n")
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("CLINIC_FLOWS_DIR", str(SHIPPED_FLOWS))
    monkeypatch.setenv("CLINIC_DATA_DIR", str(elsewhere / "data"))
    monkeypatch.setenv("CLINIC_HTTP_ADDR", "127.0.0.1:0")
    # serve itself, on asyncio's loop: build_app refuses before Redis, SIP or HTTP start.
    monkeypatch.setattr(uvloop, "run", asyncio.run)  # as cli.main calls it
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"clinic-voice serve: configuration error: {says}"), err
    assert "Traceback" not in err, err


@pytest.mark.sip_worker_exit_ok  # on purpose, and the suite's own check would fail it
async def test_a_restart_that_cannot_start_its_process_as_the_stop_begins_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A worker died while the pool ran; its restart's fork fails (EAGAIN) just as the stop
    # begins. That -1 was passed as an exit status and read as signal 1: "status -1 at the
    # stop (SIGHUP)", with the dead process's pid. No process ran: the OSError says why.
    pool = SipPool(sip_settings(1), clock=FakeClock())
    pool._running = True  # as start() leaves it
    worker = pool._workers[0]
    worker.pid = 4242  # the process that died while the pool ran

    async def fork_fails_as_the_stop_begins(*args: object, **kwargs: object) -> None:
        pool._running = False  # stop() began while the spawn was under way
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(pool_module, "spawn_child", fork_fails_as_the_stop_begins)
    await pool._restart(worker, 0.0)
    says = (
        "SIP worker 0 could not be started at the stop: [Errno 11] Resource temporarily unavailable"
    )
    assert [str(e) for e in pool.exits_at_stop] == [says]
    assert pool.exits_at_stop[0].status is None
    assert worker.spawning is None


async def test_a_restart_that_cannot_start_its_process_while_running_is_tried_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = SipPool(sip_settings(1), clock=FakeClock())
    pool._running = True
    worker = pool._workers[0]
    scheduled: list[bool] = []

    async def fork_fails(*args: object, **kwargs: object) -> None:
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(pool_module, "spawn_child", fork_fails)
    monkeypatch.setattr(pool, "_schedule_restart", lambda w, *, was_up: scheduled.append(was_up))
    await pool._restart(worker, 0.0)
    assert scheduled == [False]  # after the backoff of one more failure
    assert pool.exits_at_stop == ()
