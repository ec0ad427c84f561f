"""Webhook signatures and retry backoff (:func:`verification.webhooks.sign`, ``verify``,
``backoff_s``): Stripe-style ``t=<unix>,v1=<hex HMAC-SHA256 of "<t>." + body>``."""

from __future__ import annotations

import hashlib
import hmac
import random

import pytest

from verification.webhooks import SIGNATURE_HEADER, backoff_s, sign, verify

SECRET = b"k" * 32
BODY = b'{"verification_id":"abc","status":"approved","channel":"sms","event":"approved"}'
TS = 1_800_000_000


def reference(secret: bytes, ts: int, body: bytes) -> str:
    """The signature as a receiver following the README would compute it."""
    mac = hmac.new(secret, str(ts).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


def test_header_name() -> None:
    assert SIGNATURE_HEADER == "X-Clinic-Signature"


@pytest.mark.parametrize("ts", [0, 1, TS, 2**31, 2**40])
@pytest.mark.parametrize("body", [b"", b"{}", BODY, "é".encode(), bytes(range(256))])
def test_sign_matches_the_documented_construction(ts: int, body: bytes) -> None:
    header = sign(SECRET, ts, body)
    assert header == reference(SECRET, ts, body)
    assert verify(SECRET, header, body)


@pytest.mark.parametrize(
    ("secret", "header_ts", "body"),
    [
        (b"x" * 32, TS, BODY),  # another secret
        (SECRET, TS + 1, BODY),  # the time stamp changed
        (SECRET, TS, BODY + b" "),  # the body changed
        (SECRET, TS, BODY.replace(b"approved", b"canceled", 1)),
    ],
)
def test_verify_refuses_a_changed_message(secret: bytes, header_ts: int, body: bytes) -> None:
    header = sign(SECRET, TS, BODY)
    if header_ts != TS:
        header = header.replace(f"t={TS}", f"t={header_ts}")
    assert not verify(secret, header, body)


def _flip_last_hex(header: str) -> str:
    last = header[-1]
    return header[:-1] + ("0" if last != "0" else "1")


GOOD = sign(SECRET, TS, BODY)
MAC = GOOD.split("v1=", 1)[1]


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        f"t={TS}",
        f"v1={MAC}",
        f"v1={MAC},t={TS}",  # the documented order only
        f"t={TS},v1={MAC.upper()}",
        _flip_last_hex(GOOD),
        f"t={TS},v1={MAC},v0=abc",
        f"t={TS},v1={MAC}, ",
        f" t={TS},v1={MAC}",
        f"t=abc,v1={MAC}",
        f"t=,v1={MAC}",
        f"t={TS}.0,v1={MAC}",
        f"t=+{TS},v1={MAC}",
        f"t={TS},v1=",
        f"t={TS},v1={MAC[:-2]}",
        "t=1800000000,v1=" + "é" * 64,  # non-ASCII: refused, not a TypeError
        f"t={TS},v1={MAC[:-1]}\u0660",
        "t=\u0661\u0668" + f"00000000,v1={MAC}",  # Arabic-Indic digits that int() accepts
        f"t={TS},v1={MAC}\udc80",  # a lone surrogate
        "=,=",
        ",,,",
    ],
)
def test_verify_answers_false_for_any_other_header(header: str) -> None:
    assert verify(SECRET, header, BODY) is False


@pytest.mark.parametrize("attempt", range(1, 22))  # retries are 0..20, so attempts 1..21
def test_backoff_doubles_up_to_five_minutes_with_jitter(attempt: int) -> None:
    base = min(300.0, 2.0 ** (attempt - 1))
    rng = random.getstate()
    try:
        random.seed(attempt)
        waits = [backoff_s(attempt) for _ in range(200)]
    finally:
        random.setstate(rng)
    assert all(0.8 * base <= w <= 1.2 * base for w in waits), (min(waits), max(waits))
    assert max(waits) - min(waits) > 0.2 * base, "no jitter: retries would stay in lockstep"


def test_backoff_is_monotonic_in_its_base() -> None:
    # The lowest possible wait of attempt n+1 is at least the base of attempt n (until the cap).
    for attempt in range(1, 9):
        assert 0.8 * 2.0**attempt >= 2.0 ** (attempt - 1)
    assert backoff_s(30) <= 1.2 * 300
