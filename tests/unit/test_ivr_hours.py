"""Opening hours in the flows: the ``hours`` branch, what ``0`` means while the desk is closed,
the shipped flows open and closed, ``flow check`` over both cases, and ``flow simulate``."""

from __future__ import annotations

import datetime
import logging
import zoneinfo
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from clinic_voice.app import Runtime
from clinic_voice.clinic_line import ClinicLine, check_clinic_line
from sip_config import settings as settings_module
from sip_config.clock import SystemClock
from sip_config.settings import Settings
from voice.ivr.check import check_files
from voice.ivr.engine import (
    MAX_CLOSED_ASKS,
    Action,
    CallState,
    Digit,
    Engine,
    HangUp,
    Listen,
    NoInput,
    Pending,
    Phase,
    Play,
    PostWebhook,
    PromptDone,
    PromptFailed,
    RecordDone,
    Store,
    TransferCall,
    TransferResult,
    WebhookResult,
)
from voice.ivr.flow import (
    ENGINE_OUTCOME_PREFIXES,
    ENGINE_OUTCOMES,
    SYSTEM_TEXTS,
    FlowError,
    FlowParams,
    Say,
    load_flows,
    render,
)
from voice.ivr.opening_hours import OpeningHours, always_open, parse_week
from voice.ivr.simulate import main as simulate
from voice.ivr.simulate import script_call
from voice.ivr.triage import Urgency

SHIPPED = Path(__file__).resolve().parents[2] / "ivr_flows"
STAFF = FlowParams().staff_uri
NURSE = FlowParams().nurse_uri
HOURS = OpeningHours(
    parse_week("mon-fri 08:00-17:00; sat 09:00-12:00"), zoneinfo.ZoneInfo("Europe/Amsterdam")
)
NOTICE = (
    "The practice is closed. Our opening hours are Monday to Friday, 8 a.m. to 5 p.m.; "
    "Saturday, 9 a.m. to noon. If it cannot wait until then, call the out-of-hours GP service "
    "on 0 8 8, 1 2 3, 4 5, 6 7. In an emergency, call 1 1 2."
)


def params(is_open: bool, **kw: object) -> FlowParams:
    return FlowParams(
        open_now=lambda: is_open,
        opening_hours=HOURS,
        out_of_hours_number="088 123 45 67",
        **kw,  # type: ignore[arg-type]
    )


FLOW = """\
id: t
language: en
human: staff
start: hours
nodes:
  hours:
    branch:
      on: hours
      cases: {open: menu, closed: shut}
  shut:
    say: "Closed."
    next: menu
  menu:
    ask:
      prompt: "Pick one."
      choices:
        - {key: "1", phrases: [desk], label: the desk, goto: desk}
        - {key: "2", phrases: [triage], label: triage, goto: same_day}
        - {key: "3", phrases: [bye], label: goodbye, goto: bye}
  desk:
    transfer: staff
    prompt: "Putting you through."
  same_day:
    urgency: U3
    reason: test
    next: same_day_staff
  same_day_staff:
    transfer: staff
    outcome: same_day
  bye:
    hangup: "Goodbye."
    outcome: done
"""


@pytest.fixture
def flows(tmp_path: Path) -> Path:
    (tmp_path / "t.yaml").write_text(FLOW, encoding="utf-8")
    return tmp_path


def run(engine: Engine, flow: str, answers: list[str]) -> tuple[list[Action], Store]:
    _, actions = script_call(engine, flow, answers)
    stores = [a for a in actions if isinstance(a, Store)]
    assert stores, "the call did not end"
    return actions, stores[-1]


def plays(actions: list[Action]) -> list[str]:
    return [a.text for a in actions if isinstance(a, Play)]


def transfers(actions: list[Action]) -> list[str]:
    return [a.uri for a in actions if isinstance(a, TransferCall)]


# -- the engine -------------------------------------------------------------------------------


@pytest.mark.parametrize(("is_open", "said"), [(True, "Pick one."), (False, "Closed.")])
def test_a_branch_on_hours_reads_the_injected_open_now(
    flows: Path, is_open: bool, said: str
) -> None:
    engine = Engine(load_flows(flows), params(is_open))
    state, actions = engine.start(engine.flowset.get("t"))
    assert plays(actions)[0].startswith(said)
    assert state.path[0].input == "branch"
    assert state.path[0].value == ("menu" if is_open else "shut")


def test_a_0_while_closed_tells_the_notice_and_asks_again(flows: Path) -> None:
    engine = Engine(load_flows(flows), params(False))
    state, _ = engine.start(engine.flowset.get("t"))
    state, _ = engine.handle(state, PromptDone())  # "Closed."
    state, _ = engine.handle(state, PromptDone())  # the question
    state, actions = engine.handle(state, Digit("0"))
    assert not transfers(actions)
    assert plays(actions) == [
        f"{NOTICE} Pick one. For the desk, press 1. For triage, press 2. For goodbye, press 3."
    ]
    assert (state.phase, state.pending, state.node) == (Phase.PLAYING, Pending.LISTEN, "menu")
    assert [s.input for s in state.path[-2:]] == ["digit", "closed"]
    # ... and the menu still works.
    state, actions = engine.handle(state, PromptDone())
    assert any(isinstance(a, Listen) for a in actions)
    state, actions = engine.handle(state, Digit("3"))
    assert plays(actions) == ["Goodbye."]


def test_0s_while_closed_end_the_call_after_the_cap(flows: Path) -> None:
    # A caller pressing 0 again and again, or a key stuck on 0: the notice and the question
    # MAX_CLOSED_ASKS times, then the notice and goodbye; the path stops growing.
    engine = Engine(load_flows(flows), params(False))
    state, _ = engine.start(engine.flowset.get("t"))
    state, _ = engine.handle(state, PromptDone())  # "Closed."
    for _ in range(MAX_CLOSED_ASKS):
        state, _ = engine.handle(state, PromptDone())  # the question
        state, actions = engine.handle(state, Digit("0"))
        assert plays(actions)[0].startswith(f"{NOTICE} Pick one.")
        assert (state.phase, state.pending) == (Phase.PLAYING, Pending.LISTEN)
    state, _ = engine.handle(state, PromptDone())
    state, actions = engine.handle(state, Digit("0"))
    assert plays(actions) == [NOTICE]
    assert not transfers(actions)
    assert (state.pending, state.path[-1].input, state.path[-1].value) == (
        Pending.HANGUP,
        "closed",
        "limit",
    )
    state, actions = engine.handle(state, Digit("0"))  # the notice is not cut short
    assert actions == []
    state, actions = engine.handle(state, PromptDone())
    store = next(a for a in actions if isinstance(a, Store))
    assert store.record.outcome == "out_of_hours"
    assert len(store.record.path) == 3 + 2 * (MAX_CLOSED_ASKS + 1)  # branch, say, ask


def test_the_closed_cap_never_holds_an_urgent_caller_back(tmp_path: Path) -> None:
    # The cap counts the call's 0s at the closed desk, but a caller the triage made U2 is put
    # through whatever was pressed before.
    (tmp_path / "u.yaml").write_text(
        FLOW.replace("id: t", "id: u")
        .replace("urgency: U3", "urgency: U2")
        .replace("next: same_day_staff", "next: more")
        + '  more:\n    ask:\n      prompt: "Anything else?"\n      choices:\n'
        + '        - {key: "1", phrases: [no], label: no, goto: bye}\n',
        encoding="utf-8",
    )
    engine = Engine(load_flows(tmp_path), params(False))
    actions, store = run(engine, "u", ["0"] * (MAX_CLOSED_ASKS + 2))
    assert store.record.outcome == "out_of_hours"  # below U2: the cap holds
    actions, store = run(engine, "u", ["0"] * MAX_CLOSED_ASKS + ["2", "0"])
    assert transfers(actions) == [STAFF]
    assert store.record.urgency is Urgency.U2


def test_a_0_while_open_reaches_the_desk(flows: Path) -> None:
    actions, store = run(Engine(load_flows(flows), params(True)), "t", ["0"])
    assert transfers(actions) == [STAFF]
    assert store.record.outcome == "transfer_staff"


def test_the_desk_closing_during_a_call_is_met_at_the_0(flows: Path) -> None:
    is_open = [True]
    engine = Engine(load_flows(flows), FlowParams(open_now=lambda: is_open[0]))
    state, _ = engine.start(engine.flowset.get("t"))
    state, _ = engine.handle(state, PromptDone())
    is_open[0] = False  # 17:00 strikes while the caller listens
    state, actions = engine.handle(state, Digit("0"))
    assert not transfers(actions)
    assert plays(actions)[0].startswith("The practice is closed. In an emergency, call 1 1 2.")


OFFER = render(SYSTEM_TEXTS["en"]["message_offer"], {"emergency_number": "1 1 2"})


def test_a_question_given_up_while_closed_hears_the_notice_and_a_message_offer(
    flows: Path,
) -> None:
    # Three silences out of hours were the notice and a hang-up; open, staff would have
    # taken the call (and a message, had they not answered). Now the notice, then the same
    # message offer: a message kept is a call back, none is out_of_hours as before.
    engine = Engine(load_flows(flows), params(False))
    silences = [":silence", ":silence", ":silence"]
    actions, store = run(engine, "t", silences)
    assert not transfers(actions)
    assert f"{NOTICE} {OFFER}" in plays(actions)
    assert store.record.outcome == "message_left"
    assert "closed" in [s.input for s in store.record.path]
    _, actions = script_call(engine, "t", silences, recordings=[":silence"])
    store = next(a for a in actions if isinstance(a, Store))
    assert plays(actions)[-1].startswith("Sorry, I did not hear a message.")
    assert store.record.outcome == "out_of_hours"


def test_the_closed_main_menu_offers_a_message_after_three_silences() -> None:
    # The walk-through: a caller who says nothing to the closed menu three times was hung
    # up on after the notice. Now the offer follows it, and the offer is a static prompt.
    engine = Engine(load_flows(SHIPPED), params(False))
    actions, store = run(engine, "main_menu", [":silence", ":silence", ":silence"])
    assert plays(actions)[-2] == f"{NOTICE} {OFFER}"
    assert store.record.outcome == "message_left"
    flow = load_flows(SHIPPED).get("main_menu")
    assert plays(actions)[-2] in flow.static_prompts(params(False))


def _closed_offer(engine: Engine) -> tuple[CallState, list[str]]:
    """The test flow out of hours, its menu given up by three silences: the notice and the
    message offer under way."""
    state, actions = engine.start(engine.flowset.get("t"))
    for _ in range(20):
        if state.pending is Pending.MESSAGE:
            return state, plays(actions)
        event = NoInput() if state.phase is Phase.LISTENING else PromptDone()
        state, actions = engine.handle(state, event)
    raise AssertionError(f"no message offer: {state}")


def test_a_closed_notice_with_the_message_offer_unheard_is_said_once_more(flows: Path) -> None:
    # The closed notice (the out-of-hours GP's number, 112) with the message offer after it.
    # Alone before the goodbye it is said again should it fail, and unheard twice the call is
    # out_of_hours_unheard: someone calls back. Carrying the offer, it was skipped at once to
    # the beep, and the record still said out_of_hours: "the caller was told the numbers".
    engine = Engine(load_flows(flows), params(False))
    state, said = _closed_offer(engine)
    assert said == [f"{NOTICE} {OFFER}"]
    state, actions = engine.handle(state, PromptFailed())
    assert plays(actions) == said, actions  # once more, not the beep
    heard, actions = engine.handle(state, PromptDone())
    assert heard.phase is Phase.RECORDING
    heard, actions = engine.handle(heard, RecordDone(ref="", duration_s=0, silent=True))
    heard, actions = engine.handle(heard, PromptDone())
    (store,) = [a for a in actions if isinstance(a, Store)]
    assert store.record.outcome == "out_of_hours"  # heard the second time: told
    state, actions = engine.handle(state, PromptFailed())
    assert state.phase is Phase.RECORDING  # the message may still be left
    state, actions = engine.handle(state, RecordDone(ref="", duration_s=0, silent=True))
    state, actions = engine.handle(state, PromptDone())
    (store,) = [a for a in actions if isinstance(a, Store)]
    assert store.record.outcome == "out_of_hours_unheard"


def test_a_staff_transfer_step_while_closed_is_the_notice(flows: Path) -> None:
    actions, store = run(Engine(load_flows(flows), params(False)), "t", ["1"])
    assert not transfers(actions)
    assert "Putting you through." not in plays(actions)
    assert plays(actions)[-1] == NOTICE
    assert store.record.outcome == "out_of_hours"
    # A triage verdict stays the call's outcome.
    actions, store = run(Engine(load_flows(flows), params(False)), "t", ["2"])
    assert not transfers(actions)
    assert (store.record.outcome, store.record.urgency) == ("same_day", Urgency.U3)


def test_a_0_with_no_question_left_while_closed_hears_the_notice_then_goodbye(
    flows: Path,
) -> None:
    (flows / "t.yaml").write_text(
        FLOW.replace("goto: bye}", "goto: bye_say}")
        + '  bye_say:\n    say: "One moment."\n    next: bye\n',
        encoding="utf-8",
    )
    engine = Engine(load_flows(flows), params(False))
    state, _ = engine.start(engine.flowset.get("t"))
    for event in (PromptDone(), PromptDone(), Digit("3")):
        state, actions = engine.handle(state, event)
    assert plays(actions) == ["One moment."]
    state, actions = engine.handle(state, Digit("0"))  # typed while it plays: no question left
    assert not transfers(actions)
    assert plays(actions) == [f"{NOTICE} Goodbye."]
    state, actions = engine.handle(state, PromptDone())
    store = next(a for a in actions if isinstance(a, Store))
    assert store.record.outcome == "done"


def test_the_nurse_has_no_hours(tmp_path: Path) -> None:
    # The triage's human: 0 still reaches the nurse while the desk is closed.
    engine = Engine(load_flows(SHIPPED), params(False))
    actions, store = run(engine, "triage", ["0"])
    assert transfers(actions) == [NURSE]
    assert store.record.outcome == "transfer_nurse"


def test_an_urgent_caller_is_put_through_to_staff_while_closed(tmp_path: Path) -> None:
    # The safety rules are not weakened by the hours: U2 or more reaches a human.
    (tmp_path / "u.yaml").write_text(
        FLOW.replace("id: t", "id: u")
        .replace("urgency: U3", "urgency: U2")
        .replace("outcome: same_day", "outcome: transfer_staff"),
        encoding="utf-8",
    )
    engine = Engine(load_flows(tmp_path), params(False))
    actions, _ = run(engine, "u", ["2"])
    assert transfers(actions) == [STAFF]


# -- the shipped flows ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped_closed() -> Engine:
    return Engine(load_flows(SHIPPED), params(False))


def test_the_main_menu_out_of_hours(shipped_closed: Engine) -> None:
    actions, store = run(shipped_closed, "main_menu", ["0", ":hangup"])
    said = plays(actions)
    assert said[0] == f"Welcome to the clinic. {NOTICE}"
    assert "press 0" not in " ".join(said).lower()
    assert said[2].startswith(NOTICE)  # after the 0: the notice and the menu again
    assert not transfers(actions)
    assert store.record.outcome == "caller_hung_up"


def test_the_main_menu_out_of_hours_without_an_out_of_hours_number() -> None:
    engine = Engine(load_flows(SHIPPED), FlowParams(open_now=lambda: False))
    actions, _ = run(engine, "main_menu", [":hangup"])
    assert plays(actions)[0] == (
        "Welcome to the clinic. The practice is closed. In an emergency, call 1 1 2."
    )


def test_the_main_menu_open_is_as_before() -> None:
    engine = Engine(load_flows(SHIPPED), params(True))
    actions, _ = run(engine, "main_menu", ["0"])
    assert plays(actions)[0] == (
        "Welcome to the clinic. If this is an emergency, hang up and call 1 1 2."
    )
    assert transfers(actions) == [STAFF]


@pytest.mark.parametrize(
    ("answers", "webhook_ok"),
    [
        (["1", "1", "01021990#", "1234#"], False),  # appointments, the system down
        (["3", "01021990#", "1234#"], False),  # results, the lookup failed
        (["3", "01021990#", "1234#"], True),  # results, "more?" is not offered
        (["2", "01021990#", "1234#"], True),  # a prescription renewal is a message
    ],
)
def test_the_sub_flows_never_ring_the_closed_desk(
    shipped_closed: Engine, answers: list[str], webhook_ok: bool
) -> None:
    state, actions = script_call(
        shipped_closed, "main_menu", answers, webhook_ok=webhook_ok, webhook_data={"ready": "no"}
    )
    assert state.phase is Phase.ENDED
    assert not transfers(actions)
    assert "member of staff" not in " ".join(plays(actions)).replace("with a member of staff", "")


DANGER_NO = ["1", "2", "2", "2", "2", "2"]  # yourself, five danger signs: no


def test_triage_u2_out_of_hours_hears_the_out_of_hours_service_before_the_nurse(
    shipped_closed: Engine,
) -> None:
    actions, store = run(shipped_closed, "triage", [*DANGER_NO, "4", "1", "5"])
    assert store.record.urgency is Urgency.U2
    i = next(i for i, a in enumerate(actions) if isinstance(a, TransferCall))
    assert transfers(actions) == [NURSE]
    before = plays(actions[:i])[-1]
    assert "call the out-of-hours GP service on 0 8 8, 1 2 3, 4 5, 6 7 now" in before
    assert "call 1 1 2" in before
    assert store.record.outcome == "transfer_nurse"


def test_triage_u3_out_of_hours_is_sent_to_the_out_of_hours_service(
    shipped_closed: Engine,
) -> None:
    actions, store = run(shipped_closed, "triage", [*DANGER_NO, "5", "2", "2", "1", "5"])
    assert (store.record.urgency, store.record.outcome) == (Urgency.U3, "same_day")
    assert not transfers(actions)
    assert not any(isinstance(a, PostWebhook) for a in actions)  # nobody acts on it today
    assert "call the out-of-hours GP service on 0 8 8, 1 2 3, 4 5, 6 7 now" in plays(actions)[-1]


def test_triage_u4_out_of_hours(shipped_closed: Engine) -> None:
    actions, store = run(shipped_closed, "triage", [*DANGER_NO, "4", "2", "2", "1", "2", "5"])
    assert (store.record.urgency, store.record.outcome) == (Urgency.U4, "within_24h")
    assert (
        "If it cannot wait until then, or it gets worse, call the out-of-hours"
        in (plays(actions)[-1])
    )


def test_triage_u1_out_of_hours_is_unchanged(shipped_closed: Engine) -> None:
    actions, store = run(shipped_closed, "triage", ["1", "1"])
    assert store.record.outcome == "call_emergency+transfer_nurse"
    assert transfers(actions) == [NURSE]
    assert plays(actions)[-2].startswith("This may be an emergency. Hang up and call 1 1 2 now.")


def test_the_closed_notice_is_a_static_prompt() -> None:
    flows = load_flows(SHIPPED)
    prompts = flows.get("main_menu").static_prompts(params(False))
    assert f"Welcome to the clinic. {NOTICE}" in prompts
    assert NOTICE in prompts


# -- the schema and flow check ------------------------------------------------------------------


def test_a_branch_on_hours_takes_only_open_and_closed(flows: Path) -> None:
    (flows / "t.yaml").write_text(FLOW.replace("closed: shut", "shut: shut"), encoding="utf-8")
    with pytest.raises(FlowError, match="the cases open and closed, not 'shut'"):
        load_flows(flows)


def test_check_needs_both_cases(flows: Path) -> None:
    (flows / "t.yaml").write_text(FLOW.replace(", closed: shut}", "}"), encoding="utf-8")
    messages = [f.message for f in check_files([flows])]
    assert "dead end: branch 'hours' has no case for closed and no default" in messages
    assert "unreachable node 'shut'" in messages


def test_check_explores_both_cases(flows: Path) -> None:
    # The closed path rings the desk: found. The open path is clean (the same node, open).
    messages = [f.message for f in check_files([flows])]
    assert "'desk' transfers to staff on a path taken while the practice is closed" in " ".join(
        messages
    )
    # An open-only path with a problem is found too: each case is walked.
    broken = FLOW.replace("cases: {open: menu, closed: shut}", "cases: {open: bad, closed: shut}")
    broken += "  bad:\n    urgency: U2\n    reason: x\n    next: bye\n"
    (flows / "t.yaml").write_text(broken, encoding="utf-8")
    messages = [f.message for f in check_files([flows])]
    assert any(m.startswith("call can end without a human at U2") for m in messages)


SUB = """\
id: sub
language: en
human: staff
start: more
nodes:
  more:
    ask:
      prompt: "Anything else?"
      choices:
        - {key: "1", phrases: ["yes"], label: "yes", goto: desk}
        - {key: "2", phrases: ["no"], label: "no", goto: bye}
  desk:
    transfer: staff
    prompt: "Putting you through."
  bye:
    hangup: "Goodbye."
    outcome: done
"""


def test_check_carries_closed_into_a_sub_flow(flows: Path) -> None:
    # The closed path leaves for @sub, which rings the desk: the engine would play the notice
    # instead. sub.yaml checked on its own starts open and is clean; t.yaml's check, which
    # reached it while closed, names the path and the chain of flows.
    (flows / "t.yaml").write_text(
        FLOW.replace("next: menu\n", "next: sub_menu\n", 1) + "  sub_menu:\n"
        "    ask:\n"
        '      prompt: "Closed. Press 1 for more."\n'
        "      choices:\n"
        '        - {key: "1", phrases: [more], label: more, goto: "@sub"}\n',
        encoding="utf-8",
    )
    (flows / "sub.yaml").write_text(SUB, encoding="utf-8")
    findings = check_files([flows])
    assert [f for f in findings if f.file.endswith("sub.yaml")] == []
    closed = [f for f in findings if "closed" in f.message]
    assert [(Path(f.file).name, f.line, f.message) for f in closed] == [
        (
            "t.yaml",
            FLOW.count("\n") + 2,  # sub_menu's ask: where the closed path leaves t
            "'desk' in flow 'sub' transfers to staff on a path taken while the practice is "
            "closed (flows: t > sub; path: hours > shut > sub_menu > @sub:more > desk)",
        )
    ]
    # Reached only while open, or urgent (U2: put through open or closed), it is no finding.
    open_only = FLOW.replace("closed: shut", "closed: bye").replace("goto: bye}", 'goto: "@sub"}')
    (flows / "t.yaml").write_text(open_only, encoding="utf-8")
    assert [f for f in check_files([flows]) if "closed" in f.message] == []
    urgent = FLOW.replace("goto: bye}", "goto: urgent}") + (
        '  urgent:\n    urgency: U2\n    reason: x\n    next: "@sub:desk"\n'
    )
    (flows / "t.yaml").write_text(urgent, encoding="utf-8")
    assert [f for f in check_files([flows]) if "in flow 'sub'" in f.message] == []


def test_a_flow_that_only_passes_a_call_on_is_not_blamed_for_its_closed_path(
    flows: Path,
) -> None:
    # front goes on to t as a call starts there: t's own check finds t's closed path into
    # @sub. front did not make the path closed, so the finding is t's alone, not front's too.
    (flows / "t.yaml").write_text(
        FLOW.replace("next: menu\n", "next: sub_menu\n", 1) + "  sub_menu:\n"
        "    ask:\n"
        '      prompt: "Closed. Press 1 for more."\n'
        "      choices:\n"
        '        - {key: "1", phrases: [more], label: more, goto: "@sub"}\n',
        encoding="utf-8",
    )
    (flows / "sub.yaml").write_text(SUB, encoding="utf-8")
    (flows / "front.yaml").write_text(
        'id: front\nlanguage: en\nhuman: staff\nstart: go\nnodes:\n  go: {goto: "@t"}\n',
        encoding="utf-8",
    )
    closed = [f for f in check_files([flows]) if "closed" in f.message]
    assert [(Path(f.file).name, f.line) for f in closed] == [("t.yaml", FLOW.count("\n") + 2)]


def test_the_shipped_flows_check_clean() -> None:
    assert check_files([SHIPPED]) == []


# -- flow simulate ------------------------------------------------------------------------------


def simulate_lines(argv: list[str], lines: list[str]) -> tuple[int, list[str]]:
    feed: Iterator[str] = iter(lines)
    out: list[str] = []

    def read(prompt: str) -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    return simulate(argv, input_fn=read, output_fn=out.append), out


@pytest.mark.parametrize(
    ("option", "closed"),
    [
        (["--closed"], True),
        (["--open"], False),
        (["--at", "2026-12-06T03:00"], True),  # a Sunday night
        (["--at", "2026-12-07T10:00"], False),  # a Monday morning
        (["--at", "2026-12-07T07:30:00+00:00"], False),  # 08:30 in Amsterdam
        (["--at", "2026-12-07T06:30:00+00:00"], True),  # 07:30 in Amsterdam
    ],
)
def test_simulate_open_or_closed(
    monkeypatch: pytest.MonkeyPatch, option: list[str], closed: bool
) -> None:
    monkeypatch.setenv("CLINIC_OPENING_HOURS", "mon-fri 08:00-17:00; sat 09:00-12:00")
    monkeypatch.setenv("CLINIC_TIMEZONE", "Europe/Amsterdam")
    monkeypatch.setenv("CLINIC_OUT_OF_HOURS_NUMBER", "088 123 45 67")
    code, out = simulate_lines(["6000", "--flows-dir", str(SHIPPED), *option], ["0"])
    assert code == 0
    text = "\n".join(out)
    assert ("-- the practice is closed (opening hours)" in out) is closed
    assert (f"BOT: Welcome to the clinic. {NOTICE}" in out) is closed
    assert ("transfer to sip:6200@127.0.0.1:5160" in text) is not closed


@pytest.mark.parametrize(("at", "taken"), [("2020-06-01T10:00", False), ("2026-06-01T10:00", True)])
def test_simulate_at_checks_dates_of_birth_against_that_day(
    monkeypatch: pytest.MonkeyPatch, at: str, taken: bool
) -> None:
    # --at moved the opening hours only: a date of birth after the --at day (1 Feb 2021 on
    # 1 June 2020) was taken, where a call on that day would have refused it as future.
    monkeypatch.setenv("CLINIC_OPENING_HOURS", "mon-sun 00:00-24:00")
    argv = [str(SHIPPED / "prescription.yaml"), "--at", at]
    code, out = simulate_lines(argv, ["01022021#", ":hangup"])
    assert code == 0
    assert ("   values: {'dob': '01022021'}" in out) is taken, out
    refused = "BOT: Sorry, that is not a valid date of birth."
    assert any(line.startswith(refused) for line in out) is not taken


def test_simulate_refuses_a_bad_time(capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = simulate_lines(["6000", "--flows-dir", str(SHIPPED), "--at", "sunday"], [])
    assert code == 2
    assert "'sunday' is not a time YYYY-MM-DDTHH:MM" in capsys.readouterr().err


def test_simulate_names_a_bad_hours_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CLINIC_OPENING_HOURS", "weekdays 08:00-17:00")
    code, _ = simulate_lines(["6000", "--flows-dir", str(SHIPPED)], [])
    assert code == 2
    assert "CLINIC_OPENING_HOURS='weekdays 08:00-17:00'" in capsys.readouterr().err


def test_listen_after_the_closed_reprompt_takes_keys(shipped_closed: Engine) -> None:
    state, _ = shipped_closed.start(shipped_closed.flowset.get("main_menu"))
    for event in (PromptDone(), PromptDone(), Digit("0"), PromptDone()):
        state, actions = shipped_closed.handle(state, event)
    listen = [a for a in actions if isinstance(a, Listen)]
    assert listen and "0" in listen[0].keys
    state, actions = shipped_closed.handle(state, NoInput())
    assert state.phase is Phase.PLAYING


def test_a_notice_with_closed_dates_only_names_no_then() -> None:
    # Only CLINIC_CLOSED_DATES set: no weekly hours are told, so "until then" would point at
    # nothing; the sentence says "until the practice opens again" instead.
    hours = always_open(zoneinfo.ZoneInfo("Europe/Amsterdam"), frozenset())
    with_dates = FlowParams(opening_hours=hours, out_of_hours_number="088 123")
    notice = with_dates.values("en")["closed_notice"]
    assert "until then" not in notice
    assert "If it cannot wait until the practice opens again, call the out-of-hours GP " in notice
    week = OpeningHours(parse_week("mon-fri 08:00-17:00"), zoneinfo.ZoneInfo("UTC"))
    told = FlowParams(opening_hours=week, out_of_hours_number="088 123").values("en")
    assert "If it cannot wait until then, call" in told["closed_notice"]
    assert "다시 진료를 시작할" in with_dates.values("ko")["closed_notice"]


@pytest.mark.parametrize("zone", ["unreadable", "Europe/Amsterdam"])
def test_hours_read_in_utc_for_want_of_a_host_zone_are_warned_at_start(
    zone: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # No CLINIC_TIMEZONE and no zone of the host to read (a POSIX TZ string, no
    # /etc/localtime): host_zone's last resort is UTC, and the clinic must hear of it, since
    # its hours would be an hour or two off.
    found = datetime.UTC if zone == "unreadable" else zoneinfo.ZoneInfo(zone)
    monkeypatch.setattr(settings_module, "host_zone", lambda: found)
    env = {
        "CLINIC_DATA_DIR": str(tmp_path),
        "CLINIC_FLOWS_DIR": str(SHIPPED),
        "CLINIC_OPENING_HOURS": "mon-fri 08:00-17:00",
        "CLINIC_OUT_OF_HOURS_NUMBER": "088 123",
        "CLINIC_SCHEDULING_WEBHOOK": "https://scheduling.example/hook",
        "CLINIC_SCHEDULING_WEBHOOK_SECRET": "s" * 40,
    }
    caplog.set_level(logging.WARNING, logger="clinic_voice.clinic_line")
    settings = Settings.from_env(env)
    rt = cast(Runtime, SimpleNamespace(http_client=None, clock=SystemClock()))
    ClinicLine.load(settings, rt, check_clinic_line(settings))
    warned = [r.getMessage() for r in caplog.records if "read in UTC" in r.getMessage()]
    assert len(warned) == (1 if zone == "unreadable" else 0)


def test_hours_that_end_in_p_m_have_one_full_stop_in_the_notice() -> None:
    # "Monday to Friday, 8 a.m. to 5 p.m." then the template's "." read "5 p.m.." on the
    # screen of flow simulate and in the transfer summary.
    weekdays = OpeningHours(
        parse_week("mon-fri 08:00-17:00"), zoneinfo.ZoneInfo("Europe/Amsterdam")
    )
    notice = FlowParams(open_now=lambda: False, opening_hours=weekdays).values("en")[
        "closed_notice"
    ]
    assert "Our opening hours are Monday to Friday, 8 a.m. to 5 p.m. In an emergency" in notice
    assert ".." not in notice
    assert NOTICE in params(False).values("en")["closed_notice"], "no stop there: kept"


# -- a question's closed-hours counterpart (on_closed) ------------------------------------------


def test_a_0_at_the_open_menu_after_closing_hears_the_closed_menu() -> None:
    # Greeted with the open menu ("press 0 ... staff") before 17:00, the caller presses 0
    # after it: the closed notice, then the closed-hours menu, which offers no desk.
    is_open = [True]
    engine = Engine(
        load_flows(SHIPPED),
        FlowParams(
            open_now=lambda: is_open[0], opening_hours=HOURS, out_of_hours_number="088 123 45 67"
        ),
    )
    state, _ = engine.start(engine.flowset.get("main_menu"))
    state, actions = engine.handle(state, PromptDone())  # the welcome
    assert "press 0" in plays(actions)[0].lower()  # the open menu
    state, _ = engine.handle(state, PromptDone())
    is_open[0] = False  # 17:00 strikes while the caller listens
    state, actions = engine.handle(state, Digit("0"))
    assert not transfers(actions)
    said = plays(actions)
    assert len(said) == 1
    assert said[0].startswith(f"{NOTICE} You can still leave a request.")
    assert "press 0" not in said[0].lower()
    assert (state.node, state.pending) == ("menu_closed", Pending.LISTEN)
    steps = [(s.node, s.input) for s in state.path[-3:]]
    assert steps == [("menu", "digit"), ("menu", "closed"), ("menu_closed", "")]
    # The closed menu works, and its noinput reprompt offers no desk either.
    state, _ = engine.handle(state, PromptDone())
    state, actions = engine.handle(state, NoInput())
    assert "press 0" not in " ".join(plays(actions)).lower()
    state, _ = engine.handle(state, PromptDone())
    state, actions = engine.handle(state, Digit("0"))  # a 0 there: the notice, asked again
    assert plays(actions)[0].startswith(f"{NOTICE} You can still leave a request.")
    assert state.node == "menu_closed"


def test_on_closed_counts_toward_the_closed_cap(flows: Path) -> None:
    (flows / "t.yaml").write_text(
        FLOW.replace(
            '      prompt: "Pick one."', '      prompt: "Pick one."\n      on_closed: late'
        )
        + '  late:\n    ask:\n      prompt: "Late one."\n      choices:\n'
        + '        - {key: "3", phrases: [bye], label: goodbye, goto: bye}\n',
        encoding="utf-8",
    )
    engine = Engine(load_flows(flows), params(False))
    actions, store = run(engine, "t", ["0"] * (MAX_CLOSED_ASKS + 1))
    said = plays(actions)
    assert said[2].startswith(f"{NOTICE} Late one.")  # the first 0, at "Pick one."
    assert said[3].startswith(f"{NOTICE} Late one.")  # asked again at "Late one."
    assert said[-1] == NOTICE
    assert store.record.outcome == "out_of_hours"
    assert not [f for f in check_files([flows]) if "on_closed" in f.message]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("on_closed: nowhere", "unknown target 'nowhere'"),
        ("on_closed: bye", "'on_closed' of 'menu' must name a question in its flow, not 'bye'"),
        ("on_closed: '@sub'", "'on_closed' of 'menu' must name a question in its flow"),
        ("on_closed: menu", "'on_closed' of 'menu' must name a question in its flow"),
    ],
)
def test_check_refuses_an_on_closed_that_is_no_other_question(
    flows: Path, extra: str, message: str
) -> None:
    (flows / "t.yaml").write_text(
        FLOW.replace('      prompt: "Pick one."', f'      prompt: "Pick one."\n      {extra}'),
        encoding="utf-8",
    )
    (flows / "sub.yaml").write_text(SUB, encoding="utf-8")
    messages = [f.message for f in check_files([flows])]
    assert any(m.startswith(message) for m in messages), messages


def test_check_refuses_on_closed_where_the_human_is_the_nurse(flows: Path) -> None:
    (flows / "t.yaml").write_text(
        FLOW.replace("human: staff", "human: nurse").replace(
            '      prompt: "Pick one."', '      prompt: "Pick one."\n      on_closed: late'
        )
        + '  late:\n    ask:\n      prompt: "Late one."\n      choices:\n'
        + '        - {key: "3", phrases: [goodbye], label: goodbye, goto: bye}\n',
        encoding="utf-8",
    )
    messages = [f.message for f in check_files([flows])]
    assert (
        "'on_closed' of 'menu' is never taken: the flow's human is nurse, who has no opening "
        "hours" in messages
    )


def test_check_walks_on_closed_as_closed(flows: Path) -> None:
    # The question on_closed names is reached only out of hours: a staff transfer after it
    # is a closed-path finding, though the branch on hours never leads there.
    (flows / "t.yaml").write_text(
        FLOW.replace("cases: {open: menu, closed: shut}", "cases: {open: menu, closed: menu}")
        .replace('      prompt: "Pick one."', '      prompt: "Pick one."\n      on_closed: late')
        .replace('  shut:\n    say: "Closed."\n    next: menu\n', "")
        .replace('        - {key: "1", phrases: [desk], label: the desk, goto: desk}\n', "")
        + '  late:\n    ask:\n      prompt: "Late one."\n      choices:\n'
        + '        - {key: "1", phrases: [desk], label: the desk, goto: desk}\n',
        encoding="utf-8",
    )
    messages = " ".join(f.message for f in check_files([flows]))
    assert "'desk' transfers to staff on a path taken while the practice is closed" in messages


# -- asked again after closing time: a reprompt or a * at a question with on_closed -------------

MENU_CLOSED = (
    "You can still leave a request. How can I help you? At any time, to hear a question "
    "again, press star. For an appointment request, press 1."
)


def overtaken(event: Digit | NoInput) -> tuple[list[Action], CallState]:
    """The open menu heard before 17:00, then ``event`` at it after 17:00."""
    is_open = [True]
    engine = Engine(
        load_flows(SHIPPED),
        FlowParams(
            open_now=lambda: is_open[0], opening_hours=HOURS, out_of_hours_number="088 123 45 67"
        ),
    )
    state, _ = engine.start(engine.flowset.get("main_menu"))
    state, _ = engine.handle(state, PromptDone())  # the welcome
    state, actions = engine.handle(state, PromptDone())  # the open menu, heard: listening
    assert any(isinstance(a, Listen) for a in actions)
    is_open[0] = False  # 17:00 strikes while the caller listens
    state, actions = engine.handle(state, event)
    return actions, state


@pytest.mark.parametrize(
    ("event", "before", "cause"),
    [
        (NoInput(), "Sorry, I did not hear anything. ", [("menu", "noinput")]),
        (Digit("7"), "Sorry, I did not understand. ", [("menu", "nomatch")]),
        (Digit("*"), "", []),
    ],
)
def test_the_open_menu_asked_again_after_closing_is_the_closed_menu(
    event: Digit | NoInput, before: str, cause: list[tuple[str, str]]
) -> None:
    # A caller greeted with the open menu who says nothing after 17:00 (or what it does not
    # take, or presses *) hears the notice and the closed menu, not "press 0 ... staff".
    actions, state = overtaken(event)
    said = plays(actions)
    assert len(said) == 1
    assert said[0].startswith(f"{before}{NOTICE} {MENU_CLOSED}"), said
    assert "press 0" not in said[0].lower()
    assert not transfers(actions)
    assert (state.node, state.pending, state.closed_asks) == ("menu_closed", Pending.LISTEN, 1)
    steps = [(s.node, s.input) for s in state.path[-(len(cause) + 2) :]]
    assert steps == [*cause, ("menu", "closed"), ("menu_closed", "")]


# FLOW with a second question: the menu and it name each other in on_closed.
ON_CLOSED_EACH_OTHER = (
    FLOW.replace('      prompt: "Pick one."', '      prompt: "Pick one."\n      on_closed: late')
    + '  late:\n    ask:\n      prompt: "Late one."\n      on_closed: menu\n      choices:\n'
    + '        - {key: "3", phrases: [bye], label: goodbye, goto: bye}\n'
)


def test_asked_again_counts_toward_the_closed_cap(flows: Path) -> None:
    # Two questions naming each other in on_closed, and a caller who says nothing: each
    # reprompt is the notice and the other question, counted with the closed 0s; past the
    # cap the notice once more and the call ends, never a round in silence for the whole call.
    (flows / "t.yaml").write_text(ON_CLOSED_EACH_OTHER, encoding="utf-8")
    engine = Engine(load_flows(flows), params(False))
    actions, store = run(engine, "t", [":silence"] * (MAX_CLOSED_ASKS + 1))
    said = plays(actions)
    silence = "Sorry, I did not hear anything."
    assert said[2].startswith(f"{silence} {NOTICE} Late one.")
    assert said[3].startswith(f"{silence} {NOTICE} Pick one.")
    assert said[4].startswith(f"{silence} {NOTICE} Late one.")
    assert said[5:] == [f"{silence} {NOTICE}"]
    assert store.record.outcome == "out_of_hours"
    assert [(s.node, s.input) for s in store.record.path][-2:] == [
        ("late", "noinput"),
        ("late", "closed"),
    ]


def test_asked_again_while_open_or_with_no_on_closed_is_the_question_again() -> None:
    # Open, the open menu's reprompt is itself; so is a closed desk's when the question names
    # no on_closed (the closed menu: its reprompt offers no desk anyway).
    engine = Engine(load_flows(SHIPPED), params(True))
    _, actions = script_call(engine, "main_menu", [":silence"])
    assert plays(actions)[-1].startswith("Sorry, I did not hear anything. How can I help you?")
    closed = Engine(load_flows(SHIPPED), params(False))
    state, actions = script_call(closed, "main_menu", [":silence"])
    assert plays(actions)[-1].startswith(f"Sorry, I did not hear anything. {MENU_CLOSED}")
    assert state.closed_asks == 0


def test_the_closed_menu_after_the_open_one_is_a_static_prompt() -> None:
    # Said after a silence at the open menu, the commonest way a call meets closing time:
    # rendered at start-up, not while the caller waits.
    prompts = load_flows(SHIPPED).get("main_menu").static_prompts(params(False))
    closed_menu = next(p for p in prompts if p.startswith(MENU_CLOSED))
    for before in ("", "Sorry, I did not hear anything. ", "Sorry, I did not understand. "):
        assert f"{before}{NOTICE} {closed_menu}" in prompts


def test_the_notice_past_the_closed_cap_is_a_static_prompt(flows: Path) -> None:
    # The last words of a question asked again past the cap ("Sorry, I did not hear
    # anything." and the notice), as every text of asking again after closing time: rendered
    # at start-up, not while the caller waits.
    (flows / "t.yaml").write_text(ON_CLOSED_EACH_OTHER, encoding="utf-8")
    engine = Engine(load_flows(flows), params(False))
    prompts = engine.flowset.get("t").static_prompts(engine.params)
    for answers in ([":silence"] * (MAX_CLOSED_ASKS + 1), ["7"] * (MAX_CLOSED_ASKS + 1)):
        actions, store = run(engine, "t", answers)
        assert store.record.outcome == "out_of_hours"
        said = plays(actions)
        assert said[-1].endswith(NOTICE) and said[-1] != NOTICE, said[-1]
        assert [s for s in said if s not in prompts] == []


# -- closed-desk words: a failed prompt played again, notices, and what the record claims ------


def _overtaken_playing(reprompt: bool) -> tuple[Engine, CallState]:
    """The open menu (or its noinput reprompt) playing before 17:00, and 17:00 striking."""
    is_open = [True]
    engine = Engine(
        load_flows(SHIPPED),
        FlowParams(
            open_now=lambda: is_open[0], opening_hours=HOURS, out_of_hours_number="088 123 45 67"
        ),
    )
    state, _ = engine.start(engine.flowset.get("main_menu"))
    state, actions = engine.handle(state, PromptDone())  # the welcome: the open menu plays
    if reprompt:
        state, _ = engine.handle(state, PromptDone())
        state, actions = engine.handle(state, NoInput())
    assert "press 0" in plays(actions)[0].lower()
    assert (state.node, state.pending) == ("menu", Pending.LISTEN)
    is_open[0] = False
    return engine, state


@pytest.mark.parametrize("reprompt", [False, True], ids=["prompt", "reprompt"])
def test_a_failed_open_menu_played_again_after_closing_is_the_closed_menu(
    reprompt: bool,
) -> None:
    # Its prompt failed (nothing heard), and closing time passed meanwhile: played again, it
    # is the notice and the closed menu, as any other asking again after closing time, not
    # "press 0 ... staff" to a caller who would then hear the closed desk.
    engine, state = _overtaken_playing(reprompt)
    state, actions = engine.handle(state, PromptFailed())
    said = plays(actions)
    assert len(said) == 1 and said[0].startswith(f"{NOTICE} {MENU_CLOSED}"), said
    assert "press 0" not in said[0].lower()
    assert not transfers(actions)
    assert (state.node, state.pending, state.closed_asks) == ("menu_closed", Pending.LISTEN, 1)
    steps = [(s.node, s.input) for s in state.path[-3:]]
    assert steps == [("menu", "prompt_failed"), ("menu", "closed"), ("menu_closed", "")]
    assert said[0] in engine.flowset.get("main_menu").static_prompts(engine.params)
    # That was the question's second try: failed again, it is given up (the closed desk's
    # notice, and the call ends), never a third play in silence.
    state, actions = engine.handle(state, PromptFailed())
    assert plays(actions) == [NOTICE]
    assert state.pending is Pending.HANGUP


def _lookup_failed_with_a_0(engine: Engine, flow: str, entries: list[str]) -> list[Action]:
    """``flow``'s entries typed, a 0 pressed during its lookup, and the lookup failing."""
    state, _ = engine.start(engine.flowset.get(flow))
    for entry in entries:
        state, _ = engine.handle(state, PromptDone())
        for key in entry:
            state, actions = engine.handle(state, Digit(key))
    assert any(isinstance(a, PostWebhook) for a in actions)
    state, _ = engine.handle(state, Digit("0"))
    state, actions = engine.handle(state, WebhookResult(False))
    seen = list(actions)
    while state.phase is not Phase.ENDED:
        state, actions = engine.handle(state, PromptDone())
        seen += actions
    return seen


@pytest.mark.parametrize(
    ("flow", "entries"),
    [("appointments", ["1", "01021990#", "1234#"]), ("results", ["01021990#", "1234#"])],
)
def test_a_0_before_a_closed_goodbye_that_tells_the_notice_hears_it_once(
    flow: str, entries: list[str]
) -> None:
    # The goodbye names {closed_notice} itself: the 0 typed ahead adds nothing to say.
    actions = _lookup_failed_with_a_0(Engine(load_flows(SHIPPED), params(False)), flow, entries)
    last = plays(actions)[-1]
    assert last.count("The practice is closed.") == 1, last
    assert last.endswith("Please call again when we are open. Goodbye."), last
    assert not transfers(actions)
    (store,) = [a for a in actions if isinstance(a, Store)]
    assert store.record.outcome == "out_of_hours"
    assert ("closed_bye", "closed") in [(s.node, s.input) for s in store.record.path]


@pytest.mark.parametrize(
    ("flow", "entries", "node"),
    [
        ("appointments", [], "which"),
        ("appointments", ["1"], "dob"),
        ("appointments", ["1", "01021990#"], "patient_no"),
        ("results", [], "dob"),
        ("prescription", ["01021990#"], "patient_no"),
        ("main_menu", [""], "menu_closed"),
    ],
)
def test_the_notice_and_the_question_after_a_closed_0_are_rendered_at_start(
    flow: str, entries: list[str], node: str
) -> None:
    # A 0 (0 then # in an entry) at a question with no on_closed while the desk is closed:
    # the notice and the question again, one text that depends only on the settings, so
    # rendered at start-up, not while the caller waits (~10 s of speech for espeak-ng).
    engine = Engine(load_flows(SHIPPED), params(False))
    state, _ = engine.start(engine.flowset.get(flow))
    for entry in entries:
        state, _ = engine.handle(state, PromptDone())
        for key in entry:
            state, _ = engine.handle(state, Digit(key))
    assert state.node == node
    state, _ = engine.handle(state, PromptDone())
    zero = "0#" if engine.flowset.get(flow).nodes[node].digits else "0"  # type: ignore[union-attr]
    for key in zero:
        state, actions = engine.handle(state, Digit(key))
    (said,) = plays(actions)
    assert said.startswith(NOTICE) and said != NOTICE, said
    assert state.node == node and state.closed_asks == 1
    assert said in engine.flowset.get(flow).static_prompts(engine.params)


def _results_closed_goodbye(typed_0: bool) -> tuple[Engine, CallState, str]:
    """The shipped results flow, closed: the status told, its closed goodbye playing."""
    engine = Engine(load_flows(SHIPPED), params(False))
    state, _ = engine.start(engine.flowset.get("results"))
    for entry in ("01021990#", "1234#"):
        state, _ = engine.handle(state, PromptDone())
        for key in entry:
            state, _ = engine.handle(state, Digit(key))
    if typed_0:
        state, _ = engine.handle(state, Digit("0"))  # during the lookup: no question left
    state, _ = engine.handle(state, WebhookResult(True, {"ready": "yes"}))
    state, actions = engine.handle(state, PromptDone())  # "Your results are ready ..."
    assert (state.node, state.pending) == ("bye_closed", Pending.HANGUP)
    (said,) = plays(actions)
    return engine, state, said


@pytest.mark.parametrize("typed_0", [False, True], ids=["goodbye", "0 then goodbye"])
def test_a_closed_goodbye_that_claims_a_saying_unheard_twice_does_not_claim_it(
    typed_0: bool,
) -> None:
    # results_status_given says the caller was told the status and, closed, to call again
    # when the practice is open. Its goodbye failed twice (the media path broken, the status
    # just before it with no answer since to show it was heard): the record must not claim
    # it, as out_of_hours becomes out_of_hours_unheard; someone calls back.
    engine, state, said = _results_closed_goodbye(typed_0)
    assert said.startswith(NOTICE) is typed_0
    state, actions = engine.handle(state, PromptFailed())
    assert plays(actions) == [said]  # last words: once more
    state, actions = engine.handle(state, PromptFailed())
    (store,) = [a for a in actions if isinstance(a, Store)]
    assert store.record.outcome == "results_status_unheard"
    # Heard, it is what it was.
    engine, state, said = _results_closed_goodbye(typed_0)
    state, actions = engine.handle(state, PromptFailed())
    state, actions = engine.handle(state, PromptDone())
    (store,) = [a for a in actions if isinstance(a, Store)]
    assert store.record.outcome == "results_status_given"


def _results_status(ready: str, is_open: bool) -> tuple[Engine, CallState, str]:
    """The shipped results flow: the lookup answered, its status line playing."""
    engine = Engine(load_flows(SHIPPED), params(is_open))
    state, _ = engine.start(engine.flowset.get("results"))
    for entry in ("01021990#", "1234#"):
        state, _ = engine.handle(state, PromptDone())
        for key in entry:
            state, _ = engine.handle(state, Digit(key))
    state, actions = engine.handle(state, WebhookResult(True, {"ready": ready}))
    (status,) = plays(actions)
    assert state.node == ("ready" if ready == "yes" else "not_ready"), state.node
    return engine, state, status


@pytest.mark.parametrize("ready", ["yes", "no"])
@pytest.mark.parametrize(
    ("is_open", "answers", "outcome"),
    [
        (False, [], "results_status_unheard"),  # the closed goodbye
        (True, ["2"], "results_status_unheard"),  # "discuss with staff?" no: the open bye
        (True, [":hangup"], "caller_hung_up"),
        (True, ["1"], "transfer_staff"),  # staff can tell the status
    ],
    ids=["closed bye", "open bye", "hung up at the question", "staff"],
)
def test_a_results_status_unheard_twice_is_not_given(
    ready: str, is_open: bool, answers: list[str], outcome: str
) -> None:
    # "Your results are ready in the patient portal" is what results_status_given claims was
    # said. Before, it was skipped at its first failure as any say, and both goodbyes after
    # it recorded results_status_given: the open bye (its "Goodbye." heard, an answer to the
    # question between) and the closed one (its own words heard). Now it is said once more;
    # unheard again, the call goes on and does not claim it.
    engine, state, status = _results_status(ready, is_open)
    state, actions = engine.handle(state, PromptFailed())
    assert plays(actions) == [status], "not said once more"
    state, actions = engine.handle(state, PromptFailed())
    assert status not in plays(actions)  # goes on: the question, or the goodbye
    for answer in answers:
        state, actions = engine.handle(state, PromptDone())
        state, actions = engine.handle(state, HangUp() if answer == ":hangup" else Digit(answer))
    while state.phase is not Phase.ENDED:
        state, actions = engine.handle(
            state, TransferResult(True) if state.phase is Phase.TRANSFERRING else PromptDone()
        )
    (store,) = [a for a in actions if isinstance(a, Store)]
    assert store.record.outcome == outcome
    assert [s.input for s in store.record.path].count("prompt_failed") == 2


@pytest.mark.parametrize("is_open", [False, True], ids=["closed", "open"])
def test_a_results_status_heard_the_second_time_is_given(is_open: bool) -> None:
    engine, state, _ = _results_status("yes", is_open)
    state, _ = engine.handle(state, PromptFailed())
    state, _ = engine.handle(state, PromptDone())  # heard
    if is_open:
        state, _ = engine.handle(state, PromptDone())  # "discuss with staff?"
        state, _ = engine.handle(state, Digit("2"))
    state, actions = engine.handle(state, PromptDone())  # the goodbye
    (store,) = [a for a in actions if isinstance(a, Store)]
    assert store.record.outcome == "results_status_given"


def test_a_caller_who_hangs_up_at_the_goodbye_after_an_unheard_status_was_not_given_it() -> None:
    engine, state, _ = _results_status("yes", False)
    for _ in range(2):
        state, _ = engine.handle(state, PromptFailed())
    assert state.node == "bye_closed" and state.outcome == "results_status_given"
    state, actions = engine.handle(state, HangUp())
    (store,) = [a for a in actions if isinstance(a, Store)]
    assert store.record.outcome == "results_status_unheard"


def test_simulate_unheard_walks_a_status_line_that_failed() -> None:
    # flow simulate --unheard ready: the status line fails each time it plays, as on a
    # call with a broken text to speech; the tester sees it said twice and the outcome.
    out: list[str] = []
    lines = iter(["01021990#", "1234#", "ready=yes", "2"])
    argv = ["results", "--flows-dir", str(SHIPPED), "--open", "--unheard", "ready"]
    assert simulate(argv, input_fn=lambda _: next(lines), output_fn=out.append) == 0
    assert out.count("   (prompt failed: the caller heard none of it)") == 2, out
    assert "   outcome: results_status_unheard" in out, out
    # script_call, the simulator's scripted twin, takes the same switch.
    engine = Engine(load_flows(SHIPPED), params(True))
    _, actions = script_call(
        engine,
        "results",
        ["01021990#", "1234#", "2"],
        webhook_data={"ready": "yes"},
        unheard=frozenset({"ready"}),
    )
    assert [a.record.outcome for a in actions if isinstance(a, Store)] == ["results_status_unheard"]


@pytest.mark.parametrize("name", ["no_such_node", "no_such_flow:ready", "appointments:ready"])
def test_simulate_unheard_names_a_node_of_the_flows(
    capsys: pytest.CaptureFixture[str], name: str
) -> None:
    argv = ["results", "--flows-dir", str(SHIPPED), "--unheard", name]
    assert simulate(argv, input_fn=lambda _: "", output_fn=print) == 2
    assert f"--unheard: no node {name!r}" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "failed"), [("results:bye", 2), ("appointments:bye", 0)])
def test_simulate_unheard_takes_one_flows_node(name: str, failed: int) -> None:
    # bye is in several flows: flow:node fails only that flow's.
    out: list[str] = []
    lines = iter(["01021990#", "1234#", "ready=yes", "2"])
    argv = ["results", "--flows-dir", str(SHIPPED), "--open", "--unheard", name]
    assert simulate(argv, input_fn=lambda _: next(lines), output_fn=out.append) == 0
    assert out.count("   (prompt failed: the caller heard none of it)") == failed, out


@pytest.mark.parametrize(
    ("endings", "before"),
    [
        ([RecordDone(silent=True), RecordDone(silent=True)], "Sorry, I did not hear a message."),
        ([RecordDone()], "Sorry, your message could not be saved."),
    ],
)
def test_a_message_not_kept_while_closed_ends_with_words_rendered_at_start(
    endings: list[RecordDone], before: str
) -> None:
    # The prescription's message, closed: none kept, so staff would take the request, but
    # the desk is closed: what went wrong, then the notice, the call's last words. They
    # depend only on the settings: rendered at start-up, not while the caller waits.
    engine = Engine(load_flows(SHIPPED), params(False))
    state, _ = engine.start(engine.flowset.get("prescription"))
    for entry in ("01021990#", "1234#"):
        state, _ = engine.handle(state, PromptDone())
        for key in entry:
            state, _ = engine.handle(state, Digit(key))
    assert state.node == "message"
    for ending in endings:
        state, _ = engine.handle(state, PromptDone())  # the prompt, then the beep
        state, actions = engine.handle(state, ending)
    (said,) = plays(actions)
    assert said == f"{before} {NOTICE}"
    assert state.pending is Pending.HANGUP and state.outcome == "out_of_hours"
    assert said in engine.flowset.get("prescription").static_prompts(engine.params)


@pytest.mark.parametrize(
    ("bye", "message"),
    [
        (
            "  bye:\n    hangup: true\n    outcome: done\n    outcome_unheard: done_unheard\n",
            "'outcome_unheard' needs a goodbye text",
        ),
        (
            '  bye:\n    hangup: "Goodbye."\n    outcome: done\n    outcome_unheard: self_care\n',
            "'outcome_unheard' cannot go with or be a triage action",
        ),
    ],
)
def test_check_refuses_an_outcome_unheard_with_nothing_to_hear_or_a_verdict(
    flows: Path, bye: str, message: str
) -> None:
    (flows / "t.yaml").write_text(
        FLOW.replace('  bye:\n    hangup: "Goodbye."\n    outcome: done\n', bye), encoding="utf-8"
    )
    assert message in [f.message for f in check_files([flows])]


SHUT_SAY = '  shut:\n    say: "Closed."\n    next: menu\n'


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ("    outcome_unheard: done_unheard\n", "a say's 'outcome_unheard' needs 'backs_outcome'"),
        ("    backs_outcome: done\n", "a say's 'backs_outcome' needs 'outcome_unheard'"),
        (
            "    backs_outcome: done\n    outcome_unheard: done\n",
            "'outcome_unheard' must differ from 'backs_outcome'",
        ),
        (
            "    backs_outcome: done\n    outcome_unheard: self_care\n",
            "a say's 'outcome_unheard' cannot go with or be a triage action",
        ),
        (
            "    backs_outcome: same_day\n    outcome_unheard: same_day_unheard\n",
            "a say's 'outcome_unheard' cannot go with or be a triage action",
        ),
        # A transfer's outcome is the engine's: staff can tell the caller.
        (
            "    backs_outcome: transfer_staff\n    outcome_unheard: staff_unheard\n",
            "a say cannot back 'transfer_staff': an outcome the engine gives a call itself",
        ),
        (
            "    backs_outcome: told\n    outcome_unheard: told_unheard\n",
            "say 'shut' backs_outcome 'told', but no goodbye with that outcome can follow it",
        ),
        # The engine's own endings: a real hang-up would be rewritten.
        (
            "    backs_outcome: caller_hung_up\n    outcome_unheard: told_unheard\n",
            "a say cannot back 'caller_hung_up': an outcome the engine gives a call itself",
        ),
        (
            "    backs_outcome: cut_shutdown\n    outcome_unheard: told_unheard\n",
            "a say cannot back 'cut_shutdown': an outcome the engine gives a call itself",
        ),
    ],
)
def test_check_refuses_a_say_outcome_unheard_that_backs_nothing(
    flows: Path, keys: str, message: str
) -> None:
    (flows / "t.yaml").write_text(FLOW.replace(SHUT_SAY, SHUT_SAY + keys), encoding="utf-8")
    assert message in [f.message for f in check_files([flows])]


def test_check_accepts_a_say_that_backs_a_goodbye_after_it(flows: Path) -> None:
    before = [f.message for f in check_files([flows])]  # the spoken labels' findings
    keys = "    backs_outcome: done\n    outcome_unheard: done_unheard\n"
    (flows / "t.yaml").write_text(FLOW.replace(SHUT_SAY, SHUT_SAY + keys), encoding="utf-8")
    assert [f.message for f in check_files([flows])] == before
    say = load_flows(flows).get("t").nodes["shut"]
    assert isinstance(say, Say)
    assert (say.backs_outcome, say.outcome_unheard) == ("done", "done_unheard")


def test_the_engine_outcomes_a_say_cannot_back_are_the_engines() -> None:
    from voice.ivr import engine as eng

    constants = {v for k, v in vars(eng).items() if k.endswith("_OUTCOME") and isinstance(v, str)}
    assert constants, "no outcome constants found"
    for outcome in constants:
        assert outcome in ENGINE_OUTCOMES or outcome.startswith(ENGINE_OUTCOME_PREFIXES), outcome


def test_check_accepts_a_backed_goodbye_after_a_transfers_on_fail(flows: Path) -> None:
    # Nobody took the call when a transfer's on_fail is taken: the line is still unheard
    # at the goodbye there, which the engine then records as outcome_unheard.
    keys = "    backs_outcome: done\n    outcome_unheard: done_unheard\n"
    flow = FLOW.replace(SHUT_SAY, '  shut:\n    say: "Closed."\n    next: desk\n' + keys)
    (flows / "t.yaml").write_text(flow, encoding="utf-8")
    backs = "say 'shut' backs_outcome 'done', but no goodbye with that outcome can follow it"
    assert backs in [f.message for f in check_files([flows])]  # a human takes the call
    through = '    prompt: "Putting you through."\n'
    flow = flow.replace(through, through + "    on_fail: bye\n")
    (flows / "t.yaml").write_text(flow, encoding="utf-8")
    assert backs not in [f.message for f in check_files([flows])]


def test_the_notice_before_a_goodbye_after_a_closed_0_is_rendered_at_start() -> None:
    # A 0 typed during the lookup, no question left, the desk closed: the notice, then the
    # results' closed goodbye. One text that depends only on the settings (README: static
    # prompts are rendered at start-up), yet it was rendered while the caller waited.
    engine, _, said = _results_closed_goodbye(typed_0=True)
    assert said.startswith(NOTICE) and said != NOTICE, said
    assert said in engine.flowset.get("results").static_prompts(engine.params)
