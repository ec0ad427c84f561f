"""HTTP digest authentication for SIP requests outside a call (RFC 2617, RFC 3261 §22.4).

pjsua answers digest challenges for REGISTER and INVITE itself, but a MESSAGE sent with
``Account.sendRequest`` comes back as a final 401/407; the worker answers that challenge once
with the header built here. Pure: no I/O.

A challenge names its realm, and anyone who can send us a response names any realm: with a
realm configured (``CLINIC_SIP_REALM``) only a challenge of that realm is answered, so a far
end that is not the PBX gets no digest of the password for a realm and nonce of its choosing
(:class:`RealmRefused`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

_PARAM = re.compile(r'\s*([A-Za-z-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))\s*,?')
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)


class DigestError(ValueError):
    """A challenge this module cannot answer (not Digest, or an unsupported algorithm)."""


def challenge_params(value: str) -> dict[str, str]:
    """A Digest challenge's parameters, whatever its algorithm (:func:`parse_challenge`
    also refuses one this module cannot answer)."""
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        raise DigestError(f"not a Digest challenge: {scheme}")
    params: dict[str, str] = {}
    for m in _PARAM.finditer(rest):
        params[m.group(1).lower()] = m.group(2) if m.group(2) is not None else m.group(3)
    if "realm" not in params or "nonce" not in params:
        raise DigestError("a Digest challenge needs realm and nonce")
    return params


def parse_challenge(value: str) -> dict[str, str]:
    """``Digest realm="x", nonce="y", qop="auth"`` -> ``{"realm": "x", ...}``."""
    params = challenge_params(value)
    algorithm = params.get("algorithm", "MD5").upper()
    if algorithm != "MD5":
        raise DigestError(f"unsupported digest algorithm {algorithm}")
    return params


class RealmRefused(DigestError):
    """A challenge of a realm other than the one configured: not answered."""

    def __init__(self, realm: str) -> None:
        # repr: the realm is the far end's text, and goes into a log line.
        super().__init__(f"realm {realm!r} is not the configured realm (CLINIC_SIP_REALM)")
        self.realm = realm


def realm_of(challenge: dict[str, str]) -> str:
    """The challenge's realm, its quoted-pairs (``\\x``) resolved: the quoted-string's value."""
    return _QUOTED_PAIR.sub(r"\1", challenge["realm"])


# A-Z to a-z and nothing else: what pjsip's pj_stricmp folds (C's tolower, "C" locale, byte
# by byte), so "Ü" and "ü" stay two realms here as they do there.
_ASCII_FOLD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def same_realm(a: str, b: str) -> bool:
    """Whether realms ``a`` and ``b`` are one, as pjsip decides it.

    RFC 2617 section 1.2 calls the realm case-sensitive and RFC 3261 section 7.3.1 compares a
    quoted-string case and all, but pjsip, which answers the challenges of the workers'
    registration and calls, picks its credentials by ``pj_stricmp`` (``auth_find_cred`` in
    ``sip_auth_client.c``): ASCII letters ignoring case. Matched here, so the flash calls and
    the MESSAGEs answer exactly the challenges the workers answer: with an exact compare,
    ``CLINIC_SIP_REALM=Asterisk`` against Asterisk's ``asterisk`` kept registration and calls
    working while every flash call and SMS over SIP was refused."""
    return a.translate(_ASCII_FOLD) == b.translate(_ASCII_FOLD)


def check_realm(challenge: dict[str, str], realm: str) -> None:
    """Raise :class:`RealmRefused` unless ``challenge`` is of ``realm`` ("": any realm),
    compared as pjsip compares it (:func:`same_realm`: ASCII letters ignoring case); the
    challenge's realm is the quoted-string's value (RFC 3261 section 25.1)."""
    if realm and not same_realm(realm_of(challenge), realm):
        raise RealmRefused(realm_of(challenge))


def _md5(text: str) -> str:
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()


def authorization(
    challenge: dict[str, str],
    *,
    method: str,
    uri: str,
    user: str,
    password: str,
    cnonce: str,
    nc: int = 1,
    realm: str = "",
) -> str:
    """The ``Authorization`` (or ``Proxy-Authorization``) value answering ``challenge``.

    ``realm``: the only realm to answer (:func:`check_realm`); "" answers any."""
    check_realm(challenge, realm)
    nonce = challenge["nonce"]
    ha1 = _md5(f"{user}:{challenge['realm']}:{password}")
    ha2 = _md5(f"{method}:{uri}")
    qops = [q.strip() for q in challenge.get("qop", "").split(",") if q.strip()]
    parts = [
        f'username="{user}"',
        f'realm="{challenge["realm"]}"',
        f'nonce="{nonce}"',
        f'uri="{uri}"',
        "algorithm=MD5",
    ]
    if "auth" in qops:
        count = f"{nc:08x}"
        response = _md5(f"{ha1}:{nonce}:{count}:{cnonce}:auth:{ha2}")
        parts += [f'response="{response}"', "qop=auth", f"nc={count}", f'cnonce="{cnonce}"']
    elif qops:
        raise DigestError(f"unsupported qop {','.join(qops)}")
    else:
        parts.append(f'response="{_md5(f"{ha1}:{nonce}:{ha2}")}"')
    if "opaque" in challenge:
        parts.append(f'opaque="{challenge["opaque"]}"')
    return "Digest " + ", ".join(parts)


def answer(
    challenges: Sequence[str],
    *,
    method: str,
    uri: str,
    user: str,
    password: str,
    cnonce: str,
    realm: str = "",
) -> str:
    """The :func:`authorization` answering the first of ``challenges`` (a response's
    WWW-Authenticate, or Proxy-Authenticate, values in order) that this module can answer
    and that is of ``realm`` ("": any).

    A 401 or 407 may carry several (RFC 3261 section 22.3: one a proxy; RFC 8760: one an
    algorithm), and pjsip, which answers the workers' own, tries each: the first alone
    refused a later one of ``realm``, or an MD5 one after SHA-256's. None answerable: the
    :class:`RealmRefused` of the first of another realm, else the first one's error."""
    errors: list[DigestError] = []
    for value in challenges:
        try:
            return authorization(
                parse_challenge(value),
                method=method,
                uri=uri,
                user=user,
                password=password,
                cnonce=cnonce,
                realm=realm,
            )
        except DigestError as exc:
            errors.append(exc)
    refused = [e for e in errors if isinstance(e, RealmRefused)]
    if refused or errors:
        raise (refused or errors)[0]
    raise DigestError("no Digest challenge")
