"""SIP message parsing and the redirect front's answers (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sip_config.settings import HostPort
from voice.sip import front as front_module
from voice.sip import message
from voice.sip.front import respond

DATA = Path(__file__).resolve().parents[1] / "data" / "sip"


def request(method: str, uri: str = "sip:6000@127.0.0.1:5060") -> message.SipMessage:
    raw = (
        f"{method} {uri} SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-1\r\n"
        "Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-0\r\n"
        'From: "Ann" <sip:+447700900123@127.0.0.1>;tag=abc\r\n'
        "To: <sip:6000@127.0.0.1:5060>\r\n"
        "Call-ID: call-1\r\n"
        f"CSeq: 7 {method}\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    return message.parse(raw.encode())


def test_parse_golden_invite_with_compact_headers() -> None:
    msg = message.parse((DATA / "invite_compact.txt").read_bytes())
    assert msg.method == "INVITE" and msg.uri == "sip:6000@127.0.0.1:5060"
    assert msg.get_all("via") == [
        "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-1",
        "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-0",
    ]
    assert message.user_part(msg.get("From") or "") == "+447700900123"
    assert msg.get("Call-ID") == "call-1@127.0.0.1"
    assert msg.get("subject") == "folded line"
    assert msg.get("X-Clinic-Test") == "yes"
    assert msg.body == b"v=0\n"


def test_parse_response() -> None:
    msg = message.parse(b"SIP/2.0 486 Busy Here\r\nCall-ID: x\r\n\r\n")
    assert not msg.is_request and msg.status == 486 and msg.reason == "Busy Here"


@pytest.mark.parametrize(
    "raw", [b"hello\r\n\r\n", b"INVITE sip:x SIP/2.0\r\nbad\r\n\r\n", b"\xff\xfe"]
)
def test_parse_rejects_garbage(raw: bytes) -> None:
    with pytest.raises(message.SipParseError) as err:
        message.parse(raw)
    assert err.value.status == 400


def test_invite_is_redirected_to_the_worker() -> None:
    out = respond(request("INVITE"), HostPort("127.0.0.1", 5062), tcp=False)
    assert out is not None
    resp = message.parse(out)
    assert resp.status == 302
    assert resp.get("Contact") == "<sip:6000@127.0.0.1:5062>"
    assert len(resp.get_all("Via")) == 2, "every Via is copied back (section 8.2.6.2)"
    assert resp.get("Call-ID") == "call-1" and resp.get("CSeq") == "7 INVITE"
    assert ";tag=" in (resp.get("To") or "")


def test_invite_over_tcp_keeps_tcp() -> None:
    out = respond(request("INVITE"), HostPort("127.0.0.1", 5062), tcp=True)
    assert out is not None
    assert message.parse(out).get("Contact") == "<sip:6000@127.0.0.1:5062;transport=tcp>"


@pytest.mark.parametrize("status", [486, 503], ids=["all workers full", "stopping"])
def test_a_refused_invite_gets_the_status_the_pool_gave(status: int) -> None:
    out = respond(request("INVITE"), status, tcp=False)
    assert out is not None
    answer = message.parse(out)
    assert answer.status == status and answer.get("Contact") is None


@pytest.mark.parametrize(
    ("method", "status"),
    [("OPTIONS", 200), ("CANCEL", 200), ("BYE", 481), ("REGISTER", 405), ("MESSAGE", 405),
     ("FOO", 501)],
)  # fmt: skip
def test_other_methods(method: str, status: int) -> None:
    out = respond(request(method), HostPort("127.0.0.1", 5062), tcp=False)
    assert out is not None and message.parse(out).status == status


def test_ack_and_responses_get_nothing() -> None:
    assert respond(request("ACK"), None, tcp=False) is None
    resp = message.parse(b"SIP/2.0 200 OK\r\nCall-ID: x\r\n\r\n")
    assert respond(resp, None, tcp=False) is None


def test_content_length_framing() -> None:
    assert message.content_length(b"INVITE x SIP/2.0\r\nl: 12\r\n\r\n") == 12
    assert message.content_length(b"INVITE x SIP/2.0\r\nContent-Length:  0\r\n\r\n") == 0
    assert message.content_length(b"INVITE x SIP/2.0\r\n\r\n") is None


@pytest.mark.parametrize("header", ["From", "To", "Call-ID", "CSeq"])
def test_an_invite_without_a_required_header_is_400(header: str) -> None:
    lines = [
        line
        for line in (
            "INVITE sip:6000@127.0.0.1 SIP/2.0",
            "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-1",
            "From: <sip:a@127.0.0.1>;tag=1",
            "To: <sip:6000@127.0.0.1>",
            "Call-ID: c-1",
            "CSeq: 1 INVITE",
            "Content-Length: 0",
        )
        if not line.startswith(f"{header}:")
    ]
    req = message.parse(("\r\n".join(lines) + "\r\n\r\n").encode())
    out = respond(req, HostPort("127.0.0.1", 5062), tcp=False)
    assert out is not None and out.startswith(f"SIP/2.0 400 Missing {header}\r\n".encode())


def test_a_request_without_via_gets_nothing() -> None:
    raw = b"INVITE sip:6000@127.0.0.1 SIP/2.0\r\nFrom: <sip:a@x>;tag=1\r\nTo: <sip:b@x>\r\n"
    raw += b"Call-ID: c\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    assert respond(message.parse(raw), HostPort("127.0.0.1", 5062), tcp=False) is None


def test_an_incomplete_invite_reserves_no_slot() -> None:
    picked: list[str] = []

    def pick(call_id: str) -> HostPort:
        picked.append(call_id)
        return HostPort("127.0.0.1", 5062)

    raw = (
        "INVITE sip:6000@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-1\r\n"
    )
    raw += "To: <sip:6000@127.0.0.1>\r\nCall-ID: c-1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    out = front_module._answer(raw.encode(), pick, tcp=False)
    assert out is not None and out.startswith(b"SIP/2.0 400 Missing From\r\n")
    assert picked == []
    whole = raw.replace("To:", "From: <sip:a@127.0.0.1>;tag=1\r\nTo:")
    out = front_module._answer(whole.encode(), pick, tcp=False)
    assert out is not None and out.startswith(b"SIP/2.0 302 ") and picked == ["c-1"]
