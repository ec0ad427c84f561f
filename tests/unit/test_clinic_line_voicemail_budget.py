"""The clinic line's admission of a voicemail message (clinic_voice/clinic_line.py, on
voice/ivr/voicemail_budget.py): what it reads of the disk, and when it does not.

The messages' store is a stand-in whose scan never answers, as a stat on a network file
system gone does (what the scan counts is tests/unit/test_voicemail.py's)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, cast

import pytest
import uvloop

from clinic_voice import cli, disk_space
from clinic_voice.app import Runtime
from clinic_voice.clinic_line import ClinicLine, check_clinic_line
from clinic_voice.metrics import Metrics
from sip_config.clock import FakeClock
from sip_config.settings import Settings, SettingsError
from voice.ivr.flow import FlowSet
from voice.ivr.store import CallStore
from voice.ivr.voicemail import Voicemails
from voice.ivr.voicemail_callers import CallerCounts


class HungDisk:
    """Voicemails whose scan of the messages' sizes never returns."""

    known_bytes = None  # never counted

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


SHIPPED = Path(__file__).resolve().parents[2] / "ivr_flows"


def test_serve_exits_2_when_the_voicemail_cap_is_below_one_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, CLINIC_VOICEMAIL_MAX_MB=2 started: the shipped prescription flow's 60 s message
    (up to 3 MiB sealed) was refused at every call, unexplained but by the metric."""
    monkeypatch.setenv("CLINIC_VOICEMAIL_MAX_MB", "2")
    monkeypatch.setenv("CLINIC_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CLINIC_FLOWS_DIR", str(SHIPPED))

    def run(main: Coroutine[Any, Any, None]) -> None:
        main.close()
        pytest.fail("serve started with a CLINIC_VOICEMAIL_MAX_MB below one message")

    monkeypatch.setattr(uvloop, "run", run)
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clinic-voice: configuration error: CLINIC_VOICEMAIL_MAX_MB=2: "), err
    assert "(60 s at prescription.yaml:" in err and "set it to at least 3" in err, err


def test_the_message_after_a_failed_transfer_counts_as_a_record_step(tmp_path: Path) -> None:
    """Before, only the flows' own record steps were weighed: with the prescription message cut
    to 20 s (or no record step at all), CLINIC_VOICEMAIL_MAX_MB=1 started, and every message
    after a failed transfer (60 s: engine.MESSAGE_MAX_S, the message a caller nobody took
    leaves) was refused as voicemail_full."""
    flows = tmp_path / "flows"
    shutil.copytree(SHIPPED, flows)
    prescription = flows / "prescription.yaml"
    text = prescription.read_text()
    assert "max_s: 60" in text
    prescription.write_text(text.replace("max_s: 60", "max_s: 20"))
    settings = Settings.from_env({"CLINIC_FLOWS_DIR": str(flows), "CLINIC_VOICEMAIL_MAX_MB": "1"})
    with pytest.raises(SettingsError) as refused:
        check_clinic_line(settings)
    assert "(60 s of the message after a failed transfer: up to 3 MiB" in str(refused.value)


def test_a_cap_of_one_message_is_taken(tmp_path: Path) -> None:
    settings = Settings.from_env({"CLINIC_FLOWS_DIR": str(SHIPPED), "CLINIC_VOICEMAIL_MAX_MB": "3"})
    assert check_clinic_line(settings).flows


@pytest.mark.parametrize(("min_free_mb", "warned"), [("1048576", True), ("0", False)])
async def test_a_data_dir_too_small_for_one_message_is_warned_of_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, min_free_mb: str, warned: bool
) -> None:
    """Every message would be refused (disk_low) on a file system smaller than the floor and
    one message (the test's, real, is well under 1 TiB): said once at start."""
    settings = Settings.from_env(
        {
            "CLINIC_DATA_DIR": str(tmp_path),
            "CLINIC_FLOWS_DIR": str(SHIPPED),
            "CLINIC_VOICEMAIL_MIN_FREE_MB": min_free_mb,
        }
    )
    rt = Runtime(settings=settings, clock=FakeClock(), metrics=Metrics())
    line = ClinicLine(settings, rt, check_clinic_line(settings))
    caplog.set_level(logging.WARNING, logger="clinic_voice.clinic_line")
    await line.warn_small_volume()
    lines = [r.getMessage() for r in caplog.records]
    if warned:
        assert len(lines) == 1, lines
        assert lines[0].startswith("CLINIC_VOICEMAIL_MIN_FREE_MB=1048576: the data dir's ")
        assert "every voicemail message will be refused (disk_low)" in lines[0]
    else:
        assert lines == []


class SlowCounts:
    """The numbers' counts in Redis, answering once ``answer`` is set (a round trip under
    load), as voice/ivr/voicemail_callers.CallerCounts does."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.answer = asyncio.Event()
        self.given_back: list[str] = []

    def name(self, caller: str) -> str:
        return "digest"

    async def take(self, name: str, limit: int) -> tuple[int, str | None]:
        self.asked.set()
        await self.answer.wait()
        return 0, "place"

    async def give_back(self, name: str, place: str) -> None:
        self.given_back.append(place)


@pytest.mark.parametrize(
    ("env", "free", "refusal"),
    [
        # A 4 MiB cap holds one 60 s message, not two.
        ({"CLINIC_VOICEMAIL_MAX_MB": "4"}, 1 << 40, "voicemail_full"),
        # 4 MiB free over a 1 MiB floor holds one, not two: the free space read before the
        # first was written does not count it.
        (
            {"CLINIC_VOICEMAIL_MIN_FREE_MB": "1", "CLINIC_VOICEMAIL_MAX_MB": "100"},
            4 << 20,
            "disk_low",
        ),
    ],
)
async def test_a_message_saved_while_another_is_admitted_counts_against_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], free: int, refusal: str
) -> None:
    """Before, the messages' bytes and the free space were read before the number's count in
    Redis was awaited: a message saved (and its reservation released) meanwhile was in
    neither, and the next one was admitted past CLINIC_VOICEMAIL_MAX_MB or the disk floor."""
    settings = Settings.from_env({"CLINIC_DATA_DIR": str(tmp_path), **env})
    rt = Runtime(settings=settings, clock=FakeClock(), metrics=Metrics())
    voicemails = Voicemails(tmp_path / "voicemail", CallStore(cast(Any, None), b"s" * 32, 30))
    rt.voicemails = voicemails
    counts = SlowCounts()
    rt.voicemail_callers = cast(CallerCounts, counts)
    monkeypatch.setattr(disk_space, "free_bytes", lambda path: free)  # as read, unchanged
    line = ClinicLine(settings, rt, FlowSet(flows={}))
    counts.answer.set()
    assert await line._admit_message("in-a", "+31612345678", 60) == ""
    counts.answer.clear()
    counts.asked.clear()
    second = asyncio.create_task(line._admit_message("in-b", "+31687654321", 60))
    await counts.asked.wait()
    # The first message ends while the second's count is read: written, then released.
    await voicemails.save("in-a", bytes(2 * 8000 * 60))
    line._message_done("in-a", kept=True)
    counts.answer.set()
    assert await second == refusal


async def test_a_caller_who_hangs_up_while_the_count_is_read_gives_the_place_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, a call that ended (its tasks cancelled) while Redis took the number's place
    left that place taken for 24 hours: the script ran, and nobody knew its token to give
    it back, so a patient could be refused a message for a message never recorded."""
    settings = Settings.from_env({"CLINIC_DATA_DIR": str(tmp_path)})
    rt = Runtime(settings=settings, clock=FakeClock(), metrics=Metrics())
    rt.voicemails = Voicemails(tmp_path / "voicemail", CallStore(cast(Any, None), b"s" * 32, 30))
    counts = SlowCounts()
    rt.voicemail_callers = cast(CallerCounts, counts)
    monkeypatch.setattr(disk_space, "free_bytes", lambda path: 1 << 40)
    line = ClinicLine(settings, rt, FlowSet(flows={}))
    admitting = asyncio.create_task(line._admit_message("in-a", "+31612345678", 60))
    await counts.asked.wait()
    admitting.cancel()  # the caller hung up: the session cancels its tasks
    with pytest.raises(asyncio.CancelledError):
        await admitting
    counts.answer.set()  # Redis answers after all: the place was taken
    await line.stop()
    assert counts.given_back == ["place"]
