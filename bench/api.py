"""The verification API's speed next to a trivial aiohttp JSON echo server, in one invocation.

Both get the same wrk load (same paths, bodies and Authorization header, 50 connections):

- creates: ``POST /v1/verifications`` with a distinct valid Dutch mobile number per request;
- checks: ``POST /v1/verifications/{id}/check`` with a wrong code, spread over verifications
  created beforehand, enough of them that each gets about as many checks as production allows
  (5): a record grows by one event per check, and a record with dozens of events is not what
  the service reads in practice. The service runs with ``CLINIC_MAX_CHECKS=100`` so that none
  of them fails if the rate is higher than planned.

The service is the real thing: ``clinic-voice serve`` with its embedded Redis (fsync on every
write) and a local HTTP SMS gateway, with ``CLINIC_HTTP_WORKERS`` set to the number of cores
as the README advises (``--http-workers`` to change it; the echo server is one process, as a
trivial aiohttp server is). Goals on the 2-core machine: creates >= 0.30 x echo,
checks >= 0.40 x echo, p99 <= 10 ms. Prints a table, then one JSON line.

wrk keeps all 50 connections busy (a closed loop), so by Little's law the mean latency is
50 / throughput: p99 <= 10 ms needs well over 5000 answers/s (about 0.4 x the echo server's
~13k/s here). ``p99_ms`` is the worse of the service's create and check runs at that load.

Run: ``.venv/bin/python bench/api.py [--quick]``. Needs ``wrk`` (Debian package ``wrk``).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

if __package__ in {None, ""}:
    # Run as a file (``python bench/api.py``): make the repo importable for ``bench.common``.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
import uvloop
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

from bench.common import (
    VENV_BIN,
    WRK_REPORT_LUA,
    BenchError,
    Child,
    WrkResult,
    environ,
    finish,
    free_port,
    lua_string,
    parser,
    print_table,
    python_child,
    run_wrk,
    wait_http,
    wait_warm,
    wrk_path,
)

CONNECTIONS = 50
HTTP_WORKERS = os.cpu_count() or 1  # the README's advice: one HTTP process per core
WRK_THREADS = 1  # one wrk thread drives 50 connections faster than one Python server answers
GOAL_CREATE_RATIO = 0.30
GOAL_CHECK_RATIO = 0.40
GOAL_P99_MS = 10.0
WRONG_CODE = "000000"
MAX_CHECKS = 100  # per verification in the service under test; 5 would end them mid-run
# Limits far above what one bench can reach: this measures speed, not the limiter's refusals.
NO_LIMIT = "1000000000/60"


@dataclass(frozen=True, slots=True)
class Plan:
    """How long and how much: the full run, or ``--quick``."""

    warmup_s: int
    measure_s: int
    verifications: int
    paced_s: int  # the run at the goal's rate (latency under that load, not at saturation)


# verifications: about (warm-up + measured run) x 5,000 checks/s / 5 checks each
FULL = Plan(warmup_s=3, measure_s=15, verifications=18_000, paced_s=10)
QUICK = Plan(warmup_s=1, measure_s=5, verifications=6_000, paced_s=3)
GOAL_RATIO = {"create": GOAL_CREATE_RATIO, "check": GOAL_CHECK_RATIO}


# -- the two helper servers (run as child processes: ``python -m bench.api echo-server``) -------


async def _echo(request: web.Request) -> web.Response:
    # Parse and re-serialise, as the service must at least do with every body.
    return web.json_response(await request.json())


def serve_echo(port: int) -> None:
    """A trivial aiohttp JSON echo server: every POST answers its body as JSON."""
    app = web.Application()
    app.router.add_post("/{tail:.*}", _echo)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


class _SmsGatewayProtocol(asyncio.Protocol):
    """One connection to the bench's SMS gateway: HTTP/1.1 keep-alive, no framework.

    Any POST answers 200 ``{"id": "sms-N"}``; ``GET /count`` answers ``{"sent": N}``. A real
    gateway runs on another machine; this one shares the two cores with the service under
    test, so it is kept as cheap as an HTTP server can be (an aiohttp app took a fifth of a
    core at 2,000 SMS/s, taken from the service).
    """

    sent = 0  # across connections (one event loop)

    def __init__(self) -> None:
        self._buf = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while True:
            head_end = self._buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self._buf[:head_end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            end = head_end + 4 + length
            if len(self._buf) < end:
                return
            self._buf = self._buf[end:]
            self._answer(head.split(" ", 2))

    def _answer(self, request_line: list[str]) -> None:
        assert self._transport is not None
        if request_line[0] == "POST":
            _SmsGatewayProtocol.sent += 1
            body = b'{"id": "sms-%d"}' % _SmsGatewayProtocol.sent
        elif request_line[:2] == ["GET", "/count"]:
            body = b'{"sent": %d}' % _SmsGatewayProtocol.sent
        else:
            self._transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            return
        self._transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
            % (len(body), body)
        )


def serve_sms_gateway(port: int) -> None:
    """A local HTTP SMS gateway: any POST answers 200 ``{"id": "sms-N"}``."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_SmsGatewayProtocol, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    uvloop.run(main())


# -- load ---------------------------------------------------------------------------------------


def _headers_lua(api_key: str) -> str:
    return (
        'local headers = {["Content-Type"] = "application/json", '
        f'["Authorization"] = {lua_string("Bearer " + api_key)}}}\n'
    )


def _pace_lua(pace_ms: float | None) -> str:
    """A wrk ``delay()``: each connection waits ``pace_ms`` on average before its next request.

    The waits are drawn from an exponential distribution, so the 50 connections send
    independently of each other, as users do (together: Poisson arrivals). A fixed wait kept
    them in step: all 50 started together and came back together, so the service met bursts
    of 50 requests at once, and a run at a tenth of its capacity showed the queue of a burst
    (p50 4-7 ms) instead of the latency of the rate.
    """
    if pace_ms is None:
        return ""
    return f"function delay() return -math.log(1 - math.random()) * {pace_ms:.3f} end\n"


def create_script(path: Path, api_key: str, pace_ms: float | None = None) -> Path:
    """wrk script: POST /v1/verifications, a new +3161xxxxxxx number on every request.

    Script args: ``BASE THREADS``; request n of thread t uses number BASE + n*THREADS + t, so
    numbers never repeat within a run, nor across runs given distinct bases.
    """
    path.write_text(
        _headers_lua(api_key)
        + _pace_lua(pace_ms)
        + """
local base, nthreads, counter = 0, 1, 0
function init(args)
  base = tonumber(args[1]) or 0
  nthreads = tonumber(args[2]) or 1
end
function request()
  counter = counter + 1
  local n = (base + counter * nthreads + (tid or 0)) % 10000000
  local body = string.format('{"phone": "+3161%07d", "method": "sms"}', n)
  return wrk.format("POST", "/v1/verifications", headers, body)
end
"""
        + WRK_REPORT_LUA
    )
    return path


def check_script(path: Path, api_key: str, ids: list[str], pace_ms: float | None = None) -> Path:
    """wrk script: POST a wrong code to /v1/verifications/{id}/check, round-robin over ``ids``."""
    table = ",\n".join(lua_string(i) for i in ids)
    path.write_text(
        _headers_lua(api_key)
        + _pace_lua(pace_ms)
        + f"local ids = {{\n{table}\n}}\n"
        + f"local body = {lua_string(json.dumps({'code': WRONG_CODE}))}\n"
        + """
local nthreads, counter = 1, 0
function init(args)
  nthreads = tonumber(args[2]) or 1
end
function request()
  counter = counter + 1
  local id = ids[((counter * nthreads + (tid or 0)) % #ids) + 1]
  return wrk.format("POST", "/v1/verifications/" .. id .. "/check", headers, body)
end
"""
        + WRK_REPORT_LUA
    )
    return path


async def _precreate(base_url: str, api_key: str, count: int) -> list[str]:
    """Create ``count`` verifications (numbers +3165xxxxxxx, apart from wrk's) and return ids."""
    headers = {"Authorization": f"Bearer {api_key}"}
    ids: list[str] = []
    failures: list[str] = []
    numbers = iter(range(count))

    async def worker(session: ClientSession) -> None:
        for n in numbers:
            body = {"phone": f"+3165{n:07d}", "method": "sms"}
            async with session.post(f"{base_url}/v1/verifications", json=body) as resp:
                if resp.status != 201:
                    failures.append(f"HTTP {resp.status}: {(await resp.text())[:300]}")
                    return
                ids.append(str((await resp.json())["id"]))

    async with ClientSession(
        headers=headers,
        timeout=ClientTimeout(total=30),
        connector=TCPConnector(limit=CONNECTIONS),
    ) as session:
        await asyncio.gather(*(worker(session) for _ in range(CONNECTIONS)))
    if failures:
        raise BenchError(f"creating verifications failed ({len(failures)}x): {failures[0]}")
    return ids


@dataclass(frozen=True, slots=True)
class Target:
    """One server under load."""

    name: str
    base_url: str
    sms_count_url: str = ""  # the service's SMS gateway, to count what it was sent


@dataclass(frozen=True, slots=True)
class RedisRun:
    """What the service's Redis went through during one measured run."""

    forks: int  # AOF rewrites started (each forks Redis and writes the whole data set)
    slow_fsync_s: int  # wall-clock seconds in which an fsync took SLOW_MS or more
    worst_ms: int  # the longest stall of any kind Redis's latency monitor saw
    worst_event: str  # and its kind (aof-fsync-always, fork, aof-write, command...)


class RedisWatch:
    """Slow fsyncs, stalls and AOF rewrites in the service's Redis, run by run.

    With ``appendfsync always`` every acknowledged write waits for its fsync, so one slow
    fsync (or any other stall of Redis) holds every request in flight: these explain a
    latency tail that the service's own code does not. Read from Redis's latency monitor
    (threshold SLOW_MS; per event kind, one sample per second at most) and its fork counter.
    The monitor only records.
    """

    SLOW_MS = 5

    def __init__(self, url: str) -> None:
        self._r = redis.Redis.from_url(url, socket_timeout=10)
        self._forks = 0
        # Put back when done: a Redis given with --service-env is someone else's.
        before = self._r.config_get("latency-monitor-threshold")
        self._threshold_before = str(before.get("latency-monitor-threshold", "0"))
        self._r.config_set("latency-monitor-threshold", self.SLOW_MS)

    @classmethod
    def open(cls, url: str) -> RedisWatch | None:
        """A watch on ``url``, or None (said on stdout) when that Redis does not allow it."""
        try:
            return cls(url)
        except redis.RedisError as exc:
            print(f"(the service's Redis is not watched: {exc})")
            return None

    def _fork_count(self) -> int:
        return int(self._r.info("stats")["total_forks"])

    def start(self) -> None:
        """Forget what came before: the next :meth:`take` covers from here."""
        self._r.latency_reset()
        self._forks = self._fork_count()

    def take(self) -> RedisRun:
        fsyncs = cast(list[list[int]], self._r.latency_history("aof-fsync-always") or [])
        worst_ms, worst_event = 0, ""
        for event, _at, _latest, highest in cast(list[list[Any]], self._r.latency_latest()):
            if int(highest) > worst_ms:
                worst_ms = int(highest)
                worst_event = event.decode() if isinstance(event, bytes) else str(event)
        return RedisRun(
            forks=self._fork_count() - self._forks,
            slow_fsync_s=len(fsyncs),
            worst_ms=worst_ms,
            worst_event=worst_event,
        )

    def close(self) -> None:
        try:
            self._r.config_set("latency-monitor-threshold", self._threshold_before)
        except redis.RedisError as exc:  # the service (and its Redis) may be gone already
            print(f"(could not restore the Redis latency-monitor-threshold: {exc})")
        finally:
            self._r.close()


def measure(
    target: Target, script: Path, plan: Plan, base: int, watch: RedisWatch | None = None
) -> WrkResult:
    """A warm-up run, then the measured run, with the same script."""
    common = {"connections": CONNECTIONS, "threads": WRK_THREADS}
    run_wrk(
        target.base_url,
        script,
        duration_s=plan.warmup_s,
        script_args=[str(base), str(WRK_THREADS)],
        **common,
    )
    if watch is not None:
        watch.start()
    return run_wrk(
        target.base_url,
        script,
        duration_s=plan.measure_s,
        script_args=[str(base + 3_000_000), str(WRK_THREADS)],
        **common,
    )


def measure_paced(
    target: Target,
    *,
    work: Path,
    api_key: str,
    ids: list[str],
    kind: str,
    echo: WrkResult,
    plan: Plan,
    watch: RedisWatch | None = None,
    ratio: float | None = None,
    base: int = 6_000_000,
) -> WrkResult:
    """Latency at the goal's rate instead of at saturation: every connection waits between
    requests so that the 50 together offer ``ratio`` (default ``GOAL_RATIO[kind]``) x the
    echo server's rate. ``base``: the create script's first number (two runs use two bases).

    A wait that ignores the answer's own latency offers less than intended, so a first run
    measures that latency and the second (the one reported) subtracts it. A service slower
    than the goal's rate cannot be offered it: then the second run is at its saturation.
    """
    rate = (GOAL_RATIO[kind] if ratio is None else ratio) * echo.good_rps
    cycle_ms = 1000.0 * CONNECTIONS / rate if rate > 0 else 0.0
    pace_ms = cycle_ms
    result: WrkResult | None = None
    for _ in range(2):
        if kind == "create":
            script = create_script(work / "create-paced.lua", api_key, pace_ms)
        else:
            script = check_script(work / "check-paced.lua", api_key, ids, pace_ms)
        if watch is not None:
            watch.start()  # the run reported is the last one
        result = run_wrk(
            target.base_url,
            script,
            connections=CONNECTIONS,
            threads=WRK_THREADS,
            duration_s=plan.paced_s,
            script_args=[str(base + (0 if result is None else 1_000_000)), str(WRK_THREADS)],
        )
        if result.good_rps <= 0:
            break
        latency_ms = 1000.0 * CONNECTIONS / result.good_rps - pace_ms
        pace_ms = max(0.0, cycle_ms - latency_ms)
    assert result is not None
    return result


def service_env(
    work: Path, http_port: int, sip_port: int, sms_port: int, api_key: str
) -> dict[str, str]:
    """The service's environment: embedded Redis, local SMS gateway, limits out of the way."""
    return environ(
        CLINIC_DATA_DIR=str(work / "data"),
        CLINIC_HTTP_ADDR=f"127.0.0.1:{http_port}",
        CLINIC_API_KEYS=api_key,
        CLINIC_SECRET=secrets.token_urlsafe(36),
        CLINIC_LOG_LEVEL="WARNING",
        CLINIC_SMS_HTTP_URL=f"http://127.0.0.1:{sms_port}/sms",
        CLINIC_SIP_ADDR=f"127.0.0.1:{sip_port}",
        CLINIC_SIP_WORKERS="1",
        CLINIC_HTTP_WORKERS=str(HTTP_WORKERS),
        CLINIC_MAX_CHECKS=str(MAX_CHECKS),
        CLINIC_CODE_TTL_S="3600",
        CLINIC_STEP_TIMEOUT_SMS_S="900",
        CLINIC_LIMIT_NUMBER_VERIFICATIONS=NO_LIMIT,
        CLINIC_LIMIT_NUMBER_SENDS=NO_LIMIT,
        CLINIC_LIMIT_PREFIX_SENDS=NO_LIMIT,
        CLINIC_LIMIT_KEY_REQUESTS=NO_LIMIT,
        CLINIC_LIMIT_IP_REQUESTS=NO_LIMIT,
    )


def service_redis_url(work: Path, extra_env: dict[str, str]) -> str:
    """The Redis the service uses: the one given, or its embedded one's unix socket."""
    given = extra_env.get("CLINIC_REDIS_URL", "")
    return given or f"unix://{work / 'data' / 'redis' / 'redis.sock'}"


def run(
    plan: Plan, quick: bool, echo_only: bool = False, extra_env: dict[str, str] | None = None
) -> dict[str, object]:
    """Start everything, measure, stop everything; return the figures."""
    wrk_path()
    api_key = secrets.token_hex(16)  # 32 characters
    children: list[Child] = []
    results: dict[tuple[str, str], WrkResult] = {}
    redis_runs: dict[tuple[str, str], RedisRun] = {}
    watch: RedisWatch | None = None
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        work = Path(tmp)
        try:
            echo_port = free_port()
            echo = python_child(
                "echo server", ["bench.api", "echo-server", str(echo_port)], work / "echo.log"
            )
            children.append(echo)
            wait_http(f"http://127.0.0.1:{echo_port}/", 20, echo, status=405)
            echo_t = Target("echo", f"http://127.0.0.1:{echo_port}")
            service_t: Target | None = None
            if echo_only:
                ids = [secrets.token_urlsafe(16) for _ in range(plan.verifications)]
            else:
                service_t, ids = start_service(work, plan, api_key, children, extra_env or {})
                watch = RedisWatch.open(service_redis_url(work, extra_env or {}))
            creates = create_script(work / "create.lua", api_key)
            checks = check_script(work / "check.lua", api_key, ids)
            for kind, script in (("create", creates), ("check", checks)):
                results[("echo", kind)] = measure(echo_t, script, plan, base=0)
                if service_t is not None:
                    results[("service", kind)] = measure(service_t, script, plan, 0, watch)
                    if watch is not None:
                        redis_runs[("service", kind)] = watch.take()
                    results[("service paced", kind)] = measure_paced(
                        service_t,
                        work=work,
                        api_key=api_key,
                        ids=ids,
                        kind=kind,
                        echo=results[("echo", kind)],
                        plan=plan,
                        watch=watch,
                    )
                    if watch is not None:
                        redis_runs[("service paced", kind)] = watch.take()
                    if children[-1].returncode is not None:
                        raise BenchError(f"the service died during the run:\n{children[-1].tail()}")
            sms_sent = _get_json(service_t.sms_count_url)["sent"] if service_t else None
        except BenchError as exc:
            dead = [c for c in children if c.returncode is not None]
            if not dead:
                raise
            notes = "\n".join(
                f"{c.name} exited with {c.returncode}; last output:\n{c.tail()}" for c in dead
            )
            raise BenchError(f"{exc}\n{notes}") from exc
        finally:
            if watch is not None:
                watch.close()
            for child in reversed(children):
                child.stop()
    figures = report(results, plan, quick, len(ids), redis_runs)
    if not echo_only:
        workers = (extra_env or {}).get("CLINIC_HTTP_WORKERS", str(HTTP_WORKERS))
        print(f"service: CLINIC_HTTP_WORKERS={workers}; echo server: one process")
        figures["http_workers"] = int(workers)
    if sms_sent is not None:
        figures["sms_sent"] = sms_sent
    return figures


def _get_json(url: str) -> dict[str, int]:
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (our own gateway)
        data: dict[str, int] = json.load(resp)
        return data


def start_service(
    work: Path, plan: Plan, api_key: str, children: list[Child], extra_env: dict[str, str]
) -> tuple[Target, list[str]]:
    """Start the SMS gateway and ``clinic-voice serve``; create the verifications to check."""
    sms_port, http_port = free_port(), free_port()
    sip_port = free_port(count=3)  # the service's SIP port plus its worker's ports
    sms = python_child("SMS gateway", ["bench.api", "sms-gateway", str(sms_port)], work / "sms.log")
    children.append(sms)
    cli = VENV_BIN / "clinic-voice"
    if not cli.exists():
        raise BenchError(f"{cli} is missing: run make venv")
    wait_http(f"http://127.0.0.1:{sms_port}/count", 20, sms)
    service = Child(
        "clinic-voice serve",
        [str(cli), "serve"],
        work / "service.log",
        env=service_env(work, http_port, sip_port, sms_port, api_key) | extra_env,
    )
    children.append(service)
    wait_http(f"http://127.0.0.1:{http_port}/readyz", 60, service)
    wait_warm(f"http://127.0.0.1:{http_port}/readyz", 180, service)
    url = f"http://127.0.0.1:{http_port}"
    ids = asyncio.run(_precreate(url, api_key, plan.verifications))
    return Target("service", url, f"http://127.0.0.1:{sms_port}/count"), ids


def report(
    results: dict[tuple[str, str], WrkResult],
    plan: Plan,
    quick: bool,
    verifications: int,
    redis_runs: dict[tuple[str, str], RedisRun] | None = None,
) -> dict[str, object]:
    """Print the table and build the JSON figures."""
    rows = []
    for (target, kind), r in results.items():
        rows.append(
            [
                f"{target} {kind}s",
                r.requests,
                r.good_rps,
                r.p50_ms,
                r.p90_ms,
                r.p99_ms,
                r.max_ms,
                r.errors,
            ]
        )
    print(
        f"\nAPI bench: {CONNECTIONS} connections, {plan.measure_s} s per run, wrk -t{WRK_THREADS}"
        f"; paced: {plan.paced_s} s at about the goal's rate"
    )
    print_table(
        ["run", "requests", "2xx/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors"], rows
    )
    ec, ek = results[("echo", "create")], results[("echo", "check")]
    if ("service", "create") not in results:
        return {
            "bench": "api",
            "quick": quick,
            "echo_only": True,
            "connections": CONNECTIONS,
            "measure_s": plan.measure_s,
            "echo_creates_per_s": round(ec.good_rps, 1),
            "echo_checks_per_s": round(ek.good_rps, 1),
            "echo_p99_ms": round(max(ec.p99_ms, ek.p99_ms), 3),
        }
    sc, sk = results[("service", "create")], results[("service", "check")]
    pc, pk = results[("service paced", "create")], results[("service paced", "check")]
    create_ratio = sc.good_rps / ec.good_rps if ec.good_rps else 0.0
    check_ratio = sk.good_rps / ek.good_rps if ek.good_rps else 0.0
    p99 = max(sc.p99_ms, sk.p99_ms)
    goals = {
        "create_ratio": create_ratio >= GOAL_CREATE_RATIO,
        "check_ratio": check_ratio >= GOAL_CHECK_RATIO,
        "p99_ms": p99 <= GOAL_P99_MS,
        "no_errors": sc.errors == 0 and sk.errors == 0 and pc.errors == 0 and pk.errors == 0,
    }
    redis_json: dict[str, dict[str, object]] = {}
    if redis_runs:
        print(
            "\nthe service's Redis in each run (its latency monitor, stalls >= "
            f"{RedisWatch.SLOW_MS} ms; a run of N s spans N+1 wall-clock seconds)"
        )
        table = []
        for (target, kind), rr in redis_runs.items():
            worst = f"{rr.worst_ms} ({rr.worst_event})" if rr.worst_event else "-"
            table.append([f"{target} {kind}s", rr.forks, rr.slow_fsync_s, worst])
            redis_json[f"{target} {kind}s"] = {
                "aof_rewrites": rr.forks,
                "slow_fsync_s": rr.slow_fsync_s,
                "worst_stall_ms": rr.worst_ms,
                "worst_stall": rr.worst_event,
            }
        print_table(["run", "AOF rewrites", "s with a slow fsync", "worst stall ms"], table)
    print(
        f"paced to the goals' rates: creates {pc.good_rps:.0f}/s p99 {pc.p99_ms:.2f} ms; "
        f"checks {pk.good_rps:.0f}/s p99 {pk.p99_ms:.2f} ms"
    )
    print(
        f"\ncreates {sc.good_rps:.0f}/s = {create_ratio:.3f} x echo (goal {GOAL_CREATE_RATIO}); "
        f"checks {sk.good_rps:.0f}/s = {check_ratio:.3f} x echo (goal {GOAL_CHECK_RATIO}); "
        f"p99 {p99:.2f} ms (goal {GOAL_P99_MS}); service errors {sc.errors + sk.errors}"
    )
    return {
        "bench": "api",
        "quick": quick,
        "connections": CONNECTIONS,
        "measure_s": plan.measure_s,
        "verifications": verifications,
        "echo_creates_per_s": round(ec.good_rps, 1),
        "echo_checks_per_s": round(ek.good_rps, 1),
        "creates_per_s": round(sc.good_rps, 1),
        "checks_per_s": round(sk.good_rps, 1),
        "create_ratio": round(create_ratio, 3),
        "check_ratio": round(check_ratio, 3),
        "p50_ms": round(max(sc.p50_ms, sk.p50_ms), 3),
        "p99_ms": round(p99, 3),
        "create_p99_ms": round(sc.p99_ms, 3),
        "check_p99_ms": round(sk.p99_ms, 3),
        "echo_p99_ms": round(max(ec.p99_ms, ek.p99_ms), 3),
        "paced_creates_per_s": round(pc.good_rps, 1),
        "paced_checks_per_s": round(pk.good_rps, 1),
        "paced_create_p99_ms": round(pc.p99_ms, 3),
        "paced_check_p99_ms": round(pk.p99_ms, 3),
        "create_errors": sc.errors,
        "check_errors": sk.errors,
        "goals_met": all(goals.values()),
        "goals": goals,
        "redis": redis_json,
    }


def main(argv: list[str] | None = None) -> int:
    """``bench/api.py [--quick] [--strict]``, or the helper servers' entry points."""
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["echo-server"]:
        serve_echo(int(args_in[1]))
        return 0
    if args_in[:1] == ["sms-gateway"]:
        serve_sms_gateway(int(args_in[1]))
        return 0
    p = parser(__doc__.splitlines()[0] if __doc__ else "API bench")
    p.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    p.add_argument(
        "--echo-only", action="store_true", help="measure the echo server alone (no ratios)"
    )
    p.add_argument(
        "--http-workers",
        type=int,
        default=HTTP_WORKERS,
        help=f"the service's CLINIC_HTTP_WORKERS (default: the number of cores, {HTTP_WORKERS})",
    )
    p.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="CLINIC_X=VALUE",
        help="extra setting for the service (repeatable), e.g. CLINIC_REDIS_URL=unix:///...",
    )
    args = p.parse_args(args_in)
    extra: dict[str, str] = {}
    for item in args.service_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("CLINIC_"):
            p.error(f"--service-env expects CLINIC_NAME=VALUE, got {item!r}")
        extra[key] = value
    extra.setdefault("CLINIC_HTTP_WORKERS", str(args.http_workers))
    plan = QUICK if args.quick else FULL
    return finish(
        "api", args.quick, lambda: run(plan, args.quick, args.echo_only, extra), strict=args.strict
    )


if __name__ == "__main__":
    sys.exit(main())
