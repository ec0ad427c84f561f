"""The stop's drain of the clinic line, and a second signal that ends it (``end_drain``).

The sessions are stand-ins: when a caller is told is the engine's decision (LineClosing, in
test_ivr_engine.py); here only when the line asks for it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from clinic_voice import clinic_line
from clinic_voice.app import Runtime
from clinic_voice.clinic_line import ClinicLine, check_clinic_line
from sip_config.clock import SystemClock
from sip_config.settings import Settings
from voice.ivr.session import SessionDeps
from voice.sip.pool import CallHandle

SHIPPED = Path(__file__).resolve().parents[2] / "ivr_flows"
CUT = "drain cut short by a second signal"
DEADLINE_S = 5.0


class Caller:
    """One call in progress: told (the line asked its session to close), hung up by the test."""

    def __init__(self, call_id: str = "c1") -> None:
        self.id = call_id
        self.told = asyncio.Event()
        self.hung_up = asyncio.Event()


class FakeSession:
    def __init__(self, call: Caller, deps: SessionDeps) -> None:
        self._call = call
        self.call_id = call.id

    async def run(self) -> None:
        await self._call.hung_up.wait()

    def close(self) -> None:
        self._call.told.set()


@pytest.fixture
def line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ClinicLine:
    return a_line(tmp_path, monkeypatch)


def a_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, drain_s: str = "20") -> ClinicLine:
    monkeypatch.setattr(clinic_line, "CallSession", FakeSession)
    env = {
        "CLINIC_DATA_DIR": str(tmp_path),
        "CLINIC_FLOWS_DIR": str(SHIPPED),
        "CLINIC_CALL_DRAIN_S": drain_s,
    }
    settings = Settings.from_env(env)
    line = ClinicLine.load(
        settings, cast(Runtime, SimpleNamespace(clock=SystemClock())), check_clinic_line(settings)
    )
    line._deps = cast(SessionDeps, object())  # started, as far as handle() is concerned
    return line


async def call_in_progress(
    line: ClinicLine, call_id: str = "c1"
) -> tuple[Caller, asyncio.Task[None]]:
    caller = Caller(call_id)
    task = asyncio.create_task(line.handle(cast(CallHandle, caller)))
    await asyncio.sleep(0)  # the session is in progress
    return caller, task


async def told_then_hung_up(line: ClinicLine, caller: Caller, call: asyncio.Task[None]) -> None:
    """The caller is told (soon: not after the 600 s drain) and hangs up; the stop ends."""
    async with asyncio.timeout(DEADLINE_S):
        await caller.told.wait()
        caller.hung_up.set()
        await call
        await line.closed()


async def test_a_second_signal_during_the_drain_tells_the_caller_now(
    line: ClinicLine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="clinic_voice.clinic_line")
    caller, call = await call_in_progress(line)
    line.begin_close(600)
    await asyncio.sleep(0.05)
    assert not caller.told.is_set()  # the drain lets the call go on
    line.end_drain()
    await told_then_hung_up(line, caller, call)
    assert [r.getMessage() for r in caplog.records].count(
        f"stopping: {CUT}: telling 1 caller(s) now that the line closes"
    ) == 1


async def test_a_second_signal_before_the_drain_began_leaves_no_drain(
    line: ClinicLine,
) -> None:
    caller, call = await call_in_progress(line)
    line.end_drain()  # both signals came before the stop's hooks ran
    line.begin_close(600)
    await told_then_hung_up(line, caller, call)


async def test_a_signal_after_the_drain_leaves_the_notice_its_time(
    line: ClinicLine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="clinic_voice.clinic_line")
    caller, call = await call_in_progress(line)
    line.begin_close(0)
    async with asyncio.timeout(DEADLINE_S):
        await caller.told.wait()
    line.end_drain()
    closed = asyncio.create_task(line.closed())
    await asyncio.sleep(0.05)
    assert not closed.done()  # the line still waits for the call's end (CLOSE_NOTICE_S)
    caller.hung_up.set()
    async with asyncio.timeout(DEADLINE_S):
        await call
        await closed
    assert not [r for r in caplog.records if CUT in r.getMessage()]


async def test_calls_that_end_during_the_drain_are_not_told(line: ClinicLine) -> None:
    caller, call = await call_in_progress(line)
    line.begin_close(600)
    caller.hung_up.set()
    async with asyncio.timeout(DEADLINE_S):
        await call
        await line.closed()
    line.end_drain()  # after the stop: nothing to cut
    assert not caller.told.is_set()


async def test_a_workers_calls_alone_are_closed_when_it_is_asked_to_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIP worker sent SIGTERM by someone else: its call gets the drain (here 0 s) and the
    notice, as at the service's stop; a call on another worker goes on, untold."""
    line = a_line(tmp_path, monkeypatch, drain_s="0")
    on_it, its_call = await call_in_progress(line, "on-it")
    elsewhere, other_call = await call_in_progress(line, "elsewhere")
    closing = asyncio.create_task(line.close_calls_of([cast(CallHandle, on_it)]))
    async with asyncio.timeout(DEADLINE_S):
        await on_it.told.wait()
    await asyncio.sleep(0.05)
    assert not closing.done()  # it waits for the call's end (CLOSE_NOTICE_S)
    on_it.hung_up.set()
    async with asyncio.timeout(DEADLINE_S):
        await its_call
        await closing
    assert not elsewhere.told.is_set() and not other_call.done()
    elsewhere.hung_up.set()
    await other_call
