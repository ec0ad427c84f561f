"""Bad input and number policy over HTTP: every refusal is ``application/problem+json`` with a
stable ``type`` URI, and nothing is sent for a refused request.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from clinic_voice import http as http_module
from clinic_voice.app import build_app
from clinic_voice.http import ProblemAppRunner
from sip_config.settings import Settings
from tests.conftest import RedisServer
from tests.integration.conftest import (
    API_KEY,
    CALLS_KEY,
    MOBILE,
    Api,
    StartService,
    read_code,
    service_env,
)
from tests.peers.sms_gateway import SmsGateway
from verification import request as request_module

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]

CREATE = "/v1/verifications"
PREMIUM_NL = "+319061234"  # phonenumbers' premium-rate example for NL (0906)
LANDLINE_NL = "+31101234567"  # a fixed line in Rotterdam
MOBILE_BE = "+32450001234"


@dataclass(frozen=True, slots=True)
class Bad:
    """One bad request to POST /v1/verifications and the problem it must get."""

    name: str
    status: int
    slug: str
    body: Any = None  # JSON-encoded when ``raw`` is None
    raw: bytes | None = None
    content_type: str = "application/json"


CREATE_CASES = [
    Bad("malformed JSON", 422, "invalid-request", raw=b'{"phone": "+3161'),
    Bad("JSON array", 422, "invalid-request", raw=b"[1, 2]"),
    Bad("empty body", 422, "invalid-request", raw=b""),
    Bad("not UTF-8", 422, "invalid-request", raw=b'{"phone": "\xff\xfe"}'),
    Bad("phone as number", 422, "invalid-request", {"phone": 31612345678}),
    Bad("phone missing", 422, "invalid-request", {"code_length": 6}),
    Bad("phone empty", 422, "invalid-request", {"phone": ""}),
    Bad("phone huge", 422, "invalid-request", {"phone": "+31" + "6" * 5000}),
    Bad("phone Arabic-Indic digits", 422, "invalid-number", {"phone": "+٣١٦١٢٣٤٥٦٧٨"}),
    Bad("phone with a letter", 422, "invalid-number", {"phone": "+3161234567a"}),
    Bad("phone national without region", 422, "invalid-number", {"phone": "0612345678"}),
    Bad("phone too short", 422, "invalid-number", {"phone": "+3161234"}),
    Bad("region lower case", 422, "invalid-request", {"phone": "0612345678", "region": "nl"}),
    Bad("region three letters", 422, "invalid-request", {"phone": "0612345678", "region": "NLD"}),
    Bad("region digits", 422, "invalid-request", {"phone": "0612345678", "region": "12"}),
    Bad("region no country", 422, "invalid-request", {"phone": "0612345678", "region": "XX"}),
    Bad("region of a + number", 422, "invalid-request", {"phone": MOBILE, "region": "ZZ"}),
    Bad("region not the number's", 422, "invalid-number", {"phone": MOBILE, "region": "BE"}),
    Bad("code_length string", 422, "invalid-request", {"phone": MOBILE, "code_length": "6"}),
    Bad("code_length true", 422, "invalid-request", {"phone": MOBILE, "code_length": True}),
    Bad("code_length 3", 422, "invalid-request", {"phone": MOBILE, "code_length": 3}),
    Bad("code_length 6.0", 422, "invalid-request", {"phone": MOBILE, "code_length": 6.0}),
    Bad("unknown field", 422, "invalid-request", {"phone": MOBILE, "admin": True}),
    Bad("method unknown", 422, "invalid-request", {"phone": MOBILE, "method": "fax"}),
    Bad("method not configured", 422, "channel-unavailable", {"phone": MOBILE, "method": "voice"}),
    Bad("fallback not a list", 422, "invalid-request", {"phone": MOBILE, "fallback": "sms"}),
    Bad(
        "channel twice",
        422,
        "invalid-request",
        {"phone": MOBILE, "method": "sms", "fallback": ["sms"]},
    ),
    # sms is the only channel here: nothing is left for the method to default to
    Bad(
        "fallback names every channel",
        422,
        "invalid-request",
        {"phone": MOBILE, "fallback": ["sms"]},
    ),
    Bad("locale bad", 422, "invalid-request", {"phone": MOBILE, "locale": "en_US!"}),
    Bad("locale huge", 422, "invalid-request", {"phone": MOBILE, "locale": "x" * 10_000}),
    Bad("callback not http", 422, "invalid-request", {"phone": MOBILE, "callback_url": "ftp://x"}),
    Bad("callback no host", 422, "invalid-request", {"phone": MOBILE, "callback_url": "http://"}),
    Bad(
        "callback spaces", 422, "invalid-request", {"phone": MOBILE, "callback_url": "http://a b/"}
    ),
    Bad(
        "callback to the metadata address",
        422,
        "invalid-request",
        {"phone": MOBILE, "callback_url": "http://169.254.169.254/latest/meta-data/"},
    ),
    Bad(
        "callback to a private network not named",
        422,
        "invalid-request",
        {"phone": MOBILE, "callback_url": "http://10.0.0.7:6379/"},
    ),
    Bad(
        "callback to a private address written as one number",  # 10.0.0.7, as inet_aton reads
        422,
        "invalid-request",
        {"phone": MOBILE, "callback_url": "http://167772167:6379/"},
    ),
    Bad("text/plain", 415, "unsupported-media-type", raw=b"{}", content_type="text/plain"),
    Bad(
        "form data",
        415,
        "unsupported-media-type",
        raw=b"phone=%2B31612345678",
        content_type="application/x-www-form-urlencoded",
    ),
    Bad("body over 64 KiB", 413, "body-too-large", {"phone": MOBILE, "pad": "x" * 70_000}),
    # A lone UTF-16 surrogate is valid JSON syntax but no Unicode text: it cannot be stored or
    # sent on, so it is refused at the door rather than failing later as a 500.
    Bad(
        "lone surrogate in callback_url",
        422,
        "invalid-request",
        raw=b'{"phone": "%s", "callback_url": "https://x.test/\\ud800"}' % MOBILE.encode(),
    ),
    Bad(
        "lone surrogate in locale",
        422,
        "invalid-request",
        raw=b'{"phone": "%s", "locale": "\\udfff"}' % MOBILE.encode(),
    ),
    Bad(
        "NaN", 422, "invalid-request", raw=b'{"phone": "%s", "code_length": NaN}' % MOBILE.encode()
    ),
    Bad("UTF-16", 422, "invalid-request", raw='{"phone": "+31612345678"}'.encode("utf-16")),
    # A name given twice: parsers disagree on which value counts (RFC 8259 4), so a proxy or
    # a log could read another number than the service would send to.
    Bad(
        "phone twice",
        422,
        "invalid-request",
        raw=b'{"phone": "%s", "phone": "+31687654321"}' % MOBILE.encode(),
    ),
    Bad(
        "phone twice, once escaped",
        422,
        "invalid-request",
        raw=b'{"phone": "%s", "ph\\u006fne": "+31687654321"}' % MOBILE.encode(),
    ),
    # Nested deeper than any parser should recurse, and still under the 64 KiB limit.
    Bad("nested 30,000 deep", 422, "invalid-request", raw=b"[" * 30_000 + b"]" * 30_000),
]


@pytest.mark.parametrize("case", CREATE_CASES, ids=[c.name for c in CREATE_CASES])
async def test_bad_create_requests_are_problems(
    start_service: StartService, sms_gateway: SmsGateway, case: Bad
) -> None:
    api = await start_service()
    raw = case.raw
    if raw is None:
        raw = json.dumps(case.body, ensure_ascii=False).encode()
    answer = await api.request(
        "POST", CREATE, data=raw, headers={"Content-Type": case.content_type}
    )
    answer.problem(case.status, case.slug)
    await asyncio.sleep(0.05)
    assert sms_gateway.received == [], "a refused request must not send"


CHECK_CASES = [
    Bad("code Arabic-Indic digits", 422, "invalid-request", {"code": "١٢٣٤٥٦"}),
    Bad("code with a letter", 422, "invalid-request", {"code": "12345a"}),
    Bad("code too long", 422, "invalid-request", {"code": "1234567"}),
    Bad("code empty", 422, "invalid-request", {"code": ""}),
    Bad("code huge", 422, "invalid-request", {"code": "1" * 10_000}),
    Bad("code as number", 422, "invalid-request", {"code": 123456}),
    Bad("code and cli", 422, "invalid-request", {"code": "123456", "cli": "+3161"}),
    Bad("neither code nor cli", 422, "invalid-request", {}),
    Bad("cli without a flash call", 422, "invalid-request", {"cli": "+31612345678"}),
    Bad("unknown field", 422, "invalid-request", {"code": "123456", "x": 1}),
    Bad("malformed JSON", 422, "invalid-request", raw=b"{code: 1}"),
    Bad("code a lone surrogate", 422, "invalid-request", raw=b'{"code": "\\ud800"}'),
    Bad("code twice", 422, "invalid-request", raw=b'{"code": "111111", "code": "222222"}'),
    Bad("text/plain", 415, "unsupported-media-type", raw=b"123456", content_type="text/plain"),
]


@pytest.mark.parametrize("case", CHECK_CASES, ids=[c.name for c in CHECK_CASES])
async def test_bad_checks_are_problems_and_cost_no_attempt(
    start_service: StartService, sms_gateway: SmsGateway, case: Bad
) -> None:
    api = await start_service()
    vid = (await api.create()).json["id"]
    await read_code(sms_gateway)
    raw = case.raw
    if raw is None:
        raw = json.dumps(case.body, ensure_ascii=False).encode()
    answer = await api.request(
        "POST",
        f"/v1/verifications/{vid}/check",
        data=raw,
        headers={"Content-Type": case.content_type},
    )
    answer.problem(case.status, case.slug)
    v = await api.get(vid)
    assert v["attempts_left"] == 5, "a malformed check must not cost an attempt"
    assert v["status"] == "pending"


async def test_missing_or_wrong_keys_are_401_with_www_authenticate(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    api = await start_service()
    for headers in (
        {},
        {"Authorization": "Bearer wrong-key-0123456789abcdef"},
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Bearer {API_KEY}x"},
        {"Authorization": f"bearer{API_KEY}"},
    ):
        answer = await api.request(
            "POST", CREATE, json_body={"phone": MOBILE}, headers=headers, key=None
        )
        answer.problem(401, "unauthorized")
        assert answer.headers["WWW-Authenticate"].startswith("Bearer "), headers
        got = await api.request("GET", f"{CREATE}/{'A' * 32}", headers=headers, key=None)
        got.problem(401, "unauthorized")
    # The scheme is case-insensitive (RFC 7235 2.1).
    ok = await api.request(
        "POST", CREATE, json_body={"phone": MOBILE}, headers={"Authorization": f"bearer {API_KEY}"}
    )
    assert ok.status == 201, ok.text
    await sms_gateway.wait_for(1)
    assert len(sms_gateway.received) == 1


async def test_unknown_routes_and_wrong_methods_are_problems(
    start_service: StartService,
) -> None:
    api = await start_service()
    (await api.request("GET", "/v1/nothing-here")).problem(404, "not-found")
    (await api.request("GET", "/nothing-here", key=None)).problem(404, "not-found")
    wrong = await api.request("PUT", CREATE, json_body={"phone": MOBILE})
    wrong.problem(405, "method-not-allowed")
    assert "POST" in wrong.headers["Allow"]
    (await api.request("PATCH", f"{CREATE}/{'A' * 32}")).problem(405, "method-not-allowed")
    (await api.request("POST", "/healthz", key=None)).problem(405, "method-not-allowed")


async def test_v1_without_a_right_key_is_401_before_404_or_405(
    start_service: StartService,
) -> None:
    """Every request under ``/v1/`` needs a right key: without one (or with a wrong one), an
    unknown path and a wrong method were answered 404 and 405 where a route answers 401, so
    that a caller with no key could map which paths and methods exist. A right key of either
    kind still gets the router's 404 or 405; the routes still ask for the right kind (403)."""
    api = await start_service()
    asked = [
        ("PUT", f"{CREATE}/", 404, "not-found"),
        ("GET", "/v1/nothing-here", 404, "not-found"),
        ("GET", "/v1/calls/c-1/nothing-here", 404, "not-found"),
        ("PUT", CREATE, 405, "method-not-allowed"),
        ("PATCH", f"{CREATE}/{'A' * 32}", 405, "method-not-allowed"),
        ("PATCH", "/v1/calls/c-1", 405, "method-not-allowed"),
    ]
    for method, path, status, slug in asked:
        for key in (None, "wrong-key-0123456789abcdef", f"{CALLS_KEY}x"):
            refused = await api.request(method, path, key=key)
            refused.problem(401, "unauthorized")
            assert refused.headers["WWW-Authenticate"].startswith("Bearer "), (method, path)
            assert "Allow" not in refused.headers, (method, path)
        for key in (API_KEY, CALLS_KEY):
            (await api.request(method, path, key=key)).problem(status, slug)
    # The routes ask for a key as before, of the right kind.
    for key in (None, "wrong-key-0123456789abcdef"):
        refused = await api.request("GET", f"{CREATE}/{'A' * 32}", key=key)
        refused.problem(401, "unauthorized")
    (await api.request("GET", f"{CREATE}/{'A' * 32}")).problem(404, "not-found")
    (await api.request("GET", f"{CREATE}/{'A' * 32}", key=CALLS_KEY)).problem(
        403, "key-not-allowed"
    )
    (await api.request("GET", "/v1/calls/c-1", key=API_KEY)).problem(403, "key-not-allowed")
    # Outside /v1/ nothing asks for a key.
    (await api.request("GET", "/nothing-here", key=None)).problem(404, "not-found")
    (await api.request("POST", "/healthz", key=None)).problem(405, "method-not-allowed")
    for path in ("/healthz", "/openapi.json", "/metrics"):
        assert (await api.request("GET", path, key=None)).status == 200, path


async def test_head_answers_what_get_would_without_a_body(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    """HEAD is in /openapi.json for every GET route: same status and headers, no body (the
    collector checks each answer against the document, and that it has no body)."""
    api = await start_service()
    vid = (await api.create()).json["id"]
    got = await api.request("GET", f"{CREATE}/{vid}")
    head = await api.request("HEAD", f"{CREATE}/{vid}")
    assert (head.status, head.body) == (200, b"")
    for name in ("Content-Type", "Cache-Control"):
        assert head.headers[name] == got.headers[name], name
    assert (await api.request("HEAD", f"{CREATE}/{'A' * 32}")).status == 404
    assert (await api.request("HEAD", f"{CREATE}/{vid}", key=None)).status == 401
    for path in ("/healthz", "/openapi.json", "/metrics"):
        assert (await api.request("HEAD", path, key=None)).status == 200, path
    assert (await api.request("HEAD", "/nothing-here", key=None)).status == 404
    options = await api.request("OPTIONS", f"{CREATE}/{vid}")
    options.problem(405, "method-not-allowed")
    assert set(options.headers["Allow"].split(",")) == {"GET", "HEAD", "DELETE"}


async def test_bad_idempotency_key_is_422(start_service: StartService) -> None:
    api = await start_service()
    for key in ("has space", "x" * 256, "ключ"):
        answer = await api.request(
            "POST", CREATE, json_body={"phone": MOBILE}, headers={"Idempotency-Key": key}
        )
        answer.problem(422, "invalid-request")


async def test_premium_rate_number_is_403_with_reason(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    api = await start_service()
    body = (await api.create(phone=PREMIUM_NL)).problem(403, "number-refused")
    assert body["reason"] == "premium_rate"
    assert "premium" in body["detail"]
    await asyncio.sleep(0.05)
    assert sms_gateway.received == []


async def test_a_satellite_number_is_403_and_gets_nothing(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    api = await start_service()
    body = (await api.create(phone="+870772123456")).problem(403, "number-refused")
    assert body["reason"] == "non_geographic"
    await asyncio.sleep(0.05)
    assert sms_gateway.received == []


async def test_allowed_countries_refuse_others_with_403(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    api = await start_service({"CLINIC_ALLOWED_COUNTRIES": "NL"})
    body = (await api.create(phone=MOBILE_BE)).problem(403, "number-refused")
    assert body["reason"] == "country"
    ok = await api.create(phone=MOBILE)
    assert ok.status == 201, ok.text
    received = await sms_gateway.wait_for(1)
    assert [s.to for s in received] == [MOBILE]


async def test_invalid_number_is_422(start_service: StartService) -> None:
    api = await start_service()
    (await api.create(phone="+3161234")).problem(422, "invalid-number")
    (await api.create(phone="+999123456789")).problem(422, "invalid-number")


async def test_sms_to_a_landline_is_sent(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    # Only a flash call needs a mobile (skipped for landlines, covered by the unit tests); an
    # SMS to a fixed line is the operator's business (text-to-speech gateways exist).
    api = await start_service()
    answer = await api.create(phone=LANDLINE_NL, method="sms")
    assert answer.status == 201, answer.text
    assert answer.json["channels"] == ["sms"]
    assert "skipped" not in [e["type"] for e in answer.json["events"]]
    received = await sms_gateway.wait_for(1)
    assert received[0].to == LANDLINE_NL


async def test_national_number_with_region(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    api = await start_service()
    answer = await api.create(phone="06-1234 5678", region="NL")
    assert answer.status == 201, answer.text
    assert answer.json["phone"] == MOBILE


async def test_a_utf8_byte_order_mark_is_skipped(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    # RFC 8259 lets a parser ignore a leading BOM; some Windows clients still send one.
    api = await start_service()
    raw = b"\xef\xbb\xbf" + json.dumps({"phone": MOBILE, "method": "sms"}).encode()
    answer = await api.request(
        "POST", CREATE, data=raw, headers={"Content-Type": "application/json"}
    )
    assert answer.status == 201, answer.text
    assert [s.to for s in await sms_gateway.wait_for(1)] == [MOBILE]


# -- requests that are HTTP but not as a client library sends them --------------------------


@dataclass(frozen=True, slots=True)
class RawAnswer:
    status: int
    headers: CIMultiDict[str]
    body: bytes
    interim: tuple[int, ...] = ()  # 1xx answers before it (100 Continue)
    version: str = ""  # of the status line


async def raw_exchange(
    api: Api,
    head: str,
    body: bytes = b"",
    *,
    read_s: float = 3.0,
    documented: bool = True,
    closed_within_s: float | None = None,
    key: str | None = API_KEY,
    body_on_continue: bool = False,
) -> RawAnswer:
    """Send ``head`` (request line and headers, with the API key ``key``) and ``body`` on a
    socket of its own, and read the final answer (past any 100 Continue); checked against the
    OpenAPI document like every other answer. ``body_on_continue``: send the body only when
    the server answers 100 Continue, as a client that sent ``Expect: 100-continue`` does."""
    port = api.client.server.port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        auth = "" if key is None else f"Authorization: Bearer {key}\r\n"
        writer.write((head.replace("\n", "\r\n") + auth + "\r\n").encode())
        if not body_on_continue:
            writer.write(body)
        await writer.drain()
        interim: list[int] = []
        async with asyncio.timeout(read_s):
            while True:
                lines = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
                version, status = lines[0].split()[0], int(lines[0].split()[1])
                headers = CIMultiDict(
                    (k.strip(), v.strip())
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                )
                if status != 100:
                    break
                interim.append(status)
                if body_on_continue:
                    writer.write(body)
            answer = await reader.readexactly(int(headers.get("content-length", "0")))
        if closed_within_s is not None:  # the server hangs up, rather than read on
            async with asyncio.timeout(closed_within_s):
                assert await reader.read() == b""
    finally:
        writer.close()
    path = head.split()[1]
    ctype = headers.get("content-type", "").split(";")[0]
    method = head.split(maxsplit=1)[0]
    if documented:  # a route the OpenAPI document has
        errors = api.collector.check(method, path, status, ctype, answer, headers=headers)
        assert not errors, errors
    return RawAnswer(status, headers, answer, tuple(interim), version)


def assert_problem(answer: RawAnswer, status: int, slug: str) -> dict[str, Any]:
    assert answer.status == status, answer
    assert answer.headers["content-type"].startswith("application/problem+json"), answer
    body = dict(json.loads(answer.body))
    assert body["type"].endswith("/" + slug), body
    assert answer.headers.get("cache-control") == "no-store", answer.headers
    return body


POST_CREATE = f"POST {CREATE} HTTP/1.1\nHost: test\nContent-Type: application/json\n"


async def test_a_body_that_does_not_decode_is_400_not_a_fault(
    start_service: StartService, caplog: pytest.LogCaptureFixture, sms_gateway: SmsGateway
) -> None:
    api = await start_service()
    answer = await raw_exchange(
        api, POST_CREATE + "Content-Encoding: gzip\nContent-Length: 5\n", b"abcde"
    )
    assert "Content-Encoding" in assert_problem(answer, 400, "bad-request")["detail"]
    assert not [r for r in caplog.records if r.levelname == "ERROR"], "not a fault of ours"
    assert sms_gateway.received == []


async def test_an_expectation_other_than_100_continue_is_417(start_service: StartService) -> None:
    api = await start_service()
    body = json.dumps({"phone": MOBILE}).encode()
    length = f"Content-Length: {len(body)}\n"
    refused = await raw_exchange(api, POST_CREATE + length + "Expect: 200-ok\n", body)
    assert_problem(refused, 417, "expectation-failed")
    made = await raw_exchange(api, POST_CREATE + length + "Expect: 100-continue\n", body)
    assert made.status == 201 and made.interim == (100,), made
    # aiohttp answers a path or method with no route itself, before the middlewares
    for line in ("POST /v1/nowhere HTTP/1.1\n", "PUT /v1/verifications HTTP/1.1\n"):
        head = line + "Host: t\n" + length + "Expect: 200-ok\n"
        other = await raw_exchange(api, head, body, documented=False)
        assert_problem(other, 417, "expectation-failed")


async def test_a_body_too_large_is_refused_before_100_continue(
    start_service: StartService,
) -> None:
    api = await start_service()
    head = POST_CREATE + "Content-Length: 999999\nExpect: 100-continue\n"
    answer = await raw_exchange(api, head)  # no body: the client waits for 100 Continue
    assert answer.interim == (), "a client told to go on would send 1 MB for nothing"
    assert_problem(answer, 413, "body-too-large")


async def test_100_continue_only_to_a_right_key(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    # A client that waits for 100 Continue is told to send its body only once its key is
    # known to be right: a wrong or missing key is answered at once, and the connection,
    # whose body will not come, closes rather than wait for it.
    api = await start_service()
    body = json.dumps({"phone": MOBILE}).encode()
    head = POST_CREATE + f"Content-Length: {len(body)}\nExpect: 100-continue\n"
    for key in ("not-the-key", None):
        refused = await raw_exchange(
            api, head, body, key=key, body_on_continue=True, closed_within_s=1.0
        )
        assert refused.interim == (), f"key {key!r}: asked for a body it will refuse"
        assert_problem(refused, 401, "unauthorized")
        assert refused.headers.get("connection") == "close"
    # A client may send its body without waiting: then there is nothing to wait for, and its
    # connection stays open.
    sent_anyway = await raw_exchange(api, head, body, key="not-the-key")
    assert_problem(sent_anyway, 401, "unauthorized")
    assert "connection" not in sent_anyway.headers, sent_anyway.headers
    made = await raw_exchange(api, head, body, body_on_continue=True)
    assert made.interim == (100,) and made.status == 201, made
    assert [s.to for s in await sms_gateway.wait_for(1)] == [MOBILE]


async def test_no_route_under_v1_asks_for_no_body_before_the_key(
    start_service: StartService,
) -> None:
    """A keyless client that waits for 100 Continue got it at once on a path or method with
    no route under /v1/ (aiohttp's router answers the Expect header itself there), and not on
    a route, which waits for the key: which paths and methods exist showed through the 401.
    Now a path with no route is answered as a route is: no 100 Continue before a right key,
    413 for a body declared too large."""
    api = await start_service()
    body = b"{}"
    lines = {  # request line: the answer to a right key
        f"POST {CREATE}": 422,  # a route
        f"PUT {CREATE}": 405,
        "POST /v1/nowhere": 404,
        "DELETE /v1/calls/c-1/nothing-here": 404,
    }
    for line, status in lines.items():
        head = f"{line} HTTP/1.1\nHost: t\nContent-Type: application/json\n"
        waits = head + f"Content-Length: {len(body)}\nExpect: 100-continue\n"
        for key in (None, "not-the-key"):
            refused = await raw_exchange(api, waits, body, key=key, body_on_continue=True)
            assert refused.interim == (), f"{line}, key {key!r}: told to send its body"
            assert_problem(refused, 401, "unauthorized")
            assert refused.headers.get("connection") == "close", "its body will not come"
        too_large = head + "Content-Length: 999999\nExpect: 100-continue\n"
        big = await raw_exchange(api, too_large, key=None, documented=False)
        assert big.interim == (), line
        assert_problem(big, 413, "body-too-large")
        made = await raw_exchange(api, waits, body, body_on_continue=True)
        assert made.interim == (100,) and made.status == status, (line, made)


async def test_a_body_declared_too_large_is_413_at_once(start_service: StartService) -> None:
    api = await start_service()
    loop = asyncio.get_running_loop()
    start = loop.time()
    head = POST_CREATE + "Content-Length: 99999999999\n"
    answer = await raw_exchange(api, head, b"{", closed_within_s=1.0)
    assert_problem(answer, 413, "body-too-large")
    assert loop.time() - start < 1.0, "it must not wait for a body it will refuse"
    assert answer.headers.get("connection") == "close"


async def test_a_body_that_never_completes_is_408(
    start_service: StartService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(request_module, "BODY_READ_S", 0.3)
    api = await start_service()
    answer = await raw_exchange(api, POST_CREATE + "Content-Length: 100\n", b'{"phone":')
    assert_problem(answer, 408, "request-timeout")
    assert answer.headers.get("connection") == "close"


def _chunked(body: bytes, size: int = 8192) -> bytes:
    """``body`` in Transfer-Encoding: chunked (no Content-Length says how large it is)."""
    parts = [
        b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
        for i in range(0, len(body), size)
    ]
    return b"".join(parts) + b"0\r\n\r\n"


async def test_a_route_that_takes_no_body_holds_one_sent_anyway_to_the_rules(
    start_service: StartService,
) -> None:
    """The probe: a DELETE read a 100 MB body after cancelling, and a /fallback took one in
    text/plain. A body sent to a route that takes none is read before the route acts: JSON,
    at most 64 KiB; otherwise the same 415 or 413 as a create, and nothing done."""
    api = await start_service()
    vid = (await api.create()).json["id"]
    path = f"/v1/verifications/{vid}"
    json_head = "Host: t\nContent-Type: application/json\n"
    declared = await raw_exchange(
        api,
        f"DELETE {path} HTTP/1.1\n{json_head}Content-Length: 99999999\n",
        b"{",
        closed_within_s=1.0,
    )
    assert_problem(declared, 413, "body-too-large")
    large = _chunked(b'{"x": "' + b"a" * (70 * 1024) + b'"}')
    chunked = await raw_exchange(
        api, f"DELETE {path} HTTP/1.1\n{json_head}Transfer-Encoding: chunked\n", large
    )
    assert_problem(chunked, 413, "body-too-large")
    text = await raw_exchange(
        api,
        f"POST {path}/fallback HTTP/1.1\nHost: t\nContent-Type: text/plain\nContent-Length: 2\n",
        b"hi",
    )
    assert_problem(text, 415, "unsupported-media-type")
    # RFC 9110 15.5.16: what it would have taken. Not merge-patch (RFC 7396), a PATCH
    # document: this route is a POST, and no route takes a patch.
    assert text.headers["accept"] == "application/json", text
    record = (await api.request("GET", path)).json
    assert record["status"] == "pending", "a refused request must not have cancelled"
    assert "fallback" not in [e["type"] for e in record["events"]], "nor moved on"
    # A small JSON body (some clients send {} with every request) is read and dropped.
    got = await raw_exchange(api, f"GET {path} HTTP/1.1\n{json_head}Content-Length: 2\n", b"{}")
    assert got.status == 200 and "connection" not in got.headers, got
    canceled = await raw_exchange(
        api, f"DELETE {path} HTTP/1.1\n{json_head}Content-Length: 2\n", b"{}"
    )
    assert canceled.status == 200 and json.loads(canceled.body)["status"] == "canceled"


async def test_a_body_in_a_coding_not_decoded_here_is_415(
    start_service: StartService, sms_gateway: SmsGateway
) -> None:
    """The probe: ``Content-Encoding: foo`` was ignored (aiohttp hands over what it does not
    know undecoded) and the body read as plain JSON: a verification made and sent."""
    api = await start_service()
    body = json.dumps({"phone": MOBILE, "method": "sms"}).encode()
    head = POST_CREATE + f"Content-Length: {len(body)}\nContent-Encoding: foo\n"
    refused = await raw_exchange(api, head, body)
    assert_problem(refused, 415, "unsupported-media-type")
    assert refused.headers["accept-encoding"] == "identity, gzip, deflate"
    packed = gzip.compress(body)
    head = POST_CREATE + f"Content-Length: {len(packed)}\nContent-Encoding: gzip\n"
    made = await raw_exchange(api, head, packed)
    assert made.status == 201, made
    assert [s.to for s in await sms_gateway.wait_for(1)] == [MOBILE], "one SMS: the gzip one"


@pytest.mark.parametrize(
    ("line", "status", "slug"),
    [
        ("GET /healthz HTTP/2.0", 505, "http-version-not-supported"),  # h2 sent as text
        ("GET /v1/verifications HTTP/0.9", 505, "http-version-not-supported"),
        ("CONNECT 127.0.0.1:443 HTTP/1.1", 501, "method-not-implemented"),
    ],
)
async def test_a_request_line_not_served_is_refused(
    start_service: StartService, line: str, status: int, slug: str
) -> None:
    """The probe: HTTP/2.0 as text and a request line without a version (HTTP/0.9) were
    served as HTTP/1.1, and CONNECT got 404."""
    api = await start_service()
    answer = await raw_exchange(api, line + "\nHost: t\n", documented=False, closed_within_s=1.0)
    assert json.loads(answer.body)["type"].endswith("/" + slug), answer
    assert answer.status == status, answer
    assert answer.version == "HTTP/1.1", "the server's own version, not the request's"


@asynccontextmanager
async def served_as_serve_does(
    redis_server: RedisServer, sms_gateway: SmsGateway, tmp_path: Path
) -> AsyncIterator[int]:
    """The app on serve's own runner (the test client's server cancels a handler whose client
    left, where serve's lets it run; and it keeps aiohttp's idle timeout); yields its port."""
    settings = Settings.from_env(service_env(redis_server.url, tmp_path / "data", sms_gateway))
    runner = ProblemAppRunner(build_app(settings), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def test_a_client_gone_mid_body_is_not_a_fault(
    redis_server: RedisServer,
    sms_gateway: SmsGateway,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="clinic_voice.http")
    async with served_as_serve_does(redis_server, sms_gateway, tmp_path) as port:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        head = POST_CREATE + f"Content-Length: 100\nAuthorization: Bearer {API_KEY}\n\n"
        writer.write(head.replace("\n", "\r\n").encode() + b'{"phone":')
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()
        loop = asyncio.get_running_loop()
        end = loop.time() + 3.0
        while not [r for r in caplog.records if "closed the connection" in r.getMessage()]:
            assert loop.time() < end, "the service did not notice the client leave"
            await asyncio.sleep(0.05)
        assert not [r for r in caplog.records if r.levelname == "ERROR"], "not a fault of ours"
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/metrics") as resp,
        ):
            metrics = await resp.text()
        assert 'status="499"' in metrics and 'status="500"' not in metrics


async def test_a_coding_aiohttp_cannot_decode_here_is_415_without_its_advice(
    redis_server: RedisServer, sms_gateway: SmsGateway, tmp_path: Path
) -> None:
    """brotli and zstd: aiohttp's parser refuses them before the app sees the request, with
    its advice to install a library. That was a 400 quoting the advice; it is the 415 of any
    coding the service does not take."""
    async with served_as_serve_does(redis_server, sms_gateway, tmp_path) as port:
        for coding in ("br", "zstd"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            head = POST_CREATE + f"Content-Encoding: {coding}\nContent-Length: 2\n\n"
            writer.write(head.replace("\n", "\r\n").encode() + b"{}")
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            head_bytes, _, body = raw.partition(b"\r\n\r\n")
            assert head_bytes.split(b" ", 2)[1] == b"415", raw
            assert b"accept-encoding: identity, gzip, deflate" in head_bytes.lower(), raw
            assert b"cache-control: no-store" in head_bytes.lower(), raw
            problem = json.loads(body)
            assert problem["type"].endswith("/unsupported-media-type"), body
            assert problem["accepted"] == ["identity", "gzip", "deflate"], body
            assert b"install" not in body.lower(), body
        # A deflate stream cut short is a body that does not decode (400), not a coding the
        # service refuses: the review found it answered 415 "send gzip or deflate".
        cut = zlib.compress(json.dumps({"phone": MOBILE}).encode())[:-6]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = POST_CREATE + f"Content-Encoding: deflate\nContent-Length: {len(cut)}\n\n"
        writer.write(head.replace("\n", "\r\n").encode() + cut)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert raw.split(b" ", 2)[1] == b"400", raw
    assert sms_gateway.received == []


async def test_a_request_the_parser_refuses_is_answered_in_http_1_1(
    redis_server: RedisServer, sms_gateway: SmsGateway, tmp_path: Path
) -> None:
    """The walk-through: a body in br, a bad header, a header too long or an unknown method
    were answered "HTTP/1.0 415" (431, 400, 501) to an HTTP/1.1 request, with no
    "Connection: close": aiohttp writes its parser's refusals in HTTP/1.0."""
    sent = {
        POST_CREATE.replace("\n", "\r\n").encode()
        + b"Content-Encoding: br\r\nContent-Length: 2\r\n\r\n{}": b"415",
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-A: \x01\r\n\r\n": b"400",
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-A: " + b"a" * 9000 + b"\r\n\r\n": b"431",
        b"FOO /healthz HTTP/1.1\r\nHost: t\r\n\r\n": b"501",
    }
    async with served_as_serve_does(redis_server, sms_gateway, tmp_path) as port:
        for raw, status in sent.items():
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 5)  # closed after it
            writer.close()
            head = answer.partition(b"\r\n\r\n")[0].lower()
            assert head.startswith(b"http/1.1 " + status + b" "), (raw[:40], answer)
            assert b"\r\nconnection: close" in head, (raw[:40], answer)


async def test_a_connection_whose_headers_never_complete_is_closed(
    redis_server: RedisServer,
    sms_gateway: SmsGateway,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A client sending headers a byte at a time (slowloris) holds a connection until the
    # idle timeout, which aiohttp sets to an hour unless told.
    monkeypatch.setattr(http_module, "KEEPALIVE_S", 0.5)
    async with served_as_serve_does(redis_server, sms_gateway, tmp_path) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/verifications HTTP/1.1\r\nHost: t\r\nX-Slow: a")
        await writer.drain()
        async with asyncio.timeout(3.0):
            assert await reader.read() == b"", "closed without an answer"
        writer.close()


async def test_every_v1_error_is_not_cached(start_service: StartService) -> None:
    api = await start_service()
    answers = [
        await api.request("GET", f"{CREATE}/{'A' * 32}"),  # 404: says whether an id exists
        await api.request("GET", f"{CREATE}/{'A' * 32}", key="wrong-key-0123456789"),  # 401
        await api.create(phone=PREMIUM_NL),  # 403: says what a number is
        await api.create(phone="not a number"),  # 422
        await api.request("PUT", CREATE),  # 405
    ]
    for answer in answers:
        assert answer.status >= 400
        assert answer.headers.get("Cache-Control") == "no-store", (answer.status, answer.text)


async def test_answers_made_outside_the_middlewares_are_counted(
    redis_server: RedisServer, sms_gateway: SmsGateway, tmp_path: Path
) -> None:
    """The probe: 400, 417, 431 and 501 never reached clinic_http_requests_total. aiohttp's
    parser answers the first three kinds before the app exists for the request, and an
    ``Expect`` header is answered before the middlewares."""
    sent = {
        b"FOO /healthz HTTP/1.1\r\nHost: t\r\n\r\n": "501",
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-A: \x01\r\n\r\n": "400",
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-A: " + b"a" * 9000 + b"\r\n\r\n": "431",
        b"POST /healthz HTTP/1.1\r\nHost: t\r\nExpect: foo\r\nContent-Length: 2\r\n\r\n{}": "417",
        b"POST /nowhere HTTP/1.1\r\nHost: t\r\nExpect: foo\r\nContent-Length: 2\r\n\r\n{}": "417",
    }
    async with served_as_serve_does(redis_server, sms_gateway, tmp_path) as port:
        for raw, status in sent.items():
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw)
            await writer.drain()
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
            writer.close()
            assert answer.split()[1].decode() == status, (raw[:40], answer)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/metrics") as resp,
        ):
            metrics = await resp.text()
    counted: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("clinic_http_requests_total{"):
            status = line.split('status="', 1)[1].split('"', 1)[0]
            counted[status] = counted.get(status, 0) + float(line.rsplit(" ", 1)[1])
    for status in ("400", "431", "501"):
        assert counted.get(status) == 1, (status, metrics)
    assert counted.get("417") == 2, metrics
