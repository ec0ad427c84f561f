"""The data dir's free space (:mod:`clinic_voice.disk_space`), read from the real file system
of a temporary folder: ``clinic_data_dir_free_bytes`` is ``df``'s Avail of the data dir, no
sample while it cannot be read."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from clinic_voice.disk_space import free_bytes, show_free_space
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
