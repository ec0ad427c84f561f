"""The far end's hold while a question listens (``voice.sip.protocol.Hold``): the question's
timeout waits out the hold and runs in full once the call is back. The same for a message
being recorded: its no-speech guard waits out the hold, its longest does not.

The session is the real ``CallSession`` with the scripted call of test_ivr_session_races.py,
on the virtual loop of test_prop_session.py: the 6 s timeouts and a 30 s hold take no wall
time. The same against real pjsua and sipp: tests/integration/test_ivr_hold.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import cast

from tests.unit.test_ivr_session_races import LOUD, Rig, _digit, _done
from tests.unit.test_ivr_session_transfer import _ended, _recording_a_message
from tests.unit.test_prop_session import VirtualLoop
from voice.ivr.session import RECORD_NO_SPEECH_S, CallSession
from voice.sip.pool import CallHandle
from voice.sip.protocol import Hold

MENU = "How can I help you?"
TIMEOUT_S = 6.0  # the main menu's (the ask's default timeout_s)
AGAIN = "Sorry, I did not hear anything."


def held(on: bool) -> Hold:
    return Hold("call-1", on)


def run(body: Callable[[Rig, asyncio.AbstractEventLoop], Awaitable[None]]) -> None:
    loop = VirtualLoop()
    try:
        rig = Rig(called="main", speech=False)
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
