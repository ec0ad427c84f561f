"""The file that says a code (:mod:`voice.media.spoken_code`) never outlives its send: not when
the send is cancelled while the file is written, not when the write fails, not when speech
fails after it, and not across a restart after a kill (stale files are removed at start).

The renderer here hands back silent WAV files: what is under test is the file's lifetime, not
the speech (tests/integration/test_media_tts.py renders with the real espeak-ng).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import pytest

from sip_config.settings import Settings
from verification.channels.base import Delivery, DeliveryReport
from verification.channels.voice_call import VoiceCallChannel
from verification.model import NumberKind, Phone
from verification.rules import DeliveryKind
from voice.media import spoken_code
from voice.media.pcm import Pcm, read_wav, silence, write_wav
from voice.media.private_folder import PrivateFolder
from voice.media.tts import TtsError

PHONE = Phone("+31612345678", "NL", 31, "612345678", NumberKind.MOBILE)


class SilentRenderer:
    """Every text is 0.1 s of silence; ``render`` fails when told to."""

    def __init__(self, folder: Path, fail_render: bool = False) -> None:
        self._folder = folder
        self._fail_render = fail_render
        self.asked: list[str] = []

    async def prerender(
        self, texts: Sequence[str], *, voice: str = "en", rate_hz: int = 8000
    ) -> list[Path]:
        self.asked.extend(texts)
        path = self._folder / "silence.wav"
        write_wav(path, Pcm(silence(0.1, rate_hz), rate_hz))
        return [path for _ in texts]

    async def render(self, text: str, *, voice: str = "en", rate_hz: int = 8000) -> Path:
        if self._fail_render:
            raise TtsError("espeak-ng is gone")
        return (await self.prerender([text], rate_hz=rate_hz))[0]


def _folder(data_dir: Path) -> PrivateFolder:
    """Private files in ``data_dir/private`` (no RAM folder), the last resort in it too."""
    return PrivateFolder(data_dir, None, temp_root=data_dir)


def codes_in(folder: Path) -> list[Path]:
    return sorted(folder.glob("code-*.wav"))


async def test_every_digit_is_asked_for_whatever_the_code_holds(tmp_path: Path) -> None:
    # A cached piece's lookup touches its file: asking for the code's digits only would
    # show them in the cache folder's file times.
    renderer = SilentRenderer(tmp_path)
    await spoken_code.compose(renderer, "Your code is", "1111", _folder(tmp_path))  # type: ignore[arg-type]
    assert sorted(renderer.asked) == sorted(["Your code is", *"0123456789"])


class ToneRenderer(SilentRenderer):
    """Every text is 0.2 s of a loud constant: the silences between pieces can be measured."""

    async def prerender(
        self, texts: Sequence[str], *, voice: str = "en", rate_hz: int = 8000
    ) -> list[Path]:
        self.asked.extend(texts)
        path = self._folder / "tone.wav"
        loud = silence(0.2, rate_hz)
        for i in range(len(loud)):
            loud[i] = 8000
        write_wav(path, Pcm(loud, rate_hz))
        return [path for _ in texts]


async def test_the_digits_are_far_enough_apart_to_be_written_down(tmp_path: Path) -> None:
    # 0.25 s between digits ran them together for an older listener writing the code down;
    # each gap is now at least 0.6 s of silence (0.7 s), between the head and the first
    # digit too.
    renderer = ToneRenderer(tmp_path)
    path = await spoken_code.compose(renderer, "Your code is", "481523", _folder(tmp_path))  # type: ignore[arg-type]
    pcm = read_wav(path)
    gaps: list[float] = []
    run, sounded = 0, False
    for sample in pcm.samples:
        if sample:
            if sounded and run:
                gaps.append(run / pcm.rate_hz)
            run, sounded = 0, True
        else:
            run += 1
    assert len(gaps) == 6, gaps  # head, then 6 digits
    assert min(gaps) >= 0.6, gaps
    assert max(gaps) <= 1.0, gaps  # not so slow that the listener loses the thread


async def test_compose_writes_a_private_file(tmp_path: Path) -> None:
    out, renderer = tmp_path / "private", SilentRenderer(tmp_path)
    path = await spoken_code.compose(renderer, "Your code is", "481523", _folder(tmp_path))  # type: ignore[arg-type]
    assert codes_in(out) == [path]
    assert path.stat().st_mode & 0o777 == 0o600


async def test_a_cancel_while_the_file_is_written_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "private"
    started, go_on = threading.Event(), threading.Event()
    real_write = spoken_code.write_pcm

    def slow_write(file: BinaryIO, pcm: Pcm) -> None:
        started.set()
        go_on.wait(5)
        real_write(file, pcm)

    monkeypatch.setattr(spoken_code, "write_pcm", slow_write)
    renderer = SilentRenderer(tmp_path)
    task = asyncio.create_task(
        spoken_code.compose(renderer, "Your code is", "481523", _folder(tmp_path))  # type: ignore[arg-type]
    )
    assert await asyncio.to_thread(started.wait, 5)
    assert len(codes_in(out)) == 1, "the file exists while it is written"
    task.cancel()
    await asyncio.sleep(0.05)
    go_on.set()  # the thread finishes its write after the cancel
    with pytest.raises(asyncio.CancelledError):
        await task
    assert codes_in(out) == []


async def test_a_failed_write_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_write(file: BinaryIO, pcm: Pcm) -> None:
        file.write(b"RIFF part of a code")
        file.flush()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spoken_code, "write_pcm", failing_write)
    renderer = SilentRenderer(tmp_path)
    with pytest.raises(OSError, match="No space"):
        await spoken_code.compose(renderer, "Your code is", "481523", _folder(tmp_path))  # type: ignore[arg-type]
    left = await asyncio.to_thread(lambda: sorted(tmp_path.rglob("code-*.wav")))
    assert left == [], "nor in a folder of the chain after it"


async def test_speech_failing_after_the_code_file_removes_it(tmp_path: Path) -> None:
    out = tmp_path / "private"
    sip = Settings.from_env({"CLINIC_DATA_DIR": str(tmp_path / "var")}).sip
    renderer = SilentRenderer(tmp_path, fail_render=True)
    channel = VoiceCallChannel(sip, None, renderer, _folder(tmp_path))  # type: ignore[arg-type]
    reports: list[DeliveryReport] = []

    async def report(r: DeliveryReport) -> None:
        reports.append(r)

    await channel.send(Delivery("A" * 32, PHONE, "481523", "en", "the clinic"), report)
    assert [(r.kind, r.detail) for r in reports] == [
        (DeliveryKind.UNDELIVERABLE, "speech failed: espeak-ng is gone")
    ]
    assert out.is_dir() and codes_in(out) == [], "the composed code file was left behind"


def test_stale_files_are_removed_and_young_ones_kept(tmp_path: Path) -> None:
    now = time.time()
    out = tmp_path / "private"
    out.mkdir(mode=0o700)
    old, young = out / "code-old.wav", out / "code-young.wav"
    other = out / "notes.txt"
    for path in (old, young, other):
        path.write_bytes(b"x")
        os.utime(path, (now - 1000, now - 1000))
    os.utime(young, (now - 10, now - 10))
    assert spoken_code.remove_stale(_folder(tmp_path), 300, now) == 1
    assert sorted(p.name for p in out.iterdir()) == ["code-young.wav", "notes.txt"]
    assert spoken_code.remove_stale(_folder(tmp_path / "missing"), 300, now) == 0
