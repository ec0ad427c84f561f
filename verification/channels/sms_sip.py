"""SMS over SIP: the text as a SIP MESSAGE (RFC 3428) to the route. 2xx is delivered; a 202
says so in its detail: accepted, delivery not confirmed."""

from __future__ import annotations

import logging

from sip_config.settings import SIP_MESSAGE_WAIT_S, SipSettings
from verification.channels.base import Delivery, DeliveryReport, Report, sms_text
from verification.channels.sip_route import can_send, sip_target
from verification.model import Channel
from verification.rules import DeliveryKind
from voice.sip.outcome import SipStatus
from voice.sip.pool import SipPool

log = logging.getLogger(__name__)

# pjsip gives up on a MESSAGE without a final answer after 32 s (RFC 3261 Timer F, 64 x T1)
# and answers it 408 itself; this only bounds a worker that never says. A gateway may be slow
# to answer and still deliver: giving up sooner (10 s) sent the next channel's code as well.
MESSAGE_TIMEOUT_S = SIP_MESSAGE_WAIT_S

# RFC 3428 section 7: a 202 says a relay (a gateway, a store-and-forward server) took the
# MESSAGE, not that it reached the phone. Asterisk answers every MESSAGE it routes 202 before
# its dialplan's MessageSend tries the phone, and drops it when the phone is not registered
# (res_pjsip_messaging: the 202 goes out before the message is queued to the dialplan). The
# send did all it can, as an HTTP gateway's 202 (so the step is not sent again for want of
# an outcome), but its event must not read as a phone's 200.
ACCEPTED_DETAIL = "MESSAGE accepted (202): delivery not confirmed"


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
        if status == SipStatus.ACCEPTED:
            await report(DeliveryReport(DeliveryKind.DELIVERED, ACCEPTED_DETAIL))
            return
        if 200 <= status < 300:
            await report(DeliveryReport(DeliveryKind.DELIVERED, f"MESSAGE answered {status}"))
            return
        # 408: nobody answered (pjsip's own timeout, or this channel's), not a gateway's word.
        said = (
            "no final answer to the MESSAGE (408)"
            if status == 408
            else f"MESSAGE answered {status}"
        )
        log.warning("verification %s: %s", delivery.verification_id, said)
        await report(DeliveryReport(DeliveryKind.UNDELIVERABLE, said))
