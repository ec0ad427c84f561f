"""How a polling loop reports that the store is down (or that it keeps failing for another
reason): once when it starts, then at most every ``every_s`` with how many attempts failed
meanwhile, and once when it is back.

The timer and webhook loops poll five times a second in every process; a Redis outage logged
each of those as a warning (about 50 lines a second with the HTTP workers).

A defect (``faults``) is told by its traceback once per run for each place it is raised from
(its exception's type and innermost frame): when a loop's defect changes, the new one's
traceback is logged too, and a known one coming back is counted, not hidden. Those repeats are
said at most every ``every_s``, so a defect that fails every other poll (no streak) logs two
lines in that time, not ten a second.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sip_config.clock import Clock

# Distinct defects whose traceback was shown, kept per log; past it they are forgotten (and
# shown again): a bound on memory, far above the few a loop has.
_SHOWN_MAX = 64


class OutageLog:
    """The log lines of one loop's outages."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        clock: Clock,
        every_s: float = 30.0,
        *,
        faults: bool = False,
    ) -> None:
        """``faults``: this log is for errors that are not an outage but a defect (an
        unexpected exception the loop survives): logged at ERROR, the first with its
        traceback."""
        self._log = logger
        self._what = what
        self._clock = clock
        self._every_s = every_s
        if faults:
            self._level = logging.ERROR
            self._texts = ("unexpected error", "still failing", "working again")
        else:
            self._level = logging.WARNING
            self._texts = ("store unavailable", "store still unavailable", "store available again")
        self._trace = faults
        self._since: float | None = None  # monotonic start of the outage
        self._last = 0.0  # monotonic time of the last line
        self._failures = 0
        # faults: where each defect shown was raised -> when its traceback was logged (UTC)
        self._shown: dict[str, str] = {}
        self._told = False  # a line was logged since the streak began
        self._repeats = 0  # repeats of defects shown, not yet said
        self._repeats_since = ""  # when the first of them came (UTC)

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, error: Exception) -> None:
        if self._trace:
            self._fault(error)
            return
        now = self._clock.monotonic()
        self._failures += 1
        first, still, _ = self._texts
        if self._since is None:
            self._since = self._last = now
            self._failures = 1
            self._log.log(
                self._level,
                "%s: %s: %s",
                self._what,
                first,
                error,
                exc_info=error if self._trace else None,
            )
        elif now - self._last >= self._every_s:
            self._last = now
            self._log.log(
                self._level,
                "%s: %s after %.0f s (%d attempts failed): %s",
                self._what,
                still,
                now - self._since,
                self._failures,
                error,
            )

    def _fault(self, error: Exception) -> None:
        now = self._clock.monotonic()
        if self._since is None:
            self._since, self._failures, self._told = now, 0, False
        self._failures += 1
        where = _raised_at(error)
        shown_at = self._shown.get(where)
        if shown_at is None:
            if len(self._shown) >= _SHOWN_MAX:
                self._shown.clear()
            self._shown[where] = self._utc()
            self._last, self._told = now, True
            self._log.error("%s: unexpected error: %s", self._what, error, exc_info=error)
            return
        if not self._repeats:
            self._repeats_since = self._utc()
        self._repeats += 1
        if now - self._last >= self._every_s:
            self._log.error(
                "%s: unexpected error again, %d times since %s UTC (%s, traceback logged at "
                "%s UTC): %s",
                self._what,
                self._repeats,
                self._repeats_since,
                where,
                shown_at,
                error,
            )
            self._last, self._told, self._repeats = now, True, 0

    def _utc(self) -> str:
        return time.strftime("%H:%M:%S", time.gmtime(self._clock.now()))

    def ok(self) -> None:
        if self._trace:
            if self._since is not None and self._told:
                # The repeats of this streak are said here; a streak with no line of its own
                # (a known defect back within every_s) is said by the next line.
                self._log.error(
                    "%s: %s after %.1f s (%d attempts failed)",
                    self._what,
                    self._texts[2],
                    self._clock.monotonic() - self._since,
                    self._failures,
                )
                self._repeats = 0
            self._since = None
            return
        if self._since is not None:
            self._log.log(
                self._level,
                "%s: %s after %.1f s",
                self._what,
                self._texts[2],
                self._clock.monotonic() - self._since,
            )
            self._since = None
            self._failures = 0


def _raised_at(error: BaseException) -> str:
    """Where ``error`` was raised: its type and innermost frame (file name and line), which
    tell one defect from another when their messages differ (an id in them, say)."""
    name = type(error).__qualname__
    tb = error.__traceback__
    if tb is None:
        return name
    while tb.tb_next is not None:  # the innermost frame: no source line read (no file I/O)
        tb = tb.tb_next
    return f"{name} at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}"
