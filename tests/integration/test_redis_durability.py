"""``serve`` asks a Redis given with CLINIC_REDIS_URL whether it keeps what it acknowledges,
and says so in its log (real redis-server, reconfigured at run time like an operator would).
A Redis that refuses writes (full under noeviction) fails closed: 503, not ready, and ready
again once it takes writes.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis

from tests.conftest import RedisServer, wait_until
from tests.integration.conftest import StartService, read_code
from tests.peers.sms_gateway import SmsGateway

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]

LOGGER = "clinic_voice.redis_durability"
STORE_LOGGER = "verification.store"


def _config_set(server: RedisServer, setting: str, value: str) -> None:
    client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2)
    try:
        client.config_set(setting, value)
    finally:
        client.close()


def _forbid_config(server: RedisServer) -> None:
    client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2)
    try:
        client.acl_setuser("default", enabled=True, commands=["-config"])
    finally:
        client.close()


async def _finding(
    caplog: pytest.LogCaptureFixture, said: str = "", logger: str = LOGGER
) -> logging.LogRecord:
    def found() -> bool:
        return any(r.name == logger and said in r.getMessage() for r in caplog.records)

    await asyncio.to_thread(
        wait_until, found, 5.0, f"{said or 'the durability finding'} in the log"
    )
    return next(r for r in caplog.records if r.name == logger and said in r.getMessage())


async def test_a_redis_that_fsyncs_every_write_is_noted_as_such(
    start_service: StartService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    await start_service()
    record = await _finding(caplog)
    assert record.levelno == logging.INFO
    assert "fsyncs its append-only file on every write" in record.getMessage()


RISKY = [
    ("appendfsync", "everysec", "appendfsync is everysec"),
    ("appendfsync", "no", "appendfsync is no"),
    ("appendonly", "no", "appendonly is off"),
]


@pytest.mark.parametrize("case", RISKY, ids=[f"{s} {v}" for s, v, _ in RISKY])
async def test_a_redis_that_could_lose_acknowledged_writes_is_warned_about(
    start_service: StartService,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    case: tuple[str, str, str],
) -> None:
    setting, value, said = case
    await asyncio.to_thread(_config_set, redis_server, setting, value)
    caplog.set_level(logging.INFO, logger=LOGGER)
    api = await start_service()
    record = await _finding(caplog)
    assert record.levelno == logging.WARNING
    assert said in record.getMessage()
    assert "appendfsync always" in record.getMessage()  # what to do about it
    # A warning, not a refusal: the service serves.
    assert (await api.create()).status == 201


async def test_a_redis_that_refuses_config_gets_an_info_line_and_the_service_serves(
    start_service: StartService, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # As on a managed Redis: the service's user may not run CONFIG.
    await asyncio.to_thread(_forbid_config, redis_server)
    caplog.set_level(logging.INFO, logger=LOGGER)
    api = await start_service()
    record = await _finding(caplog)
    assert record.levelno == logging.INFO
    assert "could not read the persistence settings" in record.getMessage()
    assert (await api.create()).status == 201


async def test_a_redis_that_may_delete_keys_at_its_memory_limit_is_warned_about(
    start_service: StartService, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    await asyncio.to_thread(_config_set, redis_server, "maxmemory", "512mb")
    await asyncio.to_thread(_config_set, redis_server, "maxmemory-policy", "volatile-lru")
    caplog.set_level(logging.INFO, logger=LOGGER)
    api = await start_service()
    record = await _finding(caplog, "may delete the service's data")
    assert record.levelno == logging.WARNING
    assert "maxmemory-policy is volatile-lru with maxmemory 536870912" in record.getMessage()
    assert "maxmemory-policy noeviction" in record.getMessage()  # what to do about it
    assert (await api.create()).status == 201


async def test_a_redis_with_a_memory_limit_that_never_deletes_is_not_warned_about(
    start_service: StartService, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    await asyncio.to_thread(_config_set, redis_server, "maxmemory", "512mb")
    await asyncio.to_thread(_config_set, redis_server, "maxmemory-policy", "noeviction")
    caplog.set_level(logging.INFO, logger=LOGGER)
    await start_service()
    await _finding(caplog, "fsyncs its append-only file")  # the report has run
    assert not [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


async def test_a_full_redis_fails_closed_and_is_not_ready_until_it_takes_writes_again(
    start_service: StartService,
    redis_server: RedisServer,
    sms_gateway: SmsGateway,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=STORE_LOGGER)
    api = await start_service()
    pending = await api.create(method="sms")
    assert pending.status == 201
    vid = pending.json["id"]
    code = await read_code(sms_gateway)

    await asyncio.to_thread(redis_server.fill)
    # Redis still answers (PING, reads) but takes no write: not ready, and why is in the log.
    ready = await api.request("GET", "/readyz", key=None)
    ready.problem(503, "not-ready")
    assert ready.json["checks"]["redis"] is False
    refused = await _finding(caplog, "Redis does not take writes", STORE_LOGGER)
    assert "maxmemory" in refused.getMessage()
    # Fail closed: no create, no check (even a right one would need a write), nothing sent.
    # Reads too: every /v1 request counts against its API key's limit, a write.
    (await api.create(method="sms")).problem(503, "store-unavailable")
    checked = await api.request("POST", f"/v1/verifications/{vid}/check", json_body={"code": code})
    checked.problem(503, "store-unavailable")
    (await api.request("GET", f"/v1/verifications/{vid}")).problem(503, "store-unavailable")
    await asyncio.sleep(0.5)  # a send would have left by now
    assert len(sms_gateway.received) == 1

    await asyncio.to_thread(redis_server.unfill)
    assert (await api.request("GET", "/readyz", key=None)).status == 200
    await _finding(caplog, "Redis takes writes again", STORE_LOGGER)
    assert (await api.get(vid))["status"] == "pending"
    checked = await api.request("POST", f"/v1/verifications/{vid}/check", json_body={"code": code})
    assert checked.status == 200 and checked.json["status"] == "approved"
