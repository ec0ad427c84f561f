"""The clinic line with a caller who puts it on hold while a question listens: the whole
service (SIP front, pjsua workers, sessions, Redis) and sipp as the caller on loopback.

The flow here asks one keypad question ("Press 1.", 4 s timeout, one noinput ends the call
at once with a BYE). sipp holds the call 4 s after the answer, when the prompt has ended and
the question listens, and takes it off hold 4 s later; it says and presses nothing. The
question's timeout must not run during the hold (the service's BYE then came while the
caller was away, before the hold's end), and runs in full once the caller is back. A caller
who holds and never comes back is hung up at the hold's limit (voice/ivr/hold_limit.py, made
short here), recorded as ``cut_held_too_long``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_sip_inbound import HOLDS, sipp_uac
from tests.integration.test_sip_pool import trace_wire
from tests.peers.ivr_rig import ClinicLine, clinic_line_fixture
from voice.ivr import hold_limit

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

TIMEOUT_S = 4.0
FLOW = f"""\
id: main_menu
language: en
human: staff
start: ask
nodes:
  ask:
    ask:
      prompt: "Press 1."
      mode: keypad
      timeout_s: {TIMEOUT_S:g}
      max_noinput: 1
      on_fail: bye
      choices:
        - {{key: "1", label: to end the call, goto: bye}}
  bye:
    hangup: ""
    outcome: no_answer
"""


line = clinic_line_fixture(main_menu=FLOW)


@pytest.mark.parametrize("how", ["re-INVITE sendonly", "re-INVITE inactive", "UPDATE sendonly"])
async def test_a_hold_while_the_question_listens_does_not_count_against_its_timeout(
    line: ClinicLine, tmp_path: Path, how: str
) -> None:
    before = await line.call_ids()
    scenario, direction, c = HOLDS[how]
    keys = {"hold_dir": direction, "hold_c": c}
    worker = line.pool.worker_addresses()[0]
    code, text = await sipp_uac(worker, scenario, "6000", tmp_path, 40, keys=keys)
    wire = trace_wire(text)
    seen = [(round(w.at - wire[0].at, 1), w.msg.method or w.msg.status) for w in wire]
    # Before: the timeout ran out during the hold, and the BYE came while the caller was
    # away (sipp, pausing on hold, took it for an unexpected message and failed).
    assert code == 0, f"the call went wrong (a BYE during the hold?): {seen}"
    back = next(  # the 200 to the request that takes the call off hold (CSeq 3)
        w.at
        for w in wire
        if w.received and w.msg.status == 200 and (w.msg.get("CSeq") or "").startswith("3 ")
    )
    bye = next(w.at for w in wire if w.received and w.msg.method == "BYE")
    # The whole timeout after the hold's end: not the part left of it at the hold (the
    # prompt ends about 2 s after the answer, the hold begins at 4 s: about 2 s left).
    assert TIMEOUT_S - 0.3 <= bye - back <= TIMEOUT_S + 2.0, seen
    record = await line.new_record(before)
    assert record["outcome"] == "no_answer", record
    assert [s["input"] for s in record["path"] if s["node"] == "ask"] == ["", "noinput"], record


HOLD_MAX_S = 5.0  # the test's limit of one hold (5 minutes in the service)


@pytest.mark.parametrize("how", ["re-INVITE inactive", "re-INVITE sendonly"])
async def test_a_caller_who_holds_and_never_comes_back_is_hung_up_at_the_limit(
    line: ClinicLine, tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before, nothing limited a hold: the call kept its slot until the 30-minute call
    # limit, and sipp's wait for the BYE ran out (exit 1).
    monkeypatch.setattr(hold_limit, "HOLD_MAX_S", HOLD_MAX_S)
    before = await line.call_ids()
    _, direction, c = HOLDS[how]
    keys = {"hold_dir": direction, "hold_c": c}
    worker = line.pool.worker_addresses()[0]
    code, text = await sipp_uac(
        worker, "sipp_uac_hold_forever.xml", "6000", tmp_path, 40, keys=keys
    )
    wire = trace_wire(text)
    seen = [(round(w.at - wire[0].at, 1), w.msg.method or w.msg.status) for w in wire]
    assert code == 0, f"no BYE at the hold's limit: {seen}"
    on_hold = next(  # the 200 to the hold's re-INVITE (CSeq 2)
        w.at
        for w in wire
        if w.received and w.msg.status == 200 and (w.msg.get("CSeq") or "").startswith("2 ")
    )
    bye = next(w.at for w in wire if w.received and w.msg.method == "BYE")
    assert HOLD_MAX_S - 0.3 <= bye - on_hold <= HOLD_MAX_S + 2.0, seen
    record = await line.new_record(before)
    assert record["outcome"] == "cut_held_too_long", record
    assert [s["input"] for s in record["path"] if s["node"] == "ask"] == [""], record
