"""Why the service, not the caller, ended a call: the cut a call handle reports."""

from __future__ import annotations

import pytest

from sip_config.clock import FakeClock
from tests.conftest import sip_settings
from voice.sip.outcome import CallOutcome
from voice.sip.pool import CallHandle, SipPool
from voice.sip.protocol import CallEvent, CallState


@pytest.mark.parametrize(
    ("running", "outcome", "cut"),
    [
        (True, CallOutcome.WORKER_LOST, "worker_lost"),  # its SIP worker died
        # At the stop a worker may exit before it reported its calls' ends: serve stopped,
        # no worker died (a real stop recorded cut_worker_lost for every such call).
        (False, CallOutcome.WORKER_LOST, "shutdown"),
        (False, CallOutcome.COMPLETED, "shutdown"),
        (True, CallOutcome.COMPLETED, ""),  # hung up by one of the two parties
    ],
)
def test_the_cut_of_a_call_names_the_stop_before_a_lost_worker(
    running: bool, outcome: CallOutcome, cut: str
) -> None:
    pool = SipPool(sip_settings(1), clock=FakeClock())
    pool._running = running
    handle = CallHandle(pool, pool._workers[0], "in-1")
    handle._deliver(CallEvent("in-1", CallState.ENDED, 0, outcome, 0.0))
    assert handle.ended and handle.cut == cut
