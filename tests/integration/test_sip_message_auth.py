"""SIP MESSAGE to a peer that asks for digest credentials, as a PBX does (Asterisk does)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from sip_config.clock import SystemClock
from sip_config.settings import SipSettings
from tests.conftest import sip_settings
from tests.integration.test_sip_pool import sipp_uas
from voice.sip.pool import SipPool

pytestmark = pytest.mark.integration


def _with_credentials(user: str, password: str) -> SipSettings:
    return sip_settings(1, user=user, password=password)


@pytest.mark.parametrize(("password", "expected"), [("s3cret", 202), ("wrong", 401)])
async def test_message_answers_a_digest_challenge(
    tmp_path: Path, password: str, expected: int
) -> None:
    pool = SipPool(_with_credentials("clinic", password), clock=SystemClock())
    await pool.start()
    try:
        async with sipp_uas("sipp_uas_message_auth.xml", tmp_path, calls=2) as uas:
            status = await pool.send_message(uas.uri(), "+447400000001", "hello", timeout_s=5)
    finally:
        await pool.stop()
    assert status == expected
    sent = uas.received("MESSAGE")
    assert len(sent) == 2, "the challenge is answered exactly once"
    assert "Authorization" not in {n for n, _ in sent[0].msg.headers}
    assert 'username="clinic"' in (sent[1].msg.get("Authorization") or "")
    assert sent[1].msg.body == sent[0].msg.body


async def test_a_challenge_it_cannot_answer_is_a_401_at_once(tmp_path: Path) -> None:
    # qop="auth-int" only: the answer raised inside pjsua's callback, was swallowed, and the
    # send waited for its timeout, then said 408 (nobody had answered 408).
    pool = SipPool(_with_credentials("clinic", "s3cret"), clock=SystemClock())
    await pool.start()
    try:
        async with sipp_uas("sipp_uas_message_authint.xml", tmp_path) as uas:
            loop = asyncio.get_running_loop()
            started = loop.time()
            status = await pool.send_message(uas.uri(), "+447400000001", "hello", timeout_s=10)
            took = loop.time() - started
    finally:
        await pool.stop()
    assert status == 401
    assert took < 3.0, f"the refused challenge took {took:.1f} s to answer"
    assert len(uas.received("MESSAGE")) == 1, "a challenge it cannot answer is not retried"


@pytest.mark.parametrize(
    ("realm", "challenged", "expected"),
    [
        ("pbx.example", "pbx.example", 202),
        ("", "elsewhere", 202),  # CLINIC_SIP_REALM unset: any realm, as before
        ("pbx.example", "elsewhere", 401),
        # Case aside, as pjsip matches the workers' own registration and calls (pj_stricmp):
        # a PBX.example challenge must not leave calls working and every SMS refused.
        ("pbx.example", "PBX.example", 202),
    ],
)
async def test_only_a_challenge_of_the_configured_realm_is_answered(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], realm: str, challenged: str, expected: int
) -> None:
    # Another realm's challenge is refused as one the worker cannot answer (qop="auth-int"
    # only, above): the send ends 401 at once, and the worker's log names the realm.
    settings = dataclasses.replace(_with_credentials("clinic", "s3cret"), realm=realm)
    pool = SipPool(settings, clock=SystemClock())
    await pool.start()
    sends = 2 if expected == 202 else 1
    try:
        async with sipp_uas(
            "sipp_uas_message_auth_realm.xml", tmp_path, calls=sends, inject=[(challenged,)] * 2
        ) as uas:
            loop = asyncio.get_running_loop()
            started = loop.time()
            status = await pool.send_message(uas.uri(), "+447400000001", "hello", timeout_s=10)
            took = loop.time() - started
    finally:
        await pool.stop()
    assert status == expected
    assert took < 3.0, f"the challenge took {took:.1f} s to settle"
    sent = uas.received("MESSAGE")
    assert len(sent) == sends, "a challenge of another realm is not answered"
    logs = capfd.readouterr().err
    refused = [line for line in logs.splitlines() if "cannot answer the 401 challenge" in line]
    if expected == 202:
        assert f'realm="{challenged}"' in (sent[1].msg.get("Authorization") or "")
        assert not refused, refused
    else:
        assert len(refused) == 1 and f"realm '{challenged}'" in refused[0], logs
    assert "s3cret" not in logs
