"""Keys derived from ``CLINIC_SECRET``, one per use (HKDF-SHA256, RFC 5869).

The secret itself keys the HMAC of codes (:mod:`verification.codes`) and webhook signatures;
every other use gets a key of its own, so what one use reveals tells nothing of another.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def derive(secret: bytes, purpose: str, length: int = 32) -> bytes:
    """The key for ``purpose`` (a fixed label with a version, e.g. ``"call records v1"``)."""
    info = f"clinic-voice {purpose}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)
