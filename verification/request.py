"""What the HTTP edge hands a verification handler: the caller's key id, the request-level
limit checks a handler counts itself (in the same Redis round trip as its own work), and the
strict JSON body reader.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from aiohttp import hdrs, web

from verification.errors import BadBody, BodyTimeout, InvalidRequest, UnsupportedCoding
from verification.limits import LimitCheck

KEY_ID = web.RequestKey("key_id", str)
REQUEST_CHECKS = web.RequestKey("request_checks", list[LimitCheck])
# Set when the rest of a request's body was given up (read_no_more): its connection must close.
BODY_ABANDONED = web.RequestKey("body_abandoned", bool)
_SELF_ADMITTED = "_counts_request_limits_itself"
_TAKES_BODY = "_takes_a_json_body"

F = TypeVar("F", bound=Callable[..., Any])


def self_admitted(handler: F) -> F:
    """Mark a handler that counts the per-key and per-IP limits itself (see REQUEST_CHECKS)."""
    setattr(handler, _SELF_ADMITTED, True)
    return handler


def is_self_admitted(handler: object) -> bool:
    return bool(getattr(handler, _SELF_ADMITTED, False))


def takes_body(handler: F) -> F:
    """Mark a handler that reads a JSON body (:func:`read_json_object`); see :func:`bodiless`."""
    setattr(handler, _TAKES_BODY, True)
    return handler


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def bodiless(handler: Handler) -> Handler:
    """``handler``, unless it :func:`takes_body`, for a route that takes no body: a body sent
    anyway is held to the API's rules for bodies all the same (JSON, at most 64 KiB, complete
    in 10 s: 415, 413, 408) and read before the handler acts, then dropped. Without this,
    aiohttp read such a body after the answer whatever its size (a DELETE cancelled, then took
    in 100 MB), and nothing refused one that was not JSON."""
    if getattr(handler, _TAKES_BODY, False):
        return handler

    @functools.wraps(handler)  # keeps the marks, such as self_admitted
    async def without_body(request: web.Request) -> web.StreamResponse:
        if request.can_read_body:
            await read_body(request)
        return await handler(request)

    return without_body


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


# The media types a body is read as JSON in (merge-patch: a JSON object, read as any other).
ACCEPTED_TYPES = ("application/json", "application/merge-patch+json")
# What a 415 offers in Accept (RFC 9110 15.5.16): the type the routes' bodies are. Every route
# that reads a body is a POST or a DELETE; merge-patch (RFC 7396) is a PATCH document, which
# no route takes: offered here it told a client to send its create as a patch. Still read,
# for a client that sends it already.
OFFERED_TYPE = "application/json"
# Content codings aiohttp decodes (brotli and zstd only with libraries this service lacks).
ACCEPTED_CODINGS = ("identity", "gzip", "deflate")


async def read_body(request: web.Request) -> bytes:
    """The whole body (empty when there is none), or a 4xx problem: 415 when it is not sent as
    JSON or in a coding of :data:`ACCEPTED_CODINGS`, 413 past :data:`MAX_BODY` (at once when
    ``Content-Length`` says so), 408 when it is not complete after :data:`BODY_READ_S`, 400
    when it does not decode. A body refused unread is given up (:func:`read_no_more`)."""
    if not request.can_read_body:
        return b""
    if request.content_type not in ACCEPTED_TYPES:
        read_no_more(request)
        # RFC 9110 15.5.16: a 415 for the media type says which ones are taken (Accept)
        raise web.HTTPUnsupportedMediaType(headers={hdrs.ACCEPT: OFFERED_TYPE})
    coding = request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
    if coding not in ACCEPTED_CODINGS:  # aiohttp would hand it over undecoded, as if plain
        read_no_more(request)
        raise UnsupportedCoding(
            "send the body as it is, or gzip or deflate it", accepted=list(ACCEPTED_CODINGS)
        )
    if declared_too_large(request):  # at once, not after reading 64 KiB
        read_no_more(request)
        raise web.HTTPRequestEntityTooLarge(
            max_size=MAX_BODY, actual_size=request.content_length or 0
        )
    try:
        if request.content.is_eof():  # all of it has arrived (the usual small body): no wait
            return await request.read()  # client_max_size makes this 413 past 64 KiB
        async with asyncio.timeout(BODY_READ_S):
            return await request.read()
    except TimeoutError:
        read_no_more(request)
        raise BodyTimeout(f"the body was not complete after {BODY_READ_S:g} s") from None
    except web.RequestPayloadError:
        read_no_more(request)
        raise BadBody("the body cannot be read as sent (its Content-Encoding?)") from None


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, or a 4xx problem (:func:`read_body`, then 422)."""
    body = await read_optional_json_object(request)
    if body is None:
        raise InvalidRequest("the body must be a JSON object")
    return body


async def read_optional_json_object(request: web.Request) -> dict[str, Any] | None:
    """The body as a JSON object, None when there is none (no body, or an empty one), or a
    4xx problem as :func:`read_json_object`'s."""
    raw = await read_body(request)
    if not raw:
        return None
    # orjson takes RFC 8259 JSON only: UTF-8 (a leading byte-order mark is skipped, as the RFC
    # allows), no NaN or Infinity, no lone surrogates (text that could be neither stored nor
    # sent on), integers within 64 bits. It is also about five times faster than json.loads.
    try:
        body = orjson.loads(raw[3:] if raw.startswith(codecs.BOM_UTF8) else raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    name = repeated_name(raw, body)
    if name is not None:
        raise InvalidRequest(f"the body gives '{name}' more than once", field=name)
    return body


def repeated_name(raw: bytes, body: dict[str, Any]) -> str | None:
    """A member name given twice in one object of ``body`` (parsed from ``raw``), else None.

    RFC 8259 leaves what such a body means to each parser (most keep the last value, some
    the first), so a proxy, a log or an audit that read the other value would disagree with
    the service about what was asked: refused, as I-JSON (RFC 7493) requires.

    orjson cannot tell. The usual body (a few flat names, no backslash) is decided by a scan
    of its text: a name written as it is, whose quoted form occurs once, cannot repeat. That
    costs well under a microsecond, where parsing again costs 4 us a request. Any other body
    is parsed once more by ``json`` with a hook (linear: a scan per name of a large body of
    many names would be quadratic).
    """
    if b"\\" not in raw and len(body) <= _SCANNED_NAMES:
        flat = not any(isinstance(v, dict | list) for v in body.values())
        if flat and all(raw.count(b'"%s"' % n.encode()) == 1 for n in body):
            return None
    repeated: list[str] = []

    def pairs(members: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for member, _ in members:
            if member in seen:
                repeated.append(member)
            seen.add(member)
        return dict(members)

    # orjson took it, so it is UTF-8 JSON; ``json`` recurses, where orjson stops at 1024.
    try:
        json.loads(raw.decode("utf-8-sig"), object_pairs_hook=pairs)
    except (RecursionError, ValueError):
        raise InvalidRequest("the body is not valid JSON") from None
    return repeated[0] if repeated else None


_SCANNED_NAMES = 16  # the create and check bodies have at most 6


def declared_too_large(request: web.Request) -> bool:
    """Whether the request's ``Content-Length`` is over :data:`MAX_BODY` (413 unread)."""
    declared = request.content_length
    return declared is not None and declared > MAX_BODY


def read_no_more(request: web.Request) -> None:
    """Give up on the rest of a body: aiohttp would otherwise go on reading it after the
    answer (up to 10 s, however large, and log a body that does not decode as an unhandled
    error). The connection closes after the answer; a client still sending may see its send
    fail before it reads the answer, which HTTP allows for a refused body."""
    if not request.content.is_eof():
        request[BODY_ABANDONED] = True
    request.content.feed_eof()
