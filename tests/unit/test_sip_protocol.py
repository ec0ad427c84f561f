"""Pool <-> worker messages survive the JSON-lines round trip (pure)."""

from __future__ import annotations

import dataclasses
import typing

import orjson
import pytest

from voice.sip.outcome import CallOutcome
from voice.sip.protocol import (
    Answer,
    AudioChunk,
    CallEvent,
    CallState,
    CannotListen,
    Digit,
    Hangup,
    Hold,
    IncomingCall,
    Message,
    MessageResult,
    Ping,
    PlaceCall,
    PlaceFailed,
    Play,
    PlayDone,
    ProtocolError,
    Registered,
    SendMessage,
    Shutdown,
    StartListen,
    StopAsked,
    Stopping,
    StopPlay,
    Transfer,
    TransferStatus,
    WorkerStatus,
    decode,
    encode,
)

MESSAGES: list[Message] = [
    PlaceCall("c1", "sip:+4479@127.0.0.1:5080", "+4474", True, 3.0, 30.0, True, (("X-A", "1"),)),
    Answer("c1"),
    Play("c1", "/tmp/hello.wav", loop=True),
    Play("c1", "/tmp/hello.wav", play_id=7),
    StopPlay("c1"),
    StartListen("c1"),
    Hangup("c1", 486),
    Transfer("c1", "sip:6100@pbx", (("X-Reason", "urgent"),)),
    SendMessage("r1", "sip:+4479@127.0.0.1", "+4474", "Code: émoji ✓\nline 2"),
    Shutdown(),
    Ping(),
    CallEvent("c1", CallState.ENDED, 487, CallOutcome.CANCELLED_AFTER_RING, 1.8e9),
    CallEvent("c1", CallState.RINGING, 180, None, 1.8e9),
    PlaceFailed("c1", "worker full", retryable=True),
    IncomingCall("in-1", "+4477", "6000", 3, (("X-Clinic", "a"),), "abc@peer"),
    Digit("c1", "#"),
    PlayDone("c1"),
    PlayDone("c1", play_id=7),
    Hold("c1", held=True),
    Hold("c1", held=False),
    TransferStatus("c1", 180, final=False),
    TransferStatus("c1", 486, final=True),
    AudioChunk("c1", bytes(range(256)) + b"\x00" * 64),
    MessageResult("r1", 202),
    WorkerStatus(3, 5061, 2),
    Registered(ok=True, sip_status=200),
    Stopping(),
    StopAsked(25.0),
    CannotListen("127.0.0.1:5061", "Address already in use"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    line = encode(msg)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode(line) == msg


def test_audio_chunk_is_base64() -> None:
    line = encode(AudioChunk("c1", b"\x00\x01" * 160))
    assert b'"pcm":"AAEAAQ' in line


def test_integer_seconds_decode_as_float() -> None:
    msg = decode(
        b'{"t":"PlaceCall","call_id":"c","target_uri":"sip:x@y","caller_id":"1","flash":true,'
        b'"ring_s":3,"answer_timeout_s":30,"pai":true,"headers":[]}'
    )
    assert isinstance(msg, PlaceCall) and isinstance(msg.ring_s, float)


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"[1, 2]",
        b'{"t": "Nope"}',
        b'{"t": "Digit", "call_id": "c"}',
        b'{"t": "Digit", "call_id": 5, "key": "1"}',
        b'{"t": "CallEvent", "call_id": "c", "state": "weird", "sip_status": 0, '
        b'"outcome": null, "at": 0}',
        b'{"t": "AudioChunk", "call_id": "c", "pcm": "***"}',
    ],
)
def test_bad_lines_raise_protocol_error(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(line)


_NUMBERS = {
    (type(msg), f.name): (msg, hint)
    for msg in MESSAGES
    for f in dataclasses.fields(msg)
    if (hint := typing.get_type_hints(type(msg))[f.name]) in (int, float, bool)
}


@pytest.mark.parametrize(
    ("msg", "name", "hint"),
    [(msg, name, hint) for (_, name), (msg, hint) in _NUMBERS.items()],
    ids=[f"{cls.__name__}.{name}" for cls, name in _NUMBERS],
)
def test_numbers_and_booleans_are_not_taken_for_each_other(
    msg: Message, name: str, hint: type
) -> None:
    """JSON true is a Python bool and bool is an int: ``"free_slots": true`` decoded as a
    WorkerStatus with True free slots. An int or float field takes no boolean, and a
    boolean field no number."""
    raw = orjson.loads(encode(msg))
    for wrong in (1, 0) if hint is bool else (True, False):
        raw[name] = wrong
        with pytest.raises(ProtocolError, match=f"bad {type(msg).__name__}"):
            decode(orjson.dumps(raw))
