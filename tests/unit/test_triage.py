"""Triage rules: the never-down state, risk groups, and 50 scripted patients on triage.yaml."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from voice.ivr.engine import (
    CallRecord,
    Digit,
    Engine,
    Event,
    NoInput,
    Phase,
    PromptDone,
    SpeechResult,
    Store,
    TransferCall,
    TransferResult,
    WebhookResult,
)
from voice.ivr.flow import MENU_TARGET, Ask, FlowParams, FlowSet, load_flows
from voice.ivr.simulate import script_call
from voice.ivr.triage import (
    ACTION_FOR,
    RiskGroup,
    TriageAction,
    TriageState,
    Urgency,
    UrgencyLoweredError,
    action_allows,
    ensure_not_lowered,
    with_risk,
)

FLOWS = Path(__file__).resolve().parents[2] / "ivr_flows"
EMERGENCY = TriageAction.CALL_EMERGENCY
NURSE = TriageAction.TRANSFER_NURSE
SAME_DAY = TriageAction.SAME_DAY
H24 = TriageAction.WITHIN_24H
SELF = TriageAction.SELF_CARE
NO_DANGER = "2 2 2 2 2"  # breathing, chest, unconscious, bleeding, stroke: all no


@pytest.fixture(scope="module")
def flowset() -> FlowSet:
    return load_flows(FLOWS)


def record_of(actions: Sequence[object]) -> CallRecord:
    stores = [a for a in actions if isinstance(a, Store)]
    assert len(stores) == 1, f"expected one Store action, got {len(stores)}"
    return stores[0].record


# -- the state ------------------------------------------------------------------------------


def test_raise_to_keeps_the_most_urgent_level() -> None:
    state = TriageState().raise_to(Urgency.U3, "severe pain").raise_to(Urgency.U4, "long")
    assert state.urgency is Urgency.U3
    assert state.reasons == ("severe pain", "long")
    assert state.action is SAME_DAY


def test_lowering_is_an_error() -> None:
    with pytest.raises(UrgencyLoweredError, match="went down") as lowered:
        ensure_not_lowered(TriageState(Urgency.U1), TriageState(Urgency.U4))
    with pytest.raises(UrgencyLoweredError, match="was dropped") as dropped:
        ensure_not_lowered(TriageState(Urgency.U2), None)
    ensure_not_lowered(None, TriageState(Urgency.U5))
    # The session logs it with the call's id (session failed): no caller's urgency in it.
    for err in (lowered, dropped):
        assert not re.search(r"U[0-5]", str(err.value)), err.value


@pytest.mark.parametrize(
    ("urgency", "groups", "expected"),
    [
        (Urgency.U5, {RiskGroup.ELDERLY}, Urgency.U4),
        (Urgency.U4, {RiskGroup.PREGNANT}, Urgency.U3),
        (Urgency.U3, {RiskGroup.CHRONIC_ILLNESS}, Urgency.U2),
        (Urgency.U2, {RiskGroup.IMMUNOCOMPROMISED}, Urgency.U2),  # risk alone is never U1
        (Urgency.U1, {RiskGroup.ELDERLY}, Urgency.U1),
        (Urgency.U5, {RiskGroup.BABY_UNDER_3_MONTHS}, Urgency.U3),
        (Urgency.U5, set(), Urgency.U5),
    ],
)
def test_risk_groups_raise_urgency(
    urgency: Urgency, groups: set[RiskGroup], expected: Urgency
) -> None:
    assert with_risk(urgency, frozenset(groups)) is expected


def test_add_risk_applies_to_the_level_reached() -> None:
    state = TriageState().raise_to(Urgency.U4, "pain").add_risk(RiskGroup.ELDERLY)
    assert state.urgency is Urgency.U3
    assert "risk group: elderly" in state.reasons


def test_actions_cover_every_level_and_allow_only_as_urgent() -> None:
    assert set(ACTION_FOR) == set(Urgency)
    assert action_allows(NURSE, Urgency.U2)
    assert not action_allows(SELF, Urgency.U4)
    assert not action_allows(NURSE, Urgency.U1)
    assert action_allows(EMERGENCY, Urgency.U0)


# -- scripted patients through the shipped triage flow ---------------------------------------

# (name, answers as typed on the keypad, expected urgency, expected action). Each key of a
# line answers one question, after its prompt: a danger sign takes no type-ahead (the caller
# must hear it), so the keys are given one prompt at a time (see :func:`one_a_prompt`).
CASES: list[tuple[str, list[str], Urgency, TriageAction]] = [
    ("breathing difficulty", ["1 1"], Urgency.U1, EMERGENCY),
    ("chest pain", ["1 2 1"], Urgency.U1, EMERGENCY),
    ("unconscious", ["1 2 2 1"], Urgency.U0, EMERGENCY),
    ("severe bleeding", ["1 2 2 2 1"], Urgency.U1, EMERGENCY),
    ("stroke signs", ["1 2 2 2 2 1"], Urgency.U1, EMERGENCY),
    ("fever, very ill", [f"1 {NO_DANGER} 1 1 2 2 5"], Urgency.U2, NURSE),
    ("fever, very ill, stiff neck", [f"1 {NO_DANGER} 1 1 1"], Urgency.U1, EMERGENCY),
    ("fever with stiff neck", [f"1 {NO_DANGER} 1 2 1"], Urgency.U1, EMERGENCY),
    ("fever over 3 days", [f"1 {NO_DANGER} 1 2 2 1 5"], Urgency.U3, SAME_DAY),
    ("short fever", [f"1 {NO_DANGER} 1 2 2 2 5"], Urgency.U5, SELF),
    ("short fever, over 75", [f"1 {NO_DANGER} 1 2 2 2 1"], Urgency.U4, H24),
    ("long fever, pregnant", [f"1 {NO_DANGER} 1 2 2 1 2"], Urgency.U2, NURSE),
    ("mild pain", [f"1 {NO_DANGER} 2 1 2 2 5"], Urgency.U5, SELF),
    ("moderate pain", [f"1 {NO_DANGER} 2 2 2 2 5"], Urgency.U4, H24),
    ("severe pain", [f"1 {NO_DANGER} 2 3 2 2 5"], Urgency.U3, SAME_DAY),
    ("sudden severe pain", [f"1 {NO_DANGER} 2 1 1 5"], Urgency.U2, NURSE),
    ("pain over a week", [f"1 {NO_DANGER} 2 1 2 1 5"], Urgency.U4, H24),
    ("moderate pain, chronic illness", [f"1 {NO_DANGER} 2 2 2 2 3"], Urgency.U3, SAME_DAY),
    ("head injury", [f"1 {NO_DANGER} 3 1 5"], Urgency.U2, NURSE),
    ("minor injury", [f"1 {NO_DANGER} 3 2 1 2 5"], Urgency.U4, H24),
    ("cannot stand on the leg", [f"1 {NO_DANGER} 3 2 2 2 5"], Urgency.U3, SAME_DAY),
    ("wound needs stitches", [f"1 {NO_DANGER} 3 2 1 1 5"], Urgency.U3, SAME_DAY),
    ("short of breath at rest", [f"1 {NO_DANGER} 4 1 5"], Urgency.U2, NURSE),
    ("coughing blood", [f"1 {NO_DANGER} 4 2 1 5"], Urgency.U2, NURSE),
    ("cough 3 weeks", [f"1 {NO_DANGER} 4 2 2 1 2 5"], Urgency.U4, H24),
    ("cough with fever", [f"1 {NO_DANGER} 4 2 2 2 1 5"], Urgency.U4, H24),
    ("plain cough", [f"1 {NO_DANGER} 4 2 2 2 2 5"], Urgency.U5, SELF),
    ("plain cough, weak immunity", [f"1 {NO_DANGER} 4 2 2 2 2 4"], Urgency.U4, H24),
    ("severe belly pain", [f"1 {NO_DANGER} 5 1 5"], Urgency.U2, NURSE),
    ("blood in stool", [f"1 {NO_DANGER} 5 2 1 5"], Urgency.U2, NURSE),
    ("cannot keep fluids", [f"1 {NO_DANGER} 5 2 2 1 5"], Urgency.U3, SAME_DAY),
    ("upset stomach", [f"1 {NO_DANGER} 5 2 2 2 5"], Urgency.U5, SELF),
    ("swollen lips", [f"1 {NO_DANGER} 6 1"], Urgency.U1, EMERGENCY),
    ("skin infection", [f"1 {NO_DANGER} 6 2 1 5"], Urgency.U3, SAME_DAY),
    ("rash with fever", [f"1 {NO_DANGER} 6 2 2 1 5"], Urgency.U3, SAME_DAY),
    ("mild rash", [f"1 {NO_DANGER} 6 2 2 2 5"], Urgency.U5, SELF),
    ("thoughts of harm", [f"1 {NO_DANGER} 7 1"], Urgency.U1, EMERGENCY),
    ("not coping", [f"1 {NO_DANGER} 7 2 1 5"], Urgency.U3, SAME_DAY),
    ("low mood", [f"1 {NO_DANGER} 7 2 2 5"], Urgency.U4, H24),
    ("limits daily life", [f"1 {NO_DANGER} 8 1 5"], Urgency.U4, H24),
    ("minor other", [f"1 {NO_DANGER} 8 2 5"], Urgency.U5, SELF),
    ("baby under 3 months with fever", [f"2 1 {NO_DANGER} 1 2 2 2 3"], Urgency.U2, NURSE),
    ("baby under 3 months, minor", [f"2 1 {NO_DANGER} 8 2 3"], Urgency.U3, SAME_DAY),
    ("child with short fever", [f"2 3 {NO_DANGER} 1 2 2 2 3"], Urgency.U5, SELF),
    ("child breathing difficulty", ["2 3 1"], Urgency.U1, EMERGENCY),
    ("child, chronic, cough with fever", [f"2 3 {NO_DANGER} 4 2 2 2 1 1"], Urgency.U3, SAME_DAY),
    ("teenager with mild pain", [f"2 4 {NO_DANGER} 2 1 2 2 3"], Urgency.U5, SELF),
    ("someone else, stroke", ["3 2 2 2 2 1"], Urgency.U1, EMERGENCY),
    ("someone else, mild rash", [f"3 {NO_DANGER} 6 2 2 2 5"], Urgency.U5, SELF),
    # Unclear answers to danger signs are never read as "no": at least a nurse.
    ("silence once on breathing", ["1", ":silence", f"{NO_DANGER} 8 2 5"], Urgency.U2, NURSE),
    ("wrong key on chest pain", ["1 2 9", "2 2 2 2 8 2 5"], Urgency.U2, NURSE),
    ("silence twice on breathing", ["1", ":silence", ":silence"], Urgency.U2, NURSE),
    (
        "keys one at a time",
        ["1", "2", "2", "2", "2", "2", "6", "2", "2", "2", "5"],
        Urgency.U5,
        SELF,
    ),
]


@pytest.mark.parametrize(
    ("answers", "urgency", "action"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_scripted_patient(
    flowset: FlowSet, answers: list[str], urgency: Urgency, action: TriageAction
) -> None:
    engine = Engine(flowset, FlowParams())
    state, actions = script_call(engine, "triage", one_a_prompt(answers))
    assert state.phase is Phase.ENDED, f"call did not end; stuck at {state.node}"
    rec = record_of(actions)
    assert (rec.urgency, rec.action) == (urgency, action), rec.reasons
    if urgency <= Urgency.U2:
        transfers = [a for a in actions if isinstance(a, TransferCall)]
        assert transfers and transfers[-1].uri == FlowParams().nurse_uri


def one_a_prompt(lines: list[str]) -> list[str]:
    """``["1 2", ":silence"]`` -> ``["1", "2", ":silence"]``: each key after its prompt."""
    return [key for line in lines for key in line.split()]


def test_there_are_at_least_forty_cases() -> None:
    assert len(CASES) >= 40


def test_emergency_tells_the_caller_the_emergency_number(flowset: FlowSet) -> None:
    engine = Engine(flowset, FlowParams(emergency_number="911"))
    _, actions = script_call(engine, "triage", ["1", "1"])
    spoken = " ".join(getattr(a, "text", "") for a in actions)
    assert "call 9 1 1 now" in spoken


def test_failed_booking_goes_to_staff_keeping_the_outcome(flowset: FlowSet) -> None:
    engine = Engine(flowset, FlowParams())
    answers = one_a_prompt([f"1 {NO_DANGER} 2 3 2 2 5"])
    _, actions = script_call(engine, "triage", answers, webhook_ok=False)
    rec = record_of(actions)
    assert (rec.urgency, rec.action) == (Urgency.U3, SAME_DAY)
    assert rec.transfer_target == FlowParams().staff_uri


# -- property: urgency never goes down, danger signs never end in self-care -----------------


@pytest.mark.parametrize("seed", range(4))
def test_random_callers_never_lower_urgency(flowset: FlowSet, seed: int) -> None:
    rng = random.Random(seed)
    keys = list("0123456789*#") + ["1", "2", "2", "2"] * 3
    for speech in (False, True):
        engine = Engine(flowset, FlowParams(speech_enabled=speech))
        for _ in range(60):
            state, actions = engine.start(flowset.get("triage"))
            levels: list[Urgency] = []
            danger_yes = False
            for _ in range(80):
                if state.phase is Phase.ENDED:
                    break
                roll = rng.random()
                event: Event
                if state.phase is Phase.PLAYING and roll < 0.6:
                    event = PromptDone()
                elif roll < 0.1:
                    event = NoInput()
                elif roll < 0.2:
                    event = SpeechResult(rng.choice(["yes", "no", "maybe"]), rng.random())
                elif state.phase is Phase.WEBHOOK:
                    event = WebhookResult(rng.random() < 0.5)
                elif state.phase is Phase.TRANSFERRING:
                    event = TransferResult(rng.random() < 0.8)
                else:
                    event = Digit(rng.choice(keys))
                state, actions = engine.handle(state, event)
                if state.triage is not None:
                    levels.append(state.triage.urgency)
                    danger_yes = danger_yes or state.triage.urgency <= Urgency.U1
                for act in actions:
                    if isinstance(act, Store) and act.record.action is SELF:
                        assert not danger_yes, "a danger sign ended in self-care"
            assert levels == sorted(levels, reverse=True), f"urgency went down: {levels}"


def test_a_goodbye_below_the_urgency_reached_becomes_a_nurse(tmp_path: Path) -> None:
    # A flow (flow check now refuses it) that says goodbye with no triage action to a caller
    # who should see a doctor today: the record said action same_day, outcome completed, and
    # nothing was booked. The engine puts such a caller through to the nurse, as for U2.
    broken = FLOWS.parent / "tests" / "data" / "flows" / "goodbye_at_u3.yaml"
    (tmp_path / broken.name).write_text(broken.read_text(encoding="utf-8"), encoding="utf-8")
    engine = Engine(load_flows(tmp_path), FlowParams())
    _, actions = script_call(engine, "broken_goodbye_at_u3", ["2", "1"])
    record = record_of(actions)
    assert record.urgency is Urgency.U3
    assert record.outcome == "transfer_nurse", record
    assert any(isinstance(a, TransferCall) for a in actions)


# -- every keypad path of every shipped triage: the danger signs before any end without one

# The danger signs the triage asks every caller first ("Danger signs come first"), by the
# value each saves: any triage, in any language, asks them all before a call may end without
# a clinician (a booking, self-care, a goodbye). A flow in another language that asks fewer
# gives its callers a weaker triage.
FIRST_DANGER_SIGNS = ("breathing", "chest_pain", "unconscious", "bleeding", "stroke")
_HUMAN = frozenset({EMERGENCY.value, NURSE.value})


def keypad_paths(engine: Engine, flow_id: str) -> list[tuple[list[str], CallRecord]]:
    """Every call through ``flow_id`` answered by keys, each answer one of its choices (not
    the way back to the menu), with the record it ends with."""
    done: list[tuple[list[str], CallRecord]] = []
    todo: list[list[str]] = [[]]
    while todo:
        keys = todo.pop()
        state, actions = script_call(engine, flow_id, keys)
        if state.phase is Phase.ENDED:
            done.append((keys, record_of(actions)))
            continue
        assert state.flow == flow_id, f"{keys}: left {flow_id} for {state.flow}"
        ask = engine.flowset.get(flow_id).nodes[state.node]
        assert isinstance(ask, Ask), f"{keys}: stuck at {state.node}"
        todo += [[*keys, c.key] for c in ask.choices if c.key and c.goto != MENU_TARGET]
    return done


def test_no_shipped_triage_ends_without_a_clinician_before_every_danger_sign_is_no(
    flowset: FlowSet,
) -> None:
    triages = [
        f.id
        for f in flowset.flows.values()
        if any(isinstance(n, Ask) and n.danger_sign for n in f.nodes.values())
    ]
    assert {"triage", "triage_ko"} <= set(triages)
    for open_now in (True, False):
        hours = (lambda: True) if open_now else (lambda: False)
        engine = Engine(flowset, FlowParams(open_now=hours))
        for flow_id in triages:
            paths = keypad_paths(engine, flow_id)
            assert len(paths) > 1
            for keys, rec in paths:
                reached_human = rec.action is not None and rec.action.value in _HUMAN
                if rec.transfer_target == FlowParams().nurse_uri or reached_human:
                    continue
                values = dict(rec.values)
                unasked = [v for v in FIRST_DANGER_SIGNS if values.get(v) != "no"]
                assert not unasked, (
                    f"{flow_id} {' '.join(keys)} ends {rec.outcome} at "
                    f"{rec.urgency.name if rec.urgency is not None else '-'} with "
                    f"{', '.join(unasked)} not answered no"
                )
