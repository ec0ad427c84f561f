"""HTTP digest authentication for SIP requests outside a call (RFC 2617, RFC 3261 §22.4).

pjsua answers digest challenges for REGISTER and INVITE itself, but a MESSAGE sent with
``Account.sendRequest`` comes back as a final 401/407; the worker answers that challenge once
with the header built here. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import re

_PARAM = re.compile(r'\s*([A-Za-z-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))\s*,?')


class DigestError(ValueError):
    """A challenge this module cannot answer (not Digest, or an unsupported algorithm)."""


def parse_challenge(value: str) -> dict[str, str]:
    """``Digest realm="x", nonce="y", qop="auth"`` -> ``{"realm": "x", ...}``."""
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        raise DigestError(f"not a Digest challenge: {scheme}")
    params: dict[str, str] = {}
    for m in _PARAM.finditer(rest):
        params[m.group(1).lower()] = m.group(2) if m.group(2) is not None else m.group(3)
    if "realm" not in params or "nonce" not in params:
        raise DigestError("a Digest challenge needs realm and nonce")
    algorithm = params.get("algorithm", "MD5").upper()
    if algorithm != "MD5":
        raise DigestError(f"unsupported digest algorithm {algorithm}")
    return params


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
) -> str:
    """The ``Authorization`` (or ``Proxy-Authorization``) value answering ``challenge``."""
    realm, nonce = challenge["realm"], challenge["nonce"]
    ha1 = _md5(f"{user}:{realm}:{password}")
    ha2 = _md5(f"{method}:{uri}")
    qops = [q.strip() for q in challenge.get("qop", "").split(",") if q.strip()]
    parts = [
        f'username="{user}"',
        f'realm="{realm}"',
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
