"""SMS through an HTTP gateway: POST ``{"to", "text"}`` with a bearer token.

2xx is delivered (the gateway accepted it); 4xx other than 408/429 is undeliverable at once;
timeouts, 408, 429 and 5xx are retried with backoff, then undeliverable.
"""

from __future__ import annotations

import asyncio
import logging
import random

import aiohttp

from sip_config.settings import SmsSettings
from verification.channels.base import Delivery, DeliveryReport, Report, sms_text
from verification.model import Channel
from verification.rules import DeliveryKind

log = logging.getLogger(__name__)

_RETRYABLE = {408, 425, 429}


class HttpSmsChannel:
    """The SMS channel over an HTTP gateway."""

    def __init__(self, settings: SmsSettings, session: aiohttp.ClientSession) -> None:
        self._s = settings
        self._session = session

    @property
    def channel(self) -> Channel:
        return Channel.SMS

    def ready(self) -> bool:
        return bool(self._s.http_url) and not self._session.closed

    async def send(self, delivery: Delivery, report: Report) -> None:
        body = {"to": delivery.phone.e164, "text": sms_text(delivery.clinic_name, delivery.code)}
        headers = {"Authorization": f"Bearer {self._s.http_token}"} if self._s.http_token else {}
        timeout = aiohttp.ClientTimeout(total=self._s.http_timeout_s)
        last = ""
        for attempt in range(self._s.http_retries + 1):
            if attempt:
                # Exponential backoff with jitter: 0.5 s, 1 s, 2 s ... (capped at 8 s).
                await asyncio.sleep(min(8.0, 0.5 * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2))
            try:
                async with self._session.post(
                    self._s.http_url, json=body, headers=headers, timeout=timeout
                ) as resp:
                    await resp.read()
                    if 200 <= resp.status < 300:
                        log.info(
                            "verification %s: SMS accepted by gateway", delivery.verification_id
                        )
                        await report(
                            DeliveryReport(DeliveryKind.DELIVERED, f"gateway {resp.status}")
                        )
                        return
                    last = f"gateway answered {resp.status}"
                    if resp.status < 500 and resp.status not in _RETRYABLE:
                        break
            except TimeoutError:
                last = f"gateway timed out after {self._s.http_timeout_s:g} s"
            except aiohttp.ClientError as exc:
                last = f"gateway unreachable: {type(exc).__name__}"
            log.warning(
                "verification %s: SMS attempt %d failed: %s",
                delivery.verification_id,
                attempt + 1,
                last,
            )
        await report(DeliveryReport(DeliveryKind.UNDELIVERABLE, last))
