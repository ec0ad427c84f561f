"""Records, states and events of a phone verification.

Everything here is plain data: frozen dataclasses that the pure rules (:mod:`verification.rules`)
turn into new versions, and that the store serialises as JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    """Where a verification stands. Only ``pending`` can change."""

    PENDING = "pending"
    APPROVED = "approved"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELED = "canceled"

    @property
    def final(self) -> bool:
        """True for every status but ``pending``: the verification can no longer change."""
        return self is not Status.PENDING


class Channel(StrEnum):
    """How a code reaches the phone."""

    FLASHCALL = "flashcall"
    SMS = "sms"
    VOICE = "voice"


#: The default order of the fallback chain.
CHANNEL_ORDER: tuple[Channel, ...] = (Channel.FLASHCALL, Channel.SMS, Channel.VOICE)


class EventKind(StrEnum):
    """What happened to a verification; shown in ``events`` and sent to webhooks."""

    REQUESTED = "requested"
    SKIPPED = "skipped"  # a channel of the plan was passed over (e.g. flash call to a landline)
    DISPATCHED = "dispatched"
    RINGING = "ringing"
    ANSWERED = "answered"
    DELIVERED = "delivered"
    UNDELIVERABLE = "undeliverable"
    SEND_REFUSED = "send_refused"  # a limit stopped a send
    FALLBACK = "fallback"
    CHECK_FAILED = "check_failed"
    APPROVED = "approved"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELED = "canceled"


class NumberKind(StrEnum):
    """The phonenumbers number type, as far as the policy cares."""

    MOBILE = "mobile"
    FIXED_LINE = "fixed_line"
    FIXED_LINE_OR_MOBILE = "fixed_line_or_mobile"
    TOLL_FREE = "toll_free"
    PREMIUM_RATE = "premium_rate"
    SHARED_COST = "shared_cost"
    VOIP = "voip"
    PERSONAL_NUMBER = "personal_number"
    PAGER = "pager"
    UAN = "uan"
    VOICEMAIL = "voicemail"
    UNKNOWN = "unknown"

    @property
    def can_be_mobile(self) -> bool:
        return self in {NumberKind.MOBILE, NumberKind.FIXED_LINE_OR_MOBILE}


# Value -> member, for reading stored records: a dict lookup is several times faster than
# calling the enum, and a record is read on every API request (bench/api.py profile).
_STATUS = {m.value: m for m in Status}
_CHANNEL = {m.value: m for m in Channel}
_EVENT_KIND = {m.value: m for m in EventKind}
_NUMBER_KIND = {m.value: m for m in NumberKind}


@dataclass(frozen=True, slots=True)
class Phone:
    """A validated phone number."""

    e164: str  # "+31612345678"
    region: str  # "NL"
    country_code: int  # 31
    national_number: str  # "612345678" (no trunk prefix)
    kind: NumberKind


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of a verification's history. ``detail`` never holds a code."""

    kind: EventKind
    at: float
    channel: Channel | None = None
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        # Enum members as they are: every enum here is a StrEnum (a str holding its value),
        # which json and orjson write as that string, without an Enum.value look-up each.
        return {
            "kind": self.kind,
            "at": self.at,
            "channel": self.channel,
            "detail": self.detail,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Event:
        channel = d.get("channel")
        return cls(
            kind=_EVENT_KIND[d["kind"]],
            at=float(d["at"]),
            channel=_CHANNEL[channel] if channel else None,
            detail=str(d.get("detail", "")),
        )


@dataclass(frozen=True, slots=True)
class FlashCallInfo:
    """What an app needs to intercept the flash call (shown in the verification)."""

    cli_prefix: str  # E.164 with "+"
    code_length: int
    cli_filter: str  # a regex matching the caller-ID in the forms a phone shows it
    interception_timeout_s: int

    def to_json(self) -> dict[str, Any]:
        return {
            "cli_prefix": self.cli_prefix,
            "code_length": self.code_length,
            "cli_filter": self.cli_filter,
            "interception_timeout_s": self.interception_timeout_s,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FlashCallInfo:
        return cls(
            cli_prefix=str(d["cli_prefix"]),
            code_length=int(d["code_length"]),
            cli_filter=str(d["cli_filter"]),
            interception_timeout_s=int(d["interception_timeout_s"]),
        )


@dataclass(frozen=True, slots=True)
class Verification:
    """One verification: the whole state the rules need, and what the API shows."""

    id: str
    phone: Phone
    status: Status
    channels: tuple[Channel, ...]  # the plan, in order
    step: int  # index into channels of the current channel; len(channels) when exhausted
    attempts_used: int  # wrong checks, across every channel (never reset)
    sends: int  # sends, across every channel
    code_length: int
    created_at: float
    expires_at: float
    step_deadline: float | None  # when the current step falls back by itself
    code_hashes: tuple[str, ...] = ()  # HMACs of every code sent; never the codes
    events: tuple[Event, ...] = ()
    locale: str = "en"
    callback_url: str = ""
    client: str = ""  # which API key made it (a key id, not the key)
    flashcall: FlashCallInfo | None = None
    sending: bool = False  # a send of the current step is under way

    @property
    def channel(self) -> Channel | None:
        """The current channel, or None when the plan is exhausted."""
        return self.channels[self.step] if self.step < len(self.channels) else None

    def with_events(self, *events: Event, **changes: Any) -> Verification:
        return self.changed(events=self.events + events, **changes)

    def changed(self, **changes: Any) -> Verification:
        """A copy with ``changes``: ``dataclasses.replace`` without its generic field walk.

        A create or a check makes several of these; replace() cost about 5 us each, this
        about 3 us. Unknown names are refused as replace() refuses them.
        """
        unknown = changes.keys() - _VERIFICATION_FIELDS
        if unknown:
            raise TypeError(f"Verification has no field(s) {sorted(unknown)}")
        new = object.__new__(Verification)
        for name in _VERIFICATION_FIELDS_ORDER:
            object.__setattr__(new, name, changes[name] if name in changes else getattr(self, name))
        return new

    # -- serialisation (store) -----------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        p = self.phone
        return {
            "id": self.id,
            "phone": {
                "e164": p.e164,
                "region": p.region,
                "country_code": p.country_code,
                "national_number": p.national_number,
                "kind": p.kind,
            },
            "status": self.status,
            "channels": list(self.channels),
            "step": self.step,
            "attempts_used": self.attempts_used,
            "sends": self.sends,
            "code_length": self.code_length,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "step_deadline": self.step_deadline,
            "code_hashes": list(self.code_hashes),
            "events": [e.to_json() for e in self.events],
            "locale": self.locale,
            "callback_url": self.callback_url,
            "client": self.client,
            "flashcall": self.flashcall.to_json() if self.flashcall else None,
            "sending": self.sending,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Verification:
        p = d["phone"]
        return cls(
            id=str(d["id"]),
            phone=Phone(
                e164=str(p["e164"]),
                region=str(p["region"]),
                country_code=int(p["country_code"]),
                national_number=str(p["national_number"]),
                kind=_NUMBER_KIND[p["kind"]],
            ),
            status=_STATUS[d["status"]],
            channels=tuple(_CHANNEL[c] for c in d["channels"]),
            step=int(d["step"]),
            attempts_used=int(d["attempts_used"]),
            sends=int(d["sends"]),
            code_length=int(d["code_length"]),
            created_at=float(d["created_at"]),
            expires_at=float(d["expires_at"]),
            step_deadline=(
                float(d["step_deadline"]) if d.get("step_deadline") is not None else None
            ),
            code_hashes=tuple(str(h) for h in d.get("code_hashes", ())),
            events=tuple(Event.from_json(e) for e in d.get("events", ())),
            locale=str(d.get("locale", "en")),
            callback_url=str(d.get("callback_url", "")),
            client=str(d.get("client", "")),
            flashcall=FlashCallInfo.from_json(d["flashcall"]) if d.get("flashcall") else None,
            sending=bool(d.get("sending", False)),
        )


@dataclass(frozen=True, slots=True)
class Policy:
    """The rule parameters (from settings), passed to every rule."""

    ttl_s: int = 600
    max_checks: int = 5
    max_sends: int = 5
    step_timeout_s: dict[Channel, int] = field(
        default_factory=lambda: {Channel.FLASHCALL: 33, Channel.SMS: 120, Channel.VOICE: 120}
    )


_VERIFICATION_FIELDS_ORDER = tuple(f.name for f in fields(Verification))
_VERIFICATION_FIELDS = frozenset(_VERIFICATION_FIELDS_ORDER)
