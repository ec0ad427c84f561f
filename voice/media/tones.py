"""Tones the clinic line plays itself: the beep before a message, the ring tone while a
transfer waits. Each is an 8 kHz WAV written once into a folder that calls share.

The ring tone is the European one (ETSI ES 201 970, used in the Netherlands): 425 Hz, 1 s
on, 4 s off, looped by the player.
"""

from __future__ import annotations

import math
import os
import tempfile
from array import array
from dataclasses import dataclass
from pathlib import Path

from voice.media.pcm import Pcm, write_wav

RATE_HZ = 8000
RAMP_MS = 10  # fade in and out: no clicks


@dataclass(frozen=True, slots=True)
class Tone:
    """A sine of ``hz`` for ``on_ms``, then ``off_ms`` of silence (one period of a loop)."""

    name: str
    hz: int
    on_ms: int
    off_ms: int = 0

    def samples(self, rate_hz: int = RATE_HZ) -> array[int]:
        """The tone at -6 dBFS with ``RAMP_MS`` ramps, then its silence."""
        n = rate_hz * self.on_ms // 1000
        ramp = rate_hz * RAMP_MS // 1000
        out = array("h")
        for i in range(n):
            gain = min(1.0, i / ramp, (n - 1 - i) / ramp)
            out.append(round(16383 * gain * math.sin(2 * math.pi * self.hz * i / rate_hz)))
        out.extend([0] * (rate_hz * self.off_ms // 1000))
        return out


# "Leave your message after the tone": played before the recording starts (never part of it).
BEEP = Tone("beep", 1000, 300)
# While a transfer waits for the target: the caller hears the line is alive.
RINGBACK = Tone("ringback", 425, 1000, 4000)


def tone_wav(folder: Path, tone: Tone) -> Path:
    """``tone`` as an 8 kHz WAV in ``folder``, written once (atomically: calls share it).

    Blocking file I/O: call it in a thread.
    """
    gap = f"-{tone.off_ms}ms" if tone.off_ms else ""  # the beep keeps its older name
    path = folder / f"{tone.name}-{tone.hz}hz-{tone.on_ms}ms{gap}.wav"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{tone.name}-", suffix=".wav", dir=folder)
    os.close(fd)
    try:
        write_wav(Path(tmp), Pcm(tone.samples(), RATE_HZ))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
