"""``clinic-voice``: ``serve``, ``flow check``, ``flow simulate``, ``secret reseal``."""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import web

from sip_config.core_dumps import forbid_core_dumps
from sip_config.settings import Settings, SettingsError
from voice.ivr.flow import FlowSet

log = logging.getLogger("clinic_voice")

# What `clinic-voice --help` says (the docstring's reStructuredText markup showed there).
DESCRIPTION = (
    "The clinic line and phone verification service. Commands: serve, flow check, "
    "flow simulate, secret reseal; `clinic-voice COMMAND --help` for each."
)

# What `clinic-voice serve --help` says: an operator's first stop (a supervisor's exit-code
# settings, RestartPreventExitStatus=2, follow from it). The README's exit table says more;
# tests/unit/test_readme_layout.py holds the two to the same codes.
SERVE_DESCRIPTION = (
    "Run the service: the verification API and the clinic line, with its embedded Redis "
    "unless CLINIC_REDIS_URL is set. Settings come from CLINIC_* environment variables only "
    "(README: Configuration); it runs until SIGTERM or SIGINT. Exit 0: stopped by a signal, "
    "every worker stopping as asked; 1: could not start (an address in use, the data dir in "
    "use or not writable, Redis or a worker that does not start), a task it cannot do "
    "without died, or a worker did not stop as asked (starting it again may help); 2: a "
    "configuration error (a bad CLINIC_* setting, unsafe flows, a CLINIC_VOSK_MODEL that "
    "is no model, a Redis that another CLINIC_SECRET claims): every start with the same "
    "settings fails the same way until they are fixed."
)


def _setup_logging(level: str, process: str = "") -> None:
    tag = f"{process} " if process else ""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {tag}%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


async def serve(settings: Settings, flowset: FlowSet) -> None:
    """Run the service until SIGINT or SIGTERM (a second one during the stop cuts the clinic
    line's drain short: see Runtime.hurry), or until it stops on its own (Runtime.fail,
    Runtime.misconfigure: raised here as ServiceFailed, ServiceMisconfigured). The clinic
    line runs ``flowset``, the flows ``check_clinic_line`` checked: the folder is not read
    again."""
    signals = _StopSignals()
    from clinic_voice.app import RUNTIME, build_app, lock_data_dir
    from clinic_voice.wiring import channel_factories, extra_contexts

    # First of all: a second serve on this data dir must not touch the first one's Redis,
    # sockets or files before it finds out.
    lock = lock_data_dir(settings.data_dir)
    try:
        # SO_REUSEPORT (below) lets any process of this user bind the same address: another
        # serve (another data dir, an old one) would silently take half the connections.
        _refuse_taken_http_addr(settings)
        app = build_app(
            settings,
            extra_contexts=extra_contexts(settings, flowset),
            channel_factories=channel_factories(settings),
        )
        signals.again = app[RUNTIME].hurry
        app[RUNTIME].stop_on_own = signals.stop_on_own

        def started() -> None:
            log.info("clinic-voice listening on http://%s", settings.http_addr)
            print(
                f"clinic-voice: http://{settings.http_addr}  (API key: {_key_hint(settings)}; "
                f"call records key: {_calls_key_hint(settings)})",
                flush=True,
            )

        await _run_until_stopped(app, settings, started, signals.stop)
    finally:
        os.close(lock)  # everything it guards is stopped by now
    _raise_if_failed(app)


class ServiceFailed(RuntimeError):
    """The service stopped on its own: a task it cannot do without died (Runtime.fail); or
    a worker of its did not stop as asked at the stop (Runtime.worker_exits). Exit 1."""


class ServiceMisconfigured(RuntimeError):
    """The service stopped on its own: a configuration fault found while running
    (Runtime.misconfigure). Exit 2, as a start with that fault."""


def _raise_if_failed(app: web.Application) -> None:
    """Raise what made the service stop on its own, if anything did, or what went wrong in
    its stop: a configuration fault first (the exit code then says that starting it afresh
    alone will not help), then a defect: a task that died, or a SIP or HTTP worker that did
    not stop as asked (its pool logged it; a worker restarted while running counts not)."""
    from clinic_voice.app import RUNTIME

    rt = app[RUNTIME]
    if rt.misconfigured:
        raise ServiceMisconfigured(rt.misconfigured)
    defects = [f"{rt.failed} failed (its traceback is in the log)"] if rt.failed else []
    defects += [str(e) for e in rt.worker_exits]
    if defects:
        raise ServiceFailed("; ".join(defects))


def _refuse_taken_http_addr(settings: Settings) -> None:
    """Raise OSError when something already listens on CLINIC_HTTP_ADDR (with or without
    SO_REUSEPORT): a bind without SO_REUSEPORT fails then. Only ``serve`` asks, before it
    starts anything: its HTTP workers join its own socket on purpose. Any other bind error
    (an address not on this host) is left to the real bind, which names it."""
    host, port = settings.http_addr.host, settings.http_addr.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return
            raise OSError(
                exc.errno,
                f"CLINIC_HTTP_ADDR {settings.http_addr} is already in use by another process "
                "(another clinic-voice serve?)",
            ) from None


async def http_worker(settings: Settings, index: int, control: Path) -> None:
    """One extra HTTP process of a ``serve`` (started by it; see clinic_voice.http_workers);
    it also stops when ``serve`` goes away."""
    signals = _StopSignals()  # a second signal: nothing to cut short (no calls here)
    from clinic_voice.app import RUNTIME, WorkerRole, build_app

    app = build_app(settings, worker=WorkerRole(index, control))
    app[RUNTIME].stop_on_own = signals.stop_on_own
    link = app[RUNTIME].main_link
    assert link is not None

    def started() -> None:
        log.info("HTTP worker %d listening on http://%s", index, settings.http_addr)
        link.listening()

    await _run_until_stopped(app, settings, started, signals.stop, also=link.lost)
    _raise_if_failed(app)  # serve starts it again


class _StopSignals:
    """SIGINT and SIGTERM, in place before anything starts. Start-up takes seconds (Redis,
    prompts, SIP workers); a signal's default action then would end the process with none of
    its children stopped in order (exit 143).

    The first sets :attr:`stop`. Each later one calls :attr:`again`: an operator who presses
    Ctrl-C twice, or a supervisor that signals again, wants the stop sooner. A stop the
    service makes on its own (:meth:`stop_on_own`) is no signal: the operator's first
    signal after it is still the first."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.again: Callable[[], None] = lambda: None
        self._received = False
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)

    def stop_on_own(self) -> None:
        """Stop as the first signal would (Runtime.fail, Runtime.misconfigure), without
        counting as one."""
        self.stop.set()

    def _on_signal(self) -> None:
        if self._received:
            # Said every time: an operator pressing Ctrl-C again sees it was heard.
            log.info(
                "stopping already: a signal again ends the clinic line's call drain, if one runs"
            )
            self.again()
            return
        self._received = True
        self.stop.set()


async def _run_until_stopped(
    app: web.Application,
    settings: Settings,
    started: Callable[[], None],
    stop: asyncio.Event,
    also: asyncio.Event | None = None,
) -> None:
    """Serve ``app`` on CLINIC_HTTP_ADDR (shared by every HTTP process: SO_REUSEPORT) until
    ``stop`` or ``also``; then stop it in order. A stop during start-up cancels the start."""
    from clinic_voice.http import ProblemAppRunner

    # In-flight requests get SHUTDOWN_GRACE_S to finish, not aiohttp's 60 s: a request whose
    # body never completes held serve (timers, sends and all) for a minute after SIGTERM,
    # past any container's stop grace period.
    runner = ProblemAppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE_S
    )
    watcher: asyncio.Task[bool] | None = None
    if also is not None:
        watcher = asyncio.create_task(also.wait())
        watcher.add_done_callback(lambda _: stop.set())
    try:
        # Inside the try: a part that fails to start (or is cancelled by a stop) must not
        # leave the parts started before it running (SIP workers, Redis, tasks); the cleanup
        # stops them in reverse order.
        if await _unless_stopped(_start(runner, settings), stop):
            _settle_gc()
            started()
            await stop.wait()
    finally:
        log.info("shutting down")
        if watcher is not None:
            watcher.cancel()
        await runner.cleanup()


async def _start(runner: web.AppRunner, settings: Settings) -> None:
    await runner.setup()
    site = web.TCPSite(
        runner, settings.http_addr.host, settings.http_addr.port, reuse_port=True, backlog=1024
    )
    await site.start()


async def _unless_stopped(start: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Run ``start`` unless ``stop`` comes first, which cancels it. Whether it started and
    no stop came; a start error is raised all the same."""
    task = asyncio.create_task(start, name="start-up")
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            log.info("stopped during start-up: cancelling it")
            task.cancel()
            await asyncio.wait({task})  # the parts it started are the caller's to clean up
    if task.cancelled():
        return False
    task.result()
    return not stop.is_set()


SHUTDOWN_GRACE_S = 5.0


def _start_errors() -> tuple[type[Exception], ...]:
    from clinic_voice.app import DataDirInUse
    from clinic_voice.http_workers import HttpWorkersError
    from clinic_voice.redis_server import EmbeddedRedisError
    from voice.sip.pool import SipStartError

    # OSError: an address in use, a data dir that cannot be written, ...; SipStartError: a
    # SIP worker's port taken (or the workers slower than their start timeout).
    return (DataDirInUse, HttpWorkersError, EmbeddedRedisError, SipStartError, OSError)


def _start_config_errors() -> tuple[type[Exception], ...]:
    """Configuration faults found only once start-up reaches them: exit 2, as a
    SettingsError (and as the same fault found while running: ServiceMisconfigured). The
    SettingsErrors among them are those that need the data dir (the generated secret listed
    in CLINIC_PREVIOUS_SECRETS, a generated key equal to the other kind's) or vosk (a
    CLINIC_VOSK_MODEL that vosk refuses: clinic_voice/clinic_line.py)."""
    from clinic_voice.shared_secret import SecretMismatch

    return (SecretMismatch, SettingsError)


def _settle_gc() -> None:
    """After start-up: move what exists now out of the collector's sight (it lives as long as
    the process) and collect the young generation less often. A request allocates a few
    hundred objects and frees nearly all by reference counting; with the default threshold
    (700) the collector ran every few requests (bench/api.py)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def _key_hint(settings: Settings) -> str:
    if settings.api_keys:
        return "from CLINIC_API_KEYS"
    return str((settings.data_dir / "api-key").resolve())


def _calls_key_hint(settings: Settings) -> str:
    if settings.calls_api_keys:
        return "from CLINIC_CALLS_API_KEYS"
    return str((settings.data_dir / "calls-api-key").resolve())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clinic-voice", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "serve",
        help="run the service (settings from CLINIC_* variables)",
        description=SERVE_DESCRIPTION,
    )
    worker = sub.add_parser(
        "http-worker", help="internal: one extra HTTP process, started by serve"
    )
    worker.add_argument("--index", type=int, required=True)
    worker.add_argument("--control", type=Path, required=True)
    flow = sub.add_parser("flow", help="IVR flow tools")
    flow_sub = flow.add_subparsers(dest="flow_command", required=True)
    # The tools' own argument lists, so that --help shows them all and a bad option fails
    # here. Importing them costs serve nothing: the app imports the flow engine anyway.
    from voice.ivr import check as flow_check
    from voice.ivr import simulate as flow_simulate

    check = flow_sub.add_parser(
        "check",
        help="check flows: schema, targets, safety rules",
        description=flow_check.DESCRIPTION,
    )
    flow_check.add_arguments(check)
    sim = flow_sub.add_parser(
        "simulate",
        help="run a flow in the terminal",
        description=flow_simulate.HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    flow_simulate.add_arguments(sim)
    secret = sub.add_parser("secret", help="CLINIC_SECRET tools")
    secret_sub = secret.add_subparsers(dest="secret_command", required=True)
    from clinic_voice import secret_reseal

    secret_sub.add_parser(
        "reseal",
        help="seal what a previous secret sealed anew under CLINIC_SECRET",
        description=secret_reseal.DESCRIPTION,
    )
    args = parser.parse_args(argv)
    if args.command in {"serve", "http-worker", "secret"}:
        # Before anything is read or started: the processes hold health data and secrets,
        # and what they start (redis-server, the workers) inherits the limit.
        forbid_core_dumps()

    if args.command == "secret":
        return _secret_reseal()

    if args.command in {"serve", "http-worker"}:
        worker = args.command == "http-worker"
        if worker:
            # serve starts each worker in a process group of its own (http_workers.py), which
            # a terminal treats as a background job: with `stty tostop` its first line to
            # serve's stderr would stop it (SIGTTOU). Ignored, the write goes through.
            signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        flowset = FlowSet({})  # a worker runs no clinic line
        try:
            settings = Settings.from_env()
            if not worker:  # a worker's settings were checked by the serve that started it
                from clinic_voice.app import check_settings
                from clinic_voice.clinic_line import check_clinic_line

                check_settings(settings)
                flowset = check_clinic_line(settings)
        except SettingsError as exc:
            name = "clinic-voice http-worker" if worker else "clinic-voice"
            print(f"{name}: configuration error: {exc}", file=sys.stderr)
            if worker:
                _leave_config_error(args.control, args.index, str(exc))
            return 2
        _setup_logging(settings.log_level, f"http-worker-{args.index}" if worker else "")
        # uvloop: the same asyncio API, about twice the request rate of the default loop here
        # (measured with bench/api.py); the pure-Python loop remains for tests.
        try:
            uvloop.run(
                http_worker(settings, args.index, args.control)
                if worker
                else serve(settings, flowset)
            )
        except _start_config_errors() as exc:
            log.error("cannot start: %s", exc)
            print(f"clinic-voice {args.command}: configuration error: {exc}", file=sys.stderr)
            if worker:
                _leave_config_error(args.control, args.index, str(exc))
            return 2
        except _start_errors() as exc:
            log.error("cannot start: %s", exc)
            print(f"clinic-voice {args.command}: cannot start: {exc}", file=sys.stderr)
            return 1
        except ServiceMisconfigured as exc:
            print(f"clinic-voice {args.command}: configuration error: {exc}", file=sys.stderr)
            if worker:
                _leave_config_error(args.control, args.index, str(exc))
            return 2
        except ServiceFailed as exc:
            print(f"clinic-voice {args.command}: stopped: {exc}", file=sys.stderr)
            return 1
        return 0
    try:
        if args.flow_command == "check":
            return flow_check.run(args)
        return flow_simulate.run(args)
    except BrokenPipeError:
        # Piped into head (or a pager quit early): the reader left. Not a traceback; and
        # stdout to /dev/null, or Python's flush at exit fails on the same pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _leave_config_error(control: Path, index: int, text: str) -> None:
    """An HTTP worker's exit 2: its line for ``serve``, which stops with it instead of
    starting the worker again (clinic_voice/http_workers.py). Without it (not written) serve
    takes the exit 2 for a crash, as argparse's, and starts the worker again after a backoff."""
    from clinic_voice.http_workers import config_error_path

    try:
        config_error_path(control, index).write_text(text)
    except OSError as exc:
        log.warning("the configuration error was not left for serve: %s", exc)


def _secret_reseal() -> int:
    """``clinic-voice secret reseal``, with the settings as ``serve`` reads them."""
    from clinic_voice.app import current_secrets
    from clinic_voice.secret_reseal import DataDirRefused, data_dir_owner, reseal

    try:
        settings = Settings.from_env()
        # First: a user who must not write in the data dir reads nothing there either.
        owner = data_dir_owner(settings, os.geteuid())
        secret, previous = current_secrets(settings)
    except SettingsError as exc:
        print(f"clinic-voice secret reseal: configuration error: {exc}", file=sys.stderr)
        return 2
    except DataDirRefused as exc:
        print(f"clinic-voice secret reseal: {exc}", file=sys.stderr)
        return 2
    _setup_logging(settings.log_level)
    return uvloop.run(reseal(settings, secret, previous, sys.stdout, owner=owner))


if __name__ == "__main__":
    raise SystemExit(main())
