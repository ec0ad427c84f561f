"""Generated stories of the SIP channels: from what the far end (or the SIP worker) does, through
the channel adapter, to the verification's events (pure: no socket, no pjsua2, no Redis).

* flash call: the real :class:`FlashDialog` (the UDP flash calls' SIP state machine) against a
  generated far end (100/180/183 repeated and in any order, 2xx, every final class with 401
  challenges, 3xx, 404, 480, 486, 487, 488, 503 with Retry-After, 603, 604, silence: timer B
  or the answer timeout), its events read by :class:`FlashCallChannel` through its ``Dialer``
  seam, each report applied by :func:`rules.delivery`;
* voice call and SMS over SIP: the real :class:`SipPool` and :class:`CallHandle`, whose worker
  process is scripted at its pipe (typed protocol lines both ways, as
  tests/unit/test_sip_occupancy.py sets the pool up): ringing, answers, every final, the
  worker's own answer timeout, a transport error (no status), a worker lost mid-call (the
  pool's own exit handling), a worker that never says, keys (1, others, ``*`` as a try to
  repeat), prompts that end or never do (on hold), hang-ups before, during and after the
  code, events after the end; on a loop whose clock jumps to the next timer.

Checked for every story: exactly one terminal report per send, and it is the last; a flash
call is ``delivered`` only when it rang and was cancelled, never when answered (its events
say "answered: hung up at once"); a voice call is ``delivered`` exactly when the code was
read to its end at least once (README "Channels") and, with the keypress on, 1 was pressed;
an SMS over SIP exactly on a 2xx; "undeliverable" falls back to the next channel at once with
the channel's reason in the ``fallback`` event; a number that does not exist (404, 484, 604)
and a busy or unreachable one (486, 600, 480, 408, 503) are told apart in the event's detail;
events are time-ordered and never hold the code; a report after the verification is final
changes nothing.

Deterministic by default (tests/unit/conftest.py's "unit" profile); HYPOTHESIS_PROFILE=deep
searches further.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from sip_config.clock import FakeClock
from sip_config.settings import SipSettings
from tests.conftest import sip_settings
from tests.unit.test_media_spoken_code import SilentRenderer
from tests.unit.test_prop_session import VirtualLoop, _inline
from verification import rules
from verification.channels.base import Delivery, DeliveryReport
from verification.channels.flash_call import FlashCallChannel
from verification.channels.sms_sip import MESSAGE_TIMEOUT_S, SipSmsChannel
from verification.channels.voice_call import VoiceCallChannel
from verification.model import Channel, EventKind, NumberKind, Phone, Policy, Status, Verification
from verification.rules import DeliveryKind
from voice.media.private_folder import PrivateFolder
from voice.sip import message
from voice.sip.flash_dialog import FlashDialog, Local
from voice.sip.outcome import CallOutcome, outcome_for_status
from voice.sip.pool import OutboundCall, SipPool, until_ended
from voice.sip.protocol import (
    CallEvent,
    CallState,
    Digit,
    Hangup,
    MessageResult,
    PlaceCall,
    Play,
    PlayDone,
    SendMessage,
    StopPlay,
    WorkerStatus,
    decode,
)

PHONE = Phone("+31612345678", "NL", 31, "612345678", NumberKind.MOBILE)
POLICY = Policy()
T0 = 1_800_000_000.0
CODES = st.text("0123456789", min_size=6, max_size=6)
TERMINAL = (DeliveryKind.DELIVERED, DeliveryKind.UNDELIVERABLE)
# What the README's channel table names for each final status class.
NOT_FOUND = {404, 484, 604}
BUSY = {486, 600}
UNREACHABLE = {408, 480, 503}
FINALS = [300, 302, 401, 403, 404, 408, 480, 484, 486, 487, 488, 500, 503, 600, 603, 604, 699]


def _settings(**changes: Any) -> SipSettings:
    return sip_settings(
        1,
        route="sip:{e164}@127.0.0.1:5090;transport=tcp",
        flashcall_prefix="+447400",
        **changes,
    )


# -- the verification side: every report through the rules ----------------------------------


@dataclass
class Ledger:
    """The verification a send reports on, each report applied as the dispatcher does."""

    channel: Channel
    now: Callable[[], float]
    final_after: int | None  # the verification is approved after this many reports
    v: Verification = field(init=False)
    reports: list[DeliveryReport] = field(default_factory=list)
    steps: list[tuple[DeliveryReport, Verification, rules.Transition]] = field(default_factory=list)

    def __post_init__(self) -> None:
        other = Channel.VOICE if self.channel is Channel.SMS else Channel.SMS
        made = rules.create(
            verification_id="V" * 32,
            phone=PHONE,
            plan=(self.channel, other),
            code_length=6,
            now=T0,
            policy=POLICY,
        )
        assert made.send is self.channel
        self.v = rules.code_sent(made.verification, 0, "hmac", T0).verification

    async def report(self, r: DeliveryReport) -> None:
        self.reports.append(r)
        before = self.v
        t = rules.delivery(before, 0, r.kind, r.detail, now=self.now(), policy=POLICY)
        self.steps.append((r, before, t))
        self.v = t.verification
        if self.final_after == len(self.reports) and self.v.status is Status.PENDING:
            self.v = rules.check(self.v, True, self.now(), POLICY)[0].verification


def _check_ledger(ledger: Ledger, code: str, *, may_end_unsaid: bool = False) -> None:
    """What holds for every send: one terminal report, last; the rules' mapping of each."""
    kinds = [r.kind for r in ledger.reports]
    terminal = [k for k in kinds if k in TERMINAL]
    if may_end_unsaid and not terminal:
        assert kinds and kinds[-1] is DeliveryKind.ANSWERED, kinds
    else:
        assert len(terminal) == 1, f"one terminal report per send: {kinds}"
        assert kinds[-1] in TERMINAL, f"nothing after the terminal report: {kinds}"
    assert kinds.count(DeliveryKind.ANSWERED) <= 1, kinds
    if DeliveryKind.ANSWERED in kinds:
        assert kinds.index(DeliveryKind.ANSWERED) > max(
            (i for i, k in enumerate(kinds) if k is DeliveryKind.RINGING), default=-1
        ), f"ringing after the answer: {kinds}"
    for r, before, t in ledger.steps:
        after = t.verification
        if before.status.final:
            assert after == before and t.send is None, "a report changed a final verification"
            continue
        new = after.events[len(before.events) :]
        assert new[0].kind.value == r.kind.value and new[0].detail == r.detail
        if r.kind is DeliveryKind.UNDELIVERABLE:
            assert [e.kind for e in new] == [EventKind.UNDELIVERABLE, EventKind.FALLBACK]
            assert new[1].detail == f"{ledger.channel}: {r.detail}", "the reason is in events"
            assert after.step == 1 and t.send is after.channels[1], "the next channel at once"
        else:
            assert len(new) == 1 and after.step == 0 and t.send is None
            assert after.sending is (r.kind is not DeliveryKind.DELIVERED)
    events = ledger.v.events
    assert all(a.at <= b.at for a, b in itertools.pairwise(events)), "events out of time"
    for e in events:
        assert code not in e.detail, f"the code in an event: {e}"


def _check_detail(detail: str, status: int) -> None:
    """The event's detail tells a number that does not exist from a busy or absent phone."""
    if status in NOT_FOUND:
        assert detail == f"not_found ({status})", detail
    elif status in BUSY:
        assert detail == f"busy ({status})", detail
    elif status in UNREACHABLE:
        assert detail == f"unreachable ({status})", detail


# -- flash calls: the real SIP state machine against a generated far end ---------------------

PROVISIONAL = st.sampled_from([100, 180, 183])
FAR_KINDS = ["provisional"] * 3 + ["wait"] * 2 + ["final", "answer", "again"]


def _far_end_act(kind: str) -> st.SearchStrategy[tuple[str, float, str]]:
    if kind == "provisional":  # a To tag or none; "b" after "a": another fork
        return st.tuples(st.just(kind), PROVISIONAL, st.sampled_from(["", "a", "b"]))
    if kind == "final":
        return st.tuples(st.just(kind), st.sampled_from([200, *FINALS]), st.sampled_from("ab"))
    if kind == "answer":  # a 2xx (of one fork or another)
        return st.tuples(st.just("final"), st.sampled_from([200, 202]), st.sampled_from("ab"))
    if kind == "wait":
        return st.tuples(st.just(kind), st.sampled_from([0.3, 1.0, 2.5, 10.0, 40.0]), st.just(""))
    return st.just((kind, 0.0, ""))  # the last response once more


FAR_END = st.lists(st.sampled_from(FAR_KINDS).flatmap(_far_end_act), max_size=10)


class FlashFarEnd:
    """Drives one :class:`FlashDialog`: answers its requests from a script, and time."""

    def __init__(self, spec: PlaceCall) -> None:
        counter = itertools.count(1)
        self.now = 100.0
        self.dialog = FlashDialog(
            spec,
            Local("127.0.0.1", 5999, "trunk", "secret"),
            token=lambda: f"{next(counter):016x}",
            wall=lambda: T0 + self.now,
        )
        self.events: list[CallEvent] = []
        self.invite: message.SipMessage | None = None
        self.last: bytes | None = None
        self.rang = False  # a 180/183 reached the dialog before the end (its oracle)
        self.answered = False
        self._take(self.dialog.start(self.now))

    def _take(self, step: Any) -> None:
        self.events += step.events
        for raw in step.send:
            req = message.parse(raw)
            if req.method == "INVITE":
                self.invite = req
            elif req.method in ("BYE", "CANCEL"):  # answered at once, 487 for the CANCEL
                self._respond(message.serialise_response(req, 200, to_tag="a"))
                if req.method == "CANCEL" and self.invite is not None:
                    self._respond(message.serialise_response(self.invite, 487, to_tag="a"))

    def _respond(self, raw: bytes) -> None:
        self.last = raw
        self._take(self.dialog.on_response(message.parse(raw), self.now))

    def act(self, what: str, value: float, tag: str) -> None:
        if self.dialog.done:
            return
        if what == "wait":
            self.advance(value)
        elif what == "again":
            if self.last is not None:
                self._respond(self.last)
        elif self.invite is not None:
            status = int(value)
            extra: tuple[tuple[str, str], ...] = ()
            if status == 503:
                extra = (("Retry-After", "120"),)
            elif status == 401:
                extra = (("WWW-Authenticate", 'Digest realm="pbx", nonce="n1", qop="auth"'),)
            if status in (180, 183) and not any(e.state is CallState.ENDED for e in self.events):
                self.rang = True
            self.answered |= 200 <= status < 300
            self._respond(message.serialise_response(self.invite, status, to_tag=tag, extra=extra))

    def advance(self, seconds: float) -> None:
        until = self.now + seconds
        while not self.dialog.done and self.dialog.deadline is not None:
            if self.dialog.deadline > until:
                break
            self.now = max(self.now, self.dialog.deadline)
            self._take(self.dialog.on_timer(self.now))
        self.now = until

    def finish(self) -> None:
        for _ in range(1000):
            if self.dialog.done:
                return
            self.advance(5.0)
        raise AssertionError("the flash call never ended")


class ScriptedDial:
    """The ``Dialer`` seam: the channel's own call is placed with the real dialog against the
    scripted far end; its events go to the channel, and some more after the end."""

    def __init__(self, script: Sequence[tuple[str, float, str]], after: Sequence[CallState]):
        self._script = script
        self._after = after
        self._queue: asyncio.Queue[CallEvent] = asyncio.Queue()
        self.far: FlashFarEnd | None = None
        self.read: list[CallEvent] = []
        self.hangups = 0

    async def place_call(self, call: OutboundCall, /) -> ScriptedDial:
        assert call.flash
        far = self.far = FlashFarEnd(call.command("flash-1"))
        for what, value, tag in self._script:
            far.act(what, value, tag)
        far.finish()
        late = [CallEvent("flash-1", s, 200, CallOutcome.COMPLETED, T0 + 999) for s in self._after]
        for ev in (*far.events, *late):
            self._queue.put_nowait(ev)
        return self

    @property
    def id(self) -> str:
        return "flash-1"

    @property
    def events(self) -> AsyncIterator[object]:
        async def gen() -> AsyncIterator[object]:
            async for ev in until_ended(self._queue):
                self.read.append(ev)
                yield ev

        return gen()

    async def hangup(self) -> None:
        self.hangups += 1


@given(
    code=CODES,
    ring_s=st.sampled_from([0.5, 3.0, 15.0, 25.0, 60.0]),  # CLINIC_FLASHCALL_RING_S: 0.5..60
    far_end=FAR_END,
    after=st.lists(st.sampled_from(list(CallState)), max_size=3),
    final_after=st.none() | st.integers(1, 3),
)
def test_any_flash_call_maps_to_one_outcome_and_the_rules_move_on(
    code: str,
    ring_s: float,
    far_end: list[tuple[str, float, str]],
    after: list[CallState],
    final_after: int | None,
) -> None:
    dial = ScriptedDial(far_end, after)
    ledger = Ledger(Channel.FLASHCALL, lambda: dial.read[-1].at, final_after)
    settings = replace(_settings(), flashcall_ring_s=ring_s)
    channel = FlashCallChannel(settings, cast(Any, dial), lambda: True)
    delivery = Delivery("V" * 32, PHONE, code, "en", "the clinic")
    asyncio.run(channel.send(delivery, ledger.report))
    far = dial.far
    assert far is not None
    ended = [e for e in far.events if e.state is CallState.ENDED]
    assert len(ended) == 1, far.events
    end = ended[0]

    kinds = [r.kind for r in ledger.reports]
    event(f"flash: {end.outcome} -> {kinds[-1]}")
    _check_ledger(ledger, code, may_end_unsaid=end.outcome is CallOutcome.ANSWERED)
    assert dial.read[-1] is end, "events after the end were read"
    if DeliveryKind.ANSWERED in kinds:
        assert DeliveryKind.DELIVERED not in kinds, "an answered flash call counted delivered"
        assert ledger.reports[kinds.index(DeliveryKind.ANSWERED)].detail == (
            "answered: hung up at once"
        )
    if DeliveryKind.DELIVERED in kinds:
        assert far.rang and end.outcome is CallOutcome.CANCELLED_AFTER_RING
        assert DeliveryKind.RINGING in kinds, "delivered without ringing"
    if end.outcome is CallOutcome.ANSWERED:
        assert far.answered and kinds[-1] is DeliveryKind.ANSWERED
    elif end.outcome is not CallOutcome.CANCELLED_AFTER_RING:
        assert kinds[-1] is DeliveryKind.UNDELIVERABLE
        _check_detail(ledger.reports[-1].detail, end.sip_status)
    if not far.rang:
        assert DeliveryKind.DELIVERED not in kinds, "delivered without a 180/183"
    else:  # it rang: CLINIC_FLASHCALL_RING_S, not the wait for a first ring, ends it
        assert end.outcome is not CallOutcome.NO_ANSWER, f"rang, then cut as {end}"


# -- voice calls and SMS over SIP: the real pool, its worker scripted at the pipe ---------------

KEYS = st.sampled_from(["1", "1", "2", "*", "#"])


@dataclass(frozen=True)
class CallStory:
    """What the far end and the worker do with one voice-code call."""

    early: tuple[tuple[float, int], ...]  # (delay, 100/180/183) before the end of ringing
    end_early: tuple[str, float, int]  # answer | final | timeout | transport | lost | silent
    keys: tuple[tuple[float, str], ...]  # (seconds after the answer, key)
    prompt_s: float  # how long a prompt plays; 0: never ends (on hold)
    hold_after: int | None  # plays after this many never end (put on hold mid-call)
    fails: frozenset[int]  # plays (1 = the first) that cannot start: PlayDone at once
    hangs_up: tuple[str, float] | None  # (hangup | lost, seconds after the answer)
    after: bool  # events for the call after its end


END_KINDS = ["answer"] * 6 + ["final", "final", "timeout", "transport", "lost", "silent"]


def _end_early(kind: str) -> st.SearchStrategy[tuple[str, float, int]]:
    if kind == "answer":
        return st.tuples(st.just(kind), st.sampled_from([0.1, 5.0, 40.0]), st.just(200))
    if kind == "final":
        return st.tuples(st.just(kind), st.sampled_from([0.1, 10.0]), st.sampled_from(FINALS))
    return st.just((kind, 1.0, 0))


STORIES = st.builds(
    CallStory,
    early=st.lists(st.tuples(st.sampled_from([0.0, 0.5, 3.0]), PROVISIONAL), max_size=4).map(tuple),
    # Answered calls (where the code is read, or not) one time in two.
    end_early=st.sampled_from(END_KINDS).flatmap(_end_early),
    keys=st.lists(
        st.tuples(st.sampled_from([0.0, 1.0, 3.0, 9.0, 14.0, 30.0]), KEYS), max_size=4
    ).map(tuple),
    prompt_s=st.sampled_from([0.0, 2.0, 2.0, 4.0]),
    hold_after=st.none() | st.integers(1, 3),
    fails=st.frozensets(st.integers(1, 4), max_size=2) | st.just(frozenset()),
    hangs_up=st.none()
    | st.tuples(
        st.sampled_from(["hangup", "lost"]),
        st.sampled_from([0.5, 2.0, 4.5, 7.0, 9.0, 12.0, 60.0]),
    ),
    after=st.booleans(),
)


class _Pipe:
    """A worker's stdin: each line the pool writes is one command to the scripted worker."""

    def __init__(self, on_command: Callable[[Any], None]) -> None:
        self._on_command = on_command

    def write(self, data: bytes) -> None:
        self._on_command(decode(data))


class _Process:
    returncode = None

    def __init__(self, stdin: _Pipe) -> None:
        self.stdin = stdin


class ScriptedWorker:
    """One SIP worker process, scripted at its pipes; what it says goes through the pool's
    own reading (``_dispatch``) and exit handling (``_on_exit``)."""

    def __init__(self, pool: SipPool, story: CallStory, code_dir: Path) -> None:
        self.pool = pool
        self.story = story
        self.code_dir = code_dir
        self.w = pool._workers[0]
        self.w.up, self.w.free_slots, self.w.port = True, 4, 6001
        self.w.process = cast(Any, _Process(_Pipe(self.command)))
        pool._slots_max = 4
        pool._running = True
        self.call_id = ""
        self.answered = False
        self.ended = False
        self.current: int | None = None  # the play the callee hears
        self.code_plays: set[int] = set()
        self.code_heard = 0  # code readings that reached their end
        self.plays = 0
        self.pressed_1 = False
        self.hangups = 0
        self.messages: list[SendMessage] = []

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def say(self, ev: Any) -> None:
        self.pool._dispatch(self.w, ev)

    def later(self, delay: float, fn: Callable[[], None]) -> None:
        self.loop.call_later(delay, fn)

    def end(self, status: int, outcome: CallOutcome | None) -> None:
        if self.ended:
            return
        self.ended = True
        self.say(CallEvent(self.call_id, CallState.ENDED, status, outcome, self.loop.time()))
        if self.story.after:  # the pool has forgotten the call: these go nowhere
            self.say(PlayDone(self.call_id, 99))
            self.say(Digit(self.call_id, "1"))
            self.say(CallEvent(self.call_id, CallState.ANSWERED, 200, None, self.loop.time()))

    def lose(self) -> None:
        if self.ended:
            return
        self.ended = True
        self.pool._on_exit(self.w, -9)  # every call of the worker ends worker_lost
        self.pool._running = False  # no restart of a real process

    # -- commands --------------------------------------------------------------------------
    def command(self, cmd: Any) -> None:
        if isinstance(cmd, PlaceCall):
            self.call_id = cmd.call_id
            self.later(0, lambda: self.placed(cmd))
        elif isinstance(cmd, SendMessage):
            self.messages.append(cmd)
        elif isinstance(cmd, Play):
            self.later(0, lambda: self.play(cmd))
        elif isinstance(cmd, StopPlay):
            self.later(0, self.stop)
        elif isinstance(cmd, Hangup):
            self.hangups += 1
            self.later(0.05, lambda: self.end(200 if self.answered else 487, self.bye_outcome()))

    def bye_outcome(self) -> CallOutcome:
        return outcome_for_status(
            487, answered=self.answered, cancelled_by_us=not self.answered, flash=False
        )

    def placed(self, cmd: PlaceCall) -> None:
        self.say(WorkerStatus(3, 6001, 1))
        self.say(CallEvent(cmd.call_id, CallState.TRYING, 0, None, self.loop.time()))
        t = 0.0
        for delay, status in self.story.early:
            t += delay
            state = CallState.TRYING if status == 100 else CallState.RINGING
            self.later(t, lambda s=state, st_=status: self.early(s, st_))  # type: ignore[misc]
        what, delay, status = self.story.end_early
        t += delay
        if what == "answer":
            self.later(t, self.answer)
        elif what == "final":
            self.later(
                t,
                lambda: self.end(
                    status, outcome_for_status(status, answered=False, cancelled_by_us=False)
                ),
            )
        elif what == "timeout":  # the worker's own answer timeout (pjsua.py: _end(call, 0))
            self.later(cmd.answer_timeout_s, lambda: self.end(0, CallOutcome.NO_ANSWER))
        elif what == "transport":  # no final status at all
            self.later(
                t, lambda: self.end(0, outcome_for_status(0, answered=False, cancelled_by_us=False))
            )
        elif what == "lost":
            self.later(t, self.lose)
        # "silent": the worker never says anything more about this call

    def early(self, state: CallState, status: int) -> None:
        if not self.answered and not self.ended:
            self.say(CallEvent(self.call_id, state, status, None, self.loop.time()))

    def answer(self) -> None:
        if self.ended:
            return
        self.answered = True
        self.say(CallEvent(self.call_id, CallState.ANSWERED, 200, None, self.loop.time()))
        for delay, key in self.story.keys:
            self.later(delay, lambda k=key: self.key(k))  # type: ignore[misc]
        if self.story.hangs_up is not None:
            how, delay = self.story.hangs_up
            self.later(
                delay, self.lose if how == "lost" else lambda: self.end(200, CallOutcome.COMPLETED)
            )

    def key(self, key: str) -> None:
        if not self.ended:
            self.pressed_1 |= key == "1"
            self.say(Digit(self.call_id, key))

    def play(self, cmd: Play) -> None:
        if self.ended:
            return
        self.plays += 1
        if self.current is not None:  # replaced
            self.say(PlayDone(self.call_id, self.current))
            self.current = None
        if self.plays in self.story.fails:  # pjsua2 could not open or send it (pjsua.py)
            self.say(PlayDone(self.call_id, cmd.play_id, failed=True))
            return
        self.current = cmd.play_id
        if Path(cmd.path).parent == self.code_dir:
            self.code_plays.add(cmd.play_id)
        held = self.story.hold_after is not None and self.plays > self.story.hold_after
        if self.story.prompt_s and not held:
            self.later(self.story.prompt_s, lambda: self.play_ends(cmd.play_id))

    def play_ends(self, play_id: int) -> None:
        if not self.ended and self.current == play_id:
            self.current = None
            if play_id in self.code_plays:
                self.code_heard += 1
            self.say(PlayDone(self.call_id, play_id))

    def stop(self) -> None:
        if not self.ended and self.current is not None:
            play_id, self.current = self.current, None
            self.say(PlayDone(self.call_id, play_id))


def _run(coro_fn: Callable[[], Any]) -> None:
    """Run on a virtual-time loop; no task may outlive it, and none may fail unseen."""
    loop = VirtualLoop()
    problems: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: problems.append(context))
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(asyncio, "to_thread", _inline)
            loop.run_until_complete(coro_fn())
            loop.run_until_complete(asyncio.sleep(1.0))  # the worker's last replies
            loop.cancel_left()
    finally:
        loop.close()
    assert not problems, problems


def voice_call_story(
    code_dir: Path, code: str, story: CallStory, keypress: bool, final_after: int | None = None
) -> tuple[ScriptedWorker, Ledger]:
    """One voice-code send through the real pool to the scripted worker: the worker, and the
    verification its reports made. ``code_dir``: the folder the code's file is written to,
    ``private`` in a data dir (PrivateFolder's fallback, with no tmpfs): a play from
    anywhere else is not the code's."""
    assert code_dir.name == "private", "the worker would take no play for the code's"
    state: dict[str, Any] = {}

    async def one() -> None:
        loop = asyncio.get_running_loop()
        pool = SipPool(_settings(), clock=FakeClock(), queue_timeout_s=0)
        worker = ScriptedWorker(pool, story, code_dir)
        ledger = Ledger(Channel.VOICE, lambda: T0 + loop.time() - 1000.0, final_after)
        renderer = SilentRenderer(code_dir.parent)
        s = replace(_settings(), voice_otp_keypress=keypress)
        private = PrivateFolder(code_dir.parent, None, temp_root=code_dir.parent)
        channel = VoiceCallChannel(s, pool, cast(Any, renderer), private)
        await channel.send(Delivery("V" * 32, PHONE, code, "en", "the clinic"), ledger.report)
        state.update(worker=worker, ledger=ledger)

    _run(one)
    return state["worker"], state["ledger"]


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("voice-codes") / "private"  # PrivateFolder's, no tmpfs


# A voice call is ~10 ms here: three times the unit profile's count (a few seconds).
@settings(max_examples=max(300, settings().max_examples))
@given(code=CODES, story=STORIES, keypress=st.booleans(), final_after=st.none() | st.integers(1, 4))
def test_any_voice_call_is_delivered_only_when_the_code_was_read_to_its_end(
    code_dir: Path, code: str, story: CallStory, keypress: bool, final_after: int | None
) -> None:
    worker, ledger = voice_call_story(code_dir, code, story, keypress, final_after)
    _check_ledger(ledger, code)
    kinds = [r.kind for r in ledger.reports]
    last = ledger.reports[-1]
    event(f"voice: {last.kind}: {last.detail.split(':')[0]}")
    assert (last.kind is DeliveryKind.DELIVERED) == (worker.code_heard > 0), (
        f"{last} with {worker.code_heard} full reading(s) of the code"
    )
    if last.kind is DeliveryKind.DELIVERED and keypress:
        assert worker.pressed_1, "delivered with no 1 pressed"
    assert (DeliveryKind.ANSWERED in kinds) == worker.answered or worker.ended
    assert worker.ended or worker.hangups, "the channel left the call up"
    assert not list(code_dir.glob("code-*.wav")), "the spoken code outlived its send"
    what, _, status = story.end_early
    if what == "final":
        assert last.kind is DeliveryKind.UNDELIVERABLE
        _check_detail(last.detail, status)


MESSAGE_ANSWERS = ["status"] * 5 + ["lost", "silent", "no worker"]


@settings(max_examples=max(150, settings().max_examples))
@given(
    code=CODES,
    answer=st.sampled_from(MESSAGE_ANSWERS).flatmap(
        lambda kind: st.tuples(
            st.just(kind),
            st.sampled_from([200, 202, 299, *FINALS]) if kind == "status" else st.just(0),
        )
    ),
    delay=st.sampled_from([0.0, 1.0, 31.0]),
)
def test_any_sip_message_maps_to_one_report(
    code: str, answer: tuple[str, int], delay: float
) -> None:
    state: dict[str, Any] = {}
    story = CallStory((), ("silent", 0, 0), (), 0, None, frozenset(), None, False)

    async def one() -> None:
        loop = asyncio.get_running_loop()
        pool = SipPool(_settings(), clock=FakeClock(), queue_timeout_s=0)
        worker = ScriptedWorker(pool, story, Path("/nonexistent"))
        if answer[0] == "no worker":
            worker.w.up = False
        ledger = Ledger(Channel.SMS, lambda: T0 + loop.time() - 1000.0, None)
        channel = SipSmsChannel(_settings(), pool)
        send = asyncio.create_task(
            channel.send(Delivery("V" * 32, PHONE, code, "en", "the clinic"), ledger.report)
        )
        await asyncio.sleep(0)
        if worker.messages:
            request = worker.messages[-1]
            assert code in request.text  # the SMS holds the code; its events must not
            if answer[0] == "status":
                loop.call_later(delay, worker.say, MessageResult(request.request_id, answer[1]))
            elif answer[0] == "lost":
                loop.call_later(delay, worker.lose)
        await send
        state.update(ledger=ledger, sent=bool(worker.messages), began=loop.time())

    _run(one)
    ledger: Ledger = state["ledger"]
    _check_ledger(ledger, code)
    (report,) = ledger.reports
    event(f"sms: {report.kind}")
    kind, status = answer
    if kind == "status" and delay < MESSAGE_TIMEOUT_S:
        assert (report.kind is DeliveryKind.DELIVERED) == (200 <= status < 300), report
        assert str(status) in report.detail
    else:
        assert report.kind is DeliveryKind.UNDELIVERABLE, report
    if kind == "silent":
        assert report.detail == "no final answer to the MESSAGE (408)"
