"""Where a call's own audio goes: prompts that speak its data and a voice call's code.

Such a file lives for seconds (written, played by the SIP worker, deleted), but it holds
health data or a code, so it is best never written to a disk at all: once deleted from a
disk its blocks stay until overwritten, and a power cut before the deletion keeps the file.
The folders tried, in order (:meth:`PrivateFolder.chain`):

1. ``clinic-voice-private-<key>`` on a RAM-backed filesystem (tmpfs or ramfs, read from
   ``/proc/mounts``; not mounted read-only, per ``os.statvfs``): ``$XDG_RUNTIME_DIR`` when
   set (already the user's own, 0700), else ``/dev/shm``. ``<key>`` hashes the data dir's
   real path, so two services on one machine with different data dirs each have their own
   folder and never sweep each other's files (``serve.lock`` keeps two off one data dir);
2. ``$CLINIC_DATA_DIR/private``, as before;
3. ``clinic-voice-private-<key>`` in the system's temporary folder.

A folder is made 0700 by this process. One found there already is used only if it is a real
folder (not a link) owned by this process's user; if its mode lets others in, it is
tightened (it is ours). Outside the data dir its name is known to all: one held by another
user (or a link) makes this process use a folder of its own beside it
(``clinic-voice-private-<key>-<random>``), so that nobody pushes a call's audio off tmpfs.
A root another user could swap entries of (owned by that user, or writable by others
without the sticky bit: ``su`` keeps the user's ``$XDG_RUNTIME_DIR``) is not used. A folder
that cannot be made is passed over for this run. Each write opens the folder again
(``O_NOFOLLOW``), checks it on that descriptor and makes the file in it ``O_EXCL``, written
through its own descriptor: a folder put in place of ours since gets nothing.
A write that fails (full, read-only, no permission) tries the next folder, and the first
folder again at the next write; each folder's first failure is logged with why, as a
warning (the file may then reach a disk), and the later ones at DEBUG.

:meth:`PrivateFolder.sweep` at start removes what a killed run left in every folder of the
chain (and in those beside it); :meth:`PrivateFolder.close` at the stop removes this
service's folders outside the data dir once empty. The SIP worker, a process of the same
user, plays a file from its path.

Blocking file I/O throughout: call it from a thread. Thread-safe (the speech thread writes
prompts, a worker thread composes codes).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import stat
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

from voice.media.leftovers import remove_files

log = logging.getLogger(__name__)

# Filesystems held in memory (and swap): their files never reach a disk of their own.
RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
PREFIX = "clinic-voice-private-"
MOUNTS = Path("/proc/mounts")
SHM = Path("/dev/shm")  # noqa: S108 (a folder of our own in it, checked: PrivateFolder)


def folder_key(data_dir: Path) -> str:
    """16 hex digits naming ``data_dir`` by its real path (links resolved)."""
    real = os.path.realpath(data_dir)
    return hashlib.sha256(real.encode(errors="surrogateescape")).hexdigest()[:16]


def _unescape(field: str) -> str:
    # /proc/mounts writes a space, tab, newline and backslash as \040, \011, \012, \134.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def filesystem_type(path: Path, mounts: Path = MOUNTS) -> str | None:
    """The type of the filesystem ``path`` is on (the last mount of the longest mount point
    holding it, as the kernel sees it), or None when ``mounts`` cannot be read."""
    real = os.path.realpath(path)
    best: tuple[int, str] | None = None
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescape(fields[1])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= best[0]):
            best = (len(point), fields[2])
    return best[1] if best is not None else None


def is_ram_backed(path: Path, mounts: Path = MOUNTS) -> bool:
    """Whether ``path`` is a writable folder on tmpfs or ramfs."""
    if not path.is_dir() or filesystem_type(path, mounts) not in RAM_FILESYSTEMS:
        return False
    try:
        return not os.statvfs(path).f_flag & os.ST_RDONLY and os.access(path, os.W_OK | os.X_OK)
    except OSError:
        return False


def unsafe_root(root: Path) -> str:
    """Why another user could rename this service's folder in ``root`` away and put theirs
    (or a link) in its place, between a check and a use (the SIP worker opens a file by its
    path): ``root`` owned by someone else than this user or root, or open to others'
    writes without the sticky bit. "" when none can."""
    try:
        info = root.stat()
    except OSError as exc:
        return f"{root} cannot be looked at: {exc.strerror or exc}"
    if info.st_uid not in (os.geteuid(), 0):
        return f"{root} is owned by uid {info.st_uid}"
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        return f"others may write in {root}, which is not sticky"
    return ""


def find_ram_root(
    environ: Mapping[str, str] = os.environ, mounts: Path = MOUNTS, shm: Path = SHM
) -> Path | None:
    """The RAM-backed folder to hold private files in: ``$XDG_RUNTIME_DIR`` (the user's own),
    else ``/dev/shm``, whichever is first on tmpfs and safe (:func:`unsafe_root`: ``su``
    keeps another user's ``$XDG_RUNTIME_DIR``); None when neither is."""
    runtime = environ.get("XDG_RUNTIME_DIR", "")
    for candidate in ([Path(runtime)] if runtime.startswith("/") else []) + [shm]:
        if is_ram_backed(candidate, mounts) and not unsafe_root(candidate):
            return candidate
    return None


class FolderRefused(OSError):
    """A folder of the chain is not one only this service's user can enter."""


class FolderReplaced(OSError):
    """A folder of the chain, checked at an earlier write, is another one now."""


class PrivateFolder:
    """The folders a call's private audio is written to, for the service whose data dir is
    ``data_dir``; see the module doc.

    ``ram_root``: the RAM-backed folder to make this service's folder in, or a function
    finding it (called once, at first use), or None for none. ``temp_root``: the last
    resort's parent (default: the system's temporary folder).
    """

    def __init__(
        self,
        data_dir: Path,
        ram_root: Path | Callable[[], Path | None] | None = find_ram_root,
        *,
        temp_root: Path | None = None,
    ) -> None:
        self._data_dir = data_dir
        self._ram_root = ram_root
        self._temp_root = temp_root
        self._lock = threading.Lock()
        self._chain: tuple[Path, ...] | None = None
        self._refused: set[Path] = set()
        self._ready: set[Path] = set()  # checked (or made) this run
        self._swept: set[Path] = set()  # ours outside the data dir, found by a sweep
        self._failed: set[Path] = set()  # a write failed there: said once

    def chain(self) -> tuple[Path, ...]:
        """The folders tried, best first (blocking at first call: it looks for tmpfs)."""
        with self._lock:
            return self._chain_locked()

    def write(self, prefix: str, fill: Callable[[BinaryIO], object]) -> Path:
        """A new file ``<prefix><random>.wav``, 0600, in the first folder of the chain that
        takes it, written by ``fill(file)``; its path. The folder is checked again at each
        write on the descriptor the file is made in (``O_NOFOLLOW``: one put in place of
        ours since, or a link, gets nothing), the file made ``O_EXCL`` and written through
        its own descriptor, never opened again by name. A file a failed ``fill`` left is
        deleted. Raises the last folder's OSError when none takes it."""
        error: OSError = FolderRefused("no folder for private files")
        for named in self.chain():
            folder = named  # or one of ours beside it (_prepare)
            try:
                folder = self._prepare(named)
                dir_fd = self._open(folder)
            except OSError as exc:
                self._fail(folder, exc)
                error = exc
                continue
            try:
                return folder / _new_file(dir_fd, prefix, fill)
            except OSError as exc:
                self._fail(folder, exc)
                error = exc
            finally:
                os.close(dir_fd)
        raise error

    def sweep(self, pattern: str, older_than_s: float | None, now: float) -> int:
        """Delete the files matching ``pattern`` (older than ``older_than_s`` before ``now``;
        ``None``: whatever their age) in every folder of the chain that is this service's:
        those a killed process left. Made by nobody here, checked as :meth:`write` does.
        Returns how many."""
        removed = 0
        with self._lock:
            known = set(self._chain_locked())
        for folder in self._sweep_targets():
            try:
                info = folder.lstat()
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.debug("private files: %s cannot be looked at: %s", folder, exc)
                continue
            if self._why_not(folder, info):
                continue  # not ours: write() says why when it comes to it
            try:
                removed += remove_files(folder, pattern, older_than_s, now)
            except OSError as exc:
                log.warning("private files: %s cannot be swept: %s", folder, exc)
            if folder.parent != self._data_dir:
                with self._lock:  # a killed run's: this run's stop removes it once empty
                    self._swept.add(folder)
            if folder not in known:  # one of ours beside a taken name, by an earlier run
                with contextlib.suppress(OSError):
                    folder.rmdir()  # once empty
        return removed

    def _sweep_targets(self) -> list[Path]:
        """The chain's folders, and beside each one outside the data dir (under a root no
        other user can swap entries of) those made when another user held its name."""
        targets: list[Path] = []
        for folder in self.chain():
            if folder.parent == self._data_dir:
                targets.append(folder)
                continue
            if unsafe_root(folder.parent):
                continue  # write() says why when it comes to it
            base = folder.parent / f"{PREFIX}{folder_key(self._data_dir)}"
            targets.append(base)
            with contextlib.suppress(OSError):
                targets += sorted(base.parent.glob(f"{base.name}-*"))
        return list(dict.fromkeys(targets))

    def close(self) -> None:
        """At the service's stop: remove its folders outside the data dir (on tmpfs, in the
        temporary folder) if they are empty, so that no run leaves one there. A file still
        in one (a call ended by the stop, its deletion racing this) keeps it for the next
        start's sweep. Those a killed run left, which this run's sweep emptied, go too: a
        run that wrote nothing there would otherwise leave them for good."""
        with self._lock:
            made = [f for f in self._ready | self._swept if f.parent != self._data_dir]
            self._ready.clear()
            self._swept.clear()
        for folder in made:
            try:
                folder.rmdir()
            except OSError as exc:
                log.debug("private files: %s stays: %s", folder, exc.strerror or exc)

    # -- the chain ---------------------------------------------------------------------

    def _chain_locked(self) -> tuple[Path, ...]:
        if self._chain is None:
            key = folder_key(self._data_dir)
            root = self._ram_root() if callable(self._ram_root) else self._ram_root
            temp = self._temp_root or Path(tempfile.gettempdir())
            folders = [self._data_dir / "private", temp / f"{PREFIX}{key}"]
            if root is not None:
                folders.insert(0, root / f"{PREFIX}{key}")
            elif callable(self._ram_root):  # looked for, not found (None given: on purpose)
                log.warning(
                    "private files: no RAM-backed folder (tmpfs at $XDG_RUNTIME_DIR or "
                    "/dev/shm): a call's own prompts go to %s, on disk",
                    folders[0],
                )
            self._chain = tuple(dict.fromkeys(folders))  # a temp root on tmpfs: once
        return tuple(f for f in self._chain if f not in self._refused)

    def _open(self, folder: Path) -> int:
        """``folder`` opened (not through a link), checked to be ours and closed to others."""
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            why = self._why_not(folder, info)
            if why:  # put in place of ours since: checked afresh at the next write
                raise FolderReplaced(f"{folder}: since it was checked, {why}")
            if stat.S_IMODE(info.st_mode) & 0o077:
                os.fchmod(fd, 0o700)  # ours: loosened by hand meanwhile
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _prepare(self, folder: Path) -> Path:
        """Make ``folder`` 0700 if missing, else check it is ours and tighten it; the folder
        to use: outside the data dir, one of ours beside it when another user (or a link)
        holds its name, which is known to all."""
        with self._lock:
            if folder in self._ready:
                return folder
            if folder in self._refused:
                raise FolderRefused(f"{folder} was refused")
            outside = folder.parent != self._data_dir  # on tmpfs, in the temporary folder
            if outside:
                unsafe = unsafe_root(folder.parent)
                if unsafe:
                    raise self._refuse(folder, unsafe)
            try:
                # The data dir may not exist yet; a RAM or temporary root must.
                folder.mkdir(mode=0o700, parents=not outside)
            except FileExistsError:
                pass  # an earlier run's, or planted: lstat and _why_not below judge it
            except OSError as exc:
                raise self._refuse(folder, f"it cannot be made: {exc.strerror or exc}") from exc
            info = folder.lstat()
            why = self._why_not(folder, info)
            if why and outside:
                # Planted there to push a call's audio off tmpfs (or to make it fail): a
                # folder of ours with a name nobody can guess, swept by the next start.
                try:
                    fresh = Path(tempfile.mkdtemp(prefix=f"{folder.name}-", dir=folder.parent))
                except OSError as exc:
                    why += f", and none beside it can be made: {exc.strerror or exc}"
                    raise self._refuse(folder, why) from exc
                log.warning("private files: %s is not used (%s): %s is", folder, why, fresh)
                assert self._chain is not None
                self._chain = tuple(fresh if f == folder else f for f in self._chain)
                self._ready.add(fresh)
                return fresh
            if why:
                raise self._refuse(folder, why)
            if stat.S_IMODE(info.st_mode) & 0o077:
                # Made by hand or by an older version: ours, so tightened rather than refused.
                try:
                    folder.chmod(0o700)
                except OSError as exc:
                    why = f"its mode cannot be tightened: {exc.strerror or exc}"
                    raise self._refuse(folder, why) from exc
                log.info("private files: %s was open to others: made 0700", folder)
            self._ready.add(folder)
            return folder

    def _why_not(self, folder: Path, info: os.stat_result) -> str:
        """Why ``folder`` (its ``lstat``) is not one to use: "" when it is."""
        if stat.S_ISLNK(info.st_mode):
            return "it is a symbolic link"
        if not stat.S_ISDIR(info.st_mode):
            return "it is not a folder"
        if info.st_uid != os.geteuid():
            return f"it is owned by uid {info.st_uid}, not this service's {os.geteuid()}"
        return ""

    def _refuse(self, folder: Path, why: str) -> FolderRefused:
        """Pass ``folder`` over for this run, said once; the error to raise."""
        self._refused.add(folder)
        log.warning("private files: %s is not used (%s): the next folder is", folder, why)
        return FolderRefused(f"{folder}: {why}")

    def _fail(self, folder: Path, exc: OSError) -> None:
        if isinstance(exc, FolderRefused):
            return  # said when refused
        with self._lock:
            first = folder not in self._failed
            self._failed.add(folder)
            self._ready.discard(folder)  # checked (and made again if gone) at the next write
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "private files: a file cannot be written in %s (%s): the next folder is tried",
            folder,
            exc.strerror or exc,
        )


def _new_file(dir_fd: int, prefix: str, fill: Callable[[BinaryIO], object]) -> str:
    """A new file ``<prefix><random>.wav`` in the folder ``dir_fd``, 0600, written by
    ``fill`` through its own descriptor; its name. Deleted if ``fill`` fails."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        name = f"{prefix}{secrets.token_hex(8)}.wav"
        try:
            fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            continue
        break
    else:
        raise FileExistsError(f"no free name for a new {prefix}*.wav file")
    try:
        with os.fdopen(fd, "wb") as file:
            fill(file)
    except BaseException:
        # A part of a caller's text (or of a code) is still theirs.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
        raise
    return name
