"""The caller's keys (README, "The caller's keys"): ``0`` and ``*`` work at every question,
and a caller is told so before the first choice of the flows a number reaches, where an
elderly or hard-of-hearing caller who missed a word needs to know that ``*`` says it again."""

from __future__ import annotations

from pathlib import Path

import pytest

from voice.ivr.engine import Engine, Listen, Phase, Play
from voice.ivr.flow import FlowParams, load_flows
from voice.ivr.simulate import script_call

SHIPPED = Path(__file__).resolve().parents[2] / "ivr_flows"
REPEAT = "to hear a question again, press star"


@pytest.mark.parametrize(
    ("flow_id", "open_now", "human"),
    [
        ("main_menu", True, "to speak to a member of staff at any time, press 0"),
        ("main_menu", False, None),  # closed: no desk to offer, but * still works
        ("triage", True, "to speak to a nurse at any time, press 0"),
        ("triage", False, "to speak to a nurse at any time, press 0"),  # the nurse, not the desk
    ],
)
def test_the_keys_that_work_everywhere_are_told_before_the_first_choice(
    flow_id: str, open_now: bool, human: str | None
) -> None:
    engine = Engine(load_flows(SHIPPED), FlowParams(open_now=lambda: open_now))
    state, actions = script_call(engine, flow_id, [])
    assert state.phase is Phase.LISTENING and isinstance(actions[-1], Listen)
    said = " ".join(a.text for a in actions if isinstance(a, Play)).lower()
    assert REPEAT in said, f"{flow_id}: the caller is never told that * repeats: {said!r}"
    if human is not None:
        assert human in said, said
