"""Properties of whole calls through the shipped flows (pure: the engine and ivr_flows/).

Hypothesis plays the caller and the service around the engine, as voice/ivr/session.py
does: keys (typed ahead over prompts and lookups too), speech results with any confidence,
listen timeouts, a hang-up at any point (held for a webhook's result, after a recording's
or a transfer's result, as the session holds it), webhook results (ok with any fields,
failed, no answer), every ending of a transfer, recordings kept, silent or not saved, the
end of each prompt, the service stopping, and the desk opening and closing as the clock
moves. At every step and at the end the README's promises hold:

* no exception; every action is well formed and fits the phase the engine is in (a prompt
  plays, a listen runs at the question the engine waits at, a webhook, transfer or
  recording is under way): a call never waits in silence for nobody;
* urgency never goes down; the record's urgency is the most urgent the call reached;
* a caller at U2 or more is never left without a human: the call ends put through, or with
  the emergency advice when no human could be reached (every human tried, or a transfer
  taken on that nobody answered), never a goodbye, a closed notice, a message or "call
  again later"; open or closed;
* danger signs first: no grading question before every danger-sign question of its flow;
* "not sure" is never an answer, and a caller who can give none reaches a human (or, out
  of hours and below U2, the closed notice);
* the caps hold (3 returns to the menu, 3 closed-desk asks, 400 path steps);
* the record holds only the values the flows collect (a webhook reply's fields that some
  flow reads, at most 500 characters), and its outcome is one the README documents;
* a caller who only stays silent (or only says "I don't know") is ended within a bounded
  number of events.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voice.ivr.engine import (
    CLOSED_OUTCOME,
    MAX_CLOSED_ASKS,
    MAX_MENU_RETURNS,
    MAX_PATH_STEPS,
    MAX_REPLY_VALUE_CHARS,
    MESSAGE_OUTCOME,
    OUT_OF_HOURS_OUTCOME,
    OUT_OF_HOURS_UNHEARD_OUTCOME,
    UNANSWERED_OUTCOME,
    UNCONFIRMED_OUTCOME,
    Action,
    CallRecord,
    CallState,
    Digit,
    Engine,
    Event,
    HangUp,
    HangupCall,
    LineClosing,
    Listen,
    NoInput,
    Pending,
    Phase,
    Play,
    PostWebhook,
    PromptDone,
    PromptFailed,
    RecordAudio,
    RecordDone,
    SpeechResult,
    StopPlay,
    Store,
    TransferCall,
    TransferResult,
    WebhookResult,
    phrase_in,
    urgent_question,
)
from voice.ivr.flow import (
    HUMAN_PHRASES,
    MESSAGE_VALUE,
    REPEAT_PHRASES,
    SYSTEM_TEXTS,
    UNSURE_PHRASES,
    Ask,
    FlowParams,
    FlowSet,
    Hangup,
    Record,
    Say,
    Transfer,
    Webhook,
    load_flows,
    read_values,
    render,
    successors,
)
from voice.ivr.triage import Urgency

SHIPPED = Path(__file__).resolve().parents[2] / "ivr_flows"
FLOWSET = load_flows(SHIPPED)
FLOW_IDS = sorted(FLOWSET.flows)
STAFF = "sip:6200@127.0.0.1:5160"
NURSE = "sip:6100@127.0.0.1:5160"
TODAY = date(2026, 12, 6)
KEYS = "0123456789*#"
# What a caller may type in one go: a date of birth (real, impossible, in the future), a
# patient number, a number too long, 0 or 9 as a whole entry, a double press.
TYPED = [
    "01021980#",
    "31022000#",
    "01012099#",
    "1234#",
    "12345678901#",
    "0#",
    "9#",
    "11",
    "22",
    "12",
    "00",
    "**",
    "#",
]
# The engine's outcomes the README names ("The clinic line"), besides those a flow names
# itself (a transfer's, a hang-up's or a webhook's ``outcome``).
ENGINE_OUTCOMES = {
    "caller_hung_up",
    "hung_up_before_transfer",
    "transfer_staff",
    "transfer_nurse",
    "transfer_failed",
    MESSAGE_OUTCOME,
    UNCONFIRMED_OUTCOME,
    UNANSWERED_OUTCOME,
    OUT_OF_HOURS_OUTCOME,
    OUT_OF_HOURS_UNHEARD_OUTCOME,
    CLOSED_OUTCOME,
    "cut_worker_lost",
    "cut_shutdown",
    "cut_too_long",
    "cut_held_too_long",
    "cut_error",
}
CUTS = ["worker_lost", "shutdown", "too_long", "held_too_long", "error"]
CALL_LATER = {
    lang: texts["call_later"].split(". ")[-1].rstrip(".") for lang, texts in SYSTEM_TEXTS.items()
}
_PLACEHOLDER = re.compile(r"\{[A-Za-z_][\w.]*\}")


def _flow_outcomes(flowset: FlowSet) -> set[str]:
    out: set[str] = set()
    for flow in flowset.flows.values():
        for node in flow.nodes.values():
            if isinstance(node, Transfer | Hangup) or (isinstance(node, Webhook) and node.outcome):
                out.add(node.outcome)
            if isinstance(node, Hangup | Say) and node.outcome_unheard:
                out.add(node.outcome_unheard)  # its goodbye, or the line it backs, unheard
    return out


OUTCOMES = ENGINE_OUTCOMES | _flow_outcomes(FLOWSET)
READ = read_values(FLOWSET)
SAVES = {
    node.save
    for flow in FLOWSET.flows.values()
    for node in flow.nodes.values()
    if isinstance(node, Ask | Record) and node.save
}
WEBHOOK_SAVES = {
    node.save
    for flow in FLOWSET.flows.values()
    for node in flow.nodes.values()
    if isinstance(node, Webhook) and node.save
}


def _front_danger_signs(flow_id: str) -> frozenset[str]:
    """The danger-sign questions every path from the flow's start to a grading question (one
    whose answer sets an urgency) passes: the red flags asked first."""
    flow = FLOWSET.get(flow_id)
    nodes = set(flow.nodes)
    preds: dict[str, set[str]] = {n: set() for n in nodes}
    for node in flow.nodes.values():
        for target, _, _ in successors(node):
            if target in nodes:
                preds[target].add(node.id)
    dom = {n: set(nodes) for n in nodes}
    dom[flow.start] = {flow.start}
    changed = True
    while changed:
        changed = False
        for n in nodes - {flow.start}:
            ps = [dom[p] for p in preds[n]]
            new = ({n} | set.intersection(*ps)) if ps else {n}
            if new != dom[n]:
                dom[n], changed = new, True
    grading = [n for n in nodes if n in GRADING.get(flow_id, set())]
    if not grading:
        return frozenset()
    danger = {n.id for n in flow.nodes.values() if isinstance(n, Ask) and n.danger_sign}
    return frozenset(set.intersection(*(dom[g] for g in grading)) & danger)


GRADING = {
    flow.id: {
        node.id
        for node in flow.nodes.values()
        if isinstance(node, Ask)
        and not node.danger_sign
        and any(c.effect is not None and c.effect.urgency is not None for c in node.choices)
    }
    for flow in FLOWSET.flows.values()
}
FRONT_DANGER = {flow_id: _front_danger_signs(flow_id) for flow_id in FLOW_IDS}


@dataclass
class World:
    """What the engine reads of the service: the desk's hours (moved by the clock)."""

    open: bool = True


@dataclass
class Driver:
    """The session's side of one call: what is under way, and what was seen."""

    engine: Engine
    world: World
    state: CallState
    playing: bool = False  # a Play was sent and neither ended nor was stopped
    listen_at: tuple[str, str] | None = None  # the question a Listen runs for
    owed: list[str] = field(default_factory=list)  # "webhook", "transfer", "record"
    hung_up: bool = False  # the caller has gone (the engine may not know yet)
    bot_hung_up: bool = False
    stores: list[CallRecord] = field(default_factory=list)
    most_urgent: Urgency | None = None
    plays: list[Play] = field(default_factory=list)
    danger_asked: set[tuple[str, str]] = field(default_factory=set)
    urgent_plays: list[Play] = field(default_factory=list)
    transfers: list[str] = field(default_factory=list)
    events: int = 0
    speech: bool = False


def _params(world: World, speech: bool, summary: str) -> FlowParams:
    return FlowParams(
        staff_uri=STAFF,
        nurse_uri=NURSE,
        speech_enabled=speech,
        # An English model: the Korean flow runs keypad-only (summary "none" stands for it,
        # to draw no more than before).
        speech_language="en" if summary == "none" else None,
        transfer_summary=summary,
        today=lambda: TODAY,
        open_now=lambda: world.open,
        out_of_hours_number="088 123",
    )


def _urgent(state: CallState) -> bool:
    return state.triage is not None and state.triage.urgency <= Urgency.U2


def _node(state: CallState) -> object:
    return FLOWSET.get(state.flow).nodes.get(state.node)


def _check_action(d: Driver, action: Action, before: CallState, after: CallState) -> None:
    """One action: well formed, and what the session does with it."""
    lang = FLOWSET.get(after.flow).language
    if isinstance(action, Play):
        assert action.text.strip() or action.audio, "an empty prompt"
        values = " ".join(v for _, v in after.values)
        if "{" not in values:
            assert not _PLACEHOLDER.search(action.text), action.text
        assert action.language == lang
        for name, value in after.values:
            if name.split(".", 1)[0] in WEBHOOK_SAVES and len(value) >= 6 and value in action.text:
                assert action.private, "a reply's words in a prompt the cache keeps"
        if not d.hung_up:
            d.playing, d.listen_at = True, None
            d.plays.append(action)
            if _urgent(after):
                d.urgent_plays.append(action)
    elif isinstance(action, StopPlay):
        d.playing = False  # with none playing, the session sends nothing (_stop_prompt)
    elif isinstance(action, Listen):
        assert action.timeout_s > 0 and action.max_digits >= 1
        assert set(action.keys) <= set(KEYS) and action.keys
        assert action.language == lang
        assert not action.speech or action.phrases
        if not d.hung_up:
            d.listen_at = (after.flow, after.node)
    elif isinstance(action, TransferCall):
        assert action.uri in {STAFF, NURSE}, action.uri
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in action.headers)
        assert all("\r" not in v and "\n" not in v for _, v in action.headers)
        d.transfers.append(action.uri)
        if not d.hung_up:
            d.owed.append("transfer")
    elif isinstance(action, RecordAudio):
        assert action.max_s > 0
        if not d.hung_up:
            d.owed.append("record")
    elif isinstance(action, PostWebhook):
        assert action.url_key == "scheduling" and action.timeout_s > 0
        assert all(isinstance(v, str) for v in action.values.values())
        d.owed.append("webhook")  # carried out even after a hang-up (the session holds it)
    elif isinstance(action, HangupCall):
        assert after.phase is Phase.ENDED, "a BYE in a call that goes on"
        d.bot_hung_up = True
    elif isinstance(action, Store):
        assert after.phase is Phase.ENDED, "a record of a call that goes on"
        d.stores.append(action.record)
    else:  # pragma: no cover - a new kind of action must be checked here
        raise AssertionError(f"unknown action {action!r}")


def _check_step(d: Driver, before: CallState, event: Event | None, actions: list[Action]) -> None:
    after = d.state
    if after.triage is not None:
        now = after.triage.urgency
        d.most_urgent = now if d.most_urgent is None else d.most_urgent.at_least(now)
    if before.triage is not None:
        assert after.triage is not None and after.triage.urgency <= before.triage.urgency
    for i, action in enumerate(actions):
        _check_action(d, action, before, after)
        if isinstance(action, Store):
            assert i == len(actions) - 1, "actions after the record"
    if before.phase is Phase.ENDED:
        assert not actions
    assert after.menu_returns <= MAX_MENU_RETURNS
    assert after.closed_asks <= MAX_CLOSED_ASKS
    assert len(after.path) <= MAX_PATH_STEPS
    added = min(after.steps - before.steps, len(after.path))
    for step in after.path[len(after.path) - added :] if added > 0 else ():
        if step.input in {"digit", "speech"} and step.node in FRONT_DANGER.get(step.flow, ()):
            d.danger_asked.add((step.flow, step.node))
    if after.node in GRADING.get(after.flow, ()) and after.phase is not Phase.ENDED:
        front = {(after.flow, n) for n in FRONT_DANGER[after.flow]}
        assert front <= d.danger_asked, f"{after.node} asked before the danger signs"
    if isinstance(event, SpeechResult) and isinstance(_node(before), Ask):
        _check_unsure(before, after, event)
    if isinstance(event, PromptFailed) and before.phase is Phase.PLAYING:
        # A question nobody heard is asked again or given up, never listened for.
        assert not any(isinstance(a, Listen) for a in actions), "listens to an unheard question"
    if _urgent(after) and after.phase is Phase.PLAYING:
        # An urgent caller's last words: only when no human could be reached.
        assert after.pending is not Pending.MESSAGE, "a message offered to an urgent caller"
        if after.pending is Pending.HANGUP:
            assert after.outcome == UNCONFIRMED_OUTCOME or (
                after.outcome == "transfer_failed" and {STAFF, NURSE} <= set(after.transfers_failed)
            ), f"an urgent caller's goodbye: {after.outcome} at {after.node}"
    if after.phase is Phase.ENDED or d.hung_up:
        return
    # Liveness: whatever the engine waits for is under way.
    if after.phase is Phase.PLAYING:
        assert d.playing, f"waits for a prompt nobody plays ({after.node}, {after.pending})"
    if after.phase is Phase.LISTENING:
        assert d.listen_at == (after.flow, after.node), (
            f"listens at {after.node} with the listen of {d.listen_at}"
        )
    for kind, phase in (
        ("webhook", Phase.WEBHOOK),
        ("transfer", Phase.TRANSFERRING),
        ("record", Phase.RECORDING),
    ):
        assert (kind in d.owed) == (after.phase is phase), (kind, after.phase, d.owed)


def _check_unsure(before: CallState, after: CallState, ev: SpeechResult) -> None:
    """ "Not sure" is no answer (a danger sign's or urgent question's plain "yes" aside)."""
    ask = _node(before)
    assert isinstance(ask, Ask)
    flow = FLOWSET.get(before.flow)
    lang = flow.language
    if before.phase is not Phase.LISTENING and not (
        before.phase is Phase.PLAYING and before.barge_in
    ):
        return
    if ask.digits is not None or ev.confidence < ask.min_confidence:
        return
    if not any(phrase_in(p, ev.text) for p in UNSURE_PHRASES[lang]):
        return
    new = after.path[len(after.path) - min(after.steps - before.steps, len(after.path)) :]
    if not new:
        return  # speech this question does not take (keypad only)
    matches = [c for c in ask.choices if any(phrase_in(p, ev.text) for p in c.phrases)]
    if urgent_question(ask) and len(matches) == 1 and new[0].input == "speech":
        choice = matches[0]
        eff = choice.effect
        assert eff is not None and eff.urgency is not None, "an unsure 'no' taken"
        return
    assert new[0].input == "unsure", (ev.text, new[0])


def _check_end(d: Driver) -> None:
    state = d.state
    assert state.phase is Phase.ENDED
    assert len(d.stores) == 1, "one record per call"
    record = d.stores[0]
    assert record.outcome == state.outcome
    assert record.outcome in OUTCOMES, record.outcome
    assert record.urgency == d.most_urgent
    for name, value in record.values:
        base = name.split(".", 1)[0]
        if name == MESSAGE_VALUE or name in SAVES:
            continue
        assert base in WEBHOOK_SAVES and name in READ, name
        assert len(value) <= MAX_REPLY_VALUE_CHARS
    urgent = d.most_urgent is not None and d.most_urgent <= Urgency.U2
    if not urgent:
        return
    lang = FLOWSET.get(state.flow).language
    for play in d.urgent_plays:
        assert CALL_LATER[lang] not in play.text, f"urgent caller told: {play.text}"
    assert record.outcome != MESSAGE_OUTCOME and state.value(MESSAGE_VALUE) is None
    if not d.bot_hung_up:
        return  # the caller hung up, or the service cut the call: no verdict here
    humans = {STAFF, NURSE}
    assert (
        record.transfer_target in humans
        or record.outcome in {UNCONFIRMED_OUTCOME, UNANSWERED_OUTCOME}
        or (record.outcome == "transfer_failed" and humans <= set(state.transfers_failed))
    ), f"urgent caller left without a human: {record.outcome} {state.transfers_failed}"


# --------------------------------------------------------------------------- the caller


def _speech(data: st.DataObject, state: CallState) -> SpeechResult:
    draw = data.draw
    node = _node(state)
    lang = FLOWSET.get(state.flow).language
    phrases: list[str] = (
        [p for c in node.choices for p in c.phrases] if isinstance(node, Ask) else []
    )
    pool = [
        *phrases,
        *HUMAN_PHRASES[lang],
        *REPEAT_PHRASES[lang],
        *UNSURE_PHRASES[lang],
        "main menu",
    ]
    words = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3))
    text = " ".join(words)
    if draw(st.integers(0, 5)) == 0:
        text = draw(st.sampled_from(["", "no, he is not breathing", "yes I don't know", "uh"]))
    confidence = draw(st.sampled_from([1.0, 0.9, 0.6, 0.5, 0.3, 0.0]))
    return SpeechResult(text, confidence, draw(st.sampled_from([0, 0, 0, 1, 2])))


def _result(data: st.DataObject, kind: str) -> Event:
    draw = data.draw
    if kind == "webhook":
        how = draw(st.sampled_from(["ok", "ok", "failed", "unknown"]))
        if how != "ok":
            return WebhookResult(False, {}, unknown=how == "unknown")
        reply = draw(
            st.dictionaries(
                st.sampled_from(["message", "ready", "other", "when"]),
                st.sampled_from(
                    ["yes", "no", "true", "", "See you Monday.", "x" * 600, "{clinic_name}"]
                ),
                max_size=3,
            )
        )
        return WebhookResult(True, reply)
    if kind == "transfer":
        return draw(
            st.sampled_from(
                [
                    TransferResult(ok=True),
                    TransferResult(ok=False),
                    TransferResult(ok=False),
                    TransferResult(ok=True, unconfirmed=True),
                    TransferResult(ok=False, unanswered=True),
                ]
            )
        )
    return draw(
        st.sampled_from(
            [RecordDone("m.wav", 5.0), RecordDone(silent=True), RecordDone(duration_s=5.0)]
        )
    )


def _pay(d: Driver, event: Event) -> None:
    """The session's bookkeeping for ``event`` before the engine has it."""
    if isinstance(event, PromptDone | PromptFailed):
        d.playing = False
    elif isinstance(event, WebhookResult):
        d.owed.remove("webhook")
    elif isinstance(event, TransferResult):
        d.owed.remove("transfer")
    elif isinstance(event, RecordDone):
        d.owed.remove("record")


def _handle(d: Driver, event: Event) -> None:
    _pay(d, event)
    before = d.state
    d.state, actions = d.engine.handle(d.state, event)
    d.events += 1
    _check_step(d, before, event, actions)


def _hang_up(data: st.DataObject, d: Driver, cut: str) -> None:
    """The caller goes (or the service cuts the call): what the session then sends."""
    draw = data.draw
    d.hung_up = True
    d.playing = False
    if "transfer" in d.owed:
        # Before the REFER was taken on: the HangUp alone; after: its result first.
        if draw(st.booleans()):
            _handle(d, _result(data, "transfer"))
        else:
            d.owed.remove("transfer")
    if "record" in d.owed:
        _handle(d, _result(data, "record"))
    while "webhook" in d.owed and d.state.phase is not Phase.ENDED:
        _handle(d, _result(data, "webhook"))  # the HangUp is held for the result
    d.owed.clear()
    _handle(d, HangUp(cut))


def _move(data: st.DataObject, d: Driver, typed: deque[str]) -> None:
    """One thing happens: the caller, the service or the clock."""
    draw = data.draw
    state = d.state
    if typed and draw(st.integers(0, 3)) > 0:
        # Keys typed in one go, now and then with a prompt's end or a result between them.
        _handle(d, Digit(typed.popleft()))
        return
    rare = draw(st.integers(0, 199))
    # Now and then the caller hangs up, the service stops, or the desk opens or closes.
    options = ["hangup"] if rare < 2 else ["closing"] if rare < 3 else ["clock"] if rare < 8 else []
    if not options:
        # "late": a listen timeout that fired just as a key came (queued behind it).
        options = ["key", "typed", "late"]
        if d.playing:
            options += ["done"] * 6 + ["failed"]  # a prompt nobody heard (PromptFailed)
        if state.phase is Phase.LISTENING:
            options += ["choice"] * 6 + ["speech"] * 3 + ["noinput"] * 2
        if d.speech and state.phase in {Phase.LISTENING, Phase.PLAYING}:
            # Talking over a prompt; or a result of the question before, queued just behind
            # the key that answered it (the session delivers it to whatever comes next).
            options += ["speech"]
        if d.owed:
            options += ["result"] * 6
    move = draw(st.sampled_from(options))
    if move == "done":
        _handle(d, PromptDone())
    elif move == "failed":
        _handle(d, PromptFailed())
    elif move == "key":
        _handle(d, Digit(draw(st.sampled_from(KEYS))))
    elif move == "choice":
        node = _node(state)
        keys = [c.key for c in node.choices if c.key] if isinstance(node, Ask) else []
        if isinstance(node, Ask) and urgent_question(node):
            # Mostly "no" to the red flags, so that calls get past them to the complaint.
            keys += [c.key for c in node.choices if c.key and c.effect is None] * 4
        typed.extend(draw(st.sampled_from(keys or TYPED)))
    elif move == "typed":
        typed.extend(draw(st.sampled_from(TYPED)))
    elif move == "speech":
        _handle(d, _speech(data, state))
    elif move in {"noinput", "late"}:
        _handle(d, NoInput())
    elif move == "result":
        _handle(d, _result(data, draw(st.sampled_from(d.owed))))
    elif move == "clock":
        d.world.open = not d.world.open
    elif move == "closing":
        _handle(d, LineClosing())
    else:
        _hang_up(data, d, draw(st.sampled_from(["", "", "", *CUTS])))


def _start(flow_id: str, world: World, speech: bool, summary: str) -> Driver:
    engine = Engine(FLOWSET, _params(world, speech, summary))
    state, actions = engine.start(FLOWSET.get(flow_id))
    lang = FLOWSET.get(flow_id).language
    d = Driver(
        engine, world, CallState(flow=flow_id, node=""), speech=engine.params.speech_for(lang)
    )
    d.state = state
    _check_step(d, CallState(flow=flow_id, node=""), None, actions)
    return d


MAX_EVENTS = 200


@pytest.mark.parametrize("flow_id", FLOW_IDS)
@given(data=st.data())
def test_any_call_keeps_the_promises(flow_id: str, data: st.DataObject) -> None:
    draw = data.draw
    world = World(open=draw(st.booleans(), label="open"))
    d = _start(
        flow_id,
        world,
        draw(st.booleans(), label="speech"),
        draw(st.sampled_from(["none", "urgency", "full"])),
    )
    typed: deque[str] = deque()
    while d.state.phase is not Phase.ENDED and d.events < MAX_EVENTS:
        _move(data, d, typed)
    if d.state.phase is not Phase.ENDED:
        _hang_up(data, d, "")
    _check_end(d)


@pytest.mark.parametrize("flow_id", FLOW_IDS)
@given(data=st.data())
def test_a_caller_who_gives_no_answer_is_ended_and_reaches_a_human(
    flow_id: str, data: st.DataObject
) -> None:
    """Silence, or "I don't know", to every question: the call ends in a bounded number of
    events (no reprompt loop), with a human or the closed notice, never a plain goodbye;
    closed, after the notice, with the offer of a message for a call back."""
    draw = data.draw
    world = World(open=draw(st.booleans(), label="open"))
    d = _start(flow_id, world, draw(st.booleans(), label="speech"), "urgency")
    speech = d.speech
    lang = FLOWSET.get(flow_id).language
    bound = 200
    while d.state.phase is not Phase.ENDED:
        assert d.events < bound, f"no end after {bound} events: {d.state.node}"
        if d.playing:
            _handle(d, PromptDone())
        elif d.owed:
            _handle(d, _result(data, draw(st.sampled_from(d.owed))))
        elif d.state.phase is Phase.LISTENING:
            node = _node(d.state)
            takes = (
                isinstance(node, Ask)
                and node.digits is None
                and d.engine.speech_on(FLOWSET.get(d.state.flow), node)
            )
            if speech and takes and draw(st.booleans()):
                _handle(d, SpeechResult(draw(st.sampled_from(UNSURE_PHRASES[lang])), 1.0))
            else:
                _handle(d, NoInput())
        else:
            raise AssertionError(f"stuck at {d.state.node} ({d.state.phase})")
    _check_end(d)
    record = d.stores[0]
    if d.transfers:
        return
    assert record.outcome in {OUT_OF_HOURS_OUTCOME, MESSAGE_OUTCOME}, (record.outcome, record.path)
    offer = render(SYSTEM_TEXTS[lang]["message_offer"], d.engine.params.values(lang))
    assert any(p.text.endswith(offer) for p in d.plays), "closed, given up: no message offer"


def test_the_engines_outcomes_are_the_readmes() -> None:
    """The outcomes the properties accept are those "The clinic line" names."""
    readme = (SHIPPED.parent / "README.md").read_text(encoding="utf-8")
    assert [o for o in sorted(ENGINE_OUTCOMES) if f"`{o}`" not in readme] == []


def test_a_goodbye_unheard_twice_ends_with_an_outcome_the_properties_accept() -> None:
    """The results' closed goodbye, after the status, fails to play twice: the call ends as
    its ``outcome_unheard`` (results_status_unheard), an outcome the flow names, which
    the properties above must accept (a run that drew this call failed on it)."""
    d = _start("results", World(open=False), False, "urgency")
    _handle(d, PromptDone())  # the date of birth's question
    for key in "01012000#":
        _handle(d, Digit(key))
    _handle(d, PromptDone())  # the patient number's question
    for key in "1234#":
        _handle(d, Digit(key))
    _handle(d, WebhookResult(True, {"ready": "yes"}))
    _handle(d, PromptDone())  # "Your results are ready in the patient portal."
    _handle(d, PromptFailed())
    _handle(d, PromptFailed())
    _check_end(d)
    assert d.stores[0].outcome == "results_status_unheard"
