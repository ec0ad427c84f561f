"""README "The clinic line" says what the code does: its numbers, the requests the shipped
flows post, and the closed desk's outcomes (users and the product owner rely on them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from clinic_voice.clinic_line import FINDINGS_SHOWN, VOICEMAIL_SWEEP_S
from tests.readme_text import folded
from tests.unit.test_ivr_simulate import run as run_simulator
from voice.ivr import engine, erasure, journal, live_record, session, store
from voice.ivr.api import CALL_UNDER_WAY_RETRY_S
from voice.ivr.flow import INTER_DIGIT_S, MAX_AGE_YEARS, FlowParams, Webhook, load_flows
from voice.media.tones import RINGBACK

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "ivr_flows"


def clinic_line_section() -> str:
    """The section, its line breaks and indents folded to single spaces."""
    return folded("The clinic line")


# (what the README says, verbatim but for line breaks; the value in the code; the number it
# states). A changed constant fails here until the README says the new number.
NUMBERS = [
    ("`inter_digit_s` (default 6)", INTER_DIGIT_S, 6),
    ("not more than 130 years ago", MAX_AGE_YEARS, 130),
    ("After 3 returns in one call", engine.MAX_MENU_RETURNS, 3),
    ("asks the question again (no desk is rung), 3 times in a call", engine.MAX_CLOSED_ASKS, 3),
    ("at most 400 steps (`MAX_PATH_STEPS`", engine.MAX_PATH_STEPS, 400),
    ("the first 200 steps stay", engine.PATH_HEAD, 200),
    ("each at most 500 characters", engine.MAX_REPLY_VALUE_CHARS, 500),
    ("With no answer 180 s after the REFER", session.TRANSFER_ANSWER_S, 180),
    ("A REFER not taken on in 60 s has failed", session.TRANSFER_DEADLINE_S, 60),
    ("`cut_too_long` (30 minutes)", session.MAX_CALL_S, 30 * 60),
    ("at most 60 s, `#` ends it", engine.MESSAGE_MAX_S, 60),
    ("12 s after the beep", session.RECORD_NO_SPEECH_S, 12),
    ("a stop waits at most 2 s for Redis", session.STOP_SAVE_S, 2),
    ("is tried again for up to 30 s", store.SAVE_PATIENCE_S, 30),
    ("every 30 s while the call stays in one node", live_record.LIVE_REFRESH_S, 30),
    ("`serve` saves these to Redis at start and every 30 s", journal.REPLAY_EVERY_S, 30),
    ("30 minutes plus 5, was left by a dead `serve`", erasure.LIVE_AT_MOST_S, 35 * 60),
    ("409 `call-in-progress` with `Retry-After: 60`", CALL_UNDER_WAY_RETRY_S, 60),
    ("(swept at start and every hour)", VOICEMAIL_SWEEP_S, 3600),
    ("the last 4096 such messages are remembered", store.UNREADABLE_REMEMBERED, 4096),
    ("the first 20 and a count of the rest", FINDINGS_SHOWN, 20),
    ("425 Hz, 1 s on, 4 s off", (RINGBACK.hz, RINGBACK.on_ms, RINGBACK.off_ms), (425, 1000, 4000)),
]


@pytest.mark.parametrize(("said", "value", "number"), NUMBERS, ids=[n[0] for n in NUMBERS])
def test_the_numbers_the_readme_states_are_the_codes(
    said: str, value: object, number: object
) -> None:
    assert said in clinic_line_section(), f"the README no longer says {said!r}"
    assert value == number, f"the README says {said!r}; the code has {value!r}"


def test_the_readme_names_every_request_the_shipped_flows_post() -> None:
    """A scheduling receiver is built from the README's list of requests: one it does not
    know (the triage's same-day request, a call back promised to the caller) must not be a
    surprise to it."""
    requests = {
        value
        for flow in load_flows(SHIPPED).flows.values()
        for node in flow.nodes.values()
        if isinstance(node, Webhook)
        for name, value in node.extra
        if name == "request"
    }
    assert requests >= {"appointment", "results_status", "same_day", "within_24h"}
    text = clinic_line_section()
    paragraph = text[text.index("A flow's `webhook` step") :]
    paragraph = paragraph[: paragraph.index("Any 2xx answer is success")]
    missing = sorted(r for r in requests if f'`"{r}"`' not in paragraph)
    assert not missing, f"requests the shipped flows post that the README does not name: {missing}"


def test_a_0_with_no_question_left_while_closed_keeps_the_goodbyes_outcome(
    elsewhere: Path,
) -> None:
    """The shipped results flow, closed: a 0 typed during the lookup, with no question left
    to take it, hears the closed notice, then the goodbye; the record says what the call
    achieved (the status was given), not ``out_of_hours``."""
    code, out = run_simulator(
        ["results", "--flows-dir", str(SHIPPED), "--closed"],
        ["01021990#", "1234#0", "ready=yes"],
    )
    assert code == 0
    said = [line for line in out if "BOT:" in line]
    assert said[-1].endswith(
        "BOT: The practice is closed. In an emergency, call 1 1 2. To discuss your results with "
        "a member of staff, please call again when we are open. Goodbye."
    )
    assert "   outcome: results_status_given" in out
    assert "transfer to" not in "\n".join(out)
    assert "keeps the goodbye's outcome (results: `results_status_given`" in clinic_line_section()


def test_a_0_before_a_goodbye_that_tells_the_notice_itself_hears_it_once(
    elsewhere: Path,
) -> None:
    """The shipped appointments flow, closed, its scheduling system failing: a 0 typed
    during the request hears the closed goodbye, whose words hold the notice, once."""
    code, out = run_simulator(
        ["appointments", "--flows-dir", str(SHIPPED), "--closed"],
        ["1", "01021990#", "1234#0", ":fail"],
    )
    assert code == 0
    said = [line for line in out if "BOT:" in line]
    assert said[-1].endswith(
        "BOT: The practice is closed. In an emergency, call 1 1 2. Please call again when we "
        "are open. Goodbye."
    ), said[-1]
    assert "   outcome: out_of_hours" in out
    assert "(as it is, when its words tell the notice themselves)" in clinic_line_section()


FLAGGED = """\
id: flagged
language: en
human: staff
start: q
nodes:
  q:
    ask:
      prompt: "Short of breath?"
      choices:
        - {key: "1", phrases: ["yes"], label: "yes", urgency: U2, reason: sob, goto: bye}
        - {key: "2", phrases: ["no"], label: "no", goto: bye}
  bye:
    hangup: "Goodbye."
"""


def test_simulate_runs_a_flow_that_flow_check_refuses(elsewhere: Path) -> None:
    """As the README says: only a flow that does not load stops the simulator; a U2 goodbye
    (a `flow check` finding, which stops `serve`) runs, and the engine's safety net shows."""
    (elsewhere / "flagged.yaml").write_text(FLAGGED, encoding="utf-8")
    code, out = run_simulator([str(elsewhere / "flagged.yaml")], ["1"])
    assert code == 0
    assert "   outcome: transfer_nurse" in out
    assert re.search(r"urgency: U2, action: transfer_nurse", "\n".join(out))
    assert "runs even with findings of `flow check`'s other rules" in clinic_line_section()


URGENT_AFTER_A_SAY = """\
id: urgent
language: en
human: nurse
start: note
nodes:
  note:
    say:
      text: "A few questions about the cough."
      barge_in: false
    next: rest
  rest:
    ask:
      prompt: "Short of breath at rest?"
      choices:
        - {key: "1", phrases: ["yes"], label: "yes", urgency: U2, reason: sob, goto: nurse}
        - {key: "2", phrases: ["no"], label: "no", goto: nurse}
  nurse:
    transfer: nurse
    outcome: transfer_nurse
"""


@pytest.mark.parametrize("key", ["1", "2"])
def test_keys_typed_before_an_urgent_question_are_dropped_its_yes_too(
    tmp_path: Path, key: str
) -> None:
    """The README: at a question whose answer makes the call U2 (no danger sign), keys typed
    before it are dropped, its "yes" too, as for a danger sign; the caller hears it asked."""
    (tmp_path / "urgent.yaml").write_text(URGENT_AFTER_A_SAY, encoding="utf-8")
    eng = engine.Engine(load_flows(tmp_path), FlowParams())
    state, _ = eng.start(eng.flowset.get("urgent"))
    state, _ = eng.handle(state, engine.Digit(key))  # during the say, which nobody may cut
    state, actions = eng.handle(state, engine.PromptDone())
    assert (state.node, state.phase, state.typeahead) == ("rest", engine.Phase.PLAYING, "")
    assert [a.text for a in actions if isinstance(a, engine.Play)] == [
        "Short of breath at rest? For yes, press 1. For no, press 2."
    ]
    assert state.triage is None
    assert [(s.input, s.value) for s in state.path][-1] == ("typeahead_dropped", key)
    text = clinic_line_section()
    assert 'keys typed before it are dropped, its "yes" too' in text
