"""Each calling number's voicemail messages of the last 24 hours, in Redis: the count that
``CLINIC_VOICEMAIL_PER_CALLER_DAY`` holds a number to (voice/ivr/voicemail_budget.py).

In Redis, not in a ``serve``'s memory: every ``serve`` on one Redis (the documented way to
grow) counts the same messages, and a restart forgets none. A number is a sorted set
``cv:vm-caller:<digest>``, one member a message (a random token, scored by the time it was
admitted, in ms), its entries older than 24 hours trimmed at each use, and the set expiring 24
hours after its last message. The digest is a keyed MAC of the number (BLAKE2b keyed, as the
verification limits name numbers: verification/limits.py), its key derived from
``CLINIC_SECRET``: every ``serve`` of one clinic names a number alike, and neither Redis nor
its append-only file holds a number, nor lets one be guessed by hashing a number range. No call
id either: only the times of a number's last messages.

A message takes its place when admitted (the check and the add are one script: two calls of
one number into two ``serve`` processes at once cannot both pass the last place), and gives it
back when not kept (silence, a failed save, or refused by the disk or the cap after all).
"""

from __future__ import annotations

import hashlib
import re
import secrets

from redis.exceptions import RedisError

from sip_config.clock import Clock
from verification import keys
from verification.redis_mux import Script
from voice.ivr.store import RedisCommands

PREFIX = "cv:vm-caller:"
DAY_MS = 86_400_000

# KEYS[1]: the number's set. ARGV: [1] now less 24 h (ms), [2] now (ms), [3] the limit,
# [4] the new member, [5] the set's life (ms). The count before this message; the message
# added only when that count is below the limit.
_TAKE = Script("""
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local n = redis.call('ZCARD', KEYS[1])
if n < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
end
return n
""")


class CallerCountsUnavailable(RuntimeError):
    """Redis could not be reached."""


def digest_key(secret: bytes) -> bytes:
    """The key of the numbers' digests, derived from CLINIC_SECRET."""
    return keys.derive(secret, "voicemail caller names v1")


class CallerCounts:
    """The numbers' messages of the last 24 hours, over ``redis``."""

    def __init__(self, redis: RedisCommands, key: bytes, clock: Clock) -> None:
        self._r = redis
        self._key = key[:64]  # BLAKE2b's key is at most 64 bytes
        self._clock = clock

    def name(self, caller: str) -> str:
        """What names ``caller``'s number in Redis; "" for a caller with no digit in it: it
        withheld its number ("anonymous", RFC 3323; "", an "unknown" or "restricted" of a
        carrier), and nothing tells one such caller from another."""
        if re.search("[0-9]", caller) is None:
            return ""
        return hashlib.blake2b(caller.encode(), key=self._key, digest_size=16).hexdigest()

    async def take(self, name: str, limit: int) -> tuple[int, str | None]:
        """The messages of ``name`` in the last 24 hours, and, when fewer than ``limit``,
        the token of the place this message took (None: none taken). Raises
        :class:`CallerCountsUnavailable`."""
        now_ms = round(self._clock.now() * 1000)
        token = secrets.token_hex(8)
        try:
            count = await self._r.evalsha(
                _TAKE, [PREFIX + name], [now_ms - DAY_MS, now_ms, limit, token, DAY_MS]
            )
        except (RedisError, OSError) as exc:
            raise CallerCountsUnavailable(str(exc)) from exc
        return int(count), token if int(count) < limit else None

    async def give_back(self, name: str, token: str) -> None:
        """The message that took ``token`` was not kept: it no longer counts. Raises
        :class:`CallerCountsUnavailable` (the place then counts until its 24 hours end)."""
        try:
            await self._r.execute("ZREM", PREFIX + name, token)
        except (RedisError, OSError) as exc:
            raise CallerCountsUnavailable(str(exc)) from exc
