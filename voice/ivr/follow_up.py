"""What a finished call leaves the practice staff to do, read from its record (pure).

Staff working through ``GET /v1/calls`` get each call's urgency in words and whether the
clinic owes the caller a call back, and why, so that a call nobody took is not lost among
the calls a human or the scheduling system took care of. Derived when a record is read, not
stored: records saved before these fields existed show them too, and the words can change
without touching a sealed record.
"""

from __future__ import annotations

import re
from typing import Any

from voice.ivr.engine import (
    CLOSED_OUTCOME,
    MESSAGE_OUTCOME,
    OUT_OF_HOURS_UNHEARD_OUTCOME,
    UNANSWERED_OUTCOME,
    UNCONFIRMED_OUTCOME,
)
from voice.ivr.triage import URGENCY_MEANING, Urgency

# The outcomes the engine gives a call that nobody took care of, and why it needs a call back.
CALL_BACK_FOR: dict[str, str] = {
    MESSAGE_OUTCOME: "left a message for a call back: play it",
    "transfer_failed": "asked for a human, nobody could take the call, and no message was kept",
    UNANSWERED_OUTCOME: "the PBX reached nobody for the transfer",
    UNCONFIRMED_OUTCOME: "no answer to the transfer: the caller was told the clinic will call back",
    "hung_up_before_transfer": "hung up before the transfer went through",
    OUT_OF_HOURS_UNHEARD_OUTCOME: "heard none of the closed notice",
    "results_status_unheard": "may not have heard the results status",
    CLOSED_OUTCOME: "the line closed during the call (the service stopped)",
}
# Every other outcome the service itself ends a call with (cut_worker_lost, cut_too_long,
# cut_service_lost, ...): the caller's business may be unfinished.
CUT_PREFIX = "cut_"
CUT_REASON = "the call was cut off ({})"
# A caller at this urgency or more urgent whom no human took (no transfer target) is called
# back whatever the outcome: the safety rules promise an urgent caller a human.
URGENT = Urgency.U2
URGENT_REASON = "urgent ({}) and no human took the call"
# A message a flow's own record step kept (a prescription renewal): nothing but this service
# holds it, so whatever the flow's outcome, staff have it to play and act on. A value is
# one when it is a voicemail file's name (voice/ivr/voicemail.py: NAME, the same form).
MESSAGE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}-[0-9a-f]{8}\.sealed")
RECORDED_REASON = "left a recorded message ({}): play it"


def call_back(record: dict[str, Any]) -> str | None:
    """Why the clinic should call this caller back, in words ("; " between reasons), or None
    when a human or the flow took care of the call."""
    reasons: list[str] = []
    triage = record.get("triage")
    urgency = _urgency(triage)
    if urgency is not None and urgency <= URGENT and not record.get("transfer_target"):
        reasons.append(URGENT_REASON.format(urgency.name))
    outcome = str(record.get("outcome", ""))
    if outcome in CALL_BACK_FOR:
        reasons.append(CALL_BACK_FOR[outcome])
    elif outcome.startswith(CUT_PREFIX):
        reasons.append(CUT_REASON.format(outcome))
    if outcome != MESSAGE_OUTCOME:
        values = record.get("values")
        for key, value in values.items() if isinstance(values, dict) else ():
            if isinstance(value, str) and MESSAGE_NAME.fullmatch(value):
                reasons.append(RECORDED_REASON.format(key))
    return "; ".join(reasons) or None


def needs_call_back(record: dict[str, Any], handled_at: str | None) -> bool:
    """Whether the clinic still owes this caller a call back: a reason (:func:`call_back`)
    and staff have not marked the call handled (``GET /v1/calls?needs_call_back=true``)."""
    return handled_at is None and call_back(record) is not None


def for_staff(record: dict[str, Any], handled_at: str | None = None) -> dict[str, Any]:
    """The record as ``GET /v1/calls`` shows it: the urgency's meaning in the triage,
    ``call_back``, and ``handled_at`` (when staff marked it handled, or None)."""
    shown = dict(record)
    triage = record.get("triage")
    urgency = _urgency(triage)
    if isinstance(triage, dict) and urgency is not None:
        shown["triage"] = {**triage, "urgency_meaning": URGENCY_MEANING[urgency]}
    shown["call_back"] = call_back(record)
    shown["handled_at"] = handled_at
    return shown


def _urgency(triage: object) -> Urgency | None:
    if not isinstance(triage, dict):
        return None
    try:
        return Urgency.parse(str(triage.get("urgency", "")))
    except ValueError:
        return None
