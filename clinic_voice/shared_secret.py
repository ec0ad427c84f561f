"""Every process on one Redis must hash codes, seal call records and sign webhooks with one
``CLINIC_SECRET``.

Two ``serve`` processes with data dirs of their own and no ``CLINIC_SECRET`` each generate a
secret. They then look like one service, but a right code checked through the other process
counts as a wrong guess, silently, until the patient's verification fails. So ``serve`` claims
its secret's fingerprint in Redis at start (the first process on a Redis sets it) and refuses
to start when that Redis already holds another one's. It then holds the claim while it runs:
a Redis that lost its data (flushed, or restarted without persistence) has lost the
fingerprint too, and a process with another secret could claim it; so ``serve`` looks again
every :data:`HOLD_S`, sets it again if it is gone (and says so), and stops if it finds
another.

A secret changed on purpose lists the old one in ``CLINIC_PREVIOUS_SECRETS``: a fingerprint
of one of those is replaced with this secret's (the secret was rotated, and the log says so),
at start or while running. A process still on the old secret then finds another fingerprint
within :data:`HOLD_S` and stops, and one started again with it refuses to start: one secret
per Redis still holds, give or take that much.

The fingerprint is a key derived from the secret for this use only: it tells nothing of the
secret.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from enum import Enum
from typing import Any

from redis.exceptions import RedisError

from verification import keys
from verification.redis_mux import SHEBANG

log = logging.getLogger(__name__)

KEY = "cv:secret-fingerprint"
RETRY_S = 2.0  # a Redis that does not answer is asked again after this
HOLD_S = 2.0  # a running serve looks at the fingerprint this often

# Set the fingerprint (ARGV[1]) unless one is there, or over a previous secret's (ARGV[2..]);
# answer {Claim, the one there before}. One step: as SET NX then GET, a flush between the two
# would read as another process's fingerprint, and as GET then SET, two processes rotating
# to two new secrets could each take the old one for theirs to replace.
_CLAIM = (
    SHEBANG
    + """
local there = redis.call('GET', KEYS[1])
if there == ARGV[1] then return {0, there} end
if there then
  for i = 2, #ARGV do
    if there == ARGV[i] then
      redis.call('SET', KEYS[1], ARGV[1])
      return {2, there}
    end
  end
  return {0, there}
end
redis.call('SET', KEYS[1], ARGV[1])
return {1, ARGV[1]}
"""
)


class Claim(Enum):
    """What :func:`claim` found, and did."""

    HELD = 0  # this secret's fingerprint was there
    SET = 1  # none was there: this secret's is set
    ROTATED = 2  # a previous secret's was there: replaced with this secret's


class SecretMismatch(Exception):
    """This Redis holds data made with another CLINIC_SECRET."""


def fingerprint(secret: bytes) -> str:
    return keys.derive(secret, "secret fingerprint v1", length=8).hex()


async def claim(
    execute: Callable[..., Awaitable[Any]], secret: bytes, previous: Sequence[bytes] = ()
) -> Claim:
    """Set this secret's fingerprint, or check it against the one set, replacing one of a
    ``previous`` secret (``CLINIC_PREVIOUS_SECRETS``: logged as a rotation); raises
    :class:`SecretMismatch`, or the Redis error when Redis cannot answer."""
    mine = fingerprint(secret)
    olds = [fingerprint(p) for p in previous]
    made, there = await execute("EVAL", _CLAIM, 1, KEY, mine, *olds)
    if isinstance(there, bytes):
        there = there.decode()
    done = Claim(int(made))
    if done is Claim.ROTATED:
        log.warning(
            "CLINIC_SECRET was rotated: the fingerprint in Redis was a previous secret's "
            "(%s, in CLINIC_PREVIOUS_SECRETS), now this secret's (%s); processes still on "
            "the previous secret stop within %g s",
            there,
            mine,
            HOLD_S,
        )
    elif there != mine:
        raise SecretMismatch(
            f"this Redis holds data made with another CLINIC_SECRET (fingerprint {there}; "
            f"this process's: {mine}; not one of its CLINIC_PREVIOUS_SECRETS either). Give "
            f"every process on one Redis the same CLINIC_SECRET. To change it on purpose, "
            f'list the old one in CLINIC_PREVIOUS_SECRETS (README: "Changing the secret")'
        )
    return done


async def hold(
    execute: Callable[..., Awaitable[Any]],
    secret: bytes,
    on_mismatch: Callable[[str], None],
    *,
    claimed: bool,
    previous: Sequence[bytes] = (),
) -> None:
    """Hold this secret's claim for as long as the process runs: :func:`claim` again every
    :data:`HOLD_S` (every :data:`RETRY_S` while Redis does not answer, and at once when the
    claim at start could not be made: ``claimed`` False). A fingerprint found gone after it
    was claimed means Redis lost its data: it is set again and the log says so. A
    ``previous`` secret's (a process on the old secret claimed a Redis that lost its data) is
    replaced again. Another process's fingerprint: ``on_mismatch`` is told (and stops the
    service)."""
    wait = HOLD_S if claimed else 0.0
    while True:
        await asyncio.sleep(wait)
        try:
            made = await claim(execute, secret, previous)
        except SecretMismatch as exc:
            on_mismatch(str(exc))
            return
        except (RedisError, OSError, TimeoutError):
            wait = RETRY_S  # readiness reports the outage meanwhile
            continue
        if made is Claim.SET and claimed:
            log.warning(
                "the CLINIC_SECRET fingerprint was gone from Redis: it lost its data (flushed, "
                "or restarted without persistence?); claimed it again"
            )
        claimed = True
        wait = HOLD_S
