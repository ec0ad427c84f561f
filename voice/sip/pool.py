"""The asyncio supervisor of the SIP worker processes.

pjsua2 allows one Endpoint per process and 4 calls per Endpoint in this wheel, so calls are
spread over ``CLINIC_SIP_WORKERS`` processes (:mod:`voice.sip.worker`), each talking JSON lines
over its stdin/stdout (:mod:`voice.sip.protocol`). The pool hands each outbound call to a
worker with a free slot, routes every event to the :class:`CallHandle` of its call, gives each
inbound call to the registered handler in its own task, and restarts a worker that dies
(backoff 0.2 s doubling to 5 s): the calls it held end with ``worker_lost``, never a hang. A
worker silent for ``PING_EVERY_S`` is pinged and one silent for ``WORKER_SILENT_S`` (frozen:
its pipes stay open, so no end of file says it) is killed, and then restarted as a dead one.
An inbound call refused for want of a slot (486) is handed to the ``on_busy`` hook and logged,
at most once a minute; each worker restart to ``on_restart``, and each outbound call not placed
because the free slots were the callers' (below) to ``on_kept_for_callers`` (serve counts them
in /metrics).

A worker sent SIGTERM by someone else (``pkill``, systemd's control-group stop) asks to be
stopped (:class:`StopAsked`): it takes no new call, its calls are closed by ``close_calls``
(serve: the clinic line's drain and closing notice for them alone) unless the service is
stopping already (its own drain does that), then it gets its Shutdown, and is restarted
while the service runs. It waits ``close_s`` + STOP_ASKED_MARGIN_S for that Shutdown.

Callers come first: an outbound call (each is a verification's: a voice code, a flash call over
TCP or TLS) takes a slot only when ``caller_slots`` (``CLINIC_SIP_CALLER_SLOTS``) stay free
after it, counted on the workers that are up; an inbound call may take any free slot. A
verification has SMS to fall back to, a patient with chest pain has no other line.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import secrets
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

from sip_config.child_process import spawn_child
from sip_config.clock import Clock
from sip_config.settings import HostPort, SipSettings
from sip_config.tasks import wait_ended
from sip_config.worker_exit import WorkerExit, status_note
from voice.sip.caller_identity import CallerIdentity, identify
from voice.sip.outcome import CallOutcome, SipStatus
from voice.sip.protocol import (
    Answer,
    AudioChunk,
    CallEvent,
    CallState,
    CannotListen,
    Command,
    Digit,
    Hangup,
    Hold,
    IncomingCall,
    MessageResult,
    Ping,
    PlaceCall,
    PlaceFailed,
    Play,
    PlayDone,
    ProtocolError,
    Registered,
    SendMessage,
    Shutdown,
    StartListen,
    StopAsked,
    Stopping,
    StopPlay,
    Transfer,
    TransferStatus,
    WorkerStatus,
    decode,
    encode,
)
from voice.sip.transaction import TIMER_H_S

log = logging.getLogger(__name__)

HandleEvent = CallEvent | Digit | PlayDone | Hold | TransferStatus
IncomingHandler = Callable[["CallHandle"], Awaitable[None]]
# Closes the calls of a worker asked to stop by someone else (serve: the clinic line's drain
# for those calls alone); the pool sends that worker its Shutdown once it returns.
CallsCloser = Callable[[Sequence["CallHandle"]], Awaitable[None]]

_BACKOFF_FIRST_S = 0.2
_BACKOFF_MAX_S = 5.0
_HEALTHY_AFTER_S = 30.0  # a worker that lived this long restarts without backoff
_START_TIMEOUT_S = 30.0  # 16 workers on 2 loaded cores took 15 s once
_START_TIMEOUT_PER_WORKER_S = 0.5  # more workers start in more time: 256 get 128 s
# A worker that is up but stopped (SIGSTOP, a debugger) or whose owner thread hangs keeps its
# pipes open: no end of file tells the pool, its calls would never end (their slots held, a
# flash call's verification waiting for its step's timeout, a caller on a silent line) and
# the front would go on redirecting callers to it. So each worker silent for PING_EVERY_S is
# sent a Ping, which its owner thread answers at its next pump (500 ms at most, idle), and
# one silent for WORKER_SILENT_S is killed: its calls end worker_lost and it is restarted (a
# PlaceCall's acknowledgement waits as long).
# Not sooner: the owner thread may block in a DNS lookup (pjsua has no resolver of its own
# here, so a MESSAGE or a call to a host name resolves in that thread), up to 10 s per
# nameserver when they are down (resolv.conf's 5 s, 2 attempts); killing a worker then would
# cut the callers on it. 30 s still ends a frozen worker's calls within the first minute.
PING_EVERY_S = 1.0
WORKER_SILENT_S = 30.0
# Until then, a worker silent this long (its Ping unanswered; an idle one answers within half a
# second) is "quiet": new calls go to another worker that has room, so callers are not sent
# to one that may never answer them. Only a preference: with no other room, it is used.
QUIET_AFTER_S = 3.0
# What stop() gives each worker for its Shutdown, all at once: its calls hung up, and up to
# voice/sip/pjsua.py's STOP_ANSWERS_S (2 s) for the far ends' answers to its CANCELs and
# BYEs (a 487 ACKed) and the registrar's to its un-REGISTER (in the same wait), then
# pjsua's teardown and the process's exit, which had 3 s before that wait: kept, on top of it.
WORKER_STOP_S = 5.0
# A worker sent SIGTERM by someone else (StopAsked) waits for its Shutdown the pool's
# ``close_s`` (the time its calls' closing may take) and this much more: the lines' way
# there and back, and a loop that is busy. Past it, it hangs its calls up itself.
STOP_ASKED_MARGIN_S = 5.0
# The line of a worker's exit during stop(): its index, pid, status and what the status says
# (sip_config/worker_exit.py); at ERROR when the status is not 0 (serve then exits 1).
WORKER_EXITED_AT_STOP = "SIP worker %s (pid %s) exited with status %s at the stop%s"
# The line of a restart under way as stop() began whose process could not be started (fork
# or exec failed): no exit status to report, the OSError says why (serve then exits 1).
WORKER_NOT_STARTED_AT_STOP = "SIP worker %s could not be started at the stop: %s"
# The line of a restart under way as stop() began whose worker was still starting (it had not
# reported its port) when its WORKER_STOP_S ran out: killed, and no defect of the stop (serve
# exits 0 for it). It never had a call, nor would it get one (nothing is placed at the stop),
# so its kill loses nothing; waiting out its start (up to _START_TIMEOUT_S, 30 s, on a loaded
# host) would only hold the stop. Before, it was killed as a worker that had not stopped by
# its deadline (-9), and serve exited 1 for a worker that never ran.
WORKER_KILLED_STARTING_AT_STOP = (
    "SIP worker %s (pid %s) was still starting at the stop, not up within %g s: killed "
    "(it never had a call: no defect of the stop)"
)
# What stop() then gives the calls' tasks, cancelled, to wind up: a call's record waits 2 s
# for Redis (voice/ivr/session.py STOP_SAVE_S), then is kept on disk in milliseconds. A
# task still at it (a disk write that hangs: NFS, a failing disk) is cancelled once more,
# which ends its wait (the write goes on in its thread), and left after TASKS_LEFT_S more:
# the stop is not held for it without bound.
CALLS_WIND_UP_S = 5.0
TASKS_LEFT_S = 1.0
# The Retry-After of a 503 (RFC 3261 sections 20.33 and 21.5.4): when the caller may try
# again, and how long a proxy or PBX that got it SHOULD send this server nothing new. Whole
# seconds, rounded up: a retry sooner only meets another 503.
# - Once the service is stopping (and for a caller sent to a worker asked to stop): the rest
#   of the stop, at most ``close_s`` (the drain and the closing notice) and the workers', the
#   calls' and the tasks' ends after it (WORKER_STOP_S + CALLS_WIND_UP_S + TASKS_LEFT_S).
#   Restarted, the service takes calls again no sooner; a proxy with another instance goes
#   there at once anyway. With the defaults (CLINIC_CALL_DRAIN_S 20, the notice 20 s), 51 s.
# - While no worker is up but one restarts: the longest restart backoff (5 s); a worker up
#   again takes calls at once, and a longer one would keep a PBX from a line that works.
# - From a worker at its own stop (``--retry-after-s``, a call still ringing at its
#   Shutdown): the part of the stop after the Shutdown (11 s), or a restart's time for a
#   worker asked to stop while the service runs.
STOP_TAIL_S = WORKER_STOP_S + CALLS_WIND_UP_S + TASKS_LEFT_S
# A redirected caller re-sends its INVITE to the worker within milliseconds of its 302. When
# that 302 was lost, the caller's copies of the INVITE get it again from the front (Timer A:
# at 0.5, 1.5, 3.5, 7.5 ... s), and each copy holds the slot for as long as the front may
# still repeat the 302 (Timer H from the first, 32 s) and this again (see renew_inbound).
_REDIRECT_RESERVE_S = 2.0
# The longest a slot is held, from its 302: copies of the INVITE that go on after the front
# forgot that 302 (a UA stops at timer B; a forged stream need not) are a new transaction of
# the same Call-ID, sent to the slot still held, and each renewal would hold it 34 s more.
_REDIRECT_HOLD_MAX_S = TIMER_H_S + _REDIRECT_RESERVE_S
# Callers refused for want of a slot: the first is logged at once, then at most one line this
# often with the count since (a full line refuses every caller: one line each would flood).
_BUSY_LOG_S = 60.0
# glibc malloc tuning for the workers: pjsua creates and releases its memory pools (dialog,
# transaction, message) for every call and its pool factory caches none, so glibc trimmed
# the heap top after a call and faulted fresh zeroed pages in for the next: a tenth of a
# worker's CPU was page faults (perf, 400 flash calls/s). Keep up to 4 MiB of free heap;
# blocks up to 1 MiB come from the heap, not from mmap (naming any of these turns glibc's
# own adaptive mmap threshold off).
_MALLOC_ENV = {
    "MALLOC_TRIM_THRESHOLD_": str(4 << 20),
    "MALLOC_MMAP_THRESHOLD_": str(1 << 20),
}


def worker_env(environ: Mapping[str, str], sip_password: str) -> dict[str, str]:
    """A SIP worker's environment: serve's without its ``CLINIC_*`` settings but the SIP
    password, the one it reads. A worker parses what any caller sends (SIP, RTP, in pjsua2's
    C): the service secret (the call records' key), the API keys, the SMS gateway's token and
    a Redis URL's password have no business in its memory."""
    env = {k: v for k, v in environ.items() if not k.startswith("CLINIC_")}
    env["CLINIC_SIP_PASSWORD"] = sip_password
    env.update(_MALLOC_ENV)
    return env


class SipError(Exception):
    """Base of the SIP pool's errors; ``status`` is the SIP status that fits."""

    status: int = SipStatus.SERVER_INTERNAL_ERROR


class SipStartError(SipError):
    """The pool could not start: a worker cannot listen on its port, or the workers did not
    report in time. ``serve`` exits 1 with its text (``cannot start: ...``)."""


class PoolBusyError(SipError):
    """Every worker is full (and stayed full for the queueing time)."""

    status = SipStatus.SERVICE_UNAVAILABLE


class PoolClosedError(SipError):
    """The pool is not running."""

    status = SipStatus.SERVICE_UNAVAILABLE


@dataclass(frozen=True, slots=True)
class OutboundCall:
    """An outbound call to place; see the module docs of :mod:`voice.sip.pjsua` for flash."""

    target_uri: str  # "sip:+447911123456@127.0.0.1:5080"
    caller_id: str  # user part of From (and of P-Asserted-Identity)
    flash: bool  # late offer, CANCEL after ring_s of ringing; answered anyway: BYE at once
    ring_s: float = 3.0
    answer_timeout_s: float = 30.0
    pai: bool = True
    headers: tuple[tuple[str, str], ...] = ()

    def command(self, call_id: str) -> PlaceCall:
        """This call as the command that places it, under ``call_id``."""
        return PlaceCall(
            call_id=call_id,
            target_uri=self.target_uri,
            caller_id=self.caller_id,
            flash=self.flash,
            ring_s=self.ring_s,
            answer_timeout_s=self.answer_timeout_s,
            pai=self.pai,
            headers=self.headers,
        )


class WorkerState(StrEnum):
    """Where one SIP worker is (:meth:`SipPool.occupancy`)."""

    UP = "up"  # takes calls
    UNREGISTERED = "unregistered"  # up, but not registered with CLINIC_SIP_REGISTRAR
    STARTING = "starting"  # its process runs, and has not said it is up yet
    # Sent SIGTERM by someone else (StopAsked, Stopping): no new call; its calls are being
    # closed, then it exits and is started again (it counted as "starting" for all that time).
    STOPPING = "stopping"
    DOWN = "down"  # not running: died (restarted after its backoff), or stopped


@dataclass(frozen=True, slots=True)
class Occupancy:
    """The pool's workers and call slots at one moment (for /metrics).

    The slots are those of the workers that are up: ``in_use`` holds the calls up or being
    placed (also those of a worker stopping, whose slots are no longer counted),
    ``reserved`` the slots held for callers the front redirected (on their way), ``free``
    what a new call may take. They add up to the slots of those workers, except
    for a moment after a call's start or end, until its worker has said how full it is.
    An outbound call takes a free slot only when ``kept_for_callers`` (CLINIC_SIP_CALLER_SLOTS)
    stay free after it.
    """

    workers: Mapping[WorkerState, int]  # every state, 0 included
    in_use: int
    reserved: int
    free: int
    kept_for_callers: int


_E = TypeVar("_E")


async def until_ended(events: asyncio.Queue[_E]) -> AsyncIterator[_E]:
    """The events of one call from ``events``, up to and including its ``ended`` CallEvent."""
    while True:
        ev = await events.get()
        yield ev
        if isinstance(ev, CallEvent) and ev.state is CallState.ENDED:
            return


class CallHandle:
    """One live call (outbound or inbound), owned by one worker.

    Events (:class:`CallEvent`, :class:`Digit`, :class:`PlayDone`, :class:`Hold`,
    :class:`TransferStatus`) arrive in order through :meth:`next_event` or :attr:`events`;
    the last one is a ``CallEvent`` with state ``ended`` and then :attr:`outcome` is set.
    Commands after the end are ignored. Each :meth:`play` returns an id that its one
    ``PlayDone`` carries.
    """

    def __init__(
        self,
        pool: SipPool,
        worker: _Worker,
        call_id: str,
        *,
        caller: str = "",
        called: str = "",
        headers: Mapping[str, str] | None = None,
        caller_identity: CallerIdentity = CallerIdentity.CLAIMED,
    ) -> None:
        self.id = call_id
        self.caller = caller
        # Whether a trusted hop asserted ``caller`` (voice/sip/caller_identity.py).
        self.caller_identity = caller_identity
        self.called = called
        self.headers: Mapping[str, str] = MappingProxyType(dict(headers or {}))
        self.outcome: CallOutcome | None = None
        self.sip_status = 0
        # Why the service, not a person, ended the call: "worker_lost" (its SIP worker died),
        # "shutdown" (the service stopped), or "".
        self.cut = ""
        self._pool = pool
        self._worker = worker
        self._events: asyncio.Queue[HandleEvent] = asyncio.Queue()
        self._audio: asyncio.Queue[bytes | None] | None = None  # made by the first listener
        self._ended = asyncio.Event()
        self._play_ids = itertools.count(1)

    def __repr__(self) -> str:
        return f"<CallHandle {self.id} outcome={self.outcome}>"

    @property
    def ended(self) -> bool:
        """True once the ``ended`` event has been delivered."""
        return self._ended.is_set()

    async def wait_ended(self, timeout: float | None = None) -> CallOutcome:  # noqa: ASYNC109
        """Wait for the end of the call (events stay queued); raises TimeoutError."""
        async with asyncio.timeout(timeout):
            await self._ended.wait()
        assert self.outcome is not None
        return self.outcome

    async def next_event(self, timeout: float | None = None) -> HandleEvent:  # noqa: ASYNC109
        """The next event; raises :class:`TimeoutError` after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            return await self._events.get()

    @property
    def events(self) -> AsyncIterator[HandleEvent]:
        """The events as an async iterator that stops after ``ended``."""
        return until_ended(self._events)

    async def answer(self) -> None:
        """Inbound: 200 OK with SDP (PCMU/PCMA and telephone-event)."""
        await self._send(Answer(self.id))

    async def play(self, wav: Path, *, loop: bool = False) -> int:
        """Start playing a WAV file; returns its play id at once.

        Exactly one :class:`PlayDone` with that id follows: at the end of the file, or when
        it is stopped or replaced by the next play, or (``failed``) when it could not start.
        No PlayDone comes after the call ended.
        """
        play_id = next(self._play_ids)
        await self._send(Play(self.id, str(wav), loop, play_id))
        return play_id

    async def stop_play(self) -> None:
        """Stop playing (barge-in); its PlayDone follows, nothing when nothing plays."""
        await self._send(StopPlay(self.id))

    async def start_listen(self) -> None:
        """Start streaming the caller's audio to :meth:`audio`."""
        await self._send(StartListen(self.id))

    async def audio(self) -> AsyncIterator[bytes]:
        """The caller's audio, 20 ms PCM16 8 kHz mono chunks, until the call ends."""
        queue = self._audio_queue()
        while True:
            chunk = await queue.get()
            if chunk is None:
                return
            yield chunk

    def _audio_queue(self) -> asyncio.Queue[bytes | None]:
        # Only calls that listen need one (not a flash call): made on first use.
        if self._audio is None:
            self._audio = asyncio.Queue()
            if self.ended:
                self._audio.put_nowait(None)
        return self._audio

    async def transfer(self, uri: str, headers: Mapping[str, str] | None = None) -> None:
        """Blind transfer (REFER); :class:`TransferStatus` events report its progress.

        The last one is ``final``; when its status is 2xx the worker hangs up our leg (the
        caller is with the target), so the call's ``ended`` follows.
        """
        await self._send(Transfer(self.id, uri, tuple((headers or {}).items())))

    async def hangup(self, sip_status: int = 0) -> None:
        """BYE (answered), CANCEL (outbound, early) or a final response (inbound, early)."""
        await self._send(Hangup(self.id, sip_status))

    async def _send(self, cmd: Command) -> None:
        if self.ended:
            log.debug("call %s: %s after the end ignored", self.id, type(cmd).__name__)
            return
        self._worker.send(cmd)

    def _deliver(self, ev: HandleEvent) -> None:
        if self.ended:
            return
        if isinstance(ev, CallEvent) and ev.state is CallState.ENDED:
            self.outcome = ev.outcome
            self.sip_status = ev.sip_status
            if not self._pool.running or self._worker.stopping:
                # Also a worker's exit at the stop (it may end before reporting its calls'
                # ends): the service stopped, no worker died. Or a worker stopping on a
                # SIGTERM of its own (Stopping): it hung the call up, not the far end.
                self.cut = "shutdown"
            elif ev.outcome is CallOutcome.WORKER_LOST:
                self.cut = "worker_lost"
            self._ended.set()
            if self._audio is not None:
                self._audio.put_nowait(None)
        self._events.put_nowait(ev)

    def _deliver_audio(self, pcm: bytes) -> None:
        if not self.ended:
            self._audio_queue().put_nowait(pcm)


@dataclass(slots=True, eq=False)
class _Worker:
    index: int
    port: int = 0
    process: asyncio.subprocess.Process | None = None
    pid: int = 0  # the process's, kept for the line of its exit
    killed: bool = False  # by stop(), past WORKER_STOP_S
    # ... before it ever came up (see WORKER_KILLED_STARTING_AT_STOP): no defect.
    killed_starting: bool = False
    came_up: bool = False  # this process reported its port (it could take calls)
    # By the watch while the pool ran (frozen, or never up): a death of the run, also when
    # its reader sees it only once stop() has begun; no exit at the stop.
    killed_running: bool = False
    reader: asyncio.Task[None] | None = None
    # The restart whose spawn is under way: stop() waits for it, then stops what it started.
    spawning: asyncio.Task[None] | None = None
    up: bool = False
    # Sent SIGTERM by someone else, it hangs up its calls and exits 0 (Stopping): not up.
    stopping: bool = False
    # Sent SIGTERM by someone else, it waits for its Shutdown (StopAsked) while its calls
    # are closed: not up (no new call goes to it), but still told what to do with its calls.
    leaving: bool = False
    registered: bool = False
    free_slots: int = 0
    # PlaceCalls sent that the worker's last WorkerStatus does not count yet: they drop
    # with the status that takes them out of free_slots (its ``placed``), not at their ack,
    # else each was counted twice in between (the gauges and the choice of worker).
    pending: int = 0
    placed: int = 0  # the WorkerStatus.placed of the last status
    # Inbound calls the front redirected here that have not arrived yet (Call-ID: expiry
    # time): without them a burst of INVITEs was all redirected to the same worker.
    reserved: dict[str, float] = field(default_factory=dict)
    started_at: float = 0.0
    heard_at: float = 0.0  # loop time of the worker's last line (see WORKER_SILENT_S)
    quiet: bool = False  # silent QUIET_AFTER_S: new calls go elsewhere while there is room
    failures: int = 0
    calls: dict[str, CallHandle] = field(default_factory=dict)
    acks: dict[str, asyncio.Future[bool]] = field(default_factory=dict)
    requests: dict[str, asyncio.Future[int]] = field(default_factory=dict)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cannot_listen: str = ""  # its CannotListen, as the line says it

    @property
    def available(self) -> int:
        return self.free_slots - self.pending - len(self.reserved) if self.up else 0

    def expire_reservations(self, now: float) -> None:
        if any(t <= now for t in self.reserved.values()):
            self.reserved = {c: t for c, t in self.reserved.items() if t > now}

    def send(self, cmd: Command) -> None:
        proc = self.process
        if proc is None or proc.stdin is None or not (self.up or self.leaving):
            log.debug("worker %s down: %s dropped", self.index, type(cmd).__name__)
            return
        try:
            proc.stdin.write(encode(cmd))
        except (BrokenPipeError, ConnectionResetError, RuntimeError) as exc:
            # RuntimeError: uvloop's "closed transport", the worker gone before its exit is
            # handled. Its calls end worker_lost then; a command for them raises at no caller.
            log.warning("worker %s: write failed: %s", self.index, exc)


class SipPool:
    """N pjsua2 worker processes behind one asyncio API."""

    def __init__(
        self,
        settings: SipSettings,
        *,
        clock: Clock,
        queue_timeout_s: float = 2.0,
        log_level: str = "WARNING",
        on_busy: Callable[[], None] | None = None,
        on_restart: Callable[[], None] | None = None,
        on_kept_for_callers: Callable[[], None] | None = None,
        close_calls: CallsCloser | None = None,
        close_s: float = 0.0,
    ) -> None:
        self._settings = settings
        # A worker asked to stop by someone else: its calls closed by close_calls (in at most
        # close_s), then its Shutdown. None: the Shutdown at once.
        self._close_calls = close_calls
        self._close_s = close_s
        self._stop_retry_after_s = math.ceil(close_s + STOP_TAIL_S)  # see STOP_TAIL_S
        self._clock = clock
        self._queue_timeout_s = queue_timeout_s
        self._log_level = log_level
        self._workers = [_Worker(i) for i in range(settings.workers)]
        self._handler: IncomingHandler | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()
        # Call-ID -> the latest its slot may be held to (_REDIRECT_HOLD_MAX_S from its 302),
        # and those times in order, to forget them (at most the picks of 34 s).
        self._hold_limits: dict[str, float] = {}
        self._hold_expiry: deque[tuple[float, str]] = deque()
        self._running = False
        self._refusing = False  # the service is stopping: no new inbound call
        # Every worker was ready at once since start(): from then on one ready is enough
        # for /readyz (see serving()).
        self._all_ready_once = False
        self._restarts = 0
        self._ids = itertools.count(1)
        # Call and request ids: unique per pool (a random prefix and a counter), without a
        # getrandom() system call per call as uuid4 made.
        self._id_prefix = secrets.token_hex(4)
        self._slots_max = 0  # the most free slots a worker ever reported (its capacity)
        self._cursor = 0
        self._on_busy = on_busy  # called for each inbound call refused with 486
        self._on_restart = on_restart  # called for each worker restarted after it died
        self._on_kept_for_callers = on_kept_for_callers  # each outbound call given up for them
        self._refused_busy = 0
        self._busy_unlogged = 0  # refused for want of a slot since the last log line
        self._busy_log_at = 0.0  # monotonic time from which the next such line may go
        self._kept_for_callers = 0  # outbound calls given up: the free slots were the callers'
        self._exits_at_stop: list[WorkerExit] = []  # not with status 0 (see exits_at_stop)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker and wait until each reports its port."""
        self._running = True
        self._all_ready_once = False
        limit = max(_START_TIMEOUT_S, _START_TIMEOUT_PER_WORKER_S * len(self._workers))
        try:
            for w in self._workers:
                await self._spawn(w)
            async with asyncio.timeout(limit):
                for w in self._workers:
                    await w.started.wait()
                    if w.cannot_listen:  # it exits: no restart will bind the port either
                        raise SipStartError(w.cannot_listen)
            watch = asyncio.create_task(self._watch(), name="sip-worker-watch")
            self._tasks.add(watch)
            watch.add_done_callback(self._tasks.discard)
        except BaseException as exc:
            # Also cancelled (a stop during serve's start-up): the workers started so far
            # are stopped here, since the caller only stops a pool that started.
            await self.stop()
            if isinstance(exc, TimeoutError):
                raise SipStartError(f"SIP workers did not start within {limit:g} s") from None
            raise

    async def stop(self) -> None:
        """Shut the workers down (hanging up their calls) and cancel handler tasks. Each
        worker gets WORKER_STOP_S, all of them at once (one after the other, a stop during
        start-up took 3 s a worker: none was up to be told); the tasks CALLS_WIND_UP_S
        (and TASKS_LEFT_S after a second cancellation)."""
        self._running = False
        # A restart whose spawn is under way is let finish it, and its process is stopped
        # below as any worker's (told, waited for, its exit judged): before, a spawn that
        # completed during the stop left a worker running, never told to stop nor waited
        # for, until serve's end closed its stdin. A restart still in its backoff starts
        # nothing now (it looks at _running as it wakes) and is cancelled with the tasks.
        spawning = {w.spawning for w in self._workers if w.spawning is not None}
        if spawning:
            await asyncio.wait(spawning)
        for w in self._workers:
            if w.up or w.leaving:
                w.send(Shutdown())
            elif w.process is not None and w.process.stdin is not None:
                # Not up yet (starting, or restarting): it takes no commands, but the end of
                # its stdin ends it; it has no call to hang up.
                w.process.stdin.close()
        await asyncio.gather(*(self._stopped(w) for w in self._workers))
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await self._tasks_ended()

    async def _tasks_ended(self) -> None:
        """Wait for the cancelled tasks (calls, restarts, the watch): CALLS_WIND_UP_S, then
        a second cancellation and TASKS_LEFT_S for those still going; log what is left."""
        left: set[asyncio.Task[None]] = set(self._tasks)
        for wait_s, again in ((CALLS_WIND_UP_S, True), (TASKS_LEFT_S, False)):
            done, left = await asyncio.wait(left, timeout=wait_s)
            for t in done:  # retrieved, as gather(return_exceptions=True) did
                if not t.cancelled():
                    t.exception()
            if not left:
                return
            names = ", ".join(sorted(t.get_name() for t in left))
            if again:
                log.warning(
                    "SIP pool stop: %d task(s) still winding up after %.0f s (a disk write "
                    "that hangs?), cancelled again: %s",
                    len(left),
                    wait_s,
                    names,
                )
                for t in left:
                    t.cancel()
            else:
                log.error("SIP pool stop: %d task(s) left running: %s", len(left), names)

    async def _stopped(self, w: _Worker) -> None:
        """Wait for ``w``'s process to end (SIGKILL past WORKER_STOP_S), then for its reader."""
        proc = w.process
        if proc is None:
            return
        try:
            async with asyncio.timeout(WORKER_STOP_S):
                await proc.wait()
        except TimeoutError:
            if w.came_up:
                log.warning("worker %s did not stop: killing pid %s", w.index, proc.pid)
            else:
                log.warning(WORKER_KILLED_STARTING_AT_STOP, w.index, proc.pid, WORKER_STOP_S)
                w.killed_starting = True
            w.killed = True
            proc.kill()
            await proc.wait()
        if w.reader is not None:
            # Not `await w.reader` under suppress(CancelledError): that also swallowed a
            # cancellation of this stop itself.
            failed = await wait_ended(w.reader)
            if failed is not None:
                raise failed

    def refuse_new_calls(self) -> None:
        """From now on every new inbound call gets 503 (the service is stopping); the calls
        in progress go on. Outbound calls are not affected."""
        if not self._refusing:
            self._refusing = True
            log.info("SIP: new inbound calls are refused (503) from now on")

    def retry_after_s(self) -> int:
        """The Retry-After of a 503 to a caller now (see STOP_TAIL_S): the rest of the stop
        once the service is stopping, or while every worker is asked to stop; the longest
        restart backoff while no worker is up and one restarts."""
        if not self._refusing and any(not w.leaving for w in self._workers):
            return math.ceil(_BACKOFF_MAX_S)
        return self._stop_retry_after_s

    @property
    def exits_at_stop(self) -> tuple[WorkerExit, ...]:
        """The workers that ended during :meth:`stop` with a status other than 0 (each logged
        at ERROR): pjsua aborting at its teardown, or killed for not stopping; and a restart
        under way as the stop began that could not start its process. A worker that died
        while the pool ran was restarted, and is not here."""
        return tuple(self._exits_at_stop)

    @property
    def running(self) -> bool:
        """Between :meth:`start` and :meth:`stop`."""
        return self._running

    def ready(self) -> bool:
        """True when every worker is up (and registered, when a registrar is configured);
        /readyz asks :meth:`serving`, which wants that at start only."""
        return self._running and all(self._worker_ready(w) for w in self._workers)

    def serving(self) -> bool:
        """serve's /readyz ``sip_workers``: at start, True once every worker is up (as
        :meth:`ready`); from then on while at least one is.

        One worker restarting (a crash, or a SIGTERM's drain of ``CLINIC_CALL_DRAIN_S`` + 20 s)
        must not make a balancer pull the whole verification API: the other workers take
        its calls. With none left, nothing can: not ready."""
        if not self._running:
            return False
        if self._all_ready_once:
            return any(self._worker_ready(w) for w in self._workers)
        return self._note_all_ready()

    def _worker_ready(self, w: _Worker) -> bool:
        return w.up and (w.registered or not self._settings.registrar)

    def _note_all_ready(self) -> bool:
        """Whether every worker is ready now; the first time they are, remembered."""
        if all(self._worker_ready(w) for w in self._workers):
            self._all_ready_once = True
        return self._all_ready_once

    def any_worker_up(self) -> bool:
        """Whether at least one worker can take a call (stops at the first: asked per send)."""
        return self._running and any(w.up for w in self._workers)

    def workers_up(self) -> int:
        """How many workers can take a call now (a channel can send while one restarts)."""
        return sum(w.up for w in self._workers) if self._running else 0

    def stats(self) -> dict[str, int]:
        """Counters for /metrics and the benches."""
        return {
            "workers": len(self._workers),
            "workers_up": sum(w.up for w in self._workers),
            "calls_in_flight": sum(len(w.calls) for w in self._workers),
            "free_slots": self._free_slots(),
            "caller_slots": self._settings.caller_slots,
            "restarts": self._restarts,
            "refused_busy": self._refused_busy,
            "kept_for_callers": self._kept_for_callers,
        }

    def _free_slots(self) -> int:
        return sum(max(0, w.available) for w in self._workers)

    def occupancy(self) -> Occupancy:
        """The workers by state and the call slots by use, now (never a caller's number)."""
        need_reg = bool(self._settings.registrar)
        now = self._clock.monotonic()
        workers = dict.fromkeys(WorkerState, 0)
        in_use = reserved = 0
        for w in self._workers:
            if w.up:
                w.expire_reservations(now)  # as a pick would: a caller who never came
                reserved += len(w.reserved)
                state = (
                    WorkerState.UNREGISTERED if need_reg and not w.registered else WorkerState.UP
                )
            elif w.process is not None and w.process.returncode is None:
                state = WorkerState.STOPPING if w.leaving or w.stopping else WorkerState.STARTING
            else:
                state = WorkerState.DOWN
            workers[state] += 1
            # None on a worker that is down (its exit ended them) or starting; a stopping
            # one's go on while they are closed.
            in_use += len(w.calls)
        return Occupancy(
            workers=MappingProxyType(workers),
            in_use=in_use,
            reserved=reserved,
            free=self._free_slots(),
            kept_for_callers=self._settings.caller_slots,
        )

    def worker_pids(self) -> list[int]:
        """Process ids of the running workers (for tests and RSS measurement)."""
        return [w.process.pid for w in self._workers if w.process is not None and w.up]

    def worker_addresses(self) -> list[HostPort]:
        """Where the workers listen (UDP and TCP), in worker order."""
        return [HostPort(self._settings.addr.host, w.port) for w in self._workers if w.up]

    def pick_inbound(self, call_id: str) -> HostPort | SipStatus:
        """A worker with a free slot for the inbound call ``call_id`` (the one with most
        room), or the status that refuses it: 486 when every worker is full, 503 once the
        service is stopping or while no worker is up at all.

        The slot is reserved for a few seconds, until the redirected INVITE arrives there
        (longer while the front repeats the 302 to copies of the INVITE: renew_inbound); a
        retransmitted INVITE (the same Call-ID) goes to the same worker on the same slot.
        """
        if self._refusing:
            return SipStatus.SERVICE_UNAVAILABLE
        now = self._clock.monotonic()
        for w in self._workers:
            w.expire_reservations(now)
            if call_id in w.reserved and w.up:
                return HostPort(self._settings.addr.host, w.port)
        # The most room, on a worker that is not quiet if one has room.
        best = max(
            self._workers,
            key=lambda w: (w.available > 0 and not w.quiet, w.available),
            default=None,
        )
        if best is None or best.available <= 0:
            if not any(w.up for w in self._workers):
                # No worker takes calls at all: each was asked to stop (SIGTERMs not from
                # serve: their calls being closed) or is restarting. Nobody is busy: 503 as
                # at a stop (a proxy may try another instance), and no refused_busy counted
                # (the sign to add workers or slots), not 486 ("the clinic is busy").
                log.info("call %s: no SIP worker takes calls now: 503", call_id)
                return SipStatus.SERVICE_UNAVAILABLE
            self._refused_for_want_of_a_slot()
            return SipStatus.BUSY_HERE
        best.reserved[call_id] = now + _REDIRECT_RESERVE_S
        expiry = self._hold_expiry
        while expiry and expiry[0][0] <= now:
            limit, old = expiry.popleft()
            if self._hold_limits.get(old) == limit:  # not picked again since
                del self._hold_limits[old]
        limit = now + _REDIRECT_HOLD_MAX_S
        self._hold_limits[call_id] = limit
        expiry.append((limit, call_id))
        return HostPort(self._settings.addr.host, best.port)

    def renew_inbound(self, call_id: str, worker: HostPort, hold_s: float) -> None:
        """The front gave the caller ``call_id`` its 302 to ``worker`` again (a copy of the
        INVITE: the 302 was lost), and may for ``hold_s`` more: the slot held for it stays
        held that long and ``_REDIRECT_RESERVE_S`` more (never past ``_REDIRECT_HOLD_MAX_S``
        from the 302 that took it), so the caller finds it when a copy gets through. Only a
        slot still held: one that lapsed (every copy lost for 2 s), or whose call arrived or
        was cancelled, is not taken again (the caller then finds the worker as it is: full,
        pjsua answers 486)."""
        w = self._holding(call_id, worker)
        if w is None:
            log.debug("call %s: its 302 repeated, no slot held for it any more", call_id)
            return
        until = self._clock.monotonic() + hold_s + _REDIRECT_RESERVE_S
        # No longer than _REDIRECT_HOLD_MAX_S from the 302 that took the slot, whatever the
        # front still repeats (a copy after it forgot that 302 is a new 302 to the slot).
        until = min(until, self._hold_limits.get(call_id, w.reserved[call_id]))
        w.reserved[call_id] = max(w.reserved[call_id], until)

    def release_inbound(self, call_id: str, worker: HostPort) -> None:
        """The caller ``call_id``, redirected to ``worker``, cancelled: its slot is free."""
        w = self._holding(call_id, worker)
        if w is not None:
            del w.reserved[call_id]
            self._slot_freed.set()

    def holds_inbound(self, call_id: str, worker: HostPort) -> bool:
        """Whether the slot of the 302 for ``call_id`` to ``worker`` is still held: the
        caller has not arrived there, nor cancelled, and the slot has not lapsed (the
        front's count of 302s not followed, per source: voice.sip.redirect_source)."""
        return self._holding(call_id, worker) is not None

    def _holding(self, call_id: str, worker: HostPort) -> _Worker | None:
        """The worker at ``worker`` if it is up and holds a slot for ``call_id``."""
        now = self._clock.monotonic()
        for w in self._workers:
            if w.up and w.port == worker.port and worker.host == self._settings.addr.host:
                w.expire_reservations(now)
                return w if call_id in w.reserved else None
        return None

    def _refused_for_want_of_a_slot(self) -> None:
        """Count a caller turned away with 486 and say so (never the caller's number)."""
        self._refused_busy += 1
        if self._on_busy is not None:
            self._on_busy()
        self._busy_unlogged += 1
        now = self._clock.monotonic()
        if now < self._busy_log_at:
            return
        log.warning(
            "SIP: every call slot is taken (%d call(s) up, %d redirected on their way, "
            "%d worker(s) up): %d inbound call(s) refused with 486 Busy Here since the "
            "previous line of this kind (one a minute at most); more slots: raise "
            "CLINIC_SIP_WORKERS (more of them kept from verification calls: raise "
            "CLINIC_SIP_CALLER_SLOTS)",
            sum(len(w.calls) for w in self._workers),
            sum(len(w.reserved) for w in self._workers),
            sum(w.up for w in self._workers),
            self._busy_unlogged,
        )
        self._busy_unlogged = 0
        self._busy_log_at = now + _BUSY_LOG_S

    def on_incoming(self, handler: IncomingHandler) -> None:
        """Give each inbound call to ``handler`` in its own task."""
        self._handler = handler

    # -- calls ------------------------------------------------------------------------------

    async def place_call(self, call: OutboundCall) -> CallHandle:
        """Place a call; returns once a worker took it (events follow on the handle).

        Waits up to ``queue_timeout_s`` for a free slot that callers can spare (see
        :meth:`_pick_outbound`), then raises :class:`PoolBusyError`.
        """
        deadline = self._clock.monotonic() + self._queue_timeout_s
        call_id = self._new_id()
        cmd = call.command(call_id)
        while True:
            if not self._running:
                raise PoolClosedError("the SIP pool is not running")
            worker = self._pick_outbound()
            if worker is not None:
                handle = CallHandle(self, worker, call_id)
                accepted = await self._try_place(worker, handle, cmd)
                if accepted:
                    return handle
                continue  # that worker was full after all: try the others
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                raise self._no_slot(call_id)
            self._slot_freed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 0.05)):
                    await self._slot_freed.wait()

    def _new_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):08x}"

    def _no_slot(self, call_id: str) -> PoolBusyError:
        """Why the outbound call ``call_id`` found no slot in its queueing time."""
        free = self._free_slots()
        if free <= 0:
            return PoolBusyError(f"all {len(self._workers)} SIP workers are full")
        self._kept_for_callers += 1
        if self._on_kept_for_callers is not None:
            self._on_kept_for_callers()
        log.info(
            "call %s: not placed: the %d free call slot(s) are kept for callers "
            "(CLINIC_SIP_CALLER_SLOTS=%d)",
            call_id,
            free,
            self._settings.caller_slots,
        )
        return PoolBusyError("the free call slots are kept for callers (CLINIC_SIP_CALLER_SLOTS)")

    def _pick_outbound(self) -> _Worker | None:
        """The worker with the most room, or None when none can be spared: every slot is
        taken, or taking one would leave fewer than ``caller_slots`` free for callers.

        Free slots are counted on the workers that are up (a restarting worker's are
        nobody's), less the PlaceCalls their last status does not count yet and the slots
        the front holds for redirected callers on their way (those are callers' already).

        Looks from a cursor that moves on each time and stops at the first worker with all
        its slots free once the slots seen so far leave the callers theirs: a max() over 320
        workers per call (a property and a lambda each) was a few percent of the main
        process at 400 flash calls/s.
        """
        workers = self._workers
        n = len(workers)
        full = self._slots_max
        need = 1 + self._settings.caller_slots  # this call's slot and the callers'
        best: _Worker | None = None
        quiet: _Worker | None = None  # the most room on a quiet worker: if none other has
        best_room = quiet_room = total = 0
        start = self._cursor
        now = self._clock.monotonic()
        for i in range(n):
            w = workers[(start + i) % n]
            if not w.up:
                continue
            if w.reserved:
                # A redirected caller who never came must not hold the slot for good.
                w.expire_reservations(now)
            room = w.free_slots - w.pending - len(w.reserved)
            if room <= 0:
                continue
            total += room
            if w.quiet:
                if room > quiet_room:
                    quiet, quiet_room = w, room
                continue
            if room > best_room:
                best, best_room = w, room
                if room >= full:
                    self._cursor = (start + i + 1) % n
            if best_room >= full and total >= need:
                break
        if total < need:
            return None
        return best if best is not None else quiet

    async def _try_place(self, worker: _Worker, handle: CallHandle, cmd: PlaceCall) -> bool:
        loop = asyncio.get_running_loop()
        ack: asyncio.Future[bool] = loop.create_future()
        worker.acks[cmd.call_id] = ack
        worker.calls[cmd.call_id] = handle
        worker.pending += 1
        worker.send(cmd)
        try:
            # As long as the watch gives a silent worker (and a little more, so the watch
            # usually acts first): the owner thread may be in a DNS lookup for this very
            # call, and 5 s, as it was, killed the worker and cut the callers on it.
            async with asyncio.timeout(WORKER_SILENT_S + 2 * PING_EVERY_S):
                accepted = await ack
        except TimeoutError:
            # A worker that acknowledges nothing for that long is wedged: restart it.
            log.error("worker %s did not acknowledge call %s", worker.index, cmd.call_id)
            self._kill(worker)
            return await ack
        finally:
            worker.acks.pop(cmd.call_id, None)
        if not accepted:
            worker.calls.pop(cmd.call_id, None)
        return accepted

    async def send_message(
        self, target_uri: str, caller_id: str, text: str, *, timeout_s: float = 10
    ) -> int:
        """Send a SIP MESSAGE (RFC 3428); the final status, 408 on timeout, 503 if no worker."""
        up = [w for w in self._workers if w.up]
        if not up:
            return SipStatus.SERVICE_UNAVAILABLE
        # Messages hold no call slot: spread them round-robin.
        worker = up[next(self._ids) % len(up)]
        request_id = self._new_id()
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        worker.requests[request_id] = fut
        worker.send(SendMessage(request_id, target_uri, caller_id, text))
        try:
            async with asyncio.timeout(timeout_s):
                return await fut
        except TimeoutError:
            return SipStatus.REQUEST_TIMEOUT
        finally:
            worker.requests.pop(request_id, None)

    # -- workers ----------------------------------------------------------------------------

    async def _spawn(self, w: _Worker) -> None:
        s = self._settings
        port = s.addr.port + 1 + w.index if s.addr.port else 0
        argv = [
            sys.executable,
            "-m",
            "voice.sip.worker",
            "--host",
            s.addr.host,
            "--port",
            str(port),
            "--user",
            s.user or "clinic",
            "--log-level",
            self._log_level,
            "--stop-wait-s",
            f"{self._close_s + STOP_ASKED_MARGIN_S:g}",
            "--retry-after-s",
            str(math.ceil(STOP_TAIL_S)),
        ]
        if s.registrar:
            argv += ["--registrar", s.registrar]
        if s.realm:  # no secret (every challenge names it): on argv as the user is
            argv.append(f"--realm={s.realm}")  # "=": a realm may start with "-"
        env = worker_env(os.environ, s.password)
        w.started.clear()  # start() may be waiting on this very event
        w.cannot_listen = ""
        w.up = w.registered = w.stopping = w.leaving = False
        w.free_slots = w.pending = w.placed = 0
        # Its own process group, so a Ctrl-C at the terminal is serve's to handle (an orderly
        # Shutdown, its calls hung up), not a KeyboardInterrupt inside pjsua2, in serve's
        # session; serve killed -9, the kernel sends it SIGTERM (its stdin's EOF also ends it,
        # which covers a missing setpriv): sip_config/child_process.py.
        w.process = await spawn_child(
            argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env
        )
        w.pid, w.killed, w.killed_running = w.process.pid, False, False
        w.killed_starting = w.came_up = False
        w.started_at = self._clock.monotonic()
        # Its silence counts from now, not from the last line of the process it replaces
        # (killed as frozen, 30 s silent or more): a watch round may run before the reader
        # below takes its first step, and would kill this one as never started.
        w.heard_at, w.quiet = asyncio.get_running_loop().time(), False
        w.reader = asyncio.create_task(self._read(w, w.process), name=f"sip-worker-{w.index}")
        log.info("SIP worker %s started (pid %s)", w.index, w.process.pid)

    def _kill(self, w: _Worker) -> None:
        if w.process is not None and w.process.returncode is None:
            w.killed_running = self._running
            w.process.kill()

    async def _watch(self) -> None:
        """Ping the workers that have been silent a while; kill those silent too long (they
        are frozen: see WORKER_SILENT_S), so their calls end and they are restarted."""
        # The loop's clock, as the acknowledgement's timeout: a process's silence is real
        # time, and a test's clock moved ahead must not get the workers killed.
        loop = asyncio.get_running_loop()
        last = loop.time()
        while self._running:
            await asyncio.sleep(PING_EVERY_S)
            try:
                last = self._watch_round(loop.time(), last)
            except Exception:  # one bad round (a pipe closing under a send) ends no watching
                log.exception("SIP worker watch: a round failed")

    def _watch_round(self, now: float, last: float) -> float:
        """One round of :meth:`_watch` at loop time ``now`` (the previous one at ``last``);
        returns ``now``."""
        # This loop itself was held up (so were the readers: the workers' lines may be
        # waiting unread, and nobody was pinged): count the silence from just before this
        # round, so a worker pinged now has what any first Ping gets (WORKER_SILENT_S -
        # PING_EVERY_S), not one round.
        stalled = now - last > 2 * PING_EVERY_S
        for w in self._workers:
            if w.process is None or w.process.returncode is not None:
                continue
            if stalled:
                w.heard_at = max(w.heard_at, now - PING_EVERY_S)
            silent = now - w.heard_at
            w.quiet = silent >= QUIET_AFTER_S
            if not (w.up or w.leaving):
                # Restarted, and not up yet: silent since it was started (its reader's
                # start). One that never reports (hung in its start-up) would leave the pool
                # a worker short for good: killed, it is restarted after its backoff.
                if silent >= _START_TIMEOUT_S:
                    log.error(
                        "SIP worker %s (pid %s) did not start within %.0f s: killing it",
                        w.index,
                        w.process.pid,
                        silent,
                    )
                    self._kill(w)
                continue
            if silent >= WORKER_SILENT_S:
                log.error(
                    "SIP worker %s (pid %s) answered nothing for %.1f s: frozen, killing "
                    "it (%s call(s) on it)",
                    w.index,
                    w.process.pid,
                    silent,
                    len(w.calls),
                )
                self._kill(w)
            elif silent >= PING_EVERY_S:
                w.send(Ping())
        return now

    async def _read(self, w: _Worker, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        loop = asyncio.get_running_loop()
        w.heard_at = loop.time()
        try:
            while True:
                line = await proc.stdout.readline()
                if not line:
                    break
                w.heard_at, w.quiet = loop.time(), False
                try:
                    ev = decode(line)
                except ProtocolError as exc:
                    log.error("worker %s sent a bad line: %s", w.index, exc)
                    continue
                self._dispatch(w, ev)
        finally:
            code = await proc.wait()
            self._on_exit(w, code)

    def _dispatch(self, w: _Worker, ev: object) -> None:
        if isinstance(ev, WorkerStatus):
            w.port = ev.port
            w.free_slots = ev.free_slots
            w.pending -= ev.placed - w.placed  # now in free_slots (or refused)
            w.placed = ev.placed
            self._slots_max = max(self._slots_max, ev.free_slots)
            if not (w.up or w.leaving or w.stopping):  # a Ping's answer makes neither up
                w.up = w.came_up = True
                w.started.set()
                self._note_all_ready()
            self._slot_freed.set()
        elif isinstance(ev, Stopping):
            log.warning(
                "SIP worker %s (pid %s) was sent SIGTERM (not by serve): it hangs up its %d "
                "call(s) and stops; restarted once it has, unless the service stops",
                w.index,
                w.pid,
                len(w.calls),
            )
            w.stopping = True
            w.up = w.registered = w.leaving = False  # no new call goes to it
        elif isinstance(ev, StopAsked):
            self._stop_asked(w, ev)
        elif isinstance(ev, CallEvent):
            ack = w.acks.get(ev.call_id)
            if ack is not None and not ack.done():
                ack.set_result(True)
            handle = w.calls.get(ev.call_id)
            if handle is None:
                return
            if ev.state is CallState.ENDED:
                del w.calls[ev.call_id]
            handle._deliver(ev)
        elif isinstance(ev, AudioChunk):
            handle = w.calls.get(ev.call_id)
            if handle is not None:
                handle._deliver_audio(ev.pcm)
        elif isinstance(ev, Digit | PlayDone | Hold | TransferStatus):
            handle = w.calls.get(ev.call_id)
            if handle is not None:
                handle._deliver(ev)
        elif isinstance(ev, PlaceFailed):
            ack = w.acks.get(ev.call_id)
            if ack is not None and not ack.done():
                ack.set_result(False)
            log.info("worker %s refused call %s: %s", w.index, ev.call_id, ev.reason)
        elif isinstance(ev, IncomingCall):
            self._incoming(w, ev)
        elif isinstance(ev, MessageResult):
            fut = w.requests.get(ev.request_id)
            if fut is not None and not fut.done():
                fut.set_result(ev.sip_status)
        elif isinstance(ev, CannotListen):
            w.cannot_listen = f"SIP worker {w.index} cannot listen on {ev.addr}: {ev.reason}"
            log.error("%s", w.cannot_listen)
            w.started.set()  # start() gives up at once (it exits: restarted if running)
        elif isinstance(ev, Registered):
            if ev.ok != w.registered:
                log.info("worker %s registration: %s (%s)", w.index, ev.ok, ev.sip_status)
            w.registered = ev.ok
            self._note_all_ready()
        else:
            log.error("worker %s sent an unexpected %s", w.index, type(ev).__name__)

    def _incoming(self, w: _Worker, ev: IncomingCall) -> None:
        # The free slots, the reservation and the call move together: the worker sends no
        # WorkerStatus for this call (else the slot counted as taken and as reserved between
        # the two messages: the gauges and the choice of worker one short).
        w.free_slots = ev.free_slots
        if w.reserved:
            self._arrived(w, ev.sip_call_id)
        # The number a trusted peer asserted (P-Asserted-Identity), or the From the caller
        # wrote, only claimed (CLINIC_SIP_TRUSTED_PEERS).
        who = identify(ev.caller, ev.headers, ev.source, self._settings.trusted_peers)
        handle = CallHandle(
            self,
            w,
            ev.call_id,
            caller=who.number,
            called=ev.called,
            headers=dict(ev.headers),
            caller_identity=who.identity,
        )
        w.calls[ev.call_id] = handle
        handler = self._handler
        if self._refusing or w.leaving:
            # Sent here by a PBX (a registrar), or redirected by the front just before.
            log.info("call %s: the service is stopping: 503", ev.call_id)
            w.send(Hangup(ev.call_id, SipStatus.SERVICE_UNAVAILABLE, self._stop_retry_after_s))
            return
        if handler is None:
            log.warning("call %s: no inbound handler: 480", ev.call_id)
            w.send(Hangup(ev.call_id, SipStatus.TEMPORARILY_UNAVAILABLE))
            return
        task = asyncio.create_task(self._run_handler(handler, handle), name=f"call-{ev.call_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _stop_asked(self, w: _Worker, ev: StopAsked) -> None:
        """``w`` was sent SIGTERM by someone else and waits ``ev.wait_s`` for its Shutdown.

        It takes no new call from now on (a caller redirected to it just before gets 503 as
        at the stop). While the service runs its calls are closed as at the service's stop
        (``close_calls``: the clinic line's drain for them), then it is sent its Shutdown and,
        once it exited, restarted. When the service is stopping already (systemd's
        control-group stop signals every process at once) the service's own drain closes
        them, and its Shutdown comes with every worker's."""
        w.up = w.registered = False
        w.leaving = True
        w.reserved.clear()
        if not self._running or self._refusing:
            log.warning(
                "SIP worker %s (pid %s) was sent SIGTERM (not by serve) as the service "
                "stops: its %d call(s) are closed by the stop's drain",
                w.index,
                w.pid,
                len(w.calls),
            )
            return
        log.warning(
            "SIP worker %s (pid %s) was sent SIGTERM (not by serve): its %d call(s) are "
            "closed as at a stop (new calls go to the other workers), then it is stopped and "
            "started again; it waits up to %g s",
            w.index,
            w.pid,
            len(w.calls),
            ev.wait_s,
        )
        task = asyncio.create_task(self._let_go(w, w.process), name=f"sip-let-go-{w.index}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _let_go(self, w: _Worker, proc: asyncio.subprocess.Process | None) -> None:
        """Close the calls of ``w`` (asked to stop), let what else it carries end, then send
        it its Shutdown: ``close_s`` at most from now (the worker waits a margin more)."""
        deadline = asyncio.get_running_loop().time() + self._close_s
        calls = list(w.calls.values())
        if calls and self._close_calls is not None:
            try:
                await self._close_calls(calls)
            except asyncio.CancelledError:
                raise
            except Exception:  # its Shutdown all the same: the worker hangs them up
                log.exception("SIP worker %s: closing its calls failed", w.index)
        await self._carried_out(w, proc, deadline)
        # Not exited (and restarted) meanwhile, nor stopped by stop(): its Shutdown went
        # then, and a second one met a worker on its way out (a failed write, warned).
        if w.process is proc and w.leaving and self._running:
            w.stopping = True  # what it ends from now on, the service ended
            w.send(Shutdown())

    async def _carried_out(
        self, w: _Worker, proc: asyncio.subprocess.Process | None, deadline: float
    ) -> None:
        """Wait, until loop time ``deadline``, for what ``w`` (asked to stop) still carries
        to end: its outbound calls (a voice code being read, a flash call ringing), which
        are no caller's for the line to close, a MESSAGE awaiting its answer, and a call the
        line's closing did not end. The service goes on: a Shutdown at once cut a patient's
        code mid-sentence (undelivered), where a stop of the service gives them time too."""
        while w.process is proc and w.leaving:
            waits: list[asyncio.Future[object]] = [
                asyncio.ensure_future(h._ended.wait()) for h in w.calls.values() if not h.ended
            ]
            waits += [
                asyncio.ensure_future(asyncio.shield(f))
                for f in w.requests.values()
                if not f.done()
            ]
            if not waits:
                return
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                if remaining <= 0:
                    log.warning(
                        "SIP worker %s: %d call(s) or message(s) still on it: hung up by "
                        "its Shutdown",
                        w.index,
                        len(waits),
                    )
                    return
                await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()

    def _arrived(self, w: _Worker, sip_call_id: str) -> None:
        """A call arrived on ``w``: the slot reserved for it (by its INVITE's Call-ID, as the
        front picked it) is now a call, and the other callers keep theirs.

        A call with no reservation there (sent by a PBX, a caller slower than the
        reservation, or a UA that re-sent the redirected INVITE under a new Call-ID) takes
        none, unless the worker's free slots (reported with the call, this call counted) can
        no longer hold every reservation: then one of them was surely this call's, and the
        one nearest to lapsing goes (the oldest, but for one a copy of its INVITE renewed).
        Taking the oldest always let a third caller have the slot of a redirected caller
        still on the way: two callers, one slot.
        """
        if w.reserved.pop(sip_call_id, None) is not None:
            return
        if len(w.reserved) > max(0, w.free_slots - w.pending):
            del w.reserved[min(w.reserved, key=w.reserved.__getitem__)]

    async def _run_handler(self, handler: IncomingHandler, handle: CallHandle) -> None:
        try:
            await handler(handle)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("call %s: the inbound handler failed", handle.id)
            await handle.hangup(SipStatus.SERVER_INTERNAL_ERROR)

    def _on_exit(self, w: _Worker, exit_status: int) -> None:
        was_up = w.up or w.stopping or w.leaving
        asked = w.leaving or w.stopping  # sent SIGTERM by someone else
        w.up = w.registered = w.leaving = False
        w.free_slots = w.pending = w.placed = 0
        # Slots held for callers redirected here are gone with the process: a restarted
        # worker on the same port has all its room (they lasted up to 34 s, renewed).
        w.reserved.clear()
        lost = list(w.calls.values())
        w.calls.clear()
        now = self._clock.now()
        for handle in lost:
            handle._deliver(CallEvent(handle.id, CallState.ENDED, 0, CallOutcome.WORKER_LOST, now))
        for ack in w.acks.values():
            if not ack.done():
                ack.set_result(True)  # the handle already holds its worker_lost end
        for fut in w.requests.values():
            if not fut.done():
                fut.set_result(SipStatus.SERVICE_UNAVAILABLE)
        if not self._running and w.killed_running:
            # Killed by the watch while the pool ran; its reader saw it only after stop()
            # began: the run's death (not restarted now), not the stop's outcome.
            log.error(
                "SIP worker %s (pid %s) died (exit %s, killed as it ran) as the stop began: "
                "%s call(s) lost",
                w.index,
                w.pid,
                exit_status,
                len(lost),
            )
            return
        if not self._running and w.killed_starting:
            return  # said as it was killed (WORKER_KILLED_STARTING_AT_STOP): no defect
        if not self._running:
            # Not 0: the stop went wrong in the worker (pjsua aborts on a lifetime mistake,
            # -6; its stderr says where), or it was killed for not stopping (-9, warned).
            # As info, a worker's abort at every stop went unseen; and serve exited 0.
            note = status_note(exit_status, killed=w.killed)
            if exit_status == 0:
                log.info(WORKER_EXITED_AT_STOP, w.index, w.pid, exit_status, note)
            else:
                log.error(WORKER_EXITED_AT_STOP, w.index, w.pid, exit_status, note)
                self._exits_at_stop.append(
                    WorkerExit(f"SIP worker {w.index}", w.pid, exit_status, killed=w.killed)
                )
            return
        if exit_status == 0 and asked and self._refusing:
            # The service stops (systemd's control-group stop signalled every process): its
            # stop's drain closed the calls; a worker started now would only be stopped.
            log.info(
                "SIP worker %s (pid %s) stopped on a SIGTERM not from serve as the service "
                "stops (exit 0): not restarted",
                w.index,
                w.pid,
            )
            return
        if exit_status == 0:
            # Told to stop by someone else (a SIGTERM from outside serve: pkill, an operator):
            # its calls closed as at a stop and its Shutdown sent (StopAsked), or hung up by
            # itself (Stopping: a second SIGTERM, its wait passed), each reported ended
            # before its exit (cut "shutdown"). Restarted as a dead one is: whoever sent the
            # signal stopped no service, and a worker short means callers refused with 486.
            log.warning(
                "SIP worker %s (pid %s) stopped while the service ran (exit 0, on a SIGTERM "
                "not from serve): %s call(s) lost; restarting it",
                w.index,
                w.pid,
                len(lost),
            )
        else:
            log.error(
                "SIP worker %s died (exit %s, up=%s): %s call(s) lost",
                w.index,
                exit_status,
                was_up,
                len(lost),
            )
        self._schedule_restart(w, was_up=was_up)

    def _schedule_restart(self, w: _Worker, *, was_up: bool) -> None:
        lived = self._clock.monotonic() - w.started_at
        # Healthy only if it was up: one killed for never starting lived 30 s too.
        w.failures = 0 if was_up and lived > _HEALTHY_AFTER_S else w.failures + 1
        delay = min(_BACKOFF_MAX_S, _BACKOFF_FIRST_S * 2 ** max(0, w.failures - 1))
        task = asyncio.create_task(self._restart(w, delay), name=f"sip-restart-{w.index}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restart(self, w: _Worker, delay: float) -> None:
        await asyncio.sleep(delay)
        if not self._running:
            return
        self._restarts += 1
        if self._on_restart is not None:
            self._on_restart()
        w.spawning = asyncio.current_task()  # stop() may begin meanwhile: it waits for this
        try:
            await self._spawn(w)
        except OSError as exc:
            self._spawn_failed(w, exc)
        finally:
            w.spawning = None

    def _spawn_failed(self, w: _Worker, exc: OSError) -> None:
        """A restart of ``w`` could not start its process (fork or exec failed): tried again
        after the backoff while the pool runs; once stop() began, a worker the stop could not
        have stopped as asked. No exit status (the -1 passed as one before read as SIGHUP)."""
        if self._running:
            log.error("SIP worker %s could not be restarted", w.index, exc_info=exc)
            self._schedule_restart(w, was_up=False)
            return
        log.error(WORKER_NOT_STARTED_AT_STOP, w.index, exc)
        self._exits_at_stop.append(
            WorkerExit(f"SIP worker {w.index}", 0, None, not_started=str(exc))
        )
