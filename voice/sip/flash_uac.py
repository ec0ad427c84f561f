"""Flash calls placed from the main process over one UDP socket (asyncio around
:mod:`voice.sip.flash_dialog`).

The socket is bound to the port after the SIP workers' (``CLINIC_SIP_ADDR`` port + workers +
1; a free port when ``CLINIC_SIP_ADDR`` has port 0) on the same host, so a PBX that knows the
service's address range knows this one too. Responses are matched to their call by Call-ID;
a final response retransmitted after its call ended gets its ACK again for 32 s (timer D),
and an answered call's dialog is kept as long, so that a 2xx of another fork of its INVITE
still gets its own ACK and BYE (RFC 3261 13.2.2.4). A call that ended unanswered (cancelled,
no answer, a final error, timer B or F with no final response) keeps only the ACK of its last
INVITE (built, not sent, when no final came: :attr:`~voice.sip.flash_dialog.FlashDialog.ack`;
~780 bytes a call with its table entry, Call-ID and expiry, measured with tracemalloc over
10,000 calls; hundreds end every second), yet a fork's 2xx that comes after the end gets its
own ACK and BYE too: :class:`~voice.sip.flash_dialog.LateAnswers` decides what each response
after the end gets from that ACK (a final error of the INVITE its ACK, a 2xx its ACK and BYE,
a response to the CANCEL or a BYE nothing), kept only once such a 2xx comes (~1.6 KB while
its BYE is unanswered), and the call's outcome stays what it was.
Requests are answered statelessly: a BYE inside an answered flash call 200, OPTIONS 200 (with
its Allow), anything else for a call that is not here 481, and a new INVITE 403 (calls to the
service go to ``CLINIC_SIP_ADDR``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import secrets
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import cast

from sip_config.clock import Clock
from sip_config.settings import HostPort, SipSettings
from voice.sip import message
from voice.sip.flash_dialog import (
    ALLOW,
    TIMER_D_S,
    FlashDialog,
    LateAnswers,
    Local,
    Step,
    target_host_port,
)
from voice.sip.outcome import SipStatus
from voice.sip.pool import OutboundCall, PoolBusyError, PoolClosedError, SipError, until_ended
from voice.sip.protocol import CallEvent

log = logging.getLogger(__name__)

MAX_LIVE_CALLS = 20_000  # a bound on memory (a live call is a few KB)
_DNS_TTL_S = 60.0
RECEIVE_BUFFER = 4 * 1024 * 1024  # bytes asked of the kernel for the socket's receive queue

Address = tuple[str, int]


def _token() -> str:
    return secrets.token_hex(8)


class FlashHandle:
    """One flash call: its id and its events (``trying`` … ``ended``), as a worker's call."""

    def __init__(self, call_id: str, hang_up: Callable[[], None]) -> None:
        self.id = call_id
        self._events: asyncio.Queue[CallEvent] = asyncio.Queue()
        self._hang_up = hang_up

    async def hangup(self) -> None:
        """Cut the call short: CANCEL it if it rings (see :meth:`FlashDialog.hang_up`)."""
        self._hang_up()

    def deliver(self, ev: CallEvent) -> None:
        self._events.put_nowait(ev)

    @property
    def events(self) -> AsyncIterator[CallEvent]:
        """The events as an async iterator that stops after ``ended``."""
        return until_ended(self._events)


class _Live:
    __slots__ = ("addr", "dialog", "handle", "timer", "timer_for")

    def __init__(self, dialog: FlashDialog, handle: FlashHandle, addr: Address) -> None:
        self.dialog = dialog
        self.handle = handle
        self.addr = addr
        self.timer: asyncio.TimerHandle | None = None
        self.timer_for: float | None = None  # the dialog deadline ``timer`` was set for


class _Late:
    """A call that ended unanswered and that a fork answered after the end: its BYEs."""

    __slots__ = ("answers", "timer")

    def __init__(self, answers: LateAnswers) -> None:
        self.answers = answers
        self.timer: asyncio.TimerHandle | None = None


class FlashUac(asyncio.DatagramProtocol):
    """Places flash calls; see the module docs. Use from one event loop."""

    def __init__(self, settings: SipSettings, clock: Clock) -> None:
        self._s = settings
        self._clock = clock
        port = settings.addr.port + settings.workers + 1 if settings.addr.port else 0
        self._bind = HostPort(settings.addr.host, port)
        self.address = self._bind
        self._transport: asyncio.DatagramTransport | None = None
        self._local: Local | None = None
        self._live: dict[str, _Live] = {}  # SIP Call-ID -> live call
        # Call-ID -> (ACK, next hop, the call if it was answered or its late forks' BYEs if
        # it was answered after its end, until when it is kept)
        self._finished: dict[str, tuple[bytes, Address, _Live | _Late | None, float]] = {}
        self._expiry: deque[tuple[float, str]] = deque()  # (when, Call-ID) of _finished
        self._dns: dict[str, tuple[str, float]] = {}
        self._ids = 0
        self._prefix = f"flash-{secrets.token_hex(3)}-"

    # -- life ----------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(
            lambda: self, local_addr=(self._bind.host, self._bind.port)
        )
        assert self._transport is not None
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            # Every response of every flash call lands here: a loop step of 100 ms at 1,000
            # calls/s is ~400 datagrams, the kernel's default buffer. A lost 180 is not sent
            # again (provisional responses are not retransmitted), so that call ends
            # "no_answer". The kernel caps this at net.core.rmem_max.
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            except OSError as exc:
                log.warning("flash calls: receive buffer not enlarged: %s", exc)
            got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2  # Linux doubles it
            if got < RECEIVE_BUFFER:
                log.warning(
                    "flash calls: receive buffer %d bytes, not %d: raise net.core.rmem_max, "
                    "or bursts may lose a 180 (that call ends no_answer)",
                    got,
                    RECEIVE_BUFFER,
                )
        port = int(self._transport.get_extra_info("sockname")[1])
        self.address = HostPort(self._bind.host, port)
        host = f"[{self._bind.host}]" if ":" in self._bind.host else self._bind.host
        user = self._s.user if self._s.password else ""
        self._local = Local(host, port, user, self._s.password, self._s.realm)
        log.info("flash calls leave from %s (UDP)", self.address)

    async def stop(self) -> None:
        """CANCEL what rings, end every live call ``failed``, close the socket."""
        now = self._clock.monotonic()
        for live in list(self._live.values()):
            self._apply(live, live.dialog.abort(now))
        self._live.clear()
        for _, _, kept, _ in self._finished.values():
            if isinstance(kept, _Late) and kept.timer is not None:
                kept.timer.cancel()
                kept.timer = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    @property
    def ready(self) -> bool:
        """True while the socket is open."""
        return self._transport is not None

    @property
    def live_calls(self) -> int:
        return len(self._live)

    # -- placing ---------------------------------------------------------------------------------

    async def place_call(self, call: OutboundCall) -> FlashHandle:
        """Send the INVITE now; the call's events follow on the handle."""
        if self._transport is None or self._local is None:
            raise PoolClosedError("the flash-call agent is not running")
        if len(self._live) >= MAX_LIVE_CALLS:
            raise PoolBusyError(f"{MAX_LIVE_CALLS} flash calls already in progress")
        try:
            host, port = target_host_port(call.target_uri)
        except ValueError as exc:
            raise SipError(str(exc)) from exc
        addr = (await self._resolve(host), port)
        self._ids += 1
        call_id = f"{self._prefix}{self._ids:08x}"
        dialog = FlashDialog(call.command(call_id), self._local, token=_token, wall=self._clock.now)
        handle = FlashHandle(call_id, functools.partial(self._hang_up, dialog.sip_call_id))
        live = _Live(dialog, handle, addr)
        self._live[dialog.sip_call_id] = live
        self._apply(live, dialog.start(self._clock.monotonic()))
        return handle

    def _hang_up(self, sip_call_id: str) -> None:
        live = self._live.get(sip_call_id)
        if live is not None:  # not retired yet
            self._apply(live, live.dialog.hang_up(self._clock.monotonic()))

    async def _resolve(self, host: str) -> str:
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(host))
        now = self._clock.monotonic()
        cached = self._dns.get(host)
        if cached is not None and cached[1] > now:
            return cached[0]
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.address.host else socket.AF_INET
        try:
            infos = await loop.getaddrinfo(host, None, family=family, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise SipError(f"cannot resolve {host}: {exc}") from exc
        address = str(infos[0][4][0])
        self._dns[host] = (address, now + _DNS_TTL_S)
        return address

    # -- the state machine's outputs ---------------------------------------------------------------

    def _apply(self, live: _Live, step: Step) -> None:
        transport = self._transport
        if transport is not None:
            for data in step.send:
                transport.sendto(data, live.addr)
        for ev in step.events:
            live.handle.deliver(ev)
        dialog = live.dialog
        if dialog.done:
            self._retire(live)
            return
        deadline = dialog.deadline
        if live.timer is not None:
            if deadline == live.timer_for:
                return  # most responses leave the deadline where it was
            live.timer.cancel()
            live.timer = None
        live.timer_for = deadline
        if deadline is not None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, deadline - self._clock.monotonic())
            live.timer = loop.call_later(delay, self._on_timer, live)

    def _on_timer(self, live: _Live) -> None:
        live.timer = None
        if self._live.get(live.dialog.sip_call_id) is live:
            self._apply(live, live.dialog.on_timer(self._clock.monotonic()))

    def _retire(self, live: _Live) -> None:
        if live.timer is not None:
            live.timer.cancel()
            live.timer = None
        call_id = live.dialog.sip_call_id
        self._live.pop(call_id, None)
        ack = live.dialog.ack
        if ack is not None:
            now = self._clock.monotonic()
            # Trimmed here too, not only when a datagram comes: calls to a peer that answers
            # nothing (down, a firewall) end on timer B and are kept, yet bring no datagram.
            self._expire(now)
            until = now + TIMER_D_S
            # An answered call keeps its dialog (its forks' BYEs go on there). Every other
            # call keeps only its last INVITE's ACK (also one that ended on timer B or F): it
            # is all a late fork's 2xx needs besides what it carries (see LateAnswers), and
            # hundreds of calls end every second.
            kept = live if live.dialog.answered else None
            self._finished[call_id] = (ack, live.addr, kept, until)
            self._expiry.append((until, call_id))

    def _expire(self, now: float) -> None:
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            _, call_id = expiry.popleft()
            entry = self._finished.get(call_id)
            if entry is not None and entry[3] <= now:  # not finished again since
                del self._finished[call_id]
                kept = entry[2]
                if isinstance(kept, _Late) and kept.timer is not None:
                    kept.timer.cancel()  # kept until its last BYE's timer F: nothing left
                    kept.timer = None

    # -- the socket -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, int]) -> None:
        now = self._clock.monotonic()
        self._expire(now)
        try:
            # Strict, as at the front: a request from anyone on this socket is answered with
            # its Via, From, To and Call-ID copied, a lone CR in them a line break there.
            msg = message.parse(data, strict=True)
        except message.SipParseError as exc:
            log.info("flash calls: dropped an unparseable datagram from %s: %s", addr, exc)
            return
        call_id = msg.get("Call-ID") or ""
        live = self._live.get(call_id)
        if not msg.is_request:
            if live is not None:
                self._apply(live, live.dialog.on_response(msg, now))
            elif msg.status >= 200 and call_id in self._finished:
                kept = self._finished[call_id][2]
                if not isinstance(kept, _Live):
                    self._after_unanswered(call_id, kept, msg, now)
                    return
                # The dialog ACKs a 2xx again, and sends a new fork's 2xx its BYE.
                step = kept.dialog.on_response(msg, now)
                if kept.dialog.done:
                    # Nothing new: only what it answers goes, the call is not finished
                    # again (its 32 s would start over with every response that comes).
                    for out in step.send:
                        self._send(out, kept.addr)
                    return
                del self._finished[call_id]
                self._live[call_id] = kept
                self._apply(kept, step)
            return
        reply: bytes | None
        if live is not None:
            reply, step = live.dialog.on_request(msg, now)
            self._apply(live, step)
        else:
            reply = self._stateless_reply(msg)
        if reply is not None:
            self._send(reply, (str(addr[0]), int(addr[1])))

    def _after_unanswered(
        self, call_id: str, kept: _Late | None, msg: message.SipMessage, now: float
    ) -> None:
        """A final response for a call that ended unanswered, to the call's
        :class:`LateAnswers` (what gets an ACK, what an ACK and a BYE, what nothing is its
        business): made from the kept ACK for each response until a 2xx of the INVITE
        comes, then kept with the call (its BYEs go on)."""
        ack, hop, _, until = self._finished[call_id]
        if kept is None:
            if self._local is None:
                return
            # 64*T1 after the end (timer D is as long): the INVITE is over for new forks.
            late = LateAnswers(ack, self._local, until=until, token=_token)
        else:
            late = kept.answers
        for out in late.on_response(msg, now):
            self._send(out, hop)
        if not late.answered:
            return  # no 2xx of the INVITE (yet): nothing kept beyond the ACK
        if kept is None:
            kept = _Late(late)
        self._finished[call_id] = (ack, hop, kept, until)
        busy_until = kept.answers.busy_until
        if busy_until is not None and busy_until > until:
            # Kept while a BYE goes on, so its 200 is matched; at most MAX_FORKS times.
            self._finished[call_id] = (ack, hop, kept, busy_until)
            self._expiry.append((busy_until, call_id))
        self._late_timer(kept, hop)

    def _late_timer(self, late: _Late, hop: Address) -> None:
        if late.timer is not None:
            late.timer.cancel()
            late.timer = None
        deadline = late.answers.deadline
        if deadline is not None:
            delay = max(0.0, deadline - self._clock.monotonic())
            late.timer = asyncio.get_running_loop().call_later(
                delay, self._on_late_timer, late, hop
            )

    def _on_late_timer(self, late: _Late, hop: Address) -> None:
        late.timer = None
        for out in late.answers.on_timer(self._clock.monotonic()):
            self._send(out, hop)
        self._late_timer(late, hop)

    def _stateless_reply(self, msg: message.SipMessage) -> bytes | None:
        tag = secrets.token_hex(6)
        if msg.method == "ACK":
            return None
        if msg.method == "OPTIONS":
            # RFC 3261 11.2: the methods this port takes, the Allow its INVITEs carry (a new
            # INVITE is understood, and refused by policy: 403).
            return message.serialise_response(
                msg, SipStatus.OK, to_tag=tag, extra=(("Allow", ALLOW),)
            )
        if msg.method == "INVITE":
            return message.serialise_response(
                msg, SipStatus.FORBIDDEN, reason="Flash Calls Only", to_tag=tag
            )
        if msg.method == "BYE" and (msg.get("Call-ID") or "") in self._finished:
            return message.serialise_response(msg, SipStatus.OK, to_tag=tag)
        return message.serialise_response(msg, SipStatus.CALL_DOES_NOT_EXIST, to_tag=tag)

    def _send(self, data: bytes, addr: Address) -> None:
        if self._transport is not None:
            self._transport.sendto(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.info("flash calls: UDP error: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
