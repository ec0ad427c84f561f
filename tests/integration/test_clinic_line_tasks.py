"""The clinic line's background tasks on the test service's runtime (as serve's runs them,
real redis-server): which one's death stops the service, and which one's is only said."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path

import pytest

from clinic_voice import app as app_module
from clinic_voice.app import RUNTIME, Runtime
from clinic_voice.clinic_line import ClinicLine, check_clinic_line
from sip_config.settings import Settings
from tests.integration.conftest import StartService
from voice.ivr.flow import FlowSet
from voice.media.tts import PromptRenderer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]

SHIPPED = Path(__file__).resolve().parents[2] / "ivr_flows"
DEADLINE_S = 10.0


class DefectiveRenderer(PromptRenderer):
    async def prerender(
        self,
        texts: Iterable[str],
        *,
        voice: str = "en",
        rate_hz: int = 8000,
        background: bool = False,
    ) -> list[Path]:
        raise RuntimeError("a defect in the pre-rendering")


@pytest.fixture
def shipped_flows(tmp_path: Path) -> FlowSet:
    """The shipped flows, loaded and checked by a plain fixture, outside the event loop that
    no_blocking watches (~0.15 s of pure-Python CPU on a slow machine: on the loop it held
    a step 0.141 s; in a thread, the loop's steps wait for the GIL meanwhile)."""
    flows = Settings.from_env(
        {"CLINIC_DATA_DIR": str(tmp_path / "flows"), "CLINIC_FLOWS_DIR": str(SHIPPED)}
    )
    return check_clinic_line(flows)


async def test_a_defect_in_the_prompts_pre_rendering_is_said_and_the_service_goes_on(
    start_service: StartService,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    shipped_flows: FlowSet,
) -> None:
    """Before, it ended the task unseen ("warming" cleared, nothing logged until the task was
    collected, if ever). It is logged CRITICAL with its traceback now, and the service is
    not stopped for it: a prompt not cached is rendered when a call plays it."""
    stops: list[None] = []
    monkeypatch.setattr(app_module, "_sigterm_once_handled", lambda: stops.append(None))
    caplog.set_level(logging.INFO, logger="clinic_voice")
    api = await start_service()
    rt: Runtime = api.app[RUNTIME]
    rt.renderer = DefectiveRenderer(rt.settings.data_dir / "prompts")
    line = ClinicLine(rt.settings, rt, shipped_flows)
    await line.start()
    try:
        async with asyncio.timeout(DEADLINE_S):
            while not [r for r in caplog.records if r.levelno == logging.CRITICAL]:  # noqa: ASYNC110 (a deadline)
                await asyncio.sleep(0.02)
        [record] = [r for r in caplog.records if r.levelno == logging.CRITICAL]
        assert record.getMessage() == "the static prompts' pre-rendering failed: it no longer runs"
        assert record.exc_info is not None
        assert str(record.exc_info[1]) == "a defect in the pre-rendering"
        assert "prompts" not in rt.warming
        assert (await api.request("GET", "/readyz", key=None)).status == 200
        assert rt.failed == "" and stops == []
    finally:
        await line.stop()
