"""The webhook sender with a fake queue and client (so counts are exact): how it shares its
room out between origins (what it remembers of each,
:class:`~verification.webhook_origins.OriginHealth`, pure and bounded, and the shares
:meth:`WebhookSender.run_due` gives origins not known to answer), and what it makes of each
kind of answer."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import cast

import pytest

from sip_config.clock import FakeClock
from sip_config.settings import Settings
from verification import webhooks
from verification.http_client import HttpAnswer, HttpClient, StalledBody
from verification.store import VerificationStore
from verification.webhook_origins import OriginHealth, OriginState
from verification.webhooks import WebhookSender

P, F, U = OriginState.PROVEN, OriginState.FAILING, OriginState.UNKNOWN


# -- what is remembered ---------------------------------------------------------------------
def test_the_last_post_decides_and_success_clears_a_failure() -> None:
    health = OriginHealth()
    assert health.state("http://a:", 0.0) is U
    health.record("http://a:", delivered=False, now=1.0)
    assert health.state("http://a:", 1.0) is F
    health.record("http://a:", delivered=True, now=2.0)
    assert health.state("http://a:", 2.0) is P
    health.record("http://a:", delivered=False, now=3.0)
    assert health.state("http://a:", 3.0) is F


def test_an_origin_is_forgotten_ttl_after_its_last_post() -> None:
    health = OriginHealth(ttl_s=600.0)
    health.record("http://a:", delivered=False, now=0.0)
    health.record("http://b:", delivered=True, now=100.0)
    assert health.state("http://a:", 599.0) is F
    assert health.state("http://a:", 600.0) is U
    assert health.state("http://b:", 600.0) is P
    assert len(health) == 1
    assert health.state("http://b:", 700.0) is U
    assert len(health) == 0


def test_memory_is_bounded_and_the_least_recent_go_first() -> None:
    # An app can name a new origin per verification (a wildcard DNS name): the record must
    # not grow with them. What is dropped becomes UNKNOWN, which is capped too.
    health = OriginHealth(limit=100)
    for i in range(10_000):
        health.record(f"http://h{i}.example:", delivered=False, now=float(i))
    assert len(health) == 100
    assert health.state("http://h0.example:", 10_000.0) is U
    assert health.state("http://h9999.example:", 10_000.0) is F
    health.record("http://h9900.example:", delivered=True, now=10_001.0)  # the most recent now
    health.record("http://new.example:", delivered=True, now=10_002.0)
    assert health.state("http://h9900.example:", 10_002.0) is P
    assert health.state("http://h9901.example:", 10_002.0) is U


# -- the shares, in the sender ----------------------------------------------------------------
class FakeQueue:
    """The webhook job queue of :class:`VerificationStore`, in memory: leased in due order."""

    def __init__(self) -> None:
        self.due: dict[str, float] = {}
        self.jobs: dict[str, str] = {}

    def add(self, jid: str, url: str, at: float) -> None:
        event = {"kind": "requested", "at": at, "channel": "sms", "detail": ""}
        job = {"verification_id": jid, "status": "pending", "channel": "sms"}
        self.jobs[jid] = json.dumps({**job, "callback_url": url, "event": event})
        self.due[jid] = at

    async def lease_webhooks(self, now: float, lease_s: float, limit: int) -> list[tuple[str, str]]:
        ids = sorted((at, jid) for jid, at in self.due.items() if at <= now)[:limit]
        for _at, jid in ids:
            self.due[jid] = now + lease_s
        return [(jid, self.jobs[jid]) for _at, jid in ids]

    async def postpone_webhook(self, job_id: str, at: float) -> None:
        self.due[job_id] = at

    async def retry_webhook(self, job_id: str, payload: str, at: float) -> None:
        self.jobs[job_id], self.due[job_id] = payload, at

    async def finish_webhook(self, job_id: str) -> None:
        del self.due[job_id], self.jobs[job_id]


class FakeClient:
    """Receivers: ``/ok`` answers 204 at once, ``/<status>`` that status; a hole times out at
    once, or with ``hang`` set never answers (holds its slot until the test ends)."""

    def __init__(self) -> None:
        self.hang = False
        self.hanging: list[str] = []
        self.answered: list[str] = []

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], *, timeout_s: float
    ) -> HttpAnswer:
        last = url.rsplit("/", 1)[-1]
        if last == "stalled":  # a 200 head, then a body that had not all come at the deadline
            raise StalledBody("the answer's body was not complete by the deadline", 200)
        if last == "ok" or last.isdigit():
            self.answered.append(url)
            return HttpAnswer(204 if last == "ok" else int(last), b"")
        if not self.hang:
            raise TimeoutError
        self.hanging.append(url)
        await asyncio.Event().wait()
        raise AssertionError("never answered")


async def _settle(tasks: int = 5) -> None:
    for _ in range(tasks):  # let the started deliveries run to their first wait
        await asyncio.sleep(0)


def _sender(
    tmp_path: Path,
    queue: FakeQueue,
    client: FakeClient,
    clock: FakeClock,
    on_outcome: Callable[[str], None] | None = None,
) -> WebhookSender:
    settings = Settings.from_env({"CLINIC_DATA_DIR": str(tmp_path)}).verification
    return WebhookSender(
        store=cast(VerificationStore, queue),
        client=cast(HttpClient, client),
        callback_client=cast(HttpClient, client),
        settings=settings,
        secret=b"k" * 32,
        clock=clock,
        on_outcome=on_outcome,
    )


async def test_failing_origins_take_at_most_half_and_jobs_behind_them_are_reached(
    tmp_path: Path,
) -> None:
    queue, client, clock = FakeQueue(), FakeClient(), FakeClock()
    sender = _sender(tmp_path, queue, client, clock)
    holes = [f"http://hole{i}.example:8080/h" for i in range(70)]
    now = clock.now()
    try:
        for i, url in enumerate(holes):  # three jobs each, as a verification's events
            for n in range(3):
                queue.add(f"h{i}-{n}", url, now)
        # Each hole's first POST fails (no answer in time): then all are known as failing.
        for _ in range(100):
            if all('"attempt"' in job for job in queue.jobs.values()):
                break
            await sender.run_due()
            await _settle()
            clock.advance(webhooks.ORIGIN_BUSY_S)
        else:
            pytest.fail("the holes' first POSTs were not all made in 100 polls")
        client.hang = True
        clock.advance(400.0)  # every retry due, the longest backoff is 300 s
        for n in range(3):  # an origin not heard from yet, due after all the holes' jobs
            queue.add(f"ok-{n}", "http://app.example/ok", clock.now())
        await sender.run_due()
        await _settle()
        assert len(client.answered) == 3, "the jobs queued behind the holes' were not reached"
        assert len(client.hanging) == webhooks.MAX_IN_FLIGHT // 2, "the failing origins' share"
        assert all(at > clock.now() for at in queue.due.values()), "a due job not reached"
    finally:
        await sender.stop()


@pytest.mark.parametrize(
    ("in_flight", "origin", "starts"),
    [
        ({}, U, True),
        ({F: 31}, F, True),
        ({F: 32}, F, False),  # the failing share is full
        ({F: 32}, U, True),  # ...which leaves room to an origin not heard from yet
        ({F: 32, U: 15}, U, True),
        ({F: 32, U: 16}, U, False),  # the share of all origins not known to answer is full
        ({U: 48}, F, False),
        ({F: 32, U: 16}, P, True),  # the rest is kept for origins that answer
        ({P: 63}, U, True),
    ],
)
def test_the_shares(
    tmp_path: Path, in_flight: dict[OriginState, int], origin: OriginState, starts: bool
) -> None:
    """Table: POSTs in flight by their origin's state, the state of the next job's origin,
    whether it may start (every origin here has fewer than PER_ORIGIN in flight)."""
    sender = _sender(tmp_path, FakeQueue(), FakeClient(), FakeClock())
    n = 0
    for state, count in in_flight.items():
        for _ in range(count):
            n += 1
            if state is not U:
                sender._health.record(f"o{n}", delivered=state is P, now=0.0)
            sender._per_origin[f"o{n}"] = 1
    if origin is not U:
        sender._health.record("next", delivered=origin is P, now=0.0)
    assert sender._has_room("next", 0.0) is starts


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("http://h.example/hook", "http://h.example:80"),
        ("http://H.Example:80/other", "http://h.example:80"),  # one receiver: one share
        ("HTTP://h.example:8080/", "http://h.example:8080"),
        ("https://h.example/", "https://h.example:443"),
        ("https://h.example:443/x?y", "https://h.example:443"),
        ("http://[::1]/", "http://::1:80"),
        ("http://h.example:99999/", ""),  # unreadable: the empty origin
    ],
)
def test_an_origin_is_its_scheme_host_and_port(tmp_path: Path, url: str, origin: str) -> None:
    sender = _sender(tmp_path, FakeQueue(), FakeClient(), FakeClock())
    assert sender._origin({"callback_url": url}) == origin


# -- what each answer comes to ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "outcome", "logged"),
    [
        (204, "delivered", None),
        # Redirects are not followed (the callback's address rule is checked where it
        # connects, and a Location could point anywhere): a failure, retried, and said so.
        (301, "retry", "attempt 1 failed: answered 301 (redirects are not followed)"),
        (308, "retry", "attempt 1 failed: answered 308 (redirects are not followed)"),
        # Other 4xx are retried as 5xx are: a 404 or 401 is often a receiver mid-deploy or
        # mid-rotation of its secret, and the retries end within about a minute.
        (404, "retry", "attempt 1 failed: answered 404"),
        (500, "retry", "attempt 1 failed: answered 500"),
        # 410 Gone: the receiver says this URL is gone for good; a retry would be told again.
        (410, "given_up", "given up after 1 attempt(s): answered 410"),
    ],
)
async def test_what_an_answer_comes_to(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    status: int,
    outcome: str,
    logged: str | None,
) -> None:
    queue, client, clock = FakeQueue(), FakeClient(), FakeClock()
    outcomes: list[str] = []
    sender = _sender(tmp_path, queue, client, clock, outcomes.append)
    queue.add("job", f"https://app.example/hooks/{status}", clock.now())
    try:
        assert await sender.run_due() == 1
        await _settle()
    finally:
        await sender.stop()
    assert outcomes == [outcome]
    assert ("job" in queue.jobs) is (outcome == "retry"), "kept for a retry, else finished"
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if logged is None:
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].endswith(logged), lines


async def test_a_2xx_whose_body_stalled_is_retried_as_a_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Unlike the clinic line's request and an SMS (taken as delivered by the status line), a
    # verification webhook whose 2xx body stalled is retried as a timeout, as it was: a
    # receiver treats a repeat as one, and a 2xx whose body broke off is retried too.
    queue, client, clock = FakeQueue(), FakeClient(), FakeClock()
    outcomes: list[str] = []
    sender = _sender(tmp_path, queue, client, clock, outcomes.append)
    queue.add("job", "https://app.example/hooks/stalled", clock.now())
    try:
        assert await sender.run_due() == 1
        await _settle()
    finally:
        await sender.stop()
    assert outcomes == ["retry"] and "job" in queue.jobs
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and lines[0].endswith("attempt 1 failed: timed out"), lines


async def test_a_full_lease_is_started_in_bounded_batches_one_loop_step_each(
    tmp_path: Path,
) -> None:
    # Starting a job decodes its JSON and makes a task (with a stack captured in debug mode):
    # a whole lease started in one step held the loop 4-7 ms (15 ms in a loaded run). Counted
    # here by a callback that runs once in every loop step and sees how many have started.
    queue, client, clock = FakeQueue(), FakeClient(), FakeClock()
    client.hang = True  # every POST stays in flight: the count only grows
    sender = _sender(tmp_path, queue, client, clock)
    for i in range(webhooks.MAX_IN_FLIGHT):
        queue.add(f"j{i}", f"http://app{i % 8}.example/hook", clock.now())
    loop = asyncio.get_running_loop()
    started_by_step: list[int] = []
    polling = True

    def probe() -> None:
        started_by_step.append(len(sender._in_flight))
        if polling:
            loop.call_soon(probe)

    probe()
    try:
        started = await sender.run_due()
        polling = False
        await _settle()
        assert started > webhooks.START_BATCH, "too few started to need a second batch"
        steps = [b - a for a, b in itertools.pairwise(started_by_step)]
        assert max(steps) <= webhooks.START_BATCH, f"started in one loop step: {max(steps)}"
    finally:
        await sender.stop()
