"""The clinic line's pre-rendering of the static prompts at start: a prompt that fails to
render is said, and the other flows' prompts are rendered all the same.

The renderer is a stand-in (what a render does is tests/integration/test_media_tts.py's)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import cast

import pytest

from clinic_voice.app import Runtime
from clinic_voice.clinic_line import ClinicLine, check_clinic_line
from clinic_voice.metrics import Metrics
from sip_config.clock import SystemClock
from sip_config.settings import Settings
from voice.ivr.flow import FlowParams
from voice.media.tts import PromptRenderer, TtsError

SHIPPED = Path(__file__).resolve().parents[2] / "ivr_flows"


class Renderer:
    """Fails the first flow's prerender as espeak-ng failing does (TtsError)."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    async def prerender(
        self, texts: Iterable[str], *, voice: str = "en", background: bool = False
    ) -> list[Path]:
        self.asked.append(len(list(texts)))
        if len(self.asked) == 1:
            raise TtsError("espeak-ng failed to synthesise (status -1)")
        return []


async def test_a_flow_whose_prompt_fails_to_render_leaves_the_others_rendered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, the first failure ended the pre-rendering unseen: no later flow's prompts
    were cached (each call then waited for its own render), and nothing was logged."""
    settings = Settings.from_env(
        {"CLINIC_DATA_DIR": str(tmp_path), "CLINIC_FLOWS_DIR": str(SHIPPED)}
    )
    flowset = check_clinic_line(settings)
    assert len(flowset.flows) > 1
    rt = Runtime(settings=settings, clock=SystemClock(), metrics=Metrics())
    rt.warming.add("prompts")
    line = ClinicLine(settings, rt, flowset)
    renderer = Renderer()
    params = FlowParams.from_settings(settings, speech_enabled=False)
    caplog.set_level(logging.INFO, logger="clinic_voice.clinic_line")
    await line._prerender_all(cast(PromptRenderer, renderer), params)
    assert len(renderer.asked) == len(flowset.flows)
    assert rt.warming == set()
    first = next(iter(flowset.flows))
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage() == (
        f"clinic line: pre-rendering flow {first}'s prompts failed (espeak-ng failed to "
        "synthesise (status -1)): its calls render them when they play them"
    )
    done = f"{sum(renderer.asked[1:])} static prompts of {len(flowset.flows)} flows cached"
    assert any(r.getMessage() == f"clinic line: {done}" for r in caplog.records)
