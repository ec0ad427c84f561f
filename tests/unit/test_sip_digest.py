"""Digest answers for requests outside a call (RFC 2617 test vector, RFC 3261 forms)."""

from __future__ import annotations

import re

import pytest

from voice.sip.digest import DigestError, authorization, parse_challenge


def _field(header: str, name: str) -> str:
    m = re.search(rf'{name}="?([^",]+)"?', header)
    assert m, f"{name} missing from {header}"
    return m.group(1)


def test_rfc2617_example_vector() -> None:
    challenge = parse_challenge(
        'Digest realm="testrealm@host.com", qop="auth,auth-int", '
        'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", opaque="5ccc069c403ebaf9f0171e9517f40e41"'
    )
    header = authorization(
        challenge,
        method="GET",
        uri="/dir/index.html",
        user="Mufasa",
        password="Circle Of Life",
        cnonce="0a4f113b",
    )
    assert _field(header, "response") == "6629fae49393a05397450978507c4ef1"
    assert _field(header, "opaque") == "5ccc069c403ebaf9f0171e9517f40e41"
    assert "nc=00000001" in header


def test_without_qop_uses_rfc2069_response() -> None:
    challenge = parse_challenge('Digest realm="asterisk",nonce="abc"')
    header = authorization(
        challenge, method="MESSAGE", uri="sip:+1@h", user="u", password="p", cnonce="c"
    )
    assert "qop" not in header
    assert len(_field(header, "response")) == 32


def test_a_wrong_password_gives_another_response() -> None:
    challenge = parse_challenge('Digest realm="r", nonce="n", qop="auth"')
    a = authorization(
        challenge, method="MESSAGE", uri="sip:x@h", user="u", password="p1", cnonce="c"
    )
    b = authorization(
        challenge, method="MESSAGE", uri="sip:x@h", user="u", password="p2", cnonce="c"
    )
    assert _field(a, "response") != _field(b, "response")


@pytest.mark.parametrize(
    "value",
    ['Basic realm="x"', 'Digest realm="x"', 'Digest realm="x", nonce="y", algorithm=SHA-256'],
)
def test_challenges_it_cannot_answer_are_refused(value: str) -> None:
    with pytest.raises(DigestError):
        parse_challenge(value)
