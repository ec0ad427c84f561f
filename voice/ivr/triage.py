"""MINDD-style urgency triage: levels, actions, risk groups and a state that only goes up.

Pure rules, no I/O. The questions and the urgency each answer implies are data in the triage
flow (``ivr_flows/triage.yaml``: a choice carries ``urgency:``/``reason:``/``risk:``); this
module holds what must not depend on a flow author: the order of the levels, which action
each level means, how risk groups raise urgency, and the invariant that urgency never goes
down during a call. ``flow check`` replays the same rules over every path of a flow.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Urgency(enum.IntEnum):
    """Urgency levels as in the Dutch NTS/MINDD scale: U0 is the most urgent."""

    U0 = 0  # life-threatening, resuscitation
    U1 = 1  # emergency: call the emergency number now
    U2 = 2  # urgent: a nurse or doctor now
    U3 = 3  # same day
    U4 = 4  # within 24 hours
    U5 = 5  # self-care with safety-net advice

    @classmethod
    def parse(cls, text: str) -> Urgency:
        """``"U2"`` -> :attr:`U2`; :class:`ValueError` for anything else."""
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown urgency {text!r} (expected U0..U5)") from None

    def at_least(self, other: Urgency) -> Urgency:
        """The more urgent of the two (the lower number)."""
        return self if self <= other else other


class TriageAction(enum.StrEnum):
    """What the call does for a given urgency."""

    CALL_EMERGENCY = "call_emergency+transfer_nurse"
    TRANSFER_NURSE = "transfer_nurse"
    SAME_DAY = "same_day"
    WITHIN_24H = "within_24h"
    SELF_CARE = "self_care"


# Each level in the words staff read in a call record (README: "The clinic line"), as this
# service uses it: U3 and U4 are "today" and "within 24 hours" here, the actions above.
URGENCY_MEANING: dict[Urgency, str] = {
    Urgency.U0: "life-threatening: resuscitation, emergency services now",
    Urgency.U1: "emergency: the emergency number now",
    Urgency.U2: "urgent: a nurse or doctor now",
    Urgency.U3: "see a doctor today",
    Urgency.U4: "see a doctor within 24 hours",
    Urgency.U5: "self-care advice, no appointment needed",
}

ACTION_FOR: dict[Urgency, TriageAction] = {
    Urgency.U0: TriageAction.CALL_EMERGENCY,
    Urgency.U1: TriageAction.CALL_EMERGENCY,
    Urgency.U2: TriageAction.TRANSFER_NURSE,
    Urgency.U3: TriageAction.SAME_DAY,
    Urgency.U4: TriageAction.WITHIN_24H,
    Urgency.U5: TriageAction.SELF_CARE,
}

# The most urgent level an action may serve: ending a U1 call with "same day" would lower its
# urgency, which the safety rules forbid; a nurse transfer serves U2 (U1 also needs the
# emergency advice of CALL_EMERGENCY).
MOST_URGENT_FOR: dict[TriageAction, Urgency] = {
    TriageAction.CALL_EMERGENCY: Urgency.U0,
    TriageAction.TRANSFER_NURSE: Urgency.U2,
    TriageAction.SAME_DAY: Urgency.U3,
    TriageAction.WITHIN_24H: Urgency.U4,
    TriageAction.SELF_CARE: Urgency.U5,
}


class RiskGroup(enum.StrEnum):
    """Patients for whom the same complaint is more urgent."""

    BABY_UNDER_3_MONTHS = "baby_under_3_months"
    ELDERLY = "elderly"
    PREGNANT = "pregnant"
    CHRONIC_ILLNESS = "chronic_illness"
    IMMUNOCOMPROMISED = "immunocompromised"


# A risk group makes the call at least this urgent, whatever the complaint: a baby under
# three months is never self-care or "within 24 hours" (fever or poor feeding can turn
# into sepsis within hours), the other groups are never self-care.
RISK_FLOOR: dict[RiskGroup, Urgency] = {
    RiskGroup.BABY_UNDER_3_MONTHS: Urgency.U3,
    RiskGroup.ELDERLY: Urgency.U4,
    RiskGroup.PREGNANT: Urgency.U4,
    RiskGroup.CHRONIC_ILLNESS: Urgency.U4,
    RiskGroup.IMMUNOCOMPROMISED: Urgency.U4,
}
# Besides the floor, a risk group moves a complaint one step up, but a risk group alone never
# makes a call more urgent than "a nurse now": emergencies come from danger signs only.
RISK_STEP_LIMIT = Urgency.U2


class TriageError(Exception):
    """A triage rule was broken; ``status`` is the SIP status the call ends with if unhandled."""

    status = 500


class UrgencyLoweredError(TriageError):
    """Something tried to make a call less urgent than it already was."""


def action_allows(action: TriageAction, urgency: Urgency) -> bool:
    """Whether ending a call at ``urgency`` with ``action`` keeps urgency where it is."""
    return urgency >= MOST_URGENT_FOR[action]


def with_risk(urgency: Urgency, risk_groups: frozenset[RiskGroup]) -> Urgency:
    """``urgency`` as it applies to a patient in ``risk_groups``."""
    if not risk_groups:
        return urgency
    stepped = urgency if urgency <= RISK_STEP_LIMIT else Urgency(urgency - 1)
    floor = min(RISK_FLOOR[g] for g in risk_groups)
    return stepped.at_least(floor)


@dataclass(frozen=True, slots=True)
class TriageState:
    """The urgency reached so far, why, and the patient's risk groups.

    Every change returns a new state; :meth:`raise_to` and :meth:`add_risk` never lower
    urgency (a less urgent value is a no-op) and each checks so with
    :func:`ensure_not_lowered`, the same guard the engine runs on every step.
    """

    urgency: Urgency = Urgency.U5
    reasons: tuple[str, ...] = ()
    risk_groups: frozenset[RiskGroup] = field(default_factory=frozenset)

    @property
    def action(self) -> TriageAction:
        """What the call should do at this urgency."""
        return ACTION_FOR[self.urgency]

    def raise_to(self, urgency: Urgency, reason: str) -> TriageState:
        """At least ``urgency`` (adjusted for risk groups), remembering ``reason``."""
        target = with_risk(urgency, self.risk_groups)
        if target >= self.urgency and reason in self.reasons:
            return self
        new = TriageState(
            urgency=self.urgency.at_least(target),
            reasons=self.reasons if reason in self.reasons else (*self.reasons, reason),
            risk_groups=self.risk_groups,
        )
        ensure_not_lowered(self, new)
        return new

    def note(self, reason: str) -> TriageState:
        """The same urgency with one more reason (e.g. "caller asked for a human")."""
        if reason in self.reasons:
            return self
        return TriageState(self.urgency, (*self.reasons, reason), self.risk_groups)

    def add_risk(self, group: RiskGroup) -> TriageState:
        """Record a risk group and apply it to the urgency reached so far."""
        groups = self.risk_groups | {group}
        reason = f"risk group: {group.value}"
        new = TriageState(
            urgency=self.urgency.at_least(with_risk(self.urgency, groups)),
            reasons=self.reasons if reason in self.reasons else (*self.reasons, reason),
            risk_groups=groups,
        )
        ensure_not_lowered(self, new)
        return new


def ensure_not_lowered(before: TriageState | None, after: TriageState | None) -> None:
    """Raise :class:`UrgencyLoweredError` if ``after`` is less urgent than ``before``."""
    if before is None:
        return
    if after is None or after.urgency > before.urgency:
        # Not the levels: the session logs this defect with the call's id, and a caller's
        # urgency is health data (README: "What the logs and the disk hold").
        lost = "was dropped" if after is None else "went down"
        raise UrgencyLoweredError(f"a call's urgency {lost}: a defect of the engine or a flow")
