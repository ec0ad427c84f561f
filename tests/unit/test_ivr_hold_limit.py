"""voice/ivr/hold_limit.py: when the far end's hold ends a clinic-line call (pure)."""

from __future__ import annotations

import pytest

from voice.ivr.hold_limit import HOLD_MAX_S, HOLD_TOTAL_S, HOLDS_MAX, HoldLimit, Holds


def holds(*spans: tuple[float, float | None]) -> Holds:
    """The holds (start, end) in order; an end of None: still on hold."""
    h = Holds()
    for start, end in spans:
        h = h.begin(start)
        if end is not None:
            h = h.end(end)
    return h


# (holds so far, when the current hold ends the call and by which limit; None: not held)
CASES = [
    ("never held", holds(), None),
    ("back from a hold", holds((10.0, 70.0)), None),
    ("one hold", holds((10.0, None)), (10.0 + HOLD_MAX_S, HoldLimit.ONE)),
    (
        "a short hold before: one hold's limit still",
        holds((10.0, 70.0), (100.0, None)),
        (100.0 + HOLD_MAX_S, HoldLimit.ONE),
    ),
    (
        "two holds of 4 minutes before: what is left of all holds' 10 minutes",
        holds((0.0, 240.0), (245.0, 485.0), (490.0, None)),
        (490.0 + HOLD_TOTAL_S - 480.0, HoldLimit.TOTAL),
    ),
    (
        "all holds' time spent: at once",
        holds((0.0, 299.0), (300.0, 599.0), (600.0, 603.0), (605.0, None)),
        (605.0, HoldLimit.TOTAL),
    ),
    (
        "the hold after the tenth: at once",
        holds(*[(i * 10.0, i * 10.0 + 1.0) for i in range(HOLDS_MAX)], (200.0, None)),
        (200.0, HoldLimit.COUNT),
    ),
    (
        "the tenth hold: its own limit",
        holds(*[(i * 10.0, i * 10.0 + 1.0) for i in range(HOLDS_MAX - 1)], (200.0, None)),
        (200.0 + HOLD_MAX_S, HoldLimit.ONE),
    ),
]


@pytest.mark.parametrize(("name", "state", "due"), CASES, ids=[c[0] for c in CASES])
def test_when_a_hold_ends_the_call(
    name: str, state: Holds, due: tuple[float, HoldLimit] | None
) -> None:
    assert state.deadline() == due


def test_a_hold_reported_twice_is_one_hold_and_a_return_twice_one_return() -> None:
    # A re-INVITE that repeats a=sendonly (a session refresh during the hold) is no new hold
    # and does not restart its limit.
    h = Holds().begin(10.0).begin(50.0)
    assert (h.count, h.since) == (1, 10.0)
    h = h.end(70.0).end(90.0)
    assert (h.count, h.spent_s, h.held) == (1, 60.0, False)
