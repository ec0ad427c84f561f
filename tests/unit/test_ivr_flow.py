"""Loading flows: typed nodes, line numbers, routes, static prompts."""

from __future__ import annotations

from pathlib import Path

import pytest

from voice.ivr.flow import (
    Ask,
    Branch,
    DigitFormat,
    FlowError,
    FlowParams,
    Human,
    InputMode,
    load_flow,
    load_flows,
)
from voice.ivr.triage import RiskGroup, Urgency

SHIPPED = Path(__file__).resolve().parents[2] / "ivr_flows"


def test_triage_loads_typed_nodes() -> None:
    flow = load_flow(SHIPPED / "triage.yaml")
    assert (flow.id, flow.language, flow.human, flow.start) == (
        "triage",
        "en",
        Human.NURSE,
        "intro",
    )
    breathing = flow.node("breathing")
    assert isinstance(breathing, Ask) and breathing.danger_sign
    assert (breathing.max_noinput, breathing.max_nomatch, breathing.mode) == (2, 2, InputMode.BOTH)
    yes = breathing.choices[0]
    assert (yes.key, yes.value, yes.phrases) == ("1", "yes", ("yes", "yeah", "yep"))
    assert yes.effect is not None and yes.effect.urgency is Urgency.U1
    baby = flow.node("child_age")
    assert isinstance(baby, Ask) and baby.choices[0].effect is not None
    assert baby.choices[0].effect.risk is RiskGroup.BABY_UNDER_3_MONTHS


def test_routes_pick_flows_and_default_to_the_main_menu() -> None:
    flows = load_flows(SHIPPED)
    assert flows.route("ko").id == "triage_ko"
    assert flows.route("7001").id == "triage_ko"
    assert flows.route("triage").id == "triage"
    assert flows.route("whatever").id == "main_menu"


def test_static_prompts_resolve_parameters_and_follow_the_mode() -> None:
    flow = load_flow(SHIPPED / "triage.yaml")
    keypad = flow.static_prompts(FlowParams(emergency_number="999", speech_enabled=False))
    speech = flow.static_prompts(FlowParams(emergency_number="999", speech_enabled=True))
    assert not any("{" in t for t in keypad | speech)
    assert any("hang up and call 9 9 9 now" in t for t in keypad)
    breathing = (
        "Is there serious difficulty breathing, such as gasping, or being unable to speak "
        "in full sentences?"
    )
    assert f"{breathing} For yes, press 1. For no, press 2." in keypad
    assert f"{breathing} Say yes or press 1. Say no or press 2." in speech
    assert "Connecting you to a nurse." in keypad


@pytest.mark.parametrize(
    ("number", "spoken"), [("112", "1 1 2"), ("999", "9 9 9"), ("911", "9 1 1")]
)
def test_the_emergency_number_is_read_digit_by_digit(number: str, spoken: str) -> None:
    # espeak-ng reads "call 112" as "call one hundred and twelve" (999: "nine hundred and
    # ninety-nine"), not the keys a caller must press; the out-of-hours number was read
    # digit by digit already, the one number that matters most was not.
    params = FlowParams(emergency_number=number)
    assert params.values()["emergency_number"] == spoken
    menu = load_flow(SHIPPED / "main_menu.yaml")
    assert (
        f"Welcome to the clinic. If this is an emergency, hang up and call {spoken}."
        in menu.static_prompts(params)
    )
    ko = load_flow(SHIPPED / "triage_ko.yaml")
    assert any(f"{spoken}번" in t for t in ko.static_prompts(params))
    assert not any(number in t for t in menu.static_prompts(params) | ko.static_prompts(params))


def test_dynamic_texts_are_not_static() -> None:
    flow = load_flow(SHIPPED / "appointments.yaml")
    prompts = flow.static_prompts(FlowParams())
    assert not any("received" in t for t in prompts)  # names {appt_action}: rendered per call


def test_every_shipped_prompt_is_listed(tmp_path: Path) -> None:
    flows = load_flows(SHIPPED)
    total = set().union(*(f.static_prompts(FlowParams()) for f in flows.flows.values()))
    assert len(total) > 60


def test_a_schema_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "id: bad\nlanguage: en\nstart: a\nnodes:\n  a:\n    hangup: true\n    colour: red\n",
        encoding="utf-8",
    )
    with pytest.raises(FlowError) as info:
        load_flow(path)
    assert str(info.value) == f"{path}:7: unknown key 'colour' in a hangup node"
    assert info.value.status == 500


def test_on_and_yes_are_text_not_booleans(tmp_path: Path) -> None:
    flow = load_flow(SHIPPED / "results.yaml")
    status = flow.node("status")
    assert isinstance(status, Branch)
    assert status.on == "results.ready"
    assert dict(status.cases) == {"yes": "ready", "no": "not_ready"}


def test_load_flows_rejects_an_unknown_target(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "id: a\nlanguage: en\nstart: go\nnodes:\n  go: {goto: '@missing'}\n", encoding="utf-8"
    )
    with pytest.raises(FlowError, match=r"a\.yaml:5: unknown target '@missing'"):
        load_flows(tmp_path)


DIGITS_FLOW = """\
id: d
language: en
start: dob
nodes:
  dob:
    ask:
      prompt: "Date of birth?"
      digits: {DIGITS}
      next: bye
  bye: {hangup: true}
"""

# (digits spec, the findings of loading it)
DIGIT_SPECS: list[tuple[str, list[str]]] = [
    ("{min: 8, max: 8, format: date_ddmmyyyy}", []),
    ("{min: 8, max: 8, format: date}", ["8: unknown digits format 'date' (date_ddmmyyyy)"]),
    ("{min: 6, max: 8, format: date_ddmmyyyy}", ["8: format date_ddmmyyyy needs min and max 8"]),
]


@pytest.mark.parametrize(("spec", "findings"), DIGIT_SPECS)
def test_a_digits_format_is_checked(tmp_path: Path, spec: str, findings: list[str]) -> None:
    path = tmp_path / "d.yaml"
    path.write_text(DIGITS_FLOW.replace("{DIGITS}", spec), encoding="utf-8")
    if not findings:
        ask = load_flow(path).node("dob")
        assert isinstance(ask, Ask) and ask.digits is not None
        assert ask.digits.format is DigitFormat.DATE_DDMMYYYY
        return
    with pytest.raises(FlowError) as info:
        load_flow(path)
    assert [str(f) for f in info.value.findings] == [f"{path}:{line}" for line in findings]


@pytest.mark.parametrize("name", ["appointments", "results", "prescription"])
def test_the_shipped_dates_of_birth_are_checked_as_dates(name: str) -> None:
    ask = load_flow(SHIPPED / f"{name}.yaml").node("dob")
    assert isinstance(ask, Ask) and ask.digits is not None
    assert ask.digits.format is DigitFormat.DATE_DDMMYYYY
