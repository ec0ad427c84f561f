"""The prompt cache's files: whole or rendered again, keyed by what changes the audio, evicted
when unused, and a folder that cannot be written said once and worked around.

The cache is plain file code (the speech thread calls it); what a render does with it, with
the real espeak-ng, is tests/integration/test_media_tts.py's."""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

from voice.media import prompt_cache
from voice.media.pcm import Pcm, read_wav, silence, wav_bytes
from voice.media.prompt_cache import UNUSED_KEEP_S, PromptCache, cache_key

ENGINE = "pyttsx3-2.99/espeak-ng-1.51/sox-14.4.2"
NOW = 1_800_000_000.0


def wav(seconds: float = 0.2, rate_hz: int = 8000) -> bytes:
    samples = silence(seconds, rate_hz)
    samples[len(samples) // 2] = 1000  # not all the same bytes
    return wav_bytes(Pcm(samples, rate_hz))


def key(text: str) -> str:
    return cache_key(text, "en", 8000, ENGINE)


def age(path: Path, seconds: float) -> None:
    os.utime(path, (NOW - seconds, NOW - seconds))


def test_an_entry_is_found_by_a_new_cache_on_the_same_folder(tmp_path: Path) -> None:
    data = wav()
    stored = PromptCache(tmp_path).store(key("Welcome."), data)
    assert stored.parent == tmp_path and stored.name.startswith(key("Welcome."))
    assert stored.stat().st_mode & 0o777 == 0o600
    restarted = PromptCache(tmp_path)  # a restart
    found = restarted.lookup(key("Welcome."))
    assert found == stored
    assert found.read_bytes() == data
    assert read_wav(found).rate_hz == 8000
    assert restarted.lookup(key("Goodbye.")) is None
    assert [p.name for p in tmp_path.iterdir()] == [stored.name], "temporary files left"


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
        pytest.param(lambda b: b"", id="empty"),
        pytest.param(lambda b: b[:-1] + bytes([b[-1] ^ 0x01]), id="one-bit-flipped"),
    ],
)
def test_a_damaged_entry_is_not_played_but_removed(tmp_path: Path, damage: Any) -> None:
    stored = PromptCache(tmp_path).store(key("Welcome."), wav())
    stored.write_bytes(damage(stored.read_bytes()))
    restarted = PromptCache(tmp_path)
    assert restarted.lookup(key("Welcome.")) is None
    assert not stored.exists(), "a damaged file stays"
    again = restarted.store(key("Welcome."), wav())
    assert restarted.lookup(key("Welcome.")) == again


def test_the_key_holds_everything_that_changes_the_audio(monkeypatch: pytest.MonkeyPatch) -> None:
    base = cache_key("Welcome.", "en", 8000, ENGINE)
    assert base == cache_key("Welcome.", "en", 8000, ENGINE)
    others = {
        cache_key("Welcome!", "en", 8000, ENGINE),
        cache_key("Welcome.", "ko", 8000, ENGINE),
        cache_key("Welcome.", "en", 16000, ENGINE),
        cache_key("Welcome.", "en", 8000, "pyttsx3-2.99/espeak-ng-1.52/sox-14.4.2"),
        cache_key("Welcome.", "en", 8000, "pyttsx3-2.99/espeak-ng-1.51/python-resampler"),
    }
    monkeypatch.setattr(prompt_cache, "FORMAT", prompt_cache.FORMAT + 1)
    others.add(cache_key("Welcome.", "en", 8000, ENGINE))
    assert len(others) == 6 and base not in others


def test_a_changed_text_is_a_miss_the_others_hits(tmp_path: Path) -> None:
    cache = PromptCache(tmp_path)
    for text in ("Press 1.", "Press 2.", "Goodbye."):
        cache.store(key(text), wav())
    restarted = PromptCache(tmp_path)
    assert restarted.lookup(key("Press 1.")) is not None
    assert restarted.lookup(key("Press 2, please.")) is None  # the flow's text changed
    assert restarted.lookup(key("Goodbye.")) is not None


def test_eviction_removes_what_this_run_did_not_use_once_a_day_old(tmp_path: Path) -> None:
    first = PromptCache(tmp_path)
    kept = first.store(key("Press 1."), wav())
    old = first.store(key("Press 2."), wav())  # the flows no longer say it
    recent = first.store(key("Press 3."), wav())  # another process may be playing it
    tone = tmp_path / "beep-1000hz-300ms.wav"  # not the cache's
    tone.write_bytes(wav())
    older_version = tmp_path / f"{key('Old.')}.wav"  # a version before digests in names
    older_version.write_bytes(wav())
    crashed = tmp_path / f".{key('Half.')}.abcd1234.tmp"
    crashed.write_bytes(b"RIFF")
    for path in (kept, old, tone, older_version, crashed):
        age(path, UNUSED_KEEP_S + 60)
    age(recent, 60)
    restarted = PromptCache(tmp_path)
    assert restarted.lookup(key("Press 1.")) == kept  # the current flows say it
    age(kept, UNUSED_KEEP_S + 60)  # a used entry goes not, whatever its age
    assert restarted.evict(NOW) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([kept.name, recent.name, tone.name])
    assert restarted.lookup(key("Press 2.")) is None
    assert restarted.lookup(key("Press 1.")) == kept


def test_another_render_of_a_used_key_goes_once_a_day_unused(tmp_path: Path) -> None:
    # Two processes rendered one text cold: renders differ byte for byte, so each wrote its
    # own <key>.<digest>.wav. The one this run does not use is evicted like any unused entry.
    ours = PromptCache(tmp_path).store(key("Press 1."), wav())
    other_data = bytearray(wav())
    other_data[-2:] = b"\x01\x02"
    theirs = PromptCache(tmp_path / "elsewhere").store(key("Press 1."), bytes(other_data))
    theirs = theirs.rename(tmp_path / theirs.name)
    assert theirs.name != ours.name
    age(theirs, UNUSED_KEEP_S + 60)
    age(ours, UNUSED_KEEP_S + 60)
    run = PromptCache(tmp_path)
    used = run.lookup(key("Press 1."))
    assert used is not None
    age(used, 60)  # the lookup's touch, on this test's clock
    assert run.evict(NOW) == 1
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == [used.name]


def test_a_lookup_marks_the_entry_used_for_other_processes(tmp_path: Path) -> None:
    stored = PromptCache(tmp_path).store(key("Press 1."), wav())
    age(stored, UNUSED_KEEP_S + 60)
    assert PromptCache(tmp_path).lookup(key("Press 1.")) == stored
    # Another process, which has not used it, keeps it: it was used within the day.
    assert PromptCache(tmp_path).evict(stored.stat().st_mtime + 60) == 0
    assert stored.exists()


def test_an_unwritable_folder_is_said_once_and_this_run_renders_elsewhere(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the folder should be")  # root writes a 0500 folder
    cache = PromptCache(blocked / "prompts")
    caplog.set_level(logging.WARNING, logger="voice.media.prompt_cache")
    one = cache.store(key("Press 1."), wav())
    two = cache.store(key("Press 2."), wav(0.3))
    assert cache.degraded
    assert one.parent == two.parent != blocked / "prompts"
    assert one.read_bytes() == wav() and two.read_bytes() == wav(0.3)
    assert cache.lookup(key("Press 1.")) == one
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "cannot be written" in warnings[0] and "Press" not in warnings[0]
    assert cache.evict(NOW) == 0  # nothing to list: no error either


def test_a_full_disk_is_said_once_and_this_run_renders_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "prompts"
    real_mkstemp = tempfile.mkstemp

    def full(suffix: str, prefix: str, dir: Path) -> tuple[int, str]:
        if Path(dir) == folder:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_mkstemp(suffix=suffix, prefix=prefix, dir=dir)

    monkeypatch.setattr(tempfile, "mkstemp", full)
    caplog.set_level(logging.WARNING, logger="voice.media.prompt_cache")
    cache = PromptCache(folder)
    paths = [cache.store(key(t), wav()) for t in ("Press 1.", "Press 2.", "Press 3.")]
    assert all(p.exists() and p.parent != folder for p in paths)
    assert [r.getMessage() for r in caplog.records] == [
        f"prompt cache: {folder} cannot be written (No space left on device): prompts are "
        "rendered for this run only and rendered again at the next start"
    ]
    assert not any(folder.iterdir())
