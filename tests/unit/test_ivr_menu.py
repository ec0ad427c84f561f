"""The way back to the main menu (``@menu``): offered by the shipped sub-flows at their first
question, re-reading the opening hours, never lowering a triage, capped per call."""

from __future__ import annotations

import datetime
import json
import zoneinfo
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import pytest

from sip_config.clock import FakeClock
from voice.ivr.check import check_files
from voice.ivr.engine import (
    LOST_OUTCOME,
    MAX_MENU_RETURNS,
    Action,
    CallState,
    Digit,
    Engine,
    Event,
    Phase,
    Play,
    PromptDone,
    Store,
    TransferCall,
    record_of,
)
from voice.ivr.flow import FlowError, FlowParams, load_flows
from voice.ivr.opening_hours import OpeningHours, parse_week
from voice.ivr.simulate import script_call
from voice.ivr.triage import Urgency

SHIPPED = Path(__file__).resolve().parents[2] / "ivr_flows"
ZONE = zoneinfo.ZoneInfo("Europe/Amsterdam")
HOURS = OpeningHours(parse_week("mon-fri 08:00-17:00"), ZONE)
# Monday 5 January 2026, 16:59 in Amsterdam: open for one more minute.
MONDAY_1659 = datetime.datetime(2026, 1, 5, 16, 59, tzinfo=ZONE).timestamp()
MENU_PROMPT = (
    "How can I help you? To speak to a member of staff at any time, press 0. To hear a "
    "question again, press star. For appointments, press 1. For a prescription renewal, "
    "press 2. For test results, press 3. For advice on whether you need to see a doctor, "
    "press 4."
)
CLOSED_MENU_PROMPT = "You can still leave a request. How can I help you?"


def clocked(clock: FakeClock, **kw: object) -> FlowParams:
    """Params whose "today" and "open now" read ``clock``, as the service's do."""
    return FlowParams(
        today=lambda: datetime.datetime.fromtimestamp(clock.now(), ZONE).date(),
        open_now=lambda: HOURS.is_open(clock.now()),
        opening_hours=HOURS,
        **kw,  # type: ignore[arg-type]
    )


def plays(actions: Sequence[Action]) -> list[str]:
    return [a.text for a in actions if isinstance(a, Play)]


def menus(state: CallState) -> list[str]:
    """The main menu's questions the call was asked, in order (each entry's step)."""
    return [
        p.node
        for p in state.path
        if p.flow == "main_menu" and p.node.startswith("menu") and not p.input
    ]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(MONDAY_1659 - 600)


@pytest.mark.parametrize(
    ("keys", "flow", "node"),
    [
        (["1", "9"], "appointments", "which"),
        (["2", "9#"], "prescription", "dob"),
        (["3", "9#"], "results", "dob"),
        (["4", "9"], "triage", "for_whom"),
    ],
)
def test_each_shipped_option_leads_back_to_the_main_menu(
    clock: FakeClock, keys: list[str], flow: str, node: str
) -> None:
    engine = Engine(load_flows(SHIPPED), clocked(clock))
    state, actions = script_call(engine, "main_menu", keys)
    assert state.phase is Phase.LISTENING and (state.flow, state.node) == ("main_menu", "menu")
    assert (flow, node, "digit", keys[1].rstrip("#")) in [
        (p.flow, p.node, p.input, p.value) for p in state.path
    ]
    assert menus(state) == ["menu", "menu"]
    assert plays(actions).count(MENU_PROMPT) == 2
    assert state.menu_returns == 1
    # The way back answers nothing: no "9" as the appointment's action or a date of birth.
    assert dict(state.values) == {}
    assert state.triage is None


def test_the_way_back_is_announced_at_each_first_question(clock: FakeClock) -> None:
    engine = Engine(load_flows(SHIPPED), clocked(clock))
    for key, said in [
        ("1", "To cancel an appointment, press 3. For the main menu, press 9."),
        ("2", "then press hash. For the main menu, press 9 then hash."),
        ("3", "then press hash. For the main menu, press 9 then hash."),
        ("4", "For someone else, press 3. For the main menu, press 9."),
    ]:
        _, actions = script_call(engine, "main_menu", [key])
        assert plays(actions)[-1].endswith(said), plays(actions)[-1]


def test_main_menu_said_takes_the_caller_back(clock: FakeClock) -> None:
    engine = Engine(load_flows(SHIPPED), clocked(clock, speech_enabled=True))
    state, _ = script_call(engine, "main_menu", ["appointments", "main menu please"])
    assert (state.flow, state.node) == ("main_menu", "menu")
    assert dict(state.values) == {}


def test_a_key_and_a_pause_in_the_date_of_birth_also_go_back(clock: FakeClock) -> None:
    # 9 and no hash: the inter-digit timeout ends the one-key entry.
    engine = Engine(load_flows(SHIPPED), clocked(clock))
    state, _ = script_call(engine, "main_menu", ["2", "9", ":silence"])
    assert (state.flow, state.node) == ("main_menu", "menu")


def test_a_date_of_birth_beginning_with_9_is_still_an_entry(clock: FakeClock) -> None:
    # Only the key alone is the way back: "91#" is a (bad) date, asked again.
    engine = Engine(load_flows(SHIPPED), clocked(clock))
    state, actions = script_call(engine, "main_menu", ["2", "91#"])
    assert (state.flow, state.node) == ("prescription", "dob")
    assert plays(actions)[-1].startswith(
        "Sorry, that entry was not complete. It needs 8 digits. For a prescription"
    )
    assert state.menu_returns == 0


def test_out_of_hours_the_way_back_reaches_the_closed_menu(clock: FakeClock) -> None:
    clock.advance(3600)  # Monday 17:49: closed
    engine = Engine(load_flows(SHIPPED), clocked(clock))
    state, actions = script_call(engine, "main_menu", ["1", "9"])
    assert (state.flow, state.node) == ("main_menu", "menu_closed")
    assert menus(state) == ["menu_closed", "menu_closed"]
    assert sum(t.startswith(CLOSED_MENU_PROMPT) for t in plays(actions)) == 2


def test_the_menu_reads_the_hours_again_on_the_way_back(clock: FakeClock) -> None:
    """A caller who went into appointments before closing time and comes back after it
    meets the closed menu (no desk promised), as a new call would."""
    engine = Engine(load_flows(SHIPPED), clocked(clock))
    state, _ = script_call(engine, "main_menu", ["1"])
    assert state.flow == "appointments"
    clock.advance(660)  # 17:00: closed
    events: list[Event] = [Digit("9"), PromptDone(), PromptDone()]  # 9; the closed welcome
    for event in events:
        state, _ = engine.handle(state, event)
    assert (state.flow, state.node, state.phase) == ("main_menu", "menu_closed", Phase.LISTENING)


def loops(engine: Engine, times: int) -> tuple[CallState, list[Action]]:
    """appointments, back, appointments, back, ... ``times`` times."""
    return script_call(engine, "main_menu", ["1", "9"] * times)


def test_going_round_and_round_reaches_a_human_and_the_record_stops_growing(
    clock: FakeClock,
) -> None:
    engine = Engine(load_flows(SHIPPED), clocked(clock))
    state, actions = loops(engine, MAX_MENU_RETURNS)
    assert state.menu_returns == MAX_MENU_RETURNS and state.phase is Phase.LISTENING
    grown = len(state.path)
    # One return more: staff, not the menu again.
    state, actions = loops(engine, MAX_MENU_RETURNS + 1)
    assert state.phase is Phase.ENDED
    transfer = [a for a in actions if isinstance(a, TransferCall)]
    assert [t.uri for t in transfer] == [FlowParams().staff_uri]
    assert "Connecting you to a member of staff." in plays(actions)
    (stored,) = [a.record for a in actions if isinstance(a, Store)]
    assert stored.outcome == "transfer_staff"
    assert ("appointments", "which", "menu", "limit") in [
        (p.flow, p.node, p.input, p.value) for p in stored.path
    ]
    assert len(stored.path) <= grown + 10
    # However long the caller keeps pressing, the record (and the live record, which is the
    # same record with another outcome) is the same size: the call ended at the cap.
    many, _ = loops(engine, 50)
    assert many.path == state.path and many.values == state.values
    size = len(json.dumps(asdict(record_of(many, LOST_OUTCOME))))
    assert size == len(json.dumps(asdict(record_of(state, LOST_OUTCOME))))


def test_out_of_hours_the_cap_ends_with_the_closed_notice(clock: FakeClock) -> None:
    clock.advance(3600)
    engine = Engine(load_flows(SHIPPED), clocked(clock))
    state, actions = loops(engine, MAX_MENU_RETURNS + 1)
    assert state.phase is Phase.ENDED and state.outcome == "out_of_hours"
    assert not [a for a in actions if isinstance(a, TransferCall)]  # no empty desk rung


# A front door, and a triage that (against flow check) offers the way back after a question
# that made the call U2: the engine must still end the call at least that urgent.
FRONT = """\
id: front
language: en
human: staff
start: pick
nodes:
  pick:
    ask:
      prompt: "Pick."
      choices:
        - {key: "1", phrases: [requests], label: requests, goto: "@requests"}
        - {key: "4", phrases: [advice], label: advice, goto: "@tri"}
"""
REQUESTS = """\
id: requests
language: en
human: staff
start: what
nodes:
  what:
    ask:
      prompt: "What?"
      choices:
        - {key: "1", phrases: [repeat prescription], label: repeat prescription, goto: bye}
        - {key: "9", phrases: [main menu], label: the main menu, goto: "@menu"}
  bye:
    hangup: "Your request is noted. Goodbye."
    outcome: request_noted
"""
TRI = """\
id: tri
language: en
human: nurse
start: breathing
nodes:
  breathing:
    ask:
      prompt: "Any difficulty breathing?"
      danger_sign: true
      choices:
        - {key: "1", phrases: ["yes"], label: "yes", urgency: U1, reason: breathing, goto: urgent}
        - {key: "2", phrases: ["no"], label: "no", goto: rest}
  rest:
    ask:
      prompt: "Short of breath at rest?"
      choices:
        - {key: "1", phrases: ["yes"], label: "yes", urgency: U2, reason: breath, goto: back}
        - {key: "2", phrases: ["no"], label: "no", goto: fine}
  back:
    ask:
      prompt: "Anything else?"
      choices:
        - {key: "9", phrases: [main menu], label: the main menu, goto: "@menu"}
  urgent:
    transfer: nurse
    prompt: "Connecting you to a nurse now."
    outcome: call_emergency+transfer_nurse
  fine:
    hangup: "Look after yourself."
    outcome: self_care
"""


@pytest.fixture
def unsafe_flows(tmp_path: Path) -> Path:
    for name, text in [("front", FRONT), ("requests", REQUESTS), ("tri", TRI)]:
        (tmp_path / f"{name}.yaml").write_text(text, encoding="utf-8")
    (tmp_path / "routes.yaml").write_text("default: front\nroutes: {}\n", encoding="utf-8")
    return tmp_path


def test_flow_check_refuses_that_way_back(unsafe_flows: Path) -> None:
    got = [str(f) for f in check_files([unsafe_flows / "tri.yaml"])]
    assert f"{unsafe_flows / 'tri.yaml'}:23: 'back' goes back to the menu after a danger-sign " in (
        "\n".join(got)
    ), got


def test_a_u2_call_that_goes_back_to_the_menu_still_ends_with_the_nurse(
    unsafe_flows: Path, clock: FakeClock
) -> None:
    engine = Engine(load_flows(unsafe_flows), clocked(clock))
    # advice; no to breathing; yes, short of breath at rest (U2); back to the menu; a
    # request, whose goodbye would end a U2 call without a clinician.
    state, actions = script_call(engine, "front", ["4", "2", "1", "9", "1", "1"])
    assert state.phase is Phase.ENDED
    assert state.menu_returns == 1
    (stored,) = [a.record for a in actions if isinstance(a, Store)]
    assert stored.urgency is Urgency.U2
    assert "breath" in stored.reasons
    assert stored.outcome == "transfer_nurse"
    assert [a.uri for a in actions if isinstance(a, TransferCall)] == [FlowParams().nurse_uri]
    assert "To be safe, I will connect you to a nurse." in plays(actions)
    assert "Your request is noted. Goodbye." not in plays(actions)


def test_the_triage_never_offers_the_way_back_after_its_first_question() -> None:
    flows = load_flows(SHIPPED)
    offering = {
        (flow.id, node.id)
        for flow in flows.flows.values()
        for node in flow.nodes.values()
        for choice in getattr(node, "choices", ())
        if choice.goto == "@menu"
    }
    assert offering == {
        ("appointments", "which"),
        ("prescription", "dob"),
        ("results", "dob"),
        ("triage", "for_whom"),
    }


@pytest.mark.parametrize(
    ("choice", "message"),
    [
        (
            '{key: "9", phrases: [menu], goto: "@menu"}',
            "a digits ask hears no speech: no 'phrases'",
        ),
        ('{key: "#", goto: "@menu"}', "a choice in a digits ask needs a 'key' from 1 to 9"),
        (
            '{key: "9", urgency: U2, reason: x, goto: "@menu"}',
            "a choice in a digits ask raises no urgency or risk",
        ),
    ],
)
def test_a_digits_ask_takes_key_only_choices(tmp_path: Path, choice: str, message: str) -> None:
    (tmp_path / "d.yaml").write_text(
        "id: d\nlanguage: en\nstart: dob\nnodes:\n  dob:\n    ask:\n      prompt: x\n"
        "      digits: {min: 8, max: 8}\n      next: bye\n"
        f"      choices:\n        - {choice}\n  bye: {{hangup: true}}\n",
        encoding="utf-8",
    )
    (tmp_path / "routes.yaml").write_text("default: d\nroutes: {}\n", encoding="utf-8")
    with pytest.raises(FlowError) as caught:
        load_flows(tmp_path)
    assert [f.message for f in caught.value.findings] == [message]


def test_the_flow_id_menu_is_kept_for_the_way_back(tmp_path: Path) -> None:
    (tmp_path / "menu.yaml").write_text(
        "id: menu\nlanguage: en\nstart: bye\nnodes:\n  bye: {hangup: true}\n", encoding="utf-8"
    )
    (tmp_path / "routes.yaml").write_text("default: menu\nroutes: {}\n", encoding="utf-8")
    with pytest.raises(FlowError, match="flow id 'menu' is kept for @menu"):
        load_flows(tmp_path)


def test_the_way_back_typed_over_the_date_prompt_is_taken(clock: FakeClock) -> None:
    # 2 cuts the welcome short, 9 and # cut the date of birth's question short.
    engine = Engine(load_flows(SHIPPED), clocked(clock))
    state, _ = engine.start(engine.flowset.get("main_menu"))
    for key in "29#":
        state, _ = engine.handle(state, Digit(key))
    assert (state.flow, state.menu_returns) == ("main_menu", 1)
