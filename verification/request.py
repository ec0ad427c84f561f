"""What the HTTP edge hands a verification handler: the caller's key id, the request-level
limit checks a handler counts itself (in the same Redis round trip as its own work), and the
strict JSON body reader.
"""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from aiohttp import web

from verification.errors import BadBody, BodyTimeout, InvalidRequest
from verification.limits import LimitCheck

KEY_ID = web.RequestKey("key_id", str)
REQUEST_CHECKS = web.RequestKey("request_checks", list[LimitCheck])
_SELF_ADMITTED = "_counts_request_limits_itself"

F = TypeVar("F", bound=Callable[..., Any])


def self_admitted(handler: F) -> F:
    """Mark a handler that counts the per-key and per-IP limits itself (see REQUEST_CHECKS)."""
    setattr(handler, _SELF_ADMITTED, True)
    return handler


def is_self_admitted(handler: object) -> bool:
    return bool(getattr(handler, _SELF_ADMITTED, False))


def take_request_checks(request: web.Request) -> list[LimitCheck]:
    """The request-level checks, for the handler to count: once taken (the list the edge
    holds is emptied), the edge no longer counts them itself. A request that ends without its
    handler taking them (a 4xx before any Redis work, a replay) is counted by the edge
    afterwards."""
    try:
        held = request[REQUEST_CHECKS]
    except KeyError:
        return []
    checks = held.copy()
    held.clear()
    return checks


MAX_BODY = 64 * 1024  # the app's client_max_size: 413 past it
BODY_READ_S = 10.0  # a body (at most 64 KiB) still arriving after this is a slow client


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, or a 4xx problem."""
    ctype = request.content_type
    if request.can_read_body and ctype not in ("application/json", "application/merge-patch+json"):
        raise web.HTTPUnsupportedMediaType()
    if declared_too_large(request):  # at once, not after reading 64 KiB
        read_no_more(request)
        raise web.HTTPRequestEntityTooLarge(
            max_size=MAX_BODY, actual_size=request.content_length or 0
        )
    try:
        if request.content.is_eof():  # all of it has arrived (the usual small body): no wait
            raw = await request.read()  # client_max_size makes this 413 past 64 KiB
        else:
            async with asyncio.timeout(BODY_READ_S):
                raw = await request.read()
    except TimeoutError:
        read_no_more(request)
        raise BodyTimeout(f"the body was not complete after {BODY_READ_S:g} s") from None
    except web.RequestPayloadError:
        read_no_more(request)
        raise BadBody("the body cannot be read as sent (its Content-Encoding?)") from None
    if not raw:
        raise InvalidRequest("the body must be a JSON object")
    # orjson takes RFC 8259 JSON only: UTF-8 (a leading byte-order mark is skipped, as the RFC
    # allows), no NaN or Infinity, no lone surrogates (text that could be neither stored nor
    # sent on), integers within 64 bits. It is also about five times faster than json.loads.
    try:
        body = orjson.loads(raw[3:] if raw.startswith(codecs.BOM_UTF8) else raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    return body


def declared_too_large(request: web.Request) -> bool:
    """Whether the request's ``Content-Length`` is over :data:`MAX_BODY` (413 unread)."""
    declared = request.content_length
    return declared is not None and declared > MAX_BODY


def read_no_more(request: web.Request) -> None:
    """Give up on the rest of a body: aiohttp would otherwise go on reading it after the
    answer (up to 10 s, however large, and log a body that does not decode as an unhandled
    error). The connection closes after the answer; a client still sending may see its send
    fail before it reads the answer, which HTTP allows for a refused body."""
    request.content.feed_eof()
