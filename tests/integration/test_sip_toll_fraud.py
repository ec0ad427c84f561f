"""A far end cannot make a SIP worker dial a target of its choosing.

A REFER or an INVITE with Replaces in a call: refused, nothing dialled.

pjsua's default for a REFER it receives in a call is to accept it (202) and dial the
``Refer-To`` target itself, from the worker's account (registered to the clinic's trunk when
one is configured): anyone who called the clinic line could make the service call premium
numbers. And an INVITE with Replaces (RFC 3891) matching a call is answered and takes the call
over. The worker refuses both with 403 Forbidden; the call goes on. A 3xx to one of our own
calls is not followed (pjsua2's default, pinned here)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sip_config.clock import SystemClock
from tests.conftest import sip_settings
from tests.integration.test_sip_inbound import hang_up_at_first_key, sipp_uac
from tests.integration.test_sip_pool import CALLER, sipp_uas
from voice.sip.outcome import CallOutcome
from voice.sip.pool import OutboundCall, SipPool
from voice.sip.protocol import CallEvent, CallState, Digit

pytestmark = pytest.mark.integration

# How long the premium target is listened to after the caller's scenario has ended: pjsua
# dialled it within milliseconds of its 202 on loopback (seen on the old code).
LISTEN_AFTER_S = 3.0


class _Datagrams(asyncio.DatagramProtocol):
    """Every datagram that reaches the premium target's port."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def datagram_received(self, data: bytes, addr: tuple[str | int, int]) -> None:
        self.received.append(data)


async def test_a_callers_refer_and_replaces_get_403_nothing_is_dialled_and_the_call_goes_on(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The caller, answered, sends a REFER to a premium target on loopback, then an INVITE
    with Replaces for its own call: each gets 403 (logged, without the target), no INVITE
    reaches the target in the seconds after, and the call goes on (a keypad digit sent after
    both still arrives, and the call ends when the handler hangs up on it)."""
    pool = SipPool(sip_settings(1), clock=SystemClock())
    await pool.start()
    loop = asyncio.get_running_loop()
    premium, target = await loop.create_datagram_endpoint(_Datagrams, local_addr=("127.0.0.1", 0))
    seen, ended = hang_up_at_first_key(pool)
    try:
        port = premium.get_extra_info("sockname")[1]
        code, text = await sipp_uac(
            pool.worker_addresses()[0], "sipp_uac_refer_in.xml", "6000", tmp_path, 20,
            keys={"premium_port": str(port)},
        )  # fmt: skip
        await asyncio.sleep(LISTEN_AFTER_S)
        invites = [d for d in target.received if d.startswith(b"INVITE ")]
        assert not invites, f"the worker dialled the REFER's target: {invites[0][:200]!r}"
        assert not target.received, target.received
        answers = [ln for ln in text.splitlines() if ln.startswith("SIP/2.0 ")]
        assert code == 0, f"no 403s, or no BYE after the digit: {answers}\n{text[-3000:]}"
        assert answers.count("SIP/2.0 403 Forbidden") == 2, answers
        async with asyncio.timeout(5):
            await ended.wait()
    finally:
        premium.close()
        await pool.stop()
    assert [e.key for e in seen if isinstance(e, Digit)] == ["1"], seen
    last = seen[-1]
    assert isinstance(last, CallEvent) and last.state is CallState.ENDED, seen
    assert last.outcome is CallOutcome.COMPLETED, last
    err = capfd.readouterr().err  # the worker's log
    refusals = [ln for ln in err.splitlines() if "refused (403)" in ln]
    assert len(refusals) == 2, err[-3000:]
    assert not [ln for ln in refusals if "premium" in ln or str(port) in ln], refusals


@pytest.mark.parametrize("flash", [False, True], ids=["voice", "flash"])
async def test_a_302_to_our_call_is_not_followed(tmp_path: Path, flash: bool) -> None:
    """A far end answers a verification call (a voice code's, or a flash call over a worker)
    302 to a premium target: pjsua2's default for a redirect is to stop (``onCallRedirected``
    not overridden: ``PJSIP_REDIRECT_STOP``), so the call fails and no INVITE reaches the
    target. Pinned: an override that followed redirects would dial any number a far end
    names, from the trunk's account."""
    pool = SipPool(sip_settings(1), clock=SystemClock())
    await pool.start()
    loop = asyncio.get_running_loop()
    premium, target = await loop.create_datagram_endpoint(_Datagrams, local_addr=("127.0.0.1", 0))
    try:
        port = premium.get_extra_info("sockname")[1]
        async with sipp_uas(
            "sipp_uas_redirect_premium.xml", tmp_path, inject=[(str(port),)]
        ) as uas:
            handle = await pool.place_call(
                OutboundCall(target_uri=uas.uri(), caller_id=CALLER, flash=flash, ring_s=2.0)
            )
            ended = asyncio.create_task(handle.wait_ended(10))
            await asyncio.sleep(LISTEN_AFTER_S)  # the 302 comes at once, a redial with it
            invites = [d for d in target.received if d.startswith(b"INVITE ")]
            assert not invites, f"the worker followed the 302: {invites[0][:200]!r}"
            assert not target.received, target.received
            assert await ended is CallOutcome.FAILED
            assert await uas.finish() == 0, "the 302 was not ACKed"
    finally:
        premium.close()
        await pool.stop()
