"""``CallSession`` and the service's stop (pool.stop cancels the call tasks it could not end):
a cancellation that reaches the call's task while it is already winding up (the record being
saved, the live record's last write in flight) must not leave its tasks running or its live
record on disk. Left to run on their own, the steps are cut at the process's exit
(``asyncio.run`` cancels what is left), the delete never comes, and the next start takes the
call for one a dead ``serve`` cut, ``cut_service_lost`` (found by test_prop_session.py)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import cast

import pytest

from tests.unit.test_ivr_session_races import Rig, _done
from voice.ivr import session as session_module
from voice.ivr.call_record import CallResult
from voice.ivr.session import CallSession
from voice.sip.pool import CallHandle


class LiveDisk:
    """The live record's file: a write that waits for ``gate`` while it is set up to."""

    def __init__(self) -> None:
        self.record: CallResult | None = None
        self.deleted = False
        self.gate: asyncio.Event | None = None
        self.writing = asyncio.Event()

    async def begin(self, result: CallResult) -> None:
        self.writing.set()
        if self.gate is not None:
            await self.gate.wait()  # fsync on a busy disk, in its thread
        self.record = result

    async def end(self, call_id: str) -> None:
        self.record, self.deleted = None, True


def _with_live_record(rig: Rig, disk: LiveDisk) -> Rig:
    rig.deps = replace(rig.deps, begin=disk.begin, end=disk.end)
    rig.session = CallSession(cast(CallHandle, rig.call), rig.deps)
    return rig


def _running(rig: Rig) -> list[asyncio.Task[None]]:
    return [t for t in rig.session._tasks if not t.done()]


async def test_a_stop_during_the_last_live_write_still_deletes_the_live_record() -> None:
    # The caller hangs up; the call's record is saved; the end waits for the live record's
    # write in flight before deleting it, and the stop's cancel comes now. The call's task
    # ended at once, the write and the delete left to a task nobody awaits.
    disk = LiveDisk()
    rig = _with_live_record(Rig(called="6000", speech=False), disk)
    rig.start()
    welcome = await rig.until_prompt("Welcome")
    await rig.settle()
    disk.gate = asyncio.Event()
    disk.writing.clear()
    rig.call.send(_done(welcome))  # on to the menu: the live record's write of it is in flight
    await rig.until(disk.writing.is_set)
    rig.call.end()  # the caller hangs up
    await rig.until(lambda: bool(rig.saved))
    await rig.settle()
    assert rig.task is not None and not rig.task.done()  # waiting for that write
    rig.task.cancel()  # pool.stop
    await rig.settle()
    assert not rig.task.done(), "the call's task ended with its live record's write in flight"
    disk.gate.set()  # the write lands
    async with asyncio.timeout(2):
        await asyncio.gather(rig.task, return_exceptions=True)
    assert disk.deleted and disk.record is None, "the live record stays after the call"
    assert rig.session._live_task is not None and rig.session._live_task.done()
    assert len(rig.saved) == 1


async def test_a_stop_while_a_cut_call_is_saved_still_winds_the_call_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A call cut by the session (here too long) is recorded in run()'s finally; Redis is
    # slow and the stop's cancel comes during that save. The record is kept on disk, and the
    # rest of the finally was skipped: the SIP pump and the call's other tasks ran on, and
    # the live record was never deleted.
    monkeypatch.setattr(session_module, "MAX_CALL_S", 0.3)
    disk = LiveDisk()
    rig = _with_live_record(Rig(called="6000", speech=False), disk)
    redis = asyncio.Event()
    saving = asyncio.Event()

    async def slow_save(result: CallResult) -> None:
        saving.set()
        await redis.wait()  # never, here

    kept: list[CallResult] = []

    async def keep(result: CallResult) -> None:
        kept.append(result)

    rig.deps = replace(rig.deps, save=slow_save, keep=keep)
    rig.session = CallSession(cast(CallHandle, rig.call), rig.deps)
    rig.start()
    await rig.until(saving.is_set)
    assert rig.task is not None
    rig.task.cancel()  # pool.stop
    async with asyncio.timeout(2):
        await asyncio.gather(rig.task, return_exceptions=True)
    assert [r.record.outcome for r in kept] == ["cut_too_long"]
    assert _running(rig) == [], "the call's tasks outlive it"
    assert disk.deleted, "the live record stays after the call"
    rig.call.end()


def test_a_private_prompt_that_will_not_go_leaves_the_others_to_be_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # At a call's end its private prompts are deleted, then its live record. One that
    # raised (a failing disk; a folder stands in) skipped the others and the live record's
    # delete, and replaced a stop's cancellation with an OSError out of run().
    stuck, left = tmp_path / "in-1-a.wav", tmp_path / "in-1-b.wav"
    stuck.mkdir()
    left.write_bytes(b"RIFF")
    session_module._unlink_all([stuck, left])
    assert not left.exists()
    assert "a private prompt could not be deleted" in caplog.text
