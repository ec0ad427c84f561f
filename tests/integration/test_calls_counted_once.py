"""Every clinic-line call counts once in ``clinic_calls_total``, wherever ``serve`` is killed
around its end or during the next start's replay (voice/ivr/journal.py), against a real
redis-server and real files.

A ``serve`` here is a clinic line on its own runtime (its own metrics: a Prometheus counter
is the process's own) over a data dir, all sharing one Redis. A kill is a copy of the data
dir's two folders made at that moment (what a ``kill -9`` leaves on disk; Redis keeps what
it took), with what that ``serve`` had counted by then; the next ``serve`` starts on the
copy. "Counted once": the counts of every ``serve`` add up to 1, the dead one's included.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest

from clinic_voice.app import Runtime
from clinic_voice.clinic_line import ClinicLine
from clinic_voice.metrics import Metrics
from sip_config.clock import SystemClock
from sip_config.settings import Settings
from tests.conftest import RedisServer
from tests.integration.conftest import StoredCall
from verification.redis_mux import RedisMux
from voice.ivr.call_record import CallResult
from voice.ivr.engine import LOST_OUTCOME, CallRecord
from voice.ivr.flow import FlowSet
from voice.ivr.journal import FOLDER, LIVE_FOLDER, CallJournal
from voice.ivr.session import CallSession, SessionDeps
from voice.ivr.store import CallStore, CallStoreUnavailable
from voice.ivr.voicemail import Voicemails
from voice.sip.pool import CallHandle

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]

SECRET = b"s" * 32
CALLER = StoredCall.caller
RECORD = CallRecord("triage", (), (("complaint", "rash"),), None, (), None, "6100", "transferred")
DEADLINE_S = 10.0


class _Serve:
    """One ``serve``: a clinic line on its own runtime and metrics, over ``data``."""

    def __init__(self, data: Path, mux: RedisMux, redis_server: RedisServer) -> None:
        self.data = data
        settings = Settings.from_env(
            {"CLINIC_DATA_DIR": str(data), "CLINIC_REDIS_URL": redis_server.url}
        )
        self.rt = Runtime(settings=settings, clock=SystemClock(), metrics=Metrics(), secret=SECRET)
        self.store = CallStore(mux, SECRET, settings.ivr.call_retention_days)
        self.rt.call_store = self.store
        self.rt.voicemails = Voicemails(data / "voicemail", self.store)  # as build_app does
        self.line = ClinicLine(settings, self.rt, FlowSet(flows={}))
        self.journal: CallJournal = self.line._new_journal()  # as start() makes it
        self.line._journal = self.journal

    def counted(self) -> dict[str, float]:
        """``clinic_calls_total`` of this serve, by outcome."""
        return {dict(labels)["outcome"]: v for labels, v in self.line._rt.metrics.calls.snapshot()}

    def session(self, call_id: str, **deps: Any) -> CallSession:
        """A call on this serve's line (its store step and live record), its deps changed by
        ``deps``."""
        unused: Any = None  # the store step needs no flows, prompts or speech
        journal = self.journal
        base = SessionDeps(
            engine=unused,
            flowset=unused,
            renderer=unused,
            speech=None,
            post_webhook=unused,
            save_recording=unused,
            save=self.line._save,
            keep=self.line._keep,
            clock=SystemClock(),
            write_ahead=journal.write_ahead,
            begin=journal.begin,
            end=journal.end,
            taken=journal.taken,
        )
        session = CallSession(cast(CallHandle, StoredCall(call_id)), replace(base, **deps))
        session._started_at = time.time() - 60
        return session

    async def start_and_replay(self) -> None:
        """What a start does with the disk an earlier serve left, till nothing is on it."""
        ids = await self.journal.leftovers(time.time())
        replaying = asyncio.create_task(self.line._replay_journal(self.journal, ids))
        try:
            async with asyncio.timeout(DEADLINE_S):
                while await asyncio.to_thread(self.files):  # noqa: ASYNC110 (a deadline)
                    await asyncio.sleep(0.05)
        finally:
            replaying.cancel()
            await asyncio.gather(replaying, return_exceptions=True)

    def files(self) -> list[str]:
        folders = (self.data / FOLDER, self.data / LIVE_FOLDER)
        return sorted(p.name for f in folders if f.is_dir() for p in f.iterdir())


def _killed_copy(serve: _Serve, to: Path) -> None:
    """What ``kill -9`` of ``serve`` now leaves on disk, copied to ``to``."""
    for folder in (FOLDER, LIVE_FOLDER):
        if (serve.data / folder).is_dir():
            shutil.copytree(serve.data / folder, to / folder)


def _result(call_id: str, ended_at: float) -> CallResult:
    return CallResult(call_id, CALLER, "700", ended_at - 60, ended_at, RECORD)


def _lost(call_id: str, at: float) -> CallResult:
    cut = CallRecord("triage", (), (), None, (), None, None, LOST_OUTCOME)
    return CallResult(call_id, CALLER, "700", at - 60, at - 30, cut)


async def test_a_call_killed_during_its_own_save_is_counted_at_the_next_start(
    mux: RedisMux, redis_server: RedisServer, tmp_path: Path
) -> None:
    # serve killed in the milliseconds of a call's own save: its record written ahead, its
    # live record not yet deleted, nothing counted. The next start saved the copy written
    # ahead (not counted: it was taken for a kept record's copy), then found the live record
    # KEPT (the call's own record there) and did not count that either: the call was in
    # GET /v1/calls and never in clinic_calls_total.
    first = _Serve(tmp_path / "data", mux, redis_server)
    now = time.time()
    await first.journal.begin(_lost("in-saving", now))
    await first.journal.write_ahead(_result("in-saving", now))
    # killed here: Redis never got the save
    assert first.counted() == {}

    second = _Serve(tmp_path / "data", mux, redis_server)  # the next start, on that disk
    await second.start_and_replay()
    got = await second.store.get("in-saving")
    assert got is not None and got["outcome"] == "transferred"
    assert second.counted() == {"transferred": 1}


Step = Callable[..., Awaitable[None]]


async def _forever() -> None:
    await asyncio.Event().wait()


# Where serve is killed as a call ends: (the dep wrapped, whether it runs before the kill).
# The session's steps in order: write ahead, save to Redis, the copy goes and the call counts
# (taken), the live record goes (end).
KILLS = {
    "before_write_ahead": ("write_ahead", False),
    "after_write_ahead": ("save", False),  # Redis not yet asked
    "after_redis_save": ("save", True),  # Redis took it; the copy written ahead still there
    "after_count": ("end", False),  # the copy gone, the call counted; its live record there
}


@pytest.mark.parametrize("kill", list(KILLS))
async def test_a_call_counts_once_wherever_serve_is_killed_as_it_ends(
    kill: str, mux: RedisMux, redis_server: RedisServer, tmp_path: Path
) -> None:
    first = _Serve(tmp_path / "first", mux, redis_server)
    dep, runs = KILLS[kill]
    killed = asyncio.Event()
    at_kill: dict[str, float] = {}

    def killing(step: Step) -> Step:
        async def wrapped(*args: Any) -> None:
            if runs:
                await step(*args)
            await asyncio.to_thread(_killed_copy, first, tmp_path / "second")
            at_kill.update(first.counted())
            killed.set()
            await _forever()  # dead: nothing more of this serve happens

        return wrapped

    steps: dict[str, Step] = {
        "write_ahead": first.journal.write_ahead,
        "save": first.line._save,
        "end": first.journal.end,
    }
    session = first.session("in-killed", **{dep: killing(steps[dep])})
    session._begin("triage")
    assert session._live_task is not None
    await session._live_task

    async def call_ends() -> None:
        await session._store(RECORD)
        for task in list(session._tasks):  # the live record's refresh
            task.cancel()
        await session._end_live()

    ending = asyncio.create_task(call_ends())
    async with asyncio.timeout(DEADLINE_S):
        await killed.wait()
    dead = [ending, *session._tasks]
    if session._live_task is not None:
        dead.append(session._live_task)
    for task in dead:  # the dead serve's, on its own disk: not looked at any more
        task.cancel()
    await asyncio.gather(*dead, return_exceptions=True)

    second = _Serve(tmp_path / "second", mux, redis_server)
    await second.start_and_replay()
    got = await second.store.get("in-killed")
    assert got is not None
    expected = LOST_OUTCOME if kill == "before_write_ahead" else "transferred"
    assert got["outcome"] == expected
    total = sum(at_kill.values()) + sum(second.counted().values())
    assert total == 1, (at_kill, second.counted())
    assert {**at_kill, **second.counted()} == {expected: 1}


async def test_a_call_kept_because_redis_was_down_is_not_counted_again(
    mux: RedisMux, redis_server: RedisServer, tmp_path: Path
) -> None:
    # Redis refused the save: the record was kept on disk, and the call counted then. serve
    # is killed before the live record went: the next start saves both records' own, and
    # counts nothing.
    first = _Serve(tmp_path / "first", mux, redis_server)

    async def refused(result: CallResult) -> None:
        raise CallStoreUnavailable("down")

    session = first.session("in-kept", save=refused)
    session._begin("triage")
    assert session._live_task is not None
    await session._live_task
    await session._store(RECORD)
    for task in list(session._tasks):
        task.cancel()
    await asyncio.gather(*session._tasks, return_exceptions=True)
    assert first.counted() == {"transferred": 1}
    assert first.files() == ["in-kept.sealed", "in-kept.sealed"]  # kept, and live
    await asyncio.to_thread(_killed_copy, first, tmp_path / "second")

    second = _Serve(tmp_path / "second", mux, redis_server)
    await second.start_and_replay()
    got = await second.store.get("in-kept")
    assert got is not None and got["outcome"] == "transferred"
    assert second.counted() == {}


@pytest.mark.parametrize("kill", ["after_leftovers", "after_replay", "both_copies"])
async def test_a_replay_killed_midway_counts_the_call_once(
    kill: str, mux: RedisMux, redis_server: RedisServer, tmp_path: Path
) -> None:
    # The first serve was killed during the call's save (its record written ahead, its live
    # record there). The second is killed in its start: after the copy was made a kept
    # record (and the call counted), or after the replay saved it (before the live record
    # was dealt with). both_copies: the first was killed as it kept the record (Redis
    # down), between writing the kept record and deleting the copy written ahead, before
    # it counted. A third start finishes.
    now = time.time()
    first = _Serve(tmp_path / "first", mux, redis_server)
    await first.journal.begin(_lost("in-replay", now))
    await first.journal.write_ahead(_result("in-replay", now))
    if kill == "both_copies":
        plain = CallJournal(first.data / FOLDER, first.store)  # counts nothing
        await plain.keep(_result("in-replay", now))
        await plain.write_ahead(_result("in-replay", now))
    counts = [sum(first.counted().values())]
    await asyncio.to_thread(_killed_copy, first, tmp_path / "second")

    second = _Serve(tmp_path / "second", mux, redis_server)
    if kill == "both_copies":
        await second.start_and_replay()
    else:
        await second.journal.leftovers(time.time())
        if kill == "after_replay":
            await second.journal.replay(time.time())
            assert await second.store.get("in-replay") is not None
        counts.append(sum(second.counted().values()))
        await asyncio.to_thread(_killed_copy, second, tmp_path / "third")
        second = _Serve(tmp_path / "third", mux, redis_server)
        await second.start_and_replay()
    counts.append(sum(second.counted().values()))
    got = await second.store.get("in-replay")
    assert got is not None and got["outcome"] == "transferred"
    assert sum(counts) == 1, counts
