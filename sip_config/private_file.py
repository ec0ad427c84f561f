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


def write_private(path: Path, text: str) -> None:
    """Put ``text`` at ``path``, mode 0600, durably; the folder is made (0700) if missing."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)  # mkstemp: created 0600, O_EXCL, close-on-exec
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
