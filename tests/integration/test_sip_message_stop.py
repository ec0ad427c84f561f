"""A SIP worker stopped while a MESSAGE it sent still waits for its final answer.

pjsua ends that MESSAGE's transaction inside ``libDestroy`` and reports it to the account that
sent it; pjsua2 looks the account up with an assertion. The worker deleted its account first,
and aborted (``pjsua_acc_get_user_data: Assertion `pjsua_var.acc[acc_id].valid' failed``, exit
-6) at every stop that found a MESSAGE unanswered: a first send, or one sent again with
credentials after a 401 or 407. No other test stops a worker within the 32 s (Timer F) a
MESSAGE may wait: each waits for its answer or for pjsip's own 408 first.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from sip_config.clock import SystemClock
from tests.conftest import sip_settings
from tests.integration.test_sip_pool import Sipp, sipp_uas, until_ready
from voice.sip.outcome import SipStatus
from voice.sip.pool import WORKER_EXITED_AT_STOP, SipPool

pytestmark = pytest.mark.integration

CLINIC_USER, PASSWORD = "clinic", "s3cret"  # the scenarios' digest credentials


def _call_ids(uas: Sipp) -> set[str | None]:
    """The Call-IDs of the MESSAGEs sipp got: one per send (a send again after a challenge
    has its own)."""
    return {w.msg.get("Call-ID") for w in uas.received("MESSAGE")}


@pytest.mark.parametrize("after_s", [0.0, 1.2])  # before and after the first retransmissions
@pytest.mark.parametrize(
    ("scenario", "user", "sends"),
    [
        # sipp_uas_message_drawn.xml: act 30 never answers, act 31 answers 100 Trying only.
        ("sipp_uas_message_drawn.xml", "+4477123020200", 1),
        ("sipp_uas_message_drawn.xml", "+4477123120200", 1),
        # Challenged (401, 407), sent again with credentials, and that send never answered.
        ("sipp_uas_message_auth_silent.xml", "+447700900401", 2),
        ("sipp_uas_message_auth_silent.xml", "+447700900407", 2),
    ],
    ids=["no-answer", "trying-only", "401-then-silent", "407-then-silent"],
)
async def test_a_stop_with_a_message_unanswered_exits_0_and_says_503(  # noqa: PLR0917 (fixtures)
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    scenario: str,
    user: str,
    sends: int,
    after_s: float,
) -> None:
    caplog.set_level(logging.INFO, logger="voice.sip.pool")
    pool = SipPool(sip_settings(1, user=CLINIC_USER, password=PASSWORD), clock=SystemClock())
    await pool.start()
    try:
        # Each send is a sipp call of its own: with one call allowed, sipp could end its run
        # after the challenge and never see the send with credentials.
        async with sipp_uas(scenario, tmp_path, calls=sends) as uas:
            send = asyncio.create_task(
                pool.send_message(uas.uri(user), "+447400000001", "hello", timeout_s=30)
            )
            async with asyncio.timeout(5):
                while len(_call_ids(uas)) < sends:  # noqa: ASYNC110 (under a deadline)
                    await asyncio.sleep(0.02)
            await asyncio.sleep(after_s)
            assert not send.done(), f"the MESSAGE was answered: {send.result()}"
            await pool.stop()
            async with asyncio.timeout(5):
                status = await send
    finally:
        await pool.stop()
    # WORKER_EXITED_AT_STOP's arguments: index, pid, status, note.
    exits = [r.args for r in caplog.records if r.msg == WORKER_EXITED_AT_STOP]
    said = [(a[0], a[2]) for a in exits if isinstance(a, tuple)]
    assert said == [(0, 0)], f"the worker's exit at the stop: {exits}"
    # Cut by the stop: never said delivered (the pool says 503 for a worker gone, too).
    assert status == SipStatus.SERVICE_UNAVAILABLE


async def test_behind_a_registrar_the_stop_still_unregisters(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Deleting the account sent the un-REGISTER; with a MESSAGE unanswered the account lives
    # through libDestroy, and the worker sends it itself, and answers its challenge.
    caplog.set_level(logging.INFO, logger="voice.sip.pool")
    async with (
        sipp_uas("sipp_uas_register_unregister.xml", tmp_path) as registrar,
        sipp_uas("sipp_uas_message_drawn.xml", tmp_path) as uas,
    ):
        settings = sip_settings(
            1, registrar=f"sip:127.0.0.1:{registrar.port}", user=CLINIC_USER, password=PASSWORD
        )
        pool = SipPool(settings, clock=SystemClock())
        await pool.start()
        try:
            await until_ready(pool)
            send = asyncio.create_task(
                pool.send_message(uas.uri("+4477123020200"), "+447400000001", "hi", timeout_s=30)
            )
            async with asyncio.timeout(5):
                while not uas.received("MESSAGE"):  # noqa: ASYNC110 (under a deadline)
                    await asyncio.sleep(0.02)
            await pool.stop()
            status = await send
        finally:
            await pool.stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3  # on loopback it is on the wire as the worker ends
        while len(registrar.received("REGISTER")) < 4 and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    # WORKER_EXITED_AT_STOP's arguments: index, pid, status, note.
    exits = [r.args for r in caplog.records if r.msg == WORKER_EXITED_AT_STOP]
    said = [(a[0], a[2]) for a in exits if isinstance(a, tuple)]
    assert said == [(0, 0)], f"the worker's exit at the stop: {exits}"
    assert status == SipStatus.SERVICE_UNAVAILABLE
    registers = registrar.received("REGISTER")
    expires = [r.msg.get("Expires") for r in registers]
    # Challenged, then sent again with credentials.
    assert expires[2:] == ["0", "0"], (
        f"no un-REGISTER at the stop (the REGISTERs' Expires): {expires}"
    )
    assert registers[-1].msg.get("Authorization"), "the un-REGISTER's challenge is unanswered"
