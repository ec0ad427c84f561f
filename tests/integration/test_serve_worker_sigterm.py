"""A SIP worker sent SIGTERM on its own (``pkill -f voice.sip.worker``, an operator) while
``serve`` runs: its callers get what a stop of ``serve`` gives them, not a cut.

The worker tells ``serve`` it was asked to stop (StopAsked) and waits for its Shutdown;
``serve`` runs the clinic line's drain for that worker's calls alone (``CLINIC_CALL_DRAIN_S``,
then the closing notice with the emergency number; an urgent caller put through to the
nurse), then sends it its Shutdown: the worker exits 0 and is started again (a worker short
refuses callers), and ``serve``'s own stop later exits 0. Before, the worker hung its calls
up at once with a BYE: the caller heard the line go dead mid-menu, told nothing.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

import pytest

from tests.conftest import RedisServer, free_port
from tests.integration.conftest import BASE_ENV, OpenApiCollector
from tests.integration.test_api_processes import Service, _data_dir, _processes, serve
from tests.integration.test_ivr_stop import (
    CALL_S,
    assert_heard_closing,
    caller_in_main_menu,
    live_urgency,
    logged,
    prompts_warm,
    serve_env,
    stored_calls,
)
from tests.peers.ivr_rig import NURSE_USER, Phone, phones
from voice.ivr.journal import LIVE_FOLDER

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

DRAIN_S = 3.0


def drained(redis_server: RedisServer) -> dict[str, str]:
    """The service's Redis, and the drain of this module."""
    return {"CLINIC_REDIS_URL": redis_server.url, "CLINIC_CALL_DRAIN_S": f"{DRAIN_S:g}"}


def sip_worker_pids(serve_pid: int) -> list[int]:
    """The SIP workers ``serve`` runs now."""
    return [
        pid
        for pid, ppid, argv in _processes()
        if ppid == serve_pid and any(b"voice.sip.worker" in arg for arg in argv)
    ]


@pytest.mark.timeout(300)  # a cold prompt cache takes most of this; warm runs take a minute
async def test_a_worker_sent_sigterm_alone_gives_its_caller_the_closing_notice(
    redis_server: RedisServer, tmp_path: Path, openapi_responses: OpenApiCollector
) -> None:
    heard = tmp_path / "heard.wav"
    env = serve_env(_data_dir(tmp_path, "data"), drained(redis_server))
    loop = asyncio.get_running_loop()
    async with serve("serve", env, tmp_path, openapi_responses) as service, phones() as started:
        proc = service.proc
        assert proc is not None
        caller, references = await caller_in_main_menu(service, env, started, heard)
        (worker,) = sip_worker_pids(proc.pid)  # CLINIC_SIP_WORKERS=1: the call is on it
        os.kill(worker, signal.SIGTERM)  # as `pkill -f voice.sip.worker`
        signalled = loop.time()
        await logged(service, "was sent SIGTERM (not by serve)", 10.0)
        await asyncio.sleep(DRAIN_S / 2)
        assert caller.find("ended", leg="main") is None, (
            caller.events
        )  # the drain holds the call up
        await caller.wait_for("ended", 40, leg="main")
        told_s = loop.time() - signalled
        await caller.finish(10)
        # Stopped by its Shutdown (exit 0) and started again: one worker, a new one.
        end = loop.time() + 20.0
        while True:
            now = sip_worker_pids(proc.pid)
            text = service.log_path.read_text(errors="replace")
            if now and worker not in now and "stopped while the service ran" in text:
                break
            if loop.time() > end:
                pytest.fail(f"the worker was not started again:\n{service.log_tail()}")
            await asyncio.sleep(0.2)
        log_text = service.log_path.read_text(errors="replace")
    # serve's own stop then went as asked (serve() checks its exit 0).
    assert re.search(r"SIP worker 0 \(pid \d+\) stopped while the service ran \(exit 0", log_text)
    assert "exited with status -" not in log_text and "died (exit" not in log_text
    assert "hanging up the calls and stopping" not in log_text, "it hung up by itself"
    # Told after the drain, with the notice (about 9 s) played through: not hung up on at
    # the signal (before: within a second).
    assert DRAIN_S + 5.0 < told_s < DRAIN_S + 30.0, (told_s, caller.events)
    assert_heard_closing(heard, references)
    (record,) = await stored_calls(redis_server.url, env["CLINIC_SECRET"].encode())
    assert record["outcome"] == "cut_shutdown", record


@pytest.mark.timeout(300)  # a cold prompt cache takes most of this; warm runs take a minute
async def test_an_urgent_caller_on_a_worker_sent_sigterm_alone_is_put_through_to_the_nurse(
    redis_server: RedisServer, tmp_path: Path, openapi_responses: OpenApiCollector
) -> None:
    """The safety rule at serve's stop holds for the calls of one worker asked to stop: a
    caller the triage made urgent (U2: no answer to a danger sign) is put through to the
    nurse at the drain's end, not told to call again later nor hung up on."""
    data = _data_dir(tmp_path, "data")
    nurse_port = free_port()
    env = serve_env(data, drained(redis_server), nurse_port=nurse_port)
    secret = env["CLINIC_SECRET"].encode()
    loop = asyncio.get_running_loop()
    async with serve("serve", env, tmp_path, openapi_responses) as service, phones() as started:
        proc = service.proc
        assert proc is not None
        await prompts_warm(service)
        nurse = await Phone.start("nurse", "--port", str(nurse_port), "--answer", "--duration", "1")
        started.append(nurse)
        # The English triage: "yourself" (1), then nothing to the danger sign (serious
        # difficulty breathing): an unclear answer to it makes the call U2, asked again.
        caller = await Phone.start(
            "caller", "--call", f"sip:6001@{service.sip_addr}", "--answers", "1",
            "--timeout", "90",
        )  # fmt: skip
        started.append(caller)
        await caller.wait_for("media", CALL_S)
        live = data / LIVE_FOLDER
        end = loop.time() + CALL_S
        while True:
            files = list(live.glob("*.sealed"))
            urgency = None if len(files) != 1 else await live_urgency(secret, files[0])
            if urgency == "U2":
                break
            if loop.time() > end:
                pytest.fail(f"no U2 live record in {CALL_S} s: {caller.events}")
            await asyncio.sleep(0.1)
        (worker,) = sip_worker_pids(proc.pid)  # CLINIC_SIP_WORKERS=1: the call is on it
        os.kill(worker, signal.SIGTERM)  # as `pkill -f voice.sip.worker`
        await logged(service, "was sent SIGTERM (not by serve)", 10.0)
        incoming = await nurse.wait_for("incoming", 40)
        await caller.finish(CALL_S)
        await nurse.finish(10)
        await logged(service, "stopped while the service ran", 20.0)
        log_text = service.log_path.read_text(errors="replace")
    assert "hanging up the calls and stopping" not in log_text, "it hung up by itself"
    xfer = caller.find("transfer_request")
    assert xfer is not None, f"no REFER reached the caller: {caller.events}"
    assert f"sip:{NURSE_USER}@127.0.0.1:{nurse_port}" in xfer["to"]
    assert caller.find("confirmed", leg="xfer") is not None, "the nurse never answered"
    assert incoming["headers"].get("X-Clinic-Urgency") == "U2", incoming
    (record,) = await stored_calls(redis_server.url, secret)
    assert record["triage"]["urgency"] == "U2", record["triage"]
    # Put through by the line's closing (not by the question's no-input limit).
    assert "line closing" in record["triage"]["reasons"], record["triage"]
    assert record["transfer_target"] == f"sip:{NURSE_USER}@127.0.0.1:{nurse_port}", record
    assert record["outcome"].endswith("transfer_nurse"), record


async def _readyz(service: Service) -> tuple[int, dict[str, bool]]:
    assert service.session is not None
    async with service.session.get(service.base + "/readyz") as resp:
        body = await resp.json(content_type=None)
        return resp.status, dict(body.get("checks") or {})


@pytest.mark.timeout(120)
async def test_readyz_stays_ready_while_one_of_two_workers_restarts(
    redis_server: RedisServer, tmp_path: Path, openapi_responses: OpenApiCollector
) -> None:
    """One SIP worker sent SIGTERM (its drain, its exit, its restart: up to
    ``CLINIC_CALL_DRAIN_S`` + 20 s) leaves the other taking calls: /readyz stays 200, so a
    balancer keeps the verification API. With both leaving, nothing takes a call: 503
    (``sip_workers`` false), then 200 again once they are back. Before, one worker's
    restart made /readyz 503 for all of it."""
    env = {
        **BASE_ENV,
        "CLINIC_REDIS_URL": redis_server.url,
        "CLINIC_DATA_DIR": str(_data_dir(tmp_path, "data")),
        "CLINIC_CALL_DRAIN_S": f"{DRAIN_S:g}",
    }
    loop = asyncio.get_running_loop()
    async with serve("serve", env, tmp_path, openapi_responses, sip_workers=2) as service:
        proc = service.proc
        assert proc is not None
        assert (await _readyz(service))[0] == 200
        first = sorted(sip_worker_pids(proc.pid))
        assert len(first) == 2, first

        async def watch_until_restarted(gone: list[int]) -> list[tuple[int, dict[str, bool]]]:
            """Every /readyz answer until ``gone`` were all replaced and both take calls."""
            answers = []
            end = loop.time() + 40.0
            while True:
                answers.append(await _readyz(service))
                now = sip_worker_pids(proc.pid)
                back = len(now) == 2 and not set(gone) & set(now)
                if back and answers[-1][0] == 200:
                    return answers
                if loop.time() > end:
                    pytest.fail(f"not restarted: {now} {answers[-3:]}\n{service.log_tail()}")
                await asyncio.sleep(0.05)

        os.kill(first[0], signal.SIGTERM)  # as an operator's kill of one worker
        answers = await watch_until_restarted(first[:1])
        not_ready = [a for a in answers if a[0] != 200]
        assert not not_ready, (not_ready[:3], len(answers))
        second = sorted(sip_worker_pids(proc.pid))
        for pid in second:
            os.kill(pid, signal.SIGTERM)  # `pkill -f voice.sip.worker`: none left
        answers = await watch_until_restarted(second)
        gap = [c for s, c in answers if s == 503]
        assert gap and all(c.get("sip_workers") is False for c in gap), answers[:5]
