"""Linear PCM helpers: WAV files, resampling and loudness, in pure Python.

Call audio in this project is signed 16-bit little-endian mono ("PCM16"). numpy is not a
dependency, so the resampler is a polyphase windowed-sinc filter written with ``map`` and
``sum`` over precomputed taps: about 0.1 s of CPU for 4 s of espeak-ng output
(22050 Hz -> 8000 Hz) on this project's machines, and prompts are rendered once and cached.
"""

from __future__ import annotations

import io
import math
import operator
import sys
import wave
from array import array
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

SAMPLE_WIDTH = 2  # bytes per PCM16 sample
_INT16_MIN = -32768
_INT16_MAX = 32767
# Zero crossings of the sinc kept on each side: 8 gives > 40 dB stop-band rejection with a
# Blackman window, plenty for telephone audio that then goes through G.711 anyway.
_ZERO_CROSSINGS = 8
# Cut-off as a fraction of the lower Nyquist frequency, leaving room for the transition band.
_CUTOFF = 0.9
# More distinct fractional phases than this are rounded to the nearest of this many.
_MAX_PHASES = 1024


class PcmError(ValueError):
    """Audio that is not the PCM16 mono this project works with."""


@dataclass(frozen=True, slots=True)
class Pcm:
    """Mono PCM16 samples and their rate."""

    samples: array[int]
    rate_hz: int

    @property
    def duration_s(self) -> float:
        """Length in seconds."""
        return len(self.samples) / self.rate_hz

    def to_bytes(self) -> bytes:
        """Little-endian PCM16, as WAV files and RTP payload converters expect."""
        return samples_to_bytes(self.samples)


def bytes_to_samples(data: bytes) -> array[int]:
    """Little-endian PCM16 bytes -> samples."""
    if len(data) % SAMPLE_WIDTH:
        raise PcmError(f"PCM16 needs an even number of bytes, got {len(data)}")
    out = array("h")
    out.frombytes(data)
    if sys.byteorder == "big":
        out.byteswap()
    return out


def samples_to_bytes(samples: array[int]) -> bytes:
    """Samples -> little-endian PCM16 bytes."""
    if sys.byteorder == "big":
        swapped = array("h", samples)
        swapped.byteswap()
        return swapped.tobytes()
    return samples.tobytes()


def read_wav(path: Path) -> Pcm:
    """Read a PCM16 mono WAV file."""
    try:
        with wave.open(str(path), "rb") as w:
            _need_pcm16_mono(path, w)
            rate = w.getframerate()
            data = w.readframes(w.getnframes())
    except wave.Error as exc:
        raise PcmError(f"{path}: not a PCM WAV file ({exc})") from exc
    return Pcm(bytes_to_samples(data), rate)


def check_wav(path: Path) -> None:
    """Raise :class:`PcmError` unless ``path`` is a PCM16 mono WAV file (its header only:
    what :func:`read_wav` and the SIP worker's player take); ``OSError`` when unreadable."""
    try:
        with wave.open(str(path), "rb") as w:
            _need_pcm16_mono(path, w)
    except (wave.Error, EOFError) as exc:
        raise PcmError(f"{path}: not a PCM WAV file ({exc})") from exc


def _need_pcm16_mono(path: Path, w: wave.Wave_read) -> None:
    if w.getsampwidth() != SAMPLE_WIDTH or w.getnchannels() != 1:
        raise PcmError(
            f"{path}: need PCM16 mono, got {w.getsampwidth() * 8}-bit {w.getnchannels()}-channel"
        )


def write_wav(path: Path, pcm: Pcm) -> None:
    """Write a PCM16 mono WAV file (the caller makes it atomic if it needs to)."""
    path.write_bytes(wav_bytes(pcm))


def wav_bytes(pcm: Pcm) -> bytes:
    """``pcm`` as the bytes of a PCM16 mono WAV file."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(SAMPLE_WIDTH)
        w.setframerate(pcm.rate_hz)
        w.writeframes(pcm.to_bytes())
    return out.getvalue()


def resample(samples: array[int], src_hz: int, dst_hz: int) -> array[int]:
    """Resample PCM16 from ``src_hz`` to ``dst_hz`` with a band-limiting filter.

    The filter cuts off at 90 % of the lower Nyquist frequency, so downsampling espeak-ng's
    22050 Hz output to 8000 Hz does not fold its 4-11 kHz fricative energy into the band.
    """
    if src_hz <= 0 or dst_hz <= 0:
        raise PcmError(f"sample rates must be positive, got {src_hz} -> {dst_hz}")
    if src_hz == dst_hz or not samples:
        return array("h", samples)
    bank, half, phases = _filter_bank(src_hz, dst_hz)
    x = [0.0] * half + [float(s) for s in samples] + [0.0] * (half + 1)
    n_out = (len(samples) * dst_hz) // src_hz
    out = array("h", bytes(2 * n_out))
    mul = operator.mul
    width = 2 * half
    for n in range(n_out):
        # Integer arithmetic for the position keeps long signals free of drift.
        num = n * src_hz
        i0 = num // dst_hz
        # Exact when the rates share a divisor (22050/8000: 160 phases), else the nearest
        # lower of _MAX_PHASES positions (an error under 1/1000 of a sample).
        taps = bank[(num % dst_hz) * phases // dst_hz]
        # Input sample j sits at x[j + half]; the taps cover j = i0-half+1 .. i0+half.
        v = sum(map(mul, taps, x[i0 + 1 : i0 + 1 + width]))
        r = round(v)
        out[n] = _INT16_MAX if r > _INT16_MAX else _INT16_MIN if r < _INT16_MIN else r
    return out


@lru_cache(maxsize=16)
def _filter_bank(src_hz: int, dst_hz: int) -> tuple[tuple[tuple[float, ...], ...], int, int]:
    """Taps for every fractional position of an output sample between input samples.

    Returns (bank, half, phases): ``bank[p]`` applies to input samples ``i0 - half + 1 ..
    i0 + half`` (offset by the ``half`` samples of zero padding) for phase ``p``.
    """
    g = math.gcd(src_hz, dst_hz)
    phases = dst_hz // g
    phases = min(phases, _MAX_PHASES)
    # Cut-off in cycles per input sample.
    fc = _CUTOFF * 0.5 * min(src_hz, dst_hz) / src_hz
    half = math.ceil(_ZERO_CROSSINGS / (2 * fc))
    bank = []
    for p in range(phases):
        frac = p / phases
        taps = []
        for k in range(-half + 1, half + 1):
            t = k - frac  # distance of input sample i0+k from the output position
            x = 2 * fc * t
            sinc = 1.0 if x == 0 else math.sin(math.pi * x) / (math.pi * x)
            # Blackman window over [-half, half].
            w = t / half
            window = 0.42 + 0.5 * math.cos(math.pi * w) + 0.08 * math.cos(2 * math.pi * w)
            taps.append(sinc * max(window, 0.0))
        total = sum(taps)
        bank.append(tuple(v / total for v in taps))  # unity gain at DC
    return tuple(bank), half, phases


def rms_dbfs(samples: array[int]) -> float:
    """Loudness of a block in dB relative to full scale (-inf for digital silence)."""
    if not samples:
        return -math.inf
    power = sum(map(operator.mul, samples, samples)) / len(samples)
    if power <= 0:
        return -math.inf
    return 10 * math.log10(power / (_INT16_MAX * _INT16_MAX))


def silence(duration_s: float, rate_hz: int) -> array[int]:
    """Digital silence of the given length."""
    return array("h", bytes(2 * round(duration_s * rate_hz)))
