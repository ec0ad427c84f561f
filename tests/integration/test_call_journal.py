"""The journal of unsaved calls (voice/ivr/journal.py) against a real redis-server: a record
Redis does not take within the save's patience, or whose save is cut short by the call's task
being cancelled (a stop), is kept on disk sealed and private, and replayed into Redis once it
is back; the replay deletes what it saved and what is past its retention, and never saves a
call erased meanwhile.

The session's ``_store`` is driven directly, with a stand-in for the SIP call (it only needs
the call's id and numbers); the patience is shortened instead of waiting 30 s.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import pytest

from clinic_voice.app import Runtime
from clinic_voice.clinic_line import ClinicLine
from clinic_voice.metrics import Metrics
from sip_config.clock import FakeClock, SystemClock
from sip_config.private_file import write_private as real_write_private
from sip_config.settings import Settings
from tests.conftest import RedisServer
from tests.unit.test_ivr_session_races import Rig, _digit, _done, _to_breathing
from verification.redis_mux import RedisMux
from voice.ivr import journal as journal_module
from voice.ivr import session as session_module
from voice.ivr.call_record import CallResult
from voice.ivr.engine import LOST_OUTCOME, CallRecord
from voice.ivr.erasure import CallErasure, CallUnderWay, Erasure
from voice.ivr.flow import FlowSet
from voice.ivr.journal import FOLDER, LIVE_FOLDER, CallJournal, Replayed
from voice.ivr.session import CallSession, SessionDeps
from voice.ivr.store import CallStore, CallStoreUnavailable, Erased
from voice.ivr.voicemail import Voicemails
from voice.media.tts import PromptRenderer
from voice.sip.caller_identity import CallerIdentity
from voice.sip.pool import CallHandle

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]

SECRET = b"s" * 32
DAY_S = 86400
CALLER = "+31612345678"
# What the patient said: none of it may reach the disk in clear.
VALUES = (("complaint", "chest-pain-radiating"), ("breathing", "laboured"))
RECORD = CallRecord("triage", (), VALUES, None, (), None, "6100", "transferred")


class _Call:
    """What ``CallSession._store`` reads of a SIP call."""

    def __init__(self, call_id: str) -> None:
        self.id = call_id
        self.caller = CALLER
        self.caller_identity = CallerIdentity.CLAIMED
        self.called = "700"


def _session(call_id: str, store: CallStore, journal: CallJournal) -> CallSession:
    unused: Any = None  # the store step needs no flows, prompts or speech
    deps = SessionDeps(
        engine=unused,
        flowset=unused,
        renderer=unused,
        speech=None,
        post_webhook=unused,
        save_recording=unused,
        save=store.save,
        keep=journal.keep,
        clock=SystemClock(),
        write_ahead=journal.write_ahead,
        taken=journal.taken,
        begin=journal.begin,
        end=journal.end,
    )
    session = CallSession(cast(CallHandle, _Call(call_id)), deps)
    # run() sets it when the call is answered: a call of 1970 would be past its retention,
    # and the list of calls trims the index of those.
    session._started_at = time.time()
    return session


async def _stop_refresh(session: CallSession) -> None:
    """Cancel what ``run()``'s end cancels: here, the live record's refresh."""
    for task in list(session._tasks):
        task.cancel()
    await asyncio.gather(*session._tasks, return_exceptions=True)


def _result(call_id: str, ended_at: float) -> CallResult:
    return CallResult(call_id, CALLER, "700", ended_at - 60, ended_at, RECORD)


def _assert_kept_private(
    folder: Path, call_id: str, store: CallStore, suffix: str = ".sealed"
) -> None:
    path = folder / f"{call_id}{suffix}"
    assert path.exists(), f"nothing kept on disk: {sorted(p.name for p in folder.glob('*'))}"
    assert path.stat().st_mode & 0o777 == 0o600
    assert folder.stat().st_mode & 0o777 == 0o700
    raw = path.read_bytes()
    for secret in (CALLER, "chest-pain-radiating", "laboured", "complaint", "triage"):
        assert secret.encode() not in raw and secret.encode() not in base64.b64decode(raw)
    assert store.open(call_id, raw.decode())["values"] == dict(VALUES)  # what Redis would hold
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "a temporary file left"


async def test_a_record_redis_does_not_take_in_time_is_kept_then_replayed(
    mux: RedisMux, redis_server: RedisServer, tmp_path: Path
) -> None:
    store = CallStore(mux, SECRET, retention_days=30, save_patience_s=0.5)
    journal = CallJournal(tmp_path / FOLDER, store)
    await mux.execute("PING")
    await asyncio.to_thread(redis_server.stop)
    async with asyncio.timeout(5):
        await _session("in-kept", store, journal)._store(RECORD)
    _assert_kept_private(tmp_path / FOLDER, "in-kept", store)

    kept = Replayed(left=1, stopped=True)
    assert await journal.replay(time.time()) == kept  # Redis still down: kept
    assert (tmp_path / FOLDER / "in-kept.sealed").exists()

    await asyncio.to_thread(redis_server.restart)
    assert await journal.replay(time.time()) == Replayed(saved=1)
    assert not (tmp_path / FOLDER / "in-kept.sealed").exists()
    got = await store.get("in-kept")
    assert got is not None and got["values"] == dict(VALUES) and got["caller"] == CALLER
    assert [c["id"] for c in (await store.recent(10, None)).calls] == ["in-kept"]
    ttl = await mux.execute("TTL", "cv:call:in-kept")
    assert 30 * DAY_S - 60 < ttl <= 30 * DAY_S


async def test_a_record_is_on_disk_while_its_save_waits_for_redis(
    mux: RedisMux, redis_server: RedisServer, tmp_path: Path
) -> None:
    # A review killed serve (kill -9) 10 s into a save's 30 s of retries against a Redis that
    # was down: the record lived only in memory then, and was lost. It is written ahead now:
    # whatever kills the process meanwhile, the next start replays it.
    store = CallStore(mux, SECRET, retention_days=30, save_patience_s=30.0)
    journal = CallJournal(tmp_path / FOLDER, store)
    await mux.execute("PING")
    await asyncio.to_thread(redis_server.stop)
    saving = asyncio.create_task(_session("in-ahead", store, journal)._store(RECORD))
    path = tmp_path / FOLDER / "in-ahead.ahead"  # written ahead: not kept (yet)
    async with asyncio.timeout(5):
        while not path.exists():  # noqa: ASYNC110 (a deadline)
            await asyncio.sleep(0.05)
    assert not saving.done(), "still trying Redis"
    _assert_kept_private(tmp_path / FOLDER, "in-ahead", store, ".ahead")
    await asyncio.to_thread(redis_server.restart)
    async with asyncio.timeout(10):
        await saving
    assert not path.exists(), "Redis took it: the copy on disk is gone"
    got = await store.get("in-ahead")
    assert got is not None and got["values"] == dict(VALUES)


async def test_a_call_under_way_when_serve_dies_is_recorded_as_cut_at_the_next_start(
    mux: RedisMux, redis_server: RedisServer, tmp_path: Path
) -> None:
    # A review killed serve (kill -9) 4 s into an answered call: the call left no record,
    # so no cut_* outcome told staff to call the patient back. A call has a record on disk
    # while it runs; the next start saves what a dead serve left.
    store = CallStore(mux, SECRET, retention_days=30)
    journal = CallJournal(tmp_path / FOLDER, store)
    session = _session("in-running", store, journal)
    session._started_at = time.time() - 4
    session._begin("triage")
    assert session._live_task is not None
    await session._live_task
    await _stop_refresh(session)
    live = tmp_path / LIVE_FOLDER / "in-running.sealed"
    assert live.exists() and live.stat().st_mode & 0o777 == 0o600
    assert CALLER.encode() not in live.read_bytes(), "sealed, as the journal's records"
    # serve dies here: nothing else runs. The next start:
    again = CallJournal(tmp_path / FOLDER, store)
    lost = await again.leftovers(time.time())
    assert lost == ["in-running"]
    assert await again.replay_lost(lost, time.time()) == []
    got = await store.get("in-running")
    assert got is not None
    assert (got["outcome"], got["flow"], got["caller"]) == (LOST_OUTCOME, "triage", CALLER)
    assert got["values"] == {}, "nothing said yet: the call was answered, no more"
    assert not live.exists()
    assert [c["id"] for c in (await store.recent(10, None)).calls] == ["in-running"]


async def test_a_live_record_never_replaces_the_calls_own(
    mux: RedisMux, redis_server: RedisServer, tmp_path: Path
) -> None:
    # serve died after the call's own record was saved, before its live record was deleted:
    # the live one must not overwrite the answers and the outcome.
    store = CallStore(mux, SECRET, retention_days=30)
    journal = CallJournal(tmp_path / FOLDER, store)
    now = time.time()
    lost = CallRecord("triage", (), (), None, (), None, None, LOST_OUTCOME)
    await journal.begin(CallResult("in-both", CALLER, "700", now - 60, now - 60, lost))
    await store.save(_result("in-both", now))
    assert await journal.replay_lost(await journal.leftovers(now), now) == []
    got = await store.get("in-both")
    assert got is not None and got["outcome"] == "transferred"
    assert got["values"] == dict(VALUES)
    assert not (tmp_path / LIVE_FOLDER / "in-both.sealed").exists()


async def test_a_call_a_dead_serve_cut_counts_once_when_recorded_as_cut(
    mux: RedisMux, redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # serve killed during three calls: one had no record yet, one's own record was saved
    # (its live record not yet deleted), one's own record was being saved (written ahead
    # to the journal). The next start records the first as cut and counts it in
    # clinic_calls_total as a call is counted; the other two keep their own records, are
    # not said to be recorded as cut, and are not counted as cut (_SAVE said "saved" for a
    # record it kept, and the live record of the one being saved was written, and said
    # cut, before the journal's replay put the call's own over it). The one being saved
    # counts once with its own outcome (tests/integration/test_calls_counted_once.py).
    caplog.set_level(logging.INFO)
    settings = Settings.from_env(
        {"CLINIC_DATA_DIR": str(tmp_path / "data"), "CLINIC_REDIS_URL": redis_server.url}
    )
    rt = Runtime(settings=settings, clock=SystemClock(), metrics=Metrics(), secret=SECRET)
    store = CallStore(mux, SECRET, settings.ivr.call_retention_days)
    rt.call_store = store
    rt.voicemails = Voicemails(settings.data_dir / "voicemail", store)  # as build_app does
    line = ClinicLine(settings, rt, FlowSet(flows={}))
    journal = line._new_journal()  # as start() makes it
    now = time.time()
    lost = CallRecord("triage", (), (), None, (), None, None, LOST_OUTCOME)
    for call_id in ("in-cut", "in-saved", "in-saving"):
        await journal.begin(CallResult(call_id, CALLER, "700", now - 60, now - 60, lost))
    await store.save(_result("in-saved", now))
    await journal.write_ahead(_result("in-saving", now))
    # The next start (leftovers read before any call; the replay's first round at once):
    ids = await journal.leftovers(now)
    assert ids == ["in-cut", "in-saved", "in-saving"]

    async def on_disk() -> bool:
        return bool(await journal.leftovers(time.time())) or await journal.holds("in-saving")

    replaying = asyncio.create_task(line._replay_journal(journal, ids))
    try:
        async with asyncio.timeout(10):
            while await on_disk():  # noqa: ASYNC110 (a deadline)
                await asyncio.sleep(0.05)
    finally:
        replaying.cancel()
        await asyncio.gather(replaying, return_exceptions=True)
    outcomes = {}
    for call_id in ids:
        got = await store.get(call_id)
        assert got is not None, call_id
        outcomes[call_id] = got["outcome"]
    assert outcomes == {
        "in-cut": LOST_OUTCOME,
        "in-saved": "transferred",
        "in-saving": "transferred",
    }
    said_cut = [r.getMessage() for r in caplog.records if "recorded as cut" in r.getMessage()]
    assert [m.split(":")[0] for m in said_cut] == ["call in-cut"], said_cut
    assert rt.metrics.calls.value(outcome=LOST_OUTCOME) == 1
    assert 'clinic_calls_total{outcome="cut_service_lost"} 1\n' in rt.metrics.render()
    assert rt.metrics.calls.value(outcome="transferred") == 1  # in-saving; in-saved: by its serve
    assert CALLER not in caplog.text


async def test_a_call_that_ends_deletes_its_live_record(
    mux: RedisMux, redis_server: RedisServer, tmp_path: Path
) -> None:
    store = CallStore(mux, SECRET, retention_days=30)
    journal = CallJournal(tmp_path / FOLDER, store)
    session = _session("in-ended", store, journal)
    session._started_at = time.time()
    session._begin("triage")
    await session._store(RECORD)
    await _stop_refresh(session)
    await session._end_live()
    assert await journal.leftovers(time.time()) == []
    got = await store.get("in-ended")
    assert got is not None and got["outcome"] == "transferred"


async def test_a_record_a_full_redis_refuses_is_kept_then_replayed(
    mux: RedisMux, redis_server: RedisServer, tmp_path: Path
) -> None:
    store = CallStore(mux, SECRET, retention_days=30)  # refused writes are not tried again
    journal = CallJournal(tmp_path / FOLDER, store)
    await asyncio.to_thread(redis_server.fill)
    async with asyncio.timeout(5):
        await _session("in-full", store, journal)._store(RECORD)
    _assert_kept_private(tmp_path / FOLDER, "in-full", store)
    assert await journal.replay(time.time()) == Replayed(left=1, stopped=True)  # still full: kept

    await asyncio.to_thread(redis_server.unfill)
    assert await journal.replay(time.time()) == Replayed(saved=1)
    got = await store.get("in-full")
    assert got is not None and got["values"] == dict(VALUES)


async def test_a_save_cut_short_by_cancelling_the_call_is_kept(
    mux: RedisMux, redis_server: RedisServer, tmp_path: Path
) -> None:
    # pool.stop cancels the call tasks at SIGTERM; Redis is down and the save waits for it.
    store = CallStore(mux, SECRET, retention_days=30, save_patience_s=60)
    journal = CallJournal(tmp_path / FOLDER, store)
    await mux.execute("PING")
    await asyncio.to_thread(redis_server.kill9)
    storing = asyncio.create_task(_session("in-stopped", store, journal)._store(RECORD))
    await asyncio.sleep(0.5)  # a few failed tries
    assert not storing.done()
    storing.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await storing
    _assert_kept_private(tmp_path / FOLDER, "in-stopped", store)

    await asyncio.to_thread(redis_server.restart)
    assert await journal.replay(time.time()) == Replayed(saved=1)
    got = await store.get("in-stopped")
    assert got is not None and got["values"] == dict(VALUES)
    assert not list((tmp_path / FOLDER).iterdir())


async def test_a_record_stored_after_the_call_was_cancelled_does_not_hold_the_stop(
    mux: RedisMux, redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A call cancelled before its record was stored stores it in run()'s finally: with Redis
    # down, that waits STOP_SAVE_S for it, not the store's patience, and keeps the record.
    monkeypatch.setattr(session_module, "STOP_SAVE_S", 0.3)
    store = CallStore(mux, SECRET, retention_days=30, save_patience_s=60)
    journal = CallJournal(tmp_path / FOLDER, store)
    await asyncio.to_thread(redis_server.kill9)
    session = _session("in-finally", store, journal)
    started = asyncio.Event()

    async def call() -> None:
        try:
            started.set()
            await asyncio.sleep(60)  # the call goes on
        finally:
            await session._store(RECORD)

    task = asyncio.create_task(call())
    await started.wait()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert task in done, "the stop waited for the save's whole patience"
    assert task.cancelled()
    _assert_kept_private(tmp_path / FOLDER, "in-finally", store)


async def test_the_replay_drops_a_record_past_its_retention_and_keeps_its_expiry(
    mux: RedisMux, tmp_path: Path
) -> None:
    store = CallStore(mux, SECRET, retention_days=30)
    journal = CallJournal(tmp_path / FOLDER, store)
    now = time.time()
    await journal.keep(_result("in-old", now - 31 * DAY_S))
    await journal.keep(_result("in-week", now - 7 * DAY_S))
    assert await journal.replay(now) == Replayed(saved=1, expired=1)
    assert not list((tmp_path / FOLDER).iterdir())
    assert await store.get("in-old") is None
    assert await mux.execute("EXISTS", "cv:call:in-old") == 0
    ttl = await mux.execute("TTL", "cv:call:in-week")
    # Expires when a normal save would have: 30 days after the call's start (60 s before
    # its end).
    assert 23 * DAY_S - 120 < ttl <= 23 * DAY_S - 60


async def test_a_record_that_does_not_open_is_left_on_disk(mux: RedisMux, tmp_path: Path) -> None:
    # Sealed under another CLINIC_SECRET, or renamed to another call's id: never saved.
    other = CallJournal(tmp_path / FOLDER, CallStore(mux, b"t" * 32, retention_days=30))
    await other.keep(_result("in-foreign", time.time()))
    store = CallStore(mux, SECRET, retention_days=30)
    journal = CallJournal(tmp_path / FOLDER, store)
    await journal.keep(_result("in-ours", time.time()))
    (tmp_path / FOLDER / "in-ours.sealed").rename(tmp_path / FOLDER / "in-moved.sealed")
    assert await journal.replay(time.time()) == Replayed(left=2)
    assert await journal.replay(time.time()) == Replayed(left=2)  # warned about once
    assert sorted(p.name for p in (tmp_path / FOLDER).iterdir()) == [
        "in-foreign.sealed",
        "in-moved.sealed",
    ]
    assert await mux.execute("DBSIZE") == 0


async def test_the_clinic_line_replays_the_journal_when_it_starts(
    mux: RedisMux, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = Settings.from_env(
        {"CLINIC_DATA_DIR": str(tmp_path / "data"), "CLINIC_REDIS_URL": redis_server.url}
    )
    rt = Runtime(settings=settings, clock=SystemClock(), metrics=Metrics(), secret=SECRET)
    rt.call_store = CallStore(mux, SECRET, settings.ivr.call_retention_days)
    rt.renderer = PromptRenderer(tmp_path / "prompts")
    rt.voicemails = Voicemails(settings.data_dir / "voicemail", rt.call_store)
    left = CallJournal(settings.data_dir / FOLDER, rt.call_store)
    await left.keep(_result("in-left", time.time() - 60))  # by an earlier run
    cut = CallRecord("appointments", (), (), None, (), None, None, LOST_OUTCOME)
    await left.begin(CallResult("in-cut", CALLER, "700", time.time() - 9, time.time() - 9, cut))
    line = ClinicLine(settings, rt, FlowSet(flows={}))
    await line.start()
    try:
        async with asyncio.timeout(5):
            while await rt.call_store.get("in-left") is None:  # noqa: ASYNC110 (a deadline)
                await asyncio.sleep(0.05)
            while await rt.call_store.get("in-cut") is None:  # noqa: ASYNC110 (a deadline)
                await asyncio.sleep(0.05)
    finally:
        await line.stop()
    assert not (settings.data_dir / FOLDER / "in-left.sealed").exists()
    got = await rt.call_store.get("in-cut")
    assert got is not None and got["outcome"] == LOST_OUTCOME
    assert not (settings.data_dir / LIVE_FOLDER / "in-cut.sealed").exists()


async def test_an_erased_call_does_not_come_back_when_the_journal_is_replayed(
    mux: RedisMux, redis_server: RedisServer, tmp_path: Path
) -> None:
    # The call ended while Redis was down: its record is kept on disk. Staff erase it before
    # the replay, and a copy of it is on disk again after the erasure (a replay that had read
    # the file, a file the erasure could not delete, a power cut undoing an unlink): no
    # replay may bring the call back.
    store = CallStore(mux, SECRET, retention_days=30, save_patience_s=0.3)
    journal = CallJournal(tmp_path / FOLDER, store)
    erasure = CallErasure(store, journal, Voicemails(tmp_path / "voicemail", store), SystemClock())
    await mux.execute("PING")
    await asyncio.to_thread(redis_server.kill9)
    async with asyncio.timeout(5):
        await _session("in-erased", store, journal)._store(RECORD)
    _assert_kept_private(tmp_path / FOLDER, "in-erased", store)
    with pytest.raises(CallStoreUnavailable):  # Redis down: nothing erased, nothing lost
        await erasure.erase("in-erased")
    assert (tmp_path / FOLDER / "in-erased.sealed").exists()
    await asyncio.to_thread(redis_server.restart)

    assert await erasure.erase("in-erased") == Erasure(record=False, files=1)
    assert not list((tmp_path / FOLDER).iterdir())
    await journal.keep(_result("in-erased", time.time()))  # the copy is back on disk
    await journal.begin(_result("in-erased", time.time()))  # and a dead serve's live record
    assert await journal.replay(time.time()) == Replayed(erased=1)
    assert await journal.replay_lost(["in-erased"], time.time()) == []
    assert await store.get("in-erased") is None
    assert await mux.execute("EXISTS", "cv:call:in-erased") == 0
    assert (await store.recent(10, None)).calls == []
    assert await journal.leftovers(time.time()) == []
    assert not list((tmp_path / FOLDER).iterdir()), "the refused copy is deleted, not kept"


async def test_an_erasure_removes_the_copy_a_saved_record_left_on_disk(
    mux: RedisMux, tmp_path: Path
) -> None:
    # Redis took the record but the copy written ahead stayed (its delete failed): the
    # erasure deletes both, and so the call's voicemail.
    store = CallStore(mux, SECRET, retention_days=30)
    journal = CallJournal(tmp_path / FOLDER, store)
    voicemails = Voicemails(tmp_path / "voicemail", store)
    erasure = CallErasure(store, journal, voicemails, SystemClock())
    name = await voicemails.save("in-both-copies", b"\x01\x02" * 800)
    await journal.keep(_result("in-both-copies", time.time()))
    await store.save(_result("in-both-copies", time.time()))
    assert await erasure.erase("in-both-copies") == Erasure(record=True, files=2)
    assert not (tmp_path / "voicemail" / name).exists()
    assert await journal.replay(time.time()) == Replayed()
    assert await store.get("in-both-copies") is None
    assert await erasure.erase("in-never-was") is None


# -- the live record as the call goes on (voice/ivr/live_record.py) -----------------------------
# A session on the shipped triage flow, its SIP call scripted (tests/unit/test_ivr_session_races
# .py), its live record written by the real journal; the call's id is "call-1".


async def _live_rig(journal: CallJournal, clock: FakeClock, store: CallStore | None = None) -> Rig:
    """A triage call whose live record the journal writes; its own record goes to Redis
    through ``store``, or nowhere (a serve that dies never saves it)."""
    rig = await asyncio.to_thread(Rig, speech=False)  # parsing the flows takes 50-130 ms
    extra: dict[str, Any] = {} if store is None else {"save": store.save}
    rig.deps = dataclasses.replace(
        rig.deps, clock=clock, begin=journal.begin, end=journal.end, **extra
    )
    rig.session = CallSession(cast(CallHandle, rig.call), rig.deps)
    return rig


async def _live_doc(
    store: CallStore, path: Path, ok: Callable[[dict[str, Any]], bool], within_s: float = 3.0
) -> dict[str, Any]:
    """The live record at ``path``, opened, once ``ok`` holds for it."""
    doc: dict[str, Any] | None = None
    async with asyncio.timeout(within_s):
        while True:
            text = await asyncio.to_thread(_text, path)
            doc = None if text is None else store.open("call-1", text)
            if doc is not None and ok(doc):
                return doc
            await asyncio.sleep(0.02)


def _text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _at(doc: dict[str, Any], key: str) -> float:
    return datetime.fromisoformat(doc[key]).timestamp()


def _urgent(doc: dict[str, Any]) -> bool:
    return doc["triage"] is not None and doc["triage"]["urgency"] == "U1"


async def test_a_call_cut_mid_flow_is_replayed_with_how_far_it_went_and_how_urgent(
    mux: RedisMux,
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The live record held the numbers, the flow and the start, with the start as the end:
    # staff could not see that the triage had found this caller urgent (U1, to be called
    # back first), nor how far the call went. serve dies while the nurse's phone rings.
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(session_module, "LIVE_REFRESH_S", 0.1)
    store = CallStore(mux, SECRET, retention_days=30)
    journal = CallJournal(tmp_path / "run" / FOLDER, store)
    clock = FakeClock(float(int(time.time()) - 600))  # whole seconds: as records hold them
    started = clock.now()
    rig = await _live_rig(journal, clock)
    live = tmp_path / "run" / LIVE_FOLDER / "call-1.sealed"
    try:
        await _to_breathing(rig)
        clock.advance(20)
        rig.call.send(_digit("1"))  # yes: serious difficulty breathing
        emergency = await rig.until_prompt("This may be an emergency")
        doc = await _live_doc(store, live, _urgent)
        assert doc["values"] == {"who": "self", "breathing": "yes"}, doc
        rig.call.send(_done(emergency))
        connecting = await rig.until_prompt("Connecting you to a nurse")
        rig.call.send(_done(connecting))
        await rig.until(lambda: any(kind == "transfer" for kind, _ in rig.call.commands))
        clock.advance(60)  # the nurse's phone rings: the call stays in one node
        await _live_doc(store, live, lambda d: _at(d, "ended_at") == started + 80)
        # serve dies (kill -9): the disk stays as it is now.
        await asyncio.to_thread(
            shutil.copytree, live.parent, tmp_path / "next" / LIVE_FOLDER, dirs_exist_ok=False
        )
    finally:
        await rig.finish()
    assert not live.exists(), "the call ended: its live record is gone"

    again = CallJournal(tmp_path / "next" / FOLDER, store)  # the next start
    lost = await again.leftovers(time.time())
    assert lost == ["call-1"]
    assert await again.replay_lost(lost, time.time()) == []
    got = await store.get("call-1")
    assert got is not None
    assert got["outcome"] == LOST_OUTCOME
    assert got["triage"] == {
        "urgency": "U1",
        "reasons": ["difficulty breathing"],
        "action": "call_emergency+transfer_nurse",
    }, got["triage"]
    assert got["values"] == {"who": "self", "breathing": "yes"}
    steps = [(p["node"], p["input"], p["value"]) for p in got["path"]]
    assert ("for_whom", "digit", "1") in steps and ("breathing", "digit", "1") in steps, steps
    assert [p["node"] for p in got["path"]][-2:] == ["emergency", "emergency_transfer"], steps
    assert got["transfer_target"] is None, "nobody took the call: no target reached"
    assert (_at(got, "started_at"), _at(got, "ended_at")) == (started, started + 80)
    assert got["caller"] == CALLER and got["flow"] == "triage"
    for secret in (CALLER, "difficulty breathing", "emergency_transfer"):
        assert secret not in caplog.text, f"{secret!r} reached a log line"


class _HeldWrites:
    """The journal's file writes, each live one noted (opened) and held in its thread
    while ``hold`` is clear: a disk that stalls."""

    def __init__(self, store: CallStore) -> None:
        self.store = store
        self.go = threading.Event()
        self.go.set()
        self.live: list[dict[str, Any]] = []  # the live records written, in order

    def write(self, path: Path, text: str) -> None:
        if path.parent.name == LIVE_FOLDER:
            self.live.append(self.store.open("call-1", text))
            self.go.wait(10)
        real_write_private(path, text)


def _held_live_writes(
    mux: RedisMux, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[CallStore, _HeldWrites, CallJournal]:
    """A store, and a journal whose live writes ``_HeldWrites`` can hold in their thread; the
    live record refreshed every 0.1 s."""
    monkeypatch.setattr(session_module, "LIVE_REFRESH_S", 0.1)
    store = CallStore(mux, SECRET, retention_days=30)
    writes = _HeldWrites(store)
    monkeypatch.setattr(journal_module, "write_private", writes.write)
    return store, writes, CallJournal(tmp_path / FOLDER, store)


async def test_live_writes_land_in_order_and_none_after_the_end(
    mux: RedisMux, redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The live record is rewritten at each change, each write fsynced in a thread: a slow
    # write must not land after a newer one, and a write under way when the call ends must
    # not bring the live record back after its delete (the call would be replayed as cut).
    store, writes, journal = _held_live_writes(mux, tmp_path, monkeypatch)
    clock = FakeClock(float(int(time.time()) - 600))  # whole seconds: as records hold them
    rig = await _live_rig(journal, clock)
    live = tmp_path / LIVE_FOLDER / "call-1.sealed"
    try:
        await _to_breathing(rig)
        await _live_doc(store, live, lambda d: d["values"] == {"who": "self"})
        writes.go.clear()  # the disk stalls
        held = len(writes.live)
        clock.advance(1)
        rig.call.send(_digit("1"))  # the triage finds the caller urgent: written, held
        await rig.until(lambda: len(writes.live) > held)
        emergency = await rig.until_prompt("This may be an emergency")
        clock.advance(1)
        rig.call.send(_done(emergency))  # two changes more: only the newer waits
        connecting = await rig.until_prompt("Connecting you to a nurse")
        clock.advance(1)
        rig.call.send(_done(connecting))
        await rig.until(lambda: any(kind == "transfer" for kind, _ in rig.call.commands))
        await asyncio.sleep(0.3)  # refreshes due meanwhile wait too
        assert len(writes.live) == held + 1, "a second write while one is in flight"
        writes.go.set()
        newest = await _live_doc(store, live, lambda d: _at(d, "ended_at") >= clock.now())
        ends = [_at(d, "ended_at") for d in writes.live]
        assert ends == sorted(ends), "an older record was written after a newer one"
        assert _urgent(newest) and newest["path"][-1]["node"] == "emergency_transfer"

        writes.go.clear()  # a write under way when the call ends
        clock.advance(30)
        count = len(writes.live)
        await rig.until(lambda: len(writes.live) > count)  # the refresh, held
        rig.call.end()
        await asyncio.sleep(0.3)
        assert rig.task is not None and not rig.task.done(), "the delete waits for the write"
        writes.go.set()
    finally:
        writes.go.set()
        await rig.finish()
    count = len(writes.live)
    rig.session._write_live(RECORD)  # a change after the end (a late task): not written
    await asyncio.sleep(0.2)
    assert len(writes.live) == count, "a live record written after the call ended"
    assert await journal.leftovers(time.time()) == []
    assert not list(live.parent.iterdir()), "a file (or a temporary one) left"


async def test_an_erasure_holds_against_a_call_with_live_writes(
    mux: RedisMux, redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Refused while the call is under way (409 in the API), however often its live record is
    # rewritten; once the call ended, the erasure is whole: no live write comes after it, and
    # the next start replays nothing of the call.
    store, writes, journal = _held_live_writes(mux, tmp_path, monkeypatch)
    erasure = CallErasure(store, journal, Voicemails(tmp_path / "voicemail", store), SystemClock())
    clock = FakeClock(float(int(time.time()) - 600))  # whole seconds: as records hold them
    rig = await _live_rig(journal, clock, store)
    live = tmp_path / LIVE_FOLDER / "call-1.sealed"
    try:
        await _to_breathing(rig)
        rig.call.send(_digit("1"))
        await _live_doc(store, live, _urgent)
        with pytest.raises(CallUnderWay):
            await erasure.erase("call-1")
        count = len(writes.live)
        await rig.until(lambda: len(writes.live) > count + 2)  # refreshed, again and again
        with pytest.raises(CallUnderWay):
            await erasure.erase("call-1")
        writes.go.clear()  # a write under way as the call ends
        count = len(writes.live)
        await rig.until(lambda: len(writes.live) > count)
        rig.call.end()
        async with asyncio.timeout(3):
            while await store.get("call-1") is None:  # noqa: ASYNC110 (a deadline)
                await asyncio.sleep(0.02)
        with pytest.raises(CallUnderWay):  # its record is saved; its live one still there
            await erasure.erase("call-1")
        writes.go.set()
    finally:
        writes.go.set()
        await rig.finish()
    assert await erasure.erase("call-1") == Erasure(record=True, files=0)
    rig.session._write_live(RECORD)  # a late change: never written after the end
    await asyncio.sleep(0.2)
    assert not live.exists()
    again = CallJournal(tmp_path / FOLDER, store)  # the next start
    assert await again.leftovers(time.time()) == []
    assert await store.get("call-1") is None
    assert (await store.recent(10, None)).calls == []


@pytest.mark.parametrize("cut", ["cancelled", "stop_save_s"])
async def test_a_call_redis_took_as_its_save_was_cut_short_counts_once(
    cut: str,
    mux: RedisMux,
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Redis took the record and the copy written ahead is being deleted when the call's
    # task is cancelled (a stop), or when the STOP_SAVE_S a call cancelled before its record
    # was stored waits runs out: the record is saved, so it is not kept on disk as well, and
    # the call counts once in clinic_calls_total (it counted twice: saved, then kept), as
    # the delete finishes in its thread.
    monkeypatch.setattr(session_module, "STOP_SAVE_S", 0.3)
    settings = Settings.from_env(
        {"CLINIC_DATA_DIR": str(tmp_path / "data"), "CLINIC_REDIS_URL": redis_server.url}
    )
    rt = Runtime(settings=settings, clock=SystemClock(), metrics=Metrics(), secret=SECRET)
    store = CallStore(mux, SECRET, settings.ivr.call_retention_days)
    rt.call_store = store
    line = ClinicLine(settings, rt, FlowSet(flows={}))
    journal = line._new_journal()
    line._journal = journal  # what start() sets, without its speech model and prompts
    forgetting, release = threading.Event(), threading.Event()
    deleting = journal._taken

    def held(call_id: str, outcome: str | None) -> None:  # in the delete's thread
        forgetting.set()  # Redis has taken the record
        release.wait(10)
        deleting(call_id, outcome)

    monkeypatch.setattr(journal, "_taken", held)
    session = _session("in-raced", store, journal)
    session._d = replace(session._d, save=line._save, keep=line._keep)
    started = asyncio.Event()

    async def call() -> None:
        if cut == "cancelled":
            await session._store(RECORD)
            return
        try:
            started.set()
            await asyncio.sleep(60)  # the call goes on till the stop cancels it
        finally:
            await session._store(RECORD)  # as run()'s finally, with STOP_SAVE_S

    storing = asyncio.create_task(call())
    if cut == "cancelled":
        assert await asyncio.to_thread(forgetting.wait, 5)
        storing.cancel()
    else:
        await started.wait()
        storing.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await storing
    assert forgetting.is_set()
    assert rt.metrics.calls.value(outcome="transferred") == 0, "counted before the copy went"
    release.set()
    async with asyncio.timeout(5):
        await asyncio.gather(*journal._steps)
    assert rt.metrics.calls.value(outcome="transferred") == 1
    assert not (settings.data_dir / FOLDER / "in-raced.ahead").exists()
    got = await store.get("in-raced")
    assert got is not None and got["outcome"] == "transferred"


class _FlappingStore(CallStore):
    """Redis failing one save, then back at once (a dropped connection, say)."""

    fail_next = True

    async def save_sealed(self, *args: Any, **kwargs: Any) -> Any:
        if self.fail_next:
            self.fail_next = False
            raise CallStoreUnavailable("connection dropped")
        return await super().save_sealed(*args, **kwargs)


async def test_a_live_record_waits_for_a_replay_redis_cut_short(
    mux: RedisMux, tmp_path: Path
) -> None:
    # serve died while a call's own record was being saved: that record is kept, and its
    # live record is there too. The replay's save of the kept record fails, and Redis is
    # back for the next save: the live record must not be saved first, recording the call
    # as cut (and counting it) under its own record.
    store = _FlappingStore(mux, SECRET, retention_days=30)
    journal = CallJournal(tmp_path / FOLDER, store)
    now = time.time()
    lost = CallRecord("triage", (), (), None, (), None, None, LOST_OUTCOME)
    await journal.begin(CallResult("in-flap", CALLER, "700", now - 60, now - 60, lost))
    await journal.keep(_result("in-flap", now))
    assert await journal.replay_all(["in-flap"], now) == ["in-flap"]
    assert await store.get("in-flap") is None, "nothing saved while the kept record waits"
    assert await journal.replay_all(["in-flap"], now) == []
    got = await store.get("in-flap")
    assert got is not None and got["outcome"] == "transferred"
    assert not (tmp_path / LIVE_FOLDER / "in-flap.sealed").exists()


async def test_a_record_cut_by_a_kill_and_its_message_expire_together(
    mux: RedisMux, tmp_path: Path
) -> None:
    # The live record written as the recording began (its time the cut record's end), the
    # message saved 40 s on, serve killed before the live record named it. The record's
    # retention ran from the live record's time, the message's from its file's: the record
    # went 40 s (a refresh's worth, plus the sweep's hour) before the message, and the API
    # answered 404 for the call while its message was still on disk.
    clock = FakeClock(float(int(time.time())))
    store = CallStore(mux, SECRET, retention_days=30, clock=clock)
    voicemails = Voicemails(tmp_path / "voicemail", store)
    started = clock.now()
    lost = CallRecord("triage", (), VALUES, None, (), None, None, LOST_OUTCOME)
    clock.advance(5)
    await CallJournal(tmp_path / FOLDER, store).begin(
        CallResult("in-vm", CALLER, "700", started, clock.now(), lost)
    )
    clock.advance(40)
    name = await voicemails.save("in-vm", b"\x01\x02" * 800, started_at=started)
    clock.advance(3600)  # serve killed; started again an hour on
    journal = CallJournal(tmp_path / FOLDER, store)
    assert await journal.replay_all(await journal.leftovers(clock.now()), clock.now()) == []
    record_ends = clock.now() + int(await mux.execute("PTTL", "cv:call:in-vm")) / 1000
    assert abs(record_ends - (started + 30 * DAY_S)) <= 1, record_ends - started - 30 * DAY_S
    message_ends = (tmp_path / "voicemail" / name).stat().st_mtime + 30 * DAY_S
    assert message_ends == started + 30 * DAY_S
    # Just before that end both are there; just after, the message goes with the record.
    clock.advance(started + 30 * DAY_S - 2 - clock.now())
    assert voicemails.sweep(30 * DAY_S, clock.now()) == 0
    assert await voicemails.holds("in-vm", clock.now())
    clock.advance(3)
    assert not await voicemails.holds("in-vm", clock.now())
    assert voicemails.sweep(30 * DAY_S, clock.now()) == 1


async def test_a_record_saved_at_its_end_expires_a_retention_after_its_start(
    mux: RedisMux,
) -> None:
    # Saved at the end of a 20-minute call, the record lived 20 minutes longer than its
    # index entry (trimmed by start) and its message (dated by its call's start).
    clock = FakeClock(float(int(time.time())))
    store = CallStore(mux, SECRET, retention_days=30, clock=clock)
    started = clock.now()
    clock.advance(1200)
    await store.save(CallResult("in-long", CALLER, "700", started, clock.now(), RECORD))
    ttl = int(await mux.execute("TTL", "cv:call:in-long"))
    assert 30 * DAY_S - 1202 <= ttl <= 30 * DAY_S - 1200, 30 * DAY_S - ttl


async def test_an_erasure_of_a_call_past_its_retention_is_not_found(
    mux: RedisMux, tmp_path: Path
) -> None:
    # README: "A call nothing is known of (never was, past its retention, ...) is 404, and
    # nothing is written." A call past its retention whose index entry no save or list read
    # had trimmed yet (a quiet line), or whose message the hourly sweep had not reached yet,
    # was erased: 204, and a mark written for it.
    clock = FakeClock(float(int(time.time())))
    store = CallStore(mux, SECRET, retention_days=30, clock=clock)
    voicemails = Voicemails(tmp_path / "voicemail", store)
    journal = CallJournal(tmp_path / FOLDER, store)
    erasure = CallErasure(store, journal, voicemails, clock)
    t0 = clock.now()
    await store.save(CallResult("in-old", CALLER, "700", t0, t0 + 60, RECORD))
    await voicemails.save("in-old-2", b"\x00\x01" * 160, started_at=t0)
    await store.save(CallResult("in-old-2", CALLER, "700", t0, t0 + 60, RECORD))
    clock.advance(10 * DAY_S)
    await store.save(CallResult("in-new", CALLER, "700", clock.now(), clock.now(), RECORD))
    clock.advance(20 * DAY_S + 61)  # the first two past their retention; no save since
    for call_id in ("in-old", "in-old-2"):
        await mux.execute("DEL", f"cv:call:{call_id}")  # as Redis expires it
    assert await mux.execute("ZSCORE", "cv:calls", "in-old") is not None, "a quiet line"
    assert (tmp_path / "voicemail").is_dir() and list((tmp_path / "voicemail").iterdir())
    assert await erasure.erase("in-old") is None
    assert await erasure.erase("in-old-2") is None  # its message is the sweep's, not a call
    for call_id in ("in-old", "in-old-2"):
        assert await mux.execute("EXISTS", f"cv:erased:{call_id}") == 0, "nothing written"
    assert await mux.execute("ZSCORE", "cv:calls", "in-old") is None, "trimmed"
    assert await erasure.erase("in-new") == Erasure(record=True, files=0)


async def _expires_at(mux: RedisMux, key: str, clock: FakeClock) -> float:
    """When Redis expires ``key``, on ``clock`` (Redis counts the time left on its own)."""
    left_ms = int(await mux.execute("PTTL", key))
    assert left_ms > 0, f"{key}: PTTL {left_ms}"
    return clock.now() + left_ms / 1000


async def test_a_record_and_its_message_expire_together_after_the_clock_stepped_back(
    mux: RedisMux, tmp_path: Path
) -> None:
    # The wall clock stepped back 600 s during the call, after its message was saved (dated
    # by the call's start). The record's time left was capped at the retention from its
    # save ("a start ahead of the clock counts as now"): it expired 580 s before its message,
    # and the index key (a retention after the save) took the call's entry with it.
    started = float(int(time.time()))
    clock = FakeClock(started - 600 + 20)  # stepped back 600 s; the call ends 20 s on
    store = CallStore(mux, SECRET, retention_days=30, clock=clock)
    voicemails = Voicemails(tmp_path / "voicemail", store)
    name = await voicemails.save("in-step", b"\x01\x02" * 800, started_at=started)
    await store.save(CallResult("in-step", CALLER, "700", started, clock.now(), RECORD))
    message_ends = (tmp_path / "voicemail" / name).stat().st_mtime + 30 * DAY_S
    assert message_ends == started + 30 * DAY_S
    record_ends = await _expires_at(mux, "cv:call:in-step", clock)
    assert abs(record_ends - message_ends) < 1, record_ends - message_ends
    assert await _expires_at(mux, "cv:calls", clock) >= record_ends - 1, "the index goes first"
    # The same for a record replayed from disk after the step.
    journal = CallJournal(tmp_path / FOLDER, store)
    await journal.keep(CallResult("in-step-2", CALLER, "700", started, started + 5, RECORD))
    assert await journal.replay(clock.now()) == Replayed(saved=1)
    record_ends = await _expires_at(mux, "cv:call:in-step-2", clock)
    assert abs(record_ends - (started + 30 * DAY_S)) < 1, record_ends - started - 30 * DAY_S


async def test_a_record_whose_save_waited_for_redis_expires_a_retention_after_its_start(
    mux: RedisMux, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The time left was reckoned once, before the first try: a save that landed after Redis
    # came back kept its record that much past its call's start plus the retention, past its
    # entry in the list and its message (GET 200 for a call the list no longer showed).
    clock = FakeClock(float(int(time.time())))
    store = CallStore(mux, SECRET, retention_days=30, save_patience_s=20, clock=clock)
    started = clock.now()
    await mux.execute("PING")
    await asyncio.to_thread(redis_server.kill9)
    caplog.set_level(logging.WARNING, "voice.ivr.store")
    saving = asyncio.create_task(
        store.save(CallResult("in-wait", CALLER, "700", started, started + 60, RECORD))
    )
    deadline = asyncio.get_running_loop().time() + 10
    while not any("trying again" in r.getMessage() for r in caplog.records):
        assert asyncio.get_running_loop().time() < deadline, "no failed try within 10 s"
        await asyncio.sleep(0.05)
    clock.advance(600)  # Redis down for 10 minutes, on the store's clock
    await asyncio.to_thread(redis_server.restart)
    await asyncio.wait_for(saving, 10)
    record_ends = await _expires_at(mux, "cv:call:in-wait", clock)
    assert abs(record_ends - (started + 30 * DAY_S)) < 1, record_ends - started - 30 * DAY_S


async def test_an_erasure_of_a_copy_on_disk_past_its_retention_is_not_found(
    mux: RedisMux, tmp_path: Path
) -> None:
    # README: past its retention a call is 404 for DELETE, "except a copy of its record kept
    # on disk, which the next replay deletes": such a copy made the call known (204, and a
    # mark written) for up to 30 s, while GET and the list already said 404.
    clock = FakeClock(float(int(time.time())))
    store = CallStore(mux, SECRET, retention_days=30, clock=clock)
    journal = CallJournal(tmp_path / FOLDER, store)
    erasure = CallErasure(store, journal, Voicemails(tmp_path / "voicemail", store), clock)
    t0 = clock.now()
    await journal.keep(CallResult("in-kept", CALLER, "700", t0, t0 + 60, RECORD))
    await journal.begin(CallResult("in-cut", CALLER, "700", t0, t0 + 60, RECORD))  # serve died
    await journal.keep(CallResult("in-young", CALLER, "700", t0 + DAY_S, t0 + DAY_S, RECORD))
    clock.advance(30 * DAY_S)  # exactly a retention after the first two began
    for call_id in ("in-kept", "in-cut"):
        assert await store.get(call_id) is None
        assert await erasure.erase(call_id) is None, call_id
        assert await mux.execute("EXISTS", f"cv:erased:{call_id}") == 0, "nothing written"
    assert (tmp_path / FOLDER / "in-kept.sealed").exists(), "the replay's to delete"
    assert await erasure.erase("in-young") == Erasure(record=False, files=1)
    assert await journal.replay(clock.now()) == Replayed(expired=1)


async def test_a_call_at_its_retentions_end_is_gone_for_every_request(
    mux: RedisMux, tmp_path: Path
) -> None:
    # At the very instant a retention after the call's start, the list no longer showed the
    # call (nor GET: its record expired by then), but its message still counted as the
    # call's (its age "at most" the retention), so DELETE answered 204 and marked the call.
    clock = FakeClock(float(int(time.time())))
    store = CallStore(mux, SECRET, retention_days=30, clock=clock)
    voicemails = Voicemails(tmp_path / "voicemail", store)
    erasure = CallErasure(store, CallJournal(tmp_path / FOLDER, store), voicemails, clock)
    t0 = clock.now()
    await voicemails.save("in-edge", b"\x00\x01" * 160, started_at=t0)
    await store.save(CallResult("in-edge", CALLER, "700", t0, t0 + 60, RECORD))
    clock.advance(30 * DAY_S - 1)
    assert [c["id"] for c in (await store.recent(10, None)).calls] == ["in-edge"]
    assert await voicemails.holds("in-edge", clock.now())
    clock.advance(1)
    await mux.execute("DEL", "cv:call:in-edge")  # as Redis expires it (at the latest now)
    assert (await store.recent(10, None)).calls == []
    assert await store.get("in-edge") is None
    assert not await voicemails.holds("in-edge", clock.now())
    assert await erasure.erase("in-edge") is None
    assert await mux.execute("EXISTS", "cv:erased:in-edge") == 0


async def test_a_save_after_the_clock_stepped_back_trims_no_call_within_its_retention(
    mux: RedisMux,
) -> None:
    # The index was trimmed at the saved call's start less the retention: a start ahead of
    # the clock (it stepped back 600 s during the call) took out the entries of calls that
    # still had up to 600 s to go, whose records Redis still held (GET 200, not listed).
    clock = FakeClock(float(int(time.time())))
    store = CallStore(mux, SECRET, retention_days=30, clock=clock)
    old = clock.now() - 30 * DAY_S + 100  # 100 s left
    await store.save(CallResult("in-old", CALLER, "700", old, old + 60, RECORD))
    ahead = clock.now() + 600
    await store.save(CallResult("in-ahead", CALLER, "700", ahead, ahead + 20, RECORD))
    assert await store.get("in-old") is not None
    listed = [c["id"] for c in (await store.recent(10, None)).calls]
    assert listed == ["in-ahead", "in-old"], listed


async def test_the_mark_of_an_erased_call_outlives_a_start_ahead_of_the_clock(
    mux: RedisMux, tmp_path: Path
) -> None:
    # The mark lived a retention from the erasure: a call that began ahead of the clock (it
    # stepped back since) has copies that live until its start plus the retention, and one
    # replayed after the mark went (another serve's, down meanwhile) brought the call back.
    clock = FakeClock(float(int(time.time())))
    store = CallStore(mux, SECRET, retention_days=30, clock=clock)
    ahead = clock.now() + 600
    await store.save(CallResult("in-gone", CALLER, "700", ahead, ahead + 20, RECORD))
    elsewhere = CallJournal(tmp_path / "other" / FOLDER, store)  # another serve's, down
    await elsewhere.keep(CallResult("in-gone", CALLER, "700", ahead, ahead + 20, RECORD))
    assert await store.erase("in-gone", on_disk=False) is Erased.RECORD
    mark_ends = await _expires_at(mux, "cv:erased:in-gone", clock)
    assert mark_ends > ahead + 30 * DAY_S - 1, mark_ends - ahead - 30 * DAY_S
    # A repeat (a retry finishing the files) does not cut it back to a retention from now.
    assert await store.erase("in-gone", on_disk=True) is Erased.MARKED
    assert await _expires_at(mux, "cv:erased:in-gone", clock) > ahead + 30 * DAY_S - 1
    assert await elsewhere.replay(clock.now()) == Replayed(erased=1)
