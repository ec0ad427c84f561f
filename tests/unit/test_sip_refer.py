"""What a blind transfer's reports mean (voice/sip/refer.py), table-driven."""

from __future__ import annotations

import pytest

from voice.sip import message
from voice.sip.outcome import SipStatus
from voice.sip.refer import (
    PBX_REACHED_NOBODY,
    Notified,
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


# When pjsip 2.15 itself ends a REFER subscription with no NOTIFY (evsub.c, on_tsx_state_uac
# and on_timer), the model ends it too: kept live, it took the id-less NOTIFY of the next
# transfer, whose end then went unreported (the caller heard the ring tone for 180 s).


@pytest.mark.parametrize(
    "status",
    [
        SipStatus.REQUEST_TIMEOUT,  # Timer F: pjsip's own 408, no response came
        SipStatus.SERVICE_UNAVAILABLE,  # a transport error: pjsip's own 503
    ],
)
def test_a_refer_pjsip_failed_itself_leaves_no_subscription(status: int) -> None:
    subs = ReferSubscriptions()
    subs.transfer()
    subs.sent(3)
    assert subs.answered(3, status)  # the newest transfer's: its report counts
    subs.transfer()
    subs.sent(4)
    subs.answered(4, SipStatus.ACCEPTED)
    assert subs.ends_newest(_notify(DONE, b"garbage"))


@pytest.mark.parametrize("status", [SipStatus.REQUEST_TIMEOUT, 481, 489, 503])
def test_a_refresh_that_fails_ends_its_subscription(status: int) -> None:
    # pjsip refreshes a REFER subscription (SUBSCRIBE) as its Expires runs out; a failure,
    # the far end's or pjsip's own (Timer F, a transport error), ends it without a NOTIFY.
    subs = _subs(3)
    subs.subscribing(4, "refer", 600, now=590.0)
    assert subs.subscribe_answered(4, status, now=591.0) == Notified(newest=True, ends=True)
    subs.transfer()
    subs.sent(5)
    subs.answered(5, SipStatus.ACCEPTED)
    assert subs.ends_newest(_notify(DONE, b"garbage"), now=600.0)


def test_a_refresh_accepted_keeps_its_subscription() -> None:
    subs = _subs(3)
    subs.subscribing(4, "refer", 600, now=590.0)
    assert subs.subscribe_answered(4, SipStatus.OK, now=591.0) == Notified(True, ends=False)
    subs.transfer()
    subs.sent(5)
    subs.answered(5, SipStatus.ACCEPTED)
    assert not subs.ends_newest(_notify(DONE, b"garbage"), now=600.0)


def test_an_unsubscribe_accepted_ends_its_subscription_if_no_notify_does() -> None:
    # pjsip waits 5 s (PJSIP_EVSUB_TIME_UAC_TERMINATE) for the NOTIFY that ends a
    # subscription it unsubscribed from, then ends it itself.
    subs = _subs(3)
    subs.subscribing(4, "refer", 0, now=10.0)
    subs.subscribe_answered(4, SipStatus.OK, now=10.1)
    subs.transfer()
    subs.sent(5)
    subs.answered(5, SipStatus.ACCEPTED)
    # Within the 5 s an id-less end is still the unsubscribed one's ...
    assert not subs.ends_newest(_notify(DONE, b"garbage"), now=14.0)
    subs = _subs(3)
    subs.subscribing(4, "refer", 0, now=10.0)
    subs.subscribe_answered(4, SipStatus.OK, now=10.1)
    subs.transfer()
    subs.sent(5)
    subs.answered(5, SipStatus.ACCEPTED)
    # ... after them, pjsip has ended it: the next transfer's.
    assert subs.ends_newest(_notify(DONE, b"garbage"), now=15.2)


def test_a_challenged_refresh_sent_again_keeps_its_subscription() -> None:
    subs = _subs(3)
    subs.subscribing(4, "refer", 600, now=590.0)
    subs.subscribe_answered(4, SipStatus.PROXY_AUTHENTICATION_REQUIRED, now=590.1)
    subs.subscribing(5, "refer", 600, now=590.1)  # sent again, with credentials
    subs.subscribe_answered(5, SipStatus.OK, now=590.2)
    subs.transfer()
    subs.sent(6)
    subs.answered(6, SipStatus.ACCEPTED)
    assert not subs.ends_newest(_notify(DONE, b"garbage"), now=600.0)


def test_a_refresh_names_its_subscription_by_id() -> None:
    subs = _subs(3, 7)
    subs.subscribing(8, "refer;id=7", 600, now=590.0)
    # the newest's, ended: the worker reports that end if pjsua does not
    assert subs.subscribe_answered(8, 481, now=590.1) == Notified(newest=True, ends=True)
    assert not subs.ends_newest(_notify(DONE, b"garbage", event="refer;id=7"), now=591.0)
    assert not subs.ends_newest(_notify(DONE, b"garbage"), now=591.0)  # the earlier one's


# A transfer the session gave up on (its 60 s wait) may keep a live subscription in pjsua:
# its later reports must not answer the next transfer. The model says whose each is.


def test_a_late_answer_to_an_abandoned_refer_is_not_the_next_transfers() -> None:
    # The nurse's REFER, challenged and sent again, still unanswered when the session gave
    # up and tried staff; its 202 comes after: pjsua's report of it is no progress of staff's.
    subs = ReferSubscriptions()
    subs.transfer()
    subs.sent(3)
    subs.answered(3, SipStatus.PROXY_AUTHENTICATION_REQUIRED)
    subs.sent(4)
    subs.transfer()
    subs.sent(5)
    assert not subs.answered(4, SipStatus.ACCEPTED)
    assert subs.answered(5, SipStatus.ACCEPTED)


def test_the_notifies_of_an_abandoned_subscription_are_not_the_next_transfers() -> None:
    subs = _subs(3, 7)
    # id-less: the oldest live subscription's, the abandoned one's
    assert subs.notified(_notify(ACTIVE, b"SIP/2.0 180 Ringing"), now=1.0) == Notified(
        newest=False, ends=False
    )
    assert subs.notified(_notify(DONE, b"SIP/2.0 200 OK"), now=2.0) == Notified(
        newest=False, ends=True
    )
    # that one ended: the next id-less NOTIFY is the newest transfer's
    assert subs.notified(_notify(ACTIVE, b"SIP/2.0 180 Ringing"), now=3.0) == Notified(
        newest=True, ends=False
    )
    # named: by the CSeq of its REFER
    assert not subs.notified(_notify(ACTIVE, b"x", event="refer;id=3"), now=4.0).newest
    assert subs.notified(_notify(ACTIVE, b"x", event="refer;id=7"), now=4.0).newest


def test_a_transfer_whose_refer_was_never_sent_has_no_subscription() -> None:
    # pjsua refused to send it (pj.Error: reported failed at once): the next transfer's
    # subscription is the only one, and an id-less NOTIFY its.
    subs = ReferSubscriptions()
    subs.transfer()
    subs.transfer()
    subs.sent(4)
    subs.answered(4, SipStatus.ACCEPTED)
    assert subs.ends_newest(_notify(DONE, b"garbage"))
