"""The flash call's SIP state machine, fed by hand: no sockets, time passed in."""

from __future__ import annotations

import hashlib
import itertools
import re

import pytest

from voice.sip import message
from voice.sip.flash_dialog import (
    MAX_FORKS,
    T1_S,
    TIMER_B_S,
    FlashDialog,
    LateAnswers,
    Local,
    Phase,
    Step,
    target_host_port,
)
from voice.sip.outcome import CallOutcome
from voice.sip.protocol import CallState, PlaceCall

TARGET = "sip:+14155556001@127.0.0.1:5160"
CLI = "+447400123456"
RING_S = 2.0
ANSWER_S = 20.0


def make(
    *, user: str = "", password: str = "", answer_s: float = ANSWER_S, realm: str = ""
) -> tuple[FlashDialog, Step]:
    counter = itertools.count(1)
    dialog = FlashDialog(
        PlaceCall(
            call_id="flash-1",
            target_uri=TARGET,
            caller_id=CLI,
            ring_s=RING_S,
            answer_timeout_s=answer_s,
            flash=True,
            pai=True,
            headers=(("X-Verification", "v1"),),
        ),
        Local("127.0.0.1", 5999, user, password, realm),
        token=lambda: f"{next(counter):016x}",
        wall=lambda: 1_800_000_000.0,
    )
    return dialog, dialog.start(100.0)


def sent(step: Step) -> list[message.SipMessage]:
    return [message.parse(d) for d in step.send]


def reply(request: message.SipMessage, status: int, *extra: tuple[str, str]) -> message.SipMessage:
    raw = message.serialise_response(request, status, to_tag="far", extra=tuple(extra))
    return message.parse(raw)


def events(step: Step) -> list[tuple[CallState, int, CallOutcome | None]]:
    return [(e.state, e.sip_status, e.outcome) for e in step.events]


def ringing(dialog: FlashDialog, invite: message.SipMessage, at: float = 100.01) -> None:
    dialog.on_response(reply(invite, 100), at)
    step = dialog.on_response(reply(invite, 180), at)
    assert events(step) == [(CallState.RINGING, 180, None)]


def test_the_invite_carries_the_code_in_from_and_pai_and_no_sdp() -> None:
    dialog, step = make()
    (invite,) = sent(step)
    assert invite.method == "INVITE" and invite.uri == TARGET
    assert message.user_part(invite.get("From") or "") == CLI
    assert ";tag=" in (invite.get("From") or "")
    assert invite.get("P-Asserted-Identity") == f"<sip:{CLI}@127.0.0.1>"
    assert invite.get("To") == f"<{TARGET}>"
    assert invite.get("CSeq") == "1 INVITE"
    assert invite.get("X-Verification") == "v1"
    assert invite.get("Content-Length") == "0" and invite.body == b""
    assert invite.get("Content-Type") is None
    via = invite.get("Via") or ""
    assert via.startswith("SIP/2.0/UDP 127.0.0.1:5999;rport;branch=z9hG4bK"), via
    assert events(step) == [(CallState.TRYING, 0, None)]
    assert dialog.deadline == pytest.approx(100.0 + T1_S)


def test_rings_then_cancels_after_the_ring_time_and_acks_the_487() -> None:
    dialog, step = make()
    (invite,) = sent(step)
    ringing(dialog, invite)
    assert dialog.deadline == pytest.approx(100.01 + RING_S)
    assert dialog.on_timer(101.0).send == []  # not yet
    step = dialog.on_timer(100.01 + RING_S)
    (cancel,) = sent(step)
    assert cancel.method == "CANCEL" and cancel.uri == TARGET
    assert cancel.get("CSeq") == "1 CANCEL"
    assert cancel.get("Via") == invite.get("Via")  # the INVITE's branch (section 9.1)
    assert cancel.get("Call-ID") == invite.get("Call-ID")
    assert cancel.get("From") == invite.get("From") and cancel.get("To") == invite.get("To")
    assert step.events == []
    dialog.on_response(reply(cancel, 200), 102.02)
    step = dialog.on_response(reply(invite, 487), 102.03)
    (ack,) = sent(step)
    assert ack.method == "ACK" and ack.uri == TARGET and ack.get("CSeq") == "1 ACK"
    assert ack.get("Via") == invite.get("Via")  # a non-2xx ACK is in the INVITE transaction
    assert (ack.get("To") or "").endswith(";tag=far")
    assert events(step) == [(CallState.ENDED, 487, CallOutcome.CANCELLED_AFTER_RING)]
    assert dialog.done and dialog.ack == step.send[0]


def test_a_ring_longer_than_the_wait_for_a_first_ring_is_rung_in_full() -> None:
    # CLINIC_FLASHCALL_RING_S may be up to 60 s and the channel waits 20 s for a first ring:
    # a call that rang was cut at 20 s as no_answer (undeliverable, the SMS sent at once)
    # instead of ringing its ring time and ending cancelled_after_ring (delivered).
    dialog, step = make(answer_s=RING_S / 2)
    (invite,) = sent(step)
    ringing(dialog, invite)
    assert dialog.deadline == pytest.approx(100.01 + RING_S)
    out = dialog.on_timer(100.0 + RING_S / 2)
    assert out.events == [] and out.send == []  # the ring goes on
    out = dialog.on_timer(100.01 + RING_S)
    assert [m.method for m in sent(out)] == ["CANCEL"]
    step = dialog.on_response(reply(invite, 487), 102.1)
    assert events(step) == [(CallState.ENDED, 487, CallOutcome.CANCELLED_AFTER_RING)]


def test_an_unanswered_cancel_is_sent_again_and_the_call_ends_without_a_487() -> None:
    dialog, step = make()
    (invite,) = sent(step)
    ringing(dialog, invite, at=100.0)
    (cancel,) = sent(dialog.on_timer(102.0))
    again = dialog.on_timer(102.0 + T1_S)
    assert sent(again)[0].method == "CANCEL"
    assert dialog.deadline == pytest.approx(102.0 + 3 * T1_S)  # timer E doubles
    dialog.on_response(reply(cancel, 200), 103.0)
    assert dialog.deadline == pytest.approx(102.0 + TIMER_B_S)  # now only the wait for 487
    step = dialog.on_timer(102.0 + TIMER_B_S)
    assert events(step) == [(CallState.ENDED, 0, CallOutcome.CANCELLED_AFTER_RING)]
    assert dialog.done


def _late_ringing_is_cancelled_quietly(
    dialog: FlashDialog, invite: message.SipMessage, at: float
) -> None:
    """A 180 after the call ended is CANCELled, its 487 ACKed, and neither adds an event."""
    out = dialog.on_response(reply(invite, 180), at)
    assert [m.method for m in sent(out)] == ["CANCEL"] and out.events == []
    out = dialog.on_response(reply(invite, 487), at + 0.1)
    assert [m.method for m in sent(out)] == ["ACK"] and out.events == []
    assert dialog.done


def test_nothing_back_retransmits_then_gives_up_without_a_cancel() -> None:
    dialog, step = make()
    (invite,) = sent(step)
    times = []
    now = 100.0
    while dialog.deadline is not None and dialog.deadline < 100.0 + ANSWER_S:
        now = dialog.deadline
        out = dialog.on_timer(now)
        assert [m.method for m in sent(out)] == ["INVITE"]
        assert out.send[0] == step.send[0]  # the same request, byte for byte
        times.append(round(now - 100.0, 3))
    assert times[:5] == [0.5, 1.5, 3.5, 7.5, 15.5]  # timer A: T1, doubling
    out = dialog.on_timer(100.0 + ANSWER_S)
    assert events(out) == [(CallState.ENDED, 0, CallOutcome.NO_ANSWER)]
    assert not [m for m in sent(out) if m.method == "CANCEL"]  # section 9.1
    # The INVITE goes on until timer B; a late 180 is then cancelled, no second event.
    _late_ringing_is_cancelled_quietly(dialog, invite, 125.0)


def test_only_trying_until_the_answer_timeout_is_cancelled_as_no_answer() -> None:
    dialog, step = make()
    (invite,) = sent(step)
    dialog.on_response(reply(invite, 100), 100.01)
    assert dialog.deadline == pytest.approx(100.0 + ANSWER_S)  # timer A stopped
    out = dialog.on_timer(100.0 + ANSWER_S)
    assert [m.method for m in sent(out)] == ["CANCEL"]
    assert events(out) == [(CallState.ENDED, 0, CallOutcome.NO_ANSWER)]


def test_timer_b_without_any_answer_is_unreachable() -> None:
    dialog, _ = make(answer_s=60.0)
    now = 100.0
    while not dialog.done:
        assert dialog.deadline is not None
        now = dialog.deadline
        out = dialog.on_timer(now)
    assert now == pytest.approx(100.0 + TIMER_B_S)
    assert events(out) == [(CallState.ENDED, 408, CallOutcome.UNREACHABLE)]


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (486, CallOutcome.BUSY),
        (404, CallOutcome.NOT_FOUND),
        (603, CallOutcome.REJECTED),
        (503, CallOutcome.UNREACHABLE),
        (500, CallOutcome.SERVER_ERROR),
        (302, CallOutcome.FAILED),
        (401, CallOutcome.REJECTED),  # no credentials to answer with
    ],
)
def test_a_final_error_is_acked_and_mapped(status: int, outcome: CallOutcome) -> None:
    dialog, step = make()
    (invite,) = sent(step)
    ringing(dialog, invite)
    out = dialog.on_response(reply(invite, status), 100.5)
    assert [m.method for m in sent(out)] == ["ACK"]
    assert events(out) == [(CallState.ENDED, status, outcome)]
    assert dialog.done and dialog.deadline is None


def test_an_answer_is_acked_and_hung_up_with_bye() -> None:
    dialog, step = make()
    (invite,) = sent(step)
    ringing(dialog, invite)
    ok = reply(
        invite,
        200,
        ("Contact", "<sip:6001@127.0.0.1:40000;ob>"),
        ("Record-Route", "<sip:proxy1;lr>"),
        ("Record-Route", "<sip:proxy2;lr>"),
    )
    out = dialog.on_response(ok, 100.6)
    ack, bye = sent(out)
    assert ack.method == "ACK" and ack.uri == "sip:6001@127.0.0.1:40000;ob"
    assert ack.get("Via") != invite.get("Via")  # a 2xx ACK is a transaction of its own
    assert ack.get("CSeq") == "1 ACK"
    assert ack.get_all("Route") == ["<sip:proxy2;lr>", "<sip:proxy1;lr>"]
    assert bye.method == "BYE" and bye.get("CSeq") == "2 BYE"
    assert (bye.get("To") or "").endswith(";tag=far")
    assert events(out) == [(CallState.ANSWERED, 200, None)]
    # The 2xx again (our ACK was lost): the ACK again, nothing else.
    again = dialog.on_response(ok, 100.7)
    assert [m.method for m in sent(again)] == ["ACK"] and again.events == []
    out = dialog.on_response(reply(bye, 200), 100.8)
    assert events(out) == [(CallState.ENDED, 200, CallOutcome.ANSWERED)]
    assert dialog.done


def test_an_answer_racing_the_cancel_is_still_answered_and_hung_up() -> None:
    dialog, step = make()
    (invite,) = sent(step)
    ringing(dialog, invite)
    (cancel,) = sent(dialog.on_timer(102.01))
    out = dialog.on_response(reply(invite, 200, ("Contact", "<sip:6001@127.0.0.1:40000>")), 102.02)
    assert [m.method for m in sent(out)] == ["ACK", "BYE"]
    assert events(out) == [(CallState.ANSWERED, 200, None)]
    dialog.on_response(reply(cancel, 200), 102.03)  # harmless now
    bye = sent(out)[1]
    out = dialog.on_response(reply(bye, 200), 102.04)
    assert events(out) == [(CallState.ENDED, 200, CallOutcome.ANSWERED)]


def test_the_far_end_hanging_up_first_gets_200_and_ends_the_call() -> None:
    dialog, step = make()
    (invite,) = sent(step)
    dialog.on_response(reply(invite, 200, ("Contact", "<sip:6001@127.0.0.1:40000>")), 100.1)
    bye = message.parse(
        b"BYE sip:x@127.0.0.1:5999 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:40000;branch=z9hG4bKb\r\n"
        b"From: <sip:6001@x>;tag=far\r\nTo: " + (invite.get("From") or "").encode() + b"\r\n"
        b"Call-ID: " + (invite.get("Call-ID") or "").encode() + b"\r\nCSeq: 7 BYE\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    response, out = dialog.on_request(bye, 100.2)
    assert response is not None and message.parse(response).status == 200
    assert events(out) == [(CallState.ENDED, 200, CallOutcome.ANSWERED)]


def test_a_digest_challenge_is_answered_once() -> None:
    dialog, step = make(user="clinic", password="clinic-local-secret")
    (invite,) = sent(step)
    challenge = ("WWW-Authenticate", 'Digest realm="asterisk", nonce="n1", qop="auth"')
    out = dialog.on_response(reply(invite, 401, challenge), 100.01)
    ack, invite2 = sent(out)
    assert ack.method == "ACK" and ack.get("CSeq") == "1 ACK"
    assert invite2.method == "INVITE" and invite2.get("CSeq") == "2 INVITE"
    assert invite2.get("Call-ID") == invite.get("Call-ID")
    assert invite2.get("From") == invite.get("From")
    assert invite2.get("Via") != invite.get("Via")
    assert out.events == []
    auth = invite2.get("Authorization") or ""
    params = dict(re.findall(r'(\w+)="?([^",]+)"?', auth))

    def md5(text: str) -> str:
        return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()

    ha1 = md5("clinic:asterisk:clinic-local-secret")
    ha2 = md5(f"INVITE:{TARGET}")
    expected = md5(f"{ha1}:n1:{params['nc']}:{params['cnonce']}:auth:{ha2}")
    assert params["username"] == "clinic" and params["response"] == expected
    # The first INVITE's 401 again: its own ACK again; the new INVITE goes on.
    stray = dialog.on_response(reply(invite, 401, challenge), 100.02)
    assert stray.send == out.send[:1] and stray.events == []
    # A second challenge is final.
    out = dialog.on_response(reply(invite2, 401, challenge), 100.03)
    assert [m.method for m in sent(out)] == ["ACK"]
    assert events(out) == [(CallState.ENDED, 401, CallOutcome.REJECTED)]


@pytest.mark.parametrize("header", ["WWW-Authenticate", "Proxy-Authenticate"])
@pytest.mark.parametrize(
    ("realm", "challenged", "answered"),
    [
        ("asterisk", "asterisk", True),
        ("", "elsewhere", True),  # CLINIC_SIP_REALM unset: any realm, as before
        ("asterisk", "elsewhere", False),
        # Case aside, as pjsip (pj_stricmp) answers the workers' own: the flash calls answer
        # exactly what the workers' registration and calls answer.
        ("asterisk", "Asterisk", True),
        ("Asterisk", "asterisk", True),
        ("zürich", "ZÜRICH", False),  # only ASCII letters fold, as in pjsip
    ],
)
def test_only_a_challenge_of_the_configured_realm_is_answered(
    header: str, realm: str, challenged: str, answered: bool, caplog: pytest.LogCaptureFixture
) -> None:
    status = 401 if header == "WWW-Authenticate" else 407
    challenge = (header, f'Digest realm="{challenged}", nonce="n0nce", qop="auth"')
    # What a challenge gets without credentials: the outcome another realm's must get.
    bare, step = make()
    unanswerable = events(bare.on_response(reply(sent(step)[0], status, challenge), 100.01))
    assert unanswerable == [(CallState.ENDED, status, CallOutcome.REJECTED)]

    dialog, step = make(user="clinic", password="clinic-local-secret", realm=realm)
    (invite,) = sent(step)
    with caplog.at_level("WARNING", logger="voice.sip.flash_dialog"):
        out = dialog.on_response(reply(invite, status, challenge), 100.01)
    if answered:
        ack, invite2 = sent(out)
        assert ack.method == "ACK" and invite2.method == "INVITE"
        answer = "Authorization" if status == 401 else "Proxy-Authorization"
        assert f'realm="{challenged}"' in (invite2.get(answer) or "")
        assert out.events == [] and not caplog.records
        return
    assert [m.method for m in sent(out)] == ["ACK"], "no INVITE with credentials"
    assert events(out) == unanswerable
    (line,) = [r.getMessage() for r in caplog.records]
    assert f"realm '{challenged}'" in line and "flash-1" in line, line
    assert "clinic-local-secret" not in line and "n0nce" not in line and "response" not in line


def test_responses_of_another_transaction_are_ignored() -> None:
    dialog, step = make()
    other = message.parse(
        (step.send[0].decode().replace("branch=z9hG4bK", "branch=z9hG4bKother")).encode()
    )
    out = dialog.on_response(reply(other, 180), 100.01)
    assert out.events == [] and out.send == [] and dialog.phase is Phase.CALLING


def test_hang_up_while_ringing_cancels_at_once_and_acks_the_487() -> None:
    """The verification ended while the phone rang: the ring is cut short."""
    dialog, step = make()
    (invite,) = sent(step)
    ringing(dialog, invite)
    out = dialog.hang_up(100.3)  # well before the ring time is over
    (cancel,) = sent(out)
    assert cancel.method == "CANCEL" and cancel.get("Via") == invite.get("Via")
    assert out.events == []
    dialog.on_response(reply(cancel, 200), 100.31)
    assert dialog.on_timer(100.01 + RING_S).send == []  # no second CANCEL at the ring's end
    out = dialog.on_response(reply(invite, 487), 100.32)
    assert [m.method for m in sent(out)] == ["ACK"]
    assert events(out) == [(CallState.ENDED, 487, CallOutcome.CANCELLED_AFTER_RING)]
    assert dialog.done


def test_hang_up_before_any_answer_sends_no_cancel_until_a_provisional_one() -> None:
    dialog, step = make()
    (invite,) = sent(step)
    out = dialog.hang_up(100.2)
    assert out.send == []  # section 9.1: no CANCEL before a provisional response
    assert events(out) == [(CallState.ENDED, 0, CallOutcome.NO_ANSWER)]
    _late_ringing_is_cancelled_quietly(dialog, invite, 100.4)


def test_hang_up_of_an_answered_or_ended_call_changes_nothing() -> None:
    dialog, step = make()
    (invite,) = sent(step)
    dialog.on_response(reply(invite, 200, ("Contact", "<sip:far@127.0.0.1:5160>")), 100.1)
    phase = dialog.phase
    assert dialog.hang_up(100.2) == Step() and dialog.phase is phase  # the BYE is on its way
    dialog, step = make()
    (invite,) = sent(step)
    dialog.on_response(reply(invite, 486), 100.1)
    assert dialog.hang_up(100.2) == Step() and dialog.done


def test_stopping_cancels_a_ringing_call_and_ends_it_failed() -> None:
    dialog, step = make()
    (invite,) = sent(step)
    ringing(dialog, invite)
    out = dialog.abort(100.5)
    assert [m.method for m in sent(out)] == ["CANCEL"]
    assert events(out) == [(CallState.ENDED, 0, CallOutcome.FAILED)]
    assert dialog.done


@pytest.mark.parametrize(
    ("uri", "where"),
    [
        ("sip:+1415@127.0.0.1:5160", ("127.0.0.1", 5160)),
        ("sip:+1415@pbx.example.org", ("pbx.example.org", 5060)),
        ("sip:+1415@[::1]:5062;user=phone", ("::1", 5062)),
        ("sip:pbx.local:5070", ("pbx.local", 5070)),
    ],
)
def test_where_a_request_uri_sends_to(uri: str, where: tuple[str, int]) -> None:
    assert target_host_port(uri) == where


def test_a_cseq_of_thousands_of_digits_is_ignored_not_a_value_error() -> None:
    # Found by tests/unit/test_prop_sip.py: int() refuses over 4,300 digits.
    dialog, step = make()
    (invite,) = sent(step)
    raw = message.serialise_response(invite, 180, to_tag="far").replace(
        b"CSeq: 1 INVITE", b"CSeq: " + b"7" * 5000 + b" INVITE"
    )
    assert events(dialog.on_response(message.parse(raw), 100.1)) == []
    assert dialog.phase is Phase.CALLING


def _answer(invite: message.SipMessage, tag: str) -> message.SipMessage:
    contact = ("Contact", f"<sip:{tag}@127.0.0.1:40000>")
    return message.parse(message.serialise_response(invite, 200, to_tag=tag, extra=(contact,)))


def test_every_fork_that_answers_gets_its_own_ack_and_bye() -> None:
    # Found by tests/unit/test_prop_flash_dialog.py: a forked INVITE answered by two phones
    # ACKed the second 2xx and never sent it a BYE (RFC 3261 13.2.2.4): that phone stayed
    # off hook until its session timer.
    dialog, step = make()
    (invite,) = sent(step)
    _, bye_a = sent(dialog.on_response(_answer(invite, "a"), 100.1))
    out = dialog.on_response(_answer(invite, "b"), 100.2)
    ack_b, bye_b = sent(out)
    assert out.events == []
    assert ack_b.method == "ACK" and ack_b.uri == "sip:b@127.0.0.1:40000"
    assert bye_b.method == "BYE" and bye_b.uri == "sip:b@127.0.0.1:40000"
    assert (bye_b.get("To") or "").endswith(";tag=b") and bye_b.get("Via") != bye_a.get("Via")
    assert [m.method for m in sent(dialog.on_response(_answer(invite, "b"), 100.3))] == ["ACK"]
    assert dialog.on_response(reply(bye_a, 200), 100.4).events == [] and not dialog.done
    again = dialog.on_timer(100.2 + T1_S)  # timer E: only the unanswered BYE again
    assert again.send == [out.send[1]]
    out = dialog.on_response(reply(bye_b, 200), 100.9)
    assert events(out) == [(CallState.ENDED, 200, CallOutcome.ANSWERED)]
    assert dialog.phase is Phase.DONE
    # A fork that answers after the end still gets its ACK and BYE, and no event.
    out = dialog.on_response(_answer(invite, "c"), 101.0)
    assert [m.method for m in sent(out)] == ["ACK", "BYE"] and out.events == []


def test_a_ringing_overtaken_by_the_answer_reports_no_ringing_after_it() -> None:
    # Found by tests/unit/test_prop_flash_dialog.py: a 180 that UDP delivered after the 200
    # reported ``ringing`` after ``answered``; the INVITE transaction ended with the 2xx.
    dialog, step = make()
    (invite,) = sent(step)
    out = dialog.on_response(_answer(invite, "a"), 100.1)
    assert events(out) == [(CallState.ANSWERED, 200, None)]
    late = dialog.on_response(reply(invite, 180), 100.2)
    assert late.events == [] and late.send == []
    assert dialog.phase is Phase.HANGING_UP


def test_a_ring_that_ends_while_a_challenged_invite_is_resent_still_ends_the_call() -> None:
    # Found by tests/unit/test_prop_flash_dialog.py: a 180, then a 401 (the INVITE sent again
    # with credentials), and the ring time passed before the new INVITE had a provisional
    # response: no CANCEL could go, and the new INVITE's 180 then left the call with no
    # timer at all, ringing until the far end gave up.
    dialog, step = make(user="clinic", password="clinic-local-secret")
    (invite,) = sent(step)
    ringing(dialog, invite)
    challenge = ("WWW-Authenticate", 'Digest realm="asterisk", nonce="n1"')
    _, invite2 = sent(dialog.on_response(reply(invite, 401, challenge), 100.2))
    out = dialog.on_timer(100.01 + RING_S)
    assert "CANCEL" not in [m.method for m in sent(out)]  # section 9.1
    assert events(out) == [(CallState.ENDED, 0, CallOutcome.CANCELLED_AFTER_RING)]
    out = dialog.on_response(reply(invite2, 180), 102.5)
    assert [m.method for m in sent(out)] == ["CANCEL"] and out.events == []
    assert dialog.deadline is not None
    out = dialog.on_response(reply(invite2, 487), 102.6)
    assert [m.method for m in sent(out)] == ["ACK"] and dialog.done


def _other_branch(response: message.SipMessage) -> message.SipMessage:
    raw = message.serialise_response(response, response.status)  # a copy, then re-branched
    return message.parse(raw.replace(b"branch=z9hG4bK", b"branch=z9hG4bKother"))


def test_responses_to_another_cancel_or_bye_stop_nothing() -> None:
    # The CANCEL's and the BYE's responses were taken by method alone: one of another
    # transaction (a wrong branch) stopped the CANCEL, or ended the call and its BYE.
    dialog, step = make()
    (invite,) = sent(step)
    ringing(dialog, invite)
    (cancel,) = sent(dialog.on_timer(100.01 + RING_S))
    dialog.on_response(_other_branch(reply(cancel, 200)), 102.1)
    assert [m.method for m in sent(dialog.on_timer(102.01 + T1_S))] == ["CANCEL"]
    dialog, step = make()
    (invite,) = sent(step)
    _, bye = sent(dialog.on_response(_answer(invite, "a"), 100.1))
    assert dialog.on_response(_other_branch(reply(bye, 200)), 100.2).events == []
    assert not dialog.done
    assert [m.method for m in sent(dialog.on_timer(100.1 + T1_S))] == ["BYE"]


def test_a_final_error_after_the_answer_is_acked_and_the_bye_goes_on() -> None:
    dialog, step = make()
    (invite,) = sent(step)
    dialog.on_response(_answer(invite, "a"), 100.1)
    out = dialog.on_response(reply(invite, 486), 100.2)
    assert [m.method for m in sent(out)] == ["ACK"] and out.events == []
    assert [m.method for m in sent(dialog.on_timer(100.1 + T1_S))] == ["BYE"]


def test_2xx_of_new_forks_are_hung_up_only_within_64_t1_and_up_to_a_bound() -> None:
    # RFC 3261 13.2.2.4: the INVITE is over 64*T1 after its first 2xx. Any 2xx with the
    # INVITE's CSeq and branch and a To tag not seen before got an ACK and a BYE (eleven
    # copies on timer E) at any time and without limit: a flood of forged To tags was as
    # many BYE transactions, each a few hundred bytes held for 32 s.
    dialog, step = make()
    (invite,) = sent(step)
    _, bye_a = sent(dialog.on_response(_answer(invite, "a"), 100.1))
    dialog.on_response(reply(bye_a, 200), 100.2)
    assert dialog.done
    late = dialog.on_response(_answer(invite, "late"), 100.1 + TIMER_B_S + 0.1)
    assert late.send == [] and late.events == [] and dialog.done
    dialog, step = make()
    (invite,) = sent(step)
    dialog.on_response(_answer(invite, "a"), 100.1)
    byes = [
        m
        for i in range(200)
        for m in sent(dialog.on_response(_answer(invite, f"f{i}"), 100.2))
        if m.method == "BYE"
    ]
    assert 1 <= len(byes) <= MAX_FORKS


def _cancelled_after_ring() -> tuple[FlashDialog, message.SipMessage]:
    dialog, step = make()
    (invite,) = sent(step)
    ringing(dialog, invite)
    (cancel,) = sent(dialog.hang_up(100.3))
    dialog.on_response(reply(cancel, 200), 100.31)
    out = dialog.on_response(reply(invite, 487), 100.32)
    assert events(out) == [(CallState.ENDED, 487, CallOutcome.CANCELLED_AFTER_RING)]
    assert dialog.done and dialog.ack is not None
    return dialog, invite


def test_a_fork_answering_after_the_487_gets_an_ack_and_a_bye_of_its_own() -> None:
    # A forking proxy forwards a 2xx of another fork after the 487 (RFC 3261 9.1, 13.2.2.4).
    # Only the 487's ACK was kept: that 2xx got it back (the 487's To tag and the INVITE's
    # branch, no ACK of its dialog at all) and no BYE, so that phone stayed off hook.
    dialog, invite = _cancelled_after_ring()
    assert dialog.ack is not None
    counter = itertools.count(1)
    late = LateAnswers(
        dialog.ack,
        Local("127.0.0.1", 5999),
        until=100.32 + TIMER_B_S,
        token=lambda: f"late{next(counter):012x}",
    )
    record_route = (("Record-Route", "<sip:p1;lr>"), ("Record-Route", "<sip:p2;lr>"))
    answer = message.parse(
        message.serialise_response(
            invite,
            200,
            to_tag="b",
            extra=(("Contact", "<sip:b@127.0.0.1:40000>"), *record_route),
        )
    )
    out = late.on_response(answer, 101.0)
    ack, bye = (message.parse(d) for d in out)
    for request in (ack, bye):
        assert request.uri == "sip:b@127.0.0.1:40000"  # the 2xx's Contact (12.2.1.1)
        assert request.get_all("Route") == ["<sip:p2;lr>", "<sip:p1;lr>"]
        assert (request.get("To") or "").endswith(";tag=b")
        assert request.get("From") == invite.get("From")
        assert request.get("Call-ID") == invite.get("Call-ID")
        assert request.get("Via") != invite.get("Via")  # a transaction of its own
    assert (ack.method, ack.get("CSeq"), bye.method, bye.get("CSeq")) == (
        "ACK",
        "1 ACK",
        "BYE",
        "2 BYE",
    )
    assert ack.get("Via") != bye.get("Via")
    assert late.deadline == pytest.approx(101.0 + T1_S)
    assert late.on_timer(101.0 + T1_S) == [out[1]]  # timer E
    again = late.on_response(answer, 101.6)  # our ACK was lost: the ACK again, no new BYE
    assert [message.parse(d).method for d in again] == ["ACK"]
    assert late.on_response(reply(bye, 200), 101.7) == [] and late.deadline is None
    assert dialog.on_response(answer, 101.8).events == []  # the call ended: nothing reported


def test_late_answers_take_only_the_invites_2xx_within_64_t1_and_up_to_a_bound() -> None:
    dialog, invite = _cancelled_after_ring()
    assert dialog.ack is not None
    late = LateAnswers(
        dialog.ack, Local("127.0.0.1", 5999), until=100.32 + TIMER_B_S, token=lambda: "t"
    )
    (again,) = late.on_response(reply(invite, 487), 101.0)  # the 487 again: its ACK again
    assert again == dialog.ack
    assert late.on_response(_other_branch(_answer(invite, "x")), 101.0) == []
    other_cseq = message.serialise_response(invite, 200, to_tag="y").replace(
        b"CSeq: 1 INVITE", b"CSeq: 2 INVITE"
    )
    assert late.on_response(message.parse(other_cseq), 101.0) == []
    assert late.on_response(_answer(invite, "z"), 100.32 + TIMER_B_S) == []
    byes = [
        d
        for i in range(200)
        for d in late.on_response(_answer(invite, f"f{i}"), 101.0)
        if d.startswith(b"BYE ")
    ]
    assert len(byes) == MAX_FORKS
    assert late.on_timer(101.0 + TIMER_B_S) == [] and late.deadline is None  # timer F


# From hreview3: a 2xx's Contact with a display name, and Record-Route as a comma list.
_ODD_CONTACTS = [
    ("Bob <sip:b@127.0.0.1:40000>", "sip:b@127.0.0.1:40000"),
    (
        '"Bob, B" <sip:b@127.0.0.1:40000;transport=udp>;expires=60',
        "sip:b@127.0.0.1:40000;transport=udp",
    ),
    ("sip:b@127.0.0.1:40000;expires=60", "sip:b@127.0.0.1:40000"),
    ("*", TARGET),
    ("", TARGET),
]


@pytest.mark.parametrize(("contact", "uri"), _ODD_CONTACTS)
def test_the_ack_and_bye_go_to_the_contacts_uri_whatever_its_form(contact: str, uri: str) -> None:
    """RFC 3261 12.1.2: the remote target is the Contact's URI. A display name ('Bob
    <sip:...>', legal in a Contact, 20.10) was taken for the URI: 'ACK Bob SIP/2.0', the
    phone never got its ACK nor its BYE."""
    dialog, step = make()
    (invite,) = sent(step)
    extra = (("Contact", contact),) if contact else ()
    out = sent(dialog.on_response(reply(invite, 200, *extra), 100.1))
    assert [(r.method, r.uri) for r in out] == [("ACK", uri), ("BYE", uri)]
    late_dialog, late_invite = _cancelled_after_ring()
    assert late_dialog.ack is not None
    late = LateAnswers(
        late_dialog.ack, Local("127.0.0.1", 5999), until=200.0, token=lambda: "t" * 16
    )
    answer = message.serialise_response(late_invite, 200, to_tag="b", extra=extra)
    got = [message.parse(d) for d in late.on_response(message.parse(answer), 101.0)]
    assert [(r.method, r.uri) for r in got] == [("ACK", uri), ("BYE", uri)]


def test_a_record_route_list_in_one_header_is_reversed_entry_by_entry() -> None:
    """RFC 3261 12.1.2: the route set is the Record-Route URIs in reverse order, and one
    header may carry several, comma-separated (7.3.1). Reversing the header lines left
    '<sip:p1;lr>, <sip:p2;lr>' in that order: the BYE went to p1 first, past its own path."""
    record_route = (("Record-Route", "<sip:p1;lr>, <sip:p2;lr>"), ("Record-Route", "<sip:p3;lr>"))
    want = ["<sip:p3;lr>", "<sip:p2;lr>", "<sip:p1;lr>"]
    dialog, step = make()
    (invite,) = sent(step)
    out = sent(dialog.on_response(reply(invite, 200, *record_route), 100.1))
    for request in out:
        routes = [r.strip() for v in request.get_all("Route") for r in v.split(",")]
        assert routes == want, request.method
    late_dialog, late_invite = _cancelled_after_ring()
    assert late_dialog.ack is not None
    late = LateAnswers(
        late_dialog.ack, Local("127.0.0.1", 5999), until=200.0, token=lambda: "t" * 16
    )
    answer = message.serialise_response(late_invite, 200, to_tag="b", extra=record_route)
    for d in late.on_response(message.parse(answer), 101.0):
        request = message.parse(d)
        routes = [r.strip() for v in request.get_all("Route") for r in v.split(",")]
        assert routes == want, request.method


def _late_fork(ack: bytes, invite: message.SipMessage, at: float) -> list[message.SipMessage]:
    """What a fork's 2xx to ``invite`` that comes at ``at``, after the end, gets."""
    late = LateAnswers(ack, Local("127.0.0.1", 5999), until=at + 1.0, token=lambda: "l" * 16)
    return [message.parse(d) for d in late.on_response(_answer(invite, "late"), at)]


def _check_acked_and_hung_up(out: list[message.SipMessage], invite: message.SipMessage) -> None:
    number = (invite.get("CSeq") or "").split()[0]
    assert [(r.method, r.get("CSeq"), r.uri) for r in out] == [
        ("ACK", f"{number} ACK", "sip:late@127.0.0.1:40000"),
        ("BYE", f"{int(number) + 1} BYE", "sip:late@127.0.0.1:40000"),
    ]
    for request in out:
        assert (request.get("To") or "").endswith(";tag=late")
        assert request.get("From") == invite.get("From")
        assert request.get("Call-ID") == invite.get("Call-ID")
        assert request.get("Via") != invite.get("Via")  # a transaction of its own


def test_a_2xx_after_timer_b_gets_an_ack_and_a_bye() -> None:
    # RFC 3261 13.2.2.4: every 2xx of the INVITE is ACKed and, unwanted, BYEd. A call that
    # ended on timer B (no response at all: every one lost, or a slow far end) had sent no
    # ACK, so it kept nothing: a 2xx after the end got nothing and that phone stayed off hook.
    dialog, step = make(answer_s=60.0)
    (invite,) = sent(step)
    while not dialog.done:
        assert dialog.deadline is not None
        out = dialog.on_timer(dialog.deadline)
    assert events(out) == [(CallState.ENDED, 408, CallOutcome.UNREACHABLE)]
    assert dialog.ack is not None, "the finished call keeps what a late 2xx needs"
    _check_acked_and_hung_up(_late_fork(dialog.ack, invite, 100.0 + TIMER_B_S + 1.0), invite)


def test_a_2xx_after_the_cancels_timer_f_gets_an_ack_and_a_bye() -> None:
    # The CANCEL unanswered and no 487 (timer F): the call ends cancelled_after_ring with no
    # final response, and a 2xx that crossed the CANCEL and was late got nothing.
    dialog, step = make()
    (invite,) = sent(step)
    ringing(dialog, invite)
    dialog.on_timer(100.01 + RING_S)
    while not dialog.done:
        assert dialog.deadline is not None
        out = dialog.on_timer(dialog.deadline)
    assert events(out) == [(CallState.ENDED, 0, CallOutcome.CANCELLED_AFTER_RING)]
    assert dialog.ack is not None
    late = LateAnswers(dialog.ack, Local("127.0.0.1", 5999), until=200.0, token=lambda: "l" * 16)
    (ack,) = (message.parse(d) for d in late.on_response(reply(invite, 487), 140.0))
    assert ack.get("Via") == invite.get("Via") and (ack.get("To") or "").endswith(";tag=far")
    _check_acked_and_hung_up(_late_fork(dialog.ack, invite, 140.0), invite)


def test_a_2xx_to_the_challenged_calls_second_invite_after_the_end_is_matched() -> None:
    # A 401 answered with a second INVITE (CSeq 2, a new branch) that got no final response
    # (timer B): the call kept the 401's ACK (CSeq 1, the first branch), so a 2xx of the
    # second INVITE after the end matched nothing and that phone stayed off hook.
    dialog, step = make(user="clinic", password="clinic-local-secret", answer_s=60.0)
    (invite,) = sent(step)
    challenge = ("WWW-Authenticate", 'Digest realm="asterisk", nonce="n1"')
    _, invite2 = sent(dialog.on_response(reply(invite, 401, challenge), 100.01))
    while not dialog.done:
        assert dialog.deadline is not None
        out = dialog.on_timer(dialog.deadline)
    assert events(out) == [(CallState.ENDED, 408, CallOutcome.UNREACHABLE)]
    assert dialog.ack is not None
    _check_acked_and_hung_up(_late_fork(dialog.ack, invite2, 140.0), invite2)
    assert _late_fork(dialog.ack, invite, 140.0) == [], "the 401's INVITE had its final"


def test_a_2xx_of_the_challenged_invite_gets_a_2xx_ack_and_a_bye_not_the_401s_ack() -> None:
    # Matched by CSeq number alone, any final of the challenged INVITE got the 401's ACK
    # again: a 2xx (its phone off hook) got that non-2xx ACK (the 401's To tag, the INVITE's
    # branch: no ACK of its dialog) and no BYE, and a 486 of another branch got it too.
    dialog, step = make(user="clinic", password="clinic-local-secret")
    (invite,) = sent(step)
    challenge = ("WWW-Authenticate", 'Digest realm="asterisk", nonce="n1"')
    ack_401, invite2 = sent(dialog.on_response(reply(invite, 401, challenge), 100.01))
    assert dialog.on_response(_other_branch(reply(invite, 486)), 100.02).send == []
    out = dialog.on_response(_answer(invite, "b"), 100.03)
    assert out.events == []
    ack, bye = sent(out)
    assert [(r.method, r.get("CSeq"), r.uri) for r in (ack, bye)] == [
        ("ACK", "1 ACK", "sip:b@127.0.0.1:40000"),
        ("BYE", "2 BYE", "sip:b@127.0.0.1:40000"),
    ]
    assert ack.get("Via") != ack_401.get("Via") and (ack.get("To") or "").endswith(";tag=b")
    ringing(dialog, invite2, at=100.1)
    out = dialog.on_timer(100.1 + RING_S)
    assert [m.method for m in sent(out)] == ["CANCEL", "BYE"]  # the BYE on timer E
    out = dialog.on_response(reply(invite2, 487), 102.2)
    assert events(out) == [(CallState.ENDED, 487, CallOutcome.CANCELLED_AFTER_RING)]
    assert dialog.phase is Phase.HANGING_UP, "its BYE is still unanswered"
    assert dialog.deadline is not None
    out = dialog.on_response(reply(bye, 200), 102.3)
    assert dialog.done and out.events == [] and not dialog.answered


def test_the_answer_after_a_2xx_of_the_challenged_invite_with_its_to_tag_ends_the_ring() -> None:
    # Found by tests/unit/test_prop_flash_dialog.py (while this change was written): the
    # second INVITE's 2xx with the To tag that a 2xx of the challenged INVITE had opened was
    # taken for a retransmission: the call was answered, yet it still rang and was CANCELled.
    dialog, step = make(user="clinic", password="clinic-local-secret")
    (invite,) = sent(step)
    challenge = ("WWW-Authenticate", 'Digest realm="asterisk", nonce="n1"')
    _, invite2 = sent(dialog.on_response(reply(invite, 401, challenge), 100.01))
    _, bye = sent(dialog.on_response(_answer(invite, "a"), 100.02))
    dialog.on_response(reply(bye, 200), 100.03)
    ringing(dialog, invite2, at=100.04)
    out = dialog.on_response(_answer(invite2, "a"), 100.05)
    assert [(m.method, m.get("CSeq")) for m in sent(out)] == [("ACK", "2 ACK")]
    assert events(out) == [
        (CallState.ANSWERED, 200, None),
        (CallState.ENDED, 200, CallOutcome.ANSWERED),
    ]
    assert dialog.done and dialog.deadline is None


@pytest.mark.parametrize("header", ["WWW-Authenticate", "Proxy-Authenticate"])
@pytest.mark.parametrize(
    "first",
    [
        'Digest realm="elsewhere", nonce="other", qop="auth"',  # a proxy's, or a prober's
        'Digest realm="asterisk", nonce="sha", algorithm=SHA-256, qop="auth"',  # RFC 8760
    ],
)
def test_of_several_challenges_the_one_it_can_answer_is_answered(header: str, first: str) -> None:
    # A 401 or 407 may carry several challenges (RFC 3261 section 22.3; RFC 8760 offers
    # one per algorithm): the first must not refuse them all when a later one is of
    # CLINIC_SIP_REALM, as pjsip answers the workers' (sip_auth_client.c tries each).
    status = 401 if header == "WWW-Authenticate" else 407
    dialog, step = make(user="clinic", password="clinic-local-secret", realm="asterisk")
    (invite,) = sent(step)
    ours = (header, 'Digest realm="asterisk", nonce="n0nce", qop="auth"')
    out = dialog.on_response(reply(invite, status, (header, first), ours), 100.01)
    ack, invite2 = sent(out)
    assert ack.method == "ACK" and invite2.method == "INVITE"
    answer = invite2.get("Authorization" if status == 401 else "Proxy-Authorization") or ""
    assert 'realm="asterisk"' in answer and 'nonce="n0nce"' in answer, answer
    assert out.events == []
