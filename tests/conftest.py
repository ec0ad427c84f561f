"""Shared, generic test fixtures: free ports, a real Redis, and a loop-blocking watchdog.

- :func:`free_port` gives a port free for both TCP and UDP on 127.0.0.1.
- ``redis_server`` is a real ``redis-server`` (AOF, ``appendfsync always``) on a free port, its
  log in ``tmp_path`` (its AOF on tmpfs, see :class:`RedisServer`), with ``kill9()`` and
  ``restart()`` for crash tests.
- ``no_blocking`` (request it by name, or ``@pytest.mark.usefixtures("no_blocking")``) fails an
  async test if any callback held the event loop for more than 100 ms.
- Every test fails (at its teardown) when a SIP pool of this process saw one of its workers
  exit with a status other than 0 during the pool's stop (pjsua aborting at the worker's
  teardown, a kill for not stopping), in the test or in a fixture's teardown (a module's:
  at its last test). A test that brings that about on purpose says so with
  ``@pytest.mark.sip_worker_exit_ok``. A ``serve`` of its own logs such exits to its log
  (and exits 1 for them): :func:`workers_exited_non_zero` finds them there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import mmap
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from sip_config.settings import HostPort, SipSettings
from voice.sip.pool import WORKER_EXITED_AT_STOP, WORKER_NOT_STARTED_AT_STOP

log = logging.getLogger(__name__)

# The budget the house gives one event-loop step (STYLE.md habit 8).
LOOP_BLOCK_LIMIT_S = 0.1


class _WorkerExitsAtStop(logging.Handler):
    """The pools' lines (voice/sip/pool.py) saying a worker exited with a status other than
    0 during the pool's stop, or that a restart could not be started at it: both make
    ``serve`` exit 1. Only logged, a worker that aborted at its stop passed every test:
    pjsua2's assertion on a Call freed after libDestroy (-6) went unseen that way."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args  # (index, pid, status, note) of an exit
        exited_non_zero = (
            record.msg == WORKER_EXITED_AT_STOP and isinstance(args, tuple) and args[2] != 0
        )
        if exited_non_zero or record.msg == WORKER_NOT_STARTED_AT_STOP:
            self.lines.append(record.getMessage())


_worker_exits = _WorkerExitsAtStop()
logging.getLogger("voice.sip.pool").addHandler(_worker_exits)


def workers_exited_non_zero(log_text: str) -> list[str]:
    """The lines of a ``serve`` of its own (``log_text``, its log) saying a SIP worker exited
    non-zero at the stop, or could not be restarted at it: that process's pool logged them,
    not this one's."""
    numbers = re.escape(WORKER_EXITED_AT_STOP).replace("%s", r"(-?\d+)", 3)
    line = re.compile(numbers.replace("%s", r"[^\n]*"))  # the note, to the line's end
    exited = [m.group(0) for m in line.finditer(log_text) if m.group(3) != "0"]
    # A restart that could not be started at the stop: serve exits 1 for it too.
    not_started = re.compile(re.escape(WORKER_NOT_STARTED_AT_STOP).replace("%s", r"[^\n]*"))
    return exited + [m.group(0) for m in not_started.finditer(log_text)]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, None, None]:
    """Fail the test in whose setup, run or teardown (its fixtures', and a module's at the
    module's last test) a SIP worker exited non-zero at its pool's stop, unless it is marked
    ``sip_worker_exit_ok``. The worker's stderr (inherited) is in the test's captured
    output: it says why (pjsua's assertion, Python's fatal error)."""
    try:
        yield
    finally:
        lines, _worker_exits.lines = _worker_exits.lines, []
    if lines and item.get_closest_marker("sip_worker_exit_ok") is None:
        pytest.fail(
            "a SIP worker exited non-zero at its pool's stop (its stderr is in the captured "
            "output; mark the test sip_worker_exit_ok if it does so on purpose): "
            + "; ".join(lines),
            pytrace=False,
        )


def sip_settings(workers: int = 2, **changes: object) -> SipSettings:
    """SIP settings for a pool on loopback with free ports; ``changes`` override fields."""
    base = SipSettings(
        addr=HostPort("127.0.0.1", 0),
        workers=workers,
        route="",
        registrar="",
        user="",
        password="",
        flashcall_prefix="",
        flashcall_ring_s=3.0,
        flashcall_interception_s=20,
        voice_otp_keypress=True,
        voice_otp_from="",
        caller_slots=0,  # first come, first served, unless a test keeps slots for callers
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def free_port(count: int = 1) -> int:
    """A port that is free for both TCP and UDP on 127.0.0.1 right now, with the ``count`` - 1
    ports after it.

    SIP peers listen on both transports, so a port free for only one of them is no use; a
    service's SIP workers and flash-call agent take the ports after ``CLINIC_SIP_ADDR``. The
    ports are released before returning: bind them soon, and retry on ``EADDRINUSE``.

    Drawn below the kernel's ephemeral range: there, every outgoing connection takes a port
    (and holds it in TIME_WAIT for a minute after), so a busy machine can fill the range and
    take a port between this check and its bind.
    """
    low = _ephemeral_low()
    for _ in range(200):
        if low - count > _FIRST_PORT:
            port = random.randrange(_FIRST_PORT, low - count + 1)
        else:  # no room below it: a port the kernel picks
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                tcp.bind(("127.0.0.1", 0))
                port = tcp.getsockname()[1]
            if port + count > 65536:
                continue
        if all(_free_both(p) for p in range(port, port + count)):
            return port
    raise RuntimeError(f"no {count} port(s) free for both TCP and UDP after 200 tries")


_FIRST_PORT = 10_000  # above the well-known and most registered services' ports

# sipp's options for its other sockets, besides its SIP port (-p, from free_port). Its
# media (RTP echo: a port and the one two above, from 6000) and control socket (UDP, from
# 8888) are left to sipp: while one is taken it moves up (sipp 3.6.1: twelve started at
# once bound 6000-6046 and 8888-8899), whereas a port given with -mp or -cp gets one try
# and a taken one ends the run (exit 254, "Unable to bind ..."), so a free_port() there
# would trade no collision for a race. -ci keeps the control socket, which takes commands
# ("q" quits), on loopback: by default it listens on every address of the host.
SIPP_OTHER_SOCKETS = ("-ci", "127.0.0.1")


def _ephemeral_low() -> int:
    """The first port of the kernel's range for outgoing connections (Linux's 32768 if unread)."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_both(port: int) -> bool:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
    ):
        try:
            tcp.bind(("127.0.0.1", port))
            udp.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_until(predicate: Callable[[], bool], deadline_s: float, what: str) -> None:
    """Poll ``predicate()`` (sync) every 20 ms until true; fail the test naming ``what``."""
    end = time.monotonic() + deadline_s
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {deadline_s:.1f} s waiting for {what}")
        pause.wait(0.02)


# appendfsync always costs about 1 ms a write on this machine's ext4 (2000 SETs: 1.96 s; on
# tmpfs: 0.07 s), and a run of the suite makes tens of thousands of writes. On tmpfs fsync
# costs nothing, and an acknowledged write still survives kill -9 and SHUTDOWN as it does on
# disk (the kernel holds the file): only a power cut would tell them apart, and no test makes one.
_TMPFS = Path("/dev/shm")


def _aof_dir(owner: object, data_dir: Path) -> Path:
    """A folder of its own on tmpfs for ``owner``'s AOF (removed with ``owner``, or at exit);
    ``data_dir`` where there is no tmpfs to write to."""
    if not (_TMPFS.is_dir() and os.access(_TMPFS, os.W_OK)):
        return data_dir
    folder = Path(tempfile.mkdtemp(prefix="clinic-test-redis-", dir=_TMPFS))
    weakref.finalize(owner, shutil.rmtree, folder, ignore_errors=True)
    return folder


class RedisServer:
    """A real ``redis-server`` for one test: TCP on 127.0.0.1, AOF fsynced on every write.

    Its log is ``data_dir/redis.log``; its AOF is in a folder of its own on tmpfs when the
    machine has one (``_TMPFS``), else in ``data_dir``.

    The methods block for at most a few tens of milliseconds (``restart`` waits for PING);
    from a test that uses ``no_blocking``, call them through ``asyncio.to_thread``.
    """

    START_DEADLINE_S = 10.0
    STOP_DEADLINE_S = 5.0

    def __init__(self, data_dir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        self._exe = exe
        self.data_dir = data_dir
        self._aof_dir = _aof_dir(self, data_dir)
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = data_dir / "redis.log"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The running server's pid, or None."""
        return None if self._proc is None or self._proc.poll() is not None else self._proc.pid

    def start(self) -> None:
        """Start on a fresh free port (retried if the port was taken meanwhile)."""
        last = ""
        for _ in range(5):
            self.port = free_port()
            try:
                self._spawn()
                return
            except _StartFailed as exc:
                last = str(exc)
        pytest.fail(f"redis-server would not start after 5 ports: {last}")

    def restart(self) -> None:
        """Start again on the same data dir and port (after :meth:`kill9` or :meth:`stop`)."""
        if self.pid is not None:
            raise AssertionError("restart() of a redis-server that is still running")
        try:
            self._spawn()
        except _StartFailed as exc:
            pytest.fail(f"redis-server restart on port {self.port} failed: {exc}")

    def kill9(self) -> None:
        """SIGKILL the server (no chance to flush anything) and reap it."""
        proc = self._proc
        assert proc is not None, "kill9() before start()"
        proc.send_signal(signal.SIGKILL)
        try:
            proc.wait(timeout=self.STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"redis-server {proc.pid} survived SIGKILL for {self.STOP_DEADLINE_S} s")

    def fill(self) -> None:
        """Make the server full under ``noeviction``, as an operator's memory limit would:
        filled up to a limit, which is then held below what it holds (its use moves a little
        as clients come and go). Writes are refused until :meth:`unfill`."""
        client = _probe_client(self.port, 2.0)
        try:
            client.config_set("maxmemory-policy", "noeviction")
            used = int(client.info("memory")["used_memory"])
            client.config_set("maxmemory", str(used + 64 * 1024))
            filler = "x" * 8192
            try:
                for i in range(1000):  # 8 MiB at most: the limit is reached long before
                    client.set(f"test:filler:{i}", filler)
            except redis.exceptions.ResponseError as exc:
                assert "maxmemory" in str(exc), exc
            else:
                raise AssertionError("1000 writes of 8 KiB fitted in 64 KiB")
            client.config_set("maxmemory", str(used // 2))
        finally:
            client.close()

    def unfill(self) -> None:
        """Lift the memory limit :meth:`fill` set: writes are taken again."""
        client = _probe_client(self.port, 2.0)
        try:
            client.config_set("maxmemory", "0")
        finally:
            client.close()

    def stop(self) -> None:
        """SHUTDOWN, then SIGTERM/SIGKILL after a deadline. Safe to call twice."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        client = _probe_client(self.port, 2.0)
        try:
            client.shutdown()
        except RedisError as exc:
            # SHUTDOWN drops the connection under the client: the expected answer.
            log.debug("SHUTDOWN answered %r", exc)
        finally:
            client.close()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                proc.wait(timeout=self.STOP_DEADLINE_S)
                return
            except subprocess.TimeoutExpired:
                proc.send_signal(sig)
        try:
            proc.wait(timeout=self.STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"redis-server {proc.pid} would not stop")

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log, for failure messages."""
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def _spawn(self) -> None:
        argv = [
            self._exe,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self._aof_dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self._log),
        ]  # fmt: skip
        with self._log.open("ab") as out:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        end = time.monotonic() + self.START_DEADLINE_S
        pause = threading.Event()
        client = _probe_client(self.port, 1.0)
        try:
            while True:
                if self._proc.poll() is not None:
                    raise _StartFailed(
                        f"exited with {self._proc.returncode}; log:\n{self.log_tail()}"
                    )
                try:
                    if client.ping():
                        return
                except (RedisError, OSError) as exc:
                    # Not listening yet, or still loading the AOF: poll again.
                    log.debug("redis-server not ready: %r", exc)
                if time.monotonic() > end:
                    self._proc.kill()
                    self._proc.wait(timeout=self.STOP_DEADLINE_S)
                    raise _StartFailed(f"no PING answer in {self.START_DEADLINE_S} s")
                # It answers within a few ms of its start: a 10 ms pause here made each of
                # test_prop_erasure.py's ~750 restarts wait 14 ms (10.8 s of a 75 s run).
                pause.wait(0.002)
        finally:
            client.close()


def _probe_client(port: int, timeout_s: float) -> redis.Redis:
    # No retries: redis-py's default backoff turns a refused connection into seconds.
    return redis.Redis(
        host="127.0.0.1", port=port, socket_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
    )


class _StartFailed(Exception):
    pass


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server in ``tmp_path/redis``; stopped (never left running) afterwards."""
    data = tmp_path / "redis"
    data.mkdir()
    server = RedisServer(data)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _run_delay_s() -> float:
    """Seconds this thread has spent runnable but waiting for a CPU (Linux schedstat)."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


@contextlib.contextmanager
def watch_loop_blocking(
    loop: asyncio.AbstractEventLoop, limit_s: float = LOOP_BLOCK_LIMIT_S
) -> Iterator[list[str]]:
    """Collect, into the yielded list, every loop step that held the loop longer than ``limit_s``.

    A step's time is its wall time minus the time the kernel kept the thread waiting for a CPU
    (``/proc/thread-self/schedstat``): on two cores shared with redis-server, sipp and pjsua
    workers a step can be descheduled for 100 ms without blocking anything, while a blocking
    call (``time.sleep``, a synchronous socket read, CPU work) still counts in full. Time in
    Python's cyclic garbage collector is not counted either (but shown): a full collection over
    the test process's heap, the objects of a thousand tests, once held a step 103 ms; the
    service freezes its start-up heap out of collection (``clinic_voice/cli.py``). Debug mode
    stays on: it also raises on loop calls from the wrong thread, which is wanted in tests.

    A step over the limit counts when the loop's thread spent at least half the limit on the
    CPU in it (``time.thread_time``: work done on the loop), or when it held the loop five
    times the limit whatever it did (a blocking wait that long is a fault however it came
    about). A step that waited, not worked, between the two is not counted: the interpreter
    lock held by another thread of the test process (a peer, a softphone, a thread's work),
    or a new executor thread's start, showed as 106 and 146 ms steps with 1 ms of CPU under
    a full run's load. Blocking calls in async code are ruff's ``ASYNC`` rules' to find.

    The loop's ``get_debug()`` answers False meanwhile (its ``_debug``, which the checks
    read, stays True): that answer is what makes every Future and Task record the stack it
    was made on (the C Future calls ``traceback.extract_stack()``: the whole stack, each
    line read through linecache, each file stat()ed). That took half of test_api_model.py's
    time (32 of 62 s under a profiler) and tells nothing a failing test needs: it only adds a
    "created at" to reports of tasks destroyed while pending.
    """
    records: list[str] = []
    gc_s = [0.0, 0.0]  # total collection time so far, start of the current one

    def gc_timer(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_s[1] = time.perf_counter()
        else:
            gc_s[0] += time.perf_counter() - gc_s[1]

    was_debug, was_slow = loop.get_debug(), loop.slow_callback_duration
    loop.set_debug(True)
    loop.get_debug = lambda: False  # type: ignore[method-assign]  # no source tracebacks
    loop.slow_callback_duration = 3600.0  # measured below instead, without scheduler delay
    original = asyncio.events.Handle._run

    def timed_run(handle: asyncio.events.Handle) -> None:
        wall0, delay0, gc0 = time.perf_counter(), _run_delay_s(), gc_s[0]
        cpu0 = time.thread_time()
        original(handle)
        wall = time.perf_counter() - wall0
        if wall > limit_s:
            collecting = gc_s[0] - gc0
            held = wall - (_run_delay_s() - delay0) - collecting
            cpu = time.thread_time() - cpu0 - collecting
            if held > limit_s and (cpu >= limit_s / 2 or held > 5 * limit_s):
                records.append(
                    f"{handle!r} held the loop {held:.3f} s (wall {wall:.3f} s, "
                    f"on the CPU {cpu:.3f} s, garbage collection {collecting:.3f} s)"
                )

    asyncio.events.Handle._run = timed_run  # type: ignore[method-assign,assignment]
    gc.callbacks.append(gc_timer)
    try:
        yield records
    finally:
        gc.callbacks.remove(gc_timer)
        asyncio.events.Handle._run = original  # type: ignore[method-assign]
        del loop.get_debug
        loop.set_debug(was_debug)
        loop.slow_callback_duration = was_slow


@pytest.fixture
async def no_blocking() -> AsyncIterator[None]:
    """Fail the (async) test if any event-loop step took longer than 100 ms."""
    with watch_loop_blocking(asyncio.get_running_loop()) as blocked:
        yield
    if blocked:
        pytest.fail(
            f"the event loop was blocked > {LOOP_BLOCK_LIMIT_S * 1000:.0f} ms:\n  "
            + "\n  ".join(blocked)
        )


def proc_status(pid: int) -> dict[str, str]:
    """``/proc/<pid>/status`` as field -> value (``Umask``: ``0077``; ``Uid``: real, effective,
    saved and filesystem ids, tab-separated; ``Groups``: the supplementary groups)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


class TouchedPages:
    """64 MiB of private memory this process has written, page by page, to tell a child
    started by ``fork()`` from one started by ``vfork()`` (behaviour, not a spy): fork
    write-protects every page the parent has touched (copy on write), so the parent's next
    write to each one faults once, even after the child has exec'd; vfork shares the memory
    and copies no page table, and the writes fault not at all. Huge pages are off for the
    mapping, so the count is one a page (THP would fault once per 2 MiB).

    ``faults_on_rewrite()``: this thread's minor faults while it writes every page again
    (about PAGES after a fork of this process since the last call; a few at most after a
    vfork). Call it on the thread that spawns (the event loop's). Build it off the loop
    (``await asyncio.to_thread(TouchedPages)``) where the loop is watched (``no_blocking``):
    its first write of the 64 MiB held one loop step 60-79 ms of CPU, most of the 100 ms
    allowed."""

    PAGES = 16384

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, self.PAGES * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE)
        # A kernel built without THP refuses the advice (EINVAL): it has no huge pages to
        # turn off, and the count is one a page anyway.
        with contextlib.suppress(OSError):
            self._map.madvise(mmap.MADV_NOHUGEPAGE)
        self.faults_on_rewrite()

    def faults_on_rewrite(self) -> int:
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for offset in range(0, self.PAGES * mmap.PAGESIZE, mmap.PAGESIZE):
            self._map[offset] = (self._map[offset] + 1) % 256
        return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before

    def close(self) -> None:
        self._map.close()
