"""The writes of a call's live record (voice/ivr/live_record.py): one at a time, only the
newest waits, the delete after the write in flight and nothing after the delete."""

from __future__ import annotations

import random

import pytest

from voice.ivr.live_record import Delete, LiveWrites, Write


def test_a_write_goes_at_once_when_nothing_is_in_flight() -> None:
    lane = LiveWrites[int]()
    assert lane.write(1) == Write(1)
    assert lane.done() is None
    assert lane.write(2) == Write(2)


def test_during_a_write_only_the_newest_record_waits() -> None:
    lane = LiveWrites[int]()
    assert lane.write(1) == Write(1)
    assert lane.write(2) is None  # the write of 1 is in flight: 2 could land before it
    assert lane.write(3) is None
    assert lane.done() == Write(3)  # 2 is never written: 3 says more
    assert lane.done() is None


def test_a_call_that_ends_while_idle_is_deleted_at_once_and_never_written_again() -> None:
    lane = LiveWrites[int]()
    assert lane.write(1) == Write(1)
    assert lane.done() is None
    assert lane.end() == Delete()
    assert lane.write(2) is None, "a write after the end would bring the call back"
    assert lane.done() is None
    assert lane.write(3) is None
    assert lane.end() is None  # once


def test_a_call_that_ends_during_a_write_is_deleted_after_it_and_the_waiting_one_dropped() -> None:
    lane = LiveWrites[int]()
    assert lane.write(1) == Write(1)
    assert lane.write(2) is None
    assert lane.end() is None  # the write of 1 may still land: not deleted before it
    assert lane.write(3) is None
    assert lane.done() == Delete()
    assert lane.write(4) is None
    assert lane.done() is None
    assert lane.write(5) is None and lane.end() is None


def test_a_call_ended_before_any_write_is_deleted_all_the_same() -> None:
    # Its first write may have failed, or never been asked for: the delete is harmless.
    lane = LiveWrites[int]()
    assert lane.end() == Delete()
    assert lane.done() is None


def test_done_without_a_step_in_flight_is_a_bug() -> None:
    lane = LiveWrites[int]()
    with pytest.raises(RuntimeError, match="no step in flight"):
        lane.done()


@pytest.mark.parametrize("seed", range(200))
def test_whatever_the_interleaving_the_disk_ends_newest_first_and_empty(seed: int) -> None:
    """Changes, finished steps and the end in a random order, against a model of the disk:
    the steps never overlap, no record is written after a newer one, the newest is on disk
    whenever the lane is idle, and after the end the file is gone for good."""
    rnd = random.Random(seed)
    lane = LiveWrites[int]()
    disk: int | None = None  # the live file: the record it holds
    in_flight: Write[int] | Delete | None = None
    written: list[int] = []
    deleted = ended = False
    newest = 0

    def start(step: Write[int] | Delete | None) -> None:
        nonlocal in_flight
        if step is not None:
            assert in_flight is None, "two steps at once: they could land in either order"
            in_flight = step

    for _ in range(rnd.randint(1, 40)):
        roll = rnd.random()
        if roll < 0.5:
            newest += 1
            start(lane.write(newest))
        elif roll < 0.9 and in_flight is not None:
            step, in_flight = in_flight, None
            if isinstance(step, Write):
                assert not deleted, "written after the delete"
                assert not written or step.record > written[-1], "an older record landed last"
                written.append(step.record)
                disk = step.record
            else:
                deleted, disk = True, None
            start(lane.done())
        elif roll >= 0.97 and not ended:
            ended = True
            start(lane.end())
        if in_flight is None and not ended and newest:
            assert disk == newest, "idle, but the newest record is not on disk"
    if not ended:
        ended = True
        start(lane.end())
    while in_flight is not None:  # the session waits for the steps left
        step, in_flight = in_flight, None
        if isinstance(step, Write):
            assert not deleted
            disk = step.record
        else:
            deleted, disk = True, None
        start(lane.done())
    assert deleted and disk is None
    assert lane.write(newest + 1) is None
