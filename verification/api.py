"""The verification HTTP API (``/v1/verifications``): parse, apply a rule, answer.

Handlers validate strictly (unknown fields, wrong types, non-ASCII digits: 422), count limits
before any send, and hand sends to the dispatcher in the background: a 201 never waits for a
call or an SMS.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from sip_config.clock import Clock
from sip_config.settings import Settings
from verification import callbacks, codes, entropy, limits, numbers, rules
from verification.dispatcher import Dispatcher
from verification.errors import (
    ChannelUnavailable,
    IdempotencyConflict,
    InvalidRequest,
    NoChannelConfigured,
    NotFound,
    StoreUnavailable,
)
from verification.model import CHANNEL_ORDER, Channel, FlashCallInfo, Policy, Verification
from verification.request import (
    KEY_ID,
    read_json_object,
    read_optional_json_object,
    self_admitted,
    take_request_checks,
    takes_body,
)
from verification.store import Stored, VerificationStore, body_hash
from verification.wire import iso, render_event

log = logging.getLogger(__name__)

_ID = re.compile(r"[A-Za-z0-9_-]{20,64}")
_LOCALE = re.compile(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8}){0,3}")
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
_CREATE_FIELDS = {"phone", "region", "method", "fallback", "code_length", "locale", "callback_url"}


def _json_response(body: dict[str, Any], status: int = 200) -> web.Response:
    # orjson: about five times faster than json.dumps for these bodies (every answer has one)
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def render(v: Verification, policy: Policy) -> dict[str, Any]:
    """The public JSON of a verification. Never holds a code or a code hash."""
    out: dict[str, Any] = {
        "id": v.id,
        "phone": v.phone.e164,
        "status": v.status,
        "channel": v.channel,
        "channels": list(v.channels),
        "attempts_left": rules.attempts_left(v, policy),
        "created_at": iso(v.created_at),
        "expires_at": iso(v.expires_at),
        "events": [render_event(e) for e in v.events],
    }
    if v.flashcall:
        out["flashcall"] = v.flashcall.to_json()
    return out


def _string(body: dict[str, Any], name: str, *, max_len: int, required: bool = False) -> str | None:
    if name not in body:
        if required:
            raise InvalidRequest(f"'{name}' is required", field=name)
        return None
    value = body[name]
    if not isinstance(value, str):
        raise InvalidRequest(f"'{name}' must be a string", field=name)
    if not value or len(value) > max_len:
        raise InvalidRequest(f"'{name}' must be 1..{max_len} characters", field=name)
    return value


def _channel(value: object, name: str) -> Channel:
    if not isinstance(value, str):
        raise InvalidRequest(f"'{name}' must be one of flashcall, sms, voice", field=name)
    try:
        return Channel(value)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be one of flashcall, sms, voice", field=name) from None


def parse_fallback(body: dict[str, Any] | None) -> Channel | None:
    """The channel a ``/fallback``'s optional body says the client saw (``from``), or None:
    no body, or none named (a move from wherever the verification is, as before)."""
    if body is None:
        return None
    unknown = sorted(set(body) - {"from"})
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(unknown)}", fields=unknown)
    return _channel(body["from"], "from") if "from" in body else None


@dataclass(frozen=True, slots=True)
class CreateRequest:
    phone: str
    region: str | None
    plan: tuple[Channel, ...]
    code_length: int
    locale: str
    callback_url: str


# What makes a channel available (the README's Configuration), for a 422's detail.
_CONFIGURED_BY = {
    Channel.FLASHCALL: "CLINIC_SIP_ROUTE and CLINIC_FLASHCALL_PREFIX",
    Channel.SMS: "CLINIC_SMS_HTTP_URL, or CLINIC_SMS_GATEWAY=sip and CLINIC_SIP_ROUTE",
    Channel.VOICE: "CLINIC_SIP_ROUTE",
}


def parse_create(
    body: dict[str, Any],
    available: tuple[Channel, ...],
    callback_networks: Sequence[callbacks.Network] = (),
    flash_code_lengths: tuple[int, ...] | None = None,
) -> CreateRequest:
    """``flash_code_lengths``: the code lengths that make CLINIC_FLASHCALL_PREFIX + code a
    valid number (None: any); a flash call with another length is not offered."""
    unknown = sorted(set(body) - _CREATE_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(unknown)}", fields=unknown)
    code_length = body.get("code_length", 6)
    if type(code_length) is not int or not codes.MIN_LENGTH <= code_length <= codes.MAX_LENGTH:
        raise InvalidRequest("'code_length' must be a whole number 4..8", field="code_length")
    phone = _string(body, "phone", max_len=numbers.MAX_INPUT_LENGTH, required=True)
    assert phone is not None
    region = _string(body, "region", max_len=numbers.MAX_INPUT_LENGTH)
    if region is not None and not numbers.is_region(region):
        raise InvalidRequest(
            "'region' must be a country's two capital letters (ISO 3166-1), such as NL",
            field="region",
        )
    method = _channel(body["method"], "method") if "method" in body else None
    fallback: tuple[Channel, ...] | None = None
    if "fallback" in body:
        raw = body["fallback"]
        if not isinstance(raw, list) or len(raw) > len(Channel):
            raise InvalidRequest("'fallback' must be a list of channels", field="fallback")
        fallback = tuple(_channel(c, "fallback") for c in raw)
    # Only where a flash call could be sent at all: one not configured is channel-unavailable.
    unfit = (
        flash_code_lengths is not None
        and code_length not in flash_code_lengths
        and Channel.FLASHCALL in available
    )
    named = Channel.FLASHCALL in (method, *(fallback or ()))
    if unfit and (named or (method is None and available == (Channel.FLASHCALL,))):
        # The caller-ID would be no valid number: blocked or shown as "unknown" by many
        # networks, while the call still rings and counts as delivered.
        fits = " or ".join(str(n) for n in flash_code_lengths or ())
        raise InvalidRequest(
            f"a flash call's caller-ID is a valid number only with a {fits}-digit code here"
            f" (CLINIC_FLASHCALL_PREFIX): 'code_length' {code_length} cannot be sent by"
            " flash call",
            field="code_length",
        )
    if unfit:  # not asked for by name: the default plan goes without it
        available = tuple(c for c in available if c is not Channel.FLASHCALL)
    if method is None:
        if not available:
            raise NoChannelConfigured(
                "configure an SMS gateway (CLINIC_SMS_HTTP_URL) or a SIP route "
                "(CLINIC_SIP_ROUTE; flash calls need CLINIC_FLASHCALL_PREFIX too)"
            )
        # The first configured channel the fallback list does not name.
        free = [c for c in available if fallback is None or c not in fallback]
        if not free:
            raise InvalidRequest(
                "'fallback' names every configured channel: give 'method' too", field="method"
            )
        method = free[0]
    if fallback is None:
        fallback = tuple(c for c in CHANNEL_ORDER if c != method and c in available)
    plan = (method, *fallback)
    if len(set(plan)) != len(plan):
        raise InvalidRequest("a channel appears twice in method and fallback", field="fallback")
    missing = [c for c in plan if c not in available]
    if missing:
        raise ChannelUnavailable(
            "not configured here: "
            + ", ".join(f"{c.value} ({_CONFIGURED_BY[c]})" for c in missing),
            available=[c.value for c in available],
        )
    locale = _string(body, "locale", max_len=35) or "en"
    if not _LOCALE.fullmatch(locale):
        raise InvalidRequest("'locale' must be a language tag such as en or nl-NL", field="locale")
    callback = _string(body, "callback_url", max_len=2048) or ""
    if callback:
        try:
            callbacks.check_callback_url(callback, callback_networks)
        except callbacks.CallbackRefused as exc:
            raise InvalidRequest(f"'callback_url' {exc}", field="callback_url") from None
    return CreateRequest(phone, region, plan, code_length, locale, callback)


class VerificationApi:
    """Handlers for ``/v1/verifications``."""

    def __init__(
        self,
        *,
        settings: Settings,
        policy: Policy,
        store: Callable[[], VerificationStore],
        dispatcher: Callable[[], Dispatcher],
        secret: Callable[[], bytes],
        clock: Clock,
        previous_secrets: tuple[bytes, ...] = (),
    ) -> None:
        self._settings = settings
        self._vs = settings.verification
        self._policy = policy
        self._store = store
        self._dispatcher = dispatcher
        self._secret = secret
        self._previous = previous_secrets  # codes sent before the secret changed still check
        self._clock = clock

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/verifications", self.create),
            web.get("/v1/verifications/{id}", self.get),
            web.post("/v1/verifications/{id}/check", self.check),
            web.post("/v1/verifications/{id}/fallback", self.fallback),
            web.delete("/v1/verifications/{id}", self.cancel),
        ]

    def _available(self) -> tuple[Channel, ...]:
        chans = self._dispatcher().channels
        return tuple(c for c in CHANNEL_ORDER if c in chans)

    @staticmethod
    def _vid(request: web.Request) -> str:
        vid = request.match_info["id"]
        if not _ID.fullmatch(vid):
            raise NotFound("no such verification")
        return vid

    async def _count(self, checks: list[limits.LimitCheck]) -> None:
        decision = await self._store().hit_limits(checks, self._clock.now())
        decision.enforce()

    async def _admit_and_get(self, request: web.Request) -> Stored:
        """Count the request-level limits and read the verification: one round trip."""
        vid = self._vid(request)
        decision, stored = await self._store().admit_and_get(
            take_request_checks(request), self._clock.now(), vid
        )
        decision.enforce()
        if stored is None:
            raise NotFound(f"no verification {vid}")
        return stored

    @self_admitted
    @takes_body
    async def create(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        flash_prefix = self._settings.sip.flashcall_prefix
        req = parse_create(
            body,
            self._available(),
            self._vs.callback_networks,
            numbers.cli_code_lengths(flash_prefix) if flash_prefix else None,
        )
        phone = numbers.parse_phone(req.phone, req.region)
        numbers.enforce_policy(phone, self._vs.allowed_countries)
        idem_header = request.headers.get("Idempotency-Key")
        idempotency: tuple[str, str] | None = None
        client = request.get(KEY_ID, "")
        if idem_header is not None:
            if not _IDEMPOTENCY_KEY.fullmatch(idem_header):
                raise InvalidRequest("Idempotency-Key must be 1..255 visible ASCII characters")
            # The same JSON is the same request, whatever its key order and whitespace.
            same = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
            idempotency = (f"{client}:{body_hash(idem_header.encode())}", body_hash(same))
            try:
                replay = await self._store().get_idempotent(idempotency)
            except NotFound:
                replay = None
            if replay is not None:  # a request: the edge counts it (its checks are not taken)
                return self._json(replay, 201, replayed=True)
        # The first send is counted with the create, all or nothing, so an over-limit number
        # is refused with 429 and no verification exists; later sends are counted by the
        # dispatcher. For an idempotent request, only by the try that makes the verification:
        # concurrent retries of one request do not use up the number's limit.
        own = take_request_checks(request)
        vid = entropy.token_urlsafe(24)  # 192 bits
        sip = self._settings.sip
        flash = None
        if Channel.FLASHCALL in req.plan and sip.flashcall_prefix:
            flash = FlashCallInfo(
                cli_prefix=sip.flashcall_prefix,
                code_length=req.code_length,
                cli_filter=numbers.cli_filter(sip.flashcall_prefix, req.code_length, phone),
                interception_timeout_s=sip.flashcall_interception_s,
            )
        transition = rules.create(
            verification_id=vid,
            phone=phone,
            plan=req.plan,
            code_length=req.code_length,
            now=self._clock.now(),
            policy=self._policy,
            flashcall=flash,
            locale=req.locale,
            callback_url=req.callback_url,
            client=client,
        )
        checks = own + limits.creation_checks(self._vs, phone)
        if transition.send is not None:  # a plan of skipped steps fails at once, sending nothing
            checks += limits.send_checks(self._vs, phone)
        code: str | None = None
        if transition.send is not None and self._dispatcher().sends_here(transition.send):
            # The first send's code is made now, so that one write stores the verification
            # and the code's HMAC (rules.code_sent: the HMAC is stored before the code leaves)
            # instead of a second write by the dispatcher. Not for a send another process
            # makes (an HTTP worker's SIP sends): the code never leaves the process that sends.
            created = transition.verification
            code = codes.new_code(created.code_length)
            digest = codes.code_hash(self._secret(), vid, code)
            sent = rules.code_sent(created, created.step, digest, created.created_at)
            transition = rules.Transition(sent.verification, send=transition.send)
        try:
            stored = await self._store().create(
                transition, idempotency, checks=checks, now=self._clock.now()
            )
        except IdempotencyConflict:
            await self._count(own)
            raise
        except StoreUnavailable:
            # 503, but the write may still land: the dispatcher settles it (cancels it, or
            # sends for an idempotent retry) once the store answers again.
            self._dispatcher().settle_unconfirmed(
                transition, replayable=idempotency is not None, code=code
            )
            raise
        v = stored.verification
        if v.id != vid:  # a concurrent request with the same key made it: a replay
            await self._count(own)
            return self._json(v, 201, replayed=True)
        log.info("verification %s: created (%s)", vid, ",".join(req.plan))
        self._dispatcher().follow(transition, counted=True, known=stored, code=code)
        return self._json(v, 201)

    @self_admitted
    async def get(self, request: web.Request) -> web.Response:
        stored = await self._admit_and_get(request)
        return self._json(stored.verification)

    @self_admitted
    @takes_body
    async def check(self, request: web.Request) -> web.Response:
        vid = self._vid(request)
        body = await read_json_object(request)
        unknown = sorted(set(body) - {"code", "cli"})
        if unknown:
            raise InvalidRequest(f"unknown field(s): {', '.join(unknown)}", fields=unknown)
        if ("code" in body) == ("cli" in body):
            raise InvalidRequest("give exactly one of 'code' or 'cli'")
        stored = await self._admit_and_get(request)
        v0 = stored.verification
        secret = self._secret()
        candidate: str | None
        if "code" in body:
            code = _string(body, "code", max_len=16)
            assert code is not None
            if not codes.is_code_syntax(code, v0.code_length):
                raise InvalidRequest(f"'code' must be {v0.code_length} ASCII digits", field="code")
            candidate = code
        else:
            cli = _string(body, "cli", max_len=64)
            assert cli is not None
            if v0.flashcall is None:
                raise InvalidRequest("this verification has no flash call", field="cli")
            # The characters of the forms cli_filter matches: anything else (brackets, dots)
            # is the app's to strip, and a 422 tells it so; counted as a wrong check, it
            # would spend one of the patient's attempts on a right code.
            if not cli.isascii() or not re.fullmatch(r"[+0-9 -]+", cli):
                raise InvalidRequest(
                    "'cli' must be the caller-ID as flashcall.cli_filter matches it: digits,"
                    " with a leading + and spaces or dashes between them",
                    field="cli",
                )
            # A caller-ID that is not ours counts as a wrong check (None never matches); a
            # run of separators in it is read as one (numbers.collapse_separators).
            candidate = numbers.code_from_cli(
                cli, v0.flashcall.cli_prefix, v0.flashcall.code_length, v0.phone
            )
        now = self._clock.now()

        def change(v: Verification) -> tuple[rules.Transition, rules.CheckAnswer]:
            matched = candidate is not None and codes.matches(
                secret, vid, candidate, v.code_hashes, self._previous
            )
            return rules.check(v, matched, now, self._policy)  # one attempt, whatever was tried

        _, answer = await self._store().update(vid, change, known=stored)
        log.info("verification %s: check -> %s", vid, answer.status)
        return _json_response(
            {"id": vid, "status": answer.status.value, "attempts_left": answer.attempts_left}
        )

    @self_admitted
    @takes_body
    async def fallback(self, request: web.Request) -> web.Response:
        self._vid(request)
        moving_from = parse_fallback(await read_optional_json_object(request))
        stored = await self._admit_and_get(request)
        vid = stored.verification.id
        now = self._clock.now()
        seen = stored.verification.step
        # The send is counted with the move, and only if this request moves it: a request
        # that lost the race to the step timer (or answers 409) counts nothing. ``from`` is
        # checked in the change, on the record the write is made against (a compare-and-set
        # on its version): a check on the read above could pass for two requests at once.
        transition, _, written = await self._store().update_stored(
            vid,
            lambda v: (
                rules.request_fallback(
                    v, self._clock.now(), self._policy, seen, moving_from=moving_from
                ),
                None,
            ),
            known=stored,
            checks=limits.send_checks(self._vs, stored.verification.phone),
            now=now,
        )
        self._dispatcher().follow(transition, counted=True, known=written)
        return self._json(transition.verification)

    @self_admitted
    async def cancel(self, request: web.Request) -> web.Response:
        stored = await self._admit_and_get(request)
        vid = stored.verification.id
        transition, _ = await self._store().update(
            vid, lambda v: (rules.cancel(v, self._clock.now()), None), known=stored
        )
        log.info("verification %s: canceled", vid)
        return self._json(transition.verification)

    def _json(self, v: Verification, status: int = 200, *, replayed: bool = False) -> web.Response:
        resp = _json_response(render(v, self._policy), status=status)
        if status == 201:
            resp.headers["Location"] = f"/v1/verifications/{v.id}"
        if replayed:
            resp.headers["Idempotent-Replayed"] = "true"
        return resp
