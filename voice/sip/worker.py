"""One SIP worker process: the pjsua2 owner thread, driven by the pool over stdin/stdout.

Run as ``python -m voice.sip.worker --host 127.0.0.1 --port 5061 [--user U]
[--registrar sip:pbx] [--realm=R]`` (the password comes from ``CLINIC_SIP_PASSWORD`` in the
environment, never argv; the realm, ``CLINIC_SIP_REALM``, is no secret: every challenge names
it). Commands arrive as JSON lines on stdin, events leave as JSON lines on stdout
(:mod:`voice.sip.protocol`); logs go to stderr. The pool starts workers with
``asyncio.create_subprocess_exec``: a fresh interpreter, never a fork of a threaded parent.

pjsua runs on this process's main thread (its owner): run the queued commands, pump pjsua,
write the events. A small reader thread (which never touches pjsua) reads stdin, queues each
command and wakes the owner by sending a SIP keep-alive (CRLF CRLF, RFC 5626 section 4.4.1,
which pjsip discards) to the worker's own UDP port, so ``libHandleEvents`` returns at once. The
media thread wakes it the same way when a play ends. The pump therefore waits until the
nearest ring or answer deadline, 20 ms while a call streams audio to a listener, 60 ms while
a call has media (its keypad digits wait for the next pump), else 500 ms
(:meth:`Engine.pump_ms`); a command is on the wire within a millisecond or two either way.
Before the wake-up, 64 idle workers polling every 5 ms took 0.7 of a core, and a worker
with calls polling every 5 ms spent about a third of its CPU doing so
(bench/asterisk_compare.py). EOF on stdin (the pool is gone) stops the worker.

SIGTERM (systemd's control-group stop, ``pkill``, an operator, or the kernel's parent-death
signal when ``serve`` is killed -9: sip_config/child_process.py) is a request to stop. With
``--stop-wait-s`` (the pool passes it) the worker tells the pool (:class:`StopAsked`) and goes
on carrying out its commands while ``serve`` closes its calls as at its own stop (the drain,
the closing notice, an urgent caller put through to the nurse), then stops at the pool's
Shutdown. It stops by itself, as the pool's Shutdown does (:class:`Stopping` first, its calls
hung up: BYE, or CANCEL while ringing; exit 0), at once when ``serve`` is gone (its parent
changed: the parent-death signal; or its stdin's end of file), at a second SIGTERM (someone
means now), or when that wait passes with no Shutdown (``serve`` wedged). Without a handler
it died of the signal, its calls dropped with no BYE and ``serve`` counting the exit a defect;
with the handler alone it hung up at once, its callers told nothing.
pjsua2 must not be touched from a signal handler (Python runs it on the main thread, the
owner, but between any two bytecodes, a pjsua callback's included), so the handler only sets
a flag; the C-level handler writes the signal's number to a pipe (``signal.set_wakeup_fd``)
that the reader thread watches with stdin, and the reader queues the stop and wakes the pump
as it does for a command.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

from sip_config.core_dumps import forbid_core_dumps
from voice.sip.pjsua import Engine, EngineConfig, ListenError
from voice.sip.protocol import (
    CannotListen,
    Event,
    ProtocolError,
    StopAsked,
    Stopping,
    decode,
    encode,
)

log = logging.getLogger(__name__)

IDLE_PUMP_MS = 500  # the longest wait: commands and play ends wake the pump, pjsip timers
# and our ring deadlines bound it (Engine.pump_ms)
_KEEPALIVE = b"\r\n\r\n"
_EOF = object()
_SIGTERM = object()  # queued by the reader when the wake-up pipe says SIGTERM came


class _Terminated:
    """SIGTERM's Python-level handler: a count the owner loop reads, nothing more (it may run
    inside a pjsua callback). The wake-up pipe is what ends the pump's wait at once."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, signum: int, frame: object) -> None:
        self.count += 1


class _Out:
    """Buffers events and writes them in one go (blocking: the pool reads continuously)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf: list[bytes] = []

    def emit(self, event: Event) -> None:
        self._buf.append(encode(event))

    def flush(self) -> None:
        if not self._buf:
            return
        data = memoryview(b"".join(self._buf))
        self._buf.clear()
        while data:
            n = os.write(self._fd, data)
            data = data[n:]


CANNOT_LISTEN_EXIT = 3  # its port cannot be bound: CannotListen said which and why


def _reader(
    in_fd: int,
    commands: queue.SimpleQueue[object],
    wake: Callable[[], None],
    signal_fd: int | None = None,
) -> None:
    """Read command lines from the pool (blocking, on its own thread) and wake the owner.
    ``signal_fd``: the read end of the signal wake-up pipe; SIGTERM's byte there queues
    :data:`_SIGTERM`."""
    pending = b""
    poller = select.poll()
    poller.register(in_fd, select.POLLIN)
    if signal_fd is not None:
        poller.register(signal_fd, select.POLLIN)
    while True:
        ready = {fd for fd, _ in poller.poll()}
        if signal_fd is not None and signal_fd in ready:
            for _ in range(_drain_signals(signal_fd)):
                commands.put(_SIGTERM)
            wake()
            if in_fd not in ready:
                continue
        try:
            chunk = os.read(in_fd, 1 << 16)
        except OSError as exc:
            log.error("reading commands failed: %s", exc)
            chunk = b""
        if not chunk:
            commands.put(_EOF)
            wake()
            return
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            try:
                commands.put(decode(line))
            except ProtocolError as exc:
                log.error("bad command from the pool: %s", exc)
        wake()


def _drain_signals(fd: int) -> int:
    """Read what the wake-up pipe holds (one byte per signal, its number); how many of them
    are SIGTERM."""
    try:
        data = os.read(fd, 512)
    except BlockingIOError:
        return 0
    return data.count(signal.SIGTERM)


def run(
    config: EngineConfig,
    in_fd: int,
    out_fd: int,
    *,
    terminated: _Terminated | None = None,
    signal_fd: int | None = None,
    stop_wait_s: float = 0.0,
) -> int:
    """Serve commands from ``in_fd`` until Shutdown, EOF or SIGTERM; returns the exit status.
    ``terminated``: SIGTERM's handler (its count); ``signal_fd``: the read end of the signal
    wake-up pipe; ``stop_wait_s``: how long a SIGTERM waits for the pool's Shutdown (0: it
    does not, the calls are hung up at once). See the module's docstring."""
    out = _Out(out_fd)
    parent = os.getppid()  # another one later: serve is gone (the parent-death signal)
    waker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target: tuple[str, int] | None = None

    def wake() -> None:
        if target is None:
            return
        try:
            waker.sendto(_KEEPALIVE, target)
        except OSError as exc:  # the pump still wakes within IDLE_PUMP_MS
            log.debug("wake-up not sent: %s", exc)

    engine = Engine(config, out.emit, wake, out.flush)
    try:
        engine.start()
    except ListenError as exc:
        # The pool stops the start at once with this line, rather than restart a worker
        # whose port another process holds until its 30 s start timeout.
        log.error("%s", exc)
        out.emit(CannotListen(exc.addr, exc.reason))
        out.flush()
        return CANNOT_LISTEN_EXIT
    target = (config.host, engine.port)
    out.emit(engine.status())
    out.flush()
    commands: queue.SimpleQueue[object] = queue.SimpleQueue()

    threading.Thread(
        target=_reader, args=(in_fd, commands, wake, signal_fd), name="commands", daemon=True
    ).start()
    try:
        sigterms = 0  # SIGTERMs seen so far
        asked_at: float | None = None  # when StopAsked went (monotonic)
        while not engine.stopping:
            stop = False
            queued = 0
            while True:
                try:
                    cmd = commands.get_nowait()
                except queue.Empty:
                    break
                if cmd is _EOF:
                    log.info("pool closed the pipe: stopping")
                    stop = True
                    break
                if cmd is _SIGTERM:
                    # Commands after it are still carried out: the closing notice's Play,
                    # the transfer of an urgent caller, the hang-up that follows.
                    queued += 1
                    continue
                engine.handle(cmd)  # type: ignore[arg-type]
            # The handler's count is the truth (the pipe's bytes may come before or after
            # it); a byte alone when the handler has not run yet, or run() has none (tests).
            counted = terminated.count if terminated is not None else 0
            sigterms = max(sigterms + (queued if terminated is None else 0), counted)
            if queued and not sigterms:
                sigterms = 1
            if sigterms and not stop:
                why = _stop_now(sigterms, stop_wait_s, asked_at, parent)
                if why:
                    # As the pool's Shutdown: every call hung up below (engine.stop), exit 0.
                    # The pool hears first that the ends to come are the service's doing.
                    log.warning(
                        "SIGTERM: hanging up the calls and stopping, as at Shutdown (%s)", why
                    )
                    out.emit(Stopping())
                    stop = True
                elif asked_at is None:
                    asked_at = time.monotonic()
                    log.warning(
                        "SIGTERM: asking serve to stop this worker (its calls are closed as at "
                        "serve's stop); a second SIGTERM, or %g s with no Shutdown, hangs them "
                        "up at once",
                        stop_wait_s,
                    )
                    out.emit(StopAsked(stop_wait_s))
            if stop:
                # Nobody may read any more: the pool gone (its end of file; serve killed -9,
                # the parent-death SIGTERM). The stop still hangs the calls up (below) and
                # exits 0, not 1 with a BrokenPipeError traceback.
                _flush_at_exit(out)
                break
            if not _sent(out):
                break
            engine.pump(engine.pump_ms(IDLE_PUMP_MS))
            if not _sent(out):
                break
    finally:
        engine.stop()
        waker.close()
        _flush_at_exit(out)
    return 0


def _stop_now(sigterms: int, wait_s: float, asked_at: float | None, parent: int) -> str:
    """Why a worker sent ``sigterms`` SIGTERMs stops by itself now ("": it waits for the
    pool's Shutdown, asked for at ``asked_at``, for ``wait_s`` at most)."""
    if wait_s <= 0:
        return "no wait for serve"
    if os.getppid() != parent:
        return "serve is gone"
    if sigterms > 1:
        return "a second SIGTERM"
    if asked_at is not None and time.monotonic() - asked_at >= wait_s:
        return f"no Shutdown from serve within {wait_s:g} s"
    return ""


def _sent(out: _Out) -> bool:
    """Send what was emitted; False when nobody reads any more (EPIPE: the pool is gone,
    ``serve`` killed -9, before its end of file or the parent-death SIGTERM is seen here,
    while events flow: a listener's audio every 20 ms). The worker then stops as at that end
    of file, its calls hung up, rather than die of a BrokenPipeError with them up."""
    try:
        out.flush()
    except BrokenPipeError:
        log.warning("the pool is gone (nobody reads the events): stopping")
        return False
    return True


def _flush_at_exit(out: _Out) -> None:
    """Send what the stop emitted: :class:`Stopping`, and the end (ENDED) of each call it
    hung up. Left unsent, the pool ended those calls as ``worker_lost`` (status 0) at the
    worker's exit instead of how they ended. When nobody reads any more (the pool is gone:
    EPIPE), they are dropped: nobody is left to tell."""
    try:
        out.flush()
    except OSError as exc:
        log.info("the events of the stop were not sent (the pool is gone?): %s", exc)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m voice.sip.worker``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--user", default="clinic")
    parser.add_argument("--registrar", default="")
    parser.add_argument("--realm", default="")
    parser.add_argument("--pj-log-level", type=int, default=0)
    parser.add_argument("--log-level", default="WARNING")
    # How long a SIGTERM from someone else waits for the pool's Shutdown while serve closes
    # the calls (0: not at all, hung up at once).
    parser.add_argument("--stop-wait-s", type=float, default=0.0)
    # The Retry-After of the 503s the worker sends itself at its stop (the pool's choice).
    parser.add_argument("--retry-after-s", type=int, default=0)
    args = parser.parse_args(argv)
    # The pool starts each worker in a process group of its own, which a terminal treats as
    # a background job: with `stty tostop` its first log line to serve's stderr would stop it
    # (SIGTTOU). Ignored, the write goes through.
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    terminated = _Terminated()
    signal.signal(signal.SIGTERM, terminated)
    # Whichever thread the kernel gives SIGTERM to, Python's C handler writes its number here
    # at once; the reader thread wakes the owner (see the module's docstring).
    signal_r, signal_w = os.pipe()
    os.set_blocking(signal_r, False)
    os.set_blocking(signal_w, False)
    signal.set_wakeup_fd(signal_w, warn_on_full_buffer=False)
    # A crash in pjsip (SIGSEGV, SIGABRT) then leaves every Python thread's stack in the log
    # (stderr): without it the pool sees only "exit -11".
    faulthandler.enable(all_threads=True)
    # ...and no core dump: its memory holds the calls' audio, numbers and SIP messages.
    forbid_core_dumps()
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format=f"%(asctime)s worker[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    config = EngineConfig(
        host=args.host,
        port=args.port,
        user=args.user,
        registrar=args.registrar,
        password=os.environ.get("CLINIC_SIP_PASSWORD", ""),
        realm=args.realm,
        log_level=args.pj_log_level,
        retry_after_s=max(0, args.retry_after_s),
    )
    # pjlib prints its first log lines to fd 1 before any config applies: keep the protocol
    # on a private copy of stdout and point fd 1 at /dev/null, so only events reach the
    # pool (our own logs and C assertion messages use fd 2).
    sys.stdout.flush()
    events_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    return run(
        config,
        sys.stdin.fileno(),
        events_fd,
        terminated=terminated,
        signal_fd=signal_r,
        stop_wait_s=args.stop_wait_s,
    )


if __name__ == "__main__":
    sys.exit(main())
