"""Properties of the verification store (:mod:`verification.store`) on a real redis-server.

A Hypothesis state machine drives a few verifications through the store the way
verification/api.py and verification/dispatcher.py do: creates with and without an
Idempotency-Key (the same key with the same body, and with another), checks (the right code,
a wrong one, a malformed one, a caller-ID), ``/fallback``, cancels, the step timers (leased
and rescheduled as the dispatcher's timer loop does), channel reports and the sends they ask
for, clock jumps through the injected clock, and several of these at once
(``asyncio.gather``: the store must serialize them). After every step everything is read
back from Redis and checked:

- every write was reported once by ``on_change``, in a chain (old -> new) that ends at the
  record as read back: no lost write, none reported that lost its compare-and-set;
- at most one approval ever; attempts left never rise; a final record never changes again;
  events are only appended, in time order, and never hold a code (nor do webhook jobs);
- each record's timer is the one the rules say (none once final), its webhook jobs one per
  event;
- every limit counter (per key, number, prefix) holds exactly what the model counted: one per
  create or send made, none for a replay, a refusal, or a move that lost a race;
- an idempotent replay returns the first verification and makes nothing new.

The default run is deterministic and small (100 examples, a few seconds).
``HYPOTHESIS_PROFILE=deep`` searches at random (``HYPOTHESIS_MAX_EXAMPLES`` examples, 500
unless set), e.g.::

    HYPOTHESIS_PROFILE=deep HYPOTHESIS_MAX_EXAMPLES=2000 PYTHONPATH=$PWD \\
        .venv/bin/python -m pytest -o timeout=0 tests/integration/test_prop_store.py
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import orjson
import pytest
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sip_config.clock import FakeClock
from sip_config.settings import Rate
from tests.conftest import RedisServer
from tests.integration.conftest import machine_settings, run_machine_on_redis
from verification import codes, numbers, rules
from verification.errors import (
    IdempotencyConflict,
    NoChannelLeft,
    NotFound,
    NotPending,
    RateLimited,
)
from verification.limits import LimitCheck, LimitName, SubjectDigest
from verification.model import Channel, EventKind, FlashCallInfo, Phone, Policy, Verification
from verification.redis_mux import RedisMux
from verification.rules import DeliveryKind, Transition
from verification.store import (
    DUE,
    PREFIX,
    WEBHOOK_JOBS,
    Stored,
    VerificationStore,
)

pytestmark = [pytest.mark.integration]

T = TypeVar("T")

PROFILE = machine_settings(examples=100, deep_examples=500, steps=25)

T0 = 1_800_000_000.0
SECRET = b"s" * 32
LIMIT_KEY = b"k" * 32
POLICY = Policy()
LEASE_S = 30.0  # as the dispatcher's
FLASH_PREFIX = "+3197010"  # 6-digit codes make valid caller-IDs (numbers.cli_code_lengths)
MAX_VERIFICATIONS = 5
F, S, V = Channel.FLASHCALL, Channel.SMS, Channel.VOICE

# Windows longer than any run: one fixed window per counter, nothing slides out, so every
# counter must hold exactly what was counted. Low counts, so that refusals happen.
W = 1_000_000
KEY_RATE = Rate(60, W)
NUMBER_VERIFICATIONS = Rate(3, W)
NUMBER_SENDS = Rate(7, W)
PREFIX_SENDS = Rate(10, W)
CLIENT = "key-1"

MOBILE = numbers.parse_phone("+31612345678")
LANDLINE = numbers.parse_phone("+31201234567")
# Request bodies (an Idempotency-Key replay compares them): a number and a plan. The landline
# cannot take a flash call: its first step is skipped at once.
BODIES: list[tuple[Phone, tuple[Channel, ...]]] = [
    (MOBILE, (S, V)),
    (MOBILE, (F, S)),
    (LANDLINE, (F, V)),
    (MOBILE, (F,)),
    (MOBILE, (S, F, V)),  # two moves: a 120 s step, then a 33 s one
]
IDEM_KEYS = [None, "k0", "k1", "k2", "k3"]


def own_checks() -> list[LimitCheck]:
    """The request-level limit the API counts with a create (the key's requests)."""
    return [LimitCheck(LimitName.KEY_REQUESTS, CLIENT, KEY_RATE)]


def creation_checks(phone: Phone) -> list[LimitCheck]:
    return [LimitCheck(LimitName.NUMBER_VERIFICATIONS, phone.e164, NUMBER_VERIFICATIONS)]


def send_checks(phone: Phone) -> list[LimitCheck]:
    # Both numbers share the prefix "+31": the prefix limit is counted across them.
    return [
        LimitCheck(LimitName.NUMBER_SENDS, phone.e164, NUMBER_SENDS),
        LimitCheck(LimitName.PREFIX_SENDS, numbers.prefix_key(phone, 0), PREFIX_SENDS),
    ]


@dataclass(frozen=True, slots=True)
class Op:
    """One thing the API or the dispatcher does (``which`` picks the verification)."""

    kind: str
    which: int = 0
    arg: int = 0


OPS = st.one_of(
    st.builds(Op, st.just("create"), st.integers(0, len(BODIES) - 1), st.integers(0, 4)),
    st.builds(Op, st.just("check"), st.integers(0, 7), st.integers(0, 5)),
    st.builds(Op, st.just("fallback"), st.integers(0, 7)),
    st.builds(Op, st.just("cancel"), st.integers(0, 7)),
    st.builds(Op, st.just("timers")),
    st.builds(Op, st.just("report"), st.integers(0, 7), st.integers(0, 7)),
    # Redis forgets its scripts on a restart or a fail-over: the next EVALSHA meets NOSCRIPT.
    st.builds(Op, st.just("forget-scripts")),
    # The clock moves while requests are under way (after ``arg`` loop steps).
    st.builds(Op, st.just("clock"), st.just(0), st.integers(0, 7)),
)
CHECKS = ["right", "wrong", "malformed", "old", "cli-right", "cli-wrong"]
REPORTS = [DeliveryKind.DELIVERED, DeliveryKind.UNDELIVERABLE, DeliveryKind.RINGING]


class StoreMachine(RuleBasedStateMachine):
    """A few verifications in one real Redis, and everything the service does to them."""

    loop: ClassVar[asyncio.AbstractEventLoop]
    mux: ClassVar[RedisMux]

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(T0)
        self.digest = SubjectDigest(LIMIT_KEY)
        self.store = VerificationStore(
            self.mux, global_webhook=True, on_change=self._changed, limit_key=LIMIT_KEY
        )
        self.vids: list[str] = []
        self.codes: dict[str, list[str]] = {}
        self.idem: dict[str, tuple[int, str]] = {}  # key -> (body, verification id)
        self.counts: Counter[str] = Counter()  # limit counter (Redis key) -> times counted
        self.changes: dict[str, list[tuple[Verification | None, Verification]]] = {}
        self.approvals: Counter[str] = Counter()  # approving check answers per verification
        self.last: dict[str, Verification] = {}  # as read back after the previous step
        self.returned: dict[str, Verification] = {}  # what the last lone operation returned
        self.answered: dict[str, list[int]] = {}  # attempts left, as checks answered this step
        self.serial = 0
        # How far the clock moved while requests were under way (at most, in one step): a
        # request reads the clock once, so its event may be that much older than one before it.
        self.moved = 0.0
        self.skew = 0.0
        self._run(self.mux.execute("FLUSHDB"))

    # -- plumbing --------------------------------------------------------------------------
    def _run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    def _changed(self, old: Verification | None, new: Verification) -> None:
        self.changes.setdefault(new.id, []).append((old, new))

    def _count(self, checks: list[LimitCheck]) -> None:
        now_ms = round(self.clock.now() * 1000)
        for c in checks:
            self.counts[PREFIX + "l:" + c.counter(now_ms, self.digest)[0]] += 1

    async def _hit(self, checks: list[LimitCheck]) -> bool:
        decision = await self.store.hit_limits(checks, self.clock.now())
        if decision.allowed:
            self._count(checks)
        return decision.allowed

    def _vid(self, which: int) -> str | None:
        return self.vids[which % len(self.vids)] if self.vids else None

    async def _admit(self, vid: str) -> Stored | None:
        """The API's first round trip: the key's request counted, the record read."""
        decision, stored = await self.store.admit_and_get(own_checks(), self.clock.now(), vid)
        if decision.allowed:
            self._count(own_checks())
        return stored if decision.allowed else None

    # -- what the API and the dispatcher do ------------------------------------------------
    async def do(self, op: Op, *, lone: bool) -> None:
        """Carry out ``op``; ``lone``: nothing else runs meanwhile (its answer is the state)."""
        if op.kind == "create":
            await self.create(op.which, IDEM_KEYS[op.arg], lone=lone)
            return
        if op.kind == "timers":
            await self.timers()
            return
        if op.kind == "forget-scripts":
            await self.mux.execute("SCRIPT", "FLUSH")
            return
        if op.kind == "clock":
            for _ in range(op.arg % 4):
                await asyncio.sleep(0)
            self.clock.advance(0.5 + op.arg)
            if not lone:
                self.moved += 0.5 + op.arg
            return
        vid = self._vid(op.which)
        if vid is None:
            return
        answer: Verification | None = None
        if op.kind == "check":
            answer = await self.check(vid, CHECKS[op.arg])
        elif op.kind == "fallback":
            answer = await self.fallback(vid)
        elif op.kind == "cancel":
            answer = await self.cancel(vid)
        elif op.kind == "report":
            answer = await self.report(vid, op.arg)
        if lone and answer is not None:
            self.returned[vid] = answer

    async def create(self, body: int, key: str | None, *, lone: bool) -> None:
        phone, plan = BODIES[body]
        own = own_checks()
        idempotency = (f"{CLIENT}:{key}", f"body-{body}") if key else None
        if idempotency is not None:
            try:
                replay = await self.store.get_idempotent(idempotency)
            except IdempotencyConflict:
                # (another body's request may hold the key still: not in the model yet)
                assert key is not None and self.idem.get(key, (-1, ""))[0] != body
                event("create: conflict")
                await self._hit(own)  # the edge counts the request
                return
            if replay is not None:
                assert key is not None
                event("create: replay")
                first = self.idem.setdefault(key, (body, replay.id))
                assert first == (body, replay.id), "a replay returns the first one"
                await self._hit(own)
                return
        self.serial += 1
        vid = f"{self.serial:032d}"
        now = self.clock.now()
        flash = None
        if F in plan:
            flash = FlashCallInfo(FLASH_PREFIX, 6, numbers.cli_filter(FLASH_PREFIX, 6, phone), 60)
        transition = rules.create(
            verification_id=vid,
            phone=phone,
            plan=plan,
            code_length=6,
            now=now,
            policy=POLICY,
            flashcall=flash,
            client=CLIENT,
        )
        checks = own + creation_checks(phone)
        code = None
        if transition.send is not None:
            checks += send_checks(phone)
            # As the API does for a send made here: the code's HMAC in the create's write.
            created = transition.verification
            code = codes.new_code(6)
            digest = codes.code_hash(SECRET, vid, code)
            sent = rules.code_sent(created, created.step, digest, created.created_at)
            transition = Transition(sent.verification, send=transition.send)
        try:
            stored = await self.store.create(transition, idempotency, checks=checks, now=now)
        except RateLimited:
            event("create: refused by a limit")
            return
        except IdempotencyConflict:
            assert key is not None and self.idem.get(key, (-1, ""))[0] != body
            event("create: conflict found on reserving")
            await self._hit(own)
            return
        made = stored.verification
        if made.id != vid:  # a concurrent request with the same key made it
            assert key is not None
            event("create: replay of a concurrent create")
            assert self.idem.setdefault(key, (body, made.id)) == (body, made.id)
            await self._hit(own)
            return
        assert made == transition.verification
        self._count(checks)
        self.vids.append(vid)
        self.codes[vid] = [code] if code else []
        if key is not None:
            assert self.idem.setdefault(key, (body, vid)) == (body, vid), "made twice"
        if lone:
            self.returned[vid] = made

    async def check(self, vid: str, kind: str) -> Verification | None:
        stored = await self._admit(vid)
        if stored is None:
            return None
        v0 = stored.verification
        sent = self.codes[vid]
        candidate: str | None
        if kind == "malformed":
            assert not codes.is_code_syntax("12a456", v0.code_length)
            return None  # 422: the store is not asked
        if kind.startswith("cli"):
            if v0.flashcall is None:
                return None  # 422
            code = sent[-1] if sent and kind == "cli-right" else "999999"
            candidate = numbers.code_from_cli(FLASH_PREFIX + code, FLASH_PREFIX, 6, v0.phone)
        elif kind == "right":
            candidate = sent[-1] if sent else "000000"
        elif kind == "old":
            candidate = sent[0] if sent else "000000"
        else:
            candidate = next(c for c in ("000000", "111111", "222222") if c not in sent)
        now = self.clock.now()

        def change(v: Verification) -> tuple[Transition, rules.CheckAnswer]:
            matched = candidate is not None and codes.matches(
                SECRET, vid, candidate, v.code_hashes, ()
            )
            return rules.check(v, matched, now, POLICY)

        try:
            transition, answer = await self.store.update(vid, change, known=stored)
        except NotPending:
            return None
        assert answer.status is transition.verification.status
        assert answer.attempts_left == rules.attempts_left(transition.verification, POLICY)
        self.answered.setdefault(vid, []).append(answer.attempts_left)
        event(f"check: {answer.status}")
        if answer.status.value == "approved":
            self.approvals[vid] += 1
        return transition.verification

    async def fallback(self, vid: str) -> Verification | None:
        stored = await self._admit(vid)
        if stored is None:
            return None
        phone = stored.verification.phone
        seen = stored.verification.step
        try:
            transition, _, written = await self.store.update_stored(
                vid,
                lambda v: (rules.request_fallback(v, self.clock.now(), POLICY, seen), None),
                known=stored,
                checks=send_checks(phone),
                now=self.clock.now(),
            )
        except (NotPending, NoChannelLeft, RateLimited) as exc:
            event(f"fallback: {type(exc).__name__}")
            return None
        if transition.send is not None:  # it moved, and counted its send with the move
            self._count(send_checks(phone))
        sent = await self.follow(transition, counted=True, known=written)
        return sent or transition.verification

    async def cancel(self, vid: str) -> Verification | None:
        stored = await self._admit(vid)
        if stored is None:
            return None
        try:
            transition, _ = await self.store.update(
                vid, lambda v: (rules.cancel(v, self.clock.now()), None), known=stored
            )
        except NotPending:
            return None
        return transition.verification

    async def report(self, vid: str, arg: int) -> Verification | None:
        """A channel's report on the current step's send (``arg`` odd: the step before)."""
        stored = await self.store.get(vid)
        v = stored.verification
        step = min(v.step, len(v.channels) - 1) - (arg % 2)
        if step < 0:
            return None
        kind = REPORTS[(arg // 2) % len(REPORTS)]
        at = self.clock.now()
        transition, _, last = await self.store.update_stored(
            vid,
            lambda x: (
                rules.delivery(x, step, kind, f"{kind} (SIP 480)", now=at, policy=POLICY),
                None,
            ),
            known=stored,
        )
        if last.verification.status.final:
            return last.verification
        return await self.follow(transition, known=last) or last.verification

    async def timers(self) -> None:
        """The dispatcher's ``run_due``: lease, tick each, follow, put the real time back."""
        sends: list[Awaitable[Verification | None]] = []
        for vid in await self.store.lease_due(self.clock.now(), LEASE_S):
            now = self.clock.now()

            def tick(v: Verification, now: float = now) -> tuple[Transition, None]:
                return rules.tick(v, now, POLICY), None

            try:
                transition, _, stored = await self.store.update_stored(vid, tick)
            except NotFound:
                await self.store.forget_due(vid)
                continue
            event(f"timer: {transition.verification.events[-1].kind}")
            # The dispatcher spawns the send and reschedules meanwhile.
            sends.append(asyncio.ensure_future(self.follow(transition)))
            await self.store.reschedule(stored)
        await asyncio.gather(*sends)

    async def follow(
        self, transition: Transition, *, counted: bool = False, known: Stored | None = None
    ) -> Verification | None:
        """The dispatcher's send: limits (unless counted), the code's HMAC, then it leaves.
        The record as the send wrote it (None: nothing written)."""
        if transition.send is None:
            return None
        v = transition.verification
        vid, step = v.id, v.step
        if known is None:
            known = await self.store.get(vid)
        if not counted and not await self._hit(send_checks(v.phone)):
            event("send: refused by a limit")
            _, _, refused = await self.store.update_stored(
                vid,
                lambda x: (rules.send_refused(x, step, "too many sends", self.clock.now()), None),
            )
            return refused.verification
        code = codes.new_code(6)
        self.codes[vid].append(code)
        digest = codes.code_hash(SECRET, vid, code)
        try:
            _, _, written = await self.store.update_stored(
                vid,
                lambda x: (rules.code_sent(x, step, digest, self.clock.now()), None),
                known=known,
            )
        except NotPending:
            return None
        return written.verification

    # -- rules -----------------------------------------------------------------------------
    @precondition(lambda self: len(self.vids) < MAX_VERIFICATIONS)
    @rule(body=st.integers(0, len(BODIES) - 1), key=st.sampled_from(IDEM_KEYS))
    def create_one(self, body: int, key: str | None) -> None:
        self._run(self.do(Op("create", body, IDEM_KEYS.index(key)), lone=True))

    @rule(op=OPS)
    def one(self, op: Op) -> None:
        if op.kind == "create" and len(self.vids) >= MAX_VERIFICATIONS:
            return
        self._run(self.do(op, lone=True))

    @rule(ops=st.lists(OPS, min_size=2, max_size=5), same=st.booleans())
    def at_once(self, ops: list[Op], same: bool) -> None:
        """Several requests and timers at once; ``same``: all on one verification."""
        if len(self.vids) >= MAX_VERIFICATIONS:
            ops = [op for op in ops if op.kind != "create"]
        if same:
            ops = [Op(op.kind, 0 if op.kind != "create" else op.which, op.arg) for op in ops]

        async def all_at_once() -> None:
            # Every one ends before a failure is raised: none may run on into the next example.
            done = await asyncio.gather(
                *(self.do(op, lone=False) for op in ops), return_exceptions=True
            )
            for result in done:
                if isinstance(result, BaseException):
                    raise result

        self.moved = 0.0
        self._run(all_at_once())
        self.skew = max(self.skew, self.moved)
        self.returned.clear()  # which answer is the state now depends on the order

    @rule(
        bodies=st.lists(st.integers(0, len(BODIES) - 1), min_size=2, max_size=4),
        key=st.sampled_from(IDEM_KEYS[1:]),
    )
    def retries_at_once(self, bodies: list[int], key: str) -> None:
        """Retries of one request with one Idempotency-Key at once (some with another body)."""
        if len(self.vids) + len(bodies) > MAX_VERIFICATIONS + 1:
            return
        k = IDEM_KEYS.index(key)
        self.at_once([Op("create", b, k) for b in bodies], same=False)

    @rule(
        checks=st.lists(st.sampled_from([1, 0, 0, 4]), min_size=2, max_size=4),
        others=st.lists(st.sampled_from(["fallback", "cancel", "timers", "report"]), max_size=2),
        which=st.integers(0, 7),
    )
    def checks_at_once(self, checks: list[int], others: list[str], which: int) -> None:
        """Right (and wrong) checks of one verification at once, with a move or two."""
        ops = [Op("check", which, c) for c in checks] + [Op(o, which, which) for o in others]
        self.at_once(ops, same=False)

    @rule(seconds=st.sampled_from([1.0, 20.0, 34.0, 121.0, 250.0, 601.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)

    # -- invariants ------------------------------------------------------------------------
    @invariant()
    def matches_the_model(self) -> None:
        self._run(self._check_all())
        self.returned.clear()
        self.answered.clear()

    async def _check_all(self) -> None:
        records = await self._scan(PREFIX + "v:*")
        assert len(records) == len(self.vids), "a record the model did not make (or lost)"
        jobs: dict[str, list[Any]] = {}
        for payload in (await self.mux.execute("HGETALL", WEBHOOK_JOBS)).values():
            job = orjson.loads(payload)
            jobs.setdefault(job["verification_id"], []).append(job["event"])
        for vid in self.vids:
            v = (await self.store.get(vid)).verification
            await self._check_one(v, jobs.get(vid, []))
            self.last[vid] = v
        await self._check_counters()

    async def _check_one(self, v: Verification, jobs: list[Any]) -> None:
        vid = v.id
        chain = self.changes[vid]
        assert chain[0][0] is None, "the first change is the create"
        for (_, wrote), (over, _) in itertools.pairwise(chain):
            assert over == wrote, "on_change skipped or repeated a write"
        assert chain[-1][1] == v, "the record is not the last change reported"
        if vid in self.returned:
            assert self.returned[vid] == v, "the answer is not the state read back"
        approved = [e for e in v.events if e.kind is EventKind.APPROVED]
        assert len(approved) <= 1 and self.approvals[vid] <= 1, "approved twice"
        assert (v.status.value == "approved") == bool(approved) == (self.approvals[vid] == 1)
        for a, b in itertools.pairwise(v.events):
            assert b.at >= a.at - self.skew, f"events out of time order: {a} then {b}"
        sent = self.codes[vid]
        for e in v.events:
            assert not any(code in e.detail for code in sent), "a code in an event"
        assert v.sends == len(v.code_hashes) <= POLICY.max_sends
        assert v.sends == sum(1 for e in v.events if e.kind is EventKind.DISPATCHED)
        before = self.last.get(vid)
        if before is not None:
            assert v.events[: len(before.events)] == before.events, "events were rewritten"
            assert rules.attempts_left(v, POLICY) <= rules.attempts_left(before, POLICY)
            for left in self.answered.get(vid, []):
                assert rules.attempts_left(before, POLICY) >= left >= rules.attempts_left(v, POLICY)
            if before.status.final:
                assert v == before, f"a final record changed: {before.status} -> {v.status}"
        due = await self.mux.execute("ZSCORE", DUE, vid)
        expected = rules.due_at(v)
        assert (None if due is None else float(due)) == expected, (
            f"{vid}: timer at {due}, the rules say {expected} ({v.status}, step {v.step})"
        )
        wanted = sorted(orjson.dumps(e.to_json()) for e in v.events)
        assert sorted(orjson.dumps(e) for e in jobs) == wanted, "webhook jobs != events"
        for e in jobs:
            assert not any(code in e["detail"] for code in sent), "a code in a webhook job"

    async def _check_counters(self) -> None:
        keys = set(await self._scan(PREFIX + "l:*"))
        assert keys == {k for k, n in self.counts.items() if n}, "counters nobody counted"
        for key in keys:
            if await self.mux.execute("TYPE", key) == "zset":
                used = int(await self.mux.execute("ZCARD", key))
            else:
                used = int(await self.mux.execute("GET", key))
            assert used == self.counts[key], f"{key.split(':')[2]}: {used} != {self.counts[key]}"

    async def _scan(self, pattern: str) -> list[str]:
        found: list[str] = []
        cursor = "0"
        while True:
            cursor, batch = await self.mux.execute("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            found += batch
            if cursor == "0":
                return found


def test_the_store_keeps_every_promise_under_any_history(redis_server: RedisServer) -> None:
    run_machine_on_redis(StoreMachine, redis_server.url, PROFILE)
