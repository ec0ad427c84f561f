"""Energy-based end-of-speech detection (sans-I/O).

vosk ends an utterance on its own only after a long pause; a caller answering "yes" should
not wait for that. :class:`EndOfSpeech` watches the loudness of each incoming frame: speech
has started once ``speech_ms`` of consecutive frames are above the threshold, and has ended
once ``silence_ms`` of consecutive frames after that are below it. Time is counted in
samples, so the audio itself is the clock and no timer is needed.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from voice.media.pcm import bytes_to_samples, rms_dbfs

log = logging.getLogger(__name__)


class Endpoint(enum.StrEnum):
    """Where the caller is in their answer."""

    WAITING = "waiting"  # nothing said yet
    SPEECH = "speech"  # speaking (barge-in point)
    ENDED = "ended"  # spoke, then fell silent long enough


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    """Tuning of :class:`EndOfSpeech`.

    -40 dBFS sits well above a G.711 line's idle noise (about -60 dBFS) and well below
    speech at normal level (-15 to -25 dBFS RMS). The bot's questions take one- or two-word
    answers from a small grammar ("yes", "no", "operator"), so 350 ms of silence ends an
    answer: the response budget is 500 ms from the end of speech, and 600 ms (the first value)
    alone spent more than that (bench/ivr.py). Free speech would want a longer value.
    """

    threshold_dbfs: float = -40.0
    speech_ms: int = 100
    silence_ms: int = 350

    def __post_init__(self) -> None:
        if self.speech_ms <= 0 or self.silence_ms <= 0:
            raise ValueError("speech_ms and silence_ms must be positive")


class EndOfSpeech:
    """Feed PCM16 frames in order; read :attr:`state` after each one."""

    def __init__(self, rate_hz: int = 8000, config: EndpointConfig | None = None) -> None:
        self._rate = rate_hz
        self._config = config or EndpointConfig()
        self._state = Endpoint.WAITING
        self._loud_samples = 0  # consecutive samples above the threshold
        self._quiet_samples = 0  # consecutive samples below it since speech started
        self._position = 0  # samples seen so far
        self.speech_start_s: float | None = None
        """Where the speech began in the stream (seconds), once it has."""
        self.speech_end_s: float | None = None
        """Where the silence that ended it began (seconds), once it has."""

    @property
    def state(self) -> Endpoint:
        """The current state."""
        return self._state

    def push(self, pcm: bytes) -> Endpoint:
        """Account for one frame of little-endian PCM16 and return the new state."""
        samples = bytes_to_samples(pcm)
        n = len(samples)
        if n == 0:
            return self._state
        loud = rms_dbfs(samples) >= self._config.threshold_dbfs
        cfg = self._config
        if self._state is Endpoint.WAITING:
            self._loud_samples = self._loud_samples + n if loud else 0
            if self._loud_samples * 1000 >= cfg.speech_ms * self._rate:
                self.speech_start_s = (self._position + n - self._loud_samples) / self._rate
                self._set_state(Endpoint.SPEECH)
        elif self._state is Endpoint.SPEECH:
            self._quiet_samples = 0 if loud else self._quiet_samples + n
            if self._quiet_samples * 1000 >= cfg.silence_ms * self._rate:
                self.speech_end_s = (self._position + n - self._quiet_samples) / self._rate
                self._set_state(Endpoint.ENDED)
        self._position += n
        return self._state

    def reset(self) -> None:
        """Wait for the next answer (e.g. after a re-prompt)."""
        self._set_state(Endpoint.WAITING)
        self._loud_samples = self._quiet_samples = 0
        self.speech_start_s = self.speech_end_s = None

    def _set_state(self, new: Endpoint) -> None:
        if new is not self._state:
            log.debug("end-of-speech: %s -> %s", self._state, new)
            self._state = new


# A message holds speech when it is loud for this long in a row somewhere: a cough or a
# click is shorter, a spoken word longer.
MESSAGE_ONSET = EndpointConfig(speech_ms=200)


def holds_speech(pcm: bytes, rate_hz: int = 8000, config: EndpointConfig = MESSAGE_ONSET) -> bool:
    """Whether a recording (PCM16) holds speech, not only silence or line noise."""
    detector = EndOfSpeech(rate_hz, config)
    frame = rate_hz // 50 * 2  # 20 ms
    for start in range(0, len(pcm) - frame + 1, frame):
        if detector.push(pcm[start : start + frame]) is not Endpoint.WAITING:
            return True
    return False
