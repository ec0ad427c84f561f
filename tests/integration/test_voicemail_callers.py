"""Each number's voicemail messages of the last 24 hours, counted in a real redis-server
(voice/ivr/voicemail_callers.py) by the clinic line's admission (clinic_voice/clinic_line.py):
shared by every serve on one Redis, kept across a restart, never under the number itself, and
not applied while Redis is down."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from clinic_voice.app import Runtime
from clinic_voice.clinic_line import ClinicLine
from clinic_voice.metrics import Metrics
from sip_config.clock import FakeClock
from sip_config.settings import Settings
from tests.conftest import RedisServer
from verification.redis_mux import RedisMux
from voice.ivr.flow import FlowSet
from voice.ivr.store import CallStore
from voice.ivr.voicemail import Voicemails
from voice.ivr.voicemail_callers import PREFIX, CallerCounts, digest_key

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]

SECRET = b"s" * 32
NUMBER = "+31612345678"
T0 = 1.8e9

Line = Callable[[], Awaitable[ClinicLine]]


@pytest.fixture
async def new_line(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[Line]:
    """A clinic line as serve wires it, on the test's Redis (a Redis link of its own, a data
    dir of its own, as a second serve on another host has): each call makes another."""
    muxes: list[RedisMux] = []
    clock = FakeClock(T0)

    async def make() -> ClinicLine:
        data = tmp_path / f"serve-{len(muxes)}"
        data.mkdir()
        settings = Settings.from_env(
            {
                "CLINIC_DATA_DIR": str(data),
                "CLINIC_VOICEMAIL_MIN_FREE_MB": "0",
                "CLINIC_VOICEMAIL_PER_CALLER_DAY": "2",
            }
        )
        rt = Runtime(settings=settings, clock=clock, metrics=Metrics(), secret=SECRET)
        mux = RedisMux(redis_server.url, timeout_s=0.5)
        muxes.append(mux)
        rt.call_store = CallStore(mux, SECRET, 30, clock=clock)
        rt.voicemails = Voicemails(data / "voicemail", rt.call_store)
        rt.voicemail_callers = CallerCounts(mux, digest_key(SECRET), clock)
        return ClinicLine(settings, rt, FlowSet(flows={}))

    make.clock = clock  # type: ignore[attr-defined]
    try:
        yield make
    finally:
        for mux in muxes:
            await mux.aclose()


async def test_two_serves_on_one_redis_share_a_numbers_count(new_line: Line) -> None:
    """Before, each serve counted in its own memory: two allowed 2 a day each."""
    a, b = await new_line(), await new_line()
    assert await a._admit_message("in-1", NUMBER, 60) == ""
    assert await b._admit_message("in-2", NUMBER, 60) == ""
    assert await a._admit_message("in-3", NUMBER, 60) == "caller_limit"
    assert await b._admit_message("in-4", NUMBER, 60) == "caller_limit"
    a._message_done("in-1", True)
    b._message_done("in-2", True)
    assert await b._admit_message("in-5", NUMBER, 60) == "caller_limit"
    # Another number is not held to it.
    assert await b._admit_message("in-6", "+31612345679", 60) == ""


async def test_a_restart_forgets_no_count(new_line: Line) -> None:
    first = await new_line()
    for call_id in ("in-1", "in-2"):
        assert await first._admit_message(call_id, NUMBER, 60) == ""
        first._message_done(call_id, True)
    await first.stop()
    again = await new_line()  # serve started afresh, on the same Redis
    assert await again._admit_message("in-3", NUMBER, 60) == "caller_limit"


async def test_a_message_not_kept_gives_its_place_back(new_line: Line) -> None:
    line = await new_line()
    for call_id in ("in-1", "in-2", "in-3"):
        assert await line._admit_message(call_id, NUMBER, 60) == "", call_id
        line._message_done(call_id, False)  # silence, or a failed save
        await line.stop()  # waits for the place to be given back
    assert await line._admit_message("in-4", NUMBER, 60) == ""


async def test_redis_holds_no_number_and_forgets_it_after_a_day(
    new_line: Line, redis_server: RedisServer, mux: RedisMux
) -> None:
    line = await new_line()
    for call_id in ("in-1", "in-2"):
        assert await line._admit_message(call_id, NUMBER, 60) == ""
        line._message_done(call_id, True)
    keys = await mux.execute("KEYS", "*")
    assert len(keys) == 1 and keys[0].startswith(PREFIX), keys
    members = await mux.execute("ZRANGE", keys[0], 0, -1)
    dump = " ".join([keys[0], *members])
    assert "612345678" not in dump and "in-1" not in dump, dump  # neither number nor call
    assert 86_000 < int(await mux.execute("TTL", keys[0])) <= 86_400
    # A sliding 24 hours: a second before the first message's day ends, none; then one.
    clock: FakeClock = new_line.clock  # type: ignore[attr-defined]
    clock.advance(86_400 - 1)
    assert await line._admit_message("in-3", NUMBER, 60) == "caller_limit"
    clock.advance(1)
    assert await line._admit_message("in-4", NUMBER, 60) == ""


async def test_while_redis_is_down_the_limit_is_not_applied(
    new_line: Line, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A patient's message is never refused because the count cannot be read (the disk
    floor and the cap still hold): one WARNING, then one when it applies again."""
    line = await new_line()
    for call_id in ("in-1", "in-2"):
        assert await line._admit_message(call_id, NUMBER, 60) == ""
        line._message_done(call_id, True)
    caplog.set_level(logging.WARNING, logger="clinic_voice.clinic_line")
    await asyncio.to_thread(redis_server.stop)
    for call_id in ("in-3", "in-4"):
        assert await line._admit_message(call_id, NUMBER, 60) == "", call_id
        line._message_done(call_id, True)
    assert caplog.text.count("is not applied until it answers again") == 1
    assert NUMBER not in caplog.text
    await asyncio.to_thread(redis_server.restart)
    deadline = asyncio.get_running_loop().time() + 10
    while (refused := await line._admit_message("in-5", NUMBER, 60)) == "":
        line._message_done("in-5", False)
        assert asyncio.get_running_loop().time() < deadline, "Redis did not come back"
        await asyncio.sleep(0.1)
    assert refused == "caller_limit"
    assert "CLINIC_VOICEMAIL_PER_CALLER_DAY applies again" in caplog.text


async def test_callers_who_withhold_their_number_do_not_share_one_count(new_line: Line) -> None:
    """Before, "anonymous" (RFC 3323) was one number: its first messages of the day left
    every other caller who withholds theirs with none."""
    line = await new_line()
    for n, caller in enumerate(("anonymous", "anonymous", "", "unknown")):
        assert await line._admit_message(f"in-{n}", caller, 60) == "", caller
        line._message_done(f"in-{n}", True)
    # A number is still held to its count.
    for call_id in ("in-8", "in-9"):
        assert await line._admit_message(call_id, NUMBER, 60) == ""
        line._message_done(call_id, True)
    assert await line._admit_message("in-10", NUMBER, 60) == "caller_limit"
