"""audio_match on synthetic "words": tone sequences, one of them changed."""

from __future__ import annotations

import math
from array import array

import pytest

from voice.media.audio_match import rank, similarity
from voice.media.g711 import ulaw_decode, ulaw_encode
from voice.media.pcm import samples_to_bytes, silence

RATE = 8000
# Each "digit" is a two-tone chord, like a crude vowel with two formants.
CHORDS = {d: (300 + 110 * d, 1100 + 230 * d) for d in range(10)}


def say(digits: str) -> array[int]:
    out = array("h")
    for ch in digits:
        low, high = CHORDS[int(ch)]
        n = round(0.25 * RATE)
        out.extend(
            round(
                6000 * math.sin(2 * math.pi * low * i / RATE)
                + 3000 * math.sin(2 * math.pi * high * i / RATE)
            )
            for i in range(n)
        )
        out.extend(silence(0.1, RATE))
    return out


def phone(samples: array[int], lead_s: float) -> bytes:
    return samples_to_bytes(ulaw_decode(ulaw_encode(silence(lead_s, RATE) + samples)))


def test_identical_audio_scores_one() -> None:
    pcm = samples_to_bytes(say("4815"))
    assert similarity(pcm, pcm, RATE) == pytest.approx(1.0)


def test_the_changed_digit_is_noticed_wherever_it_is() -> None:
    recording = phone(say("481523"), lead_s=1.3)
    right = similarity(recording, samples_to_bytes(say("481523")), RATE)
    for wrong in ["981523", "431523", "485523", "481923", "481583", "481520"]:
        score = similarity(recording, samples_to_bytes(say(wrong)), RATE)
        assert right > score * 1.2, f"{wrong}: {score:.3f} vs right {right:.3f}"


def test_rank_names_the_best_and_the_runner_up() -> None:
    refs = {code: samples_to_bytes(say(code)) for code in ["1234", "1239", "5678"]}
    match = rank(phone(say("1239"), lead_s=0.5), refs, RATE)
    assert match.key == "1239"
    assert match.runner_up < match.score
    with pytest.raises(ValueError):
        rank(b"", {}, RATE)


def test_too_short_audio_scores_zero() -> None:
    assert similarity(b"\0\0" * 10, samples_to_bytes(say("1")), RATE) == 0.0
