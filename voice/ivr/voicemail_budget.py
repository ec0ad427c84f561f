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
# The numbers whose refusal was told remembered at most: past it the oldest is forgotten
# (told again at its next refusal), so memory stays bounded whatever dials in.
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


class VoicemailBudget:
    """The budget's state: messages being recorded (reserved at their longest), the numbers
    whose refusal was told, and the line-wide state last found.

    ``caller`` is whatever names the calling number (the service passes a keyed digest,
    never the number); "" names no number (withheld): such callers are not held to
    ``per_caller_day``, since nothing tells one of them from another, and one shared count
    let a handful of them (or one abuser) refuse every other for 24 hours; the byte cap and
    the disk floor hold them as any caller.
    Each number's messages of the last 24 hours are counted outside (in Redis, by every
    ``serve`` on it: voice/ivr/voicemail_callers.py) and given to :meth:`admit`: a count
    kept here was this process's alone, so N ``serve`` processes allowed N times the limit,
    and a restart forgot it.
    """

    def __init__(self, budget: Budget, clock: Clock) -> None:
        self.budget = budget
        self._clock = clock
        self._reserved: dict[str, int] = {}  # bytes reserved, by call id
        # callers whose refusal was logged -> when (told again after 24 h); oldest first
        self._told: dict[str, float] = {}
        self._state: Refusal | None = None  # the line-wide state: None, DISK_LOW or FULL

    @property
    def reserved_bytes(self) -> int:
        return sum(self._reserved.values())

    def admit(
        self,
        call_id: str,
        caller: str,
        max_s: float,
        *,
        free: int | None,
        used: int,
        caller_count: int = 0,
    ) -> Decision:
        """Decide for a message of ``call_id`` of at most ``max_s`` seconds, with ``free``
        bytes free on the data dir, ``used`` bytes of messages on it, and ``caller_count``
        messages of ``caller`` in the last 24 hours (kept, or being recorded) before this
        one. Admitted, it is reserved until :meth:`release`."""
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
            caller_count=caller_count if caller else 0,
        )
        line_wide = refusal if refusal is not Refusal.CALLER_LIMIT else None
        # A caller refused alone says nothing of the line: its state stays what it was.
        changed = refusal is not Refusal.CALLER_LIMIT and line_wide is not self._state
        if changed:
            self._state = line_wide
        first = False
        if refusal is Refusal.CALLER_LIMIT:
            now = self._clock.now()
            told = self._told.pop(caller, None)
            if told is None or told <= now - DAY_S:
                first = True
                told = now
            # Re-inserted: the dict's order is the time told, oldest first.
            self._told[caller] = told
            while len(self._told) > CALLERS_REMEMBERED:
                del self._told[next(iter(self._told))]
        if refusal is None:
            self._reserved[call_id] = need
        return Decision(refusal, changed, first)

    def release(self, call_id: str) -> None:
        """The message of ``call_id`` ended (kept or not): its reservation goes."""
        self._reserved.pop(call_id, None)
