"""What a blind transfer's reports mean (voice/sip/refer.py), table-driven."""

from __future__ import annotations

import pytest

from voice.sip.outcome import SipStatus
from voice.sip.refer import PBX_REACHED_NOBODY, TransferVerdict, verdict, wants_more_reports

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
