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


def _deps(**given: Any) -> SessionDeps:
    """Deps of a session whose tests reach only ``given`` (the rest unused)."""
    unused: Any = None
    names = ("engine", "flowset", "renderer", "speech", "post_webhook", "save_recording")
    base = dict.fromkeys((*names, "save", "keep", "clock"), unused)
    return SessionDeps(**{**base, **given})


async def test_a_partial_result_of_a_dropped_recogniser_does_not_stop_the_next_prompt() -> None:
    call = _Call()
    session = CallSession(cast(CallHandle, call), _deps())
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


class _ListeningCall(_Call):
    listening = False

    async def start_listen(self) -> None:
        self.listening = True

    async def audio(self) -> Any:
        await asyncio.Event().wait()  # no audio in this test
        yield b""


class _Speech:
    """Records the grammars it is asked for."""

    def __init__(self) -> None:
        self.asked: list[tuple[tuple[str, ...], tuple[str, ...]]] = []

    def recogniser(self, phrases: tuple[str, ...], *, fillers: tuple[str, ...] = ()) -> Any:
        self.asked.append((tuple(phrases), tuple(fillers)))
        return object()


def _armed(session: CallSession) -> bool:
    return session._recogniser is not None


async def test_speech_follows_the_language_of_the_flow_the_call_is_in_now() -> None:
    # The session took the language of the flow a call was routed to: a call that began on
    # the Korean line (keypad-only with an English model) and went on in an English flow was
    # never listened to there; one the other way round asked an English grammar in Korean
    # words' stead. The engine's Listen has always had the current flow's language.
    from voice.ivr.flow import FlowParams, load_flows

    flowset = load_flows(Path(__file__).parents[2] / "ivr_flows")
    params = FlowParams(speech_enabled=True, speech_language="en")
    speech = _Speech()
    call = _ListeningCall()
    deps = _deps(engine=eng.Engine(flowset, params), flowset=flowset, speech=speech)
    session = CallSession(cast(CallHandle, call), deps)
    # What run() set for a call routed to the Korean line, where the session read it (no
    # longer: set here so that a session reading it again fails this test).
    session.__dict__["_language"] = "ko"
    await session._arm_recogniser(eng.CallState(flow="main_menu", node="menu"))
    assert speech.asked and "appointment" in speech.asked[-1][0], speech.asked
    assert _armed(session) and call.listening
    # On into the Korean triage: the English model hears no Korean; the recogniser goes.
    await session._arm_recogniser(eng.CallState(flow="triage_ko", node="breathing"))
    assert not _armed(session) and len(speech.asked) == 1
    for task in list(session._tasks):
        task.cancel()
