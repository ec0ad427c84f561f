"""The flash-call channel: a call whose caller-ID ends in the code, cancelled while ringing.

The INVITE carries ``CLINIC_FLASHCALL_PREFIX`` + code in From and P-Asserted-Identity and no
SDP (late offer: no RTP ports). Ringing for ``CLINIC_FLASHCALL_RING_S`` then CANCEL is the
success case (``delivered``: the handset has a missed call to read). An answer is recorded and
hung up at once; every other end (busy, not found, unreachable, no answer, server error, a
worker that died) is ``undeliverable`` and the rules move on at once.

Over UDP the calls are placed by :class:`voice.sip.flash_uac.FlashUac` in this process; a
route over TCP or TLS (``;transport=tcp``, ``sips:``) places them through the SIP workers
(pjsua2). Both report the same :class:`CallEvent` s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from sip_config.settings import SipSettings
from verification.channels.base import Delivery, DeliveryReport, Report
from verification.channels.call_events import describe
from verification.channels.sip_route import sip_target
from verification.model import Channel
from verification.rules import DeliveryKind
from voice.sip.outcome import CallOutcome
from voice.sip.pool import OutboundCall, SipError
from voice.sip.protocol import CallEvent, CallState

log = logging.getLogger(__name__)

# A flash call that never rings is given up after this long (no 180/183); one that rang rings
# its whole CLINIC_FLASHCALL_RING_S, however long (the SIP side drops this wait at the ring).
ANSWER_TIMEOUT_S = 20.0


class PlacedCall(Protocol):
    """A call on its way: its id and its events, the last an ``ended`` CallEvent."""

    @property
    def id(self) -> str: ...

    @property
    def events(self) -> AsyncIterator[object]: ...

    async def hangup(self) -> None:
        """CANCEL the call if it still rings (nothing once it ended)."""
        ...


class Dialer(Protocol):
    """Whatever places the calls: the flash-call agent or the SIP pool."""

    async def place_call(self, call: OutboundCall, /) -> PlacedCall: ...


class FlashCallChannel:
    """Places flash calls through ``dialer``; ``can_dial`` says whether it can now."""

    def __init__(self, settings: SipSettings, dialer: Dialer, can_dial: Callable[[], bool]) -> None:
        self._s = settings
        self._dialer = dialer
        self._can_dial = can_dial

    @property
    def channel(self) -> Channel:
        return Channel.FLASHCALL

    def ready(self) -> bool:
        return bool(self._s.route and self._s.flashcall_prefix) and self._can_dial()

    async def send(self, delivery: Delivery, report: Report) -> None:
        call = OutboundCall(
            target_uri=sip_target(self._s.route, delivery.phone),
            caller_id=self._s.flashcall_prefix + delivery.code,
            flash=True,
            ring_s=self._s.flashcall_ring_s,
            answer_timeout_s=ANSWER_TIMEOUT_S,
        )
        try:
            handle = await self._dialer.place_call(call)
        except SipError as exc:
            await report(DeliveryReport(DeliveryKind.UNDELIVERABLE, f"no SIP capacity: {exc}"))
            return
        log.info("verification %s: flash call %s placed", delivery.verification_id, handle.id)
        try:
            await self._follow(delivery, report, handle)
        except asyncio.CancelledError:
            # The verification ended meanwhile (e.g. the code was typed from an earlier SMS):
            # the missed call is no longer wanted, so the ring is cut short.
            await handle.hangup()
            raise

    async def _follow(self, delivery: Delivery, report: Report, handle: PlacedCall) -> None:
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
