"""A call's path is capped (``MAX_PATH_STEPS``): a flow may route a choice back to an earlier
question, and a caller (or a stuck key) going round it must not grow the call's record and
live record for the whole call. The cut is marked and counted; the triage, the values and
the outcome are never cut."""

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
    MAX_PATH_STEPS,
    PATH_CUT,
    PATH_HEAD,
    Action,
    CallState,
    Engine,
    Play,
    RecordAudio,
    Store,
    TransferCall,
    record_of,
)
from voice.ivr.flow import FlowParams, load_flows
from voice.ivr.opening_hours import OpeningHours, parse_week
from voice.ivr.simulate import TransferEnding, script_call
from voice.ivr.triage import Urgency

ZONE = zoneinfo.ZoneInfo("Europe/Amsterdam")
HOURS = OpeningHours(parse_week("mon-fri 08:00-17:00"), ZONE)
MONDAY_10 = datetime.datetime(2026, 1, 5, 10, 0, tzinfo=ZONE).timestamp()
# Far past the cap: on the code before it, the record held 2 path steps a lap.
LAPS = 3000

# "Press 1 to hear this again", which goes back to the same question; 3 leaves a name.
AGAIN = """\
id: again
language: en
human: staff
start: hear
nodes:
  hear:
    ask:
      prompt: "Our address is 1 Main Street. Press 1 to hear this again, 2 for the desk."
      choices:
        - {key: "1", phrases: [again], label: again, goto: hear}
        - {key: "2", phrases: [desk], label: desk, goto: desk}
        - {key: "3", phrases: [name], label: name, goto: name}
  name:
    record:
      prompt: "After the tone, say your name."
      max_s: 10
      save: name
    next: hear
  desk:
    transfer: staff
    prompt: "Connecting you."
    outcome: transfer_staff
"""

# A triage whose answer makes the call U2, then advice the caller can hear again.
CONFIRM = """\
id: tri
language: en
human: nurse
start: breathing
nodes:
  breathing:
    ask:
      prompt: "Is the person not breathing?"
      danger_sign: true
      choices:
        - {key: "1", phrases: ["yes"], label: "yes", urgency: U1, reason: not breathing, goto: now}
        - {key: "2", phrases: ["no"], label: "no", goto: rest}
  rest:
    ask:
      prompt: "Short of breath at rest?"
      choices:
        - {key: "1", phrases: ["yes"], label: "yes", urgency: U2, reason: breath, goto: sure}
        - {key: "2", phrases: ["no"], label: "no", goto: fine}
  sure:
    ask:
      prompt: "Sit upright and keep calm. Press 1 to hear this again, 2 for the nurse."
      choices:
        - {key: "1", phrases: [again], label: again, goto: sure}
        - {key: "2", phrases: [nurse], label: nurse, goto: nurse}
  nurse:
    transfer: nurse
    prompt: "Connecting you to a nurse now."
    outcome: transfer_nurse
  now:
    transfer: nurse
    prompt: "Call 112 now. Connecting you to a nurse."
    outcome: call_emergency+transfer_nurse
  fine:
    transfer: nurse
    prompt: "Connecting you to a nurse."
    outcome: transfer_nurse
"""


def clocked(clock: FakeClock) -> FlowParams:
    """Params whose "today" and "open now" read ``clock``, as the service's do."""
    return FlowParams(
        today=lambda: datetime.datetime.fromtimestamp(clock.now(), ZONE).date(),
        open_now=lambda: HOURS.is_open(clock.now()),
        opening_hours=HOURS,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(MONDAY_10)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "again.yaml").write_text(AGAIN, encoding="utf-8")
    (tmp_path / "tri.yaml").write_text(CONFIRM, encoding="utf-8")
    (tmp_path / "routes.yaml").write_text("default: again\nroutes: {}\n", encoding="utf-8")
    return tmp_path


def size(state: CallState) -> int:
    """The bytes of the call's record as stored (and as its live record on disk holds it)."""
    return len(json.dumps(asdict(record_of(state, LOST_OUTCOME))))


def stored(actions: Sequence[Action]) -> Store:
    (store,) = [a for a in actions if isinstance(a, Store)]
    return store


def plays(actions: Sequence[Action]) -> list[str]:
    return [a.text for a in actions if isinstance(a, Play)]


def test_a_caller_going_round_a_question_keeps_a_bounded_record(
    folder: Path, clock: FakeClock
) -> None:
    # Both loops wait for the caller each lap: flow check accepts them, so only the engine's
    # cap bounds them.
    assert check_files([folder]) == []
    engine = Engine(load_flows(folder), clocked(clock))
    short, _ = script_call(engine, "again", ["3", *["1"] * 50])
    state, _ = script_call(engine, "again", ["3", *["1"] * LAPS])
    # Measured (a lap adds a step at the question and one for its answer, ~84 bytes): 50
    # laps 8.8 kB; 3000 laps 504 kB before the cap (4500: 756 kB, and so on for the call's
    # 30 minutes), 33.8 kB with it, and no more however long it goes on.
    assert len(state.path) == MAX_PATH_STEPS
    assert size(state) < 40_000 < 5 * size(short)
    assert state.steps > 2 * LAPS
    longer, _ = script_call(engine, "again", ["1"] * (LAPS + 500))
    assert len(longer.path) == MAX_PATH_STEPS
    assert size(longer) <= size(state) + 4  # the count's digits
    # The first steps stay (the message), then the marker with the count cut, then the
    # latest steps.
    assert state.path[:100] == short.path[:100]
    assert (state.path[3].node, state.path[3].input) == ("name", "record")
    mark = state.path[PATH_HEAD]
    assert (mark.flow, mark.node, mark.input) == ("again", "hear", PATH_CUT)
    assert int(mark.value) == state.steps - MAX_PATH_STEPS + 1
    assert [(p.node, p.input) for p in state.path[-2:]] == [("hear", "digit"), ("hear", "")]
    # A message recorded among the steps the cut took still counts: a transfer that fails
    # does not ask for a second one, as without the cut.
    keys = ["1"] * 150 + ["3"] + ["1"] * LAPS + ["2"]
    state, actions = script_call(engine, "again", keys, transfer=TransferEnding.FAILS)
    assert ("name", "record") not in [(p.node, p.input) for p in state.path]
    assert not [a for a in actions if isinstance(a, RecordAudio)][1:]
    record = stored(actions).record
    assert record.outcome == "transfer_failed"
    assert dict(record.values) == {"name": "test.wav"}
    assert [(p.node, p.input, p.value) for p in record.path[-3:]] == [
        ("hear", "digit", "2"),
        ("desk", "", ""),
        ("desk", "transfer", "failed"),
    ]
    assert len(record.path) == MAX_PATH_STEPS


def test_the_cap_never_loses_the_urgency_its_reasons_or_the_outcome(
    folder: Path, clock: FakeClock
) -> None:
    engine = Engine(load_flows(folder), clocked(clock))
    # No to the danger sign; yes, short of breath at rest (U2); the advice again and again
    # (a stuck key), then the nurse, whose line fails: staff, as for any urgent caller.
    keys = ["2", "1", *["1"] * LAPS, "2"]
    _, actions = script_call(engine, "tri", keys, transfer=TransferEnding.FAILS)
    record = stored(actions).record
    assert len(record.path) == MAX_PATH_STEPS
    assert record.path[PATH_HEAD].input == PATH_CUT
    assert (record.urgency, record.reasons) == (Urgency.U2, ("breath",))
    assert record.outcome == "transfer_failed"
    assert [a.uri for a in actions if isinstance(a, TransferCall)] == [
        FlowParams().nurse_uri,
        FlowParams().staff_uri,
    ]
    assert "call again later" not in " ".join(plays(actions))  # never, to an urgent caller
    # A hang-up deep in the loop: the urgency reached is still the record's.
    _, actions = script_call(engine, "tri", [*keys[:-1], ":hangup"])
    record = stored(actions).record
    assert (record.urgency, record.reasons) == (Urgency.U2, ("breath",))
    assert record.outcome == "caller_hung_up"
    assert len(record.path) == MAX_PATH_STEPS
    # The first answers (the danger sign's "no") are the head of the path.
    assert (record.path[1].node, record.path[1].input, record.path[1].value) == (
        "breathing",
        "digit",
        "2",
    )
