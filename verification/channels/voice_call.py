"""The voice-call channel: call the number and read the code aloud, twice.

With ``CLINIC_VOICE_OTP_KEYPRESS`` on (the default) the callee must first press 1 (RFC 4733):
a voicemail box that answers never hears the code. Outcomes: ringing, answered, delivered (the
code was read to the end), undeliverable (busy, no answer, failed, no key pressed, hung up
before the end).
"""

from __future__ import annotations

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
from voice.media.tts import PromptRenderer, TtsError
from voice.sip.pool import CallHandle, OutboundCall, SipError, SipPool
from voice.sip.protocol import CallEvent, CallState, Digit, PlayDone

log = logging.getLogger(__name__)

ANSWER_TIMEOUT_S = 45.0
KEYPRESS_WAIT_S = 8.0  # after the question has been said
KEYPRESS_TRIES = 2
PLAY_TIMEOUT_S = 60.0


class VoiceCallChannel:
    """Reads codes over a call placed through the SIP pool."""

    def __init__(
        self, settings: SipSettings, pool: SipPool, renderer: PromptRenderer, scratch: Path
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
            await handle.play(code_wav)
            while not isinstance(await next_event(handle, PLAY_TIMEOUT_S), PlayDone | None):
                pass
            await handle.hangup()
            await report(DeliveryReport(DeliveryKind.DELIVERED, "code read twice"))
        except CallEnded as ended:
            await report(
                DeliveryReport(
                    DeliveryKind.UNDELIVERABLE,
                    f"call ended before the code: {describe(ended.event)}",
                )
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
        for _ in range(KEYPRESS_TRIES):
            await handle.play(question)
            played = False
            waited = 0.0
            while True:
                ev = await next_event(handle, 1.0)
                if isinstance(ev, Digit):
                    if ev.key == "1":
                        if not played:  # barge-in: stop the question, let its PlayDone pass
                            await handle.stop_play()
                            while not isinstance(await next_event(handle, 1.0), PlayDone | None):
                                pass
                        return True
                    continue
                if isinstance(ev, PlayDone):
                    played = True
                if ev is None and played:
                    waited += 1.0
                    if waited >= KEYPRESS_WAIT_S:
                        break
        return False
