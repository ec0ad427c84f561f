"""The verification state machine (:mod:`verification.rules`), transition by transition.

Pure: every rule takes ``now``; a :class:`FakeClock` moves it. No Redis, no I/O.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import pytest

from sip_config.clock import FakeClock
from sip_config.settings import VOICE_CALL_S
from verification import rules
from verification.errors import NoChannelLeft, NotOnChannel, NotPending
from verification.model import (
    Channel,
    Event,
    EventKind,
    FlashCallInfo,
    NumberKind,
    Phone,
    Policy,
    Status,
    Verification,
)
from verification.rules import CheckAnswer, DeliveryKind, Transition

F, S, V = Channel.FLASHCALL, Channel.SMS, Channel.VOICE
ALL = (F, S, V)
POLICY = Policy()  # ttl 600 s, 5 checks, 5 sends, step timeouts 33/120/120 s
T0 = 1_800_000_000.0

MOBILE = Phone("+31612345678", "NL", 31, "612345678", NumberKind.MOBILE)
# The example: a Dutch landline, which has no call log to read a flash call from.
LANDLINE = Phone("+31201234567", "NL", 31, "201234567", NumberKind.FIXED_LINE)
US_EITHER = Phone("+12015550123", "US", 1, "2015550123", NumberKind.FIXED_LINE_OR_MOBILE)
TOLL_FREE = Phone("+318001234", "NL", 31, "8001234", NumberKind.TOLL_FREE)
FLASH_INFO = FlashCallInfo("+447400", 6, "^(?:x)$", 20)


def start(
    plan: tuple[Channel, ...] = ALL,
    phone: Phone = MOBILE,
    policy: Policy = POLICY,
    now: float = T0,
) -> Transition:
    return rules.create(
        verification_id="v" * 32,
        phone=phone,
        plan=plan,
        code_length=6,
        now=now,
        policy=policy,
        flashcall=FLASH_INFO,
    )


def sent(v: Verification, now: float) -> Verification:
    """The dispatcher's "the code is about to leave" for the current step."""
    return rules.code_sent(v, v.step, f"hash-{v.sends}", now).verification


def delivered(v: Verification, now: float) -> Verification:
    """The channel's report that the current step's send arrived."""
    return rules.delivery(
        v, v.step, DeliveryKind.DELIVERED, "ok", now=now, policy=POLICY
    ).verification


def started(
    plan: tuple[Channel, ...] = ALL, phone: Phone = MOBILE, policy: Policy = POLICY
) -> Verification:
    """Created, and the first send recorded."""
    return sent(start(plan, phone, policy).verification, T0)


def kinds(v: Verification) -> list[tuple[EventKind, Channel | None]]:
    return [(e.kind, e.channel) for e in v.events]


def wrong(v: Verification, now: float, policy: Policy = POLICY) -> Verification:
    return rules.check(v, False, now, policy)[0].verification


def approved() -> Verification:
    return rules.check(started(), True, T0 + 5, POLICY)[0].verification


def canceled() -> Verification:
    return rules.cancel(started(), T0 + 5).verification


def failed_by_checks() -> Verification:
    v = started()
    for i in range(POLICY.max_checks):
        v = wrong(v, T0 + i)
    assert v.status is Status.FAILED
    return v


# -- create ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plan", "phone", "step", "send", "events"),
    [
        (ALL, MOBILE, 0, F, [(EventKind.REQUESTED, F)]),
        (ALL, US_EITHER, 0, F, [(EventKind.REQUESTED, F)]),
        # ``requested`` names the channel tried first, not a skipped one.
        (ALL, LANDLINE, 1, S, [(EventKind.REQUESTED, S), (EventKind.SKIPPED, F)]),
        (ALL, TOLL_FREE, 1, S, [(EventKind.REQUESTED, S), (EventKind.SKIPPED, F)]),
        ((F, V), LANDLINE, 1, V, [(EventKind.REQUESTED, V), (EventKind.SKIPPED, F)]),
        ((S, F, V), LANDLINE, 0, S, [(EventKind.REQUESTED, S)]),
        ((V,), LANDLINE, 0, V, [(EventKind.REQUESTED, V)]),
        ((S,), MOBILE, 0, S, [(EventKind.REQUESTED, S)]),
    ],
)
def test_create_enters_first_channel_that_can_serve(
    plan: tuple[Channel, ...],
    phone: Phone,
    step: int,
    send: Channel,
    events: list[tuple[EventKind, Channel | None]],
) -> None:
    t = start(plan, phone)
    v = t.verification
    assert t.send is send
    assert (v.status, v.step, v.channel, v.sending) == (Status.PENDING, step, send, True)
    assert kinds(v) == events
    assert v.expires_at == T0 + POLICY.ttl_s
    assert v.step_deadline == T0 + POLICY.step_timeout_s[send]
    assert (v.attempts_used, v.sends, v.code_hashes) == (0, 0, ())


@pytest.mark.parametrize("phone", [LANDLINE, TOLL_FREE])
def test_no_flash_call_info_when_the_flash_call_is_skipped(phone: Phone) -> None:
    # A review found "flashcall": {cli_filter, interception_timeout_s...} shown for a
    # landline: the app would watch its call log for a flash call that never comes.
    assert start(ALL, phone).verification.flashcall is None
    assert start(ALL, US_EITHER).verification.flashcall == FLASH_INFO


def test_skip_of_flash_call_says_why() -> None:
    v = start(ALL, LANDLINE).verification
    skipped = [e for e in v.events if e.kind is EventKind.SKIPPED]
    assert len(skipped) == 1
    assert "mobile" in skipped[0].detail


@pytest.mark.parametrize("phone", [LANDLINE, TOLL_FREE])
def test_create_with_only_a_flash_call_to_a_landline_fails(phone: Phone) -> None:
    t = start((F,), phone)
    v = t.verification
    assert t.send is None
    assert (v.status, v.step, v.channel, v.step_deadline) == (Status.FAILED, 1, None, None)
    assert kinds(v) == [
        (EventKind.REQUESTED, None),  # no channel was tried: the only one was skipped
        (EventKind.SKIPPED, F),
        (EventKind.FAILED, None),
    ]
    assert rules.due_at(v) is None


@pytest.mark.parametrize("plan", [(), (S, S), (F, S, F)])
def test_create_refuses_a_plan_without_distinct_channels(plan: tuple[Channel, ...]) -> None:
    with pytest.raises(ValueError, match="distinct"):
        start(plan)


@pytest.mark.parametrize(("plan", "kept"), [(ALL, True), ((S, V), False), ((V, F), True)])
def test_flash_call_info_only_with_a_flash_call_in_the_plan(
    plan: tuple[Channel, ...], kept: bool
) -> None:
    assert (start(plan).verification.flashcall is not None) is kept


# -- code_sent --------------------------------------------------------------------------------


def test_code_sent_counts_the_send_and_keeps_only_the_hash() -> None:
    v = start().verification
    v1 = rules.code_sent(v, 0, "h1", T0 + 1).verification
    assert (v1.sends, v1.code_hashes, v1.step, v1.sending) == (1, ("h1",), 0, True)
    assert kinds(v1)[-1] == (EventKind.DISPATCHED, F)
    assert v1.events[-1].detail == "send 1"
    assert "h1" not in repr(v1.events)


def test_code_sent_keeps_every_code_of_every_step() -> None:
    v = started()
    v = rules.request_fallback(v, T0 + 10, POLICY).verification
    v = rules.code_sent(v, 1, "second", T0 + 11).verification
    assert v.code_hashes == ("hash-0", "second")
    assert v.sends == 2


@pytest.mark.parametrize(
    ("make", "step", "status"),
    [
        (lambda: start().verification, 1, "pending"),  # the step moved on meanwhile
        (lambda: rules.delivery(started(), 0, DeliveryKind.DELIVERED, "", now=T0 + 1,
                                policy=POLICY).verification, 0, "pending"),  # not sending
        (approved, 0, "approved"),
        (canceled, 0, "canceled"),
    ],
)  # fmt: skip
def test_code_sent_refuses_a_send_that_is_no_longer_wanted(
    make: object, step: int, status: str
) -> None:
    assert callable(make)
    v: Verification = make()
    with pytest.raises(NotPending) as err:
        rules.code_sent(v, step, "h", T0 + 2)
    assert err.value.status == 409
    assert err.value.extra["verification_status"] == status


@pytest.mark.parametrize("late", [0.0, 0.5, 3600.0])
def test_code_sent_refuses_a_send_after_the_lifetime(late: float) -> None:
    """The timer that expires it may not have run yet: no code leaves after the end."""
    v = start().verification
    with pytest.raises(NotPending) as err:
        rules.code_sent(v, 0, "h", v.expires_at + late)
    assert err.value.extra["verification_status"] == "expired"
    assert rules.code_sent(v, 0, "h", v.expires_at - 0.001).verification.sends == 1


def test_a_stale_send_after_the_resend_is_refused() -> None:
    """tests/unit/test_prop_rules.py found: a send asked for that only reached code_sent
    after its step timed out and was sent again (a stalled process) went out as well; a
    second stale one made three sends on the last channel (the README says up to two)."""
    v = start((S,)).verification  # send A asked for, stalled
    v = rules.tick(v, T0 + 120, POLICY).verification  # no outcome: sent again (B asked)
    v = rules.code_sent(v, 0, "a", T0 + 121).verification  # A arrives at last
    v = rules.tick(v, T0 + 241, POLICY).verification  # still no outcome: C asked
    v = rules.code_sent(v, 0, "b", T0 + 242).verification
    with pytest.raises(NotPending, match="left already"):
        rules.code_sent(v, 0, "c", T0 + 243)
    assert v.sends == 2


def test_a_stale_send_does_not_pass_the_send_limit() -> None:
    """tests/unit/test_prop_rules.py found: with CLINIC_MAX_SENDS=1, the create's send and
    the step timer's resend both went out (the limit is checked as a step is entered)."""
    one = replace(POLICY, max_sends=1)
    v = start((S,), policy=one).verification  # send A asked for, stalled
    v = rules.tick(v, T0 + 120, one).verification  # sends 0 < 1: sent again (B asked)
    v = rules.code_sent(v, 0, "a", T0 + 121).verification
    with pytest.raises(NotPending):
        rules.code_sent(v, 0, "b", T0 + 122)
    assert v.sends == 1


# -- delivery ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "event", "sending"),
    [
        (DeliveryKind.RINGING, EventKind.RINGING, True),
        (DeliveryKind.ANSWERED, EventKind.ANSWERED, True),
        (DeliveryKind.DELIVERED, EventKind.DELIVERED, False),
    ],
)
def test_delivery_on_the_current_step_is_recorded_without_moving(
    kind: DeliveryKind, event: EventKind, sending: bool
) -> None:
    v0 = started()
    t = rules.delivery(v0, 0, kind, "180 Ringing", now=T0 + 1, policy=POLICY)
    v = t.verification
    assert t.send is None
    assert (v.status, v.step, v.step_deadline, v.sending) == (
        Status.PENDING,
        0,
        v0.step_deadline,
        sending,
    )
    assert v.events[-1].kind is event
    assert v.events[-1].detail == "180 Ringing"


@pytest.mark.parametrize(
    ("plan", "phone", "next_step", "next_channel", "skipped"),
    [
        (ALL, MOBILE, 1, S, False),
        ((S, V), MOBILE, 1, V, False),
        ((S, F, V), LANDLINE, 2, V, True),  # the flash call is skipped on the way
    ],
)
def test_undeliverable_moves_on_at_once(
    plan: tuple[Channel, ...],
    phone: Phone,
    next_step: int,
    next_channel: Channel,
    skipped: bool,
) -> None:
    v0 = started(plan, phone)
    first = v0.channel
    t = rules.delivery(v0, 0, DeliveryKind.UNDELIVERABLE, "404", now=T0 + 2, policy=POLICY)
    v = t.verification
    assert t.send is next_channel
    assert (v.status, v.step, v.sending) == (Status.PENDING, next_step, True)
    assert v.step_deadline == T0 + 2 + POLICY.step_timeout_s[next_channel]
    tail = [(EventKind.UNDELIVERABLE, first), (EventKind.FALLBACK, plan[1])]
    if skipped:
        tail.append((EventKind.SKIPPED, F))
    assert kinds(v)[-len(tail) :] == tail
    assert v.expires_at == v0.expires_at  # one lifetime for every channel


@pytest.mark.parametrize(
    ("plan", "phone"),
    [(ALL, MOBILE), ((S,), MOBILE), ((S, V), MOBILE), (ALL, LANDLINE), ((S, F), LANDLINE)],
)
def test_every_channel_undeliverable_fails(plan: tuple[Channel, ...], phone: Phone) -> None:
    v = start(plan, phone).verification
    now = T0
    while v.status is Status.PENDING:
        assert v.channel is not None, "pending with no channel left after undeliverable"
        v = sent(v, now)
        t = rules.delivery(v, v.step, DeliveryKind.UNDELIVERABLE, "gone", now=now, policy=POLICY)
        v = t.verification
        now += 1
    assert v.status is Status.FAILED
    assert (v.step, v.channel, v.step_deadline, v.sending) == (len(plan), None, None, False)
    assert v.events[-1].kind is EventKind.FAILED
    assert v.events[-1].detail == "no channel could deliver"
    assert rules.due_at(v) is None


def test_undeliverable_last_step_after_an_earlier_send_waits_for_that_code() -> None:
    """A code that left on an earlier step may still be typed in: the verification stays
    pending (until it expires) rather than failing, as after a step timeout."""
    v = started((S, V))
    v = rules.delivery(v, 0, DeliveryKind.DELIVERED, "", now=T0 + 1, policy=POLICY).verification
    v = rules.tick(v, T0 + 120, POLICY).verification  # the SMS step timed out
    v = sent(v, T0 + 120)
    v = rules.delivery(
        v, 1, DeliveryKind.UNDELIVERABLE, "486", now=T0 + 125, policy=POLICY
    ).verification
    assert (v.status, v.step, v.step_deadline) == (Status.PENDING, 2, None)
    assert rules.due_at(v) == v.expires_at
    _, answer = rules.check(v, True, T0 + 130, POLICY)
    assert answer == CheckAnswer(Status.APPROVED, POLICY.max_checks)


def test_a_flash_call_that_rang_then_was_declined_still_counts_as_shown() -> None:
    """The second review: a flash call that rang showed its caller-ID, the code, even if the
    user then declined it (603, reported undeliverable). When the SMS after it failed too,
    the verification failed, and a check with the flash call's right code got "failed"."""
    v = started((F, S))
    v = rules.delivery(v, 0, DeliveryKind.RINGING, "180", now=T0 + 1, policy=POLICY).verification
    v = rules.delivery(
        v, 0, DeliveryKind.UNDELIVERABLE, "603", now=T0 + 3, policy=POLICY
    ).verification
    assert (v.status, v.step) == (Status.PENDING, 1), "on to the SMS"
    v = sent(v, T0 + 3)
    v = rules.delivery(
        v, 1, DeliveryKind.UNDELIVERABLE, "gateway 500", now=T0 + 5, policy=POLICY
    ).verification
    assert v.status is Status.PENDING, "the flash call's code was shown: it waits for it"
    _, answer = rules.check(v, True, T0 + 20, POLICY)
    assert answer == CheckAnswer(Status.APPROVED, POLICY.max_checks)
    # One that never rang (refused at once, 404) showed nothing: exhaustion fails as before.
    w = started((F, S))
    w = rules.delivery(
        w, 0, DeliveryKind.UNDELIVERABLE, "404", now=T0 + 1, policy=POLICY
    ).verification
    w = sent(w, T0 + 1)
    w = rules.delivery(
        w, 1, DeliveryKind.UNDELIVERABLE, "gateway 500", now=T0 + 5, policy=POLICY
    ).verification
    assert w.status is Status.FAILED


def test_the_earlier_code_coming_back_after_the_plan_is_used_up_fails_it() -> None:
    """tests/unit/test_prop_rules.py's author: once the last step's code came back and an
    earlier one might still arrive, the verification waits; when that one comes back too,
    nothing can be typed in any more. It stayed pending, with no code out and no channel
    left, until it expired."""
    v = started((S, V))
    v = rules.tick(v, T0 + 120, POLICY).verification  # the SMS step timed out
    v = sent(v, T0 + 120)
    v = rules.delivery(
        v, 1, DeliveryKind.UNDELIVERABLE, "486", now=T0 + 125, policy=POLICY
    ).verification
    assert (v.status, v.step) == (Status.PENDING, 2), "the SMS may still arrive: waits"
    late = rules.delivery(v, 0, DeliveryKind.UNDELIVERABLE, "gone", now=T0 + 130, policy=POLICY)
    assert late.verification.status is Status.FAILED
    assert late.send is None
    assert [e.kind for e in late.verification.events[-2:]] == [
        EventKind.UNDELIVERABLE,
        EventKind.FAILED,
    ]
    # A late "delivered" of that SMS keeps it waiting for the code, as before.
    kept = rules.delivery(v, 0, DeliveryKind.DELIVERED, "ok", now=T0 + 130, policy=POLICY)
    assert kept.verification.status is Status.PENDING


@pytest.mark.parametrize("kind", list(DeliveryKind))
def test_stale_report_of_an_earlier_step_is_recorded_but_moves_nothing(
    kind: DeliveryKind,
) -> None:
    v = started()
    v = sent(rules.request_fallback(v, T0 + 10, POLICY).verification, T0 + 10)
    assert v.step == 1
    t = rules.delivery(v, 0, kind, "late", now=T0 + 11, policy=POLICY)
    after = t.verification
    assert t.send is None
    assert replace(after, events=v.events) == v
    assert after.events[-1].kind.value == kind.value
    assert after.events[-1].channel is F


def expired() -> Verification:
    return rules.tick(started(), T0 + POLICY.ttl_s, POLICY).verification


def failed_undeliverable() -> Verification:
    v = started((S,))
    return rules.delivery(
        v, 0, DeliveryKind.UNDELIVERABLE, "gone", now=T0 + 1, policy=POLICY
    ).verification


def approved_on_voice() -> Verification:
    """The black-box repro: two fallbacks to reach the voice call, then a right check."""
    v = started()
    for at in (T0 + 10, T0 + 20):
        v = sent(rules.request_fallback(v, at, POLICY).verification, at)
    assert v.channel is V
    return rules.check(v, True, T0 + 25, POLICY)[0].verification


FINAL = [approved, approved_on_voice, canceled, failed_by_checks, failed_undeliverable, expired]


@pytest.mark.parametrize("kind", list(DeliveryKind))
@pytest.mark.parametrize("make", FINAL)
@pytest.mark.parametrize("which", ["first step", "last step entered"])
def test_report_after_the_end_changes_nothing_and_records_nothing(
    make: object, kind: DeliveryKind, which: str
) -> None:
    assert callable(make)
    v: Verification = make()
    assert v.status.final
    step = 0 if which == "first step" else min(v.step, len(v.channels) - 1)
    for now in (T0 + 30, v.expires_at + 1):  # before and after the lifetime
        assert rules.delivery(v, step, kind, "late", now=now, policy=POLICY) == Transition(v)


@pytest.mark.parametrize("kind", list(DeliveryKind))
@pytest.mark.parametrize("late", [0.0, 0.5, 300.0])
def test_report_after_the_lifetime_expires_and_is_not_recorded(
    kind: DeliveryKind, late: float
) -> None:
    """The timer may not have run yet: the report finds the verification expired."""
    v0 = started()
    t = rules.delivery(v0, 0, kind, "late", now=v0.expires_at + late, policy=POLICY)
    v = t.verification
    assert t.send is None
    assert (v.status, v.step_deadline, v.sending) == (Status.EXPIRED, None, False)
    assert kinds(v) == [*kinds(v0), (EventKind.EXPIRED, None)]
    assert rules.due_at(v) is None


@pytest.mark.parametrize(
    ("step", "kind", "detail", "at", "recorded"),
    [
        (0, DeliveryKind.UNDELIVERABLE, "gateway timed out", T0 + 1, True),
        (0, DeliveryKind.UNDELIVERABLE, "gateway timed out", T0 + 2, False),  # another time
        (0, DeliveryKind.UNDELIVERABLE, "gateway answered 500", T0 + 1, False),
        (0, DeliveryKind.DELIVERED, "gateway timed out", T0 + 1, False),
        (1, DeliveryKind.UNDELIVERABLE, "gateway timed out", T0 + 1, False),  # another channel
        (7, DeliveryKind.UNDELIVERABLE, "gateway timed out", T0 + 1, False),  # outside the plan
    ],
)
def test_delivery_recorded_finds_a_report_applied_before(
    step: int, kind: DeliveryKind, detail: str, at: float, recorded: bool
) -> None:
    """A retried write (the store's answer was lost) must not record the report twice."""
    v0 = started((S, V))
    v = rules.delivery(
        v0, 0, DeliveryKind.UNDELIVERABLE, "gateway timed out", now=T0 + 1, policy=POLICY
    ).verification
    assert rules.delivery_recorded(v, step, kind, detail, at) is recorded
    assert not rules.delivery_recorded(v0, step, kind, detail, at)


def test_send_owed_is_the_send_a_landed_move_asked_for_until_someone_acts() -> None:
    """A write whose answer was lost may have landed; the send its move asked for is then owed
    by the writer, unless anything but a check has happened to the verification since."""
    at = T0 + 1
    moved = rules.delivery(
        started((F, S, V)), 0, DeliveryKind.UNDELIVERABLE, "busy", now=at, policy=POLICY
    )
    assert moved.send is S
    v = moved.verification
    assert rules.send_owed(v, at) is S
    assert rules.send_owed(wrong(v, at + 2), at) is S, "a wrong check carries nothing on"
    assert rules.send_owed(v, at + 0.001) is None, "a move made at another time"
    assert rules.send_owed(sent(v, at + 2), at) is None, "its send left"
    assert rules.send_owed(rules.tick(v, at + 121, POLICY).verification, at) is None
    assert rules.send_owed(rules.cancel(v, at + 2).verification, at) is None
    # A report that moved nothing, and a move that asked for no send, owe nothing.
    assert rules.send_owed(delivered(started(), at), at) is None
    last = rules.delivery(
        started((S,)), 0, DeliveryKind.UNDELIVERABLE, "x", now=at, policy=POLICY
    ).verification
    assert rules.send_owed(last, at) is None
    # The last step's timer sends again on the same channel: owed as well.
    again = rules.tick(started((S,)), T0 + 121, POLICY)
    assert again.send is S
    assert rules.send_owed(again.verification, T0 + 121) is S
    # Steps skipped on the way (a landline cannot take a flash call) end the move too.
    skipped = rules.delivery(
        started((S, F, V), LANDLINE), 0, DeliveryKind.UNDELIVERABLE, "x", now=at, policy=POLICY
    )
    assert skipped.send is V and rules.send_owed(skipped.verification, at) is V


@pytest.mark.parametrize("step", [3, 4, 99])
def test_report_for_a_step_outside_the_plan_is_ignored(step: int) -> None:
    v = started()
    assert rules.delivery(v, step, DeliveryKind.RINGING, "", now=T0, policy=POLICY) == (
        Transition(v)
    )


# -- tick: step timeouts and expiry ---------------------------------------------------------


@pytest.mark.parametrize(
    ("plan", "timeout", "next_channel"),
    [(ALL, 33, S), ((S, V), 120, V), ((V, F), 120, F)],
)
def test_step_timeout_falls_back_by_itself(
    plan: tuple[Channel, ...], timeout: int, next_channel: Channel
) -> None:
    clock = FakeClock(T0)
    v = started(plan)
    assert rules.due_at(v) == T0 + timeout
    clock.advance(timeout - 0.5)
    assert rules.tick(v, clock.now(), POLICY) == Transition(v)
    clock.advance(0.5)
    t = rules.tick(v, clock.now(), POLICY)
    assert t.send is next_channel
    nv = t.verification
    assert (nv.step, nv.status, nv.sending) == (1, Status.PENDING, True)
    assert nv.step_deadline == clock.now() + POLICY.step_timeout_s[next_channel]
    assert nv.events[-1].kind is EventKind.FALLBACK
    assert nv.events[-1].channel is next_channel
    assert "timed out" in nv.events[-1].detail


@pytest.mark.parametrize("plan", [(S,), (F, V)])
def test_a_last_send_that_never_reported_is_sent_once_more(plan: tuple[Channel, ...]) -> None:
    """The black-box probe killed serve while the gateway held the SMS: no report ever came,
    and an SMS-only verification then waited out its lifetime with no code that surely left.
    A channel reports well inside its step timeout, so none by then means its process
    stopped: the last step is sent once more (a retry, not a fallback)."""
    v = started(plan)
    now = T0
    if len(plan) == 2:
        v = sent(rules.tick(delivered(v, T0 + 1), T0 + 33, POLICY).verification, T0 + 33)
        now = T0 + 33
    last = plan[-1]
    deadline = now + POLICY.step_timeout_s[last]
    t = rules.tick(v, deadline, POLICY)
    assert t.send is last
    nv = t.verification
    assert (nv.step, nv.status, nv.sending) == (len(plan) - 1, Status.PENDING, True)
    assert nv.step_deadline == deadline + POLICY.step_timeout_s[last]
    assert kinds(nv)[-1] == (EventKind.FALLBACK, last)
    assert "no outcome reported" in nv.events[-1].detail
    # The retry undeliverable: the first send may have arrived, so the verification waits
    # for a check rather than failing.
    lost = rules.delivery(
        sent(nv, deadline),
        nv.step,
        DeliveryKind.UNDELIVERABLE,
        "500",
        now=deadline + 1,
        policy=POLICY,
    ).verification
    assert lost.status is Status.PENDING
    # Sent again; no report again: once is enough, then it waits for a check until expiry.
    again = sent(nv, deadline)
    t = rules.tick(again, deadline + POLICY.step_timeout_s[last], POLICY)
    assert t.send is None
    assert (t.verification.step, t.verification.status) == (len(plan), Status.PENDING)
    assert kinds(t.verification)[-1] == (EventKind.FALLBACK, None)


@pytest.mark.parametrize("kind", [DeliveryKind.RINGING, DeliveryKind.ANSWERED])
def test_a_last_flash_call_that_rang_is_not_sent_again(kind: DeliveryKind) -> None:
    # A flash call that rang showed its caller-ID, and one the callee answered has no later
    # report: a second call would show a second code for nothing.
    v = started((F,))
    v = rules.delivery(v, 0, kind, "", now=T0 + 2, policy=POLICY).verification
    t = rules.tick(v, T0 + POLICY.step_timeout_s[F], POLICY)
    assert t.send is None
    assert kinds(t.verification)[-1] == (EventKind.FALLBACK, None)


@pytest.mark.parametrize("kind", [DeliveryKind.RINGING, DeliveryKind.ANSWERED])
def test_a_last_voice_call_with_no_outcome_at_its_timeout_is_placed_again(
    kind: DeliveryKind,
) -> None:
    # A review killed serve while voice calls rang: after the restart each verification fell
    # back at the step's timeout with nothing after it, and waited out its lifetime with no
    # code ever read. The voice step outlasts any voice call (VOICE_CALL_S), so a call with
    # no outcome by then ended with its process: it is placed once more.
    assert POLICY.step_timeout_s[V] >= VOICE_CALL_S
    v = started((V,))
    v = rules.delivery(v, 0, kind, "", now=T0 + 2, policy=POLICY).verification
    t = rules.tick(v, T0 + POLICY.step_timeout_s[V], POLICY)
    assert t.send is V
    assert kinds(t.verification)[-1] == (EventKind.FALLBACK, V)
    assert "no outcome reported" in t.verification.events[-1].detail


def test_a_last_step_whose_send_never_left_is_sent_at_its_timeout() -> None:
    # A /fallback whose write landed but was answered 503: the step moved, nobody sent.
    moved = rules.request_fallback(started((S, V)), T0 + 5, POLICY).verification
    assert (moved.step, moved.sending) == (1, True)
    t = rules.tick(moved, T0 + 5 + 120, POLICY)
    assert t.send is V
    assert kinds(t.verification)[-1] == (EventKind.FALLBACK, V)


def test_a_send_that_never_reported_on_an_earlier_step_falls_back_as_before() -> None:
    t = rules.tick(started((S, V)), T0 + 120, POLICY)
    assert t.send is V
    assert kinds(t.verification)[-1] == (EventKind.FALLBACK, V)


def test_no_resend_past_the_send_limit() -> None:
    """The last step's resend refused by CLINIC_MAX_SENDS used the plan up: its channel, not
    null, was shown while nothing more could be sent (README: null once the plan is used up)."""
    policy = Policy(max_sends=1)
    v = started((S,), policy=policy)
    t = rules.tick(v, T0 + 120, policy)
    nv = t.verification
    assert t.send is None
    assert kinds(nv)[-3:] == [
        (EventKind.FALLBACK, S),
        (EventKind.SEND_REFUSED, S),
        (EventKind.FALLBACK, None),
    ]
    assert nv.events[-1].detail == "sms: send limit of this verification reached"
    assert nv.status is Status.PENDING, "the code that left may still be typed"
    assert (nv.channel, nv.step, nv.step_deadline, nv.sending) == (None, 1, None, False)
    assert rules.state(nv) == (Status.PENDING, S)
    assert rules.state_change(v, nv) is None, "no channel entered: no state change to count"
    with pytest.raises(NoChannelLeft):
        rules.request_fallback(nv, T0 + 121, policy)


def test_custom_step_timeouts_are_used() -> None:
    policy = Policy(step_timeout_s={F: 7, S: 9, V: 11})
    v = started(policy=policy)
    assert v.step_deadline == T0 + 7
    v = rules.tick(v, T0 + 7, policy).verification
    assert v.step_deadline == T0 + 7 + 9


def test_no_channel_left_after_a_timeout_stays_pending_until_expiry() -> None:
    clock = FakeClock(T0)
    v = delivered(started((S,)), T0 + 1)
    clock.advance(120)
    t = rules.tick(v, clock.now(), POLICY)
    v = t.verification
    assert t.send is None
    assert (v.status, v.step, v.channel, v.step_deadline, v.sending) == (
        Status.PENDING,
        1,
        None,
        None,
        False,
    )
    assert kinds(v)[-1] == (EventKind.FALLBACK, None)
    assert rules.due_at(v) == v.expires_at
    clock.advance(100)
    assert rules.tick(v, clock.now(), POLICY) == Transition(v)  # nothing to do meanwhile
    # The code that left is still good until the lifetime ends...
    _, answer = rules.check(v, True, clock.now(), POLICY)
    assert answer.status is Status.APPROVED
    # ... and then the verification expires by itself.
    t = rules.tick(v, v.expires_at, POLICY)
    assert t.verification.status is Status.EXPIRED
    assert kinds(t.verification)[-1] == (EventKind.EXPIRED, None)


@pytest.mark.parametrize("how", ["timeout", "request"])
def test_a_move_past_the_plan_with_no_code_out_fails_at_once(how: str) -> None:
    """The SMS's send never left (its process stopped first, or a /fallback answered 503
    whose write landed), and the flash call that follows is skipped (a landline): past the
    plan with no code out. The step timer (or a /fallback) left it pending until it expired,
    the app waiting for a code that could never come."""
    v = start((S, F), LANDLINE).verification
    assert (v.step, v.sending, v.sends) == (0, True, 0)
    if how == "timeout":
        # Past the first step's send, so not the last channel's "sent again" (F follows).
        t = rules.tick(v, T0 + 120, POLICY)
    else:
        t = rules.request_fallback(v, T0 + 10, POLICY, moving_from=S)
    nv = t.verification
    assert t.send is None
    assert (nv.status, nv.channel, nv.step_deadline) == (Status.FAILED, None, None)
    assert kinds(nv)[-3:] == [
        (EventKind.FALLBACK, F),
        (EventKind.SKIPPED, F),
        (EventKind.FAILED, None),
    ]
    assert nv.events[-1].detail == "no channel could deliver"
    assert rules.due_at(nv) is None


def test_a_move_past_the_plan_waits_while_an_earlier_code_may_arrive() -> None:
    """As above, but the SMS left (no report yet): it may still be typed in."""
    v = started((S, F), LANDLINE)
    nv = rules.tick(v, T0 + 120, POLICY).verification
    assert (nv.status, nv.channel) == (Status.PENDING, None)
    assert rules.due_at(nv) == nv.expires_at


def test_whole_chain_of_timeouts_ends_pending_then_expires() -> None:
    v = delivered(started(), T0)
    now = T0
    for _ in ALL:
        deadline = v.step_deadline
        assert deadline is not None
        now = deadline
        t = rules.tick(v, now, POLICY)
        v = delivered(sent(t.verification, now), now) if t.send else t.verification
    assert (v.status, v.step, v.sends) == (Status.PENDING, 3, 3)
    assert now == T0 + 33 + 120 + 120
    assert rules.tick(v, T0 + POLICY.ttl_s, POLICY).verification.status is Status.EXPIRED


@pytest.mark.parametrize("late", [0.0, 0.001, 1.0, 86400.0])
def test_expiry_wins_over_a_step_timeout(late: float) -> None:
    policy = Policy(ttl_s=60, step_timeout_s={F: 60, S: 60, V: 60})
    v = started(policy=policy)
    assert v.step_deadline == v.expires_at
    t = rules.tick(v, v.expires_at + late, policy)
    assert t.send is None
    assert t.verification.status is Status.EXPIRED
    assert (t.verification.step_deadline, t.verification.sending) == (None, False)


@pytest.mark.parametrize("make", [approved, canceled, failed_by_checks])
def test_tick_leaves_a_final_verification_alone(make: object) -> None:
    assert callable(make)
    v: Verification = make()
    assert rules.tick(v, T0 + 10_000, POLICY) == Transition(v)


# -- max sends --------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["timeout", "undeliverable", "request"])
def test_max_sends_reached_refuses_the_next_send(how: str) -> None:
    policy = Policy(max_sends=1)
    v = started(policy=policy)
    assert v.sends == 1
    if how == "timeout":
        t = rules.tick(v, T0 + 33, policy)
    elif how == "undeliverable":
        t = rules.delivery(v, 0, DeliveryKind.UNDELIVERABLE, "x", now=T0 + 33, policy=policy)
    else:
        t = rules.request_fallback(v, T0 + 33, policy)
    nv = t.verification
    assert t.send is None
    if how == "undeliverable":
        # The one code that left came back, and no send may leave: nothing to wait for.
        assert (nv.status, nv.step, nv.step_deadline, nv.sending) == (
            Status.FAILED,
            3,
            None,
            False,
        )
        assert kinds(nv)[-3:] == [
            (EventKind.SEND_REFUSED, S),
            (EventKind.FALLBACK, None),
            (EventKind.FAILED, None),
        ]
        assert "limit" in nv.events[-3].detail
        return
    # No step may send again: the plan is used up from the middle step (channel null), not
    # left on a step that shows a channel and has no timer.
    assert (nv.status, nv.step, nv.step_deadline, nv.sending) == (Status.PENDING, 3, None, False)
    assert kinds(nv)[-2:] == [(EventKind.SEND_REFUSED, S), (EventKind.FALLBACK, None)]
    assert "limit" in nv.events[-2].detail
    assert rules.due_at(nv) == nv.expires_at
    # The metric's channel: the SMS step was entered (its send refused there), as before.
    assert rules.state(nv) == (Status.PENDING, S)
    assert rules.state_change(v, nv) == (Status.PENDING, S)


def test_the_last_code_coming_back_once_the_send_limit_is_reached_fails_it() -> None:
    """With CLINIC_MAX_SENDS reached no step may send again (a /fallback is refused too):
    once every code that left came back undeliverable, late or on time, nothing can be
    typed in. It stayed pending, no code out and no send possible, until it expired."""
    one = Policy(max_sends=1)
    v = started((S, V), policy=one)
    v = rules.tick(v, T0 + 120, one).verification  # the SMS step timed out; voice refused
    assert (v.status, kinds(v)[-2:]) == (
        Status.PENDING,
        [(EventKind.SEND_REFUSED, V), (EventKind.FALLBACK, None)],
    )
    late = rules.delivery(v, 0, DeliveryKind.UNDELIVERABLE, "gone", now=T0 + 130, policy=one)
    assert late.verification.status is Status.FAILED
    assert kinds(late.verification)[-2:] == [(EventKind.UNDELIVERABLE, S), (EventKind.FAILED, None)]
    # A late "delivered" keeps it waiting for that code, as before.
    kept = rules.delivery(v, 0, DeliveryKind.DELIVERED, "ok", now=T0 + 130, policy=one)
    assert kept.verification.status is Status.PENDING
    # Under the limit a send may still leave (a /fallback): a late report moves nothing.
    three = Policy(max_sends=3)
    w = started((S, V, F), policy=three)
    w = rules.tick(w, T0 + 120, three).verification
    w = rules.send_refused(w, 1, "too many sends to this number", T0 + 121).verification
    still = rules.delivery(w, 0, DeliveryKind.UNDELIVERABLE, "gone", now=T0 + 130, policy=three)
    assert still.verification.status is Status.PENDING


def test_the_metric_names_the_channel_entered_last_once_the_plan_is_used_up() -> None:
    """clinic_verifications_total's channel once the plan is used up is the last one entered
    (README): a plan used up from its SMS step, the flash call after it one the landline
    cannot take (never entered, no `skipped` event), was counted under flashcall."""
    v = start((S, F), LANDLINE).verification
    nv = rules.send_refused(v, 0, "too many sends to this number", T0 + 1).verification
    assert (nv.status, nv.channel) == (Status.FAILED, None)
    assert rules.state(nv) == (Status.FAILED, S)
    # Every channel skipped: none was entered.
    none = start((F,), LANDLINE).verification
    assert rules.state(none) == (Status.FAILED, None)
    # The whole plan walked: the last one.
    walked = rules.tick(delivered(started((F, S)), T0), T0 + 33, POLICY).verification
    walked = rules.tick(delivered(sent(walked, T0 + 33), T0 + 34), T0 + 153, POLICY).verification
    assert (walked.channel, rules.state(walked)) == (None, (Status.PENDING, S))


def test_sends_are_counted_across_channels() -> None:
    policy = Policy(max_sends=2)
    v = started(policy=policy)
    v = sent(rules.tick(v, T0 + 33, policy).verification, T0 + 33)
    assert v.sends == 2
    t = rules.tick(v, T0 + 33 + 120, policy)
    assert t.send is None
    assert kinds(t.verification)[-2:] == [(EventKind.SEND_REFUSED, V), (EventKind.FALLBACK, None)]


# -- send_refused (a rate limit) -------------------------------------------------------------


def test_send_refused_with_a_channel_to_follow_keeps_its_steps_timer() -> None:
    # It stopped the timer: nothing followed by itself, and the verification waited out its
    # lifetime though later channels could reach the person once the limit let go. Not at
    # once either: the limits count sends to the number on every channel.
    v = rules.tick(delivered(started(), T0 + 1), T0 + 33, POLICY).verification  # now SMS
    assert (v.step, v.step_deadline) == (1, T0 + 33 + 120)
    t = rules.send_refused(v, 1, "too many sends to this number", T0 + 34)
    nv = t.verification
    assert t.send is None
    assert (nv.status, nv.step, nv.step_deadline, nv.sending) == (
        Status.PENDING,
        1,
        T0 + 33 + 120,
        False,
    )
    assert nv.events[-1] == Event(
        EventKind.SEND_REFUSED, T0 + 34, S, "too many sends to this number"
    )
    assert rules.due_at(nv) == T0 + 33 + 120
    assert rules.tick(nv, T0 + 100, POLICY) == Transition(nv)  # not before its timeout
    moved = rules.tick(nv, T0 + 33 + 120, POLICY)
    assert moved.send is V
    assert kinds(moved.verification)[-1] == (EventKind.FALLBACK, V)
    assert moved.verification.events[-1].detail == "step timed out without approval"


def test_send_refused_on_the_first_step_waits_for_its_timeout_too() -> None:
    t = rules.send_refused(start().verification, 0, "too many sends to this number", T0 + 1)
    assert (t.send, t.verification.step, t.verification.step_deadline) == (None, 0, T0 + 33)
    assert rules.tick(t.verification, T0 + 33, POLICY).send is S


def _sent_again() -> Verification:
    """SMS only: its send never reported, and the step sends again (the send refused)."""
    v = rules.tick(started((S,)), T0 + 120, POLICY).verification
    assert (kinds(v)[-1], v.step, v.sending) == ((EventKind.FALLBACK, S), 0, True)
    return v


def _flash_timed_out() -> Verification:
    """Flash call then SMS: the flash step timed out (its caller-ID may have shown)."""
    v = rules.tick(started((F, S)), T0 + 33, POLICY).verification
    assert (v.step, v.sending) == (1, True)
    return v


@pytest.mark.parametrize("make", [_sent_again, _flash_timed_out])
def test_send_refused_with_nothing_to_follow_and_a_code_out_uses_up_the_plan(
    make: object,
) -> None:
    # Waiting for the last step's timeout would only move past the plan: done at once, so
    # the client sees `channel` null (nothing more is sent; the codes sent still check).
    assert callable(make)
    v: Verification = make()
    step, channel = v.step, v.channels[v.step]
    t = rules.send_refused(v, step, "too many sends to this number", T0 + 200)
    nv = t.verification
    assert t.send is None
    assert (nv.status, nv.step, nv.channel, nv.step_deadline, nv.sending) == (
        Status.PENDING,
        len(v.channels),
        None,
        None,
        False,
    )
    assert nv.events[-2:] == (
        Event(EventKind.SEND_REFUSED, T0 + 200, channel, "too many sends to this number"),
        Event(EventKind.FALLBACK, T0 + 200, None, f"{channel}: too many sends to this number"),
    )
    assert rules.due_at(nv) == nv.expires_at
    assert rules.check(nv, True, T0 + 201, POLICY)[1].status is Status.APPROVED
    # The code that left coming back now fails it: nothing more can be typed in.
    late = rules.delivery(nv, 0, DeliveryKind.UNDELIVERABLE, "gone", now=T0 + 202, policy=POLICY)
    assert late.verification.status is Status.FAILED


def _flash_undeliverable() -> Verification:
    """Flash call then SMS: the flash call came back undeliverable."""
    v = rules.delivery(
        started((F, S)), 0, DeliveryKind.UNDELIVERABLE, "busy (486)", now=T0 + 2, policy=POLICY
    ).verification
    assert (v.step, v.sending) == (1, True)
    return v


def _landline_sms_then_flash() -> Verification:
    """SMS then flash call to a landline: nothing sent yet, and the flash call would be
    skipped, so nothing follows the SMS."""
    return start((S, F), LANDLINE).verification


@pytest.mark.parametrize("make", [_flash_undeliverable, _landline_sms_then_flash])
def test_send_refused_with_nothing_to_follow_and_no_code_out_fails_at_once(make: object) -> None:
    # The flash call failed, the SMS it fell back to was refused: no code ever left and
    # none can (a /fallback answers 409 no-channel-left). It sat pending until it expired.
    assert callable(make)
    v: Verification = make()
    t = rules.send_refused(v, v.step, "too many sends to this number (limit 1 per 600 s)", T0 + 3)
    nv = t.verification
    assert t.send is None
    assert (nv.status, nv.step, nv.channel, nv.step_deadline) == (Status.FAILED, 2, None, None)
    assert kinds(nv)[-3:] == [
        (EventKind.SEND_REFUSED, S),
        (EventKind.FALLBACK, None),
        (EventKind.FAILED, None),
    ]
    assert nv.events[-1].detail == "no channel could deliver"
    assert rules.due_at(nv) is None


@pytest.mark.parametrize(
    ("make", "step"),
    [(lambda: start().verification, 1), (approved, 0), (canceled, 0)],
)
def test_send_refused_for_another_step_or_a_final_state_changes_nothing(
    make: object, step: int
) -> None:
    assert callable(make)
    v: Verification = make()
    assert rules.send_refused(v, step, "limit", T0 + 1) == Transition(v)


@pytest.mark.parametrize("plan", [(S,), (F, S, V)])
def test_send_refused_after_the_lifetime_expires_it(plan: tuple[Channel, ...]) -> None:
    # A refusal (a slow limit check) that lands after expires_at, before the timer ran: on
    # the last step with no code out it failed the verification ("no channel could
    # deliver") that had expired, as a report then expires it (and records nothing more).
    v = start(plan).verification
    t = rules.send_refused(v, v.step, "too many sends to this number", v.expires_at + 1)
    nv = t.verification
    assert (t.send, nv.status) == (None, Status.EXPIRED), kinds(nv)
    assert kinds(nv)[-1] == (EventKind.EXPIRED, None)
    assert EventKind.SEND_REFUSED not in {e.kind for e in nv.events}


def test_a_stale_refusal_after_the_resend_left_changes_nothing() -> None:
    # The last step's send never reported (its process stalled) and was sent again; the
    # stalled send then met the number's limit (the resend was counted). It held back no
    # code: the plan was used up (`fallback` to null, `channel` null) with the resend's
    # code on its way, and events that said none left on that step.
    v = rules.tick(started((S,)), T0 + 120, POLICY).verification  # sent again
    v = sent(v, T0 + 121)  # the resend left
    assert rules.send_refused(v, 0, "too many sends to this number", T0 + 122) == Transition(v)
    # Nor a second refusal of a step whose send was refused already (a duplicate event).
    w = rules.send_refused(start().verification, 0, "limit", T0 + 1).verification
    assert rules.send_refused(w, 0, "limit", T0 + 2) == Transition(w)


# -- check ------------------------------------------------------------------------------------


def test_right_check_approves() -> None:
    v = started()
    t, answer = rules.check(v, True, T0 + 5, POLICY)
    assert answer == CheckAnswer(Status.APPROVED, POLICY.max_checks)
    nv = t.verification
    assert (nv.status, nv.step_deadline, nv.sending) == (Status.APPROVED, None, False)
    assert kinds(nv)[-1] == (EventKind.APPROVED, F)
    assert t.send is None
    assert rules.due_at(nv) is None


@pytest.mark.parametrize("max_checks", [1, 3, 5, 10])
def test_wrong_checks_count_down_then_fail(max_checks: int) -> None:
    policy = Policy(max_checks=max_checks)
    v = started(policy=policy)
    for used in range(1, max_checks + 1):
        t, answer = rules.check(v, False, T0 + used, policy)
        v = t.verification
        assert v.attempts_used == used
        assert answer.attempts_left == max_checks - used
        expected = Status.FAILED if used == max_checks else Status.PENDING
        assert answer.status is expected
        assert v.status is expected
    failed = [e for e in v.events if e.kind is EventKind.FAILED]
    assert [e.detail for e in failed] == ["too many wrong checks"]
    checks = [e.detail for e in v.events if e.kind is EventKind.CHECK_FAILED]
    assert checks == [f"attempt {i} of {max_checks}" for i in range(1, max_checks + 1)]


@pytest.mark.parametrize("matched", [True, False])
def test_check_after_failure_answers_failed_and_changes_nothing(matched: bool) -> None:
    v = failed_by_checks()
    t, answer = rules.check(v, matched, T0 + 50, POLICY)
    assert answer == CheckAnswer(Status.FAILED, 0)
    assert t.verification == v


@pytest.mark.parametrize(
    ("offset", "matched", "status"),
    [
        (-0.001, True, Status.APPROVED),
        (-0.001, False, Status.PENDING),
        (0.0, True, Status.EXPIRED),
        (0.0, False, Status.EXPIRED),
        (0.5, True, Status.EXPIRED),
        (3600.0, True, Status.EXPIRED),
    ],
)
def test_check_at_the_end_of_the_lifetime(offset: float, matched: bool, status: Status) -> None:
    v = started()
    t, answer = rules.check(v, matched, v.expires_at + offset, POLICY)
    assert answer.status is status
    assert t.verification.status is status
    if status is Status.EXPIRED:
        assert kinds(t.verification)[-1] == (EventKind.EXPIRED, None)
        assert t.verification.attempts_used == 0  # a check after expiry is not an attempt
        # and a later check still answers expired without adding events
        t2, again = rules.check(t.verification, True, v.expires_at + offset + 1, POLICY)
        assert again.status is Status.EXPIRED
        assert t2.verification == t.verification


def test_check_after_a_tick_expired_it_answers_expired() -> None:
    v = rules.tick(started(), T0 + 600, POLICY).verification
    _, answer = rules.check(v, True, T0 + 601, POLICY)
    assert answer == CheckAnswer(Status.EXPIRED, POLICY.max_checks)


@pytest.mark.parametrize(("make", "status"), [(approved, "approved"), (canceled, "canceled")])
@pytest.mark.parametrize("matched", [True, False])
def test_check_on_a_closed_verification_is_not_pending(
    make: object, status: str, matched: bool
) -> None:
    assert callable(make)
    v: Verification = make()
    with pytest.raises(NotPending) as err:
        rules.check(v, matched, T0 + 6, POLICY)
    assert err.value.status == 409
    assert err.value.extra["verification_status"] == status


def test_a_code_is_single_use() -> None:
    v = started()
    v = rules.check(v, True, T0 + 5, POLICY)[0].verification
    with pytest.raises(NotPending):
        rules.check(v, True, T0 + 6, POLICY)


@pytest.mark.parametrize(
    "moves",
    [
        ("timeout", "timeout"),
        ("request", "request"),
        ("undeliverable", "timeout"),
        ("timeout", "request"),
    ],
)
def test_attempts_are_never_reset_by_a_fallback(moves: tuple[str, str]) -> None:
    """Two wrong checks per channel, over three channels: the fifth ends it."""
    v = started()
    now = T0
    expires = v.expires_at
    for i, move in enumerate(moves):
        v = wrong(v, now + 1)
        v = wrong(v, now + 2)
        now += 40
        if move == "timeout":
            deadline = v.step_deadline
            assert deadline is not None
            now = max(now, deadline)
            t = rules.tick(v, now, POLICY)
        elif move == "request":
            t = rules.request_fallback(v, now, POLICY)
        else:
            t = rules.delivery(v, v.step, DeliveryKind.UNDELIVERABLE, "x", now=now, policy=POLICY)
        assert t.send is not None, f"{move} did not move to the next channel"
        v = sent(t.verification, now)
        assert v.attempts_used == 2 * (i + 1)
        assert v.expires_at == expires
    assert v.attempts_used == 4
    t, answer = rules.check(v, False, now + 1, POLICY)
    assert answer == CheckAnswer(Status.FAILED, 0)


# -- request_fallback -------------------------------------------------------------------------


def test_request_fallback_moves_to_the_next_channel() -> None:
    v = started()
    t = rules.request_fallback(v, T0 + 3, POLICY)
    assert t.send is S
    nv = t.verification
    assert (nv.step, nv.sending, nv.step_deadline) == (1, True, T0 + 3 + 120)
    assert kinds(nv)[-1] == (EventKind.FALLBACK, S)
    assert nv.events[-1].detail == "requested by the client"


@pytest.mark.parametrize("plan", [(S,), (F, S)])
def test_request_fallback_on_the_last_channel_has_no_channel_left(
    plan: tuple[Channel, ...],
) -> None:
    v = started(plan)
    if len(plan) == 2:
        v = sent(rules.request_fallback(v, T0 + 1, POLICY).verification, T0 + 1)
    with pytest.raises(NoChannelLeft) as err:
        rules.request_fallback(v, T0 + 2, POLICY)
    assert err.value.status == 409


def test_request_fallback_after_exhaustion_has_no_channel_left() -> None:
    v = rules.tick(delivered(started((S,)), T0 + 1), T0 + 120, POLICY).verification
    assert v.step == 1
    with pytest.raises(NoChannelLeft):
        rules.request_fallback(v, T0 + 121, POLICY)


def test_request_fallback_to_a_skipped_channel_stays_pending() -> None:
    v = started((S, F), LANDLINE)
    t = rules.request_fallback(v, T0 + 3, POLICY)
    nv = t.verification
    assert t.send is None
    assert (nv.status, nv.step) == (Status.PENDING, 2)
    assert kinds(nv)[-2:] == [(EventKind.FALLBACK, F), (EventKind.SKIPPED, F)]


def test_request_fallback_after_the_timer_moved_on_moves_no_further() -> None:
    """The client's request found step 0; the step timer moved it to step 1 before the
    request's write: that was the move asked for, and its SMS must not be dropped for a
    voice call by a second move."""
    v = started()
    seen = v.step
    timed_out = rules.tick(v, T0 + 33, POLICY).verification
    assert timed_out.step == seen + 1
    t = rules.request_fallback(timed_out, T0 + 34, POLICY, seen)
    assert (t.verification, t.send) == (timed_out, None)
    moved = rules.request_fallback(timed_out, T0 + 34, POLICY, timed_out.step)
    assert moved.verification.step == seen + 2, "a request that saw step 1 moves from it"


def test_request_fallback_from_the_channel_it_is_on_moves() -> None:
    v = started()
    t = rules.request_fallback(v, T0 + 3, POLICY, v.step, moving_from=F)
    assert (t.verification.step, t.send) == (1, S)


@pytest.mark.parametrize("seen", [None, 0, 1])
def test_request_fallback_from_a_channel_it_has_left_is_refused(seen: int | None) -> None:
    """A client that read the verification on the flash call asks to move on from it; the
    step timer moved it to SMS meanwhile: 409 naming SMS, and nothing changes. Without
    ``from`` a request that read it on SMS moved it on a second time, past the SMS just sent
    (whatever step its own read found: ``from`` is what the client saw)."""
    timed_out = rules.tick(started(), T0 + 33, POLICY).verification
    assert timed_out.channel is S
    with pytest.raises(NotOnChannel) as err:
        rules.request_fallback(timed_out, T0 + 34, POLICY, seen, moving_from=F)
    assert (err.value.status, err.value.slug) == (409, "not-on-channel")
    assert err.value.extra == {"channel": "sms"}
    assert "on sms, not flashcall" in err.value.detail


def test_request_fallback_from_a_channel_it_has_not_reached_is_refused() -> None:
    with pytest.raises(NotOnChannel) as err:
        rules.request_fallback(started(), T0 + 3, POLICY, moving_from=V)
    assert err.value.extra == {"channel": "flashcall"}


def test_request_fallback_from_a_channel_after_the_plan_is_used_up_names_none() -> None:
    v = rules.tick(delivered(started((S,)), T0 + 1), T0 + 120, POLICY).verification
    assert v.channel is None and v.status is Status.PENDING
    with pytest.raises(NotOnChannel) as err:
        rules.request_fallback(v, T0 + 121, POLICY, moving_from=S)
    assert err.value.extra == {"channel": None}


def test_request_fallback_from_the_last_channel_has_no_channel_left() -> None:
    with pytest.raises(NoChannelLeft):
        rules.request_fallback(started((S,)), T0 + 2, POLICY, moving_from=S)


def test_request_fallback_from_a_channel_of_an_ended_verification_is_not_pending() -> None:
    with pytest.raises(NotPending):
        rules.request_fallback(approved(), T0 + 6, POLICY, moving_from=V)


@pytest.mark.parametrize(
    ("make", "at", "status"),
    [
        (started, T0 + 600, "expired"),
        (approved, T0 + 6, "approved"),
        (canceled, T0 + 6, "canceled"),
        (failed_by_checks, T0 + 6, "failed"),
    ],
)
def test_request_fallback_when_not_pending(make: object, at: float, status: str) -> None:
    assert callable(make)
    v: Verification = make()
    with pytest.raises(NotPending) as err:
        rules.request_fallback(v, at, POLICY)
    assert err.value.extra["verification_status"] == status


# -- cancel -----------------------------------------------------------------------------------


def test_cancel_a_pending_verification() -> None:
    t = rules.cancel(started(), T0 + 4)
    v = t.verification
    assert t.send is None
    assert (v.status, v.step_deadline, v.sending) == (Status.CANCELED, None, False)
    assert kinds(v)[-1] == (EventKind.CANCELED, None)
    assert rules.due_at(v) is None


@pytest.mark.parametrize("late", [0.0, 1.0])
def test_cancel_after_the_lifetime_is_not_pending(late: float) -> None:
    v = started()
    with pytest.raises(NotPending) as err:
        rules.cancel(v, v.expires_at + late)
    assert err.value.extra["verification_status"] == "expired"


@pytest.mark.parametrize(
    ("make", "status"),
    [(approved, "approved"), (canceled, "canceled"), (failed_by_checks, "failed")],
)
def test_cancel_when_not_pending(make: object, status: str) -> None:
    assert callable(make)
    v: Verification = make()
    with pytest.raises(NotPending) as err:
        rules.cancel(v, T0 + 7)
    assert err.value.extra["verification_status"] == status


# -- due_at -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ttl", "timeout", "expected"),
    [(600, 33, T0 + 33), (60, 120, T0 + 60), (120, 120, T0 + 120)],
)
def test_due_at_is_the_earlier_of_step_deadline_and_expiry(
    ttl: int, timeout: int, expected: float
) -> None:
    policy = Policy(ttl_s=ttl, step_timeout_s={F: timeout, S: timeout, V: timeout})
    assert rules.due_at(started(policy=policy)) == expected


@pytest.mark.parametrize("make", [approved, canceled, failed_by_checks])
def test_due_at_of_a_final_state_is_none(make: object) -> None:
    assert callable(make)
    v: Verification = make()
    assert rules.due_at(v) is None


# -- state: what clinic_verifications_total counts ----------------------------------------------


def _exhausted_then_approved() -> Verification:
    v = delivered(started((S,)), T0 + 1)
    v = rules.tick(v, T0 + 120, POLICY).verification  # the last step timed out: plan used up
    assert (v.status, v.channel) == (Status.PENDING, None)
    return rules.check(v, True, T0 + 130, POLICY)[0].verification


def _all_skipped() -> Verification:
    return start((F,), LANDLINE).verification


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (started, (Status.PENDING, F)),
        (approved, (Status.APPROVED, F)),
        (approved_on_voice, (Status.APPROVED, V)),
        (canceled, (Status.CANCELED, F)),
        (failed_by_checks, (Status.FAILED, F)),
        (failed_undeliverable, (Status.FAILED, S)),
        (expired, (Status.EXPIRED, F)),
        (_exhausted_then_approved, (Status.APPROVED, S)),
        (lambda: start((S, F), LANDLINE).verification, (Status.PENDING, S)),
        (_all_skipped, (Status.FAILED, None)),
    ],
)
def test_state_names_the_channel_even_when_the_plan_is_used_up(
    make: object, expected: tuple[Status, Channel | None]
) -> None:
    assert callable(make)
    assert rules.state(make()) == expected


def test_state_change_is_reported_once_per_change() -> None:
    v0 = start().verification
    assert rules.state_change(None, v0) == (Status.PENDING, F)
    steps: list[tuple[Verification, tuple[Status, Channel | None] | None]] = []
    v1 = sent(v0, T0)
    steps.append((v1, None))  # a send
    v2 = rules.delivery(v1, 0, DeliveryKind.RINGING, "180", now=T0 + 1, policy=POLICY).verification
    steps.append((v2, None))  # a report
    v3 = wrong(v2, T0 + 2)
    steps.append((v3, None))  # a wrong check
    v4 = rules.tick(v3, T0 + 33, POLICY).verification
    steps.append((v4, (Status.PENDING, S)))  # a fallback by the step timer
    v5 = rules.request_fallback(sent(v4, T0 + 33), T0 + 40, POLICY).verification
    steps.append((v5, (Status.PENDING, V)))  # a fallback asked for
    v6 = rules.tick(sent(v5, T0 + 40), T0 + 160, POLICY).verification
    steps.append((v6, None))  # the last step timed out: still on voice
    v7 = rules.tick(v6, T0 + POLICY.ttl_s, POLICY).verification
    steps.append((v7, (Status.EXPIRED, V)))
    old = v0
    for new, expected in steps:
        assert rules.state_change(old, new) == expected, kinds(new)[-1]
        old = new


# -- the record ---------------------------------------------------------------------------------


def test_verification_survives_the_json_round_trip() -> None:
    v = started()
    v = wrong(v, T0 + 1)
    v = rules.delivery(v, 0, DeliveryKind.RINGING, "180", now=T0 + 2, policy=POLICY).verification
    v = rules.tick(v, T0 + 33, POLICY).verification
    assert Verification.from_json(v.to_json()) == v
    done = rules.check(v, True, T0 + 40, POLICY)[0].verification
    assert Verification.from_json(done.to_json()) == done


def test_state_changes_are_logged_without_codes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="verification.rules")
    v = started()
    rules.check(v, True, T0 + 1, POLICY)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "pending -> approved" in text
    assert "hash-0" not in text


# -- Verification.changed (the rules' copy-with-changes) --------------------------------------


def test_changed_is_dataclasses_replace_for_every_field() -> None:
    from dataclasses import fields

    v = approved()
    others: dict[str, Any] = {
        "id": "other", "phone": LANDLINE, "status": Status.EXPIRED, "channels": (S,), "step": 1,
        "attempts_used": 3, "sends": 2, "code_length": 8, "created_at": 1.5, "expires_at": 2.5,
        "step_deadline": 9.0, "code_hashes": ("h",), "events": (), "locale": "nl",
        "callback_url": "https://x.example/cb", "client": "k2", "flashcall": None, "sending": True,
    }  # fmt: skip
    assert set(others) == {f.name for f in fields(v)}, "a new field needs a line here"
    for name, value in others.items():
        assert v.changed(**{name: value}) == replace(v, **{name: value}), name
    assert v.changed() == v and v.changed() is not v
    assert v.changed(step=2, sending=False) == replace(v, step=2, sending=False)


def test_changed_refuses_unknown_fields() -> None:
    with pytest.raises(TypeError, match="stpe"):
        approved().changed(stpe=1)


def test_stored_json_holds_enum_values_as_plain_strings() -> None:
    # to_json hands StrEnum members to the encoders as they are: both must write the value.
    import json

    import orjson

    v = approved()
    for text in (orjson.dumps(v.to_json()), json.dumps(v.to_json()).encode()):
        doc = json.loads(text)
        assert doc["status"] == "approved" and type(doc["status"]) is str
        assert doc["channels"] == ["flashcall", "sms", "voice"]
        assert doc["phone"]["kind"] == "mobile"
        assert [e["kind"] for e in doc["events"]][:2] == ["requested", "dispatched"]
        assert Verification.from_json(doc) == v
