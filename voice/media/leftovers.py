"""Files the service leaves in its data dir for a while, and removes by name and age.

Three kinds: composed spoken codes (``code-*.wav`` in a private folder, on tmpfs or in
``private/``: :mod:`voice.media.private_folder`; left by a process killed during a
voice call), prompts rendered for one call (``prompts/once-*.wav``, likewise), and voicemail
past its retention (``voicemail/*.sealed``). And one file by name, durably: an erased call's
(voice/ivr/erasure.py). Blocking: run it in a thread.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def remove_files(folder: Path, pattern: str, older_than_s: float | None, now: float) -> int:
    """Delete the files of ``folder`` matching ``pattern`` last written more than
    ``older_than_s`` before ``now`` (``None``: whatever their age). Returns how many."""
    removed = 0
    for path in folder.glob(pattern):
        with contextlib.suppress(FileNotFoundError):
            if older_than_s is None or now - path.stat().st_mtime > older_than_s:
                path.unlink()
                removed += 1
    return removed


def remove_file(path: Path) -> int:
    """Delete ``path`` and what a write of it cut short left (``write_private``'s hidden
    ``.<name>.<random>.tmp``), then fsync the folder, so that a power cut does not bring the
    file back. Returns how many files went. ``path``'s name must hold no glob character
    (call ids and voicemail names hold none)."""
    if not path.parent.is_dir():
        return 0
    removed = 0
    for p in (path, *path.parent.glob(f".{path.name}.*.tmp")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed += 1
    if removed:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return removed
