"""Every process on one Redis must hash codes, seal call records and sign webhooks with one
``CLINIC_SECRET``.

Two ``serve`` processes with data dirs of their own and no ``CLINIC_SECRET`` each generate a
secret. They then look like one service, but a right code checked through the other process
counts as a wrong guess, silently, until the patient's verification fails. So ``serve`` claims
its secret's fingerprint in Redis at start (the first process on a Redis sets it) and refuses
to start when that Redis already holds another one's.

The fingerprint is a key derived from the secret for this use only: it tells nothing of the
secret.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from verification import keys

KEY = "cv:secret-fingerprint"
RETRY_S = 2.0  # a Redis that is not up at start is asked again


class SecretMismatch(Exception):
    """This Redis holds data made with another CLINIC_SECRET."""


def fingerprint(secret: bytes) -> str:
    return keys.derive(secret, "secret fingerprint v1", length=8).hex()


async def claim(execute: Callable[..., Awaitable[Any]], secret: bytes) -> None:
    """Set this secret's fingerprint, or check it against the one set; raises
    :class:`SecretMismatch`, or the Redis error when Redis cannot answer."""
    mine = fingerprint(secret)
    await execute("SET", KEY, mine, "NX")
    theirs = await execute("GET", KEY)
    if isinstance(theirs, bytes):
        theirs = theirs.decode()
    if theirs != mine:
        raise SecretMismatch(
            f"this Redis holds data made with another CLINIC_SECRET (fingerprint {theirs}; "
            f"this process's: {mine}). Give every process on one Redis the same "
            f"CLINIC_SECRET. To change it on purpose, stop every process and delete the "
            f"Redis key {KEY} (checks of verifications pending then fail)"
        )


async def claim_when_reachable(
    execute: Callable[..., Awaitable[Any]], secret: bytes, on_mismatch: Callable[[str], None]
) -> None:
    """:func:`claim` for a Redis that did not answer at start: asked again every
    :data:`RETRY_S` until it does; ``on_mismatch`` is told (and stops the service)."""
    while True:
        try:
            await claim(execute, secret)
            return
        except SecretMismatch as exc:
            on_mismatch(str(exc))
            return
        except (RedisError, OSError, TimeoutError):
            await asyncio.sleep(RETRY_S)  # readiness reports the outage meanwhile
