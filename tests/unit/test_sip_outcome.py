"""The SIP status -> call outcome table (pure)."""

from __future__ import annotations

import pytest

from voice.sip.outcome import CallOutcome, SipStatus, outcome_for_status

Oc = CallOutcome


@pytest.mark.parametrize(
    ("status", "answered", "cancelled", "flash", "timed_out", "expected"),
    [
        (487, False, True, True, False, Oc.CANCELLED_AFTER_RING),
        (200, True, False, True, False, Oc.ANSWERED),
        (200, True, True, True, False, Oc.ANSWERED),
        (200, True, False, False, False, Oc.COMPLETED),
        (0, False, False, True, True, Oc.NO_ANSWER),
        (487, False, True, False, True, Oc.NO_ANSWER),
        (486, False, False, True, False, Oc.BUSY),
        (600, False, False, True, False, Oc.BUSY),
        (404, False, False, True, False, Oc.NOT_FOUND),
        (604, False, False, True, False, Oc.NOT_FOUND),
        (484, False, False, True, False, Oc.NOT_FOUND),
        (403, False, False, True, False, Oc.REJECTED),
        (603, False, False, True, False, Oc.REJECTED),
        (488, False, False, True, False, Oc.REJECTED),
        (606, False, False, True, False, Oc.REJECTED),
        (408, False, False, True, False, Oc.UNREACHABLE),
        (480, False, False, True, False, Oc.UNREACHABLE),
        (503, False, False, True, False, Oc.UNREACHABLE),
        (0, False, False, True, False, Oc.UNREACHABLE),
        (500, False, False, True, False, Oc.SERVER_ERROR),
        (502, False, False, True, False, Oc.SERVER_ERROR),
        (487, False, False, True, False, Oc.FAILED),
        (302, False, False, True, False, Oc.FAILED),
    ],
)
def test_outcome_table(  # noqa: PLR0917 (one row of the table)
    status: int, answered: bool, cancelled: bool, flash: bool, timed_out: bool, expected: Oc
) -> None:
    got = outcome_for_status(
        status, answered=answered, cancelled_by_us=cancelled, flash=flash, timed_out=timed_out
    )
    assert got is expected


@pytest.mark.parametrize(
    ("member", "code"),
    [
        (SipStatus.TRYING, 100),
        (SipStatus.RINGING, 180),
        (SipStatus.OK, 200),
        (SipStatus.MOVED_TEMPORARILY, 302),
        (SipStatus.NOT_FOUND, 404),
        (SipStatus.UNAUTHORIZED, 401),
        (SipStatus.METHOD_NOT_ALLOWED, 405),
        (SipStatus.PROXY_AUTHENTICATION_REQUIRED, 407),
        (SipStatus.REQUEST_TIMEOUT, 408),
        (SipStatus.CALL_DOES_NOT_EXIST, 481),
        (SipStatus.BUSY_HERE, 486),
        (SipStatus.REQUEST_TERMINATED, 487),
        (SipStatus.NOT_ACCEPTABLE_HERE, 488),
        (SipStatus.NOT_IMPLEMENTED, 501),
        (SipStatus.SERVICE_UNAVAILABLE, 503),
        (SipStatus.BUSY_EVERYWHERE, 600),
        (SipStatus.DECLINE, 603),
        (SipStatus.DOES_NOT_EXIST_ANYWHERE, 604),
    ],
)
def test_status_constants_match_rfc_3261(member: SipStatus, code: int) -> None:
    assert member == code


def test_phrases() -> None:
    assert SipStatus.BUSY_HERE.phrase == "Busy Here"
    assert SipStatus.MOVED_TEMPORARILY.phrase == "Moved Temporarily"
    assert SipStatus.NOT_FOUND.phrase == "Not Found"
    assert SipStatus.CALL_DOES_NOT_EXIST.phrase == "Call/Transaction Does Not Exist"
    assert SipStatus.NOT_ACCEPTABLE_HERE.phrase == "Not Acceptable Here"
