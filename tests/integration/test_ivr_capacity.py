"""The clinic line at capacity: the whole service with one SIP worker (4 call slots), real
pjsua2 phones in their own processes. A caller past the last free slot is turned away at once
with 486 Busy Here (never a ring or an answer) and counted in ``/metrics``, so an operator
sees callers being refused and can raise ``CLINIC_SIP_WORKERS``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import OpenApiCollector
from tests.peers.ivr_rig import Phone, phones, running_clinic_line

pytestmark = pytest.mark.integration

CALL_S = 20.0


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
        for i in range(4):
            caller = await Phone.start(f"caller{i}", "--call", line.uri("6000"), "--duration", "6")
            started.append(caller)
        for caller in started:
            await caller.wait_for("media", CALL_S)
        late = await Phone.start("late", "--call", line.uri("6000"), "--timeout", "10")
        started.append(late)
        refused = await late.wait_for("ended", 10, leg="main")
        metrics = await line.api.request("GET", "/metrics", key=None)
        for phone in started:
            await phone.finish(CALL_S)
    assert refused["status"] == 486, late.events
    assert late.find("media") is None and late.find("confirmed") is None, late.events
    assert metrics.status == 200, metrics.text
    assert 'clinic_calls_total{outcome="refused_busy"} 1\n' in metrics.text, metrics.text
