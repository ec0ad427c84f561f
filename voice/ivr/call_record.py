"""The record of one clinic-line call as the API shows it (health data: never logged)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from voice.ivr.engine import CallRecord
from voice.sip.caller_identity import CallerIdentity


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class CallResult:
    """One finished call: who (and whether anyone vouches for the number), when, and what the
    engine recorded."""

    id: str
    caller: str
    called: str
    started_at: float
    ended_at: float
    record: CallRecord
    # Whether a trusted hop asserted ``caller`` or the caller only claimed it (its own From):
    # a call back to a claimed number may reach a stranger.
    caller_identity: CallerIdentity = CallerIdentity.CLAIMED

    def to_json(self) -> dict[str, Any]:
        r = self.record
        return {
            "id": self.id,
            "caller": self.caller,
            "caller_verified": self.caller_identity is CallerIdentity.ASSERTED,
            "called": self.called,
            "started_at": _iso(self.started_at),
            "ended_at": _iso(self.ended_at),
            "flow": r.flow,
            "path": [
                {
                    "flow": p.flow,
                    "node": p.node,
                    "input": p.input,
                    "value": p.value,
                    "confidence": p.confidence,
                }
                for p in r.path
            ],
            "values": dict(r.values),
            "triage": (
                {
                    "urgency": r.urgency.name,
                    "reasons": list(r.reasons),
                    "action": r.action.value if r.action else None,
                }
                if r.urgency is not None
                else None
            ),
            "transfer_target": r.transfer_target,
            "outcome": r.outcome,
        }
