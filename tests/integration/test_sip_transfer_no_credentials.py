"""An urgent caller's transfers failing at the SIP level, in direct mode (no registrar).

A caller reaches U1 in the triage (README "The clinic line": 4, the triage, during the
welcome; 1, myself; 1, "yes" to serious difficulty breathing) and is told to call the
emergency number, then put through to the nurse. The caller's side of the call (a sipp
scenario from :mod:`tests.peers.sipp_refer`) plays the far end of the blind transfers:

1. the nurse's REFER is challenged (401 with ``WWW-Authenticate``, or 407 with
   ``Proxy-Authenticate``). In direct mode the far end is whoever called
   ``CLINIC_SIP_ADDR``, so the workers hold no credentials for a challenge in a call (the
   service here has ``CLINIC_SIP_USER``/``CLINIC_SIP_PASSWORD`` set, as for flash calls):
   the REFER is not sent again and the transfer has failed, at once, not after the REFER's
   60 s wait (README "transfer": "no challenge in a call is answered: the REFER has
   failed");
2. an urgent caller whose transfer failed is put through to the other human (README,
   safety rules of the triage: "nurse, then staff"): the staff desk's REFER gets a 202,
   then one NOTIFY that ends its subscription with a body that is no status line and no
   ``id`` in its ``Event`` (as Asterisk sends): a subscription that ended with no final
   status, a failure too;
3. nobody could be reached: the caller hears "Sorry, I could not reach anyone at the
   clinic. Please hang up now and call 112." (no message offer, no "call again later") and
   the service hangs up; the record says ``transfer_failed`` with the triage kept (U1, its
   reason, the emergency advice as the action).

Both calls run at once (one per SIP worker), so the module takes about one call's time
(~30 s) after the service's start. Each call's record is found by its ``X-Clinic-Call``,
which every REFER carries.
"""

from __future__ import annotations

import asyncio
import datetime
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from clinic_voice.app import RUNTIME
from tests.integration.test_ivr_keypad import tone_runs
from tests.peers.ivr_rig import ClinicLine, clinic_line_fixture, pcm_8k, steps
from tests.peers.rtp_peer import rtp_peer
from tests.peers.sipp_refer import Ending, Notify, ReferAnswer, play
from voice.ivr.flow import SYSTEM_TEXTS, FlowParams, render
from voice.media.audio_match import rank
from voice.media.pcm import Pcm, read_wav
from voice.media.tones import BEEP, RINGBACK
from voice.sip.message import SipMessage, parse

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

CHALLENGES = (401, 407)
# The nurse's REFER failed at its challenge: the staff desk's REFER follows once the retry
# prompt ("I could not connect you yet ...", ~9 s) is said. A challenge taken for a live
# subscription waits for the REFER's 60 s deadline (pjsip's own Timer F is 32 s).
RETRY_MAX_S = 20.0
# The staff desk's subscription ended unread: the last words (~6 s), then our BYE. Not
# reported, the caller heard the ring tone until the 180 s wait ran out.
LAST_WORDS_MAX_S = 15.0
BYE_WAIT_MS = 30_000  # the scenario's wait for our BYE after its last NOTIFY
SIPP_S = 90  # the whole scenario at most
DONE = "terminated;reason=noresource"
# Every words the engine may end a failed transfer with: the urgent caller's must win.
LAST_WORDS = (
    "transfer_failed_urgent",
    "transfer_retry",
    "transfer_failed",
    "transfer_unconfirmed",
    "message_offer",
)


def answer_for(challenge: int) -> ReferAnswer:
    """The caller's side for one call: the nurse's REFER challenged with ``challenge``, the
    staff desk's accepted and ended by a NOTIFY with no status line."""
    header = "WWW-Authenticate" if challenge == 401 else "Proxy-Authenticate"
    return ReferAnswer(
        f"urgent_refer_{challenge}_then_notify_unreadable",
        challenge,
        headers=(f'{header}: Digest realm="clinic", nonce="n0nce{challenge}", algorithm=MD5',),
        # 4 during the welcome, 1 during the triage's intro, 1 during the breathing question
        # (its "yes", the only key it takes while it plays): 2.5 s apart, so the question
        # has begun when the yes comes, on a busy machine too.
        digits="411",
        digit_gap_ms=2500,
        second=(Notify("garbage, no status", DONE, 10),),
        ending=Ending.SERVICE_BYE,
    )


@dataclass(frozen=True, slots=True)
class Traced:
    """One SIP message of sipp's trace (``-trace_msg``)."""

    at: datetime.datetime
    sent: bool  # by sipp (the caller's side), else received from the service
    msg: SipMessage


_BLOCK = re.compile(r"^-{20,} (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\n", re.MULTILINE)


def traced(trace: str) -> list[Traced]:
    """The messages of a sipp trace, in order."""
    parts = _BLOCK.split(trace)
    out = []
    for stamp, block in zip(parts[1::2], parts[2::2], strict=True):
        direction, _, text = block.partition("\n")
        at = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f")
        out.append(Traced(at, "sent" in direction, parse(text.strip("\n").encode())))
    return out


@dataclass(frozen=True, slots=True)
class Call:
    """What one call left: sipp's exit code and trace, and what the caller heard."""

    code: int
    trace: str
    heard: Pcm
    packets: int


async def place_call(line: ClinicLine, challenge: int, worker: int, tmp: Path) -> Call:
    """Play :func:`answer_for` ``challenge`` once, calling the main menu (6000) on SIP worker
    number ``worker``."""
    answer = answer_for(challenge)
    address = str(line.pool.worker_addresses()[worker])
    async with rtp_peer() as rtp:
        code, text = await play(
            answer, address, tmp, rtp.port, timeout_s=SIPP_S, bye_timeout_ms=BYE_WAIT_MS
        )
        heard, packets = rtp.pcm(), rtp.packets
    return Call(code, text, heard, packets)


# Credentials and no registrar (direct mode): the workers must not answer a challenge in a
# call with them (commit d98fa23).
line = clinic_line_fixture({"CLINIC_SIP_USER": "clinic", "CLINIC_SIP_PASSWORD": "s3cret"})


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def calls(line: ClinicLine, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Call]:
    """Both calls, placed at once (one per SIP worker)."""
    tmp = tmp_path_factory.mktemp("sipp")
    placed = await asyncio.gather(*(place_call(line, c, i, tmp) for i, c in enumerate(CHALLENGES)))
    return dict(zip(CHALLENGES, placed, strict=True))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def last_words(line: ClinicLine) -> dict[str, bytes]:
    """The engine's words after a failed transfer, in the service's own voice (8 kHz)."""
    renderer = line.app[RUNTIME].renderer
    assert renderer is not None, "no prompt renderer"
    values = FlowParams.from_settings(line.settings, speech_enabled=False).values("en")
    return {
        key: pcm_8k(read_wav(await renderer.render(render(SYSTEM_TEXTS["en"][key], values))))
        for key in LAST_WORDS
    }


def target(refer: SipMessage) -> str:
    """The URI a REFER sends the caller to, without its headers."""
    refer_to = refer.get("Refer-To") or ""
    return refer_to.strip("<>").split("?", 1)[0]


@pytest.mark.parametrize("challenge", CHALLENGES)
async def test_an_urgent_caller_whose_transfers_fail_is_told_to_call_the_emergency_number(
    line: ClinicLine, calls: dict[int, Call], last_words: dict[str, bytes], challenge: int
) -> None:
    call = calls[challenge]
    ivr = line.settings.ivr
    tail = call.trace[-4000:]
    # No digest of the password left the service (Authorization or Proxy-Authorization), in
    # a REFER sent again or anything else.
    assert "Authorization:" not in call.trace, f"the caller's side got a digest: {tail}"
    assert call.code == 0, f"sipp ({challenge}) failed ({call.code}): {tail}"
    messages = traced(call.trace)

    # Two REFERs: the nurse's, challenged and not sent again; the staff desk's after it.
    refers = [m for m in messages if not m.sent and m.msg.method == "REFER"]
    assert [target(r.msg) for r in refers] == [ivr.nurse_uri, ivr.staff_uri], tail
    # Each carries the call's id and urgency (CLINIC_TRANSFER_SUMMARY=urgency), no answers.
    call_id = refers[0].msg.get("X-Clinic-Call")
    assert call_id, refers[0].msg
    for r in refers:
        assert r.msg.get("X-Clinic-Call") == call_id and r.msg.get("X-Clinic-Urgency") == "U1"
        refer_to = r.msg.get("Refer-To") or ""
        assert f"X-Clinic-Call={call_id}" in refer_to and "X-Clinic-Urgency=U1" in refer_to
        assert "X-Clinic-Summary" not in refer_to and r.msg.get("X-Clinic-Summary") is None

    # The challenge failed the nurse's transfer at once: the staff desk's REFER came after
    # the retry prompt, not after a wait for a REFER sent again.
    challenged = next(m for m in messages if m.sent and m.msg.status == challenge)
    retry_s = (refers[1].at - challenged.at).total_seconds()
    assert 0 < retry_s < RETRY_MAX_S, f"the staff REFER {retry_s:.1f} s after the {challenge}"
    # The unreadable end of the staff desk's subscription failed it at once too: the last
    # words, then our BYE.
    ended = next(m for m in messages if m.sent and m.msg.method == "NOTIFY")
    bye = next(m for m in messages if not m.sent and m.msg.method == "BYE")
    words_s = (bye.at - ended.at).total_seconds()
    assert 0 < words_s < LAST_WORDS_MAX_S, f"our BYE {words_s:.1f} s after the last NOTIFY"

    # The record: nobody took the call, the triage and its advice kept for the call back.
    got = await line.get(f"/v1/calls/{call_id}")
    assert got.status == 200, got.text
    record: dict[str, Any] = got.json
    assert record["outcome"] == "transfer_failed", record
    assert record["transfer_target"] is None, record
    assert record["triage"]["urgency"] == "U1", record["triage"]
    assert "difficulty breathing" in record["triage"]["reasons"], record["triage"]
    assert record["triage"]["action"] == "call_emergency+transfer_nurse", record["triage"]
    assert steps(record, "digit") == [("menu", "4"), ("for_whom", "1"), ("breathing", "1")]
    assert [v for _, v in steps(record, "transfer")] == ["failed", "failed"], record["path"]
    assert not steps(record, "record"), "a message taken from an urgent caller"

    # What the caller heard last, after the staff desk's ring tone: to hang up and call the
    # emergency number; no message offer (its beep), no "call again later".
    assert call.packets > 0, "the caller heard nothing at all"
    ring = tone_runs(call.heard, RINGBACK.hz)
    assert ring, "no ring tone while the transfers were tried"
    assert not tone_runs(call.heard, BEEP.hz), "a message offered to an urgent caller"
    start = int(ring[-1][1] * call.heard.rate_hz)
    after = pcm_8k(Pcm(call.heard.samples[start:], call.heard.rate_hz))
    match = rank(after, last_words, 8000)
    assert match.key == "transfer_failed_urgent" and match.score > match.runner_up, match

    pool = line.pool
    await line.settled()
    assert pool.stats()["restarts"] == 0, pool.stats()
