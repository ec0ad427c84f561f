"""What a call record tells the practice staff who work through the calls: the urgency in
words, and whether (and why) the clinic owes the caller a call back (voice/ivr/follow_up.py)."""

from __future__ import annotations

from typing import Any

import pytest

from voice.ivr.follow_up import call_back, for_staff, needs_call_back
from voice.ivr.triage import URGENCY_MEANING, Urgency


def _record(outcome: str, urgency: str | None = None, target: str | None = None) -> dict[str, Any]:
    triage: dict[str, Any] | None = (
        None if urgency is None else {"urgency": urgency, "reasons": [], "action": None}
    )
    return {"id": "c1", "outcome": outcome, "triage": triage, "transfer_target": target}


def test_every_urgency_has_its_meaning_in_words() -> None:
    assert set(URGENCY_MEANING) == set(Urgency)
    shown = for_staff(_record("transfer_failed", "U1"))
    assert shown["triage"]["urgency_meaning"] == "emergency: the emergency number now"
    assert shown["triage"]["urgency"] == "U1", "the level itself stays as it was"


@pytest.mark.parametrize(
    ("outcome", "urgency", "target", "needed"),
    [
        # An urgent caller nobody took, whatever the outcome says.
        ("transfer_failed", "U1", None, "urgent (U1) and no human took the call"),
        ("caller_hung_up", "U2", None, "urgent (U2) and no human took the call"),
        ("call_emergency+transfer_nurse", "U1", "sip:6100@pbx", None),
        # The outcomes the engine gives a call nobody took care of.
        ("message_left", "U4", None, "left a message for a call back: play it"),
        ("message_left", None, None, "left a message for a call back: play it"),
        ("transfer_unanswered", "U3", None, "the PBX reached nobody for the transfer"),
        ("transfer_unconfirmed", None, None, "no answer to the transfer"),
        ("hung_up_before_transfer", None, None, "hung up before the transfer went through"),
        ("out_of_hours_unheard", None, None, "heard none of the closed notice"),
        ("results_status_unheard", None, None, "may not have heard the results status"),
        ("cut_worker_lost", None, None, "the call was cut off (cut_worker_lost)"),
        ("cut_service_lost", "U5", None, "the call was cut off (cut_service_lost)"),
        # Taken care of: by a human, the scheduling system, or the caller was told.
        ("transfer_staff", None, "sip:6200@pbx", None),
        ("appointment_requested", None, None, None),
        ("same_day", "U3", None, None),
        ("self_care", "U5", None, None),
        ("results_status_given", None, None, None),
        ("out_of_hours", None, None, None),
        ("completed", None, None, None),
    ],
)
def test_a_call_back_is_owed_only_to_a_caller_nobody_took_care_of(
    outcome: str, urgency: str | None, target: str | None, needed: str | None
) -> None:
    why = call_back(_record(outcome, urgency, target))
    if needed is None:
        assert why is None
    else:
        assert why is not None and needed in why, why


def test_an_urgent_message_says_both_reasons_urgent_first() -> None:
    why = call_back(_record("transfer_failed", "U2"))
    assert why is not None and why.startswith("urgent (U2)") and "nobody could take" in why


def test_the_handled_mark_is_shown_beside_the_reason() -> None:
    shown = for_staff(_record("message_left"), "2027-01-15T08:00:00.000Z")
    assert shown["handled_at"] == "2027-01-15T08:00:00.000Z"
    assert shown["call_back"] is not None, "marking a call handled keeps why it needed one"
    assert for_staff(_record("message_left"))["handled_at"] is None


def test_a_call_needs_a_call_back_until_it_is_marked_handled() -> None:
    owed = _record("message_left")
    assert needs_call_back(owed, None)
    assert not needs_call_back(owed, "2026-12-07T08:00:00.000Z")
    assert not needs_call_back(_record("call_emergency+transfer_nurse", "U1", "sip:6100"), None)


def test_a_message_a_flow_recorded_is_work_for_staff_whatever_the_outcome() -> None:
    """A prescription renewal is a message left in the flow's own recording (outcome
    prescription_requested): no system receives it, only this service holds it. Before, it
    had no call_back, so ``GET /v1/calls?needs_call_back=true`` (the staff's list) never
    showed it, and the request waited for nobody."""
    record = {
        **_record("prescription_requested"),
        "values": {"dob": "01021960", "prescription_message": "c1-0123abcd.sealed"},
    }
    why = call_back(record)
    assert why == "left a recorded message (prescription_message): play it", why
    assert needs_call_back(record, None) and not needs_call_back(record, "2026-12-08T00:00Z")
    # A flow's recording that kept nothing (silence, a hang-up at the tone) leaves no work.
    assert call_back({**record, "values": {"dob": "01021960"}}) is None
    # A message after a failed transfer says so once, as message_left.
    left = {**_record("message_left"), "values": {"message": "c1-0123abcd.sealed"}}
    assert call_back(left) == "left a message for a call back: play it"
