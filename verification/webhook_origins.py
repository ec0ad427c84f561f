"""What the last webhook POST to each origin came to, to share the sender's room out (pure).

A POST holds one of the sender's in-flight slots until its receiver answers or
``CLINIC_WEBHOOK_TIMEOUT_S`` ends. A receiver that answers holds a slot for milliseconds; one
that accepts and never answers holds it for the whole timeout, again at every retry. Callback
URLs are chosen by API clients, and an app can name as many such origins as it likes (a port
each, or a wildcard DNS name: a new host per verification), so remembering only the failing
ones would not do: every fresh origin would look healthy on its first try. The sender
(:mod:`verification.webhooks`) therefore trusts with the whole room only the origins whose
last POST was delivered, and gives the others a capped share of it.

Bounded: at most ``limit`` origins are remembered, each for ``ttl_s`` after its last POST
ended. One forgotten is :attr:`OriginState.UNKNOWN`, which is capped as well, so forgetting
never lets a failing origin take the whole room (the reason to remember the good ones).
"""

from __future__ import annotations

from collections import OrderedDict
from enum import StrEnum

# Above the longest backoff between two tries of one job (300 s, webhooks.backoff_s), so a
# receiver down for a while is still known as failing when its next retry comes due.
TTL_S = 600.0
# About 250 bytes an origin: a megabyte at most, however many origins API clients name.
LIMIT = 4096


class OriginState(StrEnum):
    """How the last POST to an origin ended."""

    PROVEN = "proven"  # delivered (2xx)
    FAILING = "failing"  # timed out, no connection, or not answered 2xx
    UNKNOWN = "unknown"  # none remembered


class OriginHealth:
    """The state of each origin a webhook was posted to (as of its last POST)."""

    def __init__(self, *, limit: int = LIMIT, ttl_s: float = TTL_S) -> None:
        self._limit = limit
        self._ttl_s = ttl_s
        # origin -> (state, when its last POST ended), the least recently ended first
        self._last: OrderedDict[str, tuple[OriginState, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._last)

    def state(self, origin: str, now: float) -> OriginState:
        """What the last POST to ``origin`` came to, ``UNKNOWN`` when none is remembered."""
        self._expire(now)
        entry = self._last.get(origin)
        return entry[0] if entry is not None else OriginState.UNKNOWN

    def record(self, origin: str, *, delivered: bool, now: float) -> None:
        """A POST to ``origin`` ended, delivered or not."""
        self._last[origin] = (OriginState.PROVEN if delivered else OriginState.FAILING, now)
        self._last.move_to_end(origin)
        while len(self._last) > self._limit:
            self._last.popitem(last=False)
        self._expire(now)

    def _expire(self, now: float) -> None:
        while self._last:
            _state, at = next(iter(self._last.values()))
            if now - at < self._ttl_s:
                return
            self._last.popitem(last=False)
