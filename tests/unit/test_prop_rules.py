"""Properties of the verification rules (:mod:`verification.rules`), over whole histories.

Hypothesis drives one verification through any sequence of what the API, the dispatcher, the
channels and the step timer do to it, applied through the rules' pure API as
verification/api.py and verification/dispatcher.py apply them (the code is hashed as the API
does, a check's caller-ID is read by :func:`numbers.code_from_cli`), with the clock moving in
between. After every step the invariants the README promises are checked ("The rules").
Pure: no Redis, no I/O; the clock is a number the machine moves.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass, field

from hypothesis import HealthCheck, event, settings, target
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from verification import codes, numbers, rules
from verification.errors import NoChannelLeft, NotPending
from verification.model import (
    Channel,
    EventKind,
    FlashCallInfo,
    Phone,
    Policy,
    Status,
    Verification,
)
from verification.rules import DeliveryKind

SECRET = b"s" * 32
VID = "v" * 32
T0 = 1_800_000_000.0
F, S, V = Channel.FLASHCALL, Channel.SMS, Channel.VOICE

# Destinations: mobiles and numbers that may be one (a flash call is placed), and numbers
# that cannot be (it is skipped); in the flash prefix's country and outside it; with and
# without a trunk prefix, and with exit codes other than 00.
PHONES = [
    numbers.parse_phone(raw)
    for raw in (
        "+447400123456",  # GB mobile: the prefix's country, trunk 0
        "+442071838750",  # GB landline
        "+31612345678",  # NL mobile
        "+31201234567",  # NL landline
        "+12015550123",  # US, fixed line or mobile, exit 011, trunk 1
        "+61412345678",  # AU mobile, exit 0011
        "+79161234567",  # RU mobile, exit 810, trunk 8
        "+393123456789",  # IT mobile, no trunk prefix
        "+34612345678",  # ES mobile, no trunk prefix
    )
]
# Flash-call prefixes, each with a code length that makes a valid caller-ID
# (numbers.cli_code_lengths), as serve and the API require.
PREFIXES = ["+447400", "+3197010", "+1201555", "+393", "+34600", "+7900"]
PLANS = [plan for n in (1, 2, 3) for plan in itertools.permutations((F, S, V), n)]
# A die: the rules that end a verification (cancel, approval, expiry) act on a 0 only, so
# that most histories last long enough to reach fallbacks, resends and late reports.
DIE = st.integers(0, 3)
FINAL = (Status.APPROVED, Status.FAILED, Status.EXPIRED, Status.CANCELED)


def cli_forms(prefix: str, code: str, phone: Phone) -> list[tuple[str, str]]:
    """The caller-ID ``prefix`` + ``code`` in every form the README says a phone may show it,
    as (what is dialled before the country code, the digits): international with +, 00, the
    phone's exit code or nothing; national with and without the trunk prefix when the
    caller-ID is in the phone's country."""
    cc, national = numbers.split_country_code(prefix)
    digits = f"{cc}{national}{code}"
    forms = [("+", digits), ("00", digits), ("", digits)]
    idd = numbers.exit_code(phone.region)
    if idd:
        forms.append((idd, digits))
    if cc == phone.country_code and national:
        forms += [("", numbers.trunk_prefix(phone.region) + national + code), ("", national + code)]
    return forms


def spaced(form: str, seps: list[str]) -> str:
    """``form`` with a separator ("", " " or "-") after each character but the last."""
    out = []
    for i, ch in enumerate(form):
        out.append(ch)
        if i < len(form) - 1:
            out.append(seps[i % len(seps)])
    return "".join(out)


def sent_since_entered(v: Verification) -> bool:
    """Whether a code left since the last move into the current step."""
    moves = (EventKind.REQUESTED, EventKind.FALLBACK, EventKind.SKIPPED)
    for e in reversed(v.events):
        if e.kind is EventKind.DISPATCHED:
            return True
        if e.kind in moves:
            return False
    return False


@dataclass
class Send:
    """A send the rules asked for (``transition.send``), not yet carried out."""

    step: int
    channel: Channel


@dataclass
class Sent:
    """A send whose code left (its HMAC was stored by ``code_sent``)."""

    step: int
    channel: Channel
    code: str
    reports: list[DeliveryKind] = field(default_factory=list)


class VerificationMachine(RuleBasedStateMachine):
    """One verification, and everything that may happen to it."""

    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.skewed = False  # the clock went back (another process's, or an NTP step)
        self.policy = Policy()
        self.v: Verification | None = None
        self.asked: list[Send] = []
        self.sent: list[Sent] = []
        self.approvals = 0
        self.history: list[Verification] = []
        self.max_step = 0
        self.max_attempts = 0
        self.ever_final: Verification | None = None

    # -- helpers -------------------------------------------------------------------------
    @property
    def ver(self) -> Verification:
        assert self.v is not None
        return self.v

    def apply(self, t: rules.Transition) -> None:
        old = self.ver
        self.v = t.verification
        if t.send is not None:
            assert t.send is self.v.channel, "a send is asked for the step it entered"
            self.asked.append(Send(self.v.step, t.send))
        self.after(old)

    def after(self, old: Verification) -> None:
        v = self.ver
        if old.status.final:
            assert v == old, f"a {old.status} verification changed"
        assert v.expires_at == old.expires_at, "one lifetime for every channel"
        assert v.attempts_used >= old.attempts_used, "attempts_left never increases"
        assert v.sends >= old.sends
        assert v.step >= old.step, "the plan is followed in order"
        assert v.events[: len(old.events)] == old.events, "events are only appended"
        for e in v.events[len(old.events) :]:
            if e.kind is EventKind.APPROVED:
                self.approvals += 1
        assert self.approvals <= 1, "at most one approval"

    def codes_out(self) -> set[str]:
        return {s.code for s in self.sent}

    def check(self, candidate: str | None, now: float) -> None:
        old = self.ver
        matched = candidate is not None and codes.matches(SECRET, VID, candidate, old.code_hashes)
        assert matched == (candidate in self.codes_out()), "codes.matches is exact"
        try:
            t, answer = rules.check(old, matched, now, self.policy)
        except NotPending:
            assert old.status in (Status.APPROVED, Status.CANCELED)
            assert now < old.expires_at or old.status.final
            return
        self.apply(t)
        v = self.ver
        assert answer.status is v.status
        assert answer.attempts_left == rules.attempts_left(v, self.policy)
        if v.status is Status.APPROVED and not old.status.final:
            assert matched and old.status is Status.PENDING and now < old.expires_at
        if matched and old.status is Status.PENDING and now < old.expires_at:
            assert v.status is Status.APPROVED
        if not matched and old.status is Status.PENDING and now < old.expires_at:
            assert v.attempts_used == old.attempts_used + 1
            assert (v.status is Status.FAILED) == (v.attempts_used == self.policy.max_checks), (
                "a verification ends failed exactly at the check limit"
            )
        if old.status is Status.PENDING and now >= old.expires_at:
            assert v.status is Status.EXPIRED

    # -- create ----------------------------------------------------------------------------
    @initialize(
        phone=st.sampled_from(PHONES),
        plan=st.sampled_from(PLANS),
        prefix=st.sampled_from(PREFIXES),
        code_length=st.integers(codes.MIN_LENGTH, codes.MAX_LENGTH),
        locale=st.sampled_from(["en", "nl", "en-GB", "fr"]),
        max_checks=st.integers(1, 6),
        max_sends=st.integers(1, 6),
        ttl=st.sampled_from([60, 300, 600, 3600]),
        flash_timeout=st.integers(10, 60),
        sms_timeout=st.integers(10, 900),
        voice_timeout=st.integers(100, 900),
        send_now=st.booleans(),
        seed=st.integers(0, 10**8 - 1),
    )
    def create(
        self,
        *,
        phone: Phone,
        plan: tuple[Channel, ...],
        prefix: str,
        code_length: int,
        locale: str,
        max_checks: int,
        max_sends: int,
        ttl: int,
        flash_timeout: int,
        sms_timeout: int,
        voice_timeout: int,
        send_now: bool,
        seed: int,
    ) -> None:
        self.policy = Policy(
            ttl_s=ttl,
            max_checks=max_checks,
            max_sends=max_sends,
            step_timeout_s={F: flash_timeout, S: sms_timeout, V: voice_timeout},
        )
        fits = numbers.cli_code_lengths(prefix)
        if F in plan and code_length not in fits:
            # The API: a flash call named with a code length that makes no caller-ID is 422;
            # a default plan goes without it. Either way no such verification exists.
            plan = tuple(c for c in plan if c is not F) or (S,)
        flash = None
        if F in plan:
            flash = FlashCallInfo(
                cli_prefix=prefix,
                code_length=code_length,
                cli_filter=numbers.cli_filter(prefix, code_length, phone),
                interception_timeout_s=20,
            )
        t = rules.create(
            verification_id=VID,
            phone=phone,
            plan=plan,
            code_length=code_length,
            now=self.now,
            policy=self.policy,
            flashcall=flash,
            locale=locale,
        )
        v = t.verification
        assert v.status in (Status.PENDING, Status.FAILED)
        assert v.expires_at == self.now + ttl
        assert v.locale == locale
        if F in plan and not phone.kind.can_be_mobile:
            assert v.flashcall is None, "no flash call block for a number that is no mobile"
        self.v = v
        self.history.append(v)
        if t.send is not None:
            assert t.send is v.channel
            if send_now:  # the API makes the first code with the create (one write)
                code = f"{seed % 10**code_length:0{code_length}d}"
                sent = rules.code_sent(v, v.step, codes.code_hash(SECRET, VID, code), self.now)
                self.v = sent.verification
                self.sent.append(Sent(v.step, t.send, code))
            else:
                self.asked.append(Send(v.step, t.send))

    # -- the dispatcher ----------------------------------------------------------------------
    @precondition(lambda self: self.asked)
    @rule(
        data=st.data(),
        seed=st.integers(0, 10**8 - 1),
        refused=st.sampled_from([False, False, False, True]),
    )
    def carry_out_send(self, data: st.DataObject, seed: int, refused: bool) -> None:
        """The dispatcher starts a send the rules asked for: a limit refuses it, or the code
        is recorded (``code_sent``) and leaves."""
        i = data.draw(st.integers(0, len(self.asked) - 1))
        send = self.asked.pop(i)
        old = self.ver
        if refused:
            self.apply(
                rules.send_refused(old, send.step, "too many sends to this number", self.now)
            )
            v = self.ver
            if old.status is not Status.PENDING or old.step != send.step:
                assert v == old
            elif self.now >= old.expires_at:
                assert v.status is Status.EXPIRED, "a refusal past the lifetime expires it"
            elif not old.sending or sent_since_entered(old):
                assert v == old, "a stale refusal (its step's send left, or was refused)"
            elif v.step == old.step:
                # A channel follows: the step keeps its timer, which moves on at its timeout.
                assert (v.status, v.sending) == (Status.PENDING, False)
                assert v.step_deadline == old.step_deadline is not None
                assert v.events[-1].kind is EventKind.SEND_REFUSED
            else:  # nothing follows: the plan is used up at once
                assert (v.step, v.step_deadline, v.sending) == (len(v.channels), None, False)
                assert v.status in (Status.PENDING, Status.FAILED)
            return
        code = f"{seed % 10**old.code_length:0{old.code_length}d}"
        try:
            t = rules.code_sent(old, send.step, codes.code_hash(SECRET, VID, code), self.now)
        except NotPending:
            assert (
                old.status is not Status.PENDING
                or old.step != send.step
                or not old.sending
                or self.now >= old.expires_at
                or sent_since_entered(old)
            )
            return
        assert not sent_since_entered(old), "one send per entry of a step"
        assert old.status is Status.PENDING and self.now < old.expires_at
        self.apply(t)
        assert self.ver.sends <= self.policy.max_sends, "the send limit of a verification"
        self.sent.append(Sent(send.step, send.channel, code))

    @precondition(lambda self: self.sent)
    @rule(
        data=st.data(),
        outcome=st.sampled_from(["delivered", "undeliverable", "ringing", "answered", "failed"]),
    )
    def report(self, data: st.DataObject, outcome: str) -> None:
        """A channel reports on one of the sends that left ("unknown": it never does)."""
        i = data.draw(st.integers(0, len(self.sent) - 1))
        s = self.sent[i]
        kind = {
            "delivered": DeliveryKind.DELIVERED,
            "undeliverable": DeliveryKind.UNDELIVERABLE,
            "failed": DeliveryKind.UNDELIVERABLE,  # an adapter that raised
            "ringing": DeliveryKind.RINGING,
            "answered": DeliveryKind.ANSWERED,
        }[outcome]
        if s.channel is S and kind in (DeliveryKind.RINGING, DeliveryKind.ANSWERED):
            kind = DeliveryKind.DELIVERED  # an SMS does not ring
        if any(k in (DeliveryKind.DELIVERED, DeliveryKind.UNDELIVERABLE) for k in s.reports):
            return  # a send has one final outcome
        s.reports.append(kind)
        detail = {
            "failed": f"{s.channel} channel failed",
            "ringing": "ringing (180)",
            "answered": "answered",
            "delivered": "ok",
            "undeliverable": "busy (486)",
        }[outcome]
        old = self.ver
        t = rules.delivery(old, s.step, kind, detail, now=self.now, policy=self.policy)
        self.apply(t)
        v = self.ver
        if old.status.final:
            assert v == old, "a report changes nothing once final"
        elif self.now >= old.expires_at:
            assert v.status is Status.EXPIRED
        else:
            assert rules.delivery_recorded(v, s.step, kind, detail, self.now)
        if (
            kind is DeliveryKind.UNDELIVERABLE
            and old.status is Status.PENDING
            and self.now < old.expires_at
            and old.step == s.step
        ):
            assert v.step > old.step, "undeliverable moves on at once"

    @rule()
    def timer(self) -> None:
        """The step timer: ``tick`` (whenever it runs, due or not)."""
        old = self.ver
        self.apply(rules.tick(old, self.now, self.policy))
        v = self.ver
        if old.status is Status.PENDING and self.now >= old.expires_at:
            assert v.status is Status.EXPIRED
        due = rules.due_at(v)
        if v.status.final:
            assert due is None
        else:
            assert due is not None and due <= v.expires_at

    # -- the API ---------------------------------------------------------------------------
    @precondition(lambda self: self.sent)
    @rule(data=st.data(), die=DIE)
    def check_right_code(self, data: st.DataObject, die: int) -> None:
        if die:
            return
        code = data.draw(st.sampled_from(sorted(self.codes_out())))
        assert codes.is_code_syntax(code, self.ver.code_length)
        self.check(code, self.now)

    @rule(seed=st.integers(0, 10**8 - 1))
    def check_wrong_code(self, seed: int) -> None:
        n = self.ver.code_length
        code = f"{seed % 10**n:0{n}d}"
        if code in self.codes_out():
            return
        self.check(code, self.now)

    @rule(
        code=st.one_of(
            st.text(alphabet="0123456789", min_size=0, max_size=12),
            st.text(min_size=1, max_size=10),
        )
    )
    def check_malformed_code(self, code: str) -> None:
        """The API answers 422 and spends no attempt: the rules never see it."""
        if len(code) == self.ver.code_length and code.isascii() and code.isdigit():
            return
        assert not codes.is_code_syntax(code, self.ver.code_length)

    @precondition(lambda self: self.ver.flashcall is not None)
    @rule(data=st.data(), seed=st.integers(0, 10**8 - 1), ours=st.booleans())
    def check_cli(self, data: st.DataObject, seed: int, ours: bool) -> None:
        """A flash call's caller-ID, as the app read it from the call log."""
        v = self.ver
        fc = v.flashcall
        assert fc is not None
        n = fc.code_length
        flash_codes = sorted(s.code for s in self.sent if s.channel is F)
        if ours and flash_codes:
            code = data.draw(st.sampled_from(flash_codes))
        else:
            code = f"{seed % 10**n:0{n}d}"
        lead, body = data.draw(st.sampled_from(cli_forms(fc.cli_prefix, code, v.phone)))
        sep_after_lead = data.draw(st.sampled_from(["", " ", "-"]))
        seps = data.draw(st.lists(st.sampled_from(["", " ", "-"]), min_size=1, max_size=len(body)))
        cli = (lead + sep_after_lead if lead else "") + spaced(body, seps)
        # The API's own gate: digits, a leading +, spaces or dashes.
        assert cli.isascii() and re.fullmatch(r"[+0-9 -]+", cli)
        assert re.fullmatch(fc.cli_filter, cli), f"cli_filter misses {cli!r}"
        got = numbers.code_from_cli(cli, fc.cli_prefix, fc.code_length, v.phone)
        assert got == code, f"{cli!r} carries {code}, read as {got}"
        self.check(got, self.now)

    @precondition(lambda self: self.ver.flashcall is not None)
    @rule(cli=st.text(alphabet="+0123456789 -", min_size=1, max_size=20))
    def check_foreign_cli(self, cli: str) -> None:
        """Any caller-ID: not ours (no match, a wrong check) or ours with some code."""
        v = self.ver
        fc = v.flashcall
        assert fc is not None
        got = numbers.code_from_cli(cli, fc.cli_prefix, fc.code_length, v.phone)
        if got is None:
            assert not re.fullmatch(fc.cli_filter, cli.strip())
        else:
            assert codes.is_code_syntax(got, fc.code_length)
            assert re.sub(r"[ -]", "", cli).endswith(got)
        self.check(got, self.now)

    @rule(seen=st.one_of(st.none(), st.integers(0, 3)), current=st.booleans())
    def fallback(self, seen: int | None, current: bool) -> None:
        old = self.ver
        seen_step = old.step if current else seen
        try:
            t = rules.request_fallback(old, self.now, self.policy, seen_step)
        except NotPending:
            assert old.status is not Status.PENDING or self.now >= old.expires_at
            return
        except NoChannelLeft:
            assert old.step + 1 >= len(old.channels)
            return
        self.apply(t)
        if seen_step is not None and seen_step != old.step:
            assert self.ver == old, "a fallback that lost the race moves nothing"

    @rule(die=DIE)
    def cancel(self, die: int) -> None:
        if die:
            return
        old = self.ver
        try:
            t = rules.cancel(old, self.now)
        except NotPending:
            assert old.status is not Status.PENDING or self.now >= old.expires_at
            return
        self.apply(t)
        assert self.ver.status is Status.CANCELED

    # -- time ------------------------------------------------------------------------------
    @rule(seconds=st.floats(0, 150), far=st.floats(150, 4000), die=DIE)
    def clock_forward(self, seconds: float, far: float, die: int) -> None:
        self.now += far if not die else seconds

    @rule(seconds=st.floats(0.001, 1.0))
    def clock_back(self, seconds: float) -> None:
        """Another process's clock, a millisecond to a second behind (README: events)."""
        self.now -= seconds
        self.skewed = True

    @precondition(lambda self: self.ver.step_deadline is not None)
    @rule(late=st.sampled_from([0.0, 0.001, 1.0]))
    def step_timeout(self, late: float) -> None:
        """The step's timeout passes, and its timer runs."""
        deadline = self.ver.step_deadline
        assert deadline is not None
        self.now = max(self.now, deadline + late)
        self.timer()

    @rule(die=DIE)
    def to_expiry(self, die: int) -> None:
        if die:
            return
        self.now = max(self.now, self.ver.expires_at)

    # -- invariants ------------------------------------------------------------------------
    @invariant()
    def holds(self) -> None:
        if self.v is None:
            return
        v = self.v
        p = self.policy
        assert v.expires_at == v.created_at + p.ttl_s
        assert 0 <= v.attempts_used <= p.max_checks
        assert v.sends <= p.max_sends
        assert (
            v.sends
            == len(v.code_hashes)
            == sum(1 for e in v.events if e.kind is EventKind.DISPATCHED)
        )
        assert 0 <= v.step <= len(v.channels)
        finals = [e for e in v.events if e.kind.value in {s.value for s in FINAL}]
        if v.status.final:
            assert len(finals) == 1 and v.events[-1] == finals[0], "one final event, the last"
            assert finals[0].kind.value == v.status.value
            assert not v.sending and v.step_deadline is None
        else:
            assert not finals
        approved = [e for e in v.events if e.kind is EventKind.APPROVED]
        assert len(approved) <= 1
        for e in approved:
            assert e.at < v.expires_at, "no approval after expires_at"
        # Time-ordered, when every process's clock agrees.
        if not self.skewed:
            ats = [e.at for e in v.events]
            assert ats == sorted(ats), "events are in time order"
        # Never a code, nor a caller-ID that carries one.
        for e in v.events:
            for s in self.sent:
                assert s.code not in e.detail, f"{e} holds a code"
        # The plan in order; a channel used twice only for the last channel's resend.
        dispatched = [e for e in v.events if e.kind is EventKind.DISPATCHED]
        idx = [v.channels.index(e.channel) for e in dispatched if e.channel is not None]
        assert idx == sorted(idx), "sends follow the plan's order"
        for ch in set(v.channels):
            n = sum(1 for e in dispatched if e.channel is ch)
            if ch is v.channels[-1]:
                assert n <= 2, f"{ch} sent {n} times"
                if n == 2:
                    resends = [
                        e
                        for e in v.events
                        if e.kind is EventKind.FALLBACK and e.channel is ch and "again" in e.detail
                    ]
                    assert resends, "a second send on the last channel says so"
                    if ch is F:  # a flash call that rang did its work: not sent again
                        first_again = v.events.index(resends[0])
                        assert not any(
                            e.kind in (EventKind.RINGING, EventKind.ANSWERED) and e.channel is F
                            for e in v.events[:first_again]
                        ), "a flash call that rang is not sent again"
            else:
                assert n <= 1, f"{ch} sent {n} times"
        # A flash call to a number that cannot be a mobile: skipped, with the reason.
        if not v.phone.kind.can_be_mobile and F in v.channels:
            assert not any(e.channel is F for e in dispatched)
            assert v.flashcall is None
            if v.step > v.channels.index(F):
                skips = [e for e in v.events if e.kind is EventKind.SKIPPED and e.channel is F]
                assert len(skips) == 1 and "mobile" in skips[0].detail
        for e in v.events:
            if e.kind is EventKind.SKIPPED:
                assert e.channel is F and not v.phone.kind.can_be_mobile
        # A verification that failed by its checks did so exactly at the limit.
        if v.attempts_used >= p.max_checks:
            assert v.status is Status.FAILED
        checks_failed = sum(1 for e in v.events if e.kind is EventKind.CHECK_FAILED)
        assert checks_failed == v.attempts_used

    def teardown(self) -> None:
        # Steer the search towards many sends on one channel (the resend rule's edge).
        most = max(Counter(s.channel for s in self.sent).values(), default=0)
        target(float(most), label="sends on one channel")
        event(f"sends on one channel: {most}")


TestVerificationRules = VerificationMachine.TestCase
TestVerificationRules.settings = settings(
    settings.default,
    stateful_step_count=50,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
