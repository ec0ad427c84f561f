"""When the step timers hold off after a store outage (pure: times are passed in).

A channel report that arrives while Redis is down is kept in memory by the process that sent,
and retried with back-off. Once Redis answers again, a step timer that ran before the report
landed would see no outcome and send the code again. The process that keeps a report skips
that verification's timer itself; a timer in another process on the same Redis cannot see the
report, so every process's timers pause until an outage has been over for ``quiet_s``.

An outage is failures in a row: the timers then pause until the store has answered for
``quiet_s``, while the loop keeps asking it, so that the pause runs from the outage's end
however long it lasted. One failed command on a Redis that otherwise answers (a stall of up
to the store's timeout) pauses them for ``blip_s`` only, long enough for a report kept in that
stall to land (its first retries come 0.1 and 0.35 s after it): a full pause for each would
hold every fallback and expiry of a Redis that stalls every few seconds for as long as it did.
"""

from __future__ import annotations

# Failures in a row that make an outage.
OUTAGE_FAILURES = 2


class TimerPause:
    """The pause of one process's step timers."""

    def __init__(self, quiet_s: float, blip_s: float = 1.0) -> None:
        self._quiet_s = quiet_s
        self._blip_s = blip_s
        self._in_row = 0
        self._until = float("-inf")

    def failed(self, now: float) -> None:
        """The store did not answer the loop (a timer command, or its probe while paused)."""
        self._in_row += 1
        wait = self._quiet_s if self._in_row >= OUTAGE_FAILURES else self._blip_s
        self._until = max(self._until, now + wait)

    def answered(self) -> None:
        """The store answered the loop."""
        self._in_row = 0

    def paused(self, now: float) -> bool:
        """Whether the timers hold off at ``now`` (the loop only probes the store)."""
        return now < self._until
