"""What a blind transfer's reports mean (voice/sip/refer.py), table-driven."""

from __future__ import annotations

import pytest

from voice.sip import message
from voice.sip.outcome import SipStatus
from voice.sip.refer import (
    PBX_REACHED_NOBODY,
    TransferVerdict,
    unreported_end,
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


@pytest.mark.parametrize(
    ("notify", "unreported"),
    [
        # pjsua reports these itself (the status, final when terminated).
        (_notify(DONE, b"SIP/2.0 200 OK\r\n"), False),
        (_notify(DONE, b"SIP/2.0 486 Busy Here"), False),
        (_notify(DONE, b"sip/2.0 603 Decline\r\n"), False),
        (_notify(DONE, b"SIP/2.0 180 Ringing\r\n"), False),
        # An active subscription: its end is still to come.
        (_notify("active;expires=60", b"garbage"), False),
        (_notify("pending", b""), False),
        # Not the REFER's subscription.
        (_notify(DONE, b"garbage", event="dialog"), False),
        # Ended with nothing pjsua reports: a broken sipfrag, no body, another body.
        (_notify(DONE, b"garbage here"), True),
        (_notify(DONE, b"SIP/2.0 OK"), True),
        (_notify("Terminated", b""), True),
        (_notify(DONE, b"", kind=""), True),
        (_notify(DONE, b"SIP/2.0 200 OK", kind="text/plain"), True),
        (
            message.parse(
                b"NOTIFY sip:a@b SIP/2.0\r\no: refer\r\nSubscription-State: terminated\r\n\r\n"
            ),
            True,
        ),
        # Not a NOTIFY.
        (message.parse(b"SIP/2.0 200 OK\r\nSubscription-State: terminated\r\n\r\n"), False),
    ],
)
def test_a_subscription_ended_with_no_status_pjsua_reports_is_found(
    notify: message.SipMessage, unreported: bool
) -> None:
    assert unreported_end(notify, refer_cseq=None, first_refer=True) is unreported


@pytest.mark.parametrize(
    ("event", "refer_cseq", "first_refer", "unreported"),
    [
        # No id: the dialog's first REFER's subscription (RFC 3515 section 2.4.6).
        ("refer", 7, True, True),
        ("refer", 7, False, False),  # a late NOTIFY of the first REFER, during the second
        # An id names the REFER by its CSeq.
        ("refer;id=7", 7, False, True),
        ("refer; id = 7", 7, False, True),
        ("refer;id=6", 7, False, False),
        ("refer;id=7", None, False, False),  # the REFER's CSeq not seen: left to pjsua
    ],
)
def test_only_the_waiting_refers_subscription_counts(
    event: str, refer_cseq: int | None, first_refer: bool, unreported: bool
) -> None:
    notify = _notify(DONE, b"garbage", event=event)
    got = unreported_end(notify, refer_cseq=refer_cseq, first_refer=first_refer)
    assert got is unreported
