"""The rule for a given Redis's persistence settings, and how ``report`` asks and logs."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError

from clinic_voice import redis_durability
from clinic_voice.redis_durability import assess


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


def _answers(**config: str) -> Any:
    async def execute(*command: str) -> Any:
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


async def test_report_reads_resp3_maps(caplog: pytest.LogCaptureFixture) -> None:
    async def execute(*command: str) -> Any:
        return {command[2]: {"appendonly": "yes", "appendfsync": "always"}[command[2]]}

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
