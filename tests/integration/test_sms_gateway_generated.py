"""A seeded, generated run of SMS verifications against a real local HTTP gateway whose answer to
each POST is drawn: 2xx with or without a body, 3xx, 4xx (408, 425 and 429 with Retry-After
among them), 5xx, slow within the timeout, hanging past it, 200 after the client's timeout (a late
success), the connection closed mid-answer or without a byte of answer, kept-alive connections
closed by the gateway between requests, and (in a phase of its own) refused connections.

Every verification goes through the real API with a real redis-server, and is held to the
README ("The HTTP SMS gateway gets ..." and the channels table):

- its POSTs: at most 1 + ``CLINIC_SMS_HTTP_RETRIES`` attempts (a 429's ``Retry-After`` not
  waited for); a POST on a kept-alive connection the gateway closed without a byte of answer
  is no attempt (sent once more at once, on a new connection); after a 2xx in time, a 3xx or a
  4xx other than 408/425/429, nothing more;
- its one outcome event: ``delivered`` iff an attempt got a 2xx in time, else
  ``undeliverable`` with the last attempt's failure as the detail (``gateway timed out after
  1 s``, ``gateway answered N``, ``gateway unreachable``);
- every POST: ``{"to", "text"}`` only, the bearer token, one ``Idempotency-Key`` per send;
  the text names the clinic, holds the code and no health data;
- its outcome within ``SmsSettings.http_budget_s`` (the bound CLINIC_STEP_TIMEOUT_SMS_S is
  checked against), and no code in any log line.

``CLINIC_TEST_SEED=<n>`` replays a run; ``CLINIC_TEST_SMS_RUNS=<n>`` sends more verifications.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import pytest
from aiohttp import web

from sip_config.settings import SmsSettings
from tests.integration.conftest import CLINIC_NAME, Api, StartService
from verification.channels.base import Delivery, DeliveryReport
from verification.channels.sms_http import HttpSmsChannel
from verification.http_client import HttpClient
from verification.model import NumberKind, Phone

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]

HEALTH_WORDS = ("triage", "symptom", "urgent", "nurse", "appointment", "pain", "diagnos")
TIMEOUT_S = 1.0
RETRIES = 2
TOKEN = "gw-token-42"  # BASE_ENV's CLINIC_SMS_HTTP_TOKEN
SETTINGS = SmsSettings("http", "http://unused", TOKEN, TIMEOUT_S, RETRIES)
OUTCOMES = ("delivered", "undeliverable")
SLACK_S = 1.5  # polling, a shared 2-core machine


class Act(StrEnum):
    """What the gateway does with one POST."""

    OK_BODY = "2xx with a body"
    OK_EMPTY = "2xx without a body"
    SLOW_OK = "2xx, slow within the timeout"
    REJECT = "3xx or 4xx, not retried"
    RETRY_4XX = "408/425/429"
    SERVER_ERROR = "5xx"
    HANG = "hangs past the timeout"
    LATE_OK = "200 after the timeout"
    CUT = "a status line, then closes mid-body"
    DROP = "closes without a byte of answer"


ACTS = list(Act)
WEIGHTS = [3, 2, 2, 2, 3, 3, 1, 1, 2, 3]


@dataclass(frozen=True, slots=True)
class Seen:
    """One POST as the gateway got it and what it did."""

    at: float
    act: Act
    status: int
    reused: bool  # not the first request on its connection
    to: str
    text: str
    keys: frozenset[str]
    authorization: str
    idempotency_key: str


class DrawnGateway:
    """An aiohttp gateway on 127.0.0.1 whose answer to the n-th POST for a number is drawn
    from ``(seed, number, n)``: the same run replays from its seed."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.seen: dict[str, list[Seen]] = {}
        self._served: set[int] = set()  # ids of transports that carried a request
        self._busy: set[int] = set()
        self._keep: list[Any] = []  # transports kept alive so their ids stay unique
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite
        self.port = 0
        self.always: Act | None = None  # set: every POST gets this, not a drawn answer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/sms"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/sms", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await self.listen()

    async def listen(self) -> None:
        """(Again) take connections on :attr:`port`."""
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()
        self.port = int(self._runner.addresses[0][1])

    async def refuse(self) -> None:
        """Stop listening and close the kept-alive connections: connections are refused until
        :meth:`listen`."""
        await self._site.stop()
        for transport in self._keep:
            transport.close()
        await asyncio.sleep(0.05)  # the client's side of them sees the close

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def draw(self, to: str, n: int) -> tuple[Act, int, float, str]:
        rnd = random.Random(f"{self.seed}:{to}:{n}")
        act = rnd.choices(ACTS, WEIGHTS)[0]
        status = {
            Act.OK_BODY: rnd.choice([200, 201, 202]),
            Act.OK_EMPTY: rnd.choice([200, 202, 204]),
            Act.SLOW_OK: 202,
            Act.REJECT: rnd.choice([301, 302, 307, 308, 400, 401, 403, 404, 410, 422]),
            Act.RETRY_4XX: rnd.choice([408, 425, 429]),
            Act.SERVER_ERROR: rnd.choice([500, 502, 503, 504]),
            Act.LATE_OK: 200,
            Act.CUT: rnd.choice([200, 202, 400, 503]),
        }.get(act, 0)
        retry_after = rnd.choice(["0", "1", "3600", "Wed, 21 Oct 2037 07:28:00 GMT"])
        # after the answer, the gateway closes the kept-alive connection (its idle timeout)
        close_after = rnd.choice([-1.0, -1.0, 0.0, 0.02, 0.2])
        return act, status, close_after, retry_after

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        tid = id(transport)
        self._busy.add(tid)  # before any await: an idle close must not cut this request
        raw = await request.read()
        reused = tid in self._served
        self._served.add(tid)
        self._keep.append(transport)
        body = json.loads(raw)
        to = str(body.get("to", ""))
        n = len(self.seen.setdefault(to, []))
        act, status, close_after, retry_after = self.draw(to, n)
        if self.always is not None:
            act, status, close_after = self.always, 202, -1.0
        if transport.is_closing():  # an idle close came as the request arrived: unanswered
            act, status = Act.DROP, 0
        self.seen[to].append(
            Seen(
                time.monotonic(),
                act,
                status,
                reused,
                to,
                str(body.get("text", "")),
                frozenset(body),
                request.headers.get("Authorization", ""),
                request.headers.get("Idempotency-Key", ""),
            )
        )
        try:
            return await self._act(request, transport, act, status, retry_after)
        finally:
            self._busy.discard(tid)
            if close_after >= 0:
                loop = asyncio.get_running_loop()
                loop.call_later(close_after, self._close_idle, transport)

    def _close_idle(self, transport: Any) -> None:
        if id(transport) not in self._busy:
            transport.close()

    async def _act(
        self, request: web.Request, transport: Any, act: Act, status: int, retry_after: str
    ) -> web.StreamResponse:
        if act is Act.SLOW_OK:
            await asyncio.sleep(0.3 * TIMEOUT_S)
        elif act is Act.HANG:
            await self._release.wait()
        elif act is Act.LATE_OK:
            await asyncio.sleep(TIMEOUT_S + 0.3)
        elif act is Act.CUT:
            head = f"HTTP/1.1 {status} X\r\nContent-Length: 40\r\n\r\n".encode()
            transport.write(head + b'{"id": ')
            transport.close()
            await self._release.wait()
        elif act is Act.DROP:
            transport.close()
            await self._release.wait()
        if act in (Act.OK_BODY, Act.SLOW_OK, Act.LATE_OK):
            return web.json_response({"id": "msg-1", "status": "queued"}, status=status)
        if act is Act.OK_EMPTY:
            return web.Response(status=status)
        headers = {"Retry-After": retry_after} if status == 429 else {}
        if 300 <= status < 400:
            headers["Location"] = "/elsewhere"
        return web.json_response({"error": "drawn"}, status=status, headers=headers)


@dataclass(frozen=True, slots=True)
class Expected:
    kind: str  # delivered | undeliverable
    detail: str
    posts: int  # how many POSTs the gateway must have got


def expected(seen: list[Seen]) -> Expected | None:
    """What the README says follows from what the gateway did, and after how many POSTs the
    send ends (None: it ended early, no POST reaching the README's end of it)."""
    attempts = 0
    last = ""
    for i, s in enumerate(seen, 1):
        if s.act is Act.DROP and s.reused:
            continue  # a kept-alive connection closed as the send went out: no attempt
        attempts += 1
        # A body that breaks off counts by its status line (the body is not needed).
        if s.act in (Act.OK_BODY, Act.OK_EMPTY, Act.SLOW_OK) or (
            s.act is Act.CUT and 200 <= s.status < 300
        ):
            return Expected("delivered", f"gateway {s.status}", i)
        if s.act in (Act.HANG, Act.LATE_OK):
            last = f"gateway timed out after {TIMEOUT_S:g} s"
        elif s.act is Act.DROP:
            last = "gateway unreachable"
        else:
            last = f"gateway answered {s.status}"
        if s.act is Act.REJECT or (s.act is Act.CUT and s.status == 400):
            return Expected("undeliverable", last, i)
        if attempts == RETRIES + 1:
            return Expected("undeliverable", last, i)
    return None  # the send stopped before the README's end of it


@pytest.fixture
async def drawn_gateway() -> AsyncIterator[DrawnGateway]:
    seed = int(os.environ.get("CLINIC_TEST_SEED") or random.randrange(2**32))
    print(f"CLINIC_TEST_SEED={seed}")
    gateway = DrawnGateway(seed)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


async def _outcome(api: Api, vid: str, bound_s: float) -> tuple[dict[str, Any], float]:
    """Poll until the SMS send's outcome shows; the verification and the time it took."""
    started = time.monotonic()
    while True:
        v = await api.get(vid)
        if any(e["type"] in OUTCOMES for e in v["events"]):
            return v, time.monotonic() - started
        assert time.monotonic() - started < bound_s, (
            f"{vid}: no outcome within {bound_s:.1f} s: {[e['type'] for e in v['events']]}"
        )
        await asyncio.sleep(0.05)


async def test_generated_gateway_behaviour_is_held_to_the_readme(
    start_service: StartService,
    drawn_gateway: DrawnGateway,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    api = await start_service(
        {
            "CLINIC_SMS_HTTP_URL": drawn_gateway.url,
            "CLINIC_SMS_HTTP_TIMEOUT_S": f"{TIMEOUT_S:g}",
            "CLINIC_SMS_HTTP_RETRIES": str(RETRIES),
            "CLINIC_STEP_TIMEOUT_SMS_S": "10",
        }
    )
    runs = int(os.environ.get("CLINIC_TEST_SMS_RUNS", "36"))
    bound_s = SETTINGS.http_budget_s + SLACK_S
    outcomes: dict[str, tuple[str, dict[str, Any], float]] = {}

    async def one(i: int) -> None:
        phone = f"+4479111{i:05d}"
        answer = await api.create(phone=phone, method="sms", fallback=[], code_length=8)
        assert answer.status == 201, answer.text
        vid = answer.json["id"]
        v, took = await _outcome(api, vid, bound_s)
        outcomes[phone] = (vid, v, took)

    for wave in range(0, runs, 12):  # 12 sends at a time: connections are reused and raced
        await asyncio.gather(*(one(i) for i in range(wave, min(runs, wave + 12))))
    await asyncio.sleep(0.3)  # a POST that should not be would arrive within this

    faults: list[str] = []
    codes: set[str] = set()
    keys: set[str] = set()
    for phone, (vid, v, took) in outcomes.items():
        seen = drawn_gateway.seen.get(phone, [])
        story = ", ".join(
            f"{s.act} {s.status or ''}{' kept-alive' if s.reused else ''}" for s in seen
        )
        want = expected(seen)
        events = [e for e in v["events"] if e["type"] in ("delivered", "undeliverable")]
        got = [(e["type"], e["detail"], e["channel"]) for e in events]
        if want is None or len(seen) != want.posts:
            faults.append(f"{vid}: {len(seen)} POSTs, README says {want}: {story}")
        elif got != [(want.kind, want.detail, "sms")]:
            faults.append(f"{vid}: events {got}, README says {want}: {story}")
        status = "pending" if want and want.kind == "delivered" else "failed"
        if want and v["status"] != status:
            faults.append(f"{vid}: status {v['status']}, expected {status}: {story}")
        if took > bound_s:
            faults.append(f"{vid}: outcome after {took:.1f} s > {bound_s:.1f} s")
        for s in seen:
            if s.keys != {"to", "text"} or s.to != phone:
                faults.append(f"{vid}: POST body keys {sorted(s.keys)} to {s.to}")
            if s.authorization != f"Bearer {TOKEN}":
                faults.append(f"{vid}: Authorization {s.authorization!r}")
            m = re.fullmatch(
                rf"([0-9]{{8}}) is your verification code for {re.escape(CLINIC_NAME)}\. "
                r"Do not share it\.",
                s.text,
            )
            if m is None or any(w in s.text.lower() for w in HEALTH_WORDS):
                faults.append(f"{vid}: SMS text {s.text!r}")
            else:
                codes.add(m.group(1))
        send_keys = {s.idempotency_key for s in seen}
        if len(send_keys) != 1 or len(next(iter(send_keys))) < 16 or send_keys & keys:
            faults.append(f"{vid}: Idempotency-Keys {send_keys} (one per send, its own)")
        keys |= send_keys
    for r in caplog.records:
        text = r.getMessage() + (r.exc_text or "") + repr(r.args)
        leaked = [c for c in codes if c in text]
        if leaked:
            faults.append(f"log record of {r.name} holds a code: {r.getMessage()[:80]}")
    tally = Counter(
        f"{s.act}{' (kept-alive)' if s.reused else ''}"
        for seen in drawn_gateway.seen.values()
        for s in seen
    )
    print(f"{runs} sends, POSTs: {dict(tally)}")
    assert len(outcomes) == runs
    assert not faults, f"seed {drawn_gateway.seed}:\n  " + "\n  ".join(faults)


async def test_refused_connections_are_failed_attempts_and_a_gateway_back_delivers(
    start_service: StartService, drawn_gateway: DrawnGateway
) -> None:
    """The gateway refuses connections (not listening) and comes back after a drawn delay:
    before the second attempt (after the first pause, 0.5 s +-20 %), before the third (1 s
    later +-20 %), or not at all. A refusal is an attempt ("gateway unreachable")."""
    drawn_gateway.always = Act.OK_BODY
    api = await start_service(
        {
            "CLINIC_SMS_HTTP_URL": drawn_gateway.url,
            "CLINIC_SMS_HTTP_TIMEOUT_S": f"{TIMEOUT_S:g}",
            "CLINIC_SMS_HTTP_RETRIES": str(RETRIES),
            "CLINIC_STEP_TIMEOUT_SMS_S": "10",
        }
    )
    backs: list[float | None] = [None, 0.2, 0.95]
    random.Random(drawn_gateway.seed).shuffle(backs)
    bound_s = SETTINGS.http_budget_s + SLACK_S
    for i, back in enumerate(backs):
        phone = f"+4479112{i:05d}"
        await drawn_gateway.refuse()
        answer = await api.create(phone=phone, method="sms", fallback=[])
        assert answer.status == 201, answer.text
        if back is not None:
            await asyncio.sleep(back)
            await drawn_gateway.listen()
        v, _ = await _outcome(api, answer.json["id"], bound_s)
        got = [(e["type"], e["detail"]) for e in v["events"] if e["type"] in OUTCOMES]
        posts = len(drawn_gateway.seen.get(phone, []))
        if back is None:
            assert (got, posts) == ([("undeliverable", "gateway unreachable")], 0), back
            await drawn_gateway.listen()
        else:
            assert (got, posts) == ([("delivered", "gateway 202")], 1), back


@pytest.mark.parametrize(("status", "kind"), [(202, "delivered"), (400, "undeliverable")])
async def test_a_gateway_whose_body_stalls_after_its_status_line_counts_by_its_status(
    status: int, kind: str
) -> None:
    # As for a body that breaks off (the README: "the status line is what counts"): a 2xx
    # whose body then stalls past the timeout took the SMS. Counted a timeout, it was sent
    # again, twice through a gateway that ignores the Idempotency-Key.
    posts: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                posts.append(await reader.readexactly(length))
                writer.write(b"HTTP/1.1 %d X\r\nContent-Length: 30\r\n\r\n{" % status)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/sms"
    client = HttpClient()
    reports: list[DeliveryReport] = []

    async def report(r: DeliveryReport) -> None:
        reports.append(r)

    channel = HttpSmsChannel(SmsSettings("http", url, TOKEN, 0.3, RETRIES), client)
    phone = Phone("+31612345678", "NL", 31, "612345678", NumberKind.MOBILE)
    try:
        async with server:
            async with asyncio.timeout(5):
                await channel.send(Delivery("V" * 32, phone, "12345678", "en", "x"), report)
    finally:
        await client.close()
    assert len(posts) == 1, "sent again"
    assert [(r.kind.value, r.detail) for r in reports] == [
        (kind, f"gateway {status}") if kind == "delivered" else (kind, f"gateway answered {status}")
    ]
