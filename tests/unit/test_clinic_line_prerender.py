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
from sip_config.clock import FakeClock, SystemClock
from sip_config.settings import Settings
from voice.ivr.flow import FlowParams
from voice.media.tts import PromptRenderer, TtsError

SHIPPED = Path(__file__).resolve().parents[2] / "ivr_flows"


class Renderer:
    """Fails the first flow's prerender as espeak-ng failing does (TtsError), unless
    ``fail_first`` is False."""

    def __init__(self, *, fail_first: bool = True) -> None:
        self.asked: list[int] = []
        self.fail_first = fail_first
        self.evicted_at: list[float | None] = []

    async def prerender(
        self, texts: Iterable[str], *, voice: str = "en", background: bool = False
    ) -> list[Path]:
        self.asked.append(len(list(texts)))
        if self.fail_first and len(self.asked) == 1:
            raise TtsError("espeak-ng failed to synthesise (status -1)")
        return []

    async def evict_unused(self, now: float | None = None) -> int:
        self.evicted_at.append(now)
        return 3


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
    # A flow's prompts missing: nothing is evicted (the cache holds what the flows say).
    assert renderer.evicted_at == []


async def test_once_every_prompt_is_in_what_no_flow_says_is_evicted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The cache on disk would otherwise keep every prompt every flow ever said."""
    settings = Settings.from_env(
        {"CLINIC_DATA_DIR": str(tmp_path), "CLINIC_FLOWS_DIR": str(SHIPPED)}
    )
    flowset = check_clinic_line(settings)
    rt = Runtime(settings=settings, clock=FakeClock(1_800_000_000.0), metrics=Metrics())
    rt.warming.add("prompts")
    renderer = Renderer(fail_first=False)
    caplog.set_level(logging.INFO, logger="clinic_voice.clinic_line")
    await ClinicLine(settings, rt, flowset)._prerender_all(
        cast(PromptRenderer, renderer), FlowParams.from_settings(settings, speech_enabled=False)
    )
    assert len(renderer.asked) == len(flowset.flows)
    # Files' times are the wall clock's: the service's clock (a fake one here) is not.
    assert renderer.evicted_at == [None]
    assert rt.warming == set()
    assert "clinic line: 3 cached prompt(s) no flow says removed" in caplog.messages
