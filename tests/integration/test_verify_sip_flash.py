"""Verification by flash call and SMS over SIP, through the whole service, against real sipp.

The service runs in-process as ``clinic-voice serve`` builds it (``build_app`` with the SIP
wiring: real pjsua2 worker processes, real ``redis-server``) behind an aiohttp test server; the
phone is a sipp UAS whose ``-trace_msg`` file is the wire. A test reads the code from the wire
(the caller-ID of the flash call, the body of the MESSAGE), as a handset would, and checks it
over the API.

:func:`sip_service` and the constants here are shared by the other ``test_verify_sip_*``
modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from clinic_voice.app import RUNTIME, build_app
from clinic_voice.clinic_line import check_clinic_line
from clinic_voice.wiring import channel_factories, extra_contexts
from sip_config.settings import Settings
from tests.conftest import RedisServer
from tests.integration.conftest import API_KEY, SECRET, Api, OpenApiCollector
from tests.integration.test_sip_pool import Sipp, Wire, sipp_uas
from verification.channels import flash_call
from verification.errors import StoreUnavailable
from verification.model import EventKind, Verification
from verification.store import Stored, VerificationStore
from voice.sip import message
from voice.sip.pool import SipPool

pytestmark = pytest.mark.integration

CLINIC = "Riverside Surgery"
PREFIX = "+447400"  # CLINIC_FLASHCALL_PREFIX: the code digits follow it in the caller-ID
NATIONAL_PREFIX = "07400"  # the same prefix as a UK handset shows a UK caller-ID
MOBILE = "+447911123456"  # a valid UK mobile number (phonenumbers agrees)
RING_S = 1.0
# Every wait on the service has a deadline (the no-reply case adds the channel's 20 s).
DEADLINE_S = 10.0


@dataclass
class SipService:
    """One running service: its API client and the SIP pool it owns."""

    api: Api
    app: web.Application

    @property
    def pool(self) -> SipPool:
        pool = self.app[RUNTIME].sip_pool
        assert pool is not None, "the service runs no SIP pool"
        return pool


def service_settings(
    redis_url: str, data_dir: Path, route_port: int, env: Mapping[str, str] | None = None
) -> Settings:
    """Settings of a test service whose SIP route leads to 127.0.0.1:``route_port``."""
    return Settings.from_env(
        {
            "CLINIC_API_KEYS": API_KEY,
            "CLINIC_SECRET": SECRET,
            "CLINIC_NAME": CLINIC,
            "CLINIC_LOG_LEVEL": "DEBUG",
            "CLINIC_REDIS_URL": redis_url,
            "CLINIC_DATA_DIR": str(data_dir),
            # Port 0: the pool's workers take free ports (tests run in parallel).
            "CLINIC_SIP_ADDR": "127.0.0.1:0",
            "CLINIC_SIP_WORKERS": "2",
            "CLINIC_SIP_ROUTE": f"sip:{{e164}}@127.0.0.1:{route_port}",
            "CLINIC_FLASHCALL_PREFIX": PREFIX,
            "CLINIC_FLASHCALL_RING_S": f"{RING_S:g}",
            "CLINIC_SMS_GATEWAY": "sip",
            **(env or {}),
        }
    )


_prompt_cache: list[Path] = []


def shared_prompt_cache(config: pytest.Config, factory: pytest.TempPathFactory) -> Path:
    """One prompt cache for every service of the session, kept between runs when it can be.

    The clinic line renders every static prompt of its flows when the service starts (about
    25 s here when nothing is cached), which would dwarf the tests. Cached files are named by
    a hash of text, voice, rate and the espeak-ng version and written atomically, so the
    pytest cache (``.pytest_cache``) may hold them across runs; without it
    (``-p no:cacheprovider``), the session's temp dir does.
    """
    if not _prompt_cache:
        cache = getattr(config, "cache", None)
        path = (
            cache.mkdir("clinic-voice-prompts")
            if cache is not None
            else factory.mktemp("prompt-cache")
        )
        _prompt_cache.append(path)
    return _prompt_cache[0]


@dataclass
class Rig:
    """What a service under test needs from pytest: Redis, a temp dir, the OpenAPI check."""

    redis: RedisServer
    tmp_path: Path
    prompt_cache: Path
    collector: OpenApiCollector
    started: int = 0

    def data_dir(self) -> Path:
        """A fresh data dir whose prompt cache is the session's."""
        self.started += 1
        path = self.tmp_path / f"data{self.started}"
        path.mkdir(mode=0o700)
        (path / "prompts").symlink_to(self.prompt_cache, target_is_directory=True)
        return path


def make_rig(request: pytest.FixtureRequest) -> Rig:
    """The :class:`Rig` of one test (each ``test_verify_sip_*`` module has a ``rig`` fixture
    calling this, so the fixtures it pulls in are declared once)."""
    redis: RedisServer = request.getfixturevalue("redis_server")
    tmp_path: Path = request.getfixturevalue("tmp_path")
    factory: pytest.TempPathFactory = request.getfixturevalue("tmp_path_factory")
    collector: OpenApiCollector = request.getfixturevalue("openapi_responses")
    cache = shared_prompt_cache(request.config, factory)
    return Rig(redis, tmp_path, cache, collector)


@pytest.fixture
def rig(request: pytest.FixtureRequest) -> Rig:
    return make_rig(request)


@contextlib.asynccontextmanager
async def sip_service(
    rig: Rig, route_port: int, env: Mapping[str, str] | None = None
) -> AsyncIterator[SipService]:
    """The whole service on 127.0.0.1 with its SIP pool; stopped (workers too) on exit."""
    settings = service_settings(rig.redis.url, rig.data_dir(), route_port, env)
    app = build_app(
        settings,
        extra_contexts=extra_contexts(settings, check_clinic_line(settings)),
        channel_factories=channel_factories(settings),
    )
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        async with client.get("/openapi.json") as resp:
            assert resp.status == 200, await resp.text()
            rig.collector.load(await resp.json())
        service = SipService(Api(client, rig.collector), app)
        assert service.pool.ready(), "SIP pool not ready after start"
        yield service
    finally:
        await client.close()


def event_types(v: Mapping[str, Any]) -> list[str]:
    return [e["type"] for e in v["events"]]


def event_at(v: Mapping[str, Any], kind: str) -> float:
    """When the first event of ``kind`` happened (epoch seconds)."""
    for e in v["events"]:
        if e["type"] == kind:
            return datetime.fromisoformat(e["at"].replace("Z", "+00:00")).timestamp()
    raise AssertionError(f"no {kind} event in {event_types(v)}")


async def wait_until_settled(
    api: Api, vid: str, kinds: set[str], deadline_s: float = DEADLINE_S
) -> dict[str, Any]:
    """Poll until one of ``kinds`` is the last event of the verification."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while True:
        v = await api.get(vid)
        if v["events"] and v["events"][-1]["type"] in kinds:
            return v
        if loop.time() > end:
            pytest.fail(f"{vid}: none of {sorted(kinds)} within {deadline_s} s: {event_types(v)}")
        await asyncio.sleep(0.05)


async def create(api: Api, **body: Any) -> str:
    body.setdefault("phone", MOBILE)
    answer = await api.create(**body)
    assert answer.status == 201, answer.text
    return str(answer.json["id"])


def only(wires: list[Wire], what: str) -> Wire:
    assert len(wires) == 1, f"expected one {what} on the wire, saw {len(wires)}"
    return wires[0]


def code_from_invite(invite: Wire) -> str:
    """The code as the phone gets it: the caller-ID after the flash-call prefix."""
    caller = message.user_part(invite.msg.get("From") or "")
    assert caller.startswith(PREFIX), f"the caller-ID does not start with {PREFIX}"
    code = caller[len(PREFIX) :]
    assert re.fullmatch(r"[0-9]{6}", code), "the caller-ID does not end in a 6-digit code"
    return code


def code_from_message(wire: Wire) -> str:
    """The code in the text of a SIP MESSAGE (the SMS)."""
    found = re.findall(r"\b[0-9]{4,8}\b", wire.msg.body.decode())
    assert len(found) == 1, f"expected one code in the MESSAGE, found {len(found)}"
    return str(found[0])


async def wire_request(sipp: Sipp, method: str, deadline_s: float = DEADLINE_S) -> Wire:
    """Wait until sipp has received one ``method`` request (its trace is written as it goes)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while not (seen := sipp.received(method)):
        if loop.time() > end:
            pytest.fail(f"sipp on {sipp.port} received no {method} within {deadline_s} s")
        await asyncio.sleep(0.05)
    return only(seen, method)


def assert_not_logged(
    secret: str, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """Neither the service's log records nor the workers' stderr may hold ``secret``.

    STYLE.md habit 9: never a code, nor a caller-ID tail that is a code, in a log line. The
    test must have called ``caplog.set_level(logging.DEBUG)`` first, so every line is seen.
    """
    workers = capfd.readouterr().err
    assert secret not in caplog.text, "a code appears in the service's log records"
    assert secret not in workers, "a code appears in the SIP workers' log lines"


def other_code(code: str) -> str:
    """The same length, every digit different."""
    return "".join(str((int(d) + 1) % 10) for d in code)


# -- ring until cancelled: the success path ---------------------------------------------


@pytest.mark.parametrize(
    "how",
    ["cli-national", "cli-international", "cli-runs", "code"],
)
async def test_flash_call_rings_is_cancelled_and_its_caller_id_approves(
    rig: Rig,
    tmp_path: Path,
    how: str,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    async with (
        sipp_uas("sipp_uas_ring.xml", tmp_path) as uas,
        sip_service(rig, uas.port) as svc,
    ):
        answer = await svc.api.create(phone=MOBILE, method="flashcall", fallback=[])
        assert answer.status == 201, answer.text
        created = answer.json
        vid = created["id"]
        assert created["flashcall"]["cli_prefix"] == PREFIX
        v = await wait_until_settled(svc.api, vid, {"delivered", "undeliverable"})
        assert event_types(v) == ["requested", "dispatched", "ringing", "delivered"], v
        assert await uas.finish() == 0, "the sipp ring scenario did not complete"

        invite = only(uas.received("INVITE"), "INVITE")
        code = code_from_invite(invite)
        pai = message.user_part(invite.msg.get("P-Asserted-Identity") or "")
        assert pai == PREFIX + code, "P-Asserted-Identity does not carry the same caller-ID"
        assert re.fullmatch(created["flashcall"]["cli_filter"], NATIONAL_PREFIX + code)
        # Late offer: a flash call opens no media (TELEPHONY.md: no RTP ports).
        assert invite.msg.get("Content-Length") == "0", "the INVITE has a body"
        assert not invite.msg.body.strip(), "the INVITE has a body"
        assert invite.msg.get("Content-Type") is None, "the INVITE announces a body"
        ringing = [w for w in uas.wire() if not w.received and w.msg.status == 180]
        assert ringing, "sipp sent no 180"
        cancel = only(uas.received("CANCEL"), "CANCEL")
        rang = cancel.at - ringing[0].at
        assert RING_S <= rang <= RING_S + 0.2, f"CANCEL {rang:.3f} s after 180, not {RING_S} s"
        assert uas.received("ACK"), "the 487 was not ACKed"
        assert not uas.received("BYE"), "a cancelled flash call has no dialog to BYE"

        # A wrong caller-ID counts as a wrong check; the one the phone showed approves.
        wrong = await svc.api.request(
            "POST", f"/v1/verifications/{vid}/check", json_body={"cli": PREFIX + other_code(code)}
        )
        assert wrong.json == {"id": vid, "status": "pending", "attempts_left": 4}, wrong.text
        # A run of separators is read as one (README): another code so written is a wrong check.
        spaced = await svc.api.request(
            "POST",
            f"/v1/verifications/{vid}/check",
            json_body={"cli": f"{NATIONAL_PREFIX}  {other_code(code)}"},
        )
        assert spaced.json == {"id": vid, "status": "pending", "attempts_left": 3}, spaced.text
        # Brackets and dots are in no form cli_filter matches: 422, and no attempt spent (a
        # review found the right code in "+44 (0)7400 ..." counted as a wrong check).
        for shown in (f"+44 (0)7400 {code}", f"(07400) {code}", f"+44 7400.{code}"):
            bracketed = await svc.api.request(
                "POST", f"/v1/verifications/{vid}/check", json_body={"cli": shown}
            )
            bracketed.problem(422, "invalid-request")
        body = {
            "cli-national": {"cli": NATIONAL_PREFIX + code},
            "cli-international": {"cli": PREFIX + code},
            # cli_filter matches one separator; the check reads each run as one.
            "cli-runs": {"cli": f"+  44 - {PREFIX[3:]}--{code[:3]}  {code[3:]}"},
            "code": {"code": code},
        }[how]
        if how == "cli-runs":  # the published filter is unchanged: it does not match runs
            assert not re.fullmatch(created["flashcall"]["cli_filter"], body["cli"])
        right = await svc.api.request("POST", f"/v1/verifications/{vid}/check", json_body=body)
        assert right.json == {"id": vid, "status": "approved", "attempts_left": 3}, right.text
        assert event_types(await svc.api.get(vid))[-1] == "approved"
    assert_not_logged(code, caplog, capfd)


async def test_approval_cuts_a_long_flash_call_ring_short(rig: Rig, tmp_path: Path) -> None:
    """The app read the caller-ID while the phone still rang: the flash call is cancelled at
    once instead of ringing on for CLINIC_FLASHCALL_RING_S, and nothing follows "approved"."""
    async with (
        sipp_uas("sipp_uas_ring.xml", tmp_path) as uas,
        sip_service(rig, uas.port, {"CLINIC_FLASHCALL_RING_S": "30"}) as svc,
    ):
        vid = await create(svc.api, method="flashcall", fallback=[])
        await wait_until_settled(svc.api, vid, {"ringing"})
        code = code_from_invite(await wire_request(uas, "INVITE"))
        right = await svc.api.request(
            "POST", f"/v1/verifications/{vid}/check", json_body={"cli": PREFIX + code}
        )
        assert right.json["status"] == "approved", right.text
        await wire_request(uas, "CANCEL", deadline_s=2.0)  # not after the 30 s ring
        assert await uas.finish() == 0, "the ring scenario (CANCEL, 487, ACK) did not complete"
        await asyncio.sleep(0.5)  # a report of the ended call would be written by now
        assert event_types(await svc.api.get(vid)) == [
            "requested",
            "dispatched",
            "ringing",
            "approved",
        ]


# -- answered: recorded, hung up at once --------------------------------------------------


async def test_answered_flash_call_is_hung_up_with_bye(rig: Rig, tmp_path: Path) -> None:
    async with (
        sipp_uas("sipp_uas_answer.xml", tmp_path) as uas,
        sip_service(rig, uas.port) as svc,
    ):
        vid = await create(svc.api, method="flashcall", fallback=["sms"])
        v = await wait_until_settled(svc.api, vid, {"answered"})
        assert await uas.finish() == 0, "the sipp answer scenario did not complete"
        invite = only(uas.received("INVITE"), "INVITE")
        code = code_from_invite(invite)
        assert uas.received("ACK"), "the 200 was not ACKed"
        bye = only(uas.received("BYE"), "BYE")
        ok = [w for w in uas.wire() if not w.received and w.msg.status == 200]
        assert bye.at - ok[0].at < 0.5, f"BYE {bye.at - ok[0].at:.3f} s after the answer"
        v = await svc.api.get(vid)
        # An answered flash call showed a caller-ID too, but no missed call: no "delivered",
        # and no fallback until the step times out (the user may still type the number).
        assert event_types(v) == ["requested", "dispatched", "ringing", "answered"], v
        assert v["status"] == "pending" and v["channel"] == "flashcall"
        right = await svc.api.request(
            "POST", f"/v1/verifications/{vid}/check", json_body={"cli": NATIONAL_PREFIX + code}
        )
        assert right.json["status"] == "approved", right.text


# -- failures: undeliverable, and the next channel at once ---------------------------------


@pytest.mark.parametrize(
    ("scenario", "detail", "gave_up_s"),
    [
        ("sipp_verify_busy.xml", "busy (486)", (0.0, 1.0)),
        ("sipp_verify_notfound.xml", "not_found (404)", (0.0, 1.0)),
        # Nothing at all comes back: the channel gives up after its answer timeout (20 s).
        (
            "sipp_verify_noreply.xml",
            "no_answer",
            (flash_call.ANSWER_TIMEOUT_S - 0.5, flash_call.ANSWER_TIMEOUT_S + 2.0),
        ),
    ],
    ids=["busy", "not-found", "no-reply"],
)
async def test_failed_flash_call_falls_back_to_sms_at_once(
    rig: Rig,
    tmp_path: Path,
    scenario: str,
    detail: str,
    gave_up_s: tuple[float, float],
) -> None:
    async with (
        sipp_uas(scenario, tmp_path, calls=2) as uas,
        sip_service(rig, uas.port) as svc,
    ):
        vid = await create(svc.api, method="flashcall", fallback=["sms"])
        v = await wait_until_settled(svc.api, vid, {"delivered"}, gave_up_s[1] + DEADLINE_S)
        assert event_types(v) == [
            "requested",
            "dispatched",
            "undeliverable",
            "fallback",
            "dispatched",
            "delivered",
        ], v
        failed = next(e for e in v["events"] if e["type"] == "undeliverable")
        assert failed["channel"] == "flashcall" and failed["detail"].startswith(detail), failed
        assert v["channel"] == "sms"
        took = event_at(v, "undeliverable") - event_at(v, "dispatched")
        assert gave_up_s[0] <= took <= gave_up_s[1], f"the flash call gave up after {took:.3f} s"
        moved_on = event_at(v, "fallback") - event_at(v, "undeliverable")
        assert moved_on < 0.5, f"fallback {moved_on:.3f} s after undeliverable"

        invites = uas.received("INVITE")
        assert invites, "sipp received no INVITE"
        # Unanswered INVITEs over UDP are retransmitted (RFC 3261 timer A): one transaction.
        assert len({w.msg.get("Call-ID") for w in invites}) == 1, "more than one flash call"
        invite = invites[0]
        code_from_invite(invite)  # the failed call still carried a well-formed caller-ID
        if scenario == "sipp_verify_noreply.xml":
            # RFC 3261 section 9.1: no CANCEL before a provisional response.
            assert not uas.received("CANCEL"), "CANCEL sent for an INVITE nobody answered"
        else:
            assert uas.received("ACK"), "the final error response was not ACKed"
        sms = await wire_request(uas, "MESSAGE")
        sms_code = code_from_message(sms)
        assert sms.at > invite.at
        # The sipp wire and the service share this machine's wall clock.
        sent_after = sms.at - event_at(v, "undeliverable")
        assert sent_after < 1.0, f"the SMS left {sent_after:.3f} s after the failed call"
        right = await svc.api.check(vid, sms_code)
        assert right.json["status"] == "approved", right.text


def lose_one_answer(
    monkeypatch: pytest.MonkeyPatch, matches: Callable[[Verification], bool]
) -> list[str]:
    """The first write of a record that ``matches`` lands in Redis, but its answer is lost
    (StoreUnavailable), as when Redis stalls past the store's timeout just after applying
    it. Returns the ids whose answer was lost."""
    lost: list[str] = []
    real = VerificationStore._write

    async def write(
        store: VerificationStore, old: Stored | None, new: Verification, **kw: Any
    ) -> str | None:
        version = await real(store, old, new, **kw)
        if not lost and version is not None and matches(new):
            lost.append(new.id)
            raise StoreUnavailable("the answer was lost (test)")
        return version

    monkeypatch.setattr(VerificationStore, "_write", write)
    return lost


def _moved(reason: str) -> Callable[[Verification], bool]:
    return lambda v: any(e.kind is EventKind.FALLBACK and reason in e.detail for e in v.events)


@pytest.mark.parametrize(
    "case",
    [
        # The report "undeliverable" moves the verification on (the dispatcher's kept report).
        ("sipp_verify_busy.xml", {}, "busy"),
        # The flash call rang; its step timed out and the timer moved it on.
        ("sipp_verify_ring.xml", {"CLINIC_STEP_TIMEOUT_FLASHCALL_S": "5"}, "timed out"),
    ],
    ids=["report", "timer"],
)
async def test_a_move_that_landed_unconfirmed_still_sends_the_next_channel(
    rig: Rig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: tuple[str, dict[str, str], str],
) -> None:
    """A review found the next channel's send lost when the write that moved a verification
    on landed but its answer did not come back: the retry found the move made, started
    nothing, and the SMS waited for its own step timer (120 s) instead of leaving at once."""
    scenario, env, reason = case
    lost = lose_one_answer(monkeypatch, _moved(reason))
    async with (
        sipp_uas(scenario, tmp_path, calls=2) as uas,
        sip_service(rig, uas.port, env) as svc,
    ):
        vid = await create(svc.api, method="flashcall", fallback=["sms"])
        sms = await wire_request(uas, "MESSAGE", deadline_s=2 * DEADLINE_S)
        assert lost == [vid], "the fault was not injected"
        v = await svc.api.get(vid)
        assert v["channel"] == "sms" and event_types(v).count("fallback") == 1, v
        moved = event_at(v, "fallback")
        assert sms.at - moved < 5.0, f"the SMS left {sms.at - moved:.1f} s after the move"
        right = await svc.api.check(vid, code_from_message(sms))
        assert right.json["status"] == "approved", right.text


# -- SMS over SIP MESSAGE ------------------------------------------------------------------


async def test_a_flash_call_a_landline_cannot_take_counts_no_send(rig: Rig, tmp_path: Path) -> None:
    # A review found a flash-call-only create to a landline (skipped at once: no handset
    # shows a missed call, so it fails sending nothing) counting a send against the number.
    landline = "+442079460000"
    async with (
        sipp_uas("sipp_uas_message.xml", tmp_path) as uas,
        sip_service(rig, uas.port, {"CLINIC_LIMIT_NUMBER_SENDS": "1/600"}) as svc,
    ):
        skipped = await svc.api.create(phone=landline, method="flashcall", fallback=[])
        assert skipped.status == 201, skipped.text
        assert skipped.json["status"] == "failed", skipped.json
        assert "dispatched" not in event_types(skipped.json)
        # `requested` names the channel tried first: none here, the SMS below (it named the
        # skipped flash call).
        requested = skipped.json["events"][0]
        assert (requested["type"], requested["channel"]) == ("requested", None), requested
        assert requested["detail"] == "via flashcall"
        made = await svc.api.create(phone=landline, method="flashcall", fallback=["sms"])
        assert made.status == 201, made.text
        vid = made.json["id"]
        seen = [(e["type"], e["channel"]) for e in made.json["events"]]
        assert seen[:2] == [("requested", "sms"), ("skipped", "flashcall")], seen
        assert made.json["channel"] == "sms"
        sms = await wire_request(uas, "MESSAGE")
        right = await svc.api.check(vid, code_from_message(sms))
        assert right.json["status"] == "approved", right.text


async def test_sms_over_sip_message_carries_the_code(rig: Rig, tmp_path: Path) -> None:
    async with (
        sipp_uas("sipp_uas_message.xml", tmp_path) as uas,
        sip_service(rig, uas.port) as svc,
    ):
        vid = await create(svc.api, method="sms", fallback=[])
        v = await wait_until_settled(svc.api, vid, {"delivered", "undeliverable"})
        assert event_types(v) == ["requested", "dispatched", "delivered"], v
        assert await uas.finish() == 0, "the sipp MESSAGE scenario did not complete"
        sms = only(uas.received("MESSAGE"), "MESSAGE")
        assert (sms.msg.get("Content-Type") or "").startswith("text/plain"), "not a text MESSAGE"
        assert CLINIC in sms.msg.body.decode(), "the SMS does not name the clinic"
        code = code_from_message(sms)
        wrong = await svc.api.check(vid, other_code(code))
        assert wrong.json["status"] == "pending", wrong.text
        right = await svc.api.check(vid, code)
        assert right.json == {"id": vid, "status": "approved", "attempts_left": 4}, right.text
