"""Transfers to a human under generated far ends (RFC 3515 REFER and NOTIFYs; RFC 5589).

What the session sees of a transfer is what the worker passes on (voice/sip/pjsua.py).
pjsip answers every NOTIFY itself (its event-subscription layer: not our code, not tested
here) and its xfer client reports only those whose message/sipfrag parses
(pjsua_call.c, ``xfer_client_on_evsub_state``): the REFER's 202 as a non-final 100, a
refused REFER as a final error, one never answered as a final error at 32 s, a NOTIFY's
sipfrag status with ``final`` when its Subscription-State is terminated; and a
subscription's later NOTIFYs only while the worker asks for them (``cont``,
:func:`voice.sip.refer.wants_more_reports`). :class:`XferClient` is that, for each REFER of
the call. The far end generated here: reports of every status for the latest REFER or the
one before (retransmitted, out of order, after terminated), the call's end (the PBX taking
the caller with its BYE, or the caller hanging up) at any moment, and time passing past
every deadline (``TRANSFER_DEADLINE_S``, ``TRANSFER_ANSWER_S``) on a virtual clock. Two
paths: staff from the main menu (a failure: the message offer), and an urgent caller's
nurse (a failure: staff's REFER next).

A model per REFER built from :func:`voice.sip.refer.verdict` says what its reports mean;
checked for every call:

* the engine gets exactly one ``TransferResult`` per REFER (none when the call ended
  before the REFER was taken on), the model's, at the step that gave it: nothing after it
  changes it, and no report of one REFER answers another;
* a 2xx puts the caller through (its record names the human); a failure goes on with the
  flow (the message offer, or the next human), and only a failure does;
* the call is never left without a result: some timer always ends the wait;
* the call's one record says what the caller lived (``transfer_*`` after a 2xx and the
  BYE, ``hung_up_before_transfer``, ``transfer_failed``, ``transfer_unconfirmed``,
  ``transfer_unanswered``).

The unit profile runs 100 examples a path (some 2 s); ``HYPOTHESIS_PROFILE=deep``
(tests/unit/conftest.py) searches further, at random.
"""

from __future__ import annotations

import asyncio
import functools
import gc
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sip_config.clock import Clock
from tests.unit import test_ivr_session_races as races
from tests.unit.test_ivr_session_races import Rig, _digit, _done, _to_breathing
from tests.unit.test_prop_session import (
    LoopClock,
    VirtualLoop,
    _inline,
    only_new_objects_collected,
)
from voice.ivr import engine as eng
from voice.ivr.flow import FlowSet, load_flows
from voice.ivr.session import TRANSFER_ANSWER_S, TRANSFER_DEADLINE_S, CallSession
from voice.sip.outcome import SipStatus
from voice.sip.pool import CallHandle
from voice.sip.protocol import TransferStatus
from voice.sip.refer import TransferVerdict, verdict, wants_more_reports

# What pjsua may pass on: the 202 (a non-final 100), sipfrags of every class, a refused
# REFER's own status (405, 501), one never answered (pjsip's 408 after 32 s).
STATUSES = [100, 180, 183, 200, 202, 400, 403, 404, 405, 408, 480, 486, 487, 500, 501, 503, 603]
WAITS = [0.0, 0.2, 3.0, 31.0, 33.0, 65.0, 200.0]
# The unit profile's 100 examples for each path, some 3 s in all; HYPOTHESIS_PROFILE=deep
# (tests/unit/conftest.py) runs its own number.
EXAMPLES = settings().max_examples
UNCONFIRMED = "unconfirmed"  # the model's answer for a transfer taken on, never answered
MARGIN_S = 1.0  # no event this near a deadline: which side it falls on is no property


@dataclass(frozen=True, slots=True)
class Notify:
    """A report of REFER number ``refer`` (0: the call's first): its sipfrag's status, and
    whether its Subscription-State is terminated."""

    sip_status: int
    final: bool
    refer: int = 0


@dataclass(frozen=True, slots=True)
class Report:
    """A generated report: of the latest REFER (``back`` 0), or of the one before it (a
    subscription of a REFER already decided: retransmitted, late, after terminated)."""

    sip_status: int
    final: bool
    back: int


@dataclass(frozen=True, slots=True)
class Wait:
    seconds: float


@dataclass(frozen=True, slots=True)
class Bye:
    """The call ends: the caller hangs up, or the PBX takes the caller (RFC 5589)."""


@dataclass(frozen=True, slots=True)
class Again:
    """The last report again (a retransmitted NOTIFY, a new CSeq with the same sipfrag), and
    ``final``: now with the subscription terminated (as a transferee ends it)."""

    final: bool


Step = Notify | Report | Wait | Bye | Again
# Progress more often than not: a REFER taken on (the 202 first) reaches every later path.
PROGRESS = [100, 100, 180, 183]
NOTIFIES = st.builds(
    Report,
    st.sampled_from([*PROGRESS, *STATUSES, 200, 486, 503]),
    st.booleans(),
    st.sampled_from([0, 0, 1]),
)
# Reports mostly, then time; the call's end (which decides at once) least often.
STEPS: st.SearchStrategy[Step] = st.one_of(
    NOTIFIES,
    NOTIFIES,
    NOTIFIES,
    st.builds(Wait, st.sampled_from(WAITS)),
    st.builds(Wait, st.sampled_from(WAITS)),
    st.builds(Again, st.booleans()),
    st.just(Bye()),
)
# Most far ends start by taking the REFER on (its 202); some then answer it with the
# subscription still active (the 486 or 400 of a NOTIFY that says "active"): its later
# NOTIFYs are where one REFER's reports can be read as the next one's.
OPENINGS: list[list[Step]] = [
    [],
    [Notify(100, False)],
    [Notify(100, False)],
    [Notify(100, False), Notify(486, False)],
    [Notify(400, False)],
]
FAR_ENDS = st.tuples(st.sampled_from(OPENINGS), st.lists(STEPS, max_size=14)).map(
    lambda t: [*t[0], *t[1]]
)


REFER_TIMEOUT_S = 32.0  # pjsip's timer F (64 * T1): a REFER with no final response by then


class XferClient:
    """pjsua's side of each REFER (pjsua_call.c, xfer_client_on_evsub_state): a NOTIFY whose
    sipfrag parses reaches the worker only while its subscription is live and the worker
    asked for its reports (``cont``) after the last one; any other is answered and dropped.
    A REFER never answered ends at ``REFER_TIMEOUT_S`` with a final report of pjsua's own."""

    def __init__(self) -> None:
        self.reporting: list[bool] = []
        self.heard: list[bool] = []  # the REFER had an answer (its 202, or a refusal)
        self.at: list[float] = []  # seconds since the REFER

    def refer(self) -> None:
        self.reporting.append(True)
        self.heard.append(False)
        self.at.append(0.0)

    def passes(self, n: Notify) -> bool:
        if n.refer >= len(self.reporting) or not self.reporting[n.refer]:
            return False
        self.heard[n.refer] = True
        self.reporting[n.refer] = not n.final and wants_more_reports(n.sip_status, final=n.final)
        return True

    def next_timeout(self) -> float | None:
        """Seconds until the next unanswered REFER times out (None: none will)."""
        left = [
            REFER_TIMEOUT_S - at
            for at, heard, live in zip(self.at, self.heard, self.reporting, strict=True)
            if live and not heard
        ]
        return min(left) if left else None

    def elapse(self, seconds: float) -> list[Notify]:
        """Time passes; the reports of the REFERs that timed out."""
        timed_out = []
        for i, at in enumerate(self.at):
            self.at[i] = at + seconds
            if self.reporting[i] and not self.heard[i] and self.at[i] >= REFER_TIMEOUT_S:
                timed_out.append(Notify(SipStatus.REQUEST_TIMEOUT, True, i))
        return [n for n in timed_out if self.passes(n)]


class CountingEngine(eng.Engine):
    """The real engine; the transfer results it is given, in order, with the number of the
    far end's step that was under way (``clock[0]``)."""

    results: list[tuple[int, eng.TransferResult]]
    clock: list[int]

    def handle(self, state: eng.CallState, event: eng.Event) -> eng.Result:
        if isinstance(event, eng.TransferResult):
            self.results.append((self.clock[0], event))
        return super().handle(state, event)


Answer = TransferVerdict | str | None  # None: the call ended before the REFER was taken on


class Model:
    """What one REFER's reports mean, by the rules of voice/sip/refer.py and the session."""

    def __init__(self, behind_pbx: bool) -> None:
        self.behind_pbx = behind_pbx
        self.accepted = False
        self.answer: Answer = None
        self.decided = False
        self.step = 0  # the far end's step under way (set by the test)
        self.decided_at = -1  # the step at which the answer was given
        self.at = 0.0  # seconds since the REFER

    def wait(self, seconds: float) -> None:
        if not self.decided:
            limit = TRANSFER_ANSWER_S if self.accepted else TRANSFER_DEADLINE_S
            if self.at + seconds >= limit:
                self._decide(UNCONFIRMED if self.accepted else TransferVerdict.FAILED)
        self.at += seconds

    def _decide(self, answer: Answer) -> None:
        self.answer, self.decided, self.decided_at = answer, True, self.step

    def ended(self) -> None:
        if not self.decided:
            self._decide(TransferVerdict.ANSWERED if self.accepted else None)

    def report(self, n: Notify) -> None:
        if self.decided:
            return
        said = verdict(
            n.sip_status, final=n.final, accepted=self.accepted, behind_pbx=self.behind_pbx
        )
        if said is TransferVerdict.PROGRESS:
            self.accepted = True
        else:
            self._decide(said)

    def near_a_deadline(self) -> bool:
        return not self.decided and any(
            abs(self.at - d) < MARGIN_S for d in (TRANSFER_DEADLINE_S, TRANSFER_ANSWER_S)
        )


RESULTS: dict[Answer, eng.TransferResult | None] = {
    None: None,
    TransferVerdict.ANSWERED: eng.TransferResult(True),
    TransferVerdict.FAILED: eng.TransferResult(False),
    TransferVerdict.UNANSWERED: eng.TransferResult(False, unanswered=True),
    UNCONFIRMED: eng.TransferResult(True, unconfirmed=True),
}
OUTCOMES: dict[Answer, str] = {
    None: "hung_up_before_transfer",
    TransferVerdict.FAILED: "transfer_failed",
    TransferVerdict.UNANSWERED: "transfer_unanswered",
    UNCONFIRMED: "transfer_unconfirmed",
}
# What a caller hears when a transfer failed and the call goes on: the message offer, or
# (an urgent caller) that another human is tried.
FAILURE_TOLD = ("nobody can take your call", "I could not connect you yet")
RETRY = "I could not connect you yet"


@dataclass
class Far:
    """One call's far end and what it meant."""

    behind_pbx: bool
    steps: list[Step]
    xfer: XferClient = field(default_factory=XferClient)
    models: list[Model] = field(default_factory=list)
    near: bool = False  # a step came too near a deadline to say which side it fell on
    step: list[int] = field(default_factory=lambda: [0])  # the step under way
    acked: set[int] = field(default_factory=set)  # retry prompts whose end was sent

    def to_step(self, n: int) -> None:
        self.step[0] = n
        for m in self.models:
            m.step = n


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def _to_staff(rig: Rig) -> None:
    """The main menu; 0; "connecting you" played: the REFER to staff goes."""
    rig.start()
    await rig.until_prompt("Welcome to")
    rig.call.send(_digit("0"))
    connecting = await rig.until_prompt("Connecting you to a member of staff")
    rig.call.send(_done(connecting))


async def _to_nurse(rig: Rig) -> None:
    """Triage: difficulty breathing (U1); the advice and "connecting you" played: the REFER
    to the nurse goes (staff's follows if it fails)."""
    await _to_breathing(rig)
    rig.call.send(_digit("1"))
    advice = await rig.until_prompt("This may be an emergency")
    rig.call.send(_done(advice))
    connecting = await rig.until_prompt("Connecting you to a nurse")
    rig.call.send(_done(connecting))


def _refers(rig: Rig) -> int:
    return [kind for kind, _ in rig.call.commands].count("transfer")


async def _follow(rig: Rig, far: Far) -> None:
    """Keep the far end's view in step with the session: a REFER sent opens a subscription
    (and its model); the retry prompt ends (the caller waits for the next human)."""
    await _settle()
    while len(far.models) < _refers(rig):
        far.xfer.refer()
        far.models.append(Model(far.behind_pbx))
        far.models[-1].step = far.step[0]
    for pid, text in rig.call.plays():
        if RETRY in text and pid not in far.acked:
            far.acked.add(pid)
            rig.call.send(_done(pid))
            await _settle()
            await _follow(rig, far)
            return


def _report(rig: Rig, far: Far, n: Notify) -> None:
    """The worker passes a report on (none once the call ended), and hangs up after a final
    2xx (pjsua.py)."""
    if rig.call.ended:
        return
    rig.call.send(TransferStatus(rig.call.id, n.sip_status, n.final))
    far.models[n.refer].report(n)
    if n.final and 200 <= n.sip_status < 300:
        rig.call.end()
        for m in far.models:
            m.ended()


async def _elapse(rig: Rig, far: Far, seconds: float) -> None:
    """``seconds`` pass, with pjsua's REFER timeouts reported when they fall."""
    while seconds > 0:
        due = far.xfer.next_timeout()
        step = seconds if due is None else min(seconds, due)
        await asyncio.sleep(step)
        for m in far.models:
            m.wait(step)
        for n in far.xfer.elapse(step):
            _report(rig, far, n)
        await _follow(rig, far)
        seconds -= step


def _resolve(s: Step, far: Far, last: Notify | None) -> Notify | Wait | Bye | None:
    """A generated step as the far end sends it (None: nothing to send)."""
    if isinstance(s, Report):
        return Notify(s.sip_status, s.final, max(0, len(far.models) - 1 - s.back))
    if isinstance(s, Again):
        return None if last is None else replace(last, final=last.final or s.final)
    return s


async def _one_call(rig: Rig, far: Far, path: str) -> None:
    await (_to_staff(rig) if path == "staff" else _to_nurse(rig))
    await rig.until(lambda: _refers(rig) > 0)
    await _follow(rig, far)
    last: Notify | None = None
    for number, drawn in enumerate(far.steps):
        far.to_step(number)
        s = _resolve(drawn, far, last)
        if s is None:
            continue
        if isinstance(s, Notify):
            last = s
        if isinstance(s, Wait):
            await _elapse(rig, far, s.seconds)
        elif isinstance(s, Bye):
            rig.call.end()
            for m in far.models:
                m.ended()
        elif far.xfer.passes(s):
            _report(rig, far, s)
        await _follow(rig, far)
        far.near = far.near or any(m.near_a_deadline() for m in far.models)
    # The far end says no more; the caller listens past every deadline, then hangs up.
    far.to_step(len(far.steps))
    for _ in range(3):
        await _elapse(rig, far, TRANSFER_ANSWER_S + 60)
    await rig.finish()
    for m in far.models:
        m.ended()


@pytest.fixture(scope="module")
def tone_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tones")


def _run(rig: Rig, far: Far, path: str) -> list[dict[str, Any]]:
    loop = VirtualLoop()
    problems: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: problems.append(context))
    try:
        with pytest.MonkeyPatch.context() as mp, only_new_objects_collected():
            mp.setattr(asyncio, "to_thread", _inline)
            rig.deps = replace(rig.deps, clock=cast(Clock, LoopClock(loop)))
            rig.session = CallSession(cast(CallHandle, rig.call), rig.deps)
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(_one_call(rig, far, path))
                gc.collect()
                loop.run_until_complete(asyncio.sleep(0))
            finally:
                loop.cancel_left()
                asyncio.set_event_loop(None)
    finally:
        loop.close()
    return problems


@functools.cache
def _flows(folder: Path) -> FlowSet:
    return load_flows(folder)  # parsed once: 0.1 s an example otherwise


def _rig(path: str, far: Far, tone_dir: Path) -> tuple[Rig, CountingEngine]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(races, "load_flows", _flows)
        rig = Rig(called="6000" if path == "staff" else "triage", speech=False)
    engine = CountingEngine(rig.deps.engine.flowset, rig.deps.engine.params)
    engine.results = []
    engine.clock = far.step
    rig.deps = replace(rig.deps, engine=engine, behind_pbx=far.behind_pbx, tone_dir=tone_dir)
    return rig, engine


def _check(rig: Rig, engine: CountingEngine, far: Far, path: str, problems: list[Any]) -> None:
    assert not problems, [p.get("message") or repr(p.get("exception")) for p in problems]
    answers = [m.answer for m in far.models]
    # One result per REFER (none for one the call ended before it was taken on), the model's,
    # given when that REFER's own reports (or the call's end, or a deadline) gave it.
    given = [(m.decided_at, RESULTS[m.answer]) for m in far.models]
    expected = [(at, r) for at, r in given if r is not None]
    assert engine.results == expected, (answers, engine.results)
    # Another human only after a failure, and only for an urgent caller.
    retried = path == "nurse" and answers[0] is TransferVerdict.FAILED
    assert len(answers) == (2 if retried else 1), answers
    (saved,) = rig.saved
    last = answers[-1]
    outcome = saved.record.outcome
    if last is TransferVerdict.ANSWERED:
        human = "transfer_staff" if path == "staff" or retried else "transfer_nurse"
        assert outcome.endswith(human) and saved.record.transfer_target, (answers, outcome)
    else:
        assert outcome == OUTCOMES[last], (answers, outcome)
    told = any(f in text for _, text in rig.call.plays() for f in FAILURE_TOLD)
    assert told == (TransferVerdict.FAILED in answers), (answers, told)


@pytest.mark.parametrize("path", ["staff", "nurse"])
@settings(max_examples=EXAMPLES)
@given(behind_pbx=st.booleans(), steps=FAR_ENDS)
def test_any_far_end_gives_each_refer_one_result_the_caller_lived(
    path: str, behind_pbx: bool, steps: list[Step], tone_dir: Path
) -> None:
    far = Far(behind_pbx, steps)
    rig, engine = _rig(path, far, tone_dir)
    problems = _run(rig, far, path)
    assume(not far.near)
    _check(rig, engine, far, path, problems)


@pytest.mark.parametrize(
    ("path", "behind_pbx", "steps"),
    [
        # A 2xx that keeps the subscription, then the PBX's BYE: put through.
        ("staff", False, [Notify(100, False), Notify(200, False), Bye()]),
        # Behind a PBX, reached nobody, the NOTIFY retransmitted: one result.
        ("staff", True, [Notify(100, False), Notify(486, True), Notify(486, True)]),
        # Behind a PBX, 202 then 503 (the caller's channel ended): reached nobody, the call
        # ends at once, whatever comes after.
        ("nurse", True, [Notify(100, False), Notify(503, False), Notify(200, True), Bye()]),
        # The nurse's REFER never answered (pjsip's 408 at 32 s): staff's is tried and answers.
        (
            "nurse",
            False,
            [Wait(33.0), Notify(100, False, 1), Notify(180, False, 1), Notify(200, True, 1)],
        ),
        # Taken on, ringing past 180 s: a call back, and the late 200 changes nothing.
        ("staff", False, [Notify(100, False), Notify(180, False), Wait(200.0), Notify(200, True)]),
        # The nurse's phone says 486 (active), then 486 (terminated) while staff's REFER
        # waits: that is the nurse's subscription, not staff's answer (staff answers).
        (
            "nurse",
            False,
            [
                Notify(100, False),
                Notify(486, False),
                Notify(486, True),
                Notify(100, False, 1),
                Notify(200, True, 1),
            ],
        ),
    ],
)
def test_hand_picked_far_ends(
    path: str, behind_pbx: bool, steps: list[Step], tone_dir: Path
) -> None:
    far = Far(behind_pbx, steps)
    rig, engine = _rig(path, far, tone_dir)
    problems = _run(rig, far, path)
    assert not far.near
    _check(rig, engine, far, path, problems)
