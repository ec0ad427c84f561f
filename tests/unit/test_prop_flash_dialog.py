"""One flash call's SIP state machine under generated far ends (pure, hypothesis stateful).

A far end that answers whatever the dialog sent: provisional responses (with and without a To
tag, several tags = forked), finals of every class (2xx with and without SDP, 3xx, 401/407
challenges, 486, 487, 5xx, 603), responses to the CANCEL and the BYE (2xx or error, or none),
copies of any response already delivered, responses of another transaction (wrong branch,
CSeq number or method), 2xx s after the call ended (after a 487 or a final error, after timer
B or F, after a second, challenged INVITE), and time moving past the dialog's deadlines.

Responses after the end go where :class:`~voice.sip.flash_uac.FlashUac` sends them: an
answered call's dialog is kept, an unanswered one keeps :attr:`FlashDialog.ack` only, and its
responses go to a :class:`LateAnswers` made from it, until timer D (or its last BYE's timer F).

Checked after every input: RFC 3261 17.1.1 (timers A, B), 9.1 (no CANCEL before a
provisional response), 13.2.2.4 and 17.1.1.3 (the ACKs, only for an INVITE's final; every
2xx of a new To tag ACKed and BYEd within 64*T1 of the first 2xx, or of the end), one final
outcome, and that the call ends within 64*T1 of what it waits for.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from voice.sip import message
from voice.sip.flash_dialog import (
    T1_S,
    TIMER_B_S,
    TIMER_D_S,
    FlashDialog,
    LateAnswers,
    Local,
    Step,
)
from voice.sip.outcome import CallOutcome, outcome_for_status
from voice.sip.protocol import CallEvent, CallState, PlaceCall

TARGET = "sip:+14155556001@127.0.0.1:5160"
T0 = 1000.0
TAGS = ["a", "b", "c"]
SDP = (
    b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 4000 RTP/AVP 0\r\n"
)
FINAL_ERRORS = [300, 302, 403, 404, 480, 486, 487, 488, 500, 503, 600, 603, 604]
CHALLENGE = {
    401: ("WWW-Authenticate", 'Digest realm="asterisk", nonce="n1", qop="auth"'),
    407: ("Proxy-Authenticate", 'Digest realm="asterisk", nonce="n2"'),
}


def _branch(msg: message.SipMessage) -> str:
    m = re.search(r"branch=([^;,\s]+)", msg.get("Via") or "")
    return m.group(1) if m else ""


def _to_tag(msg: message.SipMessage) -> str:
    m = re.search(r";tag=([^;,\s]+)", msg.get("To") or "")
    return m.group(1) if m else ""


def _response(
    request: message.SipMessage,
    status: int,
    tag: str = "",
    extra: tuple[tuple[str, str], ...] = (),
    sdp: bool = False,
) -> bytes:
    raw = message.serialise_response(request, status, to_tag=tag, extra=extra)
    if sdp:
        raw = raw.replace(
            b"Content-Length: 0\r\n\r\n",
            b"Content-Type: application/sdp\r\nContent-Length: %d\r\n\r\n" % len(SDP) + SDP,
        )
    return raw


@dataclass
class Invite:
    """One INVITE client transaction we saw leave."""

    msg: message.SipMessage
    raw: bytes
    sent_at: float
    answered_at: float | None = None  # the first response (timer A stops)
    provisional: bool = False
    final: int = 0  # the first final status, 0 while none
    cancel: message.SipMessage | None = None
    cancel_at: float = 0.0
    cancel_answered: bool = False
    acked_2xx: set[str] = field(default_factory=set)  # To tags


@dataclass
class Bye:
    msg: message.SipMessage
    raw: bytes
    sent_at: float
    answered: bool = False


class FlashCallMachine(RuleBasedStateMachine):
    """One FlashDialog and a far end that answers what it sends."""

    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.invites: list[Invite] = []
        self.byes: dict[str, Bye] = {}  # To tag of the 2xx -> its BYE
        self.delivered: list[bytes] = []
        self.acks: list[bytes] = []
        self.events: list[CallEvent] = []
        self.answered_tags: list[str] = []
        self.first_2xx_at: float | None = None  # new To tags only within 64*T1 of it
        self.call_answered = False  # a 2xx of the current INVITE (not of the challenged one)
        self.hung_up = False
        self.ended_at: float | None = None
        self.last_input = T0
        # After an unanswered end, as the agent keeps it: the ACK, until when, its forks.
        self.kept_ack: bytes | None = None
        self.kept_until = 0.0  # the agent's entry expires (timer D, or a late BYE's timer F)
        self.kept_ack_until = 0.0  # a new To tag's 2xx counts before (timer D from the end)
        self.late: LateAnswers | None = None
        self.late_tokens = itertools.count(1)
        self.done_before = False

    # -- set-up ------------------------------------------------------------------------------

    @initialize(
        creds=st.booleans(),
        ring_s=st.sampled_from([1.0, 3.0, 10.0]),
        answer_s=st.sampled_from([2.0, 20.0, 45.0]),
    )
    def place(self, creds: bool, ring_s: float, answer_s: float) -> None:
        counter = itertools.count(1)
        self.ring_s, self.answer_s = ring_s, answer_s
        self.local = Local("127.0.0.1", 5999, "trunk" if creds else "", "secret" if creds else "")
        self.dialog = FlashDialog(
            PlaceCall("flash-1", TARGET, "+447400123456", True, ring_s, answer_s, True),
            self.local,
            token=lambda: f"{next(counter):016x}",
            wall=lambda: 1.8e9,
        )
        self.feed(self.dialog.start(self.now), "start")

    # -- checking one step ---------------------------------------------------------------------

    @property
    def current(self) -> Invite:
        return self.invites[-1]

    def ended(self) -> bool:
        return any(e.state is CallState.ENDED for e in self.events)

    def feed(self, step: Step, why: str, response: message.SipMessage | None = None) -> None:
        """Check what one input produced, against the RFC and the model."""
        was_done = self.done_before  # done before this input (the step is its output)
        sent = [(raw, message.parse(raw)) for raw in step.send]
        methods = [m.method for _, m in sent]
        for raw, req in sent:
            assert req.is_request and req.get("Call-ID") == self.dialog.sip_call_id
            assert req.body == b"", "no SDP is ever sent"
            if req.method == "INVITE":
                self.on_invite_sent(raw, req, why, response, was_done)
            elif req.method == "CANCEL":
                self.on_cancel_sent(req, was_done)
            elif req.method == "BYE":
                self.on_bye_sent(raw, req, why, response)
            elif req.method == "ACK":
                self.on_ack_sent(raw, req, response)
            else:
                raise AssertionError(f"sent a {req.method}")
        if response is not None and response.status >= 200:
            self.check_final_acked(response, methods, sent)
        for ev in step.events:
            self.on_event(ev, why, response)
        self.events += step.events
        if self.dialog.done:
            assert self.dialog.deadline is None, "a finished call has no timer"
            assert self.ended(), "a call is done only once it reported its end"
            if not was_done and not self.dialog.answered:
                # Retired unanswered: the agent keeps this ACK for timer D, nothing else.
                self.kept_ack = self.dialog.ack
                assert self.kept_ack is not None, "an ended call keeps what a late 2xx needs"
                self.kept_until = self.kept_ack_until = self.now + TIMER_D_S
        else:
            assert self.dialog.deadline is not None, "a live call waits for nothing: it hangs"
        self.done_before = self.dialog.done

    def on_invite_sent(
        self,
        raw: bytes,
        req: message.SipMessage,
        why: str,
        response: message.SipMessage | None,
        was_done: bool,
    ) -> None:
        assert not was_done, "an INVITE after the call was done"
        if self.invites and raw == self.current.raw:
            inv = self.current
            assert why == "timer", "the INVITE is retransmitted on timer A only"
            assert inv.answered_at is None, "timer A goes on after a response"
            assert self.now < inv.sent_at + TIMER_B_S + 1e-9, "timer A goes on after timer B"
            return
        if self.invites:  # a new INVITE: only with credentials, after the first challenge
            assert response is not None and response.status in CHALLENGE, why
            assert len(self.invites) == 1, "a second challenge is final"
            assert not self.hung_up
            assert req.get("Authorization") or req.get("Proxy-Authorization")
        self.invites.append(Invite(req, raw, self.now))

    def on_cancel_sent(self, req: message.SipMessage, was_done: bool) -> None:
        assert not was_done, "a CANCEL after the call was done"
        inv = self.current
        assert inv.provisional, "no CANCEL before a provisional response (9.1)"
        assert inv.final == 0, "no CANCEL after a final response"
        assert _branch(req) == _branch(inv.msg), "the CANCEL has the INVITE's branch"
        assert (req.get("CSeq") or "").split()[0] == (inv.msg.get("CSeq") or "").split()[0]
        if inv.cancel is None:
            inv.cancel, inv.cancel_at = req, self.now
            return
        assert not inv.cancel_answered, "timer E goes on after the CANCEL's response"
        assert self.now < inv.cancel_at + TIMER_B_S + 1e-9, "timer E goes on after timer F"

    def on_bye_sent(
        self, raw: bytes, req: message.SipMessage, why: str, response: message.SipMessage | None
    ) -> None:
        tag = _to_tag(req)
        bye = self.byes.get(tag)
        if bye is None:
            assert tag in self.answered_tags, "a BYE for a dialog never answered"
            self.byes[tag] = Bye(req, raw, self.now)
            return
        assert raw == bye.raw and why == "timer", "a second BYE in one dialog"
        assert not bye.answered, "the BYE is retransmitted after its response"
        assert self.now < bye.sent_at + TIMER_B_S + 1e-9, "the BYE goes on after timer F"

    def on_ack_sent(
        self, raw: bytes, req: message.SipMessage, response: message.SipMessage | None
    ) -> None:
        assert response is not None and response.status >= 200, "an ACK for no final response"
        cseq = (response.get("CSeq") or "").split()
        assert cseq[1:] == ["INVITE"], f"an ACK for a {response.status} to a {cseq[1:]}"
        self.acks.append(raw)
        if not any(_branch(response) == _branch(i.msg) for i in self.invites):
            # Another transaction's final with a CSeq of a challenged INVITE: its ACK again.
            assert raw in self.acks[:-1], "an ACK for another transaction's response"
            return
        assert _to_tag(req) == _to_tag(response), "the ACK's To is the response's"

    def check_final_acked(
        self,
        response: message.SipMessage,
        methods: list[str],
        sent: list[tuple[bytes, message.SipMessage]],
    ) -> None:
        cseq = (response.get("CSeq") or "").split()
        ours = [i for i in self.invites if i.msg.get("CSeq") == " ".join(cseq)]
        if len(cseq) != 2 or cseq[1] != "INVITE" or not ours:
            assert "ACK" not in methods, "only an INVITE's final response is ACKed (17.1.1)"
            return
        inv = ours[0]
        if _branch(response) != _branch(inv.msg):
            return  # another transaction's: ignored
        if self.kept_ack is not None and inv is not self.current:
            # After an unanswered end only the last INVITE's ACK is kept: a challenged
            # INVITE's final again (it had its ACK) gets nothing.
            assert not methods, f"a {response.status} of the challenged INVITE got {methods}"
            return
        late = _to_tag(response) not in self.answered_tags
        if 200 <= response.status < 300 and late:
            assert not methods, "a 2xx of a new To tag 64*T1 after the first one is no dialog"
            return
        acks = [m for _, m in sent if m.method == "ACK"]
        assert len(acks) == 1, f"a {response.status} got {methods}"
        (ack,) = acks
        assert ack.get("CSeq") == f"{cseq[0]} ACK"
        if 200 <= response.status < 300:
            assert _branch(ack) != _branch(inv.msg), "a 2xx ACK is a transaction of its own"
            tag = _to_tag(response)
            assert tag in self.byes, f"the 2xx of {tag!r} is not hung up"
        else:
            assert _branch(ack) == _branch(inv.msg), "a non-2xx ACK has the INVITE's branch"
            assert ack.uri == inv.msg.uri

    def on_event(self, ev: CallEvent, why: str, response: message.SipMessage | None) -> None:
        assert ev.call_id == "flash-1"
        assert not self.ended(), f"{ev} after the end"
        if ev.state is CallState.TRYING:
            assert why == "start" and not self.events
        elif ev.state is CallState.RINGING:
            states = [e.state for e in self.events]
            assert CallState.RINGING not in states, "ringing twice"
            assert CallState.ANSWERED not in states, "ringing after the answer"
            assert response is not None and response.status in (180, 183)
        elif ev.state is CallState.ANSWERED:
            assert response is not None and 200 <= response.status < 300
            assert CallState.ANSWERED not in [e.state for e in self.events]
        else:
            assert ev.state is CallState.ENDED and ev.outcome is not None
            self.ended_at = self.now
            self.check_outcome(ev, response)

    def check_outcome(self, ev: CallEvent, response: message.SipMessage | None) -> None:
        assert ev.outcome is not None
        answered = self.call_answered
        cancelled = any(i.cancel is not None for i in self.invites)
        assert ev.outcome == outcome_for_status(
            ev.sip_status,
            answered=answered,
            cancelled_by_us=ev.outcome is CallOutcome.CANCELLED_AFTER_RING,
            flash=True,
            timed_out=ev.outcome is CallOutcome.NO_ANSWER,
        )
        if answered:
            assert ev.outcome is CallOutcome.ANSWERED
        elif (
            response is not None
            and response.status >= 300
            and not cancelled
            and not self.hung_up
            and self.now < T0 + self.answer_s
        ):
            assert ev.sip_status == response.status
            assert ev.outcome == outcome_for_status(
                response.status, answered=False, cancelled_by_us=False, flash=True
            )
        elif cancelled:
            assert ev.outcome in (CallOutcome.CANCELLED_AFTER_RING, CallOutcome.NO_ANSWER), ev
        if ev.outcome is CallOutcome.CANCELLED_AFTER_RING and not self.hung_up:
            assert any(e.state is CallState.RINGING for e in self.events), "cancelled, not rung"

    # -- the far end ---------------------------------------------------------------------------

    def deliver(self, raw: bytes) -> None:
        self.delivered.append(raw)
        msg = message.parse(raw)
        self.last_input = self.now
        if self.kept_ack is not None and (msg.status < 200 or self.now >= self.kept_until):
            return  # the agent has no live call for it, or no longer keeps the finished one
        cseq = (msg.get("CSeq") or "").split()
        for inv in self.invites:
            if cseq == (inv.msg.get("CSeq") or "").split() and _branch(msg) == _branch(inv.msg):
                inv.answered_at = inv.answered_at or self.now
                if msg.status < 200:
                    inv.provisional = inv.provisional or inv.final == 0
                elif inv.final == 0:
                    inv.final = msg.status
                if 200 <= msg.status < 300 and (inv is self.current or self.kept_ack is None):
                    tag = _to_tag(msg)
                    if self.kept_ack is not None:  # after an unanswered end: timer D from it
                        late = self.now >= self.kept_ack_until
                    else:
                        if self.first_2xx_at is None:
                            self.first_2xx_at = self.now
                        late = self.now >= self.first_2xx_at + TIMER_B_S  # 13.2.2.4
                    if tag not in self.answered_tags and not late:
                        self.answered_tags.append(tag)
                        self.call_answered |= inv is self.current
            cancel = inv.cancel
            if cancel is not None and _branch(msg) == _branch(cancel):
                inv.cancel_answered |= cseq == (cancel.get("CSeq") or "").split()
        for bye in self.byes.values():
            if cseq == (bye.msg.get("CSeq") or "").split() and _branch(msg) == _branch(bye.msg):
                bye.answered = True
        if self.kept_ack is None:
            self.feed(self.dialog.on_response(msg, self.now), "response", msg)
            return
        # As the agent: a LateAnswers from the kept ACK, kept once a 2xx of the INVITE came.
        answers = self.late or LateAnswers(
            self.kept_ack,
            self.local,
            until=self.kept_ack_until,
            token=lambda: f"late{next(self.late_tokens):012x}",
        )
        self.feed(Step(send=answers.on_response(msg, self.now)), "response", msg)
        if answers.answered:
            self.late = answers
            self.kept_until = max(self.kept_until, answers.busy_until or 0.0)

    def invite_open(self) -> bool:
        return bool(self.invites) and self.current.final == 0

    @precondition(lambda self: bool(self.invites) and self.current.final in (0, 200, 202))
    @rule(status=st.sampled_from([100, 180, 183]), tag=st.sampled_from(["", *TAGS]))
    def provisional(self, status: int, tag: str) -> None:
        """A provisional response (also one overtaken by the 2xx on the way)."""
        self.deliver(_response(self.current.msg, status, tag if status != 100 else ""))

    @precondition(lambda self: self.invite_open())
    @rule(status=st.sampled_from(FINAL_ERRORS), tag=st.sampled_from(TAGS))
    def final_error(self, status: int, tag: str) -> None:
        self.deliver(_response(self.current.msg, status, tag))

    @precondition(lambda self: self.invite_open())
    @rule(status=st.sampled_from([401, 407]), tag=st.sampled_from(TAGS))
    def challenge(self, status: int, tag: str) -> None:
        self.deliver(_response(self.current.msg, status, tag, (CHALLENGE[status],)))

    @precondition(lambda self: bool(self.invites) and self.current.final in (0, 200))
    @rule(
        status=st.sampled_from([200, 202]),
        tag=st.sampled_from(TAGS),
        sdp=st.booleans(),
        rr=st.booleans(),
    )
    def answer(self, status: int, tag: str, sdp: bool, rr: bool) -> None:
        """A 2xx: alone, racing the CANCEL, or from another fork after the first."""
        extra = [("Contact", f"<sip:6001@127.0.0.1:4000{TAGS.index(tag)}>")]
        if rr:
            extra.append(("Record-Route", "<sip:proxy;lr>"))
        self.deliver(_response(self.current.msg, status, tag, tuple(extra), sdp))

    @precondition(lambda self: self.dialog.done and not self.dialog.answered)
    @rule(tag=st.sampled_from(TAGS), rr=st.booleans())
    def answer_after_the_end(self, tag: str, rr: bool) -> None:
        """A fork's 2xx after an unanswered end (a 487, a final error, timer B or F, a
        second INVITE after a challenge): the agent has only the ACK kept for it."""
        extra = [("Contact", f"<sip:6001@127.0.0.1:4000{TAGS.index(tag)}>")]
        if rr:
            extra.append(("Record-Route", "<sip:proxy;lr>"))
        self.deliver(_response(self.current.msg, 200, tag, tuple(extra)))

    @precondition(lambda self: len(self.invites) == 2)
    @rule(tag=st.sampled_from(TAGS))
    def answer_challenged_invite(self, tag: str) -> None:
        """A 2xx of the first INVITE after its 401 (no proxy should; a phone is off hook)."""
        extra = (("Contact", f"<sip:6001@127.0.0.1:4000{TAGS.index(tag)}>"),)
        # Its own To tags: the same tag again would be the same dialog (12).
        self.deliver(_response(self.invites[0].msg, 200, f"first-{tag}", extra))

    @precondition(lambda self: any(i.cancel is not None for i in self.invites))
    @rule(status=st.sampled_from([200, 408, 481, 500]))
    def cancel_answered(self, status: int) -> None:
        cancel = next(i.cancel for i in reversed(self.invites) if i.cancel is not None)
        assert cancel is not None
        self.deliver(_response(cancel, status, "a"))

    @precondition(lambda self: bool(self.byes))
    @rule(data=st.data(), status=st.sampled_from([200, 408, 481, 500]))
    def bye_answered(self, data: st.DataObject, status: int) -> None:
        tag = data.draw(st.sampled_from(sorted(self.byes)))
        self.deliver(_response(self.byes[tag].msg, status))

    @precondition(lambda self: bool(self.delivered))
    @rule(data=st.data())
    def retransmitted(self, data: st.DataObject) -> None:
        self.deliver(data.draw(st.sampled_from(self.delivered)))

    @rule(
        status=st.sampled_from([180, 200, 486, 487]),
        wrong=st.sampled_from(["branch", "cseq", "method"]),
    )
    def another_transaction(self, status: int, wrong: str) -> None:
        raw = _response(self.current.msg, status, "x")
        if wrong == "branch":
            raw = raw.replace(b"branch=z9hG4bK", b"branch=z9hG4bKother")
        elif wrong == "cseq":
            raw = re.sub(rb"CSeq: \d+", b"CSeq: 77", raw)
        else:
            raw = re.sub(rb"(CSeq: \d+) INVITE", rb"\1 OPTIONS", raw)
        self.deliver(raw)

    @precondition(lambda self: bool(self.answered_tags))
    @rule(data=st.data())
    def far_end_hangs_up(self, data: st.DataObject) -> None:
        tag = data.draw(st.sampled_from(self.answered_tags))
        inv = self.current.msg
        raw = (
            "BYE sip:x@127.0.0.1:5999 SIP/2.0\r\n"
            "Via: SIP/2.0/UDP 127.0.0.1:4000;branch=z9hG4bKf\r\n"
            f"From: <sip:6001@127.0.0.1>;tag={tag}\r\nTo: {inv.get('From')}\r\n"
            f"Call-ID: {inv.get('Call-ID')}\r\nCSeq: 9 BYE\r\nContent-Length: 0\r\n\r\n"
        )
        self.last_input = self.now
        if self.kept_ack is not None:
            # A late fork after an unanswered end: the agent answers a BYE of a finished
            # call 200 without state; our BYE goes on until the far end answers it.
            return
        reply, step = self.dialog.on_request(message.parse(raw.encode()), self.now)
        assert reply is not None and message.parse(reply).status == 200
        if tag in self.byes:
            self.byes[tag].answered = True  # its BYE is no longer needed
        self.feed(step, "far_bye")

    @rule()
    def hang_up(self) -> None:
        self.hung_up = True
        self.last_input = self.now
        self.feed(self.dialog.hang_up(self.now), "hang_up")

    # -- time ----------------------------------------------------------------------------------

    def next_time(self) -> float | None:
        late = self.late.deadline if self.late is not None else None
        return min((t for t in (self.dialog.deadline, late) if t is not None), default=None)

    def run_timers(self, until: float) -> None:
        while (due := self.next_time()) is not None and due <= until:
            self.now = max(self.now, due)
            if self.dialog.deadline is not None and self.dialog.deadline <= self.now:
                self.feed(self.dialog.on_timer(self.now), "timer")
            late = self.late
            if late is not None and late.deadline is not None and late.deadline <= self.now:
                self.feed(Step(send=late.on_timer(self.now)), "timer")
        self.now = max(self.now, until)

    @rule(dt=st.sampled_from([0.01, 0.3, 0.5, 1.0, 2.0, 4.0, 10.0, 33.0]))
    def wait(self, dt: float) -> None:
        self.run_timers(self.now + dt)

    @precondition(lambda self: self.next_time() is not None)
    @rule(late=st.sampled_from([0.0, 0.05]))
    def next_deadline(self, late: float) -> None:
        due = self.next_time()
        assert due is not None
        self.run_timers(due + late)

    # -- the end ---------------------------------------------------------------------------------

    @invariant()
    def one_end_at_most(self) -> None:
        assert [e.state for e in self.events].count(CallState.ENDED) <= 1

    def teardown(self) -> None:
        if not hasattr(self, "dialog"):
            return
        # Nothing more comes: the call ends by 64*T1 after the last thing it waits for (a
        # first ring, or the end of the ring, which may be the later).
        waits = max(self.answer_s, self.ring_s)
        bound = max(self.now, self.last_input + waits) + TIMER_B_S + 5 * T1_S
        self.run_timers(bound)
        assert self.dialog.done, f"still {self.dialog.phase} at {self.now - T0:.2f}s"
        assert self.late is None or self.late.deadline is None, "a late BYE goes on"
        ends = [e for e in self.events if e.state is CallState.ENDED]
        assert len(ends) == 1, self.events
        for tag in self.answered_tags:
            assert tag in self.byes, f"the answer of {tag!r} got no BYE"


# Short calls are cheap (~10 ms): more of them than the unit profile's 100 (the faults found
# needed five to seven steps in the right order), ~10 s; the deep profile's count if larger.
_DEFAULT = settings.default
FlashCallMachine.TestCase.settings = settings(
    max_examples=max(800, _DEFAULT.max_examples if _DEFAULT else 0), stateful_step_count=25
)
TestFlashCall = FlashCallMachine.TestCase
