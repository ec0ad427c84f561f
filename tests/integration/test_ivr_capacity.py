"""The clinic line at capacity: the whole service with one SIP worker (4 call slots), real
pjsua2 phones in their own processes. A caller past the last free slot is turned away at once
with 486 Busy Here (never a ring or an answer) and counted in ``/metrics``, so an operator
sees callers being refused and can raise ``CLINIC_SIP_WORKERS``; ``/metrics`` also shows the
slots in use and free, rising with the calls and back when they end, so the line filling up
is seen before the first caller is refused. Verification calls on the same worker leave
``CLINIC_SIP_CALLER_SLOTS`` slots to callers (sipp is the verified phones).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.integration.conftest import Api, OpenApiCollector
from tests.integration.test_sip_pool import sipp_uas
from tests.integration.test_verify_sip_flash import create, event_types, wait_until_settled
from tests.peers.ivr_rig import Phone, phones, running_clinic_line
from tests.peers.sms_gateway import SmsGateway
from tests.unit.test_metrics import parse

pytestmark = pytest.mark.integration

CALL_S = 20.0
# The verification kept from the callers' slot waits the pool's 2 s for one, then falls back.
SETTLE_S = 15.0
# A call's slot is free again once its worker reports the hang-up: well under a second.
SLOTS_BACK_S = 10.0


async def sip_gauges(api: Api) -> dict[tuple[str, str], float]:
    """The SIP pool's gauges in ``/metrics``: (name, state label) -> value."""
    metrics = await api.request("GET", "/metrics", key=None)
    assert metrics.status == 200, metrics.text
    return {
        (name, labels.get("state", "")): value
        for name, labels, value in parse(metrics.text)
        if name.startswith("clinic_sip_") and not name.endswith("_total")  # not the counters
    }


async def test_a_caller_past_the_last_slot_gets_486_and_is_counted(
    tmp_path: Path, openapi_responses: OpenApiCollector, ivr_prompt_cache: Path
) -> None:
    env = {"CLINIC_SIP_WORKERS": "1"}
    async with (
        running_clinic_line(
            tmp_path, openapi_responses, env, prompt_cache=ivr_prompt_cache
        ) as line,
        phones() as started,
    ):
        kept = float(line.settings.sip.caller_slots)
        idle = {
            ("clinic_sip_workers", "up"): 1,
            ("clinic_sip_workers", "unregistered"): 0,
            ("clinic_sip_workers", "starting"): 0,
            ("clinic_sip_workers", "stopping"): 0,
            ("clinic_sip_workers", "down"): 0,
            ("clinic_sip_slots", "in_use"): 0,
            ("clinic_sip_slots", "reserved"): 0,
            ("clinic_sip_slots", "free"): 4,
            ("clinic_sip_slots_kept_for_callers", ""): kept,
        }
        assert await sip_gauges(line.api) == idle
        for i in range(4):
            caller = await Phone.start(f"caller{i}", "--call", line.uri("6000"), "--duration", "6")
            started.append(caller)
        for caller in started:
            await caller.wait_for("media", CALL_S)
        full = await sip_gauges(line.api)
        late = await Phone.start("late", "--call", line.uri("6000"), "--timeout", "10")
        started.append(late)
        refused = await late.wait_for("ended", 10, leg="main")
        metrics = await line.api.request("GET", "/metrics", key=None)
        for phone in started:
            await phone.finish(CALL_S)
        loop = asyncio.get_running_loop()
        end = loop.time() + SLOTS_BACK_S
        while (after := await sip_gauges(line.api)) != idle:
            if loop.time() > end:
                pytest.fail(f"the slots did not come back within {SLOTS_BACK_S} s: {after}")
            await asyncio.sleep(0.1)
    assert full == idle | {("clinic_sip_slots", "in_use"): 4, ("clinic_sip_slots", "free"): 0}
    assert refused["status"] == 486, late.events
    assert late.find("media") is None and late.find("confirmed") is None, late.events
    assert metrics.status == 200, metrics.text
    assert 'clinic_calls_total{outcome="refused_busy"} 1\n' in metrics.text, metrics.text


@pytest.mark.parametrize(
    "caller_slots", ["1", "0"], ids=["a slot kept for callers", "first come, first served"]
)
async def test_verification_calls_leave_the_kept_slot_to_a_patient(
    tmp_path: Path,
    openapi_responses: OpenApiCollector,
    ivr_prompt_cache: Path,
    sms_gateway: SmsGateway,
    caller_slots: str,
) -> None:
    """The review's case: an app verifies four numbers by voice code at once. With every slot
    taken, a patient then phoning the clinic got 486 Busy Here. With one slot kept for
    callers, three calls ring, the fourth verification falls back to SMS (undeliverable: no
    SIP capacity) and the patient is answered; with 0 the old first come, first served."""
    phones_n = [f"+4479111234{i:02d}" for i in range(4)]
    rung = 4 - int(caller_slots)  # the calls the worker's 4 slots give the verifications
    async with sipp_uas("sipp_uas_ring.xml", tmp_path, calls=4) as verified:
        env = {
            "CLINIC_SIP_WORKERS": "1",
            "CLINIC_SIP_CALLER_SLOTS": caller_slots,
            "CLINIC_SIP_ROUTE": f"sip:{{e164}}@127.0.0.1:{verified.port}",
            "CLINIC_SMS_HTTP_URL": sms_gateway.url,
        }
        async with (
            running_clinic_line(
                tmp_path, openapi_responses, env, prompt_cache=ivr_prompt_cache
            ) as line,
            phones() as started,
        ):
            pool = line.pool
            vids = await asyncio.gather(
                *(create(line.api, phone=p, method="voice", fallback=["sms"]) for p in phones_n)
            )
            settled = {
                phone: await wait_until_settled(line.api, vid, {"ringing", "delivered"}, SETTLE_S)
                for phone, vid in zip(phones_n, vids, strict=True)
            }
            # A patient phones the clinic while the verification calls ring.
            patient = await Phone.start(
                "patient", "--call", line.uri("6000"), "--duration", "2", "--timeout", "15"
            )
            started.append(patient)
            if caller_slots == "0":
                refused = await patient.wait_for("ended", 10, leg="main")
                assert refused["status"] == 486, patient.events
                assert patient.find("confirmed") is None, patient.events
            else:
                await patient.wait_for("media", CALL_S)
            await patient.finish(CALL_S)
            stats = pool.stats()

    ringing = [v for v in settled.values() if event_types(v)[-1] == "ringing"]
    kept = [p for p, v in settled.items() if v not in ringing]
    assert len(ringing) == rung, [event_types(v) for v in settled.values()]
    assert len(verified.received("INVITE")) == rung
    for v in (settled[p] for p in kept):
        assert event_types(v) == [
            "requested",
            "dispatched",
            "undeliverable",
            "fallback",
            "dispatched",
            "delivered",
        ], v
        (undeliverable,) = (e for e in v["events"] if e["type"] == "undeliverable")
        assert undeliverable["detail"] == (
            "no SIP capacity: the free call slots are kept for callers (CLINIC_SIP_CALLER_SLOTS)"
        ), v
        assert v["channel"] == "sms", v
    assert [sms.to for sms in sms_gateway.received] == kept
    assert stats["kept_for_callers"] == len(kept)
    assert stats["refused_busy"] == (1 if caller_slots == "0" else 0)
