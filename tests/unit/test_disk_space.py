"""The data dir's free space (:mod:`clinic_voice.disk_space`), read from the real file system
of a temporary folder: ``clinic_data_dir_free_bytes`` is ``df``'s Avail of the data dir, no
sample while it cannot be read."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from clinic_voice import disk_space
from clinic_voice.disk_space import FreeSpaceProbe, free_bytes, show_free_space
from clinic_voice.metrics import Gauge
from sip_config.tasks import cancel_and_wait

# Other processes write to the same disk while the test runs (a build, another test).
SLACK = 256 * 1024 * 1024


def _avail(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


async def _until(what: str, check: Callable[[], bool], deadline_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while not check():
        if loop.time() > end:
            pytest.fail(f"timed out after {deadline_s} s waiting for {what}")
        await asyncio.sleep(0.01)


def test_free_bytes_is_what_df_shows_as_available(tmp_path: Path) -> None:
    # Not f_bfree: the blocks kept for root are none of serve's (nor its Redis's).
    assert abs(free_bytes(tmp_path) - shutil.disk_usage(tmp_path).free) <= SLACK
    assert abs(free_bytes(tmp_path) - _avail(tmp_path)) <= SLACK


async def test_the_gauge_follows_the_data_dir_and_has_no_sample_while_unreadable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="clinic_voice.disk_space")
    data = tmp_path / "data"
    data.mkdir()
    gauge = Gauge("clinic_data_dir_free_bytes", "free")
    reading = asyncio.create_task(show_free_space(gauge, data, every_s=0.01))
    try:
        await _until("a first reading", lambda: gauge.value() is not None)
        value = gauge.value()
        assert value is not None and abs(value - _avail(data)) <= SLACK
        assert value == int(value) and value > 0

        data.rmdir()  # a data dir gone (an unmounted disk): no sample, not the last value
        await _until("the gauge to lose its sample", lambda: gauge.value() is None)
        await asyncio.sleep(0.1)  # several failed readings: still one WARNING
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert str(data) in warnings[0].getMessage()
        assert "No such file or directory" in warnings[0].getMessage()
        assert gauge.render() == [
            "# HELP clinic_data_dir_free_bytes free",
            "# TYPE clinic_data_dir_free_bytes gauge",
        ]

        data.mkdir()
        await _until("a reading again", lambda: gauge.value() is not None)
        assert any("reads again" in r.getMessage() for r in caplog.records)
    finally:
        await cancel_and_wait(reading)


def test_a_file_system_mounted_read_only_has_no_byte_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ext4 remounts read-only after an I/O error (errors=remount-ro): statvfs still shows
    # its free blocks, yet every write fails, as on a full disk ("A full or read-only disk").
    real = os.statvfs(tmp_path)
    fields = list(real)
    fields[8] = real.f_flag | os.ST_RDONLY  # f_flag
    read_only = os.statvfs_result(fields)
    assert read_only.f_bavail * read_only.f_frsize > 0
    monkeypatch.setattr(os, "statvfs", lambda path: read_only)
    assert free_bytes(tmp_path) == 0


async def test_a_read_that_does_not_answer_leaves_no_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A statvfs that hangs (a network file system gone): the gauge kept the last value,
    read as the disk's state for as long as the disk did not answer."""
    caplog.set_level(logging.INFO, logger="clinic_voice.disk_space")
    answer = threading.Event()
    reads: list[Path] = []

    def hangs_after_the_first(path: Path) -> int:
        reads.append(path)
        if len(reads) > 1:
            answer.wait(30)
        return 12345

    monkeypatch.setattr(disk_space, "free_bytes", hangs_after_the_first)
    monkeypatch.setattr(disk_space, "READ_LIMIT_S", 0.1, raising=False)
    gauge = Gauge("clinic_data_dir_free_bytes", "free")
    reading = asyncio.create_task(show_free_space(gauge, tmp_path, every_s=0.01))
    try:
        await _until("a first reading", lambda: gauge.value() == 12345)
        await _until("the gauge to lose its sample", lambda: gauge.value() is None)
        assert len(reads) == 2, "one read at a time"
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == [
            f"cannot read the free space of the data dir {tmp_path}: no answer within 0.1 s"
        ]
        answer.set()
        await _until("a reading again", lambda: gauge.value() == 12345)
    finally:
        answer.set()
        await cancel_and_wait(reading)


_HUNG_AT_EXIT = """
import asyncio, threading
from pathlib import Path
from clinic_voice import disk_space
from clinic_voice.metrics import Gauge

disk_space.free_bytes = lambda path: threading.Event().wait() or 0  # never answers

async def main() -> None:
    gauge = Gauge("clinic_data_dir_free_bytes", "free")
    task = asyncio.create_task(disk_space.show_free_space(gauge, Path("."), every_s=0.01))
    await asyncio.sleep(0.2)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

asyncio.run(main())
print("exited")
"""


def test_a_read_that_never_answers_does_not_hold_the_exit() -> None:
    """asyncio.run (and the interpreter) wait for the loop's executor threads at exit: a
    statvfs hung there held serve's exit until systemd's SIGKILL."""
    env = os.environ | {"PYTHONPATH": str(Path(disk_space.__file__).parents[1])}
    try:
        done = subprocess.run(
            [sys.executable, "-c", _HUNG_AT_EXIT],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=20,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not exit within 20 s of its reading being cancelled")
    assert done.returncode == 0 and done.stdout == "exited\n", done.stderr


async def test_the_probe_reads_now_and_none_when_it_cannot(tmp_path: Path) -> None:
    """The voicemail's budget reads the free space per message: a number, or None (never an
    exception, never a wait past its limit)."""
    free = await FreeSpaceProbe(tmp_path).read()
    assert free is not None and abs(free - _avail(tmp_path)) < SLACK
    assert await FreeSpaceProbe(tmp_path / "gone").read() is None


async def test_the_probe_keeps_one_read_outstanding_on_a_disk_that_does_not_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Callers at once, and one after another, while a read hangs: one thread, each caller
    None after its limit; once the read answers, the next caller starts a fresh one."""
    release = threading.Event()
    reads: list[float] = []

    def hang(path: Path) -> int:
        reads.append(time.monotonic())
        release.wait(10)
        return 1234

    monkeypatch.setattr(disk_space, "free_bytes", hang)
    probe = FreeSpaceProbe(tmp_path, limit_s=0.05)
    try:
        assert await asyncio.gather(*(probe.read() for _ in range(5))) == [None] * 5
        assert await probe.read() is None
        assert len(reads) == 1
        release.set()
        # A caller waiting when the read answers takes its answer.
        assert await FreeSpaceProbe(tmp_path, limit_s=5).read() == 1234
        deadline = time.monotonic() + 5
        while (free := await probe.read()) is None:
            assert time.monotonic() < deadline, "the hung read's answer never came"
            await asyncio.sleep(0.01)
        assert free == 1234
    finally:
        release.set()
