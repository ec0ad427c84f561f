"""The journal of unsaved calls without Redis: how long a replayed record has left, and the
files (private, written whole, stale temporary files swept)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from voice.ivr.call_record import CallResult
from voice.ivr.engine import CallRecord
from voice.ivr.journal import STALE_TEMP_S, CallJournal, Replayed, remaining_ttl_s
from voice.ivr.store import CallStore

DAY_S = 86400
T0 = 1.8e9


@pytest.mark.parametrize(
    ("ended_at", "now", "left"),
    [
        (T0, T0, 30 * DAY_S),  # replayed at once: the whole retention, as a normal save
        (T0, T0 + 7 * DAY_S + 0.5, 23 * DAY_S - 1),  # rounded down, never past the end
        (T0, T0 + 30 * DAY_S - 1, 1),
        (T0, T0 + 30 * DAY_S - 0.5, None),  # less than a second left: not worth a SET
        (T0, T0 + 30 * DAY_S, None),
        (T0, T0 + 400 * DAY_S, None),
    ],
)
def test_a_replayed_record_keeps_the_expiry_of_a_normal_save(
    ended_at: float, now: float, left: int | None
) -> None:
    assert remaining_ttl_s(ended_at, now, 30 * DAY_S) == left


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
