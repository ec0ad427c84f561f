"""The call list as the practice staff read it next morning, over real HTTP against a real
redis-server: each call says its urgency in words and whether the clinic owes the caller a
call back, and why; records are saved through the service's own store."""

from __future__ import annotations

import time

import pytest
import redis.asyncio as aioredis

from clinic_voice.app import RUNTIME, Runtime
from tests.conftest import RedisServer
from tests.integration.conftest import API_KEY, CALLS_KEY, StartService
from voice.ivr.call_record import CallResult
from voice.ivr.engine import CallRecord
from voice.ivr.store import EXAMINED_MAX
from voice.ivr.triage import TriageAction, Urgency

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]


def _result(
    call_id: str, outcome: str, urgency: Urgency | None, target: str | None, ago_s: float
) -> CallResult:
    action = None if urgency is None else TriageAction.CALL_EMERGENCY
    reasons = () if urgency is None else ("difficulty breathing",)
    record = CallRecord("triage", (), (), urgency, reasons, action, target, outcome)
    now = time.time()
    return CallResult(call_id, "+31612345678", "6000", now - ago_s, now - ago_s + 30, record)


async def test_the_list_says_the_urgency_in_words_and_who_needs_a_call_back(
    start_service: StartService,
) -> None:
    api = await start_service()
    api.key = CALLS_KEY
    rt: Runtime = api.app[RUNTIME]
    store = rt.need_call_store()
    # An urgent caller nobody could take; one the nurse took; a message after a busy desk.
    await store.save(_result("fu-urgent", "transfer_failed", Urgency.U1, None, 300))
    await store.save(_result("fu-taken", "call_emergency+transfer_nurse", Urgency.U1,
                             "sip:6100@127.0.0.1", 200))  # fmt: skip
    await store.save(_result("fu-message", "message_left", None, None, 100))

    listed = await api.request("GET", "/v1/calls?limit=10")
    assert listed.status == 200, listed.text
    calls = {c["id"]: c for c in listed.json["calls"]}
    urgent = calls["fu-urgent"]
    assert urgent["triage"]["urgency_meaning"] == "emergency: the emergency number now", urgent
    assert urgent["call_back"].startswith("urgent (U1) and no human took the call"), urgent
    assert calls["fu-taken"]["call_back"] is None, calls["fu-taken"]
    assert calls["fu-message"]["call_back"] == "left a message for a call back: play it"
    assert calls["fu-message"]["triage"] is None
    one = await api.request("GET", "/v1/calls/fu-urgent")
    assert one.status == 200 and one.json == urgent, one.text


async def test_staff_mark_a_call_handled_and_the_mark_goes_with_the_record(
    start_service: StartService,
    redis_server: RedisServer,
) -> None:
    api = await start_service()
    api.key = CALLS_KEY
    rt: Runtime = api.app[RUNTIME]
    store = rt.need_call_store()
    await store.save(_result("fu-h1", "message_left", None, None, 300))
    await store.save(_result("fu-h2", "transfer_unanswered", Urgency.U3, None, 200))

    first = await api.request("GET", "/v1/calls/fu-h1")
    assert first.status == 200 and first.json["handled_at"] is None, first.text
    marked = await api.request("PUT", "/v1/calls/fu-h1/handled")
    assert marked.status == 200, marked.text
    at = marked.json["handled_at"]
    assert at is not None and at.endswith("Z"), marked.json
    assert marked.json["call_back"] is not None, "why it needed a call back stays readable"
    # Again (a double click): the first time stays.
    again = await api.request("PUT", "/v1/calls/fu-h1/handled")
    assert again.status == 200 and again.json["handled_at"] == at, again.text
    listed = await api.request("GET", "/v1/calls?limit=10")
    shown = {c["id"]: c["handled_at"] for c in listed.json["calls"]}
    assert shown == {"fu-h1": at, "fu-h2": None}, shown
    # The mark expires with the record (no mark outlives its call).
    client = aioredis.from_url(redis_server.url)
    record_ms = int(await client.pttl("cv:call:fu-h1"))
    mark_ms = int(await client.pttl("cv:handled:fu-h1"))
    assert 0 < mark_ms <= record_ms, (mark_ms, record_ms)

    undone = await api.request("DELETE", "/v1/calls/fu-h1/handled")
    assert undone.status == 200 and undone.json["handled_at"] is None, undone.text
    # 404 says what it can mean (README): not only "still under way".
    missing = (await api.request("PUT", "/v1/calls/fu-never/handled")).problem(404, "not-found")
    for meaning in ("never", "retention", "erased", "under way", "on disk", "waiting_on_disk"):
        assert meaning in missing["detail"], (meaning, missing)
    undo = await api.request("DELETE", "/v1/calls/fu-never/handled")
    assert undo.problem(404, "not-found")["detail"] == missing["detail"], undo.text
    (await api.request("PUT", "/v1/calls/fu-h2/handled", key=API_KEY)).problem(
        403, "key-not-allowed"
    )

    # An erasure takes the mark with the record, and a call erased cannot be marked.
    assert (await api.request("PUT", "/v1/calls/fu-h2/handled")).status == 200
    assert (await api.request("DELETE", "/v1/calls/fu-h2")).status == 204
    assert await client.exists("cv:handled:fu-h2") == 0
    (await api.request("PUT", "/v1/calls/fu-h2/handled")).problem(404, "not-found")
    await client.aclose()


async def test_staff_list_only_the_calls_that_still_need_a_call_back(
    start_service: StartService,
) -> None:
    api = await start_service()
    api.key = CALLS_KEY
    store = api.app[RUNTIME].need_call_store()
    # Newest first: owed (a message), taken by the nurse, owed but handled, owed (urgent, nobody
    # took it), a completed call, owed (transfer unanswered), owed and handled.
    calls = [
        ("nc-message", "message_left", None, None),
        ("nc-taken", "call_emergency+transfer_nurse", Urgency.U1, "sip:6100@127.0.0.1"),
        ("nc-done", "message_left", None, None),
        ("nc-urgent", "transfer_failed", Urgency.U1, None),
        ("nc-fine", "completed", None, None),
        ("nc-unanswered", "transfer_unanswered", Urgency.U3, None),
        ("nc-done-too", "hung_up_before_transfer", None, None),
    ]
    for n, (call_id, outcome, urgency, target) in enumerate(calls):
        await store.save(_result(call_id, outcome, urgency, target, 100 + 10 * n))
    for call_id in ("nc-done", "nc-done-too"):
        assert (await api.request("PUT", f"/v1/calls/{call_id}/handled")).status == 200

    pages: list[list[str]] = []
    cursor = ""
    for _ in range(10):
        got = await api.request("GET", f"/v1/calls?needs_call_back=true&limit=2{cursor}")
        assert got.status == 200, got.text
        pages.append([c["id"] for c in got.json["calls"]])
        assert all(c["call_back"] and c["handled_at"] is None for c in got.json["calls"])
        if got.json["next"] is None:
            break
        cursor = f"&cursor={got.json['next']}"
    assert pages == [["nc-message", "nc-urgent"], ["nc-unanswered"]], pages
    # false, or no parameter: every call, handled or not.
    every = await api.request("GET", "/v1/calls?needs_call_back=false&limit=10")
    assert [c["id"] for c in every.json["calls"]] == [c[0] for c in calls], every.text
    # Once handled, a call leaves the list; unmarked, it is back.
    assert (await api.request("PUT", "/v1/calls/nc-urgent/handled")).status == 200
    assert (await api.request("DELETE", "/v1/calls/nc-done/handled")).status == 200
    owed = await api.request("GET", "/v1/calls?needs_call_back=true")
    assert [c["id"] for c in owed.json["calls"]] == ["nc-message", "nc-done", "nc-unanswered"]
    assert owed.json["next"] is None

    for bad in ("yes", "1", "True", ""):
        problem = (await api.request("GET", f"/v1/calls?needs_call_back={bad}")).problem(
            422, "invalid-request"
        )
        assert problem["field"] == "needs_call_back", problem
    # Given twice: which one counts differs between readers (a proxy, a log, this service),
    # so neither is taken, as a body that names a field twice is not.
    for twice in ("needs_call_back=true&needs_call_back=false", "limit=1&limit=100"):
        problem = (await api.request("GET", f"/v1/calls?{twice}")).problem(422, "invalid-request")
        assert problem["field"] == twice.split("=")[0], problem


async def test_a_page_of_calls_that_need_a_call_back_reads_a_bounded_number(
    start_service: StartService,
) -> None:
    # More calls none of which needs a call back than a page reads: the page comes back
    # empty with a cursor, and the next finds the one below them.
    api = await start_service()
    api.key = CALLS_KEY
    store = api.app[RUNTIME].need_call_store()
    await store.save(_result("nb-owed", "message_left", None, None, 5000))
    for n in range(EXAMINED_MAX):
        await store.save(_result(f"nb-{n}", "completed", None, None, 1000 + n))
    first = await api.request("GET", "/v1/calls?needs_call_back=true")
    assert first.status == 200, first.text
    assert first.json["calls"] == [] and first.json["next"] is not None, first.json
    second = await api.request("GET", f"/v1/calls?needs_call_back=true&cursor={first.json['next']}")
    assert [c["id"] for c in second.json["calls"]] == ["nb-owed"], second.text
    assert second.json["next"] is None


async def test_a_record_that_does_not_open_is_not_marked_and_answers_as_a_read(
    start_service: StartService,
    redis_server: RedisServer,
) -> None:
    api = await start_service()
    api.key = CALLS_KEY
    store = api.app[RUNTIME].need_call_store()
    client = aioredis.from_url(redis_server.url)
    # One sealed record with a byte flipped (its tag no longer checks), one not a seal at all.
    for call_id in ("fu-damaged", "fu-garbage"):
        await store.save(_result(call_id, "message_left", None, None, 300))
    raw = await client.get("cv:call:fu-damaged")
    assert isinstance(raw, bytes), raw
    sealed = raw.decode("ascii")
    flipped = sealed[:-3] + ("A" if sealed[-3] != "A" else "B") + sealed[-2:]
    await client.set("cv:call:fu-damaged", flipped, keepttl=True)
    await client.set("cv:call:fu-garbage", "not a sealed record", keepttl=True)

    for call_id in ("fu-damaged", "fu-garbage"):
        read = (await api.request("GET", f"/v1/calls/{call_id}")).problem(500, "internal")
        for method in ("PUT", "DELETE"):
            answer = await api.request(method, f"/v1/calls/{call_id}/handled")
            got = answer.problem(500, "internal")
            assert got["detail"] == read["detail"], (got, read)
            # A failed request leaves no mark of a call nobody could read.
            assert await client.exists(f"cv:handled:{call_id}") == 0, method
    await client.aclose()
