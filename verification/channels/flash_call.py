"""The flash-call channel: a call whose caller-ID ends in the code, cancelled while ringing.

The INVITE carries ``CLINIC_FLASHCALL_PREFIX`` + code in From and P-Asserted-Identity and no
SDP (late offer: no RTP ports). Ringing for ``CLINIC_FLASHCALL_RING_S`` then CANCEL is the
success case (``delivered``: the handset has a missed call to read). An answer is recorded and
hung up at once; every other end (busy, not found, unreachable, no answer, server error, a
worker that died) is ``undeliverable`` and the rules move on at once.
"""

from __future__ import annotations

import logging

from sip_config.settings import SipSettings
from verification.channels.base import Delivery, DeliveryReport, Report
from verification.channels.call_events import describe
from verification.channels.sip_route import can_send, sip_target
from verification.model import Channel
from verification.rules import DeliveryKind
from voice.sip.outcome import CallOutcome
from voice.sip.pool import OutboundCall, SipError, SipPool
from voice.sip.protocol import CallEvent, CallState

log = logging.getLogger(__name__)

# A flash call that never rings is given up after this long (no provisional answer).
ANSWER_TIMEOUT_S = 20.0


class FlashCallChannel:
    """Places flash calls through the SIP pool."""

    def __init__(self, settings: SipSettings, pool: SipPool) -> None:
        self._s = settings
        self._pool = pool

    @property
    def channel(self) -> Channel:
        return Channel.FLASHCALL

    def ready(self) -> bool:
        return bool(self._s.route and self._s.flashcall_prefix) and can_send(self._pool)

    async def send(self, delivery: Delivery, report: Report) -> None:
        call = OutboundCall(
            target_uri=sip_target(self._s.route, delivery.phone),
            caller_id=self._s.flashcall_prefix + delivery.code,
            flash=True,
            ring_s=self._s.flashcall_ring_s,
            answer_timeout_s=ANSWER_TIMEOUT_S,
        )
        try:
            handle = await self._pool.place_call(call)
        except SipError as exc:
            await report(DeliveryReport(DeliveryKind.UNDELIVERABLE, f"no SIP capacity: {exc}"))
            return
        log.info("verification %s: flash call %s placed", delivery.verification_id, handle.id)
        async for ev in handle.events:
            if not isinstance(ev, CallEvent):
                continue
            if ev.state is CallState.RINGING:
                await report(DeliveryReport(DeliveryKind.RINGING, f"ringing ({ev.sip_status})"))
            elif ev.state is CallState.ANSWERED:
                await report(DeliveryReport(DeliveryKind.ANSWERED, "answered: hung up at once"))
            elif ev.state is CallState.ENDED:
                if ev.outcome is CallOutcome.CANCELLED_AFTER_RING:
                    await report(
                        DeliveryReport(
                            DeliveryKind.DELIVERED,
                            f"rang {self._s.flashcall_ring_s:g} s and was cancelled",
                        )
                    )
                elif ev.outcome is not CallOutcome.ANSWERED:
                    await report(DeliveryReport(DeliveryKind.UNDELIVERABLE, describe(ev)))
                log.info(
                    "verification %s: flash call %s ended: %s",
                    delivery.verification_id,
                    handle.id,
                    ev.outcome,
                )
