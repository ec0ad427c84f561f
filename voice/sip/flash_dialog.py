"""One flash call as a SIP user agent client over UDP: INVITE, ring, CANCEL. Pure: no I/O.

A flash call is signalling only: an INVITE without SDP whose From carries the code, a ring of
``ring_s`` seconds after the first 180/183, then CANCEL; the handset keeps a missed call. This
module is the state machine of one such call (RFC 3261: the INVITE client transaction of
section 17.1.1, CANCEL of section 9, ACK of sections 13.2.2.4 and 17.1.1.3, digest of section
22), fed with the responses that come back and with the time; it answers with the datagrams to
send and the :class:`~voice.sip.protocol.CallEvent` s to report, the same events a SIP worker
reports for a call, so the verification side cannot tell them apart.

Why not pjsua2 (whose workers place every other call): a pjsua2 process holds at most four
calls (the wheel's PJSUA_MAX_CALLS), and a flash call holds its slot for the whole ring, so 320
workers ran out of slots at ~640 flash calls/s, with each call crossing two processes and
costing a worker ~1.3 ms of CPU for four SIP messages (``bench/asterisk_compare.py``,
2026-12-03). Here a call is a few hundred bytes and no media.

What it does, and what it deliberately does not:

- INVITE retransmitted on timer A (T1 doubling) until a provisional or final response, given up
  at timer B (64*T1: outcome ``unreachable``, as pjsip's 408);
- the first 180/183 is ``ringing``; ``ring_s`` later a CANCEL (retransmitted on timer E until
  answered, timer F); the 487 that ends the INVITE is ACKed and the call ends
  ``cancelled_after_ring``; no 487 within 64*T1 of the CANCEL ends it the same way;
- no ring by ``answer_timeout_s`` (nothing, or only 100): the call ends ``no_answer`` at once
  (a call that rang rings its whole ``ring_s``, however long that is); the INVITE is
  still retransmitted until timer B and a late provisional response is cancelled then (no
  CANCEL before a provisional response: section 9.1);
- an answer (2xx, also one racing the CANCEL) is ACKed and hung up with BYE at once
  (``answered``); a forked INVITE answered by several phones gets an ACK and a BYE (each
  on timer E until answered, timer F) for every To tag, even a 2xx that comes after the call
  ended, as long as the INVITE lasts (64*T1 after its first 2xx, section 13.2.2.4) and up to
  ``MAX_FORKS`` To tags (later ones get nothing), and the call ends when every BYE is
  answered; a final error is ACKed and mapped by
  :func:`~voice.sip.outcome.outcome_for_status` (after a 2xx it is only ACKed);
- a 2xx of another fork after an unanswered call ended (after the 487 of its CANCEL, or a
  final error: a forking proxy still forwards it, sections 9.1 and 13.2.2.4; or with no final
  response at all, on timer B or the CANCEL's timer F) is no business of this object, which
  the caller drops at the end: :class:`LateAnswers` gives it its ACK and BYE from the ACK the
  call keeps (:attr:`FlashDialog.ack`, of the last INVITE), with the same bounds
  (``MAX_FORKS`` To tags, 64*T1 after the end) and no event; it ACKs that INVITE's final
  error sent again, and nothing else (a response to a CANCEL or a BYE is never ACKed);
- one 401/407 is answered with digest credentials (a PBX that identifies the trunk by its
  auth user, as the repository's Asterisk does): of its challenges, the first it can answer
  and, when :attr:`Local.realm` is set, of that realm (none such: a final error, as without
  credentials); a second challenge is a final error; while
  the call lasts (or is kept, answered), the challenged INVITE's final sent again gets its own
  ACK again, and a 2xx of it (its CSeq number and branch) an ACK and a BYE of its own, as a
  fork's, and no event; after an unanswered end they get nothing (:class:`LateAnswers` keeps
  only the last INVITE's ACK);
- 3xx is a final error (a flash call is not redirected), no SDP is ever sent (an answer with an
  offer gets the ACK and the BYE and nothing else), no TCP or TLS (the caller picks the pjsua2
  path for those); the ACK and BYE of an answer carry the Contact as Request-URI and the
  Record-Route set as Route, and the caller sends them to the INVITE's next hop (the PBX or
  the phone it was sent to), without looking up the Contact's host.

The ACK of a finished call outlives it in the caller's table of finished calls (see
:attr:`FlashDialog.ack`) for timer D: a :class:`LateAnswers` made from it ACKs a
retransmitted final response again and answers a late fork's 2xx.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from voice.sip import digest, message
from voice.sip.outcome import CallOutcome, SipStatus, outcome_for_status
from voice.sip.protocol import CallEvent, CallState, PlaceCall

log = logging.getLogger(__name__)

_Headers = tuple[tuple[str, str], ...]  # extra header lines, in order

T1_S = 0.5  # RFC 3261 timer T1: the round-trip estimate
T2_S = 4.0  # the longest retransmission interval of a non-INVITE request
TIMER_B_S = 64 * T1_S  # INVITE and non-INVITE transaction timeout (timers B and F)
TIMER_D_S = 32.0  # how long a final response may still be retransmitted to us (UDP)
MAX_FORKS = 16  # the most answered forks of one INVITE that get an ACK and a BYE
USER_AGENT = "clinic-voice"
ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS"

_URI_HOSTPORT = re.compile(r"sips?:(?:[^@;>]*@)?(\[[^\]]+\]|[^;:>?]+)(?::(\d+))?", re.IGNORECASE)
# A name-addr (an optional display name, quoted or tokens, then ``<uri>``) or an addr-spec.
# Matched at the start of a stripped entry, in linear time (a datagram is 64 KB).
_CONTACT_URI = re.compile(r'(?:"(?:[^"\\]|\\.)*"\s*|[^"<]*)<([^>]*)>|([^;,\s<>"]+)')


class Phase(enum.Enum):
    CALLING = "calling"  # INVITE sent, nothing back yet
    PROCEEDING = "proceeding"  # a provisional response came back
    CANCELLING = "cancelling"  # CANCEL sent, waiting for the 487
    HANGING_UP = "hanging_up"  # answered, BYE sent
    DONE = "done"


@dataclass(frozen=True, slots=True)
class Local:
    """This side: the address in Via and Contact, and the credentials for a challenge."""

    host: str  # as it goes in Via and Contact (an IPv6 address in brackets)
    port: int
    auth_user: str = ""
    password: str = ""
    realm: str = ""  # the only realm whose challenge is answered; "": any (CLINIC_SIP_REALM)


@dataclass(slots=True)
class _Bye:
    """The BYE of one answered fork (one To tag), retransmitted on timer E until timer F."""

    raw: bytes
    branch: str
    resend_at: float
    give_up_at: float
    interval: float = T1_S


@dataclass(slots=True)
class Step:
    """What one input produced: datagrams to send (to the call's next hop) and events."""

    send: list[bytes] = field(default_factory=list)
    events: list[CallEvent] = field(default_factory=list)


def target_host_port(uri: str) -> tuple[str, int]:
    """The host and port a Request-URI sends to (no DNS SRV: port 5060 when absent)."""
    m = _URI_HOSTPORT.match(uri.strip())
    if not m:
        # Not quoted: a call's target URI holds the number called (README: "What the logs
        # and the disk hold"); this text is logged and kept as the send's failure.
        raise ValueError(f"not a SIP URI ({len(uri)} characters): check CLINIC_SIP_ROUTE")
    host = m.group(1).strip("[]")
    return host, int(m.group(2) or 5060)


def _name_addrs(value: str) -> list[str]:
    """The comma-separated entries of a Contact or Record-Route value (section 7.3.1), a
    comma inside a quoted display name or inside ``<>`` not splitting."""
    parts: list[str] = []
    start, quoted, bracket, i = 0, False, False, 0
    while i < len(value):
        c = value[i]
        if quoted:
            if c == "\\":
                i += 1  # a quoted pair: the next character is escaped
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == "<":
            bracket = True
        elif c == ">":
            bracket = False
        elif c == "," and not bracket:
            parts.append(value[start:i].strip())
            start = i + 1
        i += 1
    parts.append(value[start:].strip())
    return [p for p in parts if p]


def _uri_of(name_addr: str) -> str:
    """The URI of the first entry of a Contact value: inside ``<>`` past any display name
    (quoted or not), else the addr-spec before its header parameters; "" for none or ``*``."""
    entries = _name_addrs(name_addr)
    if not entries:
        return ""
    m = _CONTACT_URI.match(entries[0])
    uri = (m.group(1) or m.group(2) or "").strip() if m else ""
    return "" if uri == "*" else uri


def _tag(name_addr: str) -> str:
    """The header's own tag (not a URI parameter inside ``<>``); "" when it has none."""
    return message.header_tag(name_addr) or ""


def _top_branch(msg: message.SipMessage) -> str:
    via = msg.get("Via") or ""
    m = re.search(r";\s*branch=([^;,\s]+)", via, re.IGNORECASE)
    return m.group(1) if m else ""


def cseq_of(msg: message.SipMessage) -> tuple[int, str]:
    """CSeq number and method; (-1, "") when unreadable, so the response matches nothing.

    RFC 3261 section 8.1.1.5: the number is below 2**31, 10 digits at most; more is no
    CSeq of ours (and int() refuses over 4,300 digits)."""
    number, _, method = (msg.get("CSeq") or "").strip().partition(" ")
    if not (number.isascii() and number.isdigit() and len(number) <= 10):
        # Not quoted: text off the network, as a parse error says none (see message.parse).
        log.info("ignored a response with an unreadable CSeq (%d characters)", len(number))
        return -1, ""
    return int(number), method.strip().upper()


def _build_request(
    method: str,
    uri: str,
    cseq: int,
    branch: str,
    *,
    local: Local,
    from_: str,
    to: str,
    call_id: str,
    extra: tuple[tuple[str, str], ...] = (),
) -> bytes:
    lines = [
        f"{method} {uri} SIP/2.0",
        f"Via: SIP/2.0/UDP {local.host}:{local.port};rport;branch={branch}",
        "Max-Forwards: 70",
        f"From: {from_}",
        f"To: {to}",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}",
    ]
    lines += [f"{n}: {v}" for n, v in extra]
    lines.append(f"User-Agent: {USER_AGENT}")
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _resend_byes(byes: dict[str, _Bye], now: float, send: list[bytes]) -> None:
    """Timer E (each unanswered BYE again, T1 doubling up to T2) and F (given up)."""
    for tag, bye in list(byes.items()):
        if now >= bye.give_up_at:
            del byes[tag]  # timer F
        elif now >= bye.resend_at:
            send.append(bye.raw)
            bye.interval = min(bye.interval * 2, T2_S)
            bye.resend_at = now + bye.interval


def _answered_by(byes: dict[str, _Bye], msg: message.SipMessage) -> None:
    """A final response to one of ``byes`` (matched by its branch) stops that BYE."""
    branch = _top_branch(msg)
    for tag, bye in list(byes.items()):
        if bye.branch == branch:
            del byes[tag]


class _Request(Protocol):
    """Builds one request of the call (its From, Call-ID and Via are the builder's)."""

    def __call__(
        self, method: str, uri: str, cseq: int, branch: str, *, to: str, extra: _Headers = ()
    ) -> bytes: ...


class _Forks:
    """The dialogs the 2xx s of one INVITE open, one per To tag (a forking proxy passes on
    every phone that answers: RFC 3261 13.2.2.4). Each gets an ACK (the INVITE's CSeq number,
    a new branch, to its Contact along its Record-Route reversed) and a BYE (the next CSeq
    number), the BYE on timer E until answered or timer F; a 2xx again gets its ACK again.
    A new To tag counts before ``until`` (None: no limit yet) and up to ``MAX_FORKS``: a
    flood of tags must not become as many BYE transactions."""

    __slots__ = ("answers", "byes", "until")

    def __init__(self, until: float | None = None) -> None:
        self.answers: set[str] = set()  # the To tags answered
        self.byes: dict[str, _Bye] = {}  # To tag -> its BYE, while unanswered
        self.until = until

    def answer(
        self,
        msg: message.SipMessage,
        now: float,
        send: list[bytes],
        *,
        cseq: int,
        fallback_uri: str,
        new_branch: Callable[[], str],
        request: _Request,
    ) -> tuple[bytes, bool] | None:
        """ACK the 2xx ``msg``, and BYE it when its To tag is new: the ACK and whether it
        was new; None when it is ignored (a new tag past ``until`` or ``MAX_FORKS``)."""
        to = msg.get("To") or ""
        tag = _tag(to)
        new = tag not in self.answers
        if new and self.until is not None and (now >= self.until or len(self.answers) >= MAX_FORKS):
            return None
        contact, routes = _dialog_of(msg, fallback_uri)
        ack = request("ACK", contact, cseq, new_branch(), to=to, extra=routes)
        send.append(ack)
        if new:
            self.answers.add(tag)
            branch = new_branch()
            bye = request("BYE", contact, cseq + 1, branch, to=to, extra=routes)
            self.byes[tag] = _Bye(bye, branch, now + T1_S, now + TIMER_B_S)
            send.append(bye)
        return ack, new

    def next_time(self) -> float | None:
        """When a BYE is due again or given up; None with none unanswered."""
        return min((min(b.resend_at, b.give_up_at) for b in self.byes.values()), default=None)


def _dialog_of(
    msg: message.SipMessage, fallback_uri: str
) -> tuple[str, tuple[tuple[str, str], ...]]:
    """A 2xx's remote target (its Contact) and route set (its Record-Route reversed), the
    Request-URI and Route of the ACK and BYE of that dialog (RFC 3261 12.1.2, 12.2.1.1)."""
    contact = _uri_of(msg.get("Contact") or "") or fallback_uri
    # One Record-Route may carry several entries (7.3.1): reversed entry by entry.
    entries = [e for v in msg.get_all("Record-Route") for e in _name_addrs(v)]
    return contact, tuple(("Route", r) for r in reversed(entries))


class FlashDialog:
    """One flash call. Feed it :meth:`start`, :meth:`on_response`, :meth:`on_request` and
    :meth:`on_timer` (whenever :attr:`deadline` passes); send what each returns."""

    def __init__(
        self,
        spec: PlaceCall,
        local: Local,
        *,
        token: Callable[[], str],
        wall: Callable[[], float],
    ) -> None:
        self.spec = spec
        self.local = local
        self._token = token  # random hex for tags, branches and Call-ID
        self._wall = wall  # wall time for the events' ``at``
        self.sip_call_id = f"{spec.call_id}-{token()}"
        self.phase = Phase.CALLING
        self.deadline: float | None = None
        self._ack: bytes | None = None  # the ACK of the current INVITE's final error
        self._from_tag = token()
        self._cseq = 1  # the current INVITE's CSeq number (its ACK and CANCEL share it)
        self._branch = ""
        self._challenged = False
        # (CSeq, branch) of an INVITE -> the ACK of its final error
        self._acks: dict[tuple[int, str], bytes] = {}
        self._forks = _Forks()  # until: 64*T1 after the first 2xx, the INVITE over (13.2.2.4)
        # Timers, each None when not running.
        self._retransmit_at: float | None = None
        self._interval = T1_S
        self._give_up_at: float | None = None  # timer B (INVITE), F (CANCEL/BYE), or the 487
        self._ring_end: float | None = None
        self._answer_by: float | None = None
        self._pending_out = b""  # the request being retransmitted (INVITE, CANCEL or BYE)
        # What the outcome mapping needs.
        self._rang = False
        self._provisional = False
        self._answered = False
        self._cancelled_by_us = False
        self._timed_out = False
        self._ended = False
        self._final_status = 0
        self._to_header = f"<{spec.target_uri}>"  # with the remote tag once known

    # -- inputs ------------------------------------------------------------------------------

    def start(self, now: float) -> Step:
        """The INVITE, and the ``trying`` event."""
        step = Step()
        self._answer_by = now + self.spec.answer_timeout_s
        self._send_invite(now, step, auth=None)
        step.events.append(self._event(CallState.TRYING, 0, None))
        return step

    def on_response(self, msg: message.SipMessage, now: float) -> Step:
        """A response whose Call-ID is this call's."""
        step = Step()
        number, method = cseq_of(msg)
        status = msg.status
        if method == "INVITE":
            if number != self._cseq or _top_branch(msg) != self._branch:
                self._on_earlier_invite(msg, number, now, step)
            else:
                self._on_invite_response(msg, status, now, step)
        elif method == "BYE" and status >= 200:
            _answered_by(self._forks.byes, msg)
            self._after_bye(step)
        elif method == "CANCEL" and status >= 200:
            ours = number == self._cseq and _top_branch(msg) == self._branch
            if ours and self.phase is Phase.CANCELLING:
                # The CANCEL is answered: stop sending it; the INVITE's 487 ends the call.
                self._retransmit_at = None
        self._reschedule()
        return step

    def on_request(self, msg: message.SipMessage, now: float) -> tuple[bytes | None, Step]:
        """A request inside this call (a BYE after an answer): the response, and what follows."""
        step = Step()
        if msg.method == "ACK":
            return None, step
        if msg.method == "BYE" and self._forks.answers:
            # The far end hung up first: its dialog needs no BYE of ours.
            self._forks.byes.pop(_tag(msg.get("From") or ""), None)
            self._after_bye(step)
            self._reschedule()
            return message.serialise_response(msg, SipStatus.OK), step
        return message.serialise_response(msg, SipStatus.CALL_DOES_NOT_EXIST), step

    def on_timer(self, now: float) -> Step:
        """Whatever timers have passed by ``now``."""
        step = Step()
        if self._give_up_at is not None and now >= self._give_up_at:
            self._give_up(step)
        if self.phase is not Phase.DONE:
            if self._ring_end is not None and now >= self._ring_end:
                self._ring_end = None
                self._answer_by = None
                self._cancelled_by_us = True
                if self.phase is Phase.PROCEEDING:
                    self._cancel(now, step)
                else:
                    # It rang, then a challenge: the INVITE sent again has no provisional
                    # response yet, so no CANCEL may go (section 9.1); its late one is.
                    self._end(0, step)
            if self._answer_by is not None and now >= self._answer_by:
                self._answer_by = None
                self._ring_end = None
                self._timed_out = True
                if self._provisional:
                    self._cancel(now, step)
                # Without a provisional response no CANCEL may go (section 9.1): the outcome
                # is reported now; the INVITE goes on until timer B, and a late provisional
                # response is cancelled.
                self._end(0, step)
            _resend_byes(self._forks.byes, now, step.send)
            self._after_bye(step)
        if (
            self.phase is not Phase.DONE
            and self._retransmit_at is not None
            and now >= self._retransmit_at
        ):
            step.send.append(self._pending_out)
            cap = T2_S if self.phase is Phase.CANCELLING else TIMER_B_S
            self._interval = min(self._interval * 2, cap)
            self._retransmit_at = now + self._interval
        self._reschedule()
        return step

    def hang_up(self, now: float) -> Step:
        """The call is no longer wanted (its verification ended): cut the ring short.

        After a provisional response: CANCEL now, as at the end of the ring (the 487 is ACKed
        and ends the call). Before one no CANCEL may go (section 9.1): the call ends now as
        after the answer timeout, and a provisional response that still comes is cancelled.
        An answered or ending call goes on as it would.
        """
        step = Step()
        if self._answered or self.phase not in (Phase.CALLING, Phase.PROCEEDING):
            return step
        self._ring_end = self._answer_by = None
        if self.phase is Phase.PROCEEDING:
            self._cancelled_by_us = True
            self._cancel(now, step)
        else:
            self._timed_out = True
            self._end(0, step)
        self._reschedule()
        return step

    def abort(self, now: float) -> Step:
        """The service stops: cancel a call that rings, end it ``failed`` unless it has ended."""
        step = Step()
        if self.phase is Phase.PROCEEDING and self._provisional:
            self._cancel(now, step)
        if not self._ended:
            self._ended = True
            step.events.append(self._event(CallState.ENDED, 0, CallOutcome.FAILED))
        self.phase = Phase.DONE
        self._reschedule()
        return step

    @property
    def ack(self) -> bytes | None:
        """What the finished call keeps (see :class:`LateAnswers`): the last ACK sent for the
        current INVITE, else, once the call is done, the ACK its final error would get
        (To without a tag; never sent as it is). None before the end when no final came.

        The INVITE may end with no final response at all (timer B, or timer F of its CANCEL),
        and a challenged call's first ACK is of another INVITE (its CSeq and branch): a late
        2xx of the INVITE must still be matched, and ACKed and BYEd (RFC 3261 13.2.2.4)."""
        if self._ack is None and self.phase is Phase.DONE and self._branch:
            uri = self.spec.target_uri
            return self._request("ACK", uri, self._cseq, self._branch, to=f"<{uri}>")
        return self._ack

    @property
    def answered(self) -> bool:
        """True once a 2xx came (a 2xx of another fork may still come: ACK and BYE it)."""
        return self._answered

    @property
    def done(self) -> bool:
        """True once nothing more will be sent or reported for this call."""
        return self.phase is Phase.DONE

    # -- the INVITE transaction ---------------------------------------------------------------

    def _on_invite_response(
        self, msg: message.SipMessage, status: int, now: float, step: Step
    ) -> None:
        if status < 200:
            if self._answered:
                return  # overtaken by a 2xx, which ended the INVITE transaction
            if self.phase is Phase.CALLING:
                self.phase = Phase.PROCEEDING
                self._retransmit_at = None  # timer A stops on a provisional response
                self._give_up_at = None
            self._provisional = True
            if (self._timed_out or self._cancelled_by_us) and self.phase is Phase.PROCEEDING:
                self._cancel(now, step)  # the call ended before this came
                return
            if status in (SipStatus.RINGING, SipStatus.SESSION_PROGRESS) and not self._rang:
                self._rang = True
                if not self._ended:
                    step.events.append(self._event(CallState.RINGING, status, None))
                if self.phase is Phase.PROCEEDING:
                    self._ring_end = now + self.spec.ring_s
                    # The answer timeout waits for a first ring; from the ring on, the ring
                    # time ends the call (CLINIC_FLASHCALL_RING_S may be up to 60 s, longer
                    # than that wait: a call that rang was cut as no_answer, undeliverable).
                    self._answer_by = None
            return
        to = msg.get("To") or self._to_header
        if 200 <= status < 300:
            self._on_answer(msg, to, status, now, step)
            return
        # A final error (or the 487 after our CANCEL): ACK on the INVITE's branch.
        self._ack = self._request(
            "ACK", self.spec.target_uri, self._cseq, self._branch, to=to, extra=()
        )
        step.send.append(self._ack)
        self._acks[self._cseq, self._branch] = self._ack
        if self._answered:
            return  # the INVITE ended with the 2xx; the BYEs go on
        if (
            status in (401, 407)
            and not self._challenged
            and self.local.auth_user
            and not self._cancelled_by_us
            and not self._timed_out
        ):
            auth = self._authorization(msg, status)
            if auth is not None:
                self._challenged = True
                self._cseq += 1
                self._send_invite(now, step, auth=auth)
                return
        self._final_status = status
        self._end(status, step)
        self._done_with_transactions()

    def _on_earlier_invite(
        self, msg: message.SipMessage, number: int, now: float, step: Step
    ) -> None:
        """A response of the challenged INVITE (its CSeq number and branch), or of none of
        ours (nothing). Its final error again gets its ACK again. A 2xx of it (no proxy
        should send one after that INVITE's 401, but a phone is off hook) gets an ACK of its
        own and a BYE, as a fork's, bounded as those are, and no event: the 401's ACK, on the
        INVITE's branch, is no ACK for a 2xx (section 13.2.2.4)."""
        earlier = self._acks.get((number, _top_branch(msg)))
        if earlier is None or msg.status < 200:
            return
        if msg.status >= 300:
            step.send.append(earlier)
            return
        if self._forks.until is None:
            self._forks.until = now + TIMER_B_S  # the first 2xx of the call
        answered = self._forks.answer(
            msg,
            now,
            step.send,
            cseq=number,
            fallback_uri=self.spec.target_uri,
            new_branch=self._new_branch,
            request=self._request,
        )
        if answered is not None and answered[1] and self.phase is Phase.DONE:
            self.phase = Phase.HANGING_UP  # a kept call: done again once its BYE is answered

    def _on_answer(
        self, msg: message.SipMessage, to: str, status: int, now: float, step: Step
    ) -> None:
        """A 2xx: ACK it (a new transaction, to the remote target) and hang up with BYE.

        Each To tag is a dialog of its own (a forked INVITE, section 13.2.2.4): each gets
        its ACK and its BYE, also after the call ended."""
        first = not self._answered
        if first:
            self._forks.until = now + TIMER_B_S
        answered = self._forks.answer(
            msg,
            now,
            step.send,
            cseq=self._cseq,
            fallback_uri=self.spec.target_uri,
            new_branch=self._new_branch,
            request=self._request,
        )
        if answered is None:
            log.debug("flash call %s: ignored a 2xx of To tag %r", self.spec.call_id, _tag(to))
            return
        self._answered = True
        self._to_header = to
        self._ack, new = answered
        if not new and not first:
            return  # a retransmitted 2xx: the ACK again, the BYE is already on its way
        if first:
            if not self._ended:
                step.events.append(self._event(CallState.ANSWERED, status, None))
            self._final_status = status
        # The INVITE (or the CANCEL) transaction is over: only the BYEs are waited for.
        self._ring_end = self._answer_by = self._retransmit_at = self._give_up_at = None
        self.phase = Phase.HANGING_UP
        # A To tag a 2xx of the challenged INVITE opened: that dialog's BYE may be over.
        self._after_bye(step)

    def _after_bye(self, step: Step) -> None:
        """Every BYE answered (or given up): the answered call is over."""
        if self.phase is Phase.HANGING_UP and not self._forks.byes:
            self._finish(step)

    def _cancel(self, now: float, step: Step) -> None:
        """CANCEL the INVITE (same Request-URI, Call-ID, From, CSeq number and branch)."""
        if self.phase is not Phase.PROCEEDING:
            return
        self.phase = Phase.CANCELLING
        self._pending_out = self._request(
            "CANCEL", self.spec.target_uri, self._cseq, self._branch, to=f"<{self.spec.target_uri}>"
        )
        step.send.append(self._pending_out)
        self._interval = T1_S
        self._retransmit_at = now + T1_S
        self._give_up_at = now + TIMER_B_S  # timer F for the CANCEL, then no 487 either

    def _give_up(self, step: Step) -> None:
        """Timer B (no answer at all), F (CANCEL or BYE unanswered), or no 487."""
        self._give_up_at = None
        if self.phase is Phase.CALLING:
            self._final_status = SipStatus.REQUEST_TIMEOUT
            self._end(SipStatus.REQUEST_TIMEOUT, step)
        else:
            self._end(0, step)
        self._done_with_transactions()

    def _finish(self, step: Step) -> None:
        """The BYE is answered (or the far end hung up first): the answered call is over."""
        self._end(self._final_status, step)
        self._done_with_transactions()

    def _end(self, status: int, step: Step) -> None:
        if self._ended:
            return
        self._ended = True
        outcome = outcome_for_status(
            status,
            answered=self._answered,
            cancelled_by_us=self._cancelled_by_us,
            flash=True,
            timed_out=self._timed_out,
        )
        step.events.append(self._event(CallState.ENDED, status, outcome))

    def _done_with_transactions(self) -> None:
        # A BYE to a 2xx of the challenged INVITE may still be unanswered: waited for.
        self.phase = Phase.HANGING_UP if self._forks.byes else Phase.DONE
        self._retransmit_at = self._give_up_at = self._ring_end = self._answer_by = None

    def _reschedule(self) -> None:
        times = [
            t
            for t in (self._retransmit_at, self._give_up_at, self._ring_end, self._answer_by)
            if t is not None
        ]
        byes = self._forks.next_time()
        times += [byes] if byes is not None else []
        self.deadline = min(times) if times else None

    # -- building requests --------------------------------------------------------------------

    def _send_invite(self, now: float, step: Step, auth: tuple[str, str] | None) -> None:
        self.phase = Phase.CALLING
        self._branch = self._new_branch()
        self._ack = None  # the challenge's ACK is the earlier INVITE's (kept in _acks)
        extra: list[tuple[str, str]] = []
        if self.spec.pai:
            extra.append(("P-Asserted-Identity", f"<sip:{self.spec.caller_id}@{self.local.host}>"))
        if auth is not None:
            extra.append(auth)
        extra += [
            ("Contact", f"<sip:{self.spec.caller_id}@{self.local.host}:{self.local.port}>"),
            ("Allow", ALLOW),
            *self.spec.headers,
        ]
        self._pending_out = self._request(
            "INVITE",
            self.spec.target_uri,
            self._cseq,
            self._branch,
            to=f"<{self.spec.target_uri}>",
            extra=tuple(extra),
        )
        step.send.append(self._pending_out)
        self._interval = T1_S
        self._retransmit_at = now + T1_S
        self._give_up_at = now + TIMER_B_S
        self._reschedule()

    def _request(
        self,
        method: str,
        uri: str,
        cseq: int,
        branch: str,
        *,
        to: str,
        extra: _Headers = (),
    ) -> bytes:
        return _build_request(
            method,
            uri,
            cseq,
            branch,
            local=self.local,
            from_=f"<sip:{self.spec.caller_id}@{self.local.host}>;tag={self._from_tag}",
            to=to,
            call_id=self.sip_call_id,
            extra=extra,
        )

    def _new_branch(self) -> str:
        return "z9hG4bK" + self._token()

    def _authorization(self, msg: message.SipMessage, status: int) -> tuple[str, str] | None:
        want, answer = (
            ("WWW-Authenticate", "Authorization")
            if status == 401
            else ("Proxy-Authenticate", "Proxy-Authorization")
        )
        try:
            value = digest.answer(
                msg.get_all(want),
                method="INVITE",
                uri=self.spec.target_uri,
                user=self.local.auth_user,
                password=self.local.password,
                cnonce=self._token(),
                realm=self.local.realm,
            )
        except digest.DigestError as exc:
            log.warning(
                "flash call %s: cannot answer the %s challenge: %s", self.spec.call_id, status, exc
            )
            return None
        return answer, value

    def _event(self, state: CallState, status: int, outcome: CallOutcome | None) -> CallEvent:
        return CallEvent(self.spec.call_id, state, status, outcome, self._wall())


class LateAnswers:
    """The responses that come after a call ended without an answer (cancelled after the
    ring, no answer, a final error, timer B or F): a final error of its INVITE sent again
    gets its ACK again, and 2xx s of forks of that INVITE get their ACK and BYE. A forking
    proxy forwards every fork's 2xx, also one that comes after the 487 (RFC 3261 9.1,
    13.2.2.4), a 2xx may come after timer B or F gave up on the INVITE or its CANCEL, and
    each such phone is off hook until its 2xx gets an ACK and a BYE.

    Built from :attr:`FlashDialog.ack`, which the caller keeps for timer D anyway: a
    non-2xx ACK of the last INVITE (the one sent, or one built for it when no final came)
    carries the INVITE's Request-URI, our From with its tag, the Call-ID, the INVITE's CSeq
    number and its branch (section 17.1.1.3), all that a response is matched by and that its
    ACK and BYE need besides what the 2xx brings (its To tag, its Contact as Request-URI, its
    Record-Route reversed as Route: sections 12.1.2, 12.2.1.1, 13.2.2.4). So a finished call
    keeps one ACK; this object holds state only once such a 2xx comes. Each new To tag (at
    most ``MAX_FORKS``, none at or after ``until``) gets an ACK (CSeq number of the INVITE, a
    new branch) and a BYE (the next CSeq number), the BYE on timer E until answered or timer
    F, as :class:`FlashDialog` does for an answered call; a retransmitted 2xx gets its ACK
    again. It reports no event: the call's outcome was final when it ended.
    """

    __slots__ = (
        "_branch",
        "_call_id",
        "_cseq",
        "_forks",
        "_from",
        "_local",
        "_token",
        "_uri",
        "deadline",
    )

    def __init__(self, ack: bytes, local: Local, *, until: float, token: Callable[[], str]) -> None:
        request = message.parse(ack)
        self._uri = request.uri
        self._from = request.get("From") or ""
        self._call_id = request.get("Call-ID") or ""
        self._cseq = cseq_of(request)[0]
        self._branch = _top_branch(request)
        self._local = local
        self._token = token
        self._forks = _Forks(until)  # no new fork at or after (64*T1 after the call ended)
        self.deadline: float | None = None  # when :meth:`on_timer` is wanted

    @property
    def answered(self) -> bool:
        """True once a 2xx of the INVITE got its ACK and BYE here."""
        return bool(self._forks.answers)

    @property
    def busy_until(self) -> float | None:
        """When the last unanswered BYE is given up (timer F); None with none."""
        return max((b.give_up_at for b in self._forks.byes.values()), default=None)

    def on_response(self, msg: message.SipMessage, now: float) -> list[bytes]:
        """A response with the call's Call-ID: what to send to the INVITE's next hop.

        Only a final response of the INVITE (its CSeq number and branch) gets anything: a
        2xx its ACK and BYE, a final error (sent again: our ACK was lost, or it came after
        timer B or F) its ACK on the INVITE's branch with the response's To (17.1.1.3). A
        response to a CANCEL or a BYE is never ACKed (only an INVITE's final is, 17.1.1),
        and one of another transaction is no business of ours."""
        send: list[bytes] = []
        number, method = cseq_of(msg)
        status = msg.status
        if method == "BYE" and status >= 200:
            _answered_by(self._forks.byes, msg)
        elif method == "INVITE" and number == self._cseq and _top_branch(msg) == self._branch:
            if 200 <= status < 300:
                self._on_answer(msg, now, send)
            elif status >= 300:
                to = msg.get("To") or ""
                send.append(self._request("ACK", self._uri, self._cseq, self._branch, to=to))
        self._reschedule()
        return send

    def on_timer(self, now: float) -> list[bytes]:
        """The BYEs due again by ``now`` (timer E); those past timer F are dropped."""
        send: list[bytes] = []
        _resend_byes(self._forks.byes, now, send)
        self._reschedule()
        return send

    def _on_answer(self, msg: message.SipMessage, now: float, send: list[bytes]) -> None:
        answered = self._forks.answer(
            msg,
            now,
            send,
            cseq=self._cseq,
            fallback_uri=self._uri,
            new_branch=lambda: "z9hG4bK" + self._token(),
            request=self._request,
        )
        if answered is None:
            tag = _tag(msg.get("To") or "")
            log.debug("flash call %s: ignored a late 2xx of To tag %r", self._call_id, tag)

    def _request(
        self,
        method: str,
        uri: str,
        cseq: int,
        branch: str,
        *,
        to: str,
        extra: _Headers = (),
    ) -> bytes:
        return _build_request(
            method,
            uri,
            cseq,
            branch,
            local=self._local,
            from_=self._from,
            to=to,
            call_id=self._call_id,
            extra=extra,
        )

    def _reschedule(self) -> None:
        self.deadline = self._forks.next_time()
