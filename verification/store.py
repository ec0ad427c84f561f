"""Verifications, timers, limits and webhook jobs in Redis.

Every state change is an optimistic compare-and-set: read the record and its version, apply a
pure rule from :mod:`verification.rules`, then one Lua script writes the new record only if
the version is unchanged, and in the same atomic step sets the record's next timer and queues
its new events for the webhooks. Of N concurrent checks with the right code exactly one write
wins; the others retry, find the record approved, and answer "not pending".

State lives only here, so any number of service processes (and hosts) sharing the Redis behave
as one service: timers and webhook jobs are leased by whichever process polls first.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from redis.exceptions import NoScriptError, RedisError, ResponseError

from verification.errors import (
    Conflict,
    IdempotencyConflict,
    IdempotencyInProgress,
    NotFound,
    RateLimited,
    StoreUnavailable,
)
from verification.limits import LimitCheck, LimitDecision, SubjectDigest
from verification.model import Status, Verification
from verification.redis_mux import RedisMux, Script
from verification.rules import Transition, due_at

log = logging.getLogger(__name__)

T = TypeVar("T")

PREFIX = "cv:"
DUE = PREFIX + "due"  # zset: verification id -> when its timer is due
WEBHOOK_DUE = PREFIX + "wh:due"  # zset: webhook job id -> next attempt
WEBHOOK_JOBS = PREFIX + "wh:jobs"  # hash: webhook job id -> payload
PROBE = PREFIX + "ready"  # written by readiness probes (see VerificationStore.writable)
KEEP_AFTER_EXPIRY_S = 86_400  # records stay readable a day after they expire
MAX_CAS_TRIES = 200
# An Idempotency-Key is reserved while its first request makes the verification; a concurrent
# retry waits for it (polling) up to IDEMPOTENCY_WAIT_S, then answers 409 with Retry-After.
IDEMPOTENCY_RESERVE_S = 60
IDEMPOTENCY_WAIT_S = 3.0
IDEMPOTENCY_POLL_S = 0.02
# Writes whose answer was lost, remembered so that one found landed is still counted (see
# VerificationStore._lost_answer): an outage may lose thousands; the oldest go first.
UNSURE_MAX = 4096

# The compare-and-set write of a record, as a Lua function reading KEYS/ARGV from offsets
# (so one script can hold it after other keys and arguments without copying tables).
# k[ko+]: record, due, webhook due, webhook jobs, [idempotency key]
# a[ao+]: expected version ("" = must not exist), new version, doc, pexpireat ms ("" = as
#    it is: HSET keeps a key's expiry), due score ("" = no timer), id, now, n webhook jobs,
#    (job id, payload)*, [idem value, ttl s]
_CAS_FN = """
local function current(k, a, ko, ao)
  local cur = redis.call('HGET', k[ko + 1], 'ver')
  if a[ao + 1] == '' then return not cur end
  return cur == a[ao + 1]
end
local function write(k, a, ko, ao)
  local rec = k[ko + 1]
  redis.call('HSET', rec, 'ver', a[ao + 2], 'doc', a[ao + 3])
  if a[ao + 4] ~= '' then redis.call('PEXPIREAT', rec, a[ao + 4]) end
  if a[ao + 5] == '' then
    redis.call('ZREM', k[ko + 2], a[ao + 6])
  else
    redis.call('ZADD', k[ko + 2], a[ao + 5], a[ao + 6])
  end
  local n = tonumber(a[ao + 8])
  for i = 0, n - 1 do
    local jid = a[ao + 9 + 2 * i]
    redis.call('HSET', k[ko + 4], jid, a[ao + 10 + 2 * i])
    redis.call('ZADD', k[ko + 3], a[ao + 7], jid)
  end
  if k[ko + 5] then
    redis.call('SET', k[ko + 5], a[ao + 9 + 2 * n], 'EX', a[ao + 10 + 2 * n])
  end
end
local function cas(k, a, ko, ao)
  if not current(k, a, ko, ao) then return 0 end
  write(k, a, ko, ao)
  return 1
end
"""

# Limits, all-or-nothing: if any is over, nothing is counted. k[1..n]: counters;
# a[ao+]: (limit, spec)*n. A fixed window's spec is the ms until it ends (its counter is an
# integer that lives that long); a sliding window's is "s:<window ms>:<now ms>:<event id>"
# (its counter a sorted set of the last window's events, scored by their time in ms); a
# gate's is "g:<ms until its window ends>" (a fixed window's counter, compared, not counted).
# Refused: {1, index, ms until the request would be allowed}.
_LIMITS_FN = """
local function sliding(spec)
  return string.match(spec, '^s:(%d+):(%d+):(.+)$')
end
local function over(k, a, n, ao)
  for i = 1, n do
    local key = k[i]
    local limit = tonumber(a[ao + 2 * i - 1])
    local spec = a[ao + 2 * i]
    local w, now = sliding(spec)
    if w then
      w = tonumber(w)
      now = tonumber(now)
      redis.call('ZREMRANGEBYSCORE', key, '-inf', now - w)
      local used = redis.call('ZCARD', key)
      if used >= limit then
        local freeing = redis.call('ZRANGE', key, used - limit, used - limit, 'WITHSCORES')
        -- (clamped: another process's clock may run a little ahead of this one's)
        return {1, i, math.min(w, math.max(1, tonumber(freeing[2]) + w - now))}
      end
    else
      local used = tonumber(redis.call('GET', key) or '0')
      if used >= limit then
        local ttl = redis.call('PTTL', key)
        if ttl < 0 then ttl = tonumber(string.match(spec, '(%d+)$')) end
        return {1, i, ttl}
      end
    end
  end
  return nil
end
local function count(k, a, n, ao)
  for i = 1, n do
    local spec = a[ao + 2 * i]
    local w, now, event = sliding(spec)
    if w then
      redis.call('ZADD', k[i], now, now .. ':' .. event)
      redis.call('PEXPIRE', k[i], w)
    elseif string.sub(spec, 1, 2) == 'g:' then
      -- a gate: compared by over(), never counted
    elseif redis.call('INCR', k[i]) == 1 then
      redis.call('PEXPIRE', k[i], spec)
    end
  end
end
"""

_CAS = Script(_CAS_FN + "return cas(KEYS, ARGV, 0, 0)\n")

# returns {0} or {1, index, pttl}
_LIMITS = Script(
    _LIMITS_FN
    + """
local refused = over(KEYS, ARGV, #KEYS, 0)
if refused then return refused end
count(KEYS, ARGV, #KEYS, 0)
return {0}
"""
)

# Count limits and write a record in one step (one round trip for a create, or for a move
# that sends), and count only what is written. KEYS: n counters, then the CAS keys; ARGV: n,
# (limit, spec)*n as for _LIMITS_FN, then the CAS arguments. Returns {0} written,
# {1, index, pttl} refused, {2} version conflict. The version is compared first: a writer
# that lost the race re-reads and may find nothing left to do, so it must not be refused
# (429) for a limit it would not use.
_LIMITED_CAS = Script(
    _CAS_FN
    + _LIMITS_FN
    + """
local n = tonumber(ARGV[1])
if not current(KEYS, ARGV, n, 1 + 2 * n) then return {2} end
local refused = over(KEYS, ARGV, n, 1)
if refused then return refused end
write(KEYS, ARGV, n, 1 + 2 * n)
count(KEYS, ARGV, n, 1)
return {0}
"""
)

# Lease due items: move every member with score <= now to now + lease, return them.
# KEYS: zset; ARGV: now, lease seconds, limit
_LEASE = Script("""
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local until_ = tonumber(ARGV[1]) + tonumber(ARGV[2])
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], until_, id)
end
return ids
""")

# Put back the timer of a record a lease found not due, unless a newer write has set it since.
# KEYS: record, due zset; ARGV: the version the rules read, due score ("" = no timer), id.
_RESCHEDULE = Script("""
local ver = redis.call('HGET', KEYS[1], 'ver')
if not ver then
  redis.call('ZREM', KEYS[2], ARGV[3])
elseif ver == ARGV[1] then
  if ARGV[2] == '' then
    redis.call('ZREM', KEYS[2], ARGV[3])
  else
    redis.call('ZADD', KEYS[2], 'XX', ARGV[2], ARGV[3])
  end
end
return 0
""")


# A record's version only has to differ from every other version of that record: a random
# prefix per process and a counter, instead of a getrandom() system call per write.
_VERSION_PREFIX = secrets.token_hex(6)
_VERSIONS = itertools.count(1)


def _new_version() -> str:
    return f"{_VERSION_PREFIX}.{next(_VERSIONS):x}"


@dataclass(frozen=True, slots=True)
class Stored:
    """A verification as read, with the version a write must match."""

    verification: Verification
    version: str


def _ignore(old: Verification | None, new: Verification) -> None:
    return None


def _record_key(vid: str) -> str:
    return f"{PREFIX}v:{vid}"


def _webhook_payloads(
    old: Verification | None, new: Verification, global_webhook: bool
) -> list[tuple[str, str]]:
    if not (new.callback_url or global_webhook):
        return []
    start = len(old.events) if old else 0
    jobs = []
    for event in new.events[start:]:
        payload = {
            "verification_id": new.id,
            "status": new.status.value,
            "channel": new.channel.value if new.channel else None,
            "callback_url": new.callback_url,
            "event": event.to_json(),
        }
        jobs.append((secrets.token_hex(12), json.dumps(payload, separators=(",", ":"))))
    return jobs


class VerificationStore:
    """The Redis adapter. Every Redis failure becomes :class:`StoreUnavailable` (fail closed)."""

    def __init__(
        self,
        redis: RedisMux,
        *,
        global_webhook: bool = False,
        on_change: Callable[[Verification | None, Verification], None] | None = None,
        limit_key: bytes = b"",
    ) -> None:
        """``on_change(old, new)`` is called after every write this store made (``old`` None
        for a new record): once per change, whoever asked for it (API, dispatcher, timers),
        never for a write that lost the compare-and-set; for a write whose answer was lost,
        when a later read here finds it landed (see :meth:`_lost_answer`). ``limit_key``: the
        key of the HMAC that names limit counters (every process on one Redis must use the
        same)."""
        self._r = redis
        self._digest = SubjectDigest(limit_key)
        self._global_webhook = global_webhook
        self._on_change = on_change or _ignore
        self._refusing: str | None = None  # why the last readiness write failed
        # id -> (version written, version written over ("" for a create), old, new)
        self._unsure: dict[str, tuple[str, str, Verification | None, Verification]] = {}

    async def ping(self) -> bool:
        try:
            return bool(await self._r.execute("PING"))
        except (RedisError, OSError):
            return False

    async def writable(self) -> bool:
        """Whether Redis takes a write now (for readiness), not only whether it answers.

        A Redis that answers PING may still refuse every write: full under ``noeviction``, a
        read-only replica after a fail-over, or a failed snapshot with
        ``stop-writes-on-bgsave-error``. Every create and check writes, so such a Redis is not
        ready. The log says so when this changes, with Redis's reason.
        """
        try:
            await self._r.execute("SET", PROBE, "1", "PX", "60000")
        except (RedisError, OSError) as exc:
            if self._refusing != str(exc):
                log.warning("Redis does not take writes: %s", exc)
            self._refusing = str(exc)
            return False
        if self._refusing is not None:
            log.info("Redis takes writes again")
            self._refusing = None
        return True

    async def get(self, vid: str) -> Stored:
        """The record, or :class:`NotFound`."""
        try:
            ver, doc = await self._r.execute("HMGET", _record_key(vid), "ver", "doc")
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        if ver is None or doc is None:
            raise NotFound(f"no verification {vid}")
        if self._unsure:
            self._found(vid, str(ver))
        return Stored(Verification.from_json(orjson.loads(doc)), str(ver))

    async def statuses(self, vids: Sequence[str]) -> dict[str, Status]:
        """The status of each of ``vids`` that exists, in one round trip."""
        try:
            docs = await self._r.many([("HGET", _record_key(vid), "doc") for vid in vids])
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        out: dict[str, Status] = {}
        for vid, doc in zip(vids, docs, strict=True):
            if isinstance(doc, Exception):
                raise StoreUnavailable(str(doc))
            if doc is not None:
                out[vid] = Status(orjson.loads(doc)["status"])
        return out

    def _write_args(
        self,
        old: Stored | None,
        new: Verification,
        idempotency: tuple[str, str, int] | None,
    ) -> tuple[list[str], list[Any], str]:
        """KEYS and ARGV of the CAS write of ``new`` over ``old``, and the new version."""
        due = due_at(new)
        jobs = _webhook_payloads(old.verification if old else None, new, self._global_webhook)
        keys = [_record_key(new.id), DUE, WEBHOOK_DUE, WEBHOOK_JOBS]
        version = _new_version()
        args: list[Any] = [
            old.version if old else "",
            version,
            orjson.dumps(new.to_json()),
            # Set by the create and the same on every later write (a verification's lifetime
            # never changes): setting it again cost Redis a command and the AOF a record on
            # every report and check (BENCHMARKS.md).
            ""
            if old is not None and old.verification.expires_at == new.expires_at
            else int((new.expires_at + KEEP_AFTER_EXPIRY_S) * 1000),
            repr(due) if due is not None else "",
            new.id,
            repr(new.events[-1].at if new.events else new.created_at),
            len(jobs),
        ]
        for jid, payload in jobs:
            args += [jid, payload]
        if idempotency:
            key, value, ttl = idempotency
            keys.append(key)
            args += [value, ttl]
        return keys, args, version

    async def _write(
        self,
        old: Stored | None,
        new: Verification,
        *,
        idempotency: tuple[str, str, int] | None = None,
    ) -> str | None:
        """Write ``new`` if the record is still at ``old``'s version; the new version or None."""
        keys, args, version = self._write_args(old, new, idempotency)
        try:
            written = bool(await self._r.evalsha(_CAS, keys, args))
        except (RedisError, OSError) as exc:
            self._lost_answer(old, new, version, exc)
            raise StoreUnavailable(str(exc)) from exc
        return version if written else None

    async def _write_limited(
        self, old: Stored | None, new: Verification, checks: Sequence[LimitCheck], now: float
    ) -> str | None:
        """:meth:`_write`, counting ``checks`` only if it writes (:class:`RateLimited` when
        one is over: nothing written)."""
        counted = list(checks)
        limit_keys, limit_args = _limit_args(counted, now, self._digest)
        keys, args, version = self._write_args(old, new, None)
        try:
            res = await self._r.evalsha(
                _LIMITED_CAS, limit_keys + keys, [len(counted), *limit_args, *args]
            )
        except (RedisError, OSError) as exc:
            self._lost_answer(old, new, version, exc)
            raise StoreUnavailable(str(exc)) from exc
        if int(res[0]) == 2:
            return None
        _decision(res, counted).enforce()
        return version

    def _lost_answer(
        self, old: Stored | None, new: Verification, version: str, exc: BaseException
    ) -> None:
        """A write failed without an answer (a timeout, a dropped connection): it may have
        landed all the same, and then whoever tries the change again finds it made and
        changes nothing, so ``on_change`` (the metrics of state changes) never heard of it.
        Remembered: a later read here that finds this version calls ``on_change`` then. A
        retry in another process cannot know, and the change stays uncounted."""
        if isinstance(exc, ResponseError):
            return  # Redis refused it (full, read-only): nothing was written
        self._unsure.pop(new.id, None)  # (the newest last)
        if len(self._unsure) >= UNSURE_MAX:
            del self._unsure[next(iter(self._unsure))]
        if old is None:
            self._unsure[new.id] = (version, "", None, new)
        else:
            self._unsure[new.id] = (version, old.version, old.verification, new)

    def _found(self, vid: str, version: str) -> None:
        """``vid`` read at ``version``: the change of its write whose answer was lost is
        counted if that write landed; forgotten once the record moved on without it."""
        unsure = self._unsure.get(vid)
        if unsure is None:
            return
        written, over, old, new = unsure
        if version == over:
            return  # not landed yet: a write stuck on a stalled connection may land still
        del self._unsure[vid]
        if version == written:
            self._on_change(old, new)

    async def get_idempotent(self, idempotency: tuple[str, str]) -> Verification | None:
        """The verification an earlier request with this (key id, body hash) made, if any
        (None too while that request is still being made: :meth:`create` waits for it)."""
        try:
            existing = await self._r.execute("GET", f"{PREFIX}idem:{idempotency[0]}")
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        if existing is None:
            return None
        made = _idempotent_id(str(existing), idempotency[1])
        return (await self.get(made)).verification if made else None

    async def create(
        self,
        transition: Transition,
        idempotency: tuple[str, str] | None = None,
        *,
        checks: Sequence[LimitCheck] = (),
        now: float = 0.0,
    ) -> Stored:
        """Store a new verification. ``idempotency`` is (key id, body hash): a repeat with the
        same key and body returns the first verification; another body is a conflict.

        ``checks``: limits counted only if this request makes the verification; over a limit,
        nothing is written and :class:`RateLimited` is raised. Without ``idempotency`` they
        are counted in the same atomic step as the write (one round trip). With it, the key
        is reserved first and the limits counted by the request that reserved it only, so
        concurrent retries of one request count once.
        """
        v = transition.verification
        if idempotency is None:
            if checks:
                return await self._create_limited(v, list(checks), now)
            return await self._create_written(v, None)
        key = f"{PREFIX}idem:{idempotency[0]}"
        replay = await self._reserve(key, idempotency[1])
        if replay is not None:
            return replay
        if checks:
            try:
                (await self.hit_limits(list(checks), now)).enforce()
            except RateLimited:
                await self._release(key)  # nothing was made: a later retry may try again
                raise
            except StoreUnavailable:
                # Nothing was made either (the limits may have been counted). Released if
                # Redis still answers, a retry goes ahead at once instead of meeting 409s
                # until the reservation ends; if not, it ends by itself.
                try:
                    await self._release(key)
                except StoreUnavailable:
                    log.debug("Idempotency-Key reservation kept until it ends: Redis is away")
                raise
        idem = (key, json.dumps({"body": idempotency[1], "id": v.id}), KEEP_AFTER_EXPIRY_S)
        # A write that fails here may still have reached Redis: the reservation stays (for
        # IDEMPOTENCY_RESERVE_S) rather than let a retry make a second verification.
        return await self._create_written(v, idem)

    async def _create_written(
        self, v: Verification, idempotency: tuple[str, str, int] | None
    ) -> Stored:
        version = await self._write(None, v, idempotency=idempotency)
        if version is None:
            raise Conflict(f"verification {v.id} exists")
        self._on_change(None, v)
        return Stored(v, version)

    async def _reserve(self, key: str, body_hash: str) -> Stored | None:
        """Reserve ``key`` for this request (None), or the verification an earlier request
        with it made. Waits while that request is still being made, up to a bound."""
        placeholder = json.dumps({"body": body_hash, "id": ""})
        loop = asyncio.get_running_loop()
        give_up = loop.time() + IDEMPOTENCY_WAIT_S
        while True:
            try:
                won = await self._r.execute(
                    "SET", key, placeholder, "NX", "EX", IDEMPOTENCY_RESERVE_S
                )
                existing = None if won else await self._r.execute("GET", key)
            except (RedisError, OSError) as exc:
                raise StoreUnavailable(str(exc)) from exc
            if won:
                return None
            if existing is not None:  # None: released meanwhile, try to reserve it again
                made = _idempotent_id(str(existing), body_hash)
                if made:
                    return await self.get(made)
                if loop.time() >= give_up:
                    raise IdempotencyInProgress(
                        "a request with this Idempotency-Key is still being made",
                        retry_after_s=1,
                    )
            await asyncio.sleep(IDEMPOTENCY_POLL_S)

    async def _release(self, key: str) -> None:
        try:
            await self._r.execute("DEL", key)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def _create_limited(
        self, v: Verification, checks: list[LimitCheck], now: float
    ) -> Stored:
        version = await self._write_limited(None, v, checks, now)
        if version is None:
            raise Conflict(f"verification {v.id} exists")
        self._on_change(None, v)
        return Stored(v, version)

    async def update(
        self,
        vid: str,
        change: Callable[[Verification], tuple[Transition, T]],
        *,
        known: Stored | None = None,
    ) -> tuple[Transition, T]:
        """Apply ``change`` (a pure rule) atomically, retrying when another writer won."""
        transition, extra, _ = await self.update_stored(vid, change, known=known)
        return transition, extra

    async def update_stored(
        self,
        vid: str,
        change: Callable[[Verification], tuple[Transition, T]],
        *,
        known: Stored | None = None,
        checks: Sequence[LimitCheck] = (),
        now: float = 0.0,
    ) -> tuple[Transition, T, Stored]:
        """:meth:`update`, also returning the record as written (to chain the next update).

        ``known``: the record as last read or written by this caller; the first attempt
        writes against it without reading again (one round trip when nobody else wrote).
        ``checks``: limits of the send the change asks for, counted in the same atomic step
        as the write, and only if the change writes something and asks for a send: a change
        that comes to nothing (another writer already made it), or one that sends nothing
        (the verification's own send limit reached), counts nothing. Over a limit nothing is
        written and :class:`RateLimited` raised.
        """
        stored = known
        for _ in range(MAX_CAS_TRIES):
            if stored is None:
                stored = await self.get(vid)
            transition, extra = change(stored.verification)
            if transition.verification == stored.verification:
                return transition, extra, stored
            if checks and transition.send is not None:
                version = await self._write_limited(stored, transition.verification, checks, now)
            else:
                version = await self._write(stored, transition.verification)
            if version is not None:
                self._on_change(stored.verification, transition.verification)
                return transition, extra, Stored(transition.verification, version)
            stored = None
        raise StoreUnavailable(f"verification {vid}: too much contention")

    async def admit_and_get(
        self, checks: list[LimitCheck], now: float, vid: str
    ) -> tuple[LimitDecision, Stored | None]:
        """Count a request against ``checks`` and read ``vid`` (None: no such record), in one
        round trip."""
        keys, args = _limit_args(checks, now, self._digest)
        try:
            res, got = await self._r.many(
                [_LIMITS.call(keys, args), ("HMGET", _record_key(vid), "ver", "doc")]
            )
            if isinstance(res, NoScriptError):  # nothing was counted: load it and count
                res = await self._r.evalsha(_LIMITS, keys, args)
            for answer in (res, got):
                if isinstance(answer, Exception):
                    raise answer
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        ver, doc = got
        decision = _decision(res, checks)
        if ver is None or doc is None:
            return decision, None
        if self._unsure:
            self._found(vid, str(ver))
        return decision, Stored(Verification.from_json(orjson.loads(doc)), str(ver))

    async def lease_due(self, now: float, lease_s: float, limit: int = 100) -> list[str]:
        """Verification ids whose timer is due, leased for ``lease_s`` to this caller."""
        try:
            ids = await self._r.evalsha(_LEASE, [DUE], [repr(now), repr(lease_s), limit])
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        return [str(i) for i in ids]

    async def reschedule(self, read: Stored) -> None:
        """Set the timer of ``read`` to what the rules say (after a lease found it not due).

        Only while the record is still at ``read``'s version: a write since then set the timer
        of the newer record in its own atomic step, and the time read here is out of date (a
        ``/fallback`` to a channel with a shorter step would otherwise wait for the old one's
        end). A record gone meanwhile loses its timer.
        """
        due = due_at(read.verification)
        vid = read.verification.id
        args = [read.version, repr(due) if due is not None else "", vid]
        try:
            await self._r.evalsha(_RESCHEDULE, [_record_key(vid), DUE], args)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def forget_due(self, vid: str) -> None:
        """Drop the timer of a record that no longer exists."""
        try:
            await self._r.execute("ZREM", DUE, vid)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc

    # -- webhook jobs ------------------------------------------------------------------------
    async def lease_webhooks(
        self, now: float, lease_s: float, limit: int = 50
    ) -> list[tuple[str, str]]:
        """(job id, payload) of webhook jobs due now, leased to this caller."""
        try:
            ids = await self._r.evalsha(_LEASE, [WEBHOOK_DUE], [repr(now), repr(lease_s), limit])
            if not ids:
                return []
            payloads = await self._r.execute("HMGET", WEBHOOK_JOBS, *ids)
            out = []
            for jid, payload in zip(ids, payloads, strict=True):
                if payload is None:  # its job is gone (delivered elsewhere): drop the entry
                    await self._r.execute("ZREM", WEBHOOK_DUE, jid)
                    continue
                out.append((str(jid), str(payload)))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        return out

    async def postpone_webhook(self, job_id: str, at: float) -> None:
        """Put a leased job back in the queue, due at ``at``, as it is."""
        try:
            await self._r.execute("ZADD", WEBHOOK_DUE, "XX", repr(at), job_id)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def retry_webhook(self, job_id: str, payload: str, at: float) -> None:
        try:
            await self._r.transaction(
                [("HSET", WEBHOOK_JOBS, job_id, payload), ("ZADD", WEBHOOK_DUE, repr(at), job_id)]
            )
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def finish_webhook(self, job_id: str) -> None:
        try:
            await self._r.transaction(
                [("ZREM", WEBHOOK_DUE, job_id), ("HDEL", WEBHOOK_JOBS, job_id)]
            )
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc

    # -- limits ------------------------------------------------------------------------------
    async def hit_limits(self, checks: list[LimitCheck], now: float) -> LimitDecision:
        """Count one event against every check, all or nothing."""
        if not checks:
            return LimitDecision(allowed=True)
        keys, args = _limit_args(checks, now, self._digest)
        try:
            res = await self._r.evalsha(_LIMITS, keys, args)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        return _decision(res, checks)


def _idempotent_id(existing: str, body_hash: str) -> str:
    """The id an idempotency record names ("" while its request is still being made), or
    :class:`IdempotencyConflict` when it was made for another body."""
    record = json.loads(existing)
    if record["body"] != body_hash:
        raise IdempotencyConflict("this Idempotency-Key was used with another body")
    return str(record["id"])


def _limit_args(
    checks: list[LimitCheck], now: float, digest: SubjectDigest
) -> tuple[list[str], list[Any]]:
    """The keys and arguments of ``_LIMITS_FN``'s counters."""
    keys: list[str] = []
    args: list[Any] = []
    now_ms = round(now * 1000)
    event = ""
    for c in checks:
        key, ms = c.counter(now_ms, digest)
        keys.append(PREFIX + "l:" + key)
        if not c.counted:
            if c.sliding:
                raise ValueError(f"a gate on a sliding window ({c.name}) is not supported")
            args += (c.rate.count, f"g:{ms}")
        elif c.sliding:
            # One id for this request's event in each log: unique across processes (a random
            # prefix per process and a counter, as for record versions).
            event = event or f"{_VERSION_PREFIX}{next(_VERSIONS)}"
            args += (c.rate.count, f"s:{ms}:{now_ms}:{event}")
        else:
            args += (c.rate.count, ms)
    return keys, args


def _decision(res: list[Any], checks: list[LimitCheck]) -> LimitDecision:
    if int(res[0]) == 0:
        return LimitDecision(allowed=True)
    check = checks[int(res[1]) - 1]
    return LimitDecision(
        allowed=False, blocked_by=check, retry_after_s=max(1, -(-int(res[2]) // 1000))
    )


def body_hash(body: bytes) -> str:
    """The fingerprint of a request body, for Idempotency-Key replays."""
    return hashlib.sha256(body).hexdigest()
