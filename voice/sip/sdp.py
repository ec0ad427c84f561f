"""Just enough SDP (RFC 8866) to judge an offer (RFC 3264) before pjsua answers it. No I/O.

pjsua answers a re-INVITE (or UPDATE) whose offer has no codec in common with ours
``500 SDP negotiation failed`` (pjsip's ``sip_inv.c``, Warning ``PJMEDIA_SDPNEG_NOANSCODEC``),
where RFC 3261 section 14.2 and RFC 3264 section 6 want ``488 Not Acceptable Here``; it
does send 488 when the application rejects the offer in ``onCallRxOffer``. So the worker
asks :func:`has_common_audio_codec` first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Codec:
    """An RTP payload format by encoding name (upper case) and clock rate."""

    name: str
    clock_rate: int

    @classmethod
    def parse(cls, text: str) -> Codec:
        """``"PCMU/8000"`` (also ``"opus/48000/2"``: channels are ignored) -> Codec."""
        name, _, rest = text.strip().partition("/")
        return cls(name.upper(), _number(rest.partition("/")[0]))


def _number(text: str) -> int:
    """A port or clock rate: ASCII digits, at most 9 of them; anything else is 0.

    ``str.isdigit`` alone also passes "²" and "٣", which ``int`` refuses (ValueError out of
    pjsua's offer callback), and ``int`` refuses over 4,300 digits.
    """
    if text.isascii() and text.isdigit() and len(text) <= 9:
        return int(text)
    return 0


# RFC 3551 section 6, table 4: the static audio payload types (an offer may omit their rtpmap).
_STATIC = {
    "0": Codec("PCMU", 8000),
    "3": Codec("GSM", 8000),
    "4": Codec("G723", 8000),
    "5": Codec("DVI4", 8000),
    "6": Codec("DVI4", 16000),
    "7": Codec("LPC", 8000),
    "8": Codec("PCMA", 8000),
    "9": Codec("G722", 8000),
    "10": Codec("L16", 44100),
    "11": Codec("L16", 44100),
    "12": Codec("QCELP", 8000),
    "13": Codec("CN", 8000),
    "14": Codec("MPA", 90000),
    "15": Codec("G728", 8000),
    "16": Codec("DVI4", 11025),
    "17": Codec("DVI4", 22050),
    "18": Codec("G729", 8000),
}


@dataclass(frozen=True, slots=True)
class AudioStream:
    """One ``m=audio`` line of an offer: its port (0: declined) and the codecs it offers."""

    port: int
    codecs: tuple[Codec, ...]


def audio_streams(sdp: str) -> list[AudioStream]:
    """The ``m=audio`` sections of ``sdp``, each with the codecs of its formats in order.

    A dynamic payload type is named by its section's ``a=rtpmap``; a static one by RFC 3551
    unless an rtpmap says otherwise; a format named by neither is left out.
    """
    streams: list[AudioStream] = []
    port = -1  # not in an audio section
    formats: list[str] = []
    rtpmap: dict[str, Codec] = {}

    def close() -> None:
        if port >= 0:
            named = (rtpmap.get(pt) or _STATIC.get(pt) for pt in formats)
            streams.append(AudioStream(port, tuple(c for c in named if c is not None)))

    for raw in sdp.splitlines():
        line = raw.strip()
        if line.startswith("m="):
            close()
            media, _, rest = line[2:].partition(" ")
            fields = rest.split()
            port, formats, rtpmap = -1, [], {}
            if media == "audio" and len(fields) >= 2:
                port = _number(fields[0].partition("/")[0])  # "<port>/<count>" (section 5.14)
                formats = fields[2:]
        elif line.startswith("a=rtpmap:") and port >= 0:
            pt, _, encoding = line[len("a=rtpmap:") :].partition(" ")
            if encoding:
                rtpmap[pt.strip()] = Codec.parse(encoding)
    close()
    return streams


def has_common_audio_codec(sdp: str, ours: Iterable[str]) -> bool | None:
    """Whether an audio stream of the offer ``sdp`` that is not declined offers one of
    ``ours`` (``"PCMU/8000"``, ...); None when it has no such stream (no audio line, or
    every one with port 0): that is not a codec question, pjsua answers it as it sees fit.
    """
    wanted = {Codec.parse(c) for c in ours}
    live = [s for s in audio_streams(sdp) if s.port > 0]
    if not live:
        return None
    return any(c in wanted for s in live for c in s.codecs)
