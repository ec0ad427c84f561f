"""A worker process's exit at its supervisor's stop: as asked, or a defect.

``serve`` stops two kinds of worker processes: the SIP workers (a Shutdown on their stdin:
they hang up their calls and exit 0) and the HTTP workers (SIGTERM: they exit 0, or die of
that very SIGTERM in the first half second, while Python still loads). Any other end at the
stop is a defect that a clean-looking exit would hide from the service manager: pjsua
aborting at its teardown (-6), a worker that failed on its own (1), or one that did not stop
by its deadline and was killed by ``serve`` itself (-9). A worker being started as the stop
began is waited for and then stopped as any other; a SIP worker's restart that could not
start its process then (fork or exec failed) is a defect too. ``serve`` then exits 1
(``clinic_voice/cli.py``). A SIP worker still starting when its deadline ran out (it never
reported its port) is killed, and that is no defect: it never had a call to lose, nor would
it get one at the stop. A worker that died while the service ran is restarted by its pool
and counts for nothing here.

Shared by every package; nothing here does I/O.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WorkerExit:
    """A worker's exit at the stop that was not the one asked for."""

    worker: str  # as the log names it: "SIP worker 0", "HTTP worker 1"
    pid: int  # 0 when no process was started
    status: int | None  # the process's return code: -N when signal N ended it; None: no process
    killed: bool = False  # its supervisor's SIGKILL: it had not stopped by its deadline
    not_started: str = ""  # status None: why its start failed (the OSError's text)

    def __str__(self) -> str:
        if self.status is None:
            return f"{self.worker} could not be started at the stop: {self.not_started}"
        return (
            f"{self.worker} (pid {self.pid}) exited with status {self.status} at the stop"
            f"{status_note(self.status, killed=self.killed)}"
        )


def as_asked(status: int, sent: signal.Signals | None = None) -> bool:
    """Whether a worker that ended with ``status`` stopped as asked: 0, or the signal its
    supervisor ``sent`` to stop it (a process still loading has no handler for it yet)."""
    return status == 0 or (sent is not None and status == -sent)


def status_note(status: int, *, killed: bool = False) -> str:
    """What a log line adds to an exit ``status``: the signal's name, and whether the
    supervisor's own SIGKILL for a worker past its stop deadline was that signal."""
    if status >= 0:
        return ""
    try:
        name = signal.Signals(-status).name
    except ValueError:
        name = f"signal {-status}"
    if killed:
        return f" ({name}: killed, it had not stopped by its deadline)"
    return f" ({name})"
