"""Shared reading of a call's events for the call-based channels."""

from __future__ import annotations

from voice.sip.pool import CallHandle, HandleEvent
from voice.sip.protocol import CallEvent, CallState


class CallEnded(Exception):
    """The call ended while a channel waited for something else."""

    def __init__(self, event: CallEvent) -> None:
        super().__init__(f"call ended: {event.outcome}")
        self.event = event


async def next_event(handle: CallHandle, timeout_s: float) -> HandleEvent | None:
    """The next event, None after ``timeout_s``, :class:`CallEnded` at the end of the call."""
    try:
        ev = await handle.next_event(timeout=timeout_s)
    except TimeoutError:
        return None
    if isinstance(ev, CallEvent) and ev.state is CallState.ENDED:
        raise CallEnded(ev)
    return ev


def describe(event: CallEvent) -> str:
    """``busy (486)`` style detail for events; never holds a caller-ID."""
    outcome = event.outcome.value if event.outcome else "ended"
    return f"{outcome} ({event.sip_status})" if event.sip_status else outcome
