"""The pool and a SIP worker sent SIGTERM by someone else (StopAsked): no new call for it, its
calls closed first (serve: the clinic line's drain for them), then its Shutdown; restarted
after its exit 0 while the service runs, not when the service is stopping (its own drain
closes the calls, its Shutdown comes with every worker's). The worker's side is in
test_sip_worker_sigterm_run.py, real processes in tests/integration/test_serve_worker_sigterm.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import cast

from sip_config.clock import FakeClock
from tests.conftest import sip_settings
from voice.sip.outcome import SipStatus
from voice.sip.pool import CallHandle, SipPool, _Worker
from voice.sip.protocol import (
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
    assert pool.pick_inbound("new") == SipStatus.BUSY_HERE
    await _settled()
    assert closing == [["in-1"]]
    # A caller redirected to it just before: 503, as at a stop (another instance may take it).
    pool._dispatch(w, IncomingCall("in-2", "+4477", "6000", 2))
    assert stdin.sent == [Hangup("in-2", SipStatus.SERVICE_UNAVAILABLE)]
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
