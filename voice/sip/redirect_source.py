"""The front's 302s not yet followed, by the address they were sent to (pure).

Each 302 of the redirect front (:mod:`voice.sip.front`) holds a slot on the worker it names
until the caller's INVITE arrives there, 2 s (up to 34 s while copies of the INVITE come).
A forger never needs its 302, so it can send INVITEs from an address it does not even own
(UDP): 16 of them and one copy of each a second held all 16 slots of 4 workers, and
patients got ``486 Busy Here`` from a line with nobody on it.

So a source address may hold at most :data:`MAX_UNFOLLOWED` slots for 302s it has not
followed yet; a new INVITE from a source at that cap gets ``503 Service Unavailable`` with
``Retry-After`` :data:`RETRY_AFTER_S`, and picks no slot. What is counted is a slot still
held (:meth:`voice.sip.front.Reservations.holds_inbound`): one whose call arrived (followed),
was cancelled or lapsed leaves the count at once. A real UA, PBX or trunk follows its 302
within its round trip to the worker (milliseconds), so behind one address (a PBX's, a
trunk's: all their callers share it) calls one after the other, however many, go through;
only a caller past the cap within one such round trip gets the 503, and its retry gets a
302 as soon as one of those before it arrived. A flood never follows, so it keeps at most
:data:`MAX_UNFOLLOWED` slots per address. Each 302 counts once: a copy of its INVITE (a
retransmission) is answered from the front's memory and counts for nothing here, and a new
transaction of the same Call-ID goes to the slot that Call-ID holds already.

The source is the datagram's or TCP peer's address, never a header (a Via says what the
sender likes); IPv6 by its /64 (:func:`source_of`), which one host commonly has for itself.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable

from sip_config.clock import Clock
from sip_config.settings import HostPort

log = logging.getLogger(__name__)

# Four: callers behind one SIP trunk or PBX all come from its one address, and that many
# new callers within one round trip (a burst of a trunk's calls; or callers whose 302s were
# lost, their slots held while copies of their INVITEs come, and the next ones behind the
# same address) all get through; two were too few for a trunk. What it costs: one forging
# address holds 4 slots, not all; with the default 16 (CLINIC_SIP_WORKERS 4, 4 calls each) a
# flood must own (TCP) or spoof (UDP) 4 addresses to fill them.
MAX_UNFOLLOWED = 4
# A source at its cap may try again once one of its slots is followed or lapses: a 302 not
# followed lapses 2 s after it (voice.sip.pool._REDIRECT_RESERVE_S), unless copies of its
# INVITE came. A trunk that honours it (RFC 3261 21.5.4) holds its next calls 2 s only.
RETRY_AFTER_S = 2
_LOG_EVERY_S = 60.0  # at most one line a minute about refused INVITEs (a flood would flood)
_IPV6_SOURCE_PREFIX = 64

# Whether the slot a 302 for this Call-ID to this worker took is still held (not followed).
Held = Callable[[str, HostPort], bool]


def source_of(host: str) -> str:
    """The source whose unfollowed 302s are counted together: an IPv4 address, an IPv6 /64
    (an IPv4 address mapped into IPv6 is that IPv4 address); what does not parse, as is."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])  # no zone: fe80::1%eth0
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, _IPV6_SOURCE_PREFIX), strict=False))
    return str(address)


class UnfollowedRedirects:
    """The Call-IDs each source got a 302 for whose slot is still held.

    ``held`` tells whether that slot is still held (the pool's reservations); ``clock``
    spaces the log lines. Memory: a Call-ID is forgotten once its slot is no longer held
    and every older one is forgotten too, so it holds at most the 302s of the longest hold
    (34 s), as the pool does.
    """

    def __init__(self, held: Held, clock: Clock, *, cap: int = MAX_UNFOLLOWED) -> None:
        self._held = held
        self._clock = clock
        self._cap = cap
        self._by_call: dict[str, tuple[str, HostPort]] = {}  # in the order of their 302s
        self._by_source: dict[str, list[str]] = {}
        self._refused = 0  # since the last log line
        self._log_at = 0.0

    def __len__(self) -> int:
        return len(self._by_call)

    def admits(self, source: str, call_id: str) -> bool:
        """Whether ``source`` may have a slot picked for a new INVITE ``call_id``: fewer than
        the cap of its 302s still unfollowed, or one of them is this Call-ID's (a new
        transaction of it goes to the slot it holds, and takes no other). A refusal is
        logged (once a minute at most)."""
        got = self._by_call.get(call_id)
        if got is not None and not self._held(call_id, got[1]):
            self._forget(call_id)  # its slot is no longer held: a 302 now takes a new one
        calls = self._by_source.get(source)
        if calls is not None:
            for old in [c for c in calls if not self._held(c, self._by_call[c][1])]:
                self._forget(old)
            calls = self._by_source.get(source)
        if calls is None or len(calls) < self._cap or call_id in calls:
            return True
        self._refused_one(source)
        return False

    def redirected(self, source: str, call_id: str, worker: HostPort) -> None:
        """``source`` got a 302 for ``call_id`` to ``worker`` (its slot held there), after
        :meth:`admits` admitted it."""
        got = self._by_call.get(call_id)
        if got is not None:
            if got[1] == worker:
                # The slot its first 302 took, held still when :meth:`admits` looked (the
                # pool gives a Call-ID the slot it holds): still that source's. Another
                # source that sends this Call-ID takes no slot, nor its copies' renewals.
                return
            self._forget(call_id)
        self._by_call[call_id] = (source, worker)
        self._by_source.setdefault(source, []).append(call_id)
        while self._by_call:  # the oldest ones whose slots are no longer held
            old, (_, where) = next(iter(self._by_call.items()))
            if self._held(old, where):
                break
            self._forget(old)

    def from_its_source(self, source: str, call_id: str) -> bool:
        """Whether a request of the call ``call_id`` from ``source`` comes from where its
        302 went (or no 302 of it is counted): only then may a copy of its INVITE keep its
        slot held, or its CANCEL free it (another source may be forging them)."""
        got = self._by_call.get(call_id)
        return got is None or got[0] == source

    def _forget(self, call_id: str) -> None:
        source, _ = self._by_call.pop(call_id)
        calls = self._by_source[source]
        calls.remove(call_id)
        if not calls:
            del self._by_source[source]

    def _refused_one(self, source: str) -> None:
        self._refused += 1
        now = self._clock.monotonic()
        if now < self._log_at:
            return
        log.warning(
            "SIP front: %d INVITE(s) refused with 503 since the previous line of this kind "
            "(one a minute at most): their source (the last: %s) held %d slot(s) for 302s "
            "it had not followed (a flood of forged INVITEs, or a trunk's burst)",
            self._refused,
            source,
            self._cap,
        )
        self._refused = 0
        self._log_at = now + _LOG_EVERY_S
