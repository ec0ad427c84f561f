"""What an operator watches beside the calls: ``clinic_redis_restarts_total`` (the embedded
redis-server restarted by ``serve``) and ``clinic_data_dir_free_bytes`` (a full data dir stops
calls being saved), in ``/metrics`` of a real service (README, "Metrics" and "A full or
read-only disk").

The app on a Redis of the operator's (``CLINIC_REDIS_URL``): free bytes, no restart sample.
A real ``serve`` with its embedded Redis and an HTTP worker: its redis-server killed -9 is
restarted, and every scrape, whichever process answers it, counts the restart once.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from redis.exceptions import RedisError

from clinic_voice.app import RUNTIME
from tests.integration.conftest import OpenApiCollector, StartService, service_env
from tests.integration.test_api_processes import (
    Service,
    _data_dir,
    _embedded,
    _fresh_connection_request,
    _redis_pid,
    _until,
    serve,
)
from tests.peers.sms_gateway import SmsGateway
from tests.unit.test_metrics import parse

pytestmark = pytest.mark.integration

# The gauge is read every 5 s, and other processes write to the same disk meanwhile.
SLACK = 256 * 1024 * 1024


def _avail(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _samples(text: str, name: str) -> list[float]:
    return [value for sample, _, value in parse(text) if sample == name]


def _free_bytes_near(text: str, data: Path) -> None:
    free = _samples(text, "clinic_data_dir_free_bytes")
    assert len(free) == 1, text
    assert abs(free[0] - _avail(data)) <= SLACK, (free[0], _avail(data))


async def test_the_app_on_an_outside_redis_shows_free_bytes_and_no_redis_restarts(
    start_service: StartService, tmp_path: Path
) -> None:
    api = await start_service()
    data = api.app[RUNTIME].settings.data_dir
    assert data.is_relative_to(tmp_path) and api.app[RUNTIME].settings.redis_url
    # The first reading runs in a thread begun at the start: a scrape may come before it.
    end = asyncio.get_running_loop().time() + 10.0
    while True:
        answer = await api.request("GET", "/metrics", key=None)
        assert answer.status == 200, answer.text
        text = answer.text
        if _samples(text, "clinic_data_dir_free_bytes") or asyncio.get_running_loop().time() > end:
            break
        await asyncio.sleep(0.05)
    # That Redis is the operator's: this service never restarts it, so no sample (not 0).
    assert "# TYPE clinic_redis_restarts_total counter\n" in text
    assert _samples(text, "clinic_redis_restarts_total") == []
    assert "# TYPE clinic_data_dir_free_bytes gauge\n" in text
    _free_bytes_near(text, data)


@pytest.mark.timeout(300)  # a cold prompt cache takes most of this; warm runs take seconds
async def test_serve_counts_its_embedded_redis_restarts_in_every_process_s_scrape(
    sms_gateway: SmsGateway, tmp_path: Path, openapi_responses: OpenApiCollector
) -> None:
    data = _data_dir(tmp_path, "data")
    env = _embedded(service_env("", data, sms_gateway)) | {"CLINIC_HTTP_WORKERS": "2"}
    async with serve("S", env, tmp_path, openapi_responses) as s:

        async def scrape(svc: Service) -> str:
            status, text = await _fresh_connection_request(svc, "GET", "/metrics")
            assert status == 200, text
            assert isinstance(text, str)
            return text

        for _ in range(6):  # fresh connections: serve and its worker answer alike
            text = await scrape(s)
            assert _samples(text, "clinic_redis_restarts_total") == [0], text
            _free_bytes_near(text, data)

        first = await _redis_pid(data)
        os.kill(first, signal.SIGKILL)

        async def counted_and_back() -> bool:
            # Counted as the restart is tried, before the new redis-server answers.
            if _samples(await scrape(s), "clinic_redis_restarts_total") != [1]:
                return False
            try:
                return await _redis_pid(data) != first
            except (RedisError, OSError):
                return False

        await _until("the killed redis-server's restart in /metrics", counted_and_back, 30.0)
        for _ in range(6):  # summed once: a worker's own registry never counts it
            text = await scrape(s)
            assert _samples(text, "clinic_redis_restarts_total") == [1], text
            _free_bytes_near(text, data)
        status, ready = await _fresh_connection_request(s, "GET", "/readyz")
        assert status == 200, ready
    log = (tmp_path / "S.log").read_text(errors="replace")
    assert "embedded redis-server restarted" in log, log[-3000:]
