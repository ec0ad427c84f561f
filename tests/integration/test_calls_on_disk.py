"""Call records waiting on disk are shown, over real HTTP against a real redis-server and the
service's own journal folders: ``GET /v1/calls`` says how many (``waiting_on_disk``) and
``/metrics`` shows them by state (``clinic_call_records_on_disk``), counted as the journal
writes, replays and deletes them, back to 0 once Redis took them.

The clinic line runs on the test service's runtime (as serve's does) with no flows: its
journal is what this is about; a call's end is its session's store step, driven directly.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest

from clinic_voice import clinic_line as clinic_line_module
from clinic_voice.app import RUNTIME, Runtime
from clinic_voice.clinic_line import ClinicLine
from tests.conftest import RedisServer
from tests.integration.conftest import CALLS_KEY, Api, StartService, StoredCall
from voice.ivr.call_record import CallResult
from voice.ivr.engine import LOST_OUTCOME, CallRecord
from voice.ivr.flow import FlowSet
from voice.ivr.journal import FOLDER, CallJournal
from voice.ivr.session import CallSession
from voice.ivr.store import CallStore
from voice.media.tts import PromptRenderer
from voice.sip.pool import CallHandle

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]

CALLER = StoredCall.caller
RECORD = CallRecord("triage", (), (("complaint", "rash"),), None, (), None, None, "ended")
DEADLINE_S = 10.0


async def _line(api: Api) -> ClinicLine:
    rt: Runtime = api.app[RUNTIME]
    rt.renderer = PromptRenderer(rt.settings.data_dir / "prompts")
    line = ClinicLine(rt.settings, rt, FlowSet(flows={}))
    await line.start()
    return line


async def _call_ends(line: ClinicLine, call_id: str) -> None:
    """The call's record is stored as at its end (saved, or kept on disk)."""
    assert line._deps is not None
    session = CallSession(cast(CallHandle, StoredCall(call_id)), line._deps)
    session._started_at = time.time() - 60
    async with asyncio.timeout(DEADLINE_S):
        await session._store(RECORD)


async def _listed(api: Api) -> dict[str, Any]:
    answer = await api.request("GET", "/v1/calls?limit=100")
    assert answer.status == 200, answer.text
    return dict(answer.json)


async def _on_disk(api: Api) -> dict[str, float]:
    answer = await api.request("GET", "/metrics", key=None)
    assert answer.status == 200, answer.text
    found = re.findall(r'^clinic_call_records_on_disk\{state="(\w+)"\} (\S+)$', answer.text, re.M)
    return {state: float(v) for state, v in found}


async def _until(what: str, check: Callable[[], Awaitable[bool]]) -> None:
    try:
        async with asyncio.timeout(DEADLINE_S):
            while not await check():  # noqa: ASYNC110 (a deadline)
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"not within {DEADLINE_S} s: {what}")


async def test_a_record_redis_refused_is_shown_until_the_replay_saves_it(
    start_service: StartService, redis_server: RedisServer
) -> None:
    api = await start_service()
    api.key = CALLS_KEY
    line = await _line(api)  # replays at start (nothing there), then every 30 s
    journal = line._journal
    assert journal is not None
    try:
        assert (await _listed(api))["waiting_on_disk"] == 0
        assert await _on_disk(api) == {"kept": 0, "cut": 0, "unreadable": 0}

        await asyncio.to_thread(redis_server.fill)  # writes refused: the record goes to disk
        try:
            await _call_ends(line, "od-1")
            assert (api.app[RUNTIME].settings.data_dir / FOLDER / "od-1.sealed").exists()
            assert await _on_disk(api) == {"kept": 1, "cut": 0, "unreadable": 0}
        finally:
            await asyncio.to_thread(redis_server.unfill)
        # Redis is back; until the next replay the call is not in the list, and staff see why.
        page = await _listed(api)
        assert page["calls"] == [] and page["waiting_on_disk"] == 1

        await journal.replay(time.time())  # the replay of the 30 s loop, now
        page = await _listed(api)
        assert [c["id"] for c in page["calls"]] == ["od-1"] and page["waiting_on_disk"] == 0
        assert await _on_disk(api) == {"kept": 0, "cut": 0, "unreadable": 0}

        await _call_ends(line, "od-2")  # saved at once: its copy written ahead is not counted
        page = await _listed(api)
        assert page["waiting_on_disk"] == 0 and len(page["calls"]) == 2
    finally:
        await line.stop()
    assert await _on_disk(api) == {}, "the line stopped: no sample"


async def test_cut_and_unreadable_records_are_shown_and_an_erasure_counts(
    start_service: StartService, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(clinic_line_module, "REPLAY_EVERY_S", 0.2)
    api = await start_service()
    api.key = CALLS_KEY
    rt: Runtime = api.app[RUNTIME]
    data = rt.settings.data_dir
    # Left by an earlier serve: a call it was running when it died, and a record kept under
    # a secret this service does not have.
    store = rt.need_call_store()
    now = time.time()
    cut = CallRecord("triage", (), (), None, (), None, None, LOST_OUTCOME)
    await CallJournal(data / FOLDER, store).begin(
        CallResult("od-cut", CALLER, "700", now - 90, now - 30, cut)
    )
    unused: Any = None  # sealing needs no Redis
    foreign = CallStore(unused, b"t" * 32, retention_days=30)
    await CallJournal(data / FOLDER, foreign).keep(
        CallResult("od-foreign", CALLER, "700", now - 90, now - 30, RECORD)
    )
    await asyncio.to_thread(redis_server.fill)
    line = await _line(api)
    try:

        async def tried() -> bool:
            return (await _on_disk(api)).get("unreadable") == 1

        await _until("the first replay tried the kept record", tried)
        assert await _on_disk(api) == {"kept": 0, "cut": 1, "unreadable": 1}
        # (GET /v1/calls answers 503 while Redis refuses writes: the API's limits write.)

        await asyncio.to_thread(redis_server.unfill)

        async def saved() -> bool:
            return (await _on_disk(api)).get("cut") == 0

        await _until("the cut call saved", saved)
        page = await _listed(api)
        assert [c["id"] for c in page["calls"]] == ["od-cut"]
        assert page["waiting_on_disk"] == 1  # the unreadable one waits for the operator
        assert await _on_disk(api) == {"kept": 0, "cut": 0, "unreadable": 1}

        answer = await api.request("DELETE", "/v1/calls/od-foreign")
        assert answer.status == 204, answer.text
        assert (await _listed(api))["waiting_on_disk"] == 0  # at once, not at the next replay
        assert await _on_disk(api) == {"kept": 0, "cut": 0, "unreadable": 0}
    finally:
        await asyncio.to_thread(redis_server.unfill)
        await line.stop()
