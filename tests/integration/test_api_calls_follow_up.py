"""The call list as the practice staff read it next morning, over real HTTP against a real
redis-server: each call says its urgency in words and whether the clinic owes the caller a
call back, and why; records are saved through the service's own store."""

from __future__ import annotations

import time

import pytest

from clinic_voice.app import RUNTIME, Runtime
from tests.integration.conftest import CALLS_KEY, StartService
from voice.ivr.call_record import CallResult
from voice.ivr.engine import CallRecord
from voice.ivr.triage import TriageAction, Urgency

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]


def _result(
    call_id: str, outcome: str, urgency: Urgency | None, target: str | None, ago_s: float
) -> CallResult:
    action = None if urgency is None else TriageAction.CALL_EMERGENCY
    reasons = () if urgency is None else ("difficulty breathing",)
    record = CallRecord("triage", (), (), urgency, reasons, action, target, outcome)
    now = time.time()
    return CallResult(call_id, "+31612345678", "6000", now - ago_s, now - ago_s + 30, record)


async def test_the_list_says_the_urgency_in_words_and_who_needs_a_call_back(
    start_service: StartService,
) -> None:
    api = await start_service()
    api.key = CALLS_KEY
    rt: Runtime = api.app[RUNTIME]
    store = rt.need_call_store()
    # An urgent caller nobody could take; one the nurse took; a message after a busy desk.
    await store.save(_result("fu-urgent", "transfer_failed", Urgency.U1, None, 300))
    await store.save(_result("fu-taken", "call_emergency+transfer_nurse", Urgency.U1,
                             "sip:6100@127.0.0.1", 200))  # fmt: skip
    await store.save(_result("fu-message", "message_left", None, None, 100))

    listed = await api.request("GET", "/v1/calls?limit=10")
    assert listed.status == 200, listed.text
    calls = {c["id"]: c for c in listed.json["calls"]}
    urgent = calls["fu-urgent"]
    assert urgent["triage"]["urgency_meaning"] == "emergency: the emergency number now", urgent
    assert urgent["call_back"].startswith("urgent (U1) and no human took the call"), urgent
    assert calls["fu-taken"]["call_back"] is None, calls["fu-taken"]
    assert calls["fu-message"]["call_back"] == "left a message for a call back: play it"
    assert calls["fu-message"]["triage"] is None
    one = await api.request("GET", "/v1/calls/fu-urgent")
    assert one.status == 200 and one.json == urgent, one.text
