"""Call records against a real redis-server over the multiplexed connection: sealed round trip,
paging newest first, no record lost when Redis is down for a moment at the end of a call, and
an erasure that no later save undoes.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from sip_config.clock import FakeClock
from tests.conftest import RedisServer
from verification.redis_mux import RedisMux
from voice.ivr.call_record import CallResult
from voice.ivr.cursor import Cursor
from voice.ivr.engine import CallRecord
from voice.ivr.store import (
    COMPACT_ASKED,
    ERASED_PREFIX,
    INDEX,
    CallRecordUnreadable,
    CallStore,
    CallStoreUnavailable,
    Erased,
    Saved,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]

SECRET = b"s" * 32
T0 = 1.8e9


def _result(call_id: str, started_at: float) -> CallResult:
    record = CallRecord("triage", (), (("breathing", "yes"),), None, (), None, "6100", "completed")
    return CallResult(call_id, "6001", "700", started_at, started_at + 30, record)


async def test_a_record_is_sealed_at_rest_and_opens_under_its_id(mux: RedisMux) -> None:
    store = CallStore(mux, SECRET, retention_days=30)
    await store.save(_result("c-1", T0))
    raw = await mux.execute("GET", "cv:call:c-1")
    assert "breathing" not in raw and "6001" not in raw  # AES-GCM, not plain JSON
    got = await store.get("c-1")
    assert got is not None and got["id"] == "c-1" and got["caller"] == "6001"
    assert await store.get("c-2") is None
    ttl = await mux.execute("TTL", "cv:call:c-1")
    # A retention after the call's start (T0: ahead of the clock; so its message, dated by it).
    left = T0 + 30 * 86400 - time.time()
    assert left - 5 < ttl <= left + 1


async def test_pages_are_newest_first_and_the_cursor_continues(mux: RedisMux) -> None:
    store = CallStore(mux, SECRET, retention_days=30)
    await asyncio.gather(*(store.save(_result(f"c-{i}", T0 + i)) for i in range(5)))
    first = await store.recent(2, None)
    assert [c["id"] for c in first.calls] == ["c-4", "c-3"]
    assert first.next_cursor is not None
    second = await store.recent(10, first.next_cursor)
    assert [c["id"] for c in second.calls] == ["c-2", "c-1", "c-0"]
    assert second.next_cursor is None


async def test_a_page_of_some_calls_reads_a_bounded_number_and_goes_on_after_the_last(
    mux: RedisMux,
) -> None:
    # Calls c-0 .. c-11, c-11 newest; those kept: c-10 and c-9 (of one start), c-2; c-9 is
    # marked handled, and the filter is given the mark. At most 4 calls read for a page.
    store = CallStore(mux, SECRET, retention_days=30)
    starts = {i: T0 + (9 if i == 10 else i) for i in range(12)}
    await asyncio.gather(*(store.save(_result(f"c-{i}", s)) for i, s in starts.items()))
    assert await store.mark_handled("c-9", True)
    wanted = {"c-10", "c-9", "c-2"}
    seen: list[tuple[str, str | None]] = []

    def keep(doc: dict[str, Any], handled_at: str | None) -> bool:
        seen.append((doc["id"], handled_at))
        return doc["id"] in wanted

    pages: list[list[str]] = []
    handled: dict[str, str] = {}
    cursor: Cursor | None = None
    for _ in range(10):
        page = await store.recent(2, cursor, keep, examine=4)
        pages.append([c["id"] for c in page.calls])
        handled.update(page.handled)
        cursor = page.next_cursor
        if cursor is None:
            break
    # The list's order: c-11, then the start of c-9 and c-10 ("c-9" > "c-10" bytewise), then
    # c-8 .. c-0. Full at c-10 (3 read); c-8 .. c-5 read, none kept: an empty page that goes
    # on; c-4 .. c-1 read, c-2 kept; c-0 read, the index ends.
    assert pages == [["c-9", "c-10"], [], ["c-2"], []], pages
    assert [i for i, _ in seen] == [f"c-{i}" for i in (11, 9, 10, 8, 7, 6, 5, 4, 3, 2, 1, 0)]
    assert dict(seen)["c-9"] is not None and dict(seen)["c-2"] is None, seen
    assert list(handled) == ["c-9"], handled


async def test_a_page_after_a_call_erased_since_begins_after_it_all_the_same(
    mux: RedisMux,
) -> None:
    # The cursor's own call gone from the index (staff erase what a search found while
    # paging): the next page still begins right after it, among the calls of its start.
    store = CallStore(mux, SECRET, retention_days=30)
    await asyncio.gather(*(store.save(_result(f"c-{i}", T0)) for i in range(6)))
    first = await store.recent(2, None)
    assert [c["id"] for c in first.calls] == ["c-5", "c-4"]
    assert first.next_cursor == Cursor(T0, "c-4")
    assert await store.erase("c-4", on_disk=False) is Erased.RECORD
    await store.save(_result("c-9", T0))  # after the page was read: it sorts before the cursor
    second = await store.recent(3, first.next_cursor)
    assert [c["id"] for c in second.calls] == ["c-3", "c-2", "c-1"]
    assert second.next_cursor == Cursor(T0, "c-1")
    third = await store.recent(3, second.next_cursor)
    assert [c["id"] for c in third.calls] == ["c-0"] and third.next_cursor is None


async def test_a_save_while_redis_is_down_lands_when_it_is_back(
    mux: RedisMux, redis_server: RedisServer
) -> None:
    store = CallStore(mux, SECRET, retention_days=30, save_patience_s=20)
    await mux.execute("PING")
    await asyncio.to_thread(redis_server.kill9)
    saving = asyncio.create_task(store.save(_result("c-late", T0)))
    await asyncio.sleep(1.0)  # a few failed tries
    assert not saving.done()
    await asyncio.to_thread(redis_server.restart)
    await asyncio.wait_for(saving, 10)
    got = await store.get("c-late")
    assert got is not None and got["id"] == "c-late"


async def test_a_save_gives_up_after_its_patience(mux: RedisMux, redis_server: RedisServer) -> None:
    store = CallStore(mux, SECRET, retention_days=30, save_patience_s=1.0)
    await asyncio.to_thread(redis_server.kill9)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(CallStoreUnavailable):
        await store.save(_result("c-lost", T0))
    assert loop.time() - started < 5


async def test_a_save_stops_trying_once_the_client_is_closed(redis_server: RedisServer) -> None:
    client = RedisMux(redis_server.url, timeout_s=0.5)
    store = CallStore(client, SECRET, retention_days=30, save_patience_s=60)
    await client.aclose()  # the service is stopping
    with pytest.raises(CallStoreUnavailable):
        await asyncio.wait_for(store.save(_result("c-x", T0)), 5)


async def test_a_save_redis_refuses_is_not_tried_again(mux: RedisMux) -> None:
    # An error reply (here WRONGTYPE, inside EXEC) would come back on every try: fail at once.
    await mux.execute("SET", "cv:calls", "not a sorted set")
    try:
        store = CallStore(mux, SECRET, retention_days=30, save_patience_s=60)
        with pytest.raises(CallStoreUnavailable, match="WRONGTYPE"):
            await asyncio.wait_for(store.save(_result("c-y", T0)), 5)
    finally:
        await mux.execute("DEL", "cv:calls")


async def test_a_record_sealed_with_another_secret_does_not_break_the_list(
    mux: RedisMux,
) -> None:
    # README's way to change CLINIC_SECRET (delete cv:secret-fingerprint, restart) leaves the
    # records of the retention period sealed under the old key: the list of calls must still
    # show the new ones, and the old one must fail as itself, not as a traceback.
    old = CallStore(mux, b"o" * 32, retention_days=30)
    await old.save(_result("c-old", T0))
    store = CallStore(mux, SECRET, retention_days=30)
    await store.save(_result("c-new", T0 + 1))
    await mux.execute("SET", "cv:call:c-junk", "not base64 !")
    await mux.execute("ZADD", "cv:calls", repr(T0 + 2), "c-junk")
    page = await store.recent(10, None)
    assert [c["id"] for c in page.calls] == ["c-new"]
    with pytest.raises(CallRecordUnreadable):
        await store.get("c-old")
    with pytest.raises(CallRecordUnreadable):
        await store.get("c-junk")
    got = await store.get("c-new")
    assert got is not None and got["id"] == "c-new"


async def test_an_erased_call_is_gone_and_no_save_writes_it_back(mux: RedisMux) -> None:
    store = CallStore(mux, SECRET, retention_days=30)
    await store.save(_result("c-gone", T0))
    await store.save(_result("c-kept", T0 + 1))
    assert await store.erase("c-gone", on_disk=False) is Erased.RECORD
    assert await store.get("c-gone") is None
    assert [c["id"] for c in (await store.recent(10, None)).calls] == ["c-kept"]
    assert await mux.execute("ZSCORE", INDEX, "c-gone") is None
    # The mark outlives any copy of the record on disk: a replay drops them once past their
    # retention, a retention after the call's start (T0: ahead of the clock, so the mark
    # lives as long as the record would have, more than the retention).
    ttl = await mux.execute("TTL", f"{ERASED_PREFIX}c-gone")
    left = T0 + 30 * 86400 - time.time()
    assert left - 60 < ttl <= left + 1
    assert 0 < await mux.execute("TTL", COMPACT_ASKED) <= 86400
    # A save after the erasure (a replay, the end of a call racing it) writes nothing.
    sealed = store.seal_result(_result("c-gone", T0))
    assert await store.save_sealed(sealed) is Saved.ERASED
    assert await store.save_sealed(sealed, only_new=True) is Saved.ERASED
    await store.save(_result("c-gone", T0))
    assert await mux.execute("EXISTS", "cv:call:c-gone") == 0
    assert await mux.execute("ZSCORE", INDEX, "c-gone") is None
    # Again (a retry finishing the files): still known, the mark renewed.
    assert await store.erase("c-gone", on_disk=False) is Erased.MARKED


async def test_erasing_an_unknown_call_writes_nothing(mux: RedisMux) -> None:
    store = CallStore(mux, SECRET, retention_days=30)
    assert await store.erase("c-typo", on_disk=False) is Erased.UNKNOWN
    assert await mux.execute("DBSIZE") == 0, "a mistyped id must not mark a future call"
    # Known on disk only (kept while Redis was away): marked, so its replay saves nothing.
    assert await store.erase("c-on-disk", on_disk=True) is Erased.MARKED
    assert await mux.execute("EXISTS", f"{ERASED_PREFIX}c-on-disk") == 1


async def test_an_erasure_with_redis_down_changes_nothing(
    mux: RedisMux, redis_server: RedisServer
) -> None:
    store = CallStore(mux, SECRET, retention_days=30)
    await store.save(_result("c-1", T0))
    await asyncio.to_thread(redis_server.kill9)
    with pytest.raises(CallStoreUnavailable):
        await store.erase("c-1", on_disk=False)
    await asyncio.to_thread(redis_server.restart)
    got = await store.get("c-1")
    assert got is not None and got["id"] == "c-1"


async def test_the_index_is_trimmed_when_read_and_expires_on_a_quiet_line(
    mux: RedisMux,
) -> None:
    # The index held call ids and start times for good on a line with no new calls: a save
    # was the only trim, and the key had no expiry.
    clock = FakeClock(T0)
    store = CallStore(mux, SECRET, retention_days=30, clock=clock)
    await store.save(_result("c-old", T0 - 29 * 86400))
    await store.save(_result("c-new", T0))
    assert 29 * 86400 < await mux.execute("TTL", INDEX) <= 30 * 86400
    await mux.execute("DEL", "cv:call:c-old")  # as Redis expires it
    clock.advance(2 * 86400)  # c-old's start is now past the retention; c-new's is not
    assert [c["id"] for c in (await store.recent(10, None)).calls] == ["c-new"]
    assert await mux.execute("ZSCORE", INDEX, "c-old") is None
    assert await mux.execute("ZSCORE", INDEX, "c-new") is not None


async def test_the_list_is_read_while_redis_refuses_writes(mux: RedisMux) -> None:
    # The list's trim is a write: sent in one MULTI with the read, a Redis refusing writes
    # (a failed append-only write on a full disk, a read-only replica) made GET /v1/calls a
    # 503 while GET /v1/calls/{id} still answered.
    clock = FakeClock(T0)
    store = CallStore(mux, SECRET, retention_days=30, clock=clock)
    await store.save(_result("c-old", T0 - 31 * 86400))
    await store.save(_result("c-new", T0))
    await mux.execute("CONFIG", "SET", "min-replicas-to-write", "1")  # writes refused
    try:
        page = await store.recent(10, None)
    finally:
        await mux.execute("CONFIG", "SET", "min-replicas-to-write", "0")
    assert [c["id"] for c in page.calls] == ["c-new"], "nor a call past its retention"


async def test_a_save_of_a_new_record_only_says_whether_it_wrote_or_kept_the_one_there(
    mux: RedisMux,
) -> None:
    # The next start saves the live record of each call a dead serve cut only where Redis
    # holds no record of the call (only_new). _SAVE answered "saved" also when it kept the
    # call's own record, so the journal logged that call as cut, and counting the answer
    # would have counted a call twice.
    store = CallStore(mux, SECRET, retention_days=30)
    own = store.seal_result(_result("c-own", T0))
    assert await store.save_sealed(own, ttl_s=1000) is Saved.WRITTEN
    record = CallRecord("triage", (), (), None, (), None, None, "cut_service_lost")
    cut = store.seal_result(CallResult("c-own", "6001", "700", T0, T0, record))
    assert await store.save_sealed(cut, ttl_s=5000, only_new=True) is Saved.KEPT
    assert await mux.execute("GET", "cv:call:c-own") == own.sealed, "the own record is kept"
    assert 990 < await mux.execute("TTL", "cv:call:c-own") <= 1000, "with its own expiry"
    assert await mux.execute("ZSCORE", INDEX, "c-own") is not None
    # None there: written and indexed, with the expiry asked for.
    new = store.seal_result(_result("c-new", T0 + 1))
    assert await store.save_sealed(new, ttl_s=5000, only_new=True) is Saved.WRITTEN
    assert await mux.execute("GET", "cv:call:c-new") == new.sealed
    assert 4990 < await mux.execute("TTL", "cv:call:c-new") <= 5000
    assert [c["id"] for c in (await store.recent(10, None)).calls] == ["c-new", "c-own"]
