"""G.711 µ-law against the standard's code points."""

from __future__ import annotations

from array import array

import pytest

from voice.media.g711 import ulaw_decode, ulaw_encode


@pytest.mark.parametrize(
    ("sample", "code"),
    [
        (0, 0xFF),
        (-1, 0x7F),
        (32767, 0x80),
        (-32768, 0x00),
        # Worked by hand with Sun's 14-bit g711.c (pcm >> 2, bias 33): segment 3, step 1.
        (1000, 0xCE),
        (-1000, 0x4E),
        (100, 0xF2),  # segment 0, step 13
    ],
)
def test_encode_code_points(sample: int, code: int) -> None:
    assert ulaw_encode(array("h", [sample])) == bytes([code])


def test_every_code_survives_decode_then_encode() -> None:
    codes = bytes(range(256))
    back = ulaw_encode(ulaw_decode(codes))
    # 0x7F is "negative zero": it decodes to 0, which encodes as 0xFF.
    assert [c for c, b in zip(codes, back, strict=True) if c != b] == [0x7F]


def test_quantisation_error_is_relative() -> None:
    samples = array("h", range(-32768, 32768, 13))
    decoded = ulaw_decode(ulaw_encode(samples))
    for s, d in zip(samples, decoded, strict=True):
        # 8-bit companding: error within ~1/32 of the magnitude (plus a few LSBs near zero).
        assert abs(s - d) <= abs(s) / 30 + 8, (s, d)


def test_decode_is_symmetric() -> None:
    positive = ulaw_decode(bytes(range(0x80, 0x100)))
    negative = ulaw_decode(bytes(range(0x00, 0x80)))
    assert [-v for v in positive] == list(negative)
