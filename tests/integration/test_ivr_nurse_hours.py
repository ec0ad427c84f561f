"""A real call out of the nurse's hours (``CLINIC_NURSE_HOURS``): the nurse is not rung.

The service runs with nurse hours on one weekday, three days from today in UTC (no midnight
during the test can open them), and the desk always open. A pjsua2 phone calls the main
menu over SIP on loopback and answers the triage as a U1 caller (difficulty breathing).
The nurse's phone, which would answer at once, must never ring and no REFER may name it:
the caller hears the failed transfer's safety words ("I could not connect you yet. If this
is an emergency, hang up and call 112 ...") straight away, and is put through to the staff
desk, as after any failed urgent nurse transfer (decision 12). The record says why.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from clinic_voice.app import RUNTIME
from tests.integration.conftest import OpenApiCollector
from tests.peers.ivr_rig import (
    NURSE_USER,
    STAFF_USER,
    ClinicLine,
    Phone,
    pcm_8k,
    phones,
    running_clinic_line,
    steps,
)
from voice.ivr.engine import NURSE_CLOSED
from voice.ivr.flow import SYSTEM_TEXTS, FlowParams, Say, Transfer, load_flows, render
from voice.ivr.opening_hours import DAYS
from voice.media.audio_match import rank
from voice.media.pcm import Pcm, read_wav

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

CALL_S = 60.0  # well below the 180 s an urgent caller may wait for a ringing nurse


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def nurse_away(
    tmp_path_factory: pytest.TempPathFactory,
    openapi_responses: OpenApiCollector,
    ivr_prompt_cache: Path,
) -> AsyncIterator[ClinicLine]:
    today = datetime.datetime.now(datetime.UTC).date()
    env = {
        "CLINIC_NURSE_HOURS": f"{DAYS[(today.weekday() + 3) % 7]} 08:00-17:00",
        "CLINIC_TIMEZONE": "UTC",
    }
    async with running_clinic_line(
        tmp_path_factory.mktemp("nurse-away"), openapi_responses, env, prompt_cache=ivr_prompt_cache
    ) as svc:
        yield svc


async def test_a_u1_caller_out_of_nurse_hours_hears_the_safety_words_and_no_nurse_is_rung(
    nurse_away: ClinicLine, tmp_path: Path
) -> None:
    line = nurse_away
    assert not line.settings.ivr.nurse_hours.is_open(datetime.datetime.now(datetime.UTC))
    renderer = line.app[RUNTIME].renderer
    assert renderer is not None
    values = FlowParams.from_settings(line.settings, speech_enabled=False).values("en")
    triage = load_flows(line.settings.ivr.flows_dir).get("triage")
    advice, connecting = triage.nodes["emergency"], triage.nodes["emergency_transfer"]
    assert isinstance(advice, Say) and isinstance(connecting, Transfer)
    texts = {
        "advice": render(advice.text, values),
        "connecting": render(connecting.prompt, values),
        "retry": render(SYSTEM_TEXTS["en"]["transfer_retry"], values),
        "failed_urgent": render(SYSTEM_TEXTS["en"]["transfer_failed_urgent"], values),
    }
    wavs = {key: read_wav(await renderer.render(text, voice="en")) for key, text in texts.items()}
    references = {key: pcm_8k(pcm) for key, pcm in wavs.items()}
    heard = tmp_path / "heard.wav"
    before = await line.call_ids()
    async with phones() as started:
        # The nurse would answer at once: a ring there is a failure, not a slow test.
        nurse = await Phone.start("nurse", "--port", str(line.nurse_port), "--answer")
        started.append(nurse)
        staff = await Phone.start(
            "staff", "--port", str(line.staff_port), "--answer", "--duration", "1"
        )
        started.append(staff)
        # 4 (triage) during the welcome, 1 (myself) during its intro, then 1 ("yes",
        # difficulty breathing) once that danger-sign question was heard: U1.
        caller = await Phone.start(
            "caller", "--call", line.uri("6000"), "--dtmf", "4@0.8,1@1.6", "--answers", "1",
            "--record", str(heard),
        )  # fmt: skip
        started.append(caller)
        await caller.finish(CALL_S)
        assert nurse.find("incoming") is None, f"the nurse was rung: {nurse.events}"
        incoming = await staff.wait_for("incoming", 1)
        await staff.finish(10)
    assert f"sip:{STAFF_USER}@" in incoming["to"], incoming
    refers = [e for e in caller.events if e["event"] == "transfer_request"]
    assert len(refers) == 1, f"one REFER, to the staff desk: {refers}"
    assert f"sip:{STAFF_USER}@127.0.0.1:{line.staff_port}" in refers[0]["to"], refers
    assert f"sip:{NURSE_USER}@" not in refers[0]["to"], refers

    record = await line.new_record(before)
    assert record["triage"]["urgency"] == "U1", record["triage"]
    assert steps(record, "transfer") == [
        ("emergency_transfer", NURSE_CLOSED),
        ("emergency_transfer", "ok"),
    ], record["path"]
    assert record["transfer_target"] == line.settings.ivr.staff_uri, record
    assert record["outcome"] == "transfer_staff", record

    # What the caller heard after "Connecting you to a nurse now.": the failed transfer's
    # safety words at once (no ring-out first), by their sound.
    yes = [e for e in caller.events if e["event"] == "dtmf_sent" and e["digit"] == "1"][-1]
    pcm = read_wav(heard)
    after = float(yes["at"]) + wavs["advice"].duration_s + wavs["connecting"].duration_s
    tail = pcm_8k(Pcm(pcm.samples[int(after * pcm.rate_hz) :], pcm.rate_hz))
    match = rank(tail, references, 8000)
    assert match.key == "retry" and match.score > match.runner_up, match
