"""The pool and a SIP worker sent SIGTERM by someone else (StopAsked): no new call for it, its
calls closed first (serve: the clinic line's drain for them), then its Shutdown; restarted
after its exit 0 while the service runs, not when the service is stopping (its own drain
closes the calls, its Shutdown comes with every worker's). The worker's side is in
test_sip_worker_sigterm_run.py, real processes in tests/integration/test_serve_worker_sigterm.py.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import cast

from sip_config.clock import FakeClock
from sip_config.settings import HostPort
from tests.conftest import sip_settings
from voice.sip.outcome import CallOutcome, SipStatus
from voice.sip.pool import STOP_TAIL_S, CallHandle, SipPool, _Worker
from voice.sip.protocol import (
    CallEvent,
    CallState,
    Hangup,
    IncomingCall,
    Message,
    Shutdown,
    StopAsked,
    decode,
)


class _Stdin:
    def __init__(self) -> None:
        self.sent: list[Message] = []

    def write(self, data: bytes) -> None:
        self.sent.extend(decode(line) for line in data.splitlines())


class _Process:
    """What the pool uses of a worker's process here: its pid and its stdin."""

    pid = 4242
    returncode: int | None = None

    def __init__(self) -> None:
        self.stdin = _Stdin()


def _up(pool: SipPool) -> tuple[_Worker, _Stdin]:
    w = pool._workers[0]
    process = _Process()
    w.process = cast(asyncio.subprocess.Process, process)
    w.up, w.free_slots, w.port = True, 3, 5062
    w.calls["in-1"] = CallHandle(pool, w, "in-1")
    return w, process.stdin


async def _settled() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_its_calls_are_closed_then_it_gets_its_shutdown_and_is_restarted() -> None:
    closing: list[list[str]] = []
    closed = asyncio.Event()

    async def close_calls(calls: Sequence[CallHandle]) -> None:
        closing.append([call.id for call in calls])
        await closed.wait()

    pool = SipPool(sip_settings(1), clock=FakeClock(), close_calls=close_calls, close_s=40)
    pool._running = True
    w, stdin = _up(pool)
    w.reserved["redirected"] = 1e9
    pool._dispatch(w, StopAsked(45.0))
    assert not w.up and w.available == 0 and not w.reserved  # no new call goes to it
    # Its only worker: none takes calls, nobody is busy (see the test below).
    assert pool.pick_inbound("new") == SipStatus.SERVICE_UNAVAILABLE
    await _settled()
    assert closing == [["in-1"]]
    # A caller redirected to it just before: 503, as at a stop (another instance may take it).
    pool._dispatch(w, IncomingCall("in-2", "+4477", "6000", 2))
    # Retry-After: the worker's calls' closing time (close_s) and the stop's tail after it.
    retry_after_s = math.ceil(40 + STOP_TAIL_S)
    assert stdin.sent == [Hangup("in-2", SipStatus.SERVICE_UNAVAILABLE, retry_after_s)]
    pool._dispatch(w, CallEvent("in-2", CallState.ENDED, 503, CallOutcome.REJECTED, 0.0))
    pool._dispatch(w, CallEvent("in-1", CallState.ENDED, 200, CallOutcome.COMPLETED, 0.0))
    closed.set()  # the notice heard, the call over
    await _settled()
    assert stdin.sent[1:] == [Shutdown()]
    pool._on_exit(w, 0)
    restarts = [t for t in pool._tasks if t.get_name() == "sip-restart-0"]
    assert restarts, "a worker short: it must be started again"
    for task in list(pool._tasks):
        task.cancel()
    await asyncio.gather(*pool._tasks, return_exceptions=True)


async def test_when_the_service_stops_its_own_drain_closes_the_calls_and_no_restart() -> None:
    async def close_calls(calls: Sequence[CallHandle]) -> None:
        raise AssertionError("the stop's drain closes them")

    pool = SipPool(sip_settings(1), clock=FakeClock(), close_calls=close_calls, close_s=40)
    pool._running = True
    pool.refuse_new_calls()  # serve's stop began: systemd signalled every process at once
    w, stdin = _up(pool)
    pool._dispatch(w, StopAsked(45.0))
    await _settled()
    assert not pool._tasks and stdin.sent == []  # its Shutdown comes with the stop's
    pool._on_exit(w, 0)
    assert not pool._tasks, "started again as the service stops"


async def test_its_outbound_calls_end_before_its_shutdown_within_the_closing_time() -> None:
    """A voice code being read (or a flash call ringing) on it is no caller for the line to
    close: a Shutdown at once cut it mid-code while the service went on. It gets the time
    the callers get (``close_s``), no more: the worker waits only a margin beyond that."""

    async def close_calls(calls: Sequence[CallHandle]) -> None:
        return None  # no caller of the line's on it: nothing to close

    pool = SipPool(sip_settings(1), clock=FakeClock(), close_calls=close_calls, close_s=40)
    pool._running = True
    w, stdin = _up(pool)
    del w.calls["in-1"]
    w.calls["out-1"] = code = CallHandle(pool, w, "out-1")  # a voice code being read
    pool._dispatch(w, StopAsked(45.0))
    await _settled()
    assert stdin.sent == [], "its Shutdown came with a patient's code still being read"
    pool._dispatch(w, CallEvent("out-1", CallState.ENDED, 200, CallOutcome.COMPLETED, 0.0))
    await _settled()
    assert code.cut == "" and stdin.sent == [Shutdown()]
    for task in list(pool._tasks):
        task.cancel()
    await asyncio.gather(*pool._tasks, return_exceptions=True)


async def test_an_outbound_call_that_goes_on_is_hung_up_by_its_shutdown_at_the_closing_time() -> (
    None
):
    pool = SipPool(sip_settings(1), clock=FakeClock(), close_s=0.05)
    pool._running = True
    w, stdin = _up(pool)
    w.calls["out-1"] = CallHandle(pool, w, "out-1")
    pool._dispatch(w, StopAsked(5.05))
    await _settled()
    assert stdin.sent == []
    (let_go,) = (t for t in pool._tasks if t.get_name() == "sip-let-go-0")
    async with asyncio.timeout(5):  # close_s, and not for ever
        await let_go
    assert stdin.sent == [Shutdown()]


async def test_with_every_worker_asked_to_stop_a_caller_gets_503_not_a_busy_clinic() -> None:
    """Two workers sent SIGTERM at once (``pkill -f voice.sip.worker``): for the drain and the
    notice no worker takes calls. A caller then got 486 and counted as refused_busy, the
    sign that the clinic needs more slots; nobody was busy: 503, as at a stop."""
    busy: list[int] = []
    pool = SipPool(sip_settings(2), clock=FakeClock(), on_busy=lambda: busy.append(1), close_s=40)
    pool._running = True
    for w in pool._workers:
        w.process = cast(asyncio.subprocess.Process, _Process())
        w.up, w.free_slots, w.port = True, 4, 5062 + w.index
    first, second = pool._workers
    pool._dispatch(first, StopAsked(45.0))
    assert isinstance(pool.pick_inbound("a"), HostPort)  # to the other one
    second.free_slots = 1  # the other one full: busy indeed
    assert pool.pick_inbound("b") == SipStatus.BUSY_HERE and busy == [1]
    second.free_slots = 4
    pool._dispatch(second, StopAsked(45.0))
    assert pool.pick_inbound("c") == SipStatus.SERVICE_UNAVAILABLE
    assert busy == [1] and pool.stats()["refused_busy"] == 1
    for task in list(pool._tasks):
        task.cancel()
    await asyncio.gather(*pool._tasks, return_exceptions=True)


async def test_once_the_pool_stops_its_shutdown_is_the_stop_s_not_a_second_one() -> None:
    closed = asyncio.Event()

    async def close_calls(calls: Sequence[CallHandle]) -> None:
        await closed.wait()

    pool = SipPool(sip_settings(1), clock=FakeClock(), close_calls=close_calls, close_s=40)
    pool._running = True
    w, stdin = _up(pool)
    pool._dispatch(w, StopAsked(45.0))
    await _settled()
    pool._running = False  # stop() began: it sends every worker up or leaving its Shutdown
    pool._dispatch(w, CallEvent("in-1", CallState.ENDED, 200, CallOutcome.COMPLETED, 0.0))
    closed.set()
    await _settled()
    assert stdin.sent == [], "a second Shutdown, to a worker on its way out"
