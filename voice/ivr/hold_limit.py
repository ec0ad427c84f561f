"""How long the far end may keep a clinic-line call on hold (pure: times are passed in).

A caller who puts the bot on hold (a re-INVITE or UPDATE with a=sendonly, a=inactive or
c=0.0.0.0) is not on the line, but the call keeps one of the service's call slots (4 a SIP
worker). Before these limits only the 30-minute call limit (``session.MAX_CALL_S``) ended such
a call: 16 callers that answer the first prompt with a hold took every slot of 4 workers for
half an hour, and patients got busy. A hold is timed by the SIP signalling, not by RTP: a held
phone may send no audio, or music, and either is the same to the bot.

Three limits, each ending the call as cut by the service (``cut_held_too_long``):

- one hold, ``HOLD_MAX_S`` (5 minutes): a caller who stepped away to fetch a card, a
  medication list or the patient is back well within it; one who is not has left the phone.
- all holds of a call, ``HOLD_TOTAL_S`` (10 minutes): a caller who holds for 4 minutes,
  comes back for a moment and holds again would otherwise keep the slot for 30 minutes.
- holds in a call, ``HOLDS_MAX`` (10): the hold after the tenth ends the call at once. Every
  return from a hold runs the question's timeout again in full and plays the prompt again
  from its start, so holds of a second every few seconds would otherwise keep the call for
  30 minutes with almost no time on hold at all.

The same limits for every urgency: the bot can do nothing for a held caller, urgent or not,
and urgency is what the caller answered (a longer hold for U1/U2 would be had by answering
"yes" to a danger sign). A shorter one would cut an urgent caller who stepped away briefly
(to the patient, say) from the transfer to the nurse. The call's record keeps its triage, so
a cut urgent caller is called back first.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

HOLD_MAX_S = 300.0
HOLD_TOTAL_S = 600.0
HOLDS_MAX = 10
# The hang-up's cut (voice.ivr.engine.HangUp): the record's outcome is ``cut_held_too_long``.
HOLD_CUT = "held_too_long"


class HoldLimit(enum.StrEnum):
    """Which limit a hold ran into (for the log line)."""

    ONE = "one hold"
    TOTAL = "all holds"
    COUNT = "number of holds"


@dataclass(frozen=True, slots=True)
class Holds:
    """The far end's holds of one call so far; times on a monotonic clock."""

    count: int = 0  # holds begun
    spent_s: float = 0.0  # the holds that ended, together
    since: float | None = None  # the current hold's start; None: not on hold

    @property
    def held(self) -> bool:
        return self.since is not None

    def begin(self, now: float) -> Holds:
        """The call went on hold at ``now`` (again: no change)."""
        if self.since is not None:
            return self
        return replace(self, count=self.count + 1, since=now)

    def end(self, now: float) -> Holds:
        """The call came off hold at ``now`` (not on hold: no change)."""
        if self.since is None:
            return self
        return replace(self, spent_s=self.spent_s + max(0.0, now - self.since), since=None)

    def deadline(self) -> tuple[float, HoldLimit] | None:
        """When the current hold ends the call, and by which limit; None: not on hold."""
        if self.since is None:
            return None
        if self.count > HOLDS_MAX:
            return self.since, HoldLimit.COUNT
        left = HOLD_TOTAL_S - self.spent_s
        if left < HOLD_MAX_S:
            return self.since + max(0.0, left), HoldLimit.TOTAL
        return self.since + HOLD_MAX_S, HoldLimit.ONE
