"""Generated transfers: real calls into the clinic line whose caller's side is a sipp
scenario answering the blind transfer's REFER in each way a phone or a PBX may.

Each call dials a SIP worker, presses 0 during the open main menu's welcome (staff), and
meets the REFER. Its answer comes from :func:`tests.peers.sipp_refer.scenario`, one per
:class:`ReferAnswer` below; the call's audio is a socket of the test
(:mod:`tests.peers.rtp_peer`), so what the caller heard is read off the call. After each call
the test checks what the README ("transfer") promises: the call's record (outcome, transfer
target, the transfer step), what the caller heard after a failed transfer (the offer of a
message, and its beep), every call slot free again and no SIP worker restarted.

The direct mode (no PBX): the caller's side takes the REFER and stays on the line when the
transfer fails. One service serves the whole module; each test finds its record as the one
new call id. About 6 minutes on two cores: a failed transfer's offer is ~16 s of speech.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.test_ivr_keypad import speech_after, tone_runs
from tests.peers.ivr_rig import ClinicLine, clinic_line_fixture, steps
from tests.peers.rtp_peer import rtp_peer
from tests.peers.sipp_refer import Ending, Notify, ReferAnswer, play
from voice.media.tones import BEEP, RINGBACK

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

SIPP_S = 60  # one scenario at most (a REFER never answered: ~32 s, then the BYE)
OFFER_MS = 18_500  # from a failed transfer to past the offer's beep (~15.6 s of speech)
GLIMPSE_MS = 4_000  # from a failed transfer to the hang-up, to hear the offer begin


# Credentials with no registrar: a caller's side that challenges a request of the call gets
# no digest of the password (see CHALLENGE_407).
line = clinic_line_fixture({"CLINIC_SIP_USER": "clinic", "CLINIC_SIP_PASSWORD": "s3cret"})


async def run_sipp(
    line: ClinicLine, answer: ReferAnswer, tmp_path: Path, rtp_port: int
) -> tuple[int, str]:
    """Play ``answer``'s scenario once, calling the main menu (6000) on the first worker;
    sipp's exit code and the messages it traced."""
    worker = line.pool.worker_addresses()[0]
    return await play(answer, str(worker), tmp_path, rtp_port, timeout_s=SIPP_S)


def frag(code: int, reason: str) -> str:
    return f"SIP/2.0 {code} {reason}"


ACTIVE = "active;expires=60"
DONE = "terminated;reason=noresource"
CHALLENGE_407 = ('Proxy-Authenticate: Digest realm="clinic", nonce="n0nce", algorithm=MD5',)


@dataclass(frozen=True, slots=True)
class Case:
    """A REFER's answer and what the README promises for it."""

    answer: ReferAnswer
    transferred: bool  # the record says transfer_staff, else transfer_failed
    offer: bool = False  # the caller hears the message offer after the failure
    beep: bool = False  # ... and its beep (the whole offer heard)
    service_ends: bool = False  # the service hangs up (its BYE)


def _failed(name: str, status: int, *notifies: Notify, whole: bool = True) -> Case:
    answer = ReferAnswer(name, status, notifies, hangup_ms=OFFER_MS if whole else GLIMPSE_MS)
    return Case(answer, transferred=False, offer=True, beep=whole)


def _answered(name: str, *notifies: Notify, headers: tuple[str, ...] = ()) -> Case:
    answer = ReferAnswer(name, 202, notifies, headers, ending=Ending.SERVICE_BYE)
    return Case(answer, transferred=True, service_ends=True)


TRYING = Notify(frag(100, "Trying"), ACTIVE, 3)

CASES = [
    # The target answered: the caller is with it, our leg ends at once.
    _answered(
        "notify_100_180_200",
        TRYING,
        Notify(frag(180, "Ringing"), ACTIVE, 4),
        Notify(frag(200, "OK"), DONE, 5),
    ),
    # A 2xx in a NOTIFY that keeps the subscription active is the answer too.
    _answered("notify_200_active", Notify(frag(200, "OK"), ACTIVE, 3)),
    # RFC 4488 Refer-Sub: false (no NOTIFYs to come): pjsua reports it as an answer.
    _answered("refer_sub_false", headers=("Refer-Sub: false",)),
    # The caller's side hangs up right after its 202 (a PBX that took the caller).
    Case(ReferAnswer("bye_after_202", 202, ending=Ending.CALLER_BYE_NOW), transferred=True),
    # A 202 and no NOTIFY, then the caller hangs up while the ring tone plays: transferred
    # (README: a hang-up while the target rings is recorded as transferred).
    Case(ReferAnswer("no_notify_then_bye", 202, hangup_ms=6_000), transferred=True),
    # The target refused or was not reached: the caller hears the offer of a message.
    _failed("notify_486", 202, TRYING, Notify(frag(486, "Busy Here"), DONE, 4)),
    _failed("notify_503", 202, TRYING, Notify(frag(503, "Service Unavailable"), DONE, 4)),
    _failed("notify_603", 202, Notify(frag(603, "Decline"), DONE, 3), whole=False),
    # A subscription that ends with no final status (180, terminated) has failed.
    _failed("notify_180_terminated", 202, Notify(frag(180, "Ringing"), DONE, 3), whole=False),
    # ... and so has one ended by a NOTIFY whose sipfrag is no status line (pjsua reported
    # nothing: the caller heard the ring tone until the 180 s wait ran out).
    _failed("notify_broken_sipfrag_terminated", 202, Notify("garbage, no status", DONE, 3)),
    # ... also when that body is not UTF-8 (a PBX's text in Latin-1): pjsua2 hands the
    # NOTIFY over as a str with the byte as a lone surrogate, which a plain encode() refused
    # inside pjsua's callback (UnicodeEncodeError, printed and swallowed by SWIG): nothing
    # was reported, and the caller heard the ring tone again.
    _failed("notify_latin1_body_terminated", 202, Notify("\xc9chec du transfert", DONE, 3)),
    # ... and when it is a status line pjsip's parser refuses: a CRLF before it, another
    # SIP version (read as status lines by the worker's looser check, which then left them
    # to pjsua: nobody reported them).
    _failed("notify_sipfrag_after_crlf_terminated", 202, Notify("\nSIP/2.0 486 Busy", DONE, 3)),
    _failed("notify_sipfrag_sip3_terminated", 202, Notify("SIP/3.0 486 Busy Here", DONE, 3)),
    # A REFER challenged (407) in direct mode: the caller's side, whoever called, gets no
    # digest of CLINIC_SIP_PASSWORD (for a nonce of its choosing, to guess the password
    # offline): the REFER is not sent again, the transfer failed. (Behind a PBX it is sent
    # again with the credentials: tests/unit/test_sip_refer.py.)
    Case(
        ReferAnswer("refer_407_in_direct_mode", 407, headers=CHALLENGE_407, hangup_ms=GLIMPSE_MS),
        transferred=False,
        offer=True,
    ),
    # Two NOTIFYs out of order: the later one (486, terminated) first; the stale one gets
    # the dialog's 500 and changes nothing.
    _failed(
        "notify_out_of_order",
        202,
        Notify(frag(486, "Busy Here"), DONE, 4),
        Notify(frag(100, "Trying"), ACTIVE, 3),
        whole=False,
    ),
    # The REFER itself refused.
    _failed("refer_403", 403, whole=False),
    _failed("refer_405", 405, whole=False),
    _failed("refer_501", 501, whole=False),
    # The REFER never answered: pjsip gives up after 32 s (Timer F) and, as RFC 3261
    # 12.2.1.2 asks, ends the dialog: the service hangs up, the transfer failed.
    Case(
        ReferAnswer("refer_unanswered", None, ending=Ending.SERVICE_BYE), False, service_ends=True
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.answer.name)
async def test_a_transfer_answered_this_way_is_recorded_and_heard_as_promised(
    line: ClinicLine, case: Case, tmp_path: Path
) -> None:
    pool = line.pool
    before = await line.call_ids()
    pids, restarts = sorted(pool.worker_pids()), pool.stats()["restarts"]
    free = pool.occupancy().free
    async with rtp_peer() as rtp:
        code, trace = await run_sipp(line, case.answer, tmp_path, rtp.port)
        heard = rtp.pcm()
    assert "Authorization:" not in trace, "the caller's side got a digest of the password"
    assert code == 0, f"sipp scenario {case.answer.name} failed ({code}): {trace[-4000:]}"
    assert rtp.packets > 0, "the caller heard nothing at all"
    record = await line.new_record(before)
    target = line.settings.ivr.staff_uri
    assert ("menu", "0") in steps(record, "digit"), record["path"]
    ring = tone_runs(heard, RINGBACK.hz)
    beeps = tone_runs(heard, BEEP.hz)
    if case.transferred:
        assert record["outcome"] == "transfer_staff", record
        assert record["transfer_target"] == target, record
        assert steps(record, "transfer") == [("menu", "ok")], record["path"]
        assert not beeps, f"a transfer done, yet a message was offered: {beeps}"
    else:
        assert record["outcome"] == "transfer_failed", record
        assert record["transfer_target"] is None, record
        assert steps(record, "transfer") == [("menu", "failed")], record["path"]
    if case.offer:
        # After the ring tone (if it had begun), the offer: speech until the hang-up.
        since = ring[-1][1] if ring else heard.duration_s - GLIMPSE_MS / 1000
        assert speech_after(heard, since) >= 1.5, f"no offer after the failure: ring={ring}"
    if case.beep:
        assert len(beeps) == 1 and (not ring or beeps[0][0] > ring[-1][1]), (ring, beeps)
        assert steps(record, "record") == [("menu", "silent")], record["path"]
    elif case.offer:
        assert not steps(record, "record"), record["path"]
    if case.answer.status is None:
        # Timer F after the REFER (about when the ring tone began), then the BYE: no offer.
        assert ring and 30.0 <= heard.duration_s - ring[0][0] <= 40.0, (ring, heard.duration_s)
        assert not beeps and speech_after(heard, ring[0][0]) < 0.5, "an offer, then a BYE?"
    if case.service_ends:
        assert "BYE sip:sipp@" in trace, "the service did not hang up"
    await line.settled()
    assert pool.occupancy().free == free, f"slots lost: {pool.occupancy()}"
    assert sorted(pool.worker_pids()) == pids and pool.stats()["restarts"] == restarts
    assert pool.stats()["workers_up"] == len(pids), pool.stats()


# Two transfers in one call: an urgent caller (a danger sign, U1) whose nurse transfer
# fails is put through to the staff desk (README "transfer"). Keys: 4 (the triage) during
# the welcome, 1 (myself) during its intro, 1 ("yes", difficulty breathing) during that
# question. The nurse's phone says 100, then 486 and ends its subscription; the staff
# desk's NOTIFY ends the second subscription with no status pjsua reads, and, as Asterisk
# and other pjsip peers do, names no REFER (no id). Such a NOTIFY counted only for a call's
# first REFER: the caller heard the ring tone up to 180 s. Both failed, the caller hears
# the emergency number and the service hangs up.
SECOND = [
    ReferAnswer(
        "second_transfer_notify_broken_terminated",
        202,
        (Notify(frag(100, "Trying"), ACTIVE, 10), Notify(frag(486, "Busy Here"), DONE, 11)),
        digits="411",
        second=(Notify("garbage, no status", DONE, 12),),
        ending=Ending.SERVICE_BYE,
    ),
    # The same with the nurse's REFER challenged (407) and not sent again (direct mode):
    # it has no subscription either. Taken for live (a challenge leaves the subscription
    # to the REFER sent again, which never came), it owned the id-less end of the staff
    # desk's transfer, which nobody reported.
    ReferAnswer(
        "second_transfer_after_challenged_refer_broken_terminated",
        407,
        headers=CHALLENGE_407,
        digits="411",
        second=(Notify("garbage, no status", DONE, 10),),
        ending=Ending.SERVICE_BYE,
    ),
    # The same with the nurse's subscription ended by pjsip with no NOTIFY: its phone says
    # 100 and keeps it active, then refuses pjsip's refresh of it (a SUBSCRIBE 5 s before
    # the 202's Expires: 6 runs out: 489). pjsua reports nothing of that end: the worker
    # reports the nurse's transfer failed. And the model no longer holds that subscription
    # live: it took the staff desk's id-less end (nobody reported it, 180 s of ring tone).
    ReferAnswer(
        "second_transfer_after_refresh_refused_broken_terminated",
        202,
        (Notify(frag(100, "Trying"), "active", 10),),
        headers=("Expires: 6",),
        digits="411",
        refresh=489,
        second=(Notify("garbage, no status", DONE, 11),),
        ending=Ending.SERVICE_BYE,
    ),
    # The same with the nurse's REFER refused outright (no subscription at all).
    ReferAnswer(
        "second_transfer_after_refused_refer_no_body_terminated",
        403,
        digits="411",
        second=(Notify("", DONE, 10),),
        ending=Ending.SERVICE_BYE,
    ),
]


@pytest.mark.parametrize("answer", SECOND, ids=lambda a: a.name)
async def test_a_second_transfer_ended_with_no_status_fails_at_once(
    line: ClinicLine, answer: ReferAnswer, tmp_path: Path
) -> None:
    pool = line.pool
    before = await line.call_ids()
    free = pool.occupancy().free
    async with rtp_peer() as rtp:
        code, trace = await run_sipp(line, answer, tmp_path, rtp.port)
        heard = rtp.pcm()
    assert "Authorization:" not in trace, "the caller's side got a digest of the password"
    assert code == 0, f"sipp scenario {answer.name} failed ({code}): {trace[-4000:]}"
    assert trace.count("REFER sip:") == 2, "not two REFERs in the call"
    assert "BYE sip:sipp@" in trace, "the service did not hang up"
    record = await line.new_record(before)
    assert record["outcome"] == "transfer_failed", record
    assert record["transfer_target"] is None, record
    assert [v for _, v in steps(record, "transfer")] == ["failed", "failed"], record["path"]
    # After the ring tone of the second transfer: the emergency number, then the BYE.
    ring = tone_runs(heard, RINGBACK.hz)
    assert ring and speech_after(heard, ring[-1][1]) >= 1.5, f"nothing said after: {ring}"
    assert not tone_runs(heard, BEEP.hz), "a message offered to an urgent caller"
    await line.settled()
    assert pool.occupancy().free == free, f"slots lost: {pool.occupancy()}"
