"""Erasure against the journal, generated: "erased means gone, and nothing else is lost"
(voice/ivr/erasure.py, journal.py, store.py, voicemail.py, clinic_voice/clinic_line.py's
replay round) on a real redis-server that is stopped, ``kill -9``-ed and started again
between steps.

A Hypothesis state machine runs two ``serve`` processes on one Redis, each with its own data
dir (README: more ``serve`` processes and hosts on one shared Redis), and an HTTP worker of
the first on its data dir, as the clinic line runs them: a call begins at a ``serve`` (its
live record), may leave a voicemail, and ends (its record written ahead, saved, or kept on
disk while Redis is down); a ``serve`` is killed during a call or a save and started again
(new objects on the same data dir, ``leftovers``); either replays (its journal, and the
voicemail of calls erased elsewhere); Redis goes down and comes back; the injected clock
moves on and the voicemail is swept; erasures arrive at any of the three for any call (under
way, waiting on disk, in Redis, erased before) or for an id no call has, alone or while a
replay runs. After every step, against a model:

- an erasure is 503 only with Redis down, 409 only with a young live record in its own data
  dir, and 404 only when neither Redis nor its own data dir held a copy (a copy at the other
  ``serve`` it cannot know of: README, ``DELETE /v1/calls/{id}``);
- an erased call is nowhere: not readable (``get``, ``recent``), no Redis key or index entry
  of it but its mark ``cv:erased:<id>``, no value in Redis that opens under its id, and no
  file that names it, holds its id or opens under its id in the data dir of the process
  that erased it, nor in the other ``serve``'s once that one replayed with Redis up;
- every other ended call within its retention is in Redis with its own content, listed once,
  or waits on its ``serve``'s disk (Redis's own expiry runs on the real clock: a record past
  its retention on the injected one may stay);
- an erasure of an id no call has writes nothing.

The default run is deterministic (300 examples, ~35 s); ``HYPOTHESIS_PROFILE=deep`` searches
at random (``HYPOTHESIS_MAX_EXAMPLES``, 1000 unless set).
"""

from __future__ import annotations

import asyncio
import contextlib
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
from cryptography.exceptions import InvalidTag
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from redis.exceptions import RedisError

from sip_config.clock import FakeClock
from tests.conftest import RedisServer
from tests.integration.conftest import machine_settings
from verification.redis_mux import RedisMux
from voice.ivr.call_record import CallResult
from voice.ivr.engine import LOST_OUTCOME, CallRecord
from voice.ivr.erasure import LIVE_AT_MOST_S, CallErasure, CallUnderWay, Erasure
from voice.ivr.journal import FOLDER, LIVE_FOLDER, CallJournal, RecordsOnDisk
from voice.ivr.store import ERASED_PREFIX, CallStore, CallStoreUnavailable, within_retention
from voice.ivr.voicemail import FOLDER as VOICEMAIL_FOLDER
from voice.ivr.voicemail import Voicemails

pytestmark = [pytest.mark.integration]

T = TypeVar("T")

PROFILE = machine_settings(examples=300, deep_examples=1000, steps=40)

SECRET = b"e" * 32
RETENTION_DAYS = 30
DAY_S = 86400
CALLER = "+31612345678"
CALLS = [f"call-{i}" for i in range(5)]
UNKNOWN = "call-none"  # no call has it
SERVES = ("a", "b")  # two serve processes, each on its own data dir
WORKER = "w"  # an HTTP worker of serve "a": its data dir, its own objects
HOSTS = (*SERVES, WORKER)
PCM = b"\x5a\xa5\x13\x37" * 64
PICK = st.integers(0, len(CALLS) - 1)
SERVE = st.sampled_from(SERVES)
HOST = st.sampled_from(HOSTS)
SECS = st.integers(1, 600)
seen: Counter[str] = Counter()  # what the runs did, printed with -s


class Phase(enum.Enum):
    IDLE = "idle"  # not begun
    LIVE = "live"  # under way on its host: its live record on disk
    ENDED = "ended"  # over: its own record saved, kept, or written ahead by a killed serve
    CUT = "cut"  # its serve died while it ran: its live record is all that is left


@dataclass
class Call:
    id: str
    host: str = "a"
    phase: Phase = Phase.IDLE
    erased: bool = False
    # The data dirs no file of the erased call may be in: the one of the process that erased
    # it, and each one whose serve replayed with Redis up since.
    clean: set[Path] = field(default_factory=set)
    voicemail: bool = False
    started_at: float = 0.0
    ended_at: float = 0.0

    @property
    def words(self) -> str:
        """What the patient said: this call's alone, so a file or value holding it is its."""
        return f"words-of-{self.id}"

    @property
    def outcome(self) -> str:
        return f"done-{self.id}"


class Host:
    """One ``serve``: its data dir, Redis connection and the objects a start builds."""

    def __init__(self, name: str, data_dir: Path, redis_url: str, clock: FakeClock) -> None:
        self.name = name
        self.dir = data_dir
        self.dir.mkdir(exist_ok=True)
        self.mux = RedisMux(redis_url, timeout_s=2.0)
        self.clock = clock
        self.lost: list[str] = []
        self.build()

    def build(self) -> None:
        self.store = CallStore(self.mux, SECRET, RETENTION_DAYS, clock=self.clock)
        self.voicemails = Voicemails(self.dir / VOICEMAIL_FOLDER, self.store)
        on_disk = RecordsOnDisk()
        self.journal = CallJournal(self.dir / FOLDER, self.store, on_disk=on_disk)
        erasure_journal = CallJournal(self.dir / FOLDER, self.store, on_disk=on_disk)
        self.erasure = CallErasure(self.store, erasure_journal, self.voicemails, self.clock)

    def live_file(self, call_id: str) -> Path:
        return self.dir / LIVE_FOLDER / f"{call_id}.sealed"

    def kept_file(self, call_id: str) -> Path:
        return self.dir / FOLDER / f"{call_id}.sealed"

    def files(self) -> list[Path]:
        return [p for p in self.dir.rglob("*") if p.is_file()]


class ErasureMachine(RuleBasedStateMachine):
    loop: ClassVar[asyncio.AbstractEventLoop]
    server: ClassVar[RedisServer]

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="prop-erase-"))
        self.clock = FakeClock(time.time())
        if self.server.pid is None:
            self.server.restart()
        self.up = True
        dirs = {"a": self.root / "a", "b": self.root / "b", WORKER: self.root / "a"}
        self.hosts = {h: Host(h, dirs[h], self.server.url, self.clock) for h in HOSTS}
        self.calls = {i: Call(i) for i in CALLS}
        self._run(self.hosts["a"].mux.execute("FLUSHALL"))
        for h in self._serves():
            h.lost = self._run(h.journal.leftovers(self.clock.now()))

    def teardown(self) -> None:
        for h in self.hosts.values():
            self._run(h.mux.aclose())
        shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, coro: Awaitable[T]) -> T:
        async def wrapped() -> T:
            return await coro

        return self.loop.run_until_complete(wrapped())

    # -- helpers -------------------------------------------------------------------------------
    def _result(self, c: Call, outcome: str) -> CallResult:
        values: tuple[tuple[str, str], ...] = (("complaint", c.words),)
        if c.voicemail:
            values += (("callback_message", f"{c.id}-0badf00d.sealed"),)
        record = CallRecord("triage", (), values, None, (), None, "6100", outcome)
        return CallResult(c.id, CALLER, "700", c.started_at, c.ended_at, record)

    def _pick(self, n: int, *phases: Phase) -> Call | None:
        some = [c for c in self.calls.values() if c.phase in phases]
        return some[n % len(some)] if some else None

    def _some(self, *phases: Phase) -> bool:
        return any(c.phase in phases for c in self.calls.values())

    def _expired(self, c: Call) -> bool:
        # The retention counts from the call's start (voice/ivr/store.py).
        return not within_retention(c.started_at, self.clock.now(), RETENTION_DAYS * DAY_S)

    def _serves(self) -> list[Host]:
        return [self.hosts[h] for h in SERVES]

    def _young_live(self, c: Call, h: Host) -> bool:
        """Whether ``h``'s data dir has a live record of ``c`` young enough for a 409."""
        live = h.live_file(c.id)
        return live.exists() and self.clock.now() - live.stat().st_mtime < LIVE_AT_MOST_S

    def _restart(self, h: Host) -> None:
        """``serve`` on ``h`` killed and started again: what it ran is cut."""
        for c in self.calls.values():
            if c.host == h.name and c.phase is Phase.LIVE:
                c.phase = Phase.CUT
        h.build()
        h.lost = self._run(h.journal.leftovers(self.clock.now()))

    # -- calls ---------------------------------------------------------------------------------
    @precondition(lambda self: self._some(Phase.IDLE))
    @rule(n=PICK, host=SERVE)
    def begin(self, n: int, host: str) -> None:
        c = self._pick(n, Phase.IDLE)
        assert c is not None
        h = self.hosts[host]
        c.host, c.phase = host, Phase.LIVE
        c.started_at = c.ended_at = self.clock.now()
        self._run(h.journal.begin(self._result(c, LOST_OUTCOME)))
        os.utime(h.live_file(c.id), (self.clock.now(), self.clock.now()))

    @precondition(lambda self: self._some(Phase.LIVE))
    @rule(n=PICK)
    def voicemail(self, n: int) -> None:
        c = self._pick(n, Phase.LIVE)
        assert c is not None
        if not c.voicemail:
            pcm = PCM + c.id.encode()
            self._run(self.hosts[c.host].voicemails.save(c.id, pcm, started_at=c.started_at))
            c.voicemail = True

    @precondition(lambda self: self._some(Phase.LIVE))
    @rule(
        n=PICK,
        how=st.sampled_from(["end", "kill_in_save", "kill_at_end"]),
        secs=st.integers(1, 600),
    )
    def end(self, n: int, how: str, secs: int) -> None:
        """The call ends as the clinic line ends it (clinic_voice/clinic_line.py)."""
        c = self._pick(n, Phase.LIVE)
        assert c is not None
        h = self.hosts[c.host]
        self.clock.advance(secs)
        c.ended_at, c.phase = self.clock.now(), Phase.ENDED
        result = self._result(c, c.outcome)
        self._run(h.journal.write_ahead(result))
        if how == "kill_in_save":
            self._restart(h)
            return
        try:
            self._run(h.store.save_sealed(h.store.seal_result(result), patience_s=0.0))
        except CallStoreUnavailable:
            seen["end: kept on disk"] += 1
            self._run(h.journal.keep(result))
        else:
            seen["end: saved"] += 1
            self._run(h.journal.taken(result))
        if how == "kill_at_end":
            self._restart(h)
            return
        self._run(h.journal.end(c.id))

    @rule(host=SERVE)
    def restart(self, host: str) -> None:
        self._restart(self.hosts[host])

    @rule(host=SERVE)
    def replay(self, host: str) -> None:
        self._replay(self.hosts[host])

    def _replay(self, h: Host) -> None:
        """A round of serve's replay (clinic_voice/clinic_line.py: every 30 s)."""
        h.lost = self._run(h.journal.replay_all(h.lost, self.clock.now()))
        if self.up:
            self._run(h.voicemails.drop_erased())
            for c in self.calls.values():
                if c.erased:
                    c.clean.add(h.dir)

    # -- Redis ---------------------------------------------------------------------------------
    @precondition(lambda self: self.up)
    @rule(kill=st.booleans())
    def redis_down(self, kill: bool) -> None:
        seen[f"redis down kill={kill}"] += 1
        if kill:
            self.server.kill9()
        else:
            self.server.stop()
        self.up = False

    @precondition(lambda self: not self.up)
    @rule()
    def redis_up(self) -> None:
        self.server.restart()
        self.up = True
        # Each connection learns that its socket was closed at its next command (which a
        # caller of the service takes as any failure): here, before the steps and checks.
        for h in self.hosts.values():
            with contextlib.suppress(RedisError):
                self._run(h.mux.execute("PING"))

    # -- time ----------------------------------------------------------------------------------
    @precondition(lambda self: not self._some(Phase.LIVE))
    @rule(days=st.sampled_from([1, 29, 31]))
    def time_passes(self, days: int) -> None:
        """The retention sweeps: voicemail past it (serve, every hour), and the replay."""
        self.clock.advance(days * DAY_S)
        for h in self._serves():
            # The messages' files are dated by their calls' starts on the injected clock.
            h.voicemails.sweep(RETENTION_DAYS * DAY_S, self.clock.now())
            self._replay(h)

    # -- erasure -------------------------------------------------------------------------------
    def _erase(self, h: Host, call_id: str) -> Erasure | BaseException | None:
        try:
            return self._run(h.erasure.erase(call_id))
        except (CallUnderWay, CallStoreUnavailable) as exc:
            return exc

    def _judge(
        self,
        call_id: str,
        via: Host,
        got: Erasure | BaseException | None,
        young: bool,
        known: bool,
    ) -> None:
        """What the erasure of ``call_id`` through ``via`` answered, against the model (as it
        was before: ``young``, a live record young enough for a 409 in ``via``'s data dir;
        ``known``, a copy in Redis or there)."""
        c = self.calls.get(call_id)
        here = c is not None and self.hosts[c.host].dir == via.dir
        kind = type(got).__name__
        seen[f"erase {c.phase.value if c else 'unknown'} here={here}: {kind}"] += 1
        if isinstance(got, CallStoreUnavailable):
            assert not self.up, f"{call_id}: 503 with Redis up"
            return
        if isinstance(got, CallUnderWay):
            assert young, f"{call_id}: 409, none under way"
            return
        assert not isinstance(got, BaseException), got
        assert self.up, f"{call_id}: erased with Redis down"
        if got is None:
            assert not known, f"{call_id}: 404, and a copy of it is kept here or in Redis"
            if c is not None and self._where(c):  # at another serve: it cannot know
                seen["404: its copy is on another serve's disk"] += 1
            return
        assert c is not None, f"{call_id}: an id no call has erased"
        assert not young, f"{call_id}: erased while under way"
        c.erased = True
        c.clean.add(via.dir)

    def _known(self, c: Call, via: Host) -> bool:
        """Whether ``via`` can know of ``c``: in Redis, or on its own data dir within its
        retention (a copy past it, left by a replay Redis stopped, is the next replay's)."""
        mine = not self._expired(c)
        return any(w == "redis" or (mine and w.startswith(f"{via.dir}:")) for w in self._where(c))

    def _where(self, c: Call) -> list[str]:
        """Where a copy of ``c`` is: Redis, or the files of either host."""
        out = []
        if self.up and self._run(self.hosts["a"].mux.execute("EXISTS", f"cv:call:{c.id}")):
            out.append("redis")
        for h in self._serves():
            out += [f"{h.dir}:{p.name}" for p in h.files() if c.id in p.name]
        return out

    @rule(n=st.integers(0, len(CALLS)), host=HOST)
    def erase(self, n: int, host: str) -> None:
        call_id = CALLS[n] if n < len(CALLS) else UNKNOWN
        h = self.hosts[host]
        c = self.calls.get(call_id)
        young = c is not None and self._young_live(c, h)
        known = c is not None and self._known(c, h)
        self._judge(call_id, h, self._erase(h, call_id), young, known)

    @rule(n=PICK, eraser=HOST, replayer=SERVE, first=st.booleans())
    def erase_during_replay(self, n: int, eraser: str, replayer: str, first: bool) -> None:
        """An erasure (an HTTP request) at one process while a replay runs at one."""
        c = self._pick(n, Phase.ENDED, Phase.CUT)
        if c is None:
            return
        e, r = self.hosts[eraser], self.hosts[replayer]
        young, known = self._young_live(c, e), self._known(c, e)

        async def both() -> list[Any]:
            replaying = r.journal.replay_all(r.lost, self.clock.now())
            erasing = e.erasure.erase(c.id)
            pair = (replaying, erasing) if first else (erasing, replaying)
            return list(await asyncio.gather(*pair, return_exceptions=True))

        got = self._run(both())
        lost, erased = got if first else got[::-1]
        assert isinstance(lost, list), lost
        r.lost = lost
        if isinstance(erased, BaseException) and not isinstance(
            erased, CallUnderWay | CallStoreUnavailable
        ):
            raise erased
        self._judge(c.id, e, erased, young, known)

    # -- what must hold ------------------------------------------------------------------------
    def _opens(self, call_id: str, sealed: str) -> bool:
        try:
            self.hosts["a"].store.open(call_id, sealed)
        except (InvalidTag, ValueError, TypeError):
            return False
        return True

    async def _redis_dump(self) -> dict[str, Any]:
        mux = self.hosts["a"].mux
        keys: list[str] = []
        cursor = "0"
        while True:
            cursor, found = await mux.execute("SCAN", cursor, "COUNT", 1000)
            keys += [str(k) for k in found]
            if str(cursor) == "0":
                break
        dump: dict[str, Any] = {}
        for k in keys:
            kind = str(await mux.execute("TYPE", k))
            if kind == "string":
                dump[k] = str(await mux.execute("GET", k))
            elif kind == "zset":
                dump[k] = [str(m) for m in await mux.execute("ZRANGE", k, 0, -1)]
            else:
                dump[k] = kind
        return dump

    @invariant()
    def erased_is_gone(self) -> None:
        erased = [c for c in self.calls.values() if c.erased]
        files = {h.dir: h.files() for h in self._serves()}
        for c in erased:
            for name, paths in files.items():
                if name not in c.clean:
                    continue  # another serve's: its next replay with Redis up
                for p in paths:
                    raw = p.read_bytes()
                    assert c.id not in p.name, f"{c.id}: erased, and {name}:{p} is left"
                    assert c.id.encode() not in raw, f"{c.id}: erased, {name}:{p} holds its id"
                    assert not self._opens(c.id, raw.decode(errors="replace")), (
                        f"{c.id}: erased, and {name}:{p} opens under its id"
                    )
        if not self.up:
            return
        dump = self._run(self._redis_dump())
        for c in erased:
            for k, v in dump.items():
                if k == f"{ERASED_PREFIX}{c.id}":
                    continue
                assert c.id not in k, f"{c.id}: erased, and Redis has {k}"
                if isinstance(v, list):
                    assert c.id not in v, f"{c.id}: erased, and listed in {k}"
                elif isinstance(v, str):
                    assert not self._opens(c.id, v), f"{c.id}: erased, and {k} opens under its id"
            for h in self.hosts.values():
                assert self._run(h.store.get(c.id)) is None
        assert f"{ERASED_PREFIX}{UNKNOWN}" not in dump, "an id no call has was marked"

    @invariant()
    def nothing_else_lost(self) -> None:
        if not self.up:
            return
        store = self.hosts["b"].store
        listed = Counter(d["id"] for d in self._run(store.recent(100, None)).calls)
        assert all(n == 1 for n in listed.values()), f"a call listed twice: {listed}"
        for c in self.calls.values():
            if c.erased or c.phase in (Phase.IDLE, Phase.LIVE):
                assert not c.erased or c.id not in listed
                continue
            h = self.hosts[c.host]
            doc = self._run(store.get(c.id))
            if doc is not None:
                assert doc["values"]["complaint"] == c.words, f"{c.id}: another call's record"
                if c.phase is Phase.ENDED:
                    assert doc["outcome"] == c.outcome, f"{c.id}: not its own record"
                if not self._expired(c) and c.started_at > self.clock.now() - store.ttl_s:
                    assert listed[c.id] == 1, f"{c.id}: in Redis, not listed"
            if self._expired(c):
                continue
            waiting = h.kept_file(c.id).exists() or (
                c.phase is Phase.CUT and h.live_file(c.id).exists()
            )
            assert doc is not None or waiting, f"{c.id}: lost ({self._where(c)})"


def test_erasure_holds_under_any_interleaving(redis_server: RedisServer) -> None:
    from hypothesis.stateful import run_state_machine_as_test

    loop = asyncio.new_event_loop()
    bound = type("BoundErasureMachine", (ErasureMachine,), {"loop": loop, "server": redis_server})
    try:
        run_state_machine_as_test(bound, settings=PROFILE)
    finally:
        loop.close()
        print(sorted(seen.items()))
