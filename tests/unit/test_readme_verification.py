"""README "The verification API" (with "The rules", "Channels" and "Metrics") says what the code
does: its numbers, problem types and statuses, field and event names, the SMS text, the
backoffs, the metric names, and its curl examples are requests the API takes (app developers
build on all of them)."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import inspect
import json
import re
from typing import Any, cast

import pytest
from jsonschema import Draft202012Validator

from clinic_voice import http
from clinic_voice.http import HTTP_SLUGS
from clinic_voice.metrics import Counter, Gauge, Histogram, Metrics
from clinic_voice.openapi import SCHEMAS, openapi_document
from sip_config.clock import FakeClock
from sip_config.settings import (
    SIP_CALLS_PER_WORKER,
    SIP_MESSAGE_WAIT_S,
    SMS_RETRY_JITTER,
    VOICE_CALL_S,
    Rate,
    Settings,
    SettingsError,
    SmsSettings,
)
from tests import readme_text
from verification import (
    api,
    codes,
    dispatcher,
    errors,
    request,
    store,
    timer_pause,
    webhook_origins,
    webhooks,
)
from verification.api import parse_create, parse_fallback
from verification.channels import flash_call, sms_http, sms_sip, voice_call
from verification.http_client import HttpClient
from verification.model import CHANNEL_ORDER, Channel, EventKind, Status
from verification.numbers import REFUSED_KINDS, cli_code_lengths, parse_phone
from verification.outage_log import OutageLog
from verification.rules import DeliveryKind
from verification.wording import WORDINGS
from voice.ivr import api as calls_api
from voice.ivr.voicemail_budget import Refusal
from voice.sip import flash_dialog, pool
from voice.sip.pool import WorkerState

DEFAULTS = Settings.from_env({})
V = DEFAULTS.verification
DOC = openapi_document()


def raw_section() -> str:
    return readme_text.section("The verification API")


def section() -> str:
    """The section, its line breaks and indents folded to single spaces."""
    return readme_text.folded("The verification API")


def _default(function: Any, name: str) -> Any:
    return inspect.signature(function).parameters[name].default


def _webhook_lease_s(timeout_s: float) -> float:
    """The lease of a webhook job as the sender takes it, with ``CLINIC_WEBHOOK_TIMEOUT_S``."""
    sender = webhooks.WebhookSender(
        store=cast(Any, None),
        client=cast(Any, None),
        callback_client=cast(Any, None),
        settings=dataclasses.replace(V, webhook_timeout_s=timeout_s),
        secret=b"s" * 32,
        clock=FakeClock(),
    )
    return sender._lease_s


# (what the README says, verbatim but for line breaks; the value in the code; the number it
# states). A changed constant fails here until the README says the new number.
NUMBERS = [
    ("may be at most 64 KiB", request.MAX_BODY, 64 * 1024),
    ("A body must be complete 10 s after its headers (408)", request.BODY_READ_S, 10),
    ("a connection is closed when idle for 20 s", http.KEEPALIVE_S, 20),
    ("(`CLINIC_LIMIT_AUTH_FAILURES`, 20 a minute by default", V.limit_auth_failures, Rate(20, 60)),
    ("An IPv6 client is counted by its /64 network", V.limit_ipv6_prefix, 64),
    ("still being made after 3 s of waiting for it", store.IDEMPOTENCY_WAIT_S, 3),
    (
        "`code_length` (4\N{EN DASH}8, default 6)",
        (
            codes.MIN_LENGTH,
            codes.MAX_LENGTH,
            parse_create({"phone": "+1"}, CHANNEL_ORDER).code_length,
            SCHEMAS["CreateVerification"]["properties"]["code_length"]["default"],
        ),
        (4, 8, 6, 6),
    ),
    ("`CLINIC_CODE_TTL_S` (10 min)", V.code_ttl_s, 600),
    ("stays in Redis a day after it expires", store.KEEP_AFTER_EXPIRY_S, 24 * 3600),
    ("`CLINIC_MAX_CHECKS` (5) wrong checks end it as `failed`", V.max_checks, 5),
    ("`CLINIC_STEP_TIMEOUT_VOICE_S` is at least 100 s", VOICE_CALL_S, 100),
    ("with `+447400`, 6 digits", cli_code_lengths("+447400"), (6,)),
    ("A stop waits up to 3 s for Redis to settle", dispatcher.STOP_SETTLE_S, 3),
    ("re-reads its verification every 2 s", dispatcher.WATCH_S, 2),
    (
        "every process's step timers wait 1 s after a failed poll",
        _default(timer_pause.TimerPause, "blip_s"),
        1,
    ),
    ("(two failed polls in a row)", timer_pause.OUTAGE_FAILURES, 2),
    ("until Redis has answered for 5 s", dispatcher.TIMERS_QUIET_S, 5),
    ("then every 30 s with how many attempts failed", _default(OutageLog, "every_s"), 30),
    ("`CLINIC_WEBHOOK_TIMEOUT_S` + 30 s when that is longer", _webhook_lease_s(45.0), 75),
    ("(after its lease: 60 s", _webhook_lease_s(5.0), 60),
    ("each process has at most 64 POSTs in flight", webhooks.MAX_IN_FLIGHT, 64),
    ("at most 8 of them to one origin", webhooks.PER_ORIGIN, 8),
    ("a job due for a busy origin waits 1 s", webhooks.ORIGIN_BUSY_S, 1),
    ("those whose last POST failed at most 32", webhooks.FAILING_SHARE, 32),
    ("together with those not heard from yet at most 48", webhooks.UNPROVEN_SHARE, 48),
    ("the other 16 are kept", webhooks.MAX_IN_FLIGHT - webhooks.UNPROVEN_SHARE, 16),
    ("(up to 8 times a poll)", webhooks.LEASE_ROUNDS, 8),
    (
        "up to 4096 origins, each for 10 minutes",
        (webhook_origins.LIMIT, webhook_origins.TTL_S),
        (4096, 600),
    ),
    ("default 6 retries", V.webhook_retries, 6),
    ("One that has not rung (no 180 or 183) within 20 s", flash_call.ANSWER_TIMEOUT_S, 20),
    (
        "within 32 s of the end and up to 16 phones a call",
        (flash_dialog.TIMER_B_S, flash_dialog.MAX_FORKS),
        (32, 16),
    ),
    ("no prompt ends within 30 s", voice_call.PLAY_TIMEOUT_S, 30),
    ("no 1 pressed after the question was asked twice", voice_call.KEYPRESS_TRIES, 2),
    ("code read twice", voice_call.READINGS, 2),
    (
        "within 35 s (pjsip's own transaction timeout is 32 s)",
        (SIP_MESSAGE_WAIT_S, flash_dialog.TIMER_B_S),
        (35, 32),
    ),
    (
        "the 64 connections the service keeps to one origin",
        _default(HttpClient, "max_per_origin"),
        64,
    ),
    ("`gateway timed out after 5 s`", DEFAULTS.sms.http_timeout_s, 5),
    ("(at most 8 s), each +-20 %", SMS_RETRY_JITTER, 0.2),
    ("the call slots (4 a worker)", SIP_CALLS_PER_WORKER, 4),
]


@pytest.mark.parametrize(("said", "value", "number"), NUMBERS, ids=[n[0] for n in NUMBERS])
def test_the_numbers_the_readme_states_are_the_codes(
    said: str, value: object, number: object
) -> None:
    assert said in section(), f"the README no longer says {said!r}"
    assert value == number, f"the README says {said!r}; the code has {value!r}"


def _code_problems() -> dict[str, int]:
    """Every problem slug the service answers, with its status."""
    found: dict[str, int] = {}
    classes: list[type[Any]] = [errors.VerificationError]
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        if cls is not errors.VerificationError:
            found[cls.slug] = cls.status
    for cls in vars(calls_api).values():
        if isinstance(cls, type) and hasattr(cls, "slug") and hasattr(cls, "status"):
            found.setdefault(cls.slug, cls.status)
    for status, (slug, _) in HTTP_SLUGS.items():
        found.setdefault(slug, status)
    found["not-ready"] = 503  # /readyz (clinic_voice/app.py)
    return found


def _readme_problems() -> dict[str, str]:
    text = raw_section()
    table = text[text.index("| slug | status | when |") :].split("\n\n")[0]
    rows = re.findall(r"^\| `([a-z-]+)` \| ([^|]+?) \|", table, re.MULTILINE)
    return dict(rows)


def test_each_problem_row_gives_the_status_the_code_answers() -> None:
    readme, code = _readme_problems(), _code_problems()
    assert readme.pop("http-error") == "other 4xx"
    assert set(readme) == set(code), "the README's problem table and the code differ"
    wrong = {s: (readme[s], code[s]) for s in readme if readme[s] != str(code[s])}
    assert not wrong, f"slug: (README, code) {wrong}"


def test_the_problem_type_uri_is_the_one_the_readme_gives() -> None:
    assert "`https://clinic-voice.example/problems/<slug>`" in section()
    assert errors.NotFound().type_uri == "https://clinic-voice.example/problems/not-found"


def test_the_number_refused_row_names_every_refused_kind() -> None:
    """The 403 row is what an app's error screen is built from: each kind the code refuses
    is named there, and in the rules' list."""
    row = next(line for line in raw_section().splitlines() if line.startswith("| `number-refused`"))
    names = {
        "premium_rate": "premium-rate",
        "shared_cost": "shared-cost",
        "uan": "UAN",
        "voicemail": "voicemail-access",
        "unknown": "unknown-type",
        "pager": "pager",
    }
    assert {k.value for k in REFUSED_KINDS} == set(names)
    missing = [name for name in names.values() if name not in row]
    assert not missing, f"the number-refused row does not name {missing}"


def test_statuses_and_event_types_are_the_codes() -> None:
    text = section()
    statuses = re.search(r"Statuses: ((?:`[a-z_]+`(?:, )?)+)\.", text)
    assert statuses is not None
    assert re.findall(r"`([a-z_]+)`", statuses.group(1)) == [s.value for s in Status]
    types = re.search(r"their types: ([^.]+)\.", text)
    assert types is not None
    assert re.findall(r"`([a-z_]+)`", types.group(1)) == [k.value for k in EventKind]
    assert 'as objects `{"type", "at", "channel", "detail"}`' in text
    assert list(SCHEMAS["Event"]["properties"]) == ["type", "at", "channel", "detail"]


def _names(braces: str) -> list[str]:
    return re.findall(r'"([a-z_]+)"', braces)


def test_the_answers_fields_are_those_the_readme_shows() -> None:
    text = raw_section()
    created = text[text.index("# -> 201 {") : text.index('"flashcall": {')]
    assert set(_names(created)) - {"pending"} == set(SCHEMAS["Verification"]["required"])
    flash = text[text.index('"flashcall": {') : text.index("}}", text.index('"flashcall": {'))]
    assert _names(flash)[1:] == SCHEMAS["FlashCall"]["required"]
    checked = text[text.index("# -> 200 {") :].splitlines()[0]
    assert set(_names(checked)) - {"approved", "pending", "failed", "expired"} == set(
        SCHEMAS["CheckResult"]["required"]
    )


def _resolve(schema: dict[str, Any]) -> Draft202012Validator:
    return Draft202012Validator({**schema, "components": DOC["components"]})


def _example_bodies() -> list[dict[str, Any]]:
    bodies = [json.loads(b) for b in re.findall(r"-d '(\{.*?\})'", raw_section())]
    assert len(bodies) >= 4, "the README's curl examples lost their bodies"
    return bodies


def test_the_curl_examples_bodies_are_requests_the_api_takes() -> None:
    bodies = _example_bodies()
    for body in bodies:
        name = (
            "CreateVerification" if "phone" in body else "Fallback" if "from" in body else "Check"
        )
        errs = list(_resolve(SCHEMAS[name]).iter_errors(body))
        assert not errs, f"{body}: {errs[0].message}"
        if name == "CreateVerification":
            # and the API's own parser takes it, with every channel and +447400 configured
            req = parse_create(body, CHANNEL_ORDER, flash_code_lengths=(6,))
            assert req.code_length == 6
        if name == "Fallback":
            assert parse_fallback(body) is Channel(body["from"])
    assert any("from" in b for b in bodies), "the fallback's example lost its body"


def test_the_curl_examples_paths_and_headers_are_routes() -> None:
    text = raw_section()
    calls = re.findall(r"curl -s (?:-X (\w+) )?\$API(/[^\s;]+)", text)
    assert len(calls) >= 9
    for method, path in calls:
        templ = path.replace("$ID", "{id}")
        assert templ in DOC["paths"], f"{path} is no route"
        assert (method or "GET").lower() in DOC["paths"][templ], f"{method} {path}"
    create = DOC["paths"]["/v1/verifications"]["post"]
    headers = {p["name"] for p in create["parameters"] if p["in"] == "header"}
    assert "Idempotency-Key" in headers and "-H 'Idempotency-Key: " in text


def test_the_default_plan_is_the_readmes_order() -> None:
    """ "method defaults to the first configured of flashcall, sms, voice that fallback does
    not name; fallback to the rest"."""
    assert [c.value for c in CHANNEL_ORDER] == ["flashcall", "sms", "voice"]
    assert parse_create({"phone": "+1"}, CHANNEL_ORDER).plan == CHANNEL_ORDER
    assert parse_create({"phone": "+1", "fallback": ["flashcall"]}, CHANNEL_ORDER).plan == (
        Channel.SMS,
        Channel.FLASHCALL,
    )


def test_an_unfit_code_length_drops_the_flash_call_or_is_422() -> None:
    """With +447400 only a 6-digit code makes a valid caller-ID: named, the flash call is a
    422; not named, the plan goes without it, but with nothing else configured it is a 422
    (not 503 no-channel: the service has a channel, the code length does not fit it)."""
    text = section()
    assert "without naming it, the plan goes without the flash call" in text
    assert "the only channel configured, that create is 422 naming `code_length` too" in text
    body = {"phone": "+447911123456", "code_length": 5}
    both = (Channel.FLASHCALL, Channel.SMS)
    assert parse_create(body, both, flash_code_lengths=(6,)).plan == (Channel.SMS,)
    for available, named in [(both, {"method": "flashcall"}), ((Channel.FLASHCALL,), {})]:
        with pytest.raises(errors.InvalidRequest) as refused:
            parse_create({**body, **named}, available, flash_code_lengths=(6,))
        assert refused.value.extra == {"field": "code_length"}


def test_a_region_that_is_not_the_numbers_country_is_invalid_number() -> None:
    text = section()
    assert "must have its country code, or 422 `invalid-number`" in text
    assert parse_phone("07911 123456", "GB").e164 == "+447911123456"
    with pytest.raises(errors.InvalidNumber):
        parse_phone("+447911123456", "NL")
    with pytest.raises(errors.InvalidRequest) as refused:
        parse_create({"phone": "07911 123456", "region": "gb"}, CHANNEL_ORDER)
    assert refused.value.extra == {"field": "region"}


def test_an_idempotency_key_is_1_to_255_visible_ascii_characters() -> None:
    """The format; that it is each API key's own: tests/integration/test_api_model.py."""
    assert "A key is 1 to 255 visible ASCII characters (422 `invalid-request` otherwise)" in (
        section()
    )
    fits = api._IDEMPOTENCY_KEY.fullmatch
    assert fits("signup-42") and fits("x" * 255) and fits("!~")
    assert not any(fits(k) for k in ("", "x" * 256, "has space", "ключ", "tab\t"))
    # and the document says the same, for clients generated from it
    (param,) = DOC["paths"]["/v1/verifications"]["post"]["parameters"]
    documented = _resolve(param["schema"]).is_valid
    assert documented("signup-42") and documented("x" * 255) and documented("!~")
    assert not any(documented(k) for k in ("", "x" * 256, "has space", "ключ", "tab\t"))


def test_webhook_backoff_is_the_readmes(monkeypatch: pytest.MonkeyPatch) -> None:
    """ "default 6 retries (1, 2, 4, 8, 16, 32 s apart)", each +-20 %, doubling up to 5
    minutes; at most 20 retries."""
    assert "(1, 2, 4, 8, 16, 32 s apart, each +-20 %, doubling up to 5 minutes)" in section()
    monkeypatch.setattr("verification.webhooks.random.uniform", lambda a, b: b)
    assert [webhooks.backoff_s(a) for a in range(1, 7)] == [1.2, 2.4, 4.8, 9.6, 19.2, 38.4]
    monkeypatch.setattr("verification.webhooks.random.uniform", lambda a, b: 1.0)
    assert [webhooks.backoff_s(a) for a in range(1, 7)] == [1, 2, 4, 8, 16, 32]
    assert webhooks.backoff_s(20) == 300
    assert "raise `CLINIC_WEBHOOK_RETRIES` (up to 20)" in section()
    assert Settings.from_env({"CLINIC_WEBHOOK_RETRIES": "20"}).verification.webhook_retries == 20
    with pytest.raises(SettingsError):
        Settings.from_env({"CLINIC_WEBHOOK_RETRIES": "21"})


def test_the_webhook_signature_is_the_readmes_formula() -> None:
    assert 'X-Clinic-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>' in section()
    assert webhooks.SIGNATURE_HEADER == "X-Clinic-Signature"
    mac = hmac.new(b"k", b"1700000000.{}", hashlib.sha256).hexdigest()
    assert webhooks.sign(b"k", 1700000000, b"{}") == f"t=1700000000,v1={mac}"


def test_sms_retry_pauses_and_retried_statuses_are_the_readmes() -> None:
    text = section()
    assert "A retry waits 0.5 s, then 1 s, 2 s ... (at most 8 s)" in text
    assert [SmsSettings.retry_pause_s(a) for a in range(1, 7)] == [0.5, 1, 2, 4, 8, 8]
    assert "4xx other than 408, 425 and 429 (those are retried" in text
    assert {408, 425, 429} == sms_http._RETRYABLE


def test_the_sms_text_is_the_readmes() -> None:
    said = re.search(r'\{"to": "\+44\.\.\.", "text": "([^"]+)"\}', section())
    assert said is not None
    assert WORDINGS["en"].sms_text("<clinic>", "123456") == said.group(1)


def test_the_voice_step_is_at_least_100_s() -> None:
    with pytest.raises(SettingsError):
        Settings.from_env({"CLINIC_STEP_TIMEOUT_VOICE_S": str(VOICE_CALL_S - 1)})
    assert Settings.from_env({"CLINIC_STEP_TIMEOUT_VOICE_S": "100"}).verification


def test_the_metrics_table_names_every_metric() -> None:
    text = raw_section()
    table = text[text.index("| metric | labels | counts |") :].split("\n\n")[0]
    rows = dict(re.findall(r"^\| `([a-z_]+)` \|([^|]*)\|", table, re.MULTILINE))
    metrics = Metrics()
    names = {m.name for m in vars(metrics).values() if isinstance(m, Counter | Gauge | Histogram)}
    assert set(rows) == names


def test_the_metrics_label_values_are_the_codes() -> None:
    """The values the README gives for a label are those the code sets: alerts and
    dashboards are written against them."""
    text = raw_section()
    table = text[text.index("| metric | labels | counts |") :].split("\n\n")[0]
    row = {
        name: rest
        for name, rest in re.findall(r"^\| `([a-z_]+)` \|[^|]*\|(.*)$", table, re.MULTILINE)
    }
    outcomes = set(re.findall(r'_on_outcome\("([a-z_]+)"\)', inspect.getsource(webhooks)))
    assert outcomes == {"delivered", "retry", "given_up", "dropped"}
    for value in outcomes:
        assert f"`{value}`" in row["clinic_webhooks_total"], value
    for kind in DeliveryKind:
        assert f"`{kind.value}`" in row["clinic_deliveries_total"], kind
    for status in Status:
        assert f"`{status.value}`" in row["clinic_verifications_total"], status
    for state in WorkerState:
        assert f"`{state.value}`" in row["clinic_sip_workers"], state
    for refusal in Refusal:
        assert f"`{refusal.value}`" in row["clinic_voicemail_refused_total"], refusal
    assert "restarted after a backoff of up to 5 s" in row["clinic_sip_workers"]
    assert pool._BACKOFF_MAX_S == 5


def _events_table() -> dict[str, tuple[str, str]]:
    """The README's events table: type -> (channel, detail)."""
    text = readme_text.README.read_text(encoding="utf-8")
    head = text.index("| type | `channel` | `detail` |")
    rows = {}
    for line in text[head:].splitlines()[2:]:
        if not line.startswith("| `"):
            break
        kind, channel, detail = (cell.strip() for cell in line.strip("|").split(" | ", 2))
        rows[kind.strip("`")] = (channel, detail)
    return rows


def test_the_events_table_says_every_detail_a_channel_reports() -> None:
    """The table of events' channel and detail has a row per event type, in the model's
    order, and every fixed wording a channel reports (``DeliveryReport(kind, "...")``) is in
    its type's row: the row of ``undeliverable`` lacked SMS over SIP's refusals, the voice
    call's "no answer", "call ended before the code" and "speech failed", and a channel not
    available. A check and an approval after the plan was used up (its codes still check)
    have no channel: their rows said "the current one"."""
    rows = _events_table()
    assert list(rows) == [k.value for k in EventKind]
    sources = [flash_call, sms_http, sms_sip, voice_call, dispatcher]
    said = re.compile(r'DeliveryReport\(\s*DeliveryKind\.(\w+),\s*(f?)"([^"]*)"', re.S)
    missing = []
    for module in sources:
        for kind, is_f, literal in said.findall(inspect.getsource(module)):
            parts = re.split(r"\{[^}]*\}", literal) if is_f else [literal]
            row = rows[DeliveryKind[kind].value][1]
            missing += [p.strip() for p in parts if len(p.strip()) > 3 and p.strip() not in row]
    assert missing == []
    for kind in ("check_failed", "approved"):
        assert "`null`" in rows[kind][0], f"{kind}: no word of its null channel"
