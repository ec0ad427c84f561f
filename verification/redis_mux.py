"""One multiplexed Redis connection: every concurrent command of a process rides one socket.

redis-py's client takes a pooled connection per command, wraps it in retries and timeouts and
hands it back: about 70 µs of Python per command here, a third of a check's CPU (profile of
``bench/api.py``). Redis answers a connection's commands in order, so one connection can carry
every request in flight: the commands queued while the loop runs leave in one write, and the
answers are matched to their callers first in, first out (about 8 µs per command).

This is built on redis-py's own ``Connection`` (URL parsing, unix sockets, AUTH, HELLO,
SELECT, the hiredis parser); only the pooling is replaced. A connection that breaks fails every
command waiting on it with :class:`redis.exceptions.ConnectionError` and the next command opens
a new one. Nothing is retried here: a write that may have reached Redis must not be applied
twice (the callers' compare-and-set decides). A Redis that stops answering for ``timeout_s``
fails the waiting commands with :class:`redis.exceptions.TimeoutError`.

Not for blocking commands (BLPOP, WAIT) or pub/sub: they would hold up every command behind
them. A MULTI/EXEC block is queued as one piece, so no other command lands inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import hiredis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

_REPLIES_PER_STEP = 128  # answers matched in one loop step, at most

Arg = str | bytes | int | float
# A Lua script's first line from Redis 7.0 on: its flags (none: it may write, and is refused
# whole when Redis takes no writes). Redis 6 does not read it: the service needs Redis 7.0+.
SHEBANG = "#!lua\n"
Command = Sequence[Arg]


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script, run by its SHA1 and loaded on the first NOSCRIPT.

    Its source starts with :data:`SHEBANG` (prepended when missing): a script that may write,
    as every script here does, is then refused whole before it runs when Redis is out of
    memory under ``noeviction``, a read-only replica, or cannot persist. Without it Redis
    (kept compatible with its scripts of before 7.0) judges only the script's first write
    command: a script that first trims a sorted set (a write that frees memory) may then grow
    a full Redis, and a create went through while every check was refused.
    """

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        if not self.source.startswith("#!"):
            object.__setattr__(self, "source", SHEBANG + self.source)
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())  # noqa: S324 (Redis names scripts by SHA1)

    def call(self, keys: Sequence[str], args: Sequence[Arg]) -> list[Arg]:
        """The EVALSHA command for these keys and arguments."""
        return ["EVALSHA", self.sha, len(keys), *keys, *args]


def pack(command: Command) -> bytes:
    """One command in the Redis protocol (RESP), byte for byte as redis-py packs it.

    hiredis (already redis-py's parser here) packs in C, three times faster than Python; a
    bool or None is refused with TypeError, as redis-py refuses them.
    """
    # hiredis types its argument as a 1-tuple by mistake; any length is packed.
    packed: bytes = hiredis.pack_command(tuple(command))  # type: ignore[arg-type]
    return packed


def _retrieved(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _abandon(futures: Sequence[asyncio.Future[Any]]) -> None:
    """Nobody will await these (a timeout or a lost connection failed the first): mark their
    errors as seen, or asyncio logs each as "Future exception was never retrieved" (a Redis
    stall under the inbound bench logged one traceback per queued command of a MULTI)."""
    for fut in futures:
        fut.add_done_callback(_retrieved)


class _Link:
    """One open connection with its reader, writer and watchdog tasks."""

    def __init__(self, conn: AbstractConnection, timeout_s: float) -> None:
        self.conn = conn
        self.timeout_s = timeout_s
        self.pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.out: list[bytes] = []
        self.wake = asyncio.Event()
        self.closed: BaseException | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks = [
            loop.create_task(self._read(), name="redis-mux-read"),
            loop.create_task(self._write(), name="redis-mux-write"),
            loop.create_task(self._watch(), name="redis-mux-watch"),
        ]

    def queue(self, commands: Sequence[Command]) -> list[asyncio.Future[Any]]:
        if self.closed is not None:
            raise RedisConnectionError(f"Redis connection lost: {self.closed}")
        # Packed before any is queued: an argument that cannot be packed (TypeError) then
        # leaves nothing half-queued, such as a MULTI without its EXEC on the shared link.
        packed = [pack(cmd) for cmd in commands]
        loop = asyncio.get_running_loop()
        now = loop.time()
        futures = []
        for raw in packed:
            self.out.append(raw)
            fut: asyncio.Future[Any] = loop.create_future()
            self.pending.append((fut, now))
            futures.append(fut)
        self.wake.set()
        return futures

    async def _write(self) -> None:
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                out, self.out = self.out, []
                if out:
                    await self.conn.send_packed_command(out, check_health=False)
        except asyncio.CancelledError:
            raise
        except (RedisError, OSError) as exc:  # the connection failed
            self.fail(exc)
        except Exception as exc:  # a defect: it ends this connection too, but is no outage
            log.exception("Redis connection: sending commands failed")
            self.fail(exc)

    async def _read(self) -> None:
        done = 0
        try:
            while True:
                done += 1
                if done % _REPLIES_PER_STEP == 0:
                    # Answers already buffered are read without suspending: let the callers
                    # (and everything else) run now and then, whatever the backlog.
                    await asyncio.sleep(0)
                try:
                    reply: Any = await self.conn.read_response(disconnect_on_error=False)
                except ResponseError as exc:  # an error reply: that command's answer
                    reply = exc
                if not self.pending:
                    raise RedisConnectionError("Redis sent an answer nobody asked for")
                fut, _ = self.pending.popleft()
                if fut.done():  # its caller was cancelled: the answer is dropped
                    continue
                if isinstance(reply, Exception):
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)
        except asyncio.CancelledError:
            raise
        except (RedisError, OSError) as exc:  # the connection failed
            self.fail(exc)
        except Exception as exc:  # a defect: it ends this connection too, but is no outage
            log.exception("Redis connection: reading answers failed")
            self.fail(exc)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.closed is None:
                await asyncio.sleep(self.timeout_s / 4)
                if self.pending and loop.time() - self.pending[0][1] > self.timeout_s:
                    self.fail(RedisTimeoutError(f"Redis did not answer within {self.timeout_s} s"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a defect: without its watchdog a stalled Redis hangs all
            log.exception("Redis connection: its watchdog failed")
            self.fail(exc)

    def fail(self, exc: BaseException, *, quiet: bool = False) -> None:
        """Close this connection; every waiting command gets ``exc`` (as a Redis error)."""
        if self.closed is not None:
            return
        self.closed = exc
        error = (
            exc
            if isinstance(exc, RedisConnectionError | RedisTimeoutError)
            else RedisConnectionError(f"Redis connection lost: {exc}")
        )
        while self.pending:
            fut, _ = self.pending.popleft()
            if not fut.done():
                fut.set_exception(error)
        self.out.clear()
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()
        # Closing the socket needs no await: the transport closes on the loop.
        writer = getattr(self.conn, "_writer", None)
        if writer is not None:
            writer.close()
        if not quiet:
            # A string, not the error: a buffered log record would hold the error, its traceback
            # and every future of the frames it went through.
            log.warning("Redis connection closed: %s", str(error))

    async def close(self) -> None:
        self.fail(RedisConnectionError("closed"), quiet=True)
        await asyncio.gather(*self.tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.conn.disconnect(nowait=True)


class RedisMux:
    """Commands over one shared connection, opened on first use and after a failure."""

    def __init__(self, url: str, *, timeout_s: float = 2.0) -> None:
        pool = ConnectionPool.from_url(url, decode_responses=True, socket_connect_timeout=timeout_s)
        self._connection_class = pool.connection_class
        self._kwargs = dict(pool.connection_kwargs)
        # No per-read timeout (it costs a timer per command): the watchdog times out instead.
        self._kwargs["socket_timeout"] = None
        self._timeout_s = timeout_s
        self._link: _Link | None = None
        self._connecting: asyncio.Lock | None = None
        self._connects = 0  # connection attempts finished
        self._connect_error: RedisConnectionError | RedisTimeoutError | None = None
        self._closed = False

    async def _ready_link(self) -> _Link:
        link = self._link
        if link is not None and link.closed is None:
            return link
        if self._closed:
            raise RedisConnectionError("Redis client closed")
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        seen = self._connects
        async with self._connecting:
            link = self._link
            if link is not None and link.closed is None:
                return link
            failed = self._connect_error
            if self._connects != seen and failed is not None:
                # A connect failed while this command waited for it: fail with it instead
                # of queueing for one more, so a burst fails in one timeout, not one each.
                raise type(failed)(str(failed))
            if link is not None:
                await link.close()
            self._connect_error = None
            try:
                link = await self._connect()
            except (RedisConnectionError, RedisTimeoutError) as exc:
                self._connect_error = exc
                raise
            finally:
                self._connects += 1
            self._link = link
            return link

    async def _connect(self) -> _Link:
        """A new connection, handshake included, within the timeout."""
        conn = self._connection_class(**self._kwargs)
        try:
            # socket_connect_timeout bounds the TCP connect only; a frozen Redis accepts the
            # connection (the kernel does) and then never answers redis-py's HELLO.
            await asyncio.wait_for(conn.connect(), self._timeout_s)  # type: ignore[no-untyped-call]
        except (OSError, RedisConnectionError, RedisTimeoutError) as exc:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)
            if isinstance(exc, TimeoutError):
                raise RedisTimeoutError(
                    f"Redis did not answer a new connection within {self._timeout_s} s"
                ) from exc
            if isinstance(exc, RedisConnectionError | RedisTimeoutError):
                raise
            raise RedisConnectionError(str(exc)) from exc
        link = _Link(conn, self._timeout_s)
        link.start()
        return link

    async def execute(self, *command: Arg) -> Any:
        """One command's answer; an error reply is raised as redis-py's exception."""
        link = await self._ready_link()
        (fut,) = link.queue([command])
        return await fut

    async def many(self, commands: Sequence[Command]) -> list[Any]:
        """Several commands sent together; their answers in order, error replies as exception
        values (a pipeline without a transaction: each command stands alone)."""
        link = await self._ready_link()
        futures = link.queue(commands)
        results: list[Any] = []
        try:
            for fut in futures:
                try:
                    results.append(await fut)
                except ResponseError as exc:
                    results.append(exc)
        except BaseException:
            _abandon(futures)
            raise
        return results

    async def transaction(self, commands: Sequence[Command]) -> list[Any]:
        """MULTI, the commands, EXEC: all or none; the answers of the commands."""
        link = await self._ready_link()
        futures = link.queue([("MULTI",), *commands, ("EXEC",)])
        first: ResponseError | None = None
        try:
            for fut in futures[:-1]:  # "OK", then "QUEUED" for each command
                try:
                    await fut
                except ResponseError as exc:  # a rejected command: EXEC aborts them all
                    first = first or exc
            result: list[Any] = await futures[-1]
        except ResponseError:
            if first is not None:
                raise first from None
            raise
        except BaseException:
            _abandon(futures)
            raise
        return result

    async def evalsha(self, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Run ``script``, loading it first if this Redis does not know it yet."""
        try:
            return await self.execute(*script.call(keys, args))
        except NoScriptError:
            await self.load(script)
            return await self.execute(*script.call(keys, args))

    async def load(self, script: Script) -> None:
        await self.execute("SCRIPT", "LOAD", script.source)

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` was called: every command fails from then on."""
        return self._closed

    async def aclose(self) -> None:
        self._closed = True
        if self._link is not None:
            await self._link.close()
            self._link = None
