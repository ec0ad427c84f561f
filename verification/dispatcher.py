"""Carries out what the rules decide: sends on channels, step timers, fallbacks.

A send is: count it against the per-number and per-prefix limits (refused: recorded, nothing
leaves), make a fresh code, store its HMAC (before anything leaves), hand the code to the
channel adapter, and turn every report of the adapter into a rule transition, which may start
the next channel at once. Timers live in Redis (:mod:`verification.store`) and are leased by
whichever service process polls first, so a process that dies loses no fallback or expiry.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections import Counter, deque
from collections.abc import Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from sip_config.clock import Clock
from sip_config.settings import VerificationSettings
from sip_config.tasks import watch
from verification import codes, limits, rules
from verification.channels.base import ChannelAdapter, Delivery, DeliveryReport
from verification.errors import NotFound, NotPending, StoreUnavailable
from verification.model import Channel, Policy, Status, Verification
from verification.outage_log import OutageLog
from verification.rules import DeliveryKind, Transition
from verification.store import Stored, VerificationStore
from verification.timer_pause import TimerPause

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often due timers are looked for (fallback precision)
LEASE_S = 30.0  # a leased timer returns to the pool if its process dies
# Sends under way this long re-read their verification this often, and stop when another
# process (sharing the Redis, not this one's HTTP workers) made it final: a voice call rings
# up to 45 s, and an approval elsewhere should not leave the phone ringing for that long.
WATCH_S = 2.0
# A report the store could not take (Redis down) is written again after these pauses, then
# every last one, until the verification expires.
REPORT_RETRY_S = (0.1, 0.25, 0.5, 1.0, 2.0)
# After a store outage, the step timers hold off until it has been over this long (real
# time; see verification/timer_pause.py): a report another process kept during it lands
# within its last retry pause plus one store timeout of the outage's end.
TIMERS_QUIET_S = 5.0
# A create answered 503 after its write timed out: how often the store is asked whether it
# answers again, and how long after that a write still stuck on the old connection may land.
SETTLE_RETRY_S = 0.5
SETTLE_GRACE_S = 1.0
SETTLE_MAX = 10_000
# A stop waits this long for the creates answered 503 to be settled (the store back for
# SETTLE_GRACE_S, then each canceled or sent as its answer said): left, they are their step
# timers' to send on, for verifications their apps were told were never made.
STOP_SETTLE_S = 3.0
UNCONFIRMED = "its create was answered 503 (the store did not confirm the write in time)"


class Forwarder(Protocol):
    """Another process that sends on channels this one does not have (an HTTP worker process
    hands its SIP sends to the process that owns the SIP workers)."""

    def channels(self) -> frozenset[Channel]:
        """The channels it sends on."""
        ...

    def ready(self, channel: Channel) -> bool:
        """Whether it is reachable and its ``channel`` can send now."""
        ...

    def forward(self, vid: str, step: int, channel: Channel, counted: bool) -> bool:
        """Hand over one send (it reads the record itself); False when it is not reachable."""
        ...

    def settled(self, vid: str) -> None:
        """``vid`` became final here: stop its sends under way there (best effort)."""
        ...

    def moved(self, vid: str, step: int) -> None:
        """``vid`` moved on from ``step`` here: stop that step's send there (best effort)."""
        ...


class DeliveryCounter(Protocol):
    """Where delivery outcomes are counted (the metrics adapter)."""

    def count(self, channel: Channel, kind: DeliveryKind) -> None: ...


Rule = Callable[[Verification], Transition]


@dataclass(slots=True, eq=False)
class _Send:
    """One send under way: where its reports go, and those the store could not take yet."""

    vid: str
    step: int
    channel: Channel
    last: Stored  # the record as this send last wrote or read it: reports chain on it
    task: asyncio.Task[Any] | None  # the task that runs the channel
    kept: deque[tuple[DeliveryReport, float]] = field(default_factory=deque)  # (report, at)
    retrying: bool = False  # a task writes the kept reports
    unsure: bool = False  # the last write failed: it may have landed all the same


class Dispatcher:
    """Runs sends and timers for every process sharing the store."""

    def __init__(
        self,
        *,
        store: VerificationStore,
        channels: Mapping[Channel, ChannelAdapter],
        settings: VerificationSettings,
        policy: Policy,
        secret: bytes,
        clinic_name: str,
        clock: Clock,
        deliveries: DeliveryCounter | None = None,
        forwarder: Forwarder | None = None,
    ) -> None:
        self._store = store
        self._channels = dict(channels)
        self._forwarder = forwarder
        self._forwarded = (
            forwarder.channels() - self._channels.keys() if forwarder else frozenset[Channel]()
        )
        self._local = frozenset(self._channels)
        self._all = self._local | self._forwarded
        self._settings = settings
        self._policy = policy
        self._secret = secret
        self._clinic = clinic_name
        self._clock = clock
        self._outage = OutageLog(log, "timers", clock)
        self._faults = OutageLog(log, "timers", clock, faults=True)
        self._deliveries = deliveries
        self._tasks: set[asyncio.Task[None]] = set()
        # Creates answered 503 whose write may yet land (settle_unconfirmed), oldest first.
        self._unconfirmed: dict[str, tuple[Transition, bool, str | None]] = {}
        self._settling: asyncio.Task[None] | None = None
        # Sends under way per verification (task -> monotonic start, step), to stop when it is
        # final, or when it moves on from the step (None: no step's send, e.g. kept reports).
        self._inflight: dict[str, dict[asyncio.Task[None], tuple[float, int | None]]] = {}
        self._next_watch = 0.0
        self._pause = TimerPause(TIMERS_QUIET_S)  # in event-loop time
        self._keeping: Counter[str] = Counter()  # per verification: sends with kept reports
        # Timer moves whose write may have landed with its answer lost: verification id, and
        # the time the move was made at (see _follow_unsure_ticks).
        self._unsure_ticks: dict[str, float] = {}
        self._timer_task: asyncio.Task[None] | None = None
        # Checked by the timer loop as well as cancelling it: redis-py can swallow a
        # CancelledError that lands inside a command, and stop() must not wait forever.
        self._stopping = False

    @property
    def channels(self) -> frozenset[Channel]:
        """Every channel a verification can use: sent here or by the forwarder."""
        return self._all

    def local_channels(self) -> frozenset[Channel]:
        """The channels this process sends on itself."""
        return self._local

    def sends_here(self, channel: Channel) -> bool:
        """Whether this process sends on ``channel`` itself (not through the forwarder)."""
        return channel in self._channels

    def channel_ready(self, channel: Channel) -> bool:
        """Whether this process's ``channel`` can send now."""
        adapter = self._channels.get(channel)
        return adapter is not None and adapter.ready()

    def ready(self) -> bool:
        local = all(c.ready() for c in self._channels.values())
        fwd = self._forwarder
        return local and (fwd is None or all(fwd.ready(c) for c in self._forwarded))

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, on_failure: Callable[[str], None] | None = None) -> None:
        """Start the timer loop; its death by a defect is logged and told to ``on_failure``
        (the loop survives a failing round: only a defect in the loop itself ends it)."""
        self._timer_task = asyncio.create_task(self._timer_loop(), name="verification-timers")
        watch(self._timer_task, log, "the verification timers", on_failure)

    async def stop(self) -> None:
        settling = self._settling
        if self._unconfirmed and settling is not None and not settling.done():
            await asyncio.wait({settling}, timeout=STOP_SETTLE_S)
        self._stopping = True
        self._name_what_is_left()
        tasks = list(self._tasks)
        if self._timer_task:
            tasks.append(self._timer_task)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _name_what_is_left(self) -> None:
        """On shutdown, say what stops unfinished and what becomes of it (in Redis, each
        verification's step timer carries on without this process). Every verification is
        named, so that an operator can follow each one."""
        _warn_naming(
            "stopping with sends under way for %d verification(s), left to their step timers "
            "(a lost send on a plan's last channel is sent again)",
            self._inflight,
        )
        _warn_naming(
            "stopping with channel reports of %d verification(s) kept while the store was down "
            "and not yet written: lost, so their step timers decide without them (and may send "
            "a code again)",
            self._keeping,
        )
        _warn_naming(
            "stopping with %d create(s) answered 503 not yet settled, left to their step timers",
            self._unconfirmed,
        )

    def _spawn(
        self,
        coro: Coroutine[Any, Any, None],
        name: str,
        vid: str | None = None,
        step: int | None = None,
    ) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        if vid is None:
            task.add_done_callback(self._done)
        else:
            self._inflight.setdefault(vid, {})[task] = (self._clock.monotonic(), step)
            task.add_done_callback(functools.partial(self._sent, vid))
        return task

    def _sent(self, vid: str, task: asyncio.Task[None]) -> None:
        tasks = self._inflight.get(vid)
        if tasks is not None:
            tasks.pop(task, None)
            if not tasks:
                del self._inflight[vid]
        self._done(task)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", task.get_name(), exc_info=task.exception())

    # -- final states ---------------------------------------------------------------------------
    def changed(self, old: Verification | None, new: Verification) -> None:
        """Every write of this process's store (its ``on_change``): when ``new`` became final,
        stop its sends under way here and in the process this one forwards SIP sends to."""
        if old is None or old.status is not Status.PENDING:
            return  # every write passes here: keep it cheap
        if new.status is Status.PENDING:
            if new.step != old.step and new.step < len(new.channels):
                # Moved on (a /fallback, the step timer, a report): the send of the step left
                # must not go on beside the next one (a voice call ringing with a flash call).
                # Past the plan's last step nothing follows: its send may yet deliver.
                self.stop_sends(new.id, spare=asyncio.current_task(), step=old.step)
                old_channel = old.channels[old.step] if old.step < len(old.channels) else None
                if self._forwarder is not None and old_channel in self._forwarded:
                    self._forwarder.moved(new.id, old.step)
            return
        self.stop_sends(new.id, spare=asyncio.current_task())
        if self._forwarder is not None and self._forwarded.intersection(new.channels):
            self._forwarder.settled(new.id)

    def stop_sends(
        self, vid: str, *, spare: asyncio.Task[Any] | None = None, step: int | None = None
    ) -> int:
        """Stop every send of ``vid`` under way here (but ``spare``): its verification is
        final; or only the send of ``step``, which it moved on from.

        Cancelling a send's task is how it stops: a call that rings or plays is hung up by its
        channel on the way out (CANCEL or BYE), an SMS gateway is not asked again; an SMS
        already accepted cannot be recalled. Returns how many were stopped.
        """
        tasks = [
            t
            for t, (_, of_step) in self._inflight.get(vid, {}).items()
            if t is not spare and not t.done() and (step is None or of_step == step)
        ]
        for task in tasks:
            task.cancel()
        if tasks:
            why = "final" if step is None else f"moved on from step {step}"
            log.info("verification %s: %s: %d send(s) under way stopped", vid, why, len(tasks))
        return len(tasks)

    async def watch_sends(self) -> int:
        """Stop the sends under way for :data:`WATCH_S` or more whose verification another
        process made final (or that no longer exists): one round trip for all of them."""
        now = self._clock.monotonic()
        old = [
            vid
            for vid, tasks in self._inflight.items()
            if any(now - started >= WATCH_S for started, _ in tasks.values())
        ]
        if not old:
            return 0
        statuses = await self._store.statuses(old)
        stopped = 0
        for vid in old:
            status = statuses.get(vid)
            if status is None or status.final:
                stopped += self.stop_sends(vid)
        return stopped

    # -- transitions ---------------------------------------------------------------------------
    def follow(
        self,
        transition: Transition,
        *,
        counted: bool = False,
        known: Stored | None = None,
        code: str | None = None,
    ) -> None:
        """Start whatever send a transition asks for (returns at once).

        ``counted``: the API already counted this send against the per-number limits.
        ``known``: the record as just written, so the send need not read it again.
        ``code``: the code whose HMAC ``known`` already holds (:func:`rules.code_sent` was
        applied in the same write), so the send goes out at once.
        """
        v = transition.verification
        channel = transition.send
        if channel is None:
            return
        if channel in self._forwarded:
            assert self._forwarder is not None
            if code is None and self._forwarder.forward(v.id, v.step, channel, counted):
                return
            # Not reachable (or the code is made already: it never leaves this process):
            # sent here, where the missing channel reports undeliverable and the rules fall
            # back at once instead of waiting for the step timer.
        name = f"send {v.id} {v.step}"
        if code is not None and known is not None:
            self._spawn(self._deliver(v.id, v.step, channel, code, known), name, v.id, v.step)
        else:
            self._spawn(self._send(v.id, v.step, channel, counted, known), name, v.id, v.step)

    def settle_unconfirmed(
        self, attempted: Transition, *, replayable: bool, code: str | None = None
    ) -> None:
        """A create whose write timed out was answered 503, but a timeout is not a refusal:
        the write may land when the store answers again. Left alone, such a verification
        sent nothing until its step timer moved it on and sent on the next channel, for a
        verification its app had been told was never made. Once the store answers (and a
        write stuck on the old connection has had time to land): without an Idempotency-Key
        it is canceled, as the 503 said; with one (``replayable``), the app's retry will be
        answered with it, so its send goes out now, as the 201 would have had it: with
        ``code``, the one whose HMAC the write already holds (no second send is recorded).

        One task settles them all (an outage may refuse thousands of creates), and at most
        :data:`SETTLE_MAX` wait: past that the oldest is left to its step timer, and said so.
        """
        if len(self._unconfirmed) >= SETTLE_MAX:
            oldest = next(iter(self._unconfirmed))
            del self._unconfirmed[oldest]
            log.warning("verification %s: too many creates to settle; left unsettled", oldest)
        self._unconfirmed[attempted.verification.id] = (attempted, replayable, code)
        if self._settling is None or self._settling.done():
            self._settling = self._spawn(self._settle_all(), "settle creates")

    async def _settle_all(self) -> None:
        while self._unconfirmed:
            if not await self._store.ping():  # the store is still down: ask again soon
                await asyncio.sleep(SETTLE_RETRY_S)
                continue
            await asyncio.sleep(SETTLE_GRACE_S)
            for vid in list(self._unconfirmed):
                entry = self._unconfirmed.get(vid)  # gone: pushed out by a full queue meanwhile
                if entry is None:
                    continue
                try:
                    await self._settle(*entry)
                except StoreUnavailable:
                    break  # down again: wait for it again, this one included
                self._unconfirmed.pop(vid, None)

    async def _settle(self, attempted: Transition, replayable: bool, code: str | None) -> None:
        vid = attempted.verification.id
        try:
            if not replayable:
                await self._store.update(
                    vid, lambda v: (rules.cancel(v, self._clock.now(), UNCONFIRMED), None)
                )
                log.warning("verification %s: %s, but was made: canceled", vid, UNCONFIRMED)
                return
            stored = await self._store.get(vid)
        except (NotFound, NotPending):
            return  # never written, or ended already: nothing to settle
        if stored.verification == attempted.verification and attempted.send is not None:
            log.warning("verification %s: %s, but was made: sent now", vid, UNCONFIRMED)
            self.follow(
                Transition(stored.verification, send=attempted.send),
                counted=True,
                known=stored,
                code=code,
            )

    def follow_forwarded(self, vid: str, step: int, channel: Channel, counted: bool) -> None:
        """Run a send another process handed over (see :class:`Forwarder`)."""
        self._spawn(self._send(vid, step, channel, counted, None), f"send {vid} {step}", vid, step)

    async def _send(
        self, vid: str, step: int, channel: Channel, counted: bool, known: Stored | None
    ) -> None:
        try:
            await self._count_and_send(vid, step, channel, counted, known)
        except StoreUnavailable as exc:
            # Nothing has left (the code's HMAC is stored before it does): the step's timer,
            # in Redis, moves the verification on once the store is back.
            log.warning("verification %s: store unavailable, step %d not sent: %s", vid, step, exc)

    async def _count_and_send(
        self, vid: str, step: int, channel: Channel, counted: bool, known: Stored | None
    ) -> None:
        if known is None:
            try:
                known = await self._store.get(vid)
            except NotFound:
                return
        v = known.verification
        decision = (
            limits.LimitDecision(allowed=True)
            if counted
            else await self._store.hit_limits(
                limits.send_checks(self._settings, v.phone), self._clock.now()
            )
        )
        if not decision.allowed and decision.blocked_by is not None:
            reason = decision.blocked_by.describe()
            log.warning("verification %s: send refused: %s", vid, reason)
            await self._apply(vid, lambda x: rules.send_refused(x, step, reason, self._clock.now()))
            return
        code = codes.new_code(v.code_length)
        digest = codes.code_hash(self._secret, vid, code)
        try:
            _, _, written = await self._store.update_stored(
                vid,
                lambda x: (rules.code_sent(x, step, digest, self._clock.now()), None),
                known=known,
            )
        except NotPending:
            log.info("verification %s: moved on before the send of step %d", vid, step)
            return
        await self._deliver(vid, step, channel, code, written)

    async def _deliver(
        self, vid: str, step: int, channel: Channel, code: str, written: Stored
    ) -> None:
        """Hand ``code`` to the channel (its HMAC is in ``written``) and apply its reports."""
        v = written.verification
        adapter = self._channels.get(channel)
        send = _Send(vid, step, channel, written, asyncio.current_task())
        report = functools.partial(self._report, send)

        if adapter is None or not adapter.ready():
            await report(
                DeliveryReport(DeliveryKind.UNDELIVERABLE, f"{channel} channel not available")
            )
            return
        log.info("verification %s: sending by %s (step %d)", vid, channel, step)
        delivery = Delivery(vid, v.phone, code, v.locale, self._clinic)
        try:
            await adapter.send(delivery, report)
        except asyncio.CancelledError:
            raise
        except Exception:  # an adapter bug must still move the verification on
            # The traceback is in the log; the event (API, webhooks) names no internals.
            log.exception("verification %s: %s channel failed", vid, channel)
            await report(DeliveryReport(DeliveryKind.UNDELIVERABLE, f"{channel} channel failed"))

    # -- reports ---------------------------------------------------------------------------------
    async def _report(self, send: _Send, r: DeliveryReport) -> None:
        """One report of a channel. A store outage is not a delivery outcome: a report the
        store cannot take is kept, with every later one of the send, and written in order
        once the store is back (:meth:`_retry_kept`); the channel never sees the outage."""
        if self._deliveries is not None:
            self._deliveries.count(send.channel, r.kind)
        at = self._clock.now()
        if send.retrying:
            send.kept.append((r, at))
            return  # written after the one kept before it
        try:
            if send.kept:  # left by retries that were stopped: written in order, after them
                send.kept.append((r, at))
                await self._write_kept(send)
            else:  # the usual case: written now, and kept for the retries on an outage
                try:
                    await self._write_report(send, r, at)
                except StoreUnavailable:
                    send.kept.append((r, at))
                    raise
        except StoreUnavailable as exc:
            log.warning(
                "verification %s: store unavailable, %s report of %s kept: %s",
                send.vid,
                r.kind,
                send.channel,
                exc,
            )
            send.retrying = True
            # Its step's timer waits for these (run_due) until the task ends, however it
            # ends: a done callback runs even for a task cancelled before it started.
            self._keeping[send.vid] += 1
            task = self._spawn(self._retry_kept(send), f"reports {send.vid} {send.step}", send.vid)
            task.add_done_callback(functools.partial(self._kept_written, send.vid))

    async def _write_kept(self, send: _Send) -> None:
        """Apply the kept reports in order; :class:`StoreUnavailable` leaves the rest kept."""
        while send.kept:
            r, at = send.kept[0]
            going_on = await self._write_report(send, r, at)
            send.kept.popleft()
            if not going_on:
                send.kept.clear()

    async def _write_report(self, send: _Send, r: DeliveryReport, at: float) -> bool:
        """Apply one report (made at ``at``); False when the send is over (its verification
        is final or gone)."""
        unsure = send.unsure  # the last try may have been written, its answer lost

        def apply(x: Verification) -> tuple[Transition, None]:
            if unsure and rules.delivery_recorded(x, send.step, r.kind, r.detail, at):
                # It landed, and the send its move asked for was never started.
                return Transition(x, send=rules.send_owed(x, at)), None
            return rules.delivery(x, send.step, r.kind, r.detail, now=at, policy=self._policy), None

        try:
            transition, _, send.last = await self._store.update_stored(
                send.vid, apply, known=send.last
            )
        except NotFound:
            return False
        except StoreUnavailable:
            send.unsure = True
            raise
        send.unsure = False
        if send.last.verification.status.final:
            # Final, by this report or by anyone else (a check in another process is seen
            # here when the compare-and-set had to read again): after ringing or answered
            # the channel would go on calling, so this send stops too.
            terminal = r.kind in (DeliveryKind.DELIVERED, DeliveryKind.UNDELIVERABLE)
            self.stop_sends(send.vid, spare=send.task if terminal else None)
            return False
        self.follow(transition, known=send.last)
        return True

    async def _retry_kept(self, send: _Send) -> None:
        """Write the kept reports once the store is back, until the verification expires (a
        report after that changes nothing; the step's timer, in Redis, moves it on meanwhile)."""
        expires_at = send.last.verification.expires_at
        try:
            for attempt in itertools.count():
                await asyncio.sleep(REPORT_RETRY_S[min(attempt, len(REPORT_RETRY_S) - 1)])
                if self._clock.now() >= expires_at:
                    log.warning(
                        "verification %s: %d kept report(s) of %s dropped: it has expired",
                        send.vid,
                        len(send.kept),
                        send.channel,
                    )
                    send.kept.clear()
                    return
                try:
                    await self._write_kept(send)
                except StoreUnavailable:
                    continue
                log.info("verification %s: kept reports of %s written", send.vid, send.channel)
                return
        finally:
            send.retrying = False

    def _kept_written(self, vid: str, _task: asyncio.Task[None]) -> None:
        """A task writing kept reports of ``vid`` ended (written, dropped or cancelled)."""
        self._keeping[vid] -= 1
        if self._keeping[vid] <= 0:
            del self._keeping[vid]

    async def _apply(self, vid: str, rule: Rule) -> Stored | None:
        """Apply ``rule`` and follow its move; the record as it now stands (None: gone)."""

        def change(v: Verification) -> tuple[Transition, None]:
            return rule(v), None

        try:
            transition, _, stored = await self._store.update_stored(vid, change)
        except NotFound:
            return None
        self.follow(transition)
        return stored

    # -- timers ---------------------------------------------------------------------------------
    async def _timer_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            try:
                if self._pause.paused(loop.time()):  # after an outage: only watch the store
                    if not await self._store.ping():
                        raise StoreUnavailable("no answer to PING")
                else:
                    await self.run_due()
                    if self._clock.monotonic() >= self._next_watch:
                        self._next_watch = self._clock.monotonic() + WATCH_S
                        await self.watch_sends()
            except StoreUnavailable as exc:
                self._pause.failed(loop.time())
                self._outage.failed(exc)
            except Exception as exc:  # a defect must not end every later timer: keep polling
                self._faults.failed(exc)
            else:
                self._pause.answered()
                self._outage.ok()
                self._faults.ok()
            await asyncio.sleep(POLL_S)

    async def run_due(self) -> int:
        """Apply :func:`rules.tick` to every verification whose timer is due. Returns how many."""
        await self._follow_unsure_ticks()
        ids = await self._store.lease_due(self._clock.now(), LEASE_S)
        for vid in ids:
            if self._keeping[vid]:
                # A report of its send waits here to be written: it, not the step's timeout,
                # says what comes next. Its write sets the timer again; should it never land,
                # the lease brings the timer back in LEASE_S.
                continue
            now = self._clock.now()
            try:
                stored = await self._apply(vid, functools.partial(self._tick, now=now))
            except StoreUnavailable:
                # The move may have landed: its timer is then set to the new step's end, and
                # nothing would start the step's send before that.
                self._unsure_ticks[vid] = now
                raise
            except Exception:
                # One record the rules cannot take (a defect) must not hold up the others' timers
                # behind it; its lease brings it back in LEASE_S, and this line with it.
                log.exception("verification %s: its timer failed", vid)
                continue
            if stored is None:
                await self._store.forget_due(vid)
            else:
                # Put the real due time in place of the lease: a move wrote it already, but
                # nothing changed when another process's clock ran ahead of this one's.
                await self._store.reschedule(stored)
        return len(ids)

    def _tick(self, v: Verification, *, now: float) -> Transition:
        return rules.tick(v, now, self._policy)

    async def _follow_unsure_ticks(self) -> None:
        """Start the sends of timer moves whose write landed but whose answer was lost
        (:func:`rules.send_owed`), once the store answers again."""
        for vid, at in list(self._unsure_ticks.items()):
            try:
                known = await self._store.get(vid)
            except NotFound:
                del self._unsure_ticks[vid]
                continue
            del self._unsure_ticks[vid]
            channel = rules.send_owed(known.verification, at)
            if channel is not None:
                log.info("verification %s: its timer's move landed unconfirmed: sending", vid)
                self.follow(Transition(known.verification, send=channel), known=known)


IDS_PER_LINE = 50


def id_lines(vids: Collection[str], per_line: int = IDS_PER_LINE) -> list[str]:
    """Every id of ``vids``, ``per_line`` to a log line (none for none)."""
    listed = list(vids)
    return [", ".join(listed[i : i + per_line]) for i in range(0, len(listed), per_line)]


def _warn_naming(what: str, vids: Collection[str]) -> None:
    """``what`` (with a %d for how many) at WARNING, naming every one of ``vids``: on one
    line, or on as many as it takes, each saying which part it is."""
    lines = id_lines(vids)
    for n, ids in enumerate(lines, 1):
        part = f" (part {n} of {len(lines)})" if len(lines) > 1 else ""
        log.warning("%s%s: %s", what % len(vids), part, ids)
