"""Real calls into the clinic line, keypad only: a pjsua2 phone in its own process dials the
service's SIP front, is redirected to a worker, hears the prompts and presses keys (RFC 4733),
and the test reads the result from ``GET /v1/calls/{id}``. Transfers are real blind REFERs:
the caller's phone follows them and a second phone, the nurse, rings and answers.

One service serves the whole module (prompts render at start-up); each test takes the set of
call ids before its call and finds its own record as the one new id. The three whole triages
(some 90 s of prompts each) are placed at once by one fixture, each with a caller of its own
by which its record is found; a test each checks one of them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import math
import os
import re
import signal
import time
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from clinic_voice.app import RUNTIME
from tests.integration.conftest import API_KEY, CALLS_KEY, MOBILE, SECRET, OpenApiCollector
from tests.integration.test_sip_pool import until_ready
from tests.peers.ivr_rig import (
    NURSE_USER,
    ClinicLine,
    Event,
    Phone,
    phones,
    put_through_to_nurse,
    running_clinic_line,
)
from tests.peers.webhook_receiver import Hook, WebhookReceiver
from verification.webhooks import SIGNATURE_HEADER, verify
from voice.ivr.call_record import CallResult
from voice.ivr.engine import CallRecord, urgent_question
from voice.ivr.flow import Ask, load_flows
from voice.media.audio_match import rank
from voice.media.pcm import Pcm, bytes_to_samples, read_wav, resample, samples_to_bytes
from voice.media.tones import BEEP, RINGBACK
from voice.media.tts import PromptRenderer
from voice.sip import pool as pool_module
from voice.sip.pool import SipPool

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

CALL_S = 60.0  # one call, from dialling to the record, at most
TRUSTED_PEER = "127.0.0.2"  # CLINIC_SIP_TRUSTED_PEERS: a PBX that asserts its callers
# A number the caller would like the clinic to call: forged, from an untrusted address.
FORGED_PAI = "P-Asserted-Identity: <sip:+31687654321@127.0.0.1>"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scheduling() -> AsyncIterator[WebhookReceiver]:
    """The clinic's scheduling system: a real HTTP receiver answering 204 (or 500, see
    ``fail_first``) to the triage's appointment requests."""
    receiver = WebhookReceiver()
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def line(
    tmp_path_factory: pytest.TempPathFactory,
    openapi_responses: OpenApiCollector,
    ivr_prompt_cache: Path,
    scheduling: WebhookReceiver,
) -> AsyncIterator[ClinicLine]:
    # The full summary on transfers (the default tells the urgency only): tests read it.
    env = {
        "CLINIC_SCHEDULING_WEBHOOK": scheduling.url("/schedule"),
        "CLINIC_TRANSFER_SUMMARY": "full",
        # The PBX whose P-Asserted-Identity is believed: a phone bound to this address
        # stands in for it (every other phone here is on 127.0.0.1, direct mode).
        "CLINIC_SIP_TRUSTED_PEERS": TRUSTED_PEER,
    }
    async with running_clinic_line(
        tmp_path_factory.mktemp("clinic"), openapi_responses, env, prompt_cache=ivr_prompt_cache
    ) as svc:
        yield svc


def steps(record: dict[str, Any], kind: str) -> list[tuple[str, str]]:
    """(node, value) of the path steps whose input is ``kind``."""
    return [(p["node"], p["value"]) for p in record["path"] if p["input"] == kind]


async def test_danger_sign_ends_in_u1_and_a_transfer_to_the_nurse(line: ClinicLine) -> None:
    before = await line.call_ids()
    # 4 (triage) while the welcome plays, 1 (yourself) during the triage intro: each key
    # cuts its prompt short. A danger sign takes no early key: 1 (yes, difficulty
    # breathing) once the question was heard.
    caller, incoming = await put_through_to_nurse(
        line, "--call", line.uri("6000"), "--dtmf", "4@0.8,1@1.6", "--answers", "1"
    )

    assert caller.find("redirected") is not None, "the front's 302 was not followed"
    xfer = caller.find("transfer_request")
    assert xfer is not None, f"no REFER reached the caller: {caller.events}"
    assert f"sip:{NURSE_USER}@127.0.0.1:{line.nurse_port}" in xfer["to"]
    assert caller.find("confirmed", leg="xfer") is not None, "the nurse never answered"
    assert f"sip:{NURSE_USER}@" in incoming["to"]
    # The summary rides in the Refer-To, so the nurse's phone gets it on the INVITE.
    summary = incoming["headers"].get("X-Clinic-Summary", "")
    assert "urgency=U1" in summary and "difficulty breathing" in summary, incoming
    assert incoming["headers"].get("X-Clinic-Urgency") == "U1", incoming

    record = await line.new_record(before)
    assert incoming["headers"].get("X-Clinic-Call") == record["id"], incoming
    assert record["triage"]["urgency"] == "U1", record["triage"]
    assert "difficulty breathing" in record["triage"]["reasons"]
    assert record["transfer_target"] == f"sip:{NURSE_USER}@127.0.0.1:{line.nurse_port}"
    assert record["outcome"] == "call_emergency+transfer_nurse"
    assert steps(record, "digit") == [("menu", "4"), ("for_whom", "1"), ("breathing", "1")]
    assert record["values"]["breathing"] == "yes"


async def test_silence_on_a_danger_sign_question_ends_with_the_nurse(line: ClinicLine) -> None:
    before = await line.call_ids()
    # 1 (yourself) cuts the triage intro short; then the breathing question gets silence.
    caller, incoming = await put_through_to_nurse(
        line, "--call", line.uri("6001"), "--dtmf", "1@0.5", "--timeout", "90",
        incoming_s=90, finish_s=30,
    )  # fmt: skip

    assert caller.find("confirmed", leg="xfer") is not None, f"no transfer: {caller.events}"
    assert "unclear answer" in incoming["headers"].get("X-Clinic-Summary", ""), incoming
    record = await line.new_record(before)
    triage = record["triage"]
    assert triage["urgency"] in {"U0", "U1", "U2"}, triage
    assert record["transfer_target"] == line.settings.ivr.nurse_uri
    assert record["outcome"] == "transfer_nurse"
    assert steps(record, "digit") == [("for_whom", "1")]
    assert len(steps(record, "noinput")) == 2, record["path"]
    assert {node for node, _ in steps(record, "noinput")} == {"breathing"}
    assert "breathing" not in record["values"], "silence must never be stored as an answer"


# 1 yourself; no to the five danger signs; 8 something else; 2 not limiting daily life;
# 5 no risk group: nothing raises the urgency, so the triage ends in self-care (U5).
NON_URGENT_KEYS = "1", "2", "2", "2", "2", "2", "8", "2", "5"
DANGER_SIGNS = "breathing", "chest", "conscious", "bleeding", "stroke"
NON_URGENT_NODES = "for_whom", *DANGER_SIGNS, "complaint", "other_daily", "risk_adult"
# 1 yourself; no to the danger signs; 1 fever; not very ill; no stiff neck or rash; 1 yes,
# more than three days (U3); 5 no risk group. U3 asks the scheduling webhook for a same-day
# appointment.
FEVER_KEYS = "1", "2", "2", "2", "2", "2", "1", "2", "2", "1", "5"
FEVER_NODES = (
    "for_whom",
    *DANGER_SIGNS,
    "complaint",
    "fever_ill",
    "fever_rash",
    "fever_days",
    "risk_adult",
)
TRIAGE_S = 180.0  # a whole triage answered question by question (urgent ones heard in full)
# The module's three triages at once, from the first phone's start to the last record: the
# longest call's TRIAGE_S, and the caller put through to staff (CALL_S) on top.
TRIAGES_S = TRIAGE_S + CALL_S
# A test's timeout (pytest-timeout) counts its fixtures' set-up: the first test to use
# ``triages`` waits for all three calls, and the fixture's own deadline must come first.
TRIAGES_TIMEOUT_S = TRIAGES_S + 60
TYPED_AHEAD_S = 0.5  # a key typed into a question's prompt, after the key before it
# The callers of the module's three whole triages (each call's record and scheduling
# request name its caller): self-care; a same-day request the scheduler takes; one it
# refuses (500), so the caller is put through to staff.
SELF_CARE, SAME_DAY, TO_STAFF = "triage-self-care", "triage-same-day", "triage-to-staff"


def answered(line: ClinicLine, keys: tuple[str, ...], nodes: tuple[str, ...]) -> list[str]:
    """The caller's arguments for ``keys``, the answers to the triage's ``nodes``: the first
    typed ahead during the intro (which takes it); one to an urgent question (a danger sign,
    or one whose answer can make the call U2 or more: the bot takes no early "no" there)
    once its question was heard in full; one to any other question typed into its prompt,
    as a caller who knows the menu (some 20 s less of prompts per question)."""
    flow = load_flows(line.settings.ivr.flows_dir).get("triage")
    answers = []
    for key, node_id in zip(keys[1:], nodes[1:], strict=True):
        ask = flow.nodes[node_id]
        assert isinstance(ask, Ask), node_id
        answers.append(key if urgent_question(ask) else f"{key}@{TYPED_AHEAD_S}")
    return ["--dtmf", f"{keys[0]}@0.5", "--answers", ",".join(answers), "--timeout", "200"]


@dataclass(frozen=True, slots=True)
class TriageCall:
    """One of the module's whole triages: the caller's phone (ended), the call's record, the
    scheduling requests that named it, and the INVITE staff got for it (if any)."""

    caller: Phone
    record: dict[str, Any]
    hooks: list[Hook]
    incoming: Event | None = None


class _Logged(logging.Handler):
    """Every log record of this process while the triages ran (DEBUG and up)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass(frozen=True, slots=True)
class Triages:
    """The module's three whole triages, by caller (or what went wrong with each), and the
    log records of the time they ran."""

    calls: dict[str, TriageCall | BaseException]
    logged: list[logging.LogRecord]

    def __getitem__(self, caller: str) -> TriageCall:
        call = self.calls[caller]
        if isinstance(call, BaseException):
            raise call
        return call


async def record_of(line: ClinicLine, before: set[str], caller: str) -> dict[str, Any]:
    """The call record stored since ``before`` (ids) whose caller is ``caller``: the one new
    record of that caller, whatever other calls left theirs meanwhile."""
    loop = asyncio.get_running_loop()
    end = loop.time() + 15.0
    seen: dict[str, dict[str, Any]] = {}
    while True:
        for call_id in await line.call_ids() - before - seen.keys():
            got = await line.get(f"/v1/calls/{call_id}")
            assert got.status == 200, got.text
            seen[call_id] = got.json
        mine = [r for r in seen.values() if r["caller"] == caller]
        if mine:
            assert len(mine) == 1, f"{len(mine)} new records of {caller}: {mine}"
            return mine[0]
        if loop.time() > end:
            pytest.fail(f"no new call record of {caller} in GET /v1/calls within 15 s")
        await asyncio.sleep(0.1)


async def _triage(
    line: ClinicLine,
    scheduling: WebhookReceiver,
    before: set[str],
    watched: list[Phone],
    caller: str,
    *argv: str,
) -> TriageCall:
    async with phones() as started:
        phone = await Phone.start(caller, "--from-user", caller, *argv)
        started.append(phone)
        watched.append(phone)
        await phone.finish(TRIAGE_S)
    record = await record_of(line, before, caller)
    hooks = [h for h in scheduling.received if h.json().get("call_id") == record["id"]]
    return TriageCall(phone, record, hooks)


async def _triage_to_staff(
    line: ClinicLine, scheduling: WebhookReceiver, before: set[str], watched: list[Phone]
) -> TriageCall:
    async with phones() as started:
        staff = await Phone.start(
            "staff", "--port", str(line.staff_port), "--answer", "--duration", "1",
            "--timeout", "200",
        )  # fmt: skip
        started.append(staff)
        watched.append(staff)
        caller = await Phone.start(
            "caller",
            "--from-user",
            TO_STAFF,
            "--call",
            line.uri("6001"),
            *answered(line, FEVER_KEYS, FEVER_NODES),
        )
        started.append(caller)
        watched.append(caller)
        incoming = await staff.wait_for("incoming", TRIAGE_S)
        await caller.finish(CALL_S)
        await staff.finish(10)
    record = await record_of(line, before, TO_STAFF)
    hooks = [h for h in scheduling.received if h.json().get("call_id") == record["id"]]
    return TriageCall(caller, record, hooks, incoming)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def triages(line: ClinicLine, scheduling: WebhookReceiver) -> Triages:
    """Three whole triages, each answered question by question as a caller who listens to
    every urgent question in full (and types the other answers into their prompts): about a
    minute of prompts each, with the line idle meanwhile. Placed at once they take the time
    of the longest. The tests below each check one; every log line of the three is checked
    for triage answers. All three must end within ``TRIAGES_S``, or the fixture fails with
    what each phone did (before the first test's timeout, which counts this set-up)."""
    scheduling.fail_first, scheduling.fail_callers = 0, {TO_STAFF}
    logged = _Logged()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(logged)
    before = await line.call_ids()
    watched: list[Phone] = []
    self_care = answered(line, NON_URGENT_KEYS, NON_URGENT_NODES)
    same_day = answered(line, FEVER_KEYS, FEVER_NODES)
    try:
        async with asyncio.timeout(TRIAGES_S):
            done = await asyncio.gather(
                _triage(line, scheduling, before, watched, SELF_CARE,
                        "--call", line.uri("triage"), *self_care),
                # Direct mode: the phone writes its own From, and a P-Asserted-Identity that
                # nobody trusted vouches for (RFC 3325 9.1: ignored).
                _triage(line, scheduling, before, watched, SAME_DAY,
                        "--call", line.uri("6001"), "--header", FORGED_PAI, *same_day),
                _triage_to_staff(line, scheduling, before, watched),
                return_exceptions=True,
            )  # fmt: skip
    except TimeoutError:
        seen = "\n".join(f"{p.name}: {p.report()}" for p in watched)
        pytest.fail(f"the module's three triages did not end within {TRIAGES_S} s:\n{seen}")
    finally:
        root.removeHandler(logged)
        root.setLevel(level)
        scheduling.fail_callers = set()
    return Triages(dict(zip((SELF_CARE, SAME_DAY, TO_STAFF), done, strict=True)), logged.records)


@pytest.mark.timeout(TRIAGES_TIMEOUT_S)
async def test_a_full_non_urgent_triage_answered_key_by_key(triages: Triages) -> None:
    call = triages[SELF_CARE]
    caller = call.caller
    assert caller.find("transfer_request") is None, "a self-care call is not transferred"
    ended = caller.find("ended", leg="main")
    assert ended is not None
    record = call.record
    assert record["flow"] == "triage"
    assert record["triage"]["urgency"] in {"U4", "U5"}, record["triage"]
    assert record["outcome"] == "self_care"
    assert record["transfer_target"] is None
    digits = steps(record, "digit")
    assert [v for _, v in digits] == list(NON_URGENT_KEYS), record["path"]
    assert [n for n, _ in digits] == [
        "for_whom", "breathing", "chest", "conscious", "bleeding", "stroke", "complaint",
        "other_daily", "risk_adult",
    ]  # fmt: skip
    assert not steps(record, "noinput") and not steps(record, "nomatch"), record["path"]
    assert record["values"]["who"] == "self" and record["values"]["risk_group"] == "none"


@pytest.mark.timeout(TRIAGES_TIMEOUT_S)
async def test_a_same_day_triage_posts_the_request_to_the_scheduling_webhook(
    triages: Triages,
) -> None:
    call = triages[SAME_DAY]
    assert call.caller.find("transfer_request") is None, "a booked call is not transferred"
    record = call.record
    (hook,) = call.hooks  # one request, not two
    assert hook.path == "/schedule" and hook.answered == 204
    # Signed as the verification webhooks are, so the scheduling system can refuse forgeries.
    signature = hook.headers.get(SIGNATURE_HEADER, "")
    assert verify(SECRET.encode(), signature, hook.body), hook.headers
    assert not verify(SECRET.encode(), signature, hook.body + b" "), "verify() must be able to fail"
    # The clinic promised to call back: the request says whom, and which record to read,
    # and that the number is only what the caller claimed (its own From, not the forged PAI).
    assert record["caller"] == SAME_DAY, record
    assert record["caller_verified"] is False, record
    assert hook.json() == {
        "who": "self",
        "complaint": "fever",
        "request": "same_day",
        "urgency": "U3",
        "call_id": record["id"],
        "caller": record["caller"],
        "caller_verified": False,
    }
    assert record["triage"]["urgency"] == "U3", record["triage"]
    assert record["outcome"] == "same_day"
    assert steps(record, "webhook") == [("same_day", "ok")], record["path"]


# 1 appointments, typed ahead into the welcome; 1 book; a date of birth; a patient number.
APPOINTMENT_DTMF = "1@0.8,1@1.6"
APPOINTMENT_ANSWERS = "01011980#,1234567#"


@pytest.mark.timeout(CALL_S + 60)
async def test_a_number_the_trusted_pbx_asserts_goes_to_the_scheduling_webhook_as_verified(
    line: ClinicLine, scheduling: WebhookReceiver
) -> None:
    scheduling.fail_first = 0
    posted = len(scheduling.received)
    before = await line.call_ids()
    async with phones() as started:
        # The call comes from the trusted peer's address, with the number it asserts.
        caller = await Phone.start(
            "caller", "--bind", TRUSTED_PEER, "--from-user", "6001",
            "--call", line.uri("6000"),
            "--header", "P-Asserted-Identity: <sip:+31612345678@127.0.0.2;user=phone>",
            "--dtmf", APPOINTMENT_DTMF, "--answers", APPOINTMENT_ANSWERS, "--timeout", "60",
        )  # fmt: skip
        started.append(caller)
        hooks = await scheduling.wait_until(
            "the appointment request", lambda got: len(got) > posted, deadline_s=CALL_S
        )
        await caller.finish(CALL_S)
    hook = hooks[posted].json()
    record = await line.new_record(before)
    assert record["flow"] == "appointments", record
    # The asserted number, not the From (an extension of the PBX), is the one to call back.
    assert (record["caller"], record["caller_verified"]) == ("+31612345678", True), record
    assert hook["request"] == "appointment", hook
    assert (hook["caller"], hook["caller_verified"]) == ("+31612345678", True), hook
    assert hook["call_id"] == record["id"]


@pytest.mark.timeout(TRIAGES_TIMEOUT_S)
async def test_a_triage_call_leaves_no_answer_in_any_log_line_and_an_encrypted_record(
    line: ClinicLine, triages: Triages
) -> None:
    # The scheduling system failed this one: the triage put the caller through to staff.
    call = triages[TO_STAFF]
    record, incoming = call.record, call.incoming
    assert incoming is not None

    # The call did what the test says it did, or the log check below proves nothing.
    assert record["triage"]["urgency"] == "U3", record["triage"]
    assert record["values"]["complaint"] == "fever" and record["values"]["fever_days"] == "yes"
    assert record["transfer_target"] == line.settings.ivr.staff_uri
    assert steps(record, "webhook") == [("same_day", "failed")], record["path"]
    assert [h.answered for h in call.hooks] == [500], call.hooks
    assert incoming["headers"].get("X-Clinic-Call") == record["id"], incoming
    summary = incoming["headers"].get("X-Clinic-Summary", "")
    assert "complaint=fever" in summary, incoming

    # Every line logged while the module's triages ran: this call's, and the other two's.
    lines = [r.getMessage() for r in triages.logged]
    assert any(record["id"] in m for m in lines), "the call's own log lines were not captured"
    private = {"fever more than three days", summary, *record["triage"]["reasons"]}
    private |= {f"{k}={v}" for k, v in record["values"].items()}
    leaked = [(s, m) for s in private for m in lines if s and s in m]
    assert not leaked, f"triage answers in the logs: {leaked}"
    # Values as whole words ("fever", "yes", "self", ...): node ids like fever_days are
    # joined by "_" and do not match; see the report on what DEBUG node ids still reveal.
    for value in set(record["values"].values()):
        word = re.compile(rf"(?<![\w]){re.escape(value)}(?![\w])")
        hits = [m for m in lines if word.search(m)]
        assert not hits, f"the answer {value!r} appears in the logs: {hits}"
    for r in triages.logged:
        if r.args:
            assert not any(str(a) in private for a in r.args), r.getMessage()

    raw = await raw_redis_value(line, f"cv:call:{record['id']}")
    assert raw is not None, "no call record under cv:call:<id> in Redis"
    with pytest.raises(ValueError):
        json.loads(raw)
    sealed = base64.b64decode(raw)
    # Long enough not to turn up in 700 random bytes or their base64 by chance.
    for secret in ("fever", "complaint", "urgency", record["id"]):
        assert secret.encode() not in raw and secret.encode() not in sealed, secret


async def raw_redis_value(line: ClinicLine, key: str) -> bytes | None:
    client = aioredis.Redis.from_url(line.redis.url)
    try:
        value = await client.get(key)
    finally:
        await client.aclose()
    assert value is None or isinstance(value, bytes)
    return value


async def test_calls_api_pages_with_limit_and_cursor_and_refuses_bad_input(
    line: ClinicLine,
) -> None:
    # Three records of their own (the module's calls may or may not have run before).
    store = line.app[RUNTIME].need_call_store()
    now = time.time()
    for i in range(3):
        await store.save(
            CallResult(
                id=f"page-test-{i}",
                caller="patient",
                called="6000",
                started_at=now - 3600 + i,
                ended_at=now - 3590 + i,
                record=CallRecord("main_menu", (), (), None, (), None, None, "completed"),
            )
        )
    everything = await line.calls(limit="100")
    assert everything.status == 200, everything.text
    all_ids = [c["id"] for c in everything.json["calls"]]
    assert {"page-test-0", "page-test-1", "page-test-2"} <= set(all_ids)
    starts = [c["started_at"] for c in everything.json["calls"]]
    assert starts == sorted(starts, reverse=True), "calls are not newest first"

    paged: list[str] = []
    cursor: str | None = None
    for _ in range(len(all_ids) + 1):
        page = await line.calls(limit="1", **({"cursor": cursor} if cursor else {}))
        assert page.status == 200, page.text
        assert len(page.json["calls"]) <= 1
        paged += [c["id"] for c in page.json["calls"]]
        cursor = page.json["next"]
        if cursor is None:
            break
    assert paged == all_ids, "limit=1 pages do not add up to the whole list"

    one = await line.get("/v1/calls/page-test-1")
    assert one.status == 200 and one.json["id"] == "page-test-1", one.text
    (await line.get("/v1/calls/no-such-call")).problem(404, "not-found")
    (await line.get("/v1/calls/bad%20id")).problem(404, "not-found")
    for bad in ({"limit": "0"}, {"limit": "101"}, {"limit": "ten"}, {"cursor": "x"}):
        (await line.calls(**bad)).problem(422, "invalid-request")
    (await line.calls(page="2")).problem(422, "invalid-request")
    no_key = await line.api.request("GET", "/v1/calls", key=None)
    assert no_key.status == 401, no_key.text
    # Health data: the verification API's keys cannot read it, and the call records' key
    # serves nothing else.
    for path in ("/v1/calls", "/v1/calls/page-test-1", "/v1/calls/page-test-1/voicemail"):
        (await line.get(path, key=API_KEY)).problem(403, "key-not-allowed")
    create = await line.api.request(
        "POST", "/v1/verifications", json_body={"phone": MOBILE}, key=CALLS_KEY
    )
    create.problem(403, "key-not-allowed")


async def test_a_caller_who_hangs_up_in_the_menu_leaves_a_record(line: ClinicLine) -> None:
    before = await line.call_ids()
    async with phones() as started:
        caller = await Phone.start("caller", "--call", line.uri("6000"), "--duration", "1.5")
        started.append(caller)
        await caller.finish(20)
    record = await line.new_record(before)
    # 128 random bits: a pid and a counter repeat after a restart and overwrote records.
    assert re.fullmatch(r"in-[A-Za-z0-9_-]{22}", record["id"]), record["id"]
    assert record["flow"] == "main_menu"
    assert record["outcome"] == "caller_hung_up", record
    assert record["triage"] is None and record["transfer_target"] is None
    assert not steps(record, "digit")


async def test_a_prompt_with_the_callers_booking_is_never_kept_on_disk(
    line: ClinicLine, scheduling: WebhookReceiver, tmp_path: Path
) -> None:
    """The appointment confirmation speaks what the scheduling system answered: health data
    (a doctor, a reason). It is rendered for the call and deleted, never cached by its text."""
    scheduling.fail_first = 0
    scheduling.reply = {"message": "See you Monday with Doctor Jansen for your diabetes check."}
    said = (
        "Thank you. Your request to book an appointment has been received. "
        + scheduling.reply["message"]
    )
    prompts = line.settings.data_dir / "prompts"
    before = await line.call_ids()
    keys = ["1", "1", *"01021980#", *"12345#"]  # appointments, book, date of birth, number
    dtmf = ",".join(f"{key}@{0.5 + 0.25 * i:.2f}" for i, key in enumerate(keys))
    try:
        async with phones() as started:
            caller = await Phone.start(
                "caller", "--call", line.uri("6000"), "--dtmf", dtmf, "--duration", "25"
            )
            started.append(caller)
            await caller.finish(CALL_S)
    finally:
        scheduling.reply = None
    record = await line.new_record(before)
    message = "See you Monday with Doctor Jansen for your diabetes check."
    assert record["values"].get("booking.message") == message, record  # it was said
    renderer = line.app[RUNTIME].renderer
    assert renderer is not None
    # Every folder the call's own prompts may go to: tmpfs, the data dir's private/, a temp.
    private = await asyncio.to_thread(renderer.private.chain)
    for folder in (prompts, *private):
        assert list(folder.glob("once-*.wav")) == [], "the call's own prompt was not deleted"
    # The key the prompt cache would give that text (same espeak-ng, same key).
    cached = await PromptRenderer(tmp_path).render(said, voice="en")
    key = cached.name.split(".")[0]
    assert not list(prompts.glob(f"{key}.*")), "the booking was cached by its text"


async def test_a_transfer_accepted_then_hung_up_before_its_final_notify_is_a_transfer(
    line: ClinicLine,
) -> None:
    """A PBX may send its BYE right after the 202, before any final NOTIFY: the caller is
    with the target then, and the record must say transferred, not failed."""
    before = await line.call_ids()
    async with phones() as started:
        staff = await Phone.start(
            "staff", "--port", str(line.staff_port), "--answer", "--duration", "1"
        )
        started.append(staff)
        caller = await Phone.start(
            "caller", "--call", line.uri("6000"), "--dtmf", "0@0.5", "--hangup-on-refer",
            "--timeout", "60",
        )  # fmt: skip
        started.append(caller)
        await caller.finish(CALL_S)
        await staff.finish(20)
    assert caller.find("transfer_request") is not None, caller.events
    record = await line.new_record(before)
    assert record["outcome"] == "transfer_staff", record
    assert record["transfer_target"] == line.settings.ivr.staff_uri, record
    assert steps(record, "transfer") == [("menu", "ok")], record["path"]


async def test_when_staff_are_busy_the_caller_leaves_a_message_for_a_call_back(
    line: ClinicLine, tmp_path: Path
) -> None:
    # The caller's message: a 2 s tone from 25 s into the call, after the offer (~16 s of
    # speech from about 4 s) and its beep; then # at 32 s.
    message = tmp_path / "message.wav"
    await sox("-n", "-r", "8000", "-c", "1", "-b", "16", str(message), "synth", "2", "sine",
              "440", "vol", "0.5")  # fmt: skip
    heard = tmp_path / "heard.wav"
    before = await line.call_ids()
    async with phones() as started:
        # Staff's phone answers every call 486 Busy Here (no --answer).
        staff = await Phone.start("staff", "--port", str(line.staff_port))
        started.append(staff)
        # 0 during the welcome: staff.
        caller = await Phone.start(
            "caller", "--call", line.uri("6000"), "--dtmf", "0@0.5,#@32.0",
            "--play", str(message), "--play-at", "25", "--record", str(heard),
            "--timeout", "60",
        )  # fmt: skip
        started.append(caller)
        await staff.wait_for("incoming", 20)
        await caller.wait_for("ended", 50, leg="main")  # the service hangs up after "thank you"
        await caller.finish(CALL_S)
    assert caller.find("transfer_request") is not None, caller.events
    assert caller.find("confirmed", leg="xfer") is None
    # The final NOTIFY (486) ends the wait: the offer follows at once (not after the REFER's
    # 60 s deadline), so its beep comes before the caller speaks.
    beeps = tone_runs(read_wav(heard), BEEP.hz)
    assert len(beeps) == 1 and beeps[0][1] < 24.0, f"the beep came late: {beeps}"
    record = await line.new_record(before)
    assert record["outcome"] == "message_left", record
    assert record["transfer_target"] is None
    assert ("menu", "0") in steps(record, "digit")
    assert steps(record, "transfer") == [("menu", "failed")], record["path"]
    ((_, took),) = steps(record, "record")
    assert 3 <= int(took.rstrip("s")) <= 25, f"# did not end the message: {took}"
    # Staff hear it through the API, as any voicemail.
    answer = await line.get(f"/v1/calls/{record['id']}/voicemail")
    assert answer.status == 200 and answer.headers["Content-Type"] == "audio/wav", answer
    with wave.open(io.BytesIO(answer.body)) as w:
        pcm = w.readframes(w.getnframes())
    assert max(abs(int.from_bytes(pcm[i : i + 2], "little", signed=True))
               for i in range(0, len(pcm), 2)) > 5000, "the tone is not in the message"  # fmt: skip
    assert record["values"]["callback_message"].startswith(record["id"]), record["values"]
    # The desk working through the calls sees that this caller waits for a call back.
    assert record["call_back"] == "left a message for a call back: play it", record
    assert record["handled_at"] is None, record


async def test_a_nurse_who_rings_long_is_not_a_failed_transfer(
    line: ClinicLine, tmp_path: Path
) -> None:
    """The nurse answers after 18 s of ringing: longer than the old 15 s transfer wait. The
    NOTIFYs say 180 meanwhile, so the bot keeps waiting and the transfer is a success; the
    caller hears the ring tone meanwhile, not silence."""
    heard = tmp_path / "heard.wav"
    before = await line.call_ids()
    async with phones() as started:
        nurse = await Phone.start(
            "nurse", "--port", str(line.nurse_port), "--answer", "--answer-after", "18",
            "--duration", "1",
        )  # fmt: skip
        started.append(nurse)
        caller = await Phone.start(
            "caller", "--call", line.uri("6000"), "--dtmf", "4@0.8,1@1.6", "--answers", "1",
            "--timeout", "90", "--record", str(heard),
        )  # fmt: skip
        started.append(caller)
        await caller.finish(CALL_S + 20)
        await nurse.finish(10)
    # 425 Hz, 1 s on and 4 s off, from the REFER to the answer: three or four bursts.
    rings = tone_runs(read_wav(heard), RINGBACK.hz)
    assert len(rings) >= 3, f"no ring tone while the nurse's phone rang: {rings}"
    assert all(0.8 < end - start < 1.2 for start, end in rings), rings
    rang = caller.find("confirmed", leg="xfer")
    assert rang is not None, f"the nurse never answered: {caller.events}"
    xfer = caller.find("transfer_request")
    assert xfer is not None and rang["t"] - xfer["t"] > 15.0, (xfer, rang)
    record = await line.new_record(before)
    assert record["transfer_target"] == line.settings.ivr.nurse_uri, record
    assert [v for _, v in steps(record, "transfer")] == ["ok"], record["path"]


async def test_concurrent_calls_keep_their_own_keys_and_records(line: ClinicLine) -> None:
    before = await line.call_ids()
    wanted = {"1": "appointments", "2": "prescription", "3": "results"}
    async with phones() as started:
        callers: dict[str, Phone] = {}
        for key in wanted:
            argv = ["--call", line.uri("6000"), "--from-user", f"patient{key}"]
            argv += ["--dtmf", f"{key}@0.5", "--duration", "3"]
            callers[key] = await Phone.start(f"caller-{key}", *argv)
            started.append(callers[key])
        await asyncio.gather(*(c.finish(20) for c in callers.values()))
    records: list[dict[str, Any]] = []
    for _ in range(50):
        new = await line.call_ids() - before
        if len(new) == len(wanted):
            records = [(await line.get(f"/v1/calls/{i}")).json for i in new]
            break
        await asyncio.sleep(0.1)
    assert len(records) == len(wanted), "not every concurrent call left a record"
    by_caller = {r["caller"]: r for r in records}
    assert set(by_caller) == {f"patient{key}" for key in wanted}, by_caller.keys()
    for key, flow in wanted.items():
        record = by_caller[f"patient{key}"]
        assert steps(record, "digit") == [("menu", key)], record["path"]
        assert record["flow"] == flow, record


async def test_9_in_the_appointments_menu_brings_the_main_menu_back(
    line: ClinicLine, tmp_path: Path
) -> None:
    """A caller who picked appointments by mistake presses 9 once its question was heard,
    and hears the main menu again (the same call, nothing saved for the appointment)."""
    renderer = line.app[RUNTIME].renderer
    assert renderer is not None
    flows = load_flows(line.settings.ivr.flows_dir)
    menu, which = flows.get("main_menu").nodes["menu"], flows.get("appointments").nodes["which"]
    assert isinstance(menu, Ask) and isinstance(which, Ask)
    references = {
        key: pcm_8k(read_wav(await renderer.render(text, voice="en")))
        for key, text in {
            "main_menu": flows.get("main_menu").ask_prompt(menu, speech=False),
            "appointments": flows.get("appointments").ask_prompt(which, speech=False),
        }.items()
    }
    heard = tmp_path / "heard.wav"
    before = await line.call_ids()
    async with phones() as started:
        # 1 (appointments) cuts the welcome short; 9 once the appointments question was
        # heard in full; then the welcome and the main menu play (some 21 s), and the caller
        # hangs up once the bot has been quiet for 2.5 s after them (it waits for a key:
        # espeak-ng's pauses between sentences are under 1 s), or at 40 s at the latest.
        caller = await Phone.start(
            "caller", "--call", line.uri("6000"), "--dtmf", "1@0.5", "--answers", "9",
            "--hangup-when-quiet", "2.5", "--record", str(heard), "--duration", "40",
            "--timeout", "70",
        )  # fmt: skip
        started.append(caller)
        await caller.finish(CALL_S + 10)
    nine = caller.find("dtmf_sent", digit="9")
    assert nine is not None, caller.events

    record = await line.new_record(before)
    assert steps(record, "digit") == [("menu", "1"), ("which", "9")], record["path"]
    after = [(p["flow"], p["node"]) for p in record["path"]]
    after = after[after.index(("appointments", "which")) :]
    assert ("main_menu", "welcome") in after and ("main_menu", "menu") in after, record["path"]
    assert record["flow"] == "main_menu", record
    assert record["values"] == {}, "the way back is no appointment action"
    assert record["outcome"] == "caller_hung_up", record

    # What the caller heard after the 9 is the main menu, not the appointments question.
    pcm = read_wav(heard)
    start = int(float(nine["at"]) * pcm.rate_hz)
    tail = pcm_8k(Pcm(pcm.samples[start:], pcm.rate_hz))
    match = rank(tail, references, 8000)
    assert match.key == "main_menu" and match.score > match.runner_up, match


def pcm_8k(pcm: Pcm) -> bytes:
    """``pcm`` as 8 kHz PCM16 bytes, for :func:`rank`."""
    samples = pcm.samples if pcm.rate_hz == 8000 else resample(pcm.samples, pcm.rate_hz, 8000)
    return samples_to_bytes(samples)


async def test_part_of_an_entry_typed_over_its_prompt_still_times_out(line: ClinicLine) -> None:
    # 2 (prescription) during the welcome, then 7 of the date of birth's 8 digits while its
    # prompt plays, then nothing: the entry must time out and be asked again, not leave the
    # caller in silence with nobody listening.
    keys = ",".join(f"{key}@{3.0 + 0.25 * i:.2f}" for i, key in enumerate("0102198"))
    before = await line.call_ids()
    async with phones() as started:
        caller = await Phone.start(
            "caller", "--call", line.uri("6000"), "--dtmf", f"2@0.5,{keys}", "--duration", "20"
        )
        started.append(caller)
        await caller.finish(CALL_S)
    record = await line.new_record(before)
    assert record["flow"] == "prescription", record
    assert ("dob", "0102198") in steps(record, "nomatch"), record["path"]


async def test_the_goodbye_hangs_up_without_waiting_for_the_record_save(
    line: ClinicLine, scheduling: WebhookReceiver
) -> None:
    # Redis frozen while the call runs: the record's save waits for it (up to 30 s), and the
    # caller, told "goodbye", must not be held on a silent line all that time.
    scheduling.fail_first = 0
    before = await line.call_ids()
    pid = line.redis.pid
    assert pid is not None
    # 1 appointments, 1 book, date of birth and patient number typed ahead.
    keys = ",".join(
        f"{k}@{0.5 + 0.25 * i:.2f}" for i, k in enumerate(["1", "1", *"01021980#", *"12345#"])
    )
    os.kill(pid, signal.SIGSTOP)
    try:
        async with phones() as started:
            caller = await Phone.start(
                "caller", "--call", line.uri("6000"), "--dtmf", keys, "--duration", "60"
            )
            started.append(caller)
            ended = await caller.wait_for("ended", CALL_S)
            await caller.finish(CALL_S)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert ended["t"] < 30, f"the BYE waited for the save: {caller.events}"
    record = await line.new_record(before)  # and the save still landed once Redis was back
    assert record["outcome"] == "appointment_requested", record


async def test_a_stray_hash_while_the_menu_listens_does_not_stop_its_timeout(
    line: ClinicLine,
) -> None:
    # A # is no answer to the menu; before, it cancelled the question's no-input timer and
    # nothing started it again: the caller sat in silence until the 30-minute cap.
    before = await line.call_ids()
    async with phones() as started:
        caller = await Phone.start(
            "caller", "--call", line.uri("6000"), "--answers", "#", "--duration", "32"
        )
        started.append(caller)
        await caller.finish(CALL_S)
    record = await line.new_record(before)
    assert record["flow"] == "main_menu", record
    assert [p["node"] for p in record["path"] if p["input"] == "noinput"][:1] == ["menu"], record[
        "path"
    ]


async def test_a_call_cut_by_a_dying_worker_is_not_recorded_as_the_callers_hang_up(
    line: ClinicLine,
) -> None:
    # Staff read "caller_hung_up" as the patient's choice; a patient cut off mid-menu by a
    # crash should be called back, so the record says what happened.
    pool = line.app[RUNTIME].sip_pool
    assert pool is not None
    before = await line.call_ids()
    async with phones() as started:
        caller = await Phone.start("caller", "--call", line.uri("6000"), "--duration", "8")
        started.append(caller)
        await caller.wait_for("media", CALL_S)
        os.kill(_pid_holding_the_call(pool), signal.SIGKILL)
        record = await line.new_record(before)
        await caller.finish(CALL_S)
    assert record["outcome"] == "cut_worker_lost", record
    await until_ready(pool, within_s=20)


def _pid_holding_the_call(pool: SipPool) -> int:
    """The pid of the one worker that holds a call."""
    holding = [w.process for w in pool._workers if w.calls]
    assert len(holding) == 1 and holding[0] is not None, "no worker holds the call"
    return holding[0].pid


def calls_counted(metrics: str, outcome: str) -> int:
    """``clinic_calls_total`` for ``outcome`` in a /metrics text (0 when absent)."""
    m = re.search(rf'^clinic_calls_total{{outcome="{outcome}"}} (\d+)$', metrics, re.M)
    return int(m.group(1)) if m else 0


async def test_a_call_on_a_frozen_worker_is_recorded_once_and_the_next_caller_gets_through(
    line: ClinicLine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stopped worker (SIGSTOP) keeps its pipes open: no end of file. The pool used to
    # never notice: the call was not recorded until the 30-minute cap, its slot stayed
    # taken, and the front went on redirecting callers to the frozen worker.
    monkeypatch.setattr(pool_module, "WORKER_SILENT_S", 5.0)  # serve's 30 s, shortened
    pool = line.app[RUNTIME].sip_pool
    assert pool is not None
    before = await line.call_ids()
    scrape = await line.api.request("GET", "/metrics", key=None)
    lost_before = calls_counted(scrape.text, "cut_worker_lost")
    async with phones() as started:
        caller = await Phone.start("caller", "--call", line.uri("6000"), "--duration", "8")
        started.append(caller)
        await caller.wait_for("media", CALL_S)
        pid = _pid_holding_the_call(pool)
        os.kill(pid, signal.SIGSTOP)
        try:
            record = await line.new_record(before, deadline_s=5.0 + 10)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # the old code: let the module's line go on
        await caller.finish(CALL_S)
    assert record["outcome"] == "cut_worker_lost", record
    assert pool.stats()["calls_in_flight"] == 0, "the lost call still holds its slot"
    await until_ready(pool, within_s=20)
    assert pid not in pool.worker_pids(), "the frozen worker was not replaced"

    # The next two callers get through (the front picks among both workers, the new one too).
    for _ in range(2):
        before = await line.call_ids()
        async with phones() as started:
            nxt = await Phone.start("caller", "--call", line.uri("6000"), "--duration", "2")
            started.append(nxt)
            await nxt.wait_for("media", CALL_S)
            await nxt.finish(CALL_S)
        assert (await line.new_record(before))["outcome"] == "caller_hung_up"
    scrape = await line.api.request("GET", "/metrics", key=None)
    assert calls_counted(scrape.text, "cut_worker_lost") == lost_before + 1, "counted once"


# 2 prescription; date of birth and patient number typed ahead (the message's prompt follows).
PRESCRIPTION_KEYS = ",".join(
    f"{key}@{0.5 + 0.25 * i:.2f}" for i, key in enumerate(["2", *"01021980#", *"12345#"])
)


async def tone_message(tmp_path: Path) -> Path:
    """The caller's message: a 2 s tone, 12 s after the answer (the record prompt has ended
    by then), as a WAV for the phone's ``--play``."""
    message = tmp_path / "message.wav"
    await sox("-n", "-r", "8000", "-c", "1", "-b", "16", str(message), "synth", "2", "sine",
              "440", "vol", "0.5", "pad", "12", "0")  # fmt: skip
    return message


async def slow_booking(
    line: ClinicLine, scheduling: WebhookReceiver, delay_s: float, call_s: float
) -> dict[str, Any]:
    """An appointments call (book, a date of birth, a patient number, typed ahead) that lasts
    ``call_s``, to a scheduling system answering after ``delay_s``; its record, once the
    request reached the scheduler exactly once."""
    scheduling.fail_first, scheduling.delay_s = 0, delay_s
    posted = len(scheduling.received)
    before = await line.call_ids()
    keys = ["1", "1", *"01021980#", *"12345#"]
    dtmf = ",".join(f"{k}@{0.5 + 0.25 * i:.2f}" for i, k in enumerate(keys))
    try:
        async with phones() as started:
            caller = await Phone.start(
                "caller", "--call", line.uri("6000"), "--dtmf", dtmf, "--duration", str(call_s)
            )
            started.append(caller)
            await caller.finish(CALL_S)
        record = await line.new_record(before)
    finally:
        scheduling.delay_s = 0.0
    mine = [h for h in scheduling.received[posted:] if h.json().get("call_id") == record["id"]]
    assert len(mine) == 1, f"the request reached the scheduler {len(mine)} times, not once"
    return record


async def test_a_request_under_way_when_the_caller_hangs_up_lands_in_the_record(
    line: ClinicLine, scheduling: WebhookReceiver
) -> None:
    # The scheduling system takes 3 s; the caller hangs up 1 s into it. The request still
    # arrives, and the record must say so: staff otherwise book it a second time.
    record = await slow_booking(line, scheduling, delay_s=3.0, call_s=6.0)
    assert steps(record, "webhook") == [("post", "ok")], record["path"]
    # The request arrived: that is what the call achieved, hang-up or not.
    assert record["outcome"] == "appointment_requested", record


async def test_a_request_the_scheduler_answers_too_late_is_recorded_as_unknown(
    line: ClinicLine, scheduling: WebhookReceiver
) -> None:
    # The scheduling system takes 6 s, past the step's 5 s: the request did arrive (it may be
    # booked), so the record must not say it failed, or staff book it a second time.
    record = await slow_booking(line, scheduling, delay_s=6.0, call_s=12.0)
    assert steps(record, "webhook") == [("post", "timeout")], record["path"]


async def test_a_voicemail_ends_with_hash_and_is_stored_sealed(
    line: ClinicLine, tmp_path: Path
) -> None:
    message = await tone_message(tmp_path)
    before = await line.call_ids()
    heard = tmp_path / "heard.wav"
    async with phones() as started:
        caller = await Phone.start(
            "caller", "--call", line.uri("6000"), "--dtmf", f"{PRESCRIPTION_KEYS},#@15.0",
            "--play", str(message), "--record", str(heard),
        )  # fmt: skip
        started.append(caller)
        await caller.finish(CALL_S)
    record = await line.new_record(before)
    # "After the tone": the caller heard a 1 kHz beep (tones.BEEP) after the prompt.
    beeps = tone_runs(read_wav(heard), BEEP.hz)
    assert len(beeps) == 1, f"expected one {BEEP.hz} Hz beep in what the caller heard: {beeps}"
    beep_start, beep_end = beeps[0]
    assert abs((beep_end - beep_start) - BEEP.on_ms / 1000) < 0.1, beeps
    assert record["flow"] == "prescription"
    assert record["outcome"] == "prescription_requested", record
    assert steps(record, "digits") == [("dob", "01021980"), ("patient_no", "12345")]
    (recorded,) = steps(record, "record")
    assert recorded[0] == "message"
    seconds = int(recorded[1].rstrip("s"))
    assert 1 <= seconds <= 10, f"# did not end the 60 s recording: {recorded}"
    # The beep is over before the caller starts talking (the recording starts after it; its
    # length is no clock: the phone sends no RTP in its silences, so it cannot be timed).
    assert beep_end < 12.0, f"the beep ended at {beep_end:.1f} s, after the message began"

    ref = record["values"]["prescription_message"]
    sealed = line.settings.data_dir / "voicemail" / ref
    assert sealed.is_file(), f"no voicemail file {sealed}"
    assert sealed.stat().st_mode & 0o077 == 0, "the voicemail is readable by others"
    text = sealed.read_text()
    with pytest.raises(ValueError):
        json.loads(text)
    opened = line.app[RUNTIME].need_call_store().open(ref, text)
    pcm = bytes.fromhex(opened["pcm16_8k"])
    assert len(pcm) == seconds * 16000 or abs(len(pcm) / 16000 - seconds) < 1.0
    # Nothing of the beep in the message: no 1 kHz run in the caller's audio.
    assert not tone_runs(Pcm(bytes_to_samples(pcm), 8000), BEEP.hz), "the beep was recorded"
    assert max(abs(int.from_bytes(pcm[i : i + 2], "little", signed=True))
               for i in range(0, len(pcm), 2)) > 5000, "the tone is not in the message"  # fmt: skip
    # Staff listen to it through the API: the same audio, as WAV.
    answer = await line.get(f"/v1/calls/{record['id']}/voicemail")
    assert answer.status == 200 and answer.headers["Content-Type"] == "audio/wav", answer
    assert answer.headers["Cache-Control"] == "no-store"
    with wave.open(io.BytesIO(answer.body)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)
        assert w.readframes(w.getnframes()) == pcm
    # No such call, and a message past retention (its file swept): 404.
    assert (await line.get("/v1/calls/in-0-0/voicemail")).status == 404
    voicemails = line.app[RUNTIME].need_voicemails()
    swept = await asyncio.to_thread(voicemails.sweep, 0.0, time.time() + 1)
    assert swept >= 1 and not sealed.exists()
    assert (await line.get(f"/v1/calls/{record['id']}/voicemail")).status == 404


async def test_a_silent_message_is_not_a_request(line: ClinicLine) -> None:
    # The caller says nothing and presses # (12 s, the prompt and beep are over): nothing
    # is kept, and the bot asks again instead of "your request has been recorded".
    before = await line.call_ids()
    async with phones() as started:
        caller = await Phone.start(
            "caller", "--call", line.uri("6000"), "--dtmf", f"{PRESCRIPTION_KEYS},#@12.0",
            "--duration", "16",
        )  # fmt: skip
        started.append(caller)
        await caller.finish(CALL_S)
    record = await line.new_record(before)
    assert record["flow"] == "prescription", record
    assert steps(record, "record") == [("message", "silent")], record["path"]
    assert "prescription_message" not in record["values"], record["values"]
    assert record["outcome"] == "caller_hung_up", record
    assert (await line.get(f"/v1/calls/{record['id']}/voicemail")).status == 404


async def test_a_message_that_cannot_be_saved_goes_to_staff(
    line: ClinicLine, tmp_path: Path
) -> None:
    message = await tone_message(tmp_path)
    folder = line.settings.data_dir / "voicemail"
    aside = line.settings.data_dir / "voicemail.aside"
    if folder.exists():
        folder.rename(aside)
    folder.write_text("a file where the folder should be: every save fails")
    before = await line.call_ids()
    try:
        async with phones() as started:
            # Staff's phone answers: with nobody there, the caller's phone (it follows the
            # REFER) tried staff for pjsip's 32 s INVITE timeout before it could end.
            staff = await Phone.start(
                "staff", "--port", str(line.staff_port), "--answer", "--duration", "1"
            )
            started.append(staff)
            caller = await Phone.start(
                "caller", "--call", line.uri("6000"), "--dtmf", f"{PRESCRIPTION_KEYS},#@15.0",
                "--play", str(message), "--duration", "22",
            )  # fmt: skip
            started.append(caller)
            incoming = await staff.wait_for("incoming", CALL_S)
            await caller.finish(CALL_S)
            await staff.finish(20)
        record = await line.new_record(before)
    finally:
        folder.unlink()
        if aside.exists():
            aside.rename(folder)
    # Not "your renewal request has been recorded": staff are asked to take the request.
    assert steps(record, "record") == [("message", "not_saved")], record["path"]
    assert "prescription_message" not in record["values"], record["values"]
    assert record["outcome"] in {"transfer_staff", "transfer_failed"}, record
    assert record["transfer_target"] == line.settings.ivr.staff_uri, record
    assert incoming["headers"].get("X-Clinic-Call") == record["id"], incoming


async def test_no_message_is_recorded_past_the_voicemail_cap_and_staff_take_it(
    line: ClinicLine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Messages at CLINIC_VOICEMAIL_MAX_MB (voice/ivr/voicemail_budget.py): no new one is
    recorded, the caller is put through to staff as for one that could not be saved, the
    record says why, /metrics counts it, and one WARNING (no caller number) tells why."""
    message = await tone_message(tmp_path)
    folder = line.settings.data_dir / "voicemail"
    folder.mkdir(mode=0o700, exist_ok=True)
    # The messages already there take the whole cap: a sparse file, no disk used.
    filler = folder / "in-budget-filler-0badf00d.sealed"
    with filler.open("wb") as f:
        f.truncate(line.settings.ivr.voicemail_max_bytes)
    # A file no save wrote is counted at the next listing (the hourly sweep's): now.
    voicemails = line.app[RUNTIME].need_voicemails()
    await voicemails.rescan()
    metrics = line.app[RUNTIME].metrics
    refused = metrics.voicemail_refused.value(reason="voicemail_full")
    caplog.set_level(logging.INFO)
    before = await line.call_ids()
    try:
        async with phones() as started:
            # Staff's phone answers: with nobody there, the caller's phone (it follows the
            # REFER) tried staff for pjsip's 32 s INVITE timeout before it could end.
            staff = await Phone.start(
                "staff", "--port", str(line.staff_port), "--answer", "--duration", "1"
            )
            started.append(staff)
            caller = await Phone.start(
                "caller", "--call", line.uri("6000"), "--dtmf", f"{PRESCRIPTION_KEYS},#@15.0",
                "--play", str(message), "--duration", "22",
            )  # fmt: skip
            started.append(caller)
            incoming = await staff.wait_for("incoming", CALL_S)
            await caller.finish(CALL_S)
            await staff.finish(20)
        record = await line.new_record(before)
    finally:
        filler.unlink()
        await voicemails.rescan()
    assert steps(record, "record") == [("message", "voicemail_full")], record["path"]
    assert "prescription_message" not in record["values"], record["values"]
    assert record["outcome"] in {"transfer_staff", "transfer_failed"}, record
    assert record["transfer_target"] == line.settings.ivr.staff_uri, record
    assert not [p.name for p in folder.glob(f"{record['id']}-*")], "a message was written"
    # Put through to staff: the INVITE staff got is this call's.
    assert incoming["headers"].get("X-Clinic-Call") == record["id"], incoming
    assert caller.find("confirmed", leg="xfer") is not None, (
        f"staff never answered: {caller.events}"
    )
    assert metrics.voicemail_refused.value(reason="voicemail_full") == refused + 1
    told = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and "CLINIC_VOICEMAIL_MAX_MB" in r.getMessage()
    ]
    assert len(told) == 1 and record["id"] in told[0].getMessage(), told
    assert record["caller"] not in (told[0].args or ()), told[0].getMessage()


def tone_runs(pcm: Pcm, hz: int, min_s: float = 0.15) -> list[tuple[float, float]]:
    """(start, end) seconds of the runs of 20 ms frames that are a pure ``hz`` tone.

    A frame counts when the Goertzel power at ``hz`` holds most of the frame's power (speech
    and G.711 noise never do) and it is not quiet; runs shorter than ``min_s`` are dropped.
    """
    n = pcm.rate_hz // 50
    coeff = 2 * math.cos(2 * math.pi * hz / pcm.rate_hz)
    runs: list[tuple[float, float]] = []
    start: float | None = None
    for i in range(0, len(pcm.samples) - n + 1, n):
        frame = pcm.samples[i : i + n]
        s1 = s2 = 0.0
        for x in frame:
            s1, s2 = x + coeff * s1 - s2, s1
        tone = (s1 * s1 + s2 * s2 - coeff * s1 * s2) * 2 / n
        total = sum(x * x for x in frame)
        on = total > n * 1000**2 and tone > 0.8 * total
        t = i / pcm.rate_hz
        if on and start is None:
            start = t
        elif not on and start is not None:
            if t - start >= min_s:
                runs.append((start, t))
            start = None
    if start is not None and len(pcm.samples) / pcm.rate_hz - start >= min_s:
        runs.append((start, len(pcm.samples) / pcm.rate_hz))
    return runs


def speech_after(pcm: Pcm, start_s: float) -> float:
    """Seconds of loud 20 ms frames from ``start_s`` on that are not the ring tone."""
    n = pcm.rate_hz // 50
    ring = tone_runs(pcm, RINGBACK.hz)
    loud = 0
    for i in range(int(start_s * pcm.rate_hz), len(pcm.samples) - n + 1, n):
        t = i / pcm.rate_hz
        frame = pcm.samples[i : i + n]
        if sum(abs(x) for x in frame) / n > 300 and not any(a <= t < b for a, b in ring):
            loud += 1
    return loud / 50


async def sox(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec("sox", *argv, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(20):
        _, err = await proc.communicate()
    assert proc.returncode == 0, f"sox {argv} failed: {err.decode(errors='replace')}"
