"""Rate-limit decisions (:mod:`verification.limits`): which counters a request touches, their
window-aligned keys (no phone number or key in a Redis key name), and what a refusal says."""

from __future__ import annotations

import hashlib
import re

import pytest

from sip_config.settings import Rate, Settings, VerificationSettings
from verification.limits import (
    LimitCheck,
    LimitName,
    SubjectDigest,
    address_subject,
    auth_failure_checks,
    creation_checks,
    digest_key,
    request_checks,
    send_checks,
)
from verification.model import NumberKind, Phone

PHONE = Phone("+31612345678", "NL", 31, "612345678", NumberKind.MOBILE)
T0 = 1_800_000_000.0
DIGEST = SubjectDigest(b"the key of the tests")


def settings(**env: str) -> VerificationSettings:
    return Settings.from_env(env).verification


def test_request_checks_count_the_key_and_the_address() -> None:
    s = settings(CLINIC_LIMIT_KEY_REQUESTS="10/60", CLINIC_LIMIT_IP_REQUESTS="20/30")
    checks = request_checks(s, "key-1", "192.0.2.7")
    assert checks == [
        LimitCheck(LimitName.KEY_REQUESTS, "key-1", Rate(10, 60)),
        LimitCheck(LimitName.IP_REQUESTS, "192.0.2.7", Rate(20, 30)),
        # The address's wrong keys, compared and not counted: used up, a right key is refused.
        LimitCheck(LimitName.AUTH_FAILURES, "192.0.2.7", Rate(20, 60), counted=False),
    ]
    assert checks[2].key(T0, DIGEST) == auth_failure_checks(s, "192.0.2.7")[0].key(T0, DIGEST)


def test_wrong_keys_are_counted_per_address() -> None:
    s = settings(CLINIC_LIMIT_AUTH_FAILURES="7/120")
    assert auth_failure_checks(s, "192.0.2.7") == [
        LimitCheck(LimitName.AUTH_FAILURES, "192.0.2.7", Rate(7, 120))
    ]
    assert settings().limit_auth_failures == Rate(20, 60), "the README's default"


@pytest.mark.parametrize(
    ("address", "subject"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # the same /64
        ("2001:DB8:1:2:0:0:0:7", "2001:db8:1:2::/64"),  # any spelling
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),  # the next /64 is another site
        ("fe80::1%eth0", "fe80::/64"),
        ("::ffff:203.0.113.9", "203.0.113.9"),  # IPv4-mapped: the IPv4 address
        ("::1", "::/64"),
        ("64:ff9b::203.0.113.9", "203.0.113.9"),  # NAT64: the IPv4 host behind it
        ("64:ff9b:1::cb00:7109", "64:ff9b:1::/64"),  # not the well-known /96
        ("2002:cb00:7109:5::1", "203.0.113.9"),  # 6to4: the site behind that IPv4 host
        ("unknown", "unknown"),
        ("not:an:address", "not:an:address"),
    ],
)
def test_an_ipv6_client_is_counted_by_its_64(address: str, subject: str) -> None:
    assert address_subject(address) == subject


@pytest.mark.parametrize(
    ("prefix", "subject"),
    [
        (128, "2001:db8:1:2:3:4:5:6/128"),  # each address: a host that hands out less
        (56, "2001:db8:1::/56"),
        (48, "2001:db8:1::/48"),
    ],
)
def test_the_ipv6_network_length_is_a_setting(prefix: int, subject: str) -> None:
    assert address_subject("2001:db8:1:2:3:4:5:6", prefix) == subject
    assert address_subject("203.0.113.9", prefix) == "203.0.113.9"


@pytest.mark.parametrize(
    ("at", "ms"),
    [
        (T0, 60_000),
        (T0 + 0.001, 59_999),
        (T0 + 50, 10_000),
        (T0 + 59.999, 1),
        (T0 + 59.9999, 60_000),
    ],
)
def test_a_counter_lives_until_its_window_ends(at: float, ms: int) -> None:
    assert T0 % 60 == 0
    _, ms_left = LimitCheck(LimitName.KEY_REQUESTS, "k", Rate(5, 60)).counter(
        round(at * 1000), DIGEST
    )
    assert ms_left == ms


def test_creation_checks_count_verifications_per_number() -> None:
    s = settings(CLINIC_LIMIT_NUMBER_VERIFICATIONS="3/900")
    assert creation_checks(s, PHONE) == [
        LimitCheck(LimitName.NUMBER_VERIFICATIONS, "+31612345678", Rate(3, 900))
    ]


@pytest.mark.parametrize(
    ("digits", "prefix"), [("1", "+316"), ("4", "+316123"), ("8", "+3161234567")]
)
def test_send_checks_count_the_number_and_its_prefix(digits: str, prefix: str) -> None:
    s = settings(
        CLINIC_LIMIT_NUMBER_SENDS="4/600",
        CLINIC_LIMIT_PREFIX_SENDS="50/3600",
        CLINIC_LIMIT_PREFIX_DIGITS=digits,
    )
    assert send_checks(s, PHONE) == [
        LimitCheck(LimitName.NUMBER_SENDS, "+31612345678", Rate(4, 600)),
        LimitCheck(LimitName.PREFIX_SENDS, prefix, Rate(50, 3600)),
    ]


@pytest.mark.parametrize(
    ("window", "a", "b", "same"),
    [
        (600, T0, T0 + 1, True),
        (600, 1_799_999_400.0, 1_799_999_999.999, True),  # both in [..., T0)
        (600, T0 - 0.001, T0, False),  # T0 is a multiple of 600: a window starts there
        (60, T0, T0 + 59.999, True),
        (60, T0, T0 + 60, False),
        (1, T0, T0 + 0.5, True),
        (1, T0 + 0.5, T0 + 1, False),
        (3600, T0, T0 + 3599.999, True),  # T0 is a whole hour too
        (3600, T0 - 1, T0, False),
        (7, T0 - 1, T0 + 5.9, True),  # 1_800_000_000 = 7 * 257_142_857 + 1
        (7, T0 + 5.9, T0 + 6, False),
    ],
)
def test_keys_follow_fixed_windows_aligned_to_the_clock(
    window: int, a: float, b: float, same: bool
) -> None:
    check = LimitCheck(LimitName.KEY_REQUESTS, "k0123456789ab", Rate(5, window))
    assert (check.key(a, DIGEST) == check.key(b, DIGEST)) is same


@pytest.mark.parametrize(
    ("name", "sliding"),
    [
        (LimitName.NUMBER_VERIFICATIONS, False),
        (LimitName.NUMBER_SENDS, True),
        (LimitName.PREFIX_SENDS, False),
        (LimitName.KEY_REQUESTS, False),
        (LimitName.IP_REQUESTS, False),
        (LimitName.AUTH_FAILURES, False),
    ],
)
def test_sends_per_number_slide_the_other_limits_are_fixed(name: LimitName, sliding: bool) -> None:
    check = LimitCheck(name, "+31612345678", Rate(5, 600))
    assert check.sliding is sliding
    key, ms = check.counter(round(T0 * 1000) + 123_456, DIGEST)
    if sliding:  # one log for all time; the window's length
        assert check.key(T0 - 3600, DIGEST) == key == check.key(T0 + 3600, DIGEST)
        assert ms == 600_000
    else:  # a counter per window; the time left in it
        assert check.key(T0 + 600, DIGEST) != key
        assert ms == 600_000 - 123_456


@pytest.mark.parametrize(
    "other",
    [
        LimitCheck(LimitName.NUMBER_SENDS, "+31612345679", Rate(5, 600)),  # another subject
        LimitCheck(LimitName.NUMBER_VERIFICATIONS, "+31612345678", Rate(5, 600)),  # limit
        LimitCheck(LimitName.NUMBER_SENDS, "+31612345678", Rate(5, 300)),  # window length
    ],
)
def test_keys_differ_by_limit_subject_and_window(other: LimitCheck) -> None:
    check = LimitCheck(LimitName.NUMBER_SENDS, "+31612345678", Rate(5, 600))
    assert check.key(T0, DIGEST) != other.key(T0, DIGEST)


def test_same_count_shares_the_counter() -> None:
    # Changing only the count (a config change) keeps counting in the same window.
    a = LimitCheck(LimitName.NUMBER_SENDS, "+31612345678", Rate(5, 600))
    b = LimitCheck(LimitName.NUMBER_SENDS, "+31612345678", Rate(9, 600))
    assert a.key(T0, DIGEST) == b.key(T0, DIGEST)


@pytest.mark.parametrize(
    ("name", "subject"),
    [
        (LimitName.NUMBER_SENDS, "+31612345678"),
        (LimitName.PREFIX_SENDS, "+316123"),
        (LimitName.KEY_REQUESTS, "sk_live_0123456789abcdef"),
        (LimitName.IP_REQUESTS, "2001:db8::1"),
    ],
)
def test_keys_never_hold_the_subject(name: LimitName, subject: str) -> None:
    check = LimitCheck(name, subject, Rate(5, 600))
    key = check.key(T0, DIGEST)
    window = "" if check.sliding else ":3000000"
    assert re.fullmatch(rf"{re.escape(name.value)}:600:[0-9a-f]{{24}}{window}", key), key
    digits = re.sub(r"\D", "", subject)
    assert subject not in key
    assert len(digits) < 6 or digits not in key


@pytest.mark.parametrize(
    ("name", "rate", "text"),
    [
        (LimitName.KEY_REQUESTS, Rate(100, 60), "requests for this API key (limit 100 per 60 s)"),
        (LimitName.IP_REQUESTS, Rate(5, 1), "requests from this address (limit 5 per 1 s)"),
        (
            LimitName.NUMBER_VERIFICATIONS,
            Rate(5, 600),
            "verifications for this number (limit 5 per 600 s)",
        ),
        (LimitName.NUMBER_SENDS, Rate(5, 600), "sends to this number (limit 5 per 600 s)"),
        (
            LimitName.PREFIX_SENDS,
            Rate(200, 3600),
            "sends to numbers with this prefix (limit 200 per 3600 s)",
        ),
    ],
)
def test_describe_names_the_limit_but_not_the_subject(
    name: LimitName, rate: Rate, text: str
) -> None:
    check = LimitCheck(name, "+31612345678", rate)
    assert check.describe() == "too many " + text
    assert "+31612345678" not in check.describe()


def test_every_limit_has_a_description() -> None:
    for name in LimitName:
        assert LimitCheck(name, "x", Rate(1, 1)).describe().startswith("too many ")


def test_phone_numbers_are_not_kept_in_the_digest_cache() -> None:
    digest = SubjectDigest(b"k")
    check = LimitCheck(LimitName.NUMBER_SENDS, "+31612345678", Rate(5, 600))
    first = check.key(T0, digest)
    assert not digest.kept("+31612345678")
    key_check = LimitCheck(LimitName.KEY_REQUESTS, "kid-1", Rate(5, 600))
    assert key_check.key(T0, digest) == key_check.key(T0, digest)
    assert digest.kept("kid-1")
    assert check.key(T0, digest) == first


def test_names_need_the_key_to_be_guessed() -> None:
    """The code review recovered a number from its counter's name by hashing candidates: an
    unkeyed SHA-256. Without the key, the same candidates give other names."""
    check = LimitCheck(LimitName.NUMBER_SENDS, "+31612345678", Rate(5, 600))
    name = check.key(T0, DIGEST)
    assert hashlib.sha256(b"+31612345678").hexdigest()[:24] not in name
    assert check.key(T0, SubjectDigest(b"another key")) != name
    assert check.key(T0, SubjectDigest(b"the key of the tests")) == name
    assert digest_key(b"secret") != digest_key(b"secret2") and len(digest_key(b"s")) == 32
