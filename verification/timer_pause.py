"""When the step timers hold off after a store outage (pure: times are passed in).

A channel report that arrives while Redis is down is kept in memory by the process that sent,
and retried with back-off. Once Redis answers again, a step timer that ran before the report
landed would see no outcome and send the code again. The process that keeps a report skips
that verification's timer itself; a timer in another process on the same Redis cannot see the
report, so every process's timers pause until an outage has been over for ``quiet_s``.

An outage is failures in a row. One failed command on a Redis that otherwise answers is not
one: if it were, a Redis that fails a command every few seconds (fsync stalls) would hold
every fallback and expiry for as long as it kept doing so. And while paused, the loop keeps
asking Redis, so that the pause runs from the outage's end however long it lasted.
"""

from __future__ import annotations

# Failures in a row that make an outage.
OUTAGE_FAILURES = 2


class TimerPause:
    """The pause of one process's step timers."""

    def __init__(self, quiet_s: float) -> None:
        self._quiet_s = quiet_s
        self._in_row = 0
        self._until = float("-inf")

    def failed(self, now: float) -> None:
        """The store did not answer the loop (a timer command, or its probe while paused)."""
        self._in_row += 1
        if self._in_row >= OUTAGE_FAILURES:
            self._until = now + self._quiet_s

    def answered(self) -> None:
        """The store answered the loop."""
        self._in_row = 0

    def paused(self, now: float) -> bool:
        """Whether the timers hold off at ``now`` (the loop only probes the store)."""
        return now < self._until
