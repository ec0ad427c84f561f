"""Runtime.fail: a background task that died stops the service, as one SIGTERM would; never
as a second one, which cuts the clinic line's call drain short (clinic_voice/app.py)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from clinic_voice.app import Runtime
from clinic_voice.cli import _StopSignals
from clinic_voice.metrics import Metrics
from sip_config.clock import SystemClock
from sip_config.settings import Settings


async def test_a_task_that_dies_during_the_stop_does_not_cut_the_drain_short() -> None:
    """serve's own signal handling: the first SIGTERM stops, a second one hurries the stop
    (Runtime.hurry ends the calls still in the drain). A watched task dying once the stop
    began (during a drain of up to CLINIC_CALL_DRAIN_S) sent that second SIGTERM: every
    caller still on the line was cut off, an urgent one in the triage included."""
    loop = asyncio.get_running_loop()
    rt = Runtime(settings=Settings.from_env({}), clock=SystemClock(), metrics=Metrics())
    hurried: list[None] = []
    rt.hurry_hooks.append(lambda: hurried.append(None))
    signals = _StopSignals()
    signals.again = rt.hurry
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # an operator's stop
        await asyncio.wait_for(signals.stop.wait(), 5)
        rt.stopping = True  # the app's on_shutdown: the drain begins
        rt.fail("the test task")
        await asyncio.sleep(0.5)  # a signal sent would be handled by now
        assert rt.failed == "the test task"  # serve exits 1 all the same
        assert hurried == [], "the failure during the stop cut the call drain short"
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


@pytest.mark.parametrize("cause", ["a task's failure at start", "a configuration fault"])
async def test_a_stop_of_the_services_own_making_is_no_signal(cause: str) -> None:
    """A watched task failing in the first moments of start-up (before the stop has begun),
    or another CLINIC_SECRET found in Redis, stopped the service by sending it a SIGTERM. The
    operator's SIGTERM that followed counted as a second one and cut every call still in the
    drain short. Only the operator's own second signal hurries the stop now."""
    loop = asyncio.get_running_loop()
    rt = Runtime(settings=Settings.from_env({}), clock=SystemClock(), metrics=Metrics())
    hurried: list[None] = []
    rt.hurry_hooks.append(lambda: hurried.append(None))
    signals = _StopSignals()
    signals.again = rt.hurry
    rt.stop_on_own = signals.stop_on_own  # as serve and an HTTP worker set it
    try:
        if cause == "a configuration fault":
            rt.misconfigure("this Redis holds data made with another CLINIC_SECRET")
        else:
            rt.fail("the test task")
        await asyncio.wait_for(signals.stop.wait(), 5)
        rt.stopping = True  # the app's on_shutdown: the drain begins
        os.kill(os.getpid(), signal.SIGTERM)  # the operator's first stop
        await asyncio.sleep(0.5)  # handled by now
        assert hurried == [], "the operator's first SIGTERM cut the call drain short"
        os.kill(os.getpid(), signal.SIGTERM)  # the operator's second: hurry
        await asyncio.sleep(0.5)
        assert hurried == [None]
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def test_the_first_cause_of_a_stop_is_kept_and_a_fault_found_later_only_logged() -> None:
    rt = Runtime(settings=Settings.from_env({}), clock=SystemClock(), metrics=Metrics())
    stops: list[None] = []
    rt.stop_on_own = lambda: stops.append(None)
    rt.misconfigure("another CLINIC_SECRET")
    rt.fail("the test task")  # a stop is under way: nothing more is stopped
    rt.misconfigure("said again")
    assert stops == [None]
    assert rt.misconfigured == "another CLINIC_SECRET" and rt.failed == "the test task"
