"""What a blind transfer's reports mean (voice/sip/refer.py), table-driven."""

from __future__ import annotations

import pytest

from voice.sip import message
from voice.sip.outcome import SipStatus
from voice.sip.refer import (
    PBX_REACHED_NOBODY,
    ReferSubscriptions,
    TransferVerdict,
    verdict,
    wants_more_reports,
)

P, A, F, U = (
    TransferVerdict.PROGRESS,
    TransferVerdict.ANSWERED,
    TransferVerdict.FAILED,
    TransferVerdict.UNANSWERED,
)


@pytest.mark.parametrize(
    ("status", "final", "accepted", "behind_pbx", "expected"),
    [
        # The 202 (pjsua: a non-final 100), then 100/180/183 while the target rings.
        (100, False, False, True, P),
        (180, False, True, True, P),
        (183, False, True, False, P),
        # A 2xx is the answer, final or not (a transferee may keep the subscription).
        (200, True, True, True, A),
        (200, False, True, False, A),
        # Asterisk's [transfer-failed] (BUSY) and a transferee gone (503) after the 202:
        # the PBX holds or held the caller, and nobody took the call.
        (486, True, True, True, U),
        (503, True, True, True, U),
        (486, False, True, True, U),
        # The same statuses from the caller's own phone: it is still on our line.
        (486, True, True, False, F),
        (503, True, True, False, F),
        # Not accepted first: the REFER itself was refused; the caller never left.
        (486, True, False, True, F),
        (503, True, False, True, F),
        # Accepted, then the transfer could not be performed (no bridge yet, an extension
        # not in the transfer context): the caller is still on our line.
        (400, True, True, True, F),
        (403, True, True, True, F),
        (404, True, True, True, F),
        (500, True, True, True, F),
        (480, True, True, True, F),
        (603, True, True, True, F),
        # A final 1xx (a subscription that ended with no answer) is no answer.
        (100, True, True, True, F),
    ],
)
def test_verdict(
    status: int, final: bool, accepted: bool, behind_pbx: bool, expected: TransferVerdict
) -> None:
    assert verdict(status, final=final, accepted=accepted, behind_pbx=behind_pbx) is expected


def test_the_statuses_of_a_pbx_that_reached_nobody_are_named() -> None:
    assert {SipStatus.BUSY_HERE, SipStatus.SERVICE_UNAVAILABLE} == PBX_REACHED_NOBODY


@pytest.mark.parametrize(
    ("status", "final", "more"),
    [
        (100, False, True),  # the 202 (pjsua: a non-final 100)
        (180, False, True),
        (183, False, True),
        # Decided while the subscription stays active: its later NOTIFYs are nobody's
        # answer (they would answer the call's next REFER: tests/unit/test_prop_transfer.py).
        (200, False, False),
        (486, False, False),
        (400, False, False),
        (200, True, False),
        (486, True, False),
        (100, True, False),
    ],
)
def test_reports_are_wanted_only_while_the_transfer_is_in_progress(
    status: int, final: bool, more: bool
) -> None:
    assert wants_more_reports(status, final=final) is more
    # The same line as the session's: a report that is no progress is the transfer's answer.
    progress = verdict(status, final=final, accepted=True, behind_pbx=False)
    assert more is (progress is TransferVerdict.PROGRESS)


def _notify(
    state: str, body: bytes, *, kind: str = "message/sipfrag;version=2.0", event: str = "refer"
) -> message.SipMessage:
    head = (
        "NOTIFY sip:clinic@127.0.0.1:5062 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-1\r\n"
        "CSeq: 3 NOTIFY\r\n"
        f"Event: {event}\r\n"
        f"Subscription-State: {state}\r\n"
        + (f"Content-Type: {kind}\r\n" if kind else "")
        + f"Content-Length: {len(body)}\r\n\r\n"
    )
    return message.parse(head.encode() + body)


DONE = "terminated;reason=noresource"
ACTIVE = "active;expires=60"


def _subs(*cseqs: int) -> ReferSubscriptions:
    """One transfer per CSeq, each REFER sent and accepted (202)."""
    subs = ReferSubscriptions()
    for cseq in cseqs:
        subs.transfer()
        subs.sent(cseq)
        subs.answered(cseq, 202)
    return subs


@pytest.mark.parametrize(
    ("notify", "ends"),
    [
        # Whatever its body: which ones pjsua reports is left to pjsua (the worker reports
        # an end only when pjsua said nothing of it).
        (_notify(DONE, b"SIP/2.0 486 Busy Here"), True),
        (_notify(DONE, b"garbage here"), True),
        (_notify(DONE, b"\r\nSIP/2.0 200 OK\r\n"), True),
        (_notify(DONE, b"SIP/3.0 486 Busy Here\r\n"), True),
        (_notify(DONE, b"", kind=""), True),
        (_notify("Terminated", b""), True),
        (
            message.parse(
                b"NOTIFY sip:a@b SIP/2.0\r\no: refer\r\nSubscription-State: terminated\r\n\r\n"
            ),
            True,
        ),
        # The subscription goes on: its end is still to come.
        (_notify(ACTIVE, b"garbage"), False),
        (_notify("pending", b""), False),
        # Not a REFER's subscription; not a NOTIFY.
        (_notify(DONE, b"garbage", event="dialog"), False),
        (message.parse(b"SIP/2.0 200 OK\r\nSubscription-State: terminated\r\n\r\n"), False),
    ],
)
def test_a_notify_that_ends_the_subscription_is_found(
    notify: message.SipMessage, ends: bool
) -> None:
    assert _subs(7).ends_newest(notify) is ends


def test_a_challenged_refer_is_named_by_the_cseq_it_was_sent_again_with() -> None:
    subs = ReferSubscriptions()
    subs.transfer()
    subs.sent(7)
    subs.answered(7, SipStatus.PROXY_AUTHENTICATION_REQUIRED)
    subs.sent(8)  # sent again, with credentials
    subs.answered(8, SipStatus.ACCEPTED)
    assert subs.ends_newest(_notify(DONE, b"garbage", event="refer;id=8"))


def test_a_challenged_refer_sent_again_before_its_challenge_is_read_stays_live() -> None:
    # pjsip may send the REFER again (and the worker see it sent) before the worker reads
    # the challenge it answers: that challenge ends nothing.
    subs = ReferSubscriptions()
    subs.transfer()
    subs.sent(7)
    subs.sent(8)
    subs.answered(7, SipStatus.UNAUTHORIZED)
    subs.answered(8, SipStatus.ACCEPTED)
    assert subs.ends_newest(_notify(DONE, b"garbage"))


@pytest.mark.parametrize("resent", [False, True])
def test_a_challenge_not_answered_leaves_no_subscription(resent: bool) -> None:
    # The nurse's REFER challenged and not sent again (no credentials in direct mode, or a
    # second challenge to the REFER sent again with them: pjsip gives up): it failed, with
    # no subscription, and an id-less NOTIFY is the staff transfer's tried after it. Kept
    # live, that end was nobody's, and the caller heard the ring tone until the 180 s wait
    # ran out.
    subs = ReferSubscriptions()
    subs.transfer()
    subs.sent(3)
    subs.answered(3, SipStatus.PROXY_AUTHENTICATION_REQUIRED)
    if resent:
        subs.sent(4)
        subs.answered(4, SipStatus.PROXY_AUTHENTICATION_REQUIRED)
    subs.transfer()
    subs.sent(5)
    subs.answered(5, SipStatus.ACCEPTED)
    assert subs.ends_newest(_notify(DONE, b"garbage"))


@pytest.mark.parametrize("event", ["refer;id=7", "refer; id = 7", "refer;ID=7"])
def test_an_id_names_the_refer_by_its_cseq(event: str) -> None:
    assert _subs(7).ends_newest(_notify(DONE, b"garbage", event=event))


@pytest.mark.parametrize("event", ["refer;id=6", "refer;id=", "refer;id=x"])
def test_an_id_naming_no_live_refer_is_nobodys(event: str) -> None:
    assert not _subs(7).ends_newest(_notify(DONE, b"garbage", event=event))


def test_an_id_naming_an_earlier_transfer_does_not_end_the_newest() -> None:
    subs = _subs(3, 7)
    assert not subs.ends_newest(_notify(DONE, b"garbage", event="refer;id=3"))
    assert subs.ends_newest(_notify(DONE, b"garbage", event="refer;id=7"))


def test_no_id_is_the_oldest_live_subscription() -> None:
    # The nurse's phone said "486, active" and has not ended its subscription: the next
    # id-less end is its (as pjsip routes it), not the staff transfer's tried after it.
    subs = _subs(3, 7)
    assert not subs.ends_newest(_notify(DONE, b"SIP/2.0 486 Busy Here"))
    # That one ended, the staff transfer's is the only one live: an id-less end is its.
    assert subs.ends_newest(_notify(DONE, b"garbage"))
    # And nothing is left for a later one.
    assert not subs.ends_newest(_notify(DONE, b"garbage"))


@pytest.mark.parametrize(
    ("status", "refer_sub"),
    [(SipStatus.FORBIDDEN, True), (SipStatus.REQUEST_TIMEOUT, True), (SipStatus.ACCEPTED, False)],
)
def test_a_refer_with_no_subscription_leaves_no_id_less_notify_to_it(
    status: int, refer_sub: bool
) -> None:
    # The nurse's REFER refused (or Refer-Sub: false): the staff transfer's subscription is
    # the only one, and an id-less NOTIFY its, the second transfer of the call though it is.
    subs = ReferSubscriptions()
    subs.transfer()
    subs.sent(3)
    subs.answered(3, status, refer_sub=refer_sub)
    subs.transfer()
    subs.sent(4)
    assert subs.ends_newest(_notify(DONE, b"garbage"))


def test_nothing_is_ended_before_a_refer_was_sent() -> None:
    assert not ReferSubscriptions().ends_newest(_notify(DONE, b"garbage"))
