"""``serve`` reads the flow folder once: the flows ``check_clinic_line`` loaded and checked at
start are the ones the clinic line runs, whatever happens to the files after
(clinic_voice/cli.py, clinic_voice/wiring.py). No Redis, no SIP: the start is cut short
where the clinic line would begin to take calls."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Coroutine
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import uvloop
from aiohttp import web

from clinic_voice import app as app_module
from clinic_voice import cli
from clinic_voice import clinic_line as clinic_line_module
from clinic_voice.app import RUNTIME, Runtime
from clinic_voice.clinic_line import ClinicLine
from clinic_voice.metrics import Metrics
from sip_config.clock import SystemClock
from sip_config.settings import Settings
from voice.ivr.flow import FlowSet, Say

SHIPPED = Path(__file__).resolve().parents[2] / "ivr_flows"
EDITED = "Edited after the check, never checked."


class _Built(Exception):
    """serve built its app (it would start it now): the contexts are taken from there."""


class _Started(Exception):
    """The clinic line was about to start: enough of serve's start for this test."""

    def __init__(self, flowset: FlowSet) -> None:
        self.flowset = flowset


def test_the_flows_serve_checked_are_the_flows_it_runs(
    elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flows = elsewhere / "flows"
    shutil.copytree(SHIPPED, flows)
    monkeypatch.setenv("CLINIC_FLOWS_DIR", str(flows))
    monkeypatch.setenv("CLINIC_DATA_DIR", str(elsewhere / "data"))
    monkeypatch.setenv("CLINIC_HTTP_ADDR", "127.0.0.1:0")

    checked: list[FlowSet] = []
    real_check = clinic_line_module.check_clinic_line

    def check(settings: Settings) -> FlowSet:
        flowset = real_check(settings)
        checked.append(flowset)
        return flowset

    def run(main: Coroutine[Any, Any, None]) -> None:
        # Between the check and the start: a flow file is edited (an operator's editor, a
        # deploy) into one the check never saw; it still loads.
        menu = flows / "main_menu.yaml"
        text = menu.read_text(encoding="utf-8")
        menu.write_text(text.replace("Welcome to {clinic_name}.", EDITED), encoding="utf-8")
        asyncio.run(main)

    contexts: list[Any] = []

    def build_app(settings: Settings, **kw: Any) -> web.Application:
        contexts.extend(kw["extra_contexts"])
        raise _Built

    async def start(line: ClinicLine) -> None:
        raise _Started(line._flowset)

    monkeypatch.setattr(clinic_line_module, "check_clinic_line", check)
    monkeypatch.setattr(uvloop, "run", run)  # as cli.main calls it
    monkeypatch.setattr(app_module, "build_app", build_app)
    monkeypatch.setattr(ClinicLine, "start", start)
    with pytest.raises(_Built):
        cli.main(["serve"])
    assert EDITED in (flows / "main_menu.yaml").read_text(encoding="utf-8")

    async def clinic_line_starts() -> FlowSet:
        fake = web.Application()
        fake[RUNTIME] = cast(Runtime, SimpleNamespace(metrics=Metrics(), clock=SystemClock()))
        sip = contexts[-1](fake)  # wiring.extra_contexts: prompts, then the SIP part
        with pytest.raises(_Started) as started:
            await sip.__anext__()
        return started.value.flowset

    ran = asyncio.run(clinic_line_starts())
    texts = [n.text for f in ran.flows.values() for n in f.nodes.values() if isinstance(n, Say)]
    assert not any(EDITED in t for t in texts), "a flow edited after the check runs"
    assert len(checked) == 1 and ran is checked[0]


def _unsafe_triage(flows: Path, reasons: list[str]) -> None:
    """The shipped flows, with the U2 answers of ``reasons`` edited to end in a goodbye each
    (a caller short of breath at rest told goodbye, no human); schema and targets fine."""
    shutil.copytree(SHIPPED, flows)
    triage = flows / "triage.yaml"
    text = triage.read_text(encoding="utf-8").rstrip("\n") + "\n"
    for n, reason in enumerate(reasons):
        edited = text.replace(f"{reason}, goto: risk}}", f"{reason}, goto: goodbye_{n}}}")
        assert edited != text, reason
        text = edited + (
            f"  goodbye_{n}:\n"
            '    hangup: "Thank you for calling. Goodbye."\n'
            "    outcome: completed\n"
        )
    triage.write_text(text, encoding="utf-8")


def _serve_refused(
    elsewhere: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[str, list[str]]:
    """``serve`` on ``elsewhere/flows``: it must exit 2 before it starts anything. Its
    stderr, and what ``clinic-voice flow check`` prints for the same folder."""
    flows = elsewhere / "flows"
    monkeypatch.setenv("CLINIC_FLOWS_DIR", str(flows))
    monkeypatch.setenv("CLINIC_DATA_DIR", str(elsewhere / "data"))
    monkeypatch.setenv("CLINIC_HTTP_ADDR", "127.0.0.1:0")

    def run(main: Coroutine[Any, Any, None]) -> None:
        main.close()
        pytest.fail("serve started (data dir lock, Redis, SIP) with flows that fail flow check")

    monkeypatch.setattr(uvloop, "run", run)  # as cli.main calls it
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert not (elsewhere / "data").exists(), "the data dir was touched (serve.lock, keys)"
    assert cli.main(["flow", "check", str(flows)]) == 1
    return err, capsys.readouterr().out.splitlines()


def test_a_flow_that_does_not_load_is_refused_as_any_finding(
    elsewhere: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A schema error or an unknown target (a typo in a step name) was one line glued to the
    first finding, with no count, and every finding of a broken file after it."""
    monkeypatch.setattr(clinic_line_module, "FINDINGS_SHOWN", 1, raising=False)
    shutil.copytree(SHIPPED, elsewhere / "flows")
    flow = elsewhere / "flows" / "prescription.yaml"
    text = flow.read_text(encoding="utf-8")
    flow.write_text(text.replace("next: thanks", "next: thank").replace("8", "eight"), "utf-8")
    err, checked = _serve_refused(elsewhere, monkeypatch, capsys)
    assert len(checked) > 2, checked
    assert err.splitlines() == [
        f"clinic-voice: configuration error: CLINIC_FLOWS_DIR={str(elsewhere / 'flows')!r}: "
        f"{len(checked)} finding(s) of `clinic-voice flow check`; fix the flows and run it "
        "before the next start:",
        checked[0],
        f"... and {len(checked) - 1} more (`clinic-voice flow check` lists them all)",
    ], err


def test_a_schema_error_is_refused_with_every_other_finding(
    elsewhere: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A schema error hid the check's other findings from serve (flow check listed them):
    the practice manager fixed what serve named, restarted, and was refused again."""
    shutil.copytree(SHIPPED, elsewhere / "flows")
    flow = elsewhere / "flows" / "appointments.yaml"
    text = flow.read_text(encoding="utf-8")
    text = text.replace("url: scheduling", "url: https://example.org/book")  # a schema error
    text = text.replace("label: book, goto", "label: make a booking, goto")  # a label unheard
    flow.write_text(text, "utf-8")
    err, checked = _serve_refused(elsewhere, monkeypatch, capsys)
    assert len(checked) == 2, checked
    assert err.splitlines()[1:] == checked, err


def test_serve_refuses_flows_that_fail_flow_check(
    elsewhere: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, serve ran load_flows' schema and targets only: a triage edited so that a U2
    caller is told goodbye started and took calls. Now exit 2, as for a bad setting, with
    flow check's own lines."""
    _unsafe_triage(elsewhere / "flows", ["short of breath at rest"])
    err, checked = _serve_refused(elsewhere, monkeypatch, capsys)
    assert len(checked) == 1 and "call can end without a human at U2" in checked[0], checked
    assert checked[0].startswith(f"{elsewhere / 'flows' / 'triage.yaml'}:"), checked
    assert err.startswith("clinic-voice: configuration error: CLINIC_FLOWS_DIR="), err
    assert "`clinic-voice flow check`" in err, err
    assert err.splitlines()[1:] == checked, err


def test_a_refused_start_prints_the_first_findings_and_a_count(
    elsewhere: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(clinic_line_module, "FINDINGS_SHOWN", 1, raising=False)
    _unsafe_triage(elsewhere / "flows", ["short of breath at rest", "coughing up blood"])
    err, checked = _serve_refused(elsewhere, monkeypatch, capsys)
    assert len(checked) == 2, checked
    assert err.splitlines()[1:] == [
        checked[0],
        "... and 1 more (`clinic-voice flow check` lists them all)",
    ], err
