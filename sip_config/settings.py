"""One frozen, validated settings object built from ``CLINIC_*`` environment variables.

Every variable is listed in :data:`VARIABLES` with its default and meaning; the README's
configuration table is generated from that list and a test keeps the two in step. Parsing is
strict: a bad value stops the service at start with a message naming the variable.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import urllib.parse
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import phonenumbers

from verification.numbers import cli_code_lengths
from voice.ivr.opening_hours import OpeningHours, always_open, parse_closed_dates, parse_week
from voice.sip.caller_identity import IpNetwork, parse_trusted_peers

T = TypeVar("T")

# CLINIC_PREVIOUS_SECRETS: a record sealed under none of the secrets (damaged) costs one
# failed AES-GCM tag check per secret: ~2.4 us for a call record, ~0.24 ms for a minute of
# voicemail (1.9 MB), so 17 keys bound it at ~40 us and ~4 ms (in a thread). Ten yearly
# rotations within the longest retention (3650 days) fit.
MAX_PREVIOUS_SECRETS = 16


class SettingsError(ValueError):
    """A ``CLINIC_*`` variable has a value the service cannot use."""


@dataclass(frozen=True, slots=True)
class Variable:
    """One documented environment variable."""

    name: str
    default: str
    meaning: str


VARIABLES: tuple[Variable, ...] = (
    # -- service ---------------------------------------------------------------------------
    Variable("CLINIC_HTTP_ADDR", "127.0.0.1:8080", "HTTP listen address (host:port)"),
    Variable(
        "CLINIC_HTTP_WORKERS",
        "1",
        "HTTP API processes sharing CLINIC_HTTP_ADDR, 1..64; the first also runs SIP and the "
        "clinic line, the others hand their SIP sends to it; set it to the number of cores "
        "for the API's full speed",
    ),
    Variable(
        "CLINIC_DATA_DIR",
        "./var",
        "where the service keeps its own files; one serve per data dir (a second one on it "
        "refuses to start: give each its own, with the same CLINIC_SECRET and keys, to run "
        "several on one host, or use CLINIC_HTTP_WORKERS)",
    ),
    Variable(
        "CLINIC_REDIS_URL",
        "",
        "a Redis 7.0 or later to use (redis://, rediss://, unix://); unset means embedded: "
        "the service starts and supervises its own redis-server (unix socket in the data dir, "
        "append-only file with fsync on every write) and stops it on exit",
    ),
    Variable(
        "CLINIC_REDIS_APPENDFSYNC",
        "always",
        "the embedded Redis's fsync: always (an answered write is on disk) or everysec (faster; "
        "about the last second of answered writes, approvals included, can be lost to a "
        "power cut; logged as a warning at every start); for a CLINIC_REDIS_URL Redis, set "
        "appendfsync in that Redis instead",
    ),
    Variable(
        "CLINIC_API_KEYS",
        "",
        "comma-separated bearer keys, each 16+ characters of A-Z a-z 0-9 . _ ~ + / = -; "
        "unset: one is generated on first start into $CLINIC_DATA_DIR/api-key (mode 0600)",
    ),
    Variable(
        "CLINIC_CALLS_API_KEYS",
        "",
        "bearer keys (as CLINIC_API_KEYS) for the clinic's own staff: only these read call "
        "records and voicemail (/v1/calls, health data), and they serve nothing else; unset: "
        "one is generated on first start into $CLINIC_DATA_DIR/calls-api-key (mode 0600)",
    ),
    Variable(
        "CLINIC_SECRET",
        "",
        "key for hashing codes, sealing call records and voicemail, and signing webhooks (at "
        "least 32 characters); unset: generated once into $CLINIC_DATA_DIR/secret",
    ),
    Variable(
        "CLINIC_PREVIOUS_SECRETS",
        "",
        f"comma-separated secrets that CLINIC_SECRET replaced, newest first (of any length, "
        f"as a secret in use may be; at most {MAX_PREVIOUS_SECRETS}; one with a comma cannot "
        "be listed): "
        "pending verifications' codes still check, and call records, voicemail and records "
        "kept on disk sealed under one still open; nothing new is hashed or sealed with them. "
        "Keep them until clinic-voice secret reseal has run and the verifications pending "
        "at the change have ended (CLINIC_CODE_TTL_S), else CLINIC_CALL_RETENTION_DAYS after "
        'the change (README: "Changing the secret")',
    ),
    Variable(
        "CLINIC_NAME",
        "the clinic",
        "the clinic's name, used in SMS and spoken codes (1..40 printable characters)",
    ),
    Variable("CLINIC_LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR"),
    Variable(
        "CLINIC_TRUSTED_PROXIES",
        "",
        "comma-separated proxy addresses whose X-Forwarded-For is believed for per-IP limits",
    ),
    # -- verification rules ---------------------------------------------------------------
    Variable("CLINIC_CODE_TTL_S", "600", "lifetime of a verification in seconds (60..3600)"),
    Variable("CLINIC_MAX_CHECKS", "5", "wrong checks that end a verification as failed (1..100)"),
    Variable("CLINIC_MAX_SENDS", "5", "sends (all channels) allowed per verification (1..10)"),
    Variable(
        "CLINIC_ALLOWED_COUNTRIES",
        "",
        "comma-separated ISO country codes (e.g. NL,BE); unset allows every country",
    ),
    Variable(
        "CLINIC_LIMIT_NUMBER_VERIFICATIONS",
        "5/600",
        "new verifications per phone number, as COUNT/SECONDS",
    ),
    Variable("CLINIC_LIMIT_NUMBER_SENDS", "5/600", "sends per phone number, as COUNT/SECONDS"),
    Variable(
        "CLINIC_LIMIT_PREFIX_SENDS",
        "200/3600",
        "sends per number prefix (country code plus leading digits), as COUNT/SECONDS: "
        "a guard against SMS pumping",
    ),
    Variable(
        "CLINIC_LIMIT_PREFIX_DIGITS",
        "4",
        "national digits after the country code that make a prefix for the prefix limit (1..8)",
    ),
    Variable("CLINIC_LIMIT_KEY_REQUESTS", "100000/60", "API requests per API key, COUNT/SECONDS"),
    Variable(
        "CLINIC_LIMIT_IP_REQUESTS",
        "100000/60",
        "API requests per client IP (an IPv6 client: per network, see "
        "CLINIC_LIMIT_IPV6_PREFIX), COUNT/SECONDS",
    ),
    Variable(
        "CLINIC_LIMIT_AUTH_FAILURES",
        "20/60",
        "wrong API keys presented per client IP (an IPv6 client: per network, see "
        "CLINIC_LIMIT_IPV6_PREFIX), as COUNT/SECONDS: once COUNT were presented, the address "
        "gets 429 for every /v1 request with a key, a right one too, from every process, until "
        "the window ends",
    ),
    Variable(
        "CLINIC_LIMIT_IPV6_PREFIX",
        "64",
        "an IPv6 client is counted by its network of this prefix length in the per-IP limits "
        "(32..128; a site is handed at least a /64 and could take a new address for every "
        "request; 128 counts each address, for a host that hands out less than a /64)",
    ),
    Variable(
        "CLINIC_STEP_TIMEOUT_FLASHCALL_S",
        "",
        "seconds a flash-call step may take before falling back, 5..900 (default: ring time "
        "plus interception window plus 10)",
    ),
    Variable(
        "CLINIC_STEP_TIMEOUT_SMS_S",
        "120",
        "seconds an SMS step waits before falling back (10..900); with the HTTP gateway it must"
        " be longer than one send can take, every attempt timing out (CLINIC_SMS_HTTP_TIMEOUT_S"
        " times 1 + CLINIC_SMS_HTTP_RETRIES, plus the pauses between them), with the SIP"
        " gateway longer than 35 s (a MESSAGE's wait for its answer), or serve refuses to start",
    ),
    Variable(
        "CLINIC_STEP_TIMEOUT_VOICE_S",
        "120",
        "seconds a voice-call step waits before falling back (100..900: a call may ring 45 s,"
        " ask for 1 twice with 8 s waits and read the code twice, about 95 to 105 s; a shorter"
        " step would move on, and hang up, while the code is read; serve warns at its start"
        " when the prompts it rendered need more: a long CLINIC_NAME, a slower"
        " CLINIC_TTS_WORDS_PER_MINUTE)",
    ),
    Variable(
        "CLINIC_WEBHOOK_URL",
        "",
        "global webhook: every event of the verifications created without a `callback_url`"
        " (one with it goes there instead)",
    ),
    Variable(
        "CLINIC_WEBHOOK_SECRET",
        "",
        "key (at least 32 characters) that signs the verification webhooks, so that their "
        "receivers need not hold CLINIC_SECRET, which also opens the call records; unset: "
        "CLINIC_SECRET signs them",
    ),
    Variable(
        "CLINIC_CALLBACK_NETWORKS",
        "",
        "comma-separated networks (e.g. 10.20.0.0/16) a verification's callback_url may reach "
        "besides public addresses; unset: public addresses only (the cloud's metadata address, "
        "loopback and private networks are refused)",
    ),
    Variable(
        "CLINIC_WEBHOOK_TIMEOUT_S", "5", "seconds before a webhook POST counts as failed (0.1..60)"
    ),
    Variable("CLINIC_WEBHOOK_RETRIES", "6", "retries of a failed webhook, with backoff (0..20)"),
    # -- SMS --------------------------------------------------------------------------------
    Variable("CLINIC_SMS_GATEWAY", "http", "http (POST to CLINIC_SMS_HTTP_URL) or sip (MESSAGE)"),
    Variable(
        "CLINIC_SMS_HTTP_URL",
        "",
        "the HTTP SMS gateway; unset disables the SMS channel when CLINIC_SMS_GATEWAY is http",
    ),
    Variable("CLINIC_SMS_HTTP_TOKEN", "", "bearer token sent to the HTTP SMS gateway"),
    Variable("CLINIC_SMS_HTTP_TIMEOUT_S", "5", "seconds per HTTP SMS gateway attempt (0.1..60)"),
    Variable("CLINIC_SMS_HTTP_RETRIES", "2", "retries of a failed HTTP SMS send (0..10)"),
    # -- SIP ----------------------------------------------------------------------------------
    Variable(
        "CLINIC_SIP_ADDR",
        "127.0.0.1:5060",
        "where the service listens for SIP (UDP and TCP); workers listen on the next ports, "
        "and flash calls leave from the port after them",
    ),
    Variable(
        "CLINIC_SIP_WORKERS",
        "4",
        "SIP worker processes, 1..512 (each holds at most 4 calls, the pjsua2 wheel's limit, "
        "and takes about 33 MB)",
    ),
    Variable(
        "CLINIC_SIP_CALLER_SLOTS",
        "",
        "call slots kept for people phoning the clinic line: a verification call on the "
        "workers (voice code; flash call over TCP or TLS) takes a slot only when this many "
        "stay free after it, counted on the workers that are up; callers may take every "
        "slot. 0..4 x CLINIC_SIP_WORKERS; 0: first come, first served; unset: "
        "CLINIC_SIP_WORKERS (a quarter of the slots)",
    ),
    Variable(
        "CLINIC_SIP_ROUTE",
        "",
        "URI template for everything the service sends: {e164}, {digits}, {national}; "
        "e.g. sip:{e164}@127.0.0.1:5080; unset disables the SIP channels",
    ),
    Variable(
        "CLINIC_SIP_REGISTRAR", "", "a PBX to register the workers to, e.g. sip:127.0.0.1:5160"
    ),
    Variable(
        "CLINIC_SIP_TRUSTED_PEERS",
        "",
        "comma-separated addresses or networks (10.0.0.5, 10.0.0.0/24) of the PBX or trunk "
        "whose P-Asserted-Identity is believed: a clinic-line call from one of them that "
        "carries that header has its number asserted (caller_verified true in the call "
        "record and the scheduling webhook); every other caller's number, the From the "
        "caller wrote, is only claimed (false). Unset: no number is verified, as in direct "
        "mode, where a caller can write any From. A network wider than an IPv4 /8 or an "
        "IPv6 /32 (`0.0.0.0/0`, `::/0`) is accepted, and logged as a WARNING at start naming "
        "this setting: every sender there could assert any number",
    ),
    Variable(
        "CLINIC_SIP_USER",
        "",
        "user for registration and digest auth at the PBX; unset: the workers present "
        "themselves as clinic",
    ),
    Variable(
        "CLINIC_SIP_PASSWORD",
        "",
        "password for digest auth at the PBX (also to a challenge in a call, a REFER "
        "answered 401 or 407, behind CLINIC_SIP_REGISTRAR only: in direct mode a call's "
        "far end may be anyone)",
    ),
    Variable(
        "CLINIC_SIP_REALM",
        "",
        "the only digest realm whose 401 or 407 challenges are answered with "
        "CLINIC_SIP_PASSWORD (flash calls, SIP MESSAGEs, the workers' registration and "
        'calls), the text between the quotes of realm="...", compared as pjsip compares '
        "it: ASCII letters ignoring case (Asterisk matches asterisk), the rest exactly; a "
        "challenge of another realm fails as one without credentials does. Unset: any "
        "realm is answered. Setting it to the PBX's realm is recommended: "
        "sip_config/asterisk sets none, so Asterisk challenges with its default_realm, "
        "`asterisk`",
    ),
    Variable(
        "CLINIC_FLASHCALL_PREFIX",
        "",
        "caller-ID prefix of flash calls in E.164 (e.g. +447400); the code digits follow it; "
        "unset disables the flash-call channel",
    ),
    Variable(
        "CLINIC_FLASHCALL_RING_S",
        "3",
        "seconds a flash call rings before it is cancelled (0.5..60)",
    ),
    Variable(
        "CLINIC_FLASHCALL_INTERCEPTION_S",
        "20",
        "seconds the app should watch for the flash call, 1..300 (told to it in the start "
        "response)",
    ),
    Variable(
        "CLINIC_VOICE_OTP_KEYPRESS",
        "1",
        "1: a voice-code call asks the callee to press 1 before reading the code; 0: reads at once",
    ),
    Variable(
        "CLINIC_VOICE_OTP_FROM",
        "",
        "caller-ID of voice-code calls and SMS over SIP (E.164); unset: CLINIC_SIP_USER, or clinic",
    ),
    # -- clinic line ---------------------------------------------------------------------------
    Variable(
        "CLINIC_FLOWS_DIR",
        "ivr_flows",
        "folder of the IVR flows and routes.yaml, for `serve` and as the default of `flow "
        "check` and `flow simulate` (a relative path is taken from the working directory)",
    ),
    Variable(
        "CLINIC_VOSK_MODEL",
        "",
        "path of the folder a vosk model unpacks to (`am/`, `conf/`, `graph/`); unset: keypad "
        "only; a path that is no such folder, or a damaged model, refuses the start (exit 2)",
    ),
    Variable(
        "CLINIC_VOSK_LANGUAGE",
        "en",
        "language of that model (en, ko, ...): flows in other languages run keypad-only, in "
        "`serve` and in `flow simulate --speech`",
    ),
    Variable(
        "CLINIC_TTS_WORDS_PER_MINUTE",
        "175",
        "how fast the spoken prompts and voice codes are said, 80..300 words a minute "
        "(espeak-ng's own speed is 175; 140-160 suits older and hard-of-hearing callers "
        "better, and makes every prompt longer); a change renders every prompt anew",
    ),
    Variable(
        "CLINIC_STAFF_URI",
        "sip:6200@127.0.0.1:5160",
        "where 0 (staff) transfers to; a sip: or sips: URI with a host (one without, such as "
        "sip: or sip:6200@, refuses the start: exit 2, as for CLINIC_NURSE_URI and "
        "CLINIC_SIP_REGISTRAR)",
    ),
    Variable("CLINIC_NURSE_URI", "sip:6100@127.0.0.1:5160", "where urgent triage transfers to"),
    Variable(
        "CLINIC_EMERGENCY_NUMBER",
        "112",
        "the emergency number the bot tells callers (2..15 digits), read out digit by digit",
    ),
    Variable(
        "CLINIC_OPENING_HOURS",
        "",
        "when the staff desk is open, e.g. `mon-fri 08:00-12:30,13:30-17:00; sat 09:00-12:00` "
        "(groups split by ;, days mon..sun as mon, mon-fri or mon,wed, ranges HH:MM-HH:MM "
        "split by , and ending before their last minute, 24:00 ends a day; a day in no group "
        "is closed); unset: always open. Closed, nobody is put through to staff: callers are "
        "told the practice is closed, its hours, CLINIC_OUT_OF_HOURS_NUMBER and the emergency "
        'number (README: "Opening hours")',
    ),
    Variable(
        "CLINIC_CLOSED_DATES",
        "",
        "comma-separated dates (YYYY-MM-DD, e.g. 2026-12-25,2026-12-26) on which the desk is "
        "closed all day, whatever CLINIC_OPENING_HOURS says",
    ),
    Variable(
        "CLINIC_NURSE_HOURS",
        "",
        "when the nurse line is staffed, as CLINIC_OPENING_HOURS (the same syntax, read in "
        "CLINIC_TIMEZONE; CLINIC_CLOSED_DATES does not apply: a nurse line may be staffed on "
        "holidays); unset: always. Out of them a transfer to the nurse is not rung: it fails "
        "at once, and the safety rules for a failed nurse transfer act straight away (a "
        "CLINIC_NURSE_URI that is CLINIC_STAFF_URI is rung as before; README: "
        '"Opening hours")',
    ),
    Variable(
        "CLINIC_TIMEZONE",
        "",
        "IANA time zone (e.g. Europe/Amsterdam) of the opening hours, the nurse's hours, the "
        "closed dates and "
        "the date a date of birth is checked against; unset: the host's local zone (TZ, else "
        "/etc/localtime, else UTC)",
    ),
    Variable(
        "CLINIC_OUT_OF_HOURS_NUMBER",
        "",
        "the number callers are told to ring when the practice is closed, for what cannot "
        "wait until it opens (the out-of-hours GP service; 2..15 digits, a + first if need be, "
        "groups split by a space or -, read out digit by digit); unset: no number is told",
    ),
    Variable(
        "CLINIC_SCHEDULING_WEBHOOK",
        "",
        "URL the flows' `webhook` steps (appointment requests) post to, signed as webhooks "
        "are; `http://` to a host other than loopback is warned at start (the body holds what "
        "callers entered)",
    ),
    Variable(
        "CLINIC_SCHEDULING_WEBHOOK_SECRET",
        "",
        "key (at least 32 characters) that signs the posts to CLINIC_SCHEDULING_WEBHOOK; "
        "unset: CLINIC_SECRET signs them",
    ),
    Variable("CLINIC_CALL_RETENTION_DAYS", "30", "days call records are kept (1..3650)"),
    Variable(
        "CLINIC_VOICEMAIL_MIN_FREE_MB",
        "1024",
        "MiB the data dir keeps free of voicemail (0..1048576): a message is recorded only "
        "when, written at its longest, at least this much stays free for the embedded Redis "
        'and the call records (a full disk stops them: README "A full or read-only disk"); '
        "else the caller is put through to a human, as for a message that could not be saved. "
        "A data dir whose whole file system is smaller than this and one message is warned of "
        "at start (every message would be refused)",
    ),
    Variable(
        "CLINIC_VOICEMAIL_MAX_MB",
        "4096",
        "MiB all voicemail messages may take together (1..1048576; a minute of message takes "
        "2.5 MiB sealed); past it, no new message is recorded until the retention sweep or "
        "erasures free room. Below one message of the longest a call may record (a flow's "
        "record step, or the 60 s message after a failed transfer: 3) serve refuses to start "
        "(exit 2)",
    ),
    Variable(
        "CLINIC_VOICEMAIL_PER_CALLER_DAY",
        "5",
        "messages one calling number may leave in 24 hours (0..1000; 0: no limit); callers "
        "that withhold their number (no digit in it: anonymous) are not counted, as nothing "
        "tells them apart (CLINIC_VOICEMAIL_MAX_MB holds them); counted in Redis, by every "
        "`serve` on it together, across restarts (under a keyed digest of the number, never "
        "the number); not applied while Redis is down",
    ),
    Variable(
        "CLINIC_CALL_DRAIN_S",
        "20",
        "on a stop (SIGTERM), how long calls in progress may go on (0..3600 s; new calls get "
        "503 from the stop's start); then each caller still on the line is told the line "
        "closes, with the emergency number, and the call ends (outcome `cut_shutdown`); a "
        "second SIGTERM or SIGINT ends this wait at once",
    ),
    Variable(
        "CLINIC_TRANSFER_SUMMARY",
        "urgency",
        "what a transfer tells the target's phone, in clear SIP headers that also pass the "
        "caller's side of the call (its phone, or the PBX): `urgency` (X-Clinic-Urgency, and "
        "X-Clinic-Call, the call record's id), `full` (also X-Clinic-Summary: the triage's "
        "reasons and every answer collected, which is health data) or `none` (X-Clinic-Call "
        "only)",
    ),
)

_DEFAULTS = {v.name: v.default for v in VARIABLES}
# Values that are credentials (a Redis URL may carry a password) and so never appear in errors.
_SECRET_NAMES = frozenset(
    {
        "CLINIC_SECRET",
        "CLINIC_PREVIOUS_SECRETS",
        "CLINIC_API_KEYS",
        "CLINIC_CALLS_API_KEYS",
        "CLINIC_REDIS_URL",
        "CLINIC_SMS_HTTP_TOKEN",
        "CLINIC_SIP_PASSWORD",
        "CLINIC_WEBHOOK_SECRET",
        "CLINIC_SCHEDULING_WEBHOOK_SECRET",
    }
)


@dataclass(frozen=True, slots=True)
class Rate:
    """A limit: at most ``count`` events per ``window_s`` seconds."""

    count: int
    window_s: int

    def __str__(self) -> str:
        return f"{self.count}/{self.window_s}"


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class VerificationSettings:
    code_ttl_s: int
    max_checks: int
    max_sends: int
    allowed_countries: frozenset[str]
    limit_number_verifications: Rate
    limit_number_sends: Rate
    limit_prefix_sends: Rate
    limit_prefix_digits: int
    limit_key_requests: Rate
    limit_ip_requests: Rate
    limit_auth_failures: Rate
    step_timeout_flashcall_s: int
    step_timeout_sms_s: int
    step_timeout_voice_s: int
    webhook_url: str
    webhook_timeout_s: float
    webhook_retries: int
    callback_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    limit_ipv6_prefix: int = 64
    webhook_secret: str = ""  # "" means CLINIC_SECRET signs the webhooks


# The shortest voice-call step: a call may ring 45 s, ask for 1 twice (a question of about
# 5 s, then 8 s) and read the code twice (12 to 16 s each with 0.7 s between its digits, at
# the default speech rate): about 95 to 105 s. A move to the next step hangs the call up
# (verification/dispatcher.py), so the step must outlast it: serve measures the prompts it
# renders at start and warns when it does not (clinic_voice.wiring.voice_step_too_short).
# Not raised with the digits' gap: a setting that started serve must not stop it.
VOICE_CALL_S = 100
# Calls one SIP worker holds: PJSUA_MAX_CALLS of the pjsua2 wheel, voice.sip.pjsua.MAX_CALLS
# (a test keeps the two equal: a worker does not import this module, which loads phonenumbers).
SIP_CALLS_PER_WORKER = 4
# How long an SMS over SIP waits for its MESSAGE's final answer: past pjsip's own 32 s
# (RFC 3261 Timer F), which answers 408 itself (verification/channels/sms_sip.py).
SIP_MESSAGE_WAIT_S = 35.0
SMS_RETRY_JITTER = 0.2  # each pause between HTTP SMS attempts is its nominal length +-20 %


@dataclass(frozen=True, slots=True)
class SmsSettings:
    gateway: str  # "http" or "sip"
    http_url: str
    http_token: str
    http_timeout_s: float
    http_retries: int

    @staticmethod
    def retry_pause_s(attempt: int) -> float:
        """The nominal pause before HTTP SMS attempt ``attempt`` (1 for the first retry):
        0.5 s, 1 s, 2 s ... capped at 8 s."""
        return min(8.0, 0.5 * 2.0 ** (attempt - 1))

    @property
    def http_budget_s(self) -> float:
        """The longest one HTTP SMS send can take: every attempt timing out, every pause at
        its longest."""
        pauses = sum(self.retry_pause_s(a) for a in range(1, self.http_retries + 1))
        attempts = self.http_retries + 1
        return attempts * self.http_timeout_s + pauses * (1 + SMS_RETRY_JITTER)


@dataclass(frozen=True, slots=True)
class SipSettings:
    addr: HostPort
    workers: int
    route: str
    registrar: str
    user: str
    password: str
    flashcall_prefix: str  # E.164 with "+", or "" when the channel is off
    flashcall_ring_s: float
    flashcall_interception_s: int
    voice_otp_keypress: bool
    voice_otp_from: str
    # Slots a verification call may not take (CLINIC_SIP_CALLER_SLOTS): kept for callers.
    caller_slots: int
    # The only digest realm answered (CLINIC_SIP_REALM); "": any realm.
    realm: str = ""
    # CLINIC_SIP_TRUSTED_PEERS: where an INVITE's P-Asserted-Identity is believed.
    trusted_peers: tuple[IpNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class IvrSettings:
    flows_dir: Path
    vosk_model: Path | None
    vosk_language: str
    staff_uri: str
    nurse_uri: str
    emergency_number: str
    scheduling_webhook: str
    call_retention_days: int
    call_drain_s: float
    transfer_summary: str  # "none", "urgency" or "full"
    scheduling_webhook_secret: str = ""  # "" means CLINIC_SECRET signs its posts
    # CLINIC_OPENING_HOURS, CLINIC_CLOSED_DATES and CLINIC_TIMEZONE: when staff can be reached.
    hours: OpeningHours = field(default_factory=lambda: always_open(datetime.UTC))
    hours_set: bool = False  # CLINIC_OPENING_HOURS or CLINIC_CLOSED_DATES given
    out_of_hours_number: str = ""  # as given ("088 123 45 67"), "" none
    # CLINIC_NURSE_HOURS in CLINIC_TIMEZONE (no closed dates): when the nurse line is staffed.
    nurse_hours: OpeningHours = field(default_factory=lambda: always_open(datetime.UTC))
    nurse_hours_set: bool = False  # CLINIC_NURSE_HOURS given
    # CLINIC_VOICEMAIL_*: the voicemail's budget (voice/ivr/voicemail_budget.py), in bytes.
    voicemail_min_free_bytes: int = 1024 * 1024 * 1024
    voicemail_max_bytes: int = 4096 * 1024 * 1024
    voicemail_per_caller_day: int = 5


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the service is told by its environment, validated once at start."""

    http_addr: HostPort
    http_workers: int
    data_dir: Path
    redis_url: str  # "" means embedded
    redis_appendfsync: str  # the embedded Redis's appendfsync: "always" or "everysec"
    api_keys: tuple[str, ...]  # () means "generate into the data dir"
    calls_api_keys: tuple[str, ...]  # the same; only these read /v1/calls
    secret: str  # "" means "generate into the data dir"
    clinic_name: str
    log_level: str
    trusted_proxies: frozenset[str]
    verification: VerificationSettings
    sms: SmsSettings
    sip: SipSettings
    ivr: IvrSettings
    # CLINIC_TTS_WORDS_PER_MINUTE: how fast every prompt is spoken (voice.media.tts).
    tts_words_per_minute: int = 175
    # CLINIC_PREVIOUS_SECRETS, in the order given: tried after the secret, never used to make
    previous_secrets: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build and validate from ``env`` (default: ``os.environ``)."""
        return _build(_Reader(os.environ if env is None else env))


def flows_dir_from_env(env: Mapping[str, str] | None = None) -> Path:
    """CLINIC_FLOWS_DIR as ``serve`` reads it, without the other settings.

    ``flow check`` and ``flow simulate`` use it: they need no valid service configuration (no
    SIP or SMS settings), but must look where ``serve`` would. A misspelt ``CLINIC_*`` name is
    still a :class:`SettingsError`: a ``CLINIC_FLOW_DIR`` would otherwise be ignored silently.
    """
    return _flows_dir(_Reader(os.environ if env is None else env))


def _flows_dir(r: _Reader) -> Path:
    return Path(r.raw("CLINIC_FLOWS_DIR"))


@dataclass(frozen=True, slots=True)
class FlowPreview:
    """What ``flow simulate`` reads of the environment, each as ``serve`` reads it: the
    transfers' targets and the emergency number it shows are then the ones callers get."""

    staff_uri: str
    nurse_uri: str
    emergency_number: str
    clinic_name: str
    transfer_summary: str
    hours: OpeningHours = field(default_factory=lambda: always_open(datetime.UTC))
    out_of_hours_number: str = ""
    nurse_hours: OpeningHours = field(default_factory=lambda: always_open(datetime.UTC))
    # The speech model's language (CLINIC_VOSK_LANGUAGE): with --speech, flows in another
    # language run keypad-only, as in serve.
    speech_language: str = "en"


def flow_preview_from_env(env: Mapping[str, str] | None = None) -> FlowPreview:
    """:class:`FlowPreview` from the environment (:class:`SettingsError` naming a bad value,
    or a misspelt ``CLINIC_*`` name); no other setting needs to be valid."""
    r = _Reader(os.environ if env is None else env)
    return FlowPreview(
        staff_uri=r.parse("CLINIC_STAFF_URI", _sip_uri),
        nurse_uri=r.parse("CLINIC_NURSE_URI", _sip_uri),
        emergency_number=r.parse("CLINIC_EMERGENCY_NUMBER", _digits),
        clinic_name=r.parse("CLINIC_NAME", _clinic_name),
        transfer_summary=r.parse("CLINIC_TRANSFER_SUMMARY", _transfer_summary),
        hours=_hours(r),
        out_of_hours_number=r.parse("CLINIC_OUT_OF_HOURS_NUMBER", _phone_digits),
        nurse_hours=_nurse_hours(r),
        speech_language=r.parse("CLINIC_VOSK_LANGUAGE", _language),
    )


def _hours(r: _Reader) -> OpeningHours:
    zone = r.parse("CLINIC_TIMEZONE", _zone)
    closed = r.parse("CLINIC_CLOSED_DATES", parse_closed_dates)
    if not r.raw("CLINIC_OPENING_HOURS"):
        return always_open(zone, closed)
    return OpeningHours(r.parse("CLINIC_OPENING_HOURS", parse_week), zone, closed)


def _nurse_hours(r: _Reader) -> OpeningHours:
    """CLINIC_NURSE_HOURS, parsed as CLINIC_OPENING_HOURS is and read in the same zone. No
    closed dates: the desk's holidays are not the nurse line's (an on-call nurse may be
    staffed on Christmas Day), and a line taken for unstaffed fails every urgent transfer."""
    zone = r.parse("CLINIC_TIMEZONE", _zone)
    if not r.raw("CLINIC_NURSE_HOURS"):
        return always_open(zone)
    return OpeningHours(r.parse("CLINIC_NURSE_HOURS", parse_week), zone)


def _zone(value: str) -> datetime.tzinfo:
    if not value:
        return host_zone()
    try:
        return zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        # Also a Debian without tzdata: every name is unknown there (make install adds it).
        raise ValueError("expected an IANA time zone such as Europe/Amsterdam") from None


def host_zone() -> datetime.tzinfo:
    """The host's local zone with its DST rules (not today's fixed offset): ``TZ``, else
    ``/etc/localtime``, else ``datetime.UTC`` itself (that object only here: ``serve`` warns
    that the opening hours are then read in UTC)."""
    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            return zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            pass  # a POSIX TZ string ("CET-1CEST"), not lost: /etc/localtime is read next
    try:
        with open("/etc/localtime", "rb") as f:
            return zoneinfo.ZoneInfo.from_file(f, key="localtime")
    except (OSError, ValueError):
        return datetime.UTC


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env
        unknown = sorted(k for k in env if k.startswith("CLINIC_") and k not in _DEFAULTS)
        if unknown:
            raise SettingsError(f"unknown setting(s): {', '.join(unknown)} (see the README)")

    def given(self, name: str) -> bool:
        """Whether the environment sets ``name`` (to anything, even its default)."""
        return name in self._env

    def raw(self, name: str) -> str:
        value = self._env.get(name)
        if value is None:
            return _DEFAULTS[name]
        return value.strip()

    def parse(self, name: str, conv: Callable[[str], T]) -> T:
        value = self.raw(name)
        try:
            return conv(value)
        except (ValueError, TypeError) as exc:
            # The message goes to stderr and the journal: never echo a key or a password.
            shown = "<hidden>" if name in _SECRET_NAMES else repr(value)
            raise SettingsError(f"{name}={shown}: {exc}") from None

    def integer(self, name: str, lo: int, hi: int) -> int:
        def conv(v: str) -> int:
            if not re.fullmatch(r"[0-9]+", v):
                raise ValueError("expected a whole number")
            n = int(v)
            if not lo <= n <= hi:
                raise ValueError(f"expected {lo}..{hi}")
            return n

        return self.parse(name, conv)

    def number(self, name: str, lo: float, hi: float) -> float:
        def conv(v: str) -> float:
            if not re.fullmatch(r"[0-9]+(\.[0-9]+)?", v):
                raise ValueError("expected a number of seconds")
            n = float(v)
            if not lo <= n <= hi:
                raise ValueError(f"expected {lo}..{hi}")
            return n

        return self.parse(name, conv)

    def boolean(self, name: str) -> bool:
        def conv(v: str) -> bool:
            low = v.lower()
            if low in {"1", "true", "yes", "on"}:
                return True
            if low in {"0", "false", "no", "off"}:
                return False
            raise ValueError("expected 1/0, true/false, yes/no or on/off")

        return self.parse(name, conv)

    def rate(self, name: str) -> Rate:
        def conv(v: str) -> Rate:
            m = re.fullmatch(r"([0-9]+)/([0-9]+)", v)
            if not m:
                raise ValueError("expected COUNT/SECONDS, e.g. 5/600")
            count, window = int(m.group(1)), int(m.group(2))
            if count < 1 or not 1 <= window <= 86400 * 31:
                raise ValueError("count must be >= 1 and seconds 1..2678400")
            return Rate(count, window)

        return self.parse(name, conv)

    def url(self, name: str, schemes: tuple[str, ...]) -> str:
        def conv(v: str) -> str:
            if not v:
                return v
            if not any(v.startswith(s) for s in schemes):
                raise ValueError(f"expected a URL starting with {' or '.join(schemes)}")
            try:
                parts = urllib.parse.urlsplit(v)
                parts.port  # noqa: B018 - raises ValueError for a port out of range
            except ValueError as exc:
                raise ValueError(f"not a URL: {exc}") from None
            if parts.scheme in ("http", "https") and not parts.hostname:
                # "http://" or "https://:8080/x" passed, and every POST then failed at
                # the first request instead of at start. (redis:// with no host is
                # redis-py's localhost.)
                raise ValueError("expected a URL with a host")
            if any(c.isspace() or ord(c) < 32 for c in v):
                raise ValueError("a URL with a space or a control character")
            return v

        return self.parse(name, conv)


def parse_host_port(value: str) -> HostPort:
    """``host:port`` or ``[v6]:port`` with a port 0..65535 (0: any free port, for tests)."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:([0-9]{1,5})|([^:\[\]]+):([0-9]{1,5})", value)
    if not m:
        raise ValueError("expected HOST:PORT")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if port > 65535:
        raise ValueError("port out of range")
    if m.group(1):
        ipaddress.IPv6Address(host)
    return HostPort(host, port)


def _e164_number(value: str) -> str:
    if value and not re.fullmatch(r"\+[1-9][0-9]{1,14}", value):
        raise ValueError("expected an E.164 number, e.g. +441632960123")
    return value


def _e164_prefix(value: str) -> str:
    if value and not re.fullmatch(r"\+[1-9][0-9]{0,13}", value):
        raise ValueError("expected + and digits, e.g. +447400")
    return value


def _countries(value: str) -> frozenset[str]:
    out = set()
    for part in value.split(","):
        code = part.strip().upper()
        if not code:
            continue
        if not re.fullmatch(r"[A-Z]{2}", code):
            raise ValueError(f"{part!r} is not a two-letter country code")
        if code not in phonenumbers.SUPPORTED_REGIONS:
            # "UK" for GB, "EU": accepted, it would refuse every number of the country meant.
            raise ValueError(f"{part!r} is not a two-letter country code with phone numbers")
        out.add(code)
    return frozenset(out)


def _level(value: str) -> str:
    up = value.upper()
    if up not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("expected DEBUG, INFO, WARNING or ERROR")
    return up


def _route(value: str) -> str:
    if not value:
        return value
    if not value.startswith(("sip:", "sips:")):
        raise ValueError("expected a sip: URI template")
    fields = set(re.findall(r"\{([^}]*)\}", value))
    if not fields or not fields <= {"e164", "digits", "national"}:
        raise ValueError("use {e164}, {digits} or {national} (at least one)")
    return value


def _sip_uri(value: str) -> str:
    """A SIP URI (RFC 3261 section 19.1.1: ``sip:[user@]host[:port][;params][?headers]``),
    or "" (unset). One without a host (``sip:``, ``sip:6200@``) passed, and every call or
    registration to it failed at run time: a transfer to staff only when a caller pressed 0."""
    if not value:
        return value
    if not value.startswith(("sip:", "sips:")):
        raise ValueError("expected a sip: URI")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("a SIP URI with a space or a control character")
    rest = value.split(":", 1)[1]
    user, at, hostpart = rest.rpartition("@")
    hostport = hostpart.split(";", 1)[0].split("?", 1)[0]
    if (at and not user) or not hostport or hostport.startswith(":"):
        raise ValueError("expected a sip: URI with a host, e.g. sip:6200@pbx.example:5060")
    return value


def _realm(value: str) -> str:
    # What goes between the quotes of realm="..." (RFC 3261 section 25.1: qdtext, LWS and
    # UTF-8 beyond ASCII): no control character (CR or LF would end the header), no quote.
    # Unset (empty) is any realm.
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("a realm with a control character")
    if '"' in value:
        raise ValueError('a realm with a quote ("): give the text between the quotes')
    return value


API_KEY_RULE = "16+ characters of A-Z a-z 0-9 . _ ~ + / = -"
MIN_SECRET_CHARS = 32


def is_api_key(key: str) -> bool:
    """Whether ``key`` is one bearer key as CLINIC_API_KEYS takes them (also the rule for a
    key an operator writes into the data dir's generated key files)."""
    return len(key) >= 16 and re.fullmatch(r"[A-Za-z0-9._~+/=-]+", key) is not None


def _api_keys(value: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in value.split(",") if k.strip())
    for k in keys:
        if not is_api_key(k):
            raise ValueError(f"each key needs {API_KEY_RULE}")
    return keys


def _secret(value: str) -> str:
    if value and len(value) < MIN_SECRET_CHARS:
        raise ValueError(f"needs at least {MIN_SECRET_CHARS} characters")
    return value


def _previous_secrets(value: str) -> tuple[str, ...]:
    # Split as the API keys are (stripped). Not held to CLINIC_SECRET's 32 characters: a
    # previous secret only opens what it sealed, and one shorter was in use where an operator
    # wrote it into the data dir's secret file before that file was checked. Refused here, it
    # could not be listed, and its records never moved to a secret the start takes.
    found = tuple(part.strip() for part in value.split(",") if part.strip())
    if len(found) > MAX_PREVIOUS_SECRETS:
        raise ValueError(f"at most {MAX_PREVIOUS_SECRETS} secrets")
    return found


def _networks(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(
        ipaddress.ip_network(part.strip(), strict=False)
        for part in value.split(",")
        if part.strip()
    )


def _proxies(value: str) -> frozenset[str]:
    out = set()
    for part in value.split(","):
        if part.strip():
            out.add(str(ipaddress.ip_address(part.strip())))
    return frozenset(out)


def _build(r: _Reader) -> Settings:
    ring_s = r.number("CLINIC_FLASHCALL_RING_S", 0.5, 60)
    interception_s = r.integer("CLINIC_FLASHCALL_INTERCEPTION_S", 1, 300)
    flash_timeout_raw = r.raw("CLINIC_STEP_TIMEOUT_FLASHCALL_S")
    flash_timeout = (
        r.integer("CLINIC_STEP_TIMEOUT_FLASHCALL_S", 5, 900)
        if flash_timeout_raw
        else int(ring_s + interception_s + 10)
    )
    verification = VerificationSettings(
        code_ttl_s=r.integer("CLINIC_CODE_TTL_S", 60, 3600),
        max_checks=r.integer("CLINIC_MAX_CHECKS", 1, 100),
        max_sends=r.integer("CLINIC_MAX_SENDS", 1, 10),
        allowed_countries=r.parse("CLINIC_ALLOWED_COUNTRIES", _countries),
        limit_number_verifications=r.rate("CLINIC_LIMIT_NUMBER_VERIFICATIONS"),
        limit_number_sends=r.rate("CLINIC_LIMIT_NUMBER_SENDS"),
        limit_prefix_sends=r.rate("CLINIC_LIMIT_PREFIX_SENDS"),
        limit_prefix_digits=r.integer("CLINIC_LIMIT_PREFIX_DIGITS", 1, 8),
        limit_key_requests=r.rate("CLINIC_LIMIT_KEY_REQUESTS"),
        limit_ip_requests=r.rate("CLINIC_LIMIT_IP_REQUESTS"),
        limit_auth_failures=r.rate("CLINIC_LIMIT_AUTH_FAILURES"),
        limit_ipv6_prefix=r.integer("CLINIC_LIMIT_IPV6_PREFIX", 32, 128),
        step_timeout_flashcall_s=flash_timeout,
        step_timeout_sms_s=r.integer("CLINIC_STEP_TIMEOUT_SMS_S", 10, 900),
        step_timeout_voice_s=r.integer("CLINIC_STEP_TIMEOUT_VOICE_S", VOICE_CALL_S, 900),
        webhook_url=r.url("CLINIC_WEBHOOK_URL", ("http://", "https://")),
        callback_networks=r.parse("CLINIC_CALLBACK_NETWORKS", _networks),
        webhook_timeout_s=r.number("CLINIC_WEBHOOK_TIMEOUT_S", 0.1, 60),
        webhook_retries=r.integer("CLINIC_WEBHOOK_RETRIES", 0, 20),
        webhook_secret=r.parse("CLINIC_WEBHOOK_SECRET", _secret),
    )
    gateway = r.raw("CLINIC_SMS_GATEWAY").lower()
    if gateway not in {"http", "sip"}:
        raise SettingsError("CLINIC_SMS_GATEWAY: expected http or sip")
    sms = SmsSettings(
        gateway=gateway,
        http_url=r.url("CLINIC_SMS_HTTP_URL", ("http://", "https://")),
        http_token=r.raw("CLINIC_SMS_HTTP_TOKEN"),
        http_timeout_s=r.number("CLINIC_SMS_HTTP_TIMEOUT_S", 0.1, 60),
        http_retries=r.integer("CLINIC_SMS_HTTP_RETRIES", 0, 10),
    )
    if (
        sms.gateway == "http"
        and sms.http_url
        and sms.http_budget_s >= verification.step_timeout_sms_s
    ):
        # The step timer would take the send for lost, and send again, while the gateway is
        # still being tried: two SMS with two codes.
        raise SettingsError(
            f"CLINIC_SMS_HTTP_TIMEOUT_S={sms.http_timeout_s:g} with CLINIC_SMS_HTTP_RETRIES="
            f"{sms.http_retries} can take {sms.http_budget_s:.1f} s, not less than "
            f"CLINIC_STEP_TIMEOUT_SMS_S={verification.step_timeout_sms_s}: raise the step "
            "timeout, or lower the others"
        )
    if sms.gateway == "sip" and verification.step_timeout_sms_s <= SIP_MESSAGE_WAIT_S:
        # The step would move on (another code by another channel) while pjsip still waits
        # for the MESSAGE's answer, which may yet be "delivered".
        raise SettingsError(
            f"CLINIC_STEP_TIMEOUT_SMS_S={verification.step_timeout_sms_s}: with "
            f"CLINIC_SMS_GATEWAY=sip it must be over {SIP_MESSAGE_WAIT_S:g} s (a MESSAGE "
            "waits that long for its answer)"
        )
    prefix = r.parse("CLINIC_FLASHCALL_PREFIX", _e164_prefix)
    # E.164 allows 15 digits; the longest code is 8 digits (the API's upper bound).
    if prefix and len(prefix) - 1 + 8 > 15:
        raise SettingsError(
            f"CLINIC_FLASHCALL_PREFIX={prefix!r}: prefix digits plus an 8-digit code exceed "
            "the 15 digits of E.164"
        )
    if prefix and not cli_code_lengths(prefix):
        # "+999" (no country code) made every create with a flash call a 500; "+31" or a
        # range's prefix cut too short, a caller-ID networks block or blank.
        raise SettingsError(
            f"CLINIC_FLASHCALL_PREFIX={prefix!r}: no code of 4..8 digits after it makes a "
            "valid phone number, and networks block or blank a caller-ID that is not one: "
            "give the E.164 prefix of your caller-ID range, e.g. +447400"
        )
    workers = r.integer("CLINIC_SIP_WORKERS", 1, 512)
    sip = SipSettings(
        addr=r.parse("CLINIC_SIP_ADDR", parse_host_port),
        workers=workers,
        route=r.parse("CLINIC_SIP_ROUTE", _route),
        registrar=r.parse("CLINIC_SIP_REGISTRAR", _sip_uri),
        user=r.raw("CLINIC_SIP_USER"),
        password=r.raw("CLINIC_SIP_PASSWORD"),
        flashcall_prefix=prefix,
        flashcall_ring_s=ring_s,
        flashcall_interception_s=interception_s,
        voice_otp_keypress=r.boolean("CLINIC_VOICE_OTP_KEYPRESS"),
        voice_otp_from=r.parse("CLINIC_VOICE_OTP_FROM", _e164_number),
        caller_slots=_caller_slots(r, workers),
        realm=r.parse("CLINIC_SIP_REALM", _realm),
        trusted_peers=r.parse("CLINIC_SIP_TRUSTED_PEERS", parse_trusted_peers),
    )
    if sip.registrar and not sip.user:
        raise SettingsError("CLINIC_SIP_REGISTRAR is set: CLINIC_SIP_USER is needed too")
    # The workers listen on the ports after the front's, and the flash-call agent on the next.
    if sip.addr.port and sip.addr.port + sip.workers + 1 > 65535:
        raise SettingsError(
            f"CLINIC_SIP_ADDR={str(sip.addr)!r} with CLINIC_SIP_WORKERS={sip.workers}: the "
            f"workers and the flash-call agent need ports {sip.addr.port + 1}.."
            f"{sip.addr.port + sip.workers + 1}, past 65535"
        )
    vosk = r.raw("CLINIC_VOSK_MODEL")
    ivr = IvrSettings(
        flows_dir=_flows_dir(r),
        vosk_model=Path(vosk) if vosk else None,
        vosk_language=r.parse("CLINIC_VOSK_LANGUAGE", _language),
        staff_uri=r.parse("CLINIC_STAFF_URI", _sip_uri),
        nurse_uri=r.parse("CLINIC_NURSE_URI", _sip_uri),
        emergency_number=r.parse("CLINIC_EMERGENCY_NUMBER", _digits),
        scheduling_webhook=r.url("CLINIC_SCHEDULING_WEBHOOK", ("http://", "https://")),
        call_retention_days=r.integer("CLINIC_CALL_RETENTION_DAYS", 1, 3650),
        call_drain_s=r.number("CLINIC_CALL_DRAIN_S", 0, 3600),
        transfer_summary=r.parse("CLINIC_TRANSFER_SUMMARY", _transfer_summary),
        scheduling_webhook_secret=r.parse("CLINIC_SCHEDULING_WEBHOOK_SECRET", _secret),
        hours=_hours(r),
        hours_set=bool(r.raw("CLINIC_OPENING_HOURS") or r.raw("CLINIC_CLOSED_DATES")),
        out_of_hours_number=r.parse("CLINIC_OUT_OF_HOURS_NUMBER", _phone_digits),
        nurse_hours=_nurse_hours(r),
        nurse_hours_set=bool(r.raw("CLINIC_NURSE_HOURS")),
        voicemail_min_free_bytes=r.integer("CLINIC_VOICEMAIL_MIN_FREE_MB", 0, 1 << 20) << 20,
        voicemail_max_bytes=r.integer("CLINIC_VOICEMAIL_MAX_MB", 1, 1 << 20) << 20,
        voicemail_per_caller_day=r.integer("CLINIC_VOICEMAIL_PER_CALLER_DAY", 0, 1000),
    )
    redis_url = r.url("CLINIC_REDIS_URL", ("redis://", "rediss://", "unix://"))
    if redis_url and r.given("CLINIC_REDIS_APPENDFSYNC"):
        raise SettingsError(
            "CLINIC_REDIS_APPENDFSYNC sets the embedded Redis's fsync; with CLINIC_REDIS_URL, "
            "set appendfsync in that Redis instead (the service checks it at start)"
        )
    api_keys = r.parse("CLINIC_API_KEYS", _api_keys)
    calls_api_keys = r.parse("CLINIC_CALLS_API_KEYS", _api_keys)
    if set(api_keys) & set(calls_api_keys):
        raise SettingsError(
            "a key is in both CLINIC_API_KEYS and CLINIC_CALLS_API_KEYS: the call records "
            "(health data) need keys of their own"
        )
    return Settings(
        http_addr=r.parse("CLINIC_HTTP_ADDR", parse_host_port),
        http_workers=r.integer("CLINIC_HTTP_WORKERS", 1, 64),
        # Absolute: redis-server changes into its own dir, and a relative socket path broke.
        data_dir=Path(r.raw("CLINIC_DATA_DIR") or "./var").absolute(),
        redis_url=redis_url,
        redis_appendfsync=r.parse("CLINIC_REDIS_APPENDFSYNC", _appendfsync),
        api_keys=api_keys,
        calls_api_keys=calls_api_keys,
        secret=r.parse("CLINIC_SECRET", _secret),
        previous_secrets=r.parse("CLINIC_PREVIOUS_SECRETS", _previous_secrets),
        clinic_name=r.parse("CLINIC_NAME", _clinic_name),
        log_level=r.parse("CLINIC_LOG_LEVEL", _level),
        trusted_proxies=r.parse("CLINIC_TRUSTED_PROXIES", _proxies),
        verification=verification,
        sms=sms,
        sip=sip,
        ivr=ivr,
        tts_words_per_minute=r.integer("CLINIC_TTS_WORDS_PER_MINUTE", 80, 300),
    )


def _caller_slots(r: _Reader, workers: int) -> int:
    """CLINIC_SIP_CALLER_SLOTS; unset: a quarter of the slots, rounded up (one per worker).
    More than the workers hold is refused: a typo, since every slot (verification calls never
    take one) is the most it can mean."""
    name = "CLINIC_SIP_CALLER_SLOTS"
    slots = workers * SIP_CALLS_PER_WORKER
    if not r.raw(name):
        return (slots + 3) // 4
    n = r.integer(name, 0, 512 * SIP_CALLS_PER_WORKER)
    if n > slots:
        raise SettingsError(
            f"{name}={n}: more than the {slots} call slots of CLINIC_SIP_WORKERS={workers} "
            f"({SIP_CALLS_PER_WORKER} each): at most {slots} (every slot: verification calls "
            "never take one)"
        )
    return n


def _appendfsync(value: str) -> str:
    if value not in {"always", "everysec"}:
        raise ValueError("expected always or everysec")
    return value


def _transfer_summary(value: str) -> str:
    if value not in {"none", "urgency", "full"}:
        raise ValueError("expected none, urgency or full")
    return value


def _language(value: str) -> str:
    if not re.fullmatch(r"[a-z]{2,3}", value):
        raise ValueError("expected a language code such as en or ko")
    return value


def _digits(value: str) -> str:
    if not re.fullmatch(r"[0-9]{2,15}", value):
        raise ValueError("expected 2..15 digits")
    return value


def _phone_digits(value: str) -> str:
    """A number to read out: digits (a + first), groups split by a space or -, 2..15 digits."""
    if value and not re.fullmatch(r"\+?[0-9]+([ -][0-9]+)*", value):
        raise ValueError("expected digits, groups split by spaces or -, e.g. 088 123 45 67")
    if value and not 2 <= sum(c.isdigit() for c in value) <= 15:
        raise ValueError("expected 2..15 digits")
    return value


def _clinic_name(value: str) -> str:
    if not value or len(value) > 40 or not value.isprintable():
        raise ValueError("expected 1..40 printable characters")
    return value


def markdown_table() -> str:
    """The README's configuration table (``python -m sip_config.settings``)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for v in VARIABLES:
        default = f"`{v.default}`" if v.default else "unset"
        rows.append(f"| `{v.name}` | {default} | {v.meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
