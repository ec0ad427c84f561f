"""A voice-code callee who holds the call while the service waits for the 1 it asked for
(``voice.sip.protocol.Hold``): the wait stops during the hold and runs again in full when the
callee is back, within a bound however long or often they hold. On the virtual loop of
test_prop_session.py (the waits take no wall time), with a scripted call handle; the same
against pjsua and sipp: tests/integration/test_verify_sip_hold.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest

from tests.unit.test_prop_session import VirtualLoop
from verification.channels import voice_call
from verification.channels.voice_call import KEYPRESS_WAIT_S, PLAY_TIMEOUT_S
from voice.sip.pool import CallHandle
from voice.sip.protocol import Digit, Hold, PlayDone

QUESTION = Path("/nonexistent/question.wav")


class AskingCall:
    """A call handle whose events the test sends; it notes the plays."""

    def __init__(self) -> None:
        self.id = "call-1"
        self.plays: list[float] = []
        self._events: asyncio.Queue[Any] = asyncio.Queue()

    async def play(self, wav: Path, *, loop: bool = False) -> int:
        self.plays.append(asyncio.get_running_loop().time())
        return len(self.plays)

    async def stop_play(self) -> None:
        return None

    async def next_event(self, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            return await self._events.get()

    def send(self, *events: Any) -> None:
        for ev in events:
            self._events.put_nowait(ev)


def run(body: Callable[[AskingCall, asyncio.AbstractEventLoop], Awaitable[None]]) -> None:
    loop = VirtualLoop()
    try:
        loop.run_until_complete(body(AskingCall(), loop))
    finally:
        loop.cancel_left()
        loop.close()


def keypress(call: AskingCall) -> asyncio.Task[bool]:
    channel = object.__new__(voice_call.VoiceCallChannel)
    return asyncio.ensure_future(channel._keypress(cast(CallHandle, call), QUESTION))


def held(on: bool) -> Hold:
    return Hold("call-1", on)


def test_a_hold_while_1_is_waited_for_stops_the_wait_and_it_runs_in_full_when_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(voice_call, "KEYPRESS_TRIES", 1)

    async def body(call: AskingCall, loop: asyncio.AbstractEventLoop) -> None:
        pressed = keypress(call)
        await asyncio.sleep(2.0)
        call.send(PlayDone("call-1", 1))  # the question asked
        await asyncio.sleep(KEYPRESS_WAIT_S - 1.0)
        call.send(held(True))
        await asyncio.sleep(20.0)  # far past the wait: it stood still
        assert not pressed.done()
        call.send(held(False))
        await asyncio.sleep(KEYPRESS_WAIT_S - 0.5)  # the whole wait, not the 1 s left
        call.send(Digit("call-1", "1"))
        assert await pressed

    run(body)


def test_a_callee_still_on_hold_at_the_bound_is_not_reached() -> None:
    # Held after the question and never back: not waited for until the call's end.
    async def body(call: AskingCall, loop: asyncio.AbstractEventLoop) -> None:
        pressed = keypress(call)
        call.send(PlayDone("call-1", 1))
        await asyncio.sleep(1.0)
        asked_at = loop.time() - 1.0
        call.send(held(True))
        with pytest.raises(voice_call._NoAudio, match="still on hold"):
            await pressed
        assert loop.time() - asked_at <= KEYPRESS_WAIT_S + PLAY_TIMEOUT_S + 0.1
        assert len(call.plays) == 1  # no second question to a callee away

    run(body)


def test_holds_over_and_over_do_not_keep_the_wait_open_for_ever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each return restarts the wait in full; holds after the bound no longer stop it.
    monkeypatch.setattr(voice_call, "KEYPRESS_TRIES", 1)

    async def body(call: AskingCall, loop: asyncio.AbstractEventLoop) -> None:
        pressed = keypress(call)
        call.send(PlayDone("call-1", 1))
        asked_at = loop.time()
        while not pressed.done():
            await asyncio.sleep(KEYPRESS_WAIT_S - 1.0)
            call.send(held(True))
            await asyncio.sleep(1.0)
            call.send(held(False))
            await asyncio.sleep(0)
        assert await pressed is False
        assert loop.time() - asked_at <= 2 * KEYPRESS_WAIT_S + PLAY_TIMEOUT_S + 0.1

    run(body)
