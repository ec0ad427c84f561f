"""``clinic-voice secret reseal``: what was sealed under a previous secret, sealed anew under
``CLINIC_SECRET`` (README: "Changing the secret"). The work is voice/ivr/reseal.py's; this
finds the Redis as ``serve`` does, checks the secret against it, has the embedded Redis's
append-only file rewritten, and prints the counts.

Which Redis: ``CLINIC_REDIS_URL``'s; else the embedded one. With ``serve`` running (it holds
the data dir's lock) that answers on its unix socket in the data dir; with ``serve`` stopped,
this starts it, holding the lock meanwhile (a ``serve`` started then refuses to start), and
stops it at the end.

Whose files: ``serve``'s. Run by another user, a file written in the data dir would be that
user's, 0600, and ``serve`` could not read it (voicemail-unreadable, records kept on disk
stuck). So as root every file it writes keeps the owner and group of the one it replaces,
and the embedded Redis it starts runs as the data dir's owner; any other user who does not
own the data dir is refused before anything is touched.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from sip_config.settings import Settings

if TYPE_CHECKING:
    from voice.ivr.reseal import Tally

DESCRIPTION = """\
Seal every call record in Redis, and every voicemail and record kept on disk in
CLINIC_DATA_DIR, that opens only with a secret of CLINIC_PREVIOUS_SECRETS anew under
CLINIC_SECRET, so the previous secret can be removed at once. Reads the environment as serve
does; safe while serve runs (a record or file erased, saved or expired meanwhile is left to
that). Run it once every process runs on the new secret, on every host with a data dir.
Prints counts and call ids, never content. Run it as serve's user or as root (each file
keeps its owner; an embedded Redis it starts runs as the data dir's owner). Exit 0:
everything that opens is under CLINIC_SECRET now; 1: some did not open, or Redis or the disk
failed (run it again); 2: bad settings, a Redis that another secret (or still the previous
one) claims, or a user other than root who does not own CLINIC_DATA_DIR."""

# Lines of unreadable names printed per kind, at most (all are counted).
NAMES_SHOWN = 50
REWRITE_DEADLINE_S = 120.0
REDIS_TIMEOUT_S = 5.0

_Execute = Callable[..., Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class _Redis:
    url: str
    where: str  # for the output
    embedded: bool


class _Refused(Exception):
    """Resealing would be wrong on this Redis (exit 2)."""


class DataDirRefused(Exception):
    """This user must not write in the data dir (exit 2): see :func:`data_dir_owner`."""


async def reseal(
    settings: Settings,
    secret: bytes,
    previous: Sequence[bytes],
    out: TextIO,
    *,
    owner: tuple[int, int] | None,
) -> int:
    """Re-seal everything of ``settings``' Redis and data dir under ``secret``; print what
    was done to ``out``; the exit status. ``owner``: :func:`data_dir_owner`'s answer."""
    from redis.exceptions import RedisError

    from clinic_voice.redis_server import EmbeddedRedisError
    from verification.redis_mux import RedisMux
    from voice.ivr.reseal import Resealer
    from voice.ivr.store import CallStore

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    try:
        async with _redis(settings, owner) as redis:
            say(f"Redis: {redis.where}")
            mux = RedisMux(redis.url, timeout_s=REDIS_TIMEOUT_S)
            try:
                await _check_secret(mux.execute, secret, previous)
                store = CallStore(
                    mux, secret, settings.ivr.call_retention_days, previous_secrets=previous
                )
                complete = _report(await Resealer(store, settings.data_dir).run(), say)
                complete = await _rewrite(mux.execute, redis.embedded, say) and complete
            finally:
                await mux.aclose()
    except _Refused as exc:
        print(f"clinic-voice secret reseal: {exc}", file=sys.stderr)
        return 2
    except (EmbeddedRedisError, RedisError, OSError) as exc:
        print(f"clinic-voice secret reseal: Redis: {exc}", file=sys.stderr)
        return 1
    if complete:
        say(
            "Everything that opens is sealed under CLINIC_SECRET now: remove "
            "CLINIC_PREVIOUS_SECRETS once the verifications pending at the change have ended "
            "(CLINIC_CODE_TTL_S)"
        )
        return 0
    say("Not everything is sealed under CLINIC_SECRET yet (see above)")
    return 1


def _report(tallies: Sequence[Tally], say: Callable[[str], None]) -> bool:
    """Print each kind's counts; whether every kind went through."""
    for t in tallies:
        say(
            f"{t.kind}: {t.resealed} resealed, {t.current} already current, "
            f"{len(t.unreadable)} unreadable, {t.gone} gone meanwhile"
        )
        if t.unreadable:
            shown = ", ".join(t.unreadable[:NAMES_SHOWN])
            more = len(t.unreadable) - NAMES_SHOWN
            say(
                "  open under none of CLINIC_SECRET and CLINIC_PREVIOUS_SECRETS (another "
                f"secret, or damaged), left as they are: {shown}"
                + (f" and {more} more" if more > 0 else "")
            )
        if t.stopped:
            say(f"  stopped before the end: {t.stopped}")
    say(
        "Files: each one re-sealed took the old one's place by a rename; the old one is "
        "unlinked, not overwritten (as an erasure's), so its blocks stay on the disk until "
        "reused"
    )
    return all(t.complete for t in tallies)


async def _rewrite(execute: _Execute, embedded: bool, say: Callable[[str], None]) -> bool:
    """The embedded Redis's append-only file rewritten without the records as they were
    sealed before (whether that went well); a Redis the operator gave is theirs to rewrite."""
    from redis.exceptions import RedisError

    from clinic_voice.redis_server import rewrite_aof

    if not embedded:
        say(
            "Redis's append-only file (and any snapshot, replica or backup of it) keeps the "
            "records as they were sealed before until it is rewritten: that Redis "
            "(CLINIC_REDIS_URL) is yours to rewrite (BGREWRITEAOF), as after an erasure"
        )
        return True
    try:
        failed = await rewrite_aof(execute, REWRITE_DEADLINE_S)
    except RedisError as exc:
        failed = str(exc)
    if failed:
        say(f"Redis's append-only file: not rewritten: {failed}; run this again")
        return False
    say(
        "Redis's append-only file: rewritten (BGREWRITEAOF), without the records as they were "
        "sealed before; its old files are unlinked, not overwritten"
    )
    return True


def data_dir_owner(settings: Settings, euid: int) -> tuple[int, int] | None:
    """(uid, gid) of the data dir when this runs as root (``euid`` 0), for what it makes
    there; None otherwise (also when there is no data dir). Raises :class:`DataDirRefused`
    for a user other than root who does not own the data dir. Asked before anything is read
    or written there, the generated secret included."""
    data_dir = settings.data_dir
    try:
        st = data_dir.stat()
    except FileNotFoundError:
        return None
    except PermissionError:  # a folder on its way this user may not enter
        raise DataDirRefused(
            f"CLINIC_DATA_DIR {data_dir.absolute()} cannot be reached by this user "
            f"({_user(euid)}): run this as the data dir's owner (serve's user), or as root"
        ) from None
    if euid == 0:
        return st.st_uid, st.st_gid
    if st.st_uid != euid:
        raise DataDirRefused(
            f"CLINIC_DATA_DIR {data_dir.absolute()} belongs to {_user(st.st_uid)}, not to "
            f"this user ({_user(euid)}): what this wrote there would be this user's, and "
            "serve could not read it. Run it as the data dir's owner (serve's user), or as "
            "root, which keeps each file's owner"
        )
    return None


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


@contextlib.asynccontextmanager
async def _redis(settings: Settings, owner: tuple[int, int] | None) -> AsyncIterator[_Redis]:
    """The Redis to reseal in. ``owner``: (uid, gid) the embedded Redis it starts runs as,
    and its files and the data dir's lock file belong to (run as root)."""
    from clinic_voice.app import DataDirInUse, lock_data_dir
    from clinic_voice.redis_server import EmbeddedRedis

    if settings.redis_url:
        yield _Redis(settings.redis_url, "CLINIC_REDIS_URL", embedded=False)
        return
    if os.geteuid() == 0 and owner is None:
        # No data dir, so no embedded Redis either: made now, both would be root's.
        raise _Refused(
            f"CLINIC_DATA_DIR {settings.data_dir.absolute()} is not there, nor the embedded "
            "Redis in it: check CLINIC_DATA_DIR (run as root, this makes nothing there, as it "
            "would be root's and not serve's)"
        )
    embedded = EmbeddedRedis(settings.data_dir, appendfsync=settings.redis_appendfsync, owner=owner)
    try:
        lock = lock_data_dir(settings.data_dir)
    except DataDirInUse:
        # serve runs, and its Redis with it: on the unix socket in the data dir (0700: this
        # runs as serve's user)
        yield _Redis(embedded.url, f"serve's embedded Redis ({embedded.url})", embedded=True)
        return
    try:
        if owner is not None:  # made now if serve never ran: serve must open it too
            os.fchown(lock, *owner)
        url = await embedded.start()
        try:
            yield _Redis(url, "the embedded Redis, started for this (serve is stopped)", True)
        finally:
            await embedded.stop()
    finally:
        os.close(lock)


async def _check_secret(execute: _Execute, secret: bytes, previous: Sequence[bytes]) -> None:
    """Raise :class:`_Refused` unless this Redis is the current secret's (its fingerprint is
    set when none is, as ``serve`` sets it): one that a previous secret still claims has a
    process on it that goes on sealing under it, and another secret's is another service's."""
    from clinic_voice import shared_secret

    there = await execute("GET", shared_secret.KEY)
    if there is not None and str(there) in {shared_secret.fingerprint(p) for p in previous}:
        raise _Refused(
            "Redis is still claimed by a secret of CLINIC_PREVIOUS_SECRETS: no serve has run "
            "on the new CLINIC_SECRET yet, and a process on the previous one would go on "
            'sealing under it. Restart serve with the new secret first (README: "Changing '
            'the secret", step 3)'
        )
    try:
        await shared_secret.claim(execute, secret)
    except shared_secret.SecretMismatch as exc:
        raise _Refused(str(exc)) from None
