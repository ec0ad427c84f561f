"""The clinic line's own tones: their shape, and their WAV written once per folder."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

from voice.media.pcm import read_wav
from voice.media.tones import BEEP, RATE_HZ, RINGBACK, tone_wav


def test_the_ring_tone_is_one_second_on_and_four_off() -> None:
    samples = RINGBACK.samples()
    assert len(samples) == 5 * RATE_HZ
    on, off = samples[:RATE_HZ], samples[RATE_HZ:]
    assert max(abs(x) for x in on) > 16000 and not any(off)
    # 425 Hz: 425 cycles in the second it sounds (two zero crossings each).
    crossings = sum(1 for a, b in pairwise(on) if (a < 0) != (b < 0))
    assert abs(crossings - 2 * 425) <= 2


def test_the_beep_fades_in_and_out() -> None:
    samples = BEEP.samples()
    assert len(samples) == RATE_HZ * 300 // 1000
    assert abs(samples[0]) < 100 and abs(samples[-1]) < 100


def test_a_tone_is_written_once_and_kept(tmp_path: Path) -> None:
    ring = tone_wav(tmp_path, RINGBACK)
    first = ring.stat().st_mtime_ns
    assert tone_wav(tmp_path, RINGBACK) == ring and ring.stat().st_mtime_ns == first
    assert read_wav(ring).samples == RINGBACK.samples()
    # The beep keeps the name it had before the ring tone came (a data dir's cache).
    assert tone_wav(tmp_path, BEEP).name == "beep-1000hz-300ms.wav"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "beep-1000hz-300ms.wav",
        "ringback-425hz-1000ms-4000ms.wav",
    ]
