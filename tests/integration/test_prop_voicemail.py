"""Voicemail end to end (voice/ivr/voicemail.py, store.py, erasure.py, reseal.py, api.py): a
Hypothesis state machine against a real redis-server, real files and the real app over HTTP.

Calls leave messages of any length (none, one 20 ms frame, a minute) and end as the clinic
line ends them: the live record written at the answer (voice/ivr/journal.py), the message
sealed into the data dir, the live record rewritten to name it, the record saved; or
``serve`` is killed at one of those seams (a write of the message cut short, the message
written but not yet named, named but the record not yet saved), and the next start replays
the live record. In between: reads through ``GET /v1/calls/{id}/voicemail`` with the staff's
key and with keys that are not for it, ``CLINIC_SECRET`` changed with and without the old one
in ``CLINIC_PREVIOUS_SECRETS`` (a restart of the app on the same data dir and Redis),
``clinic-voice secret reseal``, erasures, time passing on the injected clock (Redis's expiry
moved with it, the voicemail sweep run on it), and damaged files (truncated, a byte flipped,
mode 000). After every step, for every call:

- a 200 is exactly the audio that was left (byte-equal), never another's;
- a message that is there but does not open is 500, never 404; a call with no message, or
  one erased or past its retention, is 404;
- after an erasure or the retention nothing of the call is left: no file, no record or index
  entry in Redis;
- every message file the service wrote is 0600 in a 0700 folder;
- no log line, and no output of the re-seal, holds audio or what the caller said.

The default run is deterministic (``derandomize``, 100 examples of up to 25 steps, ~30 s);
``HYPOTHESIS_PROFILE=deep`` searches at random (``HYPOTHESIS_MAX_EXAMPLES``, 300 unless set).
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import random
import re
import secrets
import shutil
import stat
import tempfile
import time
import wave
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from clinic_voice import shared_secret
from clinic_voice.app import RUNTIME, Runtime
from clinic_voice.secret_reseal import reseal
from sip_config.clock import FakeClock
from sip_config.settings import Settings
from tests.conftest import RedisServer
from tests.integration.conftest import (
    API_KEY,
    CALLS_KEY,
    Answer,
    Api,
    StartService,
    machine_settings,
)
from verification.redis_mux import RedisMux
from voice.ivr.call_record import CallResult
from voice.ivr.engine import LOST_OUTCOME, CallRecord
from voice.ivr.journal import FOLDER, LIVE_FOLDER, CallJournal
from voice.ivr.store import INDEX

pytestmark = [pytest.mark.integration]

T = TypeVar("T")

PROFILE = machine_settings(examples=100, deep_examples=300, steps=25)

SECRETS = (
    "vm-secret-a-0123456789abcdefghijklmnopq",
    "vm-secret-b-0123456789abcdefghijklmnopq",
    "vm-secret-c-0123456789abcdefghijklmnopq",
)
RETENTION_DAYS = 30
RETENTION_S = RETENTION_DAYS * 86400
# Redis's expiry runs on the real clock, moved by each advance of the injected one: within
# this of a key's end of retention, whether it went is Redis's to say.
EXPIRY_SLACK_S = 300
CALLER = "+31612345678"
COMPLAINT = "chest-pain-radiating"  # what the caller said: in no log line
FRAME = 320  # 20 ms of 8 kHz PCM16
MAX_FRAMES = 3000  # the longest message: 60 s
# Ids a call can have; "vm-1-2" starts with "vm-1-": one call's files are never another's.
CALL_IDS = ("vm-1", "vm-1-2", "vm-2", "vm-3", "vm-3-x", "vm-4")
HOW_ALL = ("saved", "silent", "killed_in_write", "killed_after_file", "killed_after_named")
HOW = st.sampled_from(("saved", *HOW_ALL))  # a call saved is drawn twice as often
READS = ("200", "200 (not named)", "no message", "message unreadable", "record unreadable")
FRAMES = st.one_of(
    st.just(0), st.just(1), st.integers(2, 40), st.just(MAX_FRAMES)
)  # none, one frame, a few, the longest
ADVANCE_S = st.sampled_from([600, 3 * 3600, 86400, 29 * 86400, 31 * 86400])
reached: Counter[str] = Counter()  # what the runs did, printed with -s


@dataclass
class Message:
    """A message file, as the model has it."""

    name: str
    pcm: bytes
    sealed_under: str  # the secret whose key seals it now
    left_at: float  # its modification time: its call's start (the injected clock's)
    damaged: bool = False  # truncated or a byte flipped: opens under no key
    mode_000: bool = False  # chmod 000 (root reads it all the same)


@dataclass
class Call:
    id: str
    message: Message | None = None
    temp: str | None = None  # the temporary file a write cut short left
    temp_at: float = 0.0  # its modification time
    record_under: str | None = None  # the secret its record in Redis is sealed under
    names_message: bool = False  # the record's values name the message
    saved_at: float = 0.0  # its call's start: its record's retention runs from then
    erased: bool = False
    erased_at: float = 0.0
    files: list[str] = field(default_factory=list)


class VoicemailMachine(RuleBasedStateMachine):
    loop: ClassVar[asyncio.AbstractEventLoop]
    start_service: ClassVar[StartService]
    redis: ClassVar[RedisServer]
    mux: ClassVar[RedisMux]
    caplog: ClassVar[pytest.LogCaptureFixture]

    def __init__(self) -> None:
        super().__init__()
        self.data = Path(tempfile.mkdtemp(prefix="prop-vm-"))
        self.clock = FakeClock(float(int(time.time())))
        self.secret = SECRETS[0]
        self.previous: tuple[str, ...] = ()
        self.calls: dict[str, Call] = {}
        self.logs_seen = len(self.caplog.records)
        self.pcms: list[bytes] = []  # every message left: in no log line, ever
        self._redis("FLUSHDB")
        self.api = self._start()

    def teardown(self) -> None:
        self._run(self.api.client.close())
        shutil.rmtree(self.data, ignore_errors=True)

    # -- plumbing ------------------------------------------------------------------------------
    def _run(self, step: Awaitable[T]) -> T:
        async def bounded() -> T:
            return await asyncio.wait_for(step, 60)

        return self.loop.run_until_complete(bounded())

    def _start(self) -> Api:
        env = {
            "CLINIC_DATA_DIR": str(self.data),
            "CLINIC_SECRET": self.secret,
            "CLINIC_CALL_RETENTION_DAYS": str(RETENTION_DAYS),
        }
        if self.previous:
            env["CLINIC_PREVIOUS_SECRETS"] = ",".join(self.previous)
        api = self._run(self.start_service(env, clock=self.clock))
        api.key = CALLS_KEY
        return api

    def _restart(self) -> None:
        self._run(self.api.client.close())
        self.api = self._start()

    @property
    def rt(self) -> Runtime:
        rt: Runtime = self.api.app[RUNTIME]
        return rt

    def _redis(self, *command: str | int) -> Any:
        return self._run(self.mux.execute(*command))

    @property
    def folder(self) -> Path:
        return self.data / "voicemail"

    def _keys(self) -> tuple[str, ...]:
        return (self.secret, *self.previous)

    def _result(self, c: Call, started: float, ended: float, name: str | None) -> CallResult:
        values = (("complaint", COMPLAINT),) + ((("callback_message", name),) if name else ())
        record = CallRecord("triage", (), values, None, (), None, None, LOST_OUTCOME)
        return CallResult(c.id, CALLER, "700", started, ended, record)

    def _journal(self) -> CallJournal:
        return CallJournal(self.data / FOLDER, self.rt.need_call_store())

    def _own_files(self, call_id: str) -> list[str]:
        """The call's files in the voicemail folder (its temporary ones included)."""
        mine = re.compile(rf"\.?{re.escape(call_id)}-[0-9a-f]{{8}}\.sealed(\..+\.tmp)?")
        if not self.folder.is_dir():
            return []
        return sorted(p.name for p in self.folder.iterdir() if mine.fullmatch(p.name))

    def _killed(self, c: Call, started: float) -> None:
        """serve killed during the call: the next start saves its live record (as cut)."""
        self._restart()
        journal = self._journal()
        now = self.clock.now()
        lost = self._run(journal.leftovers(now))
        assert lost == [c.id], lost
        assert self._run(journal.replay_all(lost, now)) == []
        # The record's retention runs from the call's start, as its message's (store.py).
        c.record_under, c.saved_at = self.secret, started
        self._ends_with_its_message(c)

    def _ends_with_its_message(self, c: Call) -> None:
        """As its record is saved (at the call's end, or the next start's replay after a
        kill): the record ends when its message does, both a retention after the call's
        start. Else staff get a 404 for a call whose message is still on disk, or a record
        that names a swept message. (Checked here: later, Redis's clock, which moves with
        the injected one only in :meth:`time_passes`, drifts from it.)"""
        ttl_ms = int(self._redis("PTTL", f"cv:call:{c.id}"))
        if c.message is None or ttl_ms < 0:
            return
        record_ends = self.clock.now() + ttl_ms / 1000
        message_ends = (self.folder / c.message.name).stat().st_mtime + RETENTION_S
        reached["record and message compared"] += 1
        assert abs(record_ends - message_ends) <= 2, (
            f"{c.id}: the record ends {record_ends - message_ends:+.0f} s from its message"
        )

    # -- calls ---------------------------------------------------------------------------------
    @precondition(lambda self: len(self.calls) < len(CALL_IDS))
    @rule(how=HOW, frames=FRAMES, seed=st.integers(0, 2**32), secs=st.integers(1, 600))
    def a_call(self, how: str, frames: int, seed: int, secs: int) -> None:
        """A call that leaves a message (or none: ``silent``), ended as the session ends it
        or cut by a kill of serve at one of the message's seams."""
        c = Call(CALL_IDS[len(self.calls)])
        self.calls[c.id] = c
        reached[f"call:{how}"] += 1
        started = self.clock.now()
        journal = self._journal()
        self._run(journal.begin(self._result(c, started, started, None)))  # the answer
        self.clock.advance(secs)  # the caller is asked, answers, hears the beep, speaks
        now = self.clock.now()
        if how == "silent":
            self.clock.advance(1)
            self._save_record(c, journal, started, None)
            return
        pcm = random.Random(seed).randbytes(frames * FRAME)
        self.pcms.append(pcm)
        if how == "killed_in_write":
            # write_private's temporary file, written but not renamed: no message was left.
            name = f"{c.id}-{secrets.token_hex(4)}.sealed"
            sealed = self.rt.need_call_store().seal(name, {"pcm16_8k": pcm.hex()})
            self.folder.mkdir(mode=0o700, exist_ok=True)
            temp = self.folder / f".{name}.{secrets.token_hex(4)}.tmp"
            temp.write_text(sealed[: len(sealed) // 2])
            temp.chmod(0o600)
            os.utime(temp, (now, now))
            c.temp, c.temp_at = temp.name, now
            self.clock.advance(1)
            self._killed(c, started)
            return
        name = self._run(self.rt.need_voicemails().save(c.id, pcm, started_at=started))
        c.message = Message(name, pcm, self.secret, started)
        self.clock.advance(1)
        if how == "killed_after_file":
            self._killed(c, started)
            return
        self._run(journal.begin(self._result(c, started, self.clock.now(), name)))
        c.names_message = True
        self.clock.advance(1)
        if how == "killed_after_named":
            self._killed(c, started)
            return
        self._save_record(c, journal, started, name)

    def _save_record(self, c: Call, journal: CallJournal, started: float, name: str | None) -> None:
        ended = self.clock.now()
        self._run(self.rt.need_call_store().save(self._result(c, started, ended, name)))
        self._run(journal.end(c.id))
        c.record_under, c.saved_at = self.secret, started
        self._ends_with_its_message(c)

    # -- the secret ----------------------------------------------------------------------------
    @rule(to=st.sampled_from(SECRETS), keep_previous=st.booleans())
    def secret_changed(self, to: str, keep_previous: bool) -> None:
        """Every process restarted with ``to`` as CLINIC_SECRET; the old one listed in
        CLINIC_PREVIOUS_SECRETS, or not (then the fingerprint is deleted first, the README's
        way to change it without)."""
        reached[f"secret:{'same' if to == self.secret else 'new'}:{keep_previous}"] += 1
        if keep_previous:
            previous = (self.secret, *self.previous)
        else:
            previous = ()
            if to != self.secret:
                self._redis("DEL", shared_secret.KEY)
        self.previous = tuple(dict.fromkeys(p for p in previous if p != to))
        self.secret = to
        self._restart()

    @rule()
    def resealed(self) -> None:
        """``clinic-voice secret reseal`` with serve's settings, serve running."""
        env = {
            "CLINIC_DATA_DIR": str(self.data),
            "CLINIC_SECRET": self.secret,
            "CLINIC_REDIS_URL": self.redis.url,
        }
        if self.previous:
            env["CLINIC_PREVIOUS_SECRETS"] = ",".join(self.previous)
        out = io.StringIO()
        code = self._run(
            reseal(
                Settings.from_env(env),
                self.secret.encode(),
                tuple(p.encode() for p in self.previous),
                out,
                owner=None,
            )
        )
        keys = self._keys()
        unreadable = False
        for c in self.calls.values():
            m = c.message
            if m is not None and not m.damaged:
                if m.sealed_under in keys:
                    if m.sealed_under != self.secret:
                        m.mode_000 = False  # written anew, 0600
                    m.sealed_under = self.secret
                else:
                    unreadable = True
            elif m is not None:
                unreadable = True
            if c.record_under is not None:
                if c.record_under in keys:
                    c.record_under = self.secret
                else:
                    unreadable = True
        assert code == (1 if unreadable else 0), out.getvalue()
        reached[f"reseal:{code}"] += 1
        self._no_content_in(out.getvalue(), "the re-seal's output")

    # -- erasure, retention, damage ------------------------------------------------------------
    @precondition(lambda self: bool(self.calls))
    @rule(n=st.integers(0, len(CALL_IDS) - 1))
    def erased(self, n: int) -> None:
        c = list(self.calls.values())[n % len(self.calls)]
        known = (
            (c.record_under is not None)
            or (c.message is not None)
            or (c.temp is not None)
            or c.erased
        )
        # Within EXPIRY_SLACK_S of the end of its retention, Redis's expiry (on its own
        # clock, moved by each advance) says whether the record is still there.
        edge = c.saved_at and abs(self.clock.now() - c.saved_at - RETENTION_S) <= EXPIRY_SLACK_S
        answer = self._run(self.api.request("DELETE", f"/v1/calls/{c.id}"))
        reached[f"erase:{answer.status}:{'known' if known else 'unknown'}"] += 1
        if known:
            assert answer.status == 204, answer.text
        elif edge:
            assert answer.status in (204, 404), answer.text
        else:
            # Past its retention (README: 404), its index entry not yet trimmed, or a
            # message of it not yet swept, made this a 204 that marked a call nobody knew.
            assert answer.status == 404, f"{c.id}: {answer.status}, nothing of it is known"
        if answer.status == 204:
            # A repeat renews the mark: 204 for a retention from the last (README).
            c.erased, c.erased_at = True, self.clock.now()
            c.message, c.temp, c.record_under = None, None, None

    @rule(secs=ADVANCE_S)
    def time_passes(self, secs: int) -> None:
        """The injected clock moves on; Redis's expiry with it (each key's time to live is
        shortened by as much, a key past it deleted: what Redis would have done), and the
        hourly voicemail sweep runs."""
        self.clock.advance(secs)
        cursor = "0"
        while True:
            cursor, names = self._redis("SCAN", cursor, "COUNT", 1000)
            for key in names:
                ttl_ms = int(self._redis("PTTL", str(key)))
                if ttl_ms < 0:
                    continue  # no expiry
                if ttl_ms <= secs * 1000:
                    self._redis("DEL", str(key))
                else:
                    self._redis("PEXPIRE", str(key), ttl_ms - secs * 1000)
            if str(cursor) == "0":
                break
        now = self.clock.now()
        self.rt.need_voicemails().sweep(RETENTION_S, now)
        for c in self.calls.values():
            if c.message is not None and now - c.message.left_at > RETENTION_S:
                c.message = None
                reached["swept"] += 1
            if c.temp is not None and now - c.temp_at > 3600:
                c.temp = None
            if c.record_under is not None and self._expired(c.saved_at, f"cv:call:{c.id}"):
                c.record_under = None
                reached["record expired"] += 1
            if c.erased and self._expired(c.erased_at, f"cv:erased:{c.id}"):
                c.erased = False  # the mark went: nothing of the call is known any more

    def _expired(self, since: float, key: str) -> bool:
        """Whether Redis's retention of ``key``, from ``since``, is over: by the clock, or
        within :data:`EXPIRY_SLACK_S` of its end, by Redis."""
        late = self.clock.now() - since - RETENTION_S
        if late > EXPIRY_SLACK_S:
            return True
        return late >= -EXPIRY_SLACK_S and self._redis("EXISTS", key) == 0

    @precondition(lambda self: any(self._intact()))
    @rule(
        n=st.integers(0, len(CALL_IDS) - 1),
        how=st.sampled_from(["truncated", "flipped", "mode_000"]),
        at=st.floats(0.0, 1.0),
    )
    def damaged(self, n: int, how: str, at: float) -> None:
        intact = self._intact()
        m = intact[n % len(intact)]
        path = self.folder / m.name
        before = path.stat()
        text = path.read_bytes()
        if how == "truncated":
            path.write_bytes(text[: int(at * (len(text) - 1))])
            m.damaged = True
        elif how == "flipped":
            # Not in the last 4 characters: base64's unused low bits of the last one may
            # flip and decode the same.
            i = int(at * (len(text) - 5))
            path.write_bytes(text[:i] + bytes([text[i] ^ 0x01]) + text[i + 1 :])
            m.damaged = True
        else:
            path.chmod(0o000)
            m.mode_000 = True
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # bit rot keeps the time
        reached[f"damaged:{how}"] += 1

    def _intact(self) -> list[Message]:
        """The messages not damaged yet (damaged twice, a byte could flip back)."""
        return [c.message for c in self.calls.values() if c.message and not c.message.damaged]

    @precondition(lambda self: bool(self.calls))
    @rule(n=st.integers(0, len(CALL_IDS) - 1), key=st.sampled_from(["verification", "wrong"]))
    def read_with_another_key(self, n: int, key: str) -> None:
        c = list(self.calls.values())[n % len(self.calls)]
        path = f"/v1/calls/{c.id}/voicemail"
        if key == "verification":
            answer = self._run(self.api.request("GET", path, key=API_KEY))
            answer.problem(403, "key-not-allowed")
        else:
            answer = self._run(self.api.request("GET", path, key="wrong-key-0123456789abcdef"))
            assert answer.status == 401, answer.text
        self._no_audio_in(answer, path)

    # -- what must hold ------------------------------------------------------------------------
    def _no_audio_in(self, answer: Answer, what: str) -> None:
        for c in self.calls.values():
            if c.message is not None and len(c.message.pcm) >= 16:
                assert c.message.pcm[:16] not in answer.body, f"{what}: audio in the answer"

    def _no_content_in(self, text: str, what: str) -> None:
        for forbidden in (CALLER, COMPLAINT):
            assert forbidden not in text, f"{what}: {forbidden!r}"
        for pcm in self.pcms:
            if pcm:
                for fragment in (pcm[:8].hex(), base64.b64encode(pcm[:12]).decode()):
                    assert fragment not in text, f"{what}: audio"

    @invariant()
    def staff_read_what_was_left(self) -> None:
        keys = self._keys()
        for c in self.calls.values():
            answer = self._run(self.api.request("GET", f"/v1/calls/{c.id}/voicemail"))
            m = c.message
            if answer.status == 200:
                assert answer.content_type == "audio/wav", answer.content_type
                with wave.open(io.BytesIO(answer.body)) as w:
                    got = (w.getframerate(), w.getsampwidth(), w.getnchannels())
                    audio = w.readframes(w.getnframes())
                assert got == (8000, 2, 1), got
                assert m is not None, f"{c.id}: a 200 for a call that left no message"
                assert audio == m.pcm, f"{c.id}: a 200 with other audio"
            if c.erased or c.record_under is None:
                answer.problem(404, "not-found")
                continue
            if c.record_under not in keys:
                answer.problem(500, "internal")  # the record itself does not open
                reached["read:record unreadable"] += 1
                continue
            if m is None:
                answer.problem(404, "not-found")
                reached["read:no message"] += 1
            elif m.damaged or m.sealed_under not in keys:
                answer.problem(500, "voicemail-unreadable")
                reached["read:message unreadable"] += 1
            elif not m.mode_000 or os.geteuid() == 0:
                assert answer.status == 200, f"{c.id}: {answer.status} {answer.text[:300]}"
                reached[f"read:200{'' if c.names_message else ' (not named)'}"] += 1
            else:
                answer.problem(500, "voicemail-unreadable")

    @invariant()
    def nothing_left_of_what_went(self) -> None:
        indexed = {str(i) for i in self._redis("ZRANGE", INDEX, 0, -1)}
        for c in self.calls.values():
            files = self._own_files(c.id)
            expected = [c.message.name] if c.message is not None else []
            expected += [c.temp] if c.temp is not None else []
            assert files == sorted(expected), f"{c.id}: files {files}, model {expected}"
            if c.erased:
                assert self._redis("EXISTS", f"cv:call:{c.id}") == 0, f"{c.id}: erased, in Redis"
                assert c.id not in indexed, f"{c.id}: erased, and indexed"
            elif (
                c.record_under is None
                and c.saved_at
                and (self.clock.now() - c.saved_at > RETENTION_S + EXPIRY_SLACK_S)
            ):
                assert self._redis("EXISTS", f"cv:call:{c.id}") == 0, f"{c.id}: past retention"
        live = self.data / LIVE_FOLDER
        assert not live.is_dir() or not list(live.iterdir()), "a live record left over"

    @invariant()
    def files_are_private(self) -> None:
        if not self.folder.is_dir():
            return
        assert stat.S_IMODE(self.folder.stat().st_mode) == 0o700
        broken = {c.message.name for c in self.calls.values() if c.message and c.message.mode_000}
        for p in self.folder.iterdir():
            mode = stat.S_IMODE(p.stat().st_mode)
            assert mode == (0 if p.name in broken else 0o600), f"{p.name}: {oct(mode)}"

    @invariant()
    def no_log_line_holds_content(self) -> None:
        records = self.caplog.records[self.logs_seen :]
        self.logs_seen = len(self.caplog.records)
        for r in records:
            text = r.getMessage()
            if r.exc_info:
                text += logging.Formatter().formatException(r.exc_info)
            self._no_content_in(text, f"log line {r.name}")


@pytest.fixture
async def service_loop(start_service: StartService) -> asyncio.AbstractEventLoop:
    """The loop the services of the machine run on (the fixture's)."""
    return asyncio.get_running_loop()


def test_voicemail_keeps_every_promise_under_any_history(
    service_loop: asyncio.AbstractEventLoop,
    start_service: StartService,
    redis_server: RedisServer,
    mux: RedisMux,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from hypothesis.stateful import run_state_machine_as_test

    caplog.set_level(logging.DEBUG)
    bound = type(
        "BoundVoicemailMachine",
        (VoicemailMachine,),
        {
            "loop": service_loop,
            "start_service": staticmethod(start_service),
            "redis": redis_server,
            "mux": mux,
            "caplog": caplog,
        },
    )
    reached.clear()
    try:
        run_state_machine_as_test(bound, settings=PROFILE)
    finally:
        print(sorted(reached.items()))
    if os.environ.get("HYPOTHESIS_PROFILE") == "deep":
        return
    # The run still meets what it is there to check.
    wanted = {f"call:{how}" for how in HOW_ALL} | {
        f"damaged:{how}" for how in ("truncated", "flipped", "mode_000")
    }
    wanted |= {"reseal:0", "reseal:1", "swept", "record expired", "erase:204:known"}
    wanted |= {"record and message compared"}
    wanted |= {f"read:{what}" for what in READS}
    missing = sorted(wanted - set(reached))
    assert not missing, f"not reached: {missing}; reached {sorted(reached.items())}"
