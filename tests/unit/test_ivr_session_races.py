"""``CallSession`` driven by a scripted SIP call, a scripted recogniser and the shipped flows:
races between the caller, the worker's events and the recogniser that must never leave the
engine waiting for an event that does not come (the caller would hear silence until
``MAX_CALL_S``)."""

from __future__ import annotations

import asyncio
import itertools
import shutil
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import pytest

from sip_config.clock import SystemClock
from voice.ivr import engine as eng
from voice.ivr import session as session_module
from voice.ivr.call_record import CallResult
from voice.ivr.flow import FlowParams, FlowSet, load_flows
from voice.ivr.session import CallSession, SessionDeps
from voice.media.asr import AsrError, PartialResult, SpeechResult
from voice.sip.caller_identity import CallerIdentity
from voice.sip.outcome import CallOutcome
from voice.sip.pool import CallHandle
from voice.sip.protocol import CallEvent, CallState, Digit, PlayDone

FLOWS = Path(__file__).resolve().parents[2] / "ivr_flows"
LOUD = b"\x00\x40" * 160  # 20 ms of a loud square-ish signal: past the speech onset
QUIET = b"\x00\x00" * 160


class ScriptedCall:
    """A SIP call handle whose events the test sends; it logs the session's commands."""

    def __init__(self, called: str = "triage") -> None:
        self.id = "call-1"
        self.caller = "+31612345678"
        self.caller_identity = CallerIdentity.CLAIMED  # its own From, as in direct mode
        self.called = called
        self.cut = ""
        self.commands: list[tuple[str, Any]] = []
        self.texts: dict[int, str] = {}  # play id: the prompt's text
        self.loops: set[int] = set()  # play ids played in a loop
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._audio: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._ended = asyncio.Event()
        self._ids = itertools.count(1)
        self.renderer: ScriptedRenderer | None = None

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    async def wait_ended(self, timeout: float | None = None) -> CallOutcome:  # noqa: ASYNC109
        await self._ended.wait()
        return CallOutcome.COMPLETED

    @property
    def events(self) -> AsyncIterator[Any]:
        async def gen() -> AsyncIterator[Any]:
            while True:
                ev = await self._events.get()
                yield ev
                if isinstance(ev, CallEvent) and ev.state is CallState.ENDED:
                    return

        return gen()

    async def answer(self) -> None:
        self.commands.append(("answer", None))

    async def play(self, wav: Path, *, loop: bool = False) -> int:
        play_id = next(self._ids)
        text = self.renderer.texts.get(wav, str(wav)) if self.renderer else str(wav)
        self.texts[play_id] = text
        if loop:
            self.loops.add(play_id)
        self.commands.append(("play", play_id))
        return play_id

    async def stop_play(self) -> None:
        self.commands.append(("stop", None))

    async def start_listen(self) -> None:
        self.commands.append(("listen", None))

    async def audio(self) -> AsyncIterator[bytes]:
        while True:
            chunk = await self._audio.get()
            if chunk is None:
                return
            yield chunk

    async def transfer(self, uri: str, headers: Mapping[str, str] | None = None) -> None:
        self.commands.append(("transfer", uri))

    async def hangup(self, sip_status: int = 0) -> None:
        self.commands.append(("hangup", None))
        self.end()

    # -- the test's side
    def send(self, *events: Any) -> None:
        for ev in events:
            self._events.put_nowait(ev)

    def speak(self, *chunks: bytes) -> None:
        for c in chunks:
            self._audio.put_nowait(c)

    def end(self) -> None:
        if self.ended:
            return
        self._ended.set()
        self._audio.put_nowait(None)
        self._events.put_nowait(CallEvent(self.id, CallState.ENDED, 200, CallOutcome.COMPLETED, 0))

    def plays(self) -> list[tuple[int, str]]:
        return [(pid, self.texts[pid]) for kind, pid in self.commands if kind == "play"]

    def last_play(self) -> tuple[int, str]:
        return self.plays()[-1]


class ScriptedRenderer:
    def __init__(self) -> None:
        self.texts: dict[Path, str] = {}
        self.fail: Callable[[str], bool] = lambda text: False

    async def render(self, text: str, *, voice: str = "en") -> Path:
        await asyncio.sleep(0)
        path = Path(f"/nonexistent/prompt-{len(self.texts)}.wav")
        self.texts[path] = text
        return path

    async def render_private(self, text: str, *, voice: str = "en") -> Path:
        # Through self.render, which a test may replace (a slow or failing text to speech).
        return await self.render(text, voice=voice)


class ScriptedRecogniser:
    """Answers each fed frame from ``script`` (a list of results, then None)."""

    def __init__(self, owner: ScriptedModel, phrases: Sequence[str]) -> None:
        self.owner = owner
        self.phrases = tuple(phrases)
        self.end_of_speech = False
        self.fed = 0

    async def feed(self, pcm: bytes) -> Any:
        self.fed += 1
        gate = self.owner.gate
        if gate is not None:
            await gate.wait()  # a feed still in its thread while the call goes on
        step = self.owner.script.pop(0) if self.owner.script else None
        if isinstance(step, BaseException):
            raise step
        return step

    async def finish(self) -> SpeechResult:
        self.end_of_speech = False
        return SpeechResult("", 0.0)


class ScriptedModel:
    def __init__(self) -> None:
        self.script: list[Any] = []
        self.made: list[ScriptedRecogniser] = []
        self.gate: asyncio.Event | None = None

    def recogniser(self, phrases: Sequence[str], **_: Any) -> ScriptedRecogniser:
        rec = ScriptedRecogniser(self, phrases)
        self.made.append(rec)
        return rec


class Rig:
    def __init__(
        self,
        called: str = "triage",
        speech: bool = True,
        flows: Path = FLOWS,
        params: FlowParams | None = None,
        flowset: FlowSet | None = None,
    ) -> None:
        self.call = ScriptedCall(called)
        self.renderer = ScriptedRenderer()
        self.call.renderer = self.renderer
        self.model = ScriptedModel()
        self.saved: list[CallResult] = []
        flowset = flowset or load_flows(flows)  # given: loaded before (not on a loop)
        params = params or FlowParams(speech_enabled=speech)

        async def post(key: str, values: Mapping[str, str | bool], timeout_s: float) -> Any:
            return {}

        async def save(result: CallResult) -> None:
            self.saved.append(result)

        async def save_recording(call_id: str, started_at: float, pcm: bytes) -> str:
            return "rec-1"

        self.deps = SessionDeps(
            engine=eng.Engine(flowset, params),
            flowset=flowset,
            renderer=cast(Any, self.renderer),
            speech=cast(Any, self.model) if speech else None,
            post_webhook=post,
            save_recording=save_recording,
            save=save,
            keep=save,
            clock=SystemClock(),
        )
        self.session = CallSession(cast(CallHandle, self.call), self.deps)
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.ensure_future(self.session.run())

    async def until(self, what: Callable[[], bool], within_s: float = 2.0) -> None:
        async with asyncio.timeout(within_s):
            while not what():  # noqa: ASYNC110 (polls what the scripted call logged)
                await asyncio.sleep(0.005)

    async def until_prompt(self, words: str, within_s: float = 2.0) -> int:
        def found() -> bool:
            return any(words in text for _, text in self.call.plays())

        await self.until(found, within_s)
        return [pid for pid, text in self.call.plays() if words in text][-1]

    async def settle(self) -> None:
        for _ in range(20):
            await asyncio.sleep(0.005)

    async def finish(self) -> None:
        self.call.end()
        assert self.task is not None
        async with asyncio.timeout(5):
            await self.task


def _digit(key: str) -> Digit:
    return Digit("call-1", key)


def _done(play_id: int) -> PlayDone:
    return PlayDone("call-1", play_id)


async def _to_breathing(rig: Rig) -> int:
    """From the intro to the breathing question, its prompt playing."""
    rig.start()
    intro = await rig.until_prompt("I will ask you a few questions")
    rig.call.send(_done(intro))
    who = await rig.until_prompt("Is this call about yourself")
    rig.call.send(_done(who))
    await rig.settle()
    rig.call.send(_digit("1"))
    return await rig.until_prompt("serious difficulty breathing")


async def test_a_partial_of_a_dropped_recogniser_does_not_stop_the_next_prompt() -> None:
    # The caller talks over the breathing question and presses 1 ("yes") while a frame of
    # that speech is still in the recogniser's thread: the emergency advice starts (nobody
    # may talk over it, its recogniser is dropped), then the frame's partial comes back.
    rig = Rig()
    await _to_breathing(rig)
    rig.model.gate = asyncio.Event()
    rig.call.speak(*[LOUD] * 6)  # past the onset: a frame goes to the recogniser
    await rig.until(lambda: any(r.fed for r in rig.model.made))
    rig.model.script = [PartialResult("yes")]
    rig.call.send(_digit("1"))
    advice = await rig.until_prompt("This may be an emergency")
    rig.model.gate.set()  # the frame's partial result arrives now
    await rig.settle()
    rig.call.send(_done(advice))  # the advice ends (or its stop does)
    await rig.until_prompt("Connecting you to a nurse")
    await rig.finish()


async def test_the_end_of_a_prompt_a_key_beat_is_not_the_end_of_the_next_one() -> None:
    # "1" (yes) to the breathing question just as its prompt ends: the key and the prompt's
    # end are both queued before the engine sees the key. That end must not be taken for the
    # end of the emergency advice that follows (the caller would not hear "call 112 now").
    rig = Rig()
    breathing = await _to_breathing(rig)
    rig.call.send(_digit("1"), _done(breathing))
    advice = await rig.until_prompt("This may be an emergency")
    await rig.settle()
    assert not any("Connecting you" in text for _, text in rig.call.plays()), rig.call.plays()
    rig.call.send(_done(advice))
    await rig.until_prompt("Connecting you to a nurse")
    await rig.finish()


async def test_a_failing_recogniser_after_a_barge_in_does_not_leave_the_call_silent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The caller talks over the question (the partial stops the prompt), then vosk fails to
    # decode: the engine must still hear something, or the caller waits in silence.
    monkeypatch.setattr(session_module, "BARGE_IN_RESULT_S", 0.5)
    rig = Rig()
    breathing = await _to_breathing(rig)
    rig.model.script = [PartialResult("ye"), AsrError("vosk failed to decode audio")]
    rig.call.speak(*[LOUD] * 8)
    await rig.until(lambda: ("stop", None) in rig.call.commands)
    failed = rig.model.made[-1]
    rig.call.send(_done(breathing))  # the stopped prompt's end
    # The question's timeout is 5 s-ish: it must be asked again, or the caller be put through.
    await rig.until(lambda: len(rig.call.plays()) > 3, within_s=15)
    # The call's audio still reaches a recogniser (and would a recording): a new one, for
    # the question asked again.
    rig.call.speak(*[LOUD] * 8)
    await rig.until(lambda: any(r.fed for r in rig.model.made if r is not failed))
    await rig.finish()


async def test_a_barge_in_with_no_final_result_still_ends_in_a_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Noise past the onset threshold gives a partial (the prompt stops), then nothing: the
    # line never goes quiet, vosk's own finals are empty. The question's timeout must run.
    monkeypatch.setattr(session_module, "BARGE_IN_RESULT_S", 0.5)
    rig = Rig()
    breathing = await _to_breathing(rig)
    rig.model.script = [PartialResult("no"), SpeechResult("", 0.0)]
    rig.call.speak(*[LOUD] * 8)
    await rig.until(lambda: ("stop", None) in rig.call.commands)
    rig.call.send(_done(breathing))
    await rig.until(lambda: len(rig.call.plays()) > 3, within_s=15)
    await rig.finish()


async def test_talking_over_a_keypad_menu_is_not_taken_for_an_answer(tmp_path: Path) -> None:
    # A clinic's own flow may make a menu keys only (``mode: keypad``, choices, no digits).
    # Its prompt armed a recogniser all the same: the caller's words stopped the prompt, and
    # their result took the engine out of it with no Listen (speech is off there), so no
    # timeout ever ran. Here the words are nobody's answer and the menu listens for keys.
    flows = tmp_path / "flows"
    shutil.copytree(FLOWS, flows)
    menu_flow = flows / "main_menu.yaml"
    text = menu_flow.read_text()
    keypad = text.replace("  menu:\n    ask:\n", "  menu:\n    ask:\n      mode: keypad\n", 1)
    assert keypad != text
    menu_flow.write_text(keypad)
    rig = Rig(called="6000", flows=flows)
    rig.start()
    welcome = await rig.until_prompt("Welcome")
    rig.call.send(_done(welcome))
    menu = await rig.until_prompt("How can I help")
    rig.model.script = [PartialResult("appoint"), SpeechResult("appointment", 1.0)]
    rig.call.speak(*[LOUD] * 8)
    await rig.settle()
    assert ("stop", None) not in rig.call.commands, "the words stopped a keys-only prompt"
    rig.call.send(_done(menu))
    await rig.until(lambda: rig.session._listening)
    rig.call.send(_digit("1"))  # appointments, by key
    await rig.until_prompt("appointment")
    await rig.finish()


async def test_words_for_a_question_a_key_answered_do_not_answer_the_next_danger_sign() -> None:
    # "No" said and 2 pressed at once at the breathing question: the key answers it, and
    # while the next prompt is made (text to speech takes a while) the words' result reaches
    # the queue, from the recogniser still armed. Given to the engine, it answered the next
    # danger sign (chest pain) "no" as its prompt began: a question the caller never heard,
    # answered the unsafe way.
    rig = Rig()
    breathing = await _to_breathing(rig)
    rig.call.send(_done(breathing))  # heard in full: its "no" key counts
    await rig.until(lambda: rig.session._listening)
    rig.model.gate = asyncio.Event()  # the feed in vosk's thread while the key comes
    rig.model.script = [SpeechResult("no", 1.0)]
    rendering = asyncio.Event()
    rendered = asyncio.Event()
    render = rig.renderer.render

    async def slow_render(text: str, *, voice: str = "en") -> Path:
        if "chest pain" in text:
            rendering.set()
            await rendered.wait()
        return await render(text, voice=voice)

    rig.renderer.render = slow_render  # type: ignore[method-assign]
    rig.call.speak(*[LOUD] * 8)
    await rig.until(lambda: any(r.fed for r in rig.model.made))
    rig.call.send(_digit("2"))
    await rig.until(rendering.is_set)  # the key taken, the next prompt being made
    rig.model.gate.set()
    await rig.settle()  # the words' result queued
    rendered.set()
    await rig.until_prompt("chest pain")
    await rig.settle()
    assert not any("conscious" in text.lower() for _, text in rig.call.plays()), (
        "the chest-pain question was answered by words said before it"
    )
    state = rig.session._state
    assert state is not None and state.node == "chest"
    assert ("breathing", "no") in state.values and not any(
        k == "chest_pain" for k, _ in state.values
    )
    await rig.finish()


async def test_a_command_that_fails_on_a_call_already_ended_is_the_callers_hang_up() -> None:
    """A handle whose commands raise once the call ended (a worker whose pipe is gone): the
    caller hanging up while the first prompt renders left the play to fail, and the record
    said the service broke (cut_error), not that the caller hung up."""
    rig = Rig("appointments")

    async def play(wav: Path, *, loop: bool = False) -> int:
        raise ConnectionError("play: the call has ended")

    async def render(text: str, *, voice: str = "en") -> Path:
        rig.call.end()  # the caller hangs up as the prompt is rendered
        rig.call.play = play  # type: ignore[method-assign]
        return Path("/nonexistent/prompt.wav")

    rig.renderer.render = render  # type: ignore[method-assign]
    rig.start()
    assert rig.task is not None
    async with asyncio.timeout(5):
        await rig.task
    (saved,) = rig.saved
    assert saved.record.outcome != "cut_error", "the caller's hang-up taken for a fault"


async def test_a_goodbye_hang_up_that_fails_on_a_call_just_ended_keeps_the_record() -> None:
    """The service stops: the closing notice plays, and at its end the engine asks for the
    hang-up, then the record. The caller hangs up just then, and a handle whose commands
    raise once the call ended fails the hang-up: the Store after it was never carried out,
    and the engine, the call ended, gives no record again. The call had no record at all."""
    rig = Rig("triage", speech=False)
    rig.start()
    await rig.until(lambda: bool(rig.call.plays()))
    await rig.settle()
    rig.session.close()  # the service stops
    await rig.until(lambda: len(rig.call.plays()) >= 2)
    notice = rig.call.plays()[-1][0]

    async def hangup(sip_status: int = 0) -> None:
        rig.call.end()  # the caller hung up first
        raise ConnectionError("hangup: the call has ended")

    rig.call.hangup = hangup  # type: ignore[method-assign]
    rig.call.send(_done(notice))
    assert rig.task is not None
    async with asyncio.timeout(5):
        await rig.task
    assert len(rig.saved) == 1, "the call has no record"
