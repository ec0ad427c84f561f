"""Call records in Redis, encrypted at rest, kept ``CLINIC_CALL_RETENTION_DAYS``.

Answers and transcripts are health data. Each record is sealed with AES-256-GCM under a key
derived (HKDF-SHA256) from the service secret, with the call id as associated data, so a record
copied under another id does not open. Redis expires each record after the retention period;
the time index is trimmed on every write.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from redis.exceptions import RedisError

from voice.ivr.call_record import CallResult

INDEX = "cv:calls"
PAGE_MAX = 100


class CallStoreUnavailable(RuntimeError):
    """Redis could not be reached."""


def _key(call_id: str) -> str:
    return f"cv:call:{call_id}"


def derive_key(secret: bytes) -> bytes:
    """The record key: independent of the code-hashing use of the same secret."""
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"clinic-voice call records v1"
    ).derive(secret)


@dataclass(frozen=True, slots=True)
class Page:
    calls: list[dict[str, Any]]
    next_cursor: str | None


class CallStore:
    """Sealed call records with a time index for paging."""

    def __init__(self, redis: aioredis.Redis, secret: bytes, retention_days: int) -> None:
        self._r = redis
        self._aead = AESGCM(derive_key(secret))
        self._ttl_s = retention_days * 86400

    def seal(self, call_id: str, doc: dict[str, Any]) -> str:
        nonce = os.urandom(12)
        blob = self._aead.encrypt(nonce, json.dumps(doc).encode(), call_id.encode())
        return base64.b64encode(nonce + blob).decode()

    def open(self, call_id: str, sealed: str) -> dict[str, Any]:
        raw = base64.b64decode(sealed)
        doc: dict[str, Any] = json.loads(self._aead.decrypt(raw[:12], raw[12:], call_id.encode()))
        return doc

    async def save(self, result: CallResult) -> None:
        sealed = self.seal(result.id, result.to_json())
        try:
            async with self._r.pipeline(transaction=True) as p:
                p.set(_key(result.id), sealed, ex=self._ttl_s)
                p.zadd(INDEX, {result.id: result.started_at})
                p.zremrangebyscore(INDEX, "-inf", result.started_at - self._ttl_s)
                await p.execute()
        except (RedisError, OSError) as exc:
            raise CallStoreUnavailable(str(exc)) from exc

    async def get(self, call_id: str) -> dict[str, Any] | None:
        try:
            sealed = await self._r.get(_key(call_id))
        except (RedisError, OSError) as exc:
            raise CallStoreUnavailable(str(exc)) from exc
        return None if sealed is None else self.open(call_id, str(sealed))

    async def recent(self, limit: int, before: float | None) -> Page:
        """Newest first; ``before`` is the cursor (a start time) of the previous page."""
        limit = max(1, min(limit, PAGE_MAX))
        top = f"({before!r}" if before is not None else "+inf"
        try:
            rows = await self._r.zrevrangebyscore(
                INDEX, top, "-inf", start=0, num=limit + 1, withscores=True
            )
            ids = [str(r[0]) for r in rows[:limit]]
            sealed = await self._r.mget([_key(i) for i in ids]) if ids else []
        except (RedisError, OSError) as exc:
            raise CallStoreUnavailable(str(exc)) from exc
        calls = [self.open(i, str(s)) for i, s in zip(ids, sealed, strict=True) if s is not None]
        more = len(rows) > limit
        return Page(calls, repr(float(rows[limit - 1][1])) if more and rows else None)
