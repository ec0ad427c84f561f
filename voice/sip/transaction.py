"""The final answers the redirect front gave to server transactions (RFC 3261 section
17.2), remembered for Timer H (INVITE) or Timer J (others) so a retransmission gets the
same answer. No I/O.

The front keeps no call, but its answers are not free of state: a 302 reserves a worker's
slot and a 486 counts a caller turned away. A UAC whose answer was lost retransmits the
same INVITE (Timer A: 0.5, 1, 2, 4, ... s, for Timer B = 64*T1 = 32 s); answered anew it
was counted as refused twice, or sent to a worker (a second slot) although it had been
refused, and each copy carried another To tag. Section 17.2.1: a retransmitted INVITE gets
the transaction's last response again, and section 8.2.7: the same To tag.

A retransmission is recognised as section 17.2.3 matches requests to a server transaction:
the top Via's branch (with the RFC 3261 magic cookie) and sent-by, plus the Call-ID and
CSeq number (a UA that reuses a branch in another call is not taken for a retransmission).
Without the magic cookie (RFC 2543), by the top Via, Request-URI, From tag, To tag, Call-ID
and CSeq number, as section 17.2.3 says for such peers. A request other than INVITE and ACK
has a transaction of its own (its method is part of the key): a CANCEL carries the branch of
the INVITE it cancels, and is matched to that INVITE's transaction by :func:`invite_key`
(section 9.2). Non-INVITE answers are remembered too (sections 8.2.7 and 17.2.2: a
retransmitted OPTIONS, CANCEL or BYE gets the same response, To tag included), in a memory of
their own, so a flood of OPTIONS cannot push the INVITE answers out. So are the 400s to
requests that lack a header every request needs (section 8.1.1), INVITEs included: such a
request may have no Call-ID or CSeq, so its key (:func:`incomplete_key`) holds what it has,
and it goes to that memory so a flood of broken INVITEs cannot push the real ones out either.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from sip_config.clock import Clock
from sip_config.settings import HostPort
from voice.sip.message import SipMessage

T1_S = 0.5  # RFC 3261 section 17.1.1.1: the RTT estimate
TIMER_H_S = 64 * T1_S  # 32 s: a UAC retransmits an INVITE for Timer B = 64*T1 at most
TIMER_J_S = 64 * T1_S  # 32 s: and any other request for Timer F = 64*T1 (over UDP)
# The most answers remembered: 400 INVITEs a second (above what the workers take) for 32 s
# is 12,800. Past this the oldest go first: a retransmission of one of them is answered
# anew, as before this memory existed. About 300 bytes each.
MAX_REMEMBERED = 32768
_MAGIC_COOKIE = "z9hG4bK"


@dataclass(frozen=True, slots=True)
class TransactionKey:
    """What identifies a server transaction (section 17.2.3)."""

    via: str  # branch and sent-by of the top Via, or the whole top Via (RFC 2543)
    call_id: str
    cseq: str  # the CSeq number (the ACK of a non-2xx has the INVITE's)
    rfc2543: str = ""  # Request-URI, From tag, To tag (RFC 2543 peers only)
    method: str = ""  # "" for an INVITE and its ACK, else the request's method
    incomplete: bool = False  # answered 400 for a missing header (:func:`incomplete_key`)


@dataclass(frozen=True, slots=True)
class FinalAnswer:
    """The front's answer to a request: for an INVITE the worker it was sent to, or the
    status that refused it (486, 503); for another request its status; the To tag of that
    response; and a 503's Retry-After (0: none), so that a copy of the request gets the very
    same response (RFC 3261 section 17.2.1), not one read from the pool's state by then."""

    target: HostPort | int
    to_tag: str
    retry_after_s: int = 0


def _params(value: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in value.split(";")[1:]:
        name, _, val = part.partition("=")
        out[name.strip().lower()] = val.strip()
    return out


def key_of(request: SipMessage) -> TransactionKey | None:
    """The transaction ``request`` belongs to; None without a Via, Call-ID or CSeq."""
    if not request.get("Via") or not request.get("Call-ID") or not request.get("CSeq"):
        return None
    return _key(request, incomplete=False)


def incomplete_key(request: SipMessage) -> TransactionKey | None:
    """The transaction of ``request``, which lacks a header every request needs (section
    8.1.1) and is answered 400; None without a Via (no response can be sent).

    Section 17.2.3 matches a request to its transaction by the top Via's branch and
    sent-by (and method) alone, so a Call-ID or CSeq that is missing is just left out of
    the key. The key is marked ``incomplete``: a complete request with the same branch is
    a different message, and neither gets the other's answer.
    """
    if not request.get("Via"):
        return None
    return _key(request, incomplete=True)


def _key(request: SipMessage, *, incomplete: bool) -> TransactionKey:
    top = (request.get("Via") or "").split(",", 1)[0].strip()  # "a, b" is two (7.3.1)
    call_id = request.get("Call-ID") or ""
    cseq = (request.get("CSeq") or "").split()
    number = cseq[0] if cseq else ""
    method = "" if request.method in ("INVITE", "ACK") else request.method
    branch = _params(top).get("branch", "")
    if branch.startswith(_MAGIC_COOKIE):
        # sent-by: what follows "SIP/2.0/UDP " up to the parameters; host names are
        # case-insensitive (section 19.1.4), the branch is not.
        # ("Via: ;branch=z9hG4bK..." has none: "", not an IndexError out of the front.)
        sent_by = (top.split(";", 1)[0].split(None, 1) or [""])[-1].strip().lower()
        return TransactionKey(
            f"{branch} {sent_by}", call_id, number, method=method, incomplete=incomplete
        )
    from_tag = _params(request.get("From") or "").get("tag", "")
    to_tag = _params(request.get("To") or "").get("tag", "")
    rfc2543 = f"{request.uri} {from_tag} {to_tag}"
    return TransactionKey(top, call_id, number, rfc2543, method, incomplete)


def invite_key(cancel: TransactionKey) -> TransactionKey:
    """The INVITE transaction a CANCEL with key ``cancel`` cancels (section 9.2: the same
    top Via branch and sent-by, Call-ID and CSeq number; for RFC 2543 peers also the same
    Request-URI, From and To)."""
    return TransactionKey(cancel.via, cancel.call_id, cancel.cseq, cancel.rfc2543)


class AnsweredRequests:
    """The final answers of the last ``keep_s`` seconds (Timer H or J), at most ``limit``.

    Kept in the order given; with one lifetime for all, that is also the order they expire
    in, so each look-up drops the expired ones from the front (amortised O(1); an
    OrderedDict, since a plain dict's first item is found by skipping the deleted ones).
    """

    def __init__(
        self, clock: Clock, *, keep_s: float = TIMER_H_S, limit: int = MAX_REMEMBERED
    ) -> None:
        self._clock = clock
        self._keep_s = keep_s
        self._limit = limit
        self._answers: OrderedDict[TransactionKey, tuple[float, FinalAnswer]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: TransactionKey) -> FinalAnswer | None:
        """The answer given to ``key`` within the last ``keep_s`` seconds, if any."""
        self._expire()
        entry = self._answers.get(key)
        return entry[1] if entry is not None else None

    def kept_for(self, key: TransactionKey) -> float:
        """How many seconds more the answer to ``key`` is remembered (0 if it is not)."""
        self._expire()
        entry = self._answers.get(key)
        return max(0.0, entry[0] - self._clock.monotonic()) if entry is not None else 0.0

    def remember(self, key: TransactionKey, answer: FinalAnswer) -> None:
        """Remember ``answer`` for ``key`` (the oldest one goes when ``limit`` are kept)."""
        self._expire()
        self._answers.pop(key, None)  # at the end again, in expiry order
        while len(self._answers) >= self._limit:
            self._answers.popitem(last=False)
        self._answers[key] = (self._clock.monotonic() + self._keep_s, answer)

    def _expire(self) -> None:
        now = self._clock.monotonic()
        answers = self._answers
        while answers:
            key = next(iter(answers))
            if answers[key][0] > now:
                return
            answers.popitem(last=False)
