"""``serve`` stopped as systemd's default ``KillMode=control-group`` stops a unit: SIGTERM to
every process of it at once, ``serve``, its SIP and HTTP workers and its embedded Redis.

What happens (README, "Under systemd", which is why its unit says ``KillMode=mixed``): the
SIP worker takes its SIGTERM as a Shutdown and hangs its calls up at once, with a BYE but
without the closing notice that ``serve``'s drain would have played; ``serve``, still
draining, restarts it (and the embedded Redis, which stopped cleanly on its SIGTERM) and
stops them in turn; the call's record is saved, in Redis or on disk and replayed at the next
start, and ``serve`` exits 0. Before, the worker died of the signal: the caller got no BYE
(the call hung there), and the record said ``cut_worker_lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.integration.conftest import BASE_ENV, OpenApiCollector
from tests.integration.test_api_processes import _data_dir, _processes, serve
from tests.integration.test_ivr_stop import CALL_S, prompts_warm, stored_calls
from tests.peers.ivr_rig import NURSE_USER, ROOT, STAFF_USER, Phone, phones
from voice.ivr.journal import LIVE_FOLDER

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


def _children(parent: int) -> dict[int, list[bytes]]:
    return {pid: argv for pid, ppid, argv in _processes() if ppid == parent}


@pytest.mark.timeout(300)  # a cold prompt cache takes most of this; warm runs take a minute
async def test_sigterm_to_the_whole_control_group_ends_the_call_with_a_bye_and_loses_nothing(
    tmp_path: Path, openapi_responses: OpenApiCollector
) -> None:
    data = _data_dir(tmp_path, "data")
    env = {
        **BASE_ENV,  # no CLINIC_REDIS_URL: the embedded Redis, in the unit as systemd sees it
        "CLINIC_DATA_DIR": str(data),
        "CLINIC_HTTP_WORKERS": "2",
        "CLINIC_NURSE_URI": f"sip:{NURSE_USER}@127.0.0.1:{free_port()}",
        "CLINIC_STAFF_URI": f"sip:{STAFF_USER}@127.0.0.1:{free_port()}",
        "CLINIC_FLOWS_DIR": str(ROOT / "ivr_flows"),
    }
    async with serve("serve", env, tmp_path, openapi_responses) as service, phones() as started:
        proc = service.proc
        assert proc is not None
        await prompts_warm(service)
        # The main menu, and a caller who says and presses nothing (it repeats itself).
        caller = await Phone.start(
            "caller", "--call", f"sip:6000@{service.sip_addr}", "--timeout", "120"
        )
        started.append(caller)
        await caller.wait_for("media", CALL_S)
        await asyncio.sleep(1.0)
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
            # Hung up now (the worker's own stop), not after the 20 s drain, and with a BYE:
            # before, the worker died of the signal and the phone was never told.
            await caller.wait_for("ended", 10, leg="main")
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
    # The worker's exit 0 is seen during the drain (restarted: "stopped while the service
    # ran") or, once its call's end ended the drain, at the stop ("as asked"): never a
    # death by the signal, which the stop would count as a defect.
    assert re.search(
        r"SIP worker 0 \(pid \d+\) (stopped while the service ran|exited with status 0 at "
        r"the stop)",
        log_text,
    ), log_text[-3000:]
    assert "exited with status -" not in log_text and "died (exit" not in log_text
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
