"""Properties of whole calls through the real ``CallSession`` and the shipped flows.

test_prop_engine.py drives the pure engine one event at a time; some faults live only where
the session runs: the engine, text to speech, the recogniser, keys, webhooks, transfers,
recordings, the record's save, the caller's hang-up and the service's stop each arrive on
their own time. Here hypothesis plays the caller, the SIP worker and every port of the
session (scripted, as in test_ivr_session_races.py) on an event loop whose clock is virtual:
whenever nothing is ready, the loop's time jumps to the next timer, so a listen timeout, a
transfer's 180 s or a call's 30 minutes take no wall time, and keys, prompt ends, late speech
results, a hang-up during a prompt's rendering, a webhook, a transfer, a recording or the
record's save, and a stop at any point interleave at any timing. After every call:

* no exception escaped the session, none was left un-retrieved, and no task still runs;
* the call has exactly one record (in Redis or kept on disk, never both), counted once, at
  the most urgent level the engine reached;
* no speech result reaches the engine at a question other than the one it was heard for;
* a speech result at a question that takes speech does what the README says: a plain answer
  does what its key does (a danger sign's "yes": the urgent outcome); an unclear one (low
  confidence, nothing heard, "not sure", another question's words) takes no answer and is
  asked again, counted, until the question's nomatch limit moves the call on; a danger sign
  answered anything but a plain "no" (or "again") makes the call U2 at least;
* nothing the caller said is in a log line (health data), DEBUG lines included;
* the caller is never left in silence: once the caller only listens (and every prompt ends,
  every webhook answers), the call ends well before ``MAX_CALL_S`` (never ``cut_too_long``);
* a caller at U2 or more is never offered a message;
* a question whose prompt failed (the worker's ``PlayDone(failed=True)``, or text to speech
  raised) and was not heard in full since is never answered by a key, except its "yes" or 0,
  where an answer could make the call U2 or more (README, "Safety rules of the triage").
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import itertools
import logging
import os
import re
import selectors
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, TypeVarTuple, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sip_config.clock import Clock
from tests.unit.test_ivr_session_races import LOUD, QUIET, ScriptedCall, ScriptedRenderer
from tests.unit.test_prop_engine import FLOW_IDS, FLOWSET, KEYS, TYPED, World, _params
from voice.ivr import engine as eng
from voice.ivr.call_record import CallResult
from voice.ivr.flow import (
    HUMAN_PHRASES,
    REPEAT_PHRASES,
    UNSURE_PHRASES,
    Ask,
    Choice,
    Flow,
    InputMode,
    Node,
    Record,
    Transfer,
    Webhook,
    grammar,
    successors,
)
from voice.ivr.session import MAX_CALL_S, CallSession, SessionDeps
from voice.ivr.triage import Urgency
from voice.media.asr import AsrError, PartialResult, SpeechResult
from voice.media.tts import TtsError
from voice.sip.pool import CallHandle
from voice.sip.protocol import Digit, PlayDone, TransferStatus

# Every shipped flow answers a called user of its own name (the menu's sub-flows too).
ROUTED = replace(FLOWSET, routes={**FLOWSET.routes, **{f: f for f in FLOW_IDS}})
MOVES = 40  # things the caller, the worker and the ports do before the caller only listens
PROMPT_S = 2.0  # how long a prompt plays once the caller only listens
BYE_S = 0.05  # from our BYE to the worker's report of the call's end
T = TypeVar("T")
Ts = TypeVarTuple("Ts")


Place = tuple[str, str]  # (flow, node)
GOALS: dict[str, type[Node]] = {"webhook": Webhook, "transfer": Transfer, "recording": Record}


def _spoken_to(node: Node) -> bool:
    """Whether ``node`` is a question that takes speech (with a model of its language)."""
    return isinstance(node, Ask) and node.digits is None and node.mode is not InputMode.KEYPAD


def _distances(goal: Callable[[Node], bool]) -> dict[Place, int]:
    """How many steps each node of the shipped flows is from a ``goal`` node (absent: none
    leads there). A choice that raises the triage to U2 or more costs more: a caller that
    urgent is put through, never sent on to a request or a message."""
    into: dict[Place, list[tuple[Place, int]]] = {}
    goals: list[Place] = []
    for flow in ROUTED.flows.values():
        for node in flow.nodes.values():
            here = (flow.id, node.id)
            if goal(node):
                goals.append(here)
            for target, effect, _ in successors(node):
                there_flow, there = ROUTED.resolve(flow, target)
                level = effect.urgency if effect is not None else None
                cost = 8 if level is not None and level <= Urgency.U2 else 1
                into.setdefault((there_flow.id, there), []).append((here, cost))
    far: dict[Place, int] = {}
    heap = [(0, g) for g in goals]
    while heap:
        d, place = heapq.heappop(heap)
        if place in far:
            continue
        far[place] = d
        for before, cost in into.get(place, []):
            if before not in far:
                heapq.heappush(heap, (d + cost, before))
    return far


def _is(kind: type[Node]) -> Callable[[Node], bool]:
    return lambda node: isinstance(node, kind)


DISTANCE = {kind: _distances(_is(node)) for kind, node in GOALS.items()}
# A talker with no other goal heads for a question it can answer by voice (the prescription
# line has none but the main menu's, one key away).
DISTANCE["speech"] = _distances(_spoken_to)
# Every answer a question of the shipped flows takes by voice, by language: what a caller
# says to the wrong question (a late result, or one heard as the question moved on).
OTHER_WORDS: dict[str, tuple[str, ...]] = {
    lang: tuple(
        sorted(
            {
                p
                for f in ROUTED.flows.values()
                if f.language == lang
                for n in f.nodes.values()
                if isinstance(n, Ask)
                for c in n.choices
                for p in c.phrases
            }
        )
    )
    for lang in {f.language for f in ROUTED.flows.values()}
}


def _toward(goal: str | None, flow: Flow, ask: Ask) -> list[Choice]:
    """The choices of ``ask`` nearest to the call's goal (all of them without one)."""
    if goal is None or not ask.choices:
        return list(ask.choices)
    far = DISTANCE[goal]

    def steps(c: Choice) -> int:
        there_flow, there = ROUTED.resolve(flow, c.goto)
        return far.get((there_flow.id, there), 1_000)

    best = min(steps(c) for c in ask.choices)
    return [c for c in ask.choices if steps(c) == best]


def _entry(ask: Ask) -> str:
    """A valid entry for a digits ask (a real date of birth, a patient number)."""
    assert ask.digits is not None
    if ask.digits.format is not None:
        return "01021980" + ask.digits.terminator
    return "1234567890"[: max(ask.digits.min_digits, 4)] + ask.digits.terminator


class Stuck(AssertionError):
    """Nothing is ready and no timer runs: everything waits forever (or something is always
    ready and time never moves: a task that spins)."""


SPIN = 20_000  # loop turns with no time passing: a call takes a few hundred


# Real seconds a thread of the loop's executor may work with nothing else happening.
THREAD_S = 30.0


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps to the next timer whenever nothing is ready and no
    thread works for it.

    A thread's work (``asyncio.to_thread``: the speech check of a message, a tone's file)
    takes no time on this clock: the loop waits for it for real. Time jumping meanwhile let
    the real time of a thread count as virtual seconds, more the busier the machine (the
    rig's 5 ms polls each moved the clock while the thread waited for a CPU): 2 s past a
    12 s guard under load.
    """

    def __init__(self) -> None:
        super().__init__()
        self._now = 1000.0
        self._in_threads = 0  # executor jobs whose result the loop has not taken yet
        real: selectors.BaseSelector = self._selector  # type: ignore[has-type]
        loop = self

        spins = 0

        class _Selector:
            def select(self, timeout: float | None = None) -> list[Any]:
                nonlocal spins
                if loop._in_threads and timeout != 0:
                    # Its end comes through the loop's self-pipe (call_soon_threadsafe).
                    spins = 0
                    ready: list[Any] = real.select(THREAD_S)
                    if not ready:
                        raise Stuck(
                            f"a thread of the loop's executor still works after {THREAD_S} s"
                        )
                    return ready
                ready = real.select(0)
                spins = spins + 1 if timeout == 0 else 0
                if spins > SPIN:
                    raise Stuck("a task spins: the loop is always ready, and time stands still")
                if ready or timeout == 0:
                    return ready
                if timeout is None:
                    raise Stuck("the loop waits with no timer")
                loop._now += timeout
                return []

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

        self._selector = cast(selectors.BaseSelector, _Selector())

    def time(self) -> float:
        return self._now

    def run_in_executor(
        self, executor: Executor | None, func: Callable[[*Ts], T], *args: *Ts
    ) -> asyncio.Future[T]:
        job = super().run_in_executor(executor, func, *args)
        self._in_threads += 1
        job.add_done_callback(self._thread_done)
        return job

    def _thread_done(self, _: asyncio.Future[Any]) -> None:
        self._in_threads -= 1

    def cancel_left(self) -> None:
        """Cancel the tasks still on the loop and let them end: none outlives an example."""
        left = [t for t in asyncio.all_tasks(self) if not t.done()]
        for task in left:
            task.cancel()
        if left:
            self.run_until_complete(asyncio.gather(*left, return_exceptions=True))


class LoopClock:
    """The session's clock, read from the virtual loop."""

    def __init__(self, loop: VirtualLoop) -> None:
        self._loop = loop

    def now(self) -> float:
        return self._loop.time()

    def monotonic(self) -> float:  # a hold's length (voice/ivr/hold_limit.py)
        return self._loop.time()


async def _inline(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """``asyncio.to_thread`` run in place: a generated example's interleaving must not depend
    on when a thread gets a CPU (``VirtualLoop`` would wait for it, at no virtual time)."""
    return func(*args, **kwargs)


@dataclass
class Seen:
    """What the engine was given and gave, as the session drove it."""

    states: list[eng.CallState] = field(default_factory=list)
    stores: list[eng.CallRecord] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    heard_at: dict[float, tuple[str, str]] = field(default_factory=dict)  # confidence: where
    reached: set[str] = field(default_factory=set)  # the paths this call took (see STATS)
    # The question whose prompt failed and that has not been heard in full since.
    unheard: tuple[str, str] | None = None

    def most_urgent(self) -> Urgency | None:
        levels = [s.triage.urgency for s in self.states if s.triage is not None]
        return min(levels) if levels else None


# The paths a call may take, counted over a run (PROP_SESSION_STATS=file writes the counts):
# the generator must reach each of them often, or its races there go untried. "speech heard"
# counts the calls that gave a question listening for speech a recogniser's result ("speech:
# <kind>" by kind of words, "late: ..." the results that came after a key, a move on, a
# transfer or the hang-up): about 30% of calls at the unit profile's 6 x 20 examples, 26%
# of the deep profile's random ones (10% and 3% before the talker).
REACHED: dict[type[eng.Action], str] = {
    eng.PostWebhook: "webhook",
    eng.TransferCall: "transfer",
    eng.RecordAudio: "recording",
}
STATS: Counter[str] = Counter()


def _heard_as(flow: Flow, ask: Ask, text: str, confidence: float) -> str:
    """What kind of answer ``text`` is to ``ask`` (for the statistics)."""
    lang = flow.language
    if not text:
        return "empty"
    if confidence < ask.min_confidence:
        return "low confidence"
    if any(text in c.phrases for c in ask.choices):
        return "answer"
    if text in HUMAN_PHRASES[lang]:
        return "human"
    if text in UNSURE_PHRASES[lang]:
        return "unsure"
    if text in grammar(ask, lang):
        return "repeat"
    if text == "uh":
        return "noise"
    return "other question"


def _essence(state: eng.CallState) -> eng.CallState:
    """``state`` but for its path (which says how an answer was given)."""
    return replace(state, path=(), steps=0)


def _speech_kind(engine: eng.Engine, state: eng.CallState, event: eng.SpeechResult) -> str:
    flow = ROUTED.get(state.flow)
    node = flow.nodes.get(state.node)
    listening = state.phase is eng.Phase.LISTENING or (
        state.phase is eng.Phase.PLAYING and state.pending is eng.Pending.LISTEN and state.barge_in
    )
    if not (
        listening and isinstance(node, Ask) and node.digits is None and engine.speech_on(flow, node)
    ):
        return "speech ignored"
    return f"speech: {_heard_as(flow, node, event.text, event.confidence)}"


class WatchedEngine(eng.Engine):
    """The real engine; each step checked as the session takes it."""

    seen: Seen

    def start(self, flow: Flow) -> eng.Result:
        state, actions = super().start(flow)
        self._after(state, actions)
        return state, actions

    def handle(self, state: eng.CallState, event: eng.Event) -> eng.Result:
        if isinstance(event, eng.SpeechResult):
            kind = _speech_kind(self, state, event)
            self.seen.reached.add(kind)
            if kind != "speech ignored":
                self.seen.reached.add("speech heard")
            where = self.seen.heard_at.get(event.confidence)
            if where is None:
                self.seen.faults.append(f"speech nobody heard: {event}")
            elif where != (state.flow, state.node):
                self.seen.faults.append(
                    f"speech heard at {where} given at {(state.flow, state.node)}"
                )
        new, actions = super().handle(state, event)
        self._check_unheard(state, event, new)
        if isinstance(event, eng.SpeechResult):
            self.seen.reached.add("speech")
            if _speech_kind(self, state, event) != "speech ignored":
                self._check_speech(state, event, new)
        self._after(new, actions)
        return new, actions

    def _check_speech(
        self, state: eng.CallState, event: eng.SpeechResult, new: eng.CallState
    ) -> None:
        """What a speech result at a question that takes speech must have done (README, the
        triage's safety rules): a plain answer does what its key does; an unclear one takes
        no answer and is asked again (up to the question's limit, then the call moves on);
        a danger sign answered anything but a plain "no" (or "again") makes the call U2."""
        flow = ROUTED.get(state.flow)
        ask = flow.nodes[state.node]
        assert isinstance(ask, Ask)
        lang = flow.language
        here = f"{state.flow}:{state.node}"
        sure = event.confidence >= ask.min_confidence
        matches = [c for c in ask.choices if any(eng.phrase_in(p, event.text) for p in c.phrases)]
        unsure = any(eng.phrase_in(p, event.text) for p in UNSURE_PHRASES[lang])
        plain = [
            c
            for c in matches
            if event.unknown_words == 0
            and any(eng.normalise(p) == eng.normalise(event.text) for p in c.phrases)
        ]
        if sure and not unsure and len(matches) == 1 and plain and plain[0].key:
            # As the key: the same question next, the same triage, the same values.
            listening = replace(state, phase=eng.Phase.LISTENING)
            keyed, _ = super().handle(listening, eng.Digit(plain[0].key))
            if _essence(keyed) != _essence(new):
                self.seen.faults.append(f"{here}: a spoken answer is not its key's")
        asks = [*HUMAN_PHRASES[lang], *REPEAT_PHRASES[lang]]  # "repeat prescription"
        others = (
            not matches
            and event.text in OTHER_WORDS[lang]
            and not any(eng.phrase_in(p, event.text) for p in asks)
        )
        unclear = not sure or not event.text or (unsure and not matches) or others
        if unclear:
            if ask.save and new.value(ask.save) != state.value(ask.save):
                self.seen.faults.append(f"{here}: an unclear answer was taken")
            again = (new.flow, new.node) == (state.flow, state.node) and new.phase in {
                eng.Phase.PLAYING,
                eng.Phase.LISTENING,
            }
            if again and new.pending is eng.Pending.LISTEN and new.nomatch != state.nomatch + 1:
                self.seen.faults.append(f"{here}: an unclear answer not counted")
            if again and new.nomatch >= ask.max_nomatch and new.pending is eng.Pending.LISTEN:
                self.seen.faults.append(f"{here}: asked again past its nomatch limit")
        if ask.danger_sign:
            level = new.triage.urgency if new.triage is not None else None
            no = any(not eng._escalates(c) for c in plain) and sure and not unsure
            again = not matches and any(eng.phrase_in(p, event.text) for p in REPEAT_PHRASES[lang])
            if not no and not again and (level is None or level > Urgency.U2):
                self.seen.faults.append(f"{here}: a danger sign's unclear answer not U2")

    def _check_unheard(self, state: eng.CallState, event: eng.Event, new: eng.CallState) -> None:
        """A question whose prompt failed was not heard: on an urgent one (a danger sign, or
        an answer that makes the call U2 or more) no key but its "yes" or 0 answers it until
        its prompt has been heard in full."""
        seen = self.seen
        here = (state.flow, state.node)
        node = ROUTED.get(state.flow).nodes.get(state.node)
        asking = (
            isinstance(node, Ask)
            and state.phase is eng.Phase.PLAYING
            and state.pending is eng.Pending.LISTEN
        )
        if isinstance(event, eng.PromptFailed):
            seen.reached.add("prompt failed")
            if asking:
                seen.unheard = here
        elif isinstance(event, eng.PromptDone) and asking:
            seen.unheard = None  # heard in full (the second try)
        if isinstance(event, eng.Digit) and seen.unheard == here and isinstance(node, Ask):
            seen.reached.add("key at an unheard question")
            if eng.urgent_question(node):
                seen.reached.add("key at an unheard urgent question")
                safe = {c.key for c in node.choices if eng._safe_answer(node, c)} | {"0"}
                added = new.path[len(new.path) - min(new.steps - state.steps, len(new.path)) :]
                for step in added:
                    answered = step.input == "digit" and (step.flow, step.node) == here
                    if answered and step.value not in safe:
                        seen.faults.append(
                            f"{state.flow}:{state.node}: answered {step.value!r}, never heard"
                        )
        if (new.flow, new.node) != here:
            seen.unheard = None

    def _after(self, state: eng.CallState, actions: list[eng.Action]) -> None:
        self.seen.states.append(state)
        urgent = (self.seen.most_urgent() or Urgency.U5) <= Urgency.U2
        for action in actions:
            kind = REACHED.get(type(action))
            if kind is not None:
                self.seen.reached.add(kind)
            if isinstance(action, eng.Store):
                self.seen.stores.append(action.record)
            if urgent and isinstance(action, eng.RecordAudio):
                self.seen.faults.append(f"a U2+ caller asked to record at {state.node}")
        if urgent and state.pending is eng.Pending.MESSAGE:
            self.seen.faults.append(f"a message offered to a U2+ caller at {state.node}")


class PropCall(ScriptedCall):
    """The worker's side: one play at a time; a play replaced or stopped owes its PlayDone."""

    def __init__(self, called: str) -> None:
        super().__init__(called)
        self.current: int | None = None  # the play the caller hears now
        self.owed: list[int] = []  # PlayDones of plays stopped or replaced, not yet sent
        self.transfers = 0
        self.digits = 0  # keys the caller pressed
        # Every play fails at once (pjsua2 cannot open or send a file: a media failure).
        self.broken = False
        self.auto = False  # the worker ends each prompt by itself (listen_only)
        # A handle whose commands raise once the call ended (a worker whose pipe is gone),
        # where the pool's own ignores them: the session must not take that for its fault.
        self.strict = False

    def send(self, *events: Any) -> None:
        self.digits += sum(isinstance(ev, Digit) for ev in events)
        super().send(*events)

    def _alive(self, command: str) -> None:
        if self.strict and self.ended:
            raise ConnectionError(f"{command}: the call has ended")

    async def answer(self) -> None:
        self._alive("answer")
        await super().answer()

    async def start_listen(self) -> None:
        self._alive("start_listen")
        await super().start_listen()

    async def play(self, wav: Path, *, loop: bool = False) -> int:
        self._alive("play")
        play_id = await super().play(wav, loop=loop)
        if self.current is not None:
            self.owed.append(self.current)
        self.current = play_id
        if self.auto:
            self.pay_owed(len(self.owed))
        if self.broken and not loop:
            self.fail_prompt()
        elif self.auto and not loop:
            asyncio.get_running_loop().call_later(PROMPT_S, self._ends, play_id)
        return play_id

    async def stop_play(self) -> None:
        self._alive("stop_play")
        await super().stop_play()
        if self.current is not None:
            self.owed.append(self.current)
            self.current = None
        if self.auto:
            self.pay_owed(len(self.owed))

    async def hangup(self, sip_status: int = 0) -> None:
        """The BYE goes to the worker; the call's end comes back from it a little later."""
        self._alive("hangup")
        self.commands.append(("hangup", None))
        if not self.ended:
            asyncio.get_running_loop().call_later(BYE_S, self.end)

    def _ends(self, play_id: int) -> None:
        if self.current == play_id:
            self.end_prompt()

    def listen_only(self) -> None:
        """From now on every prompt ends after PROMPT_S, and a stopped one at once."""
        self.auto = True
        self.pay_owed(len(self.owed))
        if self.current is not None:
            asyncio.get_running_loop().call_later(PROMPT_S, self._ends, self.current)

    async def transfer(self, uri: str, headers: Mapping[str, str] | None = None) -> None:
        self._alive("transfer")
        await super().transfer(uri, headers)
        self.transfers += 1

    def end_prompt(self) -> None:
        """The prompt that plays ends by itself (a loop never does)."""
        if self.current is not None and self.current not in self.loops:
            self.send(PlayDone(self.id, self.current))
            self.current = None

    def fail_prompt(self) -> None:
        """The prompt that plays could not be played: none of it was heard."""
        if self.current is not None and self.current not in self.loops:
            self.send(PlayDone(self.id, self.current, failed=True))
            self.current = None

    def pay_owed(self, count: int) -> None:
        for play_id in self.owed[:count]:
            self.send(PlayDone(self.id, play_id))
        del self.owed[:count]


@dataclass(frozen=True, slots=True)
class Step:
    """One step of what the recogniser makes of the caller's audio, after ``delay`` s (vosk's
    executor, busy): a ``partial``, a ``final`` result, an ``ended`` utterance (the energy
    end-pointer's end of speech: the session asks ``finish`` for the result), an ``error``."""

    delay: float
    kind: str
    text: str = ""
    confidence: float = 0.0
    unknown_words: int = 0  # words heard outside the grammar ("no, he is not breathing")


class PropRecogniser:
    """Answers each fed frame with the model's next scripted step (after its delay)."""

    def __init__(self, owner: PropModel, phrases: Sequence[str], where: tuple[str, str]) -> None:
        self.owner = owner
        self.phrases = tuple(phrases)
        self.where = where
        self.end_of_speech = False
        self._ended: SpeechResult | None = None  # what ``finish`` gives

    async def feed(self, pcm: bytes) -> Any:
        if not self.owner.script:
            return None
        step = self.owner.script.pop(0)
        call = self.owner.call
        keys, transfers = call.digits, call.transfers
        if step.delay:
            await asyncio.sleep(step.delay)  # vosk's executor, busy
        if step.kind in {"final", "ended"}:
            late = self.owner.seen.reached
            if call.ended:
                late.add("late: after hang-up")
            elif transfers != call.transfers:
                late.add("late: after transfer")
            elif keys != call.digits:
                late.add("late: after key")
            elif self.owner.where() != self.where:
                late.add("late: moved on")
        if step.kind == "partial":
            return PartialResult(step.text)
        if step.kind == "error":
            raise AsrError("vosk failed to decode audio")
        result = self._heard(step)
        if step.kind == "ended":
            self.end_of_speech, self._ended = True, result
            return None
        return result

    def _heard(self, step: Step) -> SpeechResult:
        # Each result's confidence is its own: the engine's wrapper knows where it was heard.
        tag = next(self.owner.tags) * 1e-9
        unique = step.confidence - tag if step.confidence > 0.5 else step.confidence + tag
        self.owner.seen.heard_at[unique] = self.where
        return SpeechResult(step.text, unique, step.unknown_words)

    async def finish(self) -> SpeechResult:
        # As vosk's: the end-pointer starts over for the next answer.
        result, self._ended = self._ended or SpeechResult("", 0.0), None
        self.end_of_speech = False
        return result


class PropModel:
    def __init__(self, seen: Seen, where: Callable[[], tuple[str, str]], call: PropCall) -> None:
        self.seen = seen
        self.call = call
        self.where = where
        self.script: list[Step] = []
        self.tags = itertools.count(1)
        self.made: list[PropRecogniser] = []

    def recogniser(self, phrases: Sequence[str], **_: Any) -> PropRecogniser:
        rec = PropRecogniser(self, phrases, self.where())
        self.made.append(rec)
        return rec


DELAYS = [0.0, 0.0, 0.001, 0.3, 2.0, 8.0]


class CallWorld:
    """One call's world: the call, the ports, and what they were asked and did."""

    def __init__(
        self,
        data: st.DataObject,
        loop: VirtualLoop,
        flow_id: str,
        tone_dir: Path,
        failures: bool = False,
    ) -> None:
        self.data = data
        # Hypothesis's own stop (the example's data ran out, as when shrinking), raised in
        # one of the session's tasks: re-raised by the test, whatever the session made of it.
        self.stop_test: BaseException | None = None
        draw = self.draw
        # Where the caller heads for (None: anywhere): the keys and words it gives lean
        # toward the choices nearest a webhook, a transfer or a recording, which random
        # answers reach too rarely. A request is taken only while the desk is open.
        goals: list[str | None] = [None, *GOALS, "webhook"]
        self.goal = draw(st.sampled_from(goals), label="goal")
        opens = [True, True, True, False] if self.goal == "webhook" else [True, False]
        self.desk = World(open=draw(st.sampled_from(opens), label="open"))
        speech = draw(st.sampled_from([True, True, True, False]), label="speech")
        self.speech = speech
        # A caller who answers by voice when a question listens (keys now and then): the
        # speech half of the triage, its races with prompts, keys and hang-ups.
        self.talker = speech and draw(
            st.sampled_from([True, True, True, True, False]), label="talker"
        )
        if self.talker and (self.goal is None or draw(st.booleans(), label="talks first")):
            self.goal = "speech"  # the next question that listens for speech
        summary = draw(st.sampled_from(["none", "urgency", "full"]), label="summary")
        self.seen = Seen()
        self.spoken: set[str] = set()  # every text the recogniser was scripted to give
        self.logged = Logged()
        engine = WatchedEngine(ROUTED, _params(self.desk, speech, summary))
        engine.seen = self.seen
        self.engine = engine
        self.call = PropCall(flow_id)
        self.call.strict = draw(st.booleans(), label="strict handle")
        # Prompts that fail (pjsua2 could not open or send them): some now and then, or (a
        # broken media path) every one. Only in the test that asks for them, so that the
        # other's examples, and what they reach, stay as they were.
        self.failures = failures
        if failures:
            self.call.broken = draw(st.integers(0, 9), label="broken media") == 0
        self.renderer = ScriptedRenderer()
        self.call.renderer = self.renderer
        self.session: CallSession | None = None
        self.model = PropModel(self.seen, self._where, self.call)
        self.webhooks: list[asyncio.Future[Mapping[str, str] | None]] = []
        self.never: set[asyncio.Future[Mapping[str, str] | None]] = set()
        self.in_redis: list[CallResult] = []
        self.kept: list[CallResult] = []
        self.counted = 0
        self.live: CallResult | None = None  # the live record on disk
        self.live_gone = False
        self.stopped = False
        self.cancelled = 0  # pool.stop's cancellation, then (say) asyncio.run's
        self.auto = False  # every webhook is answered at once (listen_only)
        self.long = False  # the moves took half of MAX_CALL_S
        self.began = loop.time()
        renderer = self.renderer
        render = renderer.render

        async def slow_render(text: str, *, voice: str = "en") -> Path:
            if not self.auto:  # no draws once the caller only listens: the data would run out
                await asyncio.sleep(draw(st.sampled_from(DELAYS), label="tts"))
                if draw(st.integers(0, 30), label="tts fails") == 0:
                    raise TtsError("espeak failed")
            return await render(text, voice=voice)

        renderer.render = slow_render  # type: ignore[method-assign]

        async def post(key: str, values: Mapping[str, str | bool], timeout_s: float) -> Any:
            # As clinic_line's poster: a TimeoutError when no answer came in time.
            if self.auto:
                return {}
            answer: asyncio.Future[Mapping[str, str] | None] = loop.create_future()
            self.webhooks.append(answer)
            async with asyncio.timeout(timeout_s):
                return await answer

        async def save_recording(call_id: str, started_at: float, pcm: bytes) -> str:
            if self.auto:
                return "rec-1"
            await asyncio.sleep(draw(st.sampled_from(DELAYS), label="recording save"))
            if draw(st.integers(0, 5), label="recording fails") == 0:
                raise OSError("disk full")
            return "rec-1"

        async def save(result: CallResult) -> None:
            await asyncio.sleep(draw(st.sampled_from([*DELAYS, 40.0]), label="redis"))
            if draw(st.integers(0, 5), label="redis fails") == 0:
                raise ConnectionError("redis down")
            self.in_redis.append(result)

        async def keep(result: CallResult) -> None:
            self.kept.append(result)
            self.counted += 1

        async def taken(result: CallResult) -> None:
            self.counted += 1

        async def begin(result: CallResult) -> None:  # the live record's write, in a thread
            if not self.auto:
                await asyncio.sleep(draw(st.sampled_from(DELAYS), label="live write"))
            assert not self.live_gone, "the live record written after its delete"
            self.live = result

        async def end(call_id: str) -> None:
            self.live, self.live_gone = None, True

        self.deps = SessionDeps(
            engine=engine,
            flowset=ROUTED,
            renderer=cast(Any, self.renderer),
            speech=cast(Any, self.model) if speech else None,
            post_webhook=post,
            save_recording=save_recording,
            save=save,
            keep=keep,
            taken=taken,
            begin=begin,
            end=end,
            clock=cast(Clock, LoopClock(loop)),
            tone_dir=tone_dir,
            behind_pbx=draw(st.booleans(), label="behind pbx"),
        )
        self.session = CallSession(cast(CallHandle, self.call), self.deps)

    def draw(self, strategy: st.SearchStrategy[T], label: str | None = None) -> T:
        try:
            return self.data.draw(strategy, label=label)
        except BaseException as exc:
            self.stop_test = self.stop_test or exc
            raise

    def _where(self) -> tuple[str, str]:
        assert self.session is not None
        state = self.session._state
        assert state is not None
        return state.flow, state.node

    def state(self) -> eng.CallState | None:
        return self.seen.states[-1] if self.seen.states else None

    # -- moves ---------------------------------------------------------------------------------
    def _ask(self) -> tuple[Flow, Ask | None]:
        """The flow the call is in and the question it asks (None: none)."""
        state = self.state()
        flow = ROUTED.get(state.flow) if state is not None else ROUTED.get("main_menu")
        node = flow.nodes.get(state.node) if state is not None else None
        return flow, node if isinstance(node, Ask) else None

    def _keys(self) -> str:
        draw = self.draw
        flow, node = self._ask()
        how = draw(st.integers(0, 7), label="sensible") if node is not None else 0
        if node is not None and how >= (2 if self.goal is not None else 5):  # toward the goal
            keys = [c.key for c in _toward(self.goal, flow, node) if c.key]
            if node.digits is not None and not (keys and self.goal == "speech"):
                keys += [_entry(node)] * (4 if self.goal is not None else 1)
            if keys:
                return draw(st.sampled_from(keys), label="steered")
        if node is not None and how > 0:
            keys = [c.key for c in node.choices if c.key] or TYPED[:5]
            if node.danger_sign:
                keys += [c.key for c in node.choices if c.key and c.effect is None] * 4
            if keys:
                return draw(st.sampled_from(keys), label="choice")
        anything: list[str] = [*KEYS, *TYPED]
        return draw(st.sampled_from(anything), label="keys")

    def _listens(self) -> bool:
        """Whether the call is at a question that takes speech now (its prompt may be talked
        over, or it listens)."""
        state = self.state()
        flow, node = self._ask()
        if state is None or node is None or node.digits is not None or not self.speech:
            return False
        if not self.engine.speech_on(flow, node):
            return False
        return state.phase is eng.Phase.LISTENING or (
            state.phase is eng.Phase.PLAYING
            and state.pending is eng.Pending.LISTEN
            and state.barge_in
        )

    def _words(self) -> Step:
        """What the caller says, and how sure the recogniser is of it (around the question's
        own threshold, so that both sides of it are tried): an answer of the question (now
        and then with words around it), a word of another question, a human, "again", "not
        sure", noise the grammar has no word for (nothing heard)."""
        draw = self.draw
        flow, node = self._ask()
        lang = flow.language
        pools: dict[str, Sequence[str]] = {
            "other question": OTHER_WORDS[lang],  # a late "yes", or one meant for the next
            "human": HUMAN_PHRASES[lang],
            "unsure": UNSURE_PHRASES[lang],
            "noise": ["", "uh"],  # the grammar has no word for it: nothing, or a stray word
        }
        sure = [1.0, 1.0, 1.0, 0.9, 0.3]
        if node is not None and node.digits is None:
            pools["answer"] = [p for c in node.choices for p in c.phrases]
            # The phrases of the choices toward the call's goal.
            pools["goal"] = [p for c in _toward(self.goal, flow, node) for p in c.phrases]
            pools["grammar"] = grammar(node, lang)  # "again" too
            sure += [min(node.min_confidence + 0.05, 1.0), max(node.min_confidence - 0.05, 0.0)]
        kinds = [k for k in ["answer", "goal", "answer", "goal"] if pools.get(k)]
        kinds += [k for k in pools if k not in kinds]
        words = draw(st.sampled_from(pools[draw(st.sampled_from(kinds), label="say")]))
        confidence = draw(st.sampled_from(sure), label="confidence")
        unknown = draw(st.sampled_from([0, 0, 0, 1, 3]), label="unknown words")
        return Step(0.0, "final", words, confidence if words else 0.0, unknown)

    async def speak(self) -> None:
        draw = self.draw
        steps: list[Step] = []
        armed = self.session is not None and self.session._recogniser is not None
        if self.talker and self._listens() and not armed:
            # The caller starts speaking as the question's prompt starts (it is rendered
            # first), or once it listens.
            for _ in range(20):
                await asyncio.sleep(0.5)
                armed = self.session is not None and self.session._recogniser is not None
                if armed or not self._listens():
                    break
        # Words with no recogniser listening are noise (a result now and then: one a late
        # recogniser gives for the next question).
        if armed or draw(st.integers(0, 3), label="stray result") == 0:
            if draw(st.booleans(), label="partial first"):
                said = self._words()
                steps.append(Step(draw(st.sampled_from(DELAYS)), "partial", said.text or "uh"))
            kinds = ["final", "final", "final", "ended", "ended", "error", "none"]
            kind = draw(st.sampled_from(kinds), label="result")
            if kind != "none":
                late = draw(st.sampled_from([*DELAYS, 15.0]), label="late")
                steps.append(replace(self._words(), delay=late, kind=kind))
        self.model.script.extend(steps)
        self.spoken.update(step.text for step in steps)
        self.call.speak(*[LOUD] * 8, *[QUIET] * draw(st.integers(0, 3)))
        then = draw(
            st.sampled_from(["heard out"] * 12 + ["on"] * 4 + ["key"] * 3 + ["hang up"]),
            label="then",
        )
        if then == "heard out":
            # The caller waits for the recogniser: keys pressed at once would answer the
            # question first (tried too), and its words be dropped.
            await asyncio.sleep(sum(step.delay for step in steps) + 0.01)
        elif then == "key":  # a key as the words are said ("no" and 2 at once)
            for key in self._keys():
                self.call.send(Digit(self.call.id, key))
        elif then == "hang up":  # and hangs up before the result comes
            self.call.end()

    def answer_webhook(self) -> None:
        draw = self.draw
        waiting = [f for f in self.webhooks if not f.done() and f not in self.never]
        if not waiting:
            return
        answer = draw(st.sampled_from(waiting))
        how = draw(st.sampled_from(["ok", "ok", "failed", "timeout", "fault", "never"]))
        if how == "ok":
            reply = draw(
                st.dictionaries(
                    st.sampled_from(["message", "ready", "when"]),
                    st.sampled_from(["yes", "no", "See you Monday."]),
                    max_size=2,
                )
            )
            answer.set_result(reply)
        elif how == "failed":
            answer.set_result(None)
        elif how == "timeout":
            answer.set_exception(TimeoutError())
        elif how == "fault":
            answer.set_exception(RuntimeError("aiohttp broke"))
        else:
            self.never.add(answer)  # nobody answers: the poster's timeout ends it

    def transfer_status(self) -> None:
        draw = self.draw
        status, final = draw(
            st.sampled_from(
                [(100, False), (180, False), (200, True), (486, True), (480, True), (503, True)]
            ),
            label="notify",
        )
        self.call.send(TransferStatus(self.call.id, status, final))
        if status == 200 and draw(st.booleans(), label="worker ends"):
            self.call.end()  # the worker hangs up after a final 2xx

    async def move(self, task: asyncio.Task[None]) -> None:
        draw = self.draw
        call = self.call
        # The rare moves at the top of the range: hypothesis draws 0 (its simplest value, and
        # where it shrinks to) about twice as often as 58 or 59.
        rare = draw(st.integers(0, 59), label="rare")
        if rare >= 58:
            # Now and then the caller hangs up, the service stops, or the desk opens or closes.
            options = ["hangup", "desk"]
            options += ["stop"] if not self.stopped else ["cancel"] if self.cancelled < 2 else []
        else:
            talks = self.talker and self._listens()
            state = self.state()
            asks = (
                self._ask()[1] is not None
                and state is not None
                and state.pending is eng.Pending.LISTEN
            )
            if not self.talker:
                options = ["wait", "wait", "keys", "keys", "keys"]
            elif talks:  # answers by voice (hypothesis's simplest move), now and then by key
                options = ["speak", "wait", "wait", "keys"]
            else:  # keys for a question that takes none by voice; no keys typed ahead
                options = ["wait", "wait", *(["keys"] * 3 if asks else [])]
            if self.goal is not None and asks and not talks:
                options += ["keys"] * 4  # a caller with a goal answers (by key or voice)
            plays = call.current not in {None, *call.loops}
            options += ["end prompt"] * 6 if plays else []
            if plays and self.failures:
                # Most often where it matters most: an urgent question's prompt.
                urgent = asks and eng.urgent_question(cast(Ask, self._ask()[1]))
                options += ["fail prompt"] * (6 if urgent else 2)
            options += ["owed"] if call.owed else []
            if self.deps.speech is not None:
                armed = self.session is not None and self.session._recogniser is not None
                options += ["speak"] * (10 if armed else 1)
                options += ["speak"] * 20 if talks else []
            asked = any(not f.done() and f not in self.never for f in self.webhooks)
            options += ["webhook"] * 4 if asked else []
            options += ["notify"] * 4 if call.transfers else []
            recording = self.session is not None and self.session._recording is not None
            options += ["record"] * 2 if recording else []
            options += ["cancel"] if self.cancelled == 1 else []  # while the first winds up
        move = draw(st.sampled_from(options), label="move")
        if move == "wait":
            # A talker at a question waits for its prompt, not for its timeout.
            waits = [0.0, 0.001, 0.5, 3.0, *([] if talks else [7.0, 20.0, 70.0])]
            await asyncio.sleep(draw(st.sampled_from(waits)))
        elif move == "keys":
            for key in self._keys():
                call.send(Digit(call.id, key))
        elif move == "end prompt":
            call.end_prompt()
        elif move == "fail prompt":
            call.fail_prompt()
            if draw(st.booleans(), label="keys after"):
                # A double press, or keys for the question before, just behind the failure:
                # on an urgent question mostly its "no".
                _, ask = self._ask()
                nos: list[str] = []
                if ask is not None and eng.urgent_question(ask):
                    nos = [c.key for c in ask.choices if c.key and not eng._safe_answer(ask, c)]
                keys = draw(st.sampled_from([*nos, *nos, self._keys()]), label="keys after")
                for key in keys:
                    call.send(Digit(call.id, key))
        elif move == "owed":
            call.pay_owed(draw(st.integers(1, len(call.owed))))
        elif move == "speak":
            await self.speak()
        elif move == "webhook":
            self.answer_webhook()
        elif move == "notify":
            self.transfer_status()
        elif move == "record":
            if draw(st.booleans()):
                call.send(Digit(call.id, "#"))
            else:
                call.speak(*[LOUD] * 20)
        elif move == "hangup":
            cuts = ["", "", "worker_lost", *(["shutdown"] if self.stopped else [])]
            call.cut = draw(st.sampled_from(cuts), label="cut")
            call.end()
        elif move == "desk":
            self.desk.open = not self.desk.open
        elif move == "stop":
            self.stopped = True
            assert self.session is not None
            self.session.close()
        elif move == "cancel":
            self.cancelled += 1  # pool.stop: the calls it could not end; then asyncio.run's
            task.cancel()

    async def listen_only(self, task: asyncio.Task[None]) -> None:
        """The caller says and presses nothing; the worker ends every prompt; every webhook
        answers (but one that never does). The call must end on its own, well before
        MAX_CALL_S (which would be a caller left in silence)."""
        self.auto = True
        self.long = asyncio.get_running_loop().time() - self.began > MAX_CALL_S / 2
        self.call.listen_only()
        for answer in self.webhooks:
            if not answer.done() and answer not in self.never:
                answer.set_result({})
        await asyncio.wait({task}, timeout=MAX_CALL_S + 60)
        assert task.done(), "the call never ended"


async def _one_call(w: CallWorld) -> None:
    assert w.session is not None
    task = asyncio.ensure_future(w.session.run())
    await asyncio.sleep(0)  # the call is answered (the pool's handler has begun)
    try:
        # A talker's call has the few moves it takes to reach a question and answer it.
        n = w.data.draw(st.integers(6 if w.talker else 0, MOVES), label="moves")
        for _ in range(n):
            if task.done():
                break
            await w.move(task)
        await w.listen_only(task)
    finally:
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    if not task.cancelled() and isinstance(task.exception(), BaseException):
        exc = task.exception()
        if not isinstance(exc, Exception):
            raise cast(BaseException, exc)  # hypothesis's own (the example drew too much)
    if task.cancelled():
        assert w.cancelled, "the session's task ended cancelled with nobody cancelling it"
    else:
        assert task.exception() is None, task.exception()
    for _ in range(5):
        await asyncio.sleep(0)
    me = asyncio.current_task()
    if w.cancelled > 1:
        # A second cancellation stops the session's waits, not what they waited for (the
        # record kept on disk, the live record's last write and delete): those run on.
        others = {t for t in asyncio.all_tasks() if t is not me}
        if others:
            await asyncio.wait(others, timeout=60.0)
    left = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    assert not left, f"tasks left running: {left}"


def _check(w: CallWorld, problems: list[dict[str, Any]]) -> None:
    seen = w.seen
    assert not problems, [p.get("message") or repr(p.get("exception")) for p in problems]
    assert not seen.faults, seen.faults
    assert not _said_in_logs(w), _said_in_logs(w)
    records = [r.record for r in (*w.in_redis, *w.kept)]
    assert len(records) == 1, f"{len(records)} records: {w.in_redis} kept {w.kept}"
    assert w.counted == 1, f"counted {w.counted} times"
    (record,) = records
    assert record == seen.stores[-1]
    assert record.urgency == seen.most_urgent(), (record.urgency, seen.most_urgent())
    assert record.outcome != "cut_error", record.outcome
    if not w.long:  # a caller busy for half an hour is cut, and rightly
        assert record.outcome != "cut_too_long", "the caller was left in silence"
    assert w.live is None and w.live_gone, "the live record stays after the call"
    if not w.stopped and not w.call.cut:
        assert record.outcome != "cut_shutdown", record.outcome


class Logged(logging.Handler):
    """Every line the service logs during a call (DEBUG too)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# What a log line may hold that a caller could also say ("results" is a flow and an answer).
NAMES = {*ROUTED.flows, *(p.value for p in eng.Phase)}


def _said_in_logs(w: CallWorld) -> list[str]:
    """The log lines that hold something the caller said (health data: never logged)."""
    said = {t for t in w.spoken if t}
    found = []
    for record in w.logged.records:
        parts = [str(a) for a in (record.args or ()) if str(a) not in NAMES]
        if record.exc_info and record.exc_info[1] is not None:
            parts.append(str(record.exc_info[1]))
        for text in said:
            if any(re.search(rf"\b{re.escape(text)}\b", part) for part in parts):
                found.append(f"{record.name}: {record.msg!r} holds {text!r}")
    return found


@contextlib.contextmanager
def only_new_objects_collected() -> Iterator[None]:
    """A ``gc.collect()`` inside walks only the objects made since entry (an example's).

    An example's own garbage is all it needs to find (its tasks, to report an exception
    never retrieved); a full collection walks the whole process's heap too, which in
    ``make test`` holds what every test before left behind. ``gc.freeze`` sets the objects
    alive now aside (none of an example's garbage cycles can run through them: they are
    alive) until the exit puts them back."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _run(w: CallWorld, loop: VirtualLoop) -> list[dict[str, Any]]:
    problems: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: problems.append(context))
    voice = logging.getLogger("voice")
    with pytest.MonkeyPatch.context() as mp, only_new_objects_collected():
        mp.setattr(asyncio, "to_thread", _inline)
        mp.setattr(voice, "level", logging.DEBUG)
        voice.addHandler(w.logged)
        try:
            loop.run_until_complete(_one_call(w))
            gc.collect()  # a task's exception never retrieved is reported when it goes
            loop.run_until_complete(asyncio.sleep(0))
        finally:
            loop.cancel_left()  # after a failed check too
            loop.run_until_complete(loop.shutdown_asyncgens())
            voice.removeHandler(w.logged)
    if w.stop_test is not None:
        raise w.stop_test
    return problems


# The unit profile's 100 examples for each of 6 flows would take a minute here: a fifth of
# them (some 20 s in all); the deep profile (HYPOTHESIS_PROFILE=deep) runs its own number.
_UNIT = settings.get_profile("unit").max_examples
_NOW = settings().max_examples
EXAMPLES = _NOW // 5 if _NOW == _UNIT else _NOW


@pytest.fixture(scope="module", autouse=True)
def _stats() -> Iterator[None]:
    """Write how many calls took each path, when PROP_SESSION_STATS names a file."""
    STATS.clear()
    yield
    path = os.environ.get("PROP_SESSION_STATS")
    if path:
        kinds = ("calls", *REACHED.values(), "speech")
        kinds += tuple(sorted(k for k in STATS if k not in kinds))
        lines = [f"{kind} {STATS[kind]}" for kind in kinds]
        Path(path).write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def tone_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the beep and the ring tone are written (once for all the examples)."""
    return tmp_path_factory.mktemp("tones")


@pytest.mark.parametrize("flow_id", FLOW_IDS)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_any_call_through_the_session_keeps_the_promises(
    flow_id: str, tone_dir: Path, data: st.DataObject
) -> None:
    _one_example(flow_id, tone_dir, data, failures=False)


@pytest.mark.parametrize("flow_id", FLOW_IDS)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_any_call_whose_prompts_may_fail_keeps_the_promises(
    flow_id: str, tone_dir: Path, data: st.DataObject
) -> None:
    """As above, with the worker's PlayDone now and then ``failed`` (in one call in ten,
    every play's): a question nobody heard is never answered by a key typed before it
    (but its "yes" or 0), and a caller whose prompts all fail still reaches an end."""
    _one_example(flow_id, tone_dir, data, failures=True)


def _one_example(flow_id: str, tone_dir: Path, data: st.DataObject, *, failures: bool) -> None:
    """One generated call on its own virtual loop, counted in STATS, then checked."""
    loop = VirtualLoop()
    try:
        w = CallWorld(data, loop, flow_id, tone_dir, failures=failures)
        try:
            problems = _run(w, loop)
        finally:
            STATS.update({"calls": 1, **dict.fromkeys(w.seen.reached, 1)})
    finally:
        loop.close()
    _check(w, problems)
