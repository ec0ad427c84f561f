"""The verification API end to end over HTTP: a real app, a real redis-server, a real SMS
gateway peer whose recorded texts are where the tests read their codes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import orjson
import pytest
import redis.asyncio as aioredis

from clinic_voice.app import RUNTIME
from clinic_voice.http import key_id
from tests.conftest import RedisServer
from tests.integration.conftest import (
    API_KEY,
    MOBILE,
    Api,
    StartService,
    read_code,
    wrong_code,
)
from tests.peers.sms_gateway import SmsGateway
from verification import entropy, rules
from verification.model import Channel, Policy
from verification.numbers import parse_phone
from verification.store import body_hash

pytestmark = pytest.mark.integration
# Fails a test if the app (it runs in the test's loop) blocks the loop for > 100 ms.
loop_watched = pytest.mark.usefixtures("no_blocking")


@loop_watched
async def test_create_answers_201_with_location_and_fields(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    api = await start_service()
    answer = await api.create(code_length=6, locale="nl-NL")
    assert answer.status == 201, answer.text
    v = answer.json
    assert answer.headers["Location"] == f"/v1/verifications/{v['id']}"
    assert answer.content_type == "application/json"
    assert answer.headers["Cache-Control"] == "no-store", "it holds a phone number"
    read = await api.request("GET", f"/v1/verifications/{v['id']}")
    assert read.headers["Cache-Control"] == "no-store"
    assert v["phone"] == MOBILE
    assert v["status"] == "pending"
    assert v["channel"] == "sms"
    assert v["channels"] == ["sms"]
    assert v["attempts_left"] == 5
    assert v["events"][0]["type"] == "requested"
    assert "code" not in answer.text.lower().replace("code_length", "")
    await read_code(sms_gateway)
    got = await api.wait_for_event(v["id"], "delivered")
    assert got["id"] == v["id"]
    assert [e["type"] for e in got["events"]] == ["requested", "dispatched", "delivered"]


@loop_watched
async def test_wrong_check_counts_down_and_right_check_approves(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    api = await start_service()
    vid = (await api.create()).json["id"]
    code = await read_code(sms_gateway)
    wrong = await api.check(vid, wrong_code(code))
    assert wrong.status == 200, wrong.text
    assert wrong.json == {"id": vid, "status": "pending", "attempts_left": 4}
    wrong = await api.check(vid, wrong_code(wrong_code(code)))
    assert wrong.json["attempts_left"] == 3
    right = await api.check(vid, code)
    assert right.json == {"id": vid, "status": "approved", "attempts_left": 3}
    v = await api.get(vid)
    assert v["status"] == "approved"
    assert [e["type"] for e in v["events"]].count("check_failed") == 2
    # Single use: the same right code again finds nothing pending.
    (await api.check(vid, code)).problem(409, "not-pending")


@loop_watched
async def test_fallback_without_a_channel_left_is_409(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    api = await start_service()
    vid = (await api.create()).json["id"]
    await read_code(sms_gateway)
    answer = await api.request("POST", f"/v1/verifications/{vid}/fallback")
    answer.problem(409, "no-channel-left")
    assert len(sms_gateway.received) == 1, "a refused fallback must not send"


async def _stored_on(api: Api, plan: tuple[Channel, ...], *, moved: int = 0) -> str:
    """A verification of ``plan`` written to the service's Redis as a create writes it (no
    send started: the test decides what happens), moved on ``moved`` times as the step
    timer moves it; its id."""
    store = api.app[RUNTIME].need_store()
    vid = entropy.token_urlsafe(24)
    made = rules.create(
        verification_id=vid,
        phone=parse_phone(MOBILE),
        plan=plan,
        code_length=6,
        now=time.time(),
        policy=Policy(),
    )
    await store.create(made)
    for _ in range(moved):
        await store.update(vid, lambda v: (rules.request_fallback(v, time.time(), Policy()), None))
    return vid


@loop_watched
async def test_a_fallback_from_a_channel_the_verification_has_left_is_409_and_moves_nothing(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    """The app read the verification on the flash call and asks to move on from it, but the
    service moved it to the voice call meanwhile: without ``from`` that request moved it on
    once more, past the call just placed."""
    api = await start_service()
    vid = await _stored_on(api, (Channel.FLASHCALL, Channel.VOICE, Channel.SMS), moved=1)
    before = await api.get(vid)
    assert before["channel"] == "voice"
    path = f"/v1/verifications/{vid}/fallback"
    refused = (await api.request("POST", path, json_body={"from": "flashcall"})).problem(
        409, "not-on-channel"
    )
    assert refused["channel"] == "voice", refused
    assert "voice" in refused["detail"], refused
    assert await api.get(vid) == before, "a refused fallback changes nothing"
    moved = await api.request("POST", path, json_body={"from": "voice"})
    assert moved.status == 200, moved.text
    assert moved.json["channel"] == "sms"
    assert [e["detail"] for e in moved.json["events"] if e["type"] == "fallback"] == [
        "requested by the client",
        "requested by the client",
    ]
    await read_code(sms_gateway)
    # Without a body (or with one that names no channel), as before: from wherever it is.
    (await api.request("POST", path)).problem(409, "no-channel-left")
    (await api.request("POST", path, json_body={})).problem(409, "no-channel-left")
    assert len(sms_gateway.received) == 1


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"from": "fax"}, {"field": "from"}),
        ({"from": None}, {"field": "from"}),
        ({"from": ["sms"]}, {"field": "from"}),
        ({"from": "sms", "to": "voice"}, {"fields": ["to"]}),
        (["sms"], {}),
    ],
)
async def test_a_fallback_body_that_names_no_channel_rightly_is_422(
    start_service: StartService, body: object, named: dict[str, object]
) -> None:
    api = await start_service()
    vid = await _stored_on(api, (Channel.VOICE, Channel.SMS))
    answer = await api.request("POST", f"/v1/verifications/{vid}/fallback", json_body=body)
    problem = answer.problem(422, "invalid-request")
    assert {k: problem.get(k) for k in named} == named, problem
    assert (await api.get(vid))["channel"] == "voice", "nothing moved"


@loop_watched
async def test_two_fallbacks_from_one_channel_at_once_move_it_once(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    """Both requests read the verification on the voice call; one moves it to SMS, and the
    other, written against the record as the first left it, is told it is on SMS now."""
    api = await start_service()
    for round_ in range(5):
        vid = await _stored_on(api, (Channel.VOICE, Channel.SMS))
        path = f"/v1/verifications/{vid}/fallback"
        answers = await asyncio.gather(
            *(api.request("POST", path, json_body={"from": "voice"}) for _ in range(2))
        )
        statuses = sorted(a.status for a in answers)
        assert statuses == [200, 409], [a.text for a in answers]
        [moved] = [a for a in answers if a.status == 200]
        [lost] = [a for a in answers if a.status == 409]
        assert moved.json["channel"] == "sms"
        assert lost.problem(409, "not-on-channel")["channel"] == "sms"
        v = await api.get(vid)
        assert [e["type"] for e in v["events"]].count("fallback") == 1, v["events"]
        assert len(await sms_gateway.wait_for(round_ + 1)) == round_ + 1, "one SMS a move"


@loop_watched
async def test_cancel_then_nothing_is_pending(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    api = await start_service()
    vid = (await api.create()).json["id"]
    code = await read_code(sms_gateway)
    answer = await api.request("DELETE", f"/v1/verifications/{vid}")
    assert answer.status == 200, answer.text
    assert answer.json["status"] == "canceled"
    assert answer.json["events"][-1]["type"] == "canceled"
    (await api.request("DELETE", f"/v1/verifications/{vid}")).problem(409, "not-pending")
    (await api.check(vid, code)).problem(409, "not-pending")
    (await api.request("POST", f"/v1/verifications/{vid}/fallback")).problem(409, "not-pending")
    assert (await api.get(vid))["status"] == "canceled"


@loop_watched
async def test_unknown_verification_is_404(start_service: StartService) -> None:
    api = await start_service()
    missing = "A" * 32
    (await api.request("GET", f"/v1/verifications/{missing}")).problem(404, "not-found")
    (await api.check(missing, "123456")).problem(404, "not-found")
    (await api.request("DELETE", f"/v1/verifications/{missing}")).problem(404, "not-found")
    (await api.request("GET", "/v1/verifications/short")).problem(404, "not-found")


@loop_watched
async def test_idempotency_key_replays_the_same_verification(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    api = await start_service()
    headers = {"Idempotency-Key": "order-4711"}
    body = {"phone": MOBILE, "code_length": 6}
    first = await api.request("POST", "/v1/verifications", json_body=body, headers=headers)
    assert first.status == 201, first.text
    again = await api.request("POST", "/v1/verifications", json_body=body, headers=headers)
    assert again.status == 201, again.text
    assert again.json["id"] == first.json["id"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.headers["Location"] == first.headers["Location"]
    other = await api.request(
        "POST", "/v1/verifications", json_body={**body, "code_length": 8}, headers=headers
    )
    other.problem(422, "idempotency-key-reused")
    # The same key from another API key is another request.
    from tests.integration.conftest import OTHER_KEY

    theirs = await api.request(
        "POST", "/v1/verifications", json_body=body, headers=headers, key=OTHER_KEY
    )
    assert theirs.status == 201, theirs.text
    assert theirs.json["id"] != first.json["id"]
    await sms_gateway.wait_for(2)
    await asyncio.sleep(0.3)  # a replay that sent would show up by now
    assert len(sms_gateway.received) == 2, "a replay must not send again"


# Not under no_blocking: 100 concurrent clients in the same loop, with asyncio's debug mode
# on, make the test's own client steps slow, not the app's.
async def test_100_parallel_right_checks_approve_exactly_once(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    api = await start_service()
    vid = (await api.create()).json["id"]
    code = await read_code(sms_gateway)
    answers = await asyncio.gather(*(api.check(vid, code) for _ in range(100)))
    statuses = Counter(a.status for a in answers)
    assert statuses == {200: 1, 409: 99}, statuses
    for a in answers:
        if a.status == 200:
            assert a.json["status"] == "approved"
        else:
            a.problem(409, "not-pending")
    v = await api.get(vid)
    assert v["status"] == "approved"
    assert [e["type"] for e in v["events"]].count("approved") == 1


@loop_watched
async def test_brute_force_stops_at_the_attempt_limit(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    api = await start_service()
    vid = (await api.create()).json["id"]
    code = await read_code(sms_gateway)
    left = []
    for i in range(5):
        guess = f"{(int(code) + 1 + i) % 10**6:06d}"
        answer = await api.check(vid, guess)
        assert answer.status == 200, answer.text
        left.append((answer.json["status"], answer.json["attempts_left"]))
    assert left == [("pending", 4), ("pending", 3), ("pending", 2), ("pending", 1), ("failed", 0)]
    after = await api.check(vid, code)
    assert after.status == 200, after.text
    assert after.json["status"] == "failed", "the right code after the limit must not approve"
    v = await api.get(vid)
    assert v["status"] == "failed"
    assert "approved" not in [e["type"] for e in v["events"]]


@loop_watched
async def test_a_retry_waits_for_the_first_request_then_answers_409_with_retry_after(
    start_service: StartService, sms_gateway: SmsGateway, redis_server: RedisServer
) -> None:
    # The first request with this key reserved it and has not finished (held here by
    # writing its reservation by hand): a retry waits for it, then gives up with 409 and
    # Retry-After rather than 422 "used with another body", which it is not.
    api = await start_service()
    body = {"phone": MOBILE}
    key = "still-making-it"
    reservation = f"cv:idem:{key_id(API_KEY)}:{body_hash(key.encode())}"
    same = body_hash(orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
    redis = aioredis.Redis.from_url(redis_server.url)
    try:
        await redis.set(reservation, json.dumps({"body": same, "id": ""}), ex=60)
        loop = asyncio.get_running_loop()
        started = loop.time()
        answer = await api.request(
            "POST", "/v1/verifications", json_body=body, headers={"Idempotency-Key": key}
        )
        answer.problem(409, "idempotency-key-in-progress")
        assert answer.headers["Retry-After"] == "1"
        assert loop.time() - started >= 2.5, "it gave up without waiting"
        # The first request finishes meanwhile: the retry answers with what it made.
        made = (await api.create()).json["id"]
        await sms_gateway.wait_for(1)

        async def finish() -> None:
            await asyncio.sleep(0.3)
            await redis.set(reservation, json.dumps({"body": same, "id": made}), ex=60)

        finisher = asyncio.create_task(finish())
        replay = await api.request(
            "POST", "/v1/verifications", json_body=body, headers={"Idempotency-Key": key}
        )
        await finisher
        assert replay.status == 201, replay.text
        assert replay.json["id"] == made
        assert replay.headers["Idempotent-Replayed"] == "true"
    finally:
        await redis.aclose()
    await asyncio.sleep(0.2)
    assert len(sms_gateway.received) == 1, "neither retry sent anything"
