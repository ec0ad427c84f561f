"""Files the service leaves in its data dir for a while, and removes by name and age.

Three kinds: composed spoken codes (``private/code-*.wav``, left by a process killed during a
voice call), prompts rendered for one call (``prompts/once-*.wav``, likewise), and voicemail
past its retention (``voicemail/*.sealed``). Blocking: run it in a thread.
"""

from __future__ import annotations

import contextlib
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
