"""pjmedia's I/O thread: let it sleep long while idle, and wake it when a call's media starts.

pjsua makes one thread, named ``media``, that polls the RTP and RTCP sockets with a fixed
10 ms timeout, with or without a call: 100 wake-ups a second in every worker. With no socket
to poll it just sleeps the 10 ms. On this VM a wake-up costs about 26 µs of CPU, so 320 idle
workers took 0.48 of a core, and with 40 ms of timer slack still 0.18 to 0.26 of a core (a
tenth of the machine during the flash-call bench, where no worker has media at all).

The thread inherits its timer slack (prctl PR_SET_TIMERSLACK) from the thread that creates it
in ``libInit``. With :data:`IDLE_SLACK_NS` the kernel lets an idle poll sleep up to 260 ms. A
packet on a socket it polls still wakes it at once; what waits is a new call's socket, which
joins the poll only when the current one ends. So when a call's media starts the owner
:meth:`MediaThread.wake` s it: SIGURG sent to that thread alone (tgkill) ends its ``select``
or sleep (both return on a signal, never restarted), and it polls again with the new socket.
The handler is a no-op installed with SA_RESTART, so any other system call the signal meets
(a lock, a read) carries on. SIGURG is ignored by default, so one arriving elsewhere is
harmless.

Where no wake-up can be sent (off the main thread, the only one where Python installs signal
handlers, or a libc without tgkill) the thread gets :data:`FALLBACK_SLACK_NS` instead, short
enough that a new call's first packets wait at most 50 ms. Off Linux nothing is changed.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

IDLE_SLACK_NS = 250_000_000  # ~4 wake-ups a second while idle, measured
FALLBACK_SLACK_NS = 40_000_000  # ~20 a second, with no way to wake it early
THREAD_NAME = "media"  # pjsua's name for it (pj_thread_create in pjmedia_endpt_create)
_PR_SET_TIMERSLACK = 29
_WAKE_SIGNAL = signal.SIGURG


def _kicked(signum: int, frame: FrameType | None) -> None:
    """The Python side of the wake-up signal: nothing to do, the C side ended the wait."""


def _thread_ids(name: str) -> list[int]:
    ids = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            if (task / "comm").read_text().strip() == name:
                ids.append(int(task.name))
    return ids


class MediaThread:
    """Created around ``libInit``; :meth:`wake` from the owner thread afterwards."""

    def __init__(self) -> None:
        self._libc: ctypes.CDLL | None = None
        self._tids: list[int] = []
        self.wakeable = False

    @contextlib.contextmanager
    def created(self) -> Iterator[None]:
        """Threads made inside get the timer slack; the media thread is found afterwards."""
        if not sys.platform.startswith("linux"):
            yield
            return
        libc = ctypes.CDLL(None, use_errno=True)
        wakeable = threading.current_thread() is threading.main_thread() and hasattr(libc, "tgkill")
        if wakeable:
            signal.signal(_WAKE_SIGNAL, _kicked)
            signal.siginterrupt(_WAKE_SIGNAL, False)  # SA_RESTART: see the module docstring
        slack = IDLE_SLACK_NS if wakeable else FALLBACK_SLACK_NS
        if libc.prctl(_PR_SET_TIMERSLACK, slack, 0, 0, 0) != 0:
            log.warning("timer slack not set: errno %s", ctypes.get_errno())
        try:
            yield
        finally:
            libc.prctl(_PR_SET_TIMERSLACK, 0, 0, 0, 0)  # 0: back to the default slack
        if wakeable:
            self._tids = _thread_ids(THREAD_NAME)
            self._libc = libc
            self.wakeable = bool(self._tids)
            if not self._tids:
                # The thread names itself once it runs: 29 of 320 workers started at once
                # had not yet (bench/asterisk_compare.py, 2026-12-03). Looked for again at
                # each wake until found.
                log.info(
                    "no %r thread yet: looked for again when a call's media starts", THREAD_NAME
                )

    def wake(self) -> None:
        """End the media thread's current wait (a call's sockets were just added)."""
        if self._libc is None:
            return
        if not self._tids:
            self._tids = _thread_ids(THREAD_NAME)
            self.wakeable = bool(self._tids)
            if not self._tids:
                log.warning("no %r thread found: this call's media may start late", THREAD_NAME)
                return
        pid = os.getpid()
        for tid in self._tids:
            if self._libc.tgkill(pid, tid, int(_WAKE_SIGNAL)) != 0:
                log.debug("media thread %s not woken: errno %s", tid, ctypes.get_errno())
