"""Webhook delivery under receivers that misbehave at random (a seeded, generated run).

Real Redis and real HTTP receivers on 127.0.0.1, each request answered as drawn for it: 2xx,
4xx (410 among them), 5xx, slow, hanging past the timeout, closing mid-answer, a redirect; one
origin refuses connections. Two senders share the queue; the first is stopped mid-POST (a
process killed), so its leased jobs must be taken by the second once their lease ends. The
clock runs CLOCK_SPEED times faster than real time, so backoffs and leases pass in seconds.

At the end: the queue is empty (no job leased forever); every event reached its receiver
with a 2xx, or was given up by a rule the README names (410 Gone; CLINIC_WEBHOOK_RETRIES
failed attempts, connection refused included); every body's signature verifies and holds no
code; and no sender ever had more than PER_ORIGIN POSTs at one receiver or MAX_IN_FLIGHT in
all, as counted by the receivers. No order is checked: the README promises none.

``CLINIC_TEST_WEBHOOK_SEEDS=1,2,3`` runs other seeds.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest
from aiohttp import web

from sip_config.settings import Settings
from tests.conftest import RedisServer
from tests.peers.loopback_http import serve_on_loopback
from verification import rules
from verification.callbacks import reachable
from verification.codes import code_hash
from verification.http_client import HttpAnswer, HttpClient
from verification.model import Channel, NumberKind, Phone, Policy, Verification
from verification.redis_mux import RedisMux
from verification.rules import Transition
from verification.store import WEBHOOK_DUE, WEBHOOK_JOBS, VerificationStore
from verification.webhooks import MAX_IN_FLIGHT, PER_ORIGIN, SIGNATURE_HEADER, WebhookSender, verify
from verification.wire import render_event

pytestmark = pytest.mark.integration

SEEDS = [int(s) for s in os.environ.get("CLINIC_TEST_WEBHOOK_SEEDS", "1,2").split(",")]
CLOCK_SPEED = 20.0  # the lease (60 s) ends after 3 s, the backoffs (1, 2, 4 s) are 50..200 ms
TIMEOUT_S = 0.5  # CLINIC_WEBHOOK_TIMEOUT_S: real seconds (the HTTP client's deadline)
RETRIES = 3
SECRET = b"w" * 40
RECEIVERS = 10  # more origins than MAX_IN_FLIGHT // PER_ORIGIN, so the total cap is reached
VERIFICATIONS = 60
PHONE = Phone("+31612345678", "NL", 31, "612345678", NumberKind.MOBILE)
BEHAVIOURS = {  # weight of each way a request is answered
    "ok": 30,
    "slow": 8,  # answers 2xx well within the timeout
    "4xx": 8,
    "410": 2,
    "5xx": 10,
    "hang": 20,  # never answers: the client's deadline ends it
    "cut": 6,  # closes mid-answer
    "redirect": 6,
}


class ScaledClock:
    """The real clock, running CLOCK_SPEED times faster (for the sender and the store)."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()
        self._start = 1_800_000_000.0

    def now(self) -> float:
        return self._start + (time.monotonic() - self._t0) * CLOCK_SPEED

    def monotonic(self) -> float:
        return time.monotonic() * CLOCK_SPEED


@dataclass
class Seen:
    """What the receivers saw, for all of them."""

    rng: random.Random
    # (user agent, origin) -> requests under way now; user agent -> in all
    now_origin: Counter[tuple[str, str]] = field(default_factory=Counter)
    now_total: Counter[str] = field(default_factory=Counter)
    max_origin: int = 0
    max_total: int = 0
    bodies: list[tuple[str, bytes, str]] = field(default_factory=list)  # origin, body, header
    delivered: set[tuple[str, str]] = field(default_factory=set)  # (vid, event json)


class Receiver:
    """One origin: an aiohttp server answering each POST as drawn from ``seen.rng``."""

    def __init__(self, seen: Seen) -> None:
        self.seen = seen
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        # Cancelled when the client goes: a hanging request stops being counted then.
        self._runner, self.port = await serve_on_loopback(
            app, shutdown_timeout=0.2, handler_cancellation=True
        )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        seen = self.seen
        who = request.headers.get("User-Agent", "")
        seen.now_origin[who, self.origin] += 1
        seen.now_total[who] += 1
        seen.max_origin = max(seen.max_origin, seen.now_origin[who, self.origin])
        seen.max_total = max(seen.max_total, seen.now_total[who])
        try:
            body = await request.read()
            seen.bodies.append((self.origin, body, request.headers.get(SIGNATURE_HEADER, "")))
            what = seen.rng.choices(list(BEHAVIOURS), weights=list(BEHAVIOURS.values()))[0]
            if what in {"ok", "slow"}:
                if what == "slow":
                    await asyncio.sleep(seen.rng.uniform(0.02, TIMEOUT_S / 4))
                doc = json.loads(body)
                seen.delivered.add((doc["verification_id"], json.dumps(doc["event"])))
                return web.Response(status=seen.rng.choice([200, 202, 204]))
            if what == "hang":
                await asyncio.sleep(30)
            if what == "cut":
                response = web.StreamResponse(status=200, headers={"Content-Length": "100"})
                await response.prepare(request)
                await response.write(b'{"ok":')
                assert request.transport is not None
                request.transport.close()
                return response
            status = {
                "4xx": seen.rng.choice([400, 401, 404, 422]),
                "410": 410,
                "5xx": seen.rng.choice([500, 502, 503]),
                "redirect": seen.rng.choice([301, 302, 307, 308]),
            }[what]
            headers = {"Location": "/elsewhere"} if what == "redirect" else {}
            return web.Response(status=status, headers=headers)
        finally:
            seen.now_origin[who, self.origin] -= 1
            seen.now_total[who] -= 1


@dataclass(frozen=True, slots=True)
class Attempt:
    """One POST as the sender made it and how it ended."""

    body: bytes
    outcome: str  # "2xx", "<status>", "error", "timeout", "cancelled"


class RecordingClient:
    """The real :class:`HttpClient`, noting each POST's end (to tell which rule gave one up)."""

    def __init__(self, client: HttpClient, attempts: list[Attempt]) -> None:
        self._client = client
        self._attempts = attempts

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], *, timeout_s: float
    ) -> HttpAnswer:
        outcome = "error"
        try:
            answer = await self._client.post(url, body, headers, timeout_s=timeout_s)
            outcome = "2xx" if 200 <= answer.status < 300 else str(answer.status)
            return answer
        except TimeoutError:
            outcome = "timeout"
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self._attempts.append(Attempt(body, outcome))


def _closed_port() -> int:
    """A loopback port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def mux(redis_server: RedisServer) -> AsyncIterator[RedisMux]:
    client = RedisMux(redis_server.url, timeout_s=2.0)
    try:
        yield client
    finally:
        await client.aclose()


def _key(body: bytes) -> tuple[str, str]:
    doc = json.loads(body)
    return doc["verification_id"], json.dumps(doc["event"])


def _sent(digest: str, clock: ScaledClock) -> Callable[[Verification], tuple[Transition, None]]:
    return lambda v: (rules.code_sent(v, 0, digest, clock.now()), None)


async def _make_events(
    store: VerificationStore, rng: random.Random, urls: list[str], clock: ScaledClock
) -> dict[str, tuple[str, str]]:
    """Verifications taken through send, wrong checks, approval or cancel; vid -> (url, code)."""
    policy = Policy()
    made: dict[str, tuple[str, str]] = {}
    for i in range(VERIFICATIONS):
        vid, url = f"v{i:03d}", rng.choice(urls)
        code = f"{rng.randrange(10**6):06d}"
        made[vid] = (url, code)
        now = clock.now()
        t = rules.create(
            verification_id=vid,
            phone=PHONE,
            plan=(Channel.SMS,),
            code_length=6,
            now=now,
            policy=policy,
            callback_url=url,
        )
        stored = await store.create(t)
        sent = _sent(code_hash(SECRET, vid, code), clock)
        _, _, stored = await store.update_stored(vid, sent, known=stored)
        for _ in range(rng.randrange(3)):
            _, _, stored = await store.update_stored(
                vid, lambda v: rules.check(v, False, clock.now(), policy), known=stored
            )
        if rng.random() < 0.7:
            await store.update(vid, lambda v: rules.check(v, True, clock.now(), policy))
        else:
            await store.update(vid, lambda v: (rules.cancel(v, clock.now()), None))
        if i % 10 == 9:
            await asyncio.sleep(0.05)  # events keep coming while the senders run
    return made


@pytest.mark.parametrize("seed", SEEDS)
async def test_every_event_is_delivered_or_given_up_by_a_rule(
    seed: int, tmp_path: Path, mux: RedisMux
) -> None:
    rng = random.Random(seed)
    seen = Seen(random.Random(seed + 1000))
    receivers = [Receiver(seen) for _ in range(RECEIVERS)]
    for receiver in receivers:
        await receiver.start()
    refused = f"http://127.0.0.1:{_closed_port()}"
    urls = [f"{r.origin}/hook/{i}" for i, r in enumerate(receivers)] + [f"{refused}/hook"]
    settings = Settings.from_env(
        {
            "CLINIC_DATA_DIR": str(tmp_path),
            "CLINIC_WEBHOOK_TIMEOUT_S": str(TIMEOUT_S),
            "CLINIC_WEBHOOK_RETRIES": str(RETRIES),
            "CLINIC_CALLBACK_NETWORKS": "127.0.0.0/8",
        }
    ).verification
    clock = ScaledClock()
    store = VerificationStore(mux)
    attempts: list[Attempt] = []
    outcomes: Counter[str] = Counter()
    clients = []
    senders = []
    networks = settings.callback_networks
    for name in ("sender-a", "sender-b"):
        client = HttpClient(
            user_agent=name, address_filter=lambda address: reachable(address, networks)
        )
        clients.append(client)
        recording = cast(HttpClient, RecordingClient(client, attempts))
        senders.append(
            WebhookSender(
                store=store,
                client=recording,
                callback_client=recording,
                settings=settings,
                secret=SECRET,
                clock=clock,
                on_outcome=lambda outcome: outcomes.update([outcome]),
            )
        )
    a, b = senders
    try:
        a.start()
        b.start()
        made = await _make_events(store, rng, urls, clock)
        # Stop A (a process killed) while it has POSTs under way: their jobs stay leased.
        deadline = time.monotonic() + 10.0
        while seen.now_total["sender-a"] < 3:
            assert time.monotonic() < deadline, "sender A never had POSTs in flight"
            await asyncio.sleep(0.01)
        await a.stop()
        deadline = time.monotonic() + 30.0
        while await mux.execute("ZCARD", WEBHOOK_DUE) or await mux.execute("HLEN", WEBHOOK_JOBS):
            left = await mux.execute("ZRANGE", WEBHOOK_DUE, 0, -1, "WITHSCORES")
            assert time.monotonic() < deadline, f"jobs left in the queue: {left}"
            await asyncio.sleep(0.1)
    finally:
        for sender in senders:
            await sender.stop()
        for client in clients:
            await client.close()
        for receiver in receivers:
            await receiver.stop()

    assert any(x.outcome == "cancelled" for x in attempts), "A was stopped with nothing in flight"
    # Every body: signed, no code, an event of its verification as stored.
    events: dict[str, set[str]] = {}
    for vid in made:
        v = (await store.get(vid)).verification
        events[vid] = {json.dumps(render_event(e)) for e in v.events}
    for origin, body, header in seen.bodies:
        assert verify(SECRET, header, body), body
        vid, event = _key(body)
        url, code = made[vid]
        assert url.startswith(origin + "/"), (vid, origin)
        assert code not in body.decode() and code_hash(SECRET, vid, code) not in body.decode()
        assert event in events[vid], (vid, event)
    # Every event delivered, or given up by a documented rule.
    tries: dict[tuple[str, str], list[str]] = {}
    for x in attempts:
        tries.setdefault(_key(x.body), []).append(x.outcome)
    lost = []
    for vid, evs in events.items():
        for event in evs:
            if (vid, event) in seen.delivered:
                continue
            ends = [o for o in tries.get((vid, event), []) if o != "cancelled"]
            if "410" in ends or len(ends) >= RETRIES + 1:
                continue  # given up: 410 Gone, or no retry left
            lost.append((vid, event, tries.get((vid, event))))
    assert not lost, f"{len(lost)} events neither delivered nor given up by a rule: {lost[:5]}"
    # The caps, as the receivers counted them, per sender.
    assert 0 < seen.max_origin <= PER_ORIGIN, seen.max_origin
    assert 0 < seen.max_total <= MAX_IN_FLIGHT, seen.max_total
    assert outcomes["delivered"] and outcomes["given_up"] and outcomes["retry"], outcomes
