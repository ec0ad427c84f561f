"""Fixtures of the API tier: the real app over real HTTP on 127.0.0.1, a real ``redis-server``,
a real SMS gateway and webhook receiver, and a session-wide OpenAPI response collector.

- ``sms_gateway`` / ``webhook_receiver``: the peers of ``tests/peers/`` started on free ports.
- ``start_service(env, clock=...)``: builds the app with ``build_app`` (Redis from the
  ``redis_server`` fixture, a temp data dir, the gateway peer as SMS gateway), serves it with
  ``aiohttp.test_utils.TestServer`` and returns an :class:`Api` client. Every response the client
  sees is validated against the app's own ``/openapi.json``.
- ``openapi_responses``: the session-wide collector; it fails the test that saw a response the
  document does not describe, and the session if any was seen at all.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import jsonschema
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict, CIMultiDictProxy
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from clinic_voice.app import build_app
from sip_config.clock import Clock
from sip_config.settings import Settings
from tests.conftest import RedisServer
from tests.peers.sms_gateway import SmsGateway
from tests.peers.webhook_receiver import WebhookReceiver
from verification.redis_mux import RedisMux
from voice.sip.caller_identity import CallerIdentity

API_KEY = "test-key-0123456789abcdef"
OTHER_KEY = "other-key-0123456789abcdef"
CALLS_KEY = "calls-key-0123456789abcdef"  # the clinic staff's: /v1/calls only
SECRET = "test-secret-0123456789abcdef0123456789"
CLINIC_NAME = "Kliniek Zuid"
MOBILE = "+31612345678"  # a valid NL mobile number (phonenumbers' example range)

#: Small timeouts keep the tier fast; each test overrides what it needs.
BASE_ENV: dict[str, str] = {
    "CLINIC_API_KEYS": f"{API_KEY},{OTHER_KEY}",
    "CLINIC_CALLS_API_KEYS": CALLS_KEY,
    "CLINIC_SECRET": SECRET,
    "CLINIC_NAME": CLINIC_NAME,
    "CLINIC_LOG_LEVEL": "DEBUG",
    "CLINIC_SMS_HTTP_TOKEN": "gw-token-42",
    "CLINIC_SMS_HTTP_TIMEOUT_S": "1",
    "CLINIC_SMS_HTTP_RETRIES": "1",
    "CLINIC_WEBHOOK_TIMEOUT_S": "1",
    "CLINIC_WEBHOOK_RETRIES": "3",
    # the test peers (webhook receivers) listen on loopback
    "CLINIC_CALLBACK_NETWORKS": "127.0.0.0/8",
}

DEADLINE_S = 10.0
_DOC_ID = "urn:clinic-voice:openapi"


def _pointer(*parts: str) -> str:
    return "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


class StoredCall:
    """What ``CallSession._store`` reads of a SIP call: its id, caller and called number
    (the tests of the store step need no SIP)."""

    caller = "+31612345678"
    caller_identity = CallerIdentity.CLAIMED
    called = "700"

    def __init__(self, call_id: str) -> None:
        self.id = call_id


@dataclass
class OpenApiCollector:
    """Validates every response seen against ``/openapi.json`` and remembers what failed.

    A response is looked up by (path template, method, status, media type). Paths or methods
    the document does not have (an unknown route, a wrong method) may only be answered 404 or
    405 with a ``Problem`` body, or under ``/v1/`` 401 (no right key: the key is asked for
    before the router says what exists, as the document's description says) and 429 (a right
    key while its address is locked out): everything else must be listed under its route.
    """

    doc: dict[str, Any] | None = None
    seen: set[tuple[str, str, int]] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)
    _registry: Registry[Any] | None = None
    _templates: list[tuple[re.Pattern[str], str]] = field(default_factory=list)

    def load(self, doc: dict[str, Any]) -> None:
        """Take the document (the first service's; later ones must be the same)."""
        if self.doc is not None:
            if doc != self.doc:
                self.failures.append("/openapi.json differs between two app instances")
            return
        self.doc = doc
        resource = Resource.from_contents(doc, default_specification=DRAFT202012)
        self._registry = Registry().with_resource(_DOC_ID, resource)
        for template in doc["paths"]:
            rx = re.escape(template).replace(r"\{id\}", "[^/]+")
            self._templates.append((re.compile(rx + "$"), template))

    def _errors(self, pointer: str, body: Any) -> list[str]:
        assert self._registry is not None
        validator = jsonschema.Draft202012Validator(
            {"$ref": f"{_DOC_ID}#/{pointer}"},
            registry=self._registry,
            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
        )
        return [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(body)
        ]

    def check(
        self,
        method: str,
        path: str,
        status: int,
        ctype: str,
        body: bytes,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> list[str]:
        """Validate one response; returns (and records) what is wrong with it.

        With ``headers``, the response headers the document lists are checked too: present
        when required, and of their schema's type.
        """
        assert self.doc is not None, "no /openapi.json loaded yet"
        where = f"{method} {path} -> {status} ({ctype})"
        problems: list[str] = []
        path = path.partition("?")[0]  # query parameters are not part of a path template
        template = next((t for rx, t in self._templates if rx.match(path)), None)
        op = self.doc["paths"].get(template, {}).get(method.lower()) if template else None
        parsed: Any = None
        head = method.upper() == "HEAD"  # the headers of a GET: its media type, and no body
        if head and body:
            problems.append(f"{where}: a HEAD answer has a body")
        if ctype.endswith("json") and not head:
            try:
                parsed = json.loads(body)
            except ValueError:
                problems.append(f"{where}: body is not JSON: {body[:80]!r}")
        if op is None:
            self.seen.add((f"(outside the document) {template or path}", method, status))
            allowed = (401, 404, 405, 429) if path.startswith("/v1/") else (404, 405)
            if status not in allowed or ctype != "application/problem+json":
                problems.append(f"{where}: route or method not in the document")
            elif not problems and not head:
                problems += [
                    f"{where}: {e}"
                    for e in self._errors(_pointer("components", "schemas", "Problem"), parsed)
                ]
        else:
            assert template is not None
            self.seen.add((template, method, status))
            response = op["responses"].get(str(status))
            if response is None:
                problems.append(f"{where}: status {status} not listed for {method} {template}")
            elif head:
                pass  # no body, so no media type to look up: the status and headers count
            elif "content" not in response:  # 204: no body, so no media type either
                if body:
                    problems.append(f"{where}: a body where the document lists none")
            elif ctype not in response["content"]:
                listed = sorted(response.get("content", {}))
                problems.append(f"{where}: media type not listed (document: {listed})")
            elif "schema" in response["content"][ctype] and not problems:
                pointer = _pointer(
                    "paths", template, method.lower(), "responses", str(status), "content", ctype
                )
                problems += [f"{where}: {e}" for e in self._errors(pointer + "/schema", parsed)]
            if response is not None and headers is not None:
                problems += [f"{where}: {e}" for e in _header_errors(response, headers)]
        self.failures += problems
        return problems


def _header_errors(response: Mapping[str, Any], headers: Mapping[str, str]) -> list[str]:
    """What is wrong with a response's headers against the ones its document entry lists."""
    errors = []
    for name, spec in response.get("headers", {}).items():
        value = headers.get(name)
        if value is None:
            if spec.get("required"):
                errors.append(f"header {name} is missing")
            continue
        schema = spec.get("schema", {})
        if schema.get("type") == "integer":
            if not value.isdigit() or int(value) < schema.get("minimum", 0):
                errors.append(f"header {name}: {value!r} is not an integer per the document")
        elif "enum" in schema and value not in schema["enum"]:
            errors.append(f"header {name}: {value!r} is not one of {schema['enum']}")
    return errors


@pytest.fixture(scope="session")
def openapi_responses() -> Iterator[OpenApiCollector]:
    """The session-wide collector: fails the session if any response did not validate."""
    collector = OpenApiCollector()
    yield collector
    if collector.failures:
        pytest.fail(
            f"{len(collector.failures)} response(s) do not match /openapi.json:\n  "
            + "\n  ".join(collector.failures)
        )


@dataclass(frozen=True, slots=True)
class Answer:
    """One HTTP response, read in full."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    content_type: str

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()

    def problem(self, status: int, slug: str) -> dict[str, Any]:
        """Assert this is the problem ``slug`` with ``status``; return its body."""
        assert self.status == status, f"expected {status} {slug}, got {self.status}: {self.text}"
        assert self.content_type == "application/problem+json", self.content_type
        body = self.json
        assert body["type"] == f"https://clinic-voice.example/problems/{slug}", body
        assert body["status"] == status, body
        assert isinstance(body["title"], str) and body["title"], body
        return dict(body)


class Api:
    """A client of one running service: bearer key by default, every answer validated."""

    def __init__(self, client: TestClient[Any, Any], collector: OpenApiCollector) -> None:
        self.client = client
        self.collector = collector
        self.app = client.app
        self.key: str | None = API_KEY

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        key: str | None = "",
    ) -> Answer:
        """Send one request. ``key=""``: the default key; ``None``: no Authorization header.
        ``headers`` may repeat a name (a CIMultiDict): each line is sent."""
        hdrs: CIMultiDict[str] = CIMultiDict(headers or {})
        use_key = self.key if key == "" else key
        if use_key is not None and "Authorization" not in hdrs:
            hdrs["Authorization"] = f"Bearer {use_key}"
        if json_body is not None:
            data = json.dumps(json_body)
            hdrs.setdefault("Content-Type", "application/json")
        async with self.client.request(method, path, data=data, headers=hdrs) as resp:
            body = await resp.read()
            answer = Answer(resp.status, resp.headers, body, resp.content_type)
        errors = self.collector.check(
            method, path, answer.status, answer.content_type, body, headers=answer.headers
        )
        assert not errors, "response does not match /openapi.json:\n  " + "\n  ".join(errors)
        return answer

    async def create(self, **body: Any) -> Answer:
        """``POST /v1/verifications`` with ``phone`` defaulting to :data:`MOBILE`."""
        body.setdefault("phone", MOBILE)
        return await self.request("POST", "/v1/verifications", json_body=body)

    async def get(self, vid: str) -> dict[str, Any]:
        answer = await self.request("GET", f"/v1/verifications/{vid}")
        assert answer.status == 200, answer.text
        return dict(answer.json)

    async def check(self, vid: str, code: str) -> Answer:
        return await self.request(
            "POST", f"/v1/verifications/{vid}/check", json_body={"code": code}
        )

    async def wait_for_event(
        self, vid: str, kind: str, deadline_s: float = DEADLINE_S
    ) -> dict[str, Any]:
        """Poll GET until an event of ``kind`` shows; returns the verification."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        while True:
            v = await self.get(vid)
            if any(e["type"] == kind for e in v["events"]):
                return v
            if loop.time() > end:
                kinds = [e["type"] for e in v["events"]]
                pytest.fail(f"no '{kind}' event on {vid} within {deadline_s} s; events: {kinds}")
            await asyncio.sleep(0.05)


class StartService(Protocol):
    def __call__(
        self, env: Mapping[str, str] | None = None, *, clock: Clock | None = None
    ) -> Awaitable[Api]: ...


@pytest.fixture
async def mux(redis_server: RedisServer) -> AsyncIterator[RedisMux]:
    """The multiplexed Redis client on the test's redis-server (0.5 s timeout)."""
    client = RedisMux(redis_server.url, timeout_s=0.5)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def sms_gateway() -> AsyncIterator[SmsGateway]:
    """A real HTTP SMS gateway on a free port (mode ``ok``; tests may change ``mode``)."""
    gateway = SmsGateway()
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


@pytest.fixture
async def webhook_receiver() -> AsyncIterator[WebhookReceiver]:
    """A real webhook receiver on a free port (answers 204)."""
    receiver = WebhookReceiver()
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


def service_env(
    redis_url: str, data_dir: Path, gateway: SmsGateway, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of a test service (``BASE_ENV`` plus the peers plus ``env``)."""
    return {
        **BASE_ENV,
        "CLINIC_REDIS_URL": redis_url,
        "CLINIC_DATA_DIR": str(data_dir),
        "CLINIC_SMS_HTTP_URL": gateway.url,
        **(env or {}),
    }


@pytest.fixture
async def start_service(
    redis_server: RedisServer,
    sms_gateway: SmsGateway,
    tmp_path: Path,
    openapi_responses: OpenApiCollector,
) -> AsyncIterator[StartService]:
    """Start the real app (``build_app``) on 127.0.0.1; stopped after the test."""
    clients: list[TestClient[Any, Any]] = []
    failures_before = len(openapi_responses.failures)

    async def start(env: Mapping[str, str] | None = None, *, clock: Clock | None = None) -> Api:
        data_dir = tmp_path / f"data{len(clients)}"
        settings = Settings.from_env(service_env(redis_server.url, data_dir, sms_gateway, env))
        app: web.Application = build_app(settings, clock=clock)
        client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
        try:
            await client.start_server()
        except BaseException:  # an app that refuses to start: its client is closed all the same
            await client.close()
            raise
        clients.append(client)
        async with client.get("/openapi.json") as resp:
            assert resp.status == 200, await resp.text()
            openapi_responses.load(await resp.json())
            body = await resp.read()
        openapi_responses.check("GET", "/openapi.json", resp.status, resp.content_type, body)
        return Api(client, openapi_responses)

    try:
        yield start
    finally:
        for client in reversed(clients):
            await client.close()
    new = openapi_responses.failures[failures_before:]
    assert not new, "responses not matching /openapi.json:\n  " + "\n  ".join(new)


async def read_code(gateway: SmsGateway, nth: int = 1) -> str:
    """The code of the ``nth`` SMS the gateway received (waiting for it), read from its text."""
    received = await gateway.wait_for(nth)
    text = received[nth - 1].text
    found = re.findall(r"\b[0-9]{4,8}\b", text)
    assert len(found) == 1, f"expected one code in SMS {nth}, found {len(found)}"
    return str(found[0])


def wrong_code(code: str) -> str:
    """A code of the same length that differs in every digit."""
    return "".join(str((int(d) + 1) % 10) for d in code)


# -- the clinic line (issue 4) ------------------------------------------------------------


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A folder in /tmp that every user may pass through (tmp_path's parents are root's,
    0700), with a short path for the embedded Redis's unix socket."""
    path = Path(tempfile.mkdtemp(prefix="cv-", dir="/tmp"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def ivr_prompt_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One prompt cache for every clinic-line service of the session (see tests/peers/ivr_rig)."""
    return tmp_path_factory.mktemp("ivr-prompts")


# -- hypothesis state machines on a real Redis (test_prop_store.py, test_prop_call_records.py)
def machine_settings(*, examples: int, deep_examples: int, steps: int) -> Any:
    """The same ``examples`` on every run (derandomized); ``HYPOTHESIS_PROFILE=deep`` searches
    at random, ``HYPOTHESIS_MAX_EXAMPLES`` of them (``deep_examples`` unless set)."""
    from hypothesis import HealthCheck, settings

    deep = os.environ.get("HYPOTHESIS_PROFILE") == "deep"
    return settings(
        max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", deep_examples))
        if deep
        else examples,
        stateful_step_count=steps,
        derandomize=not deep,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )


def run_machine_on_redis(machine: type[Any], redis_url: str, profile: Any) -> None:
    """Run a state machine whose steps drive asyncio code: on a loop of its own and one
    RedisMux to ``redis_url``, set on the class as ``loop`` and ``mux``."""
    from hypothesis.stateful import run_state_machine_as_test

    loop = asyncio.new_event_loop()
    mux = RedisMux(redis_url)
    bound = type(f"Bound{machine.__name__}", (machine,), {"loop": loop, "mux": mux})
    try:
        run_state_machine_as_test(bound, settings=profile)
    finally:
        loop.run_until_complete(mux.aclose())
        loop.close()
