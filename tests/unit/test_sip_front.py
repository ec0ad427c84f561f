"""SIP message parsing and the redirect front's answers (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sip_config.clock import FakeClock
from sip_config.settings import HostPort
from voice.sip import front as front_module
from voice.sip import message, transaction
from voice.sip.front import respond
from voice.sip.outcome import SipStatus

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


@pytest.mark.parametrize(
    "raw",
    [
        # A BYE to a flash call's Contact (the caller-ID: prefix and code) in a SIP it
        # cannot read, and an INVITE with a header line of a number and no colon.
        b"BYE sip:+447400583920@127.0.0.1:5071 SIP/2.1\r\nCall-ID: x\r\n\r\n",
        b"INVITE sip:6000@h SIP/2.0\r\nP-Caller +447400583920\r\n\r\n",
    ],
)
def test_a_parse_error_never_quotes_the_message(raw: bytes) -> None:
    # The front, the flash-call agent and the worker log it: a number or a code in it
    # would reach the log.
    with pytest.raises(message.SipParseError) as err:
        message.parse(raw)
    assert "583920" not in str(err.value) and "447400" not in str(err.value), err.value


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
    [("OPTIONS", 200), ("CANCEL", 481), ("BYE", 481), ("REGISTER", 405), ("MESSAGE", 405),
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
    answered = transaction.AnsweredRequests(FakeClock())
    others = transaction.AnsweredRequests(FakeClock())
    out = front_module._answer(raw.encode(), pick, answered, tcp=False, others=others)
    assert out is not None and out.startswith(b"SIP/2.0 400 Missing From\r\n")
    assert picked == []
    whole = raw.replace("To:", "From: <sip:a@127.0.0.1>;tag=1\r\nTo:")
    out = front_module._answer(whole.encode(), pick, answered, tcp=False, others=others)
    assert out is not None and out.startswith(b"SIP/2.0 302 ") and picked == ["c-1"]


def invite(branch: str = "z9hG4bK-1", cseq: int = 1, method: str = "INVITE") -> bytes:
    return (
        f"{method} sip:6000@127.0.0.1:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5070;branch={branch};rport\r\n"
        "From: <sip:+447700900123@127.0.0.1>;tag=abc\r\nTo: <sip:6000@127.0.0.1:5060>\r\n"
        f"Call-ID: call-1\r\nCSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n"
    ).encode()


class Picks:
    """A pool's pick_inbound that answers from a list and records each call."""

    def __init__(self, *answers: HostPort | int) -> None:
        self.answers = list(answers)
        self.calls: list[str] = []

    def __call__(self, call_id: str) -> HostPort | int:
        self.calls.append(call_id)
        return self.answers.pop(0)


@pytest.mark.parametrize(
    ("first", "then"),
    [(SipStatus.BUSY_HERE, HostPort("127.0.0.1", 5062)), (HostPort("127.0.0.1", 5062), 486)],
    ids=["486, then a slot freed", "302, then every slot taken"],
)
def test_a_retransmitted_invite_gets_the_same_answer_without_a_second_pick(
    first: HostPort | int, then: HostPort | int
) -> None:
    """RFC 3261 17.2.1: a lost 486 or 302 makes the UAC send the same INVITE again. It gets
    the same response, To tag included (section 8.2.7), and the pool is not asked again:
    a 486 was counted twice (clinic_calls_total), and a slot freed meanwhile turned a
    refused transaction into a redirected one."""
    clock = FakeClock()
    answered = transaction.AnsweredRequests(clock)
    others = transaction.AnsweredRequests(clock)
    pick = Picks(first, then)
    out = front_module._answer(invite(), pick, answered, tcp=False, others=others)
    assert out is not None
    for delay in (0.5, 1, 2, 4, 8, 16):  # Timer A doubling: 31.5 s in all, under Timer H
        clock.advance(delay)
        assert front_module._answer(invite(), pick, answered, tcp=False, others=others) == out
    assert pick.calls == ["call-1"]
    # The ACK of that answer is absorbed (no response, no pick), the answer kept.
    assert (
        front_module._answer(invite(method="ACK"), pick, answered, tcp=False, others=others) is None
    )
    assert front_module._answer(invite(), pick, answered, tcp=False, others=others) == out
    assert pick.calls == ["call-1"]


def test_an_answer_is_forgotten_after_timer_h_and_a_new_transaction_is_picked_anew() -> None:
    clock = FakeClock()
    answered = transaction.AnsweredRequests(clock)
    others = transaction.AnsweredRequests(clock)
    pick = Picks(486, 486, 486, HostPort("127.0.0.1", 5062))
    out = front_module._answer(invite(), pick, answered, tcp=False, others=others)
    # Another transaction of the same call (a new CSeq and branch) is a new request.
    assert (
        front_module._answer(invite("z9hG4bK-2", 2), pick, answered, tcp=False, others=others)
        != out
    )
    # So is the same branch from another sent-by (section 17.2.3).
    other = invite().replace(b"127.0.0.1:5070", b"127.0.0.2:5070")
    assert front_module._answer(other, pick, answered, tcp=False, others=others) is not None
    assert len(pick.calls) == 3
    clock.advance(transaction.TIMER_H_S)
    late = front_module._answer(invite(), pick, answered, tcp=False, others=others)
    assert late is not None and late.startswith(b"SIP/2.0 302 "), "past Timer H: picked anew"
    assert len(pick.calls) == 4
    assert len(answered) == 1, "the expired answers are dropped"


def test_the_memory_of_answers_is_bounded() -> None:
    clock = FakeClock()
    answered = transaction.AnsweredRequests(clock, limit=3)
    keys = [transaction.TransactionKey(f"z9hG4bK-{i} h:1", "c", "1") for i in range(4)]
    for key in keys:
        answered.remember(key, transaction.FinalAnswer(486, "t"))
        clock.advance(1)
    assert len(answered) == 3
    assert answered.get(keys[0]) is None, "the oldest went first"
    assert answered.get(keys[3]) == transaction.FinalAnswer(486, "t")


V = "Via: SIP/2.0/UDP "


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        (V + "10.0.0.1:5060;branch=z9hG4bK-x", "v: SIP/2.0/UDP 10.0.0.1:5060 ;branch=z9hG4bK-x;a",
         True),
        (V + "Host.Example:5060;branch=z9hG4bK-x", V + "host.example:5060;branch=z9hG4bK-x", True),
        (V + "a:1;branch=z9hG4bK-x, SIP/2.0/UDP b:2;branch=z9hG4bK-y", V + "a:1;branch=z9hG4bK-x",
         True),
        (V + "a:1;branch=z9hG4bK-x", V + "a:1;branch=z9hG4bK-X", False),
        (V + "a:1;branch=old-1", V + "a:1;branch=old-1", True),
        (V + "a:1", V + "a:2", False),
    ],
    ids=["compact, params", "host case", "top Via only", "branch case", "RFC 2543", "2543 port"],
)  # fmt: skip
def test_transaction_keys(a: str, b: str, same: bool) -> None:
    def key(via: str) -> transaction.TransactionKey | None:
        raw = f"INVITE sip:6000@x SIP/2.0\r\n{via}\r\nFrom: <sip:a@x>;tag=1\r\n"
        raw += "To: <sip:6000@x>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n\r\n"
        return transaction.key_of(message.parse(raw.encode()))

    assert key(a) is not None
    assert (key(a) == key(b)) is same


def _other(method: str, branch: str = "z9hG4bK-1", cseq: int = 1, call_id: str = "call-1") -> bytes:
    return invite(branch, cseq, method).replace(b"call-1", call_id.encode())


def _to_tag(out: bytes | None) -> str:
    assert out is not None
    return (message.parse(out).get("To") or "").rpartition(";tag=")[2]


def test_a_cancel_matching_no_invite_gets_481() -> None:
    """RFC 3261 9.2 / 16.10: no INVITE transaction matches (not the same top Via branch and
    sent-by, Call-ID and CSeq number as an INVITE answered here): 481, where the front
    answered 200 to any CANCEL."""
    clock = FakeClock()
    answered = transaction.AnsweredRequests(clock)
    others = transaction.AnsweredRequests(clock)
    pick = Picks(HostPort("127.0.0.1", 5062))
    moved = front_module._answer(invite(), pick, answered, tcp=False, others=others)
    for stray in (
        _other("CANCEL", branch="z9hG4bK-9"),  # another branch
        _other("CANCEL", cseq=2),  # another CSeq number
        _other("CANCEL", call_id="call-2"),  # another call
        _other("CANCEL").replace(b"127.0.0.1:5070", b"127.0.0.2:5070"),  # another sent-by
    ):
        out = front_module._answer(stray, pick, answered, tcp=False, others=others)
        assert out is not None and out.startswith(b"SIP/2.0 481 Call/Transaction Does Not Exist")
    out = front_module._answer(_other("CANCEL"), pick, answered, tcp=False, others=others)
    assert out is not None and out.startswith(b"SIP/2.0 200 OK\r\n"), out
    assert message.parse(out).get("CSeq") == "1 CANCEL"
    assert _to_tag(out) == _to_tag(moved), "the To tag of the INVITE's answer (9.2)"
    assert pick.calls == ["call-1"], "a CANCEL picks no worker"
    clock.advance(transaction.TIMER_H_S)  # the INVITE forgotten: so is the CANCEL's answer
    late = front_module._answer(_other("CANCEL", cseq=1), pick, answered, tcp=False, others=others)
    assert late is not None and late.startswith(b"SIP/2.0 481 "), late


@pytest.mark.parametrize(
    "final",
    [HostPort("127.0.0.1", 5062), SipStatus.BUSY_HERE, SipStatus.SERVICE_UNAVAILABLE],
    ids=["302", "486", "503"],
)
def test_a_cancel_after_any_final_answer_gets_200_and_leaves_the_invite_alone(
    final: HostPort | int,
) -> None:
    """RFC 3261 9.2: a CANCEL that matches an INVITE transaction which sent its final
    response already (a 302, or a 486 or 503 refusing the call) gets 200, with the To tag
    of that response, and has no effect on the INVITE: a late copy of the INVITE gets its
    answer again, and no worker is picked (nor a caller counted) for either."""
    clock = FakeClock()
    answered = transaction.AnsweredRequests(clock)
    others = transaction.AnsweredRequests(clock, keep_s=transaction.TIMER_J_S)
    pick = Picks(final)
    first = front_module._answer(invite(), pick, answered, tcp=False, others=others)
    cancel = front_module._answer(_other("CANCEL"), pick, answered, tcp=False, others=others)
    assert cancel is not None and cancel.startswith(b"SIP/2.0 200 OK\r\n"), cancel
    assert message.parse(cancel).get("CSeq") == "1 CANCEL"
    assert _to_tag(cancel) == _to_tag(first)
    again = front_module._answer(invite(), pick, answered, tcp=False, others=others)
    assert again == first, "the INVITE keeps its answer"
    assert pick.calls == ["call-1"]


@pytest.mark.parametrize("method", ["OPTIONS", "CANCEL", "BYE", "REGISTER", "FOO"])
def test_a_retransmitted_request_gets_the_same_response(method: str) -> None:
    """RFC 3261 8.2.7 and 17.2.2: a retransmission gets the response the request got, To
    tag included, where each copy got a fresh tag. A new transaction gets a new one."""
    clock = FakeClock()
    answered = transaction.AnsweredRequests(clock)
    others = transaction.AnsweredRequests(clock, keep_s=transaction.TIMER_J_S, limit=4)
    first = front_module._answer(_other(method), Picks(), answered, tcp=False, others=others)
    for delay in (0.5, 1, 2, 4, 4, 4, 4, 4, 4):  # Timer E: 31.5 s in all, under Timer J
        clock.advance(delay)
        again = front_module._answer(_other(method), Picks(), answered, tcp=False, others=others)
        assert again == first
    new = front_module._answer(_other(method, cseq=2), Picks(), answered, tcp=False, others=others)
    assert _to_tag(new) != _to_tag(first)
    for n in range(3, 7):  # the memory is bounded: the oldest answer goes first
        front_module._answer(_other(method, cseq=n), Picks(), answered, tcp=False, others=others)
    assert len(others) == 4 and len(answered) == 0, "non-INVITE answers in a memory of their own"
    forgotten = front_module._answer(_other(method), Picks(), answered, tcp=False, others=others)
    assert _to_tag(forgotten) != _to_tag(first)


def _without(header: str, raw: bytes) -> bytes:
    return b"\r\n".join(ln for ln in raw.split(b"\r\n") if not ln.startswith(f"{header}:".encode()))


@pytest.mark.parametrize("header", ["Call-ID", "CSeq", "From", "To"])
def test_a_retransmitted_incomplete_invite_gets_the_same_400(header: str) -> None:
    """RFC 3261 8.1.1 and 17.2.1: an INVITE lacking a header every request needs gets 400,
    and each retransmission that 400 again, To tag included (each copy got a fresh tag).
    The transaction is told by the top Via branch and sent-by (17.2.3) and what else the
    request has; the answer goes to the bounded non-INVITE memory, not the INVITEs'."""
    clock = FakeClock()
    answered = transaction.AnsweredRequests(clock)
    others = transaction.AnsweredRequests(clock, keep_s=transaction.TIMER_J_S, limit=4)
    pick = Picks()
    broken = _without(header, invite())

    def answer(raw: bytes) -> bytes | None:
        return front_module._answer(raw, pick, answered, tcp=False, others=others)

    first = answer(broken)
    assert first is not None and first.startswith(f"SIP/2.0 400 Missing {header}\r\n".encode())
    for delay in (0.5, 1, 2, 4, 8, 16):  # Timer A doubling: 31.5 s, under Timer H
        clock.advance(delay)
        assert answer(broken) == first
    assert answer(_without(header, invite(method="ACK"))) is None, "its ACK is absorbed"
    assert answer(broken) == first
    other = broken.replace(b"z9hG4bK-1", b"z9hG4bK-2")
    assert _to_tag(answer(other)) != _to_tag(first), "another branch: another transaction"
    elsewhere = broken.replace(b"127.0.0.1:5070", b"127.0.0.2:5070")
    assert _to_tag(answer(elsewhere)) != _to_tag(first), "another sent-by: another one"
    assert pick.calls == [] and len(answered) == 0, "no slot, and the INVITE memory untouched"
    for n in range(3, 7):  # bounded: the oldest answer goes first
        answer(broken.replace(b"z9hG4bK-1", f"z9hG4bK-{n}".encode()))
    assert len(others) == 4
    assert _to_tag(answer(broken)) != _to_tag(first), "pushed out: answered anew"


def test_an_incomplete_invite_does_not_share_a_complete_ones_transaction() -> None:
    """A broken copy of an INVITE answered 302 (the same branch, Call-ID and CSeq, no From)
    gets 400, not the 302; the complete one's retransmission still gets its 302."""
    clock = FakeClock()
    answered = transaction.AnsweredRequests(clock)
    others = transaction.AnsweredRequests(clock, keep_s=transaction.TIMER_J_S)
    pick = Picks(HostPort("127.0.0.1", 5062))

    def answer(raw: bytes) -> bytes | None:
        return front_module._answer(raw, pick, answered, tcp=False, others=others)

    moved = answer(invite())
    assert moved is not None and moved.startswith(b"SIP/2.0 302 ")
    broken = answer(_without("From", invite()))
    assert broken is not None and broken.startswith(b"SIP/2.0 400 Missing From\r\n")
    assert answer(invite()) == moved
    assert pick.calls == ["call-1"]


def test_a_via_without_sent_by_is_answered_not_an_index_error() -> None:
    # Found by tests/unit/test_prop_sip.py: "Via: ;branch=z9hG4bK" raised IndexError in
    # transaction.key_of, out of the front's datagram handler (a response was enough).
    raw = b"INVITE sip:6000@h SIP/2.0\r\nVia: ;branch=z9hG4bK1\r\nFrom: <sip:a@x>;tag=1\r\n"
    raw += b"To: <sip:b@x>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n\r\n"
    key = transaction.key_of(message.parse(raw))
    assert key is not None and key.via == "z9hG4bK1 "
    clock = FakeClock()
    answered = transaction.AnsweredRequests(clock)
    others = transaction.AnsweredRequests(clock)
    out = front_module._answer(raw, lambda _: 486, answered, tcp=False, others=others)
    assert out is not None and out.startswith(b"SIP/2.0 486 ")
    response = b"SIP/2.0 100\nVia:;branch=z9hG4bK\ni:c\nCSeq:1\n\n"
    assert front_module._answer(response, lambda _: 486, answered, tcp=False, others=others) is None


def test_a_content_length_of_thousands_of_digits_is_huge_not_a_value_error() -> None:
    # int() refuses over 4,300 digits: a ValueError out of the TCP reader.
    head = b"INVITE x SIP/2.0\r\nContent-Length: " + b"7" * 5000 + b"\r\n\r\n"
    assert message.content_length(head) == 10**18
    assert message.content_length(b"l: " + b"0" * 5000 + b"12\r\n") == 12


def test_a_header_folded_onto_a_blank_line_is_empty() -> None:
    # "v:\n " read as Via " ": present, but "" once re-serialised in the response.
    msg = message.parse(b"OPTIONS sip:h SIP/2.0\nv:\n \nTo: a\n\t b\n\n")
    assert msg.get("Via") == "" and msg.get("To") == "a b"


@pytest.mark.parametrize("bad", [b"\r", b"\x00", b"\x1b", b"\x7f"])
def test_a_control_character_in_a_header_is_dropped_not_copied_into_the_answer(
    bad: bytes,
) -> None:
    # RFC 3261 25.1 allows no bare control character but HTAB in the head. A lone CR in a
    # From was copied into the 486's From: a line break for a peer that ends lines at a CR.
    raw = invite().replace(b"From: ", b"From: x" + bad + b"Evil: 1 ")
    with pytest.raises(message.SipParseError):
        message.parse(raw, strict=True)
    # Not strict (the worker reading what pjsip accepted): an escaped one in a display name
    # is allowed, and the caller's Call-ID must not be lost over it.
    assert message.parse(raw).get("Call-ID") == "call-1"
    clock = FakeClock()
    answered = transaction.AnsweredRequests(clock)
    others = transaction.AnsweredRequests(clock)
    assert front_module._answer(raw, Picks(), answered, tcp=False, others=others) is None
    tab = invite().replace(b"From: ", b"From:\t")
    assert message.parse(tab, strict=True).get("From"), "HTAB is whitespace, not a control"


def test_a_head_that_is_not_utf8_is_refused_by_the_front_and_read_by_the_worker() -> None:
    # A display name in Latin-1 (an older PBX's "M\xfcller"): RFC 3261 7.3 asks for UTF-8,
    # so the front answers 400; the worker reads what pjsip accepted, the caller's number
    # and Call-ID, the byte that is not UTF-8 as U+FFFD.
    raw = invite().replace(b"From: ", b'From: "M\xfcller" ')
    with pytest.raises(message.SipParseError) as err:
        message.parse(raw, strict=True)
    assert err.value.status == 400
    read = message.parse(raw)
    assert read.get("Call-ID") == "call-1"
    assert "M\ufffdller" in (read.get("From") or "")
    assert message.user_part(read.get("From") or "") == message.user_part(
        message.parse(invite()).get("From") or ""
    )


@pytest.mark.parametrize(
    ("to", "answered"),
    [
        ("<sip:6000@h>;TAG=x", "<sip:6000@h>;TAG=x"),
        ("<sip:6000@h> ; tag=x", "<sip:6000@h> ; tag=x"),
        ("sip:6000@h;tag=x", "sip:6000@h;tag=x"),
        ("<sip:6000@h;tag=u>", "<sip:6000@h;tag=u>;tag=NEW"),
        ('"a;tag=b" <sip:6000@h>', '"a;tag=b" <sip:6000@h>;tag=NEW'),
    ],
    ids=["upper case", "spaces", "addr-spec", "URI parameter", "display name"],
)
def test_the_to_tag_is_the_headers_own_parameter(to: str, answered: str) -> None:
    # Found by tests/unit/test_prop_front.py: the front looked for ";tag=" anywhere in the To.
    # ";TAG=x" or " ; tag=x" is a tag (7.3.1, 25.1) and got a second one; a tag inside the <>
    # is a URI parameter (20.10) and the response went out with no To tag (8.2.6.2).
    raw = invite().replace(b"To: <sip:6000@127.0.0.1:5060>", f"To: {to}".encode())
    out = message.serialise_response(message.parse(raw), 486, to_tag="NEW")
    assert message.parse(out).get("To") == answered


def test_a_retransmitted_503_keeps_its_retry_after() -> None:
    """RFC 3261 17.2.1: a copy of the INVITE gets the very 503 the first one got. Its
    Retry-After was read anew for each copy: a 503 while a worker restarted ("5") became,
    once the stop began, "51" to the same transaction."""
    clock = FakeClock()
    answered = transaction.AnsweredRequests(clock)
    others = transaction.AnsweredRequests(clock)
    pick = Picks(SipStatus.SERVICE_UNAVAILABLE)
    retry = iter((5, 51, 51))
    out = front_module._answer(
        invite(), pick, answered, tcp=False, others=others, retry_after=lambda: next(retry)
    )
    assert out is not None and b"\r\nRetry-After: 5\r\n" in out, out
    clock.advance(0.5)
    again = front_module._answer(
        invite(), pick, answered, tcp=False, others=others, retry_after=lambda: next(retry)
    )
    assert again == out
    assert pick.calls == ["call-1"]
