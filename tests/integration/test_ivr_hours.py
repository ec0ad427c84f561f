"""A real call out of opening hours: the caller hears the closed notice, and a 0 rings no desk.

The service runs with opening hours and today closed (``CLINIC_CLOSED_DATES`` holds
yesterday, today and tomorrow in UTC, so no midnight can open it during the test). A pjsua2
phone calls the main menu over SIP on loopback, presses 0 while the welcome plays, and
records what it hears; the staff phone, which would answer, must never ring.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from clinic_voice.app import RUNTIME
from tests.integration.conftest import OpenApiCollector
from tests.peers.ivr_rig import ClinicLine, Phone, pcm_8k, phones, running_clinic_line, steps
from voice.ivr.flow import Ask, FlowParams, load_flows
from voice.media.audio_match import rank
from voice.media.pcm import read_wav
from voice.media.tts import TtsError

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

CALL_S = 60.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def closed_line(
    tmp_path_factory: pytest.TempPathFactory,
    openapi_responses: OpenApiCollector,
    ivr_prompt_cache: Path,
) -> AsyncIterator[ClinicLine]:
    today = datetime.datetime.now(datetime.UTC).date()
    days = [today + datetime.timedelta(days=d) for d in (-1, 0, 1)]
    env = {
        "CLINIC_OPENING_HOURS": "mon-fri 08:00-17:00",
        "CLINIC_CLOSED_DATES": ",".join(d.isoformat() for d in days),
        "CLINIC_TIMEZONE": "UTC",
        "CLINIC_OUT_OF_HOURS_NUMBER": "088 123 45 67",
    }
    async with running_clinic_line(
        tmp_path_factory.mktemp("closed"), openapi_responses, env, prompt_cache=ivr_prompt_cache
    ) as svc:
        yield svc


async def test_a_call_out_of_hours_hears_the_closed_notice_and_its_0_rings_no_desk(
    closed_line: ClinicLine, tmp_path: Path
) -> None:
    line = closed_line
    renderer = line.app[RUNTIME].renderer
    assert renderer is not None
    values = FlowParams.from_settings(line.settings, speech_enabled=False).values("en")
    notice = values["closed_notice"]
    assert "out-of-hours GP service on 0 8 8, 1 2 3, 4 5, 6 7" in notice, notice
    flows = load_flows(line.settings.ivr.flows_dir)
    menu = flows.get("main_menu").nodes["menu"]
    assert isinstance(menu, Ask)
    references = {
        key: pcm_8k(read_wav(await renderer.render(text, voice="en")))
        for key, text in {
            "closed": notice,
            "open_menu": flows.get("main_menu").ask_prompt(menu, speech=False),
            "to_staff": "Connecting you to a member of staff.",
        }.items()
    }
    heard = tmp_path / "heard.wav"
    before = await line.call_ids()
    async with phones() as started:
        # Staff would answer at once: a ring there is a failure, not a slow test.
        staff = await Phone.start("staff", "--port", str(line.staff_port), "--answer")
        started.append(staff)
        # 0 while the welcome plays: it cuts the welcome and is taken at the menu.
        caller = await Phone.start(
            "caller", "--call", line.uri("6000"), "--dtmf", "0@0.5",
            "--record", str(heard), "--duration", "20",
        )  # fmt: skip
        started.append(caller)
        await caller.finish(CALL_S)
        assert staff.find("incoming") is None, staff.events
    assert caller.find("dtmf_sent", digit="0") is not None, caller.events
    assert caller.find("transfer_request") is None, caller.events

    record = await line.new_record(before)
    assert record["flow"] == "main_menu"
    assert steps(record, "branch") == [("hours", "welcome_closed")], record["path"]
    assert steps(record, "digit") == [("menu_closed", "0")], record["path"]
    assert steps(record, "closed") == [("menu_closed", "")], record["path"]
    assert record["transfer_target"] is None
    assert record["outcome"] == "caller_hung_up", record

    # What the caller heard after the 0: the notice (then the menu again), by its sound.
    head = pcm_8k(read_wav(heard))[: 8000 * 2 * 16]
    match = rank(head, references, 8000)
    assert match.key == "closed" and match.score > match.runner_up, match


async def test_a_closed_notice_the_caller_could_not_hear_is_not_recorded_as_told(
    closed_line: ClinicLine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Text to speech fails on every prompt that holds the closed notice. The welcome's is
    # skipped (a say); a 0 at the closed menu asks for staff: the notice and the question
    # fail twice (given up: the desk, closed, so the notice alone), and the notice alone
    # fails twice too. The call ends, and its record must not say the caller was told.
    line = closed_line
    renderer = line.app[RUNTIME].renderer
    assert renderer is not None
    notice = FlowParams.from_settings(line.settings, speech_enabled=False).values("en")[
        "closed_notice"
    ]
    render = renderer.render
    failed: list[bool] = []

    async def failing(text: str, **kw: Any) -> Path:
        if notice in text:
            failed.append(True)
            raise TtsError("espeak-ng failed to synthesise (status 1)")
        return await render(text, **kw)

    monkeypatch.setattr(renderer, "render", failing)
    before = await line.call_ids()
    async with phones() as started:
        caller = await Phone.start(
            "caller", "--call", line.uri("6000"), "--dtmf", "0@2", "--duration", "20"
        )
        started.append(caller)
        await caller.finish(CALL_S)
    assert caller.find("dtmf_sent", digit="0") is not None, caller.events

    record = await line.new_record(before)
    assert record["outcome"] == "out_of_hours_unheard", record
    assert steps(record, "digit") == [("menu_closed", "0")], record["path"]
    unheard = [p["node"] for p in record["path"] if p["input"] == "prompt_failed"]
    assert unheard == ["welcome_closed", *["menu_closed"] * 4], record["path"]
    assert len(failed) == 5, failed
