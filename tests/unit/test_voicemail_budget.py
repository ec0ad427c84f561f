"""The voicemail's budget (voice/ivr/voicemail_budget.py): the disk floor, the cap on all
messages, the count per calling number in 24 hours, on a fake clock."""

from __future__ import annotations

import pytest

from sip_config.clock import FakeClock
from voice.ivr import voicemail_budget as vb
from voice.ivr.store import CallStore
from voice.ivr.voicemail_budget import (
    DAY_S,
    MB,
    Budget,
    Refusal,
    VoicemailBudget,
    decide,
    sealed_size,
)

BUDGET = Budget(min_free_bytes=100 * MB, max_bytes=50 * MB, per_caller_day=2)
NEED = sealed_size(60)
PLENTY = 10_000 * MB


@pytest.mark.parametrize(
    ("free", "used", "count", "expected"),
    [
        (PLENTY, 0, 0, None),
        (100 * MB + NEED, 0, 0, None),  # exactly the floor left after the message
        (100 * MB + NEED - 1, 0, 0, Refusal.DISK_LOW),
        (0, 0, 0, Refusal.DISK_LOW),
        (None, 0, 0, Refusal.DISK_LOW),  # a disk that cannot be read takes no message
        (PLENTY, 50 * MB - NEED, 0, None),  # exactly the cap with the message
        (PLENTY, 50 * MB - NEED + 1, 0, Refusal.FULL),
        (PLENTY, 0, 1, None),
        (PLENTY, 0, 2, Refusal.CALLER_LIMIT),
        # The disk first (it protects the whole service), then the cap, then the caller.
        (0, 50 * MB, 2, Refusal.DISK_LOW),
        (PLENTY, 50 * MB, 2, Refusal.FULL),
    ],
)
def test_decide(free: int | None, used: int, count: int, expected: Refusal | None) -> None:
    assert decide(BUDGET, need=NEED, free=free, used=used, caller_count=count) is expected


def test_no_limit_per_caller_when_zero() -> None:
    budget = Budget(min_free_bytes=0, max_bytes=PLENTY, per_caller_day=0)
    assert decide(budget, need=NEED, free=PLENTY, used=0, caller_count=10**6) is None


def test_the_sealed_size_bounds_a_real_sealed_message() -> None:
    """The reservation is at least what a message of max_s seconds takes sealed on disk."""
    store = CallStore(object(), b"s" * 32, retention_days=30)  # type: ignore[arg-type]
    for max_s in (1, 60, 120):
        pcm = b"\x01\x02" * 8000 * max_s
        sealed = store.seal("in-0123456789abcdef-01234567.sealed", {"pcm16_8k": pcm.hex()})
        assert len(sealed) <= sealed_size(max_s), (max_s, len(sealed), sealed_size(max_s))
        assert sealed_size(max_s) - len(sealed) < 0.02 * len(sealed) + vb.FILE_OVERHEAD


def test_messages_being_recorded_count_at_their_longest() -> None:
    """Callers at once cannot all pass a check that only one of them fits."""
    budget = VoicemailBudget(Budget(0, 2 * NEED, 0), FakeClock())
    assert budget.admit("a", "x", 60, free=PLENTY, used=0).refusal is None
    assert budget.admit("b", "y", 60, free=PLENTY, used=0).refusal is None
    assert budget.admit("c", "z", 60, free=PLENTY, used=0).refusal is Refusal.FULL
    budget.release("a")  # not saved: its room is free again
    assert budget.admit("c", "z", 60, free=PLENTY, used=0).refusal is None
    assert budget.reserved_bytes == 2 * NEED


def test_the_disk_floor_counts_the_message_being_reserved() -> None:
    budget = VoicemailBudget(Budget(10 * MB, PLENTY, 0), FakeClock())
    decision = budget.admit("a", "x", 60, free=10 * MB + NEED - 1, used=0)
    assert decision.refusal is Refusal.DISK_LOW
    assert budget.reserved_bytes == 0  # a refusal reserves nothing


def test_messages_being_recorded_take_from_the_disk_floor_too() -> None:
    """Callers at once cannot all pass a disk floor only one of them fits: the free space
    read for each still holds the messages being recorded, not written yet."""
    budget = VoicemailBudget(Budget(10 * MB, PLENTY, 0), FakeClock())
    free = 10 * MB + NEED  # room for one message above the floor
    assert budget.admit("a", "x", 60, free=free, used=0).refusal is None
    assert budget.admit("b", "y", 60, free=free, used=0).refusal is Refusal.DISK_LOW
    budget.release("a")
    assert budget.admit("b", "y", 60, free=free, used=0).refusal is None


def test_a_number_at_its_count_is_refused_and_told_once_a_day() -> None:
    """The count comes from outside (Redis: every serve's messages, tests/integration/
    test_voicemail_callers.py); the budget refuses at it and tells each number once in 24 h."""
    clock = FakeClock()
    budget = VoicemailBudget(BUDGET, clock)
    assert budget.admit("a", "x", 60, free=PLENTY, used=0, caller_count=1).refusal is None
    refused = budget.admit("b", "x", 60, free=PLENTY, used=0, caller_count=2)
    assert refused.refusal is Refusal.CALLER_LIMIT
    assert refused.first_for_caller and not refused.changed
    assert budget.reserved_bytes == NEED  # a refusal reserves nothing
    # Told once per number, not per call; another number is not refused.
    assert not budget.admit("c", "x", 60, free=PLENTY, used=0, caller_count=2).first_for_caller
    assert budget.admit("d", "y", 60, free=PLENTY, used=0, caller_count=0).refusal is None
    # Told again once 24 hours have gone since it was told.
    clock.advance(DAY_S - 1)
    assert not budget.admit("e", "x", 60, free=PLENTY, used=0, caller_count=5).first_for_caller
    clock.advance(1)
    assert budget.admit("f", "x", 60, free=PLENTY, used=0, caller_count=5).first_for_caller


def test_callers_with_no_number_are_not_held_to_one_shared_count() -> None:
    """An empty name is no number (withheld): before, every such caller shared one count, so a
    handful of them in a day (or one abuser) refused all others their message for 24 h.
    The cap still holds them."""
    budget = VoicemailBudget(Budget(0, 3 * NEED, 1), FakeClock())
    assert budget.admit("c", "", 60, free=PLENTY, used=2 * NEED, caller_count=9).refusal is None
    assert budget.admit("d", "", 60, free=PLENTY, used=2 * NEED).refusal is Refusal.FULL
    # A number is still held to its count.
    assert budget.admit("f", "x", 60, free=PLENTY, used=0, caller_count=1).refusal is (
        Refusal.CALLER_LIMIT
    )


def test_the_line_state_changes_are_reported_once_each() -> None:
    budget = VoicemailBudget(Budget(10 * MB, 20 * MB, 1), FakeClock())
    seen: list[tuple[Refusal | None, bool]] = []
    for free, used, caller, count in [
        (PLENTY, 0, "a", 0),  # taken: the state it starts in, no change
        (0, 0, "b", 0),  # disk low: a change
        (0, 0, "c", 0),  # still: none
        (PLENTY, 20 * MB, "d", 0),  # full: a change
        (PLENTY, 20 * MB, "e", 0),
        (PLENTY, 0, "f", 0),  # taken again: a change
        (PLENTY, 0, "f", 1),  # f's limit: no change of the line's state
        (PLENTY, 0, "g", 0),
    ]:
        call_id = caller + str(len(seen))
        d = budget.admit(call_id, caller, 60, free=free, used=used, caller_count=count)
        budget.release(call_id)
        seen.append((d.refusal, d.changed))
    assert seen == [
        (None, False),
        (Refusal.DISK_LOW, True),
        (Refusal.DISK_LOW, False),
        (Refusal.FULL, True),
        (Refusal.FULL, False),
        (None, True),
        (Refusal.CALLER_LIMIT, False),
        (None, False),
    ]


def test_the_callers_told_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past CALLERS_REMEMBERED, the number told longest ago is forgotten (told again)."""
    monkeypatch.setattr(vb, "CALLERS_REMEMBERED", 3)
    budget = VoicemailBudget(Budget(0, PLENTY, 1), FakeClock())
    for n in range(5):
        assert budget.admit(
            str(n), f"c{n}", 1, free=PLENTY, used=0, caller_count=1
        ).first_for_caller
    told = [
        budget.admit(f"again{n}", f"c{n}", 1, free=PLENTY, used=0, caller_count=1).first_for_caller
        for n in (4, 3, 2, 0)
    ]
    assert told == [False, False, False, True]


def test_a_release_of_a_call_never_admitted_is_nothing() -> None:
    budget = VoicemailBudget(BUDGET, FakeClock())
    budget.release("never")
    assert budget.reserved_bytes == 0
