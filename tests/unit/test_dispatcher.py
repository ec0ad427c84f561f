"""The dispatcher's pure helpers and which sends a move stops (its sends run against real
peers in tests/integration)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sip_config.clock import SystemClock
from sip_config.settings import Settings
from verification import rules
from verification.dispatcher import Dispatcher, id_lines
from verification.model import Channel, NumberKind, Phone, Policy


@pytest.mark.parametrize(
    ("count", "lines"),
    [
        (0, []),
        (1, ["v0"]),
        (3, ["v0, v1, v2"]),
        (4, ["v0, v1, v2", "v3"]),
        (7, ["v0, v1, v2", "v3, v4, v5", "v6"]),
    ],
)
def test_a_shutdown_names_every_id_a_few_to_a_line(count: int, lines: list[str]) -> None:
    assert id_lines({f"v{n}": None for n in range(count)}, per_line=3) == lines


# -- a move on stops the send of the step it leaves -------------------------------------------

MOBILE = Phone("+31612345678", "NL", 31, "612345678", NumberKind.MOBILE)


def _dispatcher() -> Dispatcher:
    settings = Settings.from_env({"CLINIC_API_KEYS": "k" * 16, "CLINIC_SECRET": "s" * 32})
    unused: Any = None  # changed() reaches neither the store nor a channel
    return Dispatcher(
        store=unused,
        channels={},
        settings=settings.verification,
        policy=Policy(),
        secret=b"s" * 32,
        clinic_name="Oak",
        clock=SystemClock(),
    )


async def _moved(from_step: int, to_step: int) -> dict[str, bool]:
    """Which tasks ``changed`` cancelled, for a move from ``from_step`` to ``to_step`` of a
    voice, SMS plan (to 2: past its end)."""
    d = _dispatcher()
    plan = (Channel.VOICE, Channel.SMS)
    old = rules.create(
        verification_id="v1", phone=MOBILE, plan=plan, code_length=6, now=0.0, policy=Policy()
    ).verification.changed(step=from_step)
    never = asyncio.Event()

    async def send() -> None:
        await never.wait()

    tasks = {
        "the step left": d._spawn(send(), "send v1 0", "v1", from_step),
        "another step": d._spawn(send(), "send v1 1", "v1", from_step + 1),
        "kept reports": d._spawn(send(), "reports v1", "v1"),
    }
    d.changed(old, old.changed(step=to_step))
    await asyncio.sleep(0)
    cancelled = {name: task.cancelled() or task.cancelling() > 0 for name, task in tasks.items()}
    for task in tasks.values():
        task.cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    return cancelled


async def test_a_move_stops_only_the_send_of_the_step_it_leaves() -> None:
    # A /fallback while the voice call rang left it ringing beside the next channel's send.
    # Kept reports of the step left still go in (they are its record, not a send).
    assert await _moved(0, 1) == {
        "the step left": True,
        "another step": False,
        "kept reports": False,
    }


async def test_a_move_past_the_plan_s_end_stops_nothing() -> None:
    # Nothing follows the last step: its call may still read the code (the review found the
    # step timer hanging one up mid-reading, for nothing).
    assert await _moved(1, 2) == {
        "the step left": False,
        "another step": False,
        "kept reports": False,
    }
