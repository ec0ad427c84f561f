"""The journal of unsaved calls: sealed call records that Redis did not take, kept on disk.

"Nothing lost" is a promise of the clinic line, and a record lived only in memory until Redis
took it. Every record is written here before its save asks Redis (``<call id>.ahead``, the
copy written ahead), and deleted once Redis took it, so a process killed while the save
waits (up to the store's patience) leaves it here. A record whose save fails for the store's
whole patience (Redis stopped or frozen for 30 s at the end of a call), or is cut short
because the service stops, is kept here exactly as Redis would have held it: sealed
(AES-256-GCM under the call records' key, bound to its call id; never clear text), one file
``<call id>.sealed`` in ``$CLINIC_DATA_DIR/unsaved-calls`` (0600, in a 0700 folder). Each
file is written under a temporary name, fsynced, renamed and its folder fsynced, so a crash
or power cut leaves the whole record or none of it.

Each call counts once in ``clinic_calls_total`` (``on_counted``), when its copy written ahead
goes: deleted because Redis took the record (:meth:`CallJournal.taken`), replaced by the kept
record (:meth:`CallJournal.keep`), or, left by a ``serve`` that died, renamed to the kept
record's name at the next start (:meth:`CallJournal.leftovers`). The count follows that file
step in the same thread, never comes before it: a ``serve`` killed before it (during the
save, or after Redis took the record) leaves the copy, and the next start counts the call;
one killed after it has counted the call, and left no copy to count again (killed between
the two, the delete's fsync, under a millisecond, the call is not counted). A kept record is
never counted again (it was counted as it was kept), nor is a dead ``serve``'s live record
of a call whose own record is in Redis. A copy whose delete failed stays, and is counted at
the next start, not now (one deleted whose folder's fsync then failed is counted now: that
delete alone is not durable). The counter is the process's own: what a ``serve`` counted
and no scrape read before it died is lost with it (a counter reset to Prometheus), as for
every call it counted; no call is counted by two processes. The delete is durable before the
count (its folder fsynced, in the same thread: one fsync more per call end, 0.3 ms on the
test VM's ext4), so a power cut cannot bring back the copy of a counted call, counted again
at the next start. A live record's delete is not fsynced (it would be a second fsync per
call end): it follows the call's own record, saved or kept, so one that a power cut brings
back finds that record in Redis, or kept and replayed first, and is deleted, neither saved
nor counted (:meth:`CallJournal.replay_lost`, ``only_new``).

``serve`` replays the journal into Redis at start and every :data:`REPLAY_EVERY_S`
(:meth:`CallJournal.replay`): each record with the expiry a normal save gives it (its call's
start plus ``CLINIC_CALL_RETENTION_DAYS``, as its voicemail: voice/ivr/store.py), its file
deleted once Redis took it; a record already past that is deleted, not saved, and makes no
call known to an erasure meanwhile (:meth:`CallJournal.holds`: 404, as its record would be).
Replaying a record twice is harmless (the same SET and ZADD), so a file whose delete was lost
to a crash is simply replayed again. A record of a call that
was erased meanwhile (``DELETE /v1/calls/{id}``) is deleted, not saved: the store refuses it
(voice/ivr/store.py), so an erasure holds whatever the order of the two. Each replayed file's
delete is durable all the same (its folder fsynced: one fsync per record replayed, which is
once per call at most), so a power cut does not bring a saved record back to be replayed.

The file operations block (fsync): the async methods run them in a thread.

What waits on disk is counted as it changes (:class:`RecordsOnDisk`: on each keep, replay and
delete; the folders are listed at start and at each replay, in a thread), for ``/metrics`` and
``GET /v1/calls``: never by listing a folder when it is read.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from cryptography.exceptions import InvalidTag

from sip_config.private_file import fsync_folder, write_private
from voice.ivr.call_record import CallResult
from voice.ivr.store import CallStore, CallStoreUnavailable, Saved, within_retention
from voice.media.leftovers import remove_file, remove_files

log = logging.getLogger(__name__)

FOLDER = "unsaved-calls"  # in the data dir
# The records of the calls under way (their outcome: the service lost them), next to FOLDER.
LIVE_FOLDER = "live-calls"
REPLAY_EVERY_S = 30.0
SUFFIX = ".sealed"
AHEAD_SUFFIX = ".ahead"  # a copy written ahead: its call not yet counted
# A temporary file older than this was left by a process that died while writing it (a
# write takes milliseconds, and serve.lock keeps any other serve off the data dir).
STALE_TEMP_S = 3600.0
# The call ids of the call records (voice/ivr/api.py): safe as a file name.
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class Replayed:
    """What one replay did: records saved to Redis, deleted as expired, left on disk (Redis
    still down, or a file that does not open with this service's key), and deleted because
    their call was erased."""

    saved: int = 0
    expired: int = 0
    left: int = 0
    erased: int = 0
    stopped: bool = False  # Redis failed before every record was tried: some wait for it


@dataclass(frozen=True, slots=True)
class OnDisk:
    """The call records on disk that Redis does not hold, so not in ``GET /v1/calls``."""

    kept: int = 0  # in FOLDER: a save Redis did not take; replayed every REPLAY_EVERY_S
    cut: int = 0  # in LIVE_FOLDER, left by a serve that died: saved once Redis takes them
    unreadable: int = 0  # either folder: does not open with this service's keys; left there

    @property
    def total(self) -> int:
        return self.kept + self.cut + self.unreadable


class RecordsOnDisk:
    """The count of one data dir's records on disk that Redis does not hold, shared by the
    journals of one process (the clinic line's, which replays, and the erasure's) and kept
    current by them; on the event loop only. Not counted: the copy written ahead while a save
    asks Redis (milliseconds, unless Redis is down: then it is kept at the save's end), and
    the live records of the calls under way.

    ``None`` from :meth:`now` until the folders were read (``serve``: at the clinic line's
    start, before any request); a file another process deleted (an erasure answered by an
    HTTP worker) is seen at the next replay.
    """

    def __init__(self) -> None:
        self._counted = False
        self._kept: set[str] = set()  # FOLDER's call ids
        self._unreadable: set[str] = set()  # of _kept: do not open (warned about once)
        self._cut: set[str] = set()  # LIVE_FOLDER's, of calls a dead serve cut
        self._cut_unreadable: set[str] = set()  # of those: do not open
        # The calls erased since a replay began to read FOLDER (:meth:`listing`): its list
        # may hold their files, read before they went.
        self._erased_while_listing: set[str] | None = None

    def now(self) -> OnDisk | None:
        if not self._counted:
            return None
        unreadable = len(self._unreadable) + len(self._cut_unreadable)
        return OnDisk(len(self._kept) - len(self._unreadable), len(self._cut), unreadable)

    # -- kept current by CallJournal -------------------------------------------------------------
    def found_at_start(self, kept: list[str], cut: list[str]) -> None:
        self._kept.update(kept)
        self._cut, self._cut_unreadable = set(cut), set()
        self._counted = True

    def kept(self, call_id: str) -> None:
        self._kept.add(call_id)
        self._unreadable.discard(call_id)  # written anew: it opens

    def deleted(self, call_id: str) -> None:
        """Its kept record went (saved, past its retention, erased, or gone)."""
        self._kept.discard(call_id)
        self._unreadable.discard(call_id)

    def kept_unreadable(self, call_id: str) -> None:
        if call_id in self._kept:  # not one erased while the replay read it (its file went)
            self._unreadable.add(call_id)

    def is_unreadable(self, call_id: str) -> bool:
        return call_id in self._unreadable

    def unreadable_kept(self) -> int:
        return len(self._unreadable)

    def cut_done(self, call_id: str, *, unreadable: bool) -> None:
        """The live record a dead serve left is saved or deleted, or (``unreadable``) left
        (unless it was erased while it was read: its file went)."""
        if unreadable and call_id in self._cut:
            self._cut_unreadable.add(call_id)
        self._cut.discard(call_id)

    def erased(self, call_id: str) -> None:
        """Every file of the call went."""
        self.deleted(call_id)
        self._cut.discard(call_id)
        self._cut_unreadable.discard(call_id)
        if self._erased_while_listing is not None:
            self._erased_while_listing.add(call_id)

    def kept_ids(self) -> set[str]:
        return set(self._kept)

    def listing(self) -> set[str]:
        """A replay begins to read FOLDER: the kept records now (:meth:`listed`'s
        ``before``). A call erased in this process from now until :meth:`listed` is not
        counted back from the list, which may have seen its file before it went."""
        self._erased_while_listing = set()
        return self.kept_ids()

    def cut_unreadable_ids(self) -> set[str]:
        return set(self._cut_unreadable)

    def listed(self, before: set[str], kept: list[str], cut_unreadable: set[str]) -> None:
        """A replay read FOLDER (``kept``; the count was ``before`` as it began) and found
        ``cut_unreadable`` of the unreadable live records still there: a record another
        process deleted (an erasure) is gone; one kept while the folder was read stays."""
        listed = set(kept) - (self._erased_while_listing or set())
        self._erased_while_listing = None
        self._kept = (self._kept - (before - listed)) | listed
        self._unreadable &= self._kept
        self._cut_unreadable &= cut_unreadable


class CallJournal:
    """The journal folder of one data dir, sealed with ``store``'s key and replayed into it.

    ``on_cut_recorded`` is called once for each call a dead ``serve`` cut that
    :meth:`replay_lost` recorded (its live record written to Redis: not when the call's own
    record was there already, nor for an erased call), so it is counted as any ended call is.
    ``on_disk`` is the process's count of what waits on disk (one of its own by default).
    ``on_counted`` is called once for each call whose record this journal takes from the
    written-ahead state (its outcome, None for a record with none), right after the file
    step, in the thread that made it: it must be thread-safe (a metrics counter's ``inc``).
    """

    def __init__(
        self,
        folder: Path,
        store: CallStore,
        live_folder: Path | None = None,
        *,
        on_cut_recorded: Callable[[], None] | None = None,
        on_disk: RecordsOnDisk | None = None,
        on_counted: Callable[[str | None], None] | None = None,
    ) -> None:
        self._folder = folder
        self._live = folder.parent / LIVE_FOLDER if live_folder is None else live_folder
        self._store = store
        self._on_cut_recorded = on_cut_recorded
        self._on_disk = RecordsOnDisk() if on_disk is None else on_disk
        self._on_counted = on_counted
        # The writes ahead in their threads, by call id: a keep waits for its call's.
        self._ahead: dict[str, asyncio.Task[None]] = {}
        # File steps that count a call: run to their end even when their caller is cancelled.
        self._steps: set[asyncio.Task[None]] = set()

    @property
    def folder(self) -> Path:
        return self._folder

    @property
    def on_disk(self) -> RecordsOnDisk:
        return self._on_disk

    async def keep(self, result: CallResult) -> None:
        """Seal ``result`` and write it to the journal (durable when this returns): kept until
        Redis takes it, and counted (waiting on disk, and the call: :attr:`on_counted`) once
        its copy written ahead, if any, is gone. Waits for a write ahead of the call still
        in its thread (its save was cancelled meanwhile): one landing after this would be
        counted again at the next start."""
        writing = self._ahead.get(result.id)
        if writing is not None:
            await asyncio.wait([writing])  # its failure is the write ahead's, logged there
        record = self._store.seal_result(result)
        outcome = result.record.outcome
        await self._step(lambda: self._keep(record.call_id, record.sealed, outcome))
        self._on_disk.kept(result.id)

    async def write_ahead(self, result: CallResult) -> None:
        """Write the copy of ``result`` kept while its save asks Redis (``<id>.ahead``): not
        counted, neither waiting on disk nor as a call; :meth:`taken` or :meth:`keep` ends
        it, or the next start (:meth:`leftovers`) when the process dies first."""
        record = self._store.seal_result(result)
        writing = asyncio.ensure_future(
            asyncio.to_thread(write_private, self._ahead_path(record.call_id), record.sealed)
        )
        self._ahead[record.call_id] = writing
        writing.add_done_callback(lambda _: self._ahead.pop(record.call_id, None))
        writing.add_done_callback(_seen)
        await asyncio.shield(writing)

    async def taken(self, result: CallResult) -> None:
        """Redis took ``result``'s record: its copy written ahead (if any) goes, and then the
        call is counted (:attr:`on_counted`). Run to its end when the caller is cancelled;
        raises ``OSError``, nothing counted, when the copy could not be deleted (the next
        start counts the call then)."""
        outcome = result.record.outcome
        await self._step(lambda: self._taken(result.id, outcome))

    # -- calls under way ---------------------------------------------------------------------
    async def begin(self, result: CallResult) -> None:
        """Write the record a call has while it runs (outcome ``cut_service_lost``) among the
        live calls, over the one there: if ``serve`` dies during the call (``kill -9``, a
        power cut), the next start saves it (:meth:`replay_lost`), so staff see a call that
        was cut, how far it went and how urgent it was. The session rewrites it as the call
        goes on, one write at a time (voice/ivr/live_record.py)."""
        record = self._store.seal_result(result)
        await asyncio.to_thread(write_private, self._live_path(result.id), record.sealed)

    async def end(self, call_id: str) -> None:
        """The call ended and its own record is saved or kept: its live record goes."""
        await asyncio.to_thread(self._live_path(call_id).unlink, missing_ok=True)

    async def leftovers(self, now: float) -> list[str]:
        """The live calls an earlier ``serve`` left: read at start, before any call. The
        copies it wrote ahead become kept records, each call counted then (:attr:`on_counted`:
        it died before it counted them). Counts the live calls, and the records kept on disk,
        in :attr:`on_disk` (from then on kept current)."""
        await self._step(lambda: self._adopt(now))
        cut, kept = await asyncio.to_thread(
            lambda: (_ids_of(self._live, now), _ids_of(self._folder, now))
        )
        self._on_disk.found_at_start(kept, cut)
        return cut

    async def replay_all(self, call_ids: list[str], now: float) -> list[str]:
        """:meth:`replay`, then :meth:`replay_lost` of ``call_ids`` (the ids left for the
        next try), only once the replay tried every kept record. serve killed while a call's
        own record was being saved leaves that record kept (by :meth:`leftovers`) and the
        call's live record both; the live one is saved only where Redis holds no record of
        the call, so it must wait for the kept one to land, or it is recorded, and counted, as
        a cut call. A replay stopped by Redis leaves kept records untried: Redis back a moment
        later would take the live record first."""
        replayed = await self.replay(now)
        if call_ids and not replayed.stopped:
            return await self.replay_lost(call_ids, now)
        return call_ids

    async def replay_lost(self, call_ids: list[str], now: float) -> list[str]:
        """Save the records of ``call_ids`` (from :meth:`leftovers`) that Redis does not hold
        yet, never over one it holds (that call's own record got there first), and delete
        their files; the ids left for the next try (Redis down)."""
        for i, call_id in enumerate(call_ids):
            path = self._live_path(call_id)
            try:
                done = await self._save_file(path, call_id, now, only_new=True)
            except CallStoreUnavailable as exc:
                log.warning("%d live call record(s) wait for Redis (%s)", len(call_ids) - i, exc)
                return call_ids[i:]
            self._on_disk.cut_done(call_id, unreadable=done is _Done.UNREADABLE)
            if done is _Done.UNREADABLE:
                log.error("call %s: the live record in %s does not open: left there", call_id, path)
            elif done is _Done.SAVED:
                log.warning(
                    "call %s: the service stopped during this call (killed?): recorded as cut",
                    call_id,
                )
                if self._on_cut_recorded is not None:
                    self._on_cut_recorded()
            elif done is _Done.KEPT:
                # serve died after the call's own record was saved, before the live one went.
                log.info(
                    "call %s: its own record was saved already: its live record is deleted, "
                    "not saved",
                    call_id,
                )
            elif done is _Done.ERASED:
                log.info("call %s: erased: its live record is deleted, not saved", call_id)
        return []

    async def replay(self, now: float) -> Replayed:
        """Save every record of the journal to Redis (one try each); stops at Redis's first
        failure, and the next replay tries again."""
        tally = self._on_disk
        before, cut_unreadable = tally.listing(), tally.cut_unreadable_ids()
        listed, still_there = await asyncio.to_thread(
            lambda: (_ids_of(self._folder, now), self._present(cut_unreadable))
        )
        tally.listed(before, listed, still_there)
        names = [i for i in listed if not tally.is_unreadable(i)]
        saved = expired = erased = 0
        for i, call_id in enumerate(names):
            try:
                done = await self._save_file(self._path(call_id), call_id, now)
            except CallStoreUnavailable as exc:
                left = len(names) - i
                log.warning(
                    "%d call record(s) kept on disk wait for Redis (%s): trying again in %d s",
                    left,
                    exc,
                    REPLAY_EVERY_S,
                )
                return Replayed(
                    saved, expired, left + tally.unreadable_kept(), erased, stopped=True
                )
            if done is not _Done.UNREADABLE:
                tally.deleted(call_id)  # its file went (or had gone meanwhile)
            if done is _Done.UNREADABLE:
                # A CLINIC_SECRET not in CLINIC_PREVIOUS_SECRETS, or a damaged file: kept for
                # the operator to look at.
                tally.kept_unreadable(call_id)
                log.error(
                    "call %s: the record kept in %s does not open with this service's "
                    "keys: left there",
                    call_id,
                    self._folder,
                )
            elif done is _Done.EXPIRED:
                log.info("call %s: the record kept on disk is past its retention: deleted", call_id)
                expired += 1
            elif done is _Done.SAVED:
                log.info("call %s: the record kept on disk is now saved", call_id)
                saved += 1
            elif done is _Done.ERASED:
                log.info("call %s: erased: the record kept on disk is deleted, not saved", call_id)
                erased += 1
        return Replayed(saved, expired, tally.unreadable_kept(), erased)

    async def _save_file(
        self, path: Path, call_id: str, now: float, *, only_new: bool = False
    ) -> _Done:
        """Save the record in ``path`` to Redis (one try: the next replay is the retry) with
        the expiry a normal save gives it, and delete the file; one past that is deleted,
        not saved. Raises :class:`CallStoreUnavailable`, the file left as it is."""
        sealed = await asyncio.to_thread(_read, path)
        if sealed is None:
            return _Done.GONE  # deleted meanwhile
        try:
            record = self._store.reopen(call_id, sealed)
        except (InvalidTag, ValueError, KeyError, TypeError):
            return _Done.UNREADABLE
        done = _Done.EXPIRED
        if within_retention(record.started_at, now, self._store.ttl_s):
            # Its expiry reckoned by the store at the save, from the call's start.
            saved = await self._store.save_sealed(record, patience_s=0.0, only_new=only_new)
            done = _SAVED_AS[saved]
        await asyncio.to_thread(_delete, path)
        return done

    # -- erasure (voice/ivr/erasure.py) ----------------------------------------------------------
    async def live_since(self, call_id: str) -> float | None:
        """When the live record of ``call_id`` was last written (a call under way rewrites it
        at least every ``LIVE_REFRESH_S``), or None when there is none."""
        return await asyncio.to_thread(_mtime, self._live_path(call_id))

    async def holds(self, call_id: str, now: float | None = None) -> bool:
        """Whether a record of ``call_id`` is on disk: kept, written ahead, or live (``now``
        given: one within its retention at ``now``, as a replay would save it; one past it
        is the next replay's to delete, and makes no call known). A record that does not
        open (a secret not in ``CLINIC_PREVIOUS_SECRETS``) counts: its start is not known."""
        paths = (self._path(call_id), self._ahead_path(call_id), self._live_path(call_id))
        # Its start is inside the seal: opened in a thread (~0.1 ms for a record), as the
        # replay opens it, so the erasure's answer is the replay's.
        return await asyncio.to_thread(lambda: any(self._held(p, call_id, now) for p in paths))

    async def drop(self, call_id: str) -> int:
        """Delete every copy of ``call_id`` on disk, kept, written ahead or live (one a dead
        ``serve`` left: no erasure meets a call's under way), with a temporary file a
        write cut short left; durable when this returns (the folders fsynced). Returns how
        many files went. Raises ``OSError`` when one could not be deleted."""
        removed = await asyncio.to_thread(self._drop, call_id)
        self._on_disk.erased(call_id)
        return removed

    # -- blocking file operations (in a thread) --------------------------------------------------
    def _path(self, call_id: str) -> Path:
        return _file(self._folder, call_id)

    def _live_path(self, call_id: str) -> Path:
        return _file(self._live, call_id)

    def _ahead_path(self, call_id: str) -> Path:
        return _file(self._folder, call_id, AHEAD_SUFFIX)

    async def _step(self, step: Callable[[], None]) -> None:
        """Run ``step`` in a thread, to its end even when the caller is cancelled (a call's
        task, at a stop): a file step that counts a call must not be cut from its count."""
        task = asyncio.ensure_future(asyncio.to_thread(step))
        self._steps.add(task)
        task.add_done_callback(self._steps.discard)
        task.add_done_callback(_seen)
        await asyncio.shield(task)

    def _count(self, outcome: str | None) -> None:
        if self._on_counted is not None:
            self._on_counted(outcome)

    def _taken(self, call_id: str, outcome: str | None) -> None:
        _delete(self._ahead_path(call_id))  # none when the write ahead failed
        self._count(outcome)

    def _keep(self, call_id: str, sealed: str, outcome: str | None) -> None:
        write_private(self._path(call_id), sealed)
        # Killed here, both copies are there: the next start puts the one written ahead in
        # the kept one's place (the same record) and counts the call, not counted here yet.
        _delete(self._ahead_path(call_id))
        self._count(outcome)

    def _adopt(self, now: float) -> None:
        """The copies written ahead by a ``serve`` that died, made kept records and counted."""
        if not self._folder.is_dir():
            return
        for call_id in _ids_of(self._folder, now, AHEAD_SUFFIX):
            path = self._ahead_path(call_id)
            sealed = _read(path)
            if sealed is None:
                continue
            try:
                outcome: str | None = self._store.open(call_id, sealed)["outcome"]
            except (InvalidTag, ValueError, KeyError, TypeError):
                # Kept as any record that does not open (the replay says so, and leaves it);
                # not counted: its outcome is not known.
                log.error("call %s: the copy written ahead does not open: not counted", call_id)
                outcome, counts = None, False
            else:
                counts = True
            os.replace(path, self._path(call_id))
            if counts:
                self._count(outcome)
            log.info("call %s: its save was cut short by the service's end: kept", call_id)
        fsync_folder(self._folder)  # the renames, through a power cut

    def _held(self, path: Path, call_id: str, now: float | None) -> bool:
        """Whether ``path`` holds a record of ``call_id`` (within its retention at ``now``)."""
        if now is None:
            return path.exists()
        try:
            sealed = path.read_text()
        except FileNotFoundError:
            return False
        except (OSError, UnicodeDecodeError):
            # Not readable (its mode, a disk error) or damaged (bytes that are no text):
            # erasable, as any copy that does not open.
            return True
        try:
            started_at = self._store.reopen(call_id, sealed).started_at
        except (InvalidTag, ValueError, KeyError, TypeError):
            return True  # does not open: left for the operator, and erasable
        return within_retention(started_at, now, self._store.ttl_s)

    def _present(self, call_ids: set[str]) -> set[str]:
        """Those of ``call_ids`` whose live record is still there."""
        return {i for i in call_ids if self._live_path(i).exists()}

    def _drop(self, call_id: str) -> int:
        removed = 0
        for path in (self._path(call_id), self._ahead_path(call_id), self._live_path(call_id)):
            removed += remove_file(path)
        return removed


class _Done(Enum):
    """What :meth:`CallJournal._save_file` did with a file."""

    GONE = "gone"  # deleted meanwhile
    UNREADABLE = "unreadable"  # does not open with this service's key: left there
    EXPIRED = "expired"  # past its retention: deleted
    SAVED = "saved"  # in Redis: deleted
    KEPT = "kept"  # only_new: a record of its call was in Redis already: deleted, not saved
    ERASED = "erased"  # its call was erased: deleted, not saved


_SAVED_AS = {Saved.WRITTEN: _Done.SAVED, Saved.KEPT: _Done.KEPT, Saved.ERASED: _Done.ERASED}


def _seen(task: asyncio.Task[None]) -> None:
    """Mark a shielded file step's failure as retrieved: its caller, when still waiting,
    gets and logs it; one cancelled meanwhile (a stop) does not, and asyncio would log the
    task's traceback as "never retrieved" at its collection, long after."""
    if not task.cancelled():
        task.exception()


def call_id_of(name: str) -> str | None:
    """The call id of the record file ``name`` (kept, written ahead or live); None for
    another name (a temporary file's, say)."""
    for suffix in (SUFFIX, AHEAD_SUFFIX):
        call_id = name.removesuffix(suffix)
        if name.endswith(suffix) and _ID.fullmatch(call_id):
            return call_id
    return None


def _file(folder: Path, call_id: str, suffix: str = SUFFIX) -> Path:
    if not _ID.fullmatch(call_id):
        raise ValueError("not a call id")
    return folder / f"{call_id}{suffix}"


def _ids_of(folder: Path, now: float, suffix: str = SUFFIX) -> list[str]:
    """The call ids of the records in ``folder`` (and away with stale temporary files)."""
    if not folder.is_dir():
        return []
    remove_files(folder, ".*.tmp", STALE_TEMP_S, now)
    ids = (p.name.removesuffix(suffix) for p in folder.glob(f"*{suffix}"))
    return sorted(i for i in ids if _ID.fullmatch(i))


def _delete(path: Path) -> None:
    """Delete ``path`` durably: its folder fsynced, so a power cut does not bring it back
    (to be counted or replayed again). Nothing to do when it is not there. An unlink that
    fails raises (the file stays, for the next start); a folder whose fsync fails once the
    file is gone (EIO, the folder removed meanwhile) only logs: the file is gone all the
    same, and the step goes on to its count, or no start would count the call."""
    try:
        path.unlink()
    except FileNotFoundError:
        return
    try:
        fsync_folder(path.parent)
    except OSError as exc:  # a path and a reason, never a record
        log.warning("the delete of %s is not durable (fsync failed): %s", path, exc)


def _read(path: Path) -> str | None:
    try:
        # Bytes that are no text (a damaged file) read as a record that does not open (the
        # replay's UNREADABLE: left for the operator), not an error that stops every replay.
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return None


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None
