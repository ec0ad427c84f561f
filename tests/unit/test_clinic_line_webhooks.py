"""An unset scheduling webhook, or one in plain HTTP over a network: one warning at start
naming the setting, not one per call."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from clinic_voice.app import Runtime
from clinic_voice.clinic_line import ClinicLine, check_clinic_line
from sip_config.clock import SystemClock
from sip_config.settings import Settings
from voice.ivr.flow import load_flows
from voice.ivr.webhook import in_clear, unconfigured

SHIPPED = Path(__file__).resolve().parents[2] / "ivr_flows"


def test_the_flows_with_a_scheduling_step_are_named() -> None:
    flows = load_flows(SHIPPED)
    assert unconfigured(flows, {"scheduling": ""}) == {
        "scheduling": ("appointments", "results", "triage")
    }
    assert unconfigured(flows, {"scheduling": "https://scheduling.example/hook"}) == {}


def _line(tmp_path: Path, url: str) -> ClinicLine:
    env = {
        "CLINIC_DATA_DIR": str(tmp_path),
        "CLINIC_FLOWS_DIR": str(SHIPPED),
        "CLINIC_SCHEDULING_WEBHOOK": url,
        # A key of its own (else a warning at start: tests/integration/test_webhook_keys.py).
        "CLINIC_SCHEDULING_WEBHOOK_SECRET": "s" * 40,
    }
    rt = cast(Runtime, SimpleNamespace(http_client=None, clock=SystemClock()))
    settings = Settings.from_env(env)
    return ClinicLine.load(settings, rt, check_clinic_line(settings))


def test_an_unset_webhook_is_warned_once_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="clinic_voice.clinic_line")
    line = _line(tmp_path, "")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        "CLINIC_SCHEDULING_WEBHOOK is not set: the webhook steps of flows appointments, "
        "results, triage take their failure branch"
    ]
    caplog.clear()
    for _ in range(3):  # three callers
        assert asyncio.run(line._post_webhook("scheduling", {}, 1.0)) is None
    assert [r.levelno for r in caplog.records] == [logging.DEBUG] * 3


def test_a_set_webhook_is_not_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="clinic_voice.clinic_line")
    _line(tmp_path, "https://scheduling.example/hook")
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("https://scheduling.example/hook", None),
        ("http://scheduling.lan:8080/hook", "scheduling.lan"),
        ("HTTP://Scheduling.LAN/hook", "scheduling.lan"),
        ("http://10.20.0.5/hook", "10.20.0.5"),
        ("http://[2001:db8::5]:8080/hook", "2001:db8::5"),
        ("http://127.0.0.1:8080/hook", None),  # loopback: a local proxy that adds TLS
        ("http://127.3.2.1/hook", None),
        ("http://[::1]:8080/hook", None),
        ("http://localhost:8080/hook", None),
        ("http://scheduling.localhost/hook", None),  # RFC 6761: loopback too
        ("http://localhost.example/hook", "localhost.example"),
        ("", None),
    ],
)
def test_which_urls_post_in_clear(url: str, host: str | None) -> None:
    assert in_clear(url) == host


def test_an_http_webhook_over_the_network_is_warned_once_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A review found it taken silently: its POSTs hold the caller's date of birth, patient
    # number, complaint and number. The URL may hold a token: only its host is logged.
    caplog.set_level(logging.DEBUG, logger="clinic_voice.clinic_line")
    _line(tmp_path, "http://scheduling.lan:8080/hook?token=s3cr3t-t0ken")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        "CLINIC_SCHEDULING_WEBHOOK is an http:// URL to scheduling.lan: the callers' details "
        "and numbers the flows post there cross the network unencrypted; use https:// (or a "
        "loopback proxy that adds TLS)"
    ]


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/hook", "http://localhost:8080/hook"])
def test_an_http_webhook_on_loopback_is_not_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, url: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="clinic_voice.clinic_line")
    _line(tmp_path, url)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
