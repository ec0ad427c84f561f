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
from dataclasses import dataclass, field

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


# A REFER answered with one of these is sent again with credentials (RFC 3261 section 22).
_CHALLENGES = frozenset({SipStatus.UNAUTHORIZED, SipStatus.PROXY_AUTHENTICATION_REQUIRED})

# pjsip's PJSIP_EVSUB_TIME_UAC_TERMINATE (evsub.c): an unsubscribe (a SUBSCRIBE with
# Expires: 0) accepted with a 2xx ends its subscription this long after, when no NOTIFY
# ended it first.
UNSUBSCRIBE_WAIT_S = 5.0


@dataclass(slots=True)
class _Refer:
    """One transfer's REFER: the CSeq of each time it was sent (a REFER challenged with 401
    or 407 goes again with the next CSeq), whether its subscription may still be live, and
    when pjsip ends it by itself (an unsubscribe accepted, no NOTIFY since)."""

    cseqs: list[int] = field(default_factory=list)
    live: bool = True
    ends_at: float | None = None


@dataclass(frozen=True, slots=True)
class Notified:
    """What a NOTIFY received in the call's dialog (or the answer to a SUBSCRIBE of ours)
    is to the worker."""

    newest: bool  # for the newest transfer's subscription: pjsua's report of it counts
    ends: bool  # it ends that subscription (``Subscription-State: terminated``; a failure)


class ReferSubscriptions:
    """The REFER subscriptions of one call's dialog, each as pjsip (2.15) keeps it, so that
    a NOTIFY is told apart: the newest transfer's, or an earlier one's.

    pjsua reports a NOTIFY's sipfrag status, but not which REFER it is for, and says
    nothing of one with no body, a body that is not ``message/sipfrag``, or a sipfrag its
    parser does not take for a status line (a leading CRLF, ``SIP/3.0``, a code out of
    range, ...). When such a NOTIFY ends the newest transfer's subscription
    (``Subscription-State: terminated``), the worker must report that end itself: a
    subscription that ended with no final status, a failure (as pjsua reports one that ends
    with no NOTIFY at all, 500). Which bodies pjsua reports is pjsip's parser's business: the
    worker does not guess it, it reports the end when pjsua has reported nothing for that
    NOTIFY (see ``voice.sip.pjsua``). And a report of an earlier transfer's subscription
    (one the session gave up on, its 60 s wait over, that is still live in pjsua) is
    nobody's answer: the worker drops it (:attr:`Notified.newest`, :meth:`answered`).

    Which subscription a NOTIFY is for (RFC 3515 section 2.4.6, pjsip's ``evsub.c``):

    * one with ``Event: refer;id=<n>`` is for the REFER whose CSeq was ``n``: the one that
      was accepted, so for a REFER challenged and sent again, the CSeq it was sent again
      with (any of the transfer's CSeqs is taken);
    * one with no ``id`` is for the oldest subscription still live. RFC 3515 gives it to
      the dialog's first REFER, but Asterisk and other pjsip peers never send an ``id``, and
      pjsip itself hands an ``id``-less NOTIFY to its oldest subscription not yet ended: once
      the earlier transfers' subscriptions have ended, it is the newest transfer's. While an
      earlier one is still live, (a phone that said "486, active" and has not ended it yet),
      it is that earlier one's, whose answer was read already (see
      :func:`wants_more_reports`): it must not fail the next transfer.

    When pjsip ends a subscription (``evsub.c``, ``on_tsx_state_uac`` and ``on_timer``),
    and so when this model does:

    * its REFER got a final failure, whoever made it: the far end, or pjsip itself (408 at
      Timer F, 503 on a transport error: :meth:`answered` takes those too), or a 2xx with
      ``Refer-Sub: false``;
    * a NOTIFY for it said ``terminated``;
    * a SUBSCRIBE of ours for it (pjsip's refresh as its ``Expires`` runs out, pjsua's
      unsubscribe) got a final failure, again whoever made it; or one with ``Expires: 0``
      was accepted and no NOTIFY ended it in :data:`UNSUBSCRIBE_WAIT_S` (pjsip's
      ``TIMER_TYPE_UAC_TERMINATE``). Such a SUBSCRIBE names its subscription as a NOTIFY
      does; an ``id``-less one is taken for the oldest live subscription's (pjsip's refresh
      timers run in the order the REFERs were accepted, and an unsubscribe follows a
      subscription's answer, read before the next transfer was tried).
    """

    def __init__(self) -> None:
        self._refers: list[_Refer] = []
        self._subscribes: dict[int, tuple[_Refer, bool]] = {}  # CSeq: (whose, unsubscribe)
        # A subscription whose SUBSCRIBE (its CSeq) was challenged (401/407) just now.
        self._challenged: tuple[_Refer, int] | None = None

    def transfer(self) -> None:
        """A new transfer: its REFER is about to be sent. The earlier ones are over for the
        session (answered, or given up on): their subscriptions' reports count no more."""
        self._refers.append(_Refer())

    def sent(self, cseq: int) -> None:
        """A REFER went out with ``cseq``: the newest transfer's, sent first or again after a
        digest challenge."""
        if self._refers:
            refer = self._refers[-1]
            refer.cseqs.append(cseq)
            refer.live = True  # sent again after a challenge: the subscription goes on

    def answered(self, cseq: int, status: int, *, refer_sub: bool = True) -> bool:
        """The final status of the REFER sent with ``cseq``: a response, or one pjsip made
        itself (408 at Timer F, 503 on a transport error). A 401 or 407 leaves the
        subscription to the REFER sent again, if one is (:meth:`sent`: pjsip may send it
        before or after the worker reads the challenge); not sent again (no credentials, or
        a second challenge), it failed. Any other failure, or a 2xx with ``Refer-Sub:
        false`` (RFC 4488), leaves no subscription.

        Whether pjsua's report of that status counts: not if the REFER is an earlier
        transfer's (a REFER still unanswered when the session gave up on it)."""
        refer = next((r for r in self._refers if cseq in r.cseqs), None)
        if refer is None:
            return True  # not a REFER this model knows: as before it, the report counts
        if not (status in _CHALLENGES and cseq != refer.cseqs[-1]) and (
            status >= 300 or not refer_sub
        ):
            refer.live = False
        return refer is self._refers[-1]

    def subscribing(self, cseq: int, event: str, expires: int, *, now: float) -> None:
        """A SUBSCRIBE of ours went out in the call's dialog with ``cseq``, ``event`` (its
        Event header) and ``expires``: a refresh of a REFER subscription, or (0) its end."""
        challenged, self._challenged = self._challenged, None
        refer: _Refer | None
        if challenged is not None and cseq == challenged[1] + 1:
            # pjsip sends a challenged SUBSCRIBE again at once, from the challenge's callback,
            # with the dialog's next CSeq. Any later SUBSCRIBE is not that one: the
            # challenge went unanswered and ended its subscription.
            refer = challenged[0]
            refer.live = True
        else:
            refer = self._named(event, now=now)
        if refer is not None:
            self._subscribes[cseq] = (refer, expires == 0)

    def subscribe_answered(self, cseq: int, status: int, *, now: float) -> Notified:
        """The final status of the SUBSCRIBE sent with ``cseq`` (a response, or one pjsip
        made itself): whose subscription it was for (the newest transfer's or not), and
        whether it ended it. A failure ends it (pjsua reports a response's status as the
        end, e.g. 489, final); an unsubscribe accepted ends it
        :data:`UNSUBSCRIBE_WAIT_S` later, unless a NOTIFY ends it first."""
        whose = self._subscribes.pop(cseq, None)
        if whose is None:
            return Notified(newest=True, ends=False)
        refer, unsubscribe = whose
        if status >= 300:
            # A challenge too, unless pjsip sends it again with credentials (next).
            refer.live = False
            self._challenged = (refer, cseq) if status in _CHALLENGES else None
        elif unsubscribe and refer.ends_at is None:
            refer.ends_at = now + UNSUBSCRIBE_WAIT_S
        return Notified(newest=refer is self._refers[-1], ends=status >= 300)

    def notified(self, notify: SipMessage, *, now: float) -> Notified:
        """What ``notify`` (a request received in the call's dialog) is: for the newest
        transfer's subscription or not, and whether it ends it. A NOTIFY that ends any
        REFER subscription is noted."""
        if notify.method != "NOTIFY":
            return Notified(newest=True, ends=False)
        event = notify.get("Event") or ""
        if event.split(";", 1)[0].strip().lower() != "refer":
            return Notified(newest=True, ends=False)
        refer = self._named(event, now=now)
        if refer is None:
            # pjsip answers it 481 and reports nothing: nobody's
            return Notified(newest=False, ends=False)
        state = (notify.get("Subscription-State") or "").split(";", 1)[0].strip().lower()
        ends = state == "terminated"
        if ends:
            refer.live = False
        return Notified(newest=refer is self._refers[-1], ends=ends)

    def newest_live(self) -> bool:
        """Whether the newest transfer's subscription may still be live (a challenged
        SUBSCRIBE sent again in the same pass makes an end seen earlier in it undone)."""
        return bool(self._refers) and self._refers[-1].live

    def end_newest(self) -> None:
        """pjsua reported the newest transfer's status as final: pjsip ended its
        subscription (pjsua's final report is the subscription's end), whether or not a
        transaction of it reached the worker (pjsua skips the callback of a second
        challenge, ``auth_retry``)."""
        if self._refers:
            self._refers[-1].live = False

    def ends_newest(self, notify: SipMessage, *, now: float = 0.0) -> bool:
        """Whether ``notify`` ends the newest transfer's subscription (:meth:`notified`)."""
        seen = self.notified(notify, now=now)
        return seen.newest and seen.ends

    def _named(self, event: str, *, now: float) -> _Refer | None:
        """The live subscription an ``Event: refer`` header names: by ``id`` (a CSeq of its
        REFER), else the oldest live one."""
        for refer in self._refers:
            if refer.ends_at is not None and refer.ends_at <= now:
                refer.live = False  # pjsip ended it: no NOTIFY came after the unsubscribe
        live = [r for r in self._refers if r.live and r.cseqs]  # a REFER not sent has none
        named = header_param(event, "id")
        if named is None:
            return live[0] if live else None
        return next((r for r in live if named in (str(c) for c in r.cseqs)), None)
