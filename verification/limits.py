"""Rate-limit decisions (pure): which counters a request touches, and what a refusal says.

Fixed windows aligned to the clock: a counter per (limit, subject, window). Subjects are hashed
so phone numbers and keys never appear as Redis key names. The store counts all of a request's
counters in one atomic step, all or nothing, and fails closed: without Redis nothing is sent.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum

from sip_config.settings import Rate, VerificationSettings
from verification.errors import RateLimited
from verification.model import Phone
from verification.numbers import prefix_key


class LimitName(StrEnum):
    KEY_REQUESTS = "key"
    IP_REQUESTS = "ip"
    NUMBER_VERIFICATIONS = "number-verifications"
    NUMBER_SENDS = "number-sends"
    PREFIX_SENDS = "prefix-sends"


_PER_REQUEST = frozenset({LimitName.KEY_REQUESTS, LimitName.IP_REQUESTS})

_DESCRIPTIONS = {
    LimitName.KEY_REQUESTS: "requests for this API key",
    LimitName.IP_REQUESTS: "requests from this address",
    LimitName.NUMBER_VERIFICATIONS: "verifications for this number",
    LimitName.NUMBER_SENDS: "sends to this number",
    LimitName.PREFIX_SENDS: "sends to numbers with this prefix",
}


# Digests of API key ids and client addresses, which repeat on every request. Not of phone
# numbers: those are hashed each time rather than kept in memory.
_DIGESTS: dict[str, str] = {}
_DIGESTS_MAX = 4096


def _digest(subject: str, keep: bool) -> str:
    digest = _DIGESTS.get(subject) if keep else None
    if digest is None:
        digest = hashlib.sha256(subject.encode()).hexdigest()[:24]
        if keep:
            if len(_DIGESTS) >= _DIGESTS_MAX:
                _DIGESTS.clear()
            _DIGESTS[subject] = digest
    return digest


@dataclass(frozen=True, slots=True)
class LimitCheck:
    """One counter a request is counted against."""

    name: LimitName
    subject: str
    rate: Rate

    def key(self, now: float) -> str:
        window = int(now // self.rate.window_s)
        digest = _digest(self.subject, self.name in _PER_REQUEST)
        return f"{self.name}:{self.rate.window_s}:{digest}:{window}"

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


def request_checks(s: VerificationSettings, key_id: str, client_ip: str) -> list[LimitCheck]:
    """Counted on every API request."""
    return [
        LimitCheck(LimitName.KEY_REQUESTS, key_id, s.limit_key_requests),
        LimitCheck(LimitName.IP_REQUESTS, client_ip, s.limit_ip_requests),
    ]


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
