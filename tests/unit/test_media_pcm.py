"""Pure-Python PCM helpers: resampler response, WAV round trip, loudness."""

from __future__ import annotations

import itertools
import math
from array import array
from pathlib import Path

import pytest

from voice.media.pcm import (
    Pcm,
    PcmError,
    bytes_to_samples,
    read_wav,
    resample,
    rms_dbfs,
    samples_to_bytes,
    silence,
    write_wav,
)


def tone(hz: float, rate: int, seconds: float = 0.5, amplitude: int = 10000) -> array[int]:
    n = round(rate * seconds)
    return array("h", (round(amplitude * math.sin(2 * math.pi * hz * i / rate)) for i in range(n)))


@pytest.mark.parametrize(
    ("src", "dst", "hz", "passes"),
    [
        (22050, 8000, 1000, True),  # espeak-ng -> telephone: speech band kept
        (22050, 8000, 3000, True),
        (22050, 8000, 5000, False),  # above the new Nyquist: must not alias into the band
        (22050, 8000, 9000, False),
        (16000, 8000, 6000, False),
        (8000, 16000, 1000, True),  # upsampling keeps the tone, adds no images
        (44100, 8000, 440, True),  # more phases than the bank holds exactly
    ],
)
def test_resampler_keeps_the_band_and_rejects_the_rest(
    src: int, dst: int, hz: int, passes: bool
) -> None:
    before = rms_dbfs(tone(hz, src))
    out = resample(tone(hz, src), src, dst)
    assert len(out) == round(len(tone(hz, src)) * dst / src)
    after = rms_dbfs(out[dst // 20 : -dst // 20])  # skip the filter's edges
    if passes:
        assert abs(after - before) < 1.0, f"{hz} Hz lost {before - after:.1f} dB"
    else:
        assert after < before - 40, f"{hz} Hz leaked through at {after - before:.1f} dB"


def test_resampled_tone_keeps_its_frequency() -> None:
    out = resample(tone(1000, 22050, seconds=1.0), 22050, 8000)
    crossings = sum(1 for a, b in itertools.pairwise(out) if a < 0 <= b)
    assert 995 <= crossings <= 1001


def test_resample_same_rate_and_empty() -> None:
    samples = array("h", [1, -2, 3])
    assert resample(samples, 8000, 8000) == samples
    assert resample(array("h"), 22050, 8000) == array("h")
    with pytest.raises(PcmError):
        resample(samples, 0, 8000)


def test_resample_clips_instead_of_wrapping() -> None:
    square = array("h", ([32767] * 20 + [-32768] * 20) * 50)
    out = resample(square, 16000, 8000)
    assert max(out) <= 32767 and min(out) >= -32768
    assert max(out) > 30000  # the filter's overshoot was clipped, not wrapped negative


def test_wav_round_trip(tmp_path: Path) -> None:
    pcm = Pcm(tone(440, 8000), 8000)
    write_wav(tmp_path / "a.wav", pcm)
    back = read_wav(tmp_path / "a.wav")
    assert back == pcm
    assert back.duration_s == 0.5


def test_read_wav_refuses_other_formats(tmp_path: Path) -> None:
    import wave

    with wave.open(str(tmp_path / "stereo.wav"), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0" * 8)
    with pytest.raises(PcmError, match="mono"):
        read_wav(tmp_path / "stereo.wav")
    (tmp_path / "junk.wav").write_bytes(b"not a wav file at all")
    with pytest.raises(PcmError, match="not a PCM WAV"):
        read_wav(tmp_path / "junk.wav")


def test_bytes_round_trip_is_little_endian() -> None:
    assert samples_to_bytes(array("h", [1, -2])) == b"\x01\x00\xfe\xff"
    assert bytes_to_samples(b"\x01\x00\xfe\xff") == array("h", [1, -2])
    with pytest.raises(PcmError):
        bytes_to_samples(b"\x01")


def test_loudness() -> None:
    assert rms_dbfs(silence(0.1, 8000)) == -math.inf
    assert rms_dbfs(array("h")) == -math.inf
    assert rms_dbfs(array("h", [32767, -32767] * 10)) == pytest.approx(0.0, abs=0.01)
    # A sine's RMS is 3 dB below its peak.
    assert rms_dbfs(tone(1000, 8000, amplitude=32767)) == pytest.approx(-3.01, abs=0.05)
