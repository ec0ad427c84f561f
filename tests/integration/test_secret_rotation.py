"""A changed ``CLINIC_SECRET`` with the old one in ``CLINIC_PREVIOUS_SECRETS``, against a real
redis-server and the real app (README: "Changing the secret"): what was sealed or hashed under
the old secret (call records, voicemail, records kept on disk, a pending verification's code)
still opens and checks, everything new is made under the new one only, and the fingerprint in
Redis moves to the new secret, stopping a process still on the old one.

Each "restart" is a service stopped and another started on the same data dir and Redis.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag

from clinic_voice import app as app_module
from clinic_voice import shared_secret
from clinic_voice.app import RUNTIME, Runtime
from clinic_voice.shared_secret import SecretMismatch
from tests.integration.conftest import (
    CALLS_KEY,
    MOBILE,
    SECRET,
    Api,
    StartService,
    read_code,
    wrong_code,
)
from tests.peers.sms_gateway import SmsGateway
from verification.redis_mux import RedisMux
from voice.ivr.call_record import CallResult
from voice.ivr.engine import CallRecord
from voice.ivr.journal import FOLDER, LIVE_FOLDER, CallJournal, Replayed
from voice.ivr.store import CallStore
from voice.ivr.voicemail import Voicemails, VoicemailUnreadable

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]

OLD = SECRET  # the conftest's
NEW = "rotated-secret-0123456789abcdefghijklmnop"
OTHER = "unrelated-secret-0123456789abcdefghijklmn"
OTHER_MOBILE = "+31612345670"
PCM = b"\x10\x00\xf0\xff" * 2000  # an eighth of a second of message
DEADLINE_S = 5.0


def _result(call_id: str, message: str | None = None) -> CallResult:
    values = (("complaint", "rash"),) + ((("callback_message", message),) if message else ())
    record = CallRecord("triage", (), values, None, (), None, None, "message_left")
    now = time.time()
    return CallResult(call_id, MOBILE, "700", now - 90, now - 30, record)


async def _service(
    start_service: StartService, data: Path, secret: str, previous: str | None = None
) -> Api:
    env = {"CLINIC_DATA_DIR": str(data), "CLINIC_SECRET": secret}
    if previous is not None:
        env["CLINIC_PREVIOUS_SECRETS"] = previous
    return await start_service(env)


def _rt(api: Api) -> Runtime:
    rt: Runtime = api.app[RUNTIME]
    return rt


async def _made_under_old(start_service: StartService, data: Path) -> None:
    """A service on the old secret leaves: a record naming a voicemail in Redis, a record kept
    in the journal, and the live record of a call it was killed during; then it stops."""
    api = await _service(start_service, data, OLD)
    rt = _rt(api)
    name = await rt.need_voicemails().save("rot-1", PCM)
    await rt.need_call_store().save(_result("rot-1", name))
    journal = CallJournal(data / FOLDER, rt.need_call_store())
    await journal.keep(_result("rot-kept"))
    await journal.begin(_result("rot-live"))
    await api.client.close()


async def test_records_voicemail_and_kept_records_of_the_old_secret_open_after_the_change(
    start_service: StartService, mux: RedisMux, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    await _made_under_old(start_service, data)

    api = await _service(start_service, data, NEW, OLD)
    api.key = CALLS_KEY
    listed = await api.request("GET", "/v1/calls")
    assert [c["id"] for c in listed.json["calls"]] == ["rot-1"], listed.text
    one = await api.request("GET", "/v1/calls/rot-1")
    assert one.status == 200 and one.json["values"]["complaint"] == "rash", one.text
    message = await api.request("GET", "/v1/calls/rot-1/voicemail")
    assert message.status == 200 and message.content_type == "audio/wav", message.text
    store = _rt(api).need_call_store()
    journal = CallJournal(data / FOLDER, store)
    now = time.time()
    assert await journal.replay(now) == Replayed(saved=1)
    assert await journal.replay_lost(["rot-live"], now) == []
    assert not list((data / FOLDER).iterdir()) and not list((data / LIVE_FOLDER).iterdir())
    for call_id in ("rot-kept", "rot-live"):
        assert (await api.request("GET", f"/v1/calls/{call_id}")).status == 200

    # What the service makes now is sealed under the new secret only.
    name = await _rt(api).need_voicemails().save("rot-2", PCM)
    await store.save(_result("rot-2", name))
    await journal.keep(_result("rot-3"))
    sealed = str(await mux.execute("GET", "cv:call:rot-2"))
    kept = (data / FOLDER / "rot-3.sealed").read_text()
    old_only, new_only = CallStore(mux, OLD.encode(), 30), CallStore(mux, NEW.encode(), 30)
    for call_id, blob in (("rot-2", sealed), ("rot-3", kept)):
        assert new_only.open(call_id, blob)["values"]["complaint"] == "rash"
        with pytest.raises(InvalidTag):
            old_only.open(call_id, blob)
    assert await Voicemails(data / "voicemail", new_only).wav("rot-2", name) is not None
    with pytest.raises(VoicemailUnreadable):
        await Voicemails(data / "voicemail", old_only).wav("rot-2", name)
    # An erasure of a call sealed under the old secret: all of it goes.
    assert (await api.request("DELETE", "/v1/calls/rot-1")).status == 204
    (await api.request("GET", "/v1/calls/rot-1")).problem(404, "not-found")
    assert not list((data / "voicemail").glob("rot-1-*"))


async def test_without_the_previous_secret_the_old_records_do_not_open(
    start_service: StartService, mux: RedisMux, tmp_path: Path
) -> None:
    # The change as it was before CLINIC_PREVIOUS_SECRETS: every process stopped, the
    # fingerprint deleted, the new secret alone.
    data = tmp_path / "data"
    await _made_under_old(start_service, data)
    await mux.execute("DEL", shared_secret.KEY)

    api = await _service(start_service, data, NEW)
    api.key = CALLS_KEY
    listed = await api.request("GET", "/v1/calls")
    assert listed.status == 200 and listed.json["calls"] == [], listed.text  # left out
    (await api.request("GET", "/v1/calls/rot-1")).problem(500, "internal")
    (await api.request("GET", "/v1/calls/rot-1/voicemail")).problem(500, "internal")
    name = next((data / "voicemail").glob("rot-1-*")).name
    with pytest.raises(VoicemailUnreadable):
        await _rt(api).need_voicemails().wav("rot-1", name)
    journal = CallJournal(data / FOLDER, _rt(api).need_call_store())
    assert await journal.replay(time.time()) == Replayed(left=1)
    assert await journal.replay_lost(["rot-live"], time.time()) == []
    assert (data / LIVE_FOLDER / "rot-live.sealed").exists(), "left there, unreadable"


async def test_a_code_sent_under_the_old_secret_checks_right_after_the_change(
    start_service: StartService, sms_gateway: SmsGateway, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    old = await _service(start_service, data, OLD)
    first = (await old.create()).json["id"]
    first_code = await read_code(sms_gateway, 1)
    second = (await old.create(phone=OTHER_MOBILE)).json["id"]
    second_code = await read_code(sms_gateway, 2)
    await old.client.close()

    api = await _service(start_service, data, NEW, OLD)
    wrong = await api.check(first, wrong_code(first_code))  # counted once, not once a secret
    assert wrong.json == {"id": first, "status": "pending", "attempts_left": 4}, wrong.text
    right = await api.check(first, first_code)
    assert right.json == {"id": first, "status": "approved", "attempts_left": 4}, right.text
    await api.client.close()

    # The new secret alone (CLINIC_PREVIOUS_SECRETS removed too early): a wrong code.
    alone = await _service(start_service, data, NEW)
    refused = await alone.check(second, second_code)
    assert refused.json == {"id": second, "status": "pending", "attempts_left": 4}, refused.text


async def test_the_fingerprint_moves_to_the_new_secret_and_the_old_process_stops(
    start_service: StartService,
    mux: RedisMux,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(shared_secret, "HOLD_S", 0.1)
    stops: list[None] = []
    monkeypatch.setattr(app_module, "_sigterm_once_handled", lambda: stops.append(None))
    caplog.set_level(logging.WARNING, logger="clinic_voice.shared_secret")
    loop = asyncio.get_running_loop()

    async def fingerprint() -> Any:
        there = await mux.execute("GET", shared_secret.KEY)
        return there.decode() if isinstance(there, bytes) else there

    async def until(what: str, ok: Any) -> None:
        end = loop.time() + DEADLINE_S
        while not await ok():
            assert loop.time() < end, what
            await asyncio.sleep(0.05)

    old = (await start_service({"CLINIC_SECRET": OLD})).app[RUNTIME]  # runs on the old secret
    assert await fingerprint() == shared_secret.fingerprint(OLD.encode())
    await start_service({"CLINIC_SECRET": NEW, "CLINIC_PREVIOUS_SECRETS": f"{OTHER},{OLD}"})
    assert await fingerprint() == shared_secret.fingerprint(NEW.encode())
    rotated = [r for r in caplog.records if "was rotated" in r.getMessage()]
    assert len(rotated) == 1 and rotated[0].levelno == logging.WARNING
    for record in caplog.records:
        assert OLD not in record.getMessage() and NEW not in record.getMessage()

    async def old_told() -> bool:
        return bool(stops)

    await until("the process on the old secret did not see the new fingerprint", old_told)
    assert len(stops) == 1 and "another CLINIC_SECRET" in old.misconfigured, old.misconfigured

    with pytest.raises(SecretMismatch, match="another CLINIC_SECRET"):
        await start_service({"CLINIC_SECRET": OLD})  # the old secret, started again
    with pytest.raises(SecretMismatch, match="CLINIC_PREVIOUS_SECRETS"):
        await start_service({"CLINIC_SECRET": OTHER, "CLINIC_PREVIOUS_SECRETS": NEW[::-1]})
    await start_service({"CLINIC_SECRET": NEW, "CLINIC_PREVIOUS_SECRETS": OLD})  # one service
    assert len([r for r in caplog.records if "was rotated" in r.getMessage()]) == 1

    # Redis lost its data and a process on the old secret claimed it first: the running ones
    # on the new secret take it back (and that one then stops).
    await mux.execute("SET", shared_secret.KEY, shared_secret.fingerprint(OLD.encode()))

    async def taken_back() -> bool:
        return bool(await fingerprint() == shared_secret.fingerprint(NEW.encode()))

    await until("the running serve did not take the fingerprint back", taken_back)
    assert len(stops) == 1, "a process on the new secret was stopped"
