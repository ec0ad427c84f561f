"""Webhooks: one signed POST per verification event, retried with backoff, never a code.

Jobs are queued in Redis in the same atomic step as the state change that made the event
(:mod:`verification.store`), so an event is never lost between "changed" and "told".

Signature (like Stripe's): header ``X-Clinic-Signature: t=<unix time>,v1=<hex>`` where ``hex``
is HMAC-SHA256 with the webhook key (``CLINIC_WEBHOOK_SECRET``, else the service secret) over
``"<t>." + body``. Receivers should reject a ``t`` older than five minutes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
from collections import Counter
from collections.abc import Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from sip_config.clock import Clock
from sip_config.settings import VerificationSettings
from sip_config.tasks import watch
from verification.errors import StoreUnavailable
from verification.http_client import HttpClient, HttpClientError, StalledBody
from verification.model import Event
from verification.outage_log import OutageLog
from verification.store import VerificationStore
from verification.webhook_origins import OriginHealth, OriginState
from verification.wire import render_event

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Clinic-Signature"
_DEFAULT_PORTS: dict[str, int] = {"http": 80, "https": 443}
POLL_S = 0.25
LEASE_S = 60.0  # at least: a job's lease outlives its POST (CLINIC_WEBHOOK_TIMEOUT_S + 30 s)
# Deliveries run side by side, each to its end, and new jobs are leased while others are in
# flight: a receiver that never answers holds up only its own jobs. At most this many POSTs
# of one process are in flight, and at most PER_ORIGIN to one scheme://host:port; a job due
# for a busy origin waits ORIGIN_BUSY_S in the queue, where any process may take it.
MAX_IN_FLIGHT = 64
PER_ORIGIN = 8
ORIGIN_BUSY_S = 1.0
# Many origins that never answer (an app may name one per verification) would otherwise fill
# every slot for CLINIC_WEBHOOK_TIMEOUT_S, at each retry, while the jobs of receivers that
# answer wait behind them in the queue (a review measured 13 s for three webhooks to a healthy
# receiver behind 70 such origins). Origins whose last POST failed take at most FAILING_SHARE
# slots, and together with origins not heard from yet at most UNPROVEN_SHARE: the rest is
# kept for the origins whose last POST was delivered (verification.webhook_origins). Their
# jobs past the share wait ORIGIN_BUSY_S, as a busy origin's do.
FAILING_SHARE = MAX_IN_FLIGHT // 2
UNPROVEN_SHARE = MAX_IN_FLIGHT * 3 // 4
# A poll leases again after putting jobs back, so jobs queued behind those are reached, but at
# most this many times: thousands of jobs for failing origins must not make each poll a scan
# of the whole queue.
LEASE_ROUNDS = 8
# Jobs read and started in one loop step; the sender yields between batches. Each start
# decodes the job's JSON and makes a task, which in asyncio's debug mode (the tests) captures
# a stack, 0.25 ms: a whole lease started at once held the loop 5-9 ms per step here, up to
# 15 ms in a loaded run (1-2 ms without debug), and a batch of 8 about 2 ms (0.5 ms).
START_BATCH = 8


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The value of the signature header for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: bytes, header: str, body: bytes) -> bool:
    """Check a signature header (for receivers, and the tests)."""
    # A real header is ASCII; compare_digest raises TypeError on non-ASCII str, and int()
    # would read Arabic-Indic digits in ``t``.
    if not header.isascii():
        return False
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        expected = sign(secret, int(parts["t"]), body)
    except (ValueError, KeyError):
        return False
    return hmac.compare_digest(expected, header)


def backoff_s(attempt: int) -> float:
    """1 s, 2 s, 4 s ... capped at 5 minutes, with 20 % jitter."""
    return float(min(300.0, 2.0 ** (attempt - 1)) * random.uniform(0.8, 1.2))


class WebhookSender:
    """Polls the job queue and POSTs each event to its URL."""

    def __init__(
        self,
        *,
        store: VerificationStore,
        client: HttpClient,
        callback_client: HttpClient,
        settings: VerificationSettings,
        secret: bytes,
        clock: Clock,
        on_outcome: Callable[[str], None] | None = None,
        secret_is_service_secret: bool = False,
    ) -> None:
        """``on_outcome`` is told what became of each POST: ``delivered``, ``retry`` (failed,
        tried again later), ``given_up`` (failed for the last time) or ``dropped`` (a job
        that cannot be read). ``secret`` signs the POSTs; ``secret_is_service_secret`` says it
        is ``CLINIC_SECRET`` itself, which is warned about once, at the first POST."""
        self._store = store
        self._on_outcome = on_outcome or _ignore
        self._client = client  # the operator's CLINIC_WEBHOOK_URL
        self._callback_client = callback_client  # an API client's callback_url (guarded)
        self._s = settings
        self._secret = secret
        # The service secret also keys the codes' hashes and the call records' encryption:
        # every receiver that checks a signature then holds it.
        self._warn_shared_key = secret_is_service_secret
        self._clock = clock
        self._outage = OutageLog(log, "webhooks", clock)
        self._faults = OutageLog(log, "webhooks", clock, faults=True)
        self._task: asyncio.Task[None] | None = None
        # See Dispatcher: a cancel swallowed inside redis-py must not keep the loop alive.
        self._stopping = False
        self._lease_s = max(LEASE_S, settings.webhook_timeout_s + 30.0)
        self._in_flight: dict[asyncio.Task[None], str] = {}  # delivery -> its origin
        self._per_origin: Counter[str] = Counter()
        self._health = OriginHealth()  # how each origin's last POST went

    def start(self, on_failure: Callable[[str], None] | None = None) -> None:
        """Start polling; the loop's death by a defect is logged and told to ``on_failure``."""
        self._task = asyncio.create_task(self._loop(), name="webhooks")
        watch(self._task, log, "the webhook sender", on_failure)

    async def stop(self) -> None:
        """Stop polling and cut the POSTs in flight short: their jobs stay leased, and are
        sent again (by any process) when the lease ends."""
        self._stopping = True
        tasks = [*([self._task] if self._task else []), *self._in_flight]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                await self.run_due()
            except StoreUnavailable as exc:
                self._outage.failed(exc)
            except Exception as exc:  # a defect must not end every later delivery: keep polling
                self._faults.failed(exc)
            else:
                self._outage.ok()
                self._faults.ok()
            await asyncio.sleep(POLL_S)

    async def run_due(self) -> int:
        """Start a delivery for each job due, as far as there is room; returns how many."""
        started = 0
        for _ in range(LEASE_ROUNDS):
            room = MAX_IN_FLIGHT - len(self._in_flight)
            if room <= 0:
                break
            now = self._clock.now()
            jobs = await self._store.lease_webhooks(now, self._lease_s, limit=room)
            put_back = 0
            for n, (jid, payload) in enumerate(jobs):
                if n and n % START_BATCH == 0:
                    await asyncio.sleep(0)  # the rest in the next loop step: see START_BATCH
                job = _read(payload)
                origin = self._origin(job)
                if not self._has_room(origin, now):
                    # Due again in ORIGIN_BUSY_S, so the next lease of this poll passes it by.
                    await self._store.postpone_webhook(jid, now + ORIGIN_BUSY_S)
                    put_back += 1
                    continue
                task = asyncio.create_task(self._deliver(jid, job, origin), name=f"webhook {jid}")
                self._in_flight[task] = origin
                self._per_origin[origin] += 1
                task.add_done_callback(self._delivered)
                started += 1
            if not put_back:  # all started (no room left), or the queue has no more due
                break
        return started

    def _has_room(self, origin: str, now: float) -> bool:
        """Whether a job for ``origin`` may start now (see PER_ORIGIN and FAILING_SHARE)."""
        if self._per_origin[origin] >= PER_ORIGIN:
            return False
        state = self._health.state(origin, now)
        if state is OriginState.PROVEN:
            return True
        # Counted by each origin's state now, not when its POSTs started: an origin that
        # stopped answering counts as failing with all its POSTs still hanging.
        failing = unproven = 0
        for other, count in self._per_origin.items():
            other_state = self._health.state(other, now)
            if other_state is not OriginState.PROVEN:
                unproven += count
                if other_state is OriginState.FAILING:
                    failing += count
        if state is OriginState.FAILING and failing >= FAILING_SHARE:
            return False
        return unproven < UNPROVEN_SHARE

    def _origin(self, job: dict[str, Any] | None) -> str:
        """Where a job goes (scheme://host:port), to share the room out; "" when unreadable.
        The port a URL leaves out is its scheme's (``http://h/`` and ``http://h:80/`` are one
        receiver, and share one PER_ORIGIN)."""
        try:
            parts = urlsplit((job or {}).get("callback_url") or self._s.webhook_url)
            port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
            return f"{parts.scheme}://{parts.hostname}:{port or ''}"
        except (ValueError, AttributeError, TypeError):
            return ""

    def _delivered(self, task: asyncio.Task[None]) -> None:
        origin = self._in_flight.pop(task)
        self._per_origin[origin] -= 1
        if self._per_origin[origin] <= 0:
            del self._per_origin[origin]
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, StoreUnavailable):  # its outcome not written: leased, sent again
            self._outage.failed(exc)
        elif isinstance(exc, Exception):
            self._faults.failed(exc)

    async def _deliver(self, job_id: str, job: dict[str, Any] | None, origin: str) -> None:
        try:
            if job is None:
                raise ValueError("not a JSON object")
            event = render_event(Event.from_json(job["event"]))
            vid, status, channel = job["verification_id"], job["status"], job["channel"]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # Not a job this code wrote: retrying cannot make it readable.
            log.error("webhook job %s is unreadable (%s): dropped", job_id, type(exc).__name__)
            await self._store.finish_webhook(job_id)
            self._on_outcome("dropped")
            return
        callback = job.get("callback_url") or ""
        url = callback or self._s.webhook_url
        client = self._callback_client if callback else self._client
        attempt = int(job.get("attempt", 0)) + 1
        if not url:
            await self._store.finish_webhook(job_id)
            return
        body = json.dumps(
            {"verification_id": vid, "status": status, "channel": channel, "event": event},
            separators=(",", ":"),
        ).encode()
        ts = int(self._clock.now())
        if self._warn_shared_key:
            self._warn_shared_key = False
            log.warning(
                "webhooks are signed with CLINIC_SECRET, so each receiver that checks them "
                "holds the key that also opens the call records: set CLINIC_WEBHOOK_SECRET"
            )
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self._secret, ts, body),
        }
        error = ""
        final = attempt > self._s.webhook_retries  # no retry left after this attempt
        try:
            answer = await client.post(url, body, headers, timeout_s=self._s.webhook_timeout_s)
        except (TimeoutError, StalledBody):
            # A head and then a body that stalled reads as before, a timeout, retried: unlike
            # the clinic line's request or an SMS, a repeat costs a receiver nothing (it is
            # told to treat one as one), and a 2xx whose body broke off is retried too.
            error = "timed out"
        except HttpClientError as exc:
            error = str(exc)
            final = final or exc.permanent  # the same URL would be refused again
        else:
            if 200 <= answer.status < 300:
                self._health.record(origin, delivered=True, now=self._clock.now())
                await self._store.finish_webhook(job_id)
                self._on_outcome("delivered")
                return
            error = f"answered {answer.status}"
            if 300 <= answer.status < 400:
                # Not followed: a redirect could lead a callback past the address rule, and
                # the operator's URL should name the receiver itself. Retried as any failure.
                error += " (redirects are not followed)"
            elif answer.status == HTTPStatus.GONE:
                # The receiver says this URL is gone for good (RFC 9110 15.5.11): retries
                # would only repeat the answer.
                final = True
        self._health.record(origin, delivered=False, now=self._clock.now())
        what = event["type"]
        if final:
            log.error(
                "verification %s: webhook of its %s event given up after %d attempt(s): %s",
                vid,
                what,
                attempt,
                error,
            )
            await self._store.finish_webhook(job_id)
            self._on_outcome("given_up")
            return
        log.warning(
            "verification %s: webhook of its %s event, attempt %d failed: %s",
            vid,
            what,
            attempt,
            error,
        )
        self._on_outcome("retry")
        job["attempt"] = attempt
        await self._store.retry_webhook(
            job_id, json.dumps(job, separators=(",", ":")), self._clock.now() + backoff_s(attempt)
        )


def _read(payload: str) -> dict[str, Any] | None:
    """A job as queued, or None when it is not a JSON object."""
    try:
        job = json.loads(payload)
    except ValueError:
        return None
    return job if isinstance(job, dict) else None


def _ignore(_outcome: str) -> None:
    pass
