"""``DELETE /v1/calls/{id}`` (a GDPR erasure) and the voicemail that does not open, over real
HTTP against a real redis-server: the record, its index entry, its voicemail and its copies
on disk go; a call still under way is refused; Redis down changes nothing; a failed file is
finished by the same request again; and a record kept on disk never brings the call back.

Records are saved through the service's own store (no SIP call is needed for them); the data
dir is the service's.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import textwrap
import time
import wave
from pathlib import Path

import pytest

from clinic_voice.app import RUNTIME, Runtime
from clinic_voice.clinic_line import ClinicLine
from tests.conftest import RedisServer
from tests.integration.conftest import API_KEY, CALLS_KEY, Api, StartService
from tests.readme_text import README
from voice.ivr.call_record import CallResult
from voice.ivr.engine import CallRecord
from voice.ivr.erasure import LIVE_AT_MOST_S
from voice.ivr.flow import FlowSet
from voice.ivr.journal import FOLDER, LIVE_FOLDER, CallJournal, Replayed
from voice.ivr.store import CallStore
from voice.media.tts import PromptRenderer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]

PCM = b"\x10\x00\xf0\xff" * 4000  # a quarter second of message


def _result(call_id: str, message: str | None = None) -> CallResult:
    values = (("complaint", "rash"),) + ((("callback_message", message),) if message else ())
    record = CallRecord("triage", (), values, None, (), None, None, "message_left")
    now = time.time()
    return CallResult(call_id, "+31612345678", "700", now - 90, now - 30, record)


async def _calls_api(start_service: StartService) -> Api:
    api = await start_service()
    api.key = CALLS_KEY
    return api


def _rt(api: Api) -> Runtime:
    rt: Runtime = api.app[RUNTIME]
    return rt


def _store(api: Api) -> CallStore:
    return _rt(api).need_call_store()


def _data(api: Api) -> Path:
    return _rt(api).settings.data_dir


async def _saved_with_message(api: Api, call_id: str) -> Path:
    """A call record in Redis naming a voicemail; the voicemail's path."""
    name = await _rt(api).need_voicemails().save(call_id, PCM)
    await _store(api).save(_result(call_id, name))
    return _data(api) / "voicemail" / name


async def test_an_erased_call_is_gone_with_its_voicemail_and_copies_on_disk(
    start_service: StartService,
) -> None:
    api = await _calls_api(start_service)
    message = await _saved_with_message(api, "er-1")
    other = await _saved_with_message(api, "er-1-2")  # its id starts with "er-1-"
    journal = CallJournal(_data(api) / FOLDER, _store(api))
    await journal.keep(_result("er-1"))  # a copy written ahead whose delete was lost
    assert (await api.request("GET", "/v1/calls/er-1/voicemail")).status == 200

    erased = await api.request("DELETE", "/v1/calls/er-1")
    assert erased.status == 204 and erased.body == b"", erased.text
    assert erased.headers["Cache-Control"] == "no-store"
    (await api.request("GET", "/v1/calls/er-1")).problem(404, "not-found")
    (await api.request("GET", "/v1/calls/er-1/voicemail")).problem(404, "not-found")
    listed = await api.request("GET", "/v1/calls?limit=100")
    assert [c["id"] for c in listed.json["calls"]] == ["er-1-2"]
    assert not message.exists() and other.exists()
    assert not (_data(api) / FOLDER / "er-1.sealed").exists()
    assert (await api.request("GET", "/v1/calls/er-1-2")).status == 200
    # Again (a client that lost the first answer): the same, for the retention period.
    assert (await api.request("DELETE", "/v1/calls/er-1")).status == 204


async def test_erasing_an_unknown_call_is_404_and_other_keys_get_what_they_get_elsewhere(
    start_service: StartService,
) -> None:
    api = await _calls_api(start_service)
    await _store(api).save(_result("er-2"))
    (await api.request("DELETE", "/v1/calls/er-never-was")).problem(404, "not-found")
    (await api.request("DELETE", "/v1/calls/bad%20id")).problem(404, "not-found")
    (await api.request("DELETE", "/v1/calls/er-2", key=API_KEY)).problem(403, "key-not-allowed")
    assert (await api.request("DELETE", "/v1/calls/er-2", key=None)).status == 401
    assert (await api.request("DELETE", "/v1/calls/er-2", key="wrong-key-0123456789")).status == 401
    (await api.request("DELETE", "/v1/calls")).problem(405, "method-not-allowed")
    assert (await api.request("GET", "/v1/calls/er-2")).status == 200, "nothing was erased"


async def test_a_call_under_way_is_not_erased_until_it_ended(
    start_service: StartService,
) -> None:
    api = await _calls_api(start_service)
    journal = CallJournal(_data(api) / FOLDER, _store(api))
    await journal.begin(_result("er-live"))  # the call is answered: its live record
    refused = await api.request("DELETE", "/v1/calls/er-live")
    refused.problem(409, "call-in-progress")
    assert int(refused.headers["Retry-After"]) >= 1
    live = _data(api) / LIVE_FOLDER / "er-live.sealed"
    assert live.exists(), "the call's own live record is the call's to delete"
    # The call ends: its record is saved, its live record deleted. Now it can go.
    await _store(api).save(_result("er-live"))
    await journal.end("er-live")
    assert (await api.request("DELETE", "/v1/calls/er-live")).status == 204
    (await api.request("GET", "/v1/calls/er-live")).problem(404, "not-found")


async def test_a_live_record_a_dead_serve_left_is_erased_and_not_replayed(
    start_service: StartService,
) -> None:
    # No call lasts longer than LIVE_AT_MOST_S: an older live record was left by a serve that
    # died during its call (and the next start has not saved it yet).
    api = await _calls_api(start_service)
    journal = CallJournal(_data(api) / FOLDER, _store(api))
    await journal.begin(_result("er-dead"))
    live = _data(api) / LIVE_FOLDER / "er-dead.sealed"
    then = time.time() - LIVE_AT_MOST_S - 60
    os.utime(live, (then, then))
    assert (await api.request("DELETE", "/v1/calls/er-dead")).status == 204
    assert not live.exists()
    await journal.begin(_result("er-dead"))  # as if the delete had been lost to a crash
    assert await journal.replay_lost(await journal.leftovers(time.time()), time.time()) == []
    (await api.request("GET", "/v1/calls/er-dead")).problem(404, "not-found")


async def test_an_erased_call_does_not_come_back_after_a_journal_replay(
    start_service: StartService, redis_server: RedisServer
) -> None:
    # The call ended while Redis was down: only its copy on disk knows it. Redis is back,
    # staff erase it before the 30 s replay; a copy the erasure did not see (the replay had
    # read it just before) is then replayed: the call stays erased.
    api = await _calls_api(start_service)
    journal = CallJournal(_data(api) / FOLDER, _store(api))
    await journal.keep(_result("er-kept"))
    assert (await api.request("DELETE", "/v1/calls/er-kept")).status == 204
    assert not (_data(api) / FOLDER / "er-kept.sealed").exists()
    await journal.keep(_result("er-kept"))
    assert await journal.replay(time.time()) == Replayed(erased=1)
    (await api.request("GET", "/v1/calls/er-kept")).problem(404, "not-found")
    listed = await api.request("GET", "/v1/calls")
    assert "er-kept" not in [c["id"] for c in listed.json["calls"]]
    assert not list((_data(api) / FOLDER).iterdir())


async def test_with_redis_down_an_erasure_is_503_and_deletes_nothing(
    start_service: StartService, redis_server: RedisServer
) -> None:
    api = await _calls_api(start_service)
    message = await _saved_with_message(api, "er-down")
    await asyncio.to_thread(redis_server.kill9)
    (await api.request("DELETE", "/v1/calls/er-down")).problem(503, "store-unavailable")
    assert message.exists(), "a file deleted while the record stays: half an erasure"
    await asyncio.to_thread(redis_server.restart)
    async with asyncio.timeout(10):
        while (answer := await api.request("DELETE", "/v1/calls/er-down")).status == 503:  # noqa: ASYNC110 (a deadline)
            await asyncio.sleep(0.1)
    assert answer.status == 204, answer.text
    assert not message.exists()


async def test_a_file_that_will_not_go_is_500_and_the_same_request_finishes_it(
    start_service: StartService, caplog: pytest.LogCaptureFixture
) -> None:
    api = await _calls_api(start_service)
    message = await _saved_with_message(api, "er-stuck")
    # A file the service cannot delete (tests run as root, so not by its mode): a folder in
    # the copy's place.
    stuck = _data(api) / FOLDER / "er-stuck.sealed"
    (stuck / "x").mkdir(parents=True)
    answer = await api.request("DELETE", "/v1/calls/er-stuck")
    answer.problem(500, "erasure-incomplete")
    # The record is gone at once, and marked: nothing brings it back meanwhile.
    (await api.request("GET", "/v1/calls/er-stuck")).problem(404, "not-found")
    assert any("er-stuck" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    (stuck / "x").rmdir()
    stuck.rmdir()
    assert (await api.request("DELETE", "/v1/calls/er-stuck")).status == 204
    assert not message.exists()


async def test_a_voicemail_that_does_not_open_is_a_500_logged_once(
    start_service: StartService, caplog: pytest.LogCaptureFixture
) -> None:
    # It used to answer 404 "no voicemail", with nothing logged: staff took the patient for
    # one who left no message.
    api = await _calls_api(start_service)
    message = await _saved_with_message(api, "er-damaged")
    message.write_text("damaged")
    caplog.set_level(logging.DEBUG)
    for _ in range(2):
        answer = await api.request("GET", "/v1/calls/er-damaged/voicemail")
        answer.problem(500, "voicemail-unreadable")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and message.name in errors[0], errors
    assert "rash" not in errors[0] and "+31612345678" not in errors[0]
    message.unlink()
    (await api.request("GET", "/v1/calls/er-damaged/voicemail")).problem(404, "not-found")


async def test_a_message_the_cut_calls_record_does_not_name_is_played(
    start_service: StartService,
) -> None:
    # serve killed after the message was written, before the call's live record was rewritten
    # to name it: the next start saved the cut call's record without the name, and staff got
    # 404 "this call left no voicemail" for a message that was there (test_prop_voicemail.py).
    api = await _calls_api(start_service)
    journal = CallJournal(_data(api) / FOLDER, _store(api))
    await journal.begin(_result("er-cut"))  # the live record, as the recording begins
    name = await _rt(api).need_voicemails().save("er-cut", PCM)
    now = time.time()
    assert await journal.replay_lost(await journal.leftovers(now), now) == []  # the next start
    doc = (await api.request("GET", "/v1/calls/er-cut")).json
    assert name not in doc["values"].values(), doc
    answer = await api.request("GET", "/v1/calls/er-cut/voicemail")
    assert answer.status == 200 and answer.content_type == "audio/wav", answer.status
    with wave.open(io.BytesIO(answer.body)) as w:
        assert w.readframes(w.getnframes()) == PCM
    # Another call's message, whose id starts with this one's, is not this call's.
    await _store(api).save(_result("er-none"))
    await _rt(api).need_voicemails().save("er-none-2", PCM[::-1])
    (await api.request("GET", "/v1/calls/er-none/voicemail")).problem(404, "not-found")
    assert (await api.request("DELETE", "/v1/calls/er-cut")).status == 204
    (await api.request("GET", "/v1/calls/er-cut/voicemail")).problem(404, "not-found")
    assert not (_data(api) / "voicemail" / name).exists()


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("limit=0", {"field": "limit"}),
        ("limit=101", {"field": "limit"}),
        ("cursor=yesterday", {"field": "cursor"}),
        ("page=2&limit=5", {"fields": ["page"]}),
    ],
)
async def test_a_bad_query_on_the_call_list_names_its_parameter(
    start_service: StartService, query: str, named: dict[str, object]
) -> None:
    # As a bad body field is named (README, errors): the 422 said only "invalid-request".
    api = await _calls_api(start_service)
    body = (await api.request("GET", f"/v1/calls?{query}")).problem(422, "invalid-request")
    assert {k: body.get(k) for k in named} == named, body


async def test_an_erasure_at_another_serve_takes_this_ones_voicemail_at_its_next_replay(
    start_service: StartService,
) -> None:
    # Two serves on one Redis, each with its own data dir (two hosts). The call was answered
    # by A (its message is in A's data dir); staff's DELETE reaches B, which can delete only
    # its own files. A's next replay round (every 30 s) deletes the message, and no other.
    api_a, api_b = await _calls_api(start_service), await _calls_api(start_service)
    message = await _saved_with_message(api_a, "er-far")
    other = await _saved_with_message(api_a, "er-far-x")  # "er-far-" is a prefix of its name
    assert (await api_b.request("DELETE", "/v1/calls/er-far")).status == 204
    (await api_a.request("GET", "/v1/calls/er-far/voicemail")).problem(404, "not-found")
    assert message.exists()  # B could not reach it
    rt = _rt(api_a)
    line = ClinicLine(rt.settings, rt, FlowSet(flows={}))
    replaying = asyncio.create_task(line._replay_journal(line._new_journal(), []))
    try:
        async with asyncio.timeout(5):
            while message.exists():  # noqa: ASYNC110 (a deadline)
                await asyncio.sleep(0.05)
    finally:
        replaying.cancel()
        await asyncio.gather(replaying, return_exceptions=True)
    assert other.exists()
    assert (await api_a.request("GET", "/v1/calls/er-far-x/voicemail")).status == 200


def _erasure_search_loop() -> str:
    """The README's loop that finds a patient's calls by number, as an operator pastes it."""
    text = README.read_text(encoding="utf-8")
    start = text.index("```sh\n", text.index("A patient asks by phone number")) + len("```sh\n")
    return textwrap.dedent(text[start : text.index("```", start)])


async def _run_search(api: Api, cwd: Path) -> tuple[str, str]:
    base = str(api.client.make_url("")).rstrip("/")
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        _erasure_search_loop(),
        cwd=cwd,
        env={**os.environ, "API": base, "K": CALLS_KEY},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return out.decode(), err.decode()


async def test_the_readmes_search_finds_calls_of_one_start_on_both_sides_of_a_page_edge(
    start_service: StartService, tmp_path: Path
) -> None:
    """The cursor was the start of a page's last call alone, and the next page began below it:
    the calls of that start not yet listed were skipped, so a search missed the patient's
    calls (records replayed from the journal keep a start to the millisecond: calls of one
    start are not rare on a busy line)."""
    api = await _calls_api(start_service)
    at = round(time.time() - 4000, 3)
    record = CallRecord("triage", (), (), None, (), None, None, "message_left")
    patient = {129: "+31612345678", 10: "0612345678", 0: "0031 6 1234 5678"}
    for i in range(130):  # listed by id, descending: 129 on the first page, 10 and 0 after
        caller = patient.get(i, f"+3120{i:07d}")
        await _store(api).save(CallResult(f"same-{i:03d}", caller, "700", at, at + 10, record))
    out, err = await _run_search(api, tmp_path)
    assert sorted(line.split()[0] for line in out.splitlines()) == [
        "same-000",
        "same-010",
        "same-129",
    ], (out, err)
    assert err == "", err


async def _page_through(api: Api, limit: int, cursor: str | None = None) -> list[str]:
    """Every call id the list shows, page by page, the cursor sent as the README's loop
    sends it (as given, not encoded)."""
    listed: list[str] = []
    for _ in range(200):
        query = f"limit={limit}" + (f"&cursor={cursor}" if cursor is not None else "")
        answer = await api.request("GET", f"/v1/calls?{query}")
        assert answer.status == 200, answer.text
        listed += [c["id"] for c in answer.json["calls"]]
        cursor = answer.json["next"]
        if cursor is None:
            return listed
    pytest.fail(f"the list did not end: {listed}")


async def test_pages_list_every_call_of_one_start_exactly_once(start_service: StartService) -> None:
    api = await _calls_api(start_service)
    at = round(time.time() - 600, 3)
    record = CallRecord("triage", (), (), None, (), None, None, "message_left")
    starts = {f"one-{i:02d}": at for i in range(23)} | {"new-0": at + 1, "old-0": at - 1}
    for call_id, start in starts.items():
        await _store(api).save(CallResult(call_id, "6001", "700", start, start + 5, record))
    newest_first = sorted(starts, key=lambda i: (starts[i], i.encode()), reverse=True)
    for limit in (1, 2, 4, 7, 22, 23, 24, 100):
        assert await _page_through(api, limit) == newest_first, limit
    # A cursor of before (the start alone) is still taken: its page lists the calls of that
    # start again rather than skip one.
    again = await _page_through(api, 5, repr(at))
    assert again == newest_first[1:], again


async def test_the_readmes_search_by_number_finds_every_call_or_says_it_did_not(
    start_service: StartService, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The README's paging loop for a GDPR request, run as given: it finds the patient's calls
    on every page, whatever form of the number the PBX sent. It printed nothing of what it
    could not see: a record waiting on disk is in no page, and a 503 (Redis down) ended the
    loop as if the last page had come, with a KeyError, so a search of part of the calls
    read as a search of all of them."""
    api = await _calls_api(start_service)
    now = time.time()
    callers = {5: "+31612345678", 101: "0612345678", 102: "0031 6 1234 5678"}
    record = CallRecord("triage", (), (), None, (), None, None, "message_left")
    for i in range(104):  # two pages of 100
        caller = callers.get(i, f"+3120{i:07d}")
        await _store(api).save(
            CallResult(f"gdpr-{i}", caller, "700", now - 4000 + i, now - 3990 + i, record)
        )
    out, err = await _run_search(api, tmp_path)
    assert sorted(line.split()[0] for line in out.splitlines()) == [
        "gdpr-101",
        "gdpr-102",
        "gdpr-5",
    ], (out, err)
    assert err == "", err

    rt = _rt(api)
    rt.renderer = PromptRenderer(rt.settings.data_dir / "prompts")
    line = ClinicLine(rt.settings, rt, FlowSet(flows={}))
    await line.start()  # counts the records on disk (replays every 30 s: not in this test)
    try:
        assert line._journal is not None
        kept = CallResult("gdpr-disk", "+31612345678", "700", now - 50, now - 40, record)
        await line._journal.keep(kept)  # as when Redis refused its save
        assert (await api.request("GET", "/v1/calls?limit=1")).json["waiting_on_disk"] == 1
        out, err = await _run_search(api, tmp_path)
    finally:
        await line.stop()
    assert len(out.splitlines()) == 3, out
    assert "1 records wait on disk, not in the list" in err, (out, err)

    await asyncio.to_thread(redis_server.kill9)
    out, err = await _run_search(api, tmp_path)
    assert out == "", out
    assert "the list did not answer: not searched to the end" in err, err
    assert not (tmp_path / "page.json").exists()
