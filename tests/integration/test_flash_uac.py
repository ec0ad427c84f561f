"""The flash-call agent on a real UDP socket, against a hand-driven SIP peer on loopback.

sipp plays the phone in :mod:`tests.integration.test_verify_sip_flash` (ring, answer, busy,
silence) and Asterisk in ``tests/e2e``; here a raw socket does what sipp will not: lose an
ACK (a final response sent twice after the call ended), and probe the agent's own port.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from sip_config.clock import SystemClock
from sip_config.settings import SipSettings
from tests.conftest import sip_settings
from voice.sip import message
from voice.sip.flash_uac import FlashHandle, FlashUac
from voice.sip.outcome import CallOutcome
from voice.sip.pool import OutboundCall
from voice.sip.protocol import CallEvent, CallState

pytestmark = pytest.mark.integration


def settings() -> SipSettings:
    return sip_settings(
        1, route="sip:{e164}@127.0.0.1:5060", user="clinic", flashcall_prefix="+447400"
    )


class Peer:
    """A UDP socket that reads requests and sends whatever responses the test writes."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = int(self.sock.getsockname()[1])

    async def receive(self, timeout: float = 3.0) -> tuple[message.SipMessage, tuple[str, int]]:  # noqa: ASYNC109
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            data, addr = await loop.sock_recvfrom(self.sock, 65535)
        return message.parse(data), addr

    async def expect(self, method: str) -> tuple[message.SipMessage, tuple[str, int]]:
        """The next request of ``method`` (retransmissions of others are skipped)."""
        while True:
            msg, addr = await self.receive()
            if msg.method == method:
                return msg, addr

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sock.sendto(data, addr)


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    try:
        yield p
    finally:
        p.sock.close()


@pytest.fixture
async def uac() -> AsyncIterator[FlashUac]:
    agent = FlashUac(settings(), SystemClock())
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop()


async def _call(uac: FlashUac, peer: Peer, *, ring_s: float) -> FlashHandle:
    """A flash call from +447400123456 to the peer, answered within 5 s or not at all."""
    return await uac.place_call(
        OutboundCall(
            target_uri=f"sip:+14155556001@127.0.0.1:{peer.port}",
            caller_id="+447400123456",
            flash=True,
            ring_s=ring_s,
            answer_timeout_s=5,
        )
    )


async def test_a_final_response_sent_again_after_the_end_is_acked_again(
    uac: FlashUac, peer: Peer
) -> None:
    handle = await _call(uac, peer, ring_s=0.3)
    invite, addr = await peer.expect("INVITE")
    assert addr == ("127.0.0.1", uac.address.port)
    ringing = message.serialise_response(invite, 180, to_tag="phone")
    peer.send(ringing, addr)
    cancel, _ = await peer.expect("CANCEL")
    peer.send(message.serialise_response(cancel, 200, to_tag="phone"), addr)
    busy = message.serialise_response(invite, 487, to_tag="phone")
    peer.send(busy, addr)
    ack, _ = await peer.expect("ACK")
    events = [ev async for ev in handle.events]
    assert [e.state for e in events] == [CallState.TRYING, CallState.RINGING, CallState.ENDED]
    last = events[-1]
    assert isinstance(last, CallEvent) and last.outcome is CallOutcome.CANCELLED_AFTER_RING
    assert uac.live_calls == 0
    # Our ACK was "lost": the phone sends the 487 again, and gets the same ACK.
    peer.send(busy, addr)
    again, _ = await peer.expect("ACK")
    assert again.get("Via") == ack.get("Via") and again.get("CSeq") == "1 ACK"


async def test_its_port_answers_options_and_refuses_calls_and_strangers(
    uac: FlashUac, peer: Peer
) -> None:
    there = ("127.0.0.1", uac.address.port)

    def request(method: str, call_id: str) -> bytes:
        return (
            f"{method} sip:clinic@127.0.0.1:{uac.address.port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{peer.port};branch=z9hG4bK{call_id}\r\n"
            "From: <sip:probe@127.0.0.1>;tag=p\r\nTo: <sip:clinic@127.0.0.1>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: 1 {method}\r\nContent-Length: 0\r\n\r\n"
        ).encode()

    for method, status in (("OPTIONS", 200), ("INVITE", 403), ("BYE", 481), ("INFO", 481)):
        peer.send(request(method, f"probe-{method}"), there)
        answer, _ = await peer.receive()
        assert answer.status == status, (method, answer.status)
        assert answer.get("Call-ID") == f"probe-{method}"
        if method == "OPTIONS":  # RFC 3261 11.2: what the port takes, as its INVITEs say
            assert answer.get("Allow") == "INVITE, ACK, CANCEL, BYE, OPTIONS", answer
    # Garbage is dropped; the socket still answers afterwards.
    peer.send(b"\x00\xffnot sip", there)
    peer.send(request("OPTIONS", "after-garbage"), there)
    answer, _ = await peer.receive()
    assert answer.status == 200 and answer.get("Call-ID") == "after-garbage"


async def test_a_stopped_agent_refuses_calls_and_ends_those_ringing(
    uac: FlashUac, peer: Peer
) -> None:
    call = OutboundCall(
        target_uri=f"sip:+14155556001@127.0.0.1:{peer.port}",
        caller_id="+447400123456",
        flash=True,
        ring_s=30,
        answer_timeout_s=30,
    )
    handle = await uac.place_call(call)
    invite, addr = await peer.expect("INVITE")
    peer.send(message.serialise_response(invite, 180, to_tag="phone"), addr)
    async with asyncio.timeout(3):
        async for ev in handle.events:
            if ev.state is CallState.RINGING:
                break
    await uac.stop()
    cancel, _ = await peer.expect("CANCEL")
    assert cancel.get("Call-ID") == invite.get("Call-ID")
    ended = [ev async for ev in handle.events]
    assert [(e.state, e.outcome) for e in ended] == [(CallState.ENDED, CallOutcome.FAILED)]
    assert not uac.ready
    with pytest.raises(Exception, match="not running"):
        await uac.place_call(call)


async def test_a_fork_answering_after_the_call_ended_gets_its_own_ack_and_bye(
    uac: FlashUac, peer: Peer
) -> None:
    # Found by tests/unit/test_prop_flash_dialog.py: once an answered call had ended, a 2xx
    # of another fork of its INVITE got the first fork's ACK back (the wrong To tag) and no
    # BYE (RFC 3261 13.2.2.4), so that phone stayed off hook.
    handle = await _call(uac, peer, ring_s=5)
    invite, addr = await peer.expect("INVITE")

    def answer(tag: str) -> bytes:
        contact = ("Contact", f"<sip:{tag}@127.0.0.1:{peer.port}>")
        return message.serialise_response(invite, 200, to_tag=tag, extra=(contact,))

    peer.send(answer("one"), addr)
    bye, _ = await peer.expect("BYE")
    peer.send(message.serialise_response(bye, 200), addr)
    events = [ev async for ev in handle.events]
    assert events[-1].outcome is CallOutcome.ANSWERED and uac.live_calls == 0
    peer.send(answer("two"), addr)
    ack, _ = await peer.expect("ACK")
    assert (ack.get("To") or "").endswith(";tag=two")
    bye, _ = await peer.expect("BYE")
    assert (bye.get("To") or "").endswith(";tag=two")
    assert bye.uri == f"sip:two@127.0.0.1:{peer.port}"
    peer.send(message.serialise_response(bye, 200), addr)
    await asyncio.sleep(0)
    peer.send(answer("two"), addr)  # our ACK was lost: an ACK again, no second BYE
    again, _ = await peer.receive()
    assert again.method == "ACK" and again.get("To") == ack.get("To")
    with pytest.raises(TimeoutError):
        await peer.receive(timeout=0.3)


async def test_a_fork_answering_after_the_487_gets_its_own_ack_and_a_bye(
    uac: FlashUac, peer: Peer
) -> None:
    # A forking proxy forwards a 2xx of another fork after the 487 of a cancelled flash call
    # (RFC 3261 9.1, 13.2.2.4). Only the 487's ACK was kept: that 2xx got it back (the 487's
    # To tag and the INVITE's branch) and no BYE, so that phone stayed off hook.
    handle = await _call(uac, peer, ring_s=0.3)
    invite, addr = await peer.expect("INVITE")
    peer.send(message.serialise_response(invite, 180, to_tag="one"), addr)
    cancel, _ = await peer.expect("CANCEL")
    peer.send(message.serialise_response(cancel, 200, to_tag="one"), addr)
    peer.send(message.serialise_response(invite, 487, to_tag="one"), addr)
    await peer.expect("ACK")
    events = [ev async for ev in handle.events]
    assert events[-1].outcome is CallOutcome.CANCELLED_AFTER_RING and uac.live_calls == 0
    contact = ("Contact", f"<sip:two@127.0.0.1:{peer.port}>")
    answer = message.serialise_response(invite, 200, to_tag="two", extra=(contact,))
    peer.send(answer, addr)
    ack, _ = await peer.receive()
    assert ack.method == "ACK" and (ack.get("To") or "").endswith(";tag=two")
    assert ack.get("Via") != invite.get("Via") and ack.get("CSeq") == "1 ACK"
    bye, _ = await peer.receive()
    assert bye.method == "BYE" and (bye.get("To") or "").endswith(";tag=two")
    assert bye.uri == f"sip:two@127.0.0.1:{peer.port}" and bye.get("CSeq") == "2 BYE"
    resent, _ = await peer.receive(timeout=2.0)  # unanswered: timer E sends it again
    assert resent.method == "BYE" and resent.get("Via") == bye.get("Via")
    peer.send(message.serialise_response(bye, 200), addr)
    with pytest.raises(TimeoutError):  # answered: no BYE more, and no event after ended
        await peer.receive(timeout=1.2)
    assert handle._events.empty()


@pytest.mark.parametrize(
    ("realm", "challenged", "answered"),
    [
        ("asterisk", "asterisk", True),
        ("", "elsewhere", True),  # CLINIC_SIP_REALM unset: any realm, as before
        ("asterisk", "elsewhere", False),
        # CLINIC_SIP_REALM=Asterisk against Asterisk's own "asterisk": answered, as pjsip
        # answers the workers' registration and calls (pj_stricmp), or flash calls fail alone.
        ("Asterisk", "asterisk", True),
    ],
)
async def test_a_challenge_is_answered_for_the_configured_realm_only(
    peer: Peer, caplog: pytest.LogCaptureFixture, realm: str, challenged: str, answered: bool
) -> None:
    # Anyone who can send the agent a response can challenge its INVITE: with
    # CLINIC_SIP_REALM set, only that realm's challenge gets a digest of the password;
    # another realm's ends the call as a challenge without credentials does (401, rejected).
    s = dataclasses.replace(settings(), password="clinic-local-secret", realm=realm)
    agent = FlashUac(s, SystemClock())
    await agent.start()
    try:
        handle = await _call(agent, peer, ring_s=0.3)
        invite, addr = await peer.expect("INVITE")
        challenge = ("WWW-Authenticate", f'Digest realm="{challenged}", nonce="n0nce"')
        with caplog.at_level(logging.WARNING, logger="voice.sip.flash_dialog"):
            peer.send(
                message.serialise_response(invite, 401, to_tag="pbx", extra=(challenge,)), addr
            )
            ack, _ = await peer.expect("ACK")
            assert ack.get("CSeq") == "1 ACK"
            if not answered:
                events = [ev async for ev in handle.events]
                assert [(e.state, e.sip_status, e.outcome) for e in events][-1] == (
                    CallState.ENDED,
                    401,
                    CallOutcome.REJECTED,
                )
                with pytest.raises(TimeoutError):  # no INVITE with credentials, nothing
                    await peer.receive(timeout=1.0)
                (line,) = [r.getMessage() for r in caplog.records]
                assert "realm 'elsewhere'" in line, line
                assert "clinic-local-secret" not in line and "n0nce" not in line
                return
            again, _ = await peer.expect("INVITE")
            assert again.get("CSeq") == "2 INVITE"
            auth = again.get("Authorization") or ""
            assert f'realm="{challenged}"' in auth and 'username="clinic"' in auth
            assert not caplog.records
            peer.send(message.serialise_response(again, 180, to_tag="phone"), addr)
            cancel, _ = await peer.expect("CANCEL")
            peer.send(message.serialise_response(cancel, 200, to_tag="phone"), addr)
            peer.send(message.serialise_response(again, 487, to_tag="phone"), addr)
            await peer.expect("ACK")
            events = [ev async for ev in handle.events]
            assert events[-1].outcome is CallOutcome.CANCELLED_AFTER_RING
    finally:
        await agent.stop()
