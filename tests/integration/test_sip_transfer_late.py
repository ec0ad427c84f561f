"""Transfers whose answer is late, missing or an earlier transfer's: real calls into the
clinic line whose caller's side is a sipp scenario (:mod:`tests.peers.sipp_refer`).

The cases (README "transfer"), each a call of its own, all placed at once so the module
takes about its longest call (~1 min) after the service's start:

- a REFER accepted (202) whose NOTIFYs never come: pjsip ends nothing by itself (the
  REFER's subscription lasts its Expires, 600 s), so the caller hears the ring tone until
  the bot's answer wait runs out, then the call-back words; the call ends as
  ``transfer_unconfirmed``. With a short Expires in the 202 and pjsip's refresh of it never
  answered, pjsip ends the subscription itself (its own 408, Timer F): a failed transfer,
  and, as for a REFER never answered (``refer_unanswered`` in
  ``test_sip_transfer_generated.py``), the end of the call: our BYE;
- an urgent caller (U1: 4, 1, 1) whose nurse transfer fails and whose staff desk transfer
  is tried next, while the nurse's subscription is still live and reports later: its late
  NOTIFY (``486``, terminated, no ``id``: as pjsip routes it, the nurse's) must not decide
  the staff desk's transfer, which its own 200 then answers (``transfer_staff``). Once
  after the nurse's phone said "486, active" (its later reports are not asked for), once
  after the bot gave up on a REFER not taken on in time whose 202 came later (the reports
  pjsua still makes of it are dropped by the worker);
- an urgent caller whose nurse REFER is answered 503 and whose staff desk's NOTIFY says
  ``SIP/2.0 503``: both failed, the emergency number, no message offer, our BYE.

The bot's waits (``TRANSFER_DEADLINE_S``, ``TRANSFER_ANSWER_S``: 60 s and 180 s) are
shortened for the module: with them a REFER never taken on meets pjsip's Timer F (32 s)
first, and a NOTIFY-less transfer would ring for three minutes. The service runs in this
process, so the patched values are the ones its sessions read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.integration.conftest import OpenApiCollector
from tests.integration.test_ivr_keypad import speech_after, tone_runs
from tests.peers.ivr_rig import ClinicLine, running_clinic_line
from tests.peers.rtp_peer import rtp_peer
from tests.peers.sipp_refer import Ending, Notify, ReferAnswer, play
from voice.ivr import session
from voice.media.pcm import Pcm
from voice.media.tones import BEEP, RINGBACK

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

DEADLINE_S = 6.0  # the bot's wait for a REFER to be taken on (TRANSFER_DEADLINE_S)
ANSWER_S = 40.0  # ... and for a transfer taken on to be answered (TRANSFER_ANSWER_S)
SIPP_S = 100  # one scenario at most
ACTIVE = "active;expires=60"
DONE = "terminated;reason=noresource"
URGENT = "411"  # 4 during the welcome, 1 (myself), 1 ("yes": serious difficulty breathing)


def frag(code: int, reason: str) -> str:
    return f"SIP/2.0 {code} {reason}"


@dataclass(frozen=True, slots=True)
class Case:
    """A way the caller's side answers, and what the README promises for it."""

    answer: ReferAnswer
    outcome: str
    transfers: tuple[str, ...]  # the values of the record's transfer steps
    beep: bool = False  # the message offer heard to its beep after the failure
    words: bool = True  # words after the ring tone (unless transferred)
    service_ends: bool = True  # the service hangs up (its BYE)


def _urgent(name: str, status: int, *, late: tuple[Notify, ...] = (), **kw: Any) -> ReferAnswer:
    return ReferAnswer(
        name, status, digits=URGENT, digit_gap_ms=2500, late=late, ending=Ending.SERVICE_BYE, **kw
    )


CASES = [
    # (a) Taken on, then silence: the ring tone for the whole answer wait, the call-back
    # words, our BYE.
    Case(
        ReferAnswer("no_notify", 202, ending=Ending.SERVICE_BYE),
        "transfer_unconfirmed",
        ("unconfirmed",),
    ),
    # (a) ... with pjsip's refresh of the subscription (5 s before the 202's Expires: 6)
    # never answered: its own 408 at Timer F (~33 s after the 202) ends the subscription,
    # a failed transfer, and, as for a REFER never answered (RFC 3261 12.2.1.2), the dialog:
    # our BYE follows at once, the offer cut short (whether any of it is heard is a race).
    Case(
        ReferAnswer(
            "no_notify_refresh_unanswered",
            202,
            headers=("Expires: 6",),
            ending=Ending.SERVICE_BYE,
        ),
        "transfer_failed",
        ("failed",),
        words=False,
    ),
    # (d) The nurse's phone: 100, then "486, active" (a failure, the subscription kept);
    # the staff desk's REFER taken on; the nurse's phone ends its subscription late
    # ("486, terminated", no id), then the staff desk answers (200).
    Case(
        _urgent(
            "urgent_nurse_late_486_during_staff",
            202,
            notifies=(
                Notify(frag(100, "Trying"), ACTIVE, 10),
                Notify(frag(486, "Busy Here"), ACTIVE, 11),
            ),
            late=(Notify(frag(486, "Busy Here"), DONE, 12, pause_ms=1000),),
            second=(Notify(frag(200, "OK"), DONE, 13, pause_ms=1000),),
        ),
        "transfer_staff",
        ("failed", "ok"),
    ),
    # (d) The nurse's REFER: 100 Trying, its 202 only after the bot gave up on it; its
    # subscription, live and reported by pjsua, ends with 486 during the staff desk's
    # transfer, which its own 200 then answers.
    Case(
        _urgent(
            "urgent_nurse_202_after_give_up_late_486",
            202,
            trying_ms=int(DEADLINE_S * 1000) + 3000,
            late=(Notify(frag(486, "Busy Here"), DONE, 10, pause_ms=1000),),
            second=(Notify(frag(200, "OK"), DONE, 11, pause_ms=1000),),
        ),
        "transfer_staff",
        ("failed", "ok"),
    ),
    # (c) The nurse's REFER refused 503; the staff desk's NOTIFY says 503: nobody reached.
    Case(
        _urgent(
            "urgent_refer_503_then_notify_503",
            503,
            second=(Notify(frag(503, "Service Unavailable"), DONE, 10),),
        ),
        "transfer_failed",
        ("failed", "failed"),
    ),
]


@dataclass(frozen=True, slots=True)
class Call:
    """One case's call, as it went."""

    code: int  # sipp's exit code
    trace: str  # the messages sipp traced
    heard: Pcm  # what the caller heard
    packets: int
    record: dict[str, Any]
    staff_uri: str


async def place(line: ClinicLine, answer: ReferAnswer, tmp: Path, worker: int) -> Call:
    """Play ``answer``'s scenario once against SIP worker ``worker``; the call as it went,
    its record found by the ``X-Clinic-Call`` its REFERs carry."""
    address = str(line.pool.worker_addresses()[worker])
    async with rtp_peer() as rtp:
        code, text = await play(
            answer, address, tmp, rtp.port, timeout_s=SIPP_S,
            bye_timeout_ms=(SIPP_S - 20) * 1000,
            # Not aborted by a message out of the plan: pjsip's refresh left unanswered,
            # retransmissions of a REFER answered late.
            options=("-default_behaviors", "pingreply"),
        )  # fmt: skip
        heard, packets = rtp.pcm(), rtp.packets
    ids = {
        line.split(":", 1)[1].strip()
        for line in text.splitlines()
        if line.lower().startswith(session.CALL_HEADER.lower() + ":")
    }
    assert len(ids) == 1, f"{answer.name}: no single call id in the REFERs: {ids} {text[-3000:]}"
    record = await record_of(line, ids.pop())
    return Call(code, text, heard, packets, record, line.settings.ivr.staff_uri)


async def record_of(line: ClinicLine, call_id: str, deadline_s: float = 15.0) -> dict[str, Any]:
    """The call's record once it is stored (after the call's end)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while True:
        answer = await line.get(f"/v1/calls/{call_id}")
        if answer.status == 200:
            record: dict[str, Any] = answer.json
            if record.get("outcome"):
                return record
        if loop.time() > end:
            pytest.fail(f"no record of call {call_id} {deadline_s} s after it: {answer.status}")
        await asyncio.sleep(0.2)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def calls(
    tmp_path_factory: pytest.TempPathFactory,
    openapi_responses: OpenApiCollector,
    ivr_prompt_cache: Path,
) -> AsyncIterator[dict[str, Call | BaseException]]:
    """Every case's call, placed at once (spread over the SIP workers)."""
    tmp = tmp_path_factory.mktemp("late")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(session, "TRANSFER_DEADLINE_S", DEADLINE_S)
        mp.setattr(session, "TRANSFER_ANSWER_S", ANSWER_S)
        async with running_clinic_line(
            tmp_path_factory.mktemp("clinic"), openapi_responses, prompt_cache=ivr_prompt_cache
        ) as line:
            pool = line.pool
            workers = len(pool.worker_addresses())
            done = await asyncio.gather(
                *(place(line, c.answer, tmp, i % workers) for i, c in enumerate(CASES)),
                return_exceptions=True,
            )
            yield {c.answer.name: d for c, d in zip(CASES, done, strict=True)}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.answer.name)
async def test_a_late_or_missing_transfer_answer_is_recorded_and_heard_as_promised(
    calls: dict[str, Call | BaseException], case: Case
) -> None:
    call = calls[case.answer.name]
    if isinstance(call, BaseException):
        raise call
    name, record = case.answer.name, call.record
    assert call.code == 0, f"sipp scenario {name} failed ({call.code}): {call.trace[-4000:]}"
    assert call.packets > 0, "the caller heard nothing at all"
    steps = [p["value"] for p in record["path"] if p["input"] == "transfer"]
    assert (record["outcome"], tuple(steps)) == (case.outcome, case.transfers), record
    # The staff desk: who took the call, or who was tried and never answered for (someone
    # calls back); none for a transfer that failed.
    taken = case.outcome in ("transfer_staff", "transfer_unconfirmed")
    assert record["transfer_target"] == (call.staff_uri if taken else None), record
    ring = tone_runs(call.heard, RINGBACK.hz)
    beeps = tone_runs(call.heard, BEEP.hz)
    assert ring, "no ring tone during the transfer"
    if case.words and case.outcome != "transfer_staff":
        # After the last ring tone: the words (the offer, the call-back, the emergency number).
        assert speech_after(call.heard, ring[-1][1]) >= 1.5, f"nothing said after: {ring}"
    assert bool(beeps) == case.beep, f"message offer's beep: {beeps}, expected {case.beep}"
    assert ("BYE sip:sipp@" in call.trace) == case.service_ends, "who hung up"
    if case.outcome == "transfer_unconfirmed":
        # Nothing from pjsip ended the wait: the ring tone ran for the bot's whole wait.
        assert ring[-1][1] - ring[0][0] >= ANSWER_S - 6.0, (ring, ANSWER_S)
