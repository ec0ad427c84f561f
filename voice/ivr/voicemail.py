"""Voicemail: a caller's recorded message. Health data, kept sealed in the data dir.

Each message is one file ``<call id>-<8 hex>.sealed`` in ``$CLINIC_DATA_DIR/voicemail``
(0600, in a 0700 folder), sealed with the call records' key (one sealed before the secret was
changed opens with a previous secret's, as records do) and bound to its own name, and named
in its call record's values (``GET`` plays a message of the call its record does not name
too: serve killed between the write and the record naming it). It lives as long as its call's
record does: ``CLINIC_CALL_RETENTION_DAYS`` from the call's start, which both count from (the
record's expiry, voice/ivr/store.py; the file's modification time, set to the call's start by
:meth:`Voicemails.save`), so neither outlives the other whatever the call's length or however a
kill cut it. :meth:`Voicemails.sweep` deletes older files,
:meth:`Voicemails.erase` those of an erased call (:meth:`Voicemails.drop_erased` those of a
call another ``serve`` on the same Redis erased), and ``GET /v1/calls/{id}/voicemail`` plays
one back as WAV.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag

from sip_config.private_file import write_private
from voice.ivr.follow_up import MESSAGE_NAME
from voice.ivr.store import CallStore, LoggedOnce, within_retention
from voice.ivr.voicemail_usage import StoredBytes
from voice.media.leftovers import remove_file, remove_files
from voice.media.pcm import SAMPLE_WIDTH, Pcm, bytes_to_samples, wav_bytes

log = logging.getLogger(__name__)

FOLDER = "voicemail"  # in the data dir
RATE_HZ = 8000
# A message's file name; the call id part is that of the call records (voice/ivr/api.py).
NAME = MESSAGE_NAME  # what a message file is named: <call id>-<8 hex>.sealed


class VoicemailUnreadable(RuntimeError):
    """A message that is there but does not open: sealed under a ``CLINIC_SECRET`` not in
    ``CLINIC_PREVIOUS_SECRETS``, damaged, or not readable by the service (its mode, a disk
    error)."""


class Voicemails:
    """The voicemail folder of one data dir."""

    def __init__(self, folder: Path, store: CallStore) -> None:
        self._folder = folder
        self._store = store
        # The messages that do not open, logged once each (the last UNREADABLE_REMEMBERED).
        self._unreadable = LoggedOnce()
        self._stored = StoredBytes()  # what the messages take (voice/ivr/voicemail_usage.py)
        self._scanning = asyncio.Lock()  # one listing of the folder at a time

    async def save(self, call_id: str, pcm16: bytes, *, started_at: float | None = None) -> str:
        """Seal and write ``pcm16`` (8 kHz mono, 16-bit) for ``call_id``, the call that began
        at ``started_at`` (its retention counts from then; None: from now); return its name.

        A recording of an odd length (a hang-up that cut a frame mid-sample) is saved without
        its last byte, half a sample (62 us), and logged: 16-bit PCM of an odd length would
        never open, and the message is kept rather than refused."""
        if len(pcm16) % SAMPLE_WIDTH:
            log.warning(
                "call %s: the message is %d bytes, not whole 16-bit samples (a frame cut "
                "short?): saved without its last byte",
                call_id,
                len(pcm16),
            )
            pcm16 = pcm16[: len(pcm16) - len(pcm16) % SAMPLE_WIDTH]
        name = f"{call_id}-{secrets.token_hex(4)}.sealed"
        # Sealing a minute of message (hex, JSON, AES-GCM, base64) takes ~15 ms: off the loop.
        writing = asyncio.ensure_future(
            asyncio.to_thread(self._seal_and_write, name, pcm16, started_at)
        )
        try:
            size = await asyncio.shield(writing)
        except asyncio.CancelledError:
            # The thread writes the file all the same (the call's tasks cancelled at its
            # end): counted once written, or the cap admitted that much more until the
            # hourly listing.
            writing.add_done_callback(lambda done: self._written_late(name, done))
            raise
        self._stored.written(name, size)
        return name

    def _written_late(self, name: str, writing: asyncio.Future[int]) -> None:
        if not writing.cancelled() and writing.exception() is None:
            self._stored.written(name, writing.result())

    def _seal_and_write(self, name: str, pcm16: bytes, started_at: float | None) -> int:
        sealed = self._store.seal(name, {"pcm16_8k": pcm16.hex()})
        write_private(self._folder / name, sealed, mtime=started_at)
        return (self._folder / name).stat().st_size

    async def wav(self, call_id: str, name: str) -> bytes | None:
        """The message ``name`` of ``call_id`` as a WAV file, or None when it is gone (past
        its retention, erased) or is not that call's. Raises :class:`VoicemailUnreadable`
        (logged once per message) when it is there but does not open: staff must not be
        told a caller left no message when one is there."""
        if not _of_call(call_id, name):
            return None
        # Reading, opening and the WAV: about 10 ms for a minute of message, off the loop.
        try:
            return await asyncio.to_thread(self._read_wav, name)
        except (OSError, ValueError, KeyError, TypeError, InvalidTag) as exc:
            if self._unreadable.first(name):
                # The file's name and the error's kind: never its content (health data).
                log.error(
                    "call %s: voicemail %s does not open (sealed under a CLINIC_SECRET not in "
                    "CLINIC_PREVIOUS_SECRETS, damaged, or not readable): %s",
                    call_id,
                    name,
                    type(exc).__name__,
                )
            raise VoicemailUnreadable(name) from exc

    def _read_wav(self, name: str) -> bytes | None:
        try:
            sealed = (self._folder / name).read_text()
        except FileNotFoundError:
            return None  # swept, or erased
        pcm = bytes.fromhex(self._store.open(name, sealed)["pcm16_8k"])
        # One saved before odd lengths were cut at the save: its last half sample dropped.
        pcm = pcm[: len(pcm) - len(pcm) % SAMPLE_WIDTH]
        return wav_bytes(Pcm(bytes_to_samples(pcm), RATE_HZ))

    async def holds(self, call_id: str, now: float | None = None) -> bool:
        """Whether a message of ``call_id`` is in the folder (``now`` given: one within its
        retention at ``now``; one past it is the sweep's, within the hour)."""
        names = await asyncio.to_thread(self._names_of, call_id)
        if now is None or not names:
            return bool(names)
        return await asyncio.to_thread(self._any_within_retention, names, now)

    def _any_within_retention(self, names: list[str], now: float) -> bool:
        for name in names:
            path = self._folder / name
            # A write cut short left only its hidden temporary file: its time is the write's.
            temps = list(self._folder.glob(f".{name}.*.tmp"))
            for p in (path, *temps):
                try:
                    if within_retention(p.stat().st_mtime, now, self._store.ttl_s):
                        return True
                except FileNotFoundError:
                    continue
        return False

    async def names(self, call_id: str) -> list[str]:
        """The messages of ``call_id`` in the folder, named in its record or not (not a
        write cut short)."""
        return await asyncio.to_thread(self._files_of, call_id)

    async def erase(self, call_id: str) -> int:
        """Delete every message of ``call_id`` (durably: the folder fsynced), named in its
        record or not; how many files went. Raises ``OSError`` when one could not be."""
        removed = await asyncio.to_thread(self._erase, call_id)
        self._stored.removed(removed)
        return sum(removed.values())

    async def drop_erased(self) -> int:
        """Delete the messages of the calls marked erased in Redis: an erasure answered by
        another ``serve`` on the same Redis (another host, its own data dir) deleted the
        files of its data dir only. How many files went. Raises
        :class:`~voice.ivr.store.CallStoreUnavailable` or ``OSError``."""
        call_ids = await asyncio.to_thread(self._call_ids)
        removed = 0
        for call_id in sorted(await self._store.erased_among(call_ids)):
            removed += await self.erase(call_id)
        return removed

    def _call_ids(self) -> list[str]:
        """The calls with a message in the folder (or a write of one cut short)."""
        if not self._folder.is_dir():
            return []
        names = (p.name for p in self._folder.glob("*.sealed"))
        temps = (p.name[1:].rsplit(".", 2)[0] for p in self._folder.glob(".*.sealed.*.tmp"))
        return sorted({i for n in (*names, *temps) if (i := call_id_of(n)) is not None})

    def _files_of(self, call_id: str) -> list[str]:
        if not self._folder.is_dir():
            return []
        # "<id>-*" alone would take call "<id>-x"'s messages too: the whole name must match.
        names = (p.name for p in self._folder.glob(f"{call_id}-*.sealed"))
        return sorted(n for n in names if _of_call(call_id, n))

    def _names_of(self, call_id: str) -> list[str]:
        if not self._folder.is_dir():
            return []
        names = set(self._files_of(call_id))
        # A write cut short (a crash) leaves only its hidden ".<name>.<random>.tmp".
        names |= {
            p.name[1:].rsplit(".", 2)[0] for p in self._folder.glob(f".{call_id}-*.sealed.*.tmp")
        }
        return sorted(n for n in names if _of_call(call_id, n))

    def _erase(self, call_id: str) -> dict[str, int]:
        """The messages of ``call_id`` deleted, and how many files each was."""
        removed = {name: remove_file(self._folder / name) for name in self._names_of(call_id)}
        return {name: n for name, n in removed.items() if n}

    @property
    def known_bytes(self) -> int | None:
        """:meth:`used_bytes` as kept now, without waiting; None before the first count."""
        return self._stored.total

    async def used_bytes(self) -> int:
        """Bytes the folder's messages take (writes cut short included), for the voicemail's
        budget (voice/ivr/voicemail_budget.py): kept as messages are written and erased,
        from a listing of the folder at the first use and at each :meth:`rescan`."""
        total = self._stored.total
        if total is None:
            async with self._scanning:
                if self._stored.total is None:  # not counted by a scan waited for
                    await self._scan()
            total = self._stored.total
            assert total is not None
        return total

    async def rescan(self) -> None:
        """Count the messages' bytes afresh from a listing of the folder (in a thread): after
        each retention sweep, which deletes files unnamed, and to correct any drift (an
        erasure answered by another process). Raises ``OSError``."""
        async with self._scanning:
            await self._scan()

    async def _scan(self) -> None:
        self._stored.scan_begins()
        try:
            found = await asyncio.to_thread(self._sizes)
        except BaseException:
            self._stored.scan_failed()
            raise
        self._stored.scan_ends(found)

    def _sizes(self) -> dict[str, int]:
        """Bytes by message: its file's, and its write's cut short (a stat per file: ~140 ms
        for 10,000 messages)."""
        sizes: dict[str, int] = {}
        if not self._folder.is_dir():
            return sizes
        for pattern in ("*.sealed", ".*.tmp"):
            for path in self._folder.glob(pattern):
                # ".<name>.<random>.tmp": a write of <name> under way, or cut short
                name = path.name if pattern == "*.sealed" else path.name[1:].rsplit(".", 2)[0]
                with contextlib.suppress(FileNotFoundError):  # swept or erased meanwhile
                    sizes[name] = sizes.get(name, 0) + path.stat().st_size
        return sizes

    def sweep(self, older_than_s: float, now: float) -> int:
        """Delete messages older than ``older_than_s``: of calls that began longer ago (a
        message's file time is its call's start; blocking: run it in a thread).
        Returns how many (a write cut short by a crash leaves its hidden temp file: an hour
        on, it goes too, uncounted)."""
        remove_files(self._folder, ".*.tmp", 3600.0, now)
        return remove_files(self._folder, "*.sealed", older_than_s, now)


def call_id_of(name: str) -> str | None:
    """The call id of the message file ``name``; None for a name no message has."""
    if NAME.fullmatch(name) is None:
        return None
    return name[: -len("-01234567.sealed")]


def _of_call(call_id: str, name: str) -> bool:
    """Whether ``name`` is a message of ``call_id`` (exactly: not of call ``<call_id>-x``)."""
    return (
        NAME.fullmatch(name) is not None
        and re.fullmatch(re.escape(call_id) + r"-[0-9a-f]{8}\.sealed", name) is not None
    )
