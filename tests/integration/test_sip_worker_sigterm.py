"""A SIP worker sent SIGTERM directly (systemd's control-group stop, ``pkill``, an operator,
the kernel's parent-death signal) stops as its stdin's Shutdown stops it: each call hung up
on the wire (BYE when answered, CANCEL while ringing), reported ended, and exit 0. Here the
pool has no clinic line to close the calls first (serve's is tested in
tests/integration/test_serve_worker_sigterm.py): it sends the Shutdown the worker asks for
(StopAsked) at once; with ``serve`` gone the worker does not wait for one.

Before, the worker had no SIGTERM handler and died of it (-15): the far ends got nothing
(an answered call hung there until its own timers gave up), the pool ended the calls as
``worker_lost``, and ``serve`` counted the exit as a worker that did not stop as asked.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from clinic_voice.metrics import Metrics
from clinic_voice.wiring import new_sip_pool
from sip_config.child_process import setpriv_prefix
from sip_config.clock import SystemClock
from tests.conftest import sip_settings
from tests.integration.test_sip_pool import CALLER, sipp_uas
from voice.sip.outcome import CallOutcome
from voice.sip.pool import CallHandle, OutboundCall
from voice.sip.protocol import CallEvent, CallState

pytestmark = pytest.mark.integration


async def _until_state(handle: CallHandle, state: CallState, within: float) -> None:
    async with asyncio.timeout(within):
        while True:
            event = await handle.next_event()
            if isinstance(event, CallEvent) and event.state is state:
                return
            assert not (isinstance(event, CallEvent) and event.state is CallState.ENDED), event


async def test_a_worker_sent_sigterm_hangs_up_its_calls_and_exits_0(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="voice.sip.pool")
    pool = new_sip_pool(sip_settings(1), Metrics(), SystemClock())  # as serve makes it
    await pool.start()
    try:
        async with (
            sipp_uas("sipp_uas_answer_inactive.xml", tmp_path) as answering,
            sipp_uas("sipp_uas_ring.xml", tmp_path) as ringing,
        ):
            answered = await pool.place_call(OutboundCall(answering.uri(), CALLER, flash=False))
            await _until_state(answered, CallState.ANSWERED, 10)
            rings = await pool.place_call(
                OutboundCall(ringing.uri(), CALLER, flash=True, ring_s=60)
            )
            await _until_state(rings, CallState.RINGING, 10)
            assert answered._worker is rings._worker
            worker = answered._worker.process
            assert worker is not None
            os.kill(worker.pid, signal.SIGTERM)
            async with asyncio.timeout(5):
                status = await worker.wait()
            assert status == 0, f"the worker died of the signal (status {status})"
            # The far ends were told: the answering sipp's scenario ends with the BYE; the
            # ringing one got its CANCEL (its 487 is not ACKed: the worker stops as at the
            # pool's Shutdown, which ends pjsua once the calls are over, not their
            # transactions; the far end gives the 487 up after 32 s, RFC 3261 17.2.1).
            assert await answering.finish() == 0, "the answered call got no BYE"
            assert answering.received("BYE")
            assert ringing.received("CANCEL"), "the ringing call got no CANCEL"
            # Reported ended by the worker before its exit, not lost with it, and as the
            # service's cut (a clinic-line record says cut_shutdown: someone calls back), not
            # as the far end's hang-up.
            assert await answered.wait_ended(3) is not CallOutcome.WORKER_LOST
            assert await rings.wait_ended(3) is not CallOutcome.WORKER_LOST
            assert answered.cut == rings.cut == "shutdown", (answered.cut, rings.cut)
            told = [r.getMessage() for r in caplog.records if "was sent SIGTERM" in r.getMessage()]
            assert told and "its 2 call(s) are closed" in told[0], told
            # Restarted as a dead one is, and says why it stopped.
            async with asyncio.timeout(15):
                while not (pool.stats()["restarts"] == 1 and pool.ready()):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            said = [r.getMessage() for r in caplog.records if "stopped while" in r.getMessage()]
            assert said and "0 call(s) lost" in said[0], said
    finally:
        await pool.stop()


PARENT = """
import subprocess, sys, time
worker = subprocess.Popen(
    [*sys.argv[1:], sys.executable, "-m", "voice.sip.worker", "--log-level", "INFO",
     "--stop-wait-s", "60"],
    stdin=0, stdout=subprocess.DEVNULL, stderr=2,
)
print(worker.pid, flush=True)
time.sleep(600)
"""


async def test_a_worker_whose_serve_is_killed_stops_on_its_parent_death_signal(
    tmp_path: Path,
) -> None:
    """serve killed -9: the kernel sends each worker SIGTERM (``setpriv --pdeathsig``, as
    serve starts them), which now stops it as a Shutdown does, still at once: it waits for
    no Shutdown from a serve that is gone (its parent changed), whatever its --stop-wait-s.
    Its stdin is held open here, so the signal alone ends it (in serve its end of file comes
    too)."""
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is missing"
    stdin_r, stdin_w = os.pipe()
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log_file:
        parent = await asyncio.create_subprocess_exec(
            sys.executable, "-c", PARENT, *setpriv_prefix(setpriv, None),
            stdin=stdin_r, stdout=asyncio.subprocess.PIPE, stderr=log_file,
        )  # fmt: skip
    os.close(stdin_r)
    try:
        assert parent.stdout is not None
        worker = int(await asyncio.wait_for(parent.stdout.readline(), 10))
        async with asyncio.timeout(15):
            while "pjsua up" not in log_path.read_text(errors="replace"):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        parent.kill()
        await parent.wait()
        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        while _alive(worker):
            assert loop.time() - killed_at < 3, "the worker outlived serve by 3 s"
            await asyncio.sleep(0.02)
    finally:
        os.close(stdin_w)
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
    assert "SIGTERM: hanging up the calls and stopping" in log_path.read_text(errors="replace")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended and not yet reaped by init, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
