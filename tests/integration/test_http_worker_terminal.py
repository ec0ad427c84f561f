"""An HTTP worker writes to serve's terminal even when that terminal stops background jobs.

serve starts each worker in a process group of its own (clinic_voice/http_workers.py), which
a terminal treats as a background job; with ``stty tostop`` a background job that writes to
it is stopped by SIGTTOU. A real pty with tostop set, a session leader that owns it, and
``clinic-voice http-worker`` started by that leader in a group of its own, as serve does.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import termios
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

# Runs as the session leader on the pty: starts the worker in a group of its own, waits for it
# to end or stop, and reports which on stderr (a pipe).
LEADER = """
import fcntl, os, signal, subprocess, sys, termios
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
env = {k: v for k, v in os.environ.items() if not k.startswith("CLINIC_")}
worker = subprocess.Popen(
    [sys.executable, "-m", "clinic_voice.cli", "http-worker", "--index", "1",
     "--control", "/nonexistent/control.sock"],
    preexec_fn=os.setpgrp, env=env, stderr=subprocess.STDOUT,  # stdout: the terminal
)
signal.alarm(20)  # a worker that neither ends nor stops ends this leader (and fails the test)
_, status = os.waitpid(worker.pid, os.WUNTRACED)  # returns when it exits or is stopped
if os.WIFSTOPPED(status):
    print("stopped", os.WSTOPSIG(status), file=sys.stderr)
    worker.kill()
else:
    print("exited", os.waitstatus_to_exitcode(status), file=sys.stderr)
"""


def test_a_worker_writes_to_a_tostop_terminal_instead_of_stopping() -> None:
    master, slave = pty.openpty()
    try:
        attrs = termios.tcgetattr(slave)
        attrs[3] |= termios.TOSTOP
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        leader = subprocess.run(
            [sys.executable, "-c", LEADER],
            stdin=slave,
            stdout=slave,
            stderr=subprocess.PIPE,
            start_new_session=True,
            cwd=ROOT,
            timeout=60,
            check=True,
        )
        os.set_blocking(master, False)
        try:
            on_terminal = os.read(master, 65536).decode(errors="replace")
        except BlockingIOError:
            on_terminal = ""
    finally:
        os.close(master)
        os.close(slave)
    # Without CLINIC_REDIS_URL the worker refuses to start and says so on the terminal; it
    # must end, not stop at its first write.
    report = leader.stderr.decode().split()
    assert report[:1] == ["exited"], leader.stderr.decode()
    assert report[1] != "0"
    assert "needs CLINIC_REDIS_URL" in on_terminal
