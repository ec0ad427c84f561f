"""May a new message be recorded? The voicemail's budget (pure: no I/O, no asyncio).

Messages share the data dir with the embedded Redis's append-only file and the call records
kept on disk: a disk filled by messages stops Redis, and with it the API and every call's
record (README, "A full or read-only disk"). So a message is recorded only when, with it
written at its longest, the data dir keeps ``min_free_bytes`` free
(``CLINIC_VOICEMAIL_MIN_FREE_MB``), all messages stay within ``max_bytes``
(``CLINIC_VOICEMAIL_MAX_MB``), and its calling number left fewer than ``per_caller_day``
messages in the last 24 hours (``CLINIC_VOICEMAIL_PER_CALLER_DAY``): one caller, or one
script dialling again and again, cannot take the whole budget.

Messages being recorded count at their longest from the moment they are admitted (a
reservation), so that many callers at once cannot all pass a check that only one of them
fits. A refused caller is put through to a human as for a message that could not be saved
(voice/ivr/engine.py); the call record's path names the refusal.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import StrEnum

from sip_config.clock import Clock

MB = 1024 * 1024
DAY_S = 86400.0
# A message's sealed file per second of message: 16-bit PCM at 8 kHz (16000 bytes), in hex
# (x2), sealed with AES-GCM and base64 (x4/3): 42 667 bytes, measured 42 700 with the JSON
# around it; 43 000 keeps a margin. The nonce, tag and JSON add well under FILE_OVERHEAD.
SEALED_BYTES_PER_S = 43_000
FILE_OVERHEAD = 4096
# The callers remembered at most (24 h of calls from distinct numbers on a busy line is a few
# thousand): past it the oldest is forgotten, so memory stays bounded whatever dials in.
CALLERS_REMEMBERED = 100_000


class Refusal(StrEnum):
    """Why no message is recorded; the value is the call record's path step."""

    DISK_LOW = "disk_low"  # the data dir would keep less than min_free_bytes (or unreadable)
    FULL = "voicemail_full"  # the messages would pass max_bytes
    CALLER_LIMIT = "caller_limit"  # this number left per_caller_day messages in 24 h


@dataclass(frozen=True, slots=True)
class Budget:
    """The limits (from the settings); ``per_caller_day`` 0: no limit per number."""

    min_free_bytes: int
    max_bytes: int
    per_caller_day: int


@dataclass(frozen=True, slots=True)
class Decision:
    """An admission's answer. ``changed``: the line-wide state (messages taken, or refused
    for the disk or the cap) is not what the previous admission found, so the operator is
    told (once per change, not per call). ``first_for_caller``: the first refusal of this
    number in its 24 hours (told once, with no number)."""

    refusal: Refusal | None
    changed: bool = False
    first_for_caller: bool = False


def sealed_size(max_s: float) -> int:
    """The largest sealed file a message of at most ``max_s`` seconds makes."""
    return int(max_s * SEALED_BYTES_PER_S) + FILE_OVERHEAD


def decide(
    budget: Budget, *, need: int, free: int | None, used: int, caller_count: int
) -> Refusal | None:
    """May a message of up to ``need`` bytes be written, with ``free`` bytes free on the data
    dir (None: unreadable, refused: a disk that does not answer takes no message either),
    ``used`` bytes of messages stored (and reserved), and ``caller_count`` messages of its
    number in the last 24 hours? The disk first: it protects the whole service."""
    if free is None or free - need < budget.min_free_bytes:
        return Refusal.DISK_LOW
    if used + need > budget.max_bytes:
        return Refusal.FULL
    if budget.per_caller_day and caller_count >= budget.per_caller_day:
        return Refusal.CALLER_LIMIT
    return None


@dataclass(frozen=True, slots=True)
class _Reservation:
    caller: str
    size: int


class VoicemailBudget:
    """The budget's state: messages being recorded (reserved at their longest), each
    number's messages in the last 24 hours, and the line-wide state last found.

    ``caller`` is whatever names the calling number (the service passes a keyed digest,
    never the number); "" names no number (withheld): such callers are not held to
    ``per_caller_day``, since nothing tells one of them from another, and one shared count
    let a handful of them (or one abuser) refuse every other for 24 hours; the byte cap and
    the disk floor hold them as any caller.
    Counts are this process's, since it started: a restart forgets them (the byte cap and
    the disk floor still hold, read from the disk).
    """

    def __init__(self, budget: Budget, clock: Clock) -> None:
        self.budget = budget
        self._clock = clock
        self._reserved: dict[str, _Reservation] = {}  # by call id
        self._kept: dict[str, deque[float]] = {}  # caller -> times of messages kept
        self._told: set[str] = set()  # callers whose refusal was logged in their 24 h
        self._state: Refusal | None = None  # the line-wide state: None, DISK_LOW or FULL

    @property
    def reserved_bytes(self) -> int:
        return sum(r.size for r in self._reserved.values())

    def count(self, caller: str) -> int:
        """Messages kept for ``caller`` in the last 24 hours, and being recorded."""
        return len(self._recent(caller)) + sum(
            1 for r in self._reserved.values() if r.caller == caller
        )

    def admit(
        self, call_id: str, caller: str, max_s: float, *, free: int | None, used: int
    ) -> Decision:
        """Decide for a message of ``call_id`` of at most ``max_s`` seconds, with ``free``
        bytes free on the data dir and ``used`` bytes of messages on it. Admitted, it is
        reserved until :meth:`release`."""
        need = sealed_size(max_s)
        # Messages being recorded are not on the disk yet: they take from its free space as
        # from the cap. A reservation already written counts in ``free`` and ``used`` too: at
        # worst it counts twice for a moment (refusing early, never late).
        reserved = self.reserved_bytes
        refusal = decide(
            self.budget,
            need=need,
            free=None if free is None else free - reserved,
            used=used + reserved,
            caller_count=self.count(caller) if caller else 0,
        )
        line_wide = refusal if refusal is not Refusal.CALLER_LIMIT else None
        # A caller refused alone says nothing of the line: its state stays what it was.
        changed = refusal is not Refusal.CALLER_LIMIT and line_wide is not self._state
        if changed:
            self._state = line_wide
        first = False
        if refusal is Refusal.CALLER_LIMIT and caller not in self._told:
            self._told.add(caller)
            first = True
        if refusal is None:
            self._reserved[call_id] = _Reservation(caller, need)
        return Decision(refusal, changed, first)

    def release(self, call_id: str, kept: bool) -> None:
        """The message of ``call_id`` ended: ``kept`` (saved), it counts for its caller."""
        reservation = self._reserved.pop(call_id, None)
        if reservation is None:
            return
        if not kept:
            if not self.count(reservation.caller):
                # Refused on its messages being recorded alone, a number kept nothing: no
                # 24 hours of its own end to forget that it was told (the memory, and the
                # next refusal's warning, would be lost for good).
                self._told.discard(reservation.caller)
            return
        if not reservation.caller:  # no number: nothing to count it for
            return
        times = self._recent(reservation.caller)
        times.append(self._clock.now())
        # Re-inserted: the dict's order is the callers' last message, oldest first.
        self._kept.pop(reservation.caller, None)
        self._kept[reservation.caller] = times
        while len(self._kept) > CALLERS_REMEMBERED:
            oldest = next(iter(self._kept))
            del self._kept[oldest]
            self._told.discard(oldest)

    def _recent(self, caller: str) -> deque[float]:
        """``caller``'s message times within 24 hours (older ones forgotten now)."""
        times = self._kept.get(caller)
        if times is None:
            return deque()
        since = self._clock.now() - DAY_S
        while times and times[0] <= since:
            times.popleft()
        if not times:
            del self._kept[caller]
            self._told.discard(caller)
        return times
