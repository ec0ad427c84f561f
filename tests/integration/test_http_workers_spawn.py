"""How ``serve`` starts its HTTP worker processes (:mod:`clinic_voice.http_workers`), with a
real child in the worker's place (``sleep``: a real worker needs a whole service around it;
``tests/integration/test_api_processes.py`` runs those): what it inherits, and that it is
started without a ``fork()`` of ``serve``."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import pytest

from clinic_voice import http_workers
from clinic_voice.http_workers import HttpWorkers
from clinic_voice.metrics import Metrics
from sip_config.child_process import spawn_child
from tests.conftest import TouchedPages, proc_status
from tests.integration.test_http_workers_link import _NoChannels
from verification.dispatcher import Dispatcher

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]

SLEEP_EXE = os.path.realpath("/usr/bin/sleep")
ROOT = Path(__file__).resolve().parents[2]


def _stand_in(
    data_dir: Path, count: int, env: dict[str, str], misconfigure: Callable[[str], None]
) -> HttpWorkers:
    """serve's end of ``count - 1`` worker processes, with no channels and no checks: the
    tests put a stand-in in the worker's place (``HttpWorkers._argv``)."""
    return HttpWorkers(
        count=count,
        data_dir=data_dir,
        env=env,
        dispatcher=cast(Dispatcher, _NoChannels()),
        checks=dict,
        warming=list,
        metrics=Metrics(),
        misconfigure=misconfigure,
    )


@pytest.fixture
async def workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[HttpWorkers]:
    """serve's end with one worker process of its own, ``sleep`` in the worker's place."""
    monkeypatch.setattr(HttpWorkers, "_argv", lambda self, index: [SLEEP_EXE, "60"])
    hw = _stand_in(tmp_path, 2, {"CLINIC_TEST_MARK": "worker-env"}, lambda reason: None)
    try:
        yield hw
    finally:
        await hw.stop()


def _environ(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


async def _started(hw: HttpWorkers) -> int:
    """The worker's pid once it runs ``sleep`` (setpriv exec's it in the same process)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + 5
    while True:
        proc = hw._procs.get(1)
        if proc is not None and os.readlink(f"/proc/{proc.pid}/exe") == SLEEP_EXE:
            return proc.pid
        assert loop.time() < end, "the HTTP worker was not started within 5 s"
        await asyncio.sleep(0.01)


async def test_a_worker_has_a_group_of_its_own_in_serves_session_with_its_env(
    workers: HttpWorkers,
) -> None:
    await workers.start()
    pid = await _started(workers)
    assert os.getpgid(pid) == pid, "in serve's process group: a Ctrl-C would reach it"
    assert os.getsid(pid) == os.getsid(0), "a session of its own: autogroup starves it"
    assert proc_status(pid)["Umask"] == proc_status(os.getpid())["Umask"]  # serve's
    assert b"CLINIC_TEST_MARK=worker-env" in _environ(pid)


async def test_a_worker_is_started_without_a_fork_of_serve(workers: HttpWorkers) -> None:
    # Off the loop: the first write of its 64 MiB is most of no_blocking's 100 ms.
    pages = await asyncio.to_thread(TouchedPages)
    try:
        await workers.start()
        await _started(workers)
        faults = pages.faults_on_rewrite()
    finally:
        pages.close()
    assert faults < TouchedPages.PAGES // 4, f"{faults} faults: the worker was forked"


# A worker in the worker's place that leaves its line where a real one does on a
# configuration error (clinic_voice/cli.py) and exits with the test's status; it counts its
# starts in ``starts``.
_EXITS = 'echo started >> "$1"; printf "%s" "CLINIC_X=1: a fault" > "$2"; exit "$3"'


@pytest.mark.parametrize(("status", "restarted"), [(2, False), (1, True)])
async def test_a_worker_that_exits_2_stops_serve_with_its_line_instead_of_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: int, restarted: bool
) -> None:
    """Exit 2 is a worker's configuration error (cli.py), which it finds again at every
    start: serve started it again after each backoff, for ever. Now serve stops (as
    Runtime.misconfigure, exit 2) with the worker's line, once; an exit 1 is still
    restarted."""
    starts = tmp_path / "starts"
    note = tmp_path / "run" / "http-worker-1.config-error"

    def argv(self: HttpWorkers, index: int) -> list[str]:
        return ["/bin/sh", "-c", _EXITS, "sh", str(starts), str(note), str(status)]

    monkeypatch.setattr(HttpWorkers, "_argv", argv)
    reasons: list[str] = []
    hw = _stand_in(tmp_path, 2, {}, reasons.append)
    try:
        await hw.start()
        loop = asyncio.get_running_loop()
        end = loop.time() + 5.0  # the first restart comes 1 s after the first exit
        while loop.time() < end and not reasons:
            if starts.exists() and len(starts.read_text().split()) > 1:
                break
            await asyncio.sleep(0.05)
        if restarted:
            assert not reasons, reasons
            assert len(starts.read_text().split()) > 1, "the worker was not started again"
            return
        assert len(reasons) == 1, "serve was not told of the configuration error"
        (reason,) = reasons
        assert reason.startswith("HTTP worker 1 (pid "), reason
        assert reason.endswith(" exited with 2, a configuration error: CLINIC_X=1: a fault")
        await asyncio.sleep(2.0)  # past the backoff of a restart
        assert starts.read_text().split() == ["started"], "started again"
        assert not note.exists(), "the line was left behind"
    finally:
        await hw.stop()


async def test_a_worker_started_as_the_stop_began_is_waited_for_and_judged(
    workers: HttpWorkers, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker's spawn is under way (held here once its process exists, as a fork and
    exec slow on a loaded host) when the stop begins. It was SIGTERMed, but the stop had
    listed the processes before: it was not waited for, its exit never judged. Now the stop
    waits for the spawn, then for the process, and logs its exit."""
    real_spawn = spawn_child
    held, release = asyncio.Event(), asyncio.Event()
    spawned: list[asyncio.subprocess.Process] = []

    async def spawn_held(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        proc = await real_spawn(*args, **kwargs)
        spawned.append(proc)
        held.set()
        await release.wait()
        return proc

    monkeypatch.setattr(http_workers, "spawn_child", spawn_held)
    caplog.set_level(logging.INFO, "clinic_voice.http_workers")
    try:
        await workers.start()
        async with asyncio.timeout(5):
            await held.wait()
        stop = asyncio.create_task(workers.stop())
        await asyncio.sleep(0.2)  # the stop is under way
        release.set()
        async with asyncio.timeout(http_workers.STOP_DEADLINE_S + 5):
            await stop
        [proc] = spawned
        assert proc.returncode is not None, "the worker started as the stop began was left"
    finally:
        for proc in spawned:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    said = f"HTTP worker 1 (pid {proc.pid}) exited with status -15 at the stop (SIGTERM)"
    assert said in caplog.messages
    assert workers.exits_at_stop == ()


# The first run leaves its line and exits 1 (a worker killed between its line and its exit);
# every later run is a real ``clinic-voice http-worker`` with an --index argparse refuses:
# exit 2, Python's usage error, no line of its own. Each run counts itself in ``starts``.
_ARGPARSE_EXIT_2 = (
    'if [ -e "$1" ]; then echo started >> "$1"; exec "$3" -m clinic_voice.cli http-worker '
    '--index one --control "$4"; fi; '
    'echo started >> "$1"; printf "%s" "CLINIC_X=1: a fault" > "$2"; exit 1'
)


async def test_an_exit_2_without_the_workers_line_is_a_crash_not_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """An exit 2 is argparse's too: a worker refusing the arguments serve built (a package
    upgraded under a running serve), mended by a start of serve anew. Taken for a
    configuration error, serve exited 2, which RestartPreventExitStatus=2 keeps stopped for
    good, quoting a line an earlier run had left. Now only an exit 2 with a line left by
    that run stops serve; this one is restarted after its backoff, as a crash."""
    starts = tmp_path / "starts"
    note = tmp_path / "run" / "http-worker-1.config-error"

    argv = ["/bin/sh", "-c", _ARGPARSE_EXIT_2, "sh", str(starts), str(note)]
    argv += [sys.executable, str(tmp_path / "run" / "control.sock")]
    monkeypatch.setattr(HttpWorkers, "_argv", lambda self, index: argv)
    reasons: list[str] = []
    hw = _stand_in(
        tmp_path,
        2,
        {"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        reasons.append,
    )
    try:
        await hw.start()
        loop = asyncio.get_running_loop()
        end = loop.time() + 10.0  # backoffs 1 s, then 2 s: a third start within 4 s or so
        while loop.time() < end and not reasons:
            if starts.exists() and len(starts.read_text().split()) >= 3:
                break
            await asyncio.sleep(0.05)
    finally:
        await hw.stop()
    assert not reasons, reasons
    assert len(starts.read_text().split()) >= 3, "the worker was not started again"
    assert "invalid int value: 'one'" in capfd.readouterr().err  # argparse's exit 2 it was


async def test_a_stop_that_begins_as_a_worker_is_about_to_be_started_leaves_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's keeper removes its old configuration-error line in a thread before each
    spawn. A stop that began during that await had looked at the spawns under way already:
    the spawn that followed started a worker (SIGTERMed at once) that the stop neither
    waited for nor judged, still running as the stop returned."""
    gate = threading.Event()
    real_drop = http_workers._drop_note

    def drop_held(path: Path, index: int) -> None:
        if index == 2:  # worker 2's keeper is held here as the stop begins
            gate.wait(10)
        real_drop(path, index)

    spawned: list[asyncio.subprocess.Process] = []

    async def spawn_slow(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        proc = await spawn_child(*args, **kwargs)
        spawned.append(proc)
        if len(spawned) > 1:
            await asyncio.sleep(2.0)  # a fork and exec slow on a loaded host
        return proc

    # Worker 1 takes half a second to stop, so the stop is still waiting for it as worker 2's
    # keeper goes on; worker 2 is `sleep`.
    slow_stop = "import signal, sys, time; "
    slow_stop += "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(0.5), sys.exit(0))); "
    slow_stop += "open(sys.argv[1], 'w').close(); time.sleep(60)"
    ready = tmp_path / "worker-1-ready"

    def argv(self: HttpWorkers, index: int) -> list[str]:
        if index == 1:
            return [sys.executable, "-c", slow_stop, str(ready)]
        return [SLEEP_EXE, "60"]

    monkeypatch.setattr(http_workers, "_drop_note", drop_held)
    monkeypatch.setattr(http_workers, "spawn_child", spawn_slow)
    monkeypatch.setattr(HttpWorkers, "_argv", argv)
    hw = _stand_in(tmp_path, 3, {}, lambda reason: None)
    try:
        await hw.start()
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while not ready.exists():
            assert loop.time() < end, "worker 1 was not started within 10 s"
            await asyncio.sleep(0.02)
        stop = asyncio.create_task(hw.stop())
        await asyncio.sleep(0.05)  # the stop has begun, and waits for worker 1
        gate.set()
        async with asyncio.timeout(http_workers.STOP_DEADLINE_S + 5):
            await stop
        left = [p.pid for p in spawned if p.returncode is None]
        assert not left, f"worker(s) {left} still running after the stop"
    finally:
        gate.set()
        await asyncio.sleep(2.5)  # a spawn left behind completes (and SIGTERMs its worker)
        for proc in spawned:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
