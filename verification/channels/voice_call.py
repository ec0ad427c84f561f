"""The voice-call channel: call the number and read the code aloud, twice.

With ``CLINIC_VOICE_OTP_KEYPRESS`` on (the default) the callee must first press 1 (RFC 4733):
a voicemail box that answers never hears the code. Outcomes: ringing, answered, delivered (the
code was read to the end at least once: a callee who hangs up during the repeat, or puts the
call on hold then, has it), undeliverable (busy, no answer, failed, no key pressed, hung up
before the code's end, answered with no audio: a call taken on hold, whose prompts never play,
or a question or code the worker could not play: a reading counts only when it reached its
end, and a question only asks when it played).

A hold (``voice.sip.protocol.Hold``) while the callee is waited for after the question stops
that wait, which runs again in full when they are back (as a clinic-line question's timeout
does): a callee who put the phone on hold there would otherwise come back to a call that had
given up. Bounded: holds are waited out only until :data:`PLAY_TIMEOUT_S` after the wait's
first end, and a callee still on hold then is not reached (nothing can be played to them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from sip_config.settings import SipSettings
from verification.channels.base import Delivery, DeliveryReport, Report
from verification.channels.call_events import CallEnded, describe, next_event
from verification.channels.sip_route import can_send, sip_target
from verification.channels.sms_sip import sender_id
from verification.model import Channel
from verification.rules import DeliveryKind
from verification.wording import wording
from voice.media import spoken_code
from voice.media.private_folder import PrivateFolder
from voice.media.tts import PromptRenderer, TtsError
from voice.sip.pool import CallHandle, OutboundCall, SipError, SipPool
from voice.sip.protocol import CallEvent, CallState, Digit, Hold, PlayDone

log = logging.getLogger(__name__)

ANSWER_TIMEOUT_S = 45.0
KEYPRESS_WAIT_S = 8.0  # after the question has been said, whatever other keys are pressed
KEYPRESS_TRIES = 2
# A prompt (the question, one reading of the code: a few seconds each) that has not ended in
# this time never will: the call has no audio (answered on hold, a=inactive).
PLAY_TIMEOUT_S = 30.0
READINGS = 2
STOPPED_PLAY_S = 2.0  # for the end of a prompt the callee cut short


def longest_call_s(question_s: float, reading_s: float, keypress: bool) -> float:
    """The longest a voice call takes to read its code twice: rung until
    :data:`ANSWER_TIMEOUT_S`, the question (``question_s``) asked :data:`KEYPRESS_TRIES`
    times with its :data:`KEYPRESS_WAIT_S` each (``keypress``), then :data:`READINGS`
    readings of ``reading_s``. A voice step shorter than this moves on (the rules place
    the last channel's call again) while the code is read."""
    asked = KEYPRESS_TRIES * (question_s + KEYPRESS_WAIT_S) if keypress else 0.0
    return ANSWER_TIMEOUT_S + asked + READINGS * reading_s


class _NoAudio(Exception):
    """A prompt did not end within :data:`PLAY_TIMEOUT_S`, or could not start."""

    def __init__(self, reason: str = "") -> None:
        # PLAY_TIMEOUT_S read when raised, not when defined (tests shorten it).
        reason = reason or f"nothing could be played in {PLAY_TIMEOUT_S:g} s (on hold?)"
        super().__init__(reason)
        self.reason = reason


class VoiceCallChannel:
    """Reads codes over a call placed through the SIP pool."""

    def __init__(
        self, settings: SipSettings, pool: SipPool, renderer: PromptRenderer, scratch: PrivateFolder
    ) -> None:
        self._s = settings
        self._pool = pool
        self._tts = renderer
        self._scratch = scratch

    @property
    def channel(self) -> Channel:
        return Channel.VOICE

    def ready(self) -> bool:
        return bool(self._s.route) and can_send(self._pool)

    async def send(self, delivery: Delivery, report: Report) -> None:
        vid = delivery.verification_id
        code_wav: Path | None = None
        try:  # the file says the code: it goes however the send ends, a cancel included
            try:
                words = wording(delivery.locale)
                code_wav = await spoken_code.compose(
                    self._tts,
                    words.head_text(delivery.clinic_name),
                    delivery.code,
                    self._scratch,
                    voice=words.language,
                )
                question = await self._tts.render(
                    words.keypress_text(delivery.clinic_name), voice=words.language
                )
            except TtsError as exc:
                await report(DeliveryReport(DeliveryKind.UNDELIVERABLE, f"speech failed: {exc}"))
                return
            await self._call(delivery, report, code_wav, question)
        finally:
            if code_wav is not None:
                with contextlib.suppress(FileNotFoundError):
                    code_wav.unlink()
                log.debug("verification %s: the private voice file is removed", vid)

    async def _call(
        self, delivery: Delivery, report: Report, code_wav: Path, question: Path
    ) -> None:
        call = OutboundCall(
            target_uri=sip_target(self._s.route, delivery.phone),
            caller_id=sender_id(self._s),
            flash=False,
            answer_timeout_s=ANSWER_TIMEOUT_S,
            pai=True,
        )
        try:
            handle = await self._pool.place_call(call)
        except SipError as exc:
            await report(DeliveryReport(DeliveryKind.UNDELIVERABLE, f"no SIP capacity: {exc}"))
            return
        read = 0  # readings of the code that ended
        try:
            if not await self._until_answered(handle, report):
                return
            if self._s.voice_otp_keypress and not await self._keypress(handle, question):
                await handle.hangup()
                await report(
                    DeliveryReport(
                        DeliveryKind.UNDELIVERABLE, "answered, but 1 was not pressed (voicemail?)"
                    )
                )
                return
            for _ in range(READINGS):  # one file, played twice: each end is known
                await _played(handle, await handle.play(code_wav))
                read += 1
            await handle.hangup()
            await report(DeliveryReport(DeliveryKind.DELIVERED, "code read twice"))
        except CallEnded as ended:
            if read:
                # Heard in full once: hanging up during the repeat is the usual end.
                await report(
                    DeliveryReport(
                        DeliveryKind.DELIVERED,
                        f"code read once, then the call ended: {describe(ended.event)}",
                    )
                )
            else:
                await report(
                    DeliveryReport(
                        DeliveryKind.UNDELIVERABLE,
                        f"call ended before the code: {describe(ended.event)}",
                    )
                )
        except _NoAudio as no_audio:
            await handle.hangup()
            if read:  # heard in full once: the repeat is what did not play
                await report(
                    DeliveryReport(
                        DeliveryKind.DELIVERED, f"code read once, then {no_audio.reason}"
                    )
                )
            else:
                await report(
                    DeliveryReport(DeliveryKind.UNDELIVERABLE, f"answered, but {no_audio.reason}")
                )
        finally:
            if not handle.ended:
                await handle.hangup()

    async def _until_answered(self, handle: CallHandle, report: Report) -> bool:
        while True:
            try:
                ev = await next_event(handle, ANSWER_TIMEOUT_S + 5)
            except CallEnded as ended:
                await report(DeliveryReport(DeliveryKind.UNDELIVERABLE, describe(ended.event)))
                return False
            if ev is None:
                await report(DeliveryReport(DeliveryKind.UNDELIVERABLE, "no answer"))
                return False
            if isinstance(ev, CallEvent) and ev.state is CallState.RINGING:
                await report(DeliveryReport(DeliveryKind.RINGING, f"ringing ({ev.sip_status})"))
            elif isinstance(ev, CallEvent) and ev.state is CallState.ANSWERED:
                await report(DeliveryReport(DeliveryKind.ANSWERED, "answered"))
                return True

    async def _keypress(self, handle: CallHandle, question: Path) -> bool:
        """Whether 1 was pressed: during the question or :data:`KEYPRESS_WAIT_S` after it,
        asked :data:`KEYPRESS_TRIES` times. Other keys do not hold the wait open; a hold
        stops it (see the module's docstring). A question that did not end, or could not be
        played, or a callee still on hold at the holds' bound, raises :class:`_NoAudio`."""
        loop = asyncio.get_running_loop()
        held = False  # the callee holds the call
        for _ in range(KEYPRESS_TRIES):
            asked = await handle.play(question)
            played = False
            paused = False  # the wait after the question stands still for a hold
            latest = 0.0  # holds are waited out until then (once the question was asked)
            deadline = loop.time() + PLAY_TIMEOUT_S
            while (left := deadline - loop.time()) > 0:
                ev = await next_event(handle, left)
                if isinstance(ev, Hold):
                    held = ev.held
                    if played and held and not paused and loop.time() < latest:
                        paused, deadline = True, latest
                    elif played and not held and paused:
                        # Back: the whole wait again, not what was left of it at the hold.
                        paused, deadline = False, loop.time() + KEYPRESS_WAIT_S
                    continue
                if isinstance(ev, Digit) and ev.key == "1":
                    if not played:  # barge-in: stop the question, let its PlayDone pass
                        await handle.stop_play()
                        with contextlib.suppress(_NoAudio):
                            await _played(handle, asked, STOPPED_PLAY_S)
                    return True
                if isinstance(ev, PlayDone) and ev.play_id == asked and not played:
                    if ev.failed:  # nothing was asked: no 1 can answer it
                        raise _NoAudio("the question could not be played")
                    played = True
                    deadline = loop.time() + KEYPRESS_WAIT_S
                    latest = deadline + PLAY_TIMEOUT_S
                    if held:  # the end and a hold crossed: the wait starts when back
                        paused, deadline = True, latest
            if not played:
                raise _NoAudio
            if paused:
                bound_s = KEYPRESS_WAIT_S + PLAY_TIMEOUT_S
                raise _NoAudio(f"still on hold {bound_s:g} s after the question")
        return False


async def _played(handle: CallHandle, play_id: int, timeout_s: float | None = None) -> None:
    """Wait for the end of the play ``play_id`` (keys pressed meanwhile are no answer; the
    late end of an earlier play is not this one's), at most ``timeout_s`` (default
    :data:`PLAY_TIMEOUT_S`)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (PLAY_TIMEOUT_S if timeout_s is None else timeout_s)
    while (left := deadline - loop.time()) > 0:
        ev = await next_event(handle, left)
        if isinstance(ev, PlayDone) and ev.play_id == play_id:
            if ev.failed:  # nothing of it was heard: not a reading of the code
                raise _NoAudio("the code could not be played")
            return
    raise _NoAudio
