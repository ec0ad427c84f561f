"""The rendered prompts kept on disk between runs (``$CLINIC_DATA_DIR/prompts``).

Only fixed texts go in (a flow's prompts, the verification call's sentence head and digits):
:class:`voice.media.tts.PromptRenderer` has a separate call for a text of one call, which
never comes here. A file is named ``<key>.<digest>.wav``: the key hashes everything that
changes the audio (text, voice, rate, the engine's and resampler's versions, :data:`FORMAT`),
the digest is the first 16 hex digits of the file's SHA-256, so a file cut short or damaged
(a power cut before the data reached the disk, a bad sector) is found before it is played,
deleted and rendered again. The WAV itself is plain, for any player.

Files are written whole or not at all (0600 temporary file, fsync, rename, folder fsync), as
:mod:`sip_config.private_file` does. A folder that cannot be written (read-only, full) is
said once, and the renders of this run go to a temporary folder instead: the service speaks
as before, it only renders again at the next start.

An entry no run has used for :data:`UNUSED_KEEP_S` and that this run did not use is removed
by :meth:`PromptCache.evict` (the clinic line calls it once its flows' prompts are in): the
folder holds the current flows' prompts plus at most a day of older ones. The day is a
margin for another process sharing the folder (tests link one cache into many data dirs;
``serve.lock`` keeps two services off one data dir), which may be playing an entry this
run does not know.

Blocking file I/O throughout, and not thread-safe: only the speech thread of
:mod:`voice.media.tts` calls it.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from sip_config.private_file import fsync_folder

log = logging.getLogger(__name__)

# Bump when the audio for the same text, voice, rate and engine changes (the WAV layout, the
# resampling, what is said around a text): every entry is then rendered again.
FORMAT = 2

# An entry unused this long (by any process: a use touches its modification time) and not
# used by this run goes at the next eviction.
UNUSED_KEEP_S = 24 * 3600.0

# A temporary file older than this was left by a killed process.
STALE_TMP_S = 3600.0

_ENTRY = re.compile(r"^(?P<key>[0-9a-f]{32})\.(?P<digest>[0-9a-f]{16})\.wav$")
# What versions before the digest in the name wrote (``<key>.wav``), and their temporary
# files (``tmpXXXX.wav.tmp``); and this version's temporary files (``.<key>.XXXX.tmp``).
_OLD_ENTRY = re.compile(r"^[0-9a-f]{32}\.wav$")
_TMP = re.compile(r"^(\.[0-9a-f]{32}\..*\.tmp|tmp.*\.wav\.tmp)$")


def cache_key(text: str, voice: str, rate_hz: int, engine: str) -> str:
    """The name of ``text``'s audio in ``voice`` at ``rate_hz`` made by ``engine`` (the
    speech engine's and resampler's versions): 32 hex digits."""
    blob = json.dumps([FORMAT, text, voice, rate_hz, engine], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


class PromptCache:
    """Rendered fixed prompts in ``folder``, by :func:`cache_key`; see the module doc."""

    def __init__(self, folder: Path) -> None:
        self._dir = folder
        self._index: dict[str, str] | None = None  # key -> file name, read at first use
        self._used: set[str] = set()  # the keys this run looked up or stored
        self._broken = False  # the folder could not be written: said once
        self._unreadable = False  # a file could not be read: said once
        self._fallback: Path | None = None  # this run's renders after that
        self._fallback_files: dict[str, Path] = {}

    @property
    def folder(self) -> Path:
        return self._dir

    @property
    def degraded(self) -> bool:
        """Whether the folder failed a write and this run's renders go to a temporary one."""
        return self._broken

    def lookup(self, key: str) -> Path | None:
        """The entry's file if it is there and whole; a damaged one is deleted (None)."""
        self._used.add(key)
        if key in self._fallback_files:
            return self._fallback_files[key]
        name = self._entries().get(key)
        if name is None:
            self._index = None  # another process may have written it: read the folder again
            name = self._entries().get(key)
            if name is None:
                return None
        path = self._dir / name
        match = _ENTRY.match(name)
        assert match is not None
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self._entries().pop(key, None)
            return None
        except OSError as exc:  # a failing disk fails them all: said once
            level = logging.DEBUG if self._unreadable else logging.WARNING
            self._unreadable = True
            log.log(level, "prompt cache: %s cannot be read (%s): rendered again", name, exc)
            return None
        if _digest(data) != match["digest"]:
            log.warning("prompt cache: %s is damaged (%d bytes): rendered again", name, len(data))
            self._entries().pop(key, None)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        # A use, for another process's eviction (best effort: a read-only folder keeps it).
        with contextlib.suppress(OSError):
            os.utime(path)
        return path

    def store(self, key: str, wav: bytes) -> Path:
        """Keep ``wav`` (a whole WAV file) as ``key``'s entry; its path. Raises OSError only
        when the temporary folder fails too."""
        self._used.add(key)
        if not self._broken:
            try:
                path = self._write(self._dir, f"{key}.{_digest(wav)}.wav", wav)
            except OSError as exc:
                self._break(exc)
            else:
                self._entries()[key] = path.name
                return path
        folder = self._fallback_folder()
        path = self._write(folder, f"{key}.wav", wav, durable=False)
        self._fallback_files[key] = path
        return path

    def evict(self, now: float) -> int:
        """Remove the entries this run did not use and no run used for
        :data:`UNUSED_KEEP_S` before ``now``, older versions' entries likewise, and
        temporary files a killed process left. Returns how many files went."""
        removed = 0
        try:
            listing = list(os.scandir(self._dir))
        except OSError as exc:
            log.debug("prompt cache: %s cannot be listed: %s", self._dir, exc)
            return 0
        for entry in listing:
            match = _ENTRY.match(entry.name)
            # Another render of a key this run used (renders differ byte for byte: two
            # processes that rendered one text cold each wrote theirs) is unused here: it goes
            # once no process has looked it up for the margin, as any entry does.
            if (
                match is not None
                and match["key"] in self._used
                and (self._index is None or self._index.get(match["key"]) == entry.name)
            ):
                continue
            if match is not None or _OLD_ENTRY.match(entry.name):
                keep_s = UNUSED_KEEP_S
            elif _TMP.match(entry.name):
                keep_s = STALE_TMP_S
            else:
                continue  # not ours (the tones live here too)
            try:
                if now - entry.stat().st_mtime <= keep_s:
                    continue
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.debug("prompt cache: %s cannot be removed: %s", entry.name, exc)
                continue
            removed += 1
            if match is not None and self._index is not None:
                self._index.pop(match["key"], None)
        if removed:
            with contextlib.suppress(OSError):
                fsync_folder(self._dir)
        return removed

    def _entries(self) -> dict[str, str]:
        if self._index is None:
            index: dict[str, str] = {}
            with contextlib.suppress(OSError):  # missing or unreadable: nothing cached
                for name in os.listdir(self._dir):
                    match = _ENTRY.match(name)
                    if match is not None:
                        index[match["key"]] = name
            self._index = index
        return self._index

    def _write(self, folder: Path, name: str, data: bytes, *, durable: bool = True) -> Path:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name[:32]}.", suffix=".tmp", dir=folder)
        tmp = Path(tmp_name)  # mkstemp: 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            path = folder / name
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if durable:
            fsync_folder(folder)
        return path

    def _break(self, exc: OSError) -> None:
        self._broken = True
        log.warning(
            "prompt cache: %s cannot be written (%s): prompts are rendered for this run only "
            "and rendered again at the next start",
            self._dir,
            exc.strerror or exc,
        )

    def _fallback_folder(self) -> Path:
        if self._fallback is None:
            folder = Path(tempfile.mkdtemp(prefix="clinic-voice-prompts-"))  # 0700
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            self._fallback = folder
        return self._fallback
