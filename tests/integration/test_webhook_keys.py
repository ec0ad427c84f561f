"""Which key signs which webhook: CLINIC_SECRET also keys the codes' hashes and opens the call
records, so its receivers should be given keys of their own (CLINIC_WEBHOOK_SECRET for the
verification webhooks, CLINIC_SCHEDULING_WEBHOOK_SECRET for the appointment requests)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from clinic_voice.app import Runtime
from clinic_voice.clinic_line import ClinicLine, check_clinic_line
from sip_config.clock import SystemClock
from sip_config.settings import Settings
from tests.integration.conftest import SECRET, StartService, read_code
from tests.peers.sms_gateway import SmsGateway
from tests.peers.webhook_receiver import WebhookReceiver
from verification.http_client import HttpClient
from verification.webhooks import SIGNATURE_HEADER, verify

pytestmark = pytest.mark.integration

HOOK_KEY = "h" * 40
SCHEDULING_KEY = "s" * 40
FLOWS = Path(__file__).resolve().parents[2] / "ivr_flows"
SHARED_KEY_WARNING = "webhooks are signed with CLINIC_SECRET"


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and text in r.getMessage()
    ]


async def test_a_webhook_key_of_its_own_signs_the_verification_webhooks(
    start_service: StartService,
    sms_gateway: SmsGateway,
    webhook_receiver: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    api = await start_service(
        {"CLINIC_WEBHOOK_URL": webhook_receiver.url(), "CLINIC_WEBHOOK_SECRET": HOOK_KEY}
    )
    vid = (await api.create()).json["id"]
    assert (await api.check(vid, await read_code(sms_gateway))).json["status"] == "approved"
    hooks = await webhook_receiver.wait_until("4 events", lambda got: len(got) >= 4)
    for hook in hooks:
        assert verify(HOOK_KEY.encode(), hook.headers[SIGNATURE_HEADER], hook.body)
        # A receiver that checks them needs, and learns, nothing of the service secret.
        assert not verify(SECRET.encode(), hook.headers[SIGNATURE_HEADER], hook.body)
    assert _warnings(caplog, SHARED_KEY_WARNING) == []


async def test_webhooks_signed_with_the_service_secret_are_warned_about_once(
    start_service: StartService,
    sms_gateway: SmsGateway,
    webhook_receiver: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    api = await start_service({"CLINIC_WEBHOOK_URL": webhook_receiver.url()})
    vid = (await api.create()).json["id"]
    assert (await api.check(vid, await read_code(sms_gateway))).json["status"] == "approved"
    hooks = await webhook_receiver.wait_until("4 events", lambda got: len(got) >= 4)
    assert all(verify(SECRET.encode(), h.headers[SIGNATURE_HEADER], h.body) for h in hooks)
    assert len(_warnings(caplog, SHARED_KEY_WARNING)) == 1, caplog.text


def _line(tmp_path: Path, env: dict[str, str], client: HttpClient) -> ClinicLine:
    settings = Settings.from_env(
        {"CLINIC_DATA_DIR": str(tmp_path), "CLINIC_FLOWS_DIR": str(FLOWS), **env}
    )
    rt = SimpleNamespace(http_client=client, clock=SystemClock(), secret=SECRET.encode())
    return ClinicLine.load(settings, cast(Runtime, rt), check_clinic_line(settings))


async def test_the_scheduling_webhook_is_signed_with_its_own_key(
    tmp_path: Path, webhook_receiver: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    client = HttpClient()
    try:
        line = _line(
            tmp_path,
            {
                "CLINIC_SCHEDULING_WEBHOOK": webhook_receiver.url("/book"),
                "CLINIC_SCHEDULING_WEBHOOK_SECRET": SCHEDULING_KEY,
                "CLINIC_WEBHOOK_SECRET": HOOK_KEY,
            },
            client,
        )
        assert await line._post_webhook("scheduling", {"request": "appointment"}, 5.0) == {}
    finally:
        await client.close()
    (hook,) = webhook_receiver.received
    assert verify(SCHEDULING_KEY.encode(), hook.headers[SIGNATURE_HEADER], hook.body)
    # An app that checks the verification webhooks cannot make an appointment request.
    assert not verify(HOOK_KEY.encode(), hook.headers[SIGNATURE_HEADER], hook.body)
    assert not verify(SECRET.encode(), hook.headers[SIGNATURE_HEADER], hook.body)
    assert _warnings(caplog, "CLINIC_SCHEDULING_WEBHOOK") == []


@pytest.mark.parametrize(
    "env",
    [
        {},  # both unset: CLINIC_SECRET signs both
        {"CLINIC_WEBHOOK_SECRET": HOOK_KEY, "CLINIC_SCHEDULING_WEBHOOK_SECRET": HOOK_KEY},
    ],
)
async def test_a_scheduling_webhook_sharing_the_verification_key_is_warned_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, env: dict[str, str]
) -> None:
    client = HttpClient()
    try:
        _line(tmp_path, {"CLINIC_SCHEDULING_WEBHOOK": "https://book.example/x", **env}, client)
    finally:
        await client.close()
    assert len(_warnings(caplog, "CLINIC_SCHEDULING_WEBHOOK_SECRET")) == 1, caplog.text


async def test_a_scheduling_webhook_signed_with_the_service_secret_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Only CLINIC_WEBHOOK_SECRET set: the appointment requests are signed with CLINIC_SECRET,
    # not with the verification webhooks' key, as the warning used to say.
    client = HttpClient()
    try:
        env = {
            "CLINIC_SCHEDULING_WEBHOOK": "https://book.example/x",
            "CLINIC_WEBHOOK_SECRET": HOOK_KEY,
        }
        _line(tmp_path, env, client)
    finally:
        await client.close()
    (warning,) = _warnings(caplog, "CLINIC_SCHEDULING_WEBHOOK_SECRET")
    assert "signed with CLINIC_SECRET" in warning and "opens the call records" in warning
    assert "verification webhooks" not in warning
