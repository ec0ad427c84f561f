"""The clinic line's admission of a voicemail message (clinic_voice/clinic_line.py, on
voice/ivr/voicemail_budget.py): what it reads of the disk, and when it does not.

The messages' store is a stand-in whose scan never answers, as a stat on a network file
system gone does (what the scan counts is tests/unit/test_voicemail.py's)."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import cast

import pytest

from clinic_voice import disk_space
from clinic_voice.app import Runtime
from clinic_voice.clinic_line import ClinicLine
from clinic_voice.metrics import Metrics
from sip_config.clock import FakeClock
from sip_config.settings import Settings
from voice.ivr.flow import FlowSet
from voice.ivr.voicemail import Voicemails


class HungDisk:
    """Voicemails whose scan of the messages' sizes never returns."""

    def __init__(self) -> None:
        self.scans = 0

    async def used_bytes(self) -> int:
        self.scans += 1
        await asyncio.Event().wait()
        return 0


async def test_a_data_dir_that_does_not_answer_is_refused_without_the_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, the scan of every message's size ran after a free-space read that had given
    up (None): on a file system gone it never returned, and the caller waited in silence."""
    settings = Settings.from_env({"CLINIC_DATA_DIR": str(tmp_path)})
    rt = Runtime(settings=settings, clock=FakeClock(), metrics=Metrics())
    disk = HungDisk()
    rt.voicemails = cast(Voicemails, disk)

    def unreadable(path: Path) -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(disk_space, "free_bytes", unreadable)
    line = ClinicLine(settings, rt, FlowSet(flows={}))
    caplog.set_level(logging.WARNING, logger="clinic_voice.clinic_line")
    try:
        async with asyncio.timeout(2):
            refused = await line._admit_message("in-1", "+31612345678", 60)
    except TimeoutError:
        pytest.fail(f"the admission waited on the messages' scan ({disk.scans} begun)")
    assert (refused, disk.scans) == ("disk_low", 0)
    assert "free: unreadable" in caplog.text


async def test_a_hung_data_dir_leaves_one_thread_behind_not_one_per_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, each call's admission started a statvfs of its own: on a file system gone,
    each left a thread blocked for good. Now calls at once, and calls after, wait for the one
    read under way, and count as disk_low after its limit."""
    settings = Settings.from_env({"CLINIC_DATA_DIR": str(tmp_path)})
    rt = Runtime(settings=settings, clock=FakeClock(), metrics=Metrics())
    rt.voicemails = cast(Voicemails, HungDisk())
    release = threading.Event()
    reads: list[Path] = []

    def hang(path: Path) -> int:
        reads.append(path)
        release.wait(60)
        return 1 << 40

    monkeypatch.setattr(disk_space, "free_bytes", hang)
    monkeypatch.setattr(disk_space, "READ_LIMIT_S", 0.1)
    line = ClinicLine(settings, rt, FlowSet(flows={}))
    try:
        calls = [line._admit_message(f"in-{n}", "+31612345678", 60) for n in range(3)]
        assert await asyncio.gather(*calls) == ["disk_low"] * 3
        for n in (3, 4):
            assert await line._admit_message(f"in-{n}", "+31612345678", 60) == "disk_low"
        assert len(reads) == 1, f"{len(reads)} reads of the free space began"
    finally:
        release.set()
