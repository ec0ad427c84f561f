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
    budget.release("a", kept=False)  # not saved: its room is free again
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
    budget.release("a", kept=False)
    assert budget.admit("b", "y", 60, free=free, used=0).refusal is None


def test_a_number_leaves_per_caller_day_messages_in_any_24_hours() -> None:
    clock = FakeClock()
    budget = VoicemailBudget(BUDGET, clock)
    for call in ("a", "b"):
        assert budget.admit(call, "x", 60, free=PLENTY, used=0).refusal is None
        budget.release(call, kept=True)
        clock.advance(3600)
    refused = budget.admit("c", "x", 60, free=PLENTY, used=0)
    assert refused.refusal is Refusal.CALLER_LIMIT
    assert refused.first_for_caller and not refused.changed
    # Told once per number, not per call; another number is not refused.
    assert not budget.admit("d", "x", 60, free=PLENTY, used=0).first_for_caller
    assert budget.admit("e", "y", 60, free=PLENTY, used=0).refusal is None
    # A second before 24 h after its first message, none; at 24 h, one more.
    clock.advance(DAY_S - 2 * 3600 - 1)
    assert budget.admit("f", "x", 60, free=PLENTY, used=0).refusal is Refusal.CALLER_LIMIT
    clock.advance(1)
    assert budget.admit("g", "x", 60, free=PLENTY, used=0).refusal is None
    assert budget.admit("h", "x", 60, free=PLENTY, used=0).refusal is Refusal.CALLER_LIMIT


def test_a_message_not_kept_does_not_count_for_its_caller() -> None:
    """Silence, or a save that failed: the caller may try again."""
    budget = VoicemailBudget(BUDGET, FakeClock())
    for call in ("a", "b", "c"):
        assert budget.admit(call, "x", 60, free=PLENTY, used=0).refusal is None
        budget.release(call, kept=False)
    assert budget.count("x") == 0


def test_messages_being_recorded_count_for_their_caller() -> None:
    """One number on many lines at once is held to its count too."""
    budget = VoicemailBudget(BUDGET, FakeClock())
    assert budget.admit("a", "x", 60, free=PLENTY, used=0).refusal is None
    assert budget.admit("b", "x", 60, free=PLENTY, used=0).refusal is None
    assert budget.admit("c", "x", 60, free=PLENTY, used=0).refusal is Refusal.CALLER_LIMIT


def test_a_number_refused_on_its_messages_being_recorded_is_told_of_again_later() -> None:
    """Refused while its only other message was being recorded, then not kept: the number
    has no 24 hours whose end forgets the warning; before, its refusals days later were never
    told again (and each such number stayed in memory for good)."""
    clock = FakeClock()
    budget = VoicemailBudget(Budget(0, PLENTY, 1), clock)
    assert budget.admit("a", "x", 60, free=PLENTY, used=0).refusal is None
    assert budget.admit("b", "x", 60, free=PLENTY, used=0).first_for_caller
    budget.release("a", kept=False)
    clock.advance(2 * DAY_S)
    assert budget.admit("c", "x", 60, free=PLENTY, used=0).refusal is None
    budget.release("c", kept=True)
    refused = budget.admit("d", "x", 60, free=PLENTY, used=0)
    assert refused.refusal is Refusal.CALLER_LIMIT and refused.first_for_caller


def test_callers_with_no_number_are_not_held_to_one_shared_count() -> None:
    """An empty name is no number (withheld): before, every such caller shared one count, so a
    handful of them in a day (or one abuser) refused all others their message for 24 h.
    The cap still holds them."""
    budget = VoicemailBudget(Budget(0, 3 * NEED, 1), FakeClock())
    for call in ("a", "b"):
        assert budget.admit(call, "", 60, free=PLENTY, used=0).refusal is None
        budget.release(call, kept=True)
    assert budget.admit("c", "", 60, free=PLENTY, used=2 * NEED).refusal is None
    assert budget.admit("d", "", 60, free=PLENTY, used=2 * NEED).refusal is Refusal.FULL
    # A number is still held to its count.
    assert budget.admit("e", "x", 60, free=PLENTY, used=0).refusal is None
    budget.release("e", kept=True)
    assert budget.admit("f", "x", 60, free=PLENTY, used=0).refusal is Refusal.CALLER_LIMIT


def test_the_line_state_changes_are_reported_once_each() -> None:
    budget = VoicemailBudget(Budget(10 * MB, 20 * MB, 1), FakeClock())
    seen: list[tuple[Refusal | None, bool]] = []
    for free, used, caller in [
        (PLENTY, 0, "a"),  # taken: the state it starts in, no change
        (0, 0, "b"),  # disk low: a change
        (0, 0, "c"),  # still: none
        (PLENTY, 20 * MB, "d"),  # full: a change
        (PLENTY, 20 * MB, "e"),
        (PLENTY, 0, "f"),  # taken again: a change
        (PLENTY, 0, "f"),  # f's limit: no change of the line's state
        (PLENTY, 0, "g"),
    ]:
        d = budget.admit(caller + str(len(seen)), caller, 60, free=free, used=used)
        if d.refusal is None:
            budget.release(caller + str(len(seen)), kept=True)
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


def test_the_callers_remembered_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vb, "CALLERS_REMEMBERED", 3)
    budget = VoicemailBudget(Budget(0, PLENTY, 1), FakeClock())
    for n in range(5):
        budget.admit(str(n), f"caller{n}", 1, free=PLENTY, used=0)
        budget.release(str(n), kept=True)
    assert [budget.count(f"caller{n}") for n in range(5)] == [0, 0, 1, 1, 1]


def test_a_release_of_a_call_never_admitted_is_nothing() -> None:
    budget = VoicemailBudget(BUDGET, FakeClock())
    budget.release("never", kept=True)
    assert budget.reserved_bytes == 0 and budget.count("") == 0
