"""SMS through an HTTP gateway: POST ``{"to", "text"}`` with a bearer token.

2xx is delivered (the gateway accepted it); 4xx other than 408/425/429 is undeliverable at once;
timeouts, 408, 425, 429 and 5xx are retried with backoff, then undeliverable. The status is
what counts: an answer whose body breaks off, is framed wrongly, is over the client's 1 MiB
or has not all come by the timeout counts by its status line (the body is not needed). A
timeout (no status line in time) or a 5xx
does not say the SMS was not taken: every attempt of one send carries the same
``Idempotency-Key``, so a gateway that honours it sends a retried SMS once.

The events of a send (served by the API and posted to the app's webhooks) say what failed,
never where: the gateway's address and the network's errors go to the log only.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets

import orjson

from sip_config.settings import SMS_RETRY_JITTER, SmsSettings
from verification.channels.base import Delivery, DeliveryReport, Report, sms_text
from verification.http_client import HttpClient, HttpClientError, IncompleteAnswer
from verification.model import Channel
from verification.rules import DeliveryKind

log = logging.getLogger(__name__)

_RETRYABLE = {408, 425, 429}


class HttpSmsChannel:
    """The SMS channel over an HTTP gateway."""

    def __init__(self, settings: SmsSettings, client: HttpClient) -> None:
        self._s = settings
        self._client = client
        self._headers = {"Content-Type": "application/json"}
        if settings.http_token:
            self._headers["Authorization"] = f"Bearer {settings.http_token}"

    @property
    def channel(self) -> Channel:
        return Channel.SMS

    def ready(self) -> bool:
        return bool(self._s.http_url) and not self._client.closed

    async def send(self, delivery: Delivery, report: Report) -> None:
        body = orjson.dumps({"to": delivery.phone.e164, "text": sms_text(delivery)})
        # One key per send, the same on each retry of it: no code, nothing about the patient.
        headers = {**self._headers, "Idempotency-Key": secrets.token_urlsafe(16)}
        last = ""
        for attempt in range(self._s.http_retries + 1):
            if attempt:  # exponential backoff with jitter (the settings bound the whole)
                jitter = random.uniform(1 - SMS_RETRY_JITTER, 1 + SMS_RETRY_JITTER)
                await asyncio.sleep(self._s.retry_pause_s(attempt) * jitter)
            status: int | None = None
            try:
                answer = await self._client.post(
                    self._s.http_url, body, headers, timeout_s=self._s.http_timeout_s
                )
                status = answer.status
            except TimeoutError:
                last = why = f"gateway timed out after {self._s.http_timeout_s:g} s"
            except IncompleteAnswer as exc:
                # The status line came and the body did not (cut, badly framed, over 1 MiB, or
                # not all by the timeout): the status says what the gateway did with the SMS.
                # A 2xx sent again would send the SMS twice through a gateway that ignores the
                # Idempotency-Key.
                log.warning(
                    "verification %s: gateway answered %d, its body unreadable: %s",
                    delivery.verification_id,
                    exc.status,
                    type(exc).__name__,
                )
                status = exc.status
            except HttpClientError as exc:
                last, why = "gateway unreachable", f"gateway unreachable: {exc}"
            if status is not None:
                if 200 <= status < 300:
                    log.info("verification %s: SMS accepted by gateway", delivery.verification_id)
                    await report(DeliveryReport(DeliveryKind.DELIVERED, f"gateway {status}"))
                    return
                last = why = f"gateway answered {status}"
                if status < 500 and status not in _RETRYABLE:
                    break
            log.warning(
                "verification %s: SMS attempt %d failed: %s",
                delivery.verification_id,
                attempt + 1,
                why,
            )
        await report(DeliveryReport(DeliveryKind.UNDELIVERABLE, last))
