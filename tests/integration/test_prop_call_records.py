"""Properties of the call records on disk and in Redis (voice/ivr/journal.py, store.py,
erasure.py, voicemail.py) on a real redis-server.

A Hypothesis state machine drives a few calls the way the clinic line does: a call begins
(its live record), rewrites it as it goes on, may leave a voicemail, and ends: its record
written ahead, saved and taken, or kept when the save fails (a store that raises
:class:`CallStoreUnavailable` around the real one), or ``serve`` is killed during the save,
after Redis took it, or before the live record went. A kill drops the journal and makes a new
one on the same folders (``leftovers``, as a start does); replays run with Redis failing part
way; erasures come at any point (409 while a call is under way, or its live record is young);
the injected clock moves past the retention. After every step:

- an erased call is nowhere: not in Redis, not in ``recent``, no file of it on disk;
- every ended call's own record is in Redis or kept on disk (a cut call's live record, when
  it has no own record, in Redis or waiting), and Redis never holds a "cut" record of a call
  whose own record was written;
- each call is counted once in ``on_counted`` (its own outcome), across kills; each cut call
  recorded by ``replay_lost`` once, none else;
- ``RecordsOnDisk`` equals what the folders hold; no copy written ahead is left over;
- no file holds a record or a message in clear.

The default run is deterministic (200 examples, ~20 s); ``HYPOTHESIS_PROFILE=deep`` searches at
random (``HYPOTHESIS_MAX_EXAMPLES``, 300 unless set).
"""

from __future__ import annotations

import asyncio
import base64
import enum
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sip_config.clock import FakeClock
from tests.conftest import RedisServer
from tests.integration.conftest import machine_settings, run_machine_on_redis
from verification.redis_mux import RedisMux
from voice.ivr.call_record import CallResult
from voice.ivr.engine import LOST_OUTCOME, CallRecord
from voice.ivr.erasure import LIVE_AT_MOST_S, CallErasure, CallUnderWay
from voice.ivr.journal import (
    AHEAD_SUFFIX,
    FOLDER,
    LIVE_FOLDER,
    CallJournal,
    RecordsOnDisk,
)
from voice.ivr.store import (
    CallStore,
    CallStoreUnavailable,
    Erased,
    Saved,
    SealedRecord,
    within_retention,
)
from voice.ivr.voicemail import Voicemails

pytestmark = [pytest.mark.integration]

T = TypeVar("T")

PROFILE = machine_settings(examples=200, deep_examples=300, steps=50)

SECRET = b"s" * 32
RETENTION_DAYS = 30
DAY_S = 86400
CALLER = "+31612345678"
CALLS = [f"call-{i}" for i in range(6)]
# What a patient said, and a message: none of it may reach the disk in clear.
CLEAR = ("chest-pain-radiating", "laboured-breathing", CALLER, "complaint")
PCM = b"\x11\x22\x33\x44" * 64
PICK = st.integers(0, len(CALLS) - 1)
HOW = st.sampled_from(["saved", "save_fails", "kill_in_save", "kill_after_save", "kill_at_end"])
seen: Counter[str] = Counter()  # what the runs did, printed with -s


class Phase(enum.Enum):
    IDLE = "idle"  # not begun
    LIVE = "live"  # under way: its live record on disk
    ENDED = "ended"  # over (saved, kept, or its serve died during or after the save)
    CUT = "cut"  # its serve died while it ran: only the live record is left


@dataclass
class Call:
    id: str
    phase: Phase = Phase.IDLE
    own: bool = False  # its own record was written (ahead, at its end)
    erased: bool = False
    ended_at: float = 0.0  # of its own record, or of the live record last written
    started_at: float = 0.0
    values: list[tuple[str, str]] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        return f"done-{self.id}"  # one per call: the tally tells the calls apart


class FaultyStore(CallStore):
    """The real store, whose saves and erasures fail as Redis stopped would
    (:class:`CallStoreUnavailable`) after ``saves_left`` more (None: no fault): from then
    on, or (``blip``) that one alone."""

    saves_left: int | None = None
    blip: bool = False  # only that one fails: Redis back a moment later

    def _fault(self) -> None:
        if self.saves_left is not None:
            self.saves_left -= 1
            if self.saves_left == -1 or (self.saves_left < -1 and not self.blip):
                raise CallStoreUnavailable("injected: Redis down")

    async def save_sealed(
        self,
        record: SealedRecord,
        *,
        ttl_s: int | None = None,
        patience_s: float | None = None,
        only_new: bool = False,
    ) -> Saved:
        self._fault()
        return await super().save_sealed(
            record, ttl_s=ttl_s, patience_s=patience_s, only_new=only_new
        )

    async def erase(self, call_id: str, *, on_disk: bool) -> Erased:
        self._fault()
        return await super().erase(call_id, on_disk=on_disk)


class CallRecordsMachine(RuleBasedStateMachine):
    loop: ClassVar[asyncio.AbstractEventLoop]
    mux: ClassVar[RedisMux]

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="prop-calls-"))
        self.clock = FakeClock(time.time())
        self.store = FaultyStore(self.mux, SECRET, RETENTION_DAYS, clock=self.clock)
        self.voicemails = Voicemails(self.dir / "voicemail", self.store)
        self.calls = {i: Call(i) for i in CALLS}
        self.counted: Counter[str | None] = Counter()
        self.cut_recorded = 0
        self.cut_expected = 0
        self.lost: list[str] = []
        self._run(self.mux.execute("FLUSHDB"))
        self._start()

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _run(self, coro: Awaitable[T]) -> T:
        async def wrapped() -> T:
            return await coro

        return self.loop.run_until_complete(wrapped())

    # -- a serve -------------------------------------------------------------------------------
    def _count(self, outcome: str | None) -> None:
        self.counted[outcome] += 1

    def _count_cut(self) -> None:
        self.cut_recorded += 1

    def _start(self) -> None:
        """A start of serve: its journals (the clinic line's, the erasure's) and leftovers."""
        on_disk = RecordsOnDisk()
        folder = self.dir / FOLDER
        self.journal = CallJournal(
            folder,
            self.store,
            on_cut_recorded=self._count_cut,
            on_disk=on_disk,
            on_counted=self._count,
        )
        erasure_journal = CallJournal(folder, self.store, on_disk=on_disk)
        self.erasure = CallErasure(self.store, erasure_journal, self.voicemails, self.clock)
        self.lost = self._run(self.journal.leftovers(self.clock.now()))
        expected = sorted(c.id for c in self.calls.values() if self._live_file(c.id).exists())
        assert self.lost == expected

    def _kill(self) -> None:
        """serve killed: what it ran is cut; the next start reads what it left."""
        for c in self.calls.values():
            if c.phase is Phase.LIVE:
                c.phase = Phase.CUT
        self._start()

    # -- paths ---------------------------------------------------------------------------------
    def _kept_file(self, call_id: str) -> Path:
        return self.dir / FOLDER / f"{call_id}.sealed"

    def _live_file(self, call_id: str) -> Path:
        return self.dir / LIVE_FOLDER / f"{call_id}.sealed"

    def _result(self, c: Call, outcome: str) -> CallResult:
        record = CallRecord("triage", (), tuple(c.values), None, (), None, "6100", outcome)
        return CallResult(c.id, CALLER, "700", c.started_at, c.ended_at, record)

    def _write_live(self, c: Call) -> None:
        """The live record written now: its time the injected clock's (the erasure compares
        the two), as it is with the system clock."""
        self._run(self.journal.begin(self._result(c, LOST_OUTCOME)))
        os.utime(self._live_file(c.id), (self.clock.now(), self.clock.now()))

    def _expired(self, c: Call) -> bool:
        # The retention counts from the call's start (voice/ivr/store.py).
        return not within_retention(c.started_at, self.clock.now(), self.store.ttl_s)

    # -- calls ---------------------------------------------------------------------------------
    def _some(self, *phases: Phase) -> bool:
        return any(c.phase in phases for c in self.calls.values())

    def _pick(self, n: int, *phases: Phase) -> Call | None:
        """The ``n``-th (modulo) call in one of ``phases``, if any."""
        some = [c for c in self.calls.values() if c.phase in phases]
        return some[n % len(some)] if some else None

    @precondition(lambda self: self._some(Phase.IDLE))
    @rule(n=PICK)
    def begin(self, n: int) -> None:
        c = self._pick(n, Phase.IDLE)
        if c is None:
            return
        c.phase, c.started_at = Phase.LIVE, self.clock.now()
        c.ended_at, c.values = c.started_at, [("complaint", "chest-pain-radiating")]
        self._write_live(c)

    @precondition(lambda self: self._some(Phase.LIVE))
    @rule(n=PICK, secs=st.integers(1, 120))
    def goes_on(self, n: int, secs: int) -> None:
        """The session rewrites the live record as the call goes on."""
        c = self._pick(n, Phase.LIVE)
        if c is None:
            return
        self.clock.advance(secs)
        c.ended_at = self.clock.now()
        c.values.append((f"breathing-{len(c.values)}", "laboured-breathing"))
        self._write_live(c)

    @precondition(lambda self: self._some(Phase.LIVE))
    @rule(n=PICK)
    def voicemail(self, n: int) -> None:
        c = self._pick(n, Phase.LIVE)
        if c is not None:
            self._run(self.voicemails.save(c.id, PCM, started_at=c.started_at))

    @precondition(lambda self: self._some(Phase.LIVE))
    @rule(
        n=PICK,
        how=HOW,
    )
    def end(self, n: int, how: str) -> None:
        """The call ends as CallSession._store and run() end it."""
        c = self._pick(n, Phase.LIVE)
        if c is None:
            return
        seen[f"end:{how}"] += 1
        c.ended_at, c.own, c.phase = self.clock.now(), True, Phase.ENDED
        result = self._result(c, c.outcome)
        self._run(self.journal.write_ahead(result))
        if how == "kill_in_save":
            self._kill()
            return
        if how == "save_fails":
            self.store.saves_left = 0
        try:
            self._run(self.store.save_sealed(self.store.seal_result(result), patience_s=0.0))
        except CallStoreUnavailable:
            self._run(self.journal.keep(result))
        else:
            if how == "kill_after_save":
                self._kill()
                return
            self._run(self.journal.taken(result))
        finally:
            self.store.saves_left = None
        if how == "kill_at_end":
            self._kill()
            return
        self._run(self.journal.end(c.id))

    @precondition(lambda self: self._some(Phase.LIVE))
    @rule(n=PICK, how=HOW)
    def end_another(self, n: int, how: str) -> None:
        """As :meth:`end` (a rule twice: calls end as often as anything else happens)."""
        self.end(n, how)

    @rule()
    def kill(self) -> None:
        self._kill()

    @rule(saves=st.none() | st.integers(0, 4), blip=st.booleans())
    def replay(self, saves: int | None, blip: bool) -> None:
        """The clinic line's replay (at start, every 30 s), Redis failing after ``saves``."""
        before = list(self.lost)
        self.store.saves_left, self.store.blip = saves, blip
        try:
            self.lost = self._run(self.journal.replay_all(self.lost, self.clock.now()))
        finally:
            self.store.saves_left, self.store.blip = None, False
        for call_id in before:
            c = self.calls[call_id]
            if call_id in self.lost or c.erased or c.own or self._expired(c):
                continue
            self.cut_expected += 1
            seen["cut recorded"] += 1
        if saves is None:
            assert self.lost == []
            kept = sorted(p.name for p in (self.dir / FOLDER).glob("*.sealed"))
            assert kept == [], f"Redis up, and records still kept: {kept}"

    @precondition(lambda self: self._some(Phase.LIVE, Phase.ENDED, Phase.CUT))
    @rule(n=PICK, down=st.booleans())
    def erase(self, n: int, down: bool) -> None:
        c = self._pick(n, Phase.LIVE, Phase.ENDED, Phase.CUT)
        if c is None:
            return
        if c.phase is Phase.LIVE:
            with pytest.raises(CallUnderWay):
                self._run(self.erasure.erase(c.id))
            seen["erase:409 under way"] += 1
            return
        i = c.id
        live = self._live_file(i)
        young = live.exists() and self.clock.now() - live.stat().st_mtime < LIVE_AT_MOST_S
        seen[f"erase kept={self._kept_file(i).exists()} live={live.exists()}"] += 1
        if down:
            self.store.saves_left = 0
        try:
            got = self._run(self.erasure.erase(i))
        except CallUnderWay:
            seen["erase:409"] += 1
            assert young, f"{i}: 409, with no young live record"
            return
        except CallStoreUnavailable:
            assert down
            return
        finally:
            self.store.saves_left = None
        assert not young, f"{i}: erased with a young live record"
        assert not down
        if got is None:
            # 404: nothing of it is known (README), past its retention from its start: its
            # record expired or dropped by the replay, its message the sweep's.
            assert self._expired(c), f"{i}: 404 within its retention"
            seen["erase:404 past retention"] += 1
            return
        c.erased = True
        seen[f"erase:{c.phase.value}"] += 1

    @rule(n=PICK, saves=st.none() | st.integers(0, 4), first=st.booleans())
    def erase_during_replay(self, n: int, saves: int | None, first: bool) -> None:
        """An erasure (an HTTP request) while the clinic line replays: the two interleave
        at each await. Of a call whose own record was written, so that the tally of cut
        calls does not depend on which one wins."""
        some = [c for c in self.calls.values() if c.own and not c.erased]
        if not some:
            return
        c = some[n % len(some)]
        live = self._live_file(c.id)
        young = live.exists() and self.clock.now() - live.stat().st_mtime < LIVE_AT_MOST_S
        before = list(self.lost)
        self.store.saves_left = saves

        async def both() -> list[Any]:
            replaying = self.journal.replay_all(self.lost, self.clock.now())
            erasing = self.erasure.erase(c.id)
            pair = (replaying, erasing) if first else (erasing, replaying)
            return list(await asyncio.gather(*pair, return_exceptions=True))

        try:
            got = self._run(both())
        finally:
            self.store.saves_left = None
        lost, erased = got if first else got[::-1]
        if isinstance(lost, CallStoreUnavailable):
            raise AssertionError("a replay raised") from lost
        assert isinstance(lost, list), lost
        self.lost = lost
        for call_id in before:
            k = self.calls[call_id]
            if call_id in self.lost or k.erased or k.own or self._expired(k):
                continue
            self.cut_expected += 1
        if isinstance(erased, CallUnderWay):
            assert young
        elif isinstance(erased, CallStoreUnavailable):
            assert saves is not None
        elif isinstance(erased, BaseException):
            raise erased
        elif erased is None:
            assert self._expired(c), f"{c.id}: 404 within its retention"
        else:
            assert not young
            c.erased = True
            seen["erase during replay"] += 1

    @precondition(lambda self: all(c.phase is not Phase.LIVE for c in self.calls.values()))
    @rule(days=st.sampled_from([0.1, 1, 29, 31]))
    def time_passes(self, days: float) -> None:
        self.clock.advance(days * DAY_S)

    # -- what must hold ------------------------------------------------------------------------
    async def _in_redis(self) -> dict[str, dict[str, Any]]:
        got = {}
        for i in CALLS:
            doc = await self.store.get(i)
            if doc is not None:
                got[i] = doc
        return got

    @invariant()
    def records_hold(self) -> None:
        in_redis = self._run(self._in_redis())
        listed = {d["id"] for d in self._run(self.store.recent(100, None)).calls}
        assert listed <= set(in_redis), "a call listed that Redis does not hold"
        files = [p for p in self.dir.rglob("*") if p.is_file()]
        for c in self.calls.values():
            mine = [p.name for p in files if p.name.startswith(f"{c.id}.")]
            mine += [p.name for p in files if p.name.startswith(f"{c.id}-")]
            if c.erased:
                assert c.id not in in_redis, f"{c.id}: erased, and back in Redis"
                assert c.id not in listed, f"{c.id}: erased, and listed"
                assert not mine, f"{c.id}: erased, and on disk: {mine}"
                continue
            doc = in_redis.get(c.id)
            if doc is not None and c.started_at > self.clock.now() - self.store.ttl_s:
                assert c.id in listed, f"{c.id}: in Redis, not listed"
            if doc is not None:
                assert doc["values"] == dict(c.values), f"{c.id}: another record in Redis"
                if c.own:
                    assert doc["outcome"] == c.outcome, f"{c.id}: its own record overwritten"
            if c.phase in (Phase.IDLE, Phase.LIVE) or self._expired(c):
                continue
            if c.own:
                assert doc is not None or self._kept_file(c.id).exists(), (
                    f"{c.id}: its record is lost"
                )
            else:
                assert doc is not None or self._live_file(c.id).exists(), (
                    f"{c.id}: its cut record is lost"
                )
                if doc is not None:
                    assert doc["outcome"] == LOST_OUTCOME
        ahead = [p.name for p in files if p.name.endswith(AHEAD_SUFFIX)]
        assert not ahead, f"copies written ahead left over: {ahead}"

    @invariant()
    def counted_once(self) -> None:
        expected = Counter(c.outcome for c in self.calls.values() if c.own)
        assert self.counted == expected
        assert self.cut_recorded == self.cut_expected

    @invariant()
    def on_disk_is_the_folders(self) -> None:
        now = self.journal.on_disk.now()
        assert now is not None
        kept = len(list((self.dir / FOLDER).glob("*.sealed")))
        cut = sum(1 for i in self.lost if self._live_file(i).exists())
        assert (now.kept, now.cut, now.unreadable) == (kept, cut, 0)

    @invariant()
    def nothing_in_clear(self) -> None:
        for p in self.dir.rglob("*"):
            if not p.is_file():
                continue
            raw = p.read_bytes()
            plain = base64.b64decode(raw)
            for secret in (*CLEAR, PCM.hex()):
                assert secret.encode() not in raw and secret.encode() not in plain, p.name
            assert PCM not in raw and PCM not in plain, p.name


def test_call_records_keep_every_promise_under_any_history(redis_server: RedisServer) -> None:
    try:
        run_machine_on_redis(CallRecordsMachine, redis_server.url, PROFILE)
    finally:
        print(sorted(seen.items()))
