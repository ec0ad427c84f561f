"""One-time codes: random digits, kept only as an HMAC bound to their verification.

NIST SP 800-63B asks for >= 20 bits from a CSPRNG (6 digits; the kernel's, through
:mod:`verification.entropy`), OWASP ASVS 2.7 for codes stored only as a hash and bound to
the request that made them: the HMAC key is the service secret and the message is
``id:code``, so a hash leaked from one verification says nothing of another.
"""

from __future__ import annotations

import functools
import hashlib
import hmac

from verification import entropy

MIN_LENGTH = 4
MAX_LENGTH = 8


def new_code(length: int) -> str:
    """``length`` random decimal digits (leading zeros allowed)."""
    if not MIN_LENGTH <= length <= MAX_LENGTH:
        raise ValueError(f"code length must be {MIN_LENGTH}..{MAX_LENGTH}")
    return f"{entropy.below(10**length):0{length}d}"


def code_hash(secret: bytes, verification_id: str, code: str) -> str:
    """The stored form of a code."""
    mac = _keyed(secret).copy()
    mac.update(f"{verification_id}:{code}".encode())
    return mac.hexdigest()


@functools.lru_cache(maxsize=4)
def _keyed(secret: bytes) -> hmac.HMAC:
    # Keyed once, copied per code: keying is most of a short HMAC's cost (OpenSSL 3 looks the
    # digest up by name each time); 0.9 us a code against 1.3 us keying anew.
    return hmac.new(secret, digestmod=hashlib.sha256)


def matches(secret: bytes, verification_id: str, code: str, hashes: tuple[str, ...]) -> bool:
    """Whether ``code`` is one of the codes sent, compared in constant time.

    Every stored hash is compared (no early exit), so the time taken does not say which
    send, if any, matched.
    """
    candidate = code_hash(secret, verification_id, code)
    found = False
    for h in hashes:
        found |= hmac.compare_digest(candidate, h)
    return found


def is_code_syntax(code: str, length: int) -> bool:
    """ASCII digits only, of the verification's length (Unicode digits are refused)."""
    return len(code) == length and code.isascii() and code.isdigit()
