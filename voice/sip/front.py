"""Inbound distribution in direct mode: a tiny SIP redirect server on ``CLINIC_SIP_ADDR``.

Why a redirect and not a proxy: a redirect server (RFC 3261 section 8.3) is stateless and
stays out of the call after one response, so the workers keep their own dialogs and media
and this process never relays a byte of a call. Each INVITE gets ``302 Moved Temporarily``
with the Contact of a worker that has a free slot (``sip:<user>@<host>:<worker_port>``),
``486 Busy Here`` when every worker is full, or ``503 Service Unavailable`` once the service
is stopping or while no worker is up (a proxy then tries another instance), with a
``Retry-After`` (RFC 3261 section 20.33) the pool chooses (``voice.sip.pool.STOP_TAIL_S``).
An INVITE from a source address that holds ``redirect_source.MAX_UNFOLLOWED`` slots for 302s
it has not followed gets ``503`` with ``Retry-After`` ``redirect_source.RETRY_AFTER_S`` and no
slot: a forged flood never follows its 302s, and held every slot
(:mod:`voice.sip.redirect_source`); only copies from the address a 302 went to keep its slot
held, and only a CANCEL from there frees it (below).
The ACK for that final response is absorbed, OPTIONS gets 200 (so peers can probe liveness),
a CANCEL gets 200 when it matches an INVITE answered here (that INVITE already has its final
answer; the 200 carries its To tag) and 481 Call/Transaction Does Not Exist when it matches
none (RFC 3261 9.2), BYE gets 481, other known methods 405 with ``Allow``, unknown ones 501.
MESSAGE is one of those 405s: the service takes no inbound messages, and a 200 would tell
the sender its message was delivered (RFC 3428 section 7). An INVITE without the headers
every request needs gets 400 (RFC 3261 8.1.1) and no slot; its retransmissions get that 400
again, To tag included, from the memory of the non-INVITE answers (see below).

A retransmitted INVITE (the same transaction: top Via branch and sent-by, Call-ID, CSeq;
see :mod:`voice.sip.transaction`) gets the very answer the first copy got, To tag included,
for ``transaction.TIMER_H_S`` (32 s): its 486 is not counted again, and it is not sent to a worker
that freed a slot meanwhile, nor to another one than its 302 named (RFC 3261 17.2.1).
Without that memory a lost 302 or 486 made the UAC's retransmission a new caller. A copy
of a redirected INVITE also keeps the worker's slot held for the caller while that 302 may
be repeated (:meth:`Reservations.renew_inbound`): the pool held it 2 s, and a caller whose
first three 302s were lost (copies at 0.5, 1.5, 3.5 s) found the worker full. A CANCEL
that matches a redirected INVITE frees its slot (:meth:`Reservations.release_inbound`), when
it comes from where the 302 went (:mod:`voice.sip.redirect_source`). A
retransmitted OPTIONS, CANCEL or BYE likewise gets its first response again, To tag included,
for ``transaction.TIMER_J_S`` (32 s; sections 8.2.7 and 17.2.2), from a memory of its own
(at most ``transaction.MAX_REMEMBERED`` answers each).

Over TCP a message whose body would take it over 64 KiB gets 513 and the connection closes
(the body is not read; a header section over 64 KiB just closes it), a connection that
sends no whole message, or does not take its answer, for ``TCP_IDLE_S`` is closed, and at
most ``MAX_TCP_CONNECTIONS`` are open at once, ``MAX_TCP_PER_ADDRESS`` from one address
(the others are closed at once): a redirect needs one short exchange per caller, and this
process also serves the HTTP API.

Workers listen on the ports after ``CLINIC_SIP_ADDR`` (port+1..port+N); with port 0 (tests)
everything takes free ports. With a PBX in front, point its trunk at the workers directly
and let it hunt over them (e.g. Asterisk dial groups): this server is then not needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Protocol, cast

from sip_config.clock import Clock
from sip_config.settings import HostPort
from voice.sip import message, methods, redirect_source, transaction
from voice.sip.outcome import SipStatus

log = logging.getLogger(__name__)

ALLOW = "INVITE, ACK, CANCEL, OPTIONS"
_MAX_MESSAGE = 65536
_BIND_TRIES = 20  # free UDP ports tried for one also free for TCP (port 0 only)
TCP_IDLE_S = 30.0  # the longest wait for one whole message on a TCP connection
MAX_TCP_CONNECTIONS = 1024
MAX_TCP_PER_ADDRESS = 16  # one host cannot fill the connections above by itself
_REQUIRED = ("Via", "From", "To", "Call-ID", "CSeq")  # RFC 3261 8.1.1, in every request
_DROPPED_LOG_S = 60.0  # at most one line a minute about unparseable messages

# The worker for an INVITE with this Call-ID, or the status that refuses it (486, 503).
Picker = Callable[[str], HostPort | int]
# The Retry-After of a 503 to an INVITE now, in seconds (0: none): SipPool.retry_after_s.
RetryAfter = Callable[[], int]


class Reservations(Protocol):
    """The slots the front's 302s hold on the workers (:class:`voice.sip.pool.SipPool`)."""

    def renew_inbound(self, call_id: str, worker: HostPort, hold_s: float) -> None:
        """A copy of the INVITE ``call_id`` got its 302 to ``worker`` again, which the front
        may repeat for ``hold_s`` more: hold its slot (if still held) that long, and the
        caller's way there."""
        ...

    def release_inbound(self, call_id: str, worker: HostPort) -> None:
        """The caller redirected to ``worker`` cancelled: its slot is free again."""
        ...

    def holds_inbound(self, call_id: str, worker: HostPort) -> bool:
        """Whether the slot of the 302 for ``call_id`` to ``worker`` is still held: its
        caller has not arrived there (nor cancelled), and it has not lapsed."""
        ...


def respond(
    request: message.SipMessage,
    target: HostPort | int | None,
    *,
    tcp: bool,
    to_tag: str = "",
    retry_after_s: int = 0,
) -> bytes | None:
    """The response of the redirect server to ``request`` (None: send nothing).

    ``target`` is, for an INVITE, a worker with a free slot or the status that refuses the
    call (486 when all are full, 503 when the service is stopping or no worker is up). For
    another request it is the status to answer with, or None for the method's own
    (:func:`status_for`; a CANCEL's is 481, 200 only when it matched an INVITE). ``to_tag`` is
    the To tag to answer with (a new one when empty); ``retry_after_s`` the ``Retry-After``
    of a 503 to an INVITE (0: none).
    """
    if not request.is_request or request.method == "ACK":
        return None
    tag = to_tag or new_tag()
    method = request.method
    missing = [name for name in _REQUIRED if not request.get(name)]
    if missing:
        if "Via" in missing:
            return None  # nowhere to send a response (section 18.2.2)
        return message.serialise_response(
            request, SipStatus.BAD_REQUEST, to_tag=tag, reason=f"Missing {missing[0]}"
        )
    if method == "INVITE":
        if target is None:  # not picked: no slot for it
            target = SipStatus.BUSY_HERE
        if isinstance(target, int):
            retry = (
                (("Retry-After", str(retry_after_s)),)
                if retry_after_s > 0 and target == SipStatus.SERVICE_UNAVAILABLE
                else ()
            )
            return message.serialise_response(request, target, to_tag=tag, extra=retry)
        user = message.user_part(request.uri)
        userinfo = f"{user}@" if user else ""
        params = ";transport=tcp" if tcp else ""
        contact = f"<sip:{userinfo}{target}{params}>"
        return message.serialise_response(
            request, SipStatus.MOVED_TEMPORARILY, to_tag=tag, extra=(("Contact", contact),)
        )
    status = target if isinstance(target, int) else status_for(method)
    extra: tuple[tuple[str, str], ...] = ()
    if method == "OPTIONS" and status == SipStatus.OK:
        extra = (("Allow", ALLOW), ("Accept", "application/sdp"))
    elif status in (SipStatus.METHOD_NOT_ALLOWED, SipStatus.NOT_IMPLEMENTED):
        extra = (("Allow", ALLOW),)
    return message.serialise_response(request, status, to_tag=tag, extra=extra)


def status_for(method: str) -> SipStatus:
    """The front's status for a request other than INVITE and ACK (a CANCEL that matched
    an INVITE transaction gets 200 instead)."""
    if method == "OPTIONS":
        return SipStatus.OK
    if method in ("CANCEL", "BYE"):  # no transaction (CANCEL) or dialog (BYE) of ours
        return SipStatus.CALL_DOES_NOT_EXIST
    if method in methods.KNOWN:
        return SipStatus.METHOD_NOT_ALLOWED
    return SipStatus.NOT_IMPLEMENTED


def new_tag() -> str:
    """A To tag for a response of the front (section 19.3: at least 32 bits of randomness)."""
    return secrets.token_hex(6)


class _DroppedLog:
    """One log line a minute about dropped messages, with how many: a flood of garbage
    must not flood the log (20,000 datagrams were 1.5 MB of log in half a second)."""

    def __init__(self) -> None:
        self._next = 0.0
        self._count = 0

    def dropped(self, why: object) -> None:
        self._count += 1
        now = time.monotonic()
        if now >= self._next:
            log.info("dropped %d unparseable SIP message(s), the last: %s", self._count, why)
            self._count = 0
            self._next = now + _DROPPED_LOG_S


_dropped = _DroppedLog()


def _answer(
    data: bytes,
    pick: Picker,
    answered: transaction.AnsweredRequests,
    *,
    tcp: bool,
    others: transaction.AnsweredRequests,
    reservations: Reservations | None = None,
    retry_after: RetryAfter = lambda: 0,
    source: str | None = None,
    unfollowed: redirect_source.UnfollowedRedirects | None = None,
) -> bytes | None:
    """The answer to ``data``; ``answered`` holds the INVITE answers, ``others`` those of
    the other requests; ``reservations`` is told of the 302s repeated and cancelled;
    ``retry_after`` gives the Retry-After of a 503 to an INVITE. ``source`` is where ``data``
    came from (:func:`redirect_source.source_of`; None: not known), ``unfollowed`` the 302s
    each source has not followed yet (None: not counted)."""
    try:
        request = message.parse(data, strict=True)
    except message.SipParseError as exc:
        # Without a parseable Via there is nowhere to send a 400: drop it (section 18.3).
        _dropped.dropped(exc)
        return None
    if not request.is_request or request.method == "ACK":
        # The ACK of a 302/486/503/400 is absorbed (section 17.2.1), the answer stays
        # remembered for a late copy of its INVITE.
        return None
    call_id = request.get("Call-ID")
    key = transaction.key_of(request)
    if key is None or not call_id or not all(request.get(name) for name in _REQUIRED):
        return _answer_incomplete(request, others, tcp=tcp)  # 400 (or nothing): no slot
    if request.method != "INVITE":
        return _answer_other(
            request,
            key,
            answered,
            others,
            tcp=tcp,
            reservations=reservations,
            source=source,
            unfollowed=unfollowed,
        )
    before = answered.get(key)
    if before is not None:
        # A retransmission (its answer was lost): the same answer, not a second caller.
        log.debug("INVITE %s retransmitted -> %s again", call_id, before.target)
        if (
            reservations is not None
            and not isinstance(before.target, int)
            and (
                unfollowed is None or source is None or unfollowed.from_its_source(source, call_id)
            )
        ):
            # The caller follows this 302 when a copy of it gets through, after the
            # pool's first hold (2 s) maybe: Timer A doubles, the third copy comes at 3.5 s.
            # So its slot is held as long as the 302 may be repeated (from the first, not
            # renewed by copies: a flood of forged ones holds no slot longer). Only a copy
            # from where the 302 went: the caller's copies come from there, and another
            # source sending them (a forger who saw or guessed the Call-ID) holds nothing.
            reservations.renew_inbound(call_id, before.target, answered.kept_for(key))
        return respond(
            request,
            before.target,
            tcp=tcp,
            to_tag=before.to_tag,
            retry_after_s=before.retry_after_s,
        )
    tag = new_tag()
    if unfollowed is not None and source is not None and not unfollowed.admits(source, call_id):
        # Its source holds slots for 302s it has not followed (a flood never follows): 503,
        # not 486 (the line is not busy; a trunk whose burst met the cap, its callers behind
        # one address, retries or tries another server), and no slot; its copies get it too.
        log.debug("INVITE %s: its source is at its cap of unfollowed 302s: 503", call_id)
        refusal = transaction.FinalAnswer(
            SipStatus.SERVICE_UNAVAILABLE, tag, redirect_source.RETRY_AFTER_S
        )
        answered.remember(key, refusal)
        return respond(
            request, refusal.target, tcp=tcp, to_tag=tag, retry_after_s=refusal.retry_after_s
        )
    target = pick(call_id)
    log.debug("INVITE %s -> %s", call_id, target)
    if unfollowed is not None and source is not None and isinstance(target, HostPort):
        unfollowed.redirected(source, call_id, target)
    # Read once, with the pick: its copies get this 503 again as it was (a stop beginning
    # meanwhile changed "5" into "51" for the same transaction).
    retry = retry_after() if target == SipStatus.SERVICE_UNAVAILABLE else 0
    answered.remember(key, transaction.FinalAnswer(target, tag, retry))
    return respond(request, target, tcp=tcp, to_tag=tag, retry_after_s=retry)


def _answer_incomplete(
    request: message.SipMessage, others: transaction.AnsweredRequests, *, tcp: bool
) -> bytes | None:
    """400 to a request without a header every request needs (nothing without a Via), the
    same one, To tag included, to each retransmission (sections 8.1.1 and 17.2.1).

    Kept with the non-INVITE answers, for Timer J (as long as Timer H): a flood of broken
    INVITEs must not push the answers of real ones out of their memory.
    """
    key = transaction.incomplete_key(request)
    if key is None:
        return respond(request, None, tcp=tcp)  # no Via: nowhere to answer (section 18.2.2)
    before = others.get(key)
    tag = before.to_tag if before is not None else new_tag()
    if before is None:
        others.remember(key, transaction.FinalAnswer(SipStatus.BAD_REQUEST, tag))
    return respond(request, None, tcp=tcp, to_tag=tag)


def _answer_other(
    request: message.SipMessage,
    key: transaction.TransactionKey,
    answered: transaction.AnsweredRequests,
    others: transaction.AnsweredRequests,
    *,
    tcp: bool,
    reservations: Reservations | None = None,
    source: str | None = None,
    unfollowed: redirect_source.UnfollowedRedirects | None = None,
) -> bytes | None:
    """A request other than INVITE and ACK: its first answer again when retransmitted. A
    CANCEL of a redirected INVITE frees its slot when it comes from ``source``, where the
    302 went (see :func:`_answer`)."""
    invite = None
    if request.method == "CANCEL":
        invite = answered.get(transaction.invite_key(key))
        if (
            invite is not None
            and reservations is not None
            and not isinstance(invite.target, int)
            and (
                unfollowed is None
                or source is None
                or unfollowed.from_its_source(source, key.call_id)
            )
        ):
            # A UAC sends a CANCEL only before a final answer: its 302 was lost, and the
            # caller, who hung up, will not follow it. Its slot is free again. Not for a
            # CANCEL from elsewhere (a forger who saw or guessed the Call-ID and branch
            # would free a caller's slot on its way, the caller then finding the worker
            # full): that one gets its 200 and frees nothing. Its copies too (a copy from
            # the caller after a forged one is a retransmission of it, and frees the slot).
            reservations.release_inbound(key.call_id, invite.target)
    before = others.get(key)
    if before is not None:
        return respond(request, before.target, tcp=tcp, to_tag=before.to_tag)
    status = status_for(request.method)
    tag = new_tag()
    if invite is not None:
        # Section 9.2: the INVITE has its final answer already, so the CANCEL has nothing
        # left to do: 200, with the To tag of that answer.
        status, tag = SipStatus.OK, invite.to_tag
    others.remember(key, transaction.FinalAnswer(status, tag))
    return respond(request, status, tcp=tcp, to_tag=tag)


def _too_large(head: bytes) -> bytes | None:
    """513 for a message whose head is readable, else nothing (section 18.3)."""
    try:
        request = message.parse(head, strict=True)
    except message.SipParseError as exc:
        _dropped.dropped(exc)
        return None
    if not request.is_request or request.method == "ACK" or not request.get("Via"):
        return None
    return message.serialise_response(request, SipStatus.MESSAGE_TOO_LARGE, to_tag=new_tag())


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, answer: Callable[[bytes, str], bytes | None]) -> None:
        self._answer = answer
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, int]) -> None:
        reply = self._answer(data, str(addr[0]))
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.info("UDP error on the SIP front: %s", exc)


class RedirectFront:
    """The redirect server on UDP and TCP; ``pick`` chooses a worker (see SipPool), at most
    once per INVITE transaction (``clock`` times how long its answer is remembered);
    ``retry_after`` says a 503's Retry-After (SipPool.retry_after_s)."""

    def __init__(
        self,
        addr: HostPort,
        pick: Picker,
        *,
        clock: Clock,
        reservations: Reservations | None = None,
        retry_after: RetryAfter = lambda: 0,
    ) -> None:
        self._addr = addr
        self._pick = pick
        self._retry_after = retry_after
        self._reservations = reservations  # None: no slot held beyond what ``pick`` does
        # The 302s each source address has not followed yet, at most MAX_UNFOLLOWED each
        # (None without reservations: nothing tells when a caller arrived).
        self._unfollowed = (
            redirect_source.UnfollowedRedirects(reservations.holds_inbound, clock)
            if reservations is not None
            else None
        )
        self._answered = transaction.AnsweredRequests(clock)  # INVITEs, for Timer H
        self._others = transaction.AnsweredRequests(clock, keep_s=transaction.TIMER_J_S)
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._per_address: dict[str, int] = {}
        self.address = addr

    async def start(self) -> None:
        """Bind UDP, then TCP on the same port (the UDP one when the port is 0).

        With port 0 the free UDP port may be taken for TCP (by some connection's local
        port): then another UDP port is tried, up to ``_BIND_TRIES`` times. A socket of a
        failed try is closed, not left to the garbage collector.
        """
        loop = asyncio.get_running_loop()
        tries = _BIND_TRIES if self._addr.port == 0 else 1
        for attempt in range(1, tries + 1):
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _Udp(self._answer_udp), local_addr=(self._addr.host, self._addr.port)
            )
            port = int(udp.get_extra_info("sockname")[1])
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self._addr.host, port)
            except OSError as exc:
                udp.close()
                if attempt == tries:
                    raise
                log.debug("SIP front: TCP port %s taken (%s): trying another", port, exc)
                continue
            self._udp = udp
            self.address = HostPort(self._addr.host, port)
            break
        log.info("SIP redirect front on %s (UDP and TCP)", self.address)

    def _answer_udp(self, data: bytes, host: str | None = None) -> bytes | None:
        """The answer to a datagram from ``host`` (None: not known, its 302s not counted)."""
        return _answer(
            data,
            self._pick,
            self._answered,
            tcp=False,
            others=self._others,
            reservations=self._reservations,
            retry_after=self._retry_after,
            source=None if host is None else redirect_source.source_of(host),
            unfollowed=self._unfollowed,
        )

    async def stop(self) -> None:
        """Close both listeners and open TCP connections."""
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        if self._tcp is not None:
            await self._tcp.wait_closed()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        from_there = self._per_address.get(address, 0)
        if len(self._conns) >= MAX_TCP_CONNECTIONS or from_there >= MAX_TCP_PER_ADDRESS:
            log.warning(
                "SIP front: %d TCP connections open (%d from %s): one more closed",
                len(self._conns),
                from_there,
                address,
            )
            writer.close()
            return
        self._conns.add(task)
        self._per_address[address] = from_there + 1
        source = redirect_source.source_of(address)
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE_S):
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = message.content_length(head) or 0
                    if len(head) + length > _MAX_MESSAGE:
                        reply = _too_large(head)
                        if reply is not None:
                            writer.write(reply)
                            await writer.drain()
                        break  # its body is not read: the stream cannot be followed
                    body = await reader.readexactly(length) if length else b""
                    reply = _answer(
                        head + body,
                        self._pick,
                        self._answered,
                        tcp=True,
                        others=self._others,
                        reservations=self._reservations,
                        retry_after=self._retry_after,
                        source=source,
                        unfollowed=self._unfollowed,
                    )
                    if reply is not None:
                        writer.write(reply)
                        await writer.drain()  # a peer that never reads is timed out too
        except TimeoutError:
            log.debug("SIP TCP connection closed: no whole message in %s s", TCP_IDLE_S)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as exc:
            log.debug("SIP TCP connection closed: %s", exc)
        finally:
            self._conns.discard(task)
            left = self._per_address.pop(address, 1) - 1
            if left:
                self._per_address[address] = left
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
