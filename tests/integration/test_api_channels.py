"""What leaves the service: SMS through a real HTTP gateway peer (ok, 500, hang, 400), signed
webhooks to a real receiver (with retries), step timers on an injected clock, logs without
codes, and the health and metrics endpoints.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from sip_config.clock import FakeClock
from tests.conftest import RedisServer
from tests.integration.conftest import (
    CLINIC_NAME,
    MOBILE,
    SECRET,
    Api,
    StartService,
    read_code,
    wrong_code,
)
from tests.peers.sms_gateway import GatewayMode, SmsGateway
from tests.peers.webhook_receiver import Hook, WebhookReceiver
from verification import webhooks as webhooks_module
from verification.store import DUE, WEBHOOK_DUE, WEBHOOK_JOBS
from verification.webhooks import SIGNATURE_HEADER, verify

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]

HEALTH_WORDS = ("triage", "symptom", "urgent", "nurse", "appointment", "pain", "diagnos")


# -- SMS gateway -----------------------------------------------------------------------------
async def test_sms_ok_is_delivered_with_token_clinic_name_and_code_only(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    api = await start_service()
    vid = (await api.create(code_length=7)).json["id"]
    v = await api.wait_for_event(vid, "delivered")
    [sms] = sms_gateway.received
    assert sms.to == MOBILE
    assert sms.authorization == "Bearer gw-token-42"
    assert sms.content_type == "application/json"
    assert CLINIC_NAME in sms.text
    assert re.fullmatch(
        rf"[0-9]{{7}} is your verification code for {re.escape(CLINIC_NAME)}\. Do not share it\.",
        sms.text,
    ), sms.text
    assert not any(w in sms.text.lower() for w in HEALTH_WORDS), sms.text
    delivered = [e for e in v["events"] if e["type"] == "delivered"]
    assert delivered[0]["channel"] == "sms"
    assert (await api.check(vid, await read_code(sms_gateway))).json["status"] == "approved"


@pytest.mark.parametrize(
    ("locale", "text"),
    [
        ("nl", r"[0-9]{6} is uw verificatiecode voor {name}\. Deel deze code met niemand\."),
        ("NL-be", r"[0-9]{6} is uw verificatiecode voor {name}\. Deel deze code met niemand\."),
        ("fr-FR", r"[0-9]{6} is your verification code for {name}\. Do not share it\."),
    ],
)
async def test_the_sms_speaks_the_verifications_language(
    start_service: StartService, sms_gateway: SmsGateway, locale: str, text: str
) -> None:
    # Dutch where asked (the language subtag, case-blind); a language without wording here
    # gets English rather than nothing.
    api = await start_service()
    vid = (await api.create(locale=locale)).json["id"]
    await api.wait_for_event(vid, "delivered")
    [sms] = sms_gateway.received
    assert re.fullmatch(text.replace("{name}", re.escape(CLINIC_NAME)), sms.text), sms.text


async def test_sms_gateway_500_is_retried_then_undeliverable(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    sms_gateway.mode = GatewayMode.FAIL
    api = await start_service({"CLINIC_SMS_HTTP_RETRIES": "1"})
    vid = (await api.create()).json["id"]
    v = await api.wait_for_event(vid, "undeliverable")
    assert len(sms_gateway.received) == 2, "one try and one retry"
    # A 500 does not say the SMS was not taken: the retry carries the first try's key, so a
    # gateway that honours Idempotency-Key sends it once.
    first, retry = sms_gateway.received
    assert first.idempotency_key and retry.idempotency_key == first.idempotency_key
    [event] = [e for e in v["events"] if e["type"] == "undeliverable"]
    assert "500" in event["detail"]
    # The only channel could not deliver: the verification ends as failed.
    v = await api.wait_for_event(vid, "failed")
    assert v["status"] == "failed"
    metrics = (await api.request("GET", "/metrics", key=None)).text
    assert 'clinic_deliveries_total{channel="sms",outcome="undeliverable"} 1' in metrics


async def test_each_send_has_its_own_idempotency_key(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    api = await start_service()
    for _ in range(2):
        await api.create(method="sms", fallback=[])
    keys = {sms.idempotency_key for sms in await sms_gateway.wait_for(2)}
    assert len(keys) == 2 and all(len(k) >= 16 for k in keys), keys


async def test_an_unreachable_gateway_is_named_in_the_log_not_in_the_events(
    start_service: StartService, caplog: pytest.LogCaptureFixture
) -> None:
    # The events are served by the API and posted to the app's webhooks: a review found the
    # gateway's address and the connect error in them.
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/sms"
    api = await start_service({"CLINIC_SMS_HTTP_URL": url, "CLINIC_SMS_HTTP_RETRIES": "0"})
    vid = (await api.create(method="sms", fallback=[])).json["id"]
    v = await api.wait_for_event(vid, "undeliverable")
    [event] = [e for e in v["events"] if e["type"] == "undeliverable"]
    assert event["detail"] == "gateway unreachable", event
    logged = [r.getMessage() for r in caplog.records if "SMS attempt 1 failed" in r.getMessage()]
    assert logged and "cannot connect to http://127.0.0.1:" in logged[0], logged


async def test_sms_gateway_that_hangs_times_out_then_undeliverable(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    sms_gateway.mode = GatewayMode.HANG
    api = await start_service({"CLINIC_SMS_HTTP_TIMEOUT_S": "0.3", "CLINIC_SMS_HTTP_RETRIES": "0"})
    vid = (await api.create()).json["id"]
    v = await api.wait_for_event(vid, "undeliverable", deadline_s=5.0)
    [event] = [e for e in v["events"] if e["type"] == "undeliverable"]
    assert "timed out" in event["detail"]
    assert len(sms_gateway.received) == 1


async def test_sms_gateway_400_is_undeliverable_without_retry(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    sms_gateway.mode = GatewayMode.REJECT
    api = await start_service({"CLINIC_SMS_HTTP_RETRIES": "2"})
    vid = (await api.create()).json["id"]
    v = await api.wait_for_event(vid, "undeliverable")
    [event] = [e for e in v["events"] if e["type"] == "undeliverable"]
    assert "400" in event["detail"]
    await asyncio.sleep(0.7)  # a retry (after >= 0.4 s of backoff) would have come by now
    assert len(sms_gateway.received) == 1, "a 400 is final: no retry"


async def test_no_channel_configured_refuses_with_503(start_service: StartService) -> None:
    api = await start_service({"CLINIC_SMS_HTTP_URL": ""})
    (await api.create()).problem(503, "no-channel")


# -- webhooks ------------------------------------------------------------------------------------
@pytest.fixture
async def flaky_receiver() -> AsyncIterator[WebhookReceiver]:
    """A receiver whose first two POSTs fail with 500."""
    receiver = WebhookReceiver(fail_first=2)
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


def _assert_hooks_match(hooks: list[Hook], vid: str, events: list[dict[str, object]]) -> None:
    for hook in hooks:
        assert verify(SECRET.encode(), hook.headers[SIGNATURE_HEADER], hook.body), hook.headers
        assert not verify(b"another secret" * 3, hook.headers[SIGNATURE_HEADER], hook.body)
        assert hook.json()["verification_id"] == vid
    # The same event as the API shows it, field for field (type, ISO time, channel, detail).
    told = Counter(json.dumps(h.json()["event"], sort_keys=True) for h in hooks)
    assert told == Counter(json.dumps(e, sort_keys=True) for e in events), (told, events)


async def _webhook_outcomes(api: Api) -> dict[str, float]:
    """``clinic_webhooks_total`` by outcome, from /metrics."""
    samples = _parse_prometheus((await api.request("GET", "/metrics", key=None)).text)
    found = (re.fullmatch(r'clinic_webhooks_total\{outcome="([a-z_]+)"\}', k) for k in samples)
    return {m.group(1): samples[m.group(0)] for m in found if m}


async def _approved_flow(
    api_start: StartService, gateway: SmsGateway, env: dict[str, str]
) -> tuple[str, str, list[dict[str, object]]]:
    _, vid, code, events = await _approved_flow_api(api_start, gateway, env)
    return vid, code, events


async def _approved_flow_api(
    api_start: StartService, gateway: SmsGateway, env: dict[str, str]
) -> tuple[Api, str, str, list[dict[str, object]]]:
    api = await api_start(env)
    vid = (await api.create()).json["id"]
    code = await read_code(gateway)
    await api.wait_for_event(vid, "delivered")
    assert (await api.check(vid, wrong_code(code))).json["status"] == "pending"
    assert (await api.check(vid, code)).json["status"] == "approved"
    events = (await api.get(vid))["events"]
    return api, vid, code, events


async def test_every_event_is_posted_signed_and_without_the_code(
    start_service: StartService, sms_gateway: SmsGateway, webhook_receiver: WebhookReceiver
) -> None:
    vid, code, events = await _approved_flow(
        start_service, sms_gateway, {"CLINIC_WEBHOOK_URL": webhook_receiver.url()}
    )
    assert [e["type"] for e in events] == [
        "requested",
        "dispatched",
        "delivered",
        "check_failed",
        "approved",
    ]
    hooks = await webhook_receiver.wait_until("all events", lambda got: len(got) >= len(events))
    await asyncio.sleep(0.3)  # a duplicate would arrive within a poll or two
    hooks = webhook_receiver.received
    assert len(hooks) == len(events), [h.json()["event"]["type"] for h in hooks]
    _assert_hooks_match(hooks, vid, events)
    for hook in hooks:
        assert code.encode() not in hook.body, "a webhook body holds the code"
        assert hook.path == "/hook"
    final = [h.json() for h in hooks if h.json()["event"]["type"] == "approved"]
    assert final[0]["status"] == "approved"


async def test_failing_receiver_gets_retries_until_delivered(
    start_service: StartService, sms_gateway: SmsGateway, flaky_receiver: WebhookReceiver
) -> None:
    api, vid, _, events = await _approved_flow_api(
        start_service, sms_gateway, {"CLINIC_WEBHOOK_URL": flaky_receiver.url()}
    )
    # Backoff is 1 s (+-20 %) after the first failure.
    hooks = await flaky_receiver.wait_until(
        "every event accepted",
        lambda got: len([h for h in got if h.answered < 300]) >= len(events),
        deadline_s=8.0,
    )
    assert len([h for h in hooks if h.answered >= 500]) == 2
    _assert_hooks_match(flaky_receiver.accepted(), vid, events)
    # The receiver has the last POST a moment before the sender has its answer and counts it.
    loop = asyncio.get_running_loop()
    end = loop.time() + 2.0
    while (counted := await _webhook_outcomes(api)).get("delivered", 0) < len(events):
        assert loop.time() < end, counted
        await asyncio.sleep(0.05)
    assert counted == {"retry": 2, "delivered": len(events)}, counted


async def test_callback_url_of_the_verification_gets_its_events(
    start_service: StartService, sms_gateway: SmsGateway, webhook_receiver: WebhookReceiver
) -> None:
    api = await start_service()  # no global webhook
    created = await api.create(callback_url=webhook_receiver.url("/cb/one"))
    vid = created.json["id"]
    await api.wait_for_event(vid, "delivered")
    hooks = await webhook_receiver.wait_until("3 events", lambda got: len(got) >= 3)
    assert {h.path for h in hooks} == {"/cb/one"}
    _assert_hooks_match(hooks, vid, (await api.get(vid))["events"])


async def test_a_receiver_that_never_answers_holds_up_only_its_own_webhooks(
    start_service: StartService, sms_gateway: SmsGateway, webhook_receiver: WebhookReceiver
) -> None:
    """A review found each process's webhooks sent in batches, each waiting for its slowest
    POST: any app could point callback_url at a host that never answers and hold up every
    other app's events for CLINIC_WEBHOOK_TIMEOUT_S, again at each retry. Now one origin
    takes at most webhooks.PER_ORIGIN POSTs in flight, and the others go on around it."""
    held: list[asyncio.StreamWriter] = []

    async def never_answers(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # the connection stays open, its request unanswered

    hole = await asyncio.start_server(never_answers, "127.0.0.1", 0)
    port = hole.sockets[0].getsockname()[1]
    try:
        api = await start_service(
            {
                "CLINIC_WEBHOOK_TIMEOUT_S": "4",
                "CLINIC_LIMIT_NUMBER_VERIFICATIONS": "100/600",
                "CLINIC_LIMIT_NUMBER_SENDS": "100/600",
            }
        )
        for i in range(12):  # three events each: more than PER_ORIGIN jobs to one origin
            made = await api.create(method="sms", callback_url=f"http://127.0.0.1:{port}/h/{i}")
            assert made.status == 201, made.text
        await sms_gateway.wait_for(12)
        loop = asyncio.get_running_loop()
        end = loop.time() + 5.0
        while len(held) < webhooks_module.PER_ORIGIN:  # the hole's POSTs are in flight
            assert loop.time() < end, f"{len(held)} connections to the unanswering origin"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # a ninth would have come by now
        assert len(held) == webhooks_module.PER_ORIGIN, "connections to the unanswering origin"
        start = loop.time()
        vid = (await api.create(method="sms", callback_url=webhook_receiver.url("/ok"))).json["id"]
        await webhook_receiver.wait_until("the first event", lambda got: len(got) >= 1)
        took = loop.time() - start
        # Polled every 0.25 s; the unanswering origin's timeout is 4 s.
        assert took < 2.5, f"the other app's first event came {took:.1f} s after the create"
        assert webhook_receiver.received[0].json()["verification_id"] == vid
    finally:
        for writer in held:
            writer.close()
        hole.close()
        await hole.wait_closed()


async def test_many_receivers_that_never_answer_do_not_hold_up_one_that_does(
    start_service: StartService, sms_gateway: SmsGateway, webhook_receiver: WebhookReceiver
) -> None:
    """A review found PER_ORIGIN no help against many origins: 70 callback origins that
    accept and never answer filled all MAX_IN_FLIGHT slots for CLINIC_WEBHOOK_TIMEOUT_S, and
    as jobs are leased in due order, a healthy receiver's events waited until every one of
    theirs queued before had been tried (13 s). Now origins not known to answer get only a
    share of the slots, and the sender leases on past the jobs it puts back."""
    held: list[asyncio.StreamWriter] = []

    async def never_answers(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # the connection stays open, its request unanswered

    holes = [await asyncio.start_server(never_answers, "127.0.0.1", 0) for _ in range(70)]
    try:
        api = await start_service(
            {
                # Long enough that none of the holes' first POSTs ends during the test
                # (their retries would only add to the count below).
                "CLINIC_WEBHOOK_TIMEOUT_S": "5",
                "CLINIC_LIMIT_NUMBER_VERIFICATIONS": "200/600",
                "CLINIC_LIMIT_NUMBER_SENDS": "200/600",
            }
        )
        # The app's receiver has had events before: the sender knows it answers.
        first = (await api.create(method="sms", callback_url=webhook_receiver.url("/ok"))).json
        await webhook_receiver.wait_until("3 events", lambda got: len(got) >= 3)
        for i, hole in enumerate(holes):
            port = hole.sockets[0].getsockname()[1]
            made = await api.create(method="sms", callback_url=f"http://127.0.0.1:{port}/h/{i}")
            assert made.status == 201, made.text
        await sms_gateway.wait_for(1 + len(holes))  # and so the holes' jobs are queued
        hole_jobs = 3 * len(holes)  # three events each, as the receiver's verification had
        loop = asyncio.get_running_loop()
        end = loop.time() + 5.0
        while len(held) < 32:  # the holes' first POSTs are in flight
            assert loop.time() < end, f"{len(held)} connections to the holes"
            await asyncio.sleep(0.05)
        vid = (await api.create(method="sms", callback_url=webhook_receiver.url("/ok"))).json["id"]
        # Before, this waited for every hole job queued before it to be tried: about four
        # rounds of 64, each CLINIC_WEBHOOK_TIMEOUT_S long.
        hooks = await webhook_receiver.wait_until(
            "the second verification's 3 events",
            lambda got: sum(h.json()["verification_id"] == vid for h in got) >= 3,
            deadline_s=40.0,
        )
        tried = len(held)
        assert tried < hole_jobs // 2, (
            f"the receiver's events came after {tried} POSTs to the holes ({hole_jobs} jobs)"
        )
        assert {h.json()["verification_id"] for h in hooks} == {first["id"], vid}
    finally:
        for writer in held:
            writer.close()
        for hole in holes:
            hole.close()
            await hole.wait_closed()


async def test_a_callback_url_that_resolves_into_the_clinic_network_is_never_called(
    start_service: StartService,
    sms_gateway: SmsGateway,
    webhook_receiver: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A host name passes the check at create (only its form can be checked then); it is
    # resolved when the webhook connects, and "localhost" resolves to loopback, which is not
    # among CLINIC_CALLBACK_NETWORKS here. The operator's own CLINIC_WEBHOOK_URL on loopback
    # is not guarded: the operator chose it.
    api = await start_service(
        {"CLINIC_CALLBACK_NETWORKS": "", "CLINIC_WEBHOOK_URL": webhook_receiver.url("/global")}
    )
    sneaky = f"http://localhost:{webhook_receiver.port}/sneaky"
    created = await api.create(callback_url=sneaky, method="sms")
    assert created.status == 201, created.text
    vid = created.json["id"]
    await api.wait_for_event(vid, "delivered")
    other = (await api.create(phone="+31612345670")).json["id"]
    hooks = await webhook_receiver.wait_until(
        "the other verification's events",
        lambda got: {h.json()["verification_id"] for h in got} >= {other},
    )
    await asyncio.sleep(0.5)  # a refused attempt would have been retried within this
    assert {h.path for h in webhook_receiver.received} == {"/global"}, "the callback was called"
    assert vid not in {h.json()["verification_id"] for h in hooks}
    assert (await _webhook_outcomes(api)).get("given_up", 0) >= 3, "refused: given up at once"
    given_up = [r.getMessage() for r in caplog.records if "given up" in r.getMessage()]
    assert given_up and all("after 1 attempt(s)" in line for line in given_up), given_up


async def test_an_unreadable_webhook_job_is_dropped_and_the_others_still_delivered(
    start_service: StartService,
    sms_gateway: SmsGateway,
    webhook_receiver: WebhookReceiver,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A job this code did not write (a defect, or a hand edit) used to end the webhook loop
    # of the process that leased it for good, silently: no webhook went out after it.
    redis = aioredis.Redis.from_url(redis_server.url)
    try:
        for jid, junk in (("junk-1", "not json"), ("junk-2", '{"event": "x"}')):
            await redis.hset(WEBHOOK_JOBS, jid, junk)
            await redis.zadd(WEBHOOK_DUE, {jid: 0})
        api = await start_service({"CLINIC_WEBHOOK_URL": webhook_receiver.url()})
        vid = (await api.create()).json["id"]
        await api.wait_for_event(vid, "delivered")
        await webhook_receiver.wait_until("3 events", lambda got: len(got) >= 3)
        for jid in ("junk-1", "junk-2"):
            assert not await redis.hexists(WEBHOOK_JOBS, jid), f"{jid} was kept"
            assert await redis.zscore(WEBHOOK_DUE, jid) is None, f"{jid} is still due"
    finally:
        await redis.aclose()
    assert (await _webhook_outcomes(api)).get("dropped") == 2
    dropped = [r for r in caplog.records if "is unreadable" in r.getMessage()]
    assert [(r.levelno, r.getMessage()[:18]) for r in dropped] == [
        (logging.ERROR, "webhook job junk-1"),
        (logging.ERROR, "webhook job junk-2"),
    ]


async def test_a_record_the_timers_cannot_read_does_not_hold_up_the_others(
    start_service: StartService,
    sms_gateway: SmsGateway,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    api = await start_service({"CLINIC_STEP_TIMEOUT_SMS_S": "10"}, clock=clock)
    vid = (await api.create()).json["id"]
    await api.wait_for_event(vid, "delivered")
    redis = aioredis.Redis.from_url(redis_server.url)
    try:  # due before the real one, so the timer loop meets it first
        await redis.hset("cv:v:broken", mapping={"ver": "1", "doc": "{not a record"})
        await redis.zadd(DUE, {"broken": 0})
    finally:
        await redis.aclose()
    clock.advance(11)
    v = await api.wait_for_event(vid, "fallback", deadline_s=3.0)
    assert "timed out" in v["events"][-1]["detail"]
    failed = [r for r in caplog.records if "its timer failed" in r.getMessage()]
    assert failed and failed[0].levelno == logging.ERROR and failed[0].exc_info
    assert failed[0].getMessage() == "verification broken: its timer failed"


# -- timers on an injected clock -----------------------------------------------------------------
async def test_step_timeout_and_expiry_run_on_the_injected_clock(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    clock = FakeClock()
    api = await start_service(
        {"CLINIC_CODE_TTL_S": "60", "CLINIC_STEP_TIMEOUT_SMS_S": "10"}, clock=clock
    )
    vid = (await api.create()).json["id"]
    code = await read_code(sms_gateway)
    await api.wait_for_event(vid, "delivered")
    await asyncio.sleep(0.5)  # the timer loop polls every 0.2 s: nothing is due yet
    assert "fallback" not in [e["type"] for e in (await api.get(vid))["events"]]

    clock.advance(11)
    v = await api.wait_for_event(vid, "fallback", deadline_s=3.0)
    [fallback] = [e for e in v["events"] if e["type"] == "fallback"]
    assert fallback["channel"] is None, "sms was the last channel: nothing to fall back to"
    assert "timed out" in fallback["detail"]
    assert v["status"] == "pending", "a timed-out last step waits for a check until expiry"
    (await api.request("POST", f"/v1/verifications/{vid}/fallback")).problem(409, "no-channel-left")

    clock.advance(50)
    v = await api.wait_for_event(vid, "expired", deadline_s=3.0)
    assert v["status"] == "expired"
    after = await api.check(vid, code)
    assert after.status == 200, after.text
    assert after.json["status"] == "expired", "the right code after expiry must not approve"
    assert len(sms_gateway.received) == 1


async def test_a_last_send_with_no_outcome_by_its_step_timeout_is_sent_again(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    # What a killed serve leaves: a send under way that never reports. Here the gateway holds
    # the request past the step timeout (on the injected clock), which looks the same.
    sms_gateway.mode = GatewayMode.HANG
    clock = FakeClock()
    api = await start_service(
        {"CLINIC_STEP_TIMEOUT_SMS_S": "130", "CLINIC_SMS_HTTP_TIMEOUT_S": "60"}, clock=clock
    )
    vid = (await api.create(method="sms", fallback=[])).json["id"]
    await sms_gateway.wait_for(1)
    clock.advance(131)
    await sms_gateway.wait_for(2, deadline_s=3.0)
    v = await api.get(vid)
    again = [e for e in v["events"] if e["type"] == "fallback"]
    assert [(e["channel"], "no outcome reported" in e["detail"]) for e in again] == [("sms", True)]
    assert [e["type"] for e in v["events"]].count("dispatched") == 2
    assert v["status"] == "pending" and v["channel"] == "sms"
    clock.advance(131)  # no outcome again: once is enough
    loop = asyncio.get_running_loop()
    end = loop.time() + 3.0
    while [e["type"] for e in (await api.get(vid))["events"]].count("fallback") < 2:
        assert loop.time() < end, "the second step timeout did not fall back"
        await asyncio.sleep(0.1)
    v = await api.get(vid)
    assert (v["events"][-1]["channel"], v["status"]) == (None, "pending")
    await asyncio.sleep(0.5)  # a third send would arrive within this
    assert len(sms_gateway.received) == 2


async def test_a_last_send_a_limit_refuses_ends_the_plan_at_once_and_tells_the_client(
    start_service: StartService, sms_gateway: SmsGateway, webhook_receiver: WebhookReceiver
) -> None:
    # The send again of a last step whose first send never reported meets the number's send
    # limit: it left the verification on its step (`channel` "sms", no timer) with no word
    # that nothing more would come, until it expired. Nothing can follow it: the plan is used
    # up at once (`channel` null, as the README tells the app to read), and the code that
    # left still checks.
    sms_gateway.mode = GatewayMode.HANG
    clock = FakeClock()
    api = await start_service(
        {
            "CLINIC_STEP_TIMEOUT_SMS_S": "130",
            "CLINIC_SMS_HTTP_TIMEOUT_S": "60",
            "CLINIC_LIMIT_NUMBER_SENDS": "1/600",
            "CLINIC_WEBHOOK_URL": webhook_receiver.url(),
        },
        clock=clock,
    )
    vid = (await api.create(method="sms", fallback=[])).json["id"]
    code = await read_code(sms_gateway)
    clock.advance(131)
    v = await api.wait_for_event(vid, "send_refused", deadline_s=3.0)
    refused = [e for e in v["events"] if e["type"] == "send_refused"]
    assert [(e["channel"], e["detail"]) for e in refused] == [
        ("sms", "too many sends to this number (limit 1 per 600 s)")
    ]
    assert v["events"][-1]["type"] == "fallback", [e["type"] for e in v["events"]]
    assert (v["events"][-1]["channel"], v["events"][-1]["detail"]) == (
        None,
        "sms: too many sends to this number (limit 1 per 600 s)",
    )
    assert (v["status"], v["channel"]) == ("pending", None)
    # The client hears it at once: each event's webhook, with the verification's channel
    # right after it (null once the plan is used up).
    # Both webhooks, which arrive in no set order (each is sent on its own).
    hooks = await webhook_receiver.wait_until(
        "the send_refused's and the fallback's webhooks",
        lambda got: (
            {("send_refused", "sms"), ("fallback", None)}
            <= {(h.json()["event"]["type"], h.json()["event"]["channel"]) for h in got}
        ),
        deadline_s=5.0,
    )
    # (The first fallback, to "sms" again, is the send again that was refused.)
    told = {(h.json()["event"]["type"], h.json()["event"]["channel"]): h for h in hooks}
    assert told["send_refused", "sms"].json()["status"] == "pending"
    moved = told["fallback", None].json()
    assert (moved["status"], moved["channel"]) == ("pending", None)
    _assert_hooks_match(
        [told["send_refused", "sms"], told["fallback", None]],
        vid,
        v["events"][-2:],
    )
    (await api.request("POST", f"/v1/verifications/{vid}/fallback")).problem(409, "no-channel-left")
    assert len(sms_gateway.received) == 1, "the refused send left all the same"
    assert (await api.check(vid, code)).json["status"] == "approved"


async def test_a_last_send_past_the_send_limit_ends_the_plan_at_once(
    start_service: StartService, sms_gateway: SmsGateway, webhook_receiver: WebhookReceiver
) -> None:
    # As above with the verification's own limit (CLINIC_MAX_SENDS) in place of the number's:
    # the send again was refused and the verification stayed on its step, `channel` "sms"
    # and no timer, though nothing more could be sent (OpenAPI: null once the plan is used up).
    sms_gateway.mode = GatewayMode.HANG
    clock = FakeClock()
    api = await start_service(
        {
            "CLINIC_STEP_TIMEOUT_SMS_S": "130",
            "CLINIC_SMS_HTTP_TIMEOUT_S": "60",
            "CLINIC_MAX_SENDS": "1",
            "CLINIC_WEBHOOK_URL": webhook_receiver.url(),
        },
        clock=clock,
    )
    vid = (await api.create(method="sms", fallback=[])).json["id"]
    code = await read_code(sms_gateway)
    clock.advance(131)
    v = await api.wait_for_event(vid, "send_refused", deadline_s=3.0)
    assert [(e["type"], e["channel"], e["detail"]) for e in v["events"][-2:]] == [
        ("send_refused", "sms", "send limit of this verification reached"),
        ("fallback", None, "sms: send limit of this verification reached"),
    ]
    assert (v["status"], v["channel"]) == ("pending", None)
    hooks = await webhook_receiver.wait_until(
        "the fallback's webhook",
        lambda got: any(
            (h.json()["event"]["type"], h.json()["event"]["channel"]) == ("fallback", None)
            for h in got
        ),
        deadline_s=5.0,
    )
    told = {(h.json()["event"]["type"], h.json()["event"]["channel"]): h for h in hooks}
    moved = told["fallback", None].json()
    assert (moved["status"], moved["channel"]) == ("pending", None)
    (await api.request("POST", f"/v1/verifications/{vid}/fallback")).problem(409, "no-channel-left")
    assert len(sms_gateway.received) == 1
    assert (await api.check(vid, code)).json["status"] == "approved"


async def test_check_after_ttl_expires_even_before_the_timer(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    clock = FakeClock()
    api = await start_service({"CLINIC_CODE_TTL_S": "60"}, clock=clock)
    vid = (await api.create()).json["id"]
    code = await read_code(sms_gateway)
    clock.advance(60)
    answer = await api.check(vid, code)
    assert answer.json["status"] == "expired", answer.text


# -- logs, health, metrics -------------------------------------------------------------------
async def test_no_log_record_holds_the_code(
    start_service: StartService,
    sms_gateway: SmsGateway,
    webhook_receiver: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    api = await start_service(
        {"CLINIC_WEBHOOK_URL": webhook_receiver.url(), "CLINIC_LOG_LEVEL": "DEBUG"}
    )
    vid = (await api.create(code_length=8)).json["id"]
    code = await read_code(sms_gateway)
    await api.wait_for_event(vid, "delivered")
    assert (await api.check(vid, wrong_code(code))).json["status"] == "pending"
    (await api.request("POST", f"/v1/verifications/{vid}/check", data=code)).problem(
        415, "unsupported-media-type"
    )
    assert (await api.check(vid, code)).json["status"] == "approved"
    (await api.check(vid, code)).problem(409, "not-pending")
    await webhook_receiver.wait_until("5 events", lambda got: len(got) >= 5)
    records = caplog.records
    loggers = {r.name for r in records}
    assert any(n.startswith("verification") for n in loggers), loggers
    for r in records:
        text = r.getMessage() + (r.exc_text or "") + repr(r.args)
        assert code not in text, f"log record of {r.name} holds the code"


async def test_health_readiness_and_metrics(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    api = await start_service()
    health = await api.request("GET", "/healthz", key=None)
    assert health.status == 200 and health.json == {"status": "ok"}
    ready = await api.request("GET", "/readyz", key=None)
    assert ready.status == 200 and ready.json["status"] == "ready", ready.text
    vid = (await api.create()).json["id"]
    code = await read_code(sms_gateway)
    await api.wait_for_event(vid, "delivered")
    await api.check(vid, wrong_code(code))
    await api.check(vid, code)
    (await api.request("GET", "/v1/verifications/AAAAAAAAAAAAAAAAAAAAAAAAAAA")).problem(
        404, "not-found"
    )

    answer = await api.request("GET", "/metrics", key=None)
    assert answer.status == 200
    assert answer.content_type == "text/plain"
    assert answer.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = _parse_prometheus(answer.text)

    def sample(name: str, **labels: str) -> float:
        inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        key = f"{name}{{{inner}}}"
        assert key in samples, f"{key} not in /metrics:\n{answer.text}"
        return samples[key]

    requests = "clinic_http_requests_total"
    assert sample(requests, method="POST", route="/v1/verifications", status="201") == 1
    check_route = "/v1/verifications/{id}/check"
    assert sample(requests, method="POST", route=check_route, status="200") == 2
    assert sample(requests, method="GET", route="/v1/verifications/{id}", status="404") == 1
    # A wrong check changes the record, not its state: still one "pending".
    assert sample("clinic_verifications_total", channel="sms", status="pending") == 1
    assert sample("clinic_verifications_total", channel="sms", status="approved") == 1
    assert sample("clinic_deliveries_total", channel="sms", outcome="delivered") == 1
    latency = "clinic_http_request_duration_seconds_count"
    assert sample(latency, route="/v1/verifications") == 1
    assert "# TYPE clinic_http_requests_total counter" in answer.text


async def test_metrics_count_each_state_change_once_whoever_made_it(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    """API, timers and channel reports each change states; /metrics shows every change once,
    under the channel the verification was on, also after its plan was used up."""
    clock = FakeClock()
    api = await start_service(
        {"CLINIC_CODE_TTL_S": "60", "CLINIC_STEP_TIMEOUT_SMS_S": "10"}, clock=clock
    )
    expiring = (await api.create()).json["id"]
    approving = (await api.create()).json["id"]
    canceling = (await api.create()).json["id"]
    code = await read_code(sms_gateway, 2)
    for vid in (expiring, approving, canceling):
        await api.wait_for_event(vid, "delivered")
    assert (await api.request("DELETE", f"/v1/verifications/{canceling}")).status == 200
    clock.advance(11)  # the SMS step times out: the timer uses the plan up (no new state)
    for vid in (expiring, approving):
        await api.wait_for_event(vid, "fallback", deadline_s=3.0)
    assert (await api.check(approving, wrong_code(code))).json["status"] == "pending"
    assert (await api.check(approving, code)).json["status"] == "approved"
    clock.advance(50)  # the timer expires the one left
    await api.wait_for_event(expiring, "expired", deadline_s=3.0)
    sms_gateway.mode = GatewayMode.REJECT  # a channel report fails the next one
    failing = (await api.create()).json["id"]
    await api.wait_for_event(failing, "failed")

    answer = await api.request("GET", "/metrics", key=None)
    counted = {
        k: v
        for k, v in _parse_prometheus(answer.text).items()
        if k.startswith("clinic_verifications_total")
    }
    name = "clinic_verifications_total"
    assert counted == {
        f'{name}{{channel="sms",status="pending"}}': 4,
        f'{name}{{channel="sms",status="canceled"}}': 1,
        f'{name}{{channel="sms",status="approved"}}': 1,
        f'{name}{{channel="sms",status="expired"}}': 1,
        f'{name}{{channel="sms",status="failed"}}': 1,
    }, answer.text
    assert "# HELP clinic_verifications_total verification state changes" in answer.text


def _parse_prometheus(text: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        assert name and value, f"not a sample line: {line!r}"
        samples[name] = float(value)
    return samples


async def test_shutdown_names_the_sends_it_abandons(
    start_service: StartService, sms_gateway: SmsGateway, caplog: pytest.LogCaptureFixture
) -> None:
    # A send still under way when the service stops is left to its step timer: the log says
    # which, so an operator can tell what a restart cut short.
    sms_gateway.mode = GatewayMode.HANG
    api = await start_service({"CLINIC_SMS_HTTP_TIMEOUT_S": "60", "CLINIC_SMS_HTTP_RETRIES": "0"})
    vid = (await api.create(method="sms", fallback=[])).json["id"]
    await sms_gateway.wait_for(1)
    caplog.set_level(logging.WARNING, logger="verification.dispatcher")
    await api.client.close()
    [line] = [r.getMessage() for r in caplog.records if "stopping with" in r.getMessage()]
    assert line.startswith("stopping with sends under way for 1 verification(s), left"), line
    assert line.endswith(f": {vid}"), line
