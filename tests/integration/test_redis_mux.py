"""The multiplexed Redis connection against a real redis-server: answers reach the right
caller under concurrency, error replies stay with their command, scripts load themselves,
MULTI/EXEC is all or nothing, and a dead or frozen Redis fails the waiting commands quickly
and the next command reconnects.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.conftest import RedisServer
from verification.redis_mux import RedisMux, Script

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]


async def test_concurrent_commands_each_get_their_own_answer(redis_server: RedisServer) -> None:
    # Not the 0.5 s mux: its connect, made in the first burst below, once took longer on a
    # loaded machine (asyncio's debug mode capturing 50 tasks' stacks), and this test is about
    # whose answer is whose, not about time.
    mux = RedisMux(redis_server.url, timeout_s=5.0)
    try:
        await _each_their_own(mux)
    finally:
        await mux.aclose()


async def _each_their_own(mux: RedisMux) -> None:
    async def one(i: int) -> str:
        await mux.execute("SET", f"k{i}", f"v{i}")
        got: str = await mux.execute("GET", f"k{i}")
        return got

    # Started 50 at a time: in asyncio's debug mode (on in these tests) each new task captures
    # its creation stack, and 500 in one loop step held the loop over the 100 ms limit.
    tasks: list[asyncio.Task[str]] = []
    for start in range(0, 500, 50):
        tasks += [asyncio.create_task(one(i)) for i in range(start, start + 50)]
        await asyncio.sleep(0)
    answers = await asyncio.gather(*tasks)
    assert answers == [f"v{i}" for i in range(500)]


async def test_an_error_reply_belongs_to_its_command_only(mux: RedisMux) -> None:
    await mux.execute("SET", "text", "x")
    results = await mux.many([("INCR", "text"), ("GET", "text"), ("INCR", "n")])
    assert isinstance(results[0], ResponseError)
    assert results[1:] == ["x", 1]
    with pytest.raises(ResponseError):
        await mux.execute("INCR", "text")
    assert await mux.execute("GET", "text") == "x"


async def test_a_script_is_loaded_on_first_use_and_after_a_flush(mux: RedisMux) -> None:
    script = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert await mux.evalsha(script, ["s"], [2]) == 2
    await mux.execute("SCRIPT", "FLUSH")
    assert await mux.evalsha(script, ["s"], [3]) == 5


async def test_a_transaction_applies_all_or_nothing(mux: RedisMux) -> None:
    assert await mux.transaction([("SET", "a", "1"), ("INCR", "a")]) == ["OK", 2]
    with pytest.raises(ResponseError):  # an unknown command: EXEC aborts every command
        await mux.transaction([("SET", "a", "9"), ("NOSUCHCOMMAND",)])
    assert await mux.execute("GET", "a") == "2"


async def test_a_transaction_that_cannot_be_packed_leaves_the_link_usable(mux: RedisMux) -> None:
    # A review found MULTI queued before a None argument failed to pack, leaving the shared
    # link inside a transaction: every later command of the process answered "QUEUED".
    with pytest.raises(TypeError):
        await mux.transaction([("SET", "a", "1"), ("SET", "b", None)])  # type: ignore[list-item]
    assert await mux.execute("SET", "c", "3") == "OK"
    assert await mux.execute("GET", "a") is None


async def test_a_killed_redis_fails_waiting_commands_then_reconnects(
    mux: RedisMux, redis_server: RedisServer
) -> None:
    await mux.execute("SET", "kept", "yes")
    await asyncio.to_thread(redis_server.kill9)
    with pytest.raises(RedisConnectionError):
        await mux.execute("GET", "kept")
    with pytest.raises(RedisConnectionError):  # still down: refused, not hung
        await asyncio.wait_for(mux.execute("GET", "kept"), 2.0)
    await asyncio.to_thread(redis_server.restart)
    assert await mux.execute("GET", "kept") == "yes"  # AOF fsynced every write


async def test_a_frozen_redis_times_out_instead_of_hanging_for_as_long_as_it_is_frozen(
    mux: RedisMux, redis_server: RedisServer
) -> None:
    # After the first timeout every command opens a new connection: the kernel accepts it
    # for the stopped Redis, and redis-py's handshake (HELLO, CLIENT SETNAME) then waits for
    # an answer. That wait had no limit: requests hung until Redis came back (probe of the
    # API with kill -STOP), and one queued create sent its SMS a minute after its client had
    # given up. Commands that queue behind a failing connect must fail with it, not each
    # wait for a connect of their own.
    pid = redis_server.pid
    assert pid is not None
    await mux.execute("PING")
    os.kill(pid, signal.SIGSTOP)
    try:
        loop = asyncio.get_running_loop()
        for burst in (3, 20, 20):  # the open connection times out; then new ones each time
            started = loop.time()
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(mux.execute("GET", "x") for _ in range(burst)), return_exceptions=True
                ),
                10.0,
            )
            assert all(isinstance(r, RedisTimeoutError) for r in results), results
            assert loop.time() - started < 1.5, "timeout 0.5 s (watchdog every 0.125 s)"
    finally:
        os.kill(pid, signal.SIGCONT)
    assert await mux.execute("PING") == "PONG"


async def test_a_frozen_redis_fails_a_transaction_once_without_orphaned_errors(
    mux: RedisMux, redis_server: RedisServer
) -> None:
    # Every command of a MULTI block has a future; the first to fail ends the wait. The
    # others' errors must not be logged as "Future exception was never retrieved" (one
    # traceback per command of every save, seen under the inbound bench when Redis stalled).
    loop = asyncio.get_running_loop()
    orphaned: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: orphaned.append(context))
    pid = redis_server.pid
    assert pid is not None
    await mux.execute("PING")

    async def attempt() -> str:
        try:
            await mux.transaction([("SET", "a", "1"), ("SET", "b", "2"), ("SET", "c", "3")])
        except RedisTimeoutError as exc:
            return type(exc).__name__
        return "applied"

    os.kill(pid, signal.SIGSTOP)
    try:
        assert await attempt() == "TimeoutError"
    finally:
        os.kill(pid, signal.SIGCONT)
    # The next command replaces the failed connection, which held the last references to
    # the futures (through its error's traceback): they are collected, and would log, now.
    assert await mux.execute("PING") == "PONG"
    gc.collect()
    await asyncio.sleep(0.05)  # the done callbacks and any late logging run
    loop.set_exception_handler(None)
    assert not orphaned, [c.get("message") for c in orphaned]


async def test_a_cancelled_caller_does_not_shift_the_answers(mux: RedisMux) -> None:
    await mux.execute("SET", "a", "A")
    await mux.execute("SET", "b", "B")
    first = asyncio.ensure_future(mux.execute("GET", "a"))
    second = asyncio.ensure_future(mux.execute("GET", "b"))
    await asyncio.sleep(0)  # both queued
    first.cancel()
    assert await second == "B"
    assert await mux.execute("GET", "a") == "A"


async def test_a_closed_client_refuses(redis_server: RedisServer) -> None:
    client = RedisMux(redis_server.url)
    await client.execute("PING")
    await client.aclose()
    with pytest.raises(RedisConnectionError):
        await client.execute("PING")


async def test_a_defect_reading_answers_is_logged_with_its_traceback(
    mux: RedisMux, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bug (ours or redis-py's parser) is no lost connection: before, it was one WARNING line,
    # "Redis connection closed", with no traceback, and the link reconnected as after an outage.
    assert await mux.execute("PING") == "PONG"
    link = mux._link
    assert link is not None

    async def broken(**_: object) -> object:
        raise TypeError("a parser defect")

    monkeypatch.setattr(link.conn, "read_response", broken)  # the reader's next read
    caplog.set_level("DEBUG", logger="verification.redis_mux")
    await mux.execute("SET", "k", "v")  # answered by the read already under way
    # The read fails the link and ends; the link's other tasks are cancelled with it.
    await asyncio.wait_for(asyncio.gather(*link.tasks, return_exceptions=True), 2)
    assert link.closed is not None
    defects = [r for r in caplog.records if r.levelname == "ERROR" and r.exc_info]
    assert defects, [r.getMessage() for r in caplog.records]
    exc_info = defects[0].exc_info
    assert exc_info is not None and isinstance(exc_info[1], TypeError)
    assert await mux.execute("GET", "k") == "v"  # the next command reconnects


@pytest.mark.parametrize("task", ["write", "watch"])
async def test_a_defect_in_the_links_other_tasks_closes_it_loudly(
    mux: RedisMux, caplog: pytest.LogCaptureFixture, task: str
) -> None:
    """Each of a link's tasks ending on a defect closes the link with its traceback logged,
    and the next command opens a new one: nothing is left half-alive. (The watchdog's death
    went unseen before: the link stayed open without it, and a Redis that stalled then
    hung every command on it for as long as it stalled.) Nothing here stops the service: a
    new connection is all a restart would bring."""
    assert await mux.execute("PING") == "PONG"
    link = mux._link
    assert link is not None
    caplog.set_level("DEBUG", logger="verification.redis_mux")
    if task == "write":

        async def broken(*_: object, **__: object) -> None:
            raise TypeError("a defect sending")

        link.conn.send_packed_command = broken  # type: ignore[method-assign]
        with pytest.raises(RedisConnectionError, match="a defect sending"):
            await mux.execute("SET", "k", "v")
    else:
        link.timeout_s = None  # type: ignore[assignment]  # its next look fails (TypeError)
    await asyncio.wait_for(asyncio.gather(*link.tasks, return_exceptions=True), 2)
    assert link.closed is not None
    defects = [r for r in caplog.records if r.levelname == "ERROR" and r.exc_info]
    assert len(defects) == 1, [r.getMessage() for r in caplog.records]
    exc_info = defects[0].exc_info
    assert exc_info is not None and isinstance(exc_info[1], TypeError)
    assert all(t.done() and (t.cancelled() or t.exception() is None) for t in link.tasks)
    assert await mux.execute("SET", "k", "w") == "OK"  # the next command reconnects
    assert mux._link is not link
