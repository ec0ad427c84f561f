"""The flash-call agent's table of finished calls under responses that come after the end:
an answered call's dialog is kept for timer D so that another fork's 2xx gets its ACK and BYE
(RFC 3261 13.2.2.4), and no stream of responses may keep it, or the BYEs, going forever; a
call that ended unanswered keeps its ACK, from which a late fork's 2xx gets the same."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from sip_config.clock import FakeClock
from tests.conftest import sip_settings
from voice.sip import message
from voice.sip.flash_dialog import TIMER_B_S, TIMER_D_S
from voice.sip.flash_uac import FlashHandle, FlashUac, _Late
from voice.sip.outcome import CallOutcome
from voice.sip.pool import OutboundCall

PHONE = ("127.0.0.1", 5160)


class Recorder(asyncio.DatagramTransport):
    """Takes the agent's datagrams instead of the socket (the clock is fake: nothing waits)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[message.SipMessage] = []

    def sendto(self, data: bytes | bytearray | memoryview, addr: object = None) -> None:
        self.sent.append(message.parse(bytes(data)))

    def close(self) -> None:
        pass

    def take(self) -> list[str]:
        methods = [m.method for m in self.sent]
        self.sent.clear()
        return methods


@pytest.fixture
async def agent() -> AsyncIterator[tuple[FlashUac, FakeClock, Recorder]]:
    clock = FakeClock()
    uac = FlashUac(sip_settings(1, route="sip:{e164}@127.0.0.1:5060"), clock)
    await uac.start()
    real = uac._transport
    assert real is not None
    recorder = Recorder()
    uac.connection_made(recorder)
    try:
        yield uac, clock, recorder
    finally:
        await uac.stop()
        real.close()


def _answer(invite: message.SipMessage, tag: str) -> bytes:
    contact = ("Contact", f"<sip:{tag}@127.0.0.1:5160>")
    return message.serialise_response(invite, 200, to_tag=tag, extra=(contact,))


async def _answered_and_ended(
    uac: FlashUac, recorder: Recorder
) -> tuple[message.SipMessage, bytes]:
    call = OutboundCall(f"sip:+14155556001@{PHONE[0]}:{PHONE[1]}", "+447400123456", True)
    handle = await uac.place_call(call)
    (invite,) = recorder.sent
    recorder.take()
    uac.datagram_received(_answer(invite, "a"), PHONE)
    _, bye = recorder.sent
    recorder.take()
    uac.datagram_received(message.serialise_response(bye, 200), PHONE)
    events = [ev async for ev in handle.events]
    assert events[-1].outcome is CallOutcome.ANSWERED and uac.live_calls == 0
    stray = message.serialise_response(bye, 200).replace(b"branch=z9hG4bK", b"branch=z9hG4bKx")
    return invite, stray


async def test_responses_after_the_end_do_not_keep_an_answered_call_forever(
    agent: tuple[FlashUac, FakeClock, Recorder],
) -> None:
    # Every response with the Call-ID of a kept answered call (a forged one of no transaction
    # of ours, no branch needed) re-finished it: 32 s more each time, one more entry in the
    # expiry queue each datagram. One datagram every 30 s kept the dialog, and its BYEs to
    # any new To tag, for ever.
    uac, clock, recorder = agent
    invite, stray = await _answered_and_ended(uac, recorder)
    for _ in range(1000):
        uac.datagram_received(stray, PHONE)
    assert len(uac._expiry) <= 1, "one datagram, one entry in the expiry queue"
    for _ in range(5):
        clock.advance(TIMER_D_S - 2)
        uac.datagram_received(stray, PHONE)
    assert recorder.take() == []
    uac.datagram_received(_answer(invite, "late"), PHONE)
    assert recorder.take() == [], "a 2xx 150 s after the answer is no dialog of ours"


async def test_a_fork_answering_within_64_t1_is_still_hung_up_once(
    agent: tuple[FlashUac, FakeClock, Recorder],
) -> None:
    uac, clock, recorder = agent
    invite, _ = await _answered_and_ended(uac, recorder)
    clock.advance(TIMER_B_S / 2)
    uac.datagram_received(_answer(invite, "b"), PHONE)
    ack, bye = recorder.sent
    assert (ack.method, bye.method) == ("ACK", "BYE") and uac.live_calls == 1
    recorder.take()
    uac.datagram_received(message.serialise_response(bye, 200), PHONE)
    assert uac.live_calls == 0
    uac.datagram_received(_answer(invite, "b"), PHONE)  # our ACK was lost
    assert recorder.take() == ["ACK"]


async def _rung_and_cancelled(
    uac: FlashUac, recorder: Recorder
) -> tuple[FlashHandle, message.SipMessage, message.SipMessage]:
    """A flash call placed, ringing (To tag ``ring``) and hung up: its INVITE and CANCEL
    sent, nothing else yet."""
    call = OutboundCall(f"sip:+14155556001@{PHONE[0]}:{PHONE[1]}", "+447400123456", True)
    handle = await uac.place_call(call)
    (invite,) = recorder.sent
    recorder.take()
    uac.datagram_received(message.serialise_response(invite, 180, to_tag="ring"), PHONE)
    await handle.hangup()
    (cancel,) = recorder.sent
    recorder.take()
    return handle, invite, cancel


async def test_a_fork_answering_a_cancelled_call_gets_its_own_ack_and_a_bye(
    agent: tuple[FlashUac, FakeClock, Recorder],
) -> None:
    # A forking proxy forwards a 2xx of another fork after the 487 (RFC 3261 9.1,
    # 13.2.2.4): the call kept only the 487's ACK, so that 2xx got it back (the 487's To
    # tag, the INVITE's branch) and no BYE: that phone stayed off hook, connected to nobody.
    uac, clock, recorder = agent
    handle, invite, cancel = await _rung_and_cancelled(uac, recorder)
    uac.datagram_received(message.serialise_response(cancel, 200, to_tag="ring"), PHONE)
    uac.datagram_received(message.serialise_response(invite, 487, to_tag="ring"), PHONE)
    assert recorder.take() == ["ACK"]
    events = [ev async for ev in handle.events]
    assert events[-1].outcome is CallOutcome.CANCELLED_AFTER_RING and uac.live_calls == 0
    clock.advance(1.0)
    forged = _answer(invite, "forged").replace(b"branch=z9hG4bK", b"branch=z9hG4bKx")
    uac.datagram_received(forged, PHONE)
    assert recorder.take() == [], "not our INVITE's branch: no dialog of ours"
    assert uac._finished[invite.get("Call-ID") or ""][2] is None, "and nothing kept for it"
    uac.datagram_received(_answer(invite, "late"), PHONE)
    ack, bye = recorder.sent
    recorder.take()
    assert ack.method == "ACK" and (ack.get("To") or "").endswith(";tag=late")
    assert ack.get("Via") != invite.get("Via"), "a 2xx's ACK is a transaction of its own"
    assert ack.uri == "sip:late@127.0.0.1:5160" and ack.get("CSeq") == "1 ACK"
    assert bye.method == "BYE" and (bye.get("To") or "").endswith(";tag=late")
    assert bye.uri == ack.uri and bye.get("CSeq") == "2 BYE"
    assert bye.get("From") == invite.get("From") and bye.get("Call-ID") == invite.get("Call-ID")
    uac.datagram_received(message.serialise_response(invite, 487, to_tag="ring"), PHONE)
    (again,) = recorder.sent
    recorder.take()
    assert (again.get("To") or "").endswith(";tag=ring"), "a 487 again: its own ACK again"
    uac.datagram_received(message.serialise_response(bye, 200), PHONE)
    late = uac._finished[invite.get("Call-ID") or ""][2]
    assert isinstance(late, _Late) and late.timer is None, "the BYE answered: not sent again"
    assert handle._events.empty(), "no event after ended"
    clock.advance(TIMER_D_S)
    uac.datagram_received(_answer(invite, "later"), PHONE)
    assert recorder.take() == [], "64*T1 after the end the INVITE is over"


async def test_a_2xx_after_timer_b_gets_an_ack_and_a_bye(
    agent: tuple[FlashUac, FakeClock, Recorder],
) -> None:
    # A call that ended on timer B sent no ACK and so was not kept: a 2xx after the end got
    # nothing (that phone stayed off hook: RFC 3261 13.2.2.4).
    uac, clock, recorder = agent
    call = OutboundCall(f"sip:+14155556001@{PHONE[0]}:{PHONE[1]}", "+447400123456", True)
    handle = await uac.place_call(call)
    (invite,) = recorder.sent
    recorder.take()
    live = uac._live[invite.get("Call-ID") or ""]
    clock.advance(TIMER_B_S)
    uac._on_timer(live)
    events = [ev async for ev in handle.events]
    assert events[-1].outcome is CallOutcome.UNREACHABLE and uac.live_calls == 0
    recorder.take()
    clock.advance(1.0)
    uac.datagram_received(_answer(invite, "late"), PHONE)
    ack, bye = recorder.sent
    recorder.take()
    assert ack.get("CSeq") == "1 ACK" and bye.get("CSeq") == "2 BYE"
    assert (bye.get("To") or "").endswith(";tag=late") and bye.uri == "sip:late@127.0.0.1:5160"
    uac.datagram_received(message.serialise_response(bye, 200), PHONE)
    assert recorder.take() == [] and handle._events.empty(), "no event after ended"


async def test_a_4xx_to_the_cancel_after_the_end_is_not_acked(
    agent: tuple[FlashUac, FakeClock, Recorder],
) -> None:
    # A cancelled call's kept ACK went back for any non-2xx with its Call-ID, also a 481 to
    # the CANCEL (a non-INVITE's final is never ACKed: RFC 3261 17.1.1).
    uac, _, recorder = agent
    _, invite, cancel = await _rung_and_cancelled(uac, recorder)
    uac.datagram_received(message.serialise_response(invite, 487, to_tag="ring"), PHONE)
    assert recorder.take() == ["ACK"]
    for status in (481, 408, 200):
        uac.datagram_received(message.serialise_response(cancel, status, to_tag="r"), PHONE)
        assert recorder.take() == [], status
    uac.datagram_received(message.serialise_response(invite, 487, to_tag="ring"), PHONE)
    assert recorder.take() == ["ACK"], "the 487 again: its ACK again"


async def test_calls_to_a_silent_peer_do_not_pile_up_in_the_finished_table(
    agent: tuple[FlashUac, FakeClock, Recorder],
) -> None:
    # A call that ends on timer B is now kept (its built ACK) for timer D, but the table was
    # only trimmed when a datagram came in: a PBX that answers nothing (down, a firewall)
    # sends none, so every call placed to it stayed in the table for as long as it was down.
    uac, clock, recorder = agent
    call = OutboundCall(f"sip:+14155556001@{PHONE[0]}:{PHONE[1]}", "+447400123456", True)
    for _ in range(20):
        handle = await uac.place_call(call)
        (live,) = uac._live.values()
        clock.advance(TIMER_B_S)
        uac._on_timer(live)
        events = [ev async for ev in handle.events]
        assert events[-1].outcome is CallOutcome.UNREACHABLE and uac.live_calls == 0
        recorder.take()
    assert len(uac._finished) <= 2 and len(uac._expiry) <= 2, len(uac._finished)
