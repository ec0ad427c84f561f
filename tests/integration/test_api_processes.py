"""Two real ``clinic-voice serve`` processes sharing one Redis behave as one service: a
verification made through one is checked through the other, and limits count across both.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

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
            errors = self.collector.check(
                method, path, resp.status, resp.content_type, raw, headers=resp.headers
            )
            assert not errors, "\n".join(errors)
            data = await resp.json(content_type=None) if raw else None
            return resp.status, data, resp.headers


@asynccontextmanager
async def serve(
    name: str, env: Mapping[str, str], tmp: Path, collector: OpenApiCollector
) -> AsyncIterator[Service]:
    """Start ``clinic-voice serve`` with ``env`` and wait until /healthz answers."""
    port = free_port()
    sip_port = free_port(count=3)  # the front, one worker, the flash-call agent
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


# Requests aiohttp's parser refuses before any middleware runs, each carrying the API key; and
# one it reads, whose key is not UTF-8 (aiohttp hands it over as surrogates). The answer must
# be a problem document that quotes none of it.
_MALFORMED = {
    "control character": (
        b"GET /v1/verifications HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer %s\x01\r\n\r\n",
        400,
        "bad-request",
    ),
    "header over 8190 bytes": (
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer %s" + b"A" * 9000 + b"\r\n\r\n",
        431,
        "header-too-large",
    ),
    "unknown method": (
        b"FOO /v1/verifications HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer %s\r\n\r\n",
        501,
        "method-not-implemented",
    ),
    "TLS on the plain port": (
        b"\x16\x03\x01\x02\x00\x01\x00%s\x01\xfc\x03\x03",
        400,
        "bad-request",
    ),
    "key that is not UTF-8": (
        b"GET /v1/verifications/" + b"A" * 32 + b" HTTP/1.1\r\nHost: a\r\n"
        b"Authorization: Bearer %s\xff\r\nConnection: close\r\n\r\n",
        401,
        "unauthorized",
    ),
}


async def _malformed_http_is_a_problem(port: int) -> int:
    """Send each of :data:`_MALFORMED`; how many reached the app (and its request metrics)."""
    reached = 0
    for what, (template, status, slug) in _MALFORMED.items():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(template % API_KEY.encode())
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.split(b" ", 2)[1] == str(status).encode(), (what, head)
        assert b"content-type: application/problem+json" in head.lower(), (what, head)
        assert json.loads(body)["type"].endswith("/" + slug), (what, body)
        assert API_KEY.encode() not in raw, (what, raw)
        reached += status == 401
    return reached


def _listeners(port: int) -> int:
    """How many sockets listen on 127.0.0.1:``port`` (SO_REUSEPORT: one per HTTP process)."""
    wanted = f"0100007F:{port:04X}"
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == wanted and fields[3] == "0A":  # 0A: LISTEN
            count += 1
    return count


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}/cmdline").exists()


def _processes() -> Iterator[tuple[int, int, list[bytes]]]:
    """(pid, parent pid, argv) of every process, read from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # exited meanwhile
        yield int(entry.name), int(stat.rsplit(")", 1)[1].split()[1]), argv


def _worker_pids(parent: int) -> list[int]:
    return sorted(
        pid for pid, ppid, argv in _processes() if ppid == parent and b"http-worker" in argv
    )


async def _fresh_connection_request(
    service: Service, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    """A request on a new connection: the kernel picks the process anew each time."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with s.request(method, service.base + path, json=body, headers=headers) as resp:
            raw = await resp.read()
            errors = service.collector.check(
                method, path, resp.status, resp.content_type, raw, headers=resp.headers
            )
            assert not errors, "\n".join(errors)
            if resp.content_type.endswith("json"):
                return resp.status, await resp.json(content_type=None)
            return resp.status, raw.decode()


async def _until(what: str, check: Any, deadline_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while not await check():
        if loop.time() > end:
            pytest.fail(f"timed out after {deadline_s} s waiting for {what}")
        await asyncio.sleep(0.1)


def _requests_total(metrics_text: str) -> float:
    """API requests (/v1/...) counted by /metrics."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics_text.splitlines()
        if line.startswith("clinic_http_requests_total{") and 'route="/v1/' in line
    )


@pytest.mark.timeout(300)  # a cold prompt cache takes most of this; warm runs take seconds
async def test_http_workers_share_the_port_forward_sip_sends_and_sum_metrics(
    sms_gateway: SmsGateway, tmp_path: Path, openapi_responses: OpenApiCollector
) -> None:
    """CLINIC_HTTP_WORKERS=3 with the embedded Redis: three processes listen on one port, a
    flash call asked through a worker is placed by serve (the only one with SIP), /metrics
    sums every process and never goes back when a worker is killed and restarted, and the
    workers stop when serve is killed. The embedded Redis runs with
    CLINIC_REDIS_APPENDFSYNC=everysec: serve applies it and warns, and the workers, which
    use serve's Redis, start all the same."""
    DATA_CACHE.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "data"
    data.mkdir()
    (DATA_CACHE / "prompts").mkdir(exist_ok=True)
    (data / "prompts").symlink_to(DATA_CACHE / "prompts")  # rendered once, shared
    env = {
        k: v
        for k, v in service_env("", data, sms_gateway).items()
        if k != "CLINIC_REDIS_URL"  # embedded: serve hands its socket to the workers
    }
    env |= {
        "CLINIC_HTTP_WORKERS": "3",
        # Nothing listens there: the flash calls fail, which is not what this test is about.
        "CLINIC_SIP_ROUTE": f"sip:{{e164}}@127.0.0.1:{free_port()}",
        "CLINIC_FLASHCALL_PREFIX": "+447400",
        "CLINIC_REDIS_APPENDFSYNC": "everysec",
    }
    async with serve("S", env, tmp_path, openapi_responses) as s:
        assert s.proc is not None
        port = int(s.base.rsplit(":", 1)[1])
        assert _listeners(port) == 3
        workers = _worker_pids(s.proc.pid)
        assert len(workers) == 2, workers
        for pid in workers:  # own process group, serve's session (see test_redis_server.py)
            assert os.getpgid(pid) == pid
            assert os.getsid(pid) == os.getsid(s.proc.pid)
        redis = aioredis.Redis(unix_socket_path=str(data / "redis" / "redis.sock"))
        try:
            assert (await redis.config_get("appendfsync"))["appendfsync"] == "everysec"
        finally:
            await redis.aclose()
        warned = "embedded Redis (CLINIC_REDIS_APPENDFSYNC): appendfsync is everysec"
        assert warned in s.log_path.read_text(errors="replace")

        made = 0
        for i in range(12):
            body = {"phone": f"+3161234{i:04d}", "method": "flashcall", "fallback": ["sms"]}
            status, created = await _fresh_connection_request(s, "POST", "/v1/verifications", body)
            assert status == 201, created
            made += 1
            status, seen = await _fresh_connection_request(
                s, "GET", f"/v1/verifications/{created['id']}"
            )
            assert status == 200 and seen["channel"] in {"flashcall", "sms"}
            made += 1

        for _ in range(2):  # fresh connections: each process meets some of them
            made += await _malformed_http_is_a_problem(port)
        log = s.log_path.read_text(errors="replace")
        assert API_KEY not in log, "a malformed request's API key reached the log"
        created_by = [line for line in log.splitlines() if ": created (flashcall,sms)" in line]
        assert len(created_by) == 12
        assert any("http-worker-" in line for line in created_by), "no create reached a worker"
        sent_by = [line for line in log.splitlines() if "sending by flashcall" in line]

        async def all_sent() -> bool:
            nonlocal sent_by
            text = s.log_path.read_text(errors="replace")
            sent_by = [line for line in text.splitlines() if "sending by flashcall" in line]
            return len(sent_by) == 12

        await _until("12 flash calls placed", all_sent)
        assert not [line for line in sent_by if "http-worker-" in line], "a worker placed a call"

        async def summed() -> bool:
            _, text = await _fresh_connection_request(s, "GET", "/metrics")
            return _requests_total(text) == made

        await _until(f"/metrics to count all {made} API requests", summed, 5.0)

        os.kill(workers[0], signal.SIGKILL)

        async def replaced() -> bool:
            now = _worker_pids(s.proc.pid) if s.proc else []
            return len(now) == 2 and workers[0] not in now and _listeners(port) == 3

        await _until("the killed worker to be replaced", replaced)
        status, ready = await _fresh_connection_request(s, "GET", "/readyz")
        for _ in range(50):  # the new worker connects to serve within a moment
            if status == 200:
                break
            await asyncio.sleep(0.1)
            status, ready = await _fresh_connection_request(s, "GET", "/readyz")
        assert status == 200, ready
        for _ in range(5):  # whichever process answers: the killed worker's counts stay
            _, text = await _fresh_connection_request(s, "GET", "/metrics")
            assert _requests_total(text) == made, text

        live = _worker_pids(s.proc.pid)
        os.kill(s.proc.pid, signal.SIGKILL)
        await s.proc.wait()

        async def gone() -> bool:
            return not [p for p in live if _alive(p)]

        await _until("the workers to stop after serve was killed", gone)


@pytest.mark.timeout(120)
async def test_serve_that_cannot_bind_stops_everything_it_started(
    redis_server: RedisServer, sms_gateway: SmsGateway, tmp_path: Path
) -> None:
    """The HTTP address is taken: serve exits 1 with a message, after stopping the SIP workers
    (and the rest) it had started already, instead of hanging with them running."""
    DATA_CACHE.mkdir(parents=True, exist_ok=True)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINIC_")}
    env |= service_env(redis_server.url, DATA_CACHE, sms_gateway)
    sip_port = free_port(count=4)  # the front, two workers, the flash-call agent
    env |= {
        "CLINIC_HTTP_ADDR": f"127.0.0.1:{port}",
        "CLINIC_SIP_ADDR": f"127.0.0.1:{sip_port}",
        "CLINIC_SIP_WORKERS": "2",
    }
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "clinic_voice.cli",
            "serve",
            cwd=ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), START_DEADLINE_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            pytest.fail("serve hung after failing to bind its HTTP address")
    finally:
        taken.close()
    text = out.decode(errors="replace")
    assert proc.returncode == 1, text[-3000:]
    assert "cannot start" in text, text[-3000:]
    assert "SIP worker 0 started" in text, "the SIP workers started before the bind"
    assert "SIP worker 0 exited" in text, text[-3000:]
    assert not _sip_workers_on(sip_port + 1), "a SIP worker outlived serve"


def _sip_workers_on(port: int) -> list[int]:
    """Pids of SIP worker processes started for ``port``."""
    return [
        pid
        for pid, _, argv in _processes()
        if b"voice.sip.worker" in argv and str(port).encode() in argv
    ]
