"""When the live record of a call is written and deleted (pure: no I/O, no asyncio).

A call under way has one sealed file on disk, its live record (voice/ivr/journal.py): what
stays of the call when ``serve`` dies during it. It is rewritten at each change of the call
(a node entered, the triage raised, a value saved, a transfer or a recording begun) and
every :data:`LIVE_REFRESH_S` while nothing changes, each write with the time it was asked
for as the call's end, so a call cut by a dead ``serve`` shows how far it went and ends at
most that long before it was cut.

The writes of one call go one at a time, each a whole file written and fsynced in a thread
(:func:`sip_config.private_file.write_private`): two in flight could land in either order,
and an older record would then replace a newer one. While one is in flight, only the newest
record asked for waits; the ones it replaces were never worth a write. When the call ends
its file is deleted after the write in flight, never before, and nothing is written after
the delete: a late write would bring back a call that ended (as ``cut_service_lost`` at the
next start), or one erased since it ended.

:class:`LiveWrites` decides; the session carries out each :class:`Write` and :class:`Delete`
in that order and reports each one :meth:`~LiveWrites.done`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

# A call sitting in one node (a message being recorded, a transfer ringing) has its live
# record rewritten this often: the end it records is at most this (plus a write) before the
# moment serve died. One fsynced write per call each time.
LIVE_REFRESH_S = 30.0

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Write(Generic[R]):
    """Write ``record`` as the call's live record, over the one on disk."""

    record: R


@dataclass(frozen=True, slots=True)
class Delete:
    """Delete the call's live record: the call ended."""


class _Lane(Enum):
    """Where one call's live record is."""

    IDLE = "idle"  # nothing in flight
    WRITING = "writing"  # a write in flight
    ENDING = "ending"  # a write in flight, the call ended: the delete follows it
    DELETING = "deleting"  # the delete in flight
    GONE = "gone"  # deleted: nothing more


class LiveWrites(Generic[R]):
    """The writes of one call's live record: one at a time, the newest only, none after its
    delete. Each method returns the step to carry out now (None: nothing now)."""

    def __init__(self) -> None:
        self._lane = _Lane.IDLE
        self._waiting: R | None = None  # the newest record asked for during a write

    def write(self, record: R) -> Write[R] | None:
        """The call's record changed (or is to be refreshed). Written now when nothing is in
        flight; else it waits in place of any older one. None once the call ended."""
        if self._lane is _Lane.IDLE:
            self._lane = _Lane.WRITING
            return Write(record)
        if self._lane is _Lane.WRITING:
            self._waiting = record
        return None

    def end(self) -> Delete | None:
        """The call ended: nothing more is written (a record waiting is dropped) and the file
        goes: now when nothing is in flight, else after the write in flight (:meth:`done`
        gives the delete then)."""
        self._waiting = None
        if self._lane is _Lane.IDLE:
            self._lane = _Lane.DELETING
            return Delete()
        if self._lane is _Lane.WRITING:
            self._lane = _Lane.ENDING
        return None

    def done(self) -> Write[R] | Delete | None:
        """The step in flight finished (or failed): the next one, or None when idle."""
        if self._lane is _Lane.WRITING:
            waiting, self._waiting = self._waiting, None
            if waiting is None:
                self._lane = _Lane.IDLE
                return None
            return Write(waiting)
        if self._lane is _Lane.ENDING:
            self._lane = _Lane.DELETING
            return Delete()
        if self._lane is _Lane.DELETING:
            self._lane = _Lane.GONE
            return None
        raise RuntimeError(f"no step in flight ({self._lane.value})")
