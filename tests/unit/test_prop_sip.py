"""Properties of the SIP parsers at the service's edge (pure).

Whatever arrives off the wire, each parser returns a value or raises its module's own error:
another exception (IndexError, ValueError...) escapes the front's datagram handler, drops the
request without an answer and puts a traceback in the log. What the front answers is a SIP
response that parses again, with the request's Via, Call-ID and CSeq.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import string

from hypothesis import given
from hypothesis import strategies as st

from sip_config.clock import FakeClock
from sip_config.settings import HostPort
from voice.sip import digest, front, message, protocol, refer, sdp, transaction
from voice.sip.flash_dialog import FlashDialog, Local
from voice.sip.outcome import SipStatus

# -- near-valid SIP -------------------------------------------------------------------------

_METHODS = ["INVITE", "ACK", "CANCEL", "OPTIONS", "BYE", "REGISTER", "MESSAGE", "REFER"]
_NAMES = ["Via", "From", "To", "Call-ID", "CSeq", "Contact", "Content-Length", "Max-Forwards"]
_NAMES += ["Record-Route", "WWW-Authenticate", "Proxy-Authenticate", "X-Clinic", "Subject"]
_NAMES += ["v", "f", "t", "i", "m", "l", "c", "k", "s", "r", "x"]
_VALUES = {
    "via": [
        "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-1",
        "SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKx, SIP/2.0/TCP h;branch=1",
        ";branch=z9hG4bK",
        "SIP/2.0/UDP h:5060",
    ],
    "cseq": ["1 INVITE", "7 OPTIONS", "1", "", " INVITE", "99999999999999999999 BYE"],
    "from": ['"Ann" <sip:+447700900123@127.0.0.1>;tag=abc', "sip:a@b", "<sip:@>;tag"],
    "to": ["<sip:6000@127.0.0.1>", "<sip:6000@h>;tag=x", ";tag="],
    "call-id": ["call-1@127.0.0.1", "x"],
    "content-length": ["0", "12", "99999999999999999999999", "-1", "x"],
}
# Digits by the thousand: Python refuses int() of more than 4,300 (CVE-2020-10735).
_LONG_NUMBER = st.integers(0, 5000).map("7".__mul__)

# Text that a header value may hold: printable ASCII, some Latin-1/UTF-8, and the controls
# a broken or hostile peer sends (CR alone, NUL, TAB).
_VALUE_TEXT = st.text(
    alphabet=st.sampled_from([*list(string.printable.replace("\n", "")), "é", "✓", "\x00", "²"]),
    max_size=40,
)


def _case(name: str) -> st.SearchStrategy[str]:
    return st.sampled_from([name, name.lower(), name.upper(), name.swapcase()])


@st.composite
def header_lines(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(_NAMES) | st.text(string.ascii_letters + "-", min_size=1))
    known = _VALUES.get(name.lower())
    value = draw(st.sampled_from(known) | _VALUE_TEXT) if known else draw(_VALUE_TEXT)
    if name.lower() in ("content-length", "l", "cseq") and draw(st.booleans()):
        value = draw(_LONG_NUMBER)
    sep = draw(st.sampled_from([": ", ":", " : ", ":\t"]))
    line = f"{draw(_case(name))}{sep}{value}"
    if draw(st.booleans()) and draw(st.booleans()):  # folded (section 7.3.1)
        line += draw(st.sampled_from(["\r\n ", "\r\n\t", "\n "])) + draw(_VALUE_TEXT)
    return line


@st.composite
def near_sip(draw: st.DrawFn) -> bytes:
    """A request or response as a peer may send it, then maybe mutated at the byte level."""
    if draw(st.integers(0, 4)) == 0:
        start = f"SIP/2.0 {draw(st.integers(100, 699))} {draw(_VALUE_TEXT)}"
    else:
        method = draw(st.sampled_from(_METHODS) | st.text(string.ascii_letters, min_size=1))
        uri = draw(st.sampled_from(["sip:6000@127.0.0.1:5060", "sip:+4479@h", "x"]))
        start = f"{draw(_case(method))} {uri} SIP/2.0"
    required = [f"{n}: {_VALUES[n.lower()][0]}" for n in ("Via", "From", "To", "Call-ID")]
    required.append("CSeq: 1 INVITE")
    lines = draw(st.lists(st.sampled_from(required), max_size=5, unique=True))
    lines += draw(st.lists(header_lines(), max_size=8))
    lines = draw(st.permutations(lines))
    eol = draw(st.sampled_from(["\r\n", "\n", "\r"]))
    end = draw(st.sampled_from([eol + eol, eol, ""]))
    body = draw(st.binary(max_size=30))
    data = (eol.join([start, *lines]) + end).encode("utf-8") + body
    for _ in range(draw(st.integers(0, 3))):  # byte-level damage: cut, insert, replace
        at = draw(st.integers(0, len(data)))
        kind = draw(st.integers(0, 2))
        if kind == 0:
            data = data[:at] + data[at + 1 :]
        else:
            byte = draw(st.binary(min_size=1, max_size=1))
            data = data[:at] + byte + data[at + kind - 1 :]
    return data


WIRE = st.binary(max_size=300) | near_sip()


def _parsed(data: bytes) -> message.SipMessage | None:
    try:
        return message.parse(data)
    except message.SipParseError as exc:
        assert exc.status == SipStatus.BAD_REQUEST
        return None


# -- the parser and the front ---------------------------------------------------------------


@given(WIRE)
def test_parse_returns_a_message_or_raises_its_parse_error(data: bytes) -> None:
    msg = _parsed(data)
    if msg is not None:
        assert msg.is_request == bool(msg.method)
        assert msg.is_request or 100 <= msg.status <= 699
        for name, _ in msg.headers:  # every lookup works, by any spelling
            assert msg.get(name) is not None
            msg.get_all(name.upper())


@given(WIRE)
def test_content_length_framing_never_raises(data: bytes) -> None:
    head = data.partition(b"\r\n\r\n")[0]
    length = message.content_length(head)
    assert length is None or length >= 0


@given(WIRE)
def test_transaction_key_never_raises(data: bytes) -> None:
    msg = _parsed(data)
    if msg is not None:
        key = transaction.key_of(msg)
        if key is not None:
            transaction.invite_key(key)


def _pick(call_id: str) -> HostPort | int:
    return HostPort("127.0.0.1", 5061) if len(call_id) % 2 else SipStatus.BUSY_HERE


@given(st.lists(WIRE, min_size=1, max_size=4), st.booleans())
def test_the_front_answers_any_datagram_with_a_response_or_nothing(
    datagrams: list[bytes], tcp: bool
) -> None:
    clock = FakeClock()
    answered = transaction.AnsweredRequests(clock)
    others = transaction.AnsweredRequests(clock, keep_s=transaction.TIMER_J_S)
    for data in datagrams + datagrams[:1]:  # the first again: a retransmission
        reply = front._answer(data, _pick, answered, tcp=tcp, others=others)
        if reply is None:
            continue
        request = message.parse(data)  # only a parseable request gets an answer
        response = message.parse(reply)  # the answer parses as SIP again
        assert not response.is_request and 100 <= response.status <= 699
        assert response.get_all("Via") == request.get_all("Via")
        for name in ("Call-ID", "CSeq", "From"):
            assert (response.get(name) or "") == (request.get(name) or "")  # "" when absent


@given(WIRE, st.sampled_from([None, 486, 503, 481, 200, 404]))
def test_respond_gives_a_sip_status_for_any_request(data: bytes, target: int | None) -> None:
    msg = _parsed(data)
    if msg is None:
        # Nothing to answer. Not assume(): most random bytes do not parse, and the deep
        # profile's random search then failed the filter_too_much health check.
        return
    reply = front.respond(msg, target, tcp=False)
    if reply is not None:
        assert 100 <= message.parse(reply).status <= 999


@given(st.text(max_size=20))
def test_status_for_any_method_is_a_final_sip_status(method: str) -> None:
    assert 200 <= front.status_for(method) <= 699


@given(st.integers(0, 999), st.booleans(), st.booleans(), st.booleans())
def test_transfer_verdict_for_any_status(status: int, final: bool, acc: bool, pbx: bool) -> None:
    assert refer.verdict(status, final=final, accepted=acc, behind_pbx=pbx) in set(
        refer.TransferVerdict
    )


# -- the flash-call agent: responses to its INVITE ------------------------------------------


@st.composite
def responses_to(draw: st.DrawFn, invite: message.SipMessage) -> bytes:
    status = draw(st.sampled_from([100, 180, 183, 200, 401, 407, 486, 487]) | st.integers(100, 699))
    cseq = draw(
        st.sampled_from(["1 INVITE", "2 INVITE", "1 CANCEL", "2 BYE"])
        | st.builds(
            lambda n, m: f"{n} {m}", st.text("0123456789²", max_size=30) | _LONG_NUMBER, _VALUE_TEXT
        )
    )
    lines = [
        f"SIP/2.0 {status} X",
        f"Via: {invite.get('Via')}",
        f"From: {invite.get('From')}",
        f"To: {invite.get('To')};tag={draw(_VALUE_TEXT)}",
        f"Call-ID: {invite.get('Call-ID')}",
        f"CSeq: {cseq}",
    ]
    for name in draw(st.lists(st.sampled_from(["Contact", "Record-Route", "WWW-Authenticate"]))):
        value = draw(
            st.sampled_from(['Digest realm="r", nonce="n", qop="auth"', "<sip:a@b;lr>"])
            | _VALUE_TEXT
        )
        lines.append(f"{name}: {value}")
    if status == 407:
        lines.append(f"Proxy-Authenticate: Digest {draw(_VALUE_TEXT)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@given(st.data())
def test_the_flash_dialog_takes_any_response(data: st.DataObject) -> None:
    counter = itertools.count()
    spec = protocol.PlaceCall("f1", "sip:+447700900123@127.0.0.1:5080", "+4474", True, 3, 30, True)
    dialog = FlashDialog(
        spec,
        Local("127.0.0.1", 5999, "trunk", "secret"),
        token=lambda: f"{next(counter):016x}",
        wall=lambda: 1.8e9,
    )
    invite = message.parse(dialog.start(0.0).send[0])
    now = 0.0
    for _ in range(data.draw(st.integers(1, 4))):
        msg = _parsed(data.draw(responses_to(invite)))
        if msg is not None:
            now += 0.1
            for sent in dialog.on_response(msg, now).send:
                message.parse(sent)


# -- SDP and digest -------------------------------------------------------------------------

_NUMBERISH = st.text("0123456789/²٣", min_size=1, max_size=8) | _LONG_NUMBER
_SDP_LINE = (
    st.sampled_from(
        [
            "v=0",
            "m=audio 4000 RTP/AVP 0 8 96",
            "m=audio 0 RTP/AVP 0",
            "m=video 4002 RTP/AVP 31",
            "a=rtpmap:96 opus/48000/2",
            "a=rtpmap:8 PCMA/8000",
            "c=IN IP4 1.2.3.4",
        ]
    )
    | st.builds("m=audio {} RTP/AVP {}".format, _NUMBERISH, st.text(string.printable, max_size=12))
    | st.builds(
        "a=rtpmap:{} {}/{}".format,
        st.sampled_from(["0", "8", "96", ""]),
        st.sampled_from(["PCMU", "pcma", "opus", ""]),
        _NUMBERISH,
    )
    | st.text(string.printable + "²٣", max_size=30)
)


@given(st.lists(_SDP_LINE, max_size=8), st.sampled_from(["\r\n", "\n"]))
def test_sdp_judges_any_offer(lines: list[str], eol: str) -> None:
    offer = eol.join(lines)
    for stream in sdp.audio_streams(offer):
        assert stream.port >= 0
    assert sdp.has_common_audio_codec(offer, ("PCMU/8000", "PCMA/8000")) in (True, False, None)


@given(st.text(max_size=200) | st.builds("Digest {}".format, st.text(max_size=120)))
def test_digest_challenge_answers_or_raises_its_error(value: str) -> None:
    try:
        challenge = digest.parse_challenge(value)
        answer = digest.authorization(
            challenge, method="INVITE", uri="sip:a@b", user="u", password="p", cnonce="c"
        )
    except digest.DigestError:
        return
    assert answer.startswith("Digest ")


# -- the pool <-> worker lines --------------------------------------------------------------

_TEXT = st.text(st.characters(codec="utf-8"), max_size=20)
_FLOAT = st.floats(allow_nan=False, allow_infinity=False)
_ANY_FLOAT = st.floats()
_HEADERS = st.lists(st.tuples(_TEXT, _TEXT), max_size=3).map(tuple)
_MESSAGES: st.SearchStrategy[protocol.Message] = st.one_of(
    st.builds(protocol.PlaceCall, headers=_HEADERS, ring_s=_FLOAT, answer_timeout_s=_FLOAT),
    st.builds(protocol.Transfer, headers=_HEADERS),
    st.builds(protocol.IncomingCall, headers=_HEADERS),
    st.builds(protocol.CallEvent, at=_FLOAT),
    *(
        st.builds(cls)
        for cls in (
            protocol.Answer,
            protocol.Play,
            protocol.StopPlay,
            protocol.StartListen,
            protocol.Hangup,
            protocol.SendMessage,
            protocol.Shutdown,
            protocol.PlaceFailed,
            protocol.Digit,
            protocol.PlayDone,
            protocol.Hold,
            protocol.TransferStatus,
            protocol.AudioChunk,
            protocol.MessageResult,
            protocol.WorkerStatus,
            protocol.Registered,
        )
    ),
)


def _fits_json(msg: protocol.Message) -> bool:
    # orjson writes integers of 64 bits: no count, port or status of ours comes near it.
    return all(
        -(2**63) <= v < 2**64
        for v in (getattr(msg, f.name) for f in dataclasses.fields(msg))
        if isinstance(v, int)
    )


@given(_MESSAGES.filter(_fits_json))
def test_a_message_survives_the_line(msg: protocol.Message) -> None:
    assert protocol.decode(protocol.encode(msg)) == msg


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | _ANY_FLOAT | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=8,
)


@st.composite
def near_lines(draw: st.DrawFn) -> bytes:
    """A message's line with one member replaced or dropped, or any bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=60))
    raw = json.loads(protocol.encode(draw(_MESSAGES.filter(_fits_json))))
    name = draw(st.sampled_from(sorted(raw)))
    if draw(st.booleans()):
        del raw[name]
    else:
        raw[name] = draw(_JSON)
    # json, not orjson: it also writes what orjson would refuse (NaN, integers past 64 bits).
    return json.dumps(raw).encode()


@given(near_lines())
def test_decode_returns_a_message_or_raises_protocol_error(line: bytes) -> None:
    with contextlib.suppress(protocol.ProtocolError):
        protocol.decode(line)
