"""The redirect front as a state machine over sequences of requests (pure, fake clock).

tests/unit/test_prop_sip.py checks one message at a time. Here a hypothesis state machine
sends the front's datagram handler INVITEs (new, exact copies, same Call-ID on another branch
or CSeq), CANCELs, ACKs, OPTIONS, BYEs, unknown methods and broken or truncated requests,
while redirected callers reach the workers named, other calls (a PBX's) reach them too and
calls end, the service starts stopping and the clock moves past the 2 s reservation and
Timer H/J. The front is given the real :meth:`SipPool.pick_inbound` and the pool as its
reservations (its workers set up by hand, as in test_sip_pick_inbound.py, each with
``CAPACITY`` slots and the pool told of each call by the worker's messages), so
reservations and the count of callers refused are the pool's own.

What must hold (RFC 3261 8.2.7, 9.2, 17.2 and the front's docstring): a request that parses,
with a Via, gets exactly one answer, which parses back with its Via, Call-ID and CSeq; a copy
of a request whose answer is still remembered gets that answer again (status, To tag,
Contact) and asks the pool nothing; the pool is asked exactly once per new INVITE
transaction, so a 302 reserves one slot and a 486 is counted once; no 302 names a worker
without a free slot (or one held for that Call-ID); a copy of a redirected INVITE keeps its
slot held until the 302 is forgotten (Timer H) and 2 s more, a CANCEL of it frees the slot;
a redirected caller whose slot is held finds room on the worker named, and no worker has
more slots held and busy than ``CAPACITY``; a CANCEL gets 200 with the To tag of the INVITE it
matches, else 481; each memory stays within its bound; nothing raises.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sip_config.clock import FakeClock
from sip_config.settings import HostPort
from tests.conftest import sip_settings
from voice.sip import front as front_module
from voice.sip import message, transaction
from voice.sip.outcome import SipStatus
from voice.sip.pool import SipPool
from voice.sip.protocol import IncomingCall, WorkerStatus

LIMIT = 6  # a small memory, so that the machine sees answers pushed out
RESERVE_S = 2.0  # pool._REDIRECT_RESERVE_S
CAPACITY = 2  # a worker's slots (PJSUA_MAX_CALLS is 4: fewer, so that workers fill up)

_BRANCHES = ["z9hG4bK-a", "z9hG4bK-b", "rfc2543-1"]
_HOSTS = ["127.0.0.1:5070", "127.0.0.2:5070"]
_CALL_IDS = ["c1@peer", "c2@peer", "c3@peer"]  # one more than the two slots
_METHODS = ["INVITE", "INVITE", "INVITE", "CANCEL", "ACK", "OPTIONS", "BYE", "REGISTER", "FOO"]
# The To of a request outside a dialog, then with a tag of its own (7.3.1 and 25.1: a
# parameter's name is case-insensitive, and a ";" may have whitespace around it), and with
# a URI parameter named tag (inside the <>, not the To's tag: section 20.10).
_TOS = ["<sip:6000@127.0.0.1:5060>", "<sip:6000@127.0.0.1:5060>;tag=t9"]
_TOS += ["<sip:6000@127.0.0.1:5060>;TAG=t9", "<sip:6000@127.0.0.1:5060> ; tag=t9"]
_TOS += ["<sip:6000@127.0.0.1:5060;tag=u>", "sip:6000@127.0.0.1:5060;tag=t9"]
_MISSING = [*[None] * 12, "From", "To", "Call-ID", "CSeq", "Via"]


@dataclass(frozen=True, slots=True)
class Req:
    """A request described by the parts that make its transaction."""

    method: str
    branch: str
    host: str
    call_id: str
    cseq: int
    missing: str | None = None
    to: str = _TOS[0]
    tcp: bool = False

    @property
    def transport(self) -> str:
        return "TCP" if self.tcp else "UDP"

    def raw(self) -> bytes:
        headers = [
            ("Via", f"SIP/2.0/{self.transport} {self.host};branch={self.branch};rport"),
            ("Via", "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-0"),
            ("From", '"Ann" <sip:+447700900123@127.0.0.1>;tag=abc'),
            ("To", self.to),
            ("Call-ID", self.call_id),
            ("CSeq", f"{self.cseq} {self.method}"),
            ("Max-Forwards", "70"),
            ("Content-Length", "0"),
        ]
        lines = [f"{self.method} sip:6000@127.0.0.1:5060 SIP/2.0"]
        lines += [f"{n}: {v}" for n, v in headers if n != self.missing]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()


_REQS = st.builds(
    Req,
    method=st.sampled_from(_METHODS),
    branch=st.sampled_from(_BRANCHES),
    host=st.sampled_from(_HOSTS),
    call_id=st.sampled_from(_CALL_IDS),
    cseq=st.integers(1, 2),
    missing=st.sampled_from(_MISSING),
    to=st.sampled_from([_TOS[0], _TOS[0], *_TOS]),
    tcp=st.booleans(),
)


@dataclass(frozen=True, slots=True)
class Answer:
    """What the front answered to a transaction: what a copy must get again."""

    status: int
    to_tag: str  # "" when the request had a To tag of its own (the front's is unseen)
    contact: str | None  # its URI without parameters (a TCP copy gets ;transport=tcp)
    request: tuple[bytes, bool] = (b"", False)  # the request that created the transaction
    response: bytes = b""  # and the answer it got


class Memory:
    """The model of one memory of answers: kept ``keep_s``, at most ``LIMIT``, oldest out."""

    def __init__(self, keep_s: float) -> None:
        self.keep_s = keep_s
        self.items: OrderedDict[transaction.TransactionKey, tuple[float, Answer]] = OrderedDict()

    def get(self, key: transaction.TransactionKey, now: float) -> Answer | None:
        entry = self.items.get(key)
        return entry[1] if entry is not None and entry[0] > now else None

    def remember(self, key: transaction.TransactionKey, answer: Answer, now: float) -> None:
        for k in [k for k, (t, _) in self.items.items() if t <= now]:
            del self.items[k]
        while len(self.items) >= LIMIT:
            self.items.popitem(last=False)
        self.items[key] = (now + self.keep_s, answer)


def _tags(value: str) -> list[str]:
    """The tag parameters of a To or From value (those of the header, not of its URI)."""
    params = value.rpartition(">")[2] if "<" in value else value
    pairs = (p.partition("=") for p in params.split(";")[1:])
    return [v.strip() for n, _, v in pairs if n.strip().lower() == "tag"]


def _to_tag(msg: message.SipMessage) -> str:
    tags = _tags(msg.get("To") or "")
    return tags[0] if tags else ""


class FrontMachine(RuleBasedStateMachine):
    """One front, one pool of two workers, and whatever peers send."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.pool = SipPool(sip_settings(2), clock=self.clock)
        self.busy = [1, 1]  # calls on each worker (a PBX's), of CAPACITY
        for i, w in enumerate(self.pool._workers):
            w.up, w.free_slots, w.port = True, CAPACITY - self.busy[i], 6000 + i
        self.picks: list[str] = []
        self.front = front_module.RedirectFront(
            HostPort("127.0.0.1", 0), self._pick, clock=self.clock, reservations=self.pool
        )
        self.front._answered = transaction.AnsweredRequests(self.clock, limit=LIMIT)
        self.front._others = transaction.AnsweredRequests(
            self.clock, keep_s=transaction.TIMER_J_S, limit=LIMIT
        )
        self.invites = Memory(transaction.TIMER_H_S)
        self.others = Memory(transaction.TIMER_J_S)
        self.sent: list[Req] = []
        self.refused = 0  # new INVITE transactions answered 486
        # Call-ID: the worker port holding a slot for it and the end of that (the model)
        self.reserved: dict[str, tuple[int, float]] = {}
        # Call-ID: the latest its slot may be held to (Timer H and RESERVE_S from its 302)
        self.limits: dict[str, float] = {}
        self.pbx_calls = 0

    def _pick(self, call_id: str) -> HostPort | int:
        self.picks.append(call_id)
        return self.pool.pick_inbound(call_id)

    @property
    def now(self) -> float:
        return self.clock.monotonic()

    # -- sending ---------------------------------------------------------------------------
    def deliver(self, raw: bytes, *, tcp: bool = False) -> None:
        """Send ``raw`` and check the answer against the model."""
        now = self.now
        try:
            request: message.SipMessage | None = message.parse(raw, strict=True)
        except message.SipParseError:
            request = None
        picks = len(self.picks)
        for w in self.pool._workers:
            w.expire_reservations(now)
        avail = {w.port: w.available for w in self.pool._workers}
        held = {w.port: set(w.reserved) for w in self.pool._workers}
        if tcp:
            out = front_module._answer(
                raw,
                self._pick,
                self.front._answered,
                tcp=True,
                others=self.front._others,
                reservations=self.pool,
            )
        else:
            out = self.front._answer_udp(raw)
        if request is None or not request.is_request or request.method == "ACK":
            assert out is None, "no answer to a response, an ACK or what does not parse"
            assert len(self.picks) == picks
            return
        if not request.get("Via"):
            assert out is None, "no Via: nowhere to answer (18.2.2)"
            assert len(self.picks) == picks
            return
        assert out is not None, f"no answer to a {request.method}"
        answer = message.parse(out, strict=True)
        assert answer.status >= 200 and not answer.is_request
        assert answer.get_all("Via") == request.get_all("Via")
        for name in ("Call-ID", "CSeq"):
            assert (answer.get(name) or "") == (request.get(name) or ""), name
        contact = answer.get("Contact")
        got = Answer(answer.status, _to_tag(answer), contact and contact.split(";")[0].rstrip(">"))
        own = _tags(request.get("To") or "")
        if own:  # 8.2.6.2: the To of the request as it was
            assert answer.get("To") == request.get("To"), "the request's To, as it was"
        else:  # else the To with one tag added
            assert len(_tags(answer.get("To") or "")) == 1, "one To tag in the answer"

        complete = transaction.key_of(request)
        if complete is not None and not all(request.get(n) for n in front_module._REQUIRED):
            complete = None
        if complete is None:
            key = transaction.incomplete_key(request)
            assert key is not None
            memory = self.others
        else:
            key = complete
            memory = self.invites if request.method == "INVITE" else self.others
        # A request with a To tag keeps it (8.2.6.2): the front's own tag is then unseen.
        own_tag = bool(own)  # maybe an empty one, in a truncated copy
        before = memory.get(key, now)
        call_id = request.get("Call-ID") or ""
        if before is not None and memory is self.invites and before.contact is not None:
            # A copy of a redirected INVITE: its 302 was lost, so its slot, if still held
            # there, is held until the front forgets the 302, and RESERVE_S more.
            port = int(before.contact.rpartition(":")[2])
            mine = self._held(call_id)
            if mine is not None and mine[0] == port:
                # As the front and the pool reckon it (the same float operations).
                until = now + (memory.items[key][0] - now) + RESERVE_S
                # Never past Timer H and RESERVE_S from the 302 that took the slot: a copy
                # after the front forgot it was sent to the slot still held (a new 302).
                until = min(until, self.limits.get(call_id, mine[1]))
                self.reserved[call_id] = (port, max(mine[1], until))
        if before is not None:
            assert got.status == before.status, f"a copy of a {request.method}: another status"
            if (raw, tcp) == before.request:
                assert out == before.response, "an exact copy gets the very same answer"
            assert own_tag or not before.to_tag or got.to_tag == before.to_tag, "another To tag"
            assert len(self.picks) == picks, "a copy asks the pool nothing"
            return
        memory.remember(
            key,
            Answer(got.status, "" if own_tag else got.to_tag, got.contact, (raw, tcp), out),
            now,
        )
        if complete is None:
            assert got.status == SipStatus.BAD_REQUEST
            assert len(self.picks) == picks, "an incomplete INVITE takes no slot"
            return
        if request.method != "INVITE":
            assert len(self.picks) == picks
            expected = SipStatus.CALL_DOES_NOT_EXIST
            if request.method == "CANCEL":
                invite = self.invites.get(transaction.invite_key(key), now)
                if invite is not None:  # 9.2: 200 with the INVITE's To tag
                    expected = SipStatus.OK
                    assert own_tag or not invite.to_tag or got.to_tag == invite.to_tag
                    mine = self._held(call_id)
                    named = invite.contact and int(invite.contact.rpartition(":")[2])
                    if mine is not None and mine[0] == named:
                        del self.reserved[call_id]  # the caller hung up: the slot is free
            else:
                expected = front_module.status_for(request.method)
            assert got.status == expected, (request.method, got.status)
            return
        # A new INVITE transaction: the pool asked exactly once.
        assert self.picks[picks:] == [request.get("Call-ID")]
        if got.status == SipStatus.MOVED_TEMPORARILY:
            assert got.contact is not None
            port = int(got.contact.rpartition(":")[2])
            assert (contact or "").endswith(";transport=tcp>") is tcp
            assert avail[port] > 0 or call_id in held[port], "a 302 to a worker without room"
            if self._held(call_id) is None:
                self.reserved[call_id] = (port, now + RESERVE_S)
                self.limits[call_id] = now + (transaction.TIMER_H_S + RESERVE_S)
        elif got.status == SipStatus.BUSY_HERE:
            self.refused += 1
            assert all(a <= 0 for a in avail.values()), "486 with a slot free"
        else:
            assert got.status == SipStatus.SERVICE_UNAVAILABLE
            assert self.pool._refusing

    def send(self, req: Req) -> None:
        self.sent.append(req)
        self.deliver(req.raw(), tcp=req.tcp)

    @rule(req=_REQS)
    def new_request(self, req: Req) -> None:
        self.send(req)

    @precondition(lambda self: bool(self.sent))
    @rule(data=st.data())
    def retransmit(self, data: st.DataObject) -> None:
        self.send(data.draw(st.sampled_from(self.sent)))

    @precondition(lambda self: bool(self.sent))
    @rule(data=st.data(), method=st.sampled_from(["CANCEL", "ACK", "BYE"]))
    def follow_up(self, data: st.DataObject, method: str) -> None:
        """A CANCEL or ACK of an earlier request (the same branch, Call-ID and CSeq)."""
        req = data.draw(st.sampled_from(self.sent))
        self.send(
            Req(method, req.branch, req.host, req.call_id, req.cseq, req.missing, req.to, req.tcp)
        )

    @precondition(lambda self: bool(self.sent))
    @rule(data=st.data(), cut=st.integers(0, 400))
    def truncated(self, data: st.DataObject, cut: int) -> None:
        raw = data.draw(st.sampled_from(self.sent)).raw()
        self.deliver(raw[: cut % (len(raw) + 1)])

    @rule(raw=st.binary(max_size=80))
    def garbage(self, raw: bytes) -> None:
        self.deliver(raw)

    @precondition(lambda self: bool(self.sent))
    @rule(data=st.data(), at=st.integers(0, 400), byte=st.sampled_from(b"\x00\r\n :;,\xff"))
    def mutated(self, data: st.DataObject, at: int, byte: int) -> None:
        raw = bytearray(data.draw(st.sampled_from(self.sent)).raw())
        raw[at % len(raw)] = byte
        self.deliver(bytes(raw))

    @rule(dt=st.sampled_from([0.1, 0.5, 1.9, 2.0, 2.1, 4.0, 16.0, 31.9, 32.0, 33.0]))
    def time_passes(self, dt: float) -> None:
        self.clock.advance(dt)

    def _held(self, call_id: str) -> tuple[int, float] | None:
        """The model's reservation for ``call_id`` (port, end), if it has not lapsed."""
        held = self.reserved.get(call_id)
        return held if held is not None and held[1] > self.now else None

    def _arrives(self, index: int, sip_call_id: str) -> None:
        """A call reaches worker ``index``, which tells the pool as pjsua does."""
        self.busy[index] += 1
        w = self.pool._workers[index]
        free = CAPACITY - self.busy[index]
        self.pool._dispatch(w, IncomingCall(f"in-{sip_call_id}", "", "6000", free, (), sip_call_id))

    @precondition(lambda self: any(t > self.now for _, t in self.reserved.values()))
    @rule(data=st.data())
    def caller_follows_its_302(self, data: st.DataObject) -> None:
        """A redirected caller whose slot is held reaches the worker its 302 named."""
        now = self.now
        call_id = data.draw(
            st.sampled_from(sorted(c for c, (_, t) in self.reserved.items() if t > now))
        )
        port, _ = self.reserved.pop(call_id)
        index = port - 6000
        assert self.busy[index] < CAPACITY, "a caller with its slot held found the worker full"
        self._arrives(index, call_id)

    @rule(index=st.integers(0, 1))
    def pbx_call(self, index: int) -> None:
        """A call the front did not redirect (a PBX's, or under a new Call-ID) reaches a worker
        with room; one that cannot hold every slot held drops the one nearest to lapsing."""
        if self.busy[index] >= CAPACITY:
            return  # pjsua refuses it (486), and the pool hears nothing of it
        self.pbx_calls += 1
        self._arrives(index, f"pbx-{self.pbx_calls}@pbx")
        now = self.now
        port = 6000 + index
        here = {c: t for c, (p, t) in self.reserved.items() if p == port and t > now}
        if len(here) > CAPACITY - self.busy[index]:
            del self.reserved[min(here, key=here.__getitem__)]

    @rule(index=st.integers(0, 1))
    def call_ends(self, index: int) -> None:
        if self.busy[index]:
            self.busy[index] -= 1
            w = self.pool._workers[index]
            self.pool._dispatch(w, WorkerStatus(CAPACITY - self.busy[index], w.port, 0))

    @rule(now=st.integers(0, 3))
    def stopping(self, now: int) -> None:
        if now == 0:  # for good: rarely, so that the runs see full workers too
            self.pool.refuse_new_calls()

    # -- invariants ------------------------------------------------------------------------
    @invariant()
    def memories_bounded(self) -> None:
        assert len(self.front._answered) <= LIMIT
        assert len(self.front._others) <= LIMIT

    @invariant()
    def each_refusal_counted_once(self) -> None:
        assert self.pool._refused_busy == self.refused

    @invariant()
    def reservations_held_then_released(self) -> None:
        now = self.now
        for c in [c for c, (_, t) in self.reserved.items() if t <= now]:
            del self.reserved[c]
        held = {(w.port, c, t) for w in self.pool._workers for c, t in w.reserved.items()}
        held = {(p, c, t) for p, c, t in held if t > now}
        assert held == {(p, c, t) for c, (p, t) in self.reserved.items()}, "the slots held"
        assert self.pool.occupancy().reserved == len(self.reserved)

    @invariant()
    def no_worker_holds_more_than_its_slots(self) -> None:
        """The slots held on a worker, as the pool counts them and as the callers sent there
        were promised them (the model), and its calls fit in its slots."""
        now = self.now
        for i, w in enumerate(self.pool._workers):
            held = sum(t > now for t in w.reserved.values())
            promised = sum(p == w.port and t > now for p, t in self.reserved.values())
            for n in (held, promised):
                assert n + self.busy[i] <= CAPACITY, f"worker {i}: {n} held, {self.busy[i]} busy"


# Longer runs than the default 50 steps: a transaction's copies, its CANCEL and Timer H
# take several each. Built on the loaded profile (tests/unit/conftest.py): about 5 s.
FrontMachine.TestCase.settings = settings(stateful_step_count=100)
TestFront = FrontMachine.TestCase
