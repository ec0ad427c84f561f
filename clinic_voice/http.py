"""HTTP edge: problem+json (RFC 9457) for every error, bearer auth (wrong keys counted and
locked out per address), per-key and per-IP limits, and request metrics. The one place where
exceptions become HTTP answers.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import HttpVersion10, HttpVersion11, hdrs, web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    ContentEncodingError,
    HttpProcessingError,
    LineTooLong,
)
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_urldispatcher import MatchInfoError

from clinic_voice.metrics import Metrics
from sip_config.clock import Clock
from sip_config.settings import VerificationSettings
from verification import limits
from verification.errors import (
    PROBLEM_BASE,
    BadBody,
    BodyTimeout,
    KeyNotAllowed,
    NoChannelConfigured,
    StoreUnavailable,
    UnsupportedCoding,
    VerificationError,
)
from verification.outage_log import OutageLog
from verification.request import (
    ACCEPTED_CODINGS,
    BODY_ABANDONED,
    KEY_ID,
    REQUEST_CHECKS,
    bodiless,
    declared_too_large,
    is_self_admitted,
    read_no_more,
    take_request_checks,
)
from verification.store import VerificationStore

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PROBLEM_TYPE = "application/problem+json"

CLIENT_GONE = 499  # the metrics' status of a request whose client closed the connection

# The methods the request metrics name; any other counts as "other". llhttp parses some 30
# more (PROPFIND, M-SEARCH, ...), and aiohttp's pure-Python parser (AIOHTTP_NO_EXTENSIONS,
# PyPy) takes any token, "+31612345678" included: as a label, each made a series of its own,
# kept for the life of the process, so that a caller without a key could grow the registry
# (and every scrape) without bound and put what it liked into a label.
METRIC_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}
)

# the problem slug and title of each HTTP error aiohttp raises (others: http-error)
HTTP_SLUGS = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Missing or wrong API key"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    413: ("body-too-large", "The request body is larger than 64 KiB"),
    415: ("unsupported-media-type", "Send JSON (application/json)"),
    417: ("expectation-failed", "Only Expect: 100-continue is understood"),
    431: ("header-too-large", "The request line or headers are too large"),
    500: ("internal", "Internal error"),
    501: ("method-not-implemented", "The server does not know this method"),
    505: ("http-version-not-supported", "Send HTTP/1.1"),
}
# Request-line versions served. llhttp also passes "HTTP/2.0" sent as text, and a request line
# without a version (read as HTTP/0.9): aiohttp would answer both as if they were HTTP/1.1.
SERVED_VERSIONS = frozenset({HttpVersion10, HttpVersion11})


def problem(status: int, slug: str, title: str, detail: str = "", **extra: Any) -> web.Response:
    body: dict[str, Any] = {"type": PROBLEM_BASE + slug, "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return web.Response(
        status=status, text=json.dumps(body), content_type=PROBLEM_TYPE, charset=None
    )


# Set on a request whose client waits for 100 Continue; on /v1, until its key is known right.
CONTINUE_PENDING = web.RequestKey("continue_pending", bool)
# The app's metrics, for answers made where the middlewares never see them (see COUNTED).
METRICS = web.AppKey("metrics", Metrics)
# Set by the metrics middleware on each request it counts. An answer without it was made
# before the middlewares (to an Expect header) or without them (aiohttp's parser refused the
# request): problem_net and ProblemRequestHandler count those, so that every answer is.
COUNTED = web.RequestKey("counted", bool)


async def expect_handler(request: web.Request) -> web.StreamResponse | None:
    """The answer to an ``Expect`` header on a route of the service. ``100-continue``: a body
    ``Content-Length`` says is too large is refused (413) before the client sends it; on
    ``/v1``, 100 Continue waits for the key check (:func:`send_continue`), so a wrong key or a
    locked-out address is answered without asking for the body; elsewhere 100 Continue at
    once, as aiohttp sends it. Any other expectation: 417 as a problem document (aiohttp's own
    417 is text/plain; for a path or method with no route aiohttp answers it itself, and
    :func:`problem_net` makes that one a problem document)."""
    if request.version != HttpVersion11:
        return None
    expect = request.headers.get(hdrs.EXPECT, "")
    if expect.lower() != "100-continue":
        return problem(417, *HTTP_SLUGS[417])
    if declared_too_large(request):
        read_no_more(request)  # the client waits for this answer: no body follows
        refused = problem(413, *HTTP_SLUGS[413])
        refused.force_close()
        return refused
    request[CONTINUE_PENDING] = True
    if not request.path.startswith("/v1/"):
        await send_continue(request)
    return None


async def send_continue(request: web.Request) -> None:
    """Tell a client that waits for it (:data:`CONTINUE_PENDING`) to send its body."""
    if request.get(CONTINUE_PENDING):
        request[CONTINUE_PENDING] = False
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer itself is still to come


def edge_routes(routes: Iterable[web.RouteDef]) -> list[web.RouteDef]:
    """``routes`` as the edge serves them: each answers ``Expect`` with
    :func:`expect_handler`, and those that take no body hold one sent anyway to the rules
    for bodies (:func:`verification.request.bodiless`)."""
    return [
        web.RouteDef(
            r.method,
            r.path,
            bodiless(r.handler),
            {**r.kwargs, "expect_handler": expect_handler},
        )
        for r in routes
    ]


class NoRouteUnderV1(web.DynamicResource):
    """The last resource under ``/v1/``: a path or method no route there takes gets the
    router's 404 or 405 (with ``Allow``) as before, but its ``Expect`` header is answered by
    :func:`expect_handler`, as a route's is. aiohttp's own answer for no route sends 100
    Continue at once, before the key check, where a route waits for the key: a caller
    without a key could tell which paths and methods exist by which got 100 Continue."""

    def __init__(self, router: web.UrlDispatcher) -> None:
        super().__init__("/v1/{tail:.*}")
        self._router = router

    async def resolve(self, request: web.Request) -> tuple[MatchInfoError | None, set[str]]:
        if not request.path.startswith("/v1/"):  # as auth_mw asks for a key
            return None, set()
        # Reached only when no route took the request: the methods the path's routes take
        # (the router's own walk does not pass them on), for a 405's Allow.
        allowed: set[str] = set()
        for resource in self._router.resources():
            if resource is not self:
                allowed |= (await resource.resolve(request))[1]
        if allowed:
            return _NoRoute(web.HTTPMethodNotAllowed(request.method, allowed)), set()
        return _NoRoute(web.HTTPNotFound()), set()


class _NoRoute(MatchInfoError):
    @property
    def expect_handler(self) -> Callable[[web.Request], Awaitable[web.StreamResponse | None]]:
        return expect_handler


async def problem_net(request: web.Request, resp: web.StreamResponse) -> None:
    """``on_response_prepare``, for every answer: each ``/v1`` answer, errors included, says
    ``Cache-Control: no-store`` (it may hold a phone number or a call's health data, or say
    whether one exists), and an error answer that is not yet a problem document becomes one.
    The middlewares make nearly all of them; this also covers what aiohttp answers before
    them (an unknown ``Expect``, on a route or not)."""
    if request.path.startswith("/v1/"):
        resp.headers["Cache-Control"] = "no-store"
    if not request.get(COUNTED) and METRICS in request.app:
        method = method_label(request)
        route = route_name(request)
        request.app[METRICS].requests.inc(route=route, method=method, status=str(resp.status))
    if request.get(CONTINUE_PENDING) and not request.content.is_eof():
        # Answered before its client was told to send the body (a wrong key), and the body
        # has not come anyway: it will not, and waiting for it would hold the connection.
        read_no_more(request)
    if request.get(BODY_ABANDONED):
        # The rest of the body was given up (read_no_more): the connection closes after the
        # answer (the headers are made before this hook and written after it: say so in
        # them too).
        resp.force_close()
        resp.headers[hdrs.CONNECTION] = "close"
    if resp.status < 400 or resp.content_type == PROBLEM_TYPE or not isinstance(resp, web.Response):
        return
    slug, title = HTTP_SLUGS.get(resp.status, ("http-error", resp.reason))
    body = json.dumps({"type": PROBLEM_BASE + slug, "title": title, "status": resp.status})
    resp.body = body.encode()
    resp.content_type = PROBLEM_TYPE
    resp.charset = None
    # aiohttp has counted the old body's length by now: the headers are written after this
    resp.headers[hdrs.CONTENT_LENGTH] = str(len(resp.body))


def refuse_request_line(request: web.Request) -> web.Response:
    """The answer to a request whose line the service does not serve: a version other than
    HTTP/1.0 and 1.1 (505), or ``CONNECT`` (501: the service is not a proxy, and the target of
    a CONNECT is a host and port, not one of its routes). The connection closes after it."""
    if request.method == hdrs.METH_CONNECT:
        resp = problem(501, *HTTP_SLUGS[501], "this service is not a proxy: CONNECT is not served")
    else:
        major, minor = request.version
        resp = problem(505, *HTTP_SLUGS[505], f"HTTP/{major}.{minor} is not served here")
        # aiohttp writes the status line in the request's version ("HTTP/2.0 505"); a server
        # answers in its own (RFC 9110 6.2). ``version`` is cached on the request (reify).
        request._cache["version"] = HttpVersion11
    read_no_more(request)
    resp.force_close()
    return resp


def key_id(key: str) -> str:
    """A non-secret name for an API key (for limits and records)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def method_label(request: web.BaseRequest) -> str:
    """The request's method as the metrics name it: one of :data:`METRIC_METHODS`, or
    ``other``."""
    return request.method if request.method in METRIC_METHODS else "other"


def route_name(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


def client_ip(request: web.Request, trusted: frozenset[str]) -> str:
    peer = request.remote or "unknown"
    if peer in trusted:
        # Every X-Forwarded-For line, in order: a proxy may add a line of its own rather than
        # extend the client's, and reading the first line only would believe the client's.
        forwarded = ",".join(request.headers.getall("X-Forwarded-For", ()))
        hops = [h.strip() for h in forwarded.split(",") if h.strip()]
        # The last hop not added by a trusted proxy is the client.
        for hop in reversed(hops):
            addr = forwarded_address(hop)
            if addr is None:
                break
            if addr not in trusted:
                return addr
    return peer


def forwarded_address(hop: str) -> str | None:
    """The address of one X-Forwarded-For hop, or None when it is not one. Some proxies add
    the client's port (``203.0.113.9:4711``, ``[2001:db8::1]:4711``) or brackets: taken as
    not an address, every client behind such a proxy was counted as the proxy, and one
    guesser locked them all out."""
    if hop.startswith("["):
        host, closed, rest = hop[1:].partition("]")
        if not closed or (rest and not (rest[0] == ":" and _is_port(rest[1:]))):
            return None
        hop = host
    elif hop.count(":") == 1:  # IPv4 with a port (an IPv6 address has two colons or more)
        host, _, port = hop.partition(":")
        if not _is_port(port):
            return None
        hop = host
    try:
        return str(ipaddress.ip_address(hop))
    except ValueError:
        return None


def _is_port(digits: str) -> bool:
    """1 to 5 ASCII digits."""
    return 0 < len(digits) <= 5 and digits.isascii() and digits.isdigit()


def build_middlewares(
    *,
    metrics: Metrics,
    api_keys: tuple[str, ...],
    calls_api_keys: tuple[str, ...] = (),
    store_getter: Callable[[], VerificationStore],
    settings: VerificationSettings,
    trusted_proxies: frozenset[str],
    clock: Clock,
) -> list[Any]:
    """The middleware chain, outermost first."""
    keys = tuple(k.encode() for k in (*api_keys, *calls_api_keys))
    key_ids = {k: key_id(k) for k in (*api_keys, *calls_api_keys)}  # hashed once, not per request
    calls_keys = frozenset(calls_api_keys)
    store_outage = OutageLog(log, "API requests", clock)
    ipv6_prefix = settings.limit_ipv6_prefix

    @web.middleware
    async def metrics_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        request[COUNTED] = True
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        finally:
            route = route_name(request)
            metrics.requests.inc(route=route, method=method_label(request), status=str(status))
            metrics.latency.observe(time.perf_counter() - start, route=route)

    @web.middleware
    async def problems_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.version not in SERVED_VERSIONS or request.method == hdrs.METH_CONNECT:
            return refuse_request_line(request)
        try:
            answer = await handler(request)
            # A request that passed its key's limits was answered by Redis.
            if store_outage.down and answer.status < 500 and KEY_ID in request:
                store_outage.ok()
            return answer
        except VerificationError as exc:
            resp = problem(exc.status, exc.slug, exc.title, exc.detail, **exc.extra)
            if exc.retry_after_s is not None:
                resp.headers["Retry-After"] = str(exc.retry_after_s)
            resp.headers.update(exc.headers)
            if isinstance(exc, StoreUnavailable):
                # Every request fails alike while Redis is away: one line when it starts,
                # then one every 30 s with a count, not a line a request.
                store_outage.failed(exc)
                log.debug("%s %s: %s", request.method, request.path, exc)
            elif isinstance(exc, NoChannelConfigured) or exc.logged_at_source:  # said once
                log.debug("%s %s: %s", request.method, request.path, exc)
            elif exc.status >= 500:  # str(): the cause, which the client's detail may not say
                log.error("%s %s: %s", request.method, request.path, exc)
            if isinstance(exc, (BadBody, BodyTimeout)):  # its body's rest was not read
                resp.force_close()
            return resp
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            slug, title = HTTP_SLUGS.get(exc.status, ("http-error", exc.reason))
            resp = problem(exc.status, slug, title)
            for h in ("Allow", "WWW-Authenticate", "Accept"):
                if h in exc.headers:
                    resp.headers[h] = exc.headers[h]
            if exc.status == 413:  # no keep-alive after a body refused for its size
                resp.force_close()
            return resp
        except ConnectionResetError:
            if request.transport is not None and not request.transport.is_closing():
                # The client is still there: a reset of some other connection is ours.
                log.exception("%s %s: unhandled error", request.method, request.path)
                return problem(500, "internal", "Internal error")
            # The client went away while sending its request: not a fault of the service.
            # The answer reaches nobody; its status is what the metrics count (nginx's 499).
            log.info("%s %s: the client closed the connection", request.method, request.path)
            gone = web.Response(status=CLIENT_GONE)
            gone.force_close()
            return gone
        except Exception:
            log.exception("%s %s: unhandled error", request.method, request.path)
            return problem(500, "internal", "Internal error")

    @web.middleware
    async def auth_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/v1/"):
            return await handler(request)
        # No route (404) or not this method (405) under /v1/: the key is asked for first, so
        # that a caller without a right key learns nothing of which paths and methods exist.
        # A right key of either kind then gets the router's answer (no key-kind 403: there
        # is no route whose kind it could be).
        unrouted = request.match_info.http_exception is not None
        ip = limits.address_subject(client_ip(request, trusted_proxies), ipv6_prefix)
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        # aiohttp hands header bytes that are not UTF-8 over as surrogates: no key has them
        given = token.strip().encode("utf-8", "surrogateescape")
        ok = False
        if scheme.lower() == "bearer" and given:
            for k in keys:  # compare with every key: the time taken says nothing
                ok |= hmac.compare_digest(given, k)
        if not ok:
            if given:
                # A key was tried: count it. Without Redis this is a 503, as a right key's
                # request would be, so an outage does not tell right keys from wrong ones.
                # Its limit used up, a right key is refused as well (limits.request_checks).
                await count(limits.auth_failure_checks(settings, ip))
            resp = problem(401, "unauthorized", "Missing or wrong API key")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="clinic-voice"'
            return resp
        kid = key_ids[token.strip()]
        calls_route = request.path == "/v1/calls" or request.path.startswith("/v1/calls/")
        if not unrouted and calls_route != (token.strip() in calls_keys):
            raise KeyNotAllowed(
                "call records need a key of CLINIC_CALLS_API_KEYS"
                if calls_route
                else "a call records key (CLINIC_CALLS_API_KEYS) serves /v1/calls only"
            )
        request[KEY_ID] = kid
        if request.get(CONTINUE_PENDING):  # no coroutine made for the usual request
            await send_continue(request)
        checks = limits.request_checks(settings, kid, ip)
        if unrouted or not is_self_admitted(request.match_info.handler):
            # Counted as any request with a right key: a locked-out address gets 429 here too,
            # or a 404 would tell a right key from a wrong one.
            await count(checks)
            answer = await handler(request)
        else:
            # The handler counts these with its own Redis work: one round trip, not two. What
            # it did not take (a 4xx before any Redis work) is counted here: a request the API
            # refuses is still a request, and must not be a way around the limits.
            request[REQUEST_CHECKS] = checks
            try:
                answer = await handler(request)
            except VerificationError as exc:
                if exc.status < 500 and exc.retry_after_s is None:
                    await count(take_request_checks(request))
                raise
            except web.HTTPException as exc:
                if 400 <= exc.status < 500:
                    await count(take_request_checks(request))
                raise
            if checks:  # not taken (emptied when taken)
                await count(take_request_checks(request))
        return answer

    async def count(checks: list[limits.LimitCheck]) -> None:
        if not checks:
            return
        (await store_getter().hit_limits(checks, clock.now())).enforce()

    return [metrics_mw, problems_mw, auth_mw]


# -- requests that are not HTTP -------------------------------------------------------------
# aiohttp answers a request its parser refuses (a control character in a header, a header over
# 8190 bytes, an unknown method) before any middleware runs: in plain text that quotes the
# offending bytes, and with an ERROR traceback that quotes them too. Those bytes may be an API
# key. This handler answers problem+json instead, quotes nothing, and logs one INFO line.


# How aiohttp's parser refuses a coding it knows but cannot decode without a library this
# service lacks (415). Any other ContentEncodingError is a body that does not decode (400):
# a gzip or deflate stream that is corrupt or cut short.
_CODING_NOT_HERE = (
    "Can not decode content-encoding: brotli",
    "Can not decode content-encoding: zstandard",
)


def _parse_problem(exc: HttpProcessingError) -> tuple[int, str]:
    """The HTTP status of a parser error and a detail that quotes none of the request."""
    if isinstance(exc, LineTooLong):
        return 431, "a request line or header is longer than 8190 bytes"
    if isinstance(exc, ContentEncodingError) and exc.message.startswith(_CODING_NOT_HERE):
        # A coding aiohttp knows but cannot decode here (br, zstd: their libraries are not
        # installed). Its message says which library to install: not the client's business.
        return 415, "send the body as it is, or gzip or deflate it"
    if isinstance(exc, BadHttpMethod):
        first = exc.message.split("\n", 1)[0].rstrip(": ")
        if first.startswith("Invalid method"):
            return 501, "the request method is not one HTTP defines"
        return 400, "this is not HTTP/1.1 (TLS sent to a plain HTTP port?)"
    # llhttp's messages are a fixed phrase, then a blank line and the quoted bytes
    if exc.message.startswith("Too many headers"):
        return 431, "more header fields than the server takes"
    return 400, "the request is not valid HTTP/1.1: " + exc.message.split("\n", 1)[0].rstrip(": ")


class ProblemRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering its own errors as problem documents."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, HttpProcessingError):
            status, detail = _parse_problem(exc)
            log.info("refused a malformed HTTP request from %s: %s", request.remote, detail)
        else:
            detail = ""
            log.error("HTTP %s for %s", status, request.remote, exc_info=exc)
        if request.writer.output_size > 0:  # some answer went out: the connection is broken
            raise ConnectionError("an answer was sent already, cannot send the error")
        metrics: Metrics | None = getattr(self._manager, "metrics", None)  # None: shut down
        if metrics is not None:  # the method may be whatever the client sent: not a label
            metrics.requests.inc(route="unmatched", method="unparsed", status=str(status))
        if status == 415:  # as read_body's own refusal of a coding (UnsupportedCoding)
            refused = UnsupportedCoding(detail, accepted=list(ACCEPTED_CODINGS))
            resp = problem(415, refused.slug, refused.title, detail, **refused.extra)
            resp.headers.update(refused.headers)
        else:
            slug, title = HTTP_SLUGS.get(status, ("http-error", "HTTP error"))
            resp = problem(status, slug, title, detail)
        resp.headers[hdrs.CACHE_CONTROL] = "no-store"  # as every /v1 answer; the path is unread
        # aiohttp hands a request it could not parse over as an HTTP/1.0 one, and writes the
        # status line in that version: a server answers in its own (RFC 9110 6.2), and
        # HTTP/1.1 also says "Connection: close" rather than leave the client to infer it.
        request._cache["version"] = HttpVersion11
        resp.force_close()
        return resp


class _ProblemServer(web.Server):
    metrics: Metrics | None = None  # the app's, to count what the parser refused

    def __call__(self) -> RequestHandler:
        return ProblemRequestHandler(self, loop=self._loop, **self._kwargs)


# A connection idle this long is closed: between requests, and before the first one's
# headers are complete (aiohttp's default, an hour, let a client that sends headers a byte at
# a time hold a connection, and with it a file descriptor, for that long).
KEEPALIVE_S = 20.0  # longer than aiohttp's client pool keeps an idle connection (15 s)


class ProblemAppRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer malformed HTTP with problem+json, and close
    when idle for :data:`KEEPALIVE_S`."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs.setdefault("keepalive_timeout", KEEPALIVE_S)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        server = _ProblemServer(
            plain.request_handler, request_factory=plain.request_factory, **self._kwargs
        )
        server.metrics = self.app.get(METRICS)
        return server
