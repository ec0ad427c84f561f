"""``serve`` stopped as systemd's default ``KillMode=control-group`` stops a unit: SIGTERM to
every process of it at once, ``serve``, its SIP and HTTP workers and its embedded Redis.

What happens (README, "Under systemd", which is why its unit says ``KillMode=mixed``
all the same): the SIP worker tells ``serve`` it was asked to stop and waits for its
Shutdown, so its caller gets ``serve``'s drain and closing notice as at a stop of ``serve``
alone; ``serve`` restarts the embedded Redis (which stopped cleanly on its SIGTERM) and
stops it in turn; the call's record is saved, in Redis or on disk and replayed at the next
start, and ``serve`` exits 0. Before, the worker hung its call up at once (a BYE, no
notice); before that, it died of the signal: the caller got no BYE (the call hung there),
and the record said ``cut_worker_lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from pathlib import Path

import pytest

from tests.integration.conftest import OpenApiCollector
from tests.integration.test_api_processes import _data_dir, _processes, serve
from tests.integration.test_ivr_stop import (
    assert_heard_closing,
    caller_in_main_menu,
    serve_env,
    stored_calls,
)
from tests.peers.ivr_rig import phones
from voice.ivr.journal import LIVE_FOLDER

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


def _children(parent: int) -> dict[int, list[bytes]]:
    return {pid: argv for pid, ppid, argv in _processes() if ppid == parent}


@pytest.mark.timeout(300)  # a cold prompt cache takes most of this; warm runs take a minute
async def test_sigterm_to_the_whole_control_group_drains_the_call_and_loses_nothing(
    tmp_path: Path, openapi_responses: OpenApiCollector
) -> None:
    heard = tmp_path / "heard.wav"
    data = _data_dir(tmp_path, "data")
    # No CLINIC_REDIS_URL: the embedded Redis, in the unit as systemd sees it.
    env = serve_env(data, {"CLINIC_HTTP_WORKERS": "2", "CLINIC_CALL_DRAIN_S": "2"})
    loop = asyncio.get_running_loop()
    async with serve("serve", env, tmp_path, openapi_responses) as service, phones() as started:
        proc = service.proc
        assert proc is not None
        caller, references = await caller_in_main_menu(service, env, started, heard)
        children = _children(proc.pid)
        kinds = {
            kind
            for argv in children.values()
            for kind, mark in (("sip", b"voice.sip.worker"), ("http", b"http-worker"))
            if mark in argv
        } | {"redis" for argv in children.values() if argv and b"redis-server" in argv[0]}
        assert kinds == {"sip", "http", "redis"}, children
        try:
            for pid in (proc.pid, *children):  # as systemd's control-group stop: all at once
                os.kill(pid, signal.SIGTERM)
            signalled = loop.time()
            # After the drain and the notice (serve's, which the worker waited for), with a
            # BYE: before, the worker hung up at once, and before that it died of the signal
            # and the phone was never told.
            await caller.wait_for("ended", 40, leg="main")
            told_s = loop.time() - signalled
            await caller.finish(10)
            async with asyncio.timeout(90):
                code = await proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        log_text = service.log_path.read_text(errors="replace")
    assert code == 0, log_text[-3000:]
    # The worker's exit 0 is at the stop ("as asked": its Shutdown), or at its own Shutdown
    # once its call was closed (when its StopAsked came before serve's drain began; not
    # restarted, the service stops): never a death by the signal, nor its own hang-up.
    assert re.search(
        r"SIP worker 0 \(pid \d+\) (stopped on a SIGTERM not from serve as the service "
        r"stops \(exit 0\): not restarted|exited with status 0 at the stop)",
        log_text,
    ), log_text[-3000:]
    # A SIP worker's: an HTTP worker that the two SIGTERMs (systemd's, then serve's) end by
    # the signal exits as asked (http_workers.as_asked: INFO, serve exits 0), and failed this
    # test now and then ("HTTP worker 1 (pid ...) exited with status -15 at the stop").
    assert not re.search(r"SIP worker \d+ \(pid \d+\) exited with status -", log_text)
    assert "died (exit" not in log_text
    assert "hanging up the calls and stopping" not in log_text, "the worker hung up by itself"
    # Told after the drain, with the notice (about 9 s) played through: as at serve's stop.
    assert 2.0 + 5.0 < told_s < 2.0 + 30.0, (told_s, caller.events)
    assert_heard_closing(heard, references)
    # Nothing recorded was lost: the call's record is in Redis once serve starts again (saved
    # then, or replayed from the disk), and nothing waits on disk any more.
    secret = env["CLINIC_SECRET"].encode()
    async with serve("again", env, tmp_path, openapi_responses):
        loop = asyncio.get_running_loop()
        end = loop.time() + 30.0
        url = f"unix://{data / 'redis' / 'redis.sock'}"
        while not (calls := await stored_calls(url, secret)):
            if loop.time() > end:
                pytest.fail("the call's record was lost")
            await asyncio.sleep(0.2)
    (record,) = calls
    # The service cut it (someone calls back), not the caller: before, cut_worker_lost.
    assert record["outcome"] == "cut_shutdown", record
    assert not list((data / LIVE_FOLDER).glob("*.sealed"))
