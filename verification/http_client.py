"""Outbound HTTP/1.1 POSTs (the SMS gateway, webhooks) over kept-alive connections.

Why not aiohttp's client: every SMS the service sends is one POST, and aiohttp's
``ClientSession.post`` cost about 100 µs of CPU per request on the bench machine, against
about 19 µs for a protocol that writes one request and parses one answer (both measured at
50 concurrent requests against the bench's SMS gateway, uvloop). At the API's create rate
that was a fifth of a core. This client does only what those two callers need:

- ``POST`` of a byte body to an ``http://`` or ``https://`` URL (TLS verified against the
  system's CA store, SNI), with the caller's headers; no redirects, cookies, proxies,
  compression or ``Expect: 100-continue``;
- answers with ``Content-Length``, ``Transfer-Encoding: chunked`` or a body up to the close;
  informational (1xx) answers are skipped; the body is capped (``MAX_BODY``); an answer
  whose head came and whose body did not (cut, malformed, over the cap, or not complete by
  the deadline: :class:`StalledBody`) fails with :class:`IncompleteAnswer`, which carries
  the head's status;
- a pool per origin (scheme, host, port): at most ``max_per_origin`` connections, further
  requests wait for one; an idle connection is closed after ``idle_s`` and is never reused
  once the server has closed it or said ``Connection: close``;
- one deadline per request (waiting for a connection, connecting, sending and the whole
  answer); a connection whose request timed out, failed or was cancelled is closed, never
  returned to the pool.

With ``address_filter``, the client resolves each host itself and connects only to the
addresses the filter allows (the webhook sender's guard against a callback URL pointing into
the clinic's network: :mod:`verification.callbacks`). It resolves on threads of its own
(:class:`_Resolver`), never on the event loop's shared resolver: a lookup cannot be cancelled
once it runs, and callback hosts are chosen by API clients, so a name whose DNS never answers
would otherwise hold every thread of that resolver for the system's full resolver timeout
after each POST gave up, and every other lookup of the process (the SMS gateway's host, the
operator's webhook, the SIP route) would wait behind them.

Every failure is an :class:`HttpClientError` (or ``TimeoutError`` for a deadline that came
before the answer's head; after it, :class:`StalledBody`), so a
caller maps two exceptions, not a framework's hierarchy. Nothing is retried here, with one
exception: a POST with an ``Idempotency-Key`` whose kept-alive connection the server closed
before answering a byte of it (its idle timeout ending as the request went out) goes once more
on a new connection. Any other retry is the caller's decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import quote, urlsplit

MAX_HEAD = 64 * 1024  # status line and headers of one answer
MAX_BODY = 1024 * 1024


class HttpClientError(Exception):
    """The request did not get a complete HTTP answer (or could not be made at all)."""

    permanent = False  # True: the same request would fail again (do not retry it)


class NoAnswer(HttpClientError):
    """The connection closed before a byte of the answer came."""


class IncompleteAnswer(HttpClientError):
    """The answer's status line and headers came, its body did not: cut by a close, framed
    wrongly (a bad chunk), or over ``MAX_BODY``. ``status`` is the one the head gave: a 2xx
    says the request arrived, which a caller may need to know (the clinic line's webhook)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class StalledBody(IncompleteAnswer):
    """The head came within the deadline and the body had not all come at it (a receiver
    that stalls or drips after its status line). Not a ``TimeoutError``: the status says
    what became of the request, as for a body that broke off; a caller that wants the
    deadline's own reading (retry as a timeout) catches this class with ``TimeoutError``."""


class UnusableUrl(HttpClientError):
    """The URL cannot be requested: malformed, or its host resolves only to addresses this
    client may not connect to (``address_filter``)."""

    permanent = True


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    status: int
    body: bytes


@dataclass(frozen=True, slots=True)
class _Origin:
    tls: bool
    host: str
    port: int
    authority: str  # the Host header (an international name in its IDNA form)

    @property
    def name(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.authority}"


@dataclass(frozen=True, slots=True)
class _Target:
    origin: _Origin
    path: str  # path and query, as sent in the request line


def _parse_url(url: str) -> _Target:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnusableUrl(f"bad URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in {"http", "https"}:
        raise UnusableUrl(f"bad URL: scheme {scheme or '(none)'!r} is not http or https")
    host = parts.hostname
    if not host:
        raise UnusableUrl("bad URL: no host")
    if parts.username is not None or parts.password is not None:
        raise UnusableUrl("bad URL: credentials in a URL are not sent; use a token setting")
    tls = scheme == "https"
    default = 443 if tls else 80
    port = port or default
    try:
        ascii_host = host if host.isascii() else host.encode("idna").decode("ascii")
    except UnicodeError:
        raise UnusableUrl(f"bad URL: host {host!r} is not a valid name") from None
    name = f"[{ascii_host}]" if ":" in ascii_host else ascii_host
    authority = name if port == default else f"{name}:{port}"
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    # Non-ASCII, spaces and control characters percent-encoded; what is already encoded stays.
    path = quote(path, safe="!#$%&'()*+,/:;=?@[]~")
    return _Target(_Origin(tls, ascii_host, port, authority), path)


def _allowed(
    allow: Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], bool], address: str
) -> bool:
    try:
        return allow(ipaddress.ip_address(address))
    except ValueError:  # a scoped IPv6 address (fe80::1%eth0): link-local, never allowed
        return False


def _header_block(headers: Mapping[str, str]) -> bytes:
    lines = []
    for name, value in headers.items():
        if not name or any(c in name for c in ":\r\n ") or any(c in value for c in "\r\n\0"):
            raise HttpClientError(f"bad header {name!r}: line breaks or a bad name")
        lines.append(f"{name}: {value}\r\n")
    try:
        return "".join(lines).encode("latin-1")
    except UnicodeEncodeError:
        raise HttpClientError("bad header: not latin-1 text") from None


class _Connection(asyncio.Protocol):
    """One connection: sends a request, parses its answer, says whether it can be reused."""

    def __init__(self, origin: _Origin) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[HttpAnswer] | None = None
        self._buf = bytearray()
        self._state = "head"
        self._status = 0
        self._keep = False
        self._remaining = 0  # body bytes still to come (length) or of this chunk (chunked)
        self._body = bytearray()
        self._heard = False  # a byte of the answer to the request in flight came
        self._headed = False  # the answer's status line and headers came (not a 1xx)
        self.reusable = False
        self.sent = 0  # requests sent on it: past the first, it is a kept-alive connection

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            self.close()  # bytes nobody asked for: the connection is out of step
            return
        self._heard = True
        self._buf += data
        try:
            self._parse()
        except HttpClientError as exc:
            self._fail(IncompleteAnswer(str(exc), self._status) if self._headed else exc)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost finishes the answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        why = f": {exc}" if exc else ""
        if self._state == "close":
            self._finish()
        elif not self._heard:
            waiter.set_exception(
                NoAnswer(f"{self.origin.name} closed the connection before answering{why}")
            )
        else:
            message = f"{self.origin.name} closed the connection mid-answer{why}"
            waiter.set_exception(
                IncompleteAnswer(message, self._status)
                if self._headed
                else HttpClientError(message)
            )

    # -- a request -----------------------------------------------------------------------
    def send(self, request: bytes) -> asyncio.Future[HttpAnswer]:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self._state, self._buf, self._body, self.reusable = "head", bytearray(), bytearray(), False
        self._heard = self._headed = False
        self.sent += 1
        self.transport.write(request)
        return self._waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def expire(self, waiter: asyncio.Future[HttpAnswer]) -> None:
        """The request's deadline: ``waiter`` (its answer) fails, with :class:`StalledBody`
        once the head came, else ``TimeoutError``."""
        if waiter.done():
            return
        if self._headed and waiter is self._waiter:
            message = f"{self.origin.name}: the answer's body was not complete by the deadline"
            waiter.set_exception(StalledBody(message, self._status))
        else:
            waiter.set_exception(TimeoutError())

    def _fail(self, exc: HttpClientError) -> None:
        self.close()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    def _finish(self) -> None:
        self.reusable = self._keep and self._state == "done" and not self._buf and not self.closed
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(HttpAnswer(self._status, bytes(self._body)))

    def _take_body(self, n: int) -> None:
        if len(self._body) + n > MAX_BODY:
            raise HttpClientError(f"{self.origin.name}: answer body over {MAX_BODY} bytes")
        self._body += self._buf[:n]
        del self._buf[:n]

    def _parse(self) -> None:
        while True:
            if self._state == "head":
                end = self._buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buf) > MAX_HEAD:
                        raise HttpClientError(f"{self.origin.name}: answer head over 64 KiB")
                    return
                head = bytes(self._buf[:end])
                del self._buf[: end + 4]
                if self._head(head):
                    continue  # a 1xx: the real answer follows
                if self._state == "done":
                    self._finish()
                    return
            elif self._state == "length":
                n = min(self._remaining, len(self._buf))
                self._take_body(n)
                self._remaining -= n
                if self._remaining:
                    return
                self._state = "done"
                self._finish()
                return
            elif self._state == "close":
                self._take_body(len(self._buf))
                return
            elif self._state == "chunk-size":
                eol = self._buf.find(b"\r\n")
                if eol < 0:
                    if len(self._buf) > 1024:
                        raise HttpClientError(f"{self.origin.name}: bad chunk size line")
                    return
                size_text = bytes(self._buf[:eol]).split(b";", 1)[0].strip()
                del self._buf[: eol + 2]
                try:
                    if not size_text or size_text.startswith((b"-", b"+")):
                        raise ValueError
                    self._remaining = int(size_text, 16)
                except ValueError:
                    raise HttpClientError(f"{self.origin.name}: bad chunk size") from None
                self._state = "chunk-data" if self._remaining else "trailers"
            elif self._state == "chunk-data":
                if self._remaining:
                    n = min(self._remaining, len(self._buf))
                    self._take_body(n)
                    self._remaining -= n
                    if self._remaining:
                        return
                if len(self._buf) < 2:
                    return
                if self._buf[:2] != b"\r\n":
                    raise HttpClientError(f"{self.origin.name}: chunk not followed by CRLF")
                del self._buf[:2]
                self._state = "chunk-size"
            elif self._state == "trailers":
                eol = self._buf.find(b"\r\n")
                if eol < 0:
                    if len(self._buf) > MAX_HEAD:
                        raise HttpClientError(f"{self.origin.name}: trailers over 64 KiB")
                    return
                del self._buf[: eol + 2]
                if eol == 0:  # the empty line after the trailers (if any)
                    self._state = "done"
                    self._finish()
                    return
            else:  # "done": more bytes after a complete answer
                raise HttpClientError(f"{self.origin.name}: bytes after the answer")

    def _head(self, head: bytes) -> bool:
        """Read a status line and headers; True for a 1xx answer (skipped)."""
        lines = head.split(b"\r\n")
        status_line = lines[0].split(b" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1."):
            raise HttpClientError(f"{self.origin.name}: not an HTTP/1.x answer")
        version = status_line[0]
        code = status_line[1]
        if len(code) != 3 or not code.isdigit():
            raise HttpClientError(f"{self.origin.name}: bad status {code!r}")
        status = int(code)
        if 100 <= status < 200:
            if status == 101:
                raise HttpClientError(f"{self.origin.name}: unexpected 101 Switching Protocols")
            return True
        self._status = status
        length: int | None = None
        chunked = False
        connection = b""
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise HttpClientError(f"{self.origin.name}: bad header line")
            key = name.strip().lower()
            if key == b"content-length":
                text = value.strip()
                if not text.isdigit() or (length is not None and length != int(text)):
                    raise HttpClientError(f"{self.origin.name}: bad Content-Length")
                length = int(text)
            elif key == b"transfer-encoding":
                codings = [c.strip() for c in value.lower().split(b",")]
                if codings[-1] != b"chunked":
                    raise HttpClientError(f"{self.origin.name}: unsupported Transfer-Encoding")
                chunked = True
            elif key == b"connection":
                connection = value.strip().lower()
        self._headed = True  # a well-formed head: a failure from here on is the body's
        if version == b"HTTP/1.1":
            self._keep = b"close" not in connection
        else:
            self._keep = b"keep-alive" in connection
        if status in {204, 304}:
            self._state = "done"
        elif chunked:
            self._state = "chunk-size"
        elif length is not None:
            if length > MAX_BODY:
                raise HttpClientError(f"{self.origin.name}: answer body over {MAX_BODY} bytes")
            self._remaining = length
            self._state = "length" if length else "done"
        else:
            self._state = "close"
            self._keep = False
        return False


_IDEMPOTENCY_HEADERS = frozenset({"idempotency-key", "x-idempotency-key"})


def _idempotent(headers: Mapping[str, str]) -> bool:
    """Whether a POST carries a key by which its server can recognise it sent again."""
    return any(name.lower() in _IDEMPOTENCY_HEADERS for name in headers)


_Lookup = tuple[str, int, "asyncio.Future[list[str]]", asyncio.AbstractEventLoop]


class _Resolver:
    """``getaddrinfo`` on a few daemon threads of its own (see the module's docstring).

    A lookup whose caller gave up (its future is done: cancelled by a deadline) before a
    thread took it is skipped, so a hung name does not keep the threads busy for lookups
    nobody waits for. Daemon threads: one stuck in a lookup does not hold up the process's
    exit."""

    def __init__(self, threads: int = 4) -> None:
        self._threads = threads
        self._queue: deque[_Lookup] = deque()
        self._ready = threading.Condition()
        self._started = 0
        self._closed = False

    async def lookup(self, host: str, port: int) -> list[str]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[str]] = loop.create_future()
        with self._ready:
            if self._closed:
                raise OSError("the resolver is closed")
            self._queue.append((host, port, fut, loop))
            if self._started < self._threads:
                self._started += 1
                threading.Thread(target=self._work, name="callback-dns", daemon=True).start()
            self._ready.notify()
        return await fut

    def close(self) -> None:
        with self._ready:
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
            self._ready.notify_all()
        for _host, _port, fut, _loop in queued:  # called on the loop: settle them here
            if not fut.done():
                fut.set_exception(OSError("the resolver is closed"))

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if self._closed:
                    return
                host, port, fut, loop = self._queue.popleft()
            if fut.done():  # its caller gave up while it queued (read only: a bool)
                continue
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                found: list[str] | OSError = [str(info[4][0]) for info in infos]
            except OSError as exc:
                found = exc
            except Exception as exc:  # any: a thread that died would strand its callers
                found = OSError(f"lookup failed: {exc!r}")
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits
                loop.call_soon_threadsafe(_settle, fut, found)


def _settle(fut: asyncio.Future[list[str]], found: list[str] | OSError) -> None:
    if fut.done():
        return
    if isinstance(found, OSError):
        fut.set_exception(found)
    else:
        fut.set_result(found)


class _Pool:
    """The connections to one origin."""

    def __init__(self, origin: _Origin, limit: int) -> None:
        self.origin = origin
        self.limit = limit
        self.count = 0  # open or opening
        self.idle: list[_Connection] = []  # most recently used last
        self.waiters: deque[asyncio.Future[_Connection | None]] = deque()


def _failed(done: asyncio.Future[ssl.SSLContext]) -> bool:
    """Whether a finished future ended without a result (its exception then counts as seen)."""
    return done.cancelled() or done.exception() is not None


class HttpClient:
    """Kept-alive HTTP/1.1 POSTs. One per process; :meth:`close` at shutdown."""

    def __init__(
        self,
        *,
        max_per_origin: int = 64,
        idle_s: float = 15.0,
        user_agent: str = "clinic-voice",
        ssl_context: ssl.SSLContext | None = None,
        address_filter: Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], bool]
        | None = None,
    ) -> None:
        self._max = max_per_origin
        self._allow = address_filter
        self._resolver = _Resolver() if address_filter is not None else None
        self._idle_s = idle_s
        self._ua = user_agent
        self._ssl = ssl_context
        self._ssl_loading: asyncio.Future[ssl.SSLContext] | None = None
        self._pools: dict[_Origin, _Pool] = {}
        self._targets: dict[str, _Target] = {}
        self._closed = False
        self._swept = time.monotonic()

    @property
    def closed(self) -> bool:
        return self._closed

    async def _tls(self) -> ssl.SSLContext:
        """The client's TLS context; the default one is made at the first https:// origin.

        Made in a thread, once (the connections that wait for it share it): it reads and
        parses the system's CA store, 30 ms of CPU here and 124 ms in a loaded test run,
        which on the loop held every request and call of the service."""
        if self._ssl is not None:
            return self._ssl
        loading = self._ssl_loading
        # A load that failed is not kept: the next connect tries again. Decided here, not by
        # its waiters: when every connect that waited for it was cancelled (their deadline)
        # no waiter is left to forget it, and the next connect got that old error once.
        if loading is None or (loading.done() and _failed(loading)):
            loading = asyncio.ensure_future(asyncio.to_thread(ssl.create_default_context))
            # Its failure is seen here even when every waiter was cancelled (no "exception
            # never retrieved" at exit): the next connect tries again.
            loading.add_done_callback(_failed)
            self._ssl_loading = loading
        # Shielded: a connect cancelled meanwhile leaves the load to the others. A failure
        # reaches each connect still waiting for this load.
        self._ssl = await asyncio.shield(loading)
        return self._ssl

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], *, timeout_s: float
    ) -> HttpAnswer:
        """POST ``body``; the answer, :class:`HttpClientError`, or ``TimeoutError``."""
        if self._closed:
            raise HttpClientError("the HTTP client is closed")
        target = self._targets.get(url)
        if target is None:
            target = _parse_url(url)
            if len(self._targets) < 1024:
                self._targets[url] = target
        origin = target.origin
        request = (
            b"POST %b HTTP/1.1\r\nHost: %b\r\nUser-Agent: %b\r\nContent-Length: %d\r\n%b\r\n%b"
            % (
                target.path.encode("ascii"),
                origin.authority.encode("ascii"),
                self._ua.encode(),
                len(body),
                _header_block(headers),
                body,
            )
        )
        pool = self._pool(origin)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        conn = self._take_idle(pool)
        resent = False
        while True:
            if conn is None:  # wait for a slot, or connect: both within the deadline
                async with asyncio.timeout_at(deadline):
                    conn = await self._acquire(pool)
            # Kept alive whether it came from the idle list or was handed over by the request
            # before it as this one waited for a slot (the pool full).
            reused = conn.sent > 0
            # The answer's deadline as one timer on the future (cheaper than a timeout context
            # per request on the hot path): on expiry the future fails with TimeoutError, or
            # StalledBody when the head had come.
            answer_fut = conn.send(request)
            timer = loop.call_at(deadline, conn.expire, answer_fut)
            try:
                answer = await answer_fut
            except BaseException as exc:
                conn.close()
                self._release(pool, conn)
                if resent or not (reused and isinstance(exc, NoAnswer) and _idempotent(headers)):
                    raise
                # A kept-alive connection the server closed as the request went out (its
                # idle timeout ended just then): nothing was answered. A request the server
                # can tell apart from a second one (its Idempotency-Key) goes once more, on a
                # new connection, within the same deadline, as Go's net/http does.
                resent, conn = True, None  # once: a second such close is a failure
                pool = self._pool(origin)  # released with nothing open, it was forgotten
                continue
            finally:
                timer.cancel()
            self._release(pool, conn)
            return answer

    def _pool(self, origin: _Origin) -> _Pool:
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = _Pool(origin, self._max)
        return pool

    def _take_idle(self, pool: _Pool) -> _Connection | None:
        """The most recently used idle connection that is still good, if any."""
        now = time.monotonic()
        while pool.idle:
            conn = pool.idle.pop()
            if not conn.closed and now - conn.idle_since < self._idle_s:
                return conn
            conn.close()
            pool.count -= 1
        return None

    async def _acquire(self, pool: _Pool) -> _Connection:
        """A connection once a slot is free (after :meth:`_take_idle` found none)."""
        if pool.count >= pool.limit:
            waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
            pool.waiters.append(waiter)
            try:
                handed = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    # A connection (or a slot) was handed over as we were cancelled: pass it on.
                    passed = waiter.result()
                    if passed is not None:
                        passed.reusable = True
                        self._release(pool, passed)
                    else:
                        pool.count -= 1
                        self._wake(pool)
                elif waiter in pool.waiters:
                    pool.waiters.remove(waiter)
                raise
            if handed is not None and not handed.closed:
                return handed
            if handed is not None:
                # Closed by the server between its hand-over and this task's turn (an idle
                # timeout): nothing was sent on it, and a send would wait unanswered for the
                # whole deadline (asyncio) or raise past the request's release (uvloop).
                # Its slot is this request's: a new connection on it.
                handed.close()
        else:
            pool.count += 1  # a slot, taken before the first await
        try:
            return await self._connect(pool.origin)
        except BaseException:
            pool.count -= 1
            self._wake(pool)
            self._forget_if_empty(pool)
            raise

    async def _connect(self, origin: _Origin) -> _Connection:
        hosts = [origin.host] if self._allow is None else await self._allowed_addresses(origin)
        loop = asyncio.get_running_loop()
        error: BaseException | None = None
        try:
            tls = await self._tls() if origin.tls else None
        except (OSError, ssl.SSLError) as exc:  # no CA store to read: as a failed connect
            raise HttpClientError(f"cannot connect to {origin.name}: {exc}") from exc
        for host in hosts:  # resolved here: each allowed address in turn, as the loop would
            try:
                _, conn = await loop.create_connection(
                    lambda: _Connection(origin),
                    host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if origin.tls else None,
                )
            except (OSError, ssl.SSLError) as exc:
                error = exc
            else:
                return conn
        raise HttpClientError(f"cannot connect to {origin.name}: {error}")

    async def _allowed_addresses(self, origin: _Origin) -> list[str]:
        assert self._allow is not None and self._resolver is not None
        try:
            resolved = await self._resolver.lookup(origin.host, origin.port)
        except OSError as exc:
            raise HttpClientError(f"cannot resolve {origin.host}: {exc}") from None
        found = list(dict.fromkeys(resolved))
        allowed = [a for a in found if _allowed(self._allow, a)]
        if not allowed:
            raise UnusableUrl(f"{origin.name} resolves to no address allowed here: {found}")
        return allowed

    def _release(self, pool: _Pool, conn: _Connection) -> None:
        """Return a finished connection to the pool (or close it) and wake one waiter."""
        if conn.reusable and not conn.closed and not self._closed:
            conn.reusable = False
            while pool.waiters:
                waiter = pool.waiters.popleft()
                if not waiter.done():  # a cancelled waiter may still be queued
                    waiter.set_result(conn)
                    return
            conn.idle_since = time.monotonic()
            pool.idle.append(conn)
            self._sweep(conn.idle_since)
            return
        conn.close()
        pool.count -= 1
        self._wake(pool)
        self._forget_if_empty(pool)

    def _forget_if_empty(self, pool: _Pool) -> None:
        """Drop a pool with no connection and nobody waiting: an origin that was tried once
        (a refused or unreachable callback host) must not be kept for the process's life.
        Safe: a request holds its pool only with a slot counted or as a waiter."""
        if not pool.count and not pool.waiters and self._pools.get(pool.origin) is pool:
            del self._pools[pool.origin]

    @property
    def origins(self) -> int:
        """How many origins the client keeps a pool for (open, opening or waited for)."""
        return len(self._pools)

    def _wake(self, pool: _Pool) -> None:
        """A slot came free: the first waiter may open a connection."""
        while pool.waiters and pool.count < pool.limit:
            waiter = pool.waiters.popleft()
            if not waiter.done():
                pool.count += 1
                waiter.set_result(None)

    def _sweep(self, now: float) -> None:
        """Close connections idle too long, in every pool (at most once per ``idle_s``)."""
        if now - self._swept < self._idle_s:
            return
        self._swept = now
        for pool in list(self._pools.values()):
            keep = []
            for conn in pool.idle:
                if conn.closed or now - conn.idle_since >= self._idle_s:
                    conn.close()
                    pool.count -= 1
                else:
                    keep.append(conn)
            pool.idle = keep
            self._forget_if_empty(pool)

    async def close(self) -> None:
        """Close every connection; requests in flight fail, new ones are refused."""
        self._closed = True
        if self._resolver is not None:
            self._resolver.close()
        for pool in self._pools.values():
            for conn in pool.idle:
                conn.close()
            pool.idle.clear()
            while pool.waiters:
                waiter = pool.waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(HttpClientError("the HTTP client is closed"))
        self._pools.clear()
        await asyncio.sleep(0)  # let the transports run their connection_lost
