"""``serve`` asks a Redis given with CLINIC_REDIS_URL whether it keeps what it acknowledges,
and says so in its log (real redis-server, reconfigured at run time like an operator would).
"""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis

from tests.conftest import RedisServer, wait_until
from tests.integration.conftest import StartService

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]

LOGGER = "clinic_voice.redis_durability"


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


async def _finding(caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    def found() -> bool:
        return any(r.name == LOGGER for r in caplog.records)

    await asyncio.to_thread(wait_until, found, 5.0, "the durability finding in the log")
    return next(r for r in caplog.records if r.name == LOGGER)


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
