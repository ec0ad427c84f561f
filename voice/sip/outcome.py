"""How a call ended, from the SIP status codes (RFC 3261 section 21) and what we did.

Pure: no I/O. The worker feeds it the final status of a call plus two facts only it knows
(whether the callee answered, whether we cancelled it), and the verification rules read the
resulting :class:`CallOutcome`.
"""

from __future__ import annotations

import enum


class SipStatus(enum.IntEnum):
    """The SIP status codes this service sends or reacts to (RFC 3261 section 21)."""

    TRYING = 100
    RINGING = 180
    SESSION_PROGRESS = 183
    OK = 200
    ACCEPTED = 202
    MOVED_TEMPORARILY = 302
    BAD_REQUEST = 400
    UNAUTHORIZED = 401
    FORBIDDEN = 403
    NOT_FOUND = 404
    METHOD_NOT_ALLOWED = 405
    PROXY_AUTHENTICATION_REQUIRED = 407
    REQUEST_TIMEOUT = 408
    TEMPORARILY_UNAVAILABLE = 480
    CALL_DOES_NOT_EXIST = 481
    ADDRESS_INCOMPLETE = 484
    BUSY_HERE = 486
    REQUEST_TERMINATED = 487
    NOT_ACCEPTABLE_HERE = 488
    BAD_EVENT = 489  # RFC 6665 section 8.3.2: an event package the notifier does not take
    SERVER_INTERNAL_ERROR = 500
    NOT_IMPLEMENTED = 501
    SERVICE_UNAVAILABLE = 503
    MESSAGE_TOO_LARGE = 513
    BUSY_EVERYWHERE = 600
    DECLINE = 603
    DOES_NOT_EXIST_ANYWHERE = 604
    NOT_ACCEPTABLE_ANYWHERE = 606

    @property
    def phrase(self) -> str:
        """The reason phrase to put on the status line."""
        return _PHRASES.get(self, self.name.replace("_", " ").title())


_PHRASES = {
    SipStatus.OK: "OK",
    SipStatus.MOVED_TEMPORARILY: "Moved Temporarily",
    SipStatus.CALL_DOES_NOT_EXIST: "Call/Transaction Does Not Exist",
    SipStatus.BUSY_HERE: "Busy Here",
    SipStatus.SERVER_INTERNAL_ERROR: "Server Internal Error",
    SipStatus.DOES_NOT_EXIST_ANYWHERE: "Does Not Exist Anywhere",
    SipStatus.NOT_ACCEPTABLE_ANYWHERE: "Not Acceptable",
}


class CallOutcome(enum.StrEnum):
    """The result of one call, as the verification and IVR layers see it."""

    CANCELLED_AFTER_RING = "cancelled_after_ring"  # flash call success: rang, we cancelled
    ANSWERED = "answered"  # the callee picked up a flash call (we hung up at once)
    COMPLETED = "completed"  # an answered call ended normally
    BUSY = "busy"
    NOT_FOUND = "not_found"
    REJECTED = "rejected"
    UNREACHABLE = "unreachable"
    NO_ANSWER = "no_answer"
    SERVER_ERROR = "server_error"
    WORKER_LOST = "worker_lost"
    FAILED = "failed"


_BY_STATUS: dict[int, CallOutcome] = {
    SipStatus.BUSY_HERE: CallOutcome.BUSY,
    SipStatus.BUSY_EVERYWHERE: CallOutcome.BUSY,
    SipStatus.NOT_FOUND: CallOutcome.NOT_FOUND,
    SipStatus.DOES_NOT_EXIST_ANYWHERE: CallOutcome.NOT_FOUND,
    SipStatus.ADDRESS_INCOMPLETE: CallOutcome.NOT_FOUND,
    # pjsip reports its own transaction timeouts as 408 and transport errors as 503
    # (or no status at all), so these mean "could not reach", not "the far end refused".
    SipStatus.REQUEST_TIMEOUT: CallOutcome.UNREACHABLE,
    SipStatus.TEMPORARILY_UNAVAILABLE: CallOutcome.UNREACHABLE,
    SipStatus.SERVICE_UNAVAILABLE: CallOutcome.UNREACHABLE,
    SipStatus.FORBIDDEN: CallOutcome.REJECTED,
    SipStatus.DECLINE: CallOutcome.REJECTED,
}


def outcome_for_status(
    sip_status: int,
    *,
    answered: bool,
    cancelled_by_us: bool,
    flash: bool = False,
    timed_out: bool = False,
) -> CallOutcome:
    """Map the final state of a call to its outcome.

    ``sip_status`` is the last final status pjsua saw (0 when there was none, e.g. a
    transport error); ``answered`` whether a 2xx was received or sent; ``cancelled_by_us``
    whether we ended the call before it was answered (a flash call's CANCEL); ``flash``
    whether an answer was unwanted; ``timed_out`` whether we gave up waiting for an answer.
    """
    if answered:
        return CallOutcome.ANSWERED if flash else CallOutcome.COMPLETED
    if timed_out:
        return CallOutcome.NO_ANSWER
    if cancelled_by_us:
        return CallOutcome.CANCELLED_AFTER_RING
    if sip_status == 0:
        return CallOutcome.UNREACHABLE
    known = _BY_STATUS.get(sip_status)
    if known is not None:
        return known
    if sip_status == SipStatus.REQUEST_TERMINATED:
        # 487 without our CANCEL: something between us and the callee gave up.
        return CallOutcome.FAILED
    if 400 <= sip_status < 500 or 600 <= sip_status < 700:
        return CallOutcome.REJECTED
    if 500 <= sip_status < 600:
        return CallOutcome.SERVER_ERROR
    return CallOutcome.FAILED
