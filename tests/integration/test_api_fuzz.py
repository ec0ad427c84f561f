"""Property-based fuzzing of every ``/v1`` route over real HTTP (Hypothesis).

Each test starts one real service (``start_service``: real redis-server, the SMS gateway
peer) and sends it generated requests: arbitrary JSON values and shapes, near-valid bodies
(the right fields with wrong types or values, extra fields, non-ASCII digits, huge or empty
strings, deep nesting), bytes that are not JSON, odd content types, charsets, codings and
``Idempotency-Key`` values, arbitrary path ids and query strings; the call-record routes with
their own key. Whatever is sent:

- the status is never 5xx (503 only when Redis is down, which is not generated here);
- every error is ``application/problem+json`` with a stable ``type``, a ``title``, a
  ``status`` equal to the HTTP status, and ``Cache-Control: no-store``;
- every answer validates against the route's schema in ``/openapi.json`` (the tier's
  collector, as for every other API test);
- nothing is lost or changed by a refusal: a verification created is read back the same by
  GET, a replayed ``Idempotency-Key`` gives the same verification, a refused check costs no
  attempt, and exactly one SMS goes out per verification created.

The service runs with limits far above what the examples use, so they reach the handlers;
a 429 would still be accepted as a problem like any other.

Runs are deterministic: the ``clinic-fuzz-ci`` profile (the default) derandomizes with a
bounded number of examples, so the module takes well under a minute on two cores. For a
deeper run, set ``CLINIC_FUZZ_EXAMPLES`` (examples per test; selects the
``clinic-fuzz-deep`` profile, random and printing a reproduction blob on failure), e.g.::

    CLINIC_FUZZ_EXAMPLES=2000 PYTHONPATH=$PWD .venv/bin/python -m pytest -o timeout=0 \\
        tests/integration/test_api_fuzz.py
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import string
import time
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinic_voice.app import RUNTIME, Runtime
from tests.integration.conftest import (
    API_KEY,
    CALLS_KEY,
    DEADLINE_S,
    MOBILE,
    OTHER_KEY,
    Answer,
    Api,
    StartService,
)
from tests.peers.sms_gateway import SmsGateway
from verification import numbers
from verification.api import parse_create
from verification.errors import PROBLEM_BASE, NoChannelConfigured, VerificationError
from verification.model import CHANNEL_ORDER, Channel
from voice.ivr.call_record import CallResult
from voice.ivr.engine import CallRecord

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]

settings.register_profile(
    "clinic-fuzz-ci",
    max_examples=100,
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "clinic-fuzz-deep",
    parent=settings.get_profile("clinic-fuzz-ci"),
    max_examples=int(os.environ.get("CLINIC_FUZZ_EXAMPLES", "2000")),
    derandomize=False,
)
FUZZ = settings.get_profile(
    "clinic-fuzz-deep" if os.environ.get("CLINIC_FUZZ_EXAMPLES") else "clinic-fuzz-ci"
)

CREATE = "/v1/verifications"
PROBLEM = "application/problem+json"

# Limits far above what a run sends (one number may get hundreds of verifications).
FUZZ_ENV = {
    "CLINIC_LIMIT_NUMBER_VERIFICATIONS": "1000000/600",
    "CLINIC_LIMIT_NUMBER_SENDS": "1000000/600",
    "CLINIC_LIMIT_PREFIX_SENDS": "1000000/3600",
    "CLINIC_LIMIT_KEY_REQUESTS": "1000000/60",
    "CLINIC_LIMIT_IP_REQUESTS": "1000000/60",
    "CLINIC_LIMIT_AUTH_FAILURES": "1000000/60",
}

# -- strategies ----------------------------------------------------------------------------

# Text of every kind: ASCII, other scripts, digits of other scripts, controls, surrogates
# (json.dumps writes a lone surrogate as \\udXXX, which the service must refuse).
TEXT = st.text(max_size=40)
UNICODE_DIGITS = st.text(st.characters(categories=["Nd"]), min_size=1, max_size=12)
ASCII_DIGITS = st.text(string.digits, min_size=0, max_size=20)
HUGE = st.sampled_from(["x" * 5000, "6" * 40_000, "é" * 2000, "\u0663" * 3000])
ODD_TEXT = st.one_of(
    TEXT, UNICODE_DIGITS, ASCII_DIGITS, HUGE, st.sampled_from(["", " ", "\t", "\x00", "\ufeff"])
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
WRONG = st.one_of(JSON, st.lists(JSON, max_size=3), st.dictionaries(TEXT, JSON, max_size=3))


def _nested(depth: int) -> Any:
    value: Any = "x"
    for i in range(depth):
        value = [value] if i % 2 else {"a": value}
    return value


# Deep enough to matter, shallow enough for json.dumps (deeper ones are written as bytes:
# DEEP_RAW)
DEEP = st.integers(min_value=1, max_value=200).map(_nested)
ANY_VALUE = st.one_of(WRONG, ODD_TEXT, DEEP)


class _Missing:
    """A field left out of a body."""


MISSING = _Missing()


def maybe(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's value: left out, valid, or anything at all."""
    return st.one_of(st.just(MISSING), valid, valid, ANY_VALUE)


MOBILES = st.integers(min_value=10_000_000, max_value=99_999_999).map(lambda n: f"+316{n}")
PHONE = st.one_of(
    MOBILES,
    st.sampled_from(
        [
            MOBILE,
            "0612345678",
            "06-1234 5678",
            " +31612345678",
            "+31 6 12 34 56 78",
            "(06) 12345678",
            "+32450001234",
            "+31101234567",
            "+319061234",
            "+870772123456",
            "+٣١٦١٢٣٤٥٦٧٨",
            "+\uff13\uff11\uff16\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18",
            "+3161234567a",
            "+" + "6" * 31,
            "+0612345678",
            "++31612345678",
            "+",
        ]
    ),
    st.from_regex(r"\+?[0-9 ()./-]{0,34}", fullmatch=True),
    ODD_TEXT,
)
CHANNEL = st.sampled_from(["sms", "voice", "flashcall", "SMS", "fax", ""])
CALLBACK_URL = st.one_of(
    st.sampled_from(
        [
            "https://example.com/hook",
            "http://127.0.0.1:9/hook",
            "http://[::1]/",
            "http://[::1",
            "http://[fe80::1%25eth0]/",
            "http://x:99999/",
            "http://x:-1/",
            "http://user:pw@example.com/",
            "http://169.254.169.254/",
            "http://0x7f.1/",
            "http://example.com:port/",
            "https://ex\u00e4mple.com/",
            "https://xn--/",
            "https://" + "a" * 64 + ".com/",
            "https://a..b/",
            "http:///x",
            "//example.com/",
            "https://example.com/\u0000",
            "https://example.com/" + "p" * 2100,
        ]
    ),
    st.builds(
        lambda scheme, host, rest: f"{scheme}://{host}{rest}",
        st.sampled_from(["http", "https", "HTTP", "ftp", ""]),
        st.one_of(TEXT, st.from_regex(r"[0-9a-f:.\[\]%]{0,30}", fullmatch=True)),
        TEXT,
    ),
)
# Each field: a valid value, and anything a client might get wrong.
VALID_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "region": st.just("NL"),
    "method": st.just("sms"),
    "fallback": st.just([]),
    "code_length": st.integers(min_value=4, max_value=8),
    "locale": st.sampled_from(["en", "nl-NL", "zh-Hant-TW", "EN"]),
    "callback_url": st.sampled_from(["https://example.com/hook", "http://127.0.0.1:9/h"]),
}
WRONG_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "phone": st.one_of(PHONE, ANY_VALUE),
    "region": st.one_of(
        st.sampled_from(["BE", "nl", "ZZ", "XX", "NLD", "", "\uff2e\uff2c", "N\u0130"]), ANY_VALUE
    ),
    "method": st.one_of(CHANNEL, ANY_VALUE),
    "fallback": st.one_of(st.lists(CHANNEL, max_size=4), ANY_VALUE),
    "code_length": st.one_of(
        st.integers(), st.sampled_from([6.0, "6", True, 2**64, -(2**63) - 1]), ANY_VALUE
    ),
    "locale": st.one_of(
        st.sampled_from(["en_US", "x" * 36, "\u0661", "en-", "e", "en\n", "EN-\u0130"]),
        ANY_VALUE,
    ),
    "callback_url": st.one_of(CALLBACK_URL, ANY_VALUE),
}
GOOD_PHONE = st.one_of(MOBILES, st.sampled_from(["0612345678", "+31 6 12 34 56 78", MOBILE]))
VALID_CREATE = st.fixed_dictionaries(
    {"phone": GOOD_PHONE}, optional={"locale": VALID_FIELDS["locale"]}
).flatmap(
    lambda base: (
        st.just(base) if not base["phone"].startswith("0") else st.just({**base, "region": "NL"})
    )
)


def _mutated(base: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """``base`` with one or two fields wrong (or unknown ones added)."""
    names = sorted(WRONG_FIELDS)
    one = st.sampled_from(names).flatmap(
        lambda name: WRONG_FIELDS[name].map(lambda value: {**base, name: value})
    )
    added = st.dictionaries(TEXT, JSON, min_size=1, max_size=2).map(lambda extra: {**extra, **base})
    valid_more = st.sampled_from(sorted(VALID_FIELDS)).flatmap(
        lambda name: VALID_FIELDS[name].map(lambda value: {**base, name: value})
    )
    return st.one_of(one, one, one.flatmap(_mutated_once), added, valid_more)


def _mutated_once(base: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.sampled_from(sorted(WRONG_FIELDS)).flatmap(
        lambda name: WRONG_FIELDS[name].map(lambda value: {**base, name: value})
    )


CREATE_BODY = st.one_of(
    VALID_CREATE, VALID_CREATE.flatmap(_mutated), VALID_CREATE.flatmap(_mutated)
)

CLI_TEXT = st.one_of(
    st.from_regex(r"\+?[0-9 -]{0,20}", fullmatch=True),
    st.text(string.digits, min_size=4, max_size=8).map(lambda c: f"+447400{c}"),
    st.text(string.digits, min_size=4, max_size=8).map(lambda c: f"0044 7400 {c}"),
    st.text(string.digits + " -+", max_size=30),
)
CODE = st.one_of(
    st.text(string.digits, min_size=6, max_size=6),
    ASCII_DIGITS,
    UNICODE_DIGITS,
    st.integers(),
    ODD_TEXT,
    WRONG,
)
CHECK_BODY = st.fixed_dictionaries(
    {
        "code": st.one_of(st.just(MISSING), CODE, CODE),
        "cli": st.one_of(st.just(MISSING), st.just(MISSING), PHONE, CLI_TEXT, ANY_VALUE),
    }
).flatmap(
    lambda base: (
        st.dictionaries(TEXT, JSON, max_size=2).map(
            lambda extra: {**extra, **{k: v for k, v in base.items() if v is not MISSING}}
        )
        | st.just({k: v for k, v in base.items() if v is not MISSING})
    )
)

# Ids: any text (percent-encoded into the path), and ids that look like ours.
PATH_ID = st.one_of(
    TEXT.filter(lambda s: s not in (".", "..")),
    st.from_regex(r"[A-Za-z0-9_-]{1,70}", fullmatch=True),
    st.text(st.characters(categories=["L", "Nd"]), min_size=20, max_size=64),
)

IDEMPOTENCY_KEY = st.one_of(
    st.none(),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=300),
    # no controls: the client refuses them (the server's parser answers 400: test_api_input)
    st.text(st.characters(exclude_categories=["Cs", "Cc"]), max_size=40),
    st.sampled_from(["", " ", "a b", "k" * 255, "k" * 256, "\u043a\u043b\u044e\u0447", "\t"]),
)
CONTENT_TYPE = st.one_of(
    st.just("application/json"),
    st.just("application/json"),
    st.just("application/json"),
    st.sampled_from(["application/json; charset=utf-8", "application/json; charset=UTF-8"]),
    st.sampled_from(
        [
            "application/json; charset=utf-8",
            "application/json; charset=UTF-8",
            "application/json; charset=latin-1",
            "application/json; charset=utf-16",
            'application/json;charset="utf-8"',
            "APPLICATION/JSON",
            "application/merge-patch+json",
            "application/problem+json",
            "application/json; boundary=",
            "text/plain",
            "text/json",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/octet-stream",
            "",
            ";",
            "application/",
            "*/*",
        ]
    ),
)
CODING = st.sampled_from(["", "", "", "gzip", "deflate", "identity", "GZIP", "x-foo", ""])


@dataclass(frozen=True, slots=True)
class Body:
    """How a JSON value goes on the wire."""

    raw: bytes
    coding: str  # Content-Encoding ("" none), the bytes already in it when it is one we know


def encode(value: Any, ascii_only: bool, bom: bool, indent: bool, coding: str) -> Body:
    text = json.dumps(value, ensure_ascii=ascii_only, indent=2 if indent else None)
    # A lone surrogate (from TEXT) cannot be UTF-8: written escaped, as JSON allows
    raw = text.encode("utf-8", "surrogatepass")
    if bom:
        raw = b"\xef\xbb\xbf" + raw
    if coding.lower() == "gzip":
        raw = gzip.compress(raw, mtime=0)
    elif coding == "deflate":
        raw = zlib.compress(raw)
    return Body(raw, coding)


# JSON nested deeper than orjson's 1024 levels and Python's recursion limit
DEEP_RAW = st.integers(min_value=500, max_value=25_000).map(
    lambda n: Body(b'{"phone": ' + b"[" * n + b"]" * n + b"}", "")
)


def bodies(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Body]:
    """``values`` encoded every way a client might, and now and then bytes that are not JSON."""
    plain = st.builds(encode, values, st.booleans(), st.booleans(), st.just(False), st.just(""))
    as_json = st.builds(encode, values, st.booleans(), st.booleans(), st.booleans(), CODING)
    not_json = st.builds(Body, st.binary(max_size=200), st.just(""))
    return st.one_of(plain, plain, plain, as_json, not_json, DEEP_RAW)


# -- the properties ------------------------------------------------------------------------


def assert_sound(answer: Answer, what: str) -> None:
    """The properties every answer has (its schema is checked by ``Api.request``)."""
    assert answer.status < 500, f"{what}: {answer.status} {answer.body[:300]!r}"
    if answer.status >= 400 and answer.body:  # a HEAD answer has none
        assert answer.content_type == PROBLEM, f"{what}: {answer.content_type}"
        problem = answer.json
        assert isinstance(problem["type"], str) and problem["type"].startswith(PROBLEM_BASE), (
            what,
            problem,
        )
        assert isinstance(problem["title"], str) and problem["title"], (what, problem)
        assert problem["status"] == answer.status, (what, problem)
    if answer.status >= 400:
        assert answer.headers.get("Cache-Control") == "no-store", (what, answer.headers)


@dataclass
class Fuzz:
    """One service, and what the examples made on it."""

    api: Api
    created: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> its 201 body
    current: str = ""  # a pending verification the check/fallback/cancel examples use
    statuses: dict[int, int] = field(default_factory=dict)
    calls_saved: bool = False

    async def send(
        self,
        method: str,
        path: str,
        body: Body | None = None,
        *,
        content_type: str | None = "application/json",
        headers: Mapping[str, str] | None = None,
        key: str | None = "",
    ) -> Answer:
        hdrs = dict(headers or {})
        data: bytes | None = None
        if body is not None:
            data = body.raw
            if content_type is not None:
                hdrs["Content-Type"] = content_type
            if body.coding:
                hdrs["Content-Encoding"] = body.coding
        answer = await self.api.request(method, path, data=data, headers=hdrs, key=key)
        self.statuses[answer.status] = self.statuses.get(answer.status, 0) + 1
        assert_sound(answer, f"{method} {path}")
        return answer

    async def create(self) -> str:
        answer = await self.send("POST", CREATE, encode({"phone": MOBILE}, True, False, False, ""))
        assert answer.status == 201, answer.text
        self.remember(answer.json)
        return str(answer.json["id"])

    def remember(self, v: dict[str, Any]) -> None:
        self.created.setdefault(v["id"], v)

    async def pending(self) -> str:
        """A pending verification (a new one once the last is not)."""
        if self.current:
            got = await self.send("GET", f"{CREATE}/{self.current}")
            if got.json["status"] == "pending":
                return self.current
        self.current = await self.create()
        return self.current

    async def same_on_get(self, v: dict[str, Any]) -> dict[str, Any]:
        """GET shows the verification ``v`` answered with: the same fields, its events first."""
        got = await self.send("GET", f"{CREATE}/{v['id']}")
        assert got.status == 200, got.text
        now = got.json
        for name in ("id", "phone", "channels", "created_at", "expires_at"):
            assert now[name] == v[name], (name, v, now)
        assert now["events"][: len(v["events"])] == v["events"], (v, now)
        return dict(now)

    async def all_sent(self, gateway: SmsGateway) -> None:
        """One SMS per verification created, to its number: none for a refused request."""
        if self.created:
            await gateway.wait_for(len(self.created), DEADLINE_S)
        await asyncio.sleep(0.2)  # one more than that would have come by now
        sent = sorted(s.to for s in gateway.received)
        assert sent == sorted(v["phone"] for v in self.created.values()), self.statuses

    async def with_calls(self) -> None:
        """Three call records (two with a voicemail), once."""
        if self.calls_saved:
            return
        rt: Runtime = self.api.app[RUNTIME]
        for n in range(3):
            name = await rt.need_voicemails().save(f"fz-{n}", b"\x10\x00" * 400)
            await rt.need_call_store().save(_call(f"fz-{n}", name if n else None))
        self.calls_saved = True


def quoted(segment: str) -> str:
    return urllib.parse.quote(segment.encode("utf-8", "surrogatepass"), safe="")


@pytest.fixture
async def fuzz(start_service: StartService, sms_gateway: SmsGateway) -> AsyncIterator[Fuzz]:
    """One service for all the examples of a test; afterwards, what they made is what was
    sent."""
    state = Fuzz(await start_service(FUZZ_ENV))
    yield state
    await state.all_sent(sms_gateway)


# -- POST /v1/verifications ----------------------------------------------------------------


@FUZZ
@given(
    body=bodies(st.one_of(CREATE_BODY, CREATE_BODY, CREATE_BODY, JSON, DEEP)),
    content_type=CONTENT_TYPE,
    idempotency_key=IDEMPOTENCY_KEY,
)
async def test_create_answers_any_body_soundly(
    fuzz: Fuzz, sms_gateway: SmsGateway, body: Body, content_type: str, idempotency_key: str | None
) -> None:
    headers = {} if idempotency_key is None else {"Idempotency-Key": idempotency_key}
    answer = await fuzz.send("POST", CREATE, body, content_type=content_type, headers=headers)
    if answer.status != 201:
        return
    v = answer.json
    assert answer.headers["Location"] == f"{CREATE}/{v['id']}"
    replayed = answer.headers.get("Idempotent-Replayed") == "true"
    assert replayed == (v["id"] in fuzz.created), "a new id is not a replay, and a replay not new"
    fuzz.remember(v)
    await fuzz.same_on_get(v)
    if idempotency_key is not None:
        again = await fuzz.send("POST", CREATE, body, content_type=content_type, headers=headers)
        assert again.status == 201, again.text
        assert again.headers.get("Idempotent-Replayed") == "true"
        assert again.json["id"] == v["id"]


# -- POST /v1/verifications/{id}/check -----------------------------------------------------


@FUZZ
@given(body=bodies(st.one_of(CHECK_BODY, CHECK_BODY, JSON)), content_type=CONTENT_TYPE)
async def test_check_answers_any_body_soundly_and_a_refusal_costs_nothing(
    fuzz: Fuzz, body: Body, content_type: str
) -> None:
    vid = await fuzz.pending()
    before = (await fuzz.send("GET", f"{CREATE}/{vid}")).json
    answer = await fuzz.send("POST", f"{CREATE}/{vid}/check", body, content_type=content_type)
    after = await fuzz.send("GET", f"{CREATE}/{vid}")
    if answer.status == 200:
        assert answer.json["id"] == vid
        assert answer.json["attempts_left"] == after.json["attempts_left"]
        assert answer.json["status"] == after.json["status"]
        assert after.json["attempts_left"] == before["attempts_left"] - 1 or (
            after.json["status"] == "approved"
        )
    else:
        assert after.json["attempts_left"] == before["attempts_left"], "a refusal cost an attempt"
        assert after.json["status"] == before["status"]


# -- every verification route, with any id and any body -------------------------------------


# An Authorization header (None: the right key, as the client sends it); no controls, which
# the client refuses to send (the server's parser answers 400: test_api_input)
AUTHORIZATION = st.one_of(
    st.none(),
    st.none(),
    st.sampled_from(
        [
            f"Bearer {CALLS_KEY}",
            f"bearer  {API_KEY} ",
            f"BEARER {API_KEY}\t",
            f"Bearer {API_KEY}x",
            f"Bearer {API_KEY[:-1]}",
            f"Basic {API_KEY}",
            f"Bearer{API_KEY}",
            f"Bearer {API_KEY} {API_KEY}",
            f"Bearer {API_KEY},{OTHER_KEY}",
            f"Bearer {API_KEY}\u00a0",
            "Bearer ",
            "Bearer",
            "",
        ]
    ),
    st.text(st.characters(exclude_categories=["Cs", "Cc"]), max_size=60),
    st.text(st.characters(exclude_categories=["Cs", "Cc"]), max_size=60).map(
        lambda t: f"Bearer {t}"
    ),
)
ROUTES = st.sampled_from(
    [
        ("GET", "{}"),
        ("HEAD", "{}"),
        ("DELETE", "{}"),
        ("POST", "{}/check"),
        ("POST", "{}/fallback"),
        ("PUT", "{}"),
        ("PATCH", "{}/check"),
        ("GET", "{}/check"),
    ]
)


@FUZZ
@given(
    route=ROUTES,
    vid=st.one_of(PATH_ID, st.just("")),
    body=st.one_of(st.none(), bodies(JSON)),
    content_type=st.one_of(st.none(), CONTENT_TYPE),
    authorization=AUTHORIZATION,
)
async def test_any_id_on_any_verification_route_is_answered_soundly(
    fuzz: Fuzz,
    *,
    route: tuple[str, str],
    vid: str,
    body: Body | None,
    content_type: str | None,
    authorization: str | None,
) -> None:
    method, template = route
    answer = await fuzz.send(
        method,
        f"{CREATE}/" + template.format(quoted(vid)),
        body,
        content_type=content_type,
        headers={} if authorization is None else {"Authorization": authorization},
    )
    assert answer.status in (400, 401, 403, 404, 405, 413, 415, 422), answer.text
    if answer.status == 401:
        assert answer.headers["WWW-Authenticate"].startswith("Bearer "), answer.headers


@FUZZ
@given(
    route=st.sampled_from(["GET", "DELETE", "POST /fallback", "POST /check"]),
    body=st.one_of(st.none(), bodies(st.one_of(JSON, CHECK_BODY))),
    content_type=st.one_of(st.none(), CONTENT_TYPE),
)
async def test_a_real_verification_stays_consistent_under_any_request(
    fuzz: Fuzz, route: str, body: Body | None, content_type: str | None
) -> None:
    vid = await fuzz.pending()
    before = (await fuzz.send("GET", f"{CREATE}/{vid}")).json
    method, _, suffix = route.partition(" ")
    answer = await fuzz.send(method, f"{CREATE}/{vid}{suffix}", body, content_type=content_type)
    after = await fuzz.same_on_get(before)
    if answer.status >= 400:
        for name in ("status", "channel", "attempts_left"):
            assert after[name] == before[name], (name, answer.text, before, after)
        assert [e["type"] for e in after["events"]] == [e["type"] for e in before["events"]] or (
            # the SMS gateway's delivery report may land meanwhile
            {e["type"] for e in after["events"][len(before["events"]) :]} <= {"delivered"}
        )
    elif method in ("GET", "DELETE") or suffix == "/fallback":
        for name in ("status", "channel", "attempts_left"):
            assert answer.json[name] == after[name], (name, answer.json, after)


# -- /v1/calls ------------------------------------------------------------------------------


def _call(call_id: str, message: str | None) -> CallResult:
    values = (("complaint", "rash"),) + ((("callback_message", message),) if message else ())
    record = CallRecord("triage", (), values, None, (), None, None, "message_left")
    now = time.time()
    return CallResult(call_id, MOBILE, "700", now - 90, now - 30, record)


QUERY_NAME = st.one_of(st.sampled_from(["limit", "cursor", "LIMIT", "limit[]", ""]), TEXT)
QUERY_VALUE = st.one_of(
    st.integers(min_value=-5, max_value=1000).map(str),
    st.from_regex(r"[0-9]{1,14}(\.[0-9]{0,12})?", fullmatch=True),
    st.sampled_from(["", "20", "020", "1e2", "٣", "100", "101", "0", "999999999999.999999999"]),
    TEXT,
)


@FUZZ
@given(
    query=st.lists(st.tuples(QUERY_NAME, QUERY_VALUE), max_size=3),
    key=st.sampled_from([CALLS_KEY, CALLS_KEY, CALLS_KEY, API_KEY]),
)
async def test_the_call_list_answers_any_query_soundly(
    fuzz: Fuzz, query: list[tuple[str, str]], key: str
) -> None:
    await fuzz.with_calls()
    q = urllib.parse.urlencode(
        [(n.encode("utf-8", "surrogatepass"), v.encode("utf-8", "surrogatepass")) for n, v in query]
    )
    answer = await fuzz.send("GET", "/v1/calls" + (f"?{q}" if q else ""), key=key)
    if key == API_KEY:
        assert answer.status == 403
    elif answer.status == 200:
        page = answer.json
        assert all(c["id"].startswith("fz-") for c in page["calls"])
        if page["next"] is not None:  # the cursor given out is taken back
            more = await fuzz.send(
                "GET", "/v1/calls?" + urllib.parse.urlencode({"cursor": page["next"]}), key=key
            )
            assert more.status == 200, more.text
    else:
        assert answer.status == 422, answer.text


@FUZZ
@given(
    method_path=st.sampled_from(
        ["GET {}", "HEAD {}", "GET {}/voicemail", "HEAD {}/voicemail", "DELETE {}", "POST {}"]
    ),
    call_id=st.one_of(PATH_ID, st.sampled_from(["fz-0", "fz-1", "fz-2"])),
    body=st.one_of(st.none(), st.none(), bodies(JSON)),
    content_type=st.one_of(st.none(), CONTENT_TYPE),
)
async def test_any_call_id_is_answered_soundly(
    fuzz: Fuzz, method_path: str, call_id: str, body: Body | None, content_type: str | None
) -> None:
    await fuzz.with_calls()
    method, _, template = method_path.partition(" ")
    path = "/v1/calls/" + template.format(quoted(call_id))
    answer = await fuzz.send(method, path, body, content_type=content_type, key=CALLS_KEY)
    assert answer.status in (200, 204, 400, 404, 405, 413, 415, 422), answer.text


# -- requests at the same time ---------------------------------------------------------------

ACTS = st.lists(
    st.one_of(
        st.tuples(st.just("POST /check"), bodies(CHECK_BODY)),
        st.tuples(st.sampled_from(["GET", "DELETE", "POST /fallback"]), st.none()),
    ),
    min_size=2,
    max_size=5,
)


@FUZZ
@given(acts=ACTS)
async def test_requests_at_once_on_one_verification_add_up(
    fuzz: Fuzz, acts: list[tuple[str, Body | None]]
) -> None:
    """Checks, cancels, fallbacks and reads of one verification sent at the same time: each
    answer is sound, and GET afterwards is what they add up to (an attempt per check
    answered 200, canceled once a cancel was answered 200)."""
    vid = await fuzz.pending()
    before = (await fuzz.send("GET", f"{CREATE}/{vid}")).json

    async def act(route: str, body: Body | None) -> tuple[str, Answer]:
        method, _, suffix = route.partition(" ")
        return route, await fuzz.send(method, f"{CREATE}/{vid}{suffix}", body)

    answers = await asyncio.gather(*(act(route, body) for route, body in acts))
    after = (await fuzz.send("GET", f"{CREATE}/{vid}")).json
    checked = [a for route, a in answers if route == "POST /check" and a.status == 200]
    canceled = [a for route, a in answers if route == "DELETE" and a.status == 200]
    left = before["attempts_left"] - len(checked)
    assert after["attempts_left"] == left or after["status"] == "approved", (after, answers)
    if canceled:
        assert after["status"] == "canceled", (after, answers)


@FUZZ
@given(body=bodies(VALID_CREATE), copies=st.integers(min_value=2, max_value=5), key=st.uuids())
async def test_one_idempotency_key_at_once_makes_one_verification(
    fuzz: Fuzz, body: Body, copies: int, key: object
) -> None:
    headers = {"Idempotency-Key": str(key)}
    answers = await asyncio.gather(
        *(fuzz.send("POST", CREATE, body, headers=headers) for _ in range(copies))
    )
    made = {a.json["id"] for a in answers if a.status == 201}
    assert len(made) <= 1, answers
    for a in answers:
        if a.status == 201:
            fuzz.remember(a.json)
        elif a.status == 409:
            assert a.json["type"].endswith("/idempotency-key-in-progress"), a.text


# -- flash calls and voice: their parsing, without a SIP pool ----------------------------------
# A test service offers SMS only (flash and voice calls need serve's SIP pool), so these
# properties hold the pure parsing that the create and check handlers run to the same rules.

FLASH_PREFIXES = st.sampled_from(["+447400", "+3197", "+1201555", "+4915", "+86138"])
AVAILABLE = st.lists(st.sampled_from(list(CHANNEL_ORDER)), unique=True).map(
    lambda chans: tuple(c for c in CHANNEL_ORDER if c in chans)
)
FLASH_CREATE = st.fixed_dictionaries(
    {"phone": GOOD_PHONE},
    optional={
        "method": st.sampled_from(["flashcall", "voice", "sms"]),
        "fallback": st.lists(st.sampled_from(["flashcall", "voice", "sms"]), max_size=3),
        "code_length": st.integers(min_value=3, max_value=9),
    },
)


@FUZZ
@given(
    body=st.one_of(FLASH_CREATE, FLASH_CREATE.flatmap(_mutated), CREATE_BODY),
    available=AVAILABLE,
    prefix=st.one_of(st.none(), FLASH_PREFIXES),
)
def test_parse_create_refuses_any_body_with_a_problem(
    body: dict[str, Any], available: tuple[Channel, ...], prefix: str | None
) -> None:
    lengths = numbers.cli_code_lengths(prefix) if prefix else None
    try:
        req = parse_create(body, available, (), lengths)
    except VerificationError as exc:
        assert exc.status < 500 or isinstance(exc, NoChannelConfigured), exc
        return
    assert req.plan and len(set(req.plan)) == len(req.plan)
    assert set(req.plan) <= set(available), (req.plan, available)
    if Channel.FLASHCALL in req.plan and lengths is not None:
        assert req.code_length in lengths


@FUZZ
@given(
    cli=st.one_of(CLI_TEXT, TEXT),
    prefix=FLASH_PREFIXES,
    code_length=st.integers(min_value=4, max_value=8),
    phone=st.sampled_from([MOBILE, "+12015550123", "+8613812345678", "+4915112345678"]),
)
def test_a_caller_id_gives_a_code_of_its_length_or_none(
    cli: str, prefix: str, code_length: int, phone: str
) -> None:
    destination = numbers.parse_phone(phone)
    code = numbers.code_from_cli(cli, prefix, code_length, destination)
    assert code is None or (len(code) == code_length and code.isascii() and code.isdigit())
