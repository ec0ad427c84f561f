"""The journal of unsaved calls without Redis: how long a replayed record has left, the
files (private, written whole, stale temporary files swept), and the count of what waits on
disk (kept current by writes and deletes, not by listing the folder when it is read)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import threading
from pathlib import Path
from typing import Any

import pytest

import voice.ivr.journal as journal_module
from sip_config import private_file
from voice.ivr.call_record import CallResult
from voice.ivr.engine import CallRecord
from voice.ivr.journal import (
    LIVE_FOLDER,
    STALE_TEMP_S,
    CallJournal,
    OnDisk,
    RecordsOnDisk,
    Replayed,
)
from voice.ivr.store import CallStore, remaining_ttl_ms, within_retention

DAY_S = 86400
T0 = 1.8e9


@pytest.mark.parametrize(
    ("started_at", "now", "left"),
    [
        (T0, T0, 30 * DAY_S * 1000),  # replayed at once: the whole retention, as a normal save
        # A start ahead of the clock (it stepped back during the call): until the start plus
        # the retention, when the message dated by the start goes, not a retention from now.
        (T0 + 60, T0, (30 * DAY_S + 60) * 1000),
        (T0, T0 + 7 * DAY_S + 0.5, 23 * DAY_S * 1000 - 500),
        (T0, T0 + 30 * DAY_S - 1, 1000),
        (T0, T0 + 30 * DAY_S - 0.0005, 1),  # rounded up: never before the list drops it
        (T0, T0 + 30 * DAY_S, None),  # the index's edge: past (README: 404 from then on)
        (T0, T0 + 400 * DAY_S, None),
    ],
)
def test_a_replayed_record_keeps_the_expiry_of_a_normal_save(
    started_at: float, now: float, left: int | None
) -> None:
    assert remaining_ttl_ms(started_at, now, 30 * DAY_S) == left
    assert within_retention(started_at, now, 30 * DAY_S) is (left is not None)


def _journal(folder: Path) -> CallJournal:
    redis: Any = None  # sealing and the files need no Redis
    return CallJournal(folder, CallStore(redis, b"s" * 32, retention_days=30))


async def test_a_kept_record_is_one_private_file_named_by_its_call(tmp_path: Path) -> None:
    journal = _journal(tmp_path / "unsaved-calls")
    record = CallRecord("main_menu", (), (("dob", "1970-01-01"),), None, (), None, None, "ended")
    await journal.keep(CallResult("in-Ab_9-x", "+31612345678", "700", T0, T0 + 9, record))
    assert [p.name for p in (tmp_path / "unsaved-calls").iterdir()] == ["in-Ab_9-x.sealed"]
    path = tmp_path / "unsaved-calls" / "in-Ab_9-x.sealed"
    assert path.stat().st_mode & 0o777 == 0o600
    assert b"1970-01-01" not in path.read_bytes()
    with pytest.raises(ValueError, match="not a call id"):
        await journal.keep(CallResult("../x", "", "", T0, T0, record))


async def test_the_replay_sweeps_stale_temporary_files_only(tmp_path: Path) -> None:
    folder = tmp_path / "unsaved-calls"
    folder.mkdir()
    stale, fresh = folder / ".in-1-abc.tmp", folder / ".in-2-def.tmp"
    stale.write_text("half a record")
    fresh.write_text("a record being written")
    os.utime(stale, (T0 - STALE_TEMP_S - 1, T0 - STALE_TEMP_S - 1))
    os.utime(fresh, (T0, T0))
    assert await _journal(folder).replay(T0) == Replayed()
    assert [p.name for p in folder.iterdir()] == [fresh.name]


async def test_an_empty_or_missing_journal_replays_nothing(tmp_path: Path) -> None:
    assert await _journal(tmp_path / "absent").replay(T0) == Replayed()
    assert not (tmp_path / "absent").exists()


def _result(call_id: str) -> CallResult:
    record = CallRecord("main_menu", (), (), None, (), None, None, "ended")
    return CallResult(call_id, "+31612345678", "700", T0, T0 + 9, record)


async def test_the_records_waiting_on_disk_are_counted_as_they_are_written_and_deleted(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "unsaved-calls"
    journal = _journal(folder)
    await journal.keep(_result("in-early"))  # an earlier run's, found at start
    await journal.begin(_result("in-cut"))  # a live record a dead serve left
    on_disk = RecordsOnDisk()  # this start's count
    journal = CallJournal(folder, journal._store, on_disk=on_disk)
    assert on_disk.now() is None, "not counted before the folders were read"
    assert await journal.leftovers(T0) == ["in-cut"]
    assert on_disk.now() == OnDisk(kept=1, cut=1)

    await journal.write_ahead(_result("in-saving"))  # a save asks Redis: not waiting yet
    assert on_disk.now() == OnDisk(kept=1, cut=1)
    await journal.taken(_result("in-saving"))  # Redis took it: its copy goes
    assert on_disk.now() == OnDisk(kept=1, cut=1)
    await journal.write_ahead(_result("in-unsaved"))
    await journal.keep(_result("in-unsaved"))  # Redis did not take it: kept
    assert on_disk.now() == OnDisk(kept=2, cut=1)
    assert sorted(p.name for p in folder.iterdir()) == ["in-early.sealed", "in-unsaved.sealed"]
    assert await journal.drop("in-unsaved") == 1  # erased
    assert on_disk.now() == OnDisk(kept=1, cut=1)
    await journal.begin(_result("in-call"))  # a call under way: not waiting
    assert on_disk.now() == OnDisk(kept=1, cut=1)
    assert await journal.drop("in-cut") == 1  # erased
    assert await journal.drop("in-early") == 1
    assert on_disk.now() == OnDisk()
    assert (tmp_path / LIVE_FOLDER / "in-call.sealed").exists()


def test_a_replay_counts_what_it_listed_and_what_was_kept_while_it_listed() -> None:
    on_disk = RecordsOnDisk()
    on_disk.found_at_start(["in-a", "in-b"], [])
    before = on_disk.kept_ids()
    on_disk.kept("in-c")  # kept while the folder was being read: not in the listing
    on_disk.kept_unreadable("in-b")
    # in-b was erased by another process (an HTTP worker); in-d was written ahead meanwhile.
    on_disk.listed(before, ["in-a", "in-d"], set())
    assert on_disk.kept_ids() == {"in-a", "in-c", "in-d"}
    assert on_disk.now() == OnDisk(kept=3)
    on_disk.kept_unreadable("in-a")
    assert on_disk.now() == OnDisk(kept=2, unreadable=1)
    assert OnDisk(2, 1, 1).total == 4


@pytest.mark.parametrize("kind", ["kept", "cut"])
async def test_an_unreadable_record_erased_while_a_replay_reads_it_is_not_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    folder = tmp_path / "unsaved-calls"
    redis: Any = None  # sealing and the files need no Redis
    sealed_elsewhere = CallJournal(folder, CallStore(redis, b"o" * 32, retention_days=30))
    if kind == "kept":
        await sealed_elsewhere.keep(_result("in-x"))  # another key: does not open here
    else:
        await sealed_elsewhere.begin(_result("in-x"))
    on_disk = RecordsOnDisk()
    journal = CallJournal(folder, _journal(folder)._store, on_disk=on_disk)
    lost = await journal.leftovers(T0)
    assert on_disk.now() == (OnDisk(kept=1) if kind == "kept" else OnDisk(cut=1))

    # The replay has read the file when an erasure (DELETE /v1/calls/in-x) deletes it.
    read, go_on = threading.Event(), threading.Event()
    real_read = journal_module._read

    def read_then_wait(path: Path) -> str | None:
        text = real_read(path)
        read.set()
        go_on.wait(5)
        return text

    monkeypatch.setattr(journal_module, "_read", read_then_wait)
    replaying = asyncio.ensure_future(
        journal.replay(T0) if kind == "kept" else journal.replay_lost(lost, T0)
    )
    assert await asyncio.to_thread(read.wait, 5)
    assert await journal.drop("in-x") == 1
    go_on.set()
    await replaying
    assert on_disk.now() == OnDisk(), "an erased record is not counted as waiting"


async def test_each_call_is_counted_once_as_its_copy_written_ahead_ends(tmp_path: Path) -> None:
    # The count follows the file step (voice/ivr/journal.py): taken, kept, or found at the
    # next start; never for a kept record found at start, nor for the copy alone.
    folder = tmp_path / "unsaved-calls"
    counted: list[str | None] = []
    journal = CallJournal(folder, _journal(folder)._store, on_counted=counted.append)
    await journal.write_ahead(_result("in-taken"))
    await journal.write_ahead(_result("in-kept"))
    await journal.write_ahead(_result("in-left"))  # its serve dies now
    assert counted == []
    await journal.taken(_result("in-taken"))
    await journal.keep(_result("in-kept"))
    assert counted == ["ended", "ended"]
    assert sorted(p.name for p in folder.iterdir()) == ["in-kept.sealed", "in-left.ahead"]

    counted.clear()
    again = CallJournal(folder, journal._store, on_counted=counted.append)  # the next start
    assert await again.leftovers(T0) == []
    assert counted == ["ended"], "in-left counted; in-kept was, as it was kept"
    assert sorted(p.name for p in folder.iterdir()) == ["in-kept.sealed", "in-left.sealed"]
    assert again.on_disk.now() == OnDisk(kept=2)
    await CallJournal(folder, journal._store, on_counted=counted.append).leftovers(T0)
    assert counted == ["ended"]


async def test_the_copy_written_ahead_is_gone_for_good_before_its_call_is_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its delete unfsynced, a power cut after the count could bring the copy back, and the
    # next start would count the call again: the folder is fsynced after the unlink, in the
    # step's thread, before on_counted. So is a replayed record's, not to be replayed again.
    folder = tmp_path / "unsaved-calls"
    seen: list[tuple[str, list[str]]] = []

    def files() -> list[str]:
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def fsync(path: Path) -> None:
        assert path == folder
        seen.append(("fsync", files()))

    journal = CallJournal(
        folder, _journal(folder)._store, on_counted=lambda _: seen.append(("counted", files()))
    )
    await journal.write_ahead(_result("in-taken"))
    await journal.write_ahead(_result("in-kept"))
    monkeypatch.setattr(journal_module, "fsync_folder", fsync)
    await journal.taken(_result("in-taken"))
    assert seen == [("fsync", ["in-kept.ahead"]), ("counted", ["in-kept.ahead"])]
    seen.clear()
    await journal.keep(_result("in-kept"))  # write_private fsyncs the kept record's rename
    assert seen == [("fsync", ["in-kept.sealed"]), ("counted", ["in-kept.sealed"])]
    seen.clear()
    await journal.taken(_result("in-never-written"))  # its write ahead failed: nothing to do
    assert seen == [("counted", ["in-kept.sealed"])]
    seen.clear()
    assert await journal.replay(T0 + 400 * DAY_S) == Replayed(expired=1)  # no Redis asked
    assert seen == [("fsync", [])]


async def test_a_call_whose_copy_went_is_counted_when_the_folders_fsync_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The unlink done, the folder's fsync fails (EIO on a failing disk, the folder removed
    # meanwhile): the copy is gone all the same, so the next start finds nothing to count.
    # Raised out of the step, the count was skipped and the call never counted at all (and
    # a kept record was logged as lost, there on disk).
    folder = tmp_path / "unsaved-calls"
    counted: list[str | None] = []
    journal = CallJournal(folder, _journal(folder)._store, on_counted=counted.append)
    await journal.write_ahead(_result("in-taken"))
    await journal.write_ahead(_result("in-kept"))

    def failing_fsync(path: Path) -> None:
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(journal_module, "fsync_folder", failing_fsync)
    with contextlib.suppress(OSError):
        await journal.taken(_result("in-taken"))
    with contextlib.suppress(OSError):
        await journal.keep(_result("in-kept"))
    monkeypatch.undo()
    again = CallJournal(folder, journal._store, on_counted=counted.append)  # the next start
    await again.leftovers(T0)
    assert sorted(p.name for p in folder.iterdir()) == ["in-kept.sealed"]
    assert counted == ["ended", "ended"], "each call counted once, by one of the two"


async def test_a_keep_waits_for_its_calls_write_ahead_still_in_its_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The call's save is cancelled (a stop) while its copy is written ahead in a thread: the
    # keep that follows must not finish before that write, or the copy would land after it
    # and the next start would count the call a second time.
    folder = tmp_path / "unsaved-calls"
    journal = _journal(folder)
    writing, go_on = threading.Event(), threading.Event()
    real_write = private_file.write_private

    def held(path: Path, text: str) -> None:
        if path.suffix == ".ahead":
            writing.set()
            go_on.wait(5)
        real_write(path, text)

    monkeypatch.setattr(journal_module, "write_private", held)
    ahead = asyncio.ensure_future(journal.write_ahead(_result("in-stopped")))
    assert await asyncio.to_thread(writing.wait, 5)
    ahead.cancel()
    keeping = asyncio.ensure_future(journal.keep(_result("in-stopped")))
    await asyncio.sleep(0.1)
    assert not keeping.done(), "kept before the write ahead landed"
    go_on.set()
    async with asyncio.timeout(5):
        await keeping
    assert [p.name for p in folder.iterdir()] == ["in-stopped.sealed"]


async def test_a_failed_write_ahead_whose_save_was_cancelled_is_not_left_unretrieved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The save is cancelled (a stop) while its copy is written ahead, and the write fails (a
    # full disk): nobody awaited the shielded task's failure, and asyncio logged its
    # traceback as "Task exception was never retrieved" whenever the task was collected.
    journal = _journal(tmp_path / "unsaved-calls")
    writing, go_on = threading.Event(), threading.Event()

    def failing(path: Path, text: str) -> None:
        writing.set()
        go_on.wait(5)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal_module, "write_private", failing)
    ahead = asyncio.ensure_future(journal.write_ahead(_result("in-full")))
    assert await asyncio.to_thread(writing.wait, 5)
    ahead.cancel()
    with pytest.raises(asyncio.CancelledError):
        await ahead
    del ahead  # nothing of the test holds the write's task
    unretrieved: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: unretrieved.append(context))
    try:
        go_on.set()
        # The thread ends, its task fails (its done callbacks take it out of _ahead). A fixed
        # 0.2 s here let a slow thread fail after the check: the test then passed unseen.
        async with asyncio.timeout(5):
            while journal._ahead:  # noqa: ASYNC110 (the journal's own record of the write)
                await asyncio.sleep(0.01)
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert not unretrieved, unretrieved


class _RedisDown:
    """A Redis client whose every save fails (stopped), for a replay that stops."""

    closed = True  # no retry: the store gives up at once

    async def evalsha(self, *args: object) -> Any:
        raise ConnectionError("Redis down")


async def test_a_record_erased_while_a_replay_lists_the_folder_is_not_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "unsaved-calls"
    redis: Any = _RedisDown()
    on_disk = RecordsOnDisk()
    journal = CallJournal(folder, CallStore(redis, b"s" * 32, retention_days=30), on_disk=on_disk)
    await journal.keep(_result("in-a"))
    await journal.keep(_result("in-b"))
    await journal.leftovers(T0)
    assert on_disk.now() == OnDisk(kept=2)

    # The replay has listed the folder when an erasure in this process (DELETE
    # /v1/calls/in-b, the journal's drop) deletes in-b; Redis then fails at in-a, so the
    # replay stops before it tries in-b (and would find it gone).
    listed, go_on = threading.Event(), threading.Event()
    real_ids_of = journal_module._ids_of

    def ids_then_wait(where: Path, now: float, suffix: str = journal_module.SUFFIX) -> list[str]:
        ids = real_ids_of(where, now, suffix)
        listed.set()
        go_on.wait(5)
        return ids

    monkeypatch.setattr(journal_module, "_ids_of", ids_then_wait)
    replaying = asyncio.ensure_future(journal.replay(T0))
    assert await asyncio.to_thread(listed.wait, 5)
    assert await journal.drop("in-b") == 1
    go_on.set()
    assert (await replaying).stopped
    assert sorted(p.name for p in folder.iterdir()) == ["in-a.sealed"]
    assert on_disk.now() == OnDisk(kept=1), "an erased record is counted as waiting"


@pytest.mark.parametrize("content", [b"\xff\xfe damaged \x80", b"not a sealed record"])
async def test_a_damaged_copy_on_disk_makes_the_call_known_to_an_erasure(
    tmp_path: Path, content: bytes
) -> None:
    # A copy that does not open (damaged on disk: bytes that are not even text) is the
    # call's, and erasable (README: "a copy that does not open with the service's keys counts
    # as the call's and is erased"). Before, a copy whose bytes were not UTF-8 raised
    # UnicodeDecodeError out of holds(): the DELETE failed instead of erasing it.
    folder = tmp_path / "unsaved-calls"
    journal = _journal(folder)
    record = CallRecord("main_menu", (), (), None, (), None, None, "ended")
    await journal.keep(CallResult("in-damaged", "+31612345678", "700", T0, T0 + 9, record))
    (folder / "in-damaged.sealed").write_bytes(content)
    assert await journal.holds("in-damaged", T0 + 60)
    assert await journal.holds("in-damaged")


async def test_a_damaged_copy_on_disk_is_left_for_the_operator_not_a_stop_of_the_replay(
    tmp_path: Path,
) -> None:
    # Bytes that are not even text (a damaged file) are a record that does not open: left
    # there and counted, as one sealed under a lost secret. Before, UnicodeDecodeError came
    # out of replay(): every replay stopped at that file, and the records listed after it
    # never reached Redis.
    folder = tmp_path / "unsaved-calls"
    journal = _journal(folder)
    record = CallRecord("main_menu", (), (), None, (), None, None, "ended")
    await journal.keep(CallResult("in-damaged", "+31612345678", "700", T0, T0 + 9, record))
    (folder / "in-damaged.sealed").write_bytes(b"\xff\xfe damaged \x80")
    assert await journal.replay(T0 + 60) == Replayed(left=1)
    assert (folder / "in-damaged.sealed").exists()
