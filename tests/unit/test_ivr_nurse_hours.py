"""The nurse's hours (``CLINIC_NURSE_HOURS``): the setting, and the engine out of them, where a
transfer to the nurse is not rung but fails at once (product decision 12b), so the safety
rules for a failed nurse transfer act straight away instead of after a ring-out."""

from __future__ import annotations

import datetime
import zoneinfo
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from clinic_voice import cli
from sip_config.settings import Settings, SettingsError, flow_preview_from_env
from voice.ivr.engine import (
    NURSE_CLOSED,
    Action,
    CallState,
    Digit,
    Engine,
    Listen,
    Phase,
    Play,
    PromptDone,
    Store,
    TransferCall,
)
from voice.ivr.flow import SYSTEM_TEXTS, FlowParams, load_flows, render
from voice.ivr.opening_hours import ALWAYS, OpeningHours, Range, parse_week
from voice.ivr.simulate import TransferEnding, script_call
from voice.ivr.simulate import main as simulate

SHIPPED = Path(__file__).resolve().parents[2] / "ivr_flows"
NURSE = FlowParams().nurse_uri
STAFF = FlowParams().staff_uri
AMS = zoneinfo.ZoneInfo("Europe/Amsterdam")
NURSE_HOURS = OpeningHours(parse_week("mon-fri 08:00-17:00"), AMS)
TEXTS = {k: render(v, {"emergency_number": "1 1 2"}) for k, v in SYSTEM_TEXTS["en"].items()}
# The shipped triage, a U1 caller: 1 (myself), 1 (yes: difficulty breathing).
U1_CALLER = ["1", "1"]


def plays(actions: list[Action]) -> list[str]:
    return [a.text for a in actions if isinstance(a, Play)]


def transfers(actions: list[Action]) -> list[str]:
    return [a.uri for a in actions if isinstance(a, TransferCall)]


def steps(store: Store, kind: str) -> list[tuple[str, str]]:
    return [(p.node, p.value) for p in store.record.path if p.input == kind]


def call(
    nurse_open: bool, answers: list[str], transfer: TransferEnding = TransferEnding.OK
) -> tuple[list[Action], Store]:
    engine = Engine(load_flows(SHIPPED), FlowParams(nurse_open=lambda: nurse_open))
    _, actions = script_call(engine, "triage", answers, transfer=transfer)
    stores = [a for a in actions if isinstance(a, Store)]
    assert stores, "the call did not end"
    return actions, stores[-1]


# -- the setting ------------------------------------------------------------------------------


def test_nurse_hours_unset_are_always_staffed() -> None:
    ivr = Settings.from_env({}).ivr
    assert ivr.nurse_hours.week == ALWAYS and not ivr.nurse_hours_set
    assert FlowParams.from_settings(Settings.from_env({})).nurse_open()


def test_nurse_hours_are_read_as_opening_hours_in_the_clinic_zone_without_closed_dates() -> None:
    env = {
        "CLINIC_NURSE_HOURS": "mon-fri 08:00-17:00; sun 10:00-12:00",
        "CLINIC_OPENING_HOURS": "mon-fri 09:00-12:00",
        "CLINIC_CLOSED_DATES": "2026-12-25",
        "CLINIC_TIMEZONE": "Europe/Amsterdam",
    }
    ivr = Settings.from_env(env).ivr
    hours = ivr.nurse_hours
    assert ivr.nurse_hours_set
    assert hours.week[0] == (Range(480, 1020),) and hours.week[5] == ()
    assert hours.week[6] == (Range(600, 720),)
    assert hours.zone == AMS
    # The desk's holidays are not the nurse's: Christmas Day 2026 is a Friday.
    christmas = datetime.datetime(2026, 12, 25, 10, 0, tzinfo=AMS)
    assert hours.is_open(christmas) and not ivr.hours.is_open(christmas)
    # Wall clock in CLINIC_TIMEZONE: 07:30 UTC is 08:30 in Amsterdam (winter).
    assert hours.is_open(datetime.datetime(2026, 12, 7, 7, 30, tzinfo=datetime.UTC))
    assert not hours.is_open(datetime.datetime(2026, 12, 7, 6, 30, tzinfo=datetime.UTC))
    # flow simulate reads it as serve does.
    assert flow_preview_from_env(env).nurse_hours == hours


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("mon-fri 8-17", "is not a time HH:MM"),
        ("weekdays 08:00-17:00", "is not a day"),
        ("mon 22:00-02:00", "ends before it starts"),
        ("mon-fri 08:00-17:00; mon 18:00-19:00", "mon is named twice"),
    ],
)
def test_bad_nurse_hours_are_refused_naming_the_variable(value: str, why: str) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"CLINIC_NURSE_HOURS": value})
    assert str(err.value).startswith("CLINIC_NURSE_HOURS="), err.value
    assert why in str(err.value)
    with pytest.raises(SettingsError, match=r"^CLINIC_NURSE_HOURS="):
        flow_preview_from_env({"CLINIC_NURSE_HOURS": value})


def test_serve_exits_2_on_bad_nurse_hours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CLINIC_NURSE_HOURS", "mon-fri 8-17")
    monkeypatch.setenv("CLINIC_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CLINIC_FLOWS_DIR", str(SHIPPED))

    def run(main: Coroutine[Any, Any, None]) -> None:
        main.close()
        pytest.fail("serve started with a bad CLINIC_NURSE_HOURS")

    monkeypatch.setattr(uvloop, "run", run)
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clinic-voice: configuration error: CLINIC_NURSE_HOURS="), err


# -- the engine -------------------------------------------------------------------------------


def test_a_u1_caller_out_of_nurse_hours_is_not_put_through_to_the_nurse() -> None:
    actions, store = call(False, U1_CALLER)
    # No REFER to the nurse: the failed transfer's safety words at once, then the staff desk
    # (decision 12: an urgent caller's fallback, open or closed).
    assert transfers(actions) == [STAFF]
    said = plays(actions)
    connecting = said.index("Connecting you to a nurse now.")
    assert said[connecting + 1] == TEXTS["transfer_retry"], said
    assert "hang up and call 1 1 2" in said[connecting + 1]
    assert steps(store, "transfer") == [
        ("emergency_transfer", NURSE_CLOSED),
        ("emergency_transfer", "ok"),
    ]
    assert store.record.transfer_target == STAFF
    assert store.record.outcome == "transfer_staff"


def test_a_u1_caller_out_of_nurse_hours_with_the_desk_failing_too_is_told_to_call_112() -> None:
    actions, store = call(False, U1_CALLER, TransferEnding.FAILS)
    assert transfers(actions) == [STAFF]
    assert plays(actions)[-1] == TEXTS["transfer_failed_urgent"]
    assert steps(store, "transfer") == [
        ("emergency_transfer", NURSE_CLOSED),
        ("emergency_transfer", "failed"),
    ]
    assert store.record.outcome == "transfer_failed"


def test_in_nurse_hours_the_nurse_is_rung_as_before() -> None:
    actions, store = call(True, U1_CALLER)
    assert transfers(actions) == [NURSE]
    assert steps(store, "transfer") == [("emergency_transfer", "ok")]
    assert store.record.transfer_target == NURSE
    assert store.record.outcome == "call_emergency+transfer_nurse"


def test_a_0_below_u2_out_of_nurse_hours_rings_nobody_and_offers_a_message() -> None:
    # A 0 at the triage's first question: the flow's human is the nurse. Not staffed, the
    # message offer comes at once (a caller below U2 whose transfer failed), no REFER at all.
    actions, store = call(False, ["0", ""])
    assert transfers(actions) == []
    said = plays(actions)
    assert said[said.index(TEXTS["to_nurse"]) + 1] == TEXTS["message_offer"], said
    assert steps(store, "transfer") == [("for_whom", NURSE_CLOSED)]
    assert store.record.outcome == "message_left"


# The shipped triage, a U3 caller (1 myself, no to every danger sign, 2 pain, 3 severe, no,
# no) who presses 0 at the risk-group question, before the triage's closed advice.
U3_CALLER_0 = ["1", "2", "2", "2", "2", "2", "2", "3", "2", "2", "0"]
OOH_NUMBER = "088 1234"


def closed_call(
    answers: list[str],
    number: str = OOH_NUMBER,
    transfer: TransferEnding = TransferEnding.OK,
    *,
    open_now: bool = False,
) -> tuple[list[Action], Store, Engine]:
    """The shipped triage with the practice closed (or ``open_now``) and the nurse not
    staffed, CLINIC_OUT_OF_HOURS_NUMBER ``number``."""
    params = FlowParams(
        open_now=lambda: open_now, nurse_open=lambda: False, out_of_hours_number=number
    )
    engine = Engine(load_flows(SHIPPED), params)
    _, actions = script_call(engine, "triage", answers, transfer=transfer)
    stores = [a for a in actions if isinstance(a, Store)]
    assert stores, "the call did not end"
    return actions, stores[-1], engine


def test_out_of_hours_a_u3_caller_whose_nurse_transfer_fails_hears_the_out_of_hours_service() -> (
    None
):
    # The clinical-safety finding: a U3 caller ("see a doctor today") out of hours, the
    # nurse not reached, was offered a message ("the clinic will call you back") and never
    # told the out-of-hours GP service: nobody calls back until the practice opens.
    actions, store, engine = closed_call([*U3_CALLER_0, ""])
    said = plays(actions)
    offer = said[said.index(TEXTS["to_nurse"]) + 1]
    notice = engine.params.values()["closed_notice"]
    assert "the out-of-hours GP service on 0 8 8, 1 2 3 4" in notice
    assert offer == f"{notice} {TEXTS['message_offer']}", offer
    # Rendered at start-up with the other prompts, not by the text to speech mid-call.
    assert offer in engine.flowset.get("triage").static_prompts(engine.params)
    record = store.record
    assert record.outcome == "message_left"
    assert record.urgency is not None and record.urgency.name == "U3"
    assert steps(store, "transfer") == [("risk_adult", NURSE_CLOSED)]


def test_out_of_hours_without_an_out_of_hours_number_the_notice_says_no_empty_number() -> None:
    actions, store, engine = closed_call([*U3_CALLER_0, ""], number="")
    said = plays(actions)
    offer = said[said.index(TEXTS["to_nurse"]) + 1]
    notice = engine.params.values()["closed_notice"]
    assert notice == "The practice is closed. In an emergency, call 1 1 2."
    assert offer == f"{notice} {TEXTS['message_offer']}", offer
    assert "GP service on" not in offer and " ." not in offer
    assert store.record.outcome == "message_left"


def test_out_of_hours_a_transfer_unconfirmed_below_u2_tells_the_notice_before_the_call_back() -> (
    None
):
    params = FlowParams(open_now=lambda: False, out_of_hours_number=OOH_NUMBER)
    engine = Engine(load_flows(SHIPPED), params)
    _, actions = script_call(engine, "triage", U3_CALLER_0, transfer=TransferEnding.UNCONFIRMED)
    last = plays(actions)[-1]
    notice = params.values()["closed_notice"]
    assert last == f"{notice} {TEXTS['transfer_unconfirmed']}", last
    assert last in engine.flowset.get("triage").static_prompts(params)


def test_out_of_hours_an_unheard_advice_that_names_the_service_is_not_followed_by_the_notice() -> (
    None
):
    # The triage's closed advice ("call the out-of-hours GP service on ... now") failed twice,
    # the nurse not staffed: the advice before the message offer, and no notice after it.
    params = FlowParams(
        open_now=lambda: False, nurse_open=lambda: False, out_of_hours_number=OOH_NUMBER
    )
    engine = Engine(load_flows(SHIPPED), params)
    answers = [*U3_CALLER_0[:-1], "5", ""]
    _, actions = script_call(engine, "triage", answers, unheard=frozenset({"same_day_closed"}))
    said = plays(actions)
    # (Played twice: the --unheard node fails every prompt there, the offer too.)
    (offer,) = {t for t in said if t.endswith(TEXTS["message_offer"])}
    assert offer.startswith("You should see a doctor today."), offer
    assert offer.count("out-of-hours GP service on 0 8 8, 1 2 3 4") == 1, offer
    assert params.values()["closed_notice"] not in offer
    assert offer in engine.flowset.get("triage").static_prompts(params)


def test_while_the_practice_is_open_a_failed_nurse_transfer_offers_the_message_alone() -> None:
    actions, store, _ = closed_call([*U3_CALLER_0, ""], open_now=True)
    said = plays(actions)
    assert said[said.index(TEXTS["to_nurse"]) + 1] == TEXTS["message_offer"], said
    assert store.record.outcome == "message_left"


def test_out_of_hours_an_urgent_caller_keeps_the_other_human_then_112() -> None:
    # U2 and more: the safety rules' fallback (decision 12), not the notice: "call 1 1 2".
    actions, store, _ = closed_call(U1_CALLER, transfer=TransferEnding.FAILS)
    said = plays(actions)
    assert said[-1] == TEXTS["transfer_failed_urgent"], said
    assert store.record.outcome == "transfer_failed"


FLOW = """\
id: t
language: en
human: staff
start: q
nodes:
  q:
    ask:
      prompt: "Press 1 for the nurse."
      choices:
        - {key: "1", phrases: [nurse], label: the nurse, goto: nurse}
  nurse:
    transfer: nurse
    prompt: "Putting you through to the nurse."
    on_fail: sorry
    outcome: transfer_nurse
  sorry:
    hangup: "The nurse cannot take your call."
    outcome: nurse_unavailable
"""


def drive(engine: Engine, state: CallState, actions: list[Action]) -> tuple[CallState, Play]:
    """Finish the prompts under way up to the next question: the state listening, and the
    question's prompt."""
    assert isinstance(actions[-1], Play), actions
    prompt = actions[-1]
    while state.phase is Phase.PLAYING:
        state, actions = engine.handle(state, PromptDone())
    assert any(isinstance(a, Listen) for a in actions), actions
    return state, prompt


@pytest.mark.parametrize(
    ("start", "at_step", "rung"),
    [
        # 16:59 at the question, 17:00 when the REFER would go out: not rung.
        ("16:59", "17:00", False),
        # 07:59 at the question, 08:00 at the REFER: the nurse has just come in.
        ("07:59", "08:00", True),
    ],
)
def test_the_nurse_hours_are_read_when_the_refer_would_go_out(
    tmp_path: Path, start: str, at_step: str, rung: bool
) -> None:
    (tmp_path / "t.yaml").write_text(FLOW, encoding="utf-8")
    day = datetime.date(2026, 12, 7)  # a Monday

    def instant(hhmm: str) -> float:
        wall = datetime.datetime.combine(day, datetime.time.fromisoformat(hhmm), AMS)
        return wall.timestamp()

    now = [instant(start)]
    engine = Engine(
        load_flows(tmp_path), FlowParams(nurse_open=lambda: NURSE_HOURS.is_open(now[0]))
    )
    state, actions = engine.start(engine.flowset.get("t"))
    state, _ = drive(engine, state, actions)
    # The choice, and the transfer's prompt, before the nurse's hours end (or begin).
    state, actions = engine.handle(state, Digit("1"))
    assert plays(actions) == ["Putting you through to the nurse."]
    now[0] = instant(at_step)
    state, actions = engine.handle(state, PromptDone())
    if rung:
        assert transfers(actions) == [NURSE]
        assert state.phase is Phase.TRANSFERRING
        return
    # Not rung: the step's on_fail at once, as a failed transfer would go.
    assert transfers(actions) == []
    assert plays(actions) == ["The nurse cannot take your call."]
    state, actions = engine.handle(state, PromptDone())
    store = next(a for a in actions if isinstance(a, Store))
    assert [(p.node, p.input, p.value) for p in store.record.path][-3:] == [
        ("nurse", "", ""),
        ("nurse", "transfer", NURSE_CLOSED),
        ("sorry", "", ""),
    ]
    assert store.record.outcome == "nurse_unavailable"
    assert store.record.transfer_target is None


# -- flow simulate ----------------------------------------------------------------------------


def _simulate(argv: list[str], lines: list[str]) -> list[str]:
    feed = iter(lines)
    out: list[str] = []

    def read(prompt: str) -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    assert simulate(argv, input_fn=read, output_fn=out.append) == 0
    return out


@pytest.mark.parametrize(
    ("args", "env", "staffed"),
    [
        (["--nurse-closed"], {}, False),
        (["--nurse-open"], {"CLINIC_NURSE_HOURS": "sat 08:00-09:00"}, True),
        ([], {}, True),
        # Saturday 10:00 in the clinic's zone: out of these hours.
        (["--at", "2026-12-05T10:00"], {"CLINIC_NURSE_HOURS": "mon-fri 08:00-17:00"}, False),
        (["--at", "2026-12-07T10:00"], {"CLINIC_NURSE_HOURS": "mon-fri 08:00-17:00"}, True),
    ],
)
def test_simulate_sets_the_nurse_line_staffed_or_not(
    monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str], staffed: bool
) -> None:
    monkeypatch.setenv("CLINIC_TIMEZONE", "Europe/Amsterdam")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = _simulate(["triage", "--flows-dir", str(SHIPPED), *args], U1_CALLER)
    text = "\n".join(out)
    assert (f"   transfer to {NURSE}" in text) is staffed, text
    assert ("-- the nurse line is not staffed" in text) is not staffed
    assert ("(the nurse line is not staffed: not rung" in text) is not staffed
    if not staffed:
        assert f"   transfer to {STAFF}" in text


# -- a line shared by the nurse and the desk; a flow that goes back to the nurse -------------


def test_a_line_the_desk_shares_with_the_nurse_is_rung_out_of_the_nurse_hours() -> None:
    # CLINIC_NURSE_URI = CLINIC_STAFF_URI: one line, which the desk may answer. A U1 caller
    # out of the nurse's hours is put through to it as before (rung), not told at once to
    # hang up and call 1 1 2 with nobody rung (the desk counted as failed with the nurse).
    params = FlowParams(nurse_open=lambda: False, nurse_uri=STAFF, staff_uri=STAFF)
    engine = Engine(load_flows(SHIPPED), params)
    _, actions = script_call(engine, "triage", U1_CALLER)
    store = next(a for a in actions if isinstance(a, Store))
    assert transfers(actions) == [STAFF]
    assert steps(store, "transfer") == [("emergency_transfer", "ok")]
    assert store.record.transfer_target == STAFF
    # A 0 for staff in the main menu, desk open: rung, not failed by the nurse's hours.
    _, actions = script_call(engine, "main_menu", ["0"])
    assert transfers(actions) == [STAFF]


BACK_TO_THE_NURSE = """\
id: t
language: en
human: staff
start: q
nodes:
  q:
    ask:
      prompt: "Press 1 for the nurse."
      choices:
        - {key: "1", phrases: [nurse], label: the nurse, goto: nurse%s}
  nurse:
    transfer: nurse%s
    on_fail: again
    outcome: transfer_nurse
  again:
    goto: nurse
"""


@pytest.mark.parametrize("prompt", ["", '\n    prompt: "Putting you through to the nurse."'])
@pytest.mark.parametrize("urgent", [False, True])
def test_an_on_fail_back_to_the_nurse_out_of_her_hours_does_not_go_round(
    tmp_path: Path, prompt: str, urgent: bool
) -> None:
    # flow check accepts it (a transfer waits), and a ring-out made each lap take minutes;
    # unrung, a lap is instant: with no prompt the engine recursed until Python gave up (the
    # call cut without a word), with one the caller heard it for the whole call. Failed
    # unrung once already, the nurse's transfer takes the safety rules, not the on_fail.
    effect = ", urgency: U2, reason: asked" if urgent else ""
    (tmp_path / "t.yaml").write_text(BACK_TO_THE_NURSE % (effect, prompt), encoding="utf-8")
    engine = Engine(load_flows(tmp_path), FlowParams(nurse_open=lambda: False))
    _, actions = script_call(engine, "t", ["1", ""])
    store = next(a for a in actions if isinstance(a, Store))
    assert steps(store, "transfer")[:2] == [("nurse", NURSE_CLOSED), ("nurse", NURSE_CLOSED)]
    said = plays(actions)
    if urgent:
        # The other human (the desk), after "I could not connect you yet ... call 1 1 2".
        assert TEXTS["transfer_retry"] in said
        assert transfers(actions) == [STAFF]
        assert store.record.outcome == "transfer_staff"
    else:
        assert TEXTS["message_offer"] in said
        assert transfers(actions) == []
        assert store.record.outcome == "message_left"
    assert said.count("Putting you through to the nurse.") <= 2


def test_simulate_rings_a_line_the_desk_shares_with_the_nurse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CLINIC_NURSE_URI", STAFF)
    out = _simulate(["triage", "--flows-dir", str(SHIPPED), "--nurse-closed"], U1_CALLER)
    text = "\n".join(out)
    assert f"   transfer to {STAFF}" in text, text
    assert "not staffed" not in text, text
