"""``CLINIC_SIP_REALM`` in the SIP workers: pjsua answers the challenges of the workers'
registration and calls itself, with credentials for that realm only (``*``, any realm, when
it is unset). A challenge of another realm ends the request as one without credentials does,
and the worker's log names the realm, never the password. (The flash-call agent's and a
MESSAGE's challenges: tests/integration/test_flash_uac.py, test_sip_message_auth.py.)
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sip_config.clock import SystemClock
from tests.conftest import sip_settings
from tests.integration.test_sip_pool import CALLER, sipp_uas, until_ready
from voice.sip.outcome import CallOutcome
from voice.sip.pool import OutboundCall, SipPool

pytestmark = pytest.mark.integration

PASSWORD = "s3cret"
REFUSED = "cannot answer the 401 challenge"


def _refused(logs: str) -> list[str]:
    return [line for line in logs.splitlines() if REFUSED in line]


@pytest.mark.parametrize(("realm", "registers"), [("clinic", True), ("pbx.example", False)])
async def test_workers_register_for_the_configured_realm_only(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], realm: str, registers: bool
) -> None:
    # The registrar challenges for realm "clinic" (sipp_uas_register.xml).
    async with sipp_uas("sipp_uas_register.xml", tmp_path, calls=1) as registrar:
        settings = sip_settings(
            1,
            registrar=f"sip:127.0.0.1:{registrar.port}",
            user="clinic-bot",
            password=PASSWORD,
            realm=realm,
        )
        pool = SipPool(settings, clock=SystemClock())
        await pool.start()
        try:
            loop = asyncio.get_running_loop()
            end = loop.time() + 5
            while not pool.ready() and loop.time() < end:  # noqa: ASYNC110 (a sync predicate)
                await asyncio.sleep(0.05)
            assert pool.ready() is registers
        finally:
            await pool.stop()
    registers_sent = registrar.received("REGISTER")
    authed = [r for r in registers_sent if r.msg.get("Authorization")]
    logs = capfd.readouterr().err
    if registers:
        assert len(authed) == 1 and 'realm="clinic"' in (authed[0].msg.get("Authorization") or "")
        assert not _refused(logs)
    else:
        assert registers_sent and not authed, "another realm's challenge got credentials"
        lines = _refused(logs)
        assert lines and all("registration" in x and "realm 'clinic'" in x for x in lines), logs
    assert PASSWORD not in logs


@pytest.mark.parametrize(
    ("realm", "challenged", "answered"),
    [
        ("clinic", "clinic", True),
        ("", "elsewhere", True),  # unset: "*", any realm, as before
        ("clinic", "elsewhere", False),
    ],
)
async def test_a_calls_challenge_is_answered_for_the_configured_realm_only(
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    realm: str,
    challenged: str,
    answered: bool,
) -> None:
    # Behind a registrar (which challenges for "clinic"), a call's INVITE challenged for
    # another realm ends 401, rejected: as a call without credentials (direct mode) does.
    async with (
        sipp_uas("sipp_uas_register.xml", tmp_path, calls=1) as registrar,
        sipp_uas(
            "sipp_uas_invite_auth_realm.xml", tmp_path, calls=1, inject=[(challenged,)]
        ) as uas,
    ):
        settings = sip_settings(
            1,
            registrar=f"sip:127.0.0.1:{registrar.port}",
            user="clinic",
            password=PASSWORD,
            realm=realm,
        )
        pool = SipPool(settings, clock=SystemClock())
        await pool.start()
        try:
            await until_ready(pool)
            call = await pool.place_call(OutboundCall(uas.uri(), CALLER, flash=False))
            outcome = await call.wait_ended(10)
        finally:
            await pool.stop()
    invites = uas.received("INVITE")
    logs = capfd.readouterr().err
    if answered:
        assert (outcome, call.sip_status) == (CallOutcome.BUSY, 486)
        assert len(invites) == 2
        assert f'realm="{challenged}"' in (invites[1].msg.get("Authorization") or "")
        assert not _refused(logs)
    else:
        assert (outcome, call.sip_status) == (CallOutcome.REJECTED, 401)
        assert len(invites) == 1, "another realm's challenge got credentials"
        (line,) = _refused(logs)
        assert f"realm '{challenged}'" in line and "call " in line, line
    assert PASSWORD not in logs
