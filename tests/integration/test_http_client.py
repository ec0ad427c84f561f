"""The outbound HTTP client against real servers on loopback: an aiohttp server for the
ordinary cases and raw asyncio servers for what aiohttp would never send (close-delimited
bodies, 1xx answers, garbage, a connection closed while idle), plus TLS with a certificate
made for the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from verification.http_client import (
    MAX_BODY,
    HttpAnswer,
    HttpClient,
    HttpClientError,
    IncompleteAnswer,
    UnusableUrl,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]

JSON = {"Content-Type": "application/json"}


class Peer:
    """An aiohttp server that records what it got and on which connection."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes, object]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.release = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        app = web.Application()
        app.router.add_post("/echo", self._echo)
        app.router.add_post("/chunked", self._chunked)
        app.router.add_post("/close", self._close)
        app.router.add_post("/slow", self._slow)
        app.router.add_post("/hang", self._hang)
        app.router.add_post("/big", self._big)
        app.router.add_post("/empty", self._empty)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    @property
    def connections(self) -> int:
        return len({id(transport) for *_, transport in self.requests})

    async def _record(self, request: web.Request) -> bytes:
        body = await request.read()
        self.requests.append((request.path, dict(request.headers), body, request.transport))
        return body

    async def _echo(self, request: web.Request) -> web.Response:
        return web.Response(body=await self._record(request), content_type="application/json")

    async def _chunked(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for part in (b'{"a":', b' "', b"x" * 5000, b'"}'):
            await resp.write(part)
        await resp.write_eof()
        return resp

    async def _close(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.Response(text="bye", headers={"Connection": "close"})

    async def _slow(self, request: web.Request) -> web.Response:
        await self._record(request)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0.05)
        self.in_flight -= 1
        return web.Response(text="slow")

    async def _hang(self, request: web.Request) -> web.Response:
        await self._record(request)
        await self.release.wait()
        return web.Response(text="late")

    async def _big(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.Response(body=b"x" * (MAX_BODY + 1))

    async def _empty(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.Response(status=204)


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    server = Peer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def client() -> AsyncIterator[HttpClient]:
    c = HttpClient(max_per_origin=4)
    try:
        yield c
    finally:
        await c.close()


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def raw_server(handler: RawHandler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/raw"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


# -- the ordinary path --------------------------------------------------------------------------


async def test_post_sends_body_and_headers_and_reads_the_answer(
    peer: Peer, client: HttpClient
) -> None:
    answer = await client.post(
        peer.url("/echo?x=1"), b'{"to":"+31"}', {**JSON, "Authorization": "Bearer t"}, timeout_s=5
    )
    assert (answer.status, answer.body) == (200, b'{"to":"+31"}')
    [(path, headers, body, _)] = peer.requests
    assert path == "/echo"
    assert headers["Authorization"] == "Bearer t"
    assert headers["Content-Type"] == "application/json"
    assert headers["Host"] == f"127.0.0.1:{peer.port}"
    assert headers["Content-Length"] == "12"
    assert body == b'{"to":"+31"}'


async def test_connections_are_kept_alive_and_reused(peer: Peer, client: HttpClient) -> None:
    for i in range(20):
        answer = await client.post(peer.url("/echo"), b"%d" % i, JSON, timeout_s=5)
        assert answer.body == b"%d" % i
    assert peer.connections == 1


async def test_at_most_max_per_origin_connections_the_rest_wait(
    peer: Peer, client: HttpClient
) -> None:
    answers = await asyncio.gather(
        *(client.post(peer.url("/slow"), b"", JSON, timeout_s=5) for _ in range(12))
    )
    assert [a.body for a in answers] == [b"slow"] * 12
    assert peer.most_in_flight == 4
    assert peer.connections == 4


async def test_chunked_answer_is_read_whole_and_the_connection_reused(
    peer: Peer, client: HttpClient
) -> None:
    answer = await client.post(peer.url("/chunked"), b"", JSON, timeout_s=5)
    assert answer.body == b'{"a": "' + b"x" * 5000 + b'"}'
    await client.post(peer.url("/echo"), b"again", JSON, timeout_s=5)
    assert peer.connections == 1


async def test_connection_close_is_honoured(peer: Peer, client: HttpClient) -> None:
    assert (await client.post(peer.url("/close"), b"", JSON, timeout_s=5)).body == b"bye"
    assert (await client.post(peer.url("/echo"), b"1", JSON, timeout_s=5)).body == b"1"
    assert peer.connections == 2


async def test_204_has_no_body(peer: Peer, client: HttpClient) -> None:
    answer = await client.post(peer.url("/empty"), b"", JSON, timeout_s=5)
    assert (answer.status, answer.body) == (204, b"")
    await client.post(peer.url("/echo"), b"", JSON, timeout_s=5)
    assert peer.connections == 1


# -- failures -----------------------------------------------------------------------------------


async def test_a_hanging_server_times_out_and_its_connection_is_not_reused(
    peer: Peer, client: HttpClient
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await client.post(peer.url("/hang"), b"", JSON, timeout_s=0.3)
    assert loop.time() - started < 2.0
    assert (await client.post(peer.url("/echo"), b"ok", JSON, timeout_s=5)).body == b"ok"
    assert peer.connections == 2


STALLS = {
    "no body byte": b"HTTP/1.1 202 Accepted\r\nContent-Length: 20\r\n\r\n",
    "part of the body": b'HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n{"message": ',
    "a chunk, no end": b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n",
    "no length, no close": b"HTTP/1.1 503 Busy\r\n\r\n{}",
    "a 100, then a head": (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"
    ),
}
NO_HEAD = {
    "nothing": b"",
    "half a head": b"HTTP/1.1 200 OK\r\nContent-",
    "only a 100": b"HTTP/1.1 100 Continue\r\n\r\n",
}


def _stalling(
    answer: bytes,
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A server that writes ``answer`` and then stalls: it neither ends the body nor closes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the client gives up and closes
        writer.close()

    return handler


@pytest.mark.parametrize("stall", list(STALLS))
async def test_a_head_whose_body_stalls_past_the_deadline_is_an_incomplete_answer(
    client: HttpClient, stall: str
) -> None:
    # The head came within the deadline, the body did not: the status is known (a 2xx says
    # the request arrived), as for a body that broke off. The wait stays the deadline.
    server, url = await raw_server(_stalling(STALLS[stall]))
    loop = asyncio.get_running_loop()
    async with server:
        started = loop.time()
        with pytest.raises(IncompleteAnswer) as caught:
            await client.post(url, b"x", JSON, timeout_s=0.4)
        took = loop.time() - started
    assert caught.value.status == int(STALLS[stall].rsplit(b"HTTP/1.1 ", 1)[1][:3])
    assert 0.35 <= took < 1.5, took
    assert not isinstance(caught.value, TimeoutError)


@pytest.mark.parametrize("stall", list(NO_HEAD))
async def test_no_head_by_the_deadline_is_a_timeout(client: HttpClient, stall: str) -> None:
    server, url = await raw_server(_stalling(NO_HEAD[stall]))
    async with server:
        with pytest.raises(TimeoutError):
            await client.post(url, b"x", JSON, timeout_s=0.3)


async def test_a_cancelled_waiter_does_not_leak_its_slot(peer: Peer) -> None:
    c = HttpClient(max_per_origin=1)
    try:
        hanging = asyncio.ensure_future(c.post(peer.url("/hang"), b"", JSON, timeout_s=0.5))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(c.post(peer.url("/echo"), b"w", JSON, timeout_s=5))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        with pytest.raises(TimeoutError):
            await hanging
        assert (await c.post(peer.url("/echo"), b"next", JSON, timeout_s=2)).body == b"next"
    finally:
        await c.close()


async def test_oversized_answer_is_refused(peer: Peer, client: HttpClient) -> None:
    with pytest.raises(HttpClientError, match="over"):
        await client.post(peer.url("/big"), b"", JSON, timeout_s=5)


async def test_nobody_listening_is_an_error(client: HttpClient) -> None:
    server, url = await raw_server(lambda r, w: asyncio.sleep(0))
    server.close()
    await server.wait_closed()
    with pytest.raises(HttpClientError, match="cannot connect"):
        await client.post(url, b"", JSON, timeout_s=5)


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # then the close
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    ],
)
async def test_garbage_answers_are_errors(client: HttpClient, answer: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server, url = await raw_server(handler)
    async with server:
        with pytest.raises(HttpClientError):
            await client.post(url, b"x", JSON, timeout_s=5)


@pytest.mark.parametrize(
    ("url", "headers", "match"),
    [
        ("ftp://example.org/x", JSON, "scheme"),
        ("http:///nohost", JSON, "no host"),
        ("http://user:pw@127.0.0.1/x", JSON, "credentials"),
        ("http://127.0.0.1:99999/x", JSON, "bad URL"),
        ("http://127.0.0.1:1/x", {"X-Evil": "a\r\nInjected: 1"}, "bad header"),
        ("http://127.0.0.1:1/x", {"Bad Name": "v"}, "bad header"),
    ],
)
async def test_bad_urls_and_headers_are_refused_before_connecting(
    client: HttpClient, url: str, headers: dict[str, str], match: str
) -> None:
    with pytest.raises(HttpClientError, match=match):
        await client.post(url, b"", headers, timeout_s=5)


async def test_closed_client_refuses(client: HttpClient, peer: Peer) -> None:
    await client.close()
    with pytest.raises(HttpClientError, match="closed"):
        await client.post(peer.url("/echo"), b"", JSON, timeout_s=5)


# -- what raw servers send ----------------------------------------------------------------------


async def test_informational_answers_are_skipped_and_close_delimited_bodies_read(
    client: HttpClient,
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n")
        writer.write(b"HTTP/1.0 201 Created\r\nContent-Type: text/plain\r\n\r\nall of ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"it")
        writer.close()

    server, url = await raw_server(handler)
    async with server:
        answer = await client.post(url, b"x", JSON, timeout_s=5)
    assert (answer.status, answer.body) == (201, b"all of it")


class AnswersOnce:
    """A raw server that answers the first request on each connection 200 "ok", then lets
    ``then`` do what it will with the connection before closing it; counts connections."""

    def __init__(self, then: Callable[[asyncio.StreamReader], Awaitable[object]]) -> None:
        self.connections = 0
        self._then = then

    async def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await self._then(reader)
        writer.close()


async def test_a_connection_the_server_closed_while_idle_is_not_reused(
    client: HttpClient,
) -> None:
    peer = AnswersOnce(lambda _: asyncio.sleep(0.05))  # a keep-alive timeout, very short
    server, url = await raw_server(peer.handler)
    async with server:
        assert (await client.post(url, b"1", JSON, timeout_s=5)).body == b"ok"
        await asyncio.sleep(0.2)
        assert (await client.post(url, b"2", JSON, timeout_s=5)).body == b"ok"
        await asyncio.sleep(0.1)  # the handler's own close, before the server goes
    assert peer.connections == 2


async def test_a_keyed_post_on_a_connection_closed_unanswered_goes_once_more(
    client: HttpClient,
) -> None:
    """A server's idle timeout can end just as the next request on its kept-alive connection
    goes out: it closes without answering. A POST with an Idempotency-Key (each SMS has one)
    goes once more, on a new connection; one without fails, since it may have been acted on.
    (With CLINIC_SMS_HTTP_RETRIES=0 such an SMS was undeliverable.)"""

    async def take_the_next_unanswered(reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):
            await read_request(reader)  # the next one on this connection: closed unanswered

    peer = AnswersOnce(take_the_next_unanswered)
    server, url = await raw_server(peer.handler)
    keyed = {**JSON, "Idempotency-Key": "send-1"}
    async with server:
        assert (await client.post(url, b"1", keyed, timeout_s=5)).body == b"ok"
        assert (await client.post(url, b"2", keyed, timeout_s=5)).body == b"ok"
        assert peer.connections == 2, "sent again on a new connection"
        with pytest.raises(HttpClientError, match="before answering"):
            await client.post(url, b"3", JSON, timeout_s=5)
        assert peer.connections == 2, "a POST without a key is not sent again"
        await asyncio.sleep(0.1)  # the handlers' own close, before the server goes


async def test_a_keyed_post_handed_a_kept_alive_connection_closed_unanswered_goes_again() -> None:
    """The same when the pool is full: a POST waiting for a slot is handed the connection the
    one before it just finished on, and the server closes it unanswered. It was kept alive as
    much as one taken from the idle list, and the README says such a send goes once more, on a
    new connection (an SMS had been undeliverable with CLINIC_SMS_HTTP_RETRIES=0, and had used
    one of its retries otherwise, whenever 64 were in flight to the gateway)."""

    async def take_the_next_unanswered(reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):
            await read_request(reader)

    peer = AnswersOnce(take_the_next_unanswered)
    server, url = await raw_server(peer.handler)
    keyed = {**JSON, "Idempotency-Key": "send-1"}
    one = HttpClient(max_per_origin=1)
    try:
        async with server:
            # Both start together: one takes the only slot, the other waits and is handed
            # its connection once it is answered.
            first, second = await asyncio.gather(
                one.post(url, b"1", keyed, timeout_s=5),
                one.post(url, b"2", keyed, timeout_s=5),
                return_exceptions=True,
            )
            assert first == second == HttpAnswer(200, b"ok"), (first, second)
            assert peer.connections == 2, "sent again on a new connection"
            await asyncio.sleep(0.1)  # the handlers' own close, before the server goes
    finally:
        await one.close()


async def test_unasked_bytes_on_an_idle_connection_retire_it(client: HttpClient) -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(b"HTTP/1.1 408 Request Timeout\r\n\r\n")  # as some servers do
            await writer.drain()
            await reader.read(1)  # the socket stays open: the client must retire it
        finally:
            writer.close()

    server, url = await raw_server(handler)
    async with server:
        assert (await client.post(url, b"1", JSON, timeout_s=5)).status == 200
        await asyncio.sleep(0.1)
        assert (await client.post(url, b"2", JSON, timeout_s=5)).status == 200
        await client.close()
        await asyncio.sleep(0.05)
    assert connections == 2


# -- TLS ----------------------------------------------------------------------------------------


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def tls_contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a self-signed certificate for 127.0.0.1, and a client context
    that trusts it. A plain fixture, so made outside the event loop that no_blocking watches:
    the key and signature took 71 ms of a loop step in a loaded run."""
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    return server_ctx, ssl.create_default_context(cafile=str(cert))


async def test_https_verifies_the_certificate(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ctx, client_ctx = tls_contexts
    tls_peer = Peer()
    await tls_peer.start(ssl_context=server_ctx)
    trusting = HttpClient(ssl_context=client_ctx)
    default = HttpClient()
    try:
        for i in range(3):
            answer = await trusting.post(
                tls_peer.url("/echo", "https"), b"s%d" % i, JSON, timeout_s=5
            )
            assert answer.body == b"s%d" % i
        assert tls_peer.connections == 1
        # The system's CA store does not know the test's certificate: refused, nothing sent.
        with pytest.raises(HttpClientError, match="cannot connect"):
            await default.post(tls_peer.url("/echo", "https"), b"x", JSON, timeout_s=5)
        assert len(tls_peer.requests) == 3
    finally:
        await trusting.close()
        await default.close()
        await tls_peer.stop()


async def test_the_system_ca_store_is_read_off_the_loop_once(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default context reads and parses the system's CA store: 30 ms of CPU here, 124 ms
    # in a loaded run, which held the loop (every request and call of the service) at the
    # first https:// webhook or gateway.
    made_on: list[threading.Thread] = []
    system_default = ssl.create_default_context

    def recorded(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        made_on.append(threading.current_thread())
        return system_default(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", recorded)
    tls_peer = Peer()
    await tls_peer.start(ssl_context=tls_contexts[0])
    default = HttpClient()
    try:
        url = tls_peer.url("/echo", "https")
        refused = await asyncio.gather(
            *(default.post(url, b"x", JSON, timeout_s=5) for _ in range(3)),
            return_exceptions=True,
        )
        assert all(isinstance(r, HttpClientError) for r in refused), refused  # unknown CA
        with pytest.raises(HttpClientError, match="cannot connect"):
            await default.post(url, b"x", JSON, timeout_s=5)
        assert len(made_on) == 1, f"made {len(made_on)} times"
        assert made_on[0] is not threading.current_thread(), "made on the loop's thread"
        assert tls_peer.requests == []
    finally:
        await default.close()
        await tls_peer.stop()


async def test_a_failed_ca_store_load_is_told_to_its_waiters_and_then_tried_again(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The load runs on in its thread after the connects that wait for it are cancelled (their
    # deadline). A failure reaches the connects still waiting; one that no connect is left to
    # see was kept, and the next connect got that old error instead of loading again.
    gates = [threading.Event(), threading.Event()]  # the first two loads fail when opened
    loads: list[None] = []

    def flaky(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        n = len(loads)
        loads.append(None)
        if n < len(gates):
            gates[n].wait(10)
            raise ssl.SSLError(f"the CA store could not be read ({n + 1})")
        return tls_contexts[1]  # trusts the test's certificate

    async def failed_load(n: int) -> None:
        """Open load ``n``'s gate and wait until its failure has reached the loop."""
        loading = default._ssl_loading
        assert loading is not None
        gates[n].set()
        await asyncio.wait({loading}, timeout=5.0)
        assert loading.done(), "the load did not end"

    monkeypatch.setattr(ssl, "create_default_context", flaky)
    tls_peer = Peer()
    await tls_peer.start(ssl_context=tls_contexts[0])
    default = HttpClient()
    try:
        url = tls_peer.url("/echo", "https")
        # Load 1: one connect gives up meanwhile, the other is still there to be told.
        live = asyncio.ensure_future(default.post(url, b"x", JSON, timeout_s=5))
        with pytest.raises(TimeoutError):
            await default.post(url, b"x", JSON, timeout_s=0.2)
        await failed_load(0)
        with pytest.raises(HttpClientError, match=r"could not be read \(1\)"):
            await live
        # Load 2: every connect waiting for it gave up before it failed.
        with pytest.raises(TimeoutError):
            await default.post(url, b"x", JSON, timeout_s=0.2)
        await failed_load(1)
        # The next connect loads again (load 3), and succeeds.
        answer = await default.post(url, b"y", JSON, timeout_s=5)
        assert answer.body == b"y"
        assert len(loads) == 3
    finally:
        for gate in gates:
            gate.set()
        await default.close()
        await tls_peer.stop()


async def test_an_address_filter_decides_which_resolved_addresses_are_connected(
    peer: Peer,
) -> None:
    # The webhook sender's guard: the client resolves the host itself and connects only to
    # allowed addresses, so a name that resolves into the clinic's network is never called.
    seen: list[str] = []

    def loopback_only(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        seen.append(str(address))
        return address == ipaddress.ip_address("127.0.0.1")

    guarded = HttpClient(address_filter=loopback_only)
    refusing = HttpClient(address_filter=lambda _address: False)
    try:
        answer = await guarded.post(
            f"http://localhost:{peer.port}/echo", b"{}", JSON, timeout_s=5.0
        )
        assert answer.status == 200
        assert "127.0.0.1" in seen
        with pytest.raises(UnusableUrl, match="no address allowed"):
            await refusing.post(f"http://127.0.0.1:{peer.port}/echo", b"{}", JSON, timeout_s=5.0)
        with pytest.raises(UnusableUrl):
            await refusing.post("http://", b"{}", JSON, timeout_s=5.0)
    finally:
        await guarded.close()
        await refusing.close()
    assert len(peer.requests) == 1, "the refused request reached the server"


async def test_origins_tried_and_failed_are_not_kept(peer: Peer, client: HttpClient) -> None:
    # Any API key holder names callback hosts: a pool kept for each host ever tried, even
    # refused or unreachable, grew the process for good (the code review: 3,000 entries).
    refusing = HttpClient(address_filter=lambda _address: False)
    try:
        for n in range(300):
            with pytest.raises(UnusableUrl):
                await refusing.post(f"http://10.9.{n // 250}.{n % 250}/", b"", JSON, timeout_s=5)
        assert refusing.origins == 0
    finally:
        await refusing.close()
    for _ in range(20):
        server, url = await raw_server(lambda r, w: asyncio.sleep(0))
        server.close()
        await server.wait_closed()
        with pytest.raises(HttpClientError, match="cannot connect"):
            await client.post(url, b"", JSON, timeout_s=5)
    assert client.origins == 0
    assert (await client.post(peer.url("/echo"), b"{}", JSON, timeout_s=5)).status == 200
    assert client.origins == 1, "an origin with a kept-alive connection is kept"


async def test_hung_callback_lookups_leave_the_loops_resolver_free(
    peer: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A callback host whose DNS never answers: each lookup holds its thread for the system
    # resolver's whole timeout, long after the POST's deadline cut its wait short. Those
    # lookups must not take the threads every other lookup of the process needs (the SMS
    # gateway's host, the operator's webhook): here, the loop's own getaddrinfo.
    real = socket.getaddrinfo
    hung = threading.Event()

    def getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
        if isinstance(host, str) and host.endswith(".hung.test"):
            hung.wait(30)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    guarded = HttpClient(address_filter=lambda _address: True)
    try:
        posts = [
            guarded.post(f"http://h{i}.hung.test/x", b"{}", JSON, timeout_s=0.2) for i in range(40)
        ]
        results = await asyncio.gather(*posts, return_exceptions=True)
        assert all(isinstance(r, TimeoutError) for r in results), results
        # The loop's resolver still answers at once, and so does a POST by host name.
        async with asyncio.timeout(2.0):
            await asyncio.get_running_loop().getaddrinfo("localhost", peer.port)
        plain = HttpClient()
        try:
            async with asyncio.timeout(2.0):
                answer = await plain.post(
                    f"http://localhost:{peer.port}/echo", b"{}", JSON, timeout_s=2.0
                )
            assert answer.status == 200
        finally:
            await plain.close()
    finally:
        hung.set()
        await guarded.close()
