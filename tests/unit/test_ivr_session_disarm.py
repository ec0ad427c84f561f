"""A recogniser dropped while one of its feeds is under way must not stop the next prompt.

The feed runs in vosk's executor: a key answers the question, the next prompt (one nobody
may talk over) starts and drops the recogniser, and only then does the feed in flight
return its partial result. Stopping that prompt would leave the engine waiting for a
PromptDone that never comes (a stopped prompt's end is not one): silence until 30 minutes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import pytest

from voice.ivr import engine as eng
from voice.ivr.session import CallSession, SessionDeps
from voice.media.asr import PartialResult, Recogniser
from voice.sip.pool import CallHandle

pytestmark = pytest.mark.asyncio


class _Call:
    id = "in-test"
    ended = False

    def __init__(self) -> None:
        self.stops = 0
        self.plays = 0

    async def play(self, wav: Path) -> int:
        self.plays += 1
        return self.plays

    async def stop_play(self) -> None:
        self.stops += 1


class _SlowRecogniser:
    """Its feed returns a partial result once ``gate`` is set."""

    end_of_speech = False

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    async def feed(self, frame: bytes) -> PartialResult:
        await self.gate.wait()
        return PartialResult("예")


async def test_a_partial_result_of_a_dropped_recogniser_does_not_stop_the_next_prompt() -> None:
    call = _Call()
    unused: Any = None
    deps = SessionDeps(
        engine=unused,
        flowset=unused,
        renderer=unused,
        speech=unused,
        post_webhook=unused,
        save_recording=unused,
        save=unused,
        keep=unused,
        clock=unused,
    )
    session = CallSession(cast(CallHandle, call), deps)
    rec = _SlowRecogniser()
    session._recogniser = cast(Recogniser, rec)
    session._recogniser_for = ("triage_ko", "breathing")
    feeding = asyncio.create_task(session._recognise(cast(Recogniser, rec), b"\0" * 320))
    await asyncio.sleep(0)  # the feed is under way
    # The key answered the question: the emergency prompt, which nobody may talk over.
    state = eng.CallState(flow="triage_ko", node="emergency", pending=eng.Pending.NEXT)
    await session._play(eng.Play("", audio="/dev/null", barge_in=False), state)
    rec.gate.set()
    await feeding
    assert call.stops == 0, "the prompt nobody may talk over was stopped"
    assert session._prompt_play == 1
