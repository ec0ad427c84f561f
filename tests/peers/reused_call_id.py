"""A worker's :class:`voice.sip.pjsua.Engine`, run in this process (one Endpoint per
process), whose dead call is freed after pjsua gave its call id to a new call (pjsip#3856).

Run as ``python -m tests.peers.reused_call_id same_pump|kept_reference``: prints one JSON
object, what became of the new call, and exits 0 (1 when the setup itself went wrong, with
the reason).

The engine calls itself (sip:...@its own address), so each call takes two of its four pjsua
slots (the outbound leg and the inbound one): calls A and B fill all four. B ends, and new
call E takes B's call id (pjsua hands ids out round-robin, and B's are the only free ones)
while B's ``Call`` is still referenced: by the engine's own dead calls, when B's far end
hangs up and E is placed before the next pump (``same_pump``), or by a reference kept
elsewhere, as an exception's traceback keeps one (``kept_reference``). Then it is dropped:
pjsua2's ``Call::~Call`` clears the user data of the call id it names and hangs it up,
which is E's now. E must stay up, and report its end when it is hung up.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable

from voice.sip.pjsua import Engine, EngineConfig
from voice.sip.protocol import (
    Answer,
    CallEvent,
    CallState,
    Event,
    Hangup,
    IncomingCall,
    PlaceCall,
)

DEADLINE_S = 5.0


SCENARIOS = ("same_pump", "kept_reference")


def main(argv: list[str] | None = None) -> int:
    """Run the scenario named by the one argument; print its JSON result."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("scenario", choices=SCENARIOS)
    scenario = parser.parse_args(argv).scenario
    events: list[Event] = []
    engine = Engine(EngineConfig("127.0.0.1", 0), events.append)
    engine.start()
    try:
        result = _scenario(engine, events, scenario)
    except _SetupError as exc:
        result = {"setup_failed": str(exc)}
    finally:
        engine.stop()
    print(json.dumps(result), flush=True)
    return 1 if "setup_failed" in result else 0


class _SetupError(Exception):
    pass


def _pump_until(engine: Engine, what: str, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not done():
        if time.monotonic() > deadline:
            raise _SetupError(f"no {what} within {DEADLINE_S:g} s")
        engine.pump(10)


def _reached(events: list[Event], call_id: str, state: CallState) -> bool:
    return any(
        isinstance(ev, CallEvent) and ev.call_id == call_id and ev.state is state for ev in events
    )


def _ended(events: list[Event], call_id: str) -> bool:
    return _reached(events, call_id, CallState.ENDED)


def _incoming(events: list[Event], seen: set[str]) -> str | None:
    for ev in events:
        if isinstance(ev, IncomingCall) and ev.call_id not in seen:
            return ev.call_id
    return None


def _place(engine: Engine, events: list[Event], call_id: str) -> set[str]:
    """Call ourselves; returns the inbound legs seen before, to find this call's."""
    seen = {ev.call_id for ev in events if isinstance(ev, IncomingCall)}
    engine.handle(
        PlaceCall(call_id, f"sip:6000@127.0.0.1:{engine.port}", "+31201234567", False, 0, 30, False)
    )
    return seen


def _inbound_leg(engine: Engine, events: list[Event], call_id: str, seen: set[str]) -> str:
    _pump_until(engine, f"inbound leg of {call_id}", lambda: _incoming(events, seen) is not None)
    inbound = _incoming(events, seen)
    assert inbound is not None
    return inbound


def _answered_call(engine: Engine, events: list[Event], call_id: str) -> str:
    """An answered call to ourselves; returns its inbound leg's id."""
    inbound = _inbound_leg(engine, events, call_id, _place(engine, events, call_id))
    engine.handle(Answer(inbound))
    _pump_until(
        engine, f"answer of {call_id}", lambda: _reached(events, call_id, CallState.ANSWERED)
    )
    return inbound


def _scenario(engine: Engine, events: list[Event], scenario: str) -> dict[str, object]:
    _answered_call(engine, events, "A")
    b_in = _answered_call(engine, events, "B")
    if engine.free_slots() != 0:
        raise _SetupError(f"A and B should take all four slots: {engine.free_slots()} free")
    b_id = engine._calls["B"].getId()
    if scenario == "same_pump":
        # B's far end hangs up: B's end and the free slot come in one pump, and E, placed
        # before the next one (a command, an INVITE), takes B's id while the engine still
        # holds B among its dead calls, which the next pump drops.
        engine.handle(Hangup(b_in))
        _pump_until(engine, "end of B", lambda: _ended(events, "B"))
        seen = _place(engine, events, "E")
        if engine._calls["E"].getId() != b_id:
            raise _SetupError(f"E got call id {engine._calls['E'].getId()}, not B's {b_id}")
        e_in = _inbound_leg(engine, events, "E", seen)
    else:
        # B's ``Call`` kept (as an exception's traceback keeps one) until its id is E's.
        b = engine._calls["B"]
        engine.handle(Hangup("B"))
        _pump_until(engine, "end of B", lambda: _ended(events, "B") and _ended(events, b_in))
        # pjsua frees the slots once the BYE's transaction is done: E waits for them (redial).
        e_in = _inbound_leg(engine, events, "E", _place(engine, events, "E"))
        if engine._calls["E"].getId() != b_id:
            raise _SetupError(f"E got call id {engine._calls['E'].getId()}, not B's {b_id}")
        del b
    gc.collect()
    # A second's pumping: E rings on (its inbound leg was not answered).
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        engine.pump(10)
    up_after_free = not _ended(events, "E") and not _ended(events, e_in)
    engine.handle(Hangup("E"))
    deadline = time.monotonic() + DEADLINE_S
    while not (_ended(events, "E") and _ended(events, e_in)) and time.monotonic() < deadline:
        engine.pump(10)
    return {
        "e_up_after_b_was_freed": up_after_free,
        "e_end_reported": _ended(events, "E"),
        "e_inbound_end_reported": _ended(events, e_in),
        "free_slots": engine.free_slots(),  # A's two legs are still up
    }


if __name__ == "__main__":
    sys.exit(main())
