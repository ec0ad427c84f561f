"""Rate-limit decisions (pure): which counters a request touches, and what a refusal says.

Limits are fixed windows aligned to the clock (a counter per limit, subject and window),
but for sends per number, a sliding window (see ``_SLIDING``). Subjects appear in Redis key
names only as a keyed MAC (:class:`SubjectDigest`), so phone numbers, addresses and keys can
be neither read nor guessed from them. The store counts all of a request's counters in one
atomic step, all or nothing, and fails closed: without Redis nothing is sent.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from enum import StrEnum

from sip_config.settings import Rate, VerificationSettings
from verification import keys
from verification.addresses import embedded_ipv4
from verification.errors import RateLimited
from verification.model import Phone
from verification.numbers import prefix_key


class LimitName(StrEnum):
    KEY_REQUESTS = "key"
    IP_REQUESTS = "ip"
    NUMBER_VERIFICATIONS = "number-verifications"
    NUMBER_SENDS = "number-sends"
    PREFIX_SENDS = "prefix-sends"
    AUTH_FAILURES = "auth-failures"


_PER_REQUEST = frozenset({LimitName.KEY_REQUESTS, LimitName.IP_REQUESTS, LimitName.AUTH_FAILURES})

# The limit that protects a patient's phone is a sliding window: a log of the last window's
# sends (a Redis sorted set), so that "5 sends per 10 minutes" holds in every 10 minutes,
# not per clock-aligned window (which allows 10 in a few seconds across a window's edge).
# The others stay fixed windows, one counter per window: a log costs Redis twice the
# commands of a counter, and every create counts five limits (BENCHMARKS.md).
_SLIDING = frozenset({LimitName.NUMBER_SENDS})

_DESCRIPTIONS = {
    LimitName.KEY_REQUESTS: "requests for this API key",
    LimitName.IP_REQUESTS: "requests from this address",
    LimitName.NUMBER_VERIFICATIONS: "verifications for this number",
    LimitName.NUMBER_SENDS: "sends to this number",
    LimitName.PREFIX_SENDS: "sends to numbers with this prefix",
    LimitName.AUTH_FAILURES: "wrong API keys from this address",
}


def digest_key(secret: bytes) -> bytes:
    """The key of :class:`SubjectDigest`, derived from CLINIC_SECRET."""
    return keys.derive(secret, "limit counter names v1")


class SubjectDigest:
    """What a limit's Redis key name holds for its subject: a keyed MAC, not the subject.

    An unkeyed hash of a phone number is reversed by hashing every number of the range (a
    Dutch mobile range in seconds): the key makes that impossible without the secret. Digests
    of API key ids and client addresses, which repeat on every request, are kept (bounded);
    phone numbers are digested each time rather than kept in memory.
    """

    def __init__(self, key: bytes, keep_max: int = 4096) -> None:
        # BLAKE2b's keyed mode is a MAC in one call: 0.5 us a subject against 1 us for an
        # HMAC-SHA256 (a create digests three); only the first 64 bytes of a key count.
        self._key = key[:64]
        self._kept: dict[str, str] = {}
        self._keep_max = keep_max

    def __call__(self, subject: str, keep: bool) -> str:
        digest = self._kept.get(subject) if keep else None
        if digest is None:
            digest = hashlib.blake2b(subject.encode(), key=self._key, digest_size=12).hexdigest()
            if keep:
                if len(self._kept) >= self._keep_max:
                    self._kept.clear()
                self._kept[subject] = digest
        return digest

    def kept(self, subject: str) -> bool:
        return subject in self._kept


@dataclass(frozen=True, slots=True)
class LimitCheck:
    """One counter a request is counted against; or, not ``counted``, only compared with its
    limit (a gate: refused while the counter is at its limit, and left as it is)."""

    name: LimitName
    subject: str
    rate: Rate
    counted: bool = True

    def key(self, now: float, digest: SubjectDigest) -> str:
        """The counter's name in its window (Redis adds a prefix)."""
        return self.counter(round(now * 1000), digest)[0]

    @property
    def sliding(self) -> bool:
        """Counted as a sliding window (a log of the last window's events), not a fixed one."""
        return self.name in _SLIDING

    def counter(self, now_ms: int, digest: SubjectDigest) -> tuple[str, int]:
        """The counter's name, and a time in milliseconds. A fixed window: the name in its
        window, and the milliseconds until that window ends (the counter lives that long, and
        a refusal's Retry-After says that long, not a whole window from the first request
        counted). A sliding window: one name for all time, and the window's length. From the
        clock in whole milliseconds (on every request: integer steps, no float dust)."""
        w = self.rate.window_s
        subject = digest(self.subject, self.name in _PER_REQUEST)
        if self.sliding:
            return f"{self.name.value}:{w}:{subject}", w * 1000
        window, into = divmod(now_ms, w * 1000)
        return f"{self.name.value}:{w}:{subject}:{window}", w * 1000 - into

    def describe(self) -> str:
        rate = f"limit {self.rate.count} per {self.rate.window_s} s"
        return f"too many {_DESCRIPTIONS[self.name]} ({rate})"


@dataclass(frozen=True, slots=True)
class LimitDecision:
    allowed: bool
    blocked_by: LimitCheck | None = None
    retry_after_s: int = 0

    def enforce(self) -> None:
        """Raise :class:`RateLimited` (a 429 with Retry-After) when refused."""
        if not self.allowed and self.blocked_by is not None:
            raise RateLimited(self.blocked_by.describe(), self.retry_after_s)


def address_subject(address: str, ipv6_prefix: int = 64) -> str:
    """What a client address is counted as: an IPv4 address is itself; an IPv6 address is its
    network of ``ipv6_prefix`` bits (CLINIC_LIMIT_IPV6_PREFIX), since one site (a home, a
    phone, a cloud VM) is handed at least a /64 and can use any of its 2^64 addresses: counted
    one by one, a guesser would take a new address for every guess and never meet a limit.
    An IPv4 host seen through IPv6 (:func:`~verification.addresses.embedded_ipv4`: mapped,
    NAT64, 6to4) is its IPv4 address: otherwise every IPv4 client of one NAT64 gateway would
    share one count. Anything else (a unix-socket peer) is counted as it is."""
    if ":" not in address:  # IPv4, the common case: no parsing on the hot path
        return address
    try:
        ip = ipaddress.IPv6Address(address)
    except ValueError:
        return address
    ipv4 = embedded_ipv4(ip)
    if ipv4 is not None:
        return str(ipv4)
    return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))


def request_checks(s: VerificationSettings, key_id: str, client_ip: str) -> list[LimitCheck]:
    """Counted on every API request with a right key; and the address's wrong keys, not
    counted but compared: an address that has used up its wrong keys is refused with a right
    key too, by every process (the counter is in Redis), or a 429 would only tell a wrong
    guess from a right one. In the same round trip as the rest: one more key read."""
    return [
        LimitCheck(LimitName.KEY_REQUESTS, key_id, s.limit_key_requests),
        LimitCheck(LimitName.IP_REQUESTS, client_ip, s.limit_ip_requests),
        LimitCheck(LimitName.AUTH_FAILURES, client_ip, s.limit_auth_failures, counted=False),
    ]


def auth_failure_checks(s: VerificationSettings, client_ip: str) -> list[LimitCheck]:
    """Counted when a request presents a key that is not one of the API keys."""
    return [LimitCheck(LimitName.AUTH_FAILURES, client_ip, s.limit_auth_failures)]


def creation_checks(s: VerificationSettings, phone: Phone) -> list[LimitCheck]:
    """Counted when a verification is created."""
    return [LimitCheck(LimitName.NUMBER_VERIFICATIONS, phone.e164, s.limit_number_verifications)]


def send_checks(s: VerificationSettings, phone: Phone) -> list[LimitCheck]:
    """Counted for every send (SMS, call) on any channel: the anti-pumping guard."""
    return [
        LimitCheck(LimitName.NUMBER_SENDS, phone.e164, s.limit_number_sends),
        LimitCheck(
            LimitName.PREFIX_SENDS, prefix_key(phone, s.limit_prefix_digits), s.limit_prefix_sends
        ),
    ]
