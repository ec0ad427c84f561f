"""The OpenAPI document the app serves, and the collector that holds every test's responses to
it: shown here to catch what it must catch, so its silence elsewhere means something.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from clinic_voice import openapi
from clinic_voice.openapi import openapi_document
from tests.integration.conftest import SECRET, OpenApiCollector, StartService, read_code
from tests.peers.sms_gateway import SmsGateway
from tests.peers.webhook_receiver import WebhookReceiver
from verification.webhooks import SIGNATURE_HEADER, verify

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]

PROBLEM = "application/problem+json"


async def _document(start_service: StartService) -> dict[str, Any]:
    api = await start_service()
    answer = await api.request("GET", "/openapi.json", key=None)
    assert answer.status == 200
    doc = answer.json
    assert isinstance(doc, dict)
    return doc


async def test_the_document_is_built_once_per_process(
    start_service: StartService, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Building and serialising the document took about 2 ms of a loop step at each request;
    # it depends on nothing that changes while the process runs.
    builds: list[None] = []
    real_paths = openapi._paths

    def counted() -> dict[str, Any]:
        builds.append(None)
        return real_paths()

    monkeypatch.setattr(openapi, "_paths", counted)
    api = await start_service()  # which asks for the document once itself
    first = await api.request("GET", "/openapi.json", key=None)
    second = await api.request("GET", "/openapi.json", key=None)
    assert first.status == second.status == 200
    assert first.body == second.body
    # Once in this process: at the service's first request, or before, by another test's.
    assert len(builds) <= 1, f"built {len(builds)} times for three requests"


async def test_the_document_is_revalidated_by_its_etag(start_service: StartService) -> None:
    api = await start_service()
    full = await api.request("GET", "/openapi.json", key=None)
    etag = full.headers["ETag"]
    assert etag.startswith('"') and etag.endswith('"'), etag
    for asked in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        again = await api.request(
            "GET", "/openapi.json", key=None, headers={"If-None-Match": asked}
        )
        assert (again.status, again.body, again.headers["ETag"]) == (304, b"", etag), asked
        head = await api.request(
            "HEAD", "/openapi.json", key=None, headers={"If-None-Match": asked}
        )
        assert head.status == 304, asked
    other = await api.request("GET", "/openapi.json", key=None, headers={"If-None-Match": '"x"'})
    assert (other.status, other.body) == (200, full.body)


@pytest.fixture
def checked_document() -> tuple[dict[str, Any], list[str]]:
    """The document the app serves (as JSON gives it back), and each of its schemas that is no
    valid JSON Schema. A plain fixture, so outside the event loop: the check takes 40 ms of
    CPU, and in a thread it competes for the GIL with the loop, which no_blocking watches."""
    doc = json.loads(json.dumps(openapi_document()))
    invalid = []
    for name, schema in doc["components"]["schemas"].items():
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            invalid.append(f"components/schemas/{name} is not a valid JSON Schema: {exc.message}")
    return doc, invalid


async def test_the_document_is_openapi_31_with_valid_schemas(
    start_service: StartService, checked_document: tuple[dict[str, Any], list[str]]
) -> None:
    doc = await _document(start_service)
    assert doc["openapi"].startswith("3.1")
    checked, invalid = checked_document
    assert doc == checked, "the app serves another document than the one checked"
    assert not invalid, "\n".join(invalid)
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op["responses"], f"{method} {path} lists no responses"


async def test_the_collector_refuses_what_the_document_does_not_say(
    start_service: StartService,
) -> None:
    collector = OpenApiCollector()  # not the session's: these failures are on purpose
    collector.load(await _document(start_service))
    good_problem = json.dumps(
        {"type": "https://clinic-voice.example/problems/not-found", "title": "x", "status": 404}
    ).encode()
    vid = "A" * 32
    assert collector.check("GET", f"/v1/verifications/{vid}", 404, PROBLEM, good_problem) == []
    assert collector.check("GET", "/nowhere", 404, PROBLEM, good_problem) == []
    unauthorized = json.dumps(
        {"type": "https://clinic-voice.example/problems/unauthorized", "title": "x", "status": 401}
    ).encode()
    assert collector.check("GET", "/v1/nowhere", 401, PROBLEM, unauthorized) == []
    assert collector.check("PUT", "/v1/verifications", 401, PROBLEM, unauthorized) == []
    assert collector.check("DELETE", "/v1/calls/c-1", 204, "application/octet-stream", b"") == []

    bad = {
        "a status the route does not list": ("GET", "/healthz", 418, PROBLEM, good_problem),
        "a route the document does not have": ("GET", "/nowhere", 200, "application/json", b"{}"),
        "a 401 outside /v1/ on no route": ("GET", "/nowhere", 401, PROBLEM, unauthorized),
        "a method the document does not have": ("PUT", "/healthz", 200, "application/json", b"{}"),
        "another media type": ("GET", "/healthz", 200, "text/html", b"<p>ok</p>"),
        "a body that is not JSON": ("GET", "/healthz", 200, "application/json", b"ok"),
        "a verification without its fields": (
            "GET",
            f"/v1/verifications/{vid}",
            200,
            "application/json",
            json.dumps({"id": vid, "status": "pending"}).encode(),
        ),
        "a verification with an unknown status": (
            "POST",
            f"/v1/verifications/{vid}/check",
            200,
            "application/json",
            json.dumps({"id": vid, "status": "maybe", "attempts_left": 1}).encode(),
        ),
        "a body on an answer without one": (
            "DELETE",
            "/v1/calls/c-1",
            204,
            "application/json",
            b"{}",
        ),
        "a problem with a string status": (
            "GET",
            f"/v1/verifications/{vid}",
            404,
            PROBLEM,
            json.dumps({"type": "x", "title": "x", "status": "404"}).encode(),
        ),
    }
    for what, args in bad.items():
        assert collector.check(*args), f"the collector let through {what}"
    assert len(collector.failures) >= len(bad)

    limited = json.dumps({"type": "x", "title": "x", "status": 429, "retry_after": 3}).encode()
    create = ("POST", "/v1/verifications", 429, PROBLEM, limited)
    assert collector.check(*create, headers={"Retry-After": "3"}) == []
    assert collector.check(*create, headers={}) == [
        f"POST /v1/verifications -> 429 ({PROBLEM}): header Retry-After is missing"
    ]
    assert collector.check(*create, headers={"Retry-After": "soon"}), (
        "a Retry-After that is no number"
    )


async def test_the_header_fields_an_error_carries_are_in_the_document(
    start_service: StartService,
) -> None:
    """The walk-through: the README promises `WWW-Authenticate` with a 401, `Allow` with a 405,
    `Accept-Encoding` with a 415 for a coding refused and `Accept` with one for a media type
    refused, and the answers carry them, but the document listed none of them: a client
    generated from it had no way to read them."""
    api = await start_service()
    doc = (await api.request("GET", "/openapi.json", key=None)).json
    vid = "A" * 32
    sent = [
        ("GET", "/v1/verifications/{id}", {}, "wrong-key-0123456789", 401, "WWW-Authenticate"),
        ("PUT", "/v1/verifications", {}, "", 405, "Allow"),
        ("POST", "/v1/verifications", {"Content-Encoding": "compress"}, "", 415, "Accept-Encoding"),
        ("POST", "/v1/verifications", {"Content-Type": "text/plain"}, "", 415, "Accept"),
    ]
    for method, template, headers, key, status, name in sent:
        answer = await api.request(
            method,
            template.replace("{id}", vid),
            data=b"{}",
            headers={"Content-Type": "application/json", **headers},
            key=key,
        )
        assert answer.status == status, answer.body
        assert answer.headers.get(name), f"the {status} answer carries no {name}"
        route = doc["paths"][template]
        listed = route.get(method.lower(), route.get("post", {}))["responses"][str(status)]
        assert name in listed.get("headers", {}), f"the document's {status} lists no {name}"


async def test_the_webhooks_are_in_the_document_as_they_are_sent(
    start_service: StartService, sms_gateway: SmsGateway, webhook_receiver: WebhookReceiver
) -> None:
    """The walk-through: the document said nothing of the webhooks, so a receiver could not be
    built from it; OpenAPI 3.1 has ``webhooks`` for them."""
    api = await start_service({"CLINIC_WEBHOOK_URL": webhook_receiver.url()})
    doc = (await api.request("GET", "/openapi.json", key=None)).json
    post = doc["webhooks"]["verificationEvent"]["post"]
    body_schema = post["requestBody"]["content"]["application/json"]["schema"]
    validator = jsonschema.Draft202012Validator(
        {**body_schema, "components": doc["components"]}, format_checker=None
    )
    (signature,) = [p for p in post["parameters"] if p["in"] == "header"]
    assert signature["name"] == SIGNATURE_HEADER and signature["required"]
    vid = (await api.create(method="sms", fallback=[])).json["id"]
    assert (await api.check(vid, "0" * 6)).json["status"] == "pending"  # a check_failed event
    assert (await api.check(vid, await read_code(sms_gateway))).json["status"] == "approved"
    hooks = await webhook_receiver.wait_until("5 events", lambda got: len(got) >= 5)
    assert {h.json()["event"]["type"] for h in hooks} >= {"requested", "check_failed", "approved"}
    for hook in hooks:
        errors = [e.message for e in validator.iter_errors(hook.json())]
        assert not errors, (hook.body, errors)
        header = hook.headers[SIGNATURE_HEADER]
        assert jsonschema.Draft202012Validator(signature["schema"]).is_valid(header), header
        assert verify(SECRET.encode(), header, hook.body)
