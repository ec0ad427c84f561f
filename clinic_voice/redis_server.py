"""The embedded Redis: a ``redis-server`` child the service starts, supervises and stops.

Used when ``CLINIC_REDIS_URL`` is unset. Redis listens only on a unix socket inside the data
dir (no TCP at all), keeps an append-only file fsynced on every write (once a second when the
operator sets ``CLINIC_REDIS_APPENDFSYNC=everysec``), and is restarted with backoff if it
dies. Everything here is asyncio: the child is an ``asyncio`` subprocess and every wait has a
deadline.

Why ``appendfsync always``: an approved verification that the API has acknowledged must survive a
``kill -9`` of Redis (or a power cut). Measured on this project's machine (Debian 12, 2 cores,
virtio disk, redis-server 7.0.15, ``redis-benchmark -t set`` over the unix socket)::

                 1 client                        50 clients
    always       5.2k SET/s, p50 0.18, p99 0.35 ms  90k SET/s, p50 0.49, p99 0.69 ms
    everysec     19.8k SET/s, p50 0.06, p99 0.10 ms 160k SET/s, p50 0.17, p99 0.36 ms

So ``always`` costs about 0.1-0.3 ms per write and halves peak throughput, far below the API's
10 ms p99 budget; ``everysec`` could lose the last second of acknowledged approvals.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import os
import shutil
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from sip_config.child_process import RunAs, spawn_child
from sip_config.tasks import cancel_and_wait, watch

log = logging.getLogger(__name__)

# AF_UNIX sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH = 107
_LOG_LINES_KEPT = 30
# The stop's waits besides stop_deadline_s (tests/unit/test_systemd_unit.py adds them up):
# the SHUTDOWN command's client timeout, and the wait for the log pipe's reader after the exit.
SHUTDOWN_ASK_S = 2.0
LOG_PIPE_REAP_S = 1.0


# Lines Redis 7.0 marks as warnings ('#') at every start and stop: routine, logged as INFO.
_ROUTINE = (
    "oO0OoO0OoO0Oo Redis is starting",
    "Redis version=",
    "Configuration loaded",
    "Server initialized",
    "User requested shutdown",
    "Redis is now ready to exit",
)


def log_level(line: str) -> int | None:
    """The level at which to pass a redis-server log line on: its warnings ('#') as
    WARNING, but for the routine lines of every start and stop (INFO); None for the rest."""
    _, mark, message = line.partition(" # ")
    if not mark:
        return None
    return logging.INFO if message.startswith(_ROUTINE) else logging.WARNING


class EmbeddedRedisError(RuntimeError):
    """The embedded ``redis-server`` could not be started or did not become ready."""


class RedisNotReadyError(TimeoutError):
    """A Redis did not answer PING before the deadline."""


class _State(enum.StrEnum):
    IDLE = "idle"
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    STOPPED = "stopped"


async def wait_redis(url: str, deadline_s: float) -> None:
    """Wait until the Redis at ``url`` answers PING, for at most ``deadline_s`` seconds.

    A Redis still loading its append-only file answers ``LOADING``; that counts as not ready.
    Raises :class:`RedisNotReadyError` naming the last error seen.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    last: BaseException | None = None
    while True:
        remaining = end - loop.time()
        if remaining <= 0:
            raise RedisNotReadyError(
                f"Redis at {_redact(url)} did not answer PING within {deadline_s:.1f} s "
                f"(last error: {last!r})"
            )
        timeout = max(0.05, min(1.0, remaining))
        client = _probe_client(url, timeout)
        try:
            if await client.ping():
                return
        except (RedisError, OSError) as exc:
            last = exc
        finally:
            await client.aclose()
        await asyncio.sleep(min(0.05, max(0.0, end - loop.time())))


class EmbeddedRedis:
    """A supervised ``redis-server`` on a unix socket in ``data_dir/redis``.

    ``await start()`` returns the ``unix://`` URL once Redis answers PING. If the child dies
    while running it is restarted with exponential backoff (0.1 s doubling to 5 s, reset after
    30 s of uptime); the same append-only file is loaded again, so acknowledged writes survive.
    ``await stop()`` asks for SHUTDOWN, then SIGTERM, then SIGKILL, each with a deadline.
    ``on_restart`` is called as each restart is tried, before its spawn, whether or not it
    comes up (``clinic_redis_restarts_total``, as the SIP pool counts its workers' restarts):
    a Redis that cannot start again (a read-only data dir, a damaged append-only file) is
    counted at every try, not never.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        executable: str = "redis-server",
        appendfsync: str = "always",
        ready_deadline_s: float = 15.0,
        stop_deadline_s: float = 5.0,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        owner: tuple[int, int] | None = None,
        on_restart: Callable[[], None] | None = None,
    ) -> None:
        self._dir = Path(data_dir).absolute() / "redis"  # redis-server chdirs into it
        # (uid, gid) that redis-server runs as and its folder and config belong to; None: this
        # process's. Root's ``clinic-voice secret reseal`` starts it for serve's user, or the
        # files it rewrote would be root's and serve's own Redis could not open them.
        self._owner = owner
        self._socket = self._dir / "redis.sock"
        self._conf = self._dir / "redis.conf"
        self._pidfile = self._dir / "redis.pid"
        self._executable = executable
        if appendfsync not in {"always", "everysec"}:
            raise ValueError(f"appendfsync must be always or everysec, not {appendfsync!r}")
        self._appendfsync = appendfsync
        self._ready_deadline_s = ready_deadline_s
        self._stop_deadline_s = stop_deadline_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._lines: collections.deque[str] = collections.deque(maxlen=_LOG_LINES_KEPT)
        self._state = _State.IDLE
        self._restarts = 0
        self._on_restart = on_restart

    @property
    def url(self) -> str:
        """The ``unix://`` URL clients connect to."""
        return f"unix://{self._socket}"

    @property
    def pid(self) -> int | None:
        """The pid of the current ``redis-server`` child, if one is running."""
        if self._proc is None or self._proc.returncode is not None:
            return None
        return self._proc.pid

    @property
    def restarts(self) -> int:
        """How many times the supervisor restarted a child that died."""
        return self._restarts

    def last_log_lines(self) -> list[str]:
        """The last lines ``redis-server`` wrote (for error messages and diagnostics)."""
        return list(self._lines)

    async def start(self, on_failure: Callable[[str], None] | None = None) -> str:
        """Write the config, start ``redis-server``, wait for PING and begin supervising.

        The supervision dying of a defect (not the child exiting: that is restarted) is
        logged with its traceback and told to ``on_failure``: Redis would no longer be
        restarted, and a service should not stay half-alive without it."""
        if self._state not in {_State.IDLE, _State.STOPPED}:
            raise EmbeddedRedisError(f"embedded Redis is already {self._state}")
        if len(os.fsencode(self._socket)) > _MAX_SOCKET_PATH:
            raise EmbeddedRedisError(
                f"unix socket path {self._socket} is longer than {_MAX_SOCKET_PATH} bytes: "
                "use a shorter CLINIC_DATA_DIR"
            )
        exe = shutil.which(self._executable)
        if exe is None:
            raise EmbeddedRedisError(
                f"{self._executable} not found on PATH: install the redis-server package "
                "or set CLINIC_REDIS_URL"
            )
        self._set_state(_State.STARTING)
        try:
            await asyncio.to_thread(self._prepare_dir)
            await self._shutdown_orphan()
            await self._spawn(exe)
        except BaseException:
            await self._kill_child()
            self._set_state(_State.STOPPED)
            raise
        self._set_state(_State.RUNNING)
        self._supervisor = asyncio.create_task(self._supervise(exe), name="embedded-redis")
        watch(self._supervisor, log, "embedded Redis's supervision", on_failure)
        return self.url

    async def stop(self) -> None:
        """Shut Redis down: SHUTDOWN, then SIGTERM, then SIGKILL after the deadline each."""
        if self._state in {_State.IDLE, _State.STOPPED}:
            return
        self._set_state(_State.STOPPING)
        if self._supervisor is not None:
            # A supervisor that died was logged by its watch: Redis is stopped all the same.
            await cancel_and_wait(self._supervisor)
            self._supervisor = None
        proc = self._proc
        if proc is not None and proc.returncode is None:
            await self._request_shutdown()
            if not await self._wait_exit(proc, self._stop_deadline_s):
                log.warning("embedded redis-server ignored SHUTDOWN; sending SIGTERM")
                self._signal(proc, signal.SIGTERM)
                if not await self._wait_exit(proc, self._stop_deadline_s):
                    log.error("embedded redis-server ignored SIGTERM; sending SIGKILL")
                    await self._kill_child()
        await self._reap_reader()
        self._proc = None
        self._set_state(_State.STOPPED)

    # -- internals ----------------------------------------------------------------------

    def last_compacted(self) -> float | None:
        """When the append-only file was last rewritten (its newest base file's time), or
        None when there is none yet."""
        times = []
        for path in (self._dir / "appendonlydir").glob("*.base.*"):
            with contextlib.suppress(FileNotFoundError):
                times.append(path.stat().st_mtime)
        return max(times, default=None)

    def _set_state(self, new: _State) -> None:
        log.debug("embedded redis: %s -> %s", self._state, new)
        self._state = new

    def _prepare_dir(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        # The socket's own mode is not honoured everywhere; the 0700 directory is what
        # keeps other local users out.
        self._dir.chmod(0o700)
        config = {
            "daemonize": "no",
            "supervised": "no",
            "port": "0",  # no TCP listener at all
            "unixsocket": str(self._socket),
            "unixsocketperm": "700",
            "protected-mode": "yes",
            "dir": str(self._dir),
            "pidfile": str(self._pidfile),
            "logfile": '""',  # stdout, which we read
            "loglevel": "notice",
            "always-show-logo": "no",
            "appendonly": "yes",
            "appendfsync": self._appendfsync,  # see the module docstring for the measured cost
            # The AOF is the durable copy; its rewrite already embeds an RDB preamble, so
            # periodic RDB snapshots would only add fork()s.
            "save": '""',
            "aof-use-rdb-preamble": "yes",
        }
        text = "".join(f"{k} {_quote(v)}\n" for k, v in config.items())
        tmp = self._conf.with_suffix(".tmp")
        tmp.write_text("# written by clinic-voice at every start; edits are lost\n" + text)
        tmp.chmod(0o600)
        if self._owner is not None:
            os.chown(self._dir, *self._owner)
            os.chown(tmp, *self._owner)
        tmp.replace(self._conf)

    async def _shutdown_orphan(self) -> None:
        """Stop a redis-server left over on our socket (e.g. the service was ``kill -9``-ed).

        Starting a second server on the same AOF would corrupt it, so the leftover is asked to
        SHUTDOWN (it flushes its AOF) before ours starts.
        """
        if not self._socket.exists():
            return
        client = _probe_client(self.url, 1)
        try:
            await client.ping()
        except (RedisError, OSError):
            return  # a stale socket file; redis-server replaces it
        finally:
            await client.aclose()
        log.warning(
            "a redis-server from an earlier run still serves %s; shutting it down", self._dir
        )
        await self._request_shutdown()
        loop = asyncio.get_running_loop()
        end = loop.time() + self._stop_deadline_s
        while loop.time() < end:
            probe = _probe_client(self.url, 0.5)
            try:
                await probe.ping()
            except (RedisError, OSError):
                return
            finally:
                await probe.aclose()
            await asyncio.sleep(0.05)
        raise EmbeddedRedisError(f"a redis-server from an earlier run on {self._socket} won't stop")

    async def _spawn(self, exe: str) -> None:
        self._lines.clear()
        # Its own process group in the service's session, ended by the kernel if the service
        # is killed -9 (no orphan keeps the AOF open): sip_config/child_process.py. A umask
        # that keeps the files it writes (the append-only file's parts, an RDB) 0600: Redis
        # makes them 0644, and the 0700 folder protects them only where they are; a backup or
        # a copy of the folder keeps the mode, and the files hold phone numbers in clear.
        self._proc = await spawn_child(
            [exe, str(self._conf)],
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            umask=0o077,
            run_as=None if self._owner is None else RunAs(*self._owner),
        )
        self._reader = asyncio.create_task(self._read_log(self._proc), name="embedded-redis-log")
        proc = self._proc
        ready = asyncio.create_task(wait_redis(self.url, self._ready_deadline_s))
        exited = asyncio.create_task(proc.wait())
        try:
            await asyncio.wait({ready, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not ready.done():
                ready.cancel()
            await cancel_and_wait(exited)
        if ready.done() and not ready.cancelled() and ready.exception() is None:
            log.info("embedded redis-server ready (pid %s) on %s", proc.pid, self._socket)
            return
        failed = await cancel_and_wait(ready)
        if failed is not None and not isinstance(failed, RedisNotReadyError):
            raise failed
        if proc.returncode is not None:
            await self._reap_reader()
            why = f"exited with code {proc.returncode}"
        else:
            why = f"did not answer PING within {self._ready_deadline_s:.1f} s"
        tail = "\n  ".join(self._lines) or "(no output)"
        raise EmbeddedRedisError(f"embedded redis-server {why}; its last lines:\n  {tail}")

    async def _read_log(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            text = line.decode("utf-8", "replace").rstrip()
            self._lines.append(text)
            level = log_level(text)
            if level is not None:  # its lines never hold keys or values
                log.log(level, "redis-server: %s", text)

    async def _reap_reader(self) -> None:
        if self._reader is None:
            return
        try:
            await asyncio.wait_for(self._reader, timeout=LOG_PIPE_REAP_S)
        except TimeoutError:
            log.warning("embedded redis-server log pipe still open after exit")
            await cancel_and_wait(self._reader)  # wait_for cancelled it already (3.11)
        self._reader = None

    async def _supervise(self, exe: str) -> None:
        loop = asyncio.get_running_loop()
        delay = self._backoff_initial_s
        started = loop.time()
        while True:
            proc = self._proc
            assert proc is not None
            code = await proc.wait()
            await self._reap_reader()
            if loop.time() - started > 30.0:
                delay = self._backoff_initial_s  # it ran fine for a while: a fresh failure
            self._set_state(_State.RESTARTING)
            log.warning(
                "embedded redis-server (pid %s) exited unexpectedly with code %s; "
                "restarting in %.1f s (last line: %s)",
                proc.pid,
                code,
                delay,
                self._lines[-1] if self._lines else "(no output)",
            )
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff_max_s)
                if self._on_restart is not None:
                    self._on_restart()
                try:
                    await self._spawn(exe)
                except (EmbeddedRedisError, OSError) as exc:
                    # OSError: fork or exec failed (EAGAIN, ENOMEM, a missing file); raised
                    # here it would end the supervision, and Redis would stay down unsaid.
                    await self._kill_child()
                    log.error(
                        "embedded redis-server restart failed, retrying in %.1f s: %s", delay, exc
                    )
                    continue
                break
            self._restarts += 1
            started = loop.time()
            self._set_state(_State.RUNNING)
            log.warning("embedded redis-server restarted (pid %s)", self.pid)

    async def _request_shutdown(self) -> None:
        client = _probe_client(self.url, SHUTDOWN_ASK_S)
        try:
            await client.shutdown()
        except (RedisError, OSError) as exc:
            # SHUTDOWN closes the connection under the client: that is success. Anything
            # else shows up as the process not exiting, handled by the caller's deadline.
            log.debug("SHUTDOWN returned %r", exc)
        finally:
            await client.aclose()

    @staticmethod
    async def _wait_exit(proc: asyncio.subprocess.Process, deadline_s: float) -> bool:
        try:
            await asyncio.wait_for(proc.wait(), timeout=deadline_s)
        except TimeoutError:
            return False
        return True

    @staticmethod
    def _signal(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            log.debug("redis-server %s already gone before %s", proc.pid, sig.name)

    async def _kill_child(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            self._signal(proc, signal.SIGKILL)
            if not await self._wait_exit(proc, self._stop_deadline_s):
                log.error(
                    "redis-server %s survived SIGKILL for %.1f s", proc.pid, self._stop_deadline_s
                )
        await self._reap_reader()


def _probe_client(url: str, timeout_s: float) -> aioredis.Redis:
    """A client for one probe: no retries, because redis-py's default retry with backoff
    would turn one refused connection (or SHUTDOWN's closed socket) into seconds of waiting."""
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


def _quote(value: str) -> str:
    if value == '""' or (value and not any(c.isspace() or c in '"\\' for c in value)):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _redact(url: str) -> str:
    """Drop a password from a Redis URL before it goes into a message."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


# How often serve compacts the embedded Redis's append-only file (BGREWRITEAOF). The AOF keeps
# every write until it is rewritten, also of keys that have expired since: phone numbers and
# sealed call records past their retention would otherwise stay on disk, and Redis's own
# trigger (the file doubling past 64 MB) may not come for months on a quiet clinic.
AOF_COMPACT_S = 86400.0
# How often serve looks whether an erasure (DELETE /v1/calls/{id}) asked for a compaction: the
# erased record leaves the disk within about this, not within a day. Every erasure of the
# period makes one rewrite, and a quiet period costs one GETDEL.
AOF_ASKED_POLL_S = 300.0


async def compact_aof(execute: Callable[..., Awaitable[Any]]) -> bool:
    """Ask Redis to rewrite its append-only file now; False (and a log line) if it could not
    (unreachable, or a rewrite already under way)."""
    try:
        await execute("BGREWRITEAOF")
    except (RedisError, OSError) as exc:
        log.warning("could not compact the embedded Redis's append-only file: %s", exc)
        return False
    log.info("embedded Redis: append-only file compaction started (expired data leaves disk)")
    return True


REWRITE_POLL_S = 0.1


async def rewrite_aof(execute: Callable[..., Awaitable[Any]], deadline_s: float) -> str:
    """Rewrite the append-only file and wait until that rewrite ended: one of this call's
    own, since one under way may have forked before the writes it must drop (a rewrite
    already under way is waited out first). An empty string when it went well, else why not
    (a Redis error is raised as it is)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while True:
        try:
            await execute("BGREWRITEAOF")  # "scheduled" while a snapshot is being made: fine
            break
        except ResponseError as exc:
            if "already in progress" not in str(exc):
                raise
        if loop.time() > end:
            return f"a rewrite under way did not end within {deadline_s:g} s"
        await asyncio.sleep(REWRITE_POLL_S)
    while True:
        info = str(await execute("INFO", "persistence"))
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        if fields.get("aof_rewrite_in_progress") == "0" and (
            fields.get("aof_rewrite_scheduled") == "0"
        ):
            status = fields.get("aof_last_bgrewrite_status", "").strip()
            return "" if status == "ok" else f"the rewrite failed ({status}): see Redis's log"
        if loop.time() > end:
            return f"the rewrite did not end within {deadline_s:g} s"
        await asyncio.sleep(REWRITE_POLL_S)


def first_compaction_in(last_compacted_at: float | None, now: float, every_s: float) -> float:
    """Seconds until the first compaction of this run: ``every_s`` after the last one (the
    append-only file's base, which every rewrite makes anew), at once when that is past.
    Counted from the start instead, a serve restarted more often than ``every_s`` (a nightly
    restart, a deploy, a crash loop) never compacted, and expired phone numbers and call
    records stayed on disk for good."""
    if last_compacted_at is None:
        return 0.0
    return max(0.0, min(every_s, last_compacted_at + every_s - now))


async def compact_aof_every(
    execute: Callable[..., Awaitable[Any]],
    every_s: float,
    *,
    first_s: float | None = None,
    asked: tuple[str, float] | None = None,
) -> None:
    """:func:`compact_aof` every ``every_s`` seconds, the first one ``first_s`` after start
    (default ``every_s``; see :func:`first_compaction_in`). With ``asked`` (a key and a
    period): also within that period of the key being set (an erasure sets it, see
    :data:`AOF_ASKED_POLL_S`), the requests of the period coalesced into one rewrite."""
    loop = asyncio.get_running_loop()
    due = loop.time() + (every_s if first_s is None else first_s)
    while True:
        wait = due - loop.time()
        if asked is not None:
            wait = min(wait, asked[1])
        await asyncio.sleep(max(0.0, wait))
        if loop.time() >= due:
            await compact_aof(execute)
            due = loop.time() + every_s
        elif asked is not None and await _take_ask(execute, asked[0]):
            if await compact_aof(execute):
                due = loop.time() + every_s  # the daily one counts from this one
            else:
                # A rewrite under way may have forked before the erasure: ask again, for
                # the next period.
                await _ask_again(execute, asked[0])


async def _take_ask(execute: Callable[..., Awaitable[Any]], key: str) -> bool:
    try:
        return await execute("GETDEL", key) is not None
    except (RedisError, OSError) as exc:  # Redis away: the daily compaction logs its own
        log.debug("could not read %s: %s", key, exc)
        return False


async def _ask_again(execute: Callable[..., Awaitable[Any]], key: str) -> None:
    try:
        await execute("SET", key, "1", "EX", int(AOF_COMPACT_S))
    except (RedisError, OSError) as exc:  # the daily compaction comes all the same
        log.warning("could not ask again for a compaction (%s): the daily one will do", exc)
