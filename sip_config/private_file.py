"""Writing a file only its owner reads, whole or not at all, and kept through a power cut.

A new 0600 file in the same folder (named ``.<name>.<random>.tmp``: hidden, so a reader that
lists the folder never takes it for the real one) is written, fsynced and renamed over the
path, and then the folder is fsynced, since the rename is durable only once the folder is.
Written in place, an existing file (an empty placeholder made by provisioning) would keep its
mode, 0644 say; and a crash would leave half a file. Blocking: run it in a thread from async
code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_private(path: Path, text: str, *, mtime: float | None = None) -> None:
    """Put ``text`` at ``path``, mode 0600, durably; the folder is made (0700) if missing.
    ``mtime``: the file's modification time (what sweeps judge its age by) instead of now,
    set before the rename and fsynced with the content, so that no crash leaves the file
    with another age. Keep it within the hour before now: a temporary file older than that
    is taken for one a crash left (``.*.tmp`` sweeps)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)  # mkstemp: created 0600, O_EXCL, close-on-exec
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            if mtime is not None:
                os.utime(f.fileno(), (mtime, mtime))
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def replace_private(path: Path, text: str) -> bool:
    """Put ``text`` in place of the file at ``path`` as :func:`write_private` does, keeping
    its modification time (what sweeps judge a file's age by), but only if it is there: False,
    nothing written, when it is not, or when it went while this wrote (a deletion by
    ``voice.media.leftovers.remove_file`` takes the temporary file too).

    The check and the rename are two steps: a file deleted between them comes back. A caller
    racing a deletion that must hold (an erasure) looks again once this returned True.

    Run as root (``clinic-voice secret reseal`` by an operator, while ``serve`` runs as a user
    of its own), the new file gets the old one's owner and group before it takes its place:
    a root-owned 0600 file is one ``serve`` can no longer read."""
    try:
        before = path.stat()
    except FileNotFoundError:
        return False
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w") as f:
            if os.geteuid() == 0:
                os.fchown(f.fileno(), before.st_uid, before.st_gid)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
            if not path.exists():
                tmp.unlink(missing_ok=True)
                return False
            try:
                os.replace(tmp, path)
            except FileNotFoundError:  # the temporary file went with the file
                return False
            # Through the descriptor, after the rename: set on the temporary file, its old
            # time would make it "stale" to a sweep of temporary files (voice/ivr/journal.py)
            # that could delete it before the rename. Fsynced: a power cut must not leave the
            # rename's time, which would extend the file's retention.
            os.utime(f.fileno(), ns=(before.st_atime_ns, before.st_mtime_ns))
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    return True


def fsync_folder(folder: Path) -> None:
    """Make the renames and deletions in ``folder`` durable (through a power cut)."""
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
