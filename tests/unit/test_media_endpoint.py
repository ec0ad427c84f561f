"""The energy end-pointer, table-driven over synthetic call audio (20 ms frames)."""

from __future__ import annotations

import math
from array import array

import pytest

from voice.media.endpoint import EndOfSpeech, Endpoint, EndpointConfig, holds_speech
from voice.media.pcm import samples_to_bytes

RATE = 8000
FRAME = 160  # 20 ms


def frames(kind: str, ms: int) -> list[bytes]:
    """``ms`` of "speech" (a -20 dBFS tone), "quiet" (-60 dBFS noise) or "zero" audio."""
    out = []
    for f in range(ms // 20):
        if kind == "speech":
            amp = 3277 * math.sqrt(2)
            s = [
                round(amp * math.sin(2 * math.pi * 300 * (f * FRAME + i) / RATE))
                for i in range(FRAME)
            ]
        elif kind == "quiet":
            s = [(33 if (i * 7919 + f) % 3 else -33) for i in range(FRAME)]
        else:
            s = [0] * FRAME
        out.append(samples_to_bytes(array("h", s)))
    return out


CASES = [
    # (audio, expected final state, expected speech start s, expected end s)
    ([("zero", 2000)], Endpoint.WAITING, None, None),
    ([("quiet", 2000)], Endpoint.WAITING, None, None),
    ([("quiet", 300), ("speech", 60), ("quiet", 2000)], Endpoint.WAITING, None, None),  # click
    ([("quiet", 300), ("speech", 500), ("quiet", 300)], Endpoint.SPEECH, 0.3, None),
    ([("quiet", 300), ("speech", 500), ("quiet", 360)], Endpoint.ENDED, 0.3, 0.8),
    # a pause shorter than 350 ms inside the answer does not end it
    (
        [("quiet", 200), ("speech", 300), ("quiet", 300), ("speech", 400), ("zero", 700)],
        Endpoint.ENDED,
        0.2,
        1.2,
    ),
]


@pytest.mark.parametrize(("audio", "state", "start", "end"), CASES)
def test_end_of_speech(
    audio: list[tuple[str, int]], state: Endpoint, start: float | None, end: float | None
) -> None:
    eos = EndOfSpeech(RATE)
    for kind, ms in audio:
        for frame in frames(kind, ms):
            eos.push(frame)
    assert eos.state is state
    assert eos.speech_start_s == (pytest.approx(start) if start is not None else None)
    assert eos.speech_end_s == (pytest.approx(end) if end is not None else None)


def test_state_ends_exactly_after_the_silence() -> None:
    eos = EndOfSpeech(RATE, EndpointConfig(silence_ms=200))
    states = [eos.push(f) for f in frames("speech", 200) + frames("zero", 300)]
    # speech_ms=100: SPEECH from the 5th frame; 200 ms of silence = 10 frames after speech.
    assert states.index(Endpoint.SPEECH) == 4
    assert states.index(Endpoint.ENDED) == 10 + 9


def test_reset_waits_for_the_next_answer() -> None:
    eos = EndOfSpeech(RATE)
    for f in frames("speech", 200) + frames("zero", 600):
        eos.push(f)
    assert eos.push(b"") is Endpoint.ENDED  # an empty frame reports the state as it is
    eos.reset()
    assert eos.state is Endpoint.WAITING and eos.speech_start_s is None
    states = [eos.push(f) for f in frames("speech", 200)]
    assert states[-1] is Endpoint.SPEECH
    assert eos.speech_start_s == pytest.approx(0.8)  # stream time goes on across answers


def test_empty_frame_changes_nothing_and_config_is_checked() -> None:
    eos = EndOfSpeech(RATE)
    assert eos.push(b"") is Endpoint.WAITING
    with pytest.raises(ValueError):
        EndpointConfig(silence_ms=0)


@pytest.mark.parametrize(
    ("audio", "speech"),
    [
        ([], False),
        ([("zero", 12000)], False),  # a phone that sent silence for a whole message
        ([("quiet", 12000)], False),  # line noise
        ([("quiet", 3000), ("speech", 160), ("quiet", 3000)], False),  # a cough, a click
        ([("quiet", 3000), ("speech", 200), ("quiet", 3000)], True),
        ([("zero", 500), ("speech", 2000), ("zero", 500)], True),
    ],
)
def test_a_recording_holds_speech_only_with_a_word_in_it(
    audio: list[tuple[str, int]], speech: bool
) -> None:
    pcm = b"".join(f for kind, ms in audio for f in frames(kind, ms))
    assert holds_speech(pcm) is speech
    assert holds_speech(pcm + b"\x00") is speech, "a partial frame at the end is no matter"
