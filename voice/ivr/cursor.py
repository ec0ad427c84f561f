"""The cursor of ``GET /v1/calls``: where a page ended, so that the next begins right after it.

Calls are listed newest first, and calls that began at the same instant by id, as Redis orders
the members of one score in a sorted set (bytewise; here descending). A cursor of the start
time alone could not say where among the calls of one start a page ended: the next page began
below that start, and a call of it not yet listed was skipped, a record lost to a GDPR search
(README: the search by number under ``DELETE /v1/calls/{id}``). Records saved from the
journal carry a start to the millisecond, so calls of one start are not rare on a busy line.
The cursor names the last call listed as well: ``<start>~<id>`` (``~``: unreserved in a URL,
and in no call id), a total order.

A cursor of before (the start alone) is still taken: its page begins with every call of that
start again, so a call may be listed twice across that one page edge (the list's users keep
each id once), but none is skipped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# A start as repr() writes an epoch time in seconds; a call id as the API takes one
# (voice/ivr/api.py), which every call id the line makes is.
_CURSOR = re.compile(r"([0-9]{1,12}(?:\.[0-9]{1,17})?)(?:~([A-Za-z0-9_-]{1,64}))?")


class CursorInvalid(ValueError):
    """Text that is no cursor this API gives out."""


@dataclass(frozen=True, slots=True)
class Cursor:
    """The last call a page listed: its start (the index's score) and its id."""

    started_at: float
    call_id: str | None  # None: a cursor of before, the start alone

    def __str__(self) -> str:
        start = repr(self.started_at)
        return start if self.call_id is None else f"{start}~{self.call_id}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        """The cursor ``text`` is; :class:`CursorInvalid` for anything else."""
        found = _CURSOR.fullmatch(text)
        if found is None:
            raise CursorInvalid(text)
        return cls(float(found[1]), found[2])

    def after(self, same_start: Iterable[str]) -> list[str]:
        """Of the calls that began at this cursor's start (their ids), those the list shows
        after it, in the list's order; every one for a cursor of before."""
        listed = sorted(same_start, key=str.encode, reverse=True)
        if self.call_id is None:
            return listed
        last = self.call_id.encode()
        return [i for i in listed if i.encode() < last]
