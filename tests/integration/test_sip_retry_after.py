"""Every 503 to a caller says when to try again: ``Retry-After`` (RFC 3261 sections 20.33 and
21.5.4), on each way it is sent, against the real front and real SIP workers on loopback.

A 503 without it left a caller's phone, or a PBX in front, to guess: retry at once (another
503) or give this server up. The values, and why, are ``voice.sip.pool.STOP_TAIL_S``'s: the
rest of the stop once the service stops (the front, and a worker the pool tells to refuse);
the longest restart backoff while no worker is up. A worker's own 503s at its stop are
``test_sip_cancel_stop.py``'s.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal

import pytest

from sip_config.clock import SystemClock
from tests.conftest import sip_settings
from tests.integration.test_sip_cancel_stop import invite_answers
from tests.integration.test_sip_inbound import front_as_serve_wires
from voice.sip import message
from voice.sip.pool import STOP_TAIL_S, SipPool

pytestmark = pytest.mark.integration

CLOSE_S = 30.0  # serve's: CLINIC_CALL_DRAIN_S and the closing notice


def _final(answers: list[message.SipMessage]) -> tuple[int, str | None]:
    assert answers, "no answer to the INVITE"
    return answers[-1].status, answers[-1].get("Retry-After")


async def test_at_the_stop_the_front_and_a_worker_say_retry_after_the_stop() -> None:
    pool = SipPool(sip_settings(1), clock=SystemClock(), close_s=CLOSE_S)
    async with front_as_serve_wires(pool) as front:
        pool.refuse_new_calls()  # the stop's first moment (serve's begin_close)
        at_front = await invite_answers(front.address.port, within=3)
        # Straight to the worker (a PBX's trunk, a caller redirected just before): the pool
        # has it refused with the same 503.
        [worker] = pool.worker_addresses()
        at_worker = await invite_answers(worker.port, within=3)
    rest_of_stop = str(math.ceil(CLOSE_S + STOP_TAIL_S))  # 41 s
    assert _final(at_front) == (503, rest_of_stop), at_front
    assert _final(at_worker) == (503, rest_of_stop), at_worker


async def test_while_no_worker_is_up_the_front_says_retry_after_a_restart() -> None:
    pool = SipPool(sip_settings(1), clock=SystemClock(), close_s=CLOSE_S)
    async with front_as_serve_wires(pool) as front:
        [pid] = pool.worker_pids()
        os.kill(pid, signal.SIGKILL)  # restarted after a backoff (0.2 s), up a second later
        for _ in range(500):  # its exit seen (end of file): down until its restart is up
            if not pool.workers_up():
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the killed worker was still up after 5 s")
        at_front = await invite_answers(front.address.port, within=3)
    assert _final(at_front) == (503, "5"), at_front  # the longest restart backoff
