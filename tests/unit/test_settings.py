"""The settings object (:mod:`sip_config.settings`): defaults, strict parsing, refusals that
name the variable (and never echo a credential), and the flash-call prefix length rule."""

from __future__ import annotations

import datetime
import zoneinfo
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import uvloop

from clinic_voice import cli
from sip_config.settings import (
    VARIABLES,
    HostPort,
    Rate,
    Settings,
    SettingsError,
    flows_dir_from_env,
    parse_host_port,
)
from verification.model import Channel, Policy
from voice.ivr.opening_hours import ALWAYS, Range

KEY = "k" * 16
SECRET = "s" * 32


def build(**env: str) -> Settings:
    return Settings.from_env(env)


# -- defaults -----------------------------------------------------------------------------------


def test_defaults() -> None:
    s = build()
    v = s.verification
    assert s.http_addr == HostPort("127.0.0.1", 8080)
    assert (s.redis_url, s.api_keys, s.secret) == ("", (), "")
    assert s.redis_appendfsync == "always"
    assert (v.code_ttl_s, v.max_checks, v.max_sends) == (600, 5, 5)
    assert v.allowed_countries == frozenset()
    assert v.limit_number_sends == Rate(5, 600)
    assert v.limit_prefix_sends == Rate(200, 3600)
    assert (v.step_timeout_flashcall_s, v.step_timeout_sms_s, v.step_timeout_voice_s) == (
        33,
        120,
        120,
    )
    assert s.sip.flashcall_prefix == ""
    assert s.sip.voice_otp_keypress is True
    assert s.ivr.vosk_model is None
    assert s.log_level == "INFO"
    assert s.tts_words_per_minute == 175  # espeak-ng's own speed, as before it was a setting


def test_the_speech_rate_is_a_setting() -> None:
    # The prompts' speed could not be changed at all: an elderly or hard-of-hearing caller
    # got espeak-ng's 175 words a minute whatever the clinic wanted.
    assert build(CLINIC_TTS_WORDS_PER_MINUTE="150").tts_words_per_minute == 150
    assert build(CLINIC_TTS_WORDS_PER_MINUTE=" 80 ").tts_words_per_minute == 80


def test_rule_defaults_agree_with_the_policy_defaults() -> None:
    # The issue's numbers: 10 minutes, 5 wrong checks; the rules' own defaults must agree.
    v = build().verification
    p = Policy()
    assert (p.ttl_s, p.max_checks, p.max_sends) == (v.code_ttl_s, v.max_checks, v.max_sends)
    assert p.step_timeout_s == {
        Channel.FLASHCALL: v.step_timeout_flashcall_s,
        Channel.SMS: v.step_timeout_sms_s,
        Channel.VOICE: v.step_timeout_voice_s,
    }


class _Recording(Mapping[str, str]):
    """An environment that notes every variable looked up."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return self._env[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._env)

    def __len__(self) -> int:
        return len(self._env)


def test_every_documented_variable_is_read_and_documented_once() -> None:
    names = [v.name for v in VARIABLES]
    assert len(names) == len(set(names))
    env = _Recording({"PATH": "/usr/bin"})
    Settings.from_env(env)
    assert env.read == set(names)
    for v in VARIABLES:
        assert v.name.startswith("CLINIC_") and v.meaning, v.name


# -- values that are parsed ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "get", "expected"),
    [
        ({"CLINIC_HTTP_ADDR": "0.0.0.0:0"}, lambda s: s.http_addr, HostPort("0.0.0.0", 0)),
        ({"CLINIC_HTTP_ADDR": "[::1]:8443"}, lambda s: s.http_addr, HostPort("::1", 8443)),
        ({"CLINIC_CODE_TTL_S": " 60 "}, lambda s: s.verification.code_ttl_s, 60),
        ({"CLINIC_CODE_TTL_S": "3600"}, lambda s: s.verification.code_ttl_s, 3600),
        ({"CLINIC_MAX_CHECKS": "1"}, lambda s: s.verification.max_checks, 1),
        ({"CLINIC_MAX_CHECKS": "100"}, lambda s: s.verification.max_checks, 100),
        ({"CLINIC_MAX_SENDS": "10"}, lambda s: s.verification.max_sends, 10),
        (
            {"CLINIC_ALLOWED_COUNTRIES": "nl, BE ,,"},
            lambda s: s.verification.allowed_countries,
            frozenset({"NL", "BE"}),
        ),
        (
            {"CLINIC_LIMIT_NUMBER_SENDS": "3/60"},
            lambda s: s.verification.limit_number_sends,
            Rate(3, 60),
        ),
        ({"CLINIC_LIMIT_PREFIX_DIGITS": "8"}, lambda s: s.verification.limit_prefix_digits, 8),
        ({}, lambda s: s.verification.limit_ipv6_prefix, 64),
        ({"CLINIC_LIMIT_IPV6_PREFIX": "128"}, lambda s: s.verification.limit_ipv6_prefix, 128),
        (
            {"CLINIC_FLASHCALL_RING_S": "0.5", "CLINIC_FLASHCALL_INTERCEPTION_S": "5"},
            lambda s: s.verification.step_timeout_flashcall_s,
            15,
        ),
        (
            {"CLINIC_FLASHCALL_RING_S": "60", "CLINIC_FLASHCALL_INTERCEPTION_S": "300"},
            lambda s: s.verification.step_timeout_flashcall_s,
            370,
        ),
        (
            {"CLINIC_STEP_TIMEOUT_FLASHCALL_S": "45"},
            lambda s: s.verification.step_timeout_flashcall_s,
            45,
        ),
        ({"CLINIC_WEBHOOK_TIMEOUT_S": "0.25"}, lambda s: s.verification.webhook_timeout_s, 0.25),
        ({"CLINIC_FLASHCALL_PREFIX": "+447400"}, lambda s: s.sip.flashcall_prefix, "+447400"),
        ({"CLINIC_FLASHCALL_PREFIX": "+1234567"}, lambda s: s.sip.flashcall_prefix, "+1234567"),
        ({"CLINIC_VOICE_OTP_KEYPRESS": "off"}, lambda s: s.sip.voice_otp_keypress, False),
        ({"CLINIC_VOICE_OTP_KEYPRESS": "YES"}, lambda s: s.sip.voice_otp_keypress, True),
        ({"CLINIC_VOICE_OTP_KEYPRESS": "0"}, lambda s: s.sip.voice_otp_keypress, False),
        ({"CLINIC_SMS_GATEWAY": "SIP"}, lambda s: s.sms.gateway, "sip"),
        ({"CLINIC_LOG_LEVEL": "debug"}, lambda s: s.log_level, "DEBUG"),
        ({"CLINIC_API_KEYS": f"{KEY}, {KEY}2 ,"}, lambda s: s.api_keys, (KEY, KEY + "2")),
        ({"CLINIC_SECRET": SECRET}, lambda s: s.secret, SECRET),
        (
            {"CLINIC_CALLBACK_NETWORKS": "10.20.0.0/16, fd00::/8,192.168.1.7"},
            lambda s: tuple(map(str, s.verification.callback_networks)),
            ("10.20.0.0/16", "fd00::/8", "192.168.1.7/32"),
        ),
        (
            {"CLINIC_TRUSTED_PROXIES": "10.0.0.1, ::1"},
            lambda s: s.trusted_proxies,
            frozenset({"10.0.0.1", "::1"}),
        ),
        (
            {"CLINIC_SIP_ROUTE": "sip:{e164}@127.0.0.1:5080"},
            lambda s: s.sip.route,
            "sip:{e164}@127.0.0.1:5080",
        ),
        (
            {"CLINIC_SIP_REGISTRAR": "sip:127.0.0.1:5160", "CLINIC_SIP_USER": "svc"},
            lambda s: s.sip.registrar,
            "sip:127.0.0.1:5160",
        ),
        ({"CLINIC_VOSK_MODEL": "/m"}, lambda s: s.ivr.vosk_model, Path("/m")),
        ({"CLINIC_REDIS_URL": "unix:///r.sock"}, lambda s: s.redis_url, "unix:///r.sock"),
        ({"CLINIC_REDIS_APPENDFSYNC": "everysec"}, lambda s: s.redis_appendfsync, "everysec"),
        ({"CLINIC_REDIS_APPENDFSYNC": "always"}, lambda s: s.redis_appendfsync, "always"),
        (
            {"CLINIC_OPENING_HOURS": "mon-fri 08:00-17:00; sat 09:00-12:00"},
            lambda s: (s.ivr.hours.week[4], s.ivr.hours.week[6], s.ivr.hours_set),
            ((Range(480, 1020),), (), True),
        ),
        ({}, lambda s: (s.ivr.hours.week, s.ivr.hours_set), (ALWAYS, False)),
        (
            {"CLINIC_CLOSED_DATES": "2026-12-25"},
            lambda s: (s.ivr.hours.week, s.ivr.hours.closed_dates, s.ivr.hours_set),
            (ALWAYS, {datetime.date(2026, 12, 25)}, True),
        ),
        (
            {"CLINIC_TIMEZONE": "Europe/Amsterdam"},
            lambda s: s.ivr.hours.zone,
            zoneinfo.ZoneInfo("Europe/Amsterdam"),
        ),
        (
            {"CLINIC_OUT_OF_HOURS_NUMBER": "088-123 45 67"},
            lambda s: s.ivr.out_of_hours_number,
            "088-123 45 67",
        ),
        ({"CLINIC_OUT_OF_HOURS_NUMBER": "+31 88"}, lambda s: s.ivr.out_of_hours_number, "+31 88"),
        ({}, lambda s: s.ivr.out_of_hours_number, ""),
        ({}, lambda s: s.sip.realm, ""),  # any realm
        ({"CLINIC_SIP_REALM": "asterisk"}, lambda s: s.sip.realm, "asterisk"),
        ({"CLINIC_SIP_REALM": " clinic pbx "}, lambda s: s.sip.realm, "clinic pbx"),
        ({"CLINIC_SIP_REALM": "Zürich\\PBX"}, lambda s: s.sip.realm, "Zürich\\PBX"),
    ],
)
def test_good_values(env: dict[str, str], get: Callable[[Settings], Any], expected: Any) -> None:
    assert get(build(**env)) == expected


# -- values that are refused --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("CLINIC_CODE_TTL_S", "59", "60..3600"),
        ("CLINIC_CODE_TTL_S", "3601", "60..3600"),
        ("CLINIC_CODE_TTL_S", "-1", "whole number"),
        ("CLINIC_CODE_TTL_S", "600.0", "whole number"),
        ("CLINIC_CODE_TTL_S", "1e3", "whole number"),
        ("CLINIC_CODE_TTL_S", "", "whole number"),
        ("CLINIC_CODE_TTL_S", "٦٠٠", "whole number"),  # int() would take Arabic-Indic digits
        ("CLINIC_MAX_CHECKS", "0", "1..100"),
        ("CLINIC_MAX_CHECKS", "101", "1..100"),
        ("CLINIC_MAX_SENDS", "11", "1..10"),
        ("CLINIC_ALLOWED_COUNTRIES", "NL,NLD", "two-letter"),
        ("CLINIC_ALLOWED_COUNTRIES", "N1", "two-letter"),
        ("CLINIC_ALLOWED_COUNTRIES", "NL,UK", "with phone numbers"),  # GB's code is GB
        ("CLINIC_ALLOWED_COUNTRIES", "EU", "with phone numbers"),
        ("CLINIC_LIMIT_NUMBER_SENDS", "5", "COUNT/SECONDS"),
        ("CLINIC_LIMIT_NUMBER_SENDS", "0/600", "count must be"),
        ("CLINIC_LIMIT_NUMBER_SENDS", "5/0", "count must be"),
        ("CLINIC_LIMIT_NUMBER_SENDS", "5/2678401", "count must be"),
        ("CLINIC_LIMIT_PREFIX_SENDS", "5 / 60", "COUNT/SECONDS"),
        ("CLINIC_LIMIT_PREFIX_DIGITS", "9", "1..8"),
        ("CLINIC_LIMIT_IPV6_PREFIX", "31", "32..128"),
        ("CLINIC_LIMIT_IPV6_PREFIX", "129", "32..128"),
        ("CLINIC_STEP_TIMEOUT_FLASHCALL_S", "4", "5..900"),
        ("CLINIC_STEP_TIMEOUT_SMS_S", "901", "10..900"),
        ("CLINIC_STEP_TIMEOUT_VOICE_S", "99", "100..900"),
        ("CLINIC_WEBHOOK_URL", "ftp://x", "http"),
        ("CLINIC_WEBHOOK_URL", "http://", "with a host"),  # every POST failed, none at start
        ("CLINIC_WEBHOOK_URL", "https://:8443/hook", "with a host"),
        ("CLINIC_WEBHOOK_URL", "http://h:99999/", "not a URL"),
        ("CLINIC_WEBHOOK_URL", "http://h/a b", "a space"),
        ("CLINIC_SCHEDULING_WEBHOOK", "https://", "with a host"),
        ("CLINIC_SMS_HTTP_URL", "http:///send", "with a host"),
        ("CLINIC_WEBHOOK_TIMEOUT_S", "0", "0.1..60"),
        ("CLINIC_WEBHOOK_TIMEOUT_S", ".5", "number of seconds"),
        ("CLINIC_WEBHOOK_RETRIES", "21", "0..20"),
        ("CLINIC_SMS_GATEWAY", "smpp", "http or sip"),
        ("CLINIC_SMS_HTTP_URL", "gateway.example", "http"),
        ("CLINIC_SMS_HTTP_RETRIES", "11", "0..10"),
        ("CLINIC_HTTP_ADDR", "8080", "HOST:PORT"),
        ("CLINIC_HTTP_ADDR", "127.0.0.1:65536", "port out of range"),
        ("CLINIC_HTTP_ADDR", "[::g]:80", "HOST:PORT"),
        ("CLINIC_HTTP_ADDR", "[1::2::3]:80", "'::'"),
        ("CLINIC_HTTP_ADDR", "::1:80", "HOST:PORT"),
        ("CLINIC_SIP_ADDR", "127.0.0.1:", "HOST:PORT"),
        ("CLINIC_SIP_WORKERS", "0", "1..512"),
        ("CLINIC_SIP_WORKERS", "513", "1..512"),
        ("CLINIC_SIP_CALLER_SLOTS", "-1", "whole number"),
        ("CLINIC_SIP_CALLER_SLOTS", "17", "more than the 16 call slots of CLINIC_SIP_WORKERS=4"),
        ("CLINIC_SIP_ROUTE", "tel:{e164}", "sip:"),
        ("CLINIC_SIP_ROUTE", "sip:fixed@127.0.0.1", "{e164}"),
        ("CLINIC_SIP_ROUTE", "sip:{number}@127.0.0.1", "{e164}"),
        ("CLINIC_SIP_REGISTRAR", "127.0.0.1:5160", "sip:"),
        ("CLINIC_SIP_REALM", '"asterisk"', "a realm with a quote"),
        ("CLINIC_SIP_REALM", 'clinic "pbx"', "a realm with a quote"),
        ("CLINIC_SIP_REALM", "ast\r\nX-Evil: 1", "control character"),
        ("CLINIC_SIP_REALM", "ast\x00erisk", "control character"),
        ("CLINIC_SIP_REALM", "ast\terisk", "control character"),
        ("CLINIC_SIP_REALM", "ast\x7ferisk", "control character"),
        ("CLINIC_FLASHCALL_PREFIX", "447400", "+ and digits"),
        ("CLINIC_FLASHCALL_PREFIX", "+0447400", "+ and digits"),
        ("CLINIC_FLASHCALL_PREFIX", "+44 7400", "+ and digits"),
        ("CLINIC_FLASHCALL_PREFIX", "+44740012", "15 digits"),  # 8 + an 8-digit code = 16
        ("CLINIC_FLASHCALL_PREFIX", "+447400123456", "15 digits"),
        ("CLINIC_FLASHCALL_PREFIX", "+999", "valid phone number"),  # no country code: 500s
        ("CLINIC_FLASHCALL_PREFIX", "+31", "valid phone number"),
        ("CLINIC_FLASHCALL_RING_S", "0.4", "0.5..60"),
        ("CLINIC_FLASHCALL_RING_S", "61", "0.5..60"),
        ("CLINIC_FLASHCALL_INTERCEPTION_S", "0", "1..300"),
        ("CLINIC_VOICE_OTP_KEYPRESS", "maybe", "1/0"),
        ("CLINIC_VOICE_OTP_KEYPRESS", "", "1/0"),
        ("CLINIC_VOICE_OTP_FROM", "0201234567", "E.164 number"),
        ("CLINIC_STAFF_URI", "6200", "sip:"),
        ("CLINIC_STAFF_URI", "sip:", "with a host"),  # every transfer to staff failed
        ("CLINIC_STAFF_URI", "sips:", "with a host"),
        ("CLINIC_STAFF_URI", "sip:6200@", "with a host"),
        ("CLINIC_STAFF_URI", "sip:@127.0.0.1", "with a host"),
        ("CLINIC_STAFF_URI", "sip::5160", "with a host"),
        ("CLINIC_STAFF_URI", "sip:;transport=tcp", "with a host"),
        ("CLINIC_STAFF_URI", "sip:62 00@127.0.0.1", "a space"),
        ("CLINIC_NURSE_URI", "sip:", "with a host"),
        ("CLINIC_NURSE_URI", "sip:6100@", "with a host"),
        ("CLINIC_SIP_REGISTRAR", "sip:", "with a host"),
        ("CLINIC_SIP_REGISTRAR", "sip:\r\n127.0.0.1", "control character"),
        ("CLINIC_NURSE_URI", "http://nurse", "sip:"),
        ("CLINIC_TTS_WORDS_PER_MINUTE", "79", "80..300"),
        ("CLINIC_TTS_WORDS_PER_MINUTE", "301", "80..300"),
        ("CLINIC_TTS_WORDS_PER_MINUTE", "slow", "whole number"),
        ("CLINIC_EMERGENCY_NUMBER", "1", "2..15 digits"),
        ("CLINIC_EMERGENCY_NUMBER", "11a", "2..15 digits"),
        ("CLINIC_OPENING_HOURS", "mon-fri 8-17", "is not a time HH:MM"),
        ("CLINIC_OPENING_HOURS", "weekdays 08:00-17:00", "is not a day"),
        ("CLINIC_OPENING_HOURS", "mon 22:00-02:00", "ends before it starts"),
        ("CLINIC_OPENING_HOURS", "mon-fri 08:00-17:00; mon 18:00-19:00", "mon is named twice"),
        ("CLINIC_CLOSED_DATES", "25-12-2026", "not a date YYYY-MM-DD"),
        ("CLINIC_TIMEZONE", "Mars/Olympus", "IANA time zone"),
        ("CLINIC_TIMEZONE", "../etc/passwd", "IANA time zone"),
        ("CLINIC_OUT_OF_HOURS_NUMBER", "0900 HELP", "digits"),
        ("CLINIC_OUT_OF_HOURS_NUMBER", "1", "2..15 digits"),
        ("CLINIC_OUT_OF_HOURS_NUMBER", "(088) 123", "digits"),
        ("CLINIC_OUT_OF_HOURS_NUMBER", "088  123", "digits"),
        ("CLINIC_SCHEDULING_WEBHOOK", "mailto:x", "http"),
        ("CLINIC_CALL_RETENTION_DAYS", "0", "1..3650"),
        ("CLINIC_LOG_LEVEL", "TRACE", "DEBUG, INFO"),
        ("CLINIC_REDIS_APPENDFSYNC", "no", "always or everysec"),
        ("CLINIC_REDIS_APPENDFSYNC", "", "always or everysec"),
        ("CLINIC_REDIS_APPENDFSYNC", "EVERYSEC", "always or everysec"),
        ("CLINIC_NAME", "", "1..40"),
        ("CLINIC_NAME", "x" * 41, "1..40"),
        ("CLINIC_NAME", "tab\there", "1..40"),
        ("CLINIC_TRUSTED_PROXIES", "10.0.0.1,proxy.local", "does not appear to be"),
        ("CLINIC_CALLBACK_NETWORKS", "10.0.0.0/33", "10.0.0.0/33"),
        ("CLINIC_CALLBACK_NETWORKS", "lan", "does not appear to be"),
    ],
)
def test_bad_values_are_refused_naming_the_variable(name: str, value: str, why: str) -> None:
    with pytest.raises(SettingsError) as err:
        build(**{name: value})
    message = str(err.value)
    assert message.startswith(name), message
    assert why in message


@pytest.mark.parametrize("value", ["always", "everysec"])
def test_redis_appendfsync_is_refused_with_a_redis_url(value: str) -> None:
    # It sets the embedded Redis only: beside CLINIC_REDIS_URL it would be silently ignored.
    with pytest.raises(SettingsError, match="set appendfsync in that Redis"):
        build(CLINIC_REDIS_URL="unix:///r.sock", CLINIC_REDIS_APPENDFSYNC=value)


def test_an_sms_send_must_fit_in_its_step() -> None:
    # A review found the step timer sending a second SMS (a second code) while the gateway
    # was still being retried: every attempt timing out, with the pauses between them at
    # their longest (+20 %), must end before the step does.
    url = {"CLINIC_SMS_HTTP_URL": "https://sms.example/send"}
    defaults = build(**url)
    assert defaults.sms.http_budget_s == pytest.approx(3 * 5 + 1.2 * (0.5 + 1))  # 16.8 s
    assert build(**url, CLINIC_STEP_TIMEOUT_SMS_S="17").sms.http_retries == 2
    with pytest.raises(SettingsError, match=r"can take 16\.8 s, not less than .*_SMS_S=16"):
        build(**url, CLINIC_STEP_TIMEOUT_SMS_S="16")
    with pytest.raises(SettingsError, match="CLINIC_SMS_HTTP_TIMEOUT_S=60 with"):
        build(**url, CLINIC_SMS_HTTP_TIMEOUT_S="60", CLINIC_SMS_HTTP_RETRIES="1")  # 120.6 > 120
    build(**url, CLINIC_SMS_HTTP_TIMEOUT_S="60", CLINIC_SMS_HTTP_RETRIES="0")
    # Over SIP a MESSAGE waits up to 35 s for its answer (pjsip's own 408 comes at 32 s): a
    # slow gateway's 200 came after the step had sent the next channel's code.
    with pytest.raises(SettingsError, match="with CLINIC_SMS_GATEWAY=sip it must be over 35 s"):
        build(CLINIC_SMS_GATEWAY="sip", CLINIC_STEP_TIMEOUT_SMS_S="35")
    build(CLINIC_SMS_GATEWAY="sip", CLINIC_STEP_TIMEOUT_SMS_S="36")
    build(CLINIC_STEP_TIMEOUT_SMS_S="10")  # no gateway URL: no SMS is sent at all
    longest = build(
        **url,
        CLINIC_SMS_HTTP_TIMEOUT_S="60",
        CLINIC_SMS_HTTP_RETRIES="10",
        CLINIC_STEP_TIMEOUT_SMS_S="900",
    )
    assert longest.sms.http_budget_s < 900, "the largest values still have a step to fit in"


def test_the_sip_workers_ports_must_exist() -> None:
    # The review: 127.0.0.1:65535 started with a front on 0 and workers on 0.
    with pytest.raises(SettingsError, match=r"CLINIC_SIP_ADDR='127\.0\.0\.1:65535'.*past 65535"):
        build(CLINIC_SIP_ADDR="127.0.0.1:65535")
    with pytest.raises(SettingsError, match=r"65534\.\.65536"):
        build(CLINIC_SIP_ADDR="127.0.0.1:65533", CLINIC_SIP_WORKERS="2")
    assert build(CLINIC_SIP_ADDR="127.0.0.1:65532", CLINIC_SIP_WORKERS="2").sip.workers == 2
    assert build(CLINIC_SIP_ADDR="127.0.0.1:0", CLINIC_SIP_WORKERS="512").sip.addr.port == 0


def test_caller_slots_default_to_a_quarter_of_the_slots() -> None:
    # One slot per worker (each holds 4): the default 4 workers keep 4 of their 16 slots
    # from verification calls; 1 worker keeps 1.
    assert build().sip.caller_slots == 4
    assert build(CLINIC_SIP_WORKERS="1").sip.caller_slots == 1
    assert build(CLINIC_SIP_WORKERS="7", CLINIC_SIP_CALLER_SLOTS="").sip.caller_slots == 7
    assert build(CLINIC_SIP_CALLER_SLOTS="0").sip.caller_slots == 0  # first come, first served
    # Every slot: allowed (verification calls never take one); one more is a typo.
    assert build(CLINIC_SIP_WORKERS="2", CLINIC_SIP_CALLER_SLOTS="8").sip.caller_slots == 8
    with pytest.raises(SettingsError, match=r"CLINIC_SIP_CALLER_SLOTS=9: .* at most 8"):
        build(CLINIC_SIP_WORKERS="2", CLINIC_SIP_CALLER_SLOTS="9")


def test_registrar_needs_a_user() -> None:
    with pytest.raises(SettingsError, match="CLINIC_SIP_USER"):
        build(CLINIC_SIP_REGISTRAR="sip:127.0.0.1:5160")


@pytest.mark.parametrize("name", ["CLINIC_CODE_TTL", "CLINIC_MAXCHECKS", "CLINIC_"])
def test_unknown_clinic_variables_are_refused(name: str) -> None:
    with pytest.raises(SettingsError, match=f"unknown setting.*{name}"):
        build(**{name: "1"})


@pytest.mark.parametrize(
    ("env", "expected"),
    [({}, Path("ivr_flows")), ({"CLINIC_FLOWS_DIR": " /srv/flows "}, Path("/srv/flows"))],
)
def test_the_flow_tools_read_the_flows_dir_as_serve_does(
    env: dict[str, str], expected: Path
) -> None:
    assert flows_dir_from_env(env) == expected == build(**env).ivr.flows_dir


def test_the_flow_tools_need_no_other_valid_setting() -> None:
    # A bad SMS gateway stops serve, not ``flow check``; a misspelt name stops both.
    assert flows_dir_from_env({"CLINIC_SMS_GATEWAY": "?"}) == Path("ivr_flows")
    with pytest.raises(SettingsError, match=r"unknown setting.*CLINIC_FLOW_DIR"):
        flows_dir_from_env({"CLINIC_FLOW_DIR": "flows"})


def test_other_variables_are_ignored() -> None:
    Settings.from_env({"PATH": "/bin", "HOME": "/root", "clinic_lower": "x"})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CLINIC_SECRET", "short-secret-value"),
        ("CLINIC_API_KEYS", f"{KEY},tiny-key-leak"),
        ("CLINIC_API_KEYS", "has space in the key!"),
        ("CLINIC_REDIS_URL", "http://:hunter2password@127.0.0.1:6379"),
    ],
)
def test_refusals_never_echo_a_credential(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as err:
        build(**{name: value})
    message = str(err.value)
    assert message.startswith(name)
    for part in value.split(","):
        if part != KEY:
            assert part not in message
    assert KEY not in message
    assert "hunter2" not in message


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("127.0.0.1:5060", HostPort("127.0.0.1", 5060)),
        ("localhost:0", HostPort("localhost", 0)),
        ("[2001:db8::1]:5061", HostPort("2001:db8::1", 5061)),
        ("sip.example.org:65535", HostPort("sip.example.org", 65535)),
    ],
)
def test_parse_host_port(value: str, parsed: HostPort) -> None:
    assert parse_host_port(value) == parsed
    assert parse_host_port(str(parsed)) == parsed  # str() gives back a parsable form


def test_settings_are_frozen() -> None:
    s = build()
    with pytest.raises(AttributeError):
        s.log_level = "DEBUG"  # type: ignore[misc]


def test_serve_exits_2_on_a_bad_realm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A realm with a quote (here: the header's text copied, quotes and all) is refused at
    start, exit 2, as any bad setting, before anything starts."""
    monkeypatch.setenv("CLINIC_SIP_REALM", '"asterisk"')
    monkeypatch.setenv("CLINIC_DATA_DIR", str(tmp_path / "data"))

    def run(main: Any) -> None:
        main.close()
        pytest.fail("serve started with a bad CLINIC_SIP_REALM")

    monkeypatch.setattr(uvloop, "run", run)  # as cli.main calls it
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "CLINIC_SIP_REALM=" in err and "a realm with a quote" in err, err
    assert not (tmp_path / "data").exists()
