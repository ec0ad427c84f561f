"""The pjsua2 adapter: the only module that imports pjsua2.

One :class:`Engine` per process, driven from one owner thread: ``threadCnt=0`` and
``mainThreadOnly=True``, so every SIP callback runs inside :meth:`Engine.pump`. The only
other thread is pjmedia's clock (null sound device), which runs ``onFrameReceived`` of the
listening ports; it only copies bytes into a thread-safe queue that the owner drains.

The engine speaks :mod:`voice.sip.protocol`: commands in (``handle``), events out through an
``emit`` callable, so camelCase never leaves this file. Every ``Call``, player and port is
held by a strong reference until pjsua reports DISCONNECTED, then dropped on the owner
thread one pump later (destroying a ``Call`` inside its own callback aborts the process); one
we hung up, once the far end has answered its CANCEL or BYE (see ``STOP_ANSWERS_S``).
None may be destroyed after ``libDestroy`` either: its C++ destructor then trips an assertion
on pjsua's cleared tables and aborts the process at its exit (see :func:`_callback` and
:meth:`Engine.stop`). Nor may a dead ``Call`` be destroyed once pjsua has given its call id
to a new call, which its destructor would hang up (``_Call.__del__`` disowns it instead).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import itertools
import logging
import math
import os
import queue
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec

import pjsua2 as pj

from voice.sip import digest, message, pjsip_fallback, refer, sdp
from voice.sip.media_thread import MediaThread
from voice.sip.outcome import CallOutcome, SipStatus, outcome_for_status
from voice.sip.protocol import (
    Answer,
    AudioChunk,
    CallEvent,
    CallState,
    Command,
    Digit,
    Event,
    Hangup,
    Hold,
    IncomingCall,
    MessageResult,
    Ping,
    PlaceCall,
    PlaceFailed,
    Play,
    PlayDone,
    Registered,
    SendMessage,
    Shutdown,
    StartListen,
    StopPlay,
    Transfer,
    TransferStatus,
    WorkerStatus,
)
from voice.sip.refer import wants_more_reports

log = logging.getLogger(__name__)

MAX_CALLS = 4  # PJSUA_MAX_CALLS of the wheel: the 5th makeCall raises PJ_ETOOMANY
# While a listener streams a call's audio, chunks (20 ms each) are handed on this often.
LISTEN_PUMP_MS = 20
# While a call has media up, a keypad digit can arrive at any time, and pjsua2 hands every
# digit (RFC 4733, seen by the media thread) to this thread as a "pending job" that runs only
# at the start of the next libHandleEvents: nothing wakes the current one. A pump that waited
# the idle 500 ms made digit -> next prompt 480-880 ms (bench/ivr.py, 2026-12-03; goal 150
# p95). So a call with media bounds the wait to this; flash calls have no media and are not
# affected. 40 ms cost the inbound bench a fifth of its capacity (25 wake-ups a second in
# every worker with a call up; bench/asterisk_compare.py failed 53 of 1435 calls at 287/s,
# where it had held 345/s); 60 ms keeps digit -> prompt well inside the goal.
# (Media polled by the owner thread instead, medConfig.hasIoqueue=False and threadCnt=0,
# would wake it for every RTP packet of every call: in Python, 50 times a second a call.)
MEDIA_PUMP_MS = 60
# pjsua frees a call's slot about a millisecond after it reports the call DISCONNECTED, but we
# report the free slot at once; a call the pool sends into that window got PJ_ETOOMANY and
# failed (10 flash calls at 431/s, bench/asterisk_compare.py). Such a call is dialled again
# every pump (1 ms apart) for up to this long before it fails.
REDIAL_S = 0.5
# An answered inbound call whose audio never became active (an SDP answer of a=inactive, a
# late offer whose ACK brought none) is hung up after this long: its prompts would wait for
# media, and its slot with them, until the session's 30-minute limit. Audio that stops later
# (the caller's hold) is not this: the prompts then wait for it to come back.
NO_MEDIA_S = 10.0
# At its stop a worker pumps pjsua this long, at most, for the far ends' final answers to what
# its hang-up sent: the 487 to a ringing call's INVITE after its CANCEL (pjsip's INVITE
# transaction ACKs it itself, RFC 3261 section 17.1.1.3), the 200 to an answered call's BYE.
# pjsua reports such a call DISCONNECTED as the CANCEL or BYE leaves, not at the answer, and
# the stop went on to libDestroy at once: the far end sent its 487 again and again for 32 s
# (Timer H), never ACKed. 2 s: on loopback or a LAN the answer is back in milliseconds; a
# CANCEL lost on UDP is sent again after T1 (0.5 s) and 1 s more, a lost 487 likewise, so a
# loss each way still fits. A far end that never answers (or a call with no provisional
# response, whose CANCEL pjsip holds back until one comes) is given up then. pool.py's
# WORKER_STOP_S leaves the worker room for this wait.
STOP_ANSWERS_S = 2.0
# The stop's un-REGISTER (RFC 3261 section 10.2.2, Expires 0), sent with the hang-ups and
# waited for with their answers: a registrar challenges it as any REGISTER (Asterisk does),
# and pjsua sends it again with credentials only while the account lives. Sent as the
# account was deleted, it was refused (401) and the worker's contact stayed,
# reachable-looking until qualify found it gone: the PBX handed clinic-line calls to a
# worker that was not there. On loopback or a LAN both exchanges take milliseconds; a
# registrar that does not answer is given up then. Inside STOP_ANSWERS_S, not after it: the
# 3 s pool.py's WORKER_STOP_S leaves after that wait are pjsua's teardown's.
UNREGISTER_S = 1.0
_PJ_ETOOMANY = 70010
_KEEP_CODECS = ("PCMU/8000", "PCMA/8000")
# Inbound headers handed to the call handler (besides every X-* header).
_REQUEST_ID_HEADER = "X-Clinic-Request"
_KEPT_HEADERS = ("p-asserted-identity", "diversion", "subject")
_CHALLENGES = (SipStatus.UNAUTHORIZED, SipStatus.PROXY_AUTHENTICATION_REQUIRED)


def _extension_path() -> str:
    """The file of pjsua2's extension module, which carries pjsip (for ctypes)."""
    return str(importlib.import_module("pjsua2._pjsua2").__file__)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Where the engine listens and how it registers."""

    host: str
    port: int
    user: str = "clinic"
    registrar: str = ""
    password: str = ""
    realm: str = ""  # the only digest realm answered (CLINIC_SIP_REALM); "": any
    log_level: int = 0  # pjsua log and console level: 0-1 keeps logging off the hot path
    # The Retry-After of the 503s this worker sends itself at its stop (see _refuse_at_stop;
    # the pool's --retry-after-s): 0, none.
    retry_after_s: int = 0


_P = ParamSpec("_P")


def _callback(method: Callable[_P, None]) -> Callable[_P, None]:
    """A pjsua2 callback that nothing leaves by an exception: one raised is logged here, with
    its traceback, and goes no further.

    Let through, it reaches SWIG's director, which prints it with ``PyErr_Print``, and that
    also keeps it as ``sys.last_traceback`` until the next one: its frames hold the
    callback's object (a ``Call``, a player, a port), which so outlives pjsua's end of it.
    Freed after ``libDestroy``, at the worker's exit, its C++ destructor failed pjsua's
    assertion (``pjsua_call_set_user_data: call_id>=0 ...``) and aborted the worker: seen at
    a test's teardown, after a NOTIFY the transfer check could not read had raised. Freed
    at run time (when the next exception took its place), a ``Call`` cleared the user data
    of whichever call had taken its id since and hung that call up (pjsip#3856): such a
    ``Call`` is now disowned instead (see ``_Call.__del__``).
    """

    @functools.wraps(method)
    def guarded(*args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            method(*args, **kwargs)
        except Exception:
            call_id = getattr(args[0], "call_id", "-") if args else "-"
            log.exception("call %s: pjsua callback %s failed", call_id, method.__name__)

    return guarded


class EngineError(RuntimeError):
    """pjsua refused something; ``status`` is the pj_status_t."""

    def __init__(self, what: str, status: int) -> None:
        super().__init__(f"{what} (pj status {status})")
        self.status = status


class ListenError(EngineError):
    """A fixed port that UDP or TCP cannot bind: ``reason`` says why (pjsua's words)."""

    def __init__(self, addr: str, reason: str, status: int) -> None:
        super().__init__(f"cannot listen on {addr}: {reason}", status)
        self.addr = addr
        self.reason = reason


def _reason(exc: Exception) -> str:
    """pjsua's reason in a ``pj.Error`` ("Address already in use")."""
    return str(getattr(exc, "reason", "") or exc)


class _Account(pj.Account):  # type: ignore[misc]
    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self._engine = engine

    @_callback
    def onIncomingCall(self, prm: pj.OnIncomingCallParam) -> None:
        self._engine._on_incoming(self, prm)

    @_callback
    def onRegState(self, prm: pj.OnRegStateParam) -> None:
        info = self.getInfo()
        if prm.code in _CHALLENGES:
            self._engine._note_refused_realm("registration", int(prm.code), prm.rdata.wholeMsg)
        self._engine.emit(Registered(ok=bool(info.regIsActive), sip_status=int(prm.code)))
        if self._engine.stopping:
            self._engine._unregistered = True

    @_callback
    def onSendRequest(self, prm: pj.OnSendRequestParam) -> None:
        self._engine._on_request_done(prm)

    @_callback
    def onInstantMessage(self, prm: pj.OnInstantMessageParam) -> None:
        self._engine._note_inbound_message("out of a dialog")

    @_callback
    def onIncomingSubscribe(self, prm: pj.OnIncomingSubscribeParam) -> None:
        # pjsua's presence server calls this for a SUBSCRIBE with Event: presence, and took
        # it (200, then NOTIFYs for the subscription's life) since pjsua2's default sets no
        # status. The service has no presence to offer: 489 Bad Event (RFC 6665 section
        # 4.2.1.1), and pjsua ends the subscription it had made for it, before any NOTIFY.
        # No Allow-Events: no event package is taken by SUBSCRIBE here (pjsua's own 489 to
        # the others carries none either), and the header must list one at least.
        prm.code = SipStatus.BAD_EVENT
        prm.reason = SipStatus.BAD_EVENT.phrase
        log.debug("a presence SUBSCRIBE: 489 (the service offers no presence)")


class _Listener(pj.AudioMediaPort):  # type: ignore[misc]
    """Receives the caller's audio on pjmedia's clock thread: copy and return."""

    def __init__(self, call_id: str, sink: queue.SimpleQueue[Event]) -> None:
        super().__init__()
        self.call_id = call_id
        self._sink = sink

    @_callback
    def onFrameReceived(self, frame: pj.MediaFrame) -> None:
        if frame.size:
            self._sink.put(AudioChunk(self.call_id, bytes(frame.buf)))


class _Player(pj.AudioMediaPlayer):  # type: ignore[misc]
    """One :class:`Play`; its end is queued from the media thread, reported by the owner."""

    def __init__(
        self,
        call_id: str,
        play_id: int,
        sink: queue.SimpleQueue[Event],
        loop: bool,
        wake: Callable[[], None],
    ) -> None:
        super().__init__()
        self.call_id = call_id
        self.play_id = play_id
        self._sink = sink
        self._loop = loop
        self._wake = wake

    @_callback
    def onEof2(self) -> None:
        # Only queued: the owner thread reports it if this player is still the call's
        # (a StopPlay handled meanwhile has already reported it: see Engine._play_ended).
        # The owner may be waiting in a long pump: wake it so the end is reported now.
        if not self._loop:
            self._sink.put(PlayDone(self.call_id, self.play_id))
            self._wake()


class _Call(pj.Call):  # type: ignore[misc]
    def __init__(
        self, engine: Engine, call_id: str, account: _Account, pj_id: int = -1, *, flash: bool
    ) -> None:
        if pj_id >= 0:
            super().__init__(account, pj_id)
        else:
            super().__init__(account)
        self.engine = engine
        self.call_id = call_id
        self.outbound = pj_id < 0
        self.flash = flash
        self.rang = False
        self.answered = False
        self.cancelled_by_us = False
        self.timed_out = False
        self.ended = False  # ENDED already emitted
        self.media_active = False
        self.ring_deadline: float | None = None
        self.answer_deadline: float | None = None
        self.ring_s = 0.0
        self.player: _Player | None = None
        self.listener: _Listener | None = None
        self.pending: list[Command] = []  # Play/StartListen waiting for media
        self.media_seen = False  # audio was active at least once
        self.on_hold = False  # the far end holds the call (reported as Hold)
        self.media_deadline: float | None = None  # NO_MEDIA_S after the answer
        # A REFER sent and its answer not yet reported: an end of its subscription that
        # pjsua reports nothing of is reported by the worker (see _on_transfer_tsx).
        self.xfer_pending = False
        self.xfer_count = 0  # transfers tried on this call
        self.refers = refer.ReferSubscriptions()  # their subscriptions, as pjsip keeps them
        # Whether pjsua's next transfer report (onCallTransferStatus) is of the newest
        # transfer's subscription: set by the callback of the transaction that report is
        # for (a NOTIFY received, the final status of a REFER or SUBSCRIBE of ours), which
        # pjsip runs first (the call's invite usage, then its subscriptions'). None: no such
        # transaction seen since the last report (it counts, as ever). Cleared after each
        # pump: pjsua reports in the same pass as the transaction (Engine._forget_marks).
        self.report_newest: bool | None = None
        self.redial: tuple[PlaceCall, float] | None = None  # makeCall again next pump, until
        self.disowned = False  # left to the process's end (see __del__)
        # Its SIP Call-ID, kept while pjsua waits for the answer to our hang-up (see
        # Engine._drop_answered): pjsua may give the call id to a new call after it.
        self.sip_call_id = ""

    def __del__(self) -> None:
        # pjsua2's Call::~Call acts on the call id this object was given, which pjsua2 does
        # not reset at DISCONNECTED: it clears that id's user data and hangs it up if it is
        # in a call. Once pjsua has given the id to a new call (a far end's BYE and a new
        # INVITE, or a redial, in one pump on a full worker; a dead call a traceback kept),
        # that hung up the new call and cut it off from its callbacks: its end never came,
        # and its slot stayed taken (pjsip#3856). Such a Call is disowned instead: neither
        # side is freed, a few hundred bytes left to the process's end, only in that race.
        # Here, not where the engine drops its dead calls: this runs whatever drops the last
        # reference (a traceback's too). What is still alive at the stop is disowned before
        # libDestroy (Engine._disown_leftovers).
        engine = getattr(self, "engine", None)
        if engine is None:
            return  # __init__ failed before: nothing of ours to mind
        try:
            pj_id = self.getId()
            now = engine._live_call_with_id(pj_id, besides=self) if pj_id >= 0 else None
            if now is None:
                return
            log.info(
                "call %s: freed after pjsua gave its call id %s to call %s: left to the "
                "process's end (pjsip#3856)",
                self.call_id,
                pj_id,
                now.call_id,
            )
            self.disowned = True
            self.__disown__()
        except Exception:  # a finaliser's error is only printed: logged with its traceback
            log.exception("call %s: freeing it failed", getattr(self, "call_id", "-"))

    @_callback
    def onCallState(self, prm: pj.OnCallStateParam) -> None:
        self.engine._on_call_state(self, prm)

    @_callback
    def onCallMediaState(self, prm: pj.OnCallMediaStateParam) -> None:
        self.engine._on_media_state(self)

    @_callback
    def onInstantMessage(self, prm: pj.OnInstantMessageParam) -> None:
        self.engine._note_inbound_message("in a call")

    @_callback
    def onCallTsxState(self, prm: pj.OnCallTsxStateParam) -> None:
        # Nothing to do but on a call that tried a transfer: SWIG calls the Python method
        # for every state of every transaction of the call (six or so per flash call), and
        # the inherited one went back into C++ through the wrapper only to do nothing. Not
        # only while a transfer waits for its answer: an earlier one's subscription may end
        # between two, and an id-less NOTIFY is the next one's only once it has.
        if self.xfer_count:
            self.engine._on_transfer_tsx(self, prm.e)

    @_callback
    def onCallRxOffer(self, prm: pj.OnCallRxOfferParam) -> None:
        if self.flash:
            # Placed without audio (see Engine._dial); an answer with an SDP offer needs an
            # SDP answer, which pjsua cannot build without a media line (it aborts).
            prm.opt.audioCount = 1
        elif sdp.has_common_audio_codec(str(prm.offer.wholeSdp), _KEEP_CODECS) is False:
            # A new offer mid-call (re-INVITE, UPDATE) with no codec of ours: pjsua would
            # answer "500 SDP negotiation failed"; rejected here it answers 488 Not
            # Acceptable Here (RFC 3264 section 6) and the call keeps its media.
            log.info(
                "call %s: a new SDP offer has no codec of ours: 488, the call keeps its media",
                self.call_id,
            )
            prm.statusCode = SipStatus.NOT_ACCEPTABLE_HERE

    @_callback
    def onCallTransferRequest(self, prm: pj.OnCallTransferRequestParam) -> None:
        # A far end's REFER in a call. pjsua's default accepts it (202) and dials the
        # Refer-To target itself, from this worker's account (registered to the clinic's
        # trunk, with its credentials, when one is set): anyone who called the clinic line
        # could have the service call premium numbers (seen: the INVITE left at once). The
        # service transfers callers with REFERs of its own, never on a far end's word. RFC
        # 3515 section 2.4.2 lets a UA decline a REFER; 403 Forbidden (RFC 3261 section
        # 21.4.4: understood, refused by policy), not 405, as our Allow offers REFER (we send
        # them). Set first: a callback that raised keeps pjsua's 202 (see _callback). The
        # target is not logged: it is a phone number.
        prm.statusCode = SipStatus.FORBIDDEN
        log.warning(
            "call %s: the far end's REFER refused (403): the service dials no one", self.call_id
        )

    @_callback
    def onCallReplaceRequest(self, prm: pj.OnCallReplaceRequestParam) -> None:
        # An INVITE with Replaces (RFC 3891) matching this call: pjsua's default answers it
        # and hangs this call up, the new one in its place without a slot of the pool's nor a
        # session (pjsua2 reuses this Call for both; the worker then died at its stop). The
        # service neither takes a call over nor lets one be: 403, as for any request refused
        # by policy (RFC 3261 section 21.4.4; RFC 3891 section 3 asks the UA to authorise a
        # Replaces). This call goes on.
        prm.statusCode = SipStatus.FORBIDDEN
        log.warning("call %s: an INVITE with Replaces for it refused (403)", self.call_id)

    @_callback
    def onDtmfDigit(self, prm: pj.OnDtmfDigitParam) -> None:
        self.engine.emit(Digit(self.call_id, str(prm.digit)))
        self.engine.flush()  # run before the pump's wait, not after it (see Engine.flush)

    @_callback
    def onCallTransferStatus(self, prm: pj.OnCallTransferStatusParam) -> None:
        status, final = int(prm.statusCode), bool(prm.finalNotify)
        newest, self.report_newest = self.report_newest, None
        if newest is False:
            # An earlier transfer's subscription (the session gave up on it): nobody's
            # answer, and none of its later reports is wanted either.
            self.engine._on_stale_transfer_status(self, status, final)
            prm.cont = False
            return
        self.engine._on_transfer_status(self, status, final)
        if final:
            self.refers.end_newest()  # pjsip ended it, seen by the worker or not
        # Decided: this REFER's later NOTIFYs must not answer the call's next one.
        prm.cont = wants_more_reports(status, final=final)


def _cseq(msg: message.SipMessage) -> int:
    """The number of ``msg``'s CSeq (ValueError when it has none or it is no number).

    The error does not quote the header, as ``int()``'s own would: it is logged, and a
    parse error quotes no SIP text (see message.parse)."""
    number = (msg.get("CSeq") or "").split(maxsplit=1)[:1]
    if not number or not (number[0].isascii() and number[0].isdigit() and len(number[0]) <= 10):
        raise ValueError("no CSeq number")
    return int(number[0])


def _failed_here(e: pj.SipEvent) -> bool:
    """Whether ``e`` ends a request of ours with a status pjsip made itself, no response
    having come: 408 when Timer F fires, 503 on a transport error (RFC 3261 section 17.1.2.2,
    ``sip_transaction.c``)."""
    state = e.body.tsxState
    return bool(
        state.type in (pj.PJSIP_EVENT_TIMER, pj.PJSIP_EVENT_TRANSPORT_ERROR)
        and state.prevState < pj.PJSIP_TSX_STATE_COMPLETED
        and state.tsx.state >= pj.PJSIP_TSX_STATE_COMPLETED
        and int(state.tsx.statusCode) >= 300
    )


def _wire(whole_msg: str) -> bytes:
    """A message's bytes as pjsip holds them. SWIG hands a ``std::string`` over decoded
    with ``surrogateescape``: a byte that is not UTF-8 (a PBX's text in Latin-1, say) is a
    lone surrogate, which a plain ``encode()`` refuses (UnicodeEncodeError). Raised in a
    pjsua2 callback, SWIG prints it and goes on, and what the callback was for is not done
    (a REFER's unreadable end went unreported: the caller heard the ring tone for 180 s)."""
    return str(whole_msg).encode("utf-8", "surrogateescape")


class Engine:
    """pjsua2 for one process. Use only from the thread that called :meth:`start`."""

    def __init__(
        self,
        config: EngineConfig,
        emit: Callable[[Event], None],
        wake: Callable[[], None] = lambda: None,
        flush: Callable[[], None] = lambda: None,
    ) -> None:
        self._config = config
        self.emit = emit
        # Sends what was emitted now. Events are otherwise sent when the pump returns, but a
        # keypad digit is emitted by a pending job at the start of the pump (see
        # MEDIA_PUMP_MS) and would wait out the whole wait: up to MEDIA_PUMP_MS more a digit.
        self.flush = flush
        # Called from the media thread when it queues an event the owner must see soon (a
        # play's end): the owner's pump then returns at once instead of at its timeout.
        self._wake = wake
        self._media_thread = MediaThread()
        self._ep: pj.Endpoint | None = None
        self._account: _Account | None = None
        self._calls: dict[str, _Call] = {}
        self._dead: list[object] = []  # dropped one pump after DISCONNECTED
        # Calls we hung up that pjsua reported DISCONNECTED as its CANCEL or BYE left, and
        # whose far end has not given its final answer yet (pjsua's call not over): kept
        # until it has (see STOP_ANSWERS_S), then dropped as the dead are.
        self._hanging_up: list[_Call] = []
        self._to_refuse: list[_Call] = []  # INVITEs come while stopping: 503 after the pass
        self._media_q: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._ids = itertools.count(1)
        self._requests: dict[str, SendMessage] = {}
        self._challenged: set[str] = set()  # MESSAGEs already answered with digest auth
        # Calls whose newest transfer's subscription ended in this pump's events: reported
        # after them unless pjsua reported that end (see _report_unreported_ends).
        self._ended_refers: list[_Call] = []
        # Calls whose report_newest a transaction of this pump set (see _forget_marks).
        self._marked: list[_Call] = []
        self.port = config.port
        self.stopping = False
        self._unregistered = False  # the stop's un-REGISTER had its final answer
        self._unregister_sent = False  # the stop's un-REGISTER went out
        self._placed = 0  # PlaceCalls taken in, accepted or refused (WorkerStatus.placed)
        # Inbound MESSAGEs pjsua answered 200 and the service dropped since the last warning
        # (see _note_inbound_message), and when that warning was logged.
        self._messages_dropped = 0
        self._messages_where = ""  # the last one's: "in a call", "out of a dialog"
        self._messages_warned_at: float | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Create the endpoint, UDP and TCP transports on host:port, and the account."""
        cfg = self._config
        ep = pj.Endpoint()
        ep.libCreate()
        ep_cfg = pj.EpConfig()
        ep_cfg.uaConfig.threadCnt = 0
        ep_cfg.uaConfig.mainThreadOnly = True
        ep_cfg.uaConfig.maxCalls = MAX_CALLS
        ep_cfg.uaConfig.userAgent = "clinic-voice"
        # No unsolicited message-waiting NOTIFYs (pjsua's default answers them 200 and reads
        # nothing): the service has no mailbox to show; they get 481 as any NOTIFY out of
        # a subscription (voice/sip/pjsip_fallback.py).
        ep_cfg.uaConfig.mwiUnsolicitedEnabled = False
        ep_cfg.logConfig.level = cfg.log_level
        ep_cfg.logConfig.consoleLevel = cfg.log_level
        ep_cfg.medConfig.clockRate = 8000
        ep_cfg.medConfig.sndClockRate = 8000
        ep_cfg.medConfig.channelCount = 1
        ep_cfg.medConfig.noVad = True
        ep_cfg.medConfig.ecTailLen = 0  # no echo canceller: we never play the caller back
        with self._media_thread.created():  # long sleeps while idle (voice/sip/media_thread.py)
            ep.libInit(ep_cfg)
        self._ep = ep
        # pjsua answers nothing to a request none of its modules takes (FOO; BYE out of any
        # call): a last module of our own does (voice/sip/pjsip_fallback.py), and one before
        # pjsua's refuses MESSAGE, which pjsua answered 200 (delivered) and nobody read; a
        # third answers OPTIONS with only what is served (no presence, no MESSAGE bodies).
        pjsip_fallback.install(_extension_path(), user_agent=ep_cfg.uaConfig.userAgent)
        self.port = self._listen(ep)
        ep.libStart()
        ep.audDevManager().setNullDev()
        self._close_idle_clock(ep)
        for codec in ep.codecEnum2():
            keep = any(codec.codecId.startswith(c) for c in _KEEP_CODECS)
            ep.codecSetPriority(codec.codecId, 200 if keep else 0)

        acfg = pj.AccountConfig()
        acfg.idUri = f"sip:{cfg.user}@{cfg.host}:{self.port}"
        acfg.mediaConfig.transportConfig.boundAddress = cfg.host
        acfg.mediaConfig.transportConfig.port = 0  # RTP on any free port: workers share a host
        if cfg.registrar:
            acfg.regConfig.registrarUri = cfg.registrar
            acfg.regConfig.timeoutSec = 60  # short: a restarted registrar relearns us soon
            acfg.regConfig.retryIntervalSec = 2
            acfg.regConfig.firstRetryIntervalSec = 1
            # Behind the PBX only: pjsua answers a challenge to any request in any call's
            # dialog (a REFER or BYE answered 401/407, RFC 3261 section 22) with these, for
            # any realm ("*"), and here every dialog is with the PBX. In direct mode an
            # inbound call's far end is whoever called: answering its challenge hands it a
            # digest of the password for a nonce of its choosing, to guess offline. With
            # CLINIC_SIP_REALM, only that realm's (pjsip matches it ignoring case): another
            # realm's challenge ends the request as one without credentials.
            acfg.sipConfig.authCreds.append(
                pj.AuthCredInfo("digest", cfg.realm or "*", cfg.user, 0, cfg.password)
            )
        else:
            acfg.regConfig.registerOnAdd = False
        account = _Account(self)
        account.create(acfg, True)
        self._account = account
        log.info("pjsua up on %s:%s (pid %s)", cfg.host, self.port, os.getpid())

    @staticmethod
    def _close_idle_clock(ep: pj.Endpoint) -> None:
        """Let pjsua stop the null sound device's 20 ms clock until the first call.

        pjsua closes an idle sound device ``sndAutoCloseTime`` (1 s) after the bridge's last
        connection goes, and opens it again when a call's media connects; but it only looks
        after a disconnect, so a worker that never had a call ticked 50 times a second for
        ever (2.8 ms of CPU a second per idle worker, measured here with 160 workers).
        One connect and disconnect starts that idle timer.
        """
        dev = ep.audDevManager()
        try:
            cap, play = dev.getCaptureDevMedia(), dev.getPlaybackDevMedia()
            cap.startTransmit(play)
            cap.stopTransmit(play)
        except pj.Error as exc:  # only costs CPU: the clock keeps ticking
            log.warning("could not idle the sound clock: %s", exc.reason)

    def _listen(self, ep: pj.Endpoint) -> int:
        """UDP and TCP transports on one port; with port 0, retry until both get it."""
        cfg = self._config
        tcfg = pj.TransportConfig()
        tcfg.boundAddress = cfg.host
        tcfg.publicAddress = cfg.host
        for _ in range(20 if cfg.port == 0 else 1):
            tcfg.port = cfg.port
            try:
                udp = ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tcfg)
            except pj.Error as exc:
                raise ListenError(f"{cfg.host}:{cfg.port}", _reason(exc), exc.status) from None
            port = int(str(ep.transportGetInfo(udp).localName).rsplit(":", 1)[1])
            tcfg.port = port
            try:
                ep.transportCreate(pj.PJSIP_TRANSPORT_TCP, tcfg)
            except pj.Error as exc:
                if cfg.port != 0:
                    raise ListenError(f"{cfg.host}:{port}", _reason(exc), exc.status) from None
                # The free UDP port is taken for TCP (another process, TIME_WAIT): next one.
                log.debug("TCP port %s busy (%s): trying another", port, exc.reason)
                ep.transportClose(udp)
                continue
            return port
        raise EngineError("no port free for both UDP and TCP", 0)

    def stop(self) -> None:
        """Hang up everything and send the un-REGISTER, wait (``STOP_ANSWERS_S`` at most) for
        the far ends' answers to the CANCELs and BYEs and the registrar's to the un-REGISTER
        (``UNREGISTER_S`` at most), and destroy the endpoint; a MESSAGE that still waits for
        its final answer is reported 503."""
        ep = self._ep
        if ep is None:
            return
        self.stopping = True
        self._say_dropped_messages(at_stop=True)
        try:
            # Not a call queued already (an INVITE come while stopping is ended at once):
            # twice in the list, it was hung up again after pjsua had ended it.
            self._to_refuse += [
                c for c in self._calls.values() if not (c.outbound or c.answered or c.ended)
            ]
            self._refuse_at_stop()
            ep.hangupAllCalls()
            # The un-REGISTER goes with the hang-ups, its account alive so that its challenge
            # is answered, and is waited for in the same wait as their answers: the PBX stops
            # sending this worker calls at once, and the stop waits no longer than it did.
            # After that wait, it made the worst case 3 s, which left pjsua's teardown 2 s of
            # WORKER_STOP_S, not 3; and an INVITE that came during the 1 s it waited alone
            # was answered 603 (its Call freed by the stop), not 503.
            self._unregistered = False
            unregistering = self._account is not None and self._unregister(self._account)
            self._unregister_sent = unregistering
            now = time.monotonic()
            deadline = now + STOP_ANSWERS_S
            unregister_deadline = now + UNREGISTER_S
            # Let the CANCELs and BYEs get their final answers (a 487 ACKed: see
            # STOP_ANSWERS_S), then destroy without the network: a plain libDestroy waits
            # up to a second more for stragglers. _awaiting_answers, asked first each time,
            # also answers 503 to an INVITE that came during the wait.
            while (
                self._awaiting_answers()
                or (
                    unregistering
                    and not self._unregistered
                    and time.monotonic() < unregister_deadline
                )
            ) and time.monotonic() < deadline:
                ep.libHandleEvents(10)
        except pj.Error as exc:
            log.warning("hangup at shutdown failed: %s", exc.info())
        if self._unregister_sent and not self._unregistered:
            log.info(
                "no answer to the un-REGISTER within %g s of the stop: the registrar may keep "
                "this worker's contact until it expires",
                UNREGISTER_S,
            )
        unanswered = sorted(c.call_id for c in self._hanging_up)
        if unanswered:
            log.info(
                "calls %s: no final answer to the hang-up (CANCEL or BYE) within %g s of the "
                "stop: ended without it",
                ", ".join(unanswered),
                STOP_ANSWERS_S,
            )
        # The dead first, while the live calls are still known: one whose call id a live
        # call has taken is disowned, not freed (see _Call.__del__).
        self._dead.clear()
        self._hanging_up.clear()
        self._to_refuse.clear()
        self._calls.clear()
        self._ended_refers.clear()
        self._disown_leftovers()
        # A MESSAGE still waiting for its final answer (up to Timer F, 32 s) is ended by
        # libDestroy, which reports it (503) to the account that sent it, and pjsua2 finds
        # that account with an assertion: deleted first (shutdown), it aborted the worker
        # (pjsua_acc_get_user_data: Assertion `...valid' failed, exit -6), whether or not
        # the MESSAGE had been challenged and sent again. So that account outlives
        # libDestroy, which keeps accounts valid until its transactions are gone; its
        # destructor then finds pjsua gone and does nothing.
        account, self._account = self._account, None
        if account is not None and self._cut_messages():
            if not self._unregister_sent:
                self._unregister(account)
        elif account is not None:
            account.shutdown()
        ep.libDestroy(pj.PJSUA_DESTROY_NO_NETWORK)
        self._ep = None
        del account

    def _awaiting_answers(self) -> bool:
        """Whether a call still waits for pjsua: one hung up whose far end has not answered
        its CANCEL or BYE yet, or one not reported DISCONNECTED yet (a call not dialled yet,
        waiting for a pjsua slot, has nothing on the wire to wait for)."""
        self._refuse_at_stop()
        self._drop_answered()
        return bool(self._hanging_up) or any(c.redial is None for c in self._calls.values())

    def _refuse_at_stop(self) -> None:
        """Answer 503 to the INVITEs that came while stopping (see :meth:`_on_incoming`), and
        at the stop to the inbound calls still ringing: as the pool answers a caller at the
        stop (a PBX tries elsewhere), where hangupAllCalls declined them (603: try no other).
        In a method of its own: a loop's variable in :meth:`stop` held the last call past
        its ``_disown_leftovers`` (an ERROR, and its C++ side left to the process's end)."""
        refused, self._to_refuse = self._to_refuse, []
        for call in refused:
            # Only a call pjsua has not ended: one whose caller's CANCEL came in the same pass
            # is over (DISCONNECTED, out of _calls), and pjsua2's Call::hangup acts on the call
            # id alone (call.cpp), which pjsua gives to the next call once this one is over.
            if self._calls.get(call.call_id) is call:
                self._hangup(call, SipStatus.SERVICE_UNAVAILABLE, self._config.retry_after_s)

    def _drop_answered(self) -> None:
        """Move the calls whose far end has answered our hang-up from :attr:`_hanging_up` to
        the dead: pjsua's call is over (its INVITE session gone: ``getInfo`` refuses), or its
        call id is another call's by now (another SIP Call-ID)."""
        if not self._hanging_up:
            return
        still: list[_Call] = []
        for call in self._hanging_up:
            try:
                over = str(call.getInfo().callIdString) != call.sip_call_id
            except pj.Error:
                over = True
            (self._dead if over else still).append(call)
        self._hanging_up = still

    def _cut_messages(self) -> bool:
        """Report each MESSAGE still waiting for its final answer as a 503, as the pool does
        for a worker gone (it may have arrived: it is never said delivered); True if any."""
        cut = list(self._requests)
        for request_id in cut:
            log.info("MESSAGE %s: no final answer before the stop (reported 503)", request_id)
            self.emit(MessageResult(request_id, SipStatus.SERVICE_UNAVAILABLE))
        self._requests.clear()  # pjsua's own report, inside libDestroy, finds none of them
        self._challenged.clear()
        return bool(cut)

    def _unregister(self, account: _Account) -> bool:
        """Send the un-REGISTER that deleting the account (``shutdown``) would have sent;
        True when it went out."""
        if not self._config.registrar:
            return False
        try:
            account.setRegistration(False)
        except pj.Error as exc:  # never registered (pjsua has no registration to end)
            log.info("no un-REGISTER at the stop: %s", exc.reason)
            return False
        return True

    @staticmethod
    def _disown_leftovers() -> None:
        """Keep every call, player and port still alive from being destroyed after
        ``libDestroy``, which aborts the process (see :func:`_callback`).

        Ours were dropped just now; one only a reference cycle keeps goes in the collection
        below, while pjsua can still take its end. One still referenced from elsewhere (an
        exception's traceback: stop runs in ``run``'s ``finally``) is disowned: its C++ side
        is left to the process's end, which destroys nothing.
        """
        gc.collect()
        left = [
            o
            for o in gc.get_objects()
            if isinstance(o, _Call | _Player | _Listener) and not getattr(o, "disowned", False)
        ]
        if not left:
            return
        log.error(
            "%d pjsua object(s) still referenced at stop (calls %s): left to the process's end",
            len(left),
            ", ".join(sorted({o.call_id for o in left})),
        )
        for obj in left:
            obj.__disown__()

    def _live_call_with_id(self, pj_id: int, *, besides: _Call) -> _Call | None:
        """The live call (not ``besides``) that pjsua knows by call id ``pj_id``, if any."""
        for call in self._calls.values():
            if call is not besides and call.getId() == pj_id:
                return call
        return None

    def free_slots(self) -> int:
        """Calls this process can still take."""
        return max(0, MAX_CALLS - len(self._calls))

    def status(self) -> WorkerStatus:
        """The event that tells the pool where we are and how full."""
        return WorkerStatus(free_slots=self.free_slots(), port=self.port, placed=self._placed)

    def pump_ms(self, idle_ms: int) -> int:
        """How long the next :meth:`pump` may wait: until the nearest ring or answer deadline,
        ``LISTEN_PUMP_MS`` while a call streams audio to a listener, ``MEDIA_PUMP_MS`` while a
        call has media (its keypad digits wait for the next pump), else ``idle_ms``.

        Nothing else needs a short pump: commands and the end of a play wake it, and pjsip's
        own timers (retransmissions, session timers) bound ``libHandleEvents`` by themselves.
        A fixed 5 ms pump while any call was up cost 200 wake-ups a second per worker,
        about a third of a busy worker's CPU (bench/asterisk_compare.py, 2026-11-29).
        """
        wait = float(idle_ms)
        now = time.monotonic()
        for call in self._calls.values():
            if call.redial is not None:
                return 1
            if call.listener is not None:
                wait = min(wait, LISTEN_PUMP_MS)
            elif call.media_active:
                wait = min(wait, MEDIA_PUMP_MS)
            for deadline in (call.ring_deadline, call.answer_deadline, call.media_deadline):
                if deadline is not None:
                    wait = min(wait, (deadline - now) * 1000)
        return max(0, math.ceil(wait))

    def pump(self, ms: int) -> None:
        """Run pjsua for up to ``ms`` milliseconds, then media events, timers and cleanup."""
        assert self._ep is not None
        self._drop_answered()
        self._dead.clear()
        self._ep.libHandleEvents(ms)
        self._refuse_at_stop()
        self._say_dropped_messages()
        self._report_unreported_ends()
        self._forget_marks()
        while True:
            try:
                ev = self._media_q.get_nowait()
            except queue.Empty:
                break
            call = self._calls.get(ev.call_id) if hasattr(ev, "call_id") else None
            if call is None or call.ended:
                continue
            if isinstance(ev, PlayDone):
                self._play_ended(call, ev.play_id)
            else:
                self.emit(ev)
        now = time.monotonic()
        for call in list(self._calls.values()):
            if call.redial is not None:
                self._redial(call)
                continue
            if call.ring_deadline is not None and now >= call.ring_deadline:
                call.ring_deadline = None
                call.cancelled_by_us = True
                self._hangup(call, SipStatus.REQUEST_TERMINATED)
            if call.answer_deadline is not None and now >= call.answer_deadline:
                call.answer_deadline = None
                call.ring_deadline = None
                call.timed_out = True
                self._hangup(call, SipStatus.REQUEST_TERMINATED)
                # Without a provisional response pjsip must hold the CANCEL back (RFC 3261
                # section 9.1) until Timer B: report the outcome now, keep the slot until then.
                self._end(call, 0)
            if call.media_deadline is not None and now >= call.media_deadline:
                call.media_deadline = None
                if not call.media_seen and not call.ended:
                    log.warning(
                        "call %s: no audio %g s after the answer: hanging up",
                        call.call_id,
                        NO_MEDIA_S,
                    )
                    self._hangup(call, 0)

    # -- commands ---------------------------------------------------------------------------

    def handle(self, cmd: Command) -> None:
        """Carry out one command from the pool."""
        if isinstance(cmd, PlaceCall):
            self._place(cmd)
            return
        if isinstance(cmd, SendMessage):
            self._send_message(cmd)
            return
        if isinstance(cmd, Shutdown):
            self.stopping = True
            return
        if isinstance(cmd, Ping):
            self.emit(self.status())  # from the owner thread: it runs
            return
        call = self._calls.get(cmd.call_id)
        if call is None or call.ended:
            log.debug("call %s: %s for a call that is gone", cmd.call_id, type(cmd).__name__)
            if isinstance(cmd, Play):
                self.emit(PlayDone(cmd.call_id, cmd.play_id, failed=True))
            return
        if call.redial is not None and isinstance(cmd, Hangup):
            # Not dialled yet (waiting for a pjsua slot): the hang-up ends it here.
            call.redial = None
            call.cancelled_by_us = True
            self._calls.pop(call.call_id, None)
            self._dead.append(call)
            self._end(call, SipStatus.REQUEST_TERMINATED)
            self.emit(self.status())
            return
        try:
            if isinstance(cmd, Answer):
                prm = pj.CallOpParam(True)
                prm.statusCode = SipStatus.OK
                call.answer(prm)
            elif isinstance(cmd, Hangup):
                self._hangup(call, cmd.sip_status, cmd.retry_after_s)
            elif isinstance(cmd, Play | StartListen):
                if call.media_active:
                    self._media_command(call, cmd)
                else:
                    call.pending.append(cmd)
            elif isinstance(cmd, StopPlay):
                self._drop_pending_plays(call)
                self._stop_play(call)
            elif isinstance(cmd, Transfer):
                prm = pj.CallOpParam(True)
                _add_headers(prm.txOption, cmd.headers)
                call.xfer_pending = True
                call.xfer_count += 1
                call.refers.transfer()
                call.xfer(cmd.uri, prm)
        except pj.Error as exc:
            log.warning("call %s: %s failed: %s", call.call_id, type(cmd).__name__, exc.reason)
            if isinstance(cmd, Play):
                self.emit(PlayDone(cmd.call_id, cmd.play_id, failed=True))
            elif isinstance(cmd, Transfer):
                call.xfer_pending = False
                # No REFER left: the session must hear of it now, not at its deadline.
                self.emit(TransferStatus(cmd.call_id, SipStatus.SERVER_INTERNAL_ERROR, True))

    def _place(self, cmd: PlaceCall) -> None:
        assert self._account is not None
        self._placed += 1
        if self.free_slots() == 0 or self.stopping:
            self.emit(self.status())  # this one counted as taken in: not pending any more
            self.emit(PlaceFailed(cmd.call_id, "worker full", retryable=True))
            return
        call = _Call(self, cmd.call_id, self._account, flash=cmd.flash)
        call.ring_s = cmd.ring_s
        call.answer_deadline = time.monotonic() + cmd.answer_timeout_s
        self._calls[cmd.call_id] = call
        # The status counts this call in its free slots and in ``placed`` at once: the
        # pool's pending count drops as the free slots do, not later at the ack.
        self.emit(self.status())
        self.emit(CallEvent(cmd.call_id, CallState.TRYING, 0, None, time.time()))
        self._dial(call, cmd, time.monotonic() + REDIAL_S)

    def _redial(self, old: _Call) -> None:
        """Dial a call again that pjsua refused for want of a free slot (see REDIAL_S)."""
        assert self._account is not None and old.redial is not None
        cmd, until = old.redial
        call = _Call(self, old.call_id, self._account, flash=old.flash)
        call.ring_s = old.ring_s
        call.answer_deadline = old.answer_deadline
        call.pending = old.pending  # plays queued until media, as for any call
        self._calls[call.call_id] = call
        self._dead.append(old)
        self._dial(call, cmd, until)

    def _dial(self, call: _Call, cmd: PlaceCall, redial_until: float) -> None:
        prm = pj.CallOpParam(True)
        if cmd.flash:
            # Late offer: no SDP, so no RTP ports and no media for a call never answered.
            prm.opt.flag = pj.PJSUA_CALL_NO_SDP_OFFER
            # No audio at all: pjsua_call_make_call opens the sound device for any call with
            # audio, and the null device's 20 ms clock then ticked in every worker that had
            # placed a flash call until its next media call ended (nothing else closes it):
            # a fifth of a core at 300 flash calls/s (perf, bench/asterisk_compare.py flash
            # load, 2026-11-29). An answered flash call is hung up at once; its SDP answer
            # refuses the media line (port 0).
            prm.opt.audioCount = 0
        prm.txOption.localUri = f"sip:{cmd.caller_id}@{self._config.host}"
        headers = list(cmd.headers)
        if cmd.pai:
            headers.insert(0, ("P-Asserted-Identity", f"<sip:{cmd.caller_id}@{self._config.host}>"))
        _add_headers(prm.txOption, tuple(headers))
        try:
            call.makeCall(cmd.target_uri, prm)
        except pj.Error as exc:
            if exc.status == _PJ_ETOOMANY and time.monotonic() < redial_until and not self.stopping:
                log.debug("call %s: no pjsua slot free yet: dialling again", cmd.call_id)
                call.redial = (cmd, redial_until)
                return
            log.warning("call %s: makeCall failed: %s", cmd.call_id, exc.reason)
            self._calls.pop(cmd.call_id, None)
            self._dead.append(call)
            if not call.ended:
                call.ended = True
                self.emit(
                    CallEvent(cmd.call_id, CallState.ENDED, 0, CallOutcome.FAILED, time.time())
                )
            self.emit(self.status())

    def _hangup(self, call: _Call, status: int, retry_after_s: int = 0) -> None:
        """Hang ``call`` up: with ``status`` as its final answer while it rings (0: pjsua's
        default), a 503 with ``Retry-After: retry_after_s`` when that is not 0 (RFC 3261
        section 21.5.4: when the caller, or the PBX, may try this server again)."""
        prm = pj.CallOpParam(True)
        if status:
            prm.statusCode = status
        if retry_after_s and status == SipStatus.SERVICE_UNAVAILABLE:
            # pjsua adds these to the final response of a call not answered yet, and to
            # nothing else (a BYE or CANCEL carries no Retry-After).
            _add_headers(prm.txOption, (("Retry-After", str(retry_after_s)),))
        try:
            call.hangup(prm)
        except pj.Error as exc:
            log.debug("call %s: hangup: %s", call.call_id, exc.reason)

    def _media_command(self, call: _Call, cmd: Command) -> None:
        aud = call.getAudioMedia(-1)
        if isinstance(cmd, Play):
            self._stop_play(call)  # the play it replaces ends (its one PlayDone) first
            player = _Player(call.call_id, cmd.play_id, self._media_q, cmd.loop, self._wake)
            player.createPlayer(
                os.path.abspath(cmd.path), 0 if cmd.loop else pj.PJMEDIA_FILE_NO_LOOP
            )
            player.startTransmit(aud)
            call.player = player
        elif isinstance(cmd, StartListen) and call.listener is None:
            fmt = pj.MediaFormatAudio()
            fmt.type = pj.PJMEDIA_TYPE_AUDIO
            fmt.clockRate = 8000
            fmt.channelCount = 1
            fmt.bitsPerSample = 16
            fmt.frameTimeUsec = 20000
            listener = _Listener(call.call_id, self._media_q)
            listener.createPort(f"listen-{call.call_id}", fmt)
            aud.startTransmit(listener)
            call.listener = listener

    def _stop_play(self, call: _Call, *, failed: bool = False) -> None:
        """Stop the call's player and report its end (``failed``: it could not play on, and a
        code it read does not count as read); nothing at all when none plays.

        Clearing ``call.player`` is what makes PlayDone exactly-once: an end-of-file queued
        by the media thread for this player no longer matches and is dropped by
        :meth:`_play_ended`; a player that already ended is no longer the call's.
        """
        player = call.player
        if player is None:
            return
        call.player = None
        try:
            player.stopTransmit(call.getAudioMedia(-1))
        except pj.Error as exc:
            log.debug("call %s: stopTransmit: %s", call.call_id, exc.reason)
        self._dead.append(player)
        self.emit(PlayDone(call.call_id, player.play_id, failed=failed))

    def _drop_pending_plays(self, call: _Call) -> None:
        """Stop the plays that wait for the call's audio (a hold, an answer whose media is
        not up yet) before they start: each reports its end now (it was stopped, not
        failed). A stop that found no player was lost, and the play started when the caller
        came back from the hold: a prompt the service had stopped, its end reported late."""
        plays = [cmd for cmd in call.pending if isinstance(cmd, Play)]
        if not plays:
            return
        call.pending = [cmd for cmd in call.pending if not isinstance(cmd, Play)]
        for cmd in plays:
            self.emit(PlayDone(call.call_id, cmd.play_id))

    def _play_ended(self, call: _Call, play_id: int) -> None:
        """A player reached its end (queued by the media thread): report it once."""
        player = call.player
        if player is None or player.play_id != play_id:
            log.debug("call %s: end of play %s already reported", call.call_id, play_id)
            return
        call.player = None
        self._dead.append(player)
        self.emit(PlayDone(call.call_id, play_id))

    def _on_transfer_status(self, call: _Call, status: int, final: bool) -> None:
        log.debug("call %s: transfer status %s final=%s", call.call_id, status, final)
        if not wants_more_reports(status, final=final):
            call.xfer_pending = False
        if not call.ended:
            self.emit(TransferStatus(call.call_id, status, final))
        if final and 200 <= status < 300:
            self._hangup(call, 0)  # the caller is with the target now: our leg is done

    def _on_stale_transfer_status(self, call: _Call, status: int, final: bool) -> None:
        log.info(
            "call %s: transfer status %s (final=%s) of an earlier transfer: ignored",
            call.call_id,
            status,
            final,
        )

    def _on_transfer_tsx(self, call: _Call, e: pj.SipEvent) -> None:
        """A transaction of a call that tried a transfer: its REFERs, the SUBSCRIBEs of
        their subscriptions and the answers to both are noted, and so is each NOTIFY
        (:class:`refer.ReferSubscriptions`): whether pjsua's report that follows is of the
        newest transfer (:attr:`_Call.report_newest`). A NOTIFY that ends the newest
        transfer's subscription while it waits for its answer is kept, to be reported by
        :meth:`_report_unreported_ends` if pjsua reports nothing of it."""
        if e.type != pj.PJSIP_EVENT_TSX_STATE:
            return
        tsx = e.body.tsxState.tsx
        method, kind = str(tsx.method), e.body.tsxState.type
        if tsx.role == pj.PJSIP_ROLE_UAC and method in ("REFER", "SUBSCRIBE"):
            try:
                if method == "REFER":
                    self._on_refer_tsx(call, tsx, e)
                else:
                    self._on_subscribe_tsx(call, tsx, e)
            except (message.SipParseError, ValueError, IndexError) as exc:
                # pjsip built or parsed it; a CSeq or Expires this cannot read leaves the
                # model without it: said, so a transfer misread later can be traced here.
                log.warning("call %s: a %s of the transfer not read: %s", call.call_id, method, exc)
            return
        if kind != pj.PJSIP_EVENT_RX_MSG or tsx.role != pj.PJSIP_ROLE_UAS or method != "NOTIFY":
            return
        # pjsua's report of it follows pjsip's 200 to it (that transaction's next state).
        self._mark(call, None)
        try:
            notify = message.parse(_wire(e.body.tsxState.src.rdata.wholeMsg))
        except message.SipParseError:
            return  # pjsip parsed it; nothing here to add
        seen = call.refers.notified(notify, now=time.monotonic())
        self._mark(call, seen.newest)
        if seen.newest and seen.ends and call.xfer_pending:
            self._ended_refers.append(call)

    def _on_refer_tsx(self, call: _Call, tsx: pj.SipTransaction, e: pj.SipEvent) -> None:
        """A REFER of ours: its CSeq when sent (again, after a digest challenge: a new one,
        which names its subscription in the NOTIFYs), and its final status: a response, or
        one pjsip made itself (408 at Timer F, 503 on a transport error), which ends its
        subscription just as well."""
        if tsx.state == pj.PJSIP_TSX_STATE_CALLING:
            call.refers.sent(_cseq(message.parse(_wire(tsx.lastTx.wholeMsg))))
        elif e.body.tsxState.type == pj.PJSIP_EVENT_RX_MSG and int(tsx.statusCode) >= 200:
            whole = e.body.tsxState.src.rdata.wholeMsg
            if int(tsx.statusCode) in _CHALLENGES:
                self._note_refused_realm(f"call {call.call_id}: REFER", int(tsx.statusCode), whole)
            answer = message.parse(_wire(whole))
            newest = call.refers.answered(
                _cseq(answer),
                int(tsx.statusCode),
                refer_sub=(answer.get("Refer-Sub") or "").strip().lower() != "false",
            )
            self._mark(call, newest)
            self._failed_unreported(call, newest, int(tsx.statusCode))
        elif _failed_here(e):
            sent = message.parse(_wire(tsx.lastTx.wholeMsg))
            newest = call.refers.answered(_cseq(sent), int(tsx.statusCode))
            self._mark(call, newest)
            self._failed_unreported(call, newest, int(tsx.statusCode))

    def _failed_unreported(self, call: _Call, newest: bool, status: int) -> None:
        """The newest transfer's REFER failed (and was not sent again): should pjsua report
        nothing of it in this pass, the worker does (:meth:`_report_unreported_ends`).
        pjsip hands a new REFER's transaction to the oldest live ``id``-less subscription
        (``on_new_transaction``): with an earlier transfer's still live, the failure is
        reported as that one's, or not at all once its reports were stopped, and the
        caller heard the ring tone for the 180 s wait."""
        if newest and status >= 300 and call.xfer_pending and not call.refers.newest_live():
            self._ended_refers.append(call)

    def _on_subscribe_tsx(self, call: _Call, tsx: pj.SipTransaction, e: pj.SipEvent) -> None:
        """A SUBSCRIBE of ours (pjsip's refresh of a REFER subscription, pjsua's end of
        one): what it was for when sent, and its final status, whoever made it."""
        sent = message.parse(_wire(tsx.lastTx.wholeMsg))
        if tsx.state == pj.PJSIP_TSX_STATE_CALLING:
            event = sent.get("Event") or ""
            if event.split(";", 1)[0].strip().lower() == "refer":
                expires = int(sent.get("Expires") or "1")
                call.refers.subscribing(_cseq(sent), event, expires, now=time.monotonic())
        elif (
            e.body.tsxState.type == pj.PJSIP_EVENT_RX_MSG and int(tsx.statusCode) >= 200
        ) or _failed_here(e):
            seen = call.refers.subscribe_answered(
                _cseq(sent), int(tsx.statusCode), now=time.monotonic()
            )
            self._mark(call, seen.newest)
            if seen.newest and seen.ends and call.xfer_pending:
                # pjsua reports a response's status as the end (489, final); should it say
                # nothing, the transfer must not wait for an answer that cannot come.
                self._ended_refers.append(call)

    def _mark(self, call: _Call, newest: bool | None) -> None:
        """Note whether pjsua's next transfer report for ``call`` is of its newest transfer."""
        call.report_newest = newest
        self._marked.append(call)

    def _forget_marks(self) -> None:
        """Clear the marks this pump's transactions set. pjsua reports a transaction's
        transfer status in the same pass as its callbacks run, or never (a NOTIFY of a
        subscription whose reports were stopped, a body it does not read): a mark left over
        would decide a later report that no transaction of its own precedes (a subscription
        pjsip ends on its own timer), and an earlier transfer's mark would drop the newest's."""
        for call in self._marked:
            call.report_newest = None
        self._marked.clear()

    def _report_unreported_ends(self) -> None:
        """Report, as a failed transfer, each subscription end seen in this pump's events that
        pjsua said nothing of (:class:`refer.ReferSubscriptions`). pjsua reports a NOTIFY
        in the same pass as the worker sees it (the transaction's callbacks run one after
        the other), so a transfer still waiting for its answer after the pass heard nothing
        from that NOTIFY: no body, another body, or a sipfrag pjsip's parser refused. Its
        caller, still on our line, heard the ring tone until the 180 s wait ran out."""
        ended, self._ended_refers = self._ended_refers, []
        for call in ended:
            # Not when the end was undone later in the pass (a challenged SUBSCRIBE sent
            # again with credentials: pjsua reports nothing, and the transfer goes on).
            if call.xfer_pending and not call.refers.newest_live():
                log.info(
                    "call %s: the REFER's subscription ended with no status: a failed transfer",
                    call.call_id,
                )
                self._on_transfer_status(call, SipStatus.SERVER_INTERNAL_ERROR, True)

    def _send_message(self, cmd: SendMessage, auth: tuple[str, str] | None = None) -> None:
        assert self._account is not None
        prm = pj.SendRequestParam()
        prm.method = "MESSAGE"
        prm.txOption.targetUri = cmd.target_uri
        prm.txOption.localUri = f"sip:{cmd.caller_id}@{self._config.host}"
        prm.txOption.contentType = "text/plain;charset=UTF-8"
        prm.txOption.msgBody = cmd.text
        # pjsua2's userData is a C pointer Python cannot set, so the final response is
        # matched to its request by this header, read back from the transaction's request.
        _add_headers(
            prm.txOption,
            (
                ("P-Asserted-Identity", f"<sip:{cmd.caller_id}@{self._config.host}>"),
                (_REQUEST_ID_HEADER, cmd.request_id),
                *((auth,) if auth else ()),
            ),
        )
        self._requests[cmd.request_id] = cmd
        try:
            self._account.sendRequest(prm)
        except pj.Error as exc:
            log.warning("MESSAGE %s not sent: %s", cmd.request_id, exc.reason)
            self._requests.pop(cmd.request_id, None)
            self._challenged.discard(cmd.request_id)
            self.emit(MessageResult(cmd.request_id, SipStatus.SERVICE_UNAVAILABLE))

    # -- callbacks (owner thread) -----------------------------------------------------------

    def _on_incoming(self, account: _Account, prm: pj.OnIncomingCallParam) -> None:
        # The call record's id (and the nurse's X-Clinic-Call): unique across restarts, workers
        # and hosts on one Redis, where a pid and a counter repeat and would overwrite a record.
        call_id = f"in-{secrets.token_urlsafe(16)}"
        call = _Call(self, call_id, account, prm.callId, flash=False)
        self._calls[call_id] = call
        if self.stopping:
            # An INVITE during the stop's wait for the far ends' answers (STOP_ANSWERS_S):
            # 503 at once, as the pool answers a caller at the stop. Rung (180) as any other,
            # it held that wait to its end (2 s) and was then declined by libDestroy's
            # hang-up (603 Decline: "try nowhere else", where a PBX tries another worker or
            # server on a 503). Nobody is told of it (the pool takes no call now), and the
            # 503 goes after this callback: a final answer inside pjsua's onIncomingCall
            # frees the INVITE twice (an assertion: -6).
            log.info("call %s: the worker is stopping: 503", call_id)
            call.ended = True
            self._to_refuse.append(call)
            return
        caller = called = sip_call_id = source = ""
        headers: list[tuple[str, str]] = []
        try:
            # The packet's own source, not a Via or Contact the sender writes.
            source = str(prm.rdata.srcAddress)
            msg = message.parse(_wire(prm.rdata.wholeMsg))
            sip_call_id = msg.get("Call-ID") or ""
            caller = message.user_part(msg.get("From") or "")
            called = message.user_part(msg.uri) or message.user_part(msg.get("To") or "")
            headers = [
                (n, v)
                for n, v in msg.headers
                if n.lower().startswith("x-") or n.lower() in _KEPT_HEADERS
            ]
        except message.SipParseError as exc:
            log.warning("call %s: cannot read the INVITE: %s", call_id, exc)
        # No WorkerStatus before it: the IncomingCall carries the free slots, so the pool
        # moves the slot from reserved to in use in one step (see IncomingCall).
        self.emit(
            IncomingCall(
                call_id, caller, called, self.free_slots(), tuple(headers), sip_call_id, source
            )
        )
        ring = pj.CallOpParam(True)
        ring.statusCode = SipStatus.RINGING
        try:
            call.answer(ring)
        except pj.Error as exc:
            log.warning("call %s: 180 failed: %s", call_id, exc.reason)

    def _on_call_state(self, call: _Call, prm: pj.OnCallStateParam) -> None:
        info = call.getInfo()
        state = info.state
        status = int(info.lastStatusCode)
        if state == pj.PJSIP_INV_STATE_DISCONNECTED and status in _CHALLENGES:
            e = prm.e  # read only here: SWIG builds a proxy for it on every access
            if e.type == pj.PJSIP_EVENT_TSX_STATE and e.body.tsxState.type == pj.PJSIP_EVENT_RX_MSG:
                self._note_refused_realm(
                    f"call {call.call_id}", status, e.body.tsxState.src.rdata.wholeMsg
                )
        if state == pj.PJSIP_INV_STATE_EARLY and status in (180, 183) and not call.rang:
            call.rang = True
            if call.outbound and not call.ended:
                self.emit(CallEvent(call.call_id, CallState.RINGING, status, None, time.time()))
                if call.flash:
                    call.ring_deadline = time.monotonic() + call.ring_s
                    # From the ring on the ring time ends it, not the wait for a first ring
                    # (as in flash_dialog: a ring longer than that wait ended no_answer).
                    call.answer_deadline = None
        elif state == pj.PJSIP_INV_STATE_CONFIRMED and not call.answered:
            call.answered = True
            call.answer_deadline = call.ring_deadline = None
            if not call.outbound and not call.media_seen:
                call.media_deadline = time.monotonic() + NO_MEDIA_S
            if not call.ended:
                self.emit(CallEvent(call.call_id, CallState.ANSWERED, status, None, time.time()))
            if call.flash:
                self._hangup(call, 0)
        elif state == pj.PJSIP_INV_STATE_DISCONNECTED:
            self._end(call, status)
            self._calls.pop(call.call_id, None)
            # Drop players/ports and the Call itself on the next pump, not inside the callback.
            self._dead.extend(x for x in (call.player, call.listener) if x is not None)
            call.player = call.listener = None
            if prm.e.type == pj.PJSIP_EVENT_USER:
                # Reported by our hang-up as its CANCEL or BYE leaves (pjsua's own event):
                # pjsua's call goes on until the far end answers that (see STOP_ANSWERS_S).
                call.sip_call_id = str(info.callIdString)
                self._hanging_up.append(call)
            else:
                self._dead.append(call)
            if not self.stopping:
                self.emit(self.status())

    def _end(self, call: _Call, status: int) -> None:
        if call.ended:
            return
        call.ended = True
        outcome = outcome_for_status(
            status,
            answered=call.answered,
            cancelled_by_us=call.cancelled_by_us,
            flash=call.flash,
            timed_out=call.timed_out,
        )
        log.debug("call %s ended: %s %s", call.call_id, status, outcome)
        self.emit(CallEvent(call.call_id, CallState.ENDED, status, outcome, time.time()))

    def _on_media_state(self, call: _Call) -> None:
        info = call.getInfo()
        active = any(
            m.type == pj.PJMEDIA_TYPE_AUDIO and m.status == pj.PJSUA_CALL_MEDIA_ACTIVE
            for m in info.media
        )
        held = call.media_seen and not call.media_active  # coming back from a hold
        call.media_active = active
        # The far end's hold (its audio stopped after it had begun) and its end, reported
        # once each: whoever waits for the caller waits out the hold (a question's timeout).
        # Only in a confirmed call: the media's end at the hang-up is no hold.
        on_hold = call.media_seen and not active
        if on_hold != call.on_hold and info.state == pj.PJSIP_INV_STATE_CONFIRMED:
            call.on_hold = on_hold
            log.debug("call %s: %s", call.call_id, "on hold" if on_hold else "off hold")
            if not call.ended:
                self.emit(Hold(call.call_id, on_hold))
        if active:
            call.media_seen = True
            call.media_deadline = None
            # Its RTP socket joins the media thread's poll only when the current wait ends.
            self._media_thread.wake()
            self._reconnect(call, rewind=held)
            pending, call.pending = call.pending, []
            for cmd in pending:
                try:
                    self._media_command(call, cmd)
                except pj.Error as exc:
                    log.warning("call %s: media: %s", call.call_id, exc.reason)
                    if isinstance(cmd, Play):
                        self.emit(PlayDone(call.call_id, cmd.play_id, failed=True))

    def _reconnect(self, call: _Call, *, rewind: bool) -> None:
        """Connect the call's player and listener to its audio again after a re-INVITE.

        A re-INVITE that changes the media (a hold: a=sendonly, a=inactive or c=0.0.0.0, RFC
        3264 section 8.4; its unhold) makes pjsua replace the call's stream and its
        conference slot, and what was connected to the old slot is not connected to the new
        one. The player then stood still (the bridge reads no port that nobody hears) and its
        end never came: a code being read, or a clinic-line question, went silent for good
        after the caller's hold, until the prompt's timeout (30 s for a voice code: reported
        undeliverable) or the 30-minute call limit. Back from a hold, the prompt starts again
        from its beginning: a callee who was away has not heard the part before the hold.
        """
        if call.player is None and call.listener is None:
            return
        try:
            aud = call.getAudioMedia(-1)
            if call.listener is not None:
                aud.startTransmit(call.listener)
            if call.player is not None:
                if rewind:
                    call.player.setPos(0)
                call.player.startTransmit(aud)
        except pj.Error as exc:
            log.warning("call %s: media back, not reconnected: %s", call.call_id, exc.reason)
            # Its end will not come: report it now, as a play that failed (a code cut at the
            # hold was not read to its end).
            self._stop_play(call, failed=True)

    def _note_inbound_message(self, where: str) -> None:
        """pjsua has answered an inbound MESSAGE 200 itself, before this callback, and the
        service takes none (README, "SIP MESSAGE"): its sender was told it was delivered,
        and the text is dropped. Only where pjsip_fallback's early module, which refuses
        them 405 before pjsua sees them, is not registered (an unchecked pjsip release).
        That loss is said, at most once a minute with a count (a sender could send
        thousands), and never with its sender or its text."""
        self._messages_dropped += 1
        self._messages_where = where
        self._say_dropped_messages()

    def _say_dropped_messages(self, *, at_stop: bool = False) -> None:
        """The WARNING of :meth:`_note_inbound_message`, when MESSAGEs were dropped since the
        last one and that was a minute ago (or now, ``at_stop``). Also asked by each pump: a
        burst's MESSAGEs after its first were otherwise said only with the next MESSAGE a
        minute later, if one ever came (a burst of 1000 was "1 inbound SIP MESSAGE(s)")."""
        if not self._messages_dropped:
            return
        now = time.monotonic()
        warned_at = self._messages_warned_at
        if not at_stop and warned_at is not None and now - warned_at < 60.0:
            return
        log.warning(
            "%d inbound SIP MESSAGE(s) (the last %s) answered 200 by pjsua and dropped: the"
            " service takes none; keep MESSAGEs from the SIP workers at the PBX (README)",
            self._messages_dropped,
            self._messages_where,
        )
        self._messages_dropped, self._messages_warned_at = 0, now

    def _note_refused_realm(self, what: str, status: int, whole_msg: str) -> None:
        """pjsua answers the challenges of registrations and calls itself, with credentials
        for CLINIC_SIP_REALM only: a final 401 or 407 of another realm (``whole_msg``) is
        one it did not answer, and the operator is told which realm that was. Nothing is
        said of one it answered (a second challenge: a wrong password), also when another
        challenge of the response was of another realm (pjsip tries each), or could not read.
        pjsip matches the realm ignoring case (``pj_stricmp``), and so does this
        (:func:`digest.same_realm`)."""
        if not self._config.realm:
            return
        header = "WWW-Authenticate" if status == 401 else "Proxy-Authenticate"
        try:
            values = message.parse(_wire(whole_msg)).get_all(header)
        except message.SipParseError:
            return
        realms: list[str] = []
        for value in values:  # pjsip tries each challenge: one of the realm was answered
            with contextlib.suppress(digest.DigestError):
                realms.append(digest.challenge_params(value)["realm"])
        if realms and not any(digest.same_realm(r, self._config.realm) for r in realms):
            refused = digest.RealmRefused(realms[0])
            log.warning("%s: cannot answer the %s challenge: %s", what, status, refused)

    def _on_request_done(self, prm: pj.OnSendRequestParam) -> None:
        tsx = prm.e.body.tsxState.tsx
        try:
            request = message.parse(_wire(tsx.lastTx.wholeMsg))
        except message.SipParseError as exc:
            log.warning("cannot read back a sent request: %s", exc)
            return
        request_id = request.get(_REQUEST_ID_HEADER) or ""
        cmd = self._requests.pop(request_id, None)
        if cmd is None:
            return
        status = int(tsx.statusCode) or SipStatus.REQUEST_TIMEOUT
        if status in (401, 407) and request_id not in self._challenged and self._config.password:
            auth = self._answer_challenge(prm, cmd, status)
            if auth is not None:
                self._challenged.add(request_id)
                self._send_message(cmd, auth)
                return
        self._challenged.discard(request_id)
        self.emit(MessageResult(request_id, status))

    def _answer_challenge(
        self, prm: pj.OnSendRequestParam, cmd: SendMessage, status: int
    ) -> tuple[str, str] | None:
        """The (header, value) answering a 401/407 to a MESSAGE, or None if we cannot."""
        want, answer = (
            ("WWW-Authenticate", "Authorization")
            if status == 401
            else ("Proxy-Authenticate", "Proxy-Authorization")
        )
        try:
            response = message.parse(_wire(prm.e.body.tsxState.src.rdata.wholeMsg))
            # Also refused here: a challenge this client cannot answer (qop="auth-int" only).
            # Raised inside pjsua's callback it was swallowed, and the send waited for nothing.
            # Of several challenges, the first it can answer (of CLINIC_SIP_REALM, if set).
            value = digest.answer(
                response.get_all(want),
                method="MESSAGE",
                uri=cmd.target_uri,
                user=self._config.user,
                password=self._config.password,
                cnonce=secrets.token_hex(8),
                realm=self._config.realm,
            )
        except (message.SipParseError, digest.DigestError) as exc:
            log.warning(
                "MESSAGE %s: cannot answer the %s challenge: %s", cmd.request_id, status, exc
            )
            return None
        return answer, value


def _add_headers(tx: pj.SipTxOption, headers: tuple[tuple[str, str], ...]) -> None:
    for name, value in headers:
        h = pj.SipHeader()
        h.hName = name
        h.hValue = value
        tx.headers.append(h)
