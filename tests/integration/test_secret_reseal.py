"""``clinic-voice secret reseal`` against a real redis-server (README: "Changing the secret"):
what the old secret sealed (call records in Redis, voicemail, records kept on disk) opens
under the new secret alone afterwards, with the time each had left; an erasure racing it
leaves nothing; what opens under no key is left and counted; a second run re-seals nothing;
the embedded Redis, whether serve runs or not, is reached and its append-only file loses the
old records.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag

from clinic_voice import shared_secret
from clinic_voice.app import lock_data_dir
from clinic_voice.cli import main
from clinic_voice.redis_server import EmbeddedRedis
from clinic_voice.secret_reseal import reseal
from sip_config.settings import Settings
from tests.conftest import RedisServer
from verification.redis_mux import RedisMux
from voice.ivr.call_record import CallResult
from voice.ivr.engine import CallRecord
from voice.ivr.journal import FOLDER, LIVE_FOLDER, CallJournal
from voice.ivr.reseal import Kind, Resealer, Tally
from voice.ivr.store import CallStore, Replaced
from voice.ivr.voicemail import Voicemails, VoicemailUnreadable

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]

OLD = "old-secret-0123456789abcdefghijklmnopqr"
NEW = "new-secret-0123456789abcdefghijklmnopqr"
OTHER = "other-secret-0123456789abcdefghijklmnop"
COMPLAINT = "chest-pain-radiating"  # health data: never in the output
PCM = b"\x10\x00\xf0\xff" * 2000
DAY_S = 86400
ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 10.0


def _store(mux: RedisMux, secret: str, *previous: str) -> CallStore:
    return CallStore(mux, secret.encode(), 30, previous_secrets=tuple(p.encode() for p in previous))


def _result(call_id: str) -> CallResult:
    record = CallRecord("triage", (), (("complaint", COMPLAINT),), None, (), None, None, "done")
    now = time.time()
    return CallResult(call_id, "+31612345678", "700", now - 90, now - 30, record)


def _settings(data: Path, redis_url: str = "") -> Settings:
    env = {"CLINIC_DATA_DIR": str(data), "CLINIC_SECRET": NEW, "CLINIC_PREVIOUS_SECRETS": OLD}
    if redis_url:
        env["CLINIC_REDIS_URL"] = redis_url
    return Settings.from_env(env)


async def _reseal(data: Path, redis_url: str) -> tuple[int, str]:
    out = io.StringIO()
    code = await reseal(_settings(data, redis_url), NEW.encode(), (OLD.encode(),), out, owner=None)
    return code, out.getvalue()


def _counts(output: str, kind: Kind) -> str:
    line = next(x for x in output.splitlines() if x.startswith(f"{kind}: "))
    return line.removeprefix(f"{kind}: ")


async def _made_under(mux: RedisMux, data: Path, secret: str, call_id: str) -> str:
    """A record naming a voicemail in Redis, a record kept on disk and a live record, all
    sealed under ``secret``; the voicemail's name."""
    store = _store(mux, secret)
    name = await Voicemails(data / "voicemail", store).save(call_id, PCM)
    await store.save(_result(call_id))
    journal = CallJournal(data / FOLDER, store)
    await journal.keep(_result(f"{call_id}-kept"))
    await journal.begin(_result(f"{call_id}-live"))
    return name


def _files(data: Path) -> list[Path]:
    return sorted(
        p for sub in ("voicemail", FOLDER, LIVE_FOLDER) for p in (data / sub).glob("*.sealed")
    )


async def test_what_the_old_secret_sealed_opens_under_the_new_one_alone(
    redis_server: RedisServer, mux: RedisMux, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    name = await _made_under(mux, data, OLD, "old-1")
    await _store(mux, NEW).save(_result("new-1"))  # made after the change: already current
    await mux.execute("EXPIRE", "cv:call:old-1", 5 * DAY_S)  # a record 25 days into its time
    ttl_before = int(await mux.execute("PTTL", "cv:call:old-1"))
    read_at = time.monotonic()
    # Files of different ages: the voicemail sweep and an erasure's "call under way" read
    # their modification times.
    for age_days, path in enumerate(_files(data), start=2):
        os.utime(path, (time.time() - age_days * DAY_S, time.time() - age_days * DAY_S))
    mtimes = {p: p.stat().st_mtime_ns for p in _files(data)}

    code, output = await _reseal(data, redis_server.url)
    assert code == 0, output
    assert _counts(output, Kind.RECORDS) == (
        "1 resealed, 1 already current, 0 unreadable, 0 gone meanwhile"
    )
    for kind in (Kind.KEPT, Kind.LIVE, Kind.VOICEMAIL):
        assert (
            _counts(output, kind) == "1 resealed, 0 already current, 0 unreadable, 0 gone meanwhile"
        )
    assert "the records as they were sealed before" in output and "yours to rewrite" in output
    assert COMPLAINT not in output

    # The new secret alone opens everything; the old one nothing.
    new_only, old_only = _store(mux, NEW), _store(mux, OLD)
    for call_id in ("old-1", "new-1"):
        sealed = str(await mux.execute("GET", f"cv:call:{call_id}"))
        assert new_only.open(call_id, sealed)["values"]["complaint"] == COMPLAINT
        with pytest.raises(InvalidTag):
            old_only.open(call_id, sealed)
    for call_id, folder in (("old-1-kept", FOLDER), ("old-1-live", LIVE_FOLDER)):
        kept = (data / folder / f"{call_id}.sealed").read_text()
        assert new_only.reopen(call_id, kept).call_id == call_id
        with pytest.raises(InvalidTag):
            old_only.reopen(call_id, kept)
    assert await Voicemails(data / "voicemail", new_only).wav("old-1", name) is not None
    with pytest.raises(VoicemailUnreadable):
        await Voicemails(data / "voicemail", old_only).wav("old-1", name)

    # The record keeps the time it had left; each file its age; no temporary file is left.
    ttl_after = int(await mux.execute("PTTL", "cv:call:old-1"))
    elapsed_ms = (time.monotonic() - read_at) * 1000
    assert abs(ttl_before - elapsed_ms - ttl_after) < 1000, (ttl_before, ttl_after, elapsed_ms)
    assert {p: p.stat().st_mtime_ns for p in _files(data)} == mtimes
    for sub in ("voicemail", FOLDER, LIVE_FOLDER):
        assert not list((data / sub).glob(".*")), sub
        assert all(p.stat().st_mode & 0o777 == 0o600 for p in (data / sub).iterdir())

    # Once more: nothing left to re-seal.
    code, again = await _reseal(data, redis_server.url)
    assert code == 0, again
    assert _counts(again, Kind.RECORDS).startswith("0 resealed, 2 already current, 0 unreadable")
    for kind in (Kind.KEPT, Kind.LIVE, Kind.VOICEMAIL):
        assert _counts(again, kind).startswith("0 resealed, 1 already current, 0 unreadable")


async def test_what_opens_under_no_key_is_left_and_counted(
    redis_server: RedisServer, mux: RedisMux, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    name = await _made_under(mux, data, OTHER, "lost-1")  # a secret nobody listed
    await _made_under(mux, data, OLD, "old-1")
    await mux.execute("SET", "cv:call:torn-1", "not base64 at all!")
    before = {k: await mux.execute("GET", f"cv:call:{k}") for k in ("lost-1", "torn-1")}
    files_before = {p: p.read_bytes() for p in _files(data) if "lost-1" in p.name}

    code, output = await _reseal(data, redis_server.url)
    assert code == 1, output
    assert _counts(output, Kind.RECORDS) == (
        "1 resealed, 0 already current, 2 unreadable, 0 gone meanwhile"
    )
    assert "left as they are: lost-1, torn-1" in output
    assert f"left as they are: {name}" in output
    assert "left as they are: lost-1-kept" in output and "left as they are: lost-1-live" in output
    assert "Not everything is sealed under CLINIC_SECRET yet" in output
    assert COMPLAINT not in output
    assert {k: await mux.execute("GET", f"cv:call:{k}") for k in before} == before
    assert {p: p.read_bytes() for p in files_before} == files_before


async def test_a_redis_still_claimed_by_the_previous_secret_is_refused(
    redis_server: RedisServer, mux: RedisMux, tmp_path: Path
) -> None:
    # Step 3 not done: a serve on the old secret would go on sealing under it.
    data = tmp_path / "data"
    await _made_under(mux, data, OLD, "old-1")
    await mux.execute("SET", shared_secret.KEY, shared_secret.fingerprint(OLD.encode()))
    sealed = await mux.execute("GET", "cv:call:old-1")
    code, output = await _reseal(data, redis_server.url)
    assert code == 2 and output == "Redis: CLINIC_REDIS_URL\n", output
    assert await mux.execute("GET", "cv:call:old-1") == sealed
    await mux.execute("SET", shared_secret.KEY, shared_secret.fingerprint(OTHER.encode()))
    assert (await _reseal(data, redis_server.url))[0] == 2


# -- races with an erasure, a save, an expiry ----------------------------------------------------


async def test_a_record_erased_or_saved_over_between_read_and_replace_is_left_so(
    mux: RedisMux, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for call_id in ("erased-1", "saved-1", "expired-1", "kept-1"):
        await _store(mux, OLD).save(_result(call_id))
    store = _store(mux, NEW, OLD)
    real = store.replace_sealed
    saved_over = _store(mux, NEW).seal("saved-1", {"values": {}})

    async def meanwhile(call_id: str, read: str, resealed: str) -> Replaced:
        if call_id == "erased-1":  # DELETE /v1/calls/erased-1
            await store.erase(call_id, on_disk=False)
        elif call_id == "saved-1":  # a replay of a copy kept on disk, say
            await mux.execute("SET", "cv:call:saved-1", saved_over, "KEEPTTL")
        elif call_id == "expired-1":
            await mux.execute("DEL", "cv:call:expired-1")
        return await real(call_id, read, resealed)

    monkeypatch.setattr(store, "replace_sealed", meanwhile)
    tally = await Resealer(store, tmp_path).records()
    assert tally == Tally(Kind.RECORDS, resealed=1, gone=3)
    assert await mux.execute("EXISTS", "cv:call:erased-1", "cv:call:expired-1") == 0
    assert await mux.execute("GET", "cv:call:saved-1") == saved_over
    # And the script alone, as a later erasure leaves it: marked, nothing written back.
    await mux.execute("SET", "cv:call:erased-1", "what an old copy holds")
    assert await real("erased-1", "what an old copy holds", "x") is Replaced.ERASED
    assert await mux.execute("GET", "cv:call:erased-1") == "what an old copy holds"


@pytest.mark.parametrize("kind", [Kind.VOICEMAIL, Kind.KEPT, Kind.LIVE])
@pytest.mark.parametrize("when", ["after its glob", "with the temporary file"])
async def test_an_erasure_racing_a_file_reseal_leaves_nothing(
    mux: RedisMux,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: Kind,
    when: str,
) -> None:
    data = tmp_path / "data"
    await _made_under(mux, data, OLD, "race-1")
    folder = {Kind.VOICEMAIL: "voicemail", Kind.KEPT: FOLDER, Kind.LIVE: LIVE_FOLDER}[kind]
    (path,) = (data / folder).glob("*.sealed")
    call_id = {Kind.VOICEMAIL: "race-1", Kind.KEPT: "race-1-kept", Kind.LIVE: "race-1-live"}[kind]
    store = _store(mux, NEW, OLD)
    loop = asyncio.get_running_loop()
    real_replace = os.replace

    def erase_in_redis() -> None:
        asyncio.run_coroutine_threadsafe(store.erase(call_id, on_disk=True), loop).result(5)

    def replace(src: Any, dst: Any) -> None:
        # The re-sealed copy is written and the old file was there a moment ago.
        if Path(dst) == path:
            erase_in_redis()
            if when == "after its glob":
                # The erasure's remove_file listed the temporary files before this one was
                # made, and deletes the file between the check and the rename.
                path.unlink()
            else:  # the erasure's remove_file saw the temporary file: both go
                for p in (path, Path(src)):
                    p.unlink()
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)  # private_file.replace_private's rename
    tally = await Resealer(store, data).files(kind)
    assert tally == Tally(kind, gone=1), tally
    assert list((data / folder).iterdir()) == [], "an erased call's file came back"


@pytest.mark.parametrize("during", ["the re-sealing", "the write"])
async def test_a_file_deleted_while_it_is_resealed_stays_deleted(
    mux: RedisMux, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, during: str
) -> None:
    # The voicemail sweep (past its retention), or a replay that saved a kept record, deletes
    # the file after it was read: the re-sealed copy must not bring it back.
    data = tmp_path / "data"
    store = _store(mux, NEW, OLD)
    armed = False

    def swept() -> None:
        for path in _files(data) if armed else ():
            path.unlink()

    if during == "the re-sealing":
        real_reseal = store.reseal

        def reseal(bound: str, sealed: str) -> str | None:
            resealed = real_reseal(bound, sealed)
            swept()
            return resealed

        monkeypatch.setattr(store, "reseal", reseal)
    else:  # the copy is written: the old file was there when the write began
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            swept()
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
    for kind in (Kind.VOICEMAIL, Kind.KEPT, Kind.LIVE):
        armed = False
        await _made_under(mux, data, OLD, "swept-1")
        armed = True
        assert await Resealer(store, data).files(kind) == Tally(kind, gone=1)
        assert _files(data) == []


@pytest.mark.parametrize(
    "when", ["before the pass over Redis", "before the files", "while its file is resealed"]
)
async def test_a_record_a_replay_moves_into_redis_meanwhile_ends_under_the_new_secret(
    mux: RedisMux, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    # serve replays the records kept on disk every 30 s (and a dead serve's live records at
    # start) into Redis as they are sealed: one moved there while the reseal runs must not be
    # left under the old secret behind a "complete" pass (exit 0, and the old secret removed).
    data = tmp_path / "data"
    old = _store(mux, OLD)
    await CallJournal(data / FOLDER, old).keep(_result("kept-1"))
    store = _store(mux, NEW, OLD)  # serve's, and the command's
    journal = CallJournal(data / FOLDER, store)
    resealer = Resealer(store, data)
    loop = asyncio.get_running_loop()
    armed = [True]  # one replay

    async def replay() -> None:
        assert (await journal.replay(time.time())).saved == 1

    if when == "while its file is resealed":  # read by the reseal, then moved to Redis
        real_reseal = store.reseal

        def reseal(bound: str, sealed: str) -> str | None:
            resealed = real_reseal(bound, sealed)
            if armed[0]:  # the file's, in a thread (Redis's records are resealed on the loop)
                armed[0] = False
                asyncio.run_coroutine_threadsafe(replay(), loop).result(5)
            return resealed

        monkeypatch.setattr(store, "reseal", reseal)
    else:
        name = "records" if when == "before the pass over Redis" else "files"
        real = getattr(resealer, name)

        async def first_a_replay(*args: Any) -> Tally:
            if armed[0]:
                armed[0] = False
                await replay()
            result: Tally = await real(*args)
            return result

        monkeypatch.setattr(resealer, name, first_a_replay)
    tallies = await resealer.run()
    assert all(t.complete for t in tallies), tallies
    assert list((data / FOLDER).iterdir()) == []
    sealed = str(await mux.execute("GET", "cv:call:kept-1"))
    assert _store(mux, NEW).open("kept-1", sealed)["values"]["complaint"] == COMPLAINT


# -- the command, and the embedded Redis ---------------------------------------------------------


async def _command(env: Mapping[str, str], *, uid: int | None = None) -> tuple[int, str, str]:
    """The command, as this test's user, or as ``uid`` (its group alone; needs root)."""
    as_user: list[str] = []
    if uid is not None:
        as_user = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
    proc = await asyncio.create_subprocess_exec(
        *as_user,
        sys.executable,
        "-m",
        "clinic_voice.cli",
        "secret",
        "reseal",
        cwd=ROOT,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **env},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _env(data: Path, **more: str) -> dict[str, str]:
    return {
        "CLINIC_DATA_DIR": str(data),
        "CLINIC_SECRET": NEW,
        "CLINIC_PREVIOUS_SECRETS": OLD,
        **more,
    }


async def test_the_command_exits_2_on_bad_settings(tmp_path: Path) -> None:
    # More previous secrets than the setting takes (a short one is no fault: any length is).
    too_many = ",".join(f"previous-secret-{n:02d}" for n in range(17))
    code, out, err = await _command(_env(tmp_path, CLINIC_PREVIOUS_SECRETS=too_many))
    assert (code, out) == (2, ""), err
    assert "configuration error: CLINIC_PREVIOUS_SECRETS=<hidden>" in err
    code, out, err = await _command({"CLINIC_DATA_DIR": str(tmp_path / "none")})
    assert (code, out) == (2, "") and "no secret to seal with" in err, err
    assert not (tmp_path / "none" / "secret").exists(), "a secret was made"


async def test_the_command_over_a_redis_url(
    redis_server: RedisServer, mux: RedisMux, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    await _made_under(mux, data, OLD, "old-1")
    code, out, err = await _command(_env(data, CLINIC_REDIS_URL=redis_server.url))
    assert code == 0, out + err
    assert _counts(out, Kind.RECORDS).startswith("1 resealed"), out
    assert COMPLAINT not in out + err
    code, out, err = await _command(_env(data, CLINIC_REDIS_URL=redis_server.url))
    assert code == 0 and "\ncall records in Redis: 0 resealed, 1 already current" in out, out
    redis_server.stop()
    code, out, err = await _command(_env(data, CLINIC_REDIS_URL=redis_server.url))
    assert code == 1 and "clinic-voice secret reseal: Redis:" in err, out + err


def _aof_holds(data: Path, text: str) -> bool:
    return any(
        text.encode() in p.read_bytes() for p in (data / "redis" / "appendonlydir").iterdir()
    )


async def _until(what: str, ok: Callable[[], bool]) -> None:
    end = asyncio.get_running_loop().time() + DEADLINE_S
    while not ok():
        assert asyncio.get_running_loop().time() < end, what
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("serving", [False, True])
async def test_the_embedded_redis_with_serve_stopped_or_running(
    tmp_path: Path, serving: bool
) -> None:
    data = tmp_path / "d"  # the unix socket's path is short
    embedded = EmbeddedRedis(data)
    mux = RedisMux(await embedded.start())
    try:
        await _made_under(mux, data, OLD, "old-1")
        old_sealed = str(await mux.execute("GET", "cv:call:old-1"))
    finally:
        await mux.aclose()
    assert _aof_holds(data, old_sealed)
    lock: int | None = None
    if serving:  # as serve holds them: the data dir's lock, and its Redis
        lock = await asyncio.to_thread(lock_data_dir, data)
    else:
        await embedded.stop()
    try:
        code, out, err = await _command(_env(data))
        assert code == 0, out + err
        where = "serve's embedded Redis" if serving else "started for this (serve is stopped)"
        assert where in out and "append-only file: rewritten (BGREWRITEAOF)" in out, out
        assert _counts(out, Kind.RECORDS).startswith("1 resealed"), out
        if not serving:
            await embedded.start()
        mux = RedisMux(embedded.url)
        try:
            sealed = str(await mux.execute("GET", "cv:call:old-1"))
            assert _store(mux, NEW).open("old-1", sealed)["values"]["complaint"] == COMPLAINT
            await _until(
                "the old record is still in the AOF", lambda: not _aof_holds(data, old_sealed)
            )
        finally:
            await mux.aclose()
    finally:
        await embedded.stop()
        if lock is not None:
            os.close(lock)


# -- whose files: run as root, or as another user ------------------------------------------------

NOBODY = 65534  # serve's user here: a data dir root does not own
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv"
)


def _owners(data: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(data)): (p.lstat().st_uid, p.lstat().st_gid)
        for p in [data, *data.rglob("*")]
    }


def _give(data: Path, uid: int) -> None:
    for path in [data, *data.rglob("*")]:
        os.lchown(path, uid, uid)


@needs_root
@pytest.mark.parametrize("serving", [False, True])
async def test_run_as_root_every_file_stays_serves_users(open_tmp: Path, serving: bool) -> None:
    # serve runs as a user of its own; an operator runs the reseal as root. Every file it
    # replaced, and with serve stopped every file of the Redis it started (the append-only
    # file it had rewritten, the lock), must stay that user's, or serve can no longer read
    # its voicemail, records kept on disk, or start its Redis.
    data = open_tmp / "d"
    data.mkdir(mode=0o700)
    os.chown(data, NOBODY, NOBODY)
    embedded = EmbeddedRedis(data, owner=(NOBODY, NOBODY))  # serve's Redis, as its user
    mux = RedisMux(await embedded.start())
    try:
        await _made_under(mux, data, OLD, "old-1")
    finally:
        await mux.aclose()
    lock: int | None = None
    if serving:
        lock = await asyncio.to_thread(lock_data_dir, data)
    else:
        await embedded.stop()
    _give(data, NOBODY)  # what serve made is its user's
    try:
        code, out, err = await _command(_env(data))
        assert code == 0, out + err
        for kind in (Kind.RECORDS, Kind.KEPT, Kind.LIVE, Kind.VOICEMAIL):
            assert _counts(out, kind).startswith("1 resealed"), out
        owners = _owners(data)
        assert {k: v for k, v in owners.items() if v != (NOBODY, NOBODY)} == {}
        assert all(p.stat().st_mode & 0o777 == 0o600 for p in _files(data))
        if not serving:  # serve's start: its Redis, as its user, on what the reseal left
            await embedded.start()
        mux = RedisMux(embedded.url)
        try:
            sealed = str(await mux.execute("GET", "cv:call:old-1"))
            assert _store(mux, NEW).open("old-1", sealed)["values"]["complaint"] == COMPLAINT
        finally:
            await mux.aclose()
    finally:
        await embedded.stop()
        if lock is not None:
            os.close(lock)


def _command_as(uid: int, env: Mapping[str, str]) -> int:
    """The command in this process, with ``uid`` as its effective user and group (the
    interpreter of this venv may be one that user cannot start: a subprocess would not
    do). Blocking: in a thread."""
    os.environ.update(env)
    os.setegid(uid)
    os.seteuid(uid)
    try:
        return main(["secret", "reseal"])
    finally:
        os.seteuid(0)
        os.setegid(0)
        for name in env:
            del os.environ[name]


@needs_root
async def test_a_user_who_does_not_own_the_data_dir_is_refused_before_anything(
    open_tmp: Path,
    redis_server: RedisServer,
    mux: RedisMux,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Root's data dir, open to all: only the refusal keeps that user from writing files
    # there that would be its own (and from reading the generated secret first).
    for name in [n for n in os.environ if n.startswith("CLINIC_")]:
        monkeypatch.delenv(name)
    data = open_tmp / "d"
    await _made_under(mux, data, OLD, "old-1")
    for path in [data, *data.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o666)
    (data / "secret").write_text(NEW + "\n")
    (data / "secret").chmod(0o600)
    before = {p: (p.stat(), p.read_bytes()) for p in data.rglob("*") if p.is_file()}
    sealed = await mux.execute("GET", "cv:call:old-1")
    env = _env(data, CLINIC_REDIS_URL=redis_server.url)
    for given in (env, {k: v for k, v in env.items() if k != "CLINIC_SECRET"}):
        code = await asyncio.to_thread(_command_as, NOBODY, given)
        out, err = capsys.readouterr()
        assert (code, out) == (2, ""), err
        assert (
            f"clinic-voice secret reseal: CLINIC_DATA_DIR {data} belongs to root (uid 0), not "
            "to this user (nobody (uid 65534))"
        ) in err, err
        assert {p: (p.stat(), p.read_bytes()) for p in data.rglob("*") if p.is_file()} == before
        assert await mux.execute("GET", "cv:call:old-1") == sealed


@needs_root
async def test_root_makes_no_data_dir(tmp_path: Path) -> None:
    code, out, err = await _command(_env(tmp_path / "none"))
    assert (code, out) == (2, ""), err
    assert "is not there, nor the embedded Redis in it" in err
    assert not (tmp_path / "none").exists()
