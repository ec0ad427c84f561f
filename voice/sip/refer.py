"""What a blind transfer's reports mean (RFC 3515: the REFER's answer, then its NOTIFYs).

Pure: no I/O. The session passes each :class:`voice.sip.protocol.TransferStatus` through
:func:`verdict` with two facts it keeps: whether the REFER was accepted (202), and whether
the call came through a PBX.

Who holds the caller once a REFER is accepted depends on who took it:

* the caller's own phone (direct mode): it calls the target and keeps its call with us until
  that call is answered (RFC 5589 section 6), so a failure it reports leaves the caller on
  our line, and another target can still be tried;
* a PBX (Asterisk 22's res_pjsip_refer, a blind transfer): the caller leaves our leg the
  moment the transfer is performed, and from then on is only in the PBX's dialplan. A
  final failure in a NOTIFY then comes from that dialplan, with the caller beyond reach.

Measured against Asterisk 22.10 with this repository's dialplan (tests/e2e; pjsua reports
the 202 as a non-final 100), the sipfrag statuses after the 202 are:

* ``200`` as soon as the caller hears anything from the PBX: res_pjsip_refer takes the first
  audio frame sent to the caller, with no BUSY or CONGESTION before it, for an answer. That
  is a human who answered (the transferee joined a bridge), but also the ring tone Asterisk
  plays to the (answered) caller while a registered phone rings (200 within 30 ms, the
  nurse answering 2 s later or never), and a "nobody is available" Playback (200 at 0.5 s,
  after its Wait, with nobody registered: the fault [transfer-failed] now avoids);
* ``486``: BUSY indicated to the caller, which [transfer-failed] does before its message
  (at once when nobody is registered; the caller still hears the message, ~11 s);
* ``503``: CONGESTION indicated, or the caller's channel ended before anything was sent to
  it (without codec_gsm the message could not play: 503 at 0.5 s, the caller gone);
* ``400``/``403``/``404``/``500``: the transfer could not be performed (no bridge yet, an
  extension not in the transfer context: 404 at once): the caller never left our leg.

Asterisk does not end our leg after a failure it reports (still up 25 s later): we must.
So behind a PBX, 486 and 503 after the 202 mean the PBX took the caller and nobody took the
call (:attr:`TransferVerdict.UNANSWERED`); any other failure is a failure on our line; and
a 200 means the PBX holds the caller, not that a human answered.
"""

from __future__ import annotations

import enum
import re

from voice.sip.message import SipMessage, header_param
from voice.sip.outcome import SipStatus


class TransferVerdict(enum.StrEnum):
    """What one transfer report tells the session."""

    PROGRESS = "progress"  # accepted (pjsua reports the 202 as a non-final 1xx), or ringing
    ANSWERED = "answered"  # a 2xx: the target took the call (behind a PBX: see above)
    FAILED = "failed"  # not transferred: the caller is still on our line
    UNANSWERED = "unanswered"  # a PBX took the caller, and nobody took the call


# Final sipfrag statuses a PBX reports once it has taken the caller and reached nobody.
PBX_REACHED_NOBODY = frozenset({SipStatus.BUSY_HERE, SipStatus.SERVICE_UNAVAILABLE})


def verdict(sip_status: int, *, final: bool, accepted: bool, behind_pbx: bool) -> TransferVerdict:
    """The meaning of one transfer report (see the module's docstring).

    ``accepted``: an earlier report said the REFER was accepted; ``behind_pbx``: the call
    came through a PBX (it, not the caller's phone, handles the REFER).
    """
    if not final and sip_status < 200:
        return TransferVerdict.PROGRESS
    if 200 <= sip_status < 300:
        # Final or not: a 2xx in a NOTIFY's body is the answer even when the subscription
        # stays active (some transferees end it in a later NOTIFY, or never).
        return TransferVerdict.ANSWERED
    if behind_pbx and accepted and sip_status in PBX_REACHED_NOBODY:
        return TransferVerdict.UNANSWERED
    return TransferVerdict.FAILED


def wants_more_reports(sip_status: int, *, final: bool) -> bool:
    """Whether the worker asks pjsua for the REFER subscription's later NOTIFYs after this
    report (pjsua2's ``OnCallTransferStatusParam.cont``): only while it is progress.

    Once a report decides the transfer (a final one, or a status of 200 or more in a NOTIFY
    that keeps the subscription active), that subscription's later NOTIFYs are nobody's
    answer. Reported, they would be read as the answer to the call's next REFER, since a
    :class:`voice.sip.protocol.TransferStatus` names no REFER: a nurse's phone that says
    ``486`` (active), then ``486`` (terminated) failed the staff transfer tried after it at
    once. With ``cont`` false pjsua drops the subscription's later reports (and still
    answers each NOTIFY, 200, as RFC 6665 section 4.1.3 asks).
    """
    return not final and sip_status < 200


# pjsua reads a NOTIFY's body as ``pjsip_parse_status_line`` does: a status line first.
# Looser than pjsip on purpose: a body read here as readable is left to pjsua (as before),
# so a 2xx pjsua reports is never taken for an unreadable end.
_SIPFRAG_STATUS = re.compile(rb"\s*SIP/\d+\.\d+[ \t]+\d{3}(?:\s|$)", re.IGNORECASE)


def unreported_end(notify: SipMessage, *, refer_cseq: int | None, first_refer: bool) -> bool:
    """Whether ``notify`` (a NOTIFY received in the call's dialog) ends a REFER's
    subscription with nothing pjsua reports.

    pjsua (2.15, ``xfer_client_on_evsub_state``) reports a NOTIFY's sipfrag status, but
    returns without a word for one with no body, a body that is not ``message/sipfrag``, or
    a sipfrag that is not a status line: when that NOTIFY also ends the subscription
    (``Subscription-State: terminated``), the session never heard the transfer end, and the
    caller, still on our line, heard the ring tone until the 180 s wait ran out. Such an end
    is a subscription that ended with no final status: a failure, as pjsua reports a
    subscription that ends with no NOTIFY at all (500).

    Only the subscription of the REFER waiting for its answer counts (``refer_cseq``: its
    CSeq, None if unknown): a NOTIFY names a REFER other than a dialog's first by
    ``Event: refer;id=<its CSeq>`` (RFC 3515 section 2.4.6), so one with no ``id`` is
    the first REFER's (``first_refer``), and a late one of an earlier REFER, whose answer
    was read already, must not fail the next (see :func:`wants_more_reports`).
    """
    if notify.method != "NOTIFY":
        return False
    event = notify.get("Event") or ""
    state = (notify.get("Subscription-State") or "").split(";", 1)[0].strip().lower()
    if event.split(";", 1)[0].strip().lower() != "refer" or state != "terminated":
        return False
    named = header_param(event, "id")
    if named is None:
        if not first_refer:
            return False
    elif refer_cseq is None or named != str(refer_cseq):
        return False
    kind = (notify.get("Content-Type") or "").split(";", 1)[0].strip().lower()
    readable = kind == "message/sipfrag" and _SIPFRAG_STATUS.match(notify.body) is not None
    return not readable
