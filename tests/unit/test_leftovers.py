"""Removing the data dir's files by name and age (voice/media/leftovers.py), on real files."""

from __future__ import annotations

import os
import time
from pathlib import Path

from voice.media.leftovers import remove_files


def test_only_matching_files_past_the_age_go(tmp_path: Path) -> None:
    now = time.time()
    for name, age in (("code-a.wav", 120), ("code-b.wav", 10), ("other.wav", 120)):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (now - age, now - age))
    assert remove_files(tmp_path, "code-*.wav", 60, now) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code-b.wav", "other.wav"]
    assert remove_files(tmp_path, "code-*.wav", None, now) == 1  # any age
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.wav"]
