"""How a polling loop reports that the store is down (or that it keeps failing for another
reason): once when it starts, then at most every ``every_s`` with how many attempts failed
meanwhile, and once when it is back.

The timer and webhook loops poll five times a second in every process; a Redis outage logged
each of those as a warning (about 50 lines a second with the HTTP workers).
"""

from __future__ import annotations

import logging

from sip_config.clock import Clock


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

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, error: Exception) -> None:
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

    def ok(self) -> None:
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
