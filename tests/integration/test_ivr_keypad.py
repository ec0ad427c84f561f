"""Real calls into the clinic line, keypad only: a pjsua2 phone in its own process dials the
service's SIP front, is redirected to a worker, hears the prompts and presses keys (RFC 4733),
and the test reads the result from ``GET /v1/calls/{id}``. Transfers are real blind REFERs:
the caller's phone follows them and a second phone, the nurse, rings and answers.

One service serves the whole module (prompts render at start-up); each test takes the set of
call ids before its call and finds its own record as the one new id.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.integration.conftest import OpenApiCollector
from tests.peers.ivr_rig import NURSE_USER, ClinicLine, Phone, phones, running_clinic_line

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

CALL_S = 60.0  # one call, from dialling to the record, at most


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def line(
    tmp_path_factory: pytest.TempPathFactory,
    openapi_responses: OpenApiCollector,
    ivr_prompt_cache: Path,
) -> AsyncIterator[ClinicLine]:
    async with running_clinic_line(
        tmp_path_factory.mktemp("clinic"), openapi_responses, prompt_cache=ivr_prompt_cache
    ) as svc:
        yield svc


def steps(record: dict[str, Any], kind: str) -> list[tuple[str, str]]:
    """(node, value) of the path steps whose input is ``kind``."""
    return [(p["node"], p["value"]) for p in record["path"] if p["input"] == kind]


async def test_danger_sign_ends_in_u1_and_a_transfer_to_the_nurse(line: ClinicLine) -> None:
    before = await line.call_ids()
    async with phones() as started:
        nurse = await Phone.start(
            "nurse", "--port", str(line.nurse_port), "--answer", "--duration", "1"
        )
        started.append(nurse)
        # 4 (triage) while the welcome plays, 1 (yourself) during the triage intro, 1 (yes,
        # difficulty breathing) during the question: each key cuts its prompt short.
        caller = await Phone.start(
            "caller", "--call", line.uri("6000"), "--dtmf", "4@0.8,1@1.6,1@2.4"
        )
        started.append(caller)
        incoming = await nurse.wait_for("incoming", CALL_S)
        await caller.finish(CALL_S)
        await nurse.finish(10)

    assert caller.find("redirected") is not None, "the front's 302 was not followed"
    xfer = caller.find("transfer_request")
    assert xfer is not None, f"no REFER reached the caller: {caller.events}"
    assert f"sip:{NURSE_USER}@127.0.0.1:{line.nurse_port}" in xfer["to"]
    assert caller.find("confirmed", leg="xfer") is not None, "the nurse never answered"
    assert f"sip:{NURSE_USER}@" in incoming["to"]
    # The summary rides in the Refer-To, so the nurse's phone gets it on the INVITE.
    summary = incoming["headers"].get("X-Clinic-Summary", "")
    assert "urgency=U1" in summary and "difficulty breathing" in summary, incoming
    assert incoming["headers"].get("X-Clinic-Urgency") == "U1", incoming

    record = await line.new_record(before)
    assert record["triage"]["urgency"] == "U1", record["triage"]
    assert "difficulty breathing" in record["triage"]["reasons"]
    assert record["transfer_target"] == f"sip:{NURSE_USER}@127.0.0.1:{line.nurse_port}"
    assert record["outcome"] == "call_emergency+transfer_nurse"
    assert steps(record, "digit") == [("menu", "4"), ("for_whom", "1"), ("breathing", "1")]
    assert record["values"]["breathing"] == "yes"


async def test_silence_on_a_danger_sign_question_ends_with_the_nurse(line: ClinicLine) -> None:
    before = await line.call_ids()
    async with phones() as started:
        nurse = await Phone.start(
            "nurse", "--port", str(line.nurse_port), "--answer", "--duration", "1"
        )
        started.append(nurse)
        # 1 (yourself) cuts the triage intro short; then the breathing question gets silence.
        caller = await Phone.start(
            "caller", "--call", line.uri("6001"), "--dtmf", "1@0.5", "--timeout", "90"
        )
        started.append(caller)
        incoming = await nurse.wait_for("incoming", 90)
        await caller.finish(30)
        await nurse.finish(10)

    assert caller.find("confirmed", leg="xfer") is not None, f"no transfer: {caller.events}"
    assert "unclear answer" in incoming["headers"].get("X-Clinic-Summary", ""), incoming
    record = await line.new_record(before)
    triage = record["triage"]
    assert triage["urgency"] in {"U0", "U1", "U2"}, triage
    assert record["transfer_target"] == line.settings.ivr.nurse_uri
    assert record["outcome"] == "transfer_nurse"
    assert steps(record, "digit") == [("for_whom", "1")]
    assert len(steps(record, "noinput")) == 2, record["path"]
    assert {node for node, _ in steps(record, "noinput")} == {"breathing"}
    assert "breathing" not in record["values"], "silence must never be stored as an answer"


# 1 yourself; no to the five danger signs; 8 something else; 2 not limiting daily life;
# 5 no risk group: nothing raises the urgency, so the triage ends in self-care (U5).
NON_URGENT_KEYS = "1", "2", "2", "2", "2", "2", "8", "2", "5"


async def test_type_ahead_keys_during_the_first_prompt_run_a_full_non_urgent_triage(
    line: ClinicLine,
) -> None:
    before = await line.call_ids()
    # Every key is sent within 2.5 s of the answer, while the intro (about 10 s of speech)
    # would still be playing: each ask must take its answer from the type-ahead buffer.
    dtmf = ",".join(f"{key}@{0.5 + 0.25 * i:.2f}" for i, key in enumerate(NON_URGENT_KEYS))
    async with phones() as started:
        caller = await Phone.start("caller", "--call", line.uri("triage"), "--dtmf", dtmf)
        started.append(caller)
        await caller.finish(CALL_S)

    assert caller.find("transfer_request") is None, "a self-care call is not transferred"
    ended = caller.find("ended", leg="main")
    assert ended is not None
    record = await line.new_record(before)
    assert record["flow"] == "triage"
    assert record["triage"]["urgency"] in {"U4", "U5"}, record["triage"]
    assert record["outcome"] == "self_care"
    assert record["transfer_target"] is None
    digits = steps(record, "digit")
    assert [v for _, v in digits] == list(NON_URGENT_KEYS), record["path"]
    assert [n for n, _ in digits] == [
        "for_whom", "breathing", "chest", "conscious", "bleeding", "stroke", "complaint",
        "other_daily", "risk_adult",
    ]  # fmt: skip
    assert not steps(record, "noinput") and not steps(record, "nomatch"), record["path"]
    assert record["values"]["who"] == "self" and record["values"]["risk_group"] == "none"
