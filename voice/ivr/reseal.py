"""Re-sealing under the current secret (``clinic-voice secret reseal``, README: "Changing the
secret").

After ``CLINIC_SECRET`` was changed, what was sealed before stays sealed under the old one
(``CLINIC_PREVIOUS_SECRETS`` keeps it readable): the call records in Redis, and in the data
dir the records kept on disk (``unsaved-calls``, ``live-calls``) and the voicemail. Whoever
holds the old secret and a copy of Redis or the data dir could open them. This seals each
anew under the current secret's key, content byte for byte (:meth:`CallStore.reseal`), so the
old secret can be dropped at once instead of a retention later.

It runs while ``serve`` runs, saves, erases, sweeps and replays, and Redis expires records:

- A record in Redis takes its new form in one script, only if Redis still holds exactly the
  value read and its call is not marked erased, keeping the time it had left
  (:meth:`CallStore.replace_sealed`). A record changed, expired or erased meanwhile is left
  to what changed it, and counted as gone.
- A file is written anew under a temporary name and renamed over the old one, only if that is
  still there (:func:`~sip_config.private_file.replace_private`), keeping its modification
  time: the voicemail sweep judges a message's age by it, and an erasure a live record's
  (a call under way rewrites it: an old one was left by a dead serve). An erasure marks the
  call in Redis before it deletes the files (voice/ivr/erasure.py), so after each rename the
  mark is read and the file deleted if it is set: an erasure that deleted the file between
  the check and the rename finds it gone all the same. One that comes later deletes the new
  file as any other.
- The files go first, Redis after: a replay of the journal moves a file's record into Redis
  as it is sealed (voice/ivr/journal.py), so one it moved under a previous secret while the
  files were re-sealed is still met by the pass over Redis.

What opens under no key (another secret, damaged) is left as it is and named by its call id
or file name, never its content; nothing here logs or returns content.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path

from cryptography.exceptions import InvalidTag

from sip_config.private_file import replace_private
from voice.ivr import journal, voicemail
from voice.ivr.store import CallStore, CallStoreUnavailable, Replaced
from voice.media.leftovers import remove_file

log = logging.getLogger(__name__)

# What a text that no key opens raises: a wrong tag (another secret, damaged), or no base64.
_UNREADABLE = (InvalidTag, ValueError, TypeError)


class Kind(StrEnum):
    """What is re-sealed, as the command's output names it."""

    RECORDS = "call records in Redis"
    KEPT = f"records kept on disk ({journal.FOLDER})"
    LIVE = f"live call records ({journal.LIVE_FOLDER})"
    VOICEMAIL = "voicemail"


class Outcome(Enum):
    """What became of one record or file."""

    RESEALED = "resealed"  # now under the current key
    CURRENT = "already current"  # under the current key before
    UNREADABLE = "unreadable"  # under no key this process has: left as it is
    GONE = "gone meanwhile"  # changed, expired, swept, saved or erased meanwhile


@dataclass(frozen=True, slots=True)
class Tally:
    """One kind's counts. ``unreadable``: the call ids (file names for voicemail) left as they
    are; ``stopped``: why the pass ended before the last one (Redis failed or refused, a disk
    error), empty when it went through."""

    kind: Kind
    resealed: int = 0
    current: int = 0
    gone: int = 0
    unreadable: tuple[str, ...] = ()
    stopped: str = ""

    @property
    def complete(self) -> bool:
        """Whether everything of this kind that opens is under the current key now."""
        return not self.unreadable and not self.stopped


@dataclass
class _Counting:
    counts: Counter[Outcome] = field(default_factory=Counter)
    unreadable: list[str] = field(default_factory=list)

    def add(self, outcome: Outcome, name: str) -> None:
        self.counts[outcome] += 1
        if outcome is Outcome.UNREADABLE:
            self.unreadable.append(name)

    def tally(self, kind: Kind, stopped: str = "") -> Tally:
        c = self.counts
        return Tally(
            kind,
            c[Outcome.RESEALED],
            c[Outcome.CURRENT],
            c[Outcome.GONE],
            tuple(sorted(self.unreadable)),
            stopped,
        )


# A file's call id (its erasure mark's) and what it is sealed bound to, from its name.
_Naming = Callable[[str], tuple[str, str] | None]


def _journal_naming(name: str) -> tuple[str, str] | None:
    call_id = journal.call_id_of(name)
    return None if call_id is None else (call_id, call_id)


def _voicemail_naming(name: str) -> tuple[str, str] | None:
    call_id = voicemail.call_id_of(name)
    return None if call_id is None else (call_id, name)  # a message is bound to its name


class Resealer:
    """Re-seals the records in ``store``'s Redis and the files of ``data_dir`` under
    ``store``'s current key."""

    def __init__(self, store: CallStore, data_dir: Path) -> None:
        self._store = store
        self._files: dict[Kind, tuple[Path, _Naming]] = {
            Kind.KEPT: (data_dir / journal.FOLDER, _journal_naming),
            Kind.LIVE: (data_dir / journal.LIVE_FOLDER, _journal_naming),
            Kind.VOICEMAIL: (data_dir / voicemail.FOLDER, _voicemail_naming),
        }

    async def run(self) -> list[Tally]:
        """Every kind: the files first, then Redis (reported Redis first). serve's replay of
        the journal moves a record from a file into Redis as it is sealed, never the other
        way: one it moves meanwhile, sealed under a previous secret (read before its file
        was re-sealed, or the file "gone meanwhile"), is still met by the pass over Redis."""
        files = [await self.files(kind) for kind in self._files]
        return [await self.records(), *files]

    async def records(self) -> Tally:
        """The call records in Redis. Stops at Redis's first failure or refusal (a record
        whose replacement failed is left as it was)."""
        counting = _Counting()
        try:
            async for batch in self._store.sealed_records():
                todo: list[tuple[str, str, str]] = []
                for call_id, sealed in batch:
                    try:
                        resealed = self._store.reseal(call_id, sealed)
                    except _UNREADABLE:
                        counting.add(Outcome.UNREADABLE, call_id)
                        continue
                    if resealed is None:
                        counting.add(Outcome.CURRENT, call_id)
                    else:
                        todo.append((call_id, sealed, resealed))
                # One batch's scripts leave in one write (verification/redis_mux.py).
                done = await asyncio.gather(
                    *(self._store.replace_sealed(*t) for t in todo), return_exceptions=True
                )
                failed: BaseException | None = None
                for (call_id, _, _), replaced in zip(todo, done, strict=True):
                    if isinstance(replaced, BaseException):
                        failed = failed or replaced
                    elif replaced is Replaced.REPLACED:
                        log.debug("call %s: record re-sealed", call_id)
                        counting.add(Outcome.RESEALED, call_id)
                    else:
                        log.debug("call %s: record %s meanwhile", call_id, replaced.name.lower())
                        counting.add(Outcome.GONE, call_id)
                if failed is not None:
                    raise failed
        except CallStoreUnavailable as exc:
            return counting.tally(Kind.RECORDS, f"Redis failed or refused: {exc}")
        return counting.tally(Kind.RECORDS)

    async def files(self, kind: Kind) -> Tally:
        """The files of one kind in the data dir. Stops at a disk error, or when Redis does
        not answer whether a call was erased."""
        folder, naming = self._files[kind]
        counting = _Counting()
        for name in await asyncio.to_thread(_names, folder):
            named = naming(name)
            if named is None:
                continue  # a temporary file (its write goes on), or not the service's
            call_id, bound = named
            try:
                outcome = await self._file(folder / name, call_id, bound)
            except CallStoreUnavailable as exc:
                return counting.tally(
                    kind,
                    f"Redis did not say whether call {call_id} was erased meanwhile ({exc}); if "
                    f"it was, DELETE /v1/calls/{call_id} again",
                )
            except OSError as exc:  # no room, a read-only disk: the others would fail too
                return counting.tally(kind, f"{type(exc).__name__}: {exc}")
            counting.add(outcome, call_id if kind is not Kind.VOICEMAIL else name)
        return counting.tally(kind)

    async def _file(self, path: Path, call_id: str, bound: str) -> Outcome:
        try:
            sealed = await asyncio.to_thread(_read, path)
        except (OSError, UnicodeDecodeError):  # its mode, a disk error: as the service sees it
            return Outcome.UNREADABLE
        if sealed is None:
            return Outcome.GONE
        try:
            # A minute of voicemail is 1.9 MB to open and seal again: off the loop.
            resealed = await asyncio.to_thread(self._store.reseal, bound, sealed)
        except _UNREADABLE:
            return Outcome.UNREADABLE
        if resealed is None:
            return Outcome.CURRENT
        if not await asyncio.to_thread(replace_private, path, resealed):
            return Outcome.GONE
        if await self._store.is_erased(call_id):
            # Marked: the erasure may have deleted the file between replace_private's check
            # and its rename. Deleted again, whichever it was.
            await asyncio.to_thread(remove_file, path)
            log.debug("call %s: erased meanwhile: %s deleted", call_id, path.name)
            return Outcome.GONE
        log.debug("call %s: %s re-sealed", call_id, path.name)
        return Outcome.RESEALED


def _names(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir())


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
