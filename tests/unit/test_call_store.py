"""The call store without Redis: what it remembers of the records that do not open."""

from __future__ import annotations

import logging
from typing import Any

import pytest

import voice.ivr.store as store_module
from voice.ivr.store import CallRecordUnreadable, CallStore


async def test_the_unreadable_records_remembered_are_bounded(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each record that did not open was remembered (to be logged once) for the life of the
    # process: a set that only grew, as the voicemail's did. Past the bound, the oldest is
    # forgotten, and logged again if it is read again.
    monkeypatch.setattr(store_module, "UNREADABLE_REMEMBERED", 3, raising=False)
    redis: Any = None  # opening needs no Redis
    store = CallStore(redis, b"s" * 32, retention_days=30)
    caplog.set_level(logging.ERROR, "voice.ivr.store")
    ids = [f"in-{i}" for i in range(5)]

    def read(call_id: str) -> None:
        with pytest.raises(CallRecordUnreadable):
            store._open_stored(call_id, "damaged")

    for call_id in ids:
        read(call_id)
    assert len(caplog.records) == 5
    read(ids[4])  # remembered: not logged again
    assert len(caplog.records) == 5
    read(ids[0])  # forgotten past the bound: logged again
    assert len(caplog.records) == 6
    assert len(store._unreadable) == 3, store._unreadable
