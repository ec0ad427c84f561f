"""Whether a Redis given with ``CLINIC_REDIS_URL`` keeps what it acknowledges.

The embedded Redis keeps an append-only file fsynced on every write (see
:mod:`clinic_voice.redis_server`): an approval the API acknowledged survives a ``kill -9`` of
Redis or a power cut. It has no memory limit, so it never deletes a key to make room. A Redis
given with ``CLINIC_REDIS_URL`` is configured by its operator, so ``serve`` asks it once, at
start, and says in its log what an unclean stop of that Redis would lose, and whether it may
delete keys at its memory limit (verifications, and the counters the limits keep: a limit
whose counter went would let sends through). It never refuses to start: a managed Redis may
protect writes by other means (synchronous replicas), or refuse ``CONFIG`` altogether, and
only its operator knows.

:func:`assess`, :func:`assess_eviction` and :func:`assess_version` (the service needs Redis
7.0 or later) are the rules (pure); :func:`report` asks Redis and logs.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.exceptions import RedisError, ResponseError

log = logging.getLogger(__name__)

T = TypeVar("T")

MIN_VERSION = (7, 0)
RETRY_S = 5.0  # a Redis that is not up yet is asked again (readiness reports it meanwhile)


def assess(appendonly: str, appendfsync: str) -> str | None:
    """What acknowledged writes an unclean stop could lose with these settings; None: none."""
    if appendonly != "yes":
        return (
            "appendonly is off: every write since the last snapshot is lost when Redis stops "
            "uncleanly, approvals included"
        )
    if appendfsync == "always":
        return None
    if appendfsync == "everysec":
        return (
            "appendfsync is everysec: about the last second of acknowledged writes (approvals "
            "included) is lost to a power cut, and to a kill -9 of Redis while a slow fsync "
            "holds its writes back (up to 2 s)"
        )
    return (
        f"appendfsync is {appendfsync}: acknowledged writes (approvals included) reach the "
        "disk when the kernel decides, and are lost to a power cut until then"
    )


def assess_eviction(maxmemory: str, policy: str) -> str | None:
    """What Redis may delete at its memory limit with these settings; None: nothing.

    With ``noeviction`` a full Redis refuses writes, and the API answers 503: it fails closed.
    Every other policy deletes keys, and a ``volatile-*`` one deletes exactly the keys that
    expire, which here are nearly all (verifications, limit counters, call records).
    """
    if maxmemory in ("0", "") or policy == "noeviction":
        return None
    return (
        f"maxmemory-policy is {policy or 'unknown'} with maxmemory {maxmemory}: at that limit "
        "Redis deletes keys to make room, so verifications and call records could vanish and "
        "a limit whose counter was deleted would let sends through"
    )


def assess_version(info: str) -> str | None:
    """Why this Redis (its ``INFO server`` text) cannot run the service; None: it can.

    The service's scripts declare their flags (:data:`verification.redis_mux.SHEBANG`), which
    Redis reads from 7.0 on; Valkey reports the Redis version it is compatible with.
    """
    found = re.search(r"^redis_version:(\d+)\.(\d+)", info, re.MULTILINE)
    if found is None:
        return None  # not said (a proxy, a managed service): the scripts' own errors will tell
    major, minor = int(found[1]), int(found[2])
    if (major, minor) >= MIN_VERSION:
        return None
    return f"it is Redis {major}.{minor}, and the service needs Redis 7.0 or later"


def _setting(answer: Any, name: str) -> str:
    # CONFIG GET answers [name, value] (a RESP2 list) or {name: value} (RESP3).
    if isinstance(answer, dict):
        return str(answer.get(name, ""))
    if isinstance(answer, list | tuple) and len(answer) >= 2:
        return str(answer[1])
    return ""


async def _server_info(execute: Callable[..., Awaitable[Any]]) -> str:
    """``INFO server``'s text; "" when refused (a managed Redis may forbid INFO)."""
    try:
        answer = await execute("INFO", "server")
    except ResponseError:
        return ""
    return answer.decode() if isinstance(answer, bytes) else str(answer)


async def report(execute: Callable[..., Awaitable[Any]]) -> None:
    """Ask Redis (through ``execute``, e.g. :meth:`RedisMux.execute`) and log the findings.

    Retries every :data:`RETRY_S` while Redis cannot be reached; gives up quietly (one info
    line) when Redis refuses ``CONFIG GET``.
    """
    info = await _answered(lambda: _server_info(execute))
    unfit = assess_version(info)
    if unfit is not None:
        log.error(
            "CLINIC_REDIS_URL's Redis cannot run this service: %s (its scripts would be "
            "refused, and every create and check answered 503)",
            unfit,
        )
    try:
        config = await _answered(lambda: _settings(execute))
    except ResponseError as exc:  # NOPERM, a renamed or disabled CONFIG...
        log.info(
            "could not read the persistence settings of CLINIC_REDIS_URL's Redis (%s); "
            "for acknowledged approvals to survive a crash it needs appendonly yes and "
            "appendfsync always, and maxmemory-policy noeviction so that it deletes "
            "nothing at a memory limit",
            exc,
        )
        return
    risk = assess(config["appendonly"], config["appendfsync"])
    if risk is None:
        log.info("CLINIC_REDIS_URL's Redis fsyncs its append-only file on every write")
    else:
        log.warning(
            "CLINIC_REDIS_URL's Redis may lose acknowledged writes: %s. Set appendonly yes "
            "and appendfsync always (as the embedded Redis does) unless it is protected "
            "otherwise",
            risk,
        )
    eviction = assess_eviction(config["maxmemory"], config["maxmemory-policy"])
    if eviction is not None:
        log.warning(
            "CLINIC_REDIS_URL's Redis may delete the service's data: %s. Set "
            "maxmemory-policy noeviction (a full Redis then refuses writes and the API "
            "answers 503), or maxmemory 0, or give this service a Redis of its own",
            eviction,
        )


async def _settings(execute: Callable[..., Awaitable[Any]]) -> dict[str, str]:
    return {
        name: _setting(await execute("CONFIG", "GET", name), name)
        for name in ("appendonly", "appendfsync", "maxmemory", "maxmemory-policy")
    }


async def _answered(ask: Callable[[], Awaitable[T]]) -> T:
    """``ask()``'s answer once Redis can be reached; an error reply is raised."""
    while True:
        try:
            return await ask()
        except ResponseError:
            raise
        except (RedisError, OSError) as exc:
            # Not up yet: /readyz and the store's own errors report an unreachable Redis; this
            # only waits to ask again.
            log.debug("Redis settings not read yet (%s); again in %g s", exc, RETRY_S)
            await asyncio.sleep(RETRY_S)
