"""SIP MESSAGE to a peer that asks for digest credentials, as a PBX does (Asterisk does)."""

from __future__ import annotations

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
