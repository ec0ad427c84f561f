"""Which codecs an SDP offer has, and whether one is ours (pure)."""

from __future__ import annotations

import pytest

from voice.sip import sdp

OURS = ("PCMU/8000", "PCMA/8000")


def offer(*media: str) -> str:
    head = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    return head + "".join(m.replace("\n", "\r\n") + "\r\n" for m in media)


G729 = "m=audio 6000 RTP/AVP 18\na=rtpmap:18 G729/8000"
PCMA_EVENTS = "m=audio 6000 RTP/AVP 8 101\na=rtpmap:8 PCMA/8000\na=rtpmap:101 telephone-event/8000"


@pytest.mark.parametrize(
    ("sdp_text", "common"),
    [
        (offer("m=audio 6000 RTP/AVP 0"), True),  # static type, no rtpmap
        (offer(PCMA_EVENTS), True),
        (offer("m=audio 6000 RTP/AVP 96\na=rtpmap:96 pcmu/8000"), True),  # names ignore case
        (offer("m=audio 6000 RTP/AVP 18 0", "a=sendonly"), True),  # hold: still a codec of ours
        (offer(G729), False),
        (offer("m=audio 6000 RTP/AVP 101\na=rtpmap:101 telephone-event/8000"), False),
        (offer("m=audio 6000 RTP/AVP 96\na=rtpmap:96 PCMU/16000"), False),  # another rate
        (offer("m=audio 6000 RTP/AVP 0\na=rtpmap:0 G729/8000"), False),  # rtpmap wins
        (offer(G729, "m=audio 6002 RTP/AVP 0"), True),  # one stream of ours is enough
        (offer("m=audio 0 RTP/AVP 0", G729), False),  # a declined stream does not count
        (offer("m=video 6000 RTP/AVP 0", G729), False),  # nor a video line's formats
        (offer("m=audio 0 RTP/AVP 18"), None),  # audio removed: not a codec question
        (offer("m=video 6000 RTP/AVP 96\na=rtpmap:96 H264/90000"), None),
        ("", None),
    ],
)  # fmt: skip
def test_has_common_audio_codec(sdp_text: str, common: bool | None) -> None:
    assert sdp.has_common_audio_codec(sdp_text, OURS) is common


def test_audio_streams_keep_the_offer_order_and_port() -> None:
    streams = sdp.audio_streams(offer("m=audio 6000/2 RTP/AVP 8 0 13 99"))
    assert streams == [
        sdp.AudioStream(
            6000, (sdp.Codec("PCMA", 8000), sdp.Codec("PCMU", 8000), sdp.Codec("CN", 8000))
        )
    ]


@pytest.mark.parametrize(
    "media",
    [
        "m=audio \u00b2 RTP/AVP 0",  # str.isdigit() passes "²", int() refuses it
        "m=audio 6000 RTP/AVP 96\na=rtpmap:96 PCMU/\u0663",
        "m=audio " + "7" * 5000 + " RTP/AVP 0",  # int() refuses over 4,300 digits
    ],
)
def test_numbers_that_are_no_ascii_port_or_rate_are_zero_not_a_value_error(media: str) -> None:
    # Found by tests/unit/test_prop_sip.py: a ValueError out of pjsua's offer callback.
    streams = sdp.audio_streams(offer(media))
    assert len(streams) == 1
    assert streams[0].port == 0 or streams[0].codecs[0].clock_rate == 0
