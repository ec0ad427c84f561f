"""What every delivery channel looks like to the dispatcher.

A channel sends one code to one phone and reports what happened through ``report``: ringing,
answered, delivered or undeliverable. It never decides what comes next; the rules do.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from verification.model import Channel, Phone
from verification.rules import DeliveryKind
from verification.wording import wording


@dataclass(frozen=True, slots=True)
class Delivery:
    """One send: the only place a plaintext code exists, and only in memory."""

    verification_id: str
    phone: Phone
    code: str
    locale: str
    clinic_name: str

    def __repr__(self) -> str:  # never print the code
        return f"Delivery({self.verification_id}, code=<{len(self.code)} digits>)"


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    kind: DeliveryKind
    detail: str = ""


Report = Callable[[DeliveryReport], Awaitable[None]]


class ChannelAdapter(Protocol):
    """A way to reach a phone."""

    @property
    def channel(self) -> Channel: ...

    def ready(self) -> bool:
        """Whether the channel can send now (for /readyz)."""
        ...

    async def send(self, delivery: Delivery, report: Report) -> None:
        """Send, reporting outcomes; return when the channel has nothing more to say.

        Must not raise for delivery failures: report ``undeliverable`` with a reason instead.
        """
        ...


def sms_text(delivery: Delivery) -> str:
    """The SMS body, in the verification's language: names the clinic, holds the code, holds
    no health data."""
    return wording(delivery.locale).sms_text(delivery.clinic_name, delivery.code)
