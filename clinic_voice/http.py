"""HTTP edge: problem+json (RFC 9457) for every error, bearer auth, per-key and per-IP limits,
and request metrics. The one place where exceptions become HTTP answers.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from clinic_voice.metrics import Metrics
from sip_config.settings import VerificationSettings
from verification import limits
from verification.errors import PROBLEM_BASE, RateLimited, VerificationError
from verification.request import KEY_ID, REQUEST_CHECKS, is_self_admitted
from verification.store import VerificationStore

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PROBLEM_TYPE = "application/problem+json"
MAX_BODY = 64 * 1024

# the problem slug and title of each HTTP error aiohttp raises (others: http-error)
HTTP_SLUGS = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Missing or wrong API key"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    413: ("body-too-large", "The request body is larger than 64 KiB"),
    415: ("unsupported-media-type", "Send JSON (application/json)"),
    500: ("internal", "Internal error"),
}


def problem(status: int, slug: str, title: str, detail: str = "", **extra: Any) -> web.Response:
    body: dict[str, Any] = {"type": PROBLEM_BASE + slug, "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return web.Response(
        status=status, text=json.dumps(body), content_type=PROBLEM_TYPE, charset=None
    )


def key_id(key: str) -> str:
    """A non-secret name for an API key (for limits and records)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def route_name(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


def client_ip(request: web.Request, trusted: frozenset[str]) -> str:
    peer = request.remote or "unknown"
    if peer in trusted:
        forwarded = request.headers.get("X-Forwarded-For", "")
        hops = [h.strip() for h in forwarded.split(",") if h.strip()]
        # The last hop not added by a trusted proxy is the client.
        for hop in reversed(hops):
            try:
                addr = str(ipaddress.ip_address(hop))
            except ValueError:
                break
            if addr not in trusted:
                return addr
    return peer


def build_middlewares(
    *,
    metrics: Metrics,
    api_keys: tuple[str, ...],
    store_getter: Callable[[], VerificationStore],
    settings: VerificationSettings,
    trusted_proxies: frozenset[str],
    clock_now: Callable[[], float],
) -> list[Any]:
    """The middleware chain, outermost first."""
    keys = tuple(k.encode() for k in api_keys)
    key_ids = {k: key_id(k) for k in api_keys}  # a SHA-256 each, not one per request

    @web.middleware
    async def metrics_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        finally:
            route = route_name(request)
            metrics.requests.inc(route=route, method=request.method, status=str(status))
            metrics.latency.observe(time.perf_counter() - start, route=route)

    @web.middleware
    async def problems_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except VerificationError as exc:
            resp = problem(exc.status, exc.slug, exc.title, exc.detail, **exc.extra)
            if isinstance(exc, RateLimited):
                resp.headers["Retry-After"] = str(exc.retry_after_s)
            if exc.status >= 500:
                log.error("%s %s: %s", request.method, request.path, exc.detail)
            return resp
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            slug, title = HTTP_SLUGS.get(exc.status, ("http-error", exc.reason))
            resp = problem(exc.status, slug, title)
            for h in ("Allow", "WWW-Authenticate"):
                if h in exc.headers:
                    resp.headers[h] = exc.headers[h]
            return resp
        except Exception:
            log.exception("%s %s: unhandled error", request.method, request.path)
            return problem(500, "internal", "Internal error")

    @web.middleware
    async def auth_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/v1/"):
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode()
        ok = False
        if scheme.lower() == "bearer" and given:
            for k in keys:  # compare with every key: the time taken says nothing
                ok |= hmac.compare_digest(given, k)
        if not ok:
            resp = problem(401, "unauthorized", "Missing or wrong API key")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="clinic-voice"'
            return resp
        kid = key_ids[token.strip()]
        request[KEY_ID] = kid
        checks = limits.request_checks(settings, kid, client_ip(request, trusted_proxies))
        if is_self_admitted(request.match_info.handler):
            # The handler counts these with its own Redis work: one round trip, not two.
            request[REQUEST_CHECKS] = checks
            return await handler(request)
        decision = await store_getter().hit_limits(checks, clock_now())
        if not decision.allowed and decision.blocked_by is not None:
            raise RateLimited(decision.blocked_by.describe(), decision.retry_after_s)
        return await handler(request)

    return [metrics_mw, problems_mw, auth_mw]
