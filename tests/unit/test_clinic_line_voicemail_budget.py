"""The clinic line's admission of a voicemail message (clinic_voice/clinic_line.py, on
voice/ivr/voicemail_budget.py): what it reads of the disk, and when it does not.

The messages' store is a stand-in whose scan never answers, as a stat on a network file
system gone does (what the scan counts is tests/unit/test_voicemail.py's)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import cast

import pytest

from clinic_voice import clinic_line
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

    async def unreadable(path: Path) -> int | None:
        return None

    monkeypatch.setattr(clinic_line, "read_free_bytes", unreadable)
    line = ClinicLine(settings, rt, FlowSet(flows={}))
    caplog.set_level(logging.WARNING, logger="clinic_voice.clinic_line")
    try:
        async with asyncio.timeout(2):
            refused = await line._admit_message("in-1", "+31612345678", 60)
    except TimeoutError:
        pytest.fail(f"the admission waited on the messages' scan ({disk.scans} begun)")
    assert (refused, disk.scans) == ("disk_low", 0)
    assert "free: unreadable" in caplog.text
