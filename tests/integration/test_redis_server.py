"""The embedded Redis and the shared Redis fixtures, against a real ``redis-server``."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from clinic_voice import app as app_module
from clinic_voice.app import RUNTIME, build_app
from clinic_voice.redis_server import (
    EmbeddedRedis,
    EmbeddedRedisError,
    RedisNotReadyError,
    compact_aof,
    compact_aof_every,
    first_compaction_in,
    wait_redis,
)
from sip_config.settings import Settings
from tests.conftest import (
    RedisServer,
    TouchedPages,
    free_port,
    proc_status,
    watch_loop_blocking,
)
from tests.integration.conftest import BASE_ENV
from verification.redis_mux import RedisMux
from voice.ivr.call_record import CallResult
from voice.ivr.engine import CallRecord
from voice.ivr.store import COMPACT_ASKED, CallStore, Erased

pytestmark = pytest.mark.integration

DEADLINE_S = 10.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def _eventually(predicate: object, what: str, deadline_s: float = DEADLINE_S) -> None:
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while not predicate():
        if loop.time() > end:
            pytest.fail(f"timed out after {deadline_s} s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "data", backoff_initial_s=0.05)
    try:
        yield server
    finally:
        await server.stop()


async def test_start_serves_on_a_private_unix_socket_only(
    embedded: EmbeddedRedis, tmp_path: Path, no_blocking: None
) -> None:
    url = await embedded.start()
    sock = tmp_path / "data" / "redis" / "redis.sock"
    assert url == f"unix://{sock}"
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o700
    client = aioredis.Redis.from_url(url)
    try:
        assert await client.set("k", "v")
        assert await client.get("k") == b"v"
        config = await client.config_get("*")
        assert config["port"] == "0", "embedded Redis must not listen on TCP"
        assert config["appendonly"] == "yes"
        assert config["appendfsync"] == "always"
        assert config["save"] == ""
        assert config["protected-mode"] == "yes"
    finally:
        await client.aclose()


async def test_redis_has_its_own_process_group_in_the_service_session(
    embedded: EmbeddedRedis,
) -> None:
    # Its own group: a Ctrl-C at the terminal (sent to the foreground group) is the
    # service's to handle. The service's session: with autogroup scheduling every session
    # shares the CPU as one, and a session of its own let Redis's AOF rewrites starve the
    # HTTP workers (a 100-450 ms latency tail, BENCHMARKS.md).
    await embedded.start()
    pid = embedded.pid
    assert pid is not None
    assert os.getpgid(pid) == pid
    assert os.getsid(pid) == os.getsid(0)
    # Its files 0600 (test_the_append_only_files_are_private_to_the_service).
    assert proc_status(pid)["Umask"] == "0077"


async def test_redis_is_started_without_a_fork_of_the_service(embedded: EmbeddedRedis) -> None:
    # A fork() (which a preexec_fn forces) of a grown test process held one loop step 105 ms
    # in test_start_serves_on_a_private_unix_socket_only; a vfork does not copy the page
    # tables (tests/conftest.py's TouchedPages tells the two apart).
    pages = TouchedPages()
    try:
        await embedded.start()
        faults = pages.faults_on_rewrite()
    finally:
        pages.close()
    assert faults < TouchedPages.PAGES // 4, f"{faults} faults: redis-server was forked"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
async def test_redis_runs_as_its_owner_that_group_its_only_one(open_tmp: Path) -> None:
    # Root's `clinic-voice secret reseal` starts it as serve's user (secret_reseal.py).
    nobody = 65534
    data = open_tmp / "d"
    data.mkdir(mode=0o700)
    os.chown(data, nobody, nobody)
    server = EmbeddedRedis(data, owner=(nobody, nobody))
    try:
        await server.start()
        pid = server.pid
        assert pid is not None
        status = proc_status(pid)
        assert status["Uid"].split() == [str(nobody)] * 4
        assert status["Gid"].split() == [str(nobody)] * 4
        assert status["Groups"].split() == [str(nobody)]
        assert status["Umask"] == "0077"
        assert os.getpgid(pid) == pid
        assert os.getsid(pid) == os.getsid(0)
    finally:
        await server.stop()


async def test_everysec_is_applied_when_the_operator_asks(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "data", appendfsync="everysec")
    try:
        client = aioredis.Redis.from_url(await server.start())
        try:
            config = await client.config_get("append*")
            assert (config["appendonly"], config["appendfsync"]) == ("yes", "everysec")
        finally:
            await client.aclose()
    finally:
        await server.stop()


def test_an_unknown_appendfsync_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="always or everysec"):
        EmbeddedRedis(tmp_path / "data", appendfsync="no")


async def test_stop_leaves_no_process_and_no_socket(embedded: EmbeddedRedis) -> None:
    url = await embedded.start()
    pid = embedded.pid
    assert pid is not None
    await embedded.stop()
    assert embedded.pid is None
    assert not _alive(pid), f"redis-server {pid} still runs after stop()"
    assert not await asyncio.to_thread(Path(url.removeprefix("unix://")).exists)
    await embedded.stop()  # idempotent


async def test_kill9_is_restarted_and_acknowledged_writes_survive(
    embedded: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    url = await embedded.start()
    client = aioredis.Redis.from_url(url)
    try:
        # Acknowledged writes, then no grace at all: appendfsync always must have them on disk.
        for i in range(200):
            await client.set(f"approval:{i}", "approved")
        first = embedded.pid
        assert first is not None
        os.kill(first, 9)
        await _eventually(
            lambda: embedded.restarts == 1 and embedded.pid not in (None, first),
            "the supervisor to restart redis-server after kill -9",
        )
        await client.aclose()
        client = aioredis.Redis.from_url(url)
        values = await client.mget([f"approval:{i}" for i in range(200)])
        assert values == [b"approved"] * 200
    finally:
        await client.aclose()
    assert any("exited unexpectedly" in r.getMessage() for r in caplog.records)
    assert any("restarted" in r.getMessage() for r in caplog.records)


def _unrunnable_setpriv(folder: Path) -> Path:
    """A ``setpriv`` that ``which`` finds but exec cannot run (its interpreter is missing):
    a spawn that fails with OSError, as a fork on EAGAIN or ENOMEM would."""
    folder.mkdir()
    setpriv = folder / "setpriv"
    setpriv.write_text("#!/nonexistent/interpreter\n")
    setpriv.chmod(0o755)
    return setpriv


async def test_a_restart_that_cannot_spawn_is_logged_and_tried_again(
    embedded: EmbeddedRedis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = await embedded.start()
    first = embedded.pid
    assert first is not None
    setpriv = _unrunnable_setpriv(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{setpriv.parent}{os.pathsep}{os.environ['PATH']}")
    os.kill(first, 9)

    def failed() -> bool:
        return any(
            r.levelname == "ERROR"
            and "restart failed" in r.getMessage()
            and str(setpriv) in r.getMessage()
            for r in caplog.records
        )

    await _eventually(failed, "the failed restart to be logged at ERROR")
    setpriv.unlink()
    await _eventually(
        lambda: embedded.restarts == 1 and embedded.pid not in (None, first),
        "the supervisor to try again and restart redis-server",
    )
    client = aioredis.Redis.from_url(url)
    try:
        assert await client.ping()
    finally:
        await client.aclose()


async def test_restarts_are_counted_as_tried_so_a_redis_that_stays_down_shows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``on_restart`` (``clinic_redis_restarts_total``) is called at each restart tried, as
    the SIP pool counts its workers': counted only once one came up, a Redis that could not
    start again (a read-only data dir) never moved the counter, and the README's alert on
    its increase stayed silent for as long as the API answered 503."""
    tried: list[None] = []
    server = EmbeddedRedis(
        tmp_path / "data", backoff_initial_s=0.05, on_restart=lambda: tried.append(None)
    )
    try:
        await server.start()
        first = server.pid
        assert first is not None
        setpriv = _unrunnable_setpriv(tmp_path / "bin")
        monkeypatch.setenv("PATH", f"{setpriv.parent}{os.pathsep}{os.environ['PATH']}")
        os.kill(first, 9)
        await _eventually(
            lambda: sum("restart failed" in r.getMessage() for r in caplog.records) >= 2,
            "two failed restarts to be logged",
        )
        assert server.restarts == 0 and server.pid is None
        assert len(tried) >= 2, "a Redis that does not come back was not counted"
        setpriv.unlink()
        await _eventually(lambda: server.restarts == 1, "the restart that comes up")
        failed = sum("restart failed" in r.getMessage() for r in caplog.records)
        assert len(tried) == failed + 1
    finally:
        await server.stop()


async def test_a_server_that_fails_to_start_reports_its_last_lines(tmp_path: Path) -> None:
    fake = tmp_path / "fake-redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL CONFIG FILE ERROR: something is off'\nexit 1\n")
    fake.chmod(0o755)
    server = EmbeddedRedis(tmp_path / "data", executable=str(fake), ready_deadline_s=5)
    with pytest.raises(EmbeddedRedisError, match="exited with code 1") as err:
        await server.start()
    assert "FATAL CONFIG FILE ERROR: something is off" in str(err.value)
    await server.stop()


async def test_an_orphan_from_an_earlier_run_is_shut_down_first(
    embedded: EmbeddedRedis, tmp_path: Path
) -> None:
    # A first run writes the config; then a redis-server started by hand on that config
    # plays the orphan a kill -9 of the service would leave behind.
    url = await embedded.start()
    await embedded.stop()
    conf = tmp_path / "data" / "redis" / "redis.conf"
    orphan = await asyncio.create_subprocess_exec(
        "redis-server",
        str(conf),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_redis(url, DEADLINE_S)
        client = aioredis.Redis.from_url(url)
        await client.set("from-orphan", "1")
        await client.aclose()
        await embedded.start()
        await asyncio.wait_for(orphan.wait(), DEADLINE_S)
        assert embedded.pid != orphan.pid
        client = aioredis.Redis.from_url(url)
        assert await client.get("from-orphan") == b"1"
        await client.aclose()
    finally:
        if orphan.returncode is None:
            orphan.kill()
            await orphan.wait()


async def test_wait_redis_fails_clearly_at_its_deadline(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RedisNotReadyError, match=r"did not answer PING within 0\.3 s"):
        await wait_redis(f"unix://{tmp_path}/nothing.sock", 0.3)
    assert loop.time() - started < 2.0


# -- the shared fixtures in tests/conftest.py -------------------------------------------------


def test_redis_server_fixture_survives_kill9(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.set("acknowledged", "yes")
        pid = redis_server.pid
        assert pid is not None
        redis_server.kill9()
        assert not _alive(pid)
        redis_server.restart()
        assert client.get("acknowledged") == b"yes"
    finally:
        client.close()
    pid = redis_server.pid
    assert pid is not None
    redis_server.stop()
    assert not _alive(pid)


def test_free_port_is_free_for_tcp_and_udp() -> None:
    import socket

    port = free_port()
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
    ):
        tcp.bind(("127.0.0.1", port))
        udp.bind(("127.0.0.1", port))


async def test_loop_watch_catches_a_blocking_step() -> None:
    loop = asyncio.get_running_loop()
    with watch_loop_blocking(loop, limit_s=0.05) as blocked:
        await asyncio.sleep(0)  # debug timing applies from the next loop step on
        end = time.thread_time() + 0.08
        while time.thread_time() < end:  # 80 ms of CPU in the loop: blocking is the point
            pass
        await asyncio.sleep(0)  # the slow step is reported when it ends
        await asyncio.sleep(0)
    assert blocked, "an 80 ms busy wait in the loop was not reported"
    with watch_loop_blocking(loop, limit_s=0.05) as blocked:
        await asyncio.sleep(0)
        time.sleep(0.3)  # noqa: ASYNC251 (a blocking wait past five times the limit: the point)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    assert blocked, "a 300 ms blocking sleep in the loop was not reported"
    with watch_loop_blocking(loop, limit_s=0.05) as blocked:
        await asyncio.sleep(0.08)
    assert not blocked, f"a non-blocking sleep was reported: {blocked}"


async def test_a_relative_data_dir_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # make run uses CLINIC_DATA_DIR=./var: redis-server changes into its dir before binding
    # the socket, so a relative socket path pointed nowhere.
    monkeypatch.chdir(tmp_path)
    redis = EmbeddedRedis(Path("var"))
    url = await redis.start()
    try:
        await wait_redis(url, 5)
        assert url.startswith("unix:///"), url
    finally:
        await redis.stop()


async def test_compaction_takes_expired_data_off_the_disk(embedded: EmbeddedRedis) -> None:
    url = await embedded.start()
    client = aioredis.from_url(url)
    try:
        await client.set("cv:v:gone", "+31611111111", px=50)
        await client.set("cv:v:kept", "+31622222222")
        await asyncio.sleep(0.2)
        assert await client.exists("cv:v:gone") == 0
        folder = embedded.url.removeprefix("unix://").rsplit("/", 1)[0]

        def on_disk() -> bytes:
            return b"".join(p.read_bytes() for p in Path(folder).rglob("*.aof*") if p.is_file())

        assert b"+31611111111" in await asyncio.to_thread(on_disk)  # expired, still written
        assert await compact_aof(client.execute_command)
        await _eventually(
            lambda: b"+31611111111" not in on_disk(), "the rewrite to drop the expired key"
        )
        assert b"+31622222222" in await asyncio.to_thread(on_disk)
        assert await client.get("cv:v:kept") == b"+31622222222"
    finally:
        await client.aclose()


async def test_a_compaction_that_cannot_run_says_so(embedded: EmbeddedRedis) -> None:
    url = await embedded.start()
    await embedded.stop()  # Redis is gone
    client = aioredis.from_url(url)
    try:
        assert not await compact_aof(client.execute_command)
    finally:
        await client.aclose()


def test_the_first_compaction_counts_from_the_last_one_not_from_the_start() -> None:
    day = 86400.0
    now = 1.8e9
    assert first_compaction_in(None, now, day) == 0.0  # no file yet: at once
    assert first_compaction_in(now - 3 * day, now, day) == 0.0  # overdue: at once
    assert first_compaction_in(now - 0.25 * day, now, day) == pytest.approx(0.75 * day)
    assert first_compaction_in(now + day, now, day) == day  # a clock set back: not later


async def test_a_serve_restarted_daily_still_compacts(embedded: EmbeddedRedis) -> None:
    # serve restarts (nightly, deploys) used to restart the 24 h wait: the base file of the
    # append-only file says when it was last rewritten, and a restart keeps that.
    url = await embedded.start()
    await embedded.stop()
    base = embedded.last_compacted()
    assert base is not None and abs(base - time.time()) < 60
    folder = Path(url.removeprefix("unix://")).parent / "appendonlydir"
    two_days_ago = time.time() - 2 * 86400
    for path in folder.glob("*.base.*"):
        os.utime(path, (two_days_ago, two_days_ago))
    url = await embedded.start()
    assert embedded.last_compacted() == pytest.approx(two_days_ago)
    assert first_compaction_in(embedded.last_compacted(), time.time(), 86400.0) == 0.0
    client = aioredis.from_url(url)
    try:
        task = asyncio.create_task(compact_aof_every(client.execute_command, 86400.0, first_s=0.0))
        await _eventually(
            lambda: (embedded.last_compacted() or 0) > time.time() - 60, "a compaction at start"
        )
        task.cancel()
    finally:
        await client.aclose()


async def test_an_erasure_leaves_the_disk_at_the_compaction_it_asks_for(
    embedded: EmbeddedRedis,
) -> None:
    # DELETE /v1/calls/{id} removes the record from Redis at once, but the append-only file
    # holds its SET until rewritten: the erasure asks for a rewrite, which serve's compaction
    # loop runs within its poll (here 0.1 s), not a day later.
    url = await embedded.start()
    mux = RedisMux(url, timeout_s=2.0)
    compacting: asyncio.Task[None] | None = None
    try:
        store = CallStore(mux, b"s" * 32, retention_days=30)
        record = CallRecord("triage", (), (("complaint", "rash"),), None, (), None, None, "ended")
        now = time.time()
        result = CallResult("er-aof", "+31611111111", "700", now - 60, now, record)
        sealed = store.seal_result(result)
        await store.save_sealed(sealed)
        folder = Path(url.removeprefix("unix://")).parent

        def on_disk() -> bytes:
            return b"".join(p.read_bytes() for p in folder.rglob("*.aof*") if p.is_file())

        compacting = asyncio.create_task(
            compact_aof_every(mux.execute, 86400.0, first_s=86400.0, asked=(COMPACT_ASKED, 0.1))
        )
        await asyncio.sleep(0.3)  # nothing asked: no rewrite
        assert sealed.sealed.encode() in await asyncio.to_thread(on_disk)
        assert await store.erase("er-aof", on_disk=False) is Erased.RECORD
        await _eventually(lambda: sealed.sealed.encode() not in on_disk(), "the asked-for rewrite")
        assert await mux.execute("EXISTS", COMPACT_ASKED) == 0, "the request was taken"
        assert await mux.execute("EXISTS", "cv:erased:er-aof") == 1, "the mark stays"
    finally:
        if compacting is not None:
            compacting.cancel()
            await asyncio.gather(compacting, return_exceptions=True)
        await mux.aclose()


async def test_an_asked_compaction_that_cannot_run_is_asked_again() -> None:
    # A rewrite already under way may have forked before the erasure: the request stays.
    commands: list[tuple[object, ...]] = []
    asked_again = asyncio.Event()

    async def execute(*command: object) -> object:
        commands.append(command)
        if command[0] == "GETDEL":
            return "1" if len(commands) == 1 else None
        if command[0] == "BGREWRITEAOF":
            raise redis.exceptions.ResponseError("Background AOF rewriting already in progress")
        asked_again.set()
        return "OK"

    task = asyncio.create_task(
        compact_aof_every(execute, 86400.0, first_s=86400.0, asked=("cv:ask", 0.01))
    )
    try:
        await asyncio.wait_for(asked_again.wait(), 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert commands[:3] == [
        ("GETDEL", "cv:ask"),
        ("BGREWRITEAOF",),
        ("SET", "cv:ask", "1", "EX", 86400),
    ]


async def test_the_append_only_files_are_private_to_the_service(embedded: EmbeddedRedis) -> None:
    url = await embedded.start()
    client = aioredis.from_url(url)
    try:
        await client.set("cv:v:x", "+31611111111")
        assert await compact_aof(client.execute_command)
        await asyncio.sleep(0.5)
    finally:
        await client.aclose()
    folder = Path(url.removeprefix("unix://")).parent / "appendonlydir"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes and all(m == 0o600 for m in modes.values()), modes


async def test_a_supervision_that_dies_of_a_defect_stops_the_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """serve's app with its embedded Redis: the supervision ending on an exception (a defect,
    not the child's exit) is logged with its traceback at once, /readyz fails and the service
    stops (exiting 1: clinic_voice/cli.py). Before, nothing was said, Redis stayed down after
    its next exit, and /readyz blamed only Redis."""
    stops: list[None] = []
    monkeypatch.setattr(app_module, "_sigterm_once_handled", lambda: stops.append(None))
    caplog.set_level(logging.INFO, logger="clinic_voice")
    data = tmp_path / "data"
    app = build_app(Settings.from_env({**BASE_ENV, "CLINIC_DATA_DIR": str(data)}))
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        async with client.get("/readyz") as resp:
            assert resp.status == 200, await resp.text()
        redis = aioredis.Redis(unix_socket_path=str(data / "redis" / "redis.sock"))
        try:
            pid = int((await redis.info("server"))["process_id"])
        finally:
            await redis.aclose()

        async def defect(self: EmbeddedRedis, exe: str) -> None:
            raise RuntimeError("a defect in the supervision")

        monkeypatch.setattr(EmbeddedRedis, "_spawn", defect)  # the restart after the kill
        os.kill(pid, signal.SIGKILL)
        await _eventually(lambda: stops, "the service to be told to stop")
        assert app[RUNTIME].failed == "embedded Redis's supervision"
        [record] = [r for r in caplog.records if r.levelno == logging.CRITICAL and r.exc_info]
        assert record.getMessage() == "embedded Redis's supervision failed: it no longer runs"
        assert record.exc_info is not None
        assert str(record.exc_info[1]) == "a defect in the supervision"
        async with client.get("/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["detail"] == "failed: embedded Redis's supervision"
    finally:
        await client.close()  # stops the app, the embedded Redis's stop included
    assert len(stops) == 1
