"""The rules for a given Redis's persistence and memory-limit settings, and how ``report``
asks and logs."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError

from clinic_voice import redis_durability
from clinic_voice.redis_durability import assess, assess_eviction, assess_version


@pytest.mark.parametrize(
    ("appendonly", "appendfsync", "risk"),
    [
        ("yes", "always", None),
        ("yes", "everysec", "appendfsync is everysec"),
        ("yes", "no", "appendfsync is no"),
        ("no", "always", "appendonly is off"),
        ("no", "everysec", "appendonly is off"),
        ("", "", "appendonly is off"),  # nothing readable: assume the worst
    ],
)
def test_assess(appendonly: str, appendfsync: str, risk: str | None) -> None:
    said = assess(appendonly, appendfsync)
    if risk is None:
        assert said is None
    else:
        assert said is not None and said.startswith(risk)


@pytest.mark.parametrize(
    ("maxmemory", "policy", "risk"),
    [
        ("0", "noeviction", None),
        ("0", "allkeys-lru", None),  # no limit: Redis never evicts
        ("1073741824", "noeviction", None),  # full: writes refused, the API answers 503
        ("1073741824", "allkeys-lru", "maxmemory-policy is allkeys-lru with maxmemory 1073741824"),
        ("1073741824", "volatile-ttl", "maxmemory-policy is volatile-ttl"),
        ("1073741824", "allkeys-random", "maxmemory-policy is allkeys-random"),
        ("1073741824", "", "maxmemory-policy is unknown"),
    ],
)
def test_assess_eviction(maxmemory: str, policy: str, risk: str | None) -> None:
    said = assess_eviction(maxmemory, policy)
    if risk is None:
        assert said is None
    else:
        assert said is not None and said.startswith(risk)
        assert "let sends through" in said


INFO_7 = b"# Server\r\nredis_version:7.0.15\r\nredis_git_sha1:00000000\r\n"


@pytest.mark.parametrize(
    ("info", "unfit"),
    [
        ("# Server\r\nredis_version:7.0.15\r\n", None),
        ("# Server\r\nredis_version:7.2.4\r\nvalkey_version:8.0.1\r\n", None),
        ("# Server\r\nredis_version:10.1.0\r\n", None),
        ("", None),  # INFO refused: the scripts' own errors will tell
        (
            "# Server\r\nredis_version:6.2.14\r\n",
            "it is Redis 6.2, and the service needs Redis 7.0",
        ),
        ("redis_version:5.0.7\n", "it is Redis 5.0"),
    ],
)
def test_assess_version(info: str, unfit: str | None) -> None:
    said = assess_version(info)
    if unfit is None:
        assert said is None
    else:
        assert said is not None and said.startswith(unfit)


SAFE_MEMORY = {"maxmemory": "0", "maxmemory-policy": "noeviction"}


def _answers(**config: str) -> Any:
    config = {**SAFE_MEMORY, **{k.replace("_", "-"): v for k, v in config.items()}}

    async def execute(*command: str) -> Any:
        if command == ("INFO", "server"):
            return INFO_7
        assert command[:2] == ("CONFIG", "GET")
        name = command[2]
        return [name, config[name]]

    return execute


async def test_report_logs_one_warning_for_a_risky_redis(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=redis_durability.__name__)
    await redis_durability.report(_answers(appendonly="yes", appendfsync="everysec"))
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "appendfsync is everysec" in record.getMessage()


async def test_report_warns_of_a_redis_that_may_evict(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=redis_durability.__name__)
    await redis_durability.report(
        _answers(
            appendonly="yes",
            appendfsync="always",
            maxmemory="100mb",
            maxmemory_policy="volatile-lru",
        )
    )
    fsync, eviction = caplog.records
    assert fsync.levelno == logging.INFO
    assert eviction.levelno == logging.WARNING
    assert "maxmemory-policy is volatile-lru" in eviction.getMessage()
    assert "maxmemory-policy noeviction" in eviction.getMessage()  # what to do about it


async def test_report_reads_resp3_maps(caplog: pytest.LogCaptureFixture) -> None:
    async def execute(*command: str) -> Any:
        if command == ("INFO", "server"):
            return INFO_7.decode()
        config = {"appendonly": "yes", "appendfsync": "always", **SAFE_MEMORY}
        return {command[2]: config[command[2]]}

    caplog.set_level(logging.INFO, logger=redis_durability.__name__)
    await redis_durability.report(execute)
    [record] = caplog.records
    assert record.levelno == logging.INFO


async def test_report_waits_for_redis_to_come_up(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_durability, "RETRY_S", 0.0)
    answered = _answers(appendonly="no", appendfsync="always")
    calls = 0

    async def execute(*command: str) -> Any:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise RedisConnectionError("connection refused")
        return await answered(*command)

    caplog.set_level(logging.INFO, logger=redis_durability.__name__)
    await redis_durability.report(execute)
    [record] = caplog.records
    assert record.levelno == logging.WARNING and "appendonly is off" in record.getMessage()


async def test_report_gives_up_quietly_when_config_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def execute(*command: str) -> Any:
        raise NoPermissionError("NOPERM this user has no permissions to run the 'config' command")

    caplog.set_level(logging.INFO, logger=redis_durability.__name__)
    await redis_durability.report(execute)
    [record] = caplog.records
    assert record.levelno == logging.INFO
    assert "NOPERM" in record.getMessage()


async def test_report_says_an_old_redis_cannot_run_the_service(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def execute(*command: str) -> Any:
        if command == ("INFO", "server"):
            return b"# Server\r\nredis_version:6.2.14\r\n"
        raise NoPermissionError("NOPERM this user has no permissions to run the 'config' command")

    caplog.set_level(logging.INFO, logger=redis_durability.__name__)
    await redis_durability.report(execute)
    unfit, refused = caplog.records
    assert unfit.levelno == logging.ERROR
    assert "needs Redis 7.0 or later" in unfit.getMessage()
    assert refused.levelno == logging.INFO and "NOPERM" in refused.getMessage()
