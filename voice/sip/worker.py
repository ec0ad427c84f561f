"""One SIP worker process: the pjsua2 owner thread, driven by the pool over stdin/stdout.

Run as ``python -m voice.sip.worker --host 127.0.0.1 --port 5061 [--user U]
[--registrar sip:pbx]`` (the password comes from ``CLINIC_SIP_PASSWORD`` in the environment,
never argv). Commands arrive as JSON lines on stdin, events leave as JSON lines on stdout
(:mod:`voice.sip.protocol`); logs go to stderr. The pool starts workers with
``asyncio.create_subprocess_exec``: a fresh interpreter, never a fork of a threaded parent.

The loop is single-threaded: poll stdin (non-blocking), run the commands, pump pjsua for
5 ms, write the events. A command therefore waits at most one pump slice (5 ms) before its
INVITE or CANCEL is on the wire. EOF on stdin (the pool is gone) stops the worker.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import sys

from voice.sip.pjsua import Engine, EngineConfig
from voice.sip.protocol import Event, ProtocolError, decode, encode

log = logging.getLogger(__name__)

PUMP_MS = 5


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


def run(config: EngineConfig, in_fd: int, out_fd: int) -> int:
    """Serve commands from ``in_fd`` until Shutdown or EOF; returns the exit status."""
    out = _Out(out_fd)
    engine = Engine(config, out.emit)
    engine.start()
    out.emit(engine.status())
    out.flush()
    os.set_blocking(in_fd, False)
    pending = b""
    try:
        while not engine.stopping:
            ready, _, _ = select.select([in_fd], [], [], 0)
            if ready:
                try:
                    chunk = os.read(in_fd, 1 << 16)
                except BlockingIOError:
                    chunk = None
                if chunk == b"":
                    log.info("pool closed the pipe: stopping")
                    break
                if chunk:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        if not line.strip():
                            continue
                        try:
                            cmd = decode(line)
                        except ProtocolError as exc:
                            log.error("bad command from the pool: %s", exc)
                            continue
                        engine.handle(cmd)  # type: ignore[arg-type]
                    out.flush()
            engine.pump(PUMP_MS)
            out.flush()
    finally:
        engine.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m voice.sip.worker``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--user", default="clinic")
    parser.add_argument("--registrar", default="")
    parser.add_argument("--pj-log-level", type=int, default=0)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
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
        log_level=args.pj_log_level,
    )
    # pjlib prints its first log lines to fd 1 before any config applies: keep the protocol
    # on a private copy of stdout and point fd 1 at /dev/null, so only events reach the
    # pool (our own logs and C assertion messages use fd 2).
    sys.stdout.flush()
    events_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    return run(config, sys.stdin.fileno(), events_fd)


if __name__ == "__main__":
    sys.exit(main())
