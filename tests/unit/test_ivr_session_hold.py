"""The far end's hold while a question listens (``voice.sip.protocol.Hold``): the question's
timeout waits out the hold and runs in full once the call is back. The same for a message
being recorded: its no-speech guard waits out the hold, its longest does not. A hold past its
limits (voice/ivr/hold_limit.py) ends the call, recorded as ``cut_held_too_long``.

The session is the real ``CallSession`` with the scripted call of test_ivr_session_races.py,
on the virtual loop of test_prop_session.py: the 6 s timeouts and a 30 s hold take no wall
time. The same against real pjsua and sipp: tests/integration/test_ivr_hold.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import cast

import pytest

from sip_config.clock import Clock
from tests.unit.test_ivr_session_races import LOUD, Rig, _digit, _done
from tests.unit.test_ivr_session_transfer import (
    _ended,
    _recording_a_message,
    _status,
    _transferring,
)
from tests.unit.test_prop_session import LoopClock, VirtualLoop
from voice.ivr import hold_limit
from voice.ivr.hold_limit import HOLD_MAX_S, HOLD_TOTAL_S, HOLDS_MAX
from voice.ivr.session import RECORD_NO_SPEECH_S, CallSession
from voice.ivr.triage import Urgency
from voice.sip.pool import CallHandle
from voice.sip.protocol import Hold

MENU = "How can I help you?"
TIMEOUT_S = 6.0  # the main menu's (the ask's default timeout_s)
AGAIN = "Sorry, I did not hear anything."


def held(on: bool) -> Hold:
    return Hold("call-1", on)


def run(
    body: Callable[[Rig, asyncio.AbstractEventLoop], Awaitable[None]], called: str = "main"
) -> None:
    loop = VirtualLoop()
    try:
        rig = Rig(called=called, speech=False)
        # Hold lengths on the virtual loop's clock, as the session's timers are.
        rig.deps = replace(rig.deps, clock=cast(Clock, LoopClock(loop)))
        rig.session = CallSession(cast(CallHandle, rig.call), rig.deps)
        loop.run_until_complete(body(rig, loop))
    finally:
        loop.cancel_left()
        loop.close()


async def listening(rig: Rig) -> None:
    """The call answered, the welcome and the menu heard: the menu listens."""
    rig.start()
    welcome = await rig.until_prompt("Welcome to")
    rig.call.send(_done(welcome))
    rig.call.send(_done(await rig.until_prompt(MENU)))
    await rig.settle()


def reprompts(rig: Rig) -> int:
    return sum(AGAIN in text for _, text in rig.call.plays())


def test_a_hold_while_listening_stops_the_timeout_and_it_runs_in_full_when_back() -> None:
    async def body(rig: Rig, loop: asyncio.AbstractEventLoop) -> None:
        await listening(rig)
        await asyncio.sleep(TIMEOUT_S - 1.0)  # 5 s of the 6 s pass
        rig.call.send(held(True))
        await asyncio.sleep(30.0)  # on hold far past the timeout: nobody asked again
        assert reprompts(rig) == 0, rig.call.plays()
        rig.call.send(held(False))
        back = loop.time()
        await rig.until(lambda: reprompts(rig) == 1, within_s=TIMEOUT_S + 1.0)
        # The whole timeout from the return, not the 1 s that was left of it.
        assert loop.time() - back >= TIMEOUT_S - 0.1, loop.time() - back
        await rig.finish()

    run(body)


def test_a_prompt_that_ends_during_the_hold_starts_its_timeout_when_back() -> None:
    async def body(rig: Rig, loop: asyncio.AbstractEventLoop) -> None:
        rig.start()
        welcome = await rig.until_prompt("Welcome to")
        rig.call.send(_done(welcome))
        menu = await rig.until_prompt(MENU)
        rig.call.send(held(True), _done(menu))  # the end and the hold cross
        await asyncio.sleep(30.0)
        assert reprompts(rig) == 0, rig.call.plays()
        rig.call.send(held(False))
        back = loop.time()
        await rig.until(lambda: reprompts(rig) == 1, within_s=TIMEOUT_S + 1.0)
        assert loop.time() - back >= TIMEOUT_S - 0.1
        await rig.finish()

    run(body)


# -- a message being recorded (after a failed transfer: its longest is 60 s) -----------------
MESSAGE_MAX_S = 60.0
KEPT = "Your message has been recorded"
SILENT = "I did not hear a message"


def keeping(rig: Rig) -> list[bytes]:
    """The messages ``rig``'s session saves, as their PCM."""
    kept: list[bytes] = []

    async def save_recording(call_id: str, started_at: float, pcm: bytes) -> str:
        kept.append(pcm)
        return "rec-1"

    rig.deps = replace(rig.deps, save_recording=save_recording)
    rig.session = CallSession(cast(CallHandle, rig.call), rig.deps)
    return kept


def said(rig: Rig, words: str) -> bool:
    return any(words in text for _, text in rig.call.plays())


def test_a_hold_before_the_caller_speaks_does_not_end_the_message_as_silent() -> None:
    # The caller holds 2 s after the beep, before a word, and is away 30 s. The no-speech
    # guard ran on during the hold: 12 s after the beep the message ended as silent while
    # the caller was away ("Sorry, I did not hear a message" to nobody).
    async def body(rig: Rig, loop: asyncio.AbstractEventLoop) -> None:
        kept = keeping(rig)
        await _recording_a_message(rig)
        await asyncio.sleep(2.0)
        rig.call.send(held(True))
        await asyncio.sleep(30.0)
        assert not said(rig, SILENT) and not said(rig, KEPT), rig.call.plays()
        rig.call.send(held(False))
        await rig.settle()
        rig.call.speak(*[LOUD] * 25)  # half a second of speech, then #
        rig.call.send(_digit("#"))
        await rig.until(lambda: said(rig, KEPT))
        assert len(kept) == 1 and LOUD in kept[0]
        assert (await _ended(rig)).outcome == "message_left"

    run(body)


def test_the_no_speech_guard_runs_in_full_from_the_callers_return() -> None:
    # Back from the hold and still silent: the message ends as silent RECORD_NO_SPEECH_S
    # after the return, not at once (what was left of the guard at the hold).
    async def body(rig: Rig, loop: asyncio.AbstractEventLoop) -> None:
        await _recording_a_message(rig)
        await asyncio.sleep(RECORD_NO_SPEECH_S - 1.0)
        rig.call.send(held(True))
        await asyncio.sleep(20.0)
        rig.call.send(held(False))
        back = loop.time()
        await rig.until(lambda: said(rig, SILENT), within_s=RECORD_NO_SPEECH_S + 1.0)
        assert loop.time() - back >= RECORD_NO_SPEECH_S - 0.1, loop.time() - back
        await rig.finish()

    run(body)


def test_what_was_said_before_a_hold_is_kept_and_the_hold_counts_against_the_longest() -> None:
    # The caller speaks, holds 5 s after the beep and never comes back: the message ends at
    # its longest (the hold counted: a hold never keeps it open for ever), with what was
    # said before the hold; the music on hold the line carries meanwhile is not in it.
    async def body(rig: Rig, loop: asyncio.AbstractEventLoop) -> None:
        kept = keeping(rig)
        await _recording_a_message(rig)
        began = loop.time()
        rig.call.speak(*[LOUD] * 25)
        await asyncio.sleep(5.0)
        rig.call.send(held(True))
        await rig.settle()
        music = b"\x00\x30" * 160
        rig.call.speak(*[music] * 50)
        await rig.until(lambda: said(rig, KEPT), within_s=MESSAGE_MAX_S)
        # Ended at its longest, counted from the beep: the hold began 5 s in and never
        # ended, so a hold not counted would keep it open past the wait above. The speech
        # check's thread takes no virtual time (VirtualLoop waits for it), so the bound is
        # the wait's, give or take the rig's 5 ms polls.
        assert loop.time() - began <= MESSAGE_MAX_S + 0.1, loop.time() - began
        (pcm,) = kept
        assert LOUD in pcm and music not in pcm
        await rig.finish()

    run(body)


def test_music_on_hold_is_no_message() -> None:
    # Only the line's sound during a hold (music on hold), no word from the caller: the
    # message is silent, not a recording of the music kept as the caller's message.
    async def body(rig: Rig, loop: asyncio.AbstractEventLoop) -> None:
        kept = keeping(rig)
        await _recording_a_message(rig)
        rig.call.send(held(True))
        await rig.settle()
        rig.call.speak(*[LOUD] * 100)
        await asyncio.sleep(5.0)
        rig.call.send(held(False))
        await rig.until(lambda: said(rig, SILENT), within_s=RECORD_NO_SPEECH_S + 1.0)
        assert not kept
        await rig.finish()

    run(body)


# -- the hold's limits (voice/ivr/hold_limit.py) ----------------------------------------------
def hung_up(rig: Rig) -> bool:
    return ("hangup", None) in rig.call.commands


async def cut_by_hold(rig: Rig) -> None:
    """The service hung up; the call's one record is saved."""
    assert rig.task is not None
    async with asyncio.timeout(5):
        await rig.task
    assert hung_up(rig), rig.call.commands
    assert len(rig.saved) == 1, rig.saved


def test_a_hold_past_its_limit_ends_the_call_as_cut_by_the_service() -> None:
    # A caller who holds the menu and never comes back. Before, only the 30-minute call
    # limit ended it (cut_too_long): 16 such calls took every slot of 4 workers.
    async def body(rig: Rig, loop: asyncio.AbstractEventLoop) -> None:
        await listening(rig)
        rig.call.send(held(True))
        await rig.settle()
        since = loop.time()
        await rig.until(lambda: hung_up(rig), within_s=HOLD_MAX_S + 1.0)
        assert HOLD_MAX_S - 0.1 <= loop.time() - since <= HOLD_MAX_S + 0.5, loop.time() - since
        await cut_by_hold(rig)
        record = rig.saved[0].record
        assert record.outcome == "cut_held_too_long", record
        assert [s.node for s in record.path][-1] == "menu", record.path
        assert reprompts(rig) == 0, rig.call.plays()  # no words to a caller who is away

    run(body)


def test_a_hold_shorter_than_the_limit_goes_on_as_before() -> None:
    async def body(rig: Rig, loop: asyncio.AbstractEventLoop) -> None:
        await listening(rig)
        rig.call.send(held(True))
        await asyncio.sleep(HOLD_MAX_S - 5.0)
        rig.call.send(held(False))
        back = loop.time()
        await rig.until(lambda: reprompts(rig) == 1, within_s=TIMEOUT_S + 1.0)
        assert loop.time() - back >= TIMEOUT_S - 0.1
        await asyncio.sleep(HOLD_MAX_S)  # the limit's task ended with the hold
        assert not hung_up(rig), rig.call.commands
        await rig.finish()
        assert rig.saved[0].record.outcome != "cut_held_too_long"

    run(body)


def test_holds_add_up_to_the_limit_of_all_holds() -> None:
    # Holds of 4 minutes with a few seconds back between them (each less than the
    # question's timeout, so nothing is asked) would keep the call 30 minutes: they add
    # up, and the call ends when they reach HOLD_TOTAL_S.
    async def body(rig: Rig, loop: asyncio.AbstractEventLoop) -> None:
        await listening(rig)
        for _ in range(2):
            rig.call.send(held(True))
            await asyncio.sleep(240.0)
            rig.call.send(held(False))
            await asyncio.sleep(TIMEOUT_S - 2.0)
        assert not hung_up(rig)
        rig.call.send(held(True))
        await rig.settle()
        since = loop.time()
        await rig.until(lambda: hung_up(rig), within_s=HOLD_MAX_S)
        left = HOLD_TOTAL_S - 2 * 240.0  # 120 s
        assert left - 0.1 <= loop.time() - since <= left + 0.5, loop.time() - since
        await cut_by_hold(rig)
        assert rig.saved[0].record.outcome == "cut_held_too_long"

    run(body)


def test_the_hold_after_the_tenth_ends_the_call_at_once() -> None:
    # Each return runs the question's timeout again in full: a hold of a second every few
    # seconds would keep the call for 30 minutes with almost no time on hold.
    async def body(rig: Rig, loop: asyncio.AbstractEventLoop) -> None:
        await listening(rig)
        for _ in range(HOLDS_MAX):
            rig.call.send(held(True))
            await asyncio.sleep(1.0)
            rig.call.send(held(False))
            await asyncio.sleep(TIMEOUT_S - 1.0)
        assert not hung_up(rig) and reprompts(rig) == 0, rig.call.commands
        rig.call.send(held(True))
        await rig.until(lambda: hung_up(rig), within_s=0.5)
        await cut_by_hold(rig)
        assert rig.saved[0].record.outcome == "cut_held_too_long"

    run(body)


async def _answer(rig: Rig, prompt: str, key: str) -> None:
    rig.call.send(_done(await rig.until_prompt(prompt)))
    await rig.settle()
    rig.call.send(_digit(key))


def test_an_urgent_caller_cut_by_the_limit_keeps_the_triage_reached() -> None:
    # U2 (very ill with fever), then a hold at the next question that never ends: the same
    # limit as any caller's, and the record says how urgent the caller is (a call back first).
    async def body(rig: Rig, loop: asyncio.AbstractEventLoop) -> None:
        rig.start()
        rig.call.send(_done(await rig.until_prompt("I will ask you a few questions")))
        await _answer(rig, "Is this call about yourself", "1")
        for prompt in ("breathing", "chest pain", "unconscious", "severe bleeding", "drooping"):
            await _answer(rig, prompt, "2")
        await _answer(rig, "What is the main problem", "1")
        await _answer(rig, "above 40 degrees", "1")
        rig.call.send(_done(await rig.until_prompt("stiff neck")))
        await rig.settle()
        rig.call.send(held(True))
        await rig.settle()
        since = loop.time()
        await rig.until(lambda: hung_up(rig), within_s=HOLD_MAX_S + 1.0)
        assert loop.time() - since >= HOLD_MAX_S - 0.1
        await cut_by_hold(rig)
        record = rig.saved[0].record
        assert record.outcome == "cut_held_too_long", record
        assert record.urgency is Urgency.U2 and record.reasons == ("very ill with fever",)
        assert ("fever_very_ill", "yes") in record.values, record.values
        assert record.path[-1].node == "fever_rash", record.path

    run(body, called="triage")


def test_a_hold_during_a_transfer_waits_for_the_transfers_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A phone that takes a REFER holds our leg while it calls the target (RFC 5589): the
    # transfer's own deadlines bound that, and the limit does not cut a ringing nurse off.
    # Past the limit by the transfer's end (here a failure), the call ends then, keeping the
    # outcome the failure gave it (as every cut by the service keeps one reached before).
    monkeypatch.setattr(hold_limit, "HOLD_MAX_S", 20.0)

    async def body(rig: Rig, loop: asyncio.AbstractEventLoop) -> None:
        await _transferring(rig)
        rig.call.send(_status(100, False), held(True), _status(180, False))
        await asyncio.sleep(100.0)
        assert not hung_up(rig), rig.call.commands
        rig.call.send(_status(480, True))
        await rig.until(lambda: hung_up(rig), within_s=0.5)
        await cut_by_hold(rig)
        assert rig.saved[0].record.outcome == "transfer_failed", rig.saved[0].record

    run(body, called="6000")


def test_a_hold_during_a_message_waits_for_its_end_and_the_message_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The caller speaks, then holds and never comes back: the message runs to its longest
    # (the hold counted, as before) and is kept; the limit, passed meanwhile, ends the call
    # then, not mid-message (what was said would be lost with the RecordDone).
    monkeypatch.setattr(hold_limit, "HOLD_MAX_S", 20.0)

    async def body(rig: Rig, loop: asyncio.AbstractEventLoop) -> None:
        kept = keeping(rig)
        await _recording_a_message(rig)
        began = loop.time()
        rig.call.speak(*[LOUD] * 25)
        await asyncio.sleep(2.0)
        rig.call.send(held(True))
        await rig.until(lambda: hung_up(rig), within_s=MESSAGE_MAX_S + 1.0)
        assert loop.time() - began >= MESSAGE_MAX_S - 0.1, loop.time() - began
        await cut_by_hold(rig)
        (pcm,) = kept
        assert LOUD in pcm
        assert rig.saved[0].record.outcome == "message_left", rig.saved[0].record

    run(body)
