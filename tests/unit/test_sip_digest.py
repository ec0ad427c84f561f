"""Digest answers for requests outside a call (RFC 2617 test vector, RFC 3261 forms)."""

from __future__ import annotations

import re

import pytest

from voice.sip.digest import (
    DigestError,
    RealmRefused,
    answer,
    authorization,
    check_realm,
    parse_challenge,
    realm_of,
    same_realm,
)

KELVIN = "\u212a"  # the Kelvin sign


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


# -- CLINIC_SIP_REALM: only the configured realm's challenge is answered ----------------------


@pytest.mark.parametrize(
    ("challenge", "realm", "answered"),
    [
        ('Digest realm="asterisk", nonce="n"', "asterisk", True),
        ('Digest realm="asterisk", nonce="n"', "", True),  # unset: any realm, as before
        ('Digest realm="elsewhere", nonce="n"', "", True),
        ('Digest realm="elsewhere", nonce="n"', "asterisk", False),
        # ASCII letters ignoring case, as pjsip's pj_stricmp picks the workers' credentials
        # (RFC 3261 section 7.3.1 would compare case and all): the two paths never disagree.
        ('Digest realm="Asterisk", nonce="n"', "asterisk", True),
        ('Digest realm="asterisk", nonce="n"', "Asterisk", True),
        ('Digest realm="CLINIC PBX", nonce="n"', "clinic pbx", True),
        # ... and only ASCII letters: pj_stricmp folds bytes with C's tolower.
        ('Digest realm="ZÜRICH PBX", nonce="n"', "zürich pbx", False),
        ('Digest realm="Zürich PBX", nonce="n"', "zürich pbx", True),
        ('Digest realm="İstanbul", nonce="n"', "istanbul", False),  # İ.lower() is "i̇"
        ('Digest realm="K", nonce="n"', KELVIN, False),  # "\u212a".lower() is "k"
        ('Digest realm="asterisk ", nonce="n"', "asterisk", False),
        ('Digest realm="aster", nonce="n"', "asterisk", False),
        ('Digest realm="", nonce="n"', "asterisk", False),
        # Its value: a quoted-pair is the character it escapes (RFC 3261 section 25.1).
        ('Digest realm="a\\sterisk", nonce="n"', "asterisk", True),
        ('Digest realm="clinic \\"pbx\\"", nonce="n"', 'clinic "pbx"', True),
        ("Digest realm=asterisk, nonce=n", "asterisk", True),  # a token, loosely taken
        ('Digest realm="Zürich PBX", nonce="n"', "Zürich PBX", True),
    ],
)
def test_only_the_configured_realm_is_answered(challenge: str, realm: str, answered: bool) -> None:
    parsed = parse_challenge(challenge)
    if answered:
        check_realm(parsed, realm)
        header = authorization(
            parsed,
            method="MESSAGE",
            uri="sip:x@h",
            user="u",
            password="pw",
            cnonce="c",
            realm=realm,
        )
        assert header.startswith("Digest ")
        return
    with pytest.raises(RealmRefused) as err:
        authorization(
            parsed,
            method="MESSAGE",
            uri="sip:x@h",
            user="u",
            password="pw",
            cnonce="c",
            realm=realm,
        )
    assert isinstance(err.value, DigestError), "refused as any challenge it cannot answer"
    assert err.value.realm == realm_of(parsed)
    assert repr(realm_of(parsed)) in str(err.value)


def test_a_refused_realm_is_named_safely_and_nothing_else() -> None:
    # The far end writes the realm: its control characters go into a log line escaped.
    parsed = parse_challenge('Digest realm="evil\\\x1b[2J", nonce="n0nce", qop="auth"')
    with pytest.raises(RealmRefused) as err:
        authorization(
            parsed, method="INVITE", uri="sip:x@h", user="u", password="pw", cnonce="c", realm="r"
        )
    text = str(err.value)
    assert "\x1b" not in text and "\\x1b" in text
    assert "pw" not in text and "n0nce" not in text and "response" not in text


@pytest.mark.parametrize(
    ("challenges", "error"),
    [
        ([], "no Digest challenge"),
        (['Basic realm="x"', 'Digest realm="elsewhere", nonce="n"'], "realm 'elsewhere'"),
        (['Digest realm="r", nonce="n", algorithm=SHA-256'], "unsupported digest algorithm"),
    ],
)
def test_of_several_challenges_none_answerable_names_why(challenges: list[str], error: str) -> None:
    with pytest.raises(DigestError, match=error):
        answer(
            challenges, method="MESSAGE", uri="u", user="u", password="pw", cnonce="c", realm="r"
        )


def test_of_several_challenges_the_first_answerable_one_of_the_realm_is_answered() -> None:
    value = answer(
        [
            'Digest realm="r", nonce="sha", algorithm=SHA-256',
            'Digest realm="elsewhere", nonce="other"',
            'Digest realm="r", nonce="md5"',
            'Digest realm="r", nonce="later"',
        ],
        method="MESSAGE",
        uri="u",
        user="u",
        password="pw",
        cnonce="c",
        realm="r",
    )
    assert _field(value, "nonce") == "md5"


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("asterisk", "asterisk", True),
        ("Asterisk", "asterisk", True),
        ("ASTERISK", "aStErIsK", True),
        ("asterisk", "asterisk ", False),
        ("a-b_c.1", "A-B_C.1", True),
        ("@[`{", "@[`{", True),  # the neighbours of A-Z and a-z fold to nothing
        ("@", "`", False),
        ("[", "{", False),
        ("ÄRZTE", "ärzte", False),  # not ASCII: pjsip's bytes differ, so do these
        ("straße", "STRASSE", False),
        ("", "", True),
    ],
)
def test_realms_compare_as_pjsip_compares_them(a: str, b: str, same: bool) -> None:
    """pj_stricmp: byte by byte, C's tolower (A-Z only). str.lower or casefold would call
    "ÄRZTE" and "ärzte", or "straße" and "STRASSE", one realm where pjsip sees two."""
    assert same_realm(a, b) is same
    assert same_realm(b, a) is same
