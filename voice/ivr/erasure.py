"""Erasure of one call's data (a GDPR erasure request: ``DELETE /v1/calls/{id}``).

A call leaves up to four things: its sealed record and its entry in the calls index in Redis
(voice/ivr/store.py), its voicemail files (voice/ivr/voicemail.py), and copies on disk while
Redis does not have it (voice/ivr/journal.py: ``unsaved-calls``, and ``live-calls`` while it
runs). The order makes a failure at any step safe to retry:

1. A call still under way is refused (:class:`CallUnderWay`): its record does not exist yet,
   and it may still record a message. Staff try again once it ended. A live record older than
   a call can last (:data:`LIVE_AT_MOST_S`) is one a dead ``serve`` left, not a call under way:
   it is erased like any copy.
2. Redis, in one script: the record and index entry go, and the call is marked erased for the
   retention period, so that no save (a replay of a copy on disk racing this erasure, the end
   of a call) writes it back. With Redis down nothing has changed yet: the client retries.
3. The files on disk, each deletion made durable. A failure here leaves the mark in Redis, so
   nothing comes back meanwhile, and a retry finds the call marked and finishes the files.

The mark holds the call id alone. The old value stays in the append-only file of Redis until
its next rewrite; an erasure asks the embedded Redis's for one soon (see
clinic_voice/redis_server.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sip_config.clock import Clock
from voice.ivr.journal import CallJournal
from voice.ivr.session import MAX_CALL_S
from voice.ivr.store import CallStore, Erased
from voice.ivr.voicemail import Voicemails

log = logging.getLogger(__name__)

# A call ends by MAX_CALL_S; its record's save, the closing notice at a stop and the live
# record's delete take well under 5 minutes more, and a call under way rewrites its live
# record at least every LIVE_REFRESH_S. A live record older than this was left by a serve
# that died during its call.
LIVE_AT_MOST_S = MAX_CALL_S + 300.0


class CallUnderWay(RuntimeError):
    """The call is still going on: it cannot be erased until it ended."""


class ErasureIncomplete(RuntimeError):
    """The call is erased from Redis (and marked, so nothing brings it back) but a file of it
    could not be deleted: the same request again finishes it."""


@dataclass(frozen=True, slots=True)
class Erasure:
    """What an erasure deleted: the record in Redis (or not: only on disk, or erased before),
    and how many files on disk."""

    record: bool
    files: int


class CallErasure:
    """Erases one call from Redis and the data dir."""

    def __init__(
        self, store: CallStore, journal: CallJournal, voicemails: Voicemails, clock: Clock
    ) -> None:
        self._store = store
        self._journal = journal
        self._voicemails = voicemails
        self._clock = clock

    async def erase(self, call_id: str) -> Erasure | None:
        """Erase ``call_id``; None when nothing of it is known (nothing changed). Raises
        :class:`CallUnderWay`, :class:`~voice.ivr.store.CallStoreUnavailable` (nothing
        changed) or :class:`ErasureIncomplete`; each is safe to retry."""
        now = self._clock.now()
        live_since = await self._journal.live_since(call_id)
        if live_since is not None and now - live_since < LIVE_AT_MOST_S:
            raise CallUnderWay(call_id)
        # A message past its retention (the sweep's, within the hour) or a copy of the record
        # past it (the next replay's) makes no call known: the API answers 404 for it, as for
        # its record (README).
        on_disk = await self._journal.holds(call_id, now) or await self._voicemails.holds(
            call_id, now
        )
        found = await self._store.erase(call_id, on_disk=on_disk)
        if found is Erased.UNKNOWN:
            return None
        try:
            files = await self._journal.drop(call_id) + await self._voicemails.erase(call_id)
        except OSError as exc:
            # A path and a reason (a file's mode, a read-only disk): no health data.
            log.error("call %s: erased in Redis, but a file of it stays: %s", call_id, exc)
            raise ErasureIncomplete(call_id) from exc
        log.info(
            "call %s: erased (record in Redis: %s; %d file(s) on disk)",
            call_id,
            "yes" if found is Erased.RECORD else "no",
            files,
        )
        return Erasure(found is Erased.RECORD, files)
