"""The bytes the voicemail folder's messages take, kept as they change (pure: no I/O).

The voicemail's budget (voice/ivr/voicemail_budget.py) needs them at each message. Read by
listing every file each time, they cost ~140 ms per 10,000 messages, in a thread, at every
message; kept here instead, they are counted once by a scan (:meth:`StoredBytes.scan_begins`,
the listing in a thread, :meth:`StoredBytes.scan_ends`), then moved by each message written
and each removed (an erasure), and counted afresh by a scan after each retention sweep, which
deletes files unnamed (the hour's drift, such as an erasure answered by an HTTP worker, which
has its own count, goes then).

Sizes are kept per message, a message's file and the temporary file of a write of it cut short
together, so that a scan racing with writes and erasures ends right: what was written or
removed while the listing ran (on the loop, which the listing in a thread does not see in
order) overrides what the listing found of that message.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


class StoredBytes:
    """Bytes by message name, and their total; None until a first scan ended."""

    def __init__(self) -> None:
        self._sizes: dict[str, int] | None = None
        self._total = 0
        # While a scan runs: what changed meanwhile (None: removed), applied at its end.
        self._meanwhile: dict[str, int | None] | None = None

    @property
    def total(self) -> int | None:
        return None if self._sizes is None else self._total

    def scan_begins(self) -> None:
        self._meanwhile = {}

    def scan_ends(self, found: Mapping[str, int]) -> None:
        """The listing begun at :meth:`scan_begins` found ``found`` (bytes by message)."""
        sizes = dict(found)
        for name, size in (self._meanwhile or {}).items():
            if size is None:
                sizes.pop(name, None)
            else:
                sizes[name] = size
        self._meanwhile = None
        self._sizes = sizes
        self._total = sum(sizes.values())

    def scan_failed(self) -> None:
        """The listing failed: the count stays as it was (kept moving meanwhile)."""
        self._meanwhile = None

    def written(self, name: str, size: int) -> None:
        """The message ``name`` was written, ``size`` bytes (its temporary file is gone)."""
        self._set(name, size)

    def removed(self, names: Iterable[str]) -> None:
        """The messages ``names`` were deleted."""
        for name in names:
            self._set(name, None)

    def _set(self, name: str, size: int | None) -> None:
        if self._meanwhile is not None:
            self._meanwhile[name] = size
        if self._sizes is None:
            return
        self._total -= self._sizes.pop(name, 0)
        if size is not None:
            self._sizes[name] = size
            self._total += size
