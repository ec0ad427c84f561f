"""``CallSession`` and a transfer's reports (RFC 3515 NOTIFYs, as the worker passes them on),
with a scripted SIP call: what reaches the engine decides what the caller hears and what
the call record says."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import cast

import pytest

from tests.unit.test_ivr_session_races import LOUD, Rig, _digit, _done
from tests.unit.test_prop_session import VirtualLoop
from voice.ivr.engine import CallRecord
from voice.ivr.flow import MESSAGE_VALUE
from voice.ivr.session import (
    RECORD_NO_SPEECH_S,
    TRANSFER_ANSWER_S,
    TRANSFER_DEADLINE_S,
    CallSession,
)
from voice.sip.pool import CallHandle
from voice.sip.protocol import TransferStatus


async def _transferring(rig: Rig) -> None:
    """The main menu; 0 during the welcome; "connecting you" played; the REFER sent."""
    rig.start()
    await rig.until_prompt("Welcome to")
    rig.call.send(_digit("0"))
    connecting = await rig.until_prompt("Connecting you to a member of staff")
    rig.call.send(_done(connecting))
    await rig.until(lambda: any(kind == "transfer" for kind, _ in rig.call.commands))


def _behind_a_pbx(rig: Rig) -> Rig:
    """``rig``'s call as it comes through a PBX (the workers register to one)."""
    rig.deps = replace(rig.deps, behind_pbx=True)
    rig.session = CallSession(cast(CallHandle, rig.call), rig.deps)
    return rig


def _status(sip_status: int, final: bool) -> TransferStatus:
    return TransferStatus("call-1", sip_status, final)


def _on_virtual_time(body: Callable[[Rig], Awaitable[None]]) -> None:
    """Run ``body`` with a call to 6000 on the virtual loop of test_prop_session.py: the
    session's own deadlines (a transfer's 60 s and 180 s, the message's 12 s no-speech
    guard) take no wall time, and a loaded machine cannot stretch the test's steps past
    them. Shortened deadlines on the real clock left the test 0.1 to 0.3 s for its steps."""
    loop = VirtualLoop()
    try:
        loop.run_until_complete(body(Rig(called="6000", speech=False)))
    finally:
        loop.cancel_left()
        loop.close()


async def _ended(rig: Rig) -> CallRecord:
    """The caller hangs up (if still on the line); the call's one record."""
    await rig.finish()
    (saved,) = rig.saved
    return saved.record


async def test_a_failure_in_a_notify_that_keeps_the_subscription_is_the_answer() -> None:
    # 202, then "SIP/2.0 486 Busy Here" with Subscription-State: active. It was taken for
    # progress: 40 s of silence, and a record saying staff took the call.
    rig = Rig(called="6000", speech=False)
    await _transferring(rig)
    rig.call.send(_status(100, False), _status(486, False))
    await rig.until_prompt("nobody can take your call")
    record = await _ended(rig)
    assert record.outcome == "transfer_failed", record
    assert record.transfer_target is None


def test_a_transfer_taken_on_and_ringing_long_still_has_its_failure_told() -> None:
    # The caller's side took the REFER on; the target rings past the first deadline and then
    # refuses (480). The call is still up: the failure goes on as any (here the message).
    async def body(rig: Rig) -> None:
        await _transferring(rig)
        rig.call.send(_status(100, False), _status(180, False))
        await asyncio.sleep(TRANSFER_DEADLINE_S + 10.0)
        assert not rig.call.ended and ("hangup", None) not in rig.call.commands
        rig.call.send(_status(480, True))
        await rig.until_prompt("nobody can take your call")
        record = await _ended(rig)
        assert record.outcome == "transfer_failed", record

    _on_virtual_time(body)


def test_a_transfer_taken_on_but_never_answered_asks_for_a_call_back() -> None:
    # No answer at all (the transferee never sends a final NOTIFY): not "transferred", which
    # would tell the clinic someone took the call.
    async def body(rig: Rig) -> None:
        await _transferring(rig)
        rig.call.send(_status(100, False), _status(180, False))
        said = await rig.until_prompt(
            "The clinic will call you back", within_s=TRANSFER_ANSWER_S + 5.0
        )
        rig.call.send(_done(said))
        await rig.until(lambda: rig.call.ended)
        record = await _ended(rig)
        assert record.outcome == "transfer_unconfirmed", record
        assert record.transfer_target is not None
        assert [(s.input, s.value) for s in record.path][-1] == ("transfer", "unconfirmed")

    _on_virtual_time(body)


async def test_a_stop_that_cuts_a_ringing_transfer_is_no_transfer() -> None:
    # The SIP workers hang up at the stop while the target rings: whether anyone answered is
    # unknown, so the record says the service cut the call (a call back), not "transferred".
    rig = Rig(called="6000", speech=False)
    await _transferring(rig)
    rig.call.send(_status(100, False), _status(180, False))
    await rig.settle()
    rig.call.cut = "shutdown"
    record = await _ended(rig)
    assert record.outcome == "cut_shutdown", record


async def test_a_caller_who_hangs_up_before_the_refer_was_taken_on_is_not_a_failed_transfer() -> (
    None
):
    # The caller presses 0 and hangs up as the REFER arrives: staff's phones did not fail,
    # and the record must not say they did.
    rig = Rig(called="6000", speech=False)
    await _transferring(rig)
    record = await _ended(rig)
    assert record.outcome == "hung_up_before_transfer", record


async def test_the_caller_hears_a_ring_tone_until_the_transfer_has_its_answer() -> None:
    rig = Rig(called="6000", speech=False)
    await _transferring(rig)
    await rig.until(lambda: any("ringback" in text for _, text in rig.call.plays()))
    ring, _ = rig.call.last_play()
    assert ring in rig.call.loops
    rig.call.send(_status(100, False), _status(180, False))
    await rig.settle()
    since = rig.call.commands[rig.call.commands.index(("play", ring)) :]
    assert ("stop", None) not in since  # rings on while the target rings
    rig.call.send(_status(486, True))
    offer = await rig.until_prompt("nobody can take your call")
    since = rig.call.commands[rig.call.commands.index(("play", ring)) :]
    # Stopped before the engine's next prompt, whose end is the one the engine waits for.
    assert since[1:] == [("stop", None), ("play", offer)], since
    rig.call.send(_done(ring))  # the stopped ring tone's end: nobody's prompt
    await rig.settle()
    assert rig.call.last_play()[0] == offer
    await rig.finish()


async def _recording_a_message(rig: Rig) -> None:
    """Staff busy, the offer played, the beep played: the message is being recorded."""
    await _transferring(rig)
    rig.call.send(_status(486, True))
    offer = await rig.until_prompt("nobody can take your call")
    rig.call.send(_done(offer))
    beep = await rig.until_prompt("beep")
    rig.call.send(_done(beep))
    await rig.settle()


def test_a_caller_who_says_nothing_after_the_beep_is_not_kept_waiting() -> None:
    async def body(rig: Rig) -> None:
        await _recording_a_message(rig)
        # Not a minute of dead air: the silence ends the message well before its 60 s.
        await rig.until_prompt("I did not hear a message", within_s=RECORD_NO_SPEECH_S + 1.0)
        assert (await _ended(rig)).outcome == "transfer_failed"

    _on_virtual_time(body)


def test_a_caller_who_speaks_is_not_cut_off_by_the_silence_guard() -> None:
    async def body(rig: Rig) -> None:
        await _recording_a_message(rig)
        rig.call.speak(*[LOUD] * 20)  # 400 ms of speech
        await asyncio.sleep(RECORD_NO_SPEECH_S + 1.0)  # past the guard: still recording
        assert not any("I did not hear" in text for _, text in rig.call.plays())
        assert not any("Your message has been" in text for _, text in rig.call.plays())
        rig.call.send(_digit("#"))
        await rig.until_prompt("Your message has been recorded")
        assert (await _ended(rig)).outcome == "message_left"

    _on_virtual_time(body)


@pytest.mark.parametrize("sip_status", [486, 503])
async def test_behind_a_pbx_a_transfer_that_reached_nobody_ends_the_call_at_once(
    sip_status: int,
) -> None:
    # Asterisk accepted the REFER (the caller left our leg), its chain reached nobody and it
    # says so before its own message (486), or the caller left it while it rang (503). Our
    # line holds nobody: no "nobody can take your call", no message offer, no second REFER,
    # and the call ends now, not after prompts to nobody.
    rig = _behind_a_pbx(Rig(called="6000", speech=False))
    await _transferring(rig)
    rig.call.send(_status(100, False), _status(sip_status, True))
    await rig.until(lambda: rig.call.ended)
    assert [kind for kind, _ in rig.call.commands].count("transfer") == 1
    assert not any("nobody can take your call" in text for _, text in rig.call.plays())
    record = await _ended(rig)
    assert (record.outcome, record.transfer_target) == ("transfer_unanswered", None)
    assert [(s.input, s.value) for s in record.path][-1] == ("transfer", "unanswered")


async def test_behind_a_pbx_a_transfer_it_could_not_perform_still_fails_on_our_line() -> None:
    # 202, then 404: the extension is not in the transfer context, so the PBX never took
    # the caller, who is still on our line and is told so (here: the message offer).
    rig = _behind_a_pbx(Rig(called="6000", speech=False))
    await _transferring(rig)
    rig.call.send(_status(100, False), _status(404, True))
    await rig.until_prompt("nobody can take your call")
    record = await _ended(rig)
    assert record.outcome == "transfer_failed", record


async def test_behind_a_pbx_a_refused_refer_still_fails_on_our_line() -> None:
    # The REFER itself refused (never accepted): whatever its status, nobody took the caller.
    rig = _behind_a_pbx(Rig(called="6000", speech=False))
    await _transferring(rig)
    rig.call.send(_status(503, True))
    await rig.until_prompt("nobody can take your call")
    record = await _ended(rig)
    assert record.outcome == "transfer_failed", record


async def test_a_caller_who_hangs_up_at_the_beep_of_the_message_leaves_none() -> None:
    # What flow simulate shows for ":hangup" at the message's recording
    # (tests/unit/test_ivr_simulate.py): the recording ends with the call, holds no speech,
    # and the engine hears that (a silent message) before the hang-up: no message_left.
    rig = Rig(called="6000", speech=False)
    await _transferring(rig)
    rig.call.send(_status(486, True))
    offer = await rig.until_prompt("nobody can take your call")
    rig.call.send(_done(offer))
    await rig.until(lambda: any("beep" in text for _, text in rig.call.plays()))
    beep, _ = rig.call.last_play()
    rig.call.send(_done(beep))
    await rig.settle()
    record = await _ended(rig)
    assert record.outcome == "transfer_failed", record
    assert [(s.input, s.value) for s in record.path][-1] == ("record", "silent")
    assert MESSAGE_VALUE not in dict(record.values)
    assert not any("call again later" in text for _, text in rig.call.plays())


# -- the voicemail's budget (voice/ivr/voicemail_budget.py) ----------------------------------


def _budgeted(rig: Rig, refusal: str) -> tuple[list[tuple[str, str, int]], list[bool], list[bytes]]:
    """``rig``'s session with a budget answering ``refusal`` ("": admitted): the admissions
    asked, the ends told, the messages saved."""
    asked: list[tuple[str, str, int]] = []
    ended: list[bool] = []
    saved: list[bytes] = []

    async def admit(call_id: str, caller: str, max_s: int) -> str:
        asked.append((call_id, caller, max_s))
        return refusal

    async def save_recording(call_id: str, started_at: float, pcm: bytes) -> str:
        saved.append(pcm)
        return "rec-1"

    rig.deps = replace(
        rig.deps,
        admit_message=admit,
        message_done=lambda call_id, kept: ended.append(kept),
        save_recording=save_recording,
    )
    rig.session = CallSession(cast(CallHandle, rig.call), rig.deps)
    return asked, ended, saved


def test_a_message_the_budget_refuses_is_not_recorded_and_the_record_says_why() -> None:
    async def body(rig: Rig) -> None:
        asked, ended, saved = _budgeted(rig, "voicemail_full")
        await _transferring(rig)
        rig.call.send(_status(486, True))
        rig.call.send(_done(await rig.until_prompt("nobody can take your call")))
        await rig.until_prompt("could not be saved")
        assert not any("beep" in text for _, text in rig.call.plays()), rig.call.plays()
        record = await _ended(rig)
        assert asked == [(rig.call.id, rig.call.caller, 60)]
        assert saved == [] and ended == []  # nothing recorded, nothing reserved
        assert [s.value for s in record.path if s.input == "record"] == ["voicemail_full"]
        assert MESSAGE_VALUE not in dict(record.values)

    _on_virtual_time(body)


@pytest.mark.parametrize("speaks", [True, False])
def test_a_message_admitted_is_released_kept_or_not(speaks: bool) -> None:
    async def body(rig: Rig) -> None:
        asked, ended, saved = _budgeted(rig, "")
        await _recording_a_message(rig)
        if speaks:
            rig.call.speak(*[LOUD] * 25)
        rig.call.send(_digit("#"))
        await rig.until_prompt("Your message has been recorded" if speaks else "did not hear")
        await _ended(rig)
        assert len(asked) == 1 and len(saved) == int(speaks)
        assert ended == [speaks]

    _on_virtual_time(body)
