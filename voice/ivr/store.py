"""Call records in Redis, encrypted at rest, kept ``CLINIC_CALL_RETENTION_DAYS``.

Answers and transcripts are health data. Each record is sealed with AES-256-GCM under a key
derived (HKDF-SHA256) from the service secret, with the call id as associated data, so a record
copied under another id does not open. A record sealed before the secret was changed opens
with the key of a previous secret (``CLINIC_PREVIOUS_SECRETS``, :meth:`CallStore.open`); every
record is sealed under the current secret's. The retention counts from the call's start, for the
record (Redis expires it ``CLINIC_CALL_RETENTION_DAYS`` after its call began, however late it is
saved: at the call's end, after tries while Redis was down, from the journal after Redis came
back, or as the live record of a call a kill cut), its index entry, and its voicemail
(voice/ivr/voicemail.py): one instant, ``started_at + retention`` on the service's wall clock,
so none outlives another (:func:`within_retention`). The time a record has left is reckoned
at each try, to the millisecond, and never capped: a start ahead of the clock (the wall clock
stepped back during the call) keeps the record until that instant, as the message file dated
by the start is kept, rather than a retention from the save, which expired the record up to
the step before its message. Redis counts the time left on its own clock; the embedded Redis
shares the service's. The time index is trimmed on every write, every read and every erasure,
and expires a retention after the last save, or when its newest entry is past its retention if
that is later (a quiet line keeps no call ids and start times past their records).

A call can be erased (:meth:`CallStore.erase`, ``DELETE /v1/calls/{id}``): its record and index
entry go, and a mark ``cv:erased:<id>`` stays for the retention period. Every save checks the
mark in the same script that writes, so no copy of the record kept on disk (the journal, a live
call's record) brings an erased call back: each such copy is of a call that ended before the
erasure, and a replay drops it once past its retention, which the mark outlives.

Records go over the process's one multiplexed Redis connection
(:class:`verification.redis_mux.RedisMux`, any object with its ``execute``, ``evalsha`` and
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
import math
import os
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from redis.exceptions import RedisError, ResponseError

from sip_config.clock import Clock, SystemClock
from verification import keys
from verification.redis_mux import Script
from voice.ivr.call_record import CallResult
from voice.ivr.cursor import Cursor

log = logging.getLogger(__name__)

INDEX = "cv:calls"
ERASED_PREFIX = "cv:erased:"  # + call id: the call was erased (kept the retention period)
# + call id: when staff marked the call handled (PUT /v1/calls/{id}/handled), an ISO time; it
# lives as long as the call's record, and an erasure deletes it. No health data: a time.
HANDLED_PREFIX = "cv:handled:"
# Set by an erasure: the embedded Redis's append-only file is rewritten soon after (serve's
# compaction, clinic_voice/redis_server.py), not only at the daily one. It expires after a
# day, by which the daily rewrite has run: a Redis nobody compacts keeps no flag for good.
COMPACT_ASKED = "cv:aof-compact-asked"
COMPACT_ASKED_TTL_S = 86400
PAGE_MAX = 100
# How many calls a page read examines at most when it lists only some of them
# (``GET /v1/calls?needs_call_back=true``): five reads of PAGE_MAX records, each the work of
# an unfiltered page of 100 (an MGET, then opening each record between two awaits), so a line
# with a few calls to return among thousands answers within a bounded time; the page then
# holds what matched among them, even none, and its cursor goes on from the last one read.
EXAMINED_MAX = 500
# The records (and voicemail messages: voice/ivr/voicemail.py) that do not open, logged once
# each, that are remembered: past this many, the oldest is forgotten (logged again if read
# again), so a process that runs for months with records sealed under a lost secret does not
# grow for good. 4096 names: ~0.5 MiB.
UNREADABLE_REMEMBERED = 4096
SAVE_PATIENCE_S = 30.0  # how long a record's save is tried again before it is given up
_RETRY_FIRST_S = 0.2
_RETRY_MAX_S = 2.0

Command = Sequence[str | bytes | int | float]


class RedisCommands(Protocol):
    """What the store needs of a Redis client (``verification.redis_mux.RedisMux`` has it)."""

    async def execute(self, *command: str | bytes | int | float) -> Any: ...

    async def transaction(self, commands: Sequence[Command]) -> list[Any]: ...

    async def evalsha(
        self, script: Script, keys: Sequence[str], args: Sequence[str | bytes | int | float]
    ) -> Any: ...

    @property
    def closed(self) -> bool: ...


class CallStoreUnavailable(RuntimeError):
    """Redis could not be reached."""


class CallRecordUnreadable(RuntimeError):
    """A record in Redis that does not open with this service's keys: sealed under another
    ``CLINIC_SECRET`` not in ``CLINIC_PREVIOUS_SECRETS`` (changed within the retention), or
    damaged."""


def _key(call_id: str) -> str:
    return f"cv:call:{call_id}"


def _records_key(secret: bytes) -> bytes:
    return keys.derive(secret, "call records v1")


def _erased_key(call_id: str) -> str:
    return f"{ERASED_PREFIX}{call_id}"


def _handled_key(call_id: str) -> str:
    return f"{HANDLED_PREFIX}{call_id}"


# A save: the record (ARGV[2]: the milliseconds it has left; ARGV[6] '1', only_new: NX, only
# when none is there), its index entry, the index trimmed of the calls past their retention
# (ARGV[5]: now less the retention, as a read and an erasure trim it; the saved call's start
# less it trimmed calls still within it when that start was ahead of the clock, a clock that
# stepped back during the call) and given as expiry the retention (ARGV[7], in ms) or the
# record's time left if longer (a start ahead of the clock), never less than it had (an entry
# saved before may start later than this one) -- unless the call was erased. One script, so no
# save slips in between the check and an erasure: MULTI cannot read a key before it writes.
# 0: erased, nothing written; 1: the record written; 2: only_new and a record of the call was
# there: it is kept as it is (its value and expiry; the index entry is written as for 1).
# A SET NX that sets nothing answers nil, which a script reads as false. PTTL of the index,
# just written: -1 when it has no expiry yet.
_SAVE = Script("""
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local done = 1
if ARGV[6] == '1' then
  if not redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX') then done = 2 end
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[5])
local keep = math.max(tonumber(ARGV[7]), tonumber(ARGV[2]))
if redis.call('PTTL', KEYS[2]) < keep then redis.call('PEXPIRE', KEYS[2], keep) end
return done
""")

# An erasure: the record, its index entry and staff's handled mark (KEYS[5]) go, the mark is
# set (or its time renewed, a retry finishing the files), and a compaction is asked for.
# Nothing is written for a call nothing is known of (ARGV[3] '0': no copy on disk either), so
# a mistyped id marks nothing. The index
# is trimmed first (ARGV[5]: the oldest start within the retention): on a quiet line (no save
# nor list read since) the entry of a call past its retention is still there, and a ZREM that
# found it answered 204 for a call the API no longer knows (README: 404).
# The mark lives the retention (ARGV[2], in ms), or longer if the record, its index entry (its
# start less ARGV[5]) or a mark already there has longer to live: a call that began ahead of
# the clock (it stepped back since) has copies that live until its start plus the retention,
# and the mark must outlive each of them.
# 0: unknown; 1: marked, no record in Redis (erased before, or only on disk); 2: the record
# was deleted.
_ERASE = Script("""
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[5])
local keep = math.max(tonumber(ARGV[2]), redis.call('PTTL', KEYS[1]), redis.call('PTTL', KEYS[3]))
local started = redis.call('ZSCORE', KEYS[2], ARGV[1])
if started then
  keep = math.max(keep, math.ceil((tonumber(started) - tonumber(ARGV[5])) * 1000))
end
local had = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[5])
local listed = redis.call('ZREM', KEYS[2], ARGV[1])
local marked = redis.call('EXISTS', KEYS[3])
if had == 0 and listed == 0 and marked == 0 and ARGV[3] == '0' then return 0 end
redis.call('SET', KEYS[3], '1', 'PX', keep)
redis.call('SET', KEYS[4], '1', 'EX', ARGV[4])
return 1 + had
""")


# Staff mark a call handled (ARGV[1]: the time, kept if the call is marked already) or not
# (ARGV[1] ''): only a call whose record Redis holds, and the mark expires with the record
# (PTTL: -1 none, as a record saved without expiry; -2 no record). One script: a record
# expiring or erased between a check and a SET would leave a mark of no call.
# 0: no record, nothing written; 1: done.
_HANDLE = Script("""
local left = redis.call('PTTL', KEYS[1])
if left == -2 then return 0 end
if ARGV[1] == '' then redis.call('DEL', KEYS[2]) return 1 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 1 end
if left == -1 then redis.call('SET', KEYS[2], ARGV[1]) else
  redis.call('SET', KEYS[2], ARGV[1], 'PX', left) end
return 1
""")


# A record sealed anew under the current key (``clinic-voice secret reseal``, voice/ivr/
# reseal.py) takes the place of the one read only if that is still there, unchanged (not saved
# over, expired or deleted meanwhile), and its call is not marked erased; it keeps the time it
# had left (KEEPTTL). One script, as _SAVE: a GET then a SET could write an erased call back.
# 0: changed or gone meanwhile, nothing written; 1: replaced; 2: erased, nothing written.
_RESEAL = Script("""
if redis.call('EXISTS', KEYS[2]) == 1 then return 2 end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
return 1
""")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def remaining_ttl_ms(started_at: float, now: float, retention_s: int) -> int | None:
    """Milliseconds a record of a call that began at ``started_at`` has left to live at
    ``now`` (rounded up), or None when it is past its retention (:func:`within_retention`).
    Not capped at the retention: a start ahead of ``now`` (the clock stepped back since)
    keeps the record until its start plus the retention, when its message goes."""
    left = math.ceil((started_at + retention_s - now) * 1000)
    return left if left >= 1 and within_retention(started_at, now, retention_s) else None


def within_retention(started_at: float, now: float, retention_s: float) -> bool:
    """Whether a call that began at ``started_at`` is within its retention at ``now``: one
    test for its record, its index entry (listed while its start is above ``now`` less the
    retention), its voicemail and its copies on disk, so that at no instant does the API
    answer for one of them and not for another."""
    return started_at > now - retention_s


class LoggedOnce:
    """The names (call ids, message file names) of what was logged once each: the oldest
    forgotten past :data:`UNREADABLE_REMEMBERED` (insertion order)."""

    def __init__(self) -> None:
        self._names: OrderedDict[str, None] = OrderedDict()
        self._max = UNREADABLE_REMEMBERED

    def first(self, name: str) -> bool:
        """True the first time ``name`` is met (remembered from then on), False after."""
        if name in self._names:
            return False
        self._names[name] = None
        if len(self._names) > self._max:
            self._names.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"LoggedOnce({list(self._names)!r})"


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
    next_cursor: Cursor | None  # where the next page begins; None after the last
    # When staff marked each call of the page handled, for those marked (read with them).
    handled: dict[str, str] = field(default_factory=dict)


# Which calls a page lists (:meth:`CallStore.recent`): given a record and when staff marked
# it handled (None: not marked).
Keep = Callable[[dict[str, Any], str | None], bool]


class Saved(Enum):
    """What :meth:`CallStore.save_sealed` did in Redis (``_SAVE``'s answer)."""

    ERASED = 0  # the call was erased: nothing written (the caller drops its copy)
    WRITTEN = 1  # the record was written and indexed
    KEPT = 2  # only_new, and a record of the call was there already: that one kept


class Erased(Enum):
    """What :meth:`CallStore.erase` found in Redis."""

    UNKNOWN = 0  # nothing of the call (and none on disk, said the caller): nothing written
    MARKED = 1  # no record (erased before, past its retention, or only on disk): marked
    RECORD = 2  # its record was there: deleted, and the call marked


class Replaced(Enum):
    """What :meth:`CallStore.replace_sealed` found in Redis."""

    GONE = 0  # the record changed, expired or was deleted meanwhile: nothing written
    REPLACED = 1  # the record sealed anew took its place, with the time it had left
    ERASED = 2  # the call was erased meanwhile: nothing written


class CallStore:
    """Sealed call records with a time index for paging."""

    def __init__(
        self,
        redis: RedisCommands,
        secret: bytes,
        retention_days: int,
        *,
        previous_secrets: Sequence[bytes] = (),
        save_patience_s: float = SAVE_PATIENCE_S,
        clock: Clock | None = None,
    ) -> None:
        self._r = redis
        self._clock = clock or SystemClock()  # for the index's trim on read
        self._patience_s = save_patience_s
        self._aead = AESGCM(_records_key(secret))
        # Opening tries the current key, then each previous one in the order given. No key id
        # in the sealed form: GCM's tag tells a wrong key (2^-128 to pass by chance) for ~2.4
        # us a record (sip_config/settings.py: MAX_PREVIOUS_SECRETS), records sealed before
        # this change open unchanged, and an older build still reads what this one seals.
        self._openers = (self._aead, *(AESGCM(_records_key(s)) for s in previous_secrets))
        self._ttl_s = retention_days * 86400
        self._unreadable = LoggedOnce()  # the records that do not open, logged once each

    def seal(self, call_id: str, doc: dict[str, Any]) -> str:
        return self._seal_plain(call_id, json.dumps(doc).encode())

    def _seal_plain(self, bound: str, plain: bytes) -> str:
        nonce = os.urandom(12)
        blob = self._aead.encrypt(nonce, plain, bound.encode())
        return base64.b64encode(nonce + blob).decode()

    def reseal(self, bound: str, sealed: str) -> str | None:
        """``sealed`` (a record, a record kept on disk, or a voicemail, bound to ``bound``: its
        call id or file name) sealed anew under the current secret's key when only a previous
        one's opens it; None when the current key opens it already. Raises ``InvalidTag``
        (or ``ValueError``, ``TypeError`` for what is no sealed text) when no key opens it. The
        content is carried over byte for byte, never parsed."""
        which, plain = self._decrypt(bound, sealed)
        return None if which == 0 else self._seal_plain(bound, plain)

    def open(self, call_id: str, sealed: str) -> dict[str, Any]:
        """What :meth:`seal` sealed under ``call_id``, with the current secret's key or a
        previous one's; ``InvalidTag`` when none opens it (another secret, another id, or
        damaged)."""
        doc: dict[str, Any] = json.loads(self._decrypt(call_id, sealed)[1])
        return doc

    def _decrypt(self, bound: str, sealed: str) -> tuple[int, bytes]:
        """``sealed`` opened under the first key that opens it: (its index, 0 the current
        secret's, and the plain text). Raises ``InvalidTag`` when none does (``ValueError``,
        ``TypeError`` for what is no sealed text)."""
        raw = base64.b64decode(sealed)
        nonce, blob, ad = raw[:12], raw[12:], bound.encode()
        for which, aead in enumerate(self._openers):
            try:
                return which, aead.decrypt(nonce, blob, ad)
            except InvalidTag:
                continue  # a wrong key's tag: the next key
        raise InvalidTag

    @property
    def ttl_s(self) -> int:
        """How long Redis keeps a record (``CLINIC_CALL_RETENTION_DAYS``), in seconds."""
        return self._ttl_s

    def ms_left(self, started_at: float) -> int | None:
        """Milliseconds a record of a call that began at ``started_at`` has left to live
        now (the store's clock: :func:`remaining_ttl_ms`); None when it is past its
        retention."""
        return remaining_ttl_ms(started_at, self._clock.now(), self._ttl_s)

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
        """Write the record and index it; tried again while Redis fails, up to the patience
        (nothing is written for a call erased meanwhile)."""
        await self.save_sealed(self.seal_result(result))

    async def save_sealed(
        self,
        record: SealedRecord,
        *,
        ttl_s: int | None = None,
        patience_s: float | None = None,
        only_new: bool = False,
    ) -> Saved:
        """Write a sealed record, to expire in ``ttl_s`` (default: what is left of the
        retention from its call's start, :meth:`ms_left`, reckoned at each try, at least a
        millisecond), trying again while Redis fails for ``patience_s`` (default: the
        store's save patience); ``only_new``: not over a record of the same call already
        there (:attr:`Saved.KEPT`: nothing of it written). :attr:`Saved.ERASED` when the
        call was erased (nothing written: the caller drops its copy)."""
        keys = (_key(record.call_id), INDEX, _erased_key(record.call_id))
        loop = asyncio.get_running_loop()
        give_up = loop.time() + (self._patience_s if patience_s is None else patience_s)
        pause = _RETRY_FIRST_S
        while True:
            # Reckoned anew at each try: one reckoned before a wait for Redis kept the record
            # that much past its index entry and its message.
            left_ms = ttl_s * 1000 if ttl_s is not None else self.ms_left(record.started_at)
            args = (
                record.sealed,
                max(1, left_ms or 0),
                repr(record.started_at),
                record.call_id,
                repr(self._clock.now() - self._ttl_s),
                "1" if only_new else "0",
                self._ttl_s * 1000,
            )
            try:
                answer = await self._r.evalsha(_SAVE, keys, args)
            except ResponseError as exc:  # refused (full, WRONGTYPE): trying again won't help
                raise CallStoreUnavailable(str(exc)) from exc
            except (RedisError, OSError) as exc:
                if self._r.closed or loop.time() + pause > give_up:
                    raise CallStoreUnavailable(str(exc)) from exc
                log.warning(
                    "call %s: saving the record failed (%s): trying again", record.call_id, exc
                )
            else:
                saved = Saved(int(answer))
                if saved is Saved.ERASED:
                    log.info("call %s: erased: its record is not saved", record.call_id)
                return saved
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
        call) when it does not open with this service's keys."""
        try:
            return self.open(call_id, sealed)
        except (InvalidTag, ValueError, TypeError) as exc:  # binascii.Error is a ValueError
            if self._unreadable.first(call_id):
                log.error(
                    "call %s: the record in Redis does not open with this service's keys "
                    "(sealed under a CLINIC_SECRET not in CLINIC_PREVIOUS_SECRETS, or "
                    "damaged): %s",
                    call_id,
                    type(exc).__name__,
                )
            raise CallRecordUnreadable(call_id) from exc

    async def erase(self, call_id: str, *, on_disk: bool) -> Erased:
        """Delete the call's record and index entry, and mark the call erased for the
        retention period, or as long as its record or entry had left if longer (no save
        writes it back meanwhile). ``on_disk``: a copy of the call is on disk (the journal,
        voicemail), so it is marked even with nothing in Redis. One try: raises
        :class:`CallStoreUnavailable`, nothing changed, when Redis fails."""
        keys = (_key(call_id), INDEX, _erased_key(call_id), COMPACT_ASKED, _handled_key(call_id))
        oldest = repr(self._clock.now() - self._ttl_s)
        args = (call_id, self._ttl_s * 1000, "1" if on_disk else "0", COMPACT_ASKED_TTL_S, oldest)
        try:
            done = await self._r.evalsha(_ERASE, keys, args)
        except (RedisError, OSError) as exc:
            raise CallStoreUnavailable(str(exc)) from exc
        return Erased(int(done))

    async def mark_handled(self, call_id: str, handled: bool) -> bool:
        """Mark the call handled by staff (now, by the store's clock; a call marked already
        keeps its first time) or not; False when Redis holds no record of it (never was, past
        its retention, erased, still under way, or its record waits on disk until Redis takes
        it). Raises :class:`CallStoreUnavailable`."""
        at = _iso(self._clock.now()) if handled else ""
        keys = (_key(call_id), _handled_key(call_id))
        try:
            done = await self._r.evalsha(_HANDLE, keys, (at,))
        except (RedisError, OSError) as exc:
            raise CallStoreUnavailable(str(exc)) from exc
        return bool(int(done))

    async def handled_at(self, call_ids: Sequence[str]) -> dict[str, str]:
        """When staff marked each of ``call_ids`` handled, for those marked (raises
        :class:`CallStoreUnavailable`)."""
        if not call_ids:
            return {}
        try:
            marks = await self._r.execute("MGET", *[_handled_key(i) for i in call_ids])
        except (RedisError, OSError) as exc:
            raise CallStoreUnavailable(str(exc)) from exc
        return {i: str(m) for i, m in zip(call_ids, marks, strict=True) if m is not None}

    async def replace_sealed(self, call_id: str, read: str, resealed: str) -> Replaced:
        """Put ``resealed`` (:meth:`reseal` of ``read``) in place of the record of ``call_id``
        if Redis still holds exactly ``read`` and the call is not marked erased, keeping the
        time the record has left. One try: raises :class:`CallStoreUnavailable` when Redis
        fails or refuses (full, read-only), nothing changed then."""
        keys = (_key(call_id), _erased_key(call_id))
        try:
            done = await self._r.evalsha(_RESEAL, keys, (read, resealed))
        except (RedisError, OSError) as exc:
            raise CallStoreUnavailable(str(exc)) from exc
        return Replaced(int(done))

    async def is_erased(self, call_id: str) -> bool:
        """Whether ``call_id`` is marked erased (raises :class:`CallStoreUnavailable`)."""
        try:
            return bool(await self._r.execute("EXISTS", _erased_key(call_id)))
        except (RedisError, OSError) as exc:
            raise CallStoreUnavailable(str(exc)) from exc

    async def erased_among(self, call_ids: Sequence[str], batch: int = 500) -> set[str]:
        """Those of ``call_ids`` marked erased, ``batch`` marks to an MGET (raises
        :class:`CallStoreUnavailable`)."""
        found: set[str] = set()
        try:
            for at in range(0, len(call_ids), batch):
                some = call_ids[at : at + batch]
                marks = await self._r.execute("MGET", *[_erased_key(i) for i in some])
                found.update(i for i, m in zip(some, marks, strict=True) if m is not None)
        except (RedisError, OSError) as exc:
            raise CallStoreUnavailable(str(exc)) from exc
        return found

    async def sealed_records(self, batch: int = 500) -> AsyncIterator[list[tuple[str, str]]]:
        """Every record in Redis as it is sealed there, ``(call id, sealed)``, a batch at a
        time (SCAN: Redis is not held up, and a record saved meanwhile may or may not be
        seen; one deleted or expired between the scan and the read is left out). Raises
        :class:`CallStoreUnavailable`."""
        prefix = _key("")
        cursor = "0"
        try:
            while True:
                cursor, found = await self._r.execute(
                    "SCAN", cursor, "MATCH", f"{prefix}*", "COUNT", batch, "TYPE", "string"
                )
                names = [str(n) for n in found]
                values = await self._r.execute("MGET", *names) if names else []
                got = [
                    (n.removeprefix(prefix), str(v))
                    for n, v in zip(names, values, strict=True)
                    if v is not None
                ]
                if got:
                    yield got
                if str(cursor) == "0":
                    return
        except (RedisError, OSError) as exc:
            raise CallStoreUnavailable(str(exc)) from exc

    async def recent(
        self,
        limit: int,
        after: Cursor | None,
        keep: Keep | None = None,
        *,
        examine: int = EXAMINED_MAX,
    ) -> Page:
        """Newest first, and by id among calls of one start; ``after`` is the cursor of the
        previous page (voice/ivr/cursor.py). Calls past the retention are not listed, and the
        index is trimmed of them (on a quiet line, no save trims it): best effort, so that a
        Redis refusing writes (a full disk, a read-only replica) still lets staff read the
        list.

        ``keep``: only the calls it keeps (given the record and the call's handled mark),
        up to ``limit`` of them, out of at most ``examine`` calls (at least ``limit``) read
        :data:`PAGE_MAX` at a time; the cursor is then that of the last call read, kept or
        not, so the next page goes on from there: no call skipped or listed twice, and a
        page of few matches (none, even) still comes back with a cursor while calls are
        left to read."""
        limit = max(1, min(limit, PAGE_MAX))
        bound = limit if keep is None else max(limit, examine)
        now = self._clock.now()
        oldest = repr(now - self._ttl_s)
        calls: list[dict[str, Any]] = []
        handled: dict[str, str] = {}
        position = after
        examined = 0
        try:
            try:
                await self._r.execute("ZREMRANGEBYSCORE", INDEX, "-inf", oldest)
            except ResponseError as exc:  # writes refused: the read below still answers
                log.debug("the calls index could not be trimmed: %s", exc)
            while True:
                want = min(PAGE_MAX, bound - examined)
                rows = await self._index_rows(position, want, now, oldest)  # want + 1 at most
                ids = [r[0] for r in rows[:want]]
                # The records and their handled marks in one read: a mark is the same
                # instant's as its record.
                got = (
                    await self._r.execute(
                        "MGET", *[_key(i) for i in ids], *[_handled_key(i) for i in ids]
                    )
                    if ids
                    else []
                )
                full_at: int | None = None
                for k, (i, sealed, mark) in enumerate(
                    zip(ids, got[: len(ids)], got[len(ids) :], strict=True)
                ):
                    examined += 1
                    position = Cursor(rows[k][1], i)
                    if sealed is None:
                        continue
                    try:
                        doc = self._open_stored(i, str(sealed))
                    except CallRecordUnreadable:
                        continue  # one unreadable record must not hide every other call
                    at = None if mark is None else str(mark)
                    if keep is not None and not keep(doc, at):
                        continue
                    calls.append(doc)
                    if at is not None:
                        handled[i] = at
                    if len(calls) == limit:
                        full_at = k
                        break
                if full_at is not None:
                    more = full_at < len(rows) - 1
                    break
                if len(rows) <= want:  # the index ends here
                    more = False
                    break
                if examined >= bound:
                    more = True
                    break
        except (RedisError, OSError) as exc:
            raise CallStoreUnavailable(str(exc)) from exc
        return Page(calls, position if more else None, handled)

    async def _index_rows(
        self, after: Cursor | None, count: int, now: float, oldest: str
    ) -> list[tuple[str, float]]:
        """Up to ``count`` + 1 calls of the index (id, start) after ``after``, newest first
        (the one more tells whether any are left)."""
        if after is None:
            flat = await self._r.execute(
                "ZREVRANGEBYSCORE", INDEX, "+inf", f"({oldest}", "WITHSCORES", "LIMIT", 0, count + 1
            )
            return _scored(flat)
        # The calls of the cursor's start (all of them: Redis cannot range by score and id at
        # once; one start holds a few calls at most), then those below it, in one
        # transaction: a save between the two reads could not shift the page.
        at = repr(after.started_at)
        same, below = await self._r.transaction(
            [
                ("ZREVRANGEBYSCORE", INDEX, at, at),
                (
                    "ZREVRANGEBYSCORE",
                    INDEX,
                    f"({at}",
                    f"({oldest}",
                    "WITHSCORES",
                    "LIMIT",
                    0,
                    count + 1,
                ),
            ]
        )
        kept = (
            after.after(str(m) for m in same)
            if within_retention(after.started_at, now, self._ttl_s)
            else []
        )
        return [(m, after.started_at) for m in kept] + _scored(below)
