"""The renderer's files: a call's private render cancelled while the speech thread writes it
(MAX_CALL_S timing out the call's task, pool.stop) leaves nothing on disk, and a cached
prompt this process knows is looked up again in time, so one removed meanwhile (another
process's eviction, an operator) is rendered again rather than handed to the SIP worker."""

from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from voice.media import tts
from voice.media.pcm import Pcm, silence, wav_bytes
from voice.media.private_folder import PrivateFolder


def _on_disk(data_dir: Path) -> PrivateFolder:
    """``data_dir/private`` first (no RAM folder), the last resort in ``data_dir``."""
    return PrivateFolder(data_dir, None, temp_root=data_dir)


class _SlowSpeech:
    """Runs each job on a thread of its own; speak() waits for ``release``."""

    def __init__(self) -> None:
        self.version: concurrent.futures.Future[str] = concurrent.futures.Future()
        self.version.set_result("fake-engine")
        self.speaking = threading.Event()
        self.release = threading.Event()
        self.speeds: list[int] = []

    def submit(self, job: Any) -> None:
        def run() -> None:
            if not job.done.set_running_or_notify_cancel():
                return
            try:
                job.done.set_result(job.run())
            except BaseException as exc:  # pragma: no cover
                job.done.set_exception(exc)

        threading.Thread(target=run, daemon=True).start()

    def speak(self, text: str, voice: str, rate_hz: int, words_per_minute: int = 175) -> bytes:
        self.speeds.append(words_per_minute)
        self.speaking.set()
        self.release.wait(10)
        return wav_bytes(Pcm(silence(0.1, rate_hz), rate_hz))


async def test_a_private_render_cancelled_mid_render_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    speech = _SlowSpeech()
    monkeypatch.setattr(tts._SpeechThread, "get", classmethod(lambda cls: speech))
    private = tmp_path / "private"
    renderer = tts.PromptRenderer(tmp_path / "prompts", _on_disk(tmp_path))
    task = asyncio.ensure_future(
        renderer.render_private("Your appointment with Dr Lee is on Tuesday at 9.")
    )
    await asyncio.to_thread(speech.speaking.wait, 5)  # the job runs on the speech thread
    task.cancel()  # the call's task timed out (MAX_CALL_S) or the service stops
    with pytest.raises(asyncio.CancelledError):
        await task
    speech.release.set()
    for _ in range(100):  # the thread finishes its write; nobody is left to delete it
        await asyncio.sleep(0.01)
    left = sorted(p.name for p in private.glob("once-*.wav")) if private.exists() else []
    assert left == [], f"a caller's text stays on disk until the next start: {left}"


async def test_a_known_prompt_is_not_marked_used_and_another_process_evicts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long-running serve finds a prompt once (utime), then serves it from ``_known`` for
    days without touching it; another process on the same folder (tests link one cache into
    many data dirs) evicts it after a day, and the first still hands the path to its SIP
    worker."""
    import os
    import time

    from voice.media.prompt_cache import UNUSED_KEEP_S, PromptCache

    speech = _SlowSpeech()
    speech.release.set()
    monkeypatch.setattr(tts._SpeechThread, "get", classmethod(lambda cls: speech))
    clock = [0.0]
    renderer = tts.PromptRenderer(
        tmp_path / "prompts", _on_disk(tmp_path), monotonic=lambda: clock[0]
    )
    first = await renderer.render("Welcome to the clinic.")
    two_days_later = time.time() + 2 * UNUSED_KEEP_S
    for _ in range(3):  # used at every call meanwhile: from what it knows, no lookup
        assert await renderer.render("Welcome to the clinic.") == first
    other = PromptCache(tmp_path / "prompts")  # another serve's cache, its flows differ
    assert other.evict(two_days_later) == 1
    clock[0] += tts.KNOWN_RECHECK_S  # the process has run on meanwhile
    again = await renderer.render("Welcome to the clinic.")
    assert again.exists(), "the path the SIP worker is told to play was evicted"
    os.utime(again, (two_days_later, two_days_later))  # looked up again: its use marked
    clock[0] += tts.KNOWN_RECHECK_S
    assert await renderer.render("Welcome to the clinic.") == again
    assert again.stat().st_mtime < two_days_later


def test_a_sox_that_does_not_run_leaves_speech_to_the_python_resampler(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "sox"
    broken.write_text("#!/bin/sh\nexit 3\n")
    broken.chmod(0o755)
    assert tts._resampler(str(broken)) == (None, "python-resampler")
    assert "sox --version exited 3: prompts are resampled in Python" in caplog.messages
    assert tts._resampler(str(tmp_path / "missing")) == (None, "python-resampler")
    assert tts._resampler(None) == (None, "python-resampler")


async def test_a_private_folder_made_open_is_tightened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    speech = _SlowSpeech()
    speech.release.set()
    monkeypatch.setattr(tts._SpeechThread, "get", classmethod(lambda cls: speech))
    private = tmp_path / "private"
    private.mkdir(mode=0o755)
    private.chmod(0o755)
    renderer = tts.PromptRenderer(tmp_path / "prompts", _on_disk(tmp_path))
    path = await renderer.render_private("Your appointment is on Tuesday at 9.")
    assert private.stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.fixture
def speech(monkeypatch: pytest.MonkeyPatch) -> _SlowSpeech:
    fake = _SlowSpeech()
    fake.release.set()
    monkeypatch.setattr(tts._SpeechThread, "get", classmethod(lambda cls: fake))
    return fake


def _on_tmpfs(path: Path) -> bool:
    shm = Path("/dev/shm")  # where this machine's tmpfs is
    return shm in path.parents


async def test_a_private_render_goes_to_tmpfs_and_the_next_start_sweeps_it(
    tmp_path: Path, speech: _SlowSpeech
) -> None:
    """serve's renderer (its data dir holding the cache): a call's prompt never touches the
    data dir's disk when there is a tmpfs, and a start removes what a killed run left there."""
    data = tmp_path / "data"
    path = await tts.PromptRenderer(data / "prompts").render_private("Tuesday at 9.")
    try:
        assert _on_tmpfs(path), f"a caller's prompt was written to a disk: {path}"
        assert path.parent.stat().st_mode & 0o777 == 0o700
        assert not (data / "private").exists()
        restarted = tts.PromptRenderer(data / "prompts")  # the run was killed before deleting
        assert await asyncio.to_thread(restarted.remove_leftovers) == 1
        assert not path.exists()
    finally:
        if _on_tmpfs(path):
            await asyncio.to_thread(shutil.rmtree, path.parent, True)


async def test_a_private_render_is_made_when_the_data_dir_cannot_take_it(
    tmp_path: Path, speech: _SlowSpeech
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "private").write_bytes(b"")  # no folder there: a full or read-only data dir
    path = await tts.PromptRenderer(data / "prompts").render_private("Tuesday at 9.")
    try:
        assert path.exists() and path.stat().st_mode & 0o777 == 0o600
    finally:
        await asyncio.to_thread(shutil.rmtree, path.parent, True)


async def test_every_render_is_spoken_at_the_renderers_speed(
    tmp_path: Path, speech: _SlowSpeech
) -> None:
    # CLINIC_TTS_WORDS_PER_MINUTE: the speed reaches espeak-ng for cached and private texts,
    # and a cached prompt of another speed is not reused (the key holds the speed).
    slow = tts.PromptRenderer(tmp_path / "prompts", _on_disk(tmp_path), words_per_minute=140)
    brisk = tts.PromptRenderer(tmp_path / "prompts", _on_disk(tmp_path))
    assert (slow.words_per_minute, brisk.words_per_minute) == (140, 175)
    slow_file = await slow.render("Press 1 for yes.")
    brisk_file = await brisk.render("Press 1 for yes.")
    once = await slow.render_private("Your appointment is on Tuesday at 9.")
    assert slow_file != brisk_file
    assert speech.speeds == [140, 175, 140]
    assert await slow.render("Press 1 for yes.") == slow_file and len(speech.speeds) == 3
    await asyncio.to_thread(once.unlink)


@pytest.mark.parametrize("words_per_minute", [79, 301])
def test_a_speed_espeak_cannot_say_is_refused(tmp_path: Path, words_per_minute: int) -> None:
    with pytest.raises(tts.TtsError, match=r"80\.\.300"):
        tts.PromptRenderer(tmp_path, words_per_minute=words_per_minute)
