"""Two real ``clinic-voice serve`` processes sharing one Redis behave as one service: a
verification made through one is checked through the other, and limits count across both.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import RedisServer, free_port
from tests.integration.conftest import (
    API_KEY,
    MOBILE,
    OpenApiCollector,
    read_code,
    service_env,
    wrong_code,
)
from tests.peers.sms_gateway import SmsGateway

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# ``serve`` renders every IVR prompt with espeak-ng at start (about 40 s cold on 2 cores, then
# cached in the data dir): the data dir is kept between runs so later starts take seconds.
DATA_CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "clinic-voice-tests"
    / "serve-data"
)
START_DEADLINE_S = 150.0
STOP_DEADLINE_S = 10.0


class Service:
    """One ``clinic-voice serve`` subprocess and an HTTP session to it."""

    def __init__(self, name: str, port: int, log_path: Path, collector: OpenApiCollector) -> None:
        self.name = name
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.collector = collector
        self.proc: asyncio.subprocess.Process | None = None
        self.session: aiohttp.ClientSession | None = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    async def request(
        self, method: str, path: str, body: Any = None
    ) -> tuple[int, Any, Mapping[str, str]]:
        assert self.session is not None
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with self.session.request(
            method, self.base + path, json=body, headers=headers
        ) as resp:
            raw = await resp.read()
            errors = self.collector.check(method, path, resp.status, resp.content_type, raw)
            assert not errors, "\n".join(errors)
            data = await resp.json(content_type=None) if raw else None
            return resp.status, data, resp.headers


@asynccontextmanager
async def serve(
    name: str, env: Mapping[str, str], tmp: Path, collector: OpenApiCollector
) -> AsyncIterator[Service]:
    """Start ``clinic-voice serve`` with ``env`` and wait until /healthz answers."""
    port = free_port()
    sip_port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith("CLINIC_")}
    full.update(env)
    full["CLINIC_HTTP_ADDR"] = f"127.0.0.1:{port}"
    full["CLINIC_SIP_ADDR"] = f"127.0.0.1:{sip_port}"
    full["CLINIC_SIP_WORKERS"] = "1"
    full["CLINIC_LOG_LEVEL"] = "INFO"
    log_path = tmp / f"{name}.log"
    service = Service(name, port, log_path, collector)
    with log_path.open("wb") as out:
        service.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "clinic_voice.cli",
            "serve",
            cwd=ROOT,
            env=full,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    service.session = aiohttp.ClientSession()
    try:
        await _wait_healthy(service)
        async with service.session.get(service.base + "/openapi.json") as resp:
            assert resp.status == 200, await resp.text()
            collector.load(await resp.json())
        yield service
    finally:
        await service.session.close()
        await _stop(service)


async def _wait_healthy(service: Service) -> None:
    assert service.proc is not None and service.session is not None
    loop = asyncio.get_running_loop()
    end = loop.time() + START_DEADLINE_S
    last = "no answer yet"
    while True:
        if service.proc.returncode is not None:
            pytest.fail(
                f"{service.name} exited with {service.proc.returncode}:\n{service.log_tail()}"
            )
        try:
            async with service.session.get(service.base + "/readyz") as resp:
                if resp.status == 200:
                    return
                last = f"/readyz answered {resp.status}"
        except aiohttp.ClientError as exc:
            last = f"not listening yet ({type(exc).__name__})"  # poll again
        if loop.time() > end:
            pytest.fail(
                f"{service.name} not ready in {START_DEADLINE_S} s ({last}):\n" + service.log_tail()
            )
        await asyncio.sleep(0.1)


async def _stop(service: Service) -> None:
    proc = service.proc
    if proc is None or proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(STOP_DEADLINE_S):
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"{service.name} ignored SIGTERM for {STOP_DEADLINE_S} s")


@pytest.mark.timeout(300)  # a cold prompt cache takes most of this; warm runs take seconds
async def test_two_processes_sharing_redis_behave_as_one(
    redis_server: RedisServer,
    sms_gateway: SmsGateway,
    tmp_path: Path,
    openapi_responses: OpenApiCollector,
) -> None:
    DATA_CACHE.mkdir(parents=True, exist_ok=True)
    env = service_env(
        redis_server.url,
        DATA_CACHE,
        sms_gateway,
        # A day-long window: the count cannot roll over during the test.
        {"CLINIC_LIMIT_NUMBER_VERIFICATIONS": "3/86400"},
    )
    async with AsyncExitStack() as stack:
        # One after the other: B finds the prompts A rendered (nothing to render twice).
        a = await stack.enter_async_context(serve("A", env, tmp_path, openapi_responses))
        b = await stack.enter_async_context(serve("B", env, tmp_path, openapi_responses))
        status, created, headers = await a.request("POST", "/v1/verifications", {"phone": MOBILE})
        assert status == 201, created
        vid = created["id"]
        assert headers["Location"] == f"/v1/verifications/{vid}"
        code = await read_code(sms_gateway)
        status, seen, _ = await b.request("GET", f"/v1/verifications/{vid}")
        assert status == 200 and seen["id"] == vid
        status, answer, _ = await b.request(
            "POST", f"/v1/verifications/{vid}/check", {"code": wrong_code(code)}
        )
        assert answer == {"id": vid, "status": "pending", "attempts_left": 4}
        status, answer, _ = await b.request(
            "POST", f"/v1/verifications/{vid}/check", {"code": code}
        )
        assert answer["status"] == "approved", answer
        status, answer, _ = await a.request(
            "POST", f"/v1/verifications/{vid}/check", {"code": code}
        )
        assert status == 409, "approved through B is approved for A"
        status, seen, _ = await a.request("GET", f"/v1/verifications/{vid}")
        assert seen["status"] == "approved"

        # The per-number limit (3) counts across both: 2 via A, 1 via B, the 4th is refused.
        status, _, _ = await a.request("POST", "/v1/verifications", {"phone": MOBILE})
        assert status == 201
        status, _, _ = await b.request("POST", "/v1/verifications", {"phone": MOBILE})
        assert status == 201
        for service in (a, b):
            status, problem, hdrs = await service.request(
                "POST", "/v1/verifications", {"phone": MOBILE}
            )
            assert status == 429, (service.name, problem)
            assert int(hdrs["Retry-After"]) >= 1
        await sms_gateway.wait_for(3)
        await asyncio.sleep(0.2)
        assert len(sms_gateway.received) == 3, "one SMS per verification, none for refusals"
