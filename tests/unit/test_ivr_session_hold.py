"""The far end's hold while a question listens (``voice.sip.protocol.Hold``): the question's
timeout waits out the hold and runs in full once the call is back.

The session is the real ``CallSession`` with the scripted call of test_ivr_session_races.py,
on the virtual loop of test_prop_session.py: the 6 s timeouts and a 30 s hold take no wall
time. The same against real pjsua and sipp: tests/integration/test_ivr_hold.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from tests.unit.test_ivr_session_races import Rig, _done
from tests.unit.test_prop_session import VirtualLoop
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
