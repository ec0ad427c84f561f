"""More HTTP API processes on the same port, started, watched and restarted by ``serve``.

One Python process answers the API with one core. ``CLINIC_HTTP_WORKERS=N`` runs N-1
``clinic-voice http-worker`` processes next to ``serve``; every one binds
``CLINIC_HTTP_ADDR`` with SO_REUSEPORT, so the kernel spreads the connections over all N.
They share the Redis (the embedded one's socket is handed to them), which holds all state,
so a request may land on any of them. What a worker cannot do is SIP: the SIP workers belong
to ``serve``. A worker hands a send on a SIP channel to ``serve`` over the control socket
(``<data dir>/run/http-workers.sock``, mode 0600), which runs it as if its own API had asked.

The control socket carries JSON lines (:mod:`clinic_voice.main_link` is the worker's end):

- worker → serve: ``hello`` (its index), ``listening`` (its HTTP socket is bound: from then
  it counts in serve's /readyz), ``send`` (verification id, step, channel, whether the
  limits were counted), ``settled`` (a verification became final there: ``serve`` stops its
  sends under way, e.g. hangs up a voice call still ringing), ``moved`` (a verification
  moved on from a step there: ``serve`` stops that step's send), ``metrics`` (a snapshot, every
  second, and at once when asked), ``render`` (a /metrics scrape);
- serve → worker: ``state`` (which channels serve sends on and whether each is ready, serve's
  own readiness checks, what it is still warming up and how many call records wait on disk
  for Redis, for ``GET /v1/calls``; on connect and every half second),
  ``snapshot`` (send your metrics now: every scrape asks every worker, whichever process it
  reached, so that it counts every request answered before it), ``rendered``.

A worker whose control connection ends (``serve`` died) stops; ``serve`` restarts a worker
that exits, with backoff, except one that exits 2 leaving its line (:func:`config_error_path`;
an exit 2 without it, argparse's, is restarted as a crash): a configuration error it found (its
settings no longer parse: a time zone gone from the host's tzdata, ...), which every start
with the same settings finds again. ``serve`` then stops as for its own configuration error
and exits 2 with the worker's line (:func:`config_error_path`). A worker's counters survive
its restart (``serve`` keeps its last snapshot), so /metrics never goes backwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson

from clinic_voice.metrics import Metrics, Snapshot
from sip_config.child_process import spawn_child
from sip_config.tasks import watch
from sip_config.worker_exit import WorkerExit, as_asked, status_note
from verification.dispatcher import Dispatcher
from verification.model import Channel

log = logging.getLogger(__name__)

STATE_EVERY_S = 0.5
SNAPSHOT_DEADLINE_S = 0.5  # a worker this slow to answer counts with its last snapshot
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
STOP_DEADLINE_S = 10.0
# The line of a worker's exit at the stop: its index, pid, status and what the status says
# (sip_config/worker_exit.py); at ERROR when it did not stop as asked (serve then exits 1).
EXITED_AT_STOP = "HTTP worker %s (pid %s) exited with status %s at the stop%s"
MAX_LINE = 1 << 20  # a metrics snapshot is a few KiB
MAX_SOCKET_PATH = 107  # AF_UNIX sun_path is 108 bytes on Linux, with its NUL
CONFIG_ERROR_EXIT = 2  # clinic_voice/cli.py: a configuration error, as serve's own
MAX_NOTE = 2000  # of a worker's configuration error line, as serve repeats it


def config_error_path(control: Path, index: int) -> Path:
    """Where HTTP worker ``index`` of the ``serve`` at ``control`` leaves its configuration
    error's line when it exits 2, for ``serve`` to repeat (its stderr is serve's own)."""
    return control.parent / f"http-worker-{index}.config-error"


def control_path(data_dir: Path) -> Path:
    return data_dir / "run" / "http-workers.sock"


def encode(message: Mapping[str, Any]) -> bytes:
    return orjson.dumps(message) + b"\n"


class HttpWorkersError(RuntimeError):
    """The extra HTTP processes cannot be started."""


class HttpWorkers:
    """The extra HTTP processes of one ``serve`` and its end of their control socket."""

    def __init__(
        self,
        *,
        count: int,
        data_dir: Path,
        env: Mapping[str, str],
        dispatcher: Dispatcher,
        checks: Callable[[], dict[str, bool]],
        warming: Callable[[], list[str]],
        metrics: Metrics,
        misconfigure: Callable[[str], None],
        calls_on_disk: Callable[[], int | None] = lambda: None,
    ) -> None:
        self._count = count
        self._misconfigure = misconfigure  # Runtime.misconfigure: serve stops, exit 2
        self._calls_on_disk = calls_on_disk
        self._metrics = metrics
        self._path = control_path(data_dir)
        self._env = dict(env)
        self._dispatcher = dispatcher
        self._checks = checks
        self._warming = warming
        self._server: asyncio.AbstractServer | None = None
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # The spawns under way (fork and exec): stop() waits for them, so that a worker
        # started as the stop began is in _stopping, SIGTERMed, before it waits.
        self._spawning: set[asyncio.Task[asyncio.subprocess.Process]] = set()
        self._live: dict[int, Snapshot] = {}  # worker index -> its latest metrics
        self._links: dict[int, asyncio.StreamWriter] = {}  # worker index -> its connection
        self._asked: dict[tuple[int, int], asyncio.Future[None]] = {}  # (index, n): snapshot
        self._numbers = itertools.count(1)
        self._listening: set[int] = set()  # connected and bound to the HTTP port
        self._retired = Metrics()  # counters of worker runs that ended
        self._stop = asyncio.Event()
        self._stop_began = 0.0  # loop time
        # The processes the stop asked to end (index -> process): those running when it
        # began, and any started as it began. Not one that had died before (its keeper was
        # waiting to restart it): that end was logged as a crash.
        self._stopping: dict[int, asyncio.subprocess.Process] = {}
        self._exits_at_stop: list[WorkerExit] = []

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        if len(os.fsencode(self._path)) > MAX_SOCKET_PATH:
            raise HttpWorkersError(
                f"control socket path {self._path} is longer than {MAX_SOCKET_PATH} bytes: "
                "use a shorter CLINIC_DATA_DIR"
            )
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()  # left by a serve that was killed
        for index in range(1, self._count):
            with contextlib.suppress(FileNotFoundError):
                config_error_path(self._path, index).unlink()  # idem
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self._path), limit=MAX_LINE
        )
        os.chmod(self._path, 0o600)
        self._metrics.http_worker_snapshots_late.inc(0)  # shown from the start, as 0
        for index in range(1, self._count):
            self._spawn_task(self._keep_running(index), f"http-worker-{index}")
        log.info("HTTP: %d worker processes next to this one", self._count - 1)

    def begin_stop(self) -> None:
        """SIGTERM every worker now: they stop taking requests and give theirs in flight
        their grace while ``serve`` gives its own, not after it (one grace, not two)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._stop_began = asyncio.get_running_loop().time()
        for index, proc in self._procs.items():
            if proc.returncode is None:
                self._stopping[index] = proc
            _terminate(proc)

    async def stop(self) -> None:
        """Stop the workers (SIGKILL past STOP_DEADLINE_S from :meth:`begin_stop`), then close
        the control socket: a worker still in its grace may hand ``serve`` a send till then.
        Each worker's exit is logged (ERROR when not as asked: :attr:`exits_at_stop`)."""
        self.begin_stop()
        if self._spawning:
            # Each puts its process in _stopping and SIGTERMs it (_spawn): before, one that
            # completed after this listed the processes was not waited for, its exit never
            # judged.
            await asyncio.wait(set(self._spawning))
        procs = list(self._stopping.items())
        killed: set[int] = set()
        left_s = self._stop_began + STOP_DEADLINE_S - asyncio.get_running_loop().time()
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for _, p in procs)), max(0.0, left_s))
        except TimeoutError:
            for index, p in procs:
                if p.returncode is None:
                    log.warning(
                        "HTTP worker %d (pid %d) did not stop in %.0f s: killing it",
                        index,
                        p.pid,
                        STOP_DEADLINE_S,
                    )
                    killed.add(p.pid)
                    p.kill()
            await asyncio.gather(*(p.wait() for _, p in procs))
        for index, proc in sorted(self._stopping.items()):
            self._exited_at_stop(index, proc, killed=proc.pid in killed)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()

    def _exited_at_stop(
        self, index: int, proc: asyncio.subprocess.Process, *, killed: bool
    ) -> None:
        status = proc.returncode
        assert status is not None  # stop() waited for every process in _stopping
        note = status_note(status, killed=killed)
        if as_asked(status, signal.SIGTERM):
            log.info(EXITED_AT_STOP, index, proc.pid, status, note)
            return
        log.error(EXITED_AT_STOP, index, proc.pid, status, note)
        exit_ = WorkerExit(f"HTTP worker {index}", proc.pid, status, killed=killed)
        self._exits_at_stop.append(exit_)

    @property
    def exits_at_stop(self) -> tuple[WorkerExit, ...]:
        """The workers that did not stop as asked at :meth:`stop` (exit 0, or the SIGTERM
        itself while still loading): a defect in the worker's stop, or one killed past
        STOP_DEADLINE_S. A worker that died while serve ran was restarted, and is not here."""
        return tuple(self._exits_at_stop)

    def ready(self) -> bool:
        """Every worker is running, connected and listening on the HTTP port (it connects
        before it binds: a worker counted on connect could miss the first requests)."""
        return len(self._listening) == self._count - 1

    async def render_metrics(self) -> str:
        """/metrics of the whole service: this process, the workers, and ended worker runs.

        Every worker is asked for its numbers now: the snapshots they push every second would
        leave out the requests of the last second, and a scrape reached by another process a
        moment later could then show a counter lower than the one before (which Prometheus
        takes for a restart). A worker that does not answer within SNAPSHOT_DEADLINE_S counts
        with its last snapshot, and in ``clinic_http_worker_snapshots_late_total`` (this
        scrape's included): a scrape may then lag the requests that worker answered last."""
        n = next(self._numbers)
        loop = asyncio.get_running_loop()
        asked: dict[tuple[int, int], asyncio.Future[None]] = {}
        for index, writer in list(self._links.items()):
            if not writer.is_closing():
                asked[(index, n)] = loop.create_future()
                writer.write(encode({"op": "snapshot", "n": n}))
        self._asked.update(asked)
        try:
            if asked:
                _, late = await asyncio.wait(asked.values(), timeout=SNAPSHOT_DEADLINE_S)
                if late:
                    self._metrics.http_worker_snapshots_late.inc(len(late))
        finally:
            for key in asked:
                del self._asked[key]
        return self._metrics.render([self._retired.snapshot(), *self._live.values()])

    # -- processes -----------------------------------------------------------------------------
    def _spawn_task(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # A worker's keeper dying of a defect left it down for good, with nothing logged.
        watch(task, log, f"task {name}")

    async def _keep_running(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while not self._stop.is_set():
            started = loop.time()
            # A line left by an earlier run of this worker (one killed between its line and
            # its exit 2, say) is not this run's: only a line of this run makes its exit 2 a
            # configuration error.
            await asyncio.to_thread(_drop_note, self._path, index)
            if self._stop.is_set():
                # The stop began during that await: it has looked at _spawning already, so a
                # spawn made now would be neither waited for nor judged (a SIGTERMed worker
                # left behind, or stop()'s end meeting a process still running).
                return
            try:
                # Its own process group, so a Ctrl-C at the terminal is serve's to handle, in
                # serve's session; serve killed -9, the kernel sends it SIGTERM (it also stops
                # when the control connection ends, which covers a missing setpriv).
                spawn = asyncio.create_task(self._spawn(index), name=f"http-worker-{index}-spawn")
                self._spawning.add(spawn)
                spawn.add_done_callback(self._spawning.discard)
                proc = await spawn
            except OSError as exc:
                # fork or exec failed (EAGAIN, ENOMEM, a missing file): as a crash, not the
                # end of this worker, which would leave /readyz failing and nothing logged.
                ran_s, why = 0.0, f"could not be started ({exc})"
            else:
                code = await proc.wait()
                if self._stop.is_set():
                    return
                line = None
                if code == CONFIG_ERROR_EXIT:
                    line = await asyncio.to_thread(_take_note, self._path, index)
                if line is not None:
                    # Started again it finds the same fault, every backoff, for ever: serve
                    # stops instead, exit 2, for its service manager not to start it again.
                    self._misconfigure(
                        f"HTTP worker {index} (pid {proc.pid}) exited with {code}, a "
                        f"configuration error: {line or 'see its line above in the log'}"
                    )
                    return
                # An exit 2 without its line is no configuration error of the worker's: argparse
                # refusing the arguments serve built (a package upgraded under a running
                # serve), which a start of serve anew mends; exit 2 would keep it stopped.
                ran_s = loop.time() - started
                why = f"(pid {proc.pid}) exited with {code} after {ran_s:.1f} s"
            failures = 0 if ran_s > 60 else failures + 1
            backoff = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)]
            log.error("HTTP worker %d %s: restarting in %.1f s", index, why, backoff)
            await asyncio.sleep(backoff)

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        proc = await spawn_child(self._argv(index), env=self._env, stdin=asyncio.subprocess.DEVNULL)
        self._procs[index] = proc
        if self._stop.is_set():  # the stop began while it was being started
            self._stopping[index] = proc
            _terminate(proc)
        return proc

    def _argv(self, index: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "clinic_voice.cli",
            "http-worker",
            "--index",
            str(index),
            "--control",
            str(self._path),
        ]

    # -- control connections -------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "op": "state",
            "channels": {
                c.value: self._dispatcher.channel_ready(c)
                for c in self._dispatcher.local_channels()
            },
            "checks": self._checks(),
            "warming": self._warming(),
            "calls_on_disk": self._calls_on_disk(),
        }

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index: int | None = None
        pusher: asyncio.Task[None] | None = None
        try:
            hello = orjson.loads(await reader.readline() or b"null")
            if not isinstance(hello, dict) or hello.get("op") != "hello":
                log.warning("HTTP workers: a control connection without hello: closed")
                return
            index = int(hello["index"])
            self._links[index] = writer
            pusher = asyncio.create_task(self._push_state(writer), name=f"state-{index}")
            while line := await reader.readline():
                self._handle(index, orjson.loads(line), writer)
        except (ConnectionError, ValueError, KeyError, TypeError, orjson.JSONDecodeError) as exc:
            log.warning("HTTP worker %s: control connection failed: %s", index, exc)
        finally:
            if pusher is not None:
                pusher.cancel()
                await asyncio.gather(pusher, return_exceptions=True)
            if index is not None:
                if self._links.get(index) is writer:
                    del self._links[index]
                for (asked, _), fut in self._asked.items():
                    if asked == index and not fut.done():
                        fut.set_result(None)  # gone: its last snapshot counts
                self._listening.discard(index)
                last = self._live.pop(index, None)
                if last is not None:
                    self._retired.add(last)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _handle(self, index: int, msg: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        op = msg.get("op")
        if op == "send":
            self._dispatcher.follow_forwarded(
                str(msg["vid"]), int(msg["step"]), Channel(msg["channel"]), bool(msg["counted"])
            )
        elif op == "settled":
            self._dispatcher.stop_sends(str(msg["vid"]))
        elif op == "moved":
            self._dispatcher.stop_sends(str(msg["vid"]), step=int(msg["step"]))
        elif op == "listening":
            self._listening.add(index)
        elif op == "metrics":
            self._live[index] = msg["snapshot"]
            asked = self._asked.get((index, msg["n"])) if "n" in msg else None
            if asked is not None and not asked.done():
                asked.set_result(None)
        elif op == "render":
            self._spawn_task(self._render_for(writer, msg["n"]), f"render-{index}")
        else:
            raise ValueError(f"unknown control message {op!r}")

    async def _render_for(self, writer: asyncio.StreamWriter, n: object) -> None:
        text = await self.render_metrics()
        if not writer.is_closing():
            writer.write(encode({"op": "rendered", "n": n, "text": text}))

    async def _push_state(self, writer: asyncio.StreamWriter) -> None:
        while True:
            writer.write(encode(self.state()))
            await writer.drain()
            await asyncio.sleep(STATE_EVERY_S)


def _drop_note(control: Path, index: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        config_error_path(control, index).unlink()


def _take_note(control: Path, index: int) -> str | None:
    """The configuration error line worker ``index`` left (:func:`config_error_path`), or
    None (none: argparse's refusal of its arguments, a line it could not write)."""
    path = config_error_path(control, index)
    try:
        with path.open("rb") as f:
            text = f.read(MAX_NOTE).decode(errors="replace").strip()
        path.unlink()
    except FileNotFoundError:
        return None
    except OSError:
        return ""  # there, but unreadable: its line is in the log
    return text


def _terminate(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):  # exited, not yet reaped
            proc.terminate()
