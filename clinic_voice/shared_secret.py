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

The fingerprint is a key derived from the secret for this use only: it tells nothing of the
secret.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from verification import keys
from verification.redis_mux import SHEBANG

log = logging.getLogger(__name__)

KEY = "cv:secret-fingerprint"
RETRY_S = 2.0  # a Redis that does not answer is asked again after this
HOLD_S = 2.0  # a running serve looks at the fingerprint this often

# Set the fingerprint unless one is there; answer {1 if set, the one there}. One step: as
# SET NX then GET, a flush between the two would read as another process's fingerprint.
_CLAIM = (
    SHEBANG
    + """
local there = redis.call('GET', KEYS[1])
if there then return {0, there} end
redis.call('SET', KEYS[1], ARGV[1])
return {1, ARGV[1]}
"""
)


class SecretMismatch(Exception):
    """This Redis holds data made with another CLINIC_SECRET."""


def fingerprint(secret: bytes) -> str:
    return keys.derive(secret, "secret fingerprint v1", length=8).hex()


async def claim(execute: Callable[..., Awaitable[Any]], secret: bytes) -> bool:
    """Set this secret's fingerprint (True), or check it against the one set (False); raises
    :class:`SecretMismatch`, or the Redis error when Redis cannot answer."""
    mine = fingerprint(secret)
    made, theirs = await execute("EVAL", _CLAIM, 1, KEY, mine)
    if isinstance(theirs, bytes):
        theirs = theirs.decode()
    if theirs != mine:
        raise SecretMismatch(
            f"this Redis holds data made with another CLINIC_SECRET (fingerprint {theirs}; "
            f"this process's: {mine}). Give every process on one Redis the same "
            f"CLINIC_SECRET. To change it on purpose, stop every process and delete the "
            f"Redis key {KEY} (checks of verifications pending then fail)"
        )
    return int(made) == 1


async def hold(
    execute: Callable[..., Awaitable[Any]],
    secret: bytes,
    on_mismatch: Callable[[str], None],
    *,
    claimed: bool,
) -> None:
    """Hold this secret's claim for as long as the process runs: :func:`claim` again every
    :data:`HOLD_S` (every :data:`RETRY_S` while Redis does not answer, and at once when the
    claim at start could not be made: ``claimed`` False). A fingerprint found gone after it
    was claimed means Redis lost its data: it is set again and the log says so. Another
    process's fingerprint: ``on_mismatch`` is told (and stops the service)."""
    wait = HOLD_S if claimed else 0.0
    while True:
        await asyncio.sleep(wait)
        try:
            made = await claim(execute, secret)
        except SecretMismatch as exc:
            on_mismatch(str(exc))
            return
        except (RedisError, OSError, TimeoutError):
            wait = RETRY_S  # readiness reports the outage meanwhile
            continue
        if made and claimed:
            log.warning(
                "the CLINIC_SECRET fingerprint was gone from Redis: it lost its data (flushed, "
                "or restarted without persistence?); claimed it again"
            )
        claimed = True
        wait = HOLD_S
