"""The verification state machine: events in, new state and the next send out.

Pure and synchronous: no I/O, no clock (``now`` is an argument), no randomness (codes arrive
already hashed). The store applies each transition atomically; the dispatcher carries out the
``send`` a transition asks for.

Rules (NIST SP 800-63B, Twilio/Vonage practice):
- one lifetime and one wrong-check counter for the whole verification, whatever the channel;
  a fallback or a resend never resets them;
- a code is single use: the first right check approves, every later check finds it not pending;
- each channel step has a timeout after which the next channel is tried by itself;
- a channel that reports "undeliverable" moves on at once, without waiting for the timeout;
- a send a limit refused keeps its step's timer (the limits count sends to the number on
  every channel, so the next channel at once would meet the same limit); with no channel
  left to follow, the plan is used up at once.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum

from verification.errors import NoChannelLeft, NotOnChannel, NotPending
from verification.model import (
    Channel,
    Event,
    EventKind,
    FlashCallInfo,
    Phone,
    Policy,
    Status,
    Verification,
)

log = logging.getLogger(__name__)


class DeliveryKind(StrEnum):
    """What a channel adapter reports about a send."""

    RINGING = "ringing"
    ANSWERED = "answered"
    DELIVERED = "delivered"
    UNDELIVERABLE = "undeliverable"


_DELIVERY_EVENT = {
    DeliveryKind.RINGING: EventKind.RINGING,
    DeliveryKind.ANSWERED: EventKind.ANSWERED,
    DeliveryKind.DELIVERED: EventKind.DELIVERED,
    DeliveryKind.UNDELIVERABLE: EventKind.UNDELIVERABLE,
}


@dataclass(frozen=True, slots=True)
class Transition:
    """The new state, and the channel to send on now (if any)."""

    verification: Verification
    send: Channel | None = None


@dataclass(frozen=True, slots=True)
class CheckAnswer:
    """What ``POST /check`` answers."""

    status: Status
    attempts_left: int


def _set_status(v: Verification, status: Status, event: Event) -> Verification:
    log.debug("verification %s: %s -> %s", v.id, v.status, status)
    return v.with_events(event, status=status, step_deadline=None, sending=False)


def create(
    *,
    verification_id: str,
    phone: Phone,
    plan: tuple[Channel, ...],
    code_length: int,
    now: float,
    policy: Policy,
    flashcall: FlashCallInfo | None = None,
    locale: str = "en",
    callback_url: str = "",
    client: str = "",
) -> Transition:
    """A new verification, entering the first channel of ``plan`` that can serve the number."""
    if not plan or len(set(plan)) != len(plan):
        raise ValueError("the plan needs distinct channels")
    v = Verification(
        id=verification_id,
        phone=phone,
        status=Status.PENDING,
        channels=plan,
        step=0,
        attempts_used=0,
        sends=0,
        code_length=code_length,
        created_at=now,
        expires_at=now + policy.ttl_s,
        step_deadline=None,
        # The channel tried first: a channel the number cannot take is skipped at once, and
        # None when every one is (the verification then fails with nothing sent).
        events=(
            Event(EventKind.REQUESTED, now, _first_served(plan, phone), "via " + ", ".join(plan)),
        ),
        locale=locale,
        callback_url=callback_url,
        client=client,
        # Only with a flash call that may be placed: an app told to watch for a missed call
        # to a landline (its step skipped at once) would wait out interception_timeout_s.
        flashcall=(
            flashcall
            if Channel.FLASHCALL in plan and _can_serve(Channel.FLASHCALL, phone)
            else None
        ),
    )
    return _enter_step(v, 0, now, policy)


def _enter_step(v: Verification, step: int, now: float, policy: Policy) -> Transition:
    while step < len(v.channels) and not _can_serve(v.channels[step], v.phone):
        v = v.with_events(
            Event(
                EventKind.SKIPPED,
                now,
                v.channels[step],
                "the number cannot be a mobile: no handset would show a missed call",
            )
        )
        step += 1
    if step >= len(v.channels):
        return _used_up(v, now)
    channel = v.channels[step]
    if v.sends >= policy.max_sends:
        # No send may leave any more, on this step or a later one: the plan is used up, as
        # after a number's limit on its last step. Left on this step (no timer, its channel
        # shown), it told the app a code was coming there, and a /fallback only moved it to
        # the next step's refusal. It waits for the codes sent before, or fails at once when
        # every one came back undeliverable (_used_up).
        refused = "send limit of this verification reached"
        v = v.with_events(
            Event(EventKind.SEND_REFUSED, now, channel, refused),
            Event(EventKind.FALLBACK, now, None, f"{channel}: {refused}"),
        )
        return _used_up(v, now)
    v = v.changed(step=step, step_deadline=now + policy.step_timeout_s[channel], sending=True)
    return Transition(v, send=channel)


def _used_up(v: Verification, now: float) -> Transition:
    """Past the plan's last step: wait for a check until expiry while a code that left may
    still arrive, else fail at once (nothing could ever be typed in).

    Whatever moved it there (a create, a report, a refusal, the step timer, a ``/fallback``):
    a step timeout whose send never left (its process stopped first), followed only by
    channels the number cannot take, once waited out the lifetime with no code out.
    """
    v = v.changed(step=len(v.channels), step_deadline=None, sending=False)
    if not _code_may_be_out(v):
        return Transition(_failed_undelivered(v, now))
    return Transition(v)  # wait for a check until the verification expires


def _can_serve(channel: Channel, phone: Phone) -> bool:
    # A flash call is read from a handset's call log; a landline has none.
    return channel is not Channel.FLASHCALL or phone.kind.can_be_mobile


def _first_served(channels: tuple[Channel, ...], phone: Phone) -> Channel | None:
    """The first of ``channels`` that can serve ``phone`` (the others are skipped)."""
    return next((c for c in channels if _can_serve(c, phone)), None)


def _fallback(v: Verification, now: float, policy: Policy, reason: str) -> Transition:
    nxt = v.step + 1
    target = v.channels[nxt] if nxt < len(v.channels) else None
    v = v.with_events(Event(EventKind.FALLBACK, now, target, reason), sending=False)
    return _enter_step(v, nxt, now, policy)


def code_sent(v: Verification, step: int, code_hash: str, now: float) -> Transition:
    """A send on ``step`` is about to leave with the code whose HMAC is ``code_hash``.

    Applied *before* the message leaves, so a user who is quick never checks a code the
    store does not know yet.
    """
    if v.status is not Status.PENDING or v.step != step or not v.sending:
        raise NotPending("the verification moved on before the send", status=v.status.value)
    if now >= v.expires_at:
        # The timer may not have run yet: a code must never leave for an expired verification.
        raise NotPending("the verification has expired", status=Status.EXPIRED.value)
    if _sent_since_entered(v):
        # One send per entry of a step: a send asked for before the step timed out and sent
        # again, that only gets here after the resend's (a stalled process), would be a third
        # send on the last channel and pass CLINIC_MAX_SENDS, checked when the step is entered.
        raise NotPending("the send of this step has left already", status=v.status.value)
    channel = v.channels[step]
    return Transition(
        v.with_events(
            Event(EventKind.DISPATCHED, now, channel, f"send {v.sends + 1}"),
            sends=v.sends + 1,
            code_hashes=(*v.code_hashes, code_hash),
        )
    )


def send_refused(v: Verification, step: int, reason: str, now: float) -> Transition:
    """A rate limit (per number or prefix) stopped the send of ``step``.

    The plan moves on by itself as after any step that got no code through, but not at once:
    the limits count sends to the number on every channel, so the next channel now would be
    refused by the same limit (and the plan used up for nothing). The step keeps its timer,
    and at its timeout the next channel is tried, when the limit (a sliding window) may have
    let go; a ``/fallback`` may try it sooner. With no channel left that can serve the number,
    waiting would end in the same place: the plan is used up at once, and the verification
    fails when no code sent before may still arrive (nothing could ever be typed in), as
    when the last code comes back undeliverable.
    """
    if v.status is not Status.PENDING or v.step != step:
        return Transition(v)
    if now >= v.expires_at:
        # As a report that finds the lifetime over: expired, not failed for want of a code
        # (the timer may not have run yet), and nothing more is recorded.
        return Transition(_set_status(v, Status.EXPIRED, Event(EventKind.EXPIRED, now)))
    if not v.sending or _sent_since_entered(v):
        # A stale refusal: the step's send was refused already, or left (a send asked for
        # twice, as code_sent guards: a stalled process's, after its step was sent again).
        # It held back no code, and must not use up a plan whose last code is on its way.
        return Transition(v)
    channel = v.channels[step]
    v = v.with_events(Event(EventKind.SEND_REFUSED, now, channel, reason), sending=False)
    if _first_served(v.channels[step + 1 :], v.phone) is not None:
        return Transition(v)  # the step's timer moves on to the next channel
    v = v.with_events(Event(EventKind.FALLBACK, now, None, f"{channel}: {reason}"))
    return _used_up(v, now)


def delivery(
    v: Verification, step: int, kind: DeliveryKind, detail: str, *, now: float, policy: Policy
) -> Transition:
    """A channel's report on the send of ``step``.

    Reports of an earlier step are recorded but move nothing, but for the "undeliverable"
    that brings back the last code that may have arrived once the plan is used up: that
    fails the verification, as on the last step itself. "Undeliverable" on the current step
    falls back at once. Once the verification is final (approved, failed, expired,
    canceled) a report changes nothing and records nothing: a call still ringing when the
    user typed the code must not append "undeliverable" after "approved" (its events and
    webhooks would tell a story that ends twice). A report that finds the lifetime over
    expires the verification, as a check would, and is dropped with it.
    """
    if v.status.final or step >= len(v.channels):
        return Transition(v)
    if now >= v.expires_at:
        return Transition(_set_status(v, Status.EXPIRED, Event(EventKind.EXPIRED, now)))
    channel = v.channels[step]
    event = Event(_DELIVERY_EVENT[kind], now, channel, detail)
    current = v.status is Status.PENDING and v.step == step
    if not current:
        v = v.with_events(event)
        if (
            kind is DeliveryKind.UNDELIVERABLE
            and v.status is Status.PENDING
            and (v.step >= len(v.channels) or v.sends >= policy.max_sends)
            and not _code_may_be_out(v)
        ):
            # The plan was used up (or the send limit reached: no step may send again; a
            # record written before that used up the plan too stays on its step) while
            # this earlier code might still arrive: it has come back now, so every code that
            # left did, and nothing is left to send or type in. Failed now, as when the last
            # report comes on time, not pending till expiry.
            return Transition(_failed_undelivered(v, now))
        return Transition(v)
    if kind is DeliveryKind.UNDELIVERABLE:
        v = v.with_events(event)
        # Exhaustion fails only when every code that left came back undeliverable: one sent
        # on an earlier step (that timed out) may still be typed in, so then the verification
        # waits for a check until it expires (_used_up).
        return _fallback(v, now, policy, f"{channel}: {detail}")
    if kind is DeliveryKind.DELIVERED:
        return Transition(v.with_events(event, sending=False))
    return Transition(v.with_events(event))


def delivery_recorded(
    v: Verification, step: int, kind: DeliveryKind, detail: str, now: float
) -> bool:
    """Whether :func:`delivery` with these arguments was applied to ``v`` already (its event
    is there): a write whose answer was lost with the store's connection may have landed."""
    if step >= len(v.channels):
        return False
    return Event(_DELIVERY_EVENT[kind], now, v.channels[step], detail) in v.events


def send_owed(v: Verification, since: float) -> Channel | None:
    """The send that a transition made at ``since`` asked for, when its write landed but the
    answer was lost with the store's connection (so no one started the send), and no one has
    carried the verification on since: its last event, checks aside, is that transition's
    move (a fallback, or a step skipped) at ``since``, and its step still waits for a send.
    Any later event (a send that left, a timer, a fallback asked for) means someone else
    acted, and nothing is owed."""
    if v.status is not Status.PENDING or not v.sending or v.step >= len(v.channels):
        return None
    moves = [e for e in v.events if e.kind is not EventKind.CHECK_FAILED]
    if not moves or moves[-1].at != since:
        return None
    if moves[-1].kind not in (EventKind.FALLBACK, EventKind.SKIPPED):
        return None
    return v.channels[v.step]


def _failed_undelivered(v: Verification, now: float) -> Verification:
    return _set_status(
        v, Status.FAILED, Event(EventKind.FAILED, now, None, "no channel could deliver")
    )


def _code_may_be_out(v: Verification) -> bool:
    # Channels are distinct in a plan, so a channel names its step; a step may send twice
    # (tick: a send that never reported), so sends and losses are counted, not just seen.
    # A flash call that rang showed its caller-ID, the code, whatever it ended with after
    # (a 603 when the user declined it, a 486): as for _under_way, it did its work.
    if any(
        e.kind in (EventKind.RINGING, EventKind.ANSWERED) and e.channel is Channel.FLASHCALL
        for e in v.events
    ):
        return True
    sent = Counter(e.channel for e in v.events if e.kind is EventKind.DISPATCHED)
    lost = Counter(e.channel for e in v.events if e.kind is EventKind.UNDELIVERABLE)
    return any(n > lost[channel] for channel, n in sent.items())


def tick(v: Verification, now: float, policy: Policy) -> Transition:
    """Time passed: expire, or fall back when the step's timeout is over."""
    if v.status is not Status.PENDING:
        return Transition(v)
    if now >= v.expires_at:
        return Transition(_set_status(v, Status.EXPIRED, Event(EventKind.EXPIRED, now)))
    if v.step_deadline is not None and now >= v.step_deadline:
        if (
            v.sending
            and v.step == len(v.channels) - 1
            and _dispatched_on(v, v.step) < 2
            and not _under_way(v, v.step)
        ):
            # The last channel's send never reported (delivered or not) within the step, or
            # never left (a move whose write was answered 503, a process stopped before the
            # send): a channel reports well inside its step timeout.
            # Falling back would leave the verification waiting out its lifetime with no code
            # that surely left: send once more instead (send limits apply as to any send). A
            # "fallback" to the same channel, not "undeliverable": the first may have arrived,
            # and an undeliverable retry must not fail the verification for both.
            again = Event(
                EventKind.FALLBACK,
                now,
                v.channels[v.step],
                "no outcome reported before the step timed out (the sending process "
                "stopped?): sent again",
            )
            return _enter_step(v.with_events(again, sending=False), v.step, now, policy)
        return _fallback(v, now, policy, "step timed out without approval")
    return Transition(v)


def _under_way(v: Verification, step: int) -> bool:
    """Whether the send of ``step``, with no outcome at the step's timeout, still did its
    work: a flash call that rang showed its caller-ID (and one answered has no later report).
    A voice call is never under way then: the voice step outlasts any voice call (the
    settings refuse one shorter than VOICE_CALL_S), so one that rang and has no outcome at
    the timeout ended with the process that placed it, maybe before reading the code."""
    channel = v.channels[step]
    if channel is Channel.VOICE:
        return False
    return any(
        e.kind in (EventKind.RINGING, EventKind.ANSWERED) and e.channel is channel for e in v.events
    )


_MOVES = (EventKind.REQUESTED, EventKind.FALLBACK, EventKind.SKIPPED)


def _sent_since_entered(v: Verification) -> bool:
    """Whether a send left since the verification entered its current step (the create, a
    fallback, the last channel's "sent again", or a skip made the last move to it)."""
    for e in reversed(v.events):
        if e.kind is EventKind.DISPATCHED:
            return True
        if e.kind in _MOVES:
            return False
    return False


def _dispatched_on(v: Verification, step: int) -> int:
    """How many sends left on ``step`` (channels are distinct in a plan: a channel names its
    step)."""
    channel = v.channels[step]
    return sum(1 for e in v.events if e.kind is EventKind.DISPATCHED and e.channel is channel)


def check(
    v: Verification, matched: bool, now: float, policy: Policy
) -> tuple[Transition, CheckAnswer]:
    """A check of a code or caller-ID; ``matched`` says whether it was one of the codes sent."""
    if v.status is Status.PENDING and now >= v.expires_at:
        v = _set_status(v, Status.EXPIRED, Event(EventKind.EXPIRED, now))
    if v.status in (Status.EXPIRED, Status.FAILED):
        return Transition(v), CheckAnswer(v.status, _attempts_left(v, policy))
    if v.status is not Status.PENDING:
        raise NotPending(f"the verification is {v.status}", status=v.status.value)
    if matched:
        v = _set_status(v, Status.APPROVED, Event(EventKind.APPROVED, now, v.channel))
        return Transition(v), CheckAnswer(v.status, _attempts_left(v, policy))
    used = v.attempts_used + 1
    v = v.with_events(
        Event(EventKind.CHECK_FAILED, now, v.channel, f"attempt {used} of {policy.max_checks}"),
        attempts_used=used,
    )
    if used >= policy.max_checks:
        v = _set_status(
            v, Status.FAILED, Event(EventKind.FAILED, now, None, "too many wrong checks")
        )
    return Transition(v), CheckAnswer(v.status, _attempts_left(v, policy))


def _attempts_left(v: Verification, policy: Policy) -> int:
    return max(0, policy.max_checks - v.attempts_used)


def attempts_left(v: Verification, policy: Policy) -> int:
    """Wrong checks still allowed."""
    return _attempts_left(v, policy)


def request_fallback(
    v: Verification,
    now: float,
    policy: Policy,
    seen_step: int | None = None,
    *,
    moving_from: Channel | None = None,
) -> Transition:
    """The user did not get it: move to the next channel now.

    ``moving_from``: the channel the client says it saw (the request's ``from``). When the
    verification is no longer on it, :class:`NotOnChannel` and nothing changes: the client
    learns that it acted on an old read. Applied to the record the write is made against
    (the store's compare-and-set), so of two requests with one ``from`` one moves it.

    ``seen_step`` (without ``moving_from``): the step the client's request found. When the
    verification has moved on since (its step timer, or another request, won the race), that
    move was the one asked for: nothing changes, rather than a second move that would drop the
    send just started.
    """
    if v.status is Status.PENDING and now >= v.expires_at:
        raise NotPending("the verification has expired", status=Status.EXPIRED.value)
    if v.status is not Status.PENDING:
        raise NotPending(f"the verification is {v.status}", status=v.status.value)
    if moving_from is not None:
        current = v.channel
        if current is not moving_from:
            now_on = current.value if current is not None else None
            raise NotOnChannel(
                f"the verification is on {now_on or 'no channel (its plan is used up)'},"
                f" not {moving_from.value}: read it again",
                channel=now_on,
            )
    elif seen_step is not None and v.step != seen_step:
        return Transition(v)
    if v.step + 1 >= len(v.channels):
        raise NoChannelLeft("no channel is left in the plan")
    return _fallback(v, now, policy, "requested by the client")


def cancel(v: Verification, now: float, detail: str = "") -> Transition:
    """Cancel a pending verification (``detail``: why, when the client did not ask)."""
    if v.status is Status.PENDING and now >= v.expires_at:
        # Expired already (the timer may not have run yet): it is not canceled after the fact.
        raise NotPending("the verification has expired", status=Status.EXPIRED.value)
    if v.status is not Status.PENDING:
        raise NotPending(f"the verification is {v.status}", status=v.status.value)
    return Transition(_set_status(v, Status.CANCELED, Event(EventKind.CANCELED, now, None, detail)))


State = tuple[Status, Channel | None]


def state(v: Verification) -> State:
    """The status and the channel a verification is on (``clinic_verifications_total``).

    Once the plan is used up the channel is the last one it entered (a skipped channel was
    never entered), so an approval or expiry after the last step still names a channel;
    None only when every channel of the plan was skipped.
    """
    if v.step < len(v.channels):
        return v.status, v.channels[v.step]
    # Replay the moves: each enters the first channel from its target on that the number can
    # take (as _enter_step does); a move to null (past the plan) enters none. Not merely the
    # plan's last channel: a send limit, or channels the number cannot take, may use the plan
    # up from an earlier step.
    entered: Channel | None = None
    for e in v.events:
        if e.kind is EventKind.REQUESTED:
            entered = _first_served(v.channels, v.phone) or entered
        elif e.kind is EventKind.FALLBACK and e.channel is not None:
            start = v.channels.index(e.channel)
            entered = _first_served(v.channels[start:], v.phone) or entered
    return v.status, entered


def state_change(old: Verification | None, new: Verification) -> State | None:
    """The state ``new`` entered, when it differs from ``old``'s (``old`` None: created).

    Reports, wrong checks and sends change the record but not its state: None.
    """
    if old is not None and old.status is new.status and old.step == new.step:
        return None  # the usual write (a report, a wrong check): same status, same step
    entered = state(new)
    return entered if old is None or state(old) != entered else None


def due_at(v: Verification) -> float | None:
    """When :func:`tick` next has something to do, or None for a final state."""
    if v.status is not Status.PENDING:
        return None
    if v.step_deadline is None:
        return v.expires_at
    return min(v.expires_at, v.step_deadline)
