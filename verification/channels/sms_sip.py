"""SMS over SIP: the text as a SIP MESSAGE (RFC 3428) to the route. 2xx is delivered."""

from __future__ import annotations

import logging

from sip_config.settings import SipSettings
from verification.channels.base import Delivery, DeliveryReport, Report, sms_text
from verification.channels.sip_route import can_send, sip_target
from verification.model import Channel
from verification.rules import DeliveryKind
from voice.sip.pool import SipPool

log = logging.getLogger(__name__)

MESSAGE_TIMEOUT_S = 10.0


def sender_id(settings: SipSettings) -> str:
    """Who SIP messages and voice-code calls come from."""
    return settings.voice_otp_from or settings.user or "clinic"


class SipSmsChannel:
    """The SMS channel over SIP MESSAGE."""

    def __init__(self, settings: SipSettings, pool: SipPool) -> None:
        self._s = settings
        self._pool = pool

    @property
    def channel(self) -> Channel:
        return Channel.SMS

    def ready(self) -> bool:
        return bool(self._s.route) and can_send(self._pool)

    async def send(self, delivery: Delivery, report: Report) -> None:
        status = await self._pool.send_message(
            sip_target(self._s.route, delivery.phone),
            sender_id(self._s),
            sms_text(delivery),
            timeout_s=MESSAGE_TIMEOUT_S,
        )
        if 200 <= status < 300:
            await report(DeliveryReport(DeliveryKind.DELIVERED, f"MESSAGE answered {status}"))
        else:
            log.warning("verification %s: MESSAGE answered %s", delivery.verification_id, status)
            await report(DeliveryReport(DeliveryKind.UNDELIVERABLE, f"MESSAGE answered {status}"))
