"""The OpenAPI 3.1 document (:mod:`clinic_voice.openapi`): every schema is valid JSON Schema
2020-12, every ``$ref`` resolves, every routed path is described, and what the code renders
(verifications, check results, problems) validates against it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from clinic_voice.app import build_app
from clinic_voice.http import HTTP_SLUGS, problem
from clinic_voice.openapi import SCHEMAS, openapi_document
from sip_config.settings import Settings
from verification import errors, rules
from verification.api import render
from verification.model import (
    Channel,
    EventKind,
    FlashCallInfo,
    NumberKind,
    Phone,
    Policy,
    Status,
    Verification,
)
from verification.numbers import cli_filter
from voice.ivr import api as calls_api
from voice.ivr.store import EXAMINED_MAX

README = Path(__file__).resolve().parents[2] / "README.md"

DOC = openapi_document()
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


CALL: dict[str, Any] = {
    "id": "c1",
    "caller": "6001",
    "called": "700",
    "started_at": "2027-01-15T08:00:00.000Z",
    "ended_at": "2027-01-15T08:01:00.000Z",
    "flow": "triage",
    "path": [{"flow": "triage", "node": "who", "input": "digit", "value": "1", "confidence": None}],
    "values": {"who": "self"},
    "triage": {"urgency": "U1", "reasons": ["difficulty breathing"], "action": "transfer_nurse"},
    "transfer_target": "sip:6100@127.0.0.1:5160",
    "outcome": "call_emergency+transfer_nurse",
    "call_back": None,
    "handled_at": None,
}


def walk(node: Any, path: str = "#") -> Iterator[tuple[str, Any]]:
    """Every (JSON pointer, value) below ``node``."""
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, f"{path}/{k.replace('~', '~0').replace('/', '~1')}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}/{i}")


def resolve(pointer: str) -> Any:
    assert pointer.startswith("#/"), f"only local references are used: {pointer}"
    node: Any = DOC
    for raw in pointer[2:].split("/"):
        part = raw.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{pointer} does not resolve at {part}"
        node = node[part]
    return node


def validator(name: str) -> Draft202012Validator:
    """A validator for one component schema, with the components in reach of its $refs."""
    return Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": DOC["components"]}
    )


def operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in DOC["paths"].items():
        for method, op in item.items():
            assert method in METHODS, f"{path}: {method} is not an HTTP method"
            yield path, method, op


def inline_schemas() -> Iterator[tuple[str, Any]]:
    """Schemas of parameters, request bodies and responses."""
    for pointer, node in walk(DOC["paths"], "#/paths"):
        if isinstance(node, dict) and "schema" in node:
            yield pointer, node["schema"]


# -- the document itself ------------------------------------------------------------------------


def test_document_header() -> None:
    assert DOC["openapi"] == "3.1.0"
    assert DOC["info"]["title"] and DOC["info"]["version"]
    assert json.loads(json.dumps(DOC)) == DOC  # plain JSON, nothing Python-only


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_component_schemas_are_valid_json_schema_2020_12(name: str) -> None:
    Draft202012Validator.check_schema(SCHEMAS[name])


def test_inline_schemas_are_valid_json_schema_2020_12() -> None:
    found = list(inline_schemas())
    assert len(found) > 10
    for pointer, schema in found:
        try:
            Draft202012Validator.check_schema(schema)
        except Exception as exc:
            pytest.fail(f"{pointer}: {exc}")


def test_every_ref_resolves() -> None:
    refs = [(p, n["$ref"]) for p, n in walk(DOC) if isinstance(n, dict) and "$ref" in n]
    assert len(refs) > 20
    for pointer, ref in refs:
        target = resolve(ref)
        assert isinstance(target, dict), f"{pointer}: {ref} is not an object"


def test_every_component_schema_is_used() -> None:
    text = json.dumps(DOC["paths"]) + json.dumps(DOC["webhooks"]) + json.dumps(SCHEMAS)
    unused = [n for n in SCHEMAS if f'"#/components/schemas/{n}"' not in text]
    assert unused == []


def test_operations_are_complete() -> None:
    schemes = DOC["components"]["securitySchemes"]
    for path, method, op in operations():
        where = f"{method.upper()} {path}"
        assert op.get("summary"), f"{where}: no summary"
        assert op["responses"], f"{where}: no responses"
        for code, response in op["responses"].items():
            assert re.fullmatch(r"[1-5][0-9]{2}|default", code), f"{where}: code {code}"
            assert response.get("description"), f"{where} {code}: no description"
        for requirement in op.get("security", []):
            assert set(requirement) <= set(schemes), f"{where}: unknown security scheme"
        if path.startswith("/v1/"):
            assert op.get("security"), f"{where}: a /v1 route without bearer auth"
            assert "401" in op["responses"], f"{where}: no 401"


def test_every_route_lists_what_the_http_edge_answers_on_any_path() -> None:
    """The edge answers these on every path, a route without a key included (README: 417 "on
    any path"; a body sent to a GET route anyway is read to the same rules): /healthz answered
    417 and 505 while its document entry listed only 200."""
    edge = {"400", "405", "408", "413", "415", "417", "431", "500", "501", "505"}
    for path, method, op in operations():
        missing = sorted(edge - set(op["responses"]))
        assert not missing, f"{method.upper()} {path}: {missing} not listed"


def test_path_templates_match_their_parameters() -> None:
    for path, method, op in operations():
        templated = set(re.findall(r"\{([^}]+)\}", path))
        declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        assert templated == declared, f"{method.upper()} {path}"
        for p in op.get("parameters", []):
            assert p["in"] in {"path", "query", "header", "cookie"}
            if p["in"] == "path":
                assert p.get("required") is True, f"{path}: path parameters are required"


@pytest.mark.parametrize(
    ("pointer", "values"),
    [
        ("#/components/schemas/Event/properties/type/enum", [k.value for k in EventKind]),
        ("#/components/schemas/Verification/properties/status/enum", [s.value for s in Status]),
        (  # a check of a canceled verification is a 409, never a result
            "#/components/schemas/CheckResult/properties/status/enum",
            [s.value for s in Status if s is not Status.CANCELED],
        ),
        ("#/components/schemas/Verification/properties/channels/items/enum", list(Channel)),
        ("#/components/schemas/CreateVerification/properties/method/enum", list(Channel)),
    ],
)
def test_enums_follow_the_model(pointer: str, values: list[str]) -> None:
    assert sorted(resolve(pointer)) == sorted(str(v) for v in values)


def test_every_route_of_the_service_is_described(tmp_path: Path) -> None:
    settings = Settings.from_env({"CLINIC_DATA_DIR": str(tmp_path / "var")})
    app = build_app(settings)  # built, not started: nothing listens, no Redis
    routed = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource else ""
        routed.add((route.method.lower(), path))
    described = {(method, path) for path, method, _ in operations()}
    assert routed - described == set(), "routes missing from /openapi.json"
    assert described - routed == set(), "documented routes that do not exist"


# -- what the code renders validates -------------------------------------------------------------

T0 = 1_800_000_000.0
PHONE = Phone("+447400123456", "GB", 44, "7400123456", NumberKind.MOBILE)
POLICY = Policy()


def _verifications() -> list[Verification]:
    flash = FlashCallInfo("+447400", 6, cli_filter("+447400", 6, PHONE), 20)
    plan = (Channel.FLASHCALL, Channel.SMS, Channel.VOICE)
    t = rules.create(
        verification_id="A" * 32,
        phone=PHONE,
        plan=plan,
        code_length=6,
        now=T0,
        policy=POLICY,
        flashcall=flash,
    )
    pending = rules.code_sent(t.verification, 0, "h", T0).verification
    moved = rules.tick(pending, T0 + 33, POLICY).verification
    approved = rules.check(moved, True, T0 + 40, POLICY)[0].verification
    landline = Phone("+442079460000", "GB", 44, "2079460000", NumberKind.FIXED_LINE)
    failed = rules.create(
        verification_id="B" * 32,
        phone=landline,
        plan=(Channel.FLASHCALL,),
        code_length=4,
        now=T0,
        policy=POLICY,
    ).verification
    expired = rules.tick(moved, T0 + 600, POLICY).verification
    return [pending, moved, approved, failed, expired]


@pytest.mark.parametrize("v", _verifications(), ids=lambda v: f"{v.status}-{v.step}")
def test_rendered_verifications_validate(v: Verification) -> None:
    errs = sorted(validator("Verification").iter_errors(render(v, POLICY)), key=str)
    assert errs == [], "\n".join(str(e) for e in errs[:3])


def test_a_stored_call_record_matches_the_call_schema() -> None:
    """As the API shows it: the record stored, with what is derived for staff."""
    from voice.ivr.call_record import CallResult
    from voice.ivr.engine import CallRecord, PathStep
    from voice.ivr.follow_up import for_staff
    from voice.ivr.triage import TriageAction, Urgency

    record = CallRecord(
        flow="triage",
        path=(PathStep("triage", "breathing", "digit", "1", None),),
        values=(("who", "self"),),
        urgency=Urgency.U1,
        reasons=("difficulty breathing",),
        action=TriageAction.CALL_EMERGENCY,
        transfer_target="sip:6100@pbx",
        outcome="call_emergency+transfer_nurse",
    )
    doc = for_staff(CallResult("c1", "6001", "700", 1.8e9, 1.8e9 + 60, record).to_json())
    assert validator("Call").is_valid(doc), doc


@pytest.mark.parametrize(
    ("schema", "instance", "valid"),
    [
        ("CheckResult", {"id": "A" * 32, "status": "approved", "attempts_left": 5}, True),
        ("CheckResult", {"id": "A" * 32, "status": "ok", "attempts_left": 5}, False),
        ("Check", {"code": "123456"}, True),
        ("Check", {"cli": "+44 7400 123456"}, True),
        ("Check", {"code": "123456", "cli": "+447400123456"}, False),
        ("Check", {}, False),
        ("Check", {"code": "١٢٣٤٥٦"}, False),  # [0-9] is ASCII in every regex dialect
        ("CreateVerification", {"phone": "+447400123456"}, True),
        ("CreateVerification", {"phone": "+447400123456", "code_length": 9}, False),
        ("CreateVerification", {"phone": "+447400123456", "method": "fax"}, False),
        ("CreateVerification", {"phone": "+447400123456", "extra": 1}, False),
        ("CallList", {"calls": [CALL], "next": None}, True),
        ("CallList", {"calls": [{"id": "c1"}], "next": None}, False),
        ("Call", {**CALL, "triage": {"urgency": "U7", "reasons": [], "action": None}}, False),
        ("Health", {"status": "ok"}, True),
    ],
)
def test_examples_against_the_schemas(schema: str, instance: Any, valid: bool) -> None:
    assert validator(schema).is_valid(instance) is valid, instance


def _error_classes() -> list[type[errors.VerificationError]]:
    """The problems the service answers with: the verification package's, and the call
    records API's own (voice/ivr/api.py)."""
    found = {
        c
        for module in (errors, calls_api)
        for c in vars(module).values()
        if isinstance(c, type) and issubclass(c, errors.VerificationError)
    }
    return sorted(found, key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda c: c.__name__)
def test_problem_documents_validate(cls: type[errors.VerificationError]) -> None:
    exc: errors.VerificationError
    if cls is errors.NotOnChannel:
        exc = errors.NotOnChannel("it is on sms", channel="sms")
    elif cls is errors.NotPending:
        exc = errors.NotPending("it is approved", status="approved")
    else:
        exc = cls("slow down", 3) if issubclass(cls, errors.RetryLater) else cls("detail")
    resp = problem(exc.status, exc.slug, exc.title, exc.detail, **exc.extra)
    assert resp.text is not None
    body = json.loads(resp.text)
    errs = list(validator("Problem").iter_errors(body))
    assert errs == [], f"{cls.__name__}: {errs[0] if errs else ''}"
    assert body["status"] == exc.status == resp.status
    assert resp.content_type == "application/problem+json"


def test_every_error_status_is_documented_somewhere() -> None:
    documented = {code for _, _, op in operations() for code in op["responses"]}
    for cls in _error_classes():
        if cls is errors.VerificationError:
            continue  # the base class is never raised itself
        assert str(cls.status) in documented, f"{cls.__name__} answers {cls.status}"


def test_every_problem_type_is_in_the_readme_table() -> None:
    """The problem ``type`` slugs are a contract: each one the service answers has a row."""
    slugs = {c.slug for c in _error_classes()} - {errors.VerificationError.slug}
    slugs |= {slug for slug, _ in HTTP_SLUGS.values()}
    slugs |= {"not-ready", "http-error"}  # /readyz, and any other HTTP error
    text = README.read_text()
    missing = sorted(s for s in slugs if f"| `{s}` |" not in text)
    assert not missing, f"problem types without a README row: {missing}"


def test_the_call_list_documents_its_filter_and_how_many_calls_a_page_reads() -> None:
    params = {p["name"]: p for p in DOC["paths"]["/v1/calls"]["get"]["parameters"]}
    assert set(params) == {"limit", "cursor", calls_api.NEEDS_CALL_BACK}, set(params)
    owed = params[calls_api.NEEDS_CALL_BACK]
    assert owed["schema"]["enum"] == ["true", "false"], owed
    assert f"at most {EXAMINED_MAX} calls read" in owed["description"], owed
    assert f"at most {EXAMINED_MAX} calls" in README.read_text(encoding="utf-8")
