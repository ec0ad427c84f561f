"""An inbound SIP MESSAGE (RFC 3428), at every way in: the redirect front, a worker's own port,
and inside a call's dialog. sipp sends it on loopback; the status each answers is recorded.

The service sends SMS over SIP but takes no inbound messages, and a 2xx to a MESSAGE tells its
sender the message was delivered (RFC 3428 section 7). The front, Python of ours, refuses it
with ``405 Method Not Allowed`` and an ``Allow`` header (RFC 3261 sections 8.2.1 and 21.4.6).
A worker's port is pjsua's: its IM module answered every MESSAGE 200 before any callback ran,
and pjsua2 has no setting or hook to refuse it (README, "SIP, capacity and scaling", names
the pjsua source lines). A pjsip module of the worker's own (:mod:`voice.sip.pjsip_fallback`,
before the dialog layer and pjsua's modules) now refuses it 405, in a call or out of one, with
pjsua's ``Allow`` less MESSAGE (its OPTIONS answer no longer offers it either).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.test_sip_inbound import (
    _udp_request,
    hang_up_at_first_key,
    sipp_uac,
    started_line,
)
from voice.sip import message
from voice.sip.front import ALLOW, RedirectFront
from voice.sip.outcome import CallOutcome
from voice.sip.pool import CallHandle, SipPool
from voice.sip.protocol import CallEvent, CallState, Digit

pytestmark = pytest.mark.integration


@pytest.fixture
async def line() -> AsyncIterator[tuple[SipPool, RedirectFront]]:
    async with started_line() as started:
        yield started


def answers_to(method: str, trace: str) -> list[message.SipMessage]:
    """The responses to ``method`` in a sipp trace (sipp logs each message once, blank-line
    separated, under a line naming its direction and time)."""
    found = []
    for block in trace.split("\n\n"):
        start = block.find("SIP/2.0 ")
        if start < 0:
            continue
        try:
            msg = message.parse(block[start:].encode())
        except message.SipParseError:
            continue
        if not msg.is_request and (msg.get("CSeq") or "").split()[-1:] == [method]:
            found.append(msg)
    return found


def final_answer(method: str, trace: str) -> message.SipMessage:
    finals = [m for m in answers_to(method, trace) if m.status >= 200]
    assert finals, f"no final answer to the {method}:\n{trace[-3000:]}"
    statuses = {m.status for m in finals}
    assert len(statuses) == 1, f"the {method}'s copies got different answers: {statuses}"
    return finals[0]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
async def test_a_message_to_the_front_is_refused_405_with_allow(
    line: tuple[SipPool, RedirectFront], tmp_path: Path, tcp: bool
) -> None:
    """What a phone, a gateway or a PBX sending to ``CLINIC_SIP_ADDR`` gets: a refusal that
    says which methods the front takes, never a 200 (the message would be lost unannounced).
    It takes no slot and reaches no handler."""
    pool, front = line
    offered: list[CallHandle] = []

    async def handler(call: CallHandle) -> None:
        offered.append(call)

    pool.on_incoming(handler)
    free = pool.stats()["free_slots"]
    code, text = await sipp_uac(
        front.address, "sipp_uac_message.xml", "6000", tmp_path, 10, tcp=tcp
    )
    assert code == 0, f"sipp got no answer it knows: {text[-3000:]}"
    answer = final_answer("MESSAGE", text)
    assert (answer.status, answer.reason) == (405, "Method Not Allowed"), answer
    allowed = {m.strip() for m in (answer.get("Allow") or "").split(",")}
    assert allowed == {m.strip() for m in ALLOW.split(",")}, answer
    assert "MESSAGE" not in allowed
    assert pool.stats()["free_slots"] == free and not offered


DROPPED = "inbound SIP MESSAGE(s) (the last {}) answered 200 by pjsua and dropped"


def _allow(answer: message.SipMessage) -> set[str]:
    return {m.strip() for m in (answer.get("Allow") or "").split(",") if m.strip()}


async def test_a_message_to_a_workers_port_is_refused_405_with_allow(
    capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Out of any dialog, straight to a worker (direct mode's worker ports take the callers
    the front redirects; behind a PBX they are the PBX's trunk): 405 with pjsua's Allow less
    MESSAGE, never pjsua's 200 (``im_on_rx_request``: the sender told it was delivered, the
    text dropped). OPTIONS no longer offers MESSAGE either, and nothing is dropped."""
    # The pool is started here, not by a fixture: capfd captures only from the test's own
    # start, and a worker writes its log to the stderr it was started with.
    async with started_line() as (pool, _):
        worker = pool.worker_addresses()[0]
        free = pool.stats()["free_slots"]
        code, text = await sipp_uac(worker, "sipp_uac_message.xml", "6000", tmp_path, 10)
        assert code == 0, f"sipp got no answer it knows: {text[-3000:]}"
        answer = final_answer("MESSAGE", text)
        assert (answer.status, answer.reason) == (405, "Method Not Allowed"), answer
        assert pool.stats()["free_slots"] == free
        options = await asyncio.get_running_loop().run_in_executor(
            None, _udp_request, worker, "OPTIONS"
        )
        assert options.status == 200, options
        # RFC 3261 8.2.1: the 405's Allow is the worker's (as OPTIONS says), without MESSAGE.
        assert _allow(answer) == _allow(options), (answer, options)
        assert "MESSAGE" not in _allow(options) and "INVITE" in _allow(options), options
        err = capfd.readouterr().err
        assert DROPPED.format("out of a dialog") not in err, err[-3000:]
        assert "appointment" not in err, "a patient's text in the log"


async def test_a_message_inside_a_call_is_refused_405_and_the_call_goes_on(
    capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A caller's phone that sends a text during a clinic call: the MESSAGE comes in the
    call's dialog to its worker, where pjsua answered 200 itself (``pjsua_call.c``, the
    UAS MESSAGE branch of its transaction callback) and the text was dropped. Now 405, before
    the dialog layer; and the call goes on: a digit after it arrives, and the call ends as
    the handler ends it."""
    # The pool is started here, not by a fixture: capfd captures only from the test's own
    # start, and a worker writes its log to the stderr it was started with.
    async with started_line() as (pool, _):
        seen, ended = hang_up_at_first_key(pool)
        worker = pool.worker_addresses()[0]
        code, text = await sipp_uac(worker, "sipp_uac_message_in_call.xml", "6000", tmp_path, 20)
        assert code == 0, f"no answer to the MESSAGE, or no BYE after the digit: {text[-3000:]}"
        answer = final_answer("MESSAGE", text)
        assert answer.status == 405 and "MESSAGE" not in _allow(answer), answer
        assert "INVITE" in _allow(answer), answer
        async with asyncio.timeout(5):
            await ended.wait()
        assert [e.key for e in seen if isinstance(e, Digit)] == ["1"], seen
        last = seen[-1]
        assert isinstance(last, CallEvent) and last.state is CallState.ENDED, seen
        assert last.outcome is CallOutcome.COMPLETED, last
        err = capfd.readouterr().err
        assert DROPPED.format("in a call") not in err, err[-3000:]
