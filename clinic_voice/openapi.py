"""The OpenAPI 3.1 description of every route (``GET /openapi.json``).

Kept true by a test that validates every response the test suite sees against it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any

_ISO = {"type": "string", "format": "date-time"}
_CHANNEL = {"type": "string", "enum": ["flashcall", "sms", "voice"]}
# GET /v1/calls's cursor (voice/ivr/cursor.py): a start, and the id of the call listed last
_CURSOR = "^[0-9]{1,12}(\\.[0-9]{1,17})?(~[A-Za-z0-9_-]{1,64})?$"
_STATUS = {"type": "string", "enum": ["pending", "approved", "failed", "expired", "canceled"]}
_EVENT_TYPES = [
    "requested",
    "skipped",
    "dispatched",
    "ringing",
    "answered",
    "delivered",
    "undeliverable",
    "send_refused",
    "fallback",
    "check_failed",
    "approved",
    "failed",
    "expired",
    "canceled",
]


def _problem_ref() -> dict[str, Any]:
    return {
        "description": "An error (RFC 9457)",
        "content": {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        },
    }


def _json(ref: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


# The header fields an error answer carries (README: "The verification API"), beside 429's.
_ERROR_HEADERS: dict[int, dict[str, Any]] = {
    401: {
        "WWW-Authenticate": {
            "description": "the scheme to authenticate with: Bearer",
            "required": True,
            "schema": {"type": "string"},
        }
    },
    405: {
        "Allow": {
            "description": "the methods the route takes",
            "required": True,
            "schema": {"type": "string"},
        }
    },
    415: {
        "Accept": {
            "description": "the media type to send (when the body's Content-Type was "
            "refused): application/json",
            "schema": {"type": "string"},
        },
        "Accept-Encoding": {
            "description": "the content codings taken (when the body's coding was refused)",
            "schema": {"type": "string"},
        },
    },
}


def _errors(*codes: int) -> dict[str, Any]:
    out = {str(c): _problem_ref() for c in codes}
    for code, headers in _ERROR_HEADERS.items():
        if code in codes:
            out[str(code)]["headers"] = headers
    if 429 in codes:
        out["429"]["headers"] = {
            "Retry-After": {
                "description": "seconds until the limit lets this request through",
                "required": True,
                "schema": {"type": "integer", "minimum": 1},
            }
        }
    return out


_ID_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{20,64}$"},
}

# 400, 431, 501 and 505: requests that are not HTTP/1.1 (clinic_voice.http.ProblemRequestHandler
# and refuse_request_line)
# Every /v1 route; 403: a right key of the other kind (call records or verification API).
_COMMON = (400, 401, 403, 404, 405, 408, 413, 415, 417, 422, 429, 431, 500, 501, 503, 505)
# Every route without a key (/healthz, /readyz, /metrics, /openapi.json): what the HTTP edge
# answers on any path (a body sent anyway is read to the same rules; an Expect other than
# 100-continue; not HTTP/1.1), a method the route does not take, and a bug.
_EDGE = (400, 405, 408, 413, 415, 417, 431, 500, 501, 505)

SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object",
        "required": ["type", "title", "status"],
        "properties": {
            "type": {"type": "string", "format": "uri"},
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string"},
            "field": {"type": "string", "description": "invalid-request: the field at fault"},
            "fields": {
                "type": "array",
                "items": {"type": "string"},
                "description": "invalid-request: the unknown fields",
            },
            "reason": {"type": "string", "description": "number-refused: why"},
            "accepted": {
                "type": "array",
                "items": {"type": "string"},
                "description": "unsupported-media-type: the content codings taken",
            },
            "available": {
                "type": "array",
                "items": _CHANNEL,
                "description": "channel-unavailable: the channels configured here",
            },
            "channel": {
                "anyOf": [_CHANNEL, {"type": "null"}],
                "description": "not-on-channel: the verification's current channel (null: its "
                "plan is used up)",
            },
            "verification_status": {
                **_STATUS,
                "description": "not-pending: the verification's status",
            },
            "retry_after": {
                "type": "integer",
                "minimum": 1,
                "description": "rate-limited, idempotency-key-in-progress, "
                "call-in-progress: seconds, as in Retry-After",
            },
            "checks": {"type": "object", "description": "not-ready: each readiness check"},
        },
    },
    "Event": {
        "type": "object",
        "additionalProperties": False,
        "required": ["type", "at", "channel", "detail"],
        "properties": {
            "type": {"type": "string", "enum": _EVENT_TYPES},
            "at": _ISO,
            "channel": {
                "anyOf": [_CHANNEL, {"type": "null"}],
                "description": "the channel the event concerns (README, events table): for "
                "requested the one tried first, null when the number can take none of the plan",
            },
            "detail": {"type": "string", "description": "for people, not for parsing"},
        },
    },
    "FlashCall": {
        "type": "object",
        "additionalProperties": False,
        "required": ["cli_prefix", "code_length", "cli_filter", "interception_timeout_s"],
        "properties": {
            "cli_prefix": {"type": "string", "pattern": "^\\+[1-9][0-9]{0,13}$"},
            "code_length": {"type": "integer", "minimum": 4, "maximum": 8},
            "cli_filter": {"type": "string", "format": "regex"},
            "interception_timeout_s": {"type": "integer", "minimum": 1},
        },
    },
    "Verification": {
        "type": "object",
        "additionalProperties": False,
        "required": [
            "id",
            "phone",
            "status",
            "channel",
            "channels",
            "attempts_left",
            "created_at",
            "expires_at",
            "events",
        ],
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Za-z0-9_-]{20,64}$"},
            "phone": {"type": "string", "pattern": "^\\+[1-9][0-9]{1,14}$"},
            "status": _STATUS,
            "channel": {
                "anyOf": [_CHANNEL, {"type": "null"}],
                "description": "the current step's; null once the plan is used up (nothing "
                "more is sent; the codes sent still check until expires_at)",
            },
            "channels": {"type": "array", "items": _CHANNEL, "minItems": 1},
            "attempts_left": {"type": "integer", "minimum": 0},
            "created_at": _ISO,
            "expires_at": _ISO,
            "events": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}},
            "flashcall": {"$ref": "#/components/schemas/FlashCall"},
        },
    },
    "WebhookEvent": {
        "type": "object",
        "additionalProperties": False,
        "required": ["verification_id", "status", "channel", "event"],
        "properties": {
            "verification_id": {"type": "string", "pattern": "^[A-Za-z0-9_-]{20,64}$"},
            "status": {**_STATUS, "description": "the verification's, right after the event"},
            "channel": {
                "anyOf": [_CHANNEL, {"type": "null"}],
                "description": "the verification's, right after the event",
            },
            "event": {"$ref": "#/components/schemas/Event"},
        },
    },
    "CreateVerification": {
        "type": "object",
        "additionalProperties": False,
        "required": ["phone"],
        "properties": {
            "phone": {
                "type": "string",
                "minLength": 1,
                "maxLength": 32,
                "description": "E.164, or national with region",
            },
            "region": {
                "type": "string",
                "pattern": "^[A-Z]{2}$",
                "description": "ISO country of a national number; with a + number it must "
                "share its country code (422 otherwise)",
            },
            "method": _CHANNEL,
            "fallback": {"type": "array", "items": _CHANNEL, "maxItems": 3},
            "code_length": {"type": "integer", "minimum": 4, "maximum": 8, "default": 6},
            "locale": {"type": "string", "maxLength": 35},
            "callback_url": {"type": "string", "format": "uri", "maxLength": 2048},
        },
    },
    "Check": {
        "type": "object",
        "additionalProperties": False,
        "oneOf": [{"required": ["code"]}, {"required": ["cli"]}],
        "properties": {
            "code": {"type": "string", "pattern": "^[0-9]{4,8}$"},
            "cli": {"type": "string", "maxLength": 64, "pattern": "^[+0-9 -]+$"},
        },
    },
    "Fallback": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "from": {
                **_CHANNEL,
                "description": "the channel the client saw the verification on",
            },
        },
    },
    "CheckResult": {
        "type": "object",
        "additionalProperties": False,
        "required": ["id", "status", "attempts_left"],
        "properties": {
            "id": {"type": "string"},
            # a check of a canceled or approved verification is a 409 (codes are single use)
            "status": {"type": "string", "enum": ["pending", "approved", "failed", "expired"]},
            "attempts_left": {"type": "integer", "minimum": 0},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"type": "string"},
            "checks": {"type": "object"},
            "warming": {"type": "array", "items": {"type": "string"}},
        },
    },
    "CallList": {
        "type": "object",
        "required": ["calls"],
        "properties": {
            "calls": {"type": "array", "items": {"$ref": "#/components/schemas/Call"}},
            "next": {
                "anyOf": [{"type": "string", "pattern": _CURSOR}, {"type": "null"}],
                "description": "the cursor of the next page: the start and id of the last "
                "call read for this page (its last call, unless needs_call_back=true left "
                "calls out); null when no call is left",
            },
            "waiting_on_disk": {
                "type": "integer",
                "minimum": 0,
                "description": "call records kept on disk because Redis did not take them "
                "(an outage), or left by a serve that died during their calls: not in this "
                "list until Redis takes them (tried every 30 s); above 0, the list is "
                "incomplete. Includes records that do not open with the service's keys, "
                "which wait for the operator. Absent when the service runs no clinic line.",
            },
        },
    },
    "Call": {
        "type": "object",
        "additionalProperties": False,
        "required": [
            "id",
            "caller",
            "called",
            "started_at",
            "ended_at",
            "flow",
            "path",
            "values",
            "triage",
            "transfer_target",
            "outcome",
            "call_back",
            "handled_at",
        ],
        "properties": {
            "id": {"type": "string"},
            "caller": {"type": "string"},
            "caller_verified": {
                "type": "boolean",
                "description": "true: a trusted PBX or trunk (CLINIC_SIP_TRUSTED_PEERS) "
                "asserted caller in P-Asserted-Identity; false: caller is the From the caller "
                "wrote, which anyone can forge (direct mode). Absent from records saved before "
                "the field existed.",
            },
            "called": {"type": "string"},
            "started_at": _ISO,
            "ended_at": _ISO,
            "flow": {"type": "string"},
            "path": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["flow", "node", "input", "value", "confidence"],
                    "properties": {
                        "flow": {"type": "string"},
                        "node": {"type": "string"},
                        "input": {"type": "string"},
                        "value": {"type": "string"},
                        "confidence": {"anyOf": [{"type": "number"}, {"type": "null"}]},
                    },
                },
            },
            "values": {"type": "object", "additionalProperties": {"type": "string"}},
            "triage": {
                "anyOf": [
                    {"type": "null"},
                    {
                        "type": "object",
                        "required": ["urgency", "reasons", "action"],
                        "properties": {
                            "urgency": {"enum": ["U0", "U1", "U2", "U3", "U4", "U5"]},
                            "reasons": {"type": "array", "items": {"type": "string"}},
                            "action": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                            "urgency_meaning": {
                                "type": "string",
                                "description": "the urgency in words, e.g. U2: 'urgent: a "
                                "nurse or doctor now'",
                            },
                        },
                    },
                ]
            },
            "transfer_target": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "outcome": {"type": "string"},
            "call_back": {
                "anyOf": [{"type": "string"}, {"type": "null"}],
                "description": "why the clinic should call this caller back, in words (an "
                "urgent caller no human took, a message left, a transfer nobody answered, a "
                "call cut off, a message a flow recorded such as a prescription renewal, ...); "
                "null when a human or the flow took care of the call",
            },
            "handled_at": {
                "anyOf": [_ISO, {"type": "null"}],
                "description": "when staff marked the call handled (PUT "
                "/v1/calls/{id}/handled); null while it is not",
            },
        },
    },
}

_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]


def _paths() -> dict[str, Any]:
    vid = [_ID_PARAM]
    call_id = [
        {
            "name": "id",
            "in": "path",
            "required": True,
            "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
        }
    ]
    return {
        "/v1/verifications": {
            "post": {
                "summary": "Start a verification",
                "security": _BEARER,
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "description": "1 to 255 visible ASCII characters (422 otherwise)",
                        "schema": {"type": "string", "pattern": "^[!-~]{1,255}$"},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/CreateVerification"}
                        }
                    },
                },
                "responses": {
                    "201": {
                        **_json("Verification", "Created (or replayed)"),
                        "headers": {
                            "Location": {
                                "required": True,
                                "schema": {"type": "string"},
                                "description": "the verification's URL",
                            },
                            "Idempotent-Replayed": {
                                "schema": {"type": "string", "enum": ["true"]},
                                "description": "present when an Idempotency-Key replayed it",
                            },
                        },
                    },
                    **_errors(*_COMMON),
                    "409": {
                        **_problem_ref(),
                        "description": "The first request with this Idempotency-Key is still "
                        "being made",
                        "headers": {
                            "Retry-After": {
                                "required": True,
                                "schema": {"type": "integer", "minimum": 1},
                            }
                        },
                    },
                },
            }
        },
        "/v1/verifications/{id}": {
            "get": {
                "summary": "Read a verification",
                "security": _BEARER,
                "parameters": vid,
                "responses": {
                    "200": _json("Verification", "The verification"),
                    **_errors(*_COMMON),
                },
            },
            "delete": {
                "summary": "Cancel a verification",
                "security": _BEARER,
                "parameters": vid,
                "responses": {"200": _json("Verification", "Canceled"), **_errors(409, *_COMMON)},
            },
        },
        "/v1/verifications/{id}/check": {
            "post": {
                "summary": "Check a code or a flash call's caller-ID",
                "security": _BEARER,
                "parameters": vid,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Check"}}
                    },
                },
                "responses": {"200": _json("CheckResult", "The result"), **_errors(409, *_COMMON)},
            }
        },
        "/v1/verifications/{id}/fallback": {
            "post": {
                "summary": "Move to the next channel now",
                "description": "With a body naming the channel the client saw (`from`), only "
                "from that channel: when the verification is on another (it moved on since "
                "the client read it), 409 not-on-channel naming the current one, and nothing "
                "changes; of concurrent requests with one `from`, one moves it. Without a "
                "body, from whatever channel it is on.",
                "security": _BEARER,
                "parameters": vid,
                "requestBody": {
                    "required": False,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Fallback"}}
                    },
                },
                "responses": {
                    "200": _json("Verification", "Moved on"),
                    **_errors(*_COMMON),
                    "409": {
                        **_problem_ref(),
                        "description": "not-pending; no-channel-left; not-on-channel: the "
                        "verification is not on `from` (`channel` names the one it is on)",
                    },
                },
            }
        },
        "/v1/calls": {
            "get": {
                "summary": "Recent clinic-line calls, newest first",
                "security": _BEARER,
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "description": "the 'next' of the previous page: the start and id "
                        "of its last call (a start alone, as given out before, is still taken: "
                        "that page repeats the calls of that start rather than skip one)",
                        "schema": {
                            "type": "string",
                            "pattern": _CURSOR,
                        },
                    },
                    {
                        "name": "needs_call_back",
                        "in": "query",
                        "description": "true: only the calls the clinic still owes a call "
                        "back (call_back set, handled_at null), up to 'limit' of them among "
                        "at most 500 calls read for the page: a page may hold "
                        "fewer, even none, with a 'next' that goes on after the last call "
                        "read; follow 'next' until it is null. Keep it on every page.",
                        "schema": {"type": "string", "enum": ["true", "false"], "default": "false"},
                    },
                ],
                "responses": {"200": _json("CallList", "A page of calls"), **_errors(*_COMMON)},
            }
        },
        "/v1/calls/{id}": {
            "get": {
                "summary": "Read a call record",
                "security": _BEARER,
                "parameters": call_id,
                "responses": {"200": _json("Call", "The call"), **_errors(*_COMMON)},
            },
            "delete": {
                "summary": "Erase a call: its record, voicemail and copies on disk (GDPR)",
                "description": "Gone from the API at once, and not brought back by a record "
                "kept on disk; from the embedded Redis's append-only file at its next rewrite "
                "(asked for within minutes, at most a day). 404: nothing of the call is known "
                "(never was, or past its retention). Repeating an erasure answers 204 again "
                "for the retention period and finishes what a 500 erasure-incomplete left.",
                "security": _BEARER,
                "parameters": call_id,
                "responses": {
                    "204": {"description": "Erased"},
                    **_errors(*_COMMON),
                    "409": {
                        **_problem_ref(),
                        "description": "call-in-progress: the call is still under way; "
                        "erase it once it has ended",
                        "headers": {
                            "Retry-After": {
                                "required": True,
                                "schema": {"type": "integer", "minimum": 1},
                            }
                        },
                    },
                },
            },
        },
        "/v1/calls/{id}/handled": {
            "put": {
                "summary": "Mark a call handled (its call back made, its message dealt with)",
                "description": "Sets handled_at to now, or keeps the time of an earlier mark. "
                "The mark lives as long as the record and goes with an erasure. 404: no record "
                "of the call in Redis (never was, past its retention, erased, still under way, "
                "or its record waits on disk until Redis takes it: waiting_on_disk). 500 "
                "internal, as to GET /v1/calls/{id}: the record does not open with the "
                "service's keys; nothing is marked.",
                "security": _BEARER,
                "parameters": call_id,
                "responses": {"200": _json("Call", "The call, marked"), **_errors(*_COMMON)},
            },
            "delete": {
                "summary": "Mark a call not handled after all",
                "security": _BEARER,
                "parameters": call_id,
                "responses": {"200": _json("Call", "The call, unmarked"), **_errors(*_COMMON)},
            },
        },
        "/v1/calls/{id}/voicemail": {
            "get": {
                "summary": "The message the caller left (404 when none, past retention or erased; "
                "500 voicemail-unreadable when it is there but does not open)",
                "security": _BEARER,
                "parameters": call_id,
                "responses": {
                    "200": {
                        "description": "WAV, 8 kHz 16-bit mono (health data: not cached)",
                        "content": {"audio/wav": {}},
                    },
                    **_errors(*_COMMON),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness",
                "responses": {"200": _json("Health", "Alive"), **_errors(*_EDGE)},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness (Redis, channels, SIP workers, HTTP worker processes)",
                "responses": {
                    "200": _json("Health", "Ready"),
                    **_errors(*_EDGE),
                    "503": _problem_ref(),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (the sum over the service's HTTP processes)",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format, version 0.0.4",
                        "content": {"text/plain": {}},
                    },
                    **_errors(*_EDGE),
                    "503": _problem_ref(),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {
                    "200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}},
                    "304": {"description": "Not modified: If-None-Match names the ETag served"},
                    **_errors(*_EDGE),
                },
            }
        },
    }


def _with_head(paths: dict[str, Any]) -> dict[str, Any]:
    """Every GET route also answers HEAD (aiohttp adds it, as RFC 9110 asks of a server): the
    same statuses and headers, and no body."""
    out = {}
    for template, item in paths.items():
        get = item.get("get")
        if get is not None:
            head = {k: v for k, v in get.items() if k != "responses"}
            head["summary"] = f"{get['summary']}: the headers of GET, without the body"
            head["responses"] = {
                code: {k: v for k, v in response.items() if k != "content"}
                for code, response in get["responses"].items()
            }
            out[template] = {**item, "head": head}
        else:
            out[template] = item
    return out


# What a verification's callback_url (or CLINIC_WEBHOOK_URL) is sent: one POST per event
# (verification.webhooks), so that a receiver can be built from the document too.
_WEBHOOKS = {
    "verificationEvent": {
        "post": {
            "summary": "One event of a verification (at least once, in no set order)",
            "parameters": [
                {
                    "name": "X-Clinic-Signature",
                    "in": "header",
                    "required": True,
                    "description": 'hex HMAC-SHA256(webhook key, "<t>." + body); reject a t'
                    " older than five minutes",
                    "schema": {"type": "string", "pattern": "^t=[0-9]+,v1=[0-9a-f]{64}$"},
                }
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/WebhookEvent"}}
                },
            },
            "responses": {
                "2XX": {"description": "Delivered"},
                "410": {"description": "Gone: given up at once, not retried"},
                "default": {"description": "Failed: retried with backoff"},
            },
        }
    }
}


def openapi_document(extra_paths: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole document."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "clinic-voice",
            "version": "0.1.0",
            "description": (
                "Phone verification (flash call, SMS, voice) and the clinic line's call records."
                " Every request under /v1/ needs Authorization: Bearer <key>: without a right"
                " key it is answered 401, on a path or method listed here or not (404 and 405"
                " only with a right key)."
            ),
        },
        "servers": [{"url": "/"}],
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": _with_head({**_paths(), **(extra_paths or {})}),
        "webhooks": _WEBHOOKS,
    }


@dataclass(frozen=True, slots=True)
class ServedDocument:
    """The document as ``GET /openapi.json`` sends it: its JSON and that JSON's strong ETag
    (RFC 9110 8.8.3, quotes included)."""

    body: bytes
    etag: str


@functools.cache
def served_document() -> ServedDocument:
    """The served document, built once per process: it depends on no setting and no request,
    and building and serialising it took about 2 ms of a loop step at every request."""
    body = json.dumps(openapi_document()).encode()
    return ServedDocument(body, f'"{hashlib.sha256(body).hexdigest()[:32]}"')
