"""``flow check`` and the engine agree (pure: generated flows in a temporary folder).

Hypothesis writes small flows near the schema (blank or missing prompts, keypad prompts,
keypad entries, branches on answers, urgency and hours, records, lookups, transfers,
goodbyes) whose steps only lead on, so that most of them end; for each flow ``flow check``
passes, it plays calls through the engine, with and without a speech model, open and
closed, and requires what ``serve`` counts on once a flow passes:

* the engine never raises (a node it cannot run, a branch with no case, a step past its
  cap): at run time that is a call cut with no word;
* every prompt it plays has words (or a recording): a blank one is silence where the flow
  meant a question, a goodbye or "connecting you", on one of the two kinds of line;
* every question is asked: what the engine says for an ask on either kind of line holds
  the question it picks there (its ``prompt``, or its ``keypad_prompt`` where no speech is
  heard), never the generated hints alone ("for yes, press 1" and no question).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voice.ivr.check import check_files
from voice.ivr.engine import (
    Action,
    CallState,
    Digit,
    Engine,
    Event,
    HangUp,
    LineClosing,
    NoInput,
    Phase,
    Play,
    PromptDone,
    PromptFailed,
    RecordDone,
    SpeechResult,
    TransferResult,
    WebhookResult,
)
from voice.ivr.flow import Ask, FlowParams, FlowSet, load_flows

_STEPS = 5  # n0 .. n4, each leading only to later steps or to an end
_ENDS = {
    "bye": {"hangup": "Goodbye."},
    "staff": {"transfer": "staff"},
    "nurse": {"transfer": "nurse", "prompt": "Connecting you to a nurse."},
    "today": {"hangup": "Please see a doctor today.", "outcome": "same_day"},
    "emergency": {
        "transfer": "nurse",
        "prompt": "Hang up and call {emergency_number} now, or stay on the line.",
        "outcome": "call_emergency+transfer_nurse",
    },
}
_VALUES = ["yes", "no", "Yes", "01", "1"]
# A text the flow may give, leave out (None), or leave blank.
_WORDS = ["Which one?", "Which one?", None, None, "", "  "]


def _maybe(draw: st.DrawFn, key: str, options: list[Any], out: dict[str, Any]) -> None:
    """Set ``out[key]`` to one of ``options``, None leaving it out."""
    value = draw(st.sampled_from(options))
    if value is not None:
        out[key] = value


@st.composite
def _ask(draw: st.DrawFn, later: list[str]) -> dict[str, Any]:
    ask: dict[str, Any] = {}
    _maybe(draw, "mode", [None, "keypad", "both", "speech"], ask)
    _maybe(draw, "prompt", _WORDS, ask)
    _maybe(draw, "keypad_prompt", [None, "Press 1 or 2.", "Press 1 or 2.", ""], ask)
    _maybe(draw, "save", [None, "answer", "answer"], ask)
    entry = draw(st.integers(0, 2)) == 0
    if entry:
        ask["digits"] = {"min": 4, "max": 6}
        ask["next"] = draw(st.sampled_from(later))
    choices = []
    for key in "123"[: draw(st.integers(0 if entry else 1, 3))]:
        choice: dict[str, Any] = {"key": key, "goto": draw(st.sampled_from(later))}
        if not entry:
            _maybe(draw, "phrases", [None, [f"word{key}"]], choice)
            _maybe(draw, "value", [None, *_VALUES], choice)
        _maybe(draw, "label", [None, f"word{key}"], choice)
        if not entry and draw(st.integers(0, 3)) == 0:
            choice["urgency"] = draw(st.sampled_from(["U1", "U2", "U3", "U4"]))
            choice["reason"] = "a reason"
        choices.append(choice)
    if not entry and draw(st.integers(0, 3)) == 0:
        ask["danger_sign"] = True
    _maybe(draw, "on_fail", [None, None, *later], ask)
    if choices:
        ask["choices"] = choices
    return ask


@st.composite
def _step(draw: st.DrawFn, later: list[str]) -> dict[str, Any]:
    target = st.sampled_from(later)
    kinds = ["say", "ask", "ask", "ask", "branch", "set", "urgency", "record", "webhook"]
    kind = draw(st.sampled_from(kinds))
    kind = draw(st.sampled_from([kind, kind, kind, "transfer", "hangup", "goto"]))
    if kind == "say":
        # A lookup's reply field alone: a reply without it (WebhookResult(True) has none)
        # is silence.
        said = ["Hello.", "Hello.", "", " ", "{booking.message}", "Booked. {booking.message}"]
        return {"say": draw(st.sampled_from(said)), "next": draw(target)}
    if kind == "ask":
        return {"ask": draw(_ask(later))}
    if kind == "branch":
        on = draw(st.sampled_from(["answer", "urgency", "hours"]))
        names = {"answer": _VALUES, "urgency": ["U3", "U5", "u5"], "hours": ["open", "closed"]}
        cases = draw(st.dictionaries(st.sampled_from(names[on]), target, max_size=2))
        branch: dict[str, Any] = {"on": on, "cases": cases}
        if draw(st.integers(0, 3)) > 0:
            branch["default"] = draw(target)
        return {"branch": branch}
    if kind == "urgency":
        level = draw(st.sampled_from(["U2", "U3", "U5"]))
        return {"urgency": level, "reason": "a reason", "next": draw(target)}
    if kind == "set":
        return {"set": {"answer": draw(st.sampled_from(_VALUES))}, "next": draw(target)}
    if kind == "record":
        record: dict[str, Any] = {"save": "message"}
        _maybe(draw, "prompt", ["After the tone, say your name.", None, "", " "], record)
        return {"record": record, "next": draw(target)}
    if kind == "webhook":
        hook = {"url": "scheduling", "save": "booking"}
        return {"webhook": hook, "next": draw(target), "on_fail": draw(target)}
    if kind == "transfer":
        transfer: dict[str, Any] = {"transfer": draw(st.sampled_from(["staff", "nurse"]))}
        _maybe(draw, "prompt", ["Connecting you.", None, None, "", " "], transfer)
        return transfer
    if kind == "hangup":
        return {"hangup": draw(st.sampled_from([True, "Goodbye.", "Goodbye.", "", " "]))}
    return {"goto": draw(target)}


@st.composite
def flows(draw: st.DrawFn) -> str:
    """A flow file: steps n0..n4 that lead only on (to later steps or the ends)."""
    ids = [f"n{i}" for i in range(_STEPS)]
    nodes: dict[str, Any] = {}
    for i, node_id in enumerate(ids):
        nodes[node_id] = draw(_step([*ids[i + 1 :], *_ENDS]))
    nodes.update(_ENDS)
    # Only the steps a call can reach: an unreachable one is a finding of its own.
    seen, todo = {"n0"}, ["n0"]
    while todo:
        for target in _targets(nodes[todo.pop()]):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    reached = {k: v for k, v in nodes.items() if k in seen}
    doc = {"id": "main_menu", "language": "en", "start": "n0", "nodes": reached}
    return yaml.safe_dump(doc, sort_keys=False)


def _targets(value: Any) -> list[str]:
    """The step ids a node (as written) names: its next, goto, on_fail, default, cases."""
    out: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key in {"next", "goto", "on_fail", "default"}:
                out.append(item)
            elif key == "cases":
                out += list(item.values())
            else:
                out += _targets(item)
    elif isinstance(value, list):
        for item in value:
            out += _targets(item)
    return out


_SPEECH = ["word1", "word2", "operator", "repeat", "not sure", "mumble", ""]


def _event(data: st.DataObject, flowset: FlowSet, state: CallState) -> Event:
    """What the caller or the service does next, as the session would deliver it."""
    draw = data.draw
    rare = draw(st.integers(0, 49))
    if rare == 0:
        return HangUp(draw(st.sampled_from(["", "shutdown"])))
    if rare == 1:
        return LineClosing()
    if state.phase is Phase.PLAYING:
        playing: list[Event] = [PromptDone(), PromptDone(), PromptFailed(), Digit("1")]
        return draw(st.sampled_from(playing))
    if state.phase is Phase.LISTENING:
        node = flowset.get(state.flow).nodes.get(state.node)
        keys = [c.key for c in node.choices if c.key] if isinstance(node, Ask) else []
        heard: list[Event] = [Digit(k) for k in [*keys, "0", "*", "#", "5", "9"]]
        heard += [SpeechResult(text, 0.9) for text in _SPEECH]
        return draw(st.sampled_from([*heard, NoInput()]))
    if state.phase is Phase.WEBHOOK:
        return draw(st.sampled_from([WebhookResult(True), WebhookResult(False)]))
    if state.phase is Phase.TRANSFERRING:
        return draw(
            st.sampled_from(
                [
                    TransferResult(ok=True),
                    TransferResult(ok=False),
                    TransferResult(ok=False, unanswered=True),
                    TransferResult(ok=True, unconfirmed=True),
                ]
            )
        )
    return draw(st.sampled_from([RecordDone("m.wav", 5.0), RecordDone(silent=True)]))


def _hours(open_: bool) -> Callable[[], bool]:
    return lambda: open_


def _heard(actions: list[Action], where: str) -> None:
    for action in actions:
        if isinstance(action, Play):
            assert action.text.strip() or action.audio, f"silence played {where}: {action}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=flows(), data=st.data())
def test_a_flow_check_passes_runs_without_error_or_silence(text: str, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "main_menu.yaml"
        path.write_text(text, encoding="utf-8")
        if check_files([path]):
            return  # refused: serve would not start with it
        flowset = load_flows(tmp)
    flow = flowset.get("main_menu")
    for ask in (n for n in flow.nodes.values() if isinstance(n, Ask)):
        for speech in (False, True):
            said = flow.ask_prompt(ask, speech)
            question = ask.keypad_prompt if said == ask.keypad_prompt else ask.prompt
            assert question and question.strip() in said, f"{ask.id}: no question ({speech})"
    for speech in (False, True):
        for open_ in (True, False):
            params = FlowParams(speech_enabled=speech, open_now=_hours(open_))
            engine = Engine(flowset, params)
            where = f"(speech {speech}, open {open_})\n{text}"
            state, actions = engine.start(flowset.get("main_menu"))
            _heard(actions, where)
            for _ in range(60):
                if state.phase is Phase.ENDED:
                    break
                event = _event(data, flowset, state)
                state, actions = engine.handle(state, event)
                _heard(actions, where)
