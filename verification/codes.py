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
from collections.abc import Sequence

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


# Room for the secret and every previous one (a check tries them all: at most 1 + 16,
# sip_config/settings.py's MAX_PREVIOUS_SECRETS, which it cannot import), and a few more.
@functools.lru_cache(maxsize=24)
def _keyed(secret: bytes) -> hmac.HMAC:
    # Keyed once, copied per code: keying is most of a short HMAC's cost (OpenSSL 3 looks the
    # digest up by name each time); 0.9 us a code against 1.3 us keying anew.
    return hmac.new(secret, digestmod=hashlib.sha256)


def matches(
    secret: bytes,
    verification_id: str,
    code: str,
    hashes: tuple[str, ...],
    previous: Sequence[bytes] = (),
) -> bool:
    """Whether ``code`` is one of the codes sent, compared in constant time.

    A code sent before the secret was changed was hashed with a ``previous`` one
    (``CLINIC_PREVIOUS_SECRETS``): the code is hashed with each secret and every stored hash
    compared with every one (no early exit), so the time taken depends on the number of
    secrets and sends only, never on which secret or send, if any, matched. One answer for
    the check: its caller counts one attempt, however many secrets were tried.
    """
    found = False
    for key in (secret, *previous):
        candidate = code_hash(key, verification_id, code)
        for h in hashes:
            found |= hmac.compare_digest(candidate, h)
    return found


def is_code_syntax(code: str, length: int) -> bool:
    """ASCII digits only, of the verification's length (Unicode digits are refused)."""
    return len(code) == length and code.isascii() and code.isdigit()
