"""voice.sip.worker.run's stop on SIGTERM, with a stand-in for pjsua's Engine (what the owner
loop does with the flag and the pipes; tests/integration/test_sip_worker_sigterm.py has pjsua
and real calls): a SIGTERM during pjsua's start, before the reader thread, still stops it; and
one that comes as the pool goes (serve killed -9: the kernel's parent-death SIGTERM, its
events pipe read by nobody) hangs the calls up and exits 0, not 1 with a BrokenPipeError
traceback."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator

import pytest

from voice.sip import worker
from voice.sip.outcome import CallOutcome
from voice.sip.pjsua import EngineConfig
from voice.sip.protocol import (
    CallEvent,
    CallState,
    Event,
    Hangup,
    Message,
    Shutdown,
    StopAsked,
    Stopping,
    WorkerStatus,
    decode,
    encode,
)


class _Engine:
    """What run() uses of Engine; ``on_start`` and ``on_pump`` stand in for what happens
    meanwhile (a signal), and its stop hangs up one call."""

    on_start: Callable[[], None] = staticmethod(lambda: None)
    on_pump: Callable[[], None] = staticmethod(lambda: None)
    stopped = False
    made: list[_Engine]

    def __init__(
        self,
        config: EngineConfig,
        emit: Callable[[Event], None],
        wake: Callable[[], None],
        flush: Callable[[], None],
    ) -> None:
        self.emit = emit
        self.port = 9  # discard: run()'s wake-ups go there
        self.stopping = False
        type(self).made.append(self)

    def start(self) -> None:
        type(self).on_start()

    def status(self) -> WorkerStatus:
        return WorkerStatus(free_slots=4, port=self.port, placed=0)

    def handle(self, cmd: object) -> None:
        raise AssertionError(f"no command is sent here: {cmd!r}")

    def pump_ms(self, idle_ms: int) -> int:
        return 10

    def pump(self, ms: int) -> None:
        type(self).on_pump()

    def stop(self) -> None:
        type(self).stopped = True
        self.stopping = True
        self.emit(CallEvent("c1", CallState.ENDED, 200, CallOutcome.COMPLETED, 0.0))


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_Engine]]:
    class Engine(_Engine):
        made: list[_Engine] = []

    monkeypatch.setattr(worker, "Engine", Engine)
    yield Engine


@pytest.fixture
def commands() -> Iterator[int]:
    """The worker's stdin: held open (the pool is there), closed at the end (its reader
    thread then reads the end of file and ends; the read end is left to it)."""
    read_end, write_end = os.pipe()
    yield read_end
    os.close(write_end)


CONFIG = EngineConfig(host="127.0.0.1", port=0)


def test_a_sigterm_during_pjsuas_start_stops_it_once_started(
    engine: type[_Engine], commands: int
) -> None:
    terminated = worker._Terminated()
    engine.on_start = staticmethod(lambda: terminated(15, None))  # before any reader thread
    events_r, events_w = os.pipe()
    assert worker.run(CONFIG, commands, events_w, terminated=terminated) == 0
    os.close(events_w)
    with os.fdopen(events_r, "rb") as f:
        sent = [decode(line) for line in f.read().splitlines()]
    assert [type(e) for e in sent] == [WorkerStatus, Stopping, CallEvent]
    assert engine.stopped


def test_a_sigterm_as_the_pool_goes_hangs_up_and_exits_0(
    engine: type[_Engine], commands: int
) -> None:
    terminated = worker._Terminated()
    events_r, events_w = os.pipe()

    def serve_killed() -> None:
        os.close(events_r)  # serve's end of the events pipe, gone with serve
        terminated(15, None)  # the parent-death signal

    engine.on_pump = staticmethod(serve_killed)
    try:
        status = worker.run(CONFIG, commands, events_w, terminated=terminated)
    finally:
        os.close(events_w)
    assert status == 0
    assert engine.stopped, "the calls were not hung up"


def test_a_pool_gone_while_events_flow_ends_the_worker_as_its_end_of_file_does(
    engine: type[_Engine], commands: int
) -> None:
    """serve killed -9 while a call streams audio: the first write after it fails (EPIPE)
    before the end of file or the parent-death SIGTERM is seen."""
    events_r, events_w = os.pipe()

    def serve_killed() -> None:
        os.close(events_r)
        engine.made[0].emit(CallEvent("c1", CallState.ANSWERED, 200, None, 0.0))

    engine.on_pump = staticmethod(serve_killed)
    try:
        status = worker.run(CONFIG, commands, events_w)
    finally:
        os.close(events_w)
    assert status == 0
    assert engine.stopped, "the calls were not hung up"


class _Obeying(_Engine):
    """Carries out the pool's commands as pjsua's Engine does with these two: a Hangup is
    noted, a Shutdown makes it stop."""

    handled: list[object]

    def handle(self, cmd: object) -> None:
        type(self).handled.append(cmd)
        if isinstance(cmd, Shutdown):
            self.stopping = True


@pytest.fixture
def obeying(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_Obeying]]:
    class Engine(_Obeying):
        made: list[_Engine] = []
        handled: list[object] = []

    monkeypatch.setattr(worker, "Engine", Engine)
    yield Engine


def _run(
    engine: type[_Engine],
    pumps: dict[int, Callable[[worker._Terminated, int], None]],
    stop_wait_s: float,
    within_s: float = 5.0,
) -> list[Message]:
    """run() with SIGTERM's handler and a pool at stdin, as the pool starts a worker:
    ``pumps[n](handler, stdin)`` happens at the n-th pump (1 ms each); the events sent."""
    terminated = worker._Terminated()
    stdin_r, stdin_w = os.pipe()
    events_r, events_w = os.pipe()
    count = 0
    until = time.monotonic() + within_s

    def pump() -> None:
        nonlocal count
        count += 1
        assert time.monotonic() < until, "the worker did not stop"
        if count in pumps:
            pumps[count](terminated, stdin_w)
        time.sleep(0.001)

    engine.on_pump = staticmethod(pump)
    try:
        status = worker.run(
            CONFIG, stdin_r, events_w, terminated=terminated, stop_wait_s=stop_wait_s
        )
    finally:
        os.close(stdin_w)
        os.close(events_w)
    assert status == 0
    with os.fdopen(events_r, "rb") as f:
        return [decode(line) for line in f.read().splitlines()]


def _sigterm(handler: worker._Terminated, stdin: int) -> None:
    handler(signal.SIGTERM, None)


def _close_and_shut_down(handler: worker._Terminated, stdin: int) -> None:
    """The pool's drain of the call (its notice's end: the Hangup), then its Shutdown."""
    os.write(stdin, encode(Hangup("c1")) + encode(Shutdown()))


def test_a_sigterm_asks_the_pool_and_waits_for_its_shutdown(obeying: type[_Obeying]) -> None:
    """The first SIGTERM: StopAsked, and the worker goes on carrying out the pool's commands
    (the closing notice's Hangup) until its Shutdown; no Stopping (its calls end as those
    commands end them). Before, it hung its calls up at once, told nothing."""
    events = _run(obeying, {3: _sigterm, 200: _close_and_shut_down}, stop_wait_s=30)
    assert [type(e) for e in events] == [WorkerStatus, StopAsked, CallEvent], events
    assert events[1] == StopAsked(30.0)
    assert obeying.handled == [Hangup("c1"), Shutdown()]
    assert obeying.stopped


def test_a_second_sigterm_hangs_up_at_once(obeying: type[_Obeying]) -> None:
    events = _run(obeying, {3: _sigterm, 10: _sigterm}, stop_wait_s=30)
    assert [type(e) for e in events] == [WorkerStatus, StopAsked, Stopping, CallEvent], events
    assert obeying.handled == [] and obeying.stopped


def test_no_shutdown_within_the_wait_hangs_up(obeying: type[_Obeying]) -> None:
    """serve wedged (or its drain longer than the wait): the worker does not wait forever."""
    started = time.monotonic()
    events = _run(obeying, {3: _sigterm}, stop_wait_s=0.3)
    assert [type(e) for e in events] == [WorkerStatus, StopAsked, Stopping, CallEvent], events
    assert 0.3 <= time.monotonic() - started < 3.0
    assert obeying.stopped
