"""A seeded, generated run of the clinic line's ``webhook`` step (the appointments flow's
request to ``CLINIC_SCHEDULING_WEBHOOK``) against a real local receiver whose answer to each
POST is drawn: 2xx with a JSON object, with a body that is no JSON, with a wrong content type,
gzip-encoded, empty or 204; a body over the client's cap, one that never ends, a slow drip past
the step's timeout; 3xx redirects (to itself, to another receiver, to https); 4xx; 5xx; the
connection reset with no answer or cut mid-answer; accepted and never answered; headers only,
then nothing; a bad chunk; and a port that refuses connections.

Each call runs through the real :class:`CallSession` (a scripted SIP call, the shipped flows
with the step's ``timeout_s`` at 1 s) with the real ``ClinicLine._post_webhook`` and the real
:class:`HttpClient`, and is held to the README ("A flow's `webhook` step ..."):

- tried once: the receiver gets exactly one POST (none when refused), a redirect is not
  followed (its target gets nothing);
- the POST: the step's values, ``request``, ``call_id`` and ``caller`` and nothing else,
  signed with ``CLINIC_SCHEDULING_WEBHOOK_SECRET``;
- one result: a 2xx is success (the JSON object's members the flow reads become values, the
  caller hears the confirmation), anything else the failure branch (the caller hears the
  system cannot be reached); the record's path says ``ok``, ``failed`` or ``timeout``;
- the caller's wait (the POST asked for to the next prompt, on the loop's clock) is bounded
  by the step's timeout;
- no exception escapes, no log line holds what the caller entered, the caller's number or the
  reply's message, and no connection of the client is left in flight after the call.

``CLINIC_TEST_SEED=<n>`` replays a run; ``CLINIC_TEST_WEBHOOK_CALLS=<n>`` makes more calls.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
import logging
import os
import random
import shutil
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiohttp import web

from clinic_voice.app import Runtime
from clinic_voice.clinic_line import ClinicLine, check_clinic_line
from sip_config.clock import SystemClock
from sip_config.settings import Settings
from tests.conftest import free_port
from tests.integration.conftest import SECRET
from tests.peers.loopback_http import serve_on_loopback
from tests.unit.test_ivr_session_races import Rig
from verification.http_client import MAX_BODY, HttpClient
from verification.webhooks import SIGNATURE_HEADER, verify
from voice.ivr.flow import FlowSet
from voice.ivr.session import CallSession
from voice.sip.pool import CallHandle
from voice.sip.protocol import Digit, PlayDone

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]

FLOWS = Path(__file__).resolve().parents[2] / "ivr_flows"
STEP_TIMEOUT_S = 1.0
SLACK_S = 1.0  # a shared 2-core machine
SCHEDULING_KEY = "s" * 40
DOB, PATIENT = "01011980", "4321987"
MESSAGE = "See you Monday at nine."
SENT_KEYS = {
    "appt_action", "dob", "patient_number", "request", "call_id", "caller", "caller_verified"
}  # fmt: skip
CONFIRM = "Your request to book an appointment has been received"
UNAVAILABLE = "the appointment system cannot be reached"


class Act(StrEnum):
    """What the receiver does with one POST."""

    JSON = "2xx, a JSON object"
    NOT_JSON = "2xx, a body that is no JSON"
    WRONG_TYPE = "2xx, JSON as text/html"
    GZIP = "2xx, gzip-encoded JSON"
    EMPTY = "204 / 200 with no body"
    HUGE = "2xx, a body over the cap"
    ENDLESS = "2xx, a body that never ends"
    DRIP = "2xx, a slow drip past the timeout"
    BAD_CHUNK = "2xx, chunked with a bad chunk"
    HEAD_STALL = "2xx headers, then nothing"
    REDIRECT = "3xx"
    CLIENT_ERROR = "4xx"
    SERVER_ERROR = "5xx"
    RESET = "reset, no answer"
    CUT = "cut mid-answer"
    HANG = "accepted, never answered"
    REFUSED = "port refuses connections"


ACTS = list(Act)
# A 2xx whose body then broke off, was framed wrongly, was over the cap or had not all come
# by the step's timeout: the request arrived all the same (README: "Any 2xx answer is
# success").
OK_ACTS = {
    Act.JSON,
    Act.NOT_JSON,
    Act.WRONG_TYPE,
    Act.GZIP,
    Act.EMPTY,
    Act.HUGE,
    Act.BAD_CHUNK,
    Act.CUT,
    Act.ENDLESS,
    Act.DRIP,
    Act.HEAD_STALL,
}
TIMEOUT_ACTS = {Act.HANG}  # no status line in time


@dataclass(frozen=True, slots=True)
class Seen:
    """One POST as the receiver got it."""

    path: str
    body: bytes
    headers: dict[str, str]


class DrawnReceiver:
    """An aiohttp receiver on 127.0.0.1 doing ``acts[n]`` with the POST to ``/hook/<n>``."""

    def __init__(self, acts: list[Act], seed: int) -> None:
        self.acts = acts
        self.seed = seed
        self.seen: list[Seen] = []
        self.open: set[int] = set()  # transports of the client's connections still open
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook/{n}", self._handle)
        app.router.add_post("/elsewhere", self._handle)
        self._runner, self.port = await serve_on_loopback(app, shutdown_timeout=0.3)

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, n: int) -> str:
        return f"http://127.0.0.1:{self.port}/hook/{n}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.seen.append(Seen(request.path, raw, dict(request.headers)))
        if request.path == "/elsewhere":
            return web.json_response({"message": "redirected"})
        n = int(request.match_info["n"])
        rnd = random.Random(f"{self.seed}:{n}:answer")
        transport = request.transport
        assert transport is not None
        act = self.acts[n]
        ok = rnd.choice([200, 201, 202])
        if act is Act.JSON:
            reply = {"message": MESSAGE, "slot": "2030-01-07T09:00", "ready": True, "n": 3}
            return web.json_response(reply, status=ok)
        if act is Act.NOT_JSON:
            return web.Response(status=ok, text=rnd.choice(["OK", "<html>ok</html>", "[1, 2]"]))
        if act is Act.WRONG_TYPE:
            text = json.dumps({"message": MESSAGE})
            return web.Response(status=ok, text=text, content_type="text/html")
        if act is Act.GZIP:
            packed = gzip.compress(json.dumps({"message": MESSAGE}).encode())
            headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
            return web.Response(status=ok, body=packed, headers=headers)
        if act is Act.EMPTY:
            return web.Response(status=rnd.choice([200, 204]))
        if act is Act.REDIRECT:
            status = rnd.choice([301, 302, 303, 307, 308])
            where = rnd.choice(
                [
                    str(request.url),  # itself
                    f"http://127.0.0.1:{self.port}/elsewhere",  # another receiver
                    f"https://127.0.0.1:{self.port}/hook/{n}",  # to https
                    "http://scheduling.example/hook",  # another host
                ]
            )
            return web.Response(status=status, headers={"Location": where})
        if act is Act.CLIENT_ERROR:
            status = rnd.choice([400, 401, 403, 404, 409, 413, 422, 429])
            return web.json_response({"message": "no"}, status=status)
        if act is Act.SERVER_ERROR:
            status = rnd.choice([500, 502, 503, 504])
            return web.json_response({"message": "down"}, status=status)
        # Raw answers from here on: written on the connection, the handler then waits.
        head = f"HTTP/1.1 {ok} OK\r\nContent-Type: application/json\r\n"
        if act is Act.HUGE:
            size = MAX_BODY + rnd.choice([1, 4096, MAX_BODY])
            if rnd.random() < 0.5:
                transport.write(f"{head}Content-Length: {size}\r\n\r\n".encode())
            else:  # announced by no length: read up to the close
                transport.write(f"{head}Connection: close\r\n\r\n".encode())
            chunk = b'{"message": "' + b"x" * 65536
            sent = 0
            while sent < size and not transport.is_closing():
                transport.write(chunk)
                sent += len(chunk)
                await asyncio.sleep(0)
            transport.close()
        elif act is Act.ENDLESS:
            transport.write(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
            while not transport.is_closing() and not self._release.is_set():
                transport.write(b"400\r\n" + b" " * 1024 + b"\r\n")
                await asyncio.sleep(0.01)
        elif act is Act.DRIP:
            drip = json.dumps({"message": MESSAGE}).encode()
            transport.write(f"{head}Content-Length: {len(drip)}\r\n\r\n".encode())
            for i in range(len(drip)):
                if transport.is_closing() or self._release.is_set():
                    break
                transport.write(drip[i : i + 1])
                await asyncio.sleep(STEP_TIMEOUT_S / 8)
        elif act is Act.BAD_CHUNK:
            transport.write(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
            transport.write(rnd.choice([b"zz\r\n{}\r\n0\r\n\r\n", b"2\r\n{}XX0\r\n\r\n"]))
        elif act is Act.HEAD_STALL:
            transport.write(f"{head}Content-Length: 20\r\n\r\n".encode())
        elif act is Act.CUT:
            transport.write(f'{head}Content-Length: 40\r\n\r\n{{"message": '.encode())
            transport.close()
        elif act is Act.RESET:
            transport.abort()
        # HANG: nothing at all
        await self._release.wait()
        return web.Response(status=500)


def draw_acts(seed: int, calls: int) -> list[Act]:
    """Every act once in the first ``len(ACTS)`` calls (shuffled), then drawn."""
    rnd = random.Random(f"{seed}:acts")
    acts = list(ACTS)
    rnd.shuffle(acts)
    acts += [rnd.choice(ACTS) for _ in range(max(0, calls - len(acts)))]
    return acts[:calls]


def _flows(tmp_path: Path) -> Path:
    flows = tmp_path / "flows"
    shutil.copytree(FLOWS, flows)
    appointments = flows / "appointments.yaml"
    text = appointments.read_text()
    assert "      timeout_s: 5\n      save: booking" in text
    appointments.write_text(
        text.replace(
            "      timeout_s: 5\n      save: booking", "      timeout_s: 1\n      save: booking"
        )
    )
    return flows


def _checked(tmp_path: Path, flows: Path) -> FlowSet:
    settings = Settings.from_env({"CLINIC_DATA_DIR": str(tmp_path), "CLINIC_FLOWS_DIR": str(flows)})
    return check_clinic_line(settings)


# The flows loaded and checked by plain fixtures, outside the event loop that no_blocking
# watches: the load (pure-Python YAML) takes ~0.2 s of CPU, and in a thread it held loop
# steps up to 62 ms waiting for the GIL (the watch counts that wait; two cores, loaded).
@pytest.fixture
def shipped_flows(tmp_path: Path) -> FlowSet:
    """The shipped flows."""
    return _checked(tmp_path, FLOWS)


@pytest.fixture
def short_flows(tmp_path: Path) -> FlowSet:
    """The shipped flows with the appointment request's timeout 1 s (``_flows``)."""
    return _checked(tmp_path, _flows(tmp_path))


@dataclass(slots=True)
class Call:
    n: int
    act: Act
    hang_up_early: bool
    waited_s: float = -1.0
    heard: str = ""
    webhook_steps: tuple[str, ...] = ()
    values: dict[str, str] = dataclasses.field(default_factory=dict)
    outcome: str | None = None
    error: str = ""


def _line(tmp_path: Path, flows: FlowSet, client: HttpClient, url: str) -> ClinicLine:
    """The clinic line running ``flows``, posting to ``url`` on ``client`` (the one
    ``serve`` shares)."""
    settings = Settings.from_env(
        {
            "CLINIC_DATA_DIR": str(tmp_path),
            "CLINIC_SCHEDULING_WEBHOOK": url,
            "CLINIC_SCHEDULING_WEBHOOK_SECRET": SCHEDULING_KEY,
        }
    )
    rt = SimpleNamespace(http_client=client, clock=SystemClock(), secret=SECRET.encode())
    return ClinicLine.load(settings, cast(Runtime, rt), flows)


async def _one_call(call: Call, line: ClinicLine, flows: FlowSet) -> None:
    """Through the main menu to an appointment request, then the next prompt."""
    rig = Rig(called="6000", speech=False, flowset=flows)
    loop = asyncio.get_running_loop()
    asked_at: list[float] = []

    async def post(key: str, values: Any, timeout_s: float) -> Any:
        asked_at.append(loop.time())
        if call.hang_up_early:
            loop.call_later(0.05, rig.call.end)  # the caller gives up while it runs
        return await line._post_webhook(key, values, timeout_s)

    rig.deps = dataclasses.replace(rig.deps, post_webhook=post)
    rig.session = CallSession(cast(CallHandle, rig.call), rig.deps)
    rig.start()
    welcome = await rig.until_prompt("Welcome to")
    rig.call.send(PlayDone("call-1", welcome))
    await rig.until_prompt("How can I help you")
    rig.call.send(Digit("call-1", "1"))
    await rig.until_prompt("To book an appointment, press 1")
    rig.call.send(Digit("call-1", "1"))
    await rig.until_prompt("date of birth")
    rig.call.send(*(Digit("call-1", d) for d in DOB + "#"))
    await rig.until_prompt("patient number")
    plays = len(rig.call.plays())
    rig.call.send(*(Digit("call-1", d) for d in PATIENT + "#"))
    if call.hang_up_early:
        assert rig.task is not None
        async with asyncio.timeout(STEP_TIMEOUT_S + 5):
            await rig.task
    else:
        await rig.until(lambda: len(rig.call.plays()) > plays, within_s=STEP_TIMEOUT_S + 5)
        call.waited_s = loop.time() - asked_at[0]
        call.heard = rig.call.last_play()[1]
        await rig.finish()
    assert len(asked_at) == 1, asked_at
    (saved,) = rig.saved
    rec = saved.record
    call.webhook_steps = tuple(p.value for p in rec.path if p.input == "webhook")
    call.values = {k: v for k, v in dict(rec.values).items() if k.startswith("booking.")}
    call.outcome = rec.outcome


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("CLINIC_TEST_SEED") or random.randrange(2**32))
    print(f"CLINIC_TEST_SEED={value}")
    return value


@pytest.fixture
async def client() -> AsyncIterator[HttpClient]:
    http = HttpClient()
    try:
        yield http
    finally:
        await http.close()


async def test_generated_receivers_hold_the_webhook_step_to_the_readme(
    tmp_path: Path,
    seed: int,
    client: HttpClient,
    caplog: pytest.LogCaptureFixture,
    short_flows: FlowSet,
) -> None:
    caplog.set_level(logging.DEBUG)
    calls_n = int(os.environ.get("CLINIC_TEST_WEBHOOK_CALLS", str(len(ACTS) + 7)))
    acts = draw_acts(seed, calls_n)
    rnd = random.Random(f"{seed}:calls")
    receiver = DrawnReceiver(acts, seed)
    await receiver.start()
    flows = short_flows
    refused_url = f"http://127.0.0.1:{free_port()}/hook"
    by_url = {url: _line(tmp_path, flows, client, url) for url in (receiver.url(0), refused_url)}
    faults: list[str] = []
    calls: list[Call] = []
    try:
        for n, act in enumerate(acts):
            call = Call(n, act, hang_up_early=rnd.random() < 0.2)
            calls.append(call)
            line = by_url[refused_url if act is Act.REFUSED else receiver.url(0)]
            if act is not Act.REFUSED:  # the same line, the call's own receiver path
                line._webhooks["scheduling"] = ("CLINIC_SCHEDULING_WEBHOOK", receiver.url(n))
            before = len(receiver.seen)
            try:
                await _one_call(call, line, flows)
            except Exception as exc:  # a fault of this call, reported below
                call.error = repr(exc)
            posts = [s for s in receiver.seen[before:] if s.path != "/elsewhere"]
            story = f"call {n} ({act}{', hung up early' if call.hang_up_early else ''})"
            faults += _check(call, posts, story)
            faults += [
                f"{story}: a redirect was followed"
                for s in receiver.seen[before:]
                if s.path == "/elsewhere"
            ]
            in_flight = [p for p in client._pools.values() if p.count != len(p.idle)]
            if in_flight:
                faults.append(f"{story}: a connection of the client is still in flight")
    finally:
        await receiver.stop()
    for r in caplog.records:
        text = r.getMessage() + (r.exc_text or "") + repr(r.args)
        for secret in (DOB, PATIENT, "+31612345678", MESSAGE):
            if secret in text:
                faults.append(f"log record of {r.name} holds {secret!r}: {r.getMessage()[:80]}")
    print(f"{len(calls)} calls: {dict(Counter(str(c.act) for c in calls))}")
    assert not faults, f"seed {seed}:\n  " + "\n  ".join(faults)


def _check(call: Call, posts: list[Seen], story: str) -> list[str]:
    faults: list[str] = []
    if call.error:
        return [f"{story}: {call.error}"]
    want_posts = 0 if call.act is Act.REFUSED else 1
    if len(posts) != want_posts:
        faults.append(f"{story}: {len(posts)} POSTs, README says {want_posts} (tried once)")
    for seen in posts:
        try:
            body = json.loads(seen.body)
        except ValueError:
            faults.append(f"{story}: the POST is no JSON: {seen.body[:80]!r}")
            continue
        if set(body) != SENT_KEYS:
            faults.append(f"{story}: POST members {sorted(body)}, README says {sorted(SENT_KEYS)}")
        want = {
            "appt_action": "book",
            "dob": DOB,
            "patient_number": PATIENT,
            "request": "appointment",
            "call_id": "call-1",
            "caller": "+31612345678",
            "caller_verified": False,  # the scripted call's own From: only claimed
        }
        if {k: body.get(k) for k in want} != want:
            faults.append(f"{story}: POST values differ from what the caller entered")
        if not verify(SCHEDULING_KEY.encode(), seen.headers.get(SIGNATURE_HEADER, ""), seen.body):
            faults.append(f"{story}: the signature does not verify")
        if seen.headers.get("Content-Type") != "application/json":
            faults.append(f"{story}: Content-Type {seen.headers.get('Content-Type')!r}")
    expected = "ok" if call.act in OK_ACTS else "timeout" if call.act in TIMEOUT_ACTS else "failed"
    if call.webhook_steps != (expected,):
        faults.append(f"{story}: the record's path says {call.webhook_steps}, README {expected!r}")
    values = {"booking.message": MESSAGE} if call.act in (Act.JSON, Act.WRONG_TYPE) else {}
    if call.values != values:
        faults.append(f"{story}: values {call.values}, expected {values}")
    if expected == "ok" and call.outcome != "appointment_requested":
        faults.append(f"{story}: outcome {call.outcome}, README: appointment_requested")
    if not call.hang_up_early:
        if call.waited_s > STEP_TIMEOUT_S + SLACK_S:
            faults.append(f"{story}: the caller waited {call.waited_s:.2f} s")
        heard = CONFIRM if expected == "ok" else UNAVAILABLE
        if heard not in call.heard:
            faults.append(f"{story}: the caller heard {call.heard!r}, expected {heard!r}")
        if call.act is Act.JSON and MESSAGE not in call.heard:
            faults.append(f"{story}: the reply's message was not spoken")
    return faults


STALLED = {
    "no body byte": b"Content-Length: 20\r\n\r\n",
    "part of the body": b'Content-Length: 40\r\n\r\n{"message": ',
    "a chunk, no end": b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"mes\r\n',
}


@pytest.mark.parametrize("stalled", list(STALLED))
@pytest.mark.parametrize(("status", "want"), [(200, {}), (202, {}), (503, None)])
async def test_a_2xx_whose_body_stalls_past_the_timeout_is_a_request_that_arrived(
    tmp_path: Path,
    client: HttpClient,
    stalled: str,
    status: int,
    want: dict[str, str] | None,
    *,
    shipped_flows: FlowSet,
) -> None:
    # The receiver took the request and said 2xx, then its body stalled past the step's
    # timeout: the record said "timeout" and the caller heard "cannot be reached", though
    # the README says any 2xx is success. Success with no values, as a body that broke off;
    # the wait stays the step's timeout. A 5xx head stays a failure.
    release = asyncio.Event()

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        assert request.transport is not None
        request.transport.write(b"HTTP/1.1 %d X\r\n%b" % (status, STALLED[stalled]))
        await release.wait()
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner, port = await serve_on_loopback(app, shutdown_timeout=0.1)
    loop = asyncio.get_running_loop()
    try:
        url = f"http://127.0.0.1:{port}/hook"
        line = _line(tmp_path, shipped_flows, client, url)
        started = loop.time()
        got = await line._post_webhook("scheduling", {"request": "appointment"}, STEP_TIMEOUT_S)
        took = loop.time() - started
    finally:
        release.set()
        await runner.cleanup()
    assert got == want
    assert STEP_TIMEOUT_S - 0.05 <= took <= STEP_TIMEOUT_S + SLACK_S, took


@pytest.mark.parametrize("act", [Act.HEAD_STALL, Act.ENDLESS, Act.DRIP])
async def test_a_call_whose_request_got_a_2xx_then_a_stalled_body_hears_it_arrived(
    tmp_path: Path, client: HttpClient, act: Act, short_flows: FlowSet
) -> None:
    # Through the real session and the shipped flows: the record says "ok", the caller hears
    # the confirmation (not "cannot be reached") within the step's timeout and some slack.
    receiver = DrawnReceiver([act], seed=1)
    await receiver.start()
    call = Call(0, act, hang_up_early=False)
    try:
        line = _line(tmp_path, short_flows, client, receiver.url(0))
        await _one_call(call, line, short_flows)
    finally:
        await receiver.stop()
    assert call.webhook_steps == ("ok",)
    assert CONFIRM in call.heard and UNAVAILABLE not in call.heard
    assert call.outcome == "appointment_requested"
    assert call.values == {}
    assert call.waited_s <= STEP_TIMEOUT_S + SLACK_S, call.waited_s


BROKEN = {
    "cut mid-body": b'Content-Length: 40\r\n\r\n{"message": ',
    "a bad chunk": b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "over the cap": b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1),
}


@pytest.mark.parametrize("broken", list(BROKEN))
@pytest.mark.parametrize(("status", "want"), [(200, {}), (202, {}), (503, None)])
async def test_a_2xx_whose_body_cannot_be_read_is_a_request_that_arrived(
    tmp_path: Path,
    client: HttpClient,
    broken: str,
    status: int,
    want: dict[str, str] | None,
    *,
    shipped_flows: FlowSet,
) -> None:
    # Found by the generated run: the receiver took the appointment request and said 2xx,
    # then its body broke off. The step took on_fail ("cannot be reached", staff) and the
    # record said "failed", so staff would book it again. A 5xx stays a failure.
    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        assert request.transport is not None
        request.transport.write(b"HTTP/1.1 %d X\r\n%b" % (status, BROKEN[broken]))
        request.transport.close()
        await asyncio.sleep(1)
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner, port = await serve_on_loopback(app, shutdown_timeout=0.1)
    try:
        url = f"http://127.0.0.1:{port}/hook"
        line = _line(tmp_path, shipped_flows, client, url)
        assert await line._post_webhook("scheduling", {"request": "appointment"}, 2.0) == want
    finally:
        await runner.cleanup()
