"""A stop with calls in progress, against real calls (pjsua2 phones in their own processes).

``serve`` stops on SIGTERM by cleaning up its app runner: the app's ``on_shutdown`` at once,
then its cleanup contexts. These tests stop the service the same way while a call is up:

- from the stop's first moment a new call gets 503 (a proxy tries another instance; 486 would
  tell the caller the clinic is busy);
- a call in progress goes on for ``CLINIC_CALL_DRAIN_S`` and, when it ends in that time, is
  recorded as it ended (not cut);
- a caller still on the line after it hears the closing notice, with the emergency number,
  and then the service hangs up; the record says ``cut_shutdown`` (someone calls back);
- a second SIGTERM during the drain ends it at once (a real ``serve``, signalled as an
  operator or a supervisor would);
- a ``serve`` killed outright (``kill -9``) during a call leaves the call's live record, which
  the next start saves as ``cut_service_lost`` with how far the call went and its triage.

The HTTP API is gone once the stop began, so the records are read from the service's Redis.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from clinic_voice.app import RUNTIME
from sip_config.settings import Settings
from tests.conftest import RedisServer, free_port
from tests.integration.conftest import BASE_ENV, OpenApiCollector
from tests.integration.test_api_processes import (
    Service,
    _data_dir,
    _fresh_connection_request,
    _until,
    _worker_pids,
    serve,
)
from tests.integration.test_ivr_keypad import PRESCRIPTION_KEYS, tone_message
from tests.peers.ivr_rig import (
    NURSE_USER,
    PROMPTS_WARM_S,
    ROOT,
    STAFF_USER,
    ClinicLine,
    Phone,
    pcm_8k,
    phones,
    running_clinic_line,
)
from verification.redis_mux import RedisMux
from voice.ivr.engine import LOST_OUTCOME
from voice.ivr.flow import SYSTEM_TEXTS, spoken_number
from voice.ivr.journal import LIVE_FOLDER
from voice.ivr.store import CallStore
from voice.media.audio_match import rank
from voice.media.pcm import read_wav
from voice.media.tts import PromptRenderer

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

CALL_S = 60.0


@asynccontextmanager
async def line_with(
    tmp: Path, collector: OpenApiCollector, prompts: Path, drain_s: float
) -> AsyncIterator[ClinicLine]:
    env = {"CLINIC_CALL_DRAIN_S": str(drain_s)}
    async with running_clinic_line(tmp, collector, env, prompt_cache=prompts) as line:
        yield line


async def stop(line: ClinicLine) -> None:
    """What serve does at SIGTERM: its runner cleaned up (here the test server's)."""
    await line.api.client.close()


async def stopped_during(line: ClinicLine, caller: Phone) -> dict[str, Any]:
    """Stop the service during ``caller``'s call; the event of the call's end."""
    stopping = asyncio.create_task(stop(line))
    ended = await caller.wait_for("ended", 40, leg="main")
    await caller.finish(10)
    async with asyncio.timeout(CALL_S):
        await stopping
    return ended


async def records(line: ClinicLine) -> list[dict[str, Any]]:
    """The call records, newest first, straight from the service's Redis."""
    return await stored_calls(line.redis.url, line.app[RUNTIME].secret)


async def stored_calls(redis_url: str, secret: bytes) -> list[dict[str, Any]]:
    """The call records, newest first, in the Redis at ``redis_url``."""
    mux = RedisMux(redis_url, timeout_s=2.0)
    try:
        store = CallStore(mux, secret, 30)
        return (await store.recent(10, None)).calls
    finally:
        await mux.aclose()


async def notices(renderer: PromptRenderer, emergency_number: str) -> dict[str, bytes]:
    """The English closing and transfer_failed notices as ``renderer`` renders them (8 kHz
    PCM): what the end of a recorded call is ranked against. The number is read out digit
    by digit, as the engine has it said."""
    spoken = spoken_number(emergency_number)
    texts = {
        key: SYSTEM_TEXTS["en"][key].format(emergency_number=spoken)
        for key in ("closing", "transfer_failed")
    }
    return {
        key: pcm_8k(read_wav(await renderer.render(text, voice="en")))
        for key, text in texts.items()
    }


def assert_heard_closing(heard: Path, references: Mapping[str, bytes]) -> None:
    """The last 14 s of what the caller heard (``heard``) are the closing notice."""
    tail = pcm_8k(read_wav(heard))[-8000 * 2 * 14 :]
    match = rank(tail, references, 8000)
    assert match.key == "closing" and match.score > match.runner_up, match


def serve_env(data: Path, extra: Mapping[str, str], *, nurse_port: int = 0) -> dict[str, str]:
    """``serve``'s environment for the clinic line's flows in ``data``: the nurse (at
    ``nurse_port``, else a free port) and the staff desk on ports nobody answers unless the
    test starts a phone there; ``extra`` on top."""
    return {
        **BASE_ENV,
        "CLINIC_DATA_DIR": str(data),
        "CLINIC_NURSE_URI": f"sip:{NURSE_USER}@127.0.0.1:{nurse_port or free_port()}",
        "CLINIC_STAFF_URI": f"sip:{STAFF_USER}@127.0.0.1:{free_port()}",
        "CLINIC_FLOWS_DIR": str(ROOT / "ivr_flows"),
        **extra,
    }


async def caller_in_main_menu(
    service: Service, env: Mapping[str, str], started: list[Phone], heard: Path
) -> tuple[Phone, dict[str, bytes]]:
    """Once ``serve`` (started with ``env``) has its prompts cached: a caller in the main
    menu who says and presses nothing (it repeats itself), recorded into ``heard``, a second
    into the call; and the notices (:func:`notices`) from serve's own cache (no render here).
    """
    await prompts_warm(service)
    renderer = PromptRenderer(Path(env["CLINIC_DATA_DIR"]) / "prompts")
    references = await notices(renderer, Settings.from_env(env).ivr.emergency_number)
    caller = await Phone.start(
        "caller", "--call", f"sip:6000@{service.sip_addr}", "--record", str(heard),
        "--timeout", "120",
    )  # fmt: skip
    started.append(caller)
    await caller.wait_for("media", CALL_S)
    await asyncio.sleep(1.0)
    return caller, references


async def test_a_call_in_progress_may_finish_and_a_new_one_gets_503(
    tmp_path: Path, openapi_responses: OpenApiCollector, ivr_prompt_cache: Path
) -> None:
    async with line_with(tmp_path, openapi_responses, ivr_prompt_cache, drain_s=30) as line:
        async with phones() as started:
            # The Korean opening (about 13 s) and danger-sign question (about 6 s), answered
            # "no" by key once asked (the call ends well inside the 30 s drain):
            # then the nurse (one danger sign of five is no finished triage), who answers.
            nurse = await Phone.start(
                "nurse", "--port", str(line.nurse_port), "--answer", "--duration", "1"
            )
            started.append(nurse)
            caller = await Phone.start("caller", "--call", line.uri("7001"), "--answers", "2")
            started.append(caller)
            await caller.wait_for("media", CALL_S)
            stopping = asyncio.create_task(stop(line))
            await asyncio.sleep(0.5)
            late = await Phone.start("late", "--call", line.uri("7001"), "--timeout", "10")
            started.append(late)
            refused = await late.wait_for("ended", 10, leg="main")
            await caller.finish(CALL_S)
            await nurse.finish(10)
            async with asyncio.timeout(CALL_S):
                await stopping
        assert refused["status"] == 503, late.events
        assert late.find("media") is None and late.find("confirmed") is None, late.events
        assert caller.find("dtmf_sent", digit="2") is not None, caller.events
        assert caller.find("confirmed", leg="xfer") is not None, caller.events
        (record,) = await records(line)
        assert record["outcome"] == "transfer_nurse", record
        assert record["values"]["breathing"] == "no", record


async def test_a_caller_still_on_the_line_when_the_drain_ends_hears_why_it_ends(
    tmp_path: Path, openapi_responses: OpenApiCollector, ivr_prompt_cache: Path
) -> None:
    heard = tmp_path / "heard.wav"
    async with line_with(tmp_path, openapi_responses, ivr_prompt_cache, drain_s=2) as line:
        renderer = line.app[RUNTIME].renderer
        assert renderer is not None
        references = await notices(renderer, line.settings.ivr.emergency_number)
        async with phones() as started:
            # The main menu, and a caller who says and presses nothing (it repeats itself).
            caller = await Phone.start(
                "caller", "--call", line.uri("6000"), "--record", str(heard), "--timeout", "50"
            )
            started.append(caller)
            await caller.wait_for("media", CALL_S)
            await asyncio.sleep(1.0)
            ended = await stopped_during(line, caller)
        (record,) = await records(line)
    assert record["outcome"] == "cut_shutdown", record
    # The service hung up after the notice: not at the stop's start, not the SIP workers'
    # shutdown after it (which ends the call without a word).
    media_at = caller.find("media", leg="main")
    assert media_at is not None
    assert ended["t"] - media_at["t"] > 1.0 + 2.0 + 5.0, caller.events
    assert_heard_closing(heard, references)


async def test_a_message_being_recorded_ends_at_the_close_and_is_kept(
    tmp_path: Path, openapi_responses: OpenApiCollector, ivr_prompt_cache: Path
) -> None:
    # A prescription request: date of birth and patient number typed ahead, a 2 s tone as
    # the message 12 s after the answer, then silence (the recording runs up to 60 s).
    message = await tone_message(tmp_path)
    async with line_with(tmp_path, openapi_responses, ivr_prompt_cache, drain_s=1) as line:
        async with phones() as started:
            caller = await Phone.start(
                "caller", "--call", line.uri("6000"), "--dtmf", PRESCRIPTION_KEYS,
                "--play", str(message), "--timeout", "50",
            )  # fmt: skip
            started.append(caller)
            media = await caller.wait_for("media", CALL_S)
            await asyncio.sleep(15.0)  # the tone has been recorded; the recording goes on
            ended = await stopped_during(line, caller)
        (record,) = await records(line)
    assert record["flow"] == "prescription" and record["outcome"] == "prescription_requested"
    (recorded,) = [p for p in record["path"] if p["input"] == "record"]
    assert recorded["node"] == "message" and record["values"]["prescription_message"]
    # Ended at the close (1 s after the stop), not at the workers' cut 20 s later: the
    # caller heard the thank-you (about 7 s) and the service hung up.
    assert int(recorded["value"].rstrip("s")) <= 8, recorded
    assert ended["t"] - media["t"] < 15.0 + 1.0 + 12.0, caller.events


async def prompts_warm(service: Service) -> None:
    """Wait until ``serve`` has every static prompt cached (``/readyz`` warms nothing): a
    prompt not yet cached would be rendered on demand, behind that queue."""
    assert service.session is not None
    loop = asyncio.get_running_loop()
    end = loop.time() + PROMPTS_WARM_S
    while True:
        async with service.session.get(service.base + "/readyz") as resp:
            ready = await resp.json()
        if resp.status == 200 and not ready["warming"]:
            return
        if loop.time() > end:
            pytest.fail(f"prompts not cached in {PROMPTS_WARM_S} s: {ready}\n{service.log_tail()}")
        await asyncio.sleep(0.5)


async def logged(service: Service, text: str, deadline_s: float) -> None:
    """Wait until ``serve`` has logged ``text``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while text not in service.log_path.read_text(errors="replace"):
        if loop.time() > end:
            pytest.fail(f"serve did not log {text!r} in {deadline_s} s:\n{service.log_tail()}")
        await asyncio.sleep(0.1)


@pytest.mark.timeout(300)  # a cold prompt cache takes most of this; warm runs take a minute
async def test_a_second_sigterm_ends_the_drain_at_once(
    redis_server: RedisServer, tmp_path: Path, openapi_responses: OpenApiCollector
) -> None:
    """An operator who presses Ctrl-C twice, or a supervisor that signals again, does not wait
    out CLINIC_CALL_DRAIN_S (here 600 s): the caller is told now, by the same path as at
    the drain's end, and the stop goes on from there (serve exits 0)."""
    heard = tmp_path / "heard.wav"
    data = _data_dir(tmp_path, "data")
    env = serve_env(data, {"CLINIC_REDIS_URL": redis_server.url, "CLINIC_CALL_DRAIN_S": "600"})
    loop = asyncio.get_running_loop()
    async with serve("serve", env, tmp_path, openapi_responses) as service, phones() as started:
        proc = service.proc
        assert proc is not None
        caller, references = await caller_in_main_menu(service, env, started, heard)
        try:
            proc.send_signal(signal.SIGTERM)
            await logged(service, "may go on for up to 600 s", 10.0)
            await asyncio.sleep(2.0)
            assert caller.find("ended") is None, caller.events  # the drain holds the call up
            proc.send_signal(signal.SIGTERM)
            again = loop.time()
            await caller.wait_for("ended", 40, leg="main")
            told_s = loop.time() - again
            await caller.finish(10)
            try:
                async with asyncio.timeout(30):
                    code = await proc.wait()
            except TimeoutError:
                pytest.fail(f"serve still ran 30 s after the call ended:\n{service.log_tail()}")
        except BaseException:
            # A serve still draining would fail the cleanup too ("ignored SIGTERM") and hide
            # the failure above.
            proc.kill()
            await proc.wait()
            raise
        log_text = service.log_path.read_text(errors="replace")
    assert code == 0, log_text[-3000:]
    assert log_text.count("drain cut short by a second signal") == 1, log_text[-3000:]
    # Told now, with the notice (about 9 s) played through: not hung up on at the signal,
    # and not after the 600 s drain.
    assert 5.0 < told_s < 30.0, (told_s, caller.events)
    assert_heard_closing(heard, references)
    (record,) = await stored_calls(redis_server.url, env["CLINIC_SECRET"].encode())
    assert record["outcome"] == "cut_shutdown", record


async def live_urgency(secret: bytes, live: Path) -> str | None:
    """The urgency the live record at ``live`` holds (None: none yet, or no file)."""
    try:
        text = await asyncio.to_thread(live.read_text)
    except FileNotFoundError:
        return None
    unused: Any = None  # opening a sealed record needs no Redis
    call_id = live.name.removesuffix(".sealed")
    triage = CallStore(unused, secret, 30).open(call_id, text)["triage"]
    return None if triage is None else str(triage["urgency"])


@pytest.mark.timeout(300)  # a cold prompt cache takes most of this; warm runs take a minute
async def test_a_call_cut_by_a_killed_serve_is_saved_with_its_triage_at_the_next_start(
    redis_server: RedisServer, tmp_path: Path, openapi_responses: OpenApiCollector
) -> None:
    """serve killed (kill -9) once the triage found the caller urgent: the next start saves
    the call as cut_service_lost with its path, values and urgency, and an end later than its
    start, so staff call this patient back first. (The live record held the numbers, the
    flow and the start, with the start as the end.) The call counts in
    clinic_calls_total{outcome="cut_service_lost"}, in every scrape whichever HTTP process
    answers it (it was not counted at all)."""
    data = _data_dir(tmp_path, "data")
    env = serve_env(data, {"CLINIC_REDIS_URL": redis_server.url})
    secret = env["CLINIC_SECRET"].encode()
    loop = asyncio.get_running_loop()
    async with (
        serve("serve", env, tmp_path, openapi_responses, exit_code=-signal.SIGKILL) as service,
        phones() as started,
    ):
        proc = service.proc
        assert proc is not None
        await prompts_warm(service)
        # The English triage: "yourself" (1), then "yes" (1) to serious difficulty breathing.
        caller = await Phone.start(
            "caller", "--call", f"sip:6001@{service.sip_addr}", "--answers", "1,1",
            "--timeout", "90",
        )  # fmt: skip
        started.append(caller)
        await caller.wait_for("media", CALL_S)
        live = data / LIVE_FOLDER
        end = loop.time() + CALL_S
        try:
            while True:
                files = list(live.glob("*.sealed"))
                urgency = None if len(files) != 1 else await live_urgency(secret, files[0])
                if urgency == "U1":
                    break
                if loop.time() > end:
                    pytest.fail(f"no urgent live record in {CALL_S} s: {caller.events}")
                await asyncio.sleep(0.1)
        finally:
            killed_at = time.time()
            proc.kill()  # kill -9: no drain, no record saved, no live record deleted
            await proc.wait()
        first_log = service.log_path.read_text(errors="replace")
    again = {**env, "CLINIC_HTTP_WORKERS": "2"}
    async with serve("again", again, tmp_path, openapi_responses) as service:
        end = loop.time() + 30.0
        while not (calls := await stored_calls(redis_server.url, secret)):
            if loop.time() > end:
                pytest.fail(f"the cut call was not saved at start:\n{service.log_tail()}")
            await asyncio.sleep(0.2)
        counted = 'clinic_calls_total{outcome="cut_service_lost"} 1\n'

        async def scraped() -> bool:
            return counted in (await _fresh_connection_request(service, "GET", "/metrics"))[1]

        await _until("the cut call in /metrics", scraped)
        assert service.proc is not None and len(_worker_pids(service.proc.pid)) == 1
        for _ in range(6):  # fresh connections: serve and its HTTP worker each answer some
            _, text = await _fresh_connection_request(service, "GET", "/metrics")
            assert counted in text, text
        second_log = service.log_path.read_text(errors="replace")
    (record,) = calls
    assert record["outcome"] == LOST_OUTCOME, record
    assert record["flow"] == "triage" and record["triage"]["urgency"] == "U1", record
    assert "difficulty breathing" in record["triage"]["reasons"], record
    assert record["values"]["breathing"] == "yes", record
    steps = [(p["node"], p["input"], p["value"]) for p in record["path"]]
    assert ("breathing", "digit", "1") in steps, steps
    started_at = datetime.fromisoformat(record["started_at"]).timestamp()
    ended_at = datetime.fromisoformat(record["ended_at"]).timestamp()
    # The intro and two questions took well over 10 s; the end is the last live write.
    assert started_at + 10 < ended_at <= killed_at + 0.01, (started_at, ended_at, killed_at)
    assert not list((data / LIVE_FOLDER).glob("*.sealed"))
    for log_text in (first_log, second_log):
        assert "difficulty breathing" not in log_text, "a triage reason reached a log line"
