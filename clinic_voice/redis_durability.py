"""Whether a Redis given with ``CLINIC_REDIS_URL`` keeps what it acknowledges.

The embedded Redis keeps an append-only file fsynced on every write (see
:mod:`clinic_voice.redis_server`): an approval the API acknowledged survives a ``kill -9`` of
Redis or a power cut. A Redis given with ``CLINIC_REDIS_URL`` is configured by its operator,
so ``serve`` asks it once, at start, and says in its log what an unclean stop of that Redis
would lose. It never refuses to start: a managed Redis may protect writes by other means
(synchronous replicas), or refuse ``CONFIG`` altogether, and only its operator knows.

:func:`assess` is the rule (pure); :func:`report` asks Redis and logs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError, ResponseError

log = logging.getLogger(__name__)

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


def _setting(answer: Any, name: str) -> str:
    # CONFIG GET answers [name, value] (a RESP2 list) or {name: value} (RESP3).
    if isinstance(answer, dict):
        return str(answer.get(name, ""))
    if isinstance(answer, list | tuple) and len(answer) >= 2:
        return str(answer[1])
    return ""


async def report(execute: Callable[..., Awaitable[Any]]) -> None:
    """Ask Redis (through ``execute``, e.g. :meth:`RedisMux.execute`) and log the finding.

    Retries every :data:`RETRY_S` while Redis cannot be reached; gives up quietly (one info
    line) when Redis refuses ``CONFIG GET``.
    """
    while True:
        try:
            appendonly = _setting(await execute("CONFIG", "GET", "appendonly"), "appendonly")
            appendfsync = _setting(await execute("CONFIG", "GET", "appendfsync"), "appendfsync")
        except ResponseError as exc:  # NOPERM, a renamed or disabled CONFIG...
            log.info(
                "could not read the persistence settings of CLINIC_REDIS_URL's Redis (%s); "
                "for acknowledged approvals to survive a crash it needs appendonly yes and "
                "appendfsync always",
                exc,
            )
            return
        except (RedisError, OSError) as exc:
            # Not up yet: /readyz and the store's own errors report an unreachable Redis; this
            # only waits to ask again.
            log.debug("Redis persistence settings not read yet (%s); again in %g s", exc, RETRY_S)
            await asyncio.sleep(RETRY_S)
            continue
        risk = assess(appendonly, appendfsync)
        if risk is None:
            log.info("CLINIC_REDIS_URL's Redis fsyncs its append-only file on every write")
        else:
            log.warning(
                "CLINIC_REDIS_URL's Redis may lose acknowledged writes: %s. Set appendonly yes "
                "and appendfsync always (as the embedded Redis does) unless it is protected "
                "otherwise",
                risk,
            )
        return
