"""Call records in Redis, encrypted at rest, kept ``CLINIC_CALL_RETENTION_DAYS``.

Answers and transcripts are health data. Each record is sealed with AES-256-GCM under a key
derived (HKDF-SHA256) from the service secret, with the call id as associated data, so a record
copied under another id does not open. Redis expires each record after the retention period;
the time index is trimmed on every write.

Records go over the process's one multiplexed Redis connection
(:class:`verification.redis_mux.RedisMux`, any object with its ``execute`` and
``transaction``). They used a pool of 256 connections before: when many calls ended at once
under load, saves waited more than 2 s for a connection and 360 records of 8,000 calls were
lost (bench/asterisk_compare.py inbound steps at 287-345 calls/s, 2026-12-03). A save is
idempotent (the same SET and ZADD again), so a failed one is tried again with backoff for up to
:data:`SAVE_PATIENCE_S` (not after the client was closed, at shutdown) before it fails; the
clinic line then keeps the sealed record on disk until Redis takes it (voice/ivr/journal.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from redis.exceptions import RedisError, ResponseError

from verification import keys
from voice.ivr.call_record import CallResult

log = logging.getLogger(__name__)

INDEX = "cv:calls"
PAGE_MAX = 100
SAVE_PATIENCE_S = 30.0  # how long a record's save is tried again before it is given up
_RETRY_FIRST_S = 0.2
_RETRY_MAX_S = 2.0

Command = Sequence[str | bytes | int | float]


class RedisCommands(Protocol):
    """What the store needs of a Redis client (``verification.redis_mux.RedisMux`` has it)."""

    async def execute(self, *command: str | bytes | int | float) -> Any: ...

    async def transaction(self, commands: Sequence[Command]) -> list[Any]: ...

    @property
    def closed(self) -> bool: ...


class CallStoreUnavailable(RuntimeError):
    """Redis could not be reached."""


class CallRecordUnreadable(RuntimeError):
    """A record in Redis that does not open with this service's key: sealed under another
    ``CLINIC_SECRET`` (changed as README says, within the retention), or damaged."""


def _key(call_id: str) -> str:
    return f"cv:call:{call_id}"


def _scored(reply: list[Any]) -> list[tuple[str, float]]:
    """(member, score) from a WITHSCORES reply: flat in RESP2, pairs in RESP3."""
    if reply and isinstance(reply[0], list):
        return [(str(m), float(sc)) for m, sc in reply]
    return [(str(reply[i]), float(reply[i + 1])) for i in range(0, len(reply), 2)]


@dataclass(frozen=True, slots=True)
class SealedRecord:
    """A call record as Redis holds it (``sealed``), with the times its key and index need."""

    call_id: str
    sealed: str
    started_at: float
    ended_at: float


@dataclass(frozen=True, slots=True)
class Page:
    calls: list[dict[str, Any]]
    next_cursor: str | None


class CallStore:
    """Sealed call records with a time index for paging."""

    def __init__(
        self,
        redis: RedisCommands,
        secret: bytes,
        retention_days: int,
        *,
        save_patience_s: float = SAVE_PATIENCE_S,
    ) -> None:
        self._r = redis
        self._patience_s = save_patience_s
        self._aead = AESGCM(keys.derive(secret, "call records v1"))
        self._ttl_s = retention_days * 86400
        self._unreadable: set[str] = set()  # logged once each

    def seal(self, call_id: str, doc: dict[str, Any]) -> str:
        nonce = os.urandom(12)
        blob = self._aead.encrypt(nonce, json.dumps(doc).encode(), call_id.encode())
        return base64.b64encode(nonce + blob).decode()

    def open(self, call_id: str, sealed: str) -> dict[str, Any]:
        raw = base64.b64decode(sealed)
        doc: dict[str, Any] = json.loads(self._aead.decrypt(raw[:12], raw[12:], call_id.encode()))
        return doc

    @property
    def ttl_s(self) -> int:
        """How long Redis keeps a record (``CLINIC_CALL_RETENTION_DAYS``), in seconds."""
        return self._ttl_s

    def seal_result(self, result: CallResult) -> SealedRecord:
        return SealedRecord(
            result.id, self.seal(result.id, result.to_json()), result.started_at, result.ended_at
        )

    def reopen(self, call_id: str, sealed: str) -> SealedRecord:
        """A sealed record kept elsewhere, checked under ``call_id`` (raises ``InvalidTag``
        for another id or key, ``ValueError``/``KeyError`` for one that is not a record)."""
        doc = self.open(call_id, sealed)
        started = datetime.fromisoformat(doc["started_at"]).timestamp()
        ended = datetime.fromisoformat(doc["ended_at"]).timestamp()
        return SealedRecord(call_id, sealed, started, ended)

    async def save(self, result: CallResult) -> None:
        """Write the record and index it; tried again while Redis fails, up to the patience."""
        await self.save_sealed(self.seal_result(result))

    async def save_sealed(
        self,
        record: SealedRecord,
        *,
        ttl_s: int | None = None,
        patience_s: float | None = None,
        only_new: bool = False,
    ) -> None:
        """Write a sealed record, to expire in ``ttl_s`` (default: the retention), trying
        again while Redis fails for ``patience_s`` (default: the store's save patience);
        ``only_new``: not over a record of the same call already there."""
        ttl = self._ttl_s if ttl_s is None else ttl_s
        commands: list[Command] = [
            ("SET", _key(record.call_id), record.sealed, "EX", ttl, *(("NX",) if only_new else ())),
            ("ZADD", INDEX, repr(record.started_at), record.call_id),
            ("ZREMRANGEBYSCORE", INDEX, "-inf", repr(record.started_at - self._ttl_s)),
        ]
        loop = asyncio.get_running_loop()
        give_up = loop.time() + (self._patience_s if patience_s is None else patience_s)
        pause = _RETRY_FIRST_S
        while True:
            try:
                answers = await self._r.transaction(commands)
            except ResponseError as exc:  # Redis refused the commands: trying again won't help
                raise CallStoreUnavailable(str(exc)) from exc
            except (RedisError, OSError) as exc:
                if self._r.closed or loop.time() + pause > give_up:
                    raise CallStoreUnavailable(str(exc)) from exc
                log.warning(
                    "call %s: saving the record failed (%s): trying again", record.call_id, exc
                )
            else:
                # A command that failed inside EXEC (WRONGTYPE...) is an answer, not a raise.
                refused = [a for a in answers if isinstance(a, Exception)]
                if refused:
                    raise CallStoreUnavailable(str(refused[0]))
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, _RETRY_MAX_S)

    async def get(self, call_id: str) -> dict[str, Any] | None:
        try:
            sealed = await self._r.execute("GET", _key(call_id))
        except (RedisError, OSError) as exc:
            raise CallStoreUnavailable(str(exc)) from exc
        return None if sealed is None else self._open_stored(call_id, str(sealed))

    def _open_stored(self, call_id: str, sealed: str) -> dict[str, Any]:
        """A record as Redis holds it, opened; :class:`CallRecordUnreadable` (logged once per
        call) when it does not open with this service's key."""
        try:
            return self.open(call_id, sealed)
        except (InvalidTag, ValueError, TypeError) as exc:  # binascii.Error is a ValueError
            if call_id not in self._unreadable:
                self._unreadable.add(call_id)
                log.error(
                    "call %s: the record in Redis does not open with this service's key "
                    "(sealed under another CLINIC_SECRET, or damaged): %s",
                    call_id,
                    type(exc).__name__,
                )
            raise CallRecordUnreadable(call_id) from exc

    async def recent(self, limit: int, before: float | None) -> Page:
        """Newest first; ``before`` is the cursor (a start time) of the previous page."""
        limit = max(1, min(limit, PAGE_MAX))
        top = f"({before!r}" if before is not None else "+inf"
        try:
            flat = await self._r.execute(
                "ZREVRANGEBYSCORE", INDEX, top, "-inf", "WITHSCORES", "LIMIT", 0, limit + 1
            )
            rows = _scored(flat)
            ids = [r[0] for r in rows[:limit]]
            sealed = await self._r.execute("MGET", *[_key(i) for i in ids]) if ids else []
        except (RedisError, OSError) as exc:
            raise CallStoreUnavailable(str(exc)) from exc
        calls = []
        for i, s in zip(ids, sealed, strict=True):
            if s is None:
                continue
            try:
                calls.append(self._open_stored(i, str(s)))
            except CallRecordUnreadable:
                continue  # one unreadable record must not hide every other call
        more = len(rows) > limit
        return Page(calls, repr(float(rows[limit - 1][1])) if more and rows else None)
