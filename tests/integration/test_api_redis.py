"""The API when its Redis dies: fail closed (503, nothing approved, nothing sent), and an
acknowledged approval survives ``kill -9`` of the Redis (AOF with fsync on every write). And
one Redis, one CLINIC_SECRET: a process with another one refuses to start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeoutError

from clinic_voice import app as app_module
from clinic_voice import shared_secret
from clinic_voice.app import RUNTIME, _sigterm_once_handled
from clinic_voice.shared_secret import Claim, SecretMismatch
from sip_config.clock import FakeClock, SystemClock
from sip_config.settings import Settings
from tests.conftest import RedisServer
from tests.integration.conftest import MOBILE, SECRET, Api, StartService, read_code
from tests.peers.sms_gateway import GatewayMode, SmsGateway
from verification import dispatcher as dispatcher_module
from verification import rules
from verification import store as store_module
from verification.channels.base import DeliveryReport
from verification.dispatcher import Dispatcher, _Send
from verification.errors import StoreUnavailable
from verification.limits import LimitCheck, LimitDecision, LimitName
from verification.model import Channel, Policy, Verification
from verification.numbers import parse_phone
from verification.redis_mux import RedisMux, Script
from verification.rules import DeliveryKind
from verification.store import Stored, VerificationStore

OTHER_MOBILE = "+31612345670"

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]

# A dead Redis must be answered quickly, not after seconds of client retries.
ANSWER_BUDGET_S = 3.0
RECONNECT_DEADLINE_S = 5.0


async def _get_after_restart(api: Api, vid: str) -> dict[str, Any]:
    """GET once the service has reconnected to the restarted Redis.

    A pooled connection that saw the old server die fails its next command (redis-py does not
    notice the close before sending), so the first requests after a restart may still answer
    503: allowed, but only as ``store-unavailable`` and only until the deadline.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + RECONNECT_DEADLINE_S
    while True:
        answer = await api.request("GET", f"/v1/verifications/{vid}")
        if answer.status == 200:
            return dict(answer.json)
        answer.problem(503, "store-unavailable")
        if loop.time() > end:
            pytest.fail(f"still 503 {RECONNECT_DEADLINE_S} s after the Redis restart")
        await asyncio.sleep(0.05)


async def test_redis_killed_answers_503_and_neither_approves_nor_sends(
    start_service: StartService,
    sms_gateway: SmsGateway,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="clinic_voice.http")
    api = await start_service()
    vid = (await api.create()).json["id"]
    code = await read_code(sms_gateway)
    await api.wait_for_event(vid, "delivered")
    ready = await api.request("GET", "/readyz")
    assert ready.status == 200, ready.text
    assert ready.json["checks"] == {"redis": True, "channels": True}

    await asyncio.to_thread(redis_server.kill9)

    started = time.monotonic()
    (await api.check(vid, code)).problem(503, "store-unavailable")
    assert time.monotonic() - started < ANSWER_BUDGET_S, "a dead Redis took too long to answer"
    (await api.create(phone="+31612345679")).problem(503, "store-unavailable")
    (await api.request("GET", f"/v1/verifications/{vid}")).problem(503, "store-unavailable")
    (await api.request("POST", f"/v1/verifications/{vid}/fallback")).problem(
        503, "store-unavailable"
    )
    (await api.request("DELETE", f"/v1/verifications/{vid}")).problem(503, "store-unavailable")
    # A wrong key cannot be counted either: 503 as for the right key, or an outage would be a
    # way to tell the right key from wrong ones.
    guess = await api.request("GET", f"/v1/verifications/{vid}", key="a-guess")
    refused = guess.problem(503, "store-unavailable")
    # redis-py's text names the socket path (or host and port): for the log, not for a client
    # that may not even hold a key.
    assert "connect" not in refused["detail"].lower() and "/" not in refused["detail"], refused
    not_ready = (await api.request("GET", "/readyz")).problem(503, "not-ready")
    assert not_ready["checks"]["redis"] is False
    healthy = await api.request("GET", "/healthz")
    assert healthy.status == 200, "liveness does not depend on Redis"
    await asyncio.sleep(0.3)  # a send the dead store let through would reach the gateway by now
    assert len(sms_gateway.received) == 1, "nothing may be sent while the store is down"

    await asyncio.to_thread(redis_server.restart)
    v = await _get_after_restart(api, vid)
    assert v["status"] == "pending", "the checks during the outage must not have approved"
    assert "approved" not in [e["type"] for e in v["events"]]
    assert len(sms_gateway.received) == 1
    # Seven requests failed alike: the log says so once, and once when Redis is back (each
    # failed request only at DEBUG, with its path).
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "clinic_voice.http"]
    warned = [m for level, m in said if level >= logging.WARNING]
    assert len(warned) == 2, warned
    assert warned[0].startswith("API requests: store unavailable: ")
    assert warned[1].startswith("API requests: store available again after ")
    assert sum(f"/v1/verifications/{vid}" in m for level, m in said if level == logging.DEBUG) >= 5


@pytest.mark.parametrize("outage", ["killed", "stalled", "answer_lost"])
async def test_a_report_during_a_redis_outage_is_kept_not_turned_into_a_failure(
    start_service: StartService,
    sms_gateway: SmsGateway,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    outage: str,
) -> None:
    """The black-box finding: during an outage a channel's report failed to be written, the
    dispatcher took that for a channel failure and recorded "undeliverable ... internal error:
    StoreUnavailable". Now the gateway's own outcome (it hangs: timed out) is kept and written
    once Redis is back, once, and no event names an internal error.

    ``killed``: the write is refused. ``stalled`` (SIGSTOP past the client's 2 s timeout): the
    write fails on the client (and was not applied: the client closed its connection).
    ``answer_lost``: the write is applied, its answer lost (as a Redis stalled just after
    applying it), so the retry finds it there. Each way the verification counts once in
    clinic_verifications_total as failed (answer_lost: it was not counted).
    """
    sms_gateway.mode = GatewayMode.HANG
    api = await start_service({"CLINIC_SMS_HTTP_TIMEOUT_S": "1", "CLINIC_SMS_HTTP_RETRIES": "0"})
    vid = (await api.create()).json["id"]
    await sms_gateway.wait_for(1)
    pid = redis_server.pid
    assert pid is not None
    if outage == "answer_lost":
        real = RedisMux.evalsha
        lost: list[str] = []

        async def evalsha(mux: RedisMux, script: Script, keys: Any, args: Any) -> Any:
            answer = await real(mux, script, keys, args)
            if script is store_module._CAS and not lost:
                lost.append(keys[0])  # the report's write (the send's was made already)
                raise RedisTimeoutError("Redis did not answer within 2.0 s (test)")
            return answer

        monkeypatch.setattr(RedisMux, "evalsha", evalsha)
        await api.wait_for_event(vid, "failed")
        assert lost == [f"cv:v:{vid}"], "the fault was not injected"
        dispatcher = api.app[RUNTIME].dispatcher
        assert dispatcher is not None
        async with asyncio.timeout(5):
            while dispatcher._keeping:  # noqa: ASYNC110 (a deadline): the kept report's retry
                await asyncio.sleep(0.05)
    elif outage == "killed":
        await asyncio.to_thread(redis_server.kill9)
        await asyncio.sleep(2.0)  # the gateway times out (1 s) while the store is down
        await asyncio.to_thread(redis_server.restart)
        await _get_after_restart(api, vid)
    else:
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(4.0)  # timed out (1 s), then the write's 2 s client timeout
        finally:
            os.kill(pid, signal.SIGCONT)
    v = await api.wait_for_event(vid, "failed")  # sms was the only channel
    kinds = [e["type"] for e in v["events"]]
    assert kinds == ["requested", "dispatched", "undeliverable", "fallback", "failed"], v
    [undeliverable] = [e for e in v["events"] if e["type"] == "undeliverable"]
    assert undeliverable["detail"] == "gateway timed out after 1 s", undeliverable
    for e in v["events"]:
        assert "internal" not in e["detail"] and "Store" not in e["detail"], e
    assert len(sms_gateway.received) == 1
    # Counted once, as entered: a write whose answer was lost but that landed (stalled) is
    # counted when its retry finds it there (it was not counted at all).
    counted = api.app[RUNTIME].metrics.verifications
    assert counted.value(status="failed", channel="sms") == 1
    assert counted.value(status="pending", channel="sms") == 1


@pytest.mark.parametrize("timer", ["here", "elsewhere"])
async def test_a_report_kept_in_an_outage_lands_before_its_step_timer_resends(
    start_service: StartService,
    sms_gateway: SmsGateway,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    timer: str,
) -> None:
    """The gateway accepted the SMS while Redis was down, and the step timed out meanwhile.
    With Redis back, the step timer saw no outcome and sent a second SMS with a second code
    before the kept report (retried with back-off) landed.

    ``here``: the timer runs in the process that keeps the report, which waits for it (no
    pause after the outage, to show that alone holds). ``elsewhere``: the timer runs in another
    process on the same Redis, which cannot see the report: its timers pause after the
    outage until a kept report has had time to land.
    """
    sms_gateway.mode = GatewayMode.HOLD
    clock = FakeClock()
    env = {"CLINIC_STEP_TIMEOUT_SMS_S": "130", "CLINIC_SMS_HTTP_TIMEOUT_S": "60"}
    sender = await start_service(env, clock=clock)
    if timer == "here":
        monkeypatch.setattr(dispatcher_module, "TIMERS_QUIET_S", 0.0)
    else:
        await start_service(env, clock=clock)  # its timers take the lease

        async def no_timers() -> int:
            return 0

        dispatcher = sender.app[RUNTIME].dispatcher
        assert dispatcher is not None
        monkeypatch.setattr(dispatcher, "run_due", no_timers)
    vid = (await sender.create(method="sms", fallback=[])).json["id"]
    await sms_gateway.wait_for(1)
    await asyncio.to_thread(redis_server.kill9)
    sms_gateway.release()  # accepted (202) while the store is down: the report is kept
    await asyncio.sleep(3.0)  # the kept report's retries back off to their longest pause
    clock.advance(131)  # the step's timeout passes during the outage
    await asyncio.to_thread(redis_server.restart)
    await sender.wait_for_event(vid, "delivered", deadline_s=10.0)
    # The timers run again once their pause is over: the step's timeout finds the outcome.
    await asyncio.sleep(dispatcher_module.TIMERS_QUIET_S + 1.0)
    v = await sender.get(vid)
    kinds = [e["type"] for e in v["events"]]
    assert kinds[:3] == ["requested", "dispatched", "delivered"], v
    assert kinds.count("dispatched") == 1, v
    assert len(sms_gateway.received) == 1, "the patient got a second SMS with a second code"


async def test_an_acknowledged_approval_survives_kill_9_of_redis(
    start_service: StartService, sms_gateway: SmsGateway, redis_server: RedisServer
) -> None:
    api = await start_service()
    vid = (await api.create()).json["id"]
    code = await read_code(sms_gateway)
    answer = await api.check(vid, code)
    assert answer.json["status"] == "approved", answer.text
    # Killed right after the acknowledgement: no chance to flush anything.
    await asyncio.to_thread(redis_server.kill9)
    await asyncio.to_thread(redis_server.restart)
    v = await _get_after_restart(api, vid)
    assert v["status"] == "approved"
    assert v["events"][-1]["type"] == "approved"
    (await api.check(vid, code)).problem(409, "not-pending")
    assert (await api.request("GET", "/readyz")).status == 200


async def test_a_frozen_redis_answers_503_in_bounded_time_for_as_long_as_it_stays_frozen(
    start_service: StartService, sms_gateway: SmsGateway, redis_server: RedisServer
) -> None:
    """``kill -STOP`` of Redis: every request answers 503 within the budget, not only the
    first. (A probe found the later ones hanging until Redis came back: a new connection's
    handshake had no time limit.)"""
    api = await start_service()
    vid = (await api.create()).json["id"]
    await read_code(sms_gateway)
    pid = redis_server.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        for burst in range(3):
            started = time.monotonic()
            answers = await asyncio.gather(
                *(api.request("GET", f"/v1/verifications/{vid}") for _ in range(10)),
                api.request("GET", "/readyz"),
            )
            for answer in answers[:-1]:
                answer.problem(503, "store-unavailable")
            answers[-1].problem(503, "not-ready")
            took = time.monotonic() - started
            assert took < ANSWER_BUDGET_S, f"burst {burst} took {took:.1f} s"
    finally:
        os.kill(pid, signal.SIGCONT)
    assert (await _get_after_restart(api, vid))["id"] == vid


async def test_a_process_with_another_secret_refuses_to_start(
    start_service: StartService, redis_server: RedisServer
) -> None:
    # The black-box probe: two serve processes with data dirs of their own each generated a
    # secret; a right code checked through the other one counted as a wrong guess.
    first = await start_service()
    other = "another-secret-0123456789abcdefghijkl"
    with pytest.raises(SecretMismatch, match="another CLINIC_SECRET") as err:
        await start_service({"CLINIC_SECRET": other})
    assert other not in str(err.value) and SECRET not in str(err.value)
    second = await start_service()  # the same secret as the first: one service
    vid = (await first.create()).json["id"]
    assert (await second.get(vid))["id"] == vid


async def test_a_secret_claimed_once_redis_answers(redis_server: RedisServer) -> None:
    redis = aioredis.Redis.from_url(redis_server.url)
    try:
        made = await shared_secret.claim(redis.execute_command, b"the first secret")
        assert made is Claim.SET
        again = await shared_secret.claim(redis.execute_command, b"the first secret")
        assert again is Claim.HELD  # fine
        await asyncio.to_thread(redis_server.kill9)
        told: list[str] = []
        waiting = asyncio.create_task(
            shared_secret.hold(
                redis.execute_command, b"the second secret", told.append, claimed=False
            )
        )
        await asyncio.sleep(shared_secret.RETRY_S + 0.5)
        assert not waiting.done() and told == [], "it must wait for Redis, not give up"
        await asyncio.to_thread(redis_server.restart)
        await asyncio.wait_for(waiting, 10)
        assert len(told) == 1 and "another CLINIC_SECRET" in told[0]
    finally:
        await redis.aclose()


async def test_a_flush_during_a_claim_is_not_taken_for_another_secret(
    redis_server: RedisServer,
) -> None:
    # Redis losing its data in the middle of a claim (here: before each of its commands)
    # must not read as another process's fingerprint, which would stop a healthy serve.
    redis = aioredis.Redis.from_url(redis_server.url)
    execute: Callable[..., Awaitable[Any]] = redis.execute_command

    async def flushing(*command: Any) -> Any:
        await redis.delete(shared_secret.KEY)
        return await execute(*command)

    try:
        assert await shared_secret.claim(flushing, b"the secret") is Claim.SET
        assert (
            await redis.get(shared_secret.KEY) == shared_secret.fingerprint(b"the secret").encode()
        )
    finally:
        await redis.aclose()


async def test_a_running_serve_holds_its_secret_claim(
    start_service: StartService,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The fingerprint was checked only at start: a Redis that lost its data lost it too, and
    a process with another secret could then claim the Redis under a running service."""
    monkeypatch.setattr(shared_secret, "HOLD_S", 0.1)
    stops: list[None] = []
    monkeypatch.setattr(app_module, "_sigterm_once_handled", lambda: stops.append(None))
    api = await start_service()
    rt = api.app[RUNTIME]
    redis = aioredis.Redis.from_url(redis_server.url)
    try:
        mine = await redis.get(shared_secret.KEY)
        assert mine is not None
        await redis.flushall()  # Redis loses its data under the running service
        loop = asyncio.get_running_loop()
        end = loop.time() + 3.0

        def gone() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "fingerprint was gone" in r.getMessage()]

        # The claim is written before its WARNING is logged: wait for both, not the key alone.
        while await redis.get(shared_secret.KEY) != mine or not gone():
            assert loop.time() < end, "the running serve did not claim its secret again"
            await asyncio.sleep(0.05)
        assert gone()[0].levelname == "WARNING"
        assert stops == [] and not rt.misconfigured
        # Another process's claim under the running one: it stops rather than take right
        # codes for wrong ones (a configuration fault: serve exits 2, clinic_voice/cli.py).
        await redis.set(shared_secret.KEY, shared_secret.fingerprint(b"another secret"))
        while not stops:
            assert loop.time() < end + 3.0, "the running serve did not see another's claim"
            await asyncio.sleep(0.05)
        assert "another CLINIC_SECRET" in rt.misconfigured
        assert rt.failed == ""
        ready = await api.request("GET", "/readyz", key=None)
        ready.problem(503, "not-ready")
        assert ready.json["detail"].startswith("misconfigured: this Redis holds data made with")
    finally:
        await redis.aclose()
    assert (await api.request("GET", "/healthz", key=None)).status == 200
    assert len(stops) == 1


async def _create_while_frozen(
    api: Api, redis_server: RedisServer, headers: dict[str, str] | None = None
) -> None:
    """A create whose write reaches a frozen Redis: 503 when the client's 2 s run out; the
    write lands when Redis resumes. (A create made before loaded the create's script: a
    script Redis does not know yet fails with NOSCRIPT, the reply to a connection gone.)"""
    pid = redis_server.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        answer = await api.request(
            "POST", "/v1/verifications", json_body={"phone": MOBILE}, headers=headers
        )
        answer.problem(503, "store-unavailable")
    finally:
        os.kill(pid, signal.SIGCONT)


async def _record_of(redis_server: RedisServer, phone: str) -> dict[str, Any] | None:
    redis = aioredis.Redis.from_url(redis_server.url)
    try:
        for key in [k async for k in redis.scan_iter("cv:v:*")]:
            doc = await redis.hget(key, "doc")
            record = dict(json.loads(doc)) if doc is not None else {}
            if record.get("phone", {}).get("e164") == phone:
                return record
        return None
    finally:
        await redis.aclose()


async def _settled(redis_server: RedisServer, until: Callable[[dict[str, Any]], bool]) -> Any:
    loop = asyncio.get_running_loop()
    end = loop.time() + 10.0
    while (record := await _record_of(redis_server, MOBILE)) is None or not until(record):
        assert loop.time() < end, record
        await asyncio.sleep(0.1)
    return record


async def test_a_create_answered_503_that_landed_is_canceled_and_never_sends(
    start_service: StartService, sms_gateway: SmsGateway, redis_server: RedisServer
) -> None:
    # Both reviews: the 503 said "not made", the write landed later, and the step timer then
    # sent on the next channel for a verification its app never heard of.
    clock = FakeClock()
    api = await start_service({"CLINIC_STEP_TIMEOUT_SMS_S": "10"}, clock=clock)
    assert (await api.create(phone=OTHER_MOBILE, method="sms", fallback=[])).status == 201
    await sms_gateway.wait_for(1)
    await _create_while_frozen(api, redis_server)
    record = await _settled(redis_server, lambda r: r["status"] != "pending")
    assert record["status"] == "canceled"
    assert "answered 503" in record["events"][-1]["detail"]
    clock.advance(11)  # past the step timeout: a timer would send now
    await asyncio.sleep(1.0)
    assert [m.to for m in sms_gateway.received] == [OTHER_MOBILE], "a create answered 503 sent"


async def test_a_stop_waits_for_a_create_answered_503_to_be_settled(
    start_service: StartService, sms_gateway: SmsGateway, redis_server: RedisServer
) -> None:
    # The crash review stopped serve (SIGTERM) while Redis was busy: the create answered 503
    # was "left to its step timer", which sent its code after the next start.
    api = await start_service({"CLINIC_STEP_TIMEOUT_SMS_S": "10"}, clock=FakeClock())
    assert (await api.create(phone=OTHER_MOBILE, method="sms", fallback=[])).status == 201
    await sms_gateway.wait_for(1)
    dispatcher = api.app[RUNTIME].dispatcher
    assert dispatcher is not None
    pid = redis_server.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        made = await api.request("POST", "/v1/verifications", json_body={"phone": MOBILE})
        made.problem(503, "store-unavailable")
        stopping = asyncio.create_task(dispatcher.stop())
        await asyncio.sleep(0.5)
        assert not stopping.done(), "the stop waits for the store to settle the create"
    finally:
        os.kill(pid, signal.SIGCONT)
    async with asyncio.timeout(dispatcher_module.STOP_SETTLE_S + 1):
        await stopping
    record = await _record_of(redis_server, MOBILE)
    assert record is not None and record["status"] == "canceled", record
    assert "answered 503" in record["events"][-1]["detail"]


async def test_a_create_answered_503_with_an_idempotency_key_is_sent_for_its_retry(
    start_service: StartService,
    sms_gateway: SmsGateway,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The reservation of the key answered, the write landed, its answer was lost: the write
    # is made for real and its answer replaced by the timeout a frozen Redis gives. (With a
    # frozen Redis the reservation itself times out first: then nothing is made at all.)
    real_write = VerificationStore._create_written
    lost: list[str] = []

    async def answer_lost(
        self: VerificationStore, v: Verification, idempotency: tuple[str, str, int] | None
    ) -> Stored:
        stored = await real_write(self, v, idempotency)
        if not lost:
            lost.append(v.id)
            raise StoreUnavailable("Redis did not answer within 2.0 s")
        return stored

    monkeypatch.setattr(VerificationStore, "_create_written", answer_lost)
    api = await start_service()
    key = {"Idempotency-Key": "retry-me-after-a-503"}
    first = await api.request("POST", "/v1/verifications", json_body={"phone": MOBILE}, headers=key)
    first.problem(503, "store-unavailable")
    code = await read_code(sms_gateway)  # sent once the store answered again
    retry = await api.request("POST", "/v1/verifications", json_body={"phone": MOBILE}, headers=key)
    assert retry.status == 201 and retry.headers["Idempotent-Replayed"] == "true", retry.text
    vid = retry.json["id"]
    assert [vid] == lost
    v = await api.get(vid)
    dispatched = [e for e in v["events"] if e["type"] == "dispatched"]
    assert len(dispatched) == 1, "the code the write holds is the one sent: one send, not two"
    assert (await api.check(vid, code)).json["status"] == "approved"
    await asyncio.sleep(0.5)  # a second send would arrive within this
    assert len(sms_gateway.received) == 1


async def test_a_create_whose_limits_went_unanswered_frees_its_idempotency_key(
    start_service: StartService, sms_gateway: SmsGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The key was reserved, then the limits' count went unanswered (a Redis blip): nothing was
    # made, so the retry must go ahead at once, not meet 409 "in progress" for a minute.
    real_hit = VerificationStore.hit_limits
    failed: list[int] = []

    async def unanswered_once(
        self: VerificationStore, checks: list[LimitCheck], now: float
    ) -> LimitDecision:
        if not failed and any(c.name is LimitName.NUMBER_VERIFICATIONS for c in checks):
            failed.append(1)
            raise StoreUnavailable("Redis did not answer within 2.0 s")
        return await real_hit(self, checks, now)

    monkeypatch.setattr(VerificationStore, "hit_limits", unanswered_once)
    api = await start_service()
    key = {"Idempotency-Key": "retry-me-after-a-blip"}
    first = await api.request("POST", "/v1/verifications", json_body={"phone": MOBILE}, headers=key)
    first.problem(503, "store-unavailable")
    retry = await api.request("POST", "/v1/verifications", json_body={"phone": MOBILE}, headers=key)
    assert retry.status == 201, retry.text
    assert "Idempotent-Replayed" not in retry.headers, "nothing was made by the first try"
    await read_code(sms_gateway)
    await asyncio.sleep(0.3)
    assert len(sms_gateway.received) == 1


def _dispatcher_without_redis(tmp_path: Path) -> tuple[RedisMux, Dispatcher]:
    """A dispatcher whose store's Redis is not there (every command fails at once)."""
    mux = RedisMux(f"unix://{tmp_path}/nobody.sock", timeout_s=0.2)
    settings = Settings.from_env({"CLINIC_DATA_DIR": str(tmp_path)})
    dispatcher = Dispatcher(
        store=VerificationStore(mux),
        channels={},
        settings=settings.verification,
        policy=Policy(),
        secret=b"s" * 32,
        clinic_name="the clinic",
        clock=SystemClock(),
    )
    return mux, dispatcher


async def test_creates_to_settle_wait_in_one_bounded_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An outage refuses creates by the thousand: one task settles them once the store is
    back, and at most SETTLE_MAX wait (the oldest past it is left to its step timer)."""
    monkeypatch.setattr(dispatcher_module, "SETTLE_MAX", 3)
    mux, dispatcher = _dispatcher_without_redis(tmp_path)
    phone = parse_phone(MOBILE)
    try:
        for n in range(5):
            made = rules.create(
                verification_id=f"{n:032d}",
                phone=phone,
                plan=(Channel.SMS,),
                code_length=6,
                now=time.time(),
                policy=Policy(),
            )
            dispatcher.settle_unconfirmed(made, replayable=False)
        waiting = [t for t in asyncio.all_tasks() if t.get_name() == "settle creates"]
        assert len(waiting) == 1
        left = [r.getMessage() for r in caplog.records if "left unsettled" in r.getMessage()]
        assert left == [
            f"verification {n:032d}: too many creates to settle; left unsettled" for n in (0, 1)
        ]
    finally:
        await dispatcher.stop()
        await mux.aclose()
    # Shutdown names the ones it leaves unsettled.
    [stopping] = [r.getMessage() for r in caplog.records if "stopping with" in r.getMessage()]
    assert stopping == (
        "stopping with 3 create(s) answered 503 not yet settled, left to their step timers: "
        + ", ".join(f"{n:032d}" for n in (2, 3, 4))
    )


@pytest.mark.parametrize("stop_first", [False, True])
async def test_a_kept_report_cancelled_before_its_retry_starts_frees_its_timer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, stop_first: bool
) -> None:
    """Kept reports hold their verification's step timer until their retry task ends: also
    when it is cancelled before its first step (a check here made it final in the same turn
    of the loop), or the timer would be skipped for good. ``stop_first``: shutdown names the
    reports it loses."""
    mux, dispatcher = _dispatcher_without_redis(tmp_path)
    made = rules.create(
        verification_id="e" * 32,
        phone=parse_phone(MOBILE),
        plan=(Channel.SMS,),
        code_length=6,
        now=time.time(),
        policy=Policy(),
    ).verification
    send = _Send(made.id, 0, Channel.SMS, Stored(made, "1"), None)
    try:
        await dispatcher._report(send, DeliveryReport(DeliveryKind.DELIVERED, "accepted"))
        assert dispatcher._keeping[made.id] == 1, "the report is kept: Redis is down"
        if stop_first:
            await dispatcher.stop()
            [line] = [r.getMessage() for r in caplog.records if "channel reports" in r.getMessage()]
            assert line.startswith("stopping with channel reports of 1 verification(s) kept")
            assert line.endswith(f": {made.id}"), line
        dispatcher.stop_sends(made.id)  # same turn: the retry task has not started
        await asyncio.sleep(0.05)
        assert dispatcher._keeping == {}
    finally:
        await dispatcher.stop()
        await mux.aclose()


async def test_a_late_secret_mismatch_waits_for_serves_sigterm_handler() -> None:
    """A mismatch found by the retrying claim while start-up still runs: a SIGTERM before
    serve's handler exists would kill the process outright, children and cleanup with it."""
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    _sigterm_once_handled()  # no handler yet: nothing is sent, it looks again shortly
    await asyncio.sleep(0.5)
    loop.add_signal_handler(signal.SIGTERM, stop.set)  # serve's, once it is listening
    try:
        await asyncio.wait_for(stop.wait(), 2.0)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def test_a_defect_in_the_redis_links_reader_does_not_stop_the_service(
    start_service: StartService,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The Redis connection's tasks are not watched as the service's own (sip_config/tasks.py):
    a defect in one closes that connection with its traceback logged (ERROR), and the next
    command opens a new one (verification/redis_mux.py), which is all a restart of the
    service would bring. So it is said, and /readyz passes again at once."""
    stops: list[None] = []
    monkeypatch.setattr(app_module, "_sigterm_once_handled", lambda: stops.append(None))
    caplog.set_level(logging.DEBUG, logger="verification.redis_mux")
    api = await start_service()
    rt = api.app[RUNTIME]
    assert (await api.request("GET", "/readyz", key=None)).status == 200
    mux = rt.need_store()._r
    link = mux._link
    assert link is not None

    async def broken(**_: object) -> object:
        raise TypeError("a parser defect")

    monkeypatch.setattr(link.conn, "read_response", broken)  # the reader's next read
    first = await api.request("GET", "/readyz", key=None)  # its answer is the one lost
    assert first.status in {200, 503}, first.text
    await asyncio.wait_for(asyncio.gather(*link.tasks, return_exceptions=True), 2)
    defects = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert [r.getMessage() for r in defects] == ["Redis connection: reading answers failed"]
    assert (await api.request("GET", "/readyz", key=None)).status == 200
    assert mux._link is not link
    assert rt.failed == "" and rt.misconfigured == "" and stops == []
