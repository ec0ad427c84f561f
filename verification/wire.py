"""The public JSON of what the API and the webhooks both show: times and events.

One shape for both, so an app reads an event from ``GET /v1/verifications/{id}`` and from a
webhook alike: ``{"type", "at", "channel", "detail"}`` with ``at`` in ISO 8601 UTC.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from verification.model import Event

_SECONDS: dict[int, str] = {}  # whole second -> "YYYY-MM-DDTHH:MM:SS", the last few


def iso(ts: float) -> str:
    """``ts`` as ISO 8601 UTC with milliseconds, e.g. ``2026-11-29T18:12:28.123Z``.

    As ``datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")`` (the same
    rounding to the microsecond, then truncation), but the date and time of day are formatted
    once per second: an answer holds several timestamps, most of them in the same second.
    """
    frac, whole = math.modf(ts)
    us = round(frac * 1e6)
    second = int(whole)
    if us >= 1_000_000:
        second, us = second + 1, us - 1_000_000
    elif us < 0:
        second, us = second - 1, us + 1_000_000
    text = _SECONDS.get(second)
    if text is None:
        if len(_SECONDS) >= 64:
            _SECONDS.clear()
        text = _SECONDS[second] = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{us // 1000:03d}Z"


def render_event(e: Event) -> dict[str, Any]:
    """One event as the API and the webhooks show it. Never holds a code."""
    return {"type": e.kind, "at": iso(e.at), "channel": e.channel, "detail": e.detail}
