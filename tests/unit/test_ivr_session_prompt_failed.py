"""A prompt the caller never heard, through the real ``CallSession`` and the shipped flows.

The worker says so with ``PlayDone(failed=True)`` (pjsua2 could not open or send the file, or
the call was gone); text to speech says so by raising. A question whose prompt failed was not
heard: keys follow the not-heard rules (on a danger sign only its "yes" or 0 counts), it is
asked once more, and failed again it goes to the flow's human at U2 at least (README, "Safety
rules of the triage"). Any other prompt that failed is skipped.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from tests.unit.test_ivr_engine import ADVICE, ADVICE_AFTER_SAY_FLOW, ADVICE_FLOW, ROUND_FLOW
from tests.unit.test_ivr_session_races import Rig, _digit, _done, _to_breathing
from tests.unit.test_ivr_session_transfer import _status
from voice.ivr import engine as eng
from voice.ivr.flow import FlowParams
from voice.ivr.triage import Urgency
from voice.media.tts import TtsError
from voice.sip.protocol import PlayDone


def _failed(play_id: int) -> PlayDone:
    return PlayDone("call-1", play_id, failed=True)


def _failing_tts(rig: Rig, phrase: str) -> list[str]:
    """Make the rig's text to speech fail for every text holding ``phrase``; the texts it
    failed for, in order."""
    render = rig.renderer.render
    tries: list[str] = []

    async def failing(text: str, *, voice: str = "en") -> Path:
        if phrase in text:
            tries.append(text)
            raise TtsError("espeak-ng failed to synthesise (status 1)")
        return await render(text, voice=voice)

    rig.renderer.render = failing  # type: ignore[method-assign]
    return tries


async def _to_chest(rig: Rig) -> int:
    """Breathing heard in full and answered 2 (no): the chest-pain prompt plays."""
    breathing = await _to_breathing(rig)
    rig.call.send(_done(breathing))
    await rig.until(lambda: rig.session._listening)
    rig.call.send(_digit("2"))
    return await rig.until_prompt("chest pain")


def _transferred_to(rig: Rig, uri: str) -> bool:
    return any(c == "transfer" and str(a).startswith(f"<{uri}") for c, a in rig.call.commands)


def _outcome(rig: Rig) -> str:
    state = rig.session._state
    return "" if state is None else state.outcome


def _recording(rig: Rig) -> bool:
    state = rig.session._state
    return state is not None and state.phase is eng.Phase.RECORDING


def _chest_plays(rig: Rig) -> int:
    return sum("chest pain" in text for _, text in rig.call.plays())


async def test_a_key_after_a_danger_sign_that_failed_to_play_does_not_answer_it() -> None:
    # A double press of "2" (no to breathing) reaches us just after the chest-pain prompt
    # failed to play: the caller never heard the question, and the 2 must not say "no" to it.
    rig = Rig(speech=False)
    chest = await _to_chest(rig)
    rig.call.send(_failed(chest), _digit("2"))
    await rig.settle()
    state = rig.session._state
    assert state is not None
    assert not any(k == "chest_pain" for k, _ in state.values), "answered, never heard"
    assert state.node == "chest", state.node
    assert not any("unconscious" in text for _, text in rig.call.plays())
    await rig.until(lambda: _chest_plays(rig) == 2)  # asked once more
    # Heard the second time: its own answer counts.
    rig.call.send(_done(rig.call.last_play()[0]))
    await rig.until(lambda: rig.session._listening)
    rig.call.send(_digit("2"))
    await rig.until_prompt("unconscious")
    await rig.finish()
    (saved,) = rig.saved
    assert ("chest_pain", "no") in saved.record.values
    assert any(s.input == eng.PROMPT_FAILED and s.node == "chest" for s in saved.record.path)


async def test_a_danger_sign_that_fails_twice_goes_to_the_nurse_at_u2() -> None:
    rig = Rig(speech=False)
    chest = await _to_chest(rig)
    rig.call.send(_failed(chest))
    await rig.settle()
    assert _chest_plays(rig) == 2, "not asked again: the caller heard nothing"
    rig.call.send(_digit("2"), _failed(rig.call.last_play()[0]))
    await rig.settle()
    state = rig.session._state
    assert state is not None
    assert not any(k == "chest_pain" for k, _ in state.values), "answered, never heard"
    connecting = await rig.until_prompt("Connecting you to a nurse")
    rig.call.send(_done(connecting))
    await rig.until(lambda: any(c == "transfer" for c, _ in rig.call.commands))
    await rig.finish()
    (saved,) = rig.saved
    record = saved.record
    assert record.urgency is not None and record.urgency <= Urgency.U2, record.urgency
    assert "unanswered: chest" in record.reasons, record.reasons
    assert eng.PROMPT_FAILED in record.reasons, record.reasons
    assert not any(k == "chest_pain" for k, _ in record.values)


async def test_a_danger_sign_whose_text_to_speech_fails_is_not_answered() -> None:
    rig = Rig(speech=False)
    tries = _failing_tts(rig, "chest pain")
    breathing = await _to_breathing(rig)
    rig.call.send(_done(breathing))
    await rig.until(lambda: rig.session._listening)
    rig.call.send(_digit("2"))
    await rig.until(lambda: bool(tries))
    await rig.settle()
    rig.call.send(_digit("2"))  # a double press, just after the prompt failed
    await rig.settle()
    state = rig.session._state
    assert state is not None
    assert not any(k == "chest_pain" for k, _ in state.values), "answered, never heard"
    connecting = await rig.until_prompt("Connecting you to a nurse")
    assert len(tries) == 2, tries  # made once more before giving up
    rig.call.send(_done(connecting))
    await rig.until(lambda: any(c == "transfer" for c, _ in rig.call.commands))
    await rig.finish()
    (saved,) = rig.saved
    assert saved.record.urgency is not None and saved.record.urgency <= Urgency.U2
    assert "unanswered: chest" in saved.record.reasons
    assert not any(k == "chest_pain" for k, _ in saved.record.values)


async def test_prompts_that_all_fail_reach_a_human_not_noinput_counters(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Every play fails (the media is broken): the intro, a message, is skipped; the first
    # question is tried twice, then the nurse; "connecting you" is skipped, the transfer goes.
    # Logged once, at WARNING, naming the call.
    rig = Rig(speech=False)
    caplog.set_level(logging.DEBUG, logger="voice")
    rig.start()
    intro = await rig.until_prompt("I will ask you a few questions")
    rig.call.send(_failed(intro))
    who = await rig.until_prompt("Is this call about yourself")
    rig.call.send(_failed(who))
    await rig.until(lambda: len(rig.call.plays()) == 3)
    rig.call.send(_failed(rig.call.last_play()[0]))
    connecting = await rig.until_prompt("Connecting you to a nurse")
    rig.call.send(_failed(connecting))
    await rig.until(lambda: _transferred_to(rig, FlowParams().nurse_uri))
    await rig.finish()  # hangs up while the transfer rings
    (saved,) = rig.saved
    assert saved.record.outcome == "hung_up_before_transfer", saved.record.outcome
    assert not any(s.input == "noinput" for s in saved.record.path), saved.record.path
    warned = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and "could not be played" in r.getMessage()
    ]
    assert len(warned) == 1, [r.getMessage() for r in warned]
    assert "call-1" in warned[0].getMessage()


async def test_a_menu_whose_prompt_fails_twice_goes_to_staff() -> None:
    rig = Rig(called="6000", speech=False)
    rig.start()
    welcome = await rig.until_prompt("Welcome")
    rig.call.send(_done(welcome))
    menu = await rig.until_prompt("How can I help")
    rig.call.send(_failed(menu))
    await rig.until(lambda: sum("How can I help" in t for _, t in rig.call.plays()) == 2)
    rig.call.send(_failed(rig.call.last_play()[0]))
    await rig.until(lambda: _outcome(rig) != "")
    assert _outcome(rig) == "transfer_staff", _outcome(rig)
    state = rig.session._state
    assert state is not None
    assert state.triage is None  # no triage: nothing to raise
    rig.call.send(_done(rig.call.last_play()[0]))  # "connecting you"
    await rig.until(lambda: _transferred_to(rig, FlowParams().staff_uri))
    await rig.finish()


async def test_a_broken_text_to_speech_round_an_on_fail_loop_reaches_a_human(
    tmp_path: Path,
) -> None:
    # A question's on_fail that asks it again (flow check accepts it: each lap waits for the
    # caller). With every render failing nothing waits for the caller: the call must reach
    # staff, not go round in silence, rewriting its record, until MAX_CALL_S.
    (tmp_path / "r.yaml").write_text(ROUND_FLOW, encoding="utf-8")
    (tmp_path / "routes.yaml").write_text("default: r\nroutes: {}\n", encoding="utf-8")
    rig = Rig(called="r", speech=False, flows=tmp_path)
    tries: list[str] = []

    async def broken(text: str, *, voice: str = "en") -> Path:
        await asyncio.sleep(0)  # as the speech thread's future: the loop runs in between
        tries.append(text)
        raise TtsError("espeak-ng failed to initialise")

    rig.renderer.render = broken  # type: ignore[method-assign]
    rig.start()
    await rig.until(lambda: _transferred_to(rig, FlowParams().staff_uri))
    assert len(tries) <= 6, len(tries)  # twice, its on_fail's say, twice, "connecting you"
    await rig.finish()
    (saved,) = rig.saved
    assert saved.record.outcome == "hung_up_before_transfer", saved.record.outcome


async def test_an_emergency_advice_whose_text_to_speech_fails_is_made_again_and_on_record() -> None:
    # A U1 caller: "This may be an emergency. Hang up and call 1 1 2 now", before the nurse. Its
    # text to speech fails: it is made once more, not skipped; failed again, the transfer goes
    # ahead, and the record says the caller never heard it.
    rig = Rig(speech=False)
    tries = _failing_tts(rig, "This may be an emergency")
    breathing = await _to_breathing(rig)
    rig.call.send(_done(breathing))
    await rig.until(lambda: rig.session._listening)
    rig.call.send(_digit("1"))
    connecting = await rig.until_prompt("Connecting you to a nurse")
    assert len(tries) == 2, tries
    rig.call.send(_done(connecting))
    await rig.until(lambda: _transferred_to(rig, FlowParams().nurse_uri))
    await rig.finish()
    (saved,) = rig.saved
    assert "unheard: emergency" in saved.record.reasons, saved.record.reasons
    assert [s.input for s in saved.record.path].count(eng.PROMPT_FAILED) == 2


async def test_a_closed_notice_unheard_twice_is_not_out_of_hours() -> None:
    # Out of hours, a 0 at the closed menu four times: the notice, and the call ends. Its
    # play fails twice: the record must not say the caller was told (out_of_hours).
    closed = FlowParams(open_now=lambda: False)
    rig = Rig(called="6000", speech=False, params=closed)
    rig.start()
    welcome = await rig.until_prompt("Welcome to")
    rig.call.send(_done(welcome))

    def notices() -> int:
        return sum("practice is closed" in t for _, t in rig.call.plays())

    for n in range(2, 6):  # the welcome's notice, then one a 0
        menu = await rig.until_prompt("How can I help")
        rig.call.send(_done(menu))
        await rig.until(lambda: rig.session._listening)
        rig.call.send(_digit("0"))
        await rig.until(lambda: notices() == n)  # noqa: B023 (awaited in this lap)
    notice = rig.call.last_play()
    assert "How can I help" not in notice[1], notice
    rig.call.send(_failed(notice[0]))
    await rig.until(lambda: sum(t == notice[1] for _, t in rig.call.plays()) == 2)
    rig.call.send(_failed(rig.call.last_play()[0]))
    await rig.until(lambda: bool(rig.saved))
    await rig.finish()
    (saved,) = rig.saved
    assert saved.record.outcome == eng.OUT_OF_HOURS_UNHEARD_OUTCOME, saved.record.outcome


async def test_a_triage_advice_never_heard_is_said_before_the_message(tmp_path: Path) -> None:
    # "See a doctor today, call the out-of-hours service now" fails twice: the nurse, whose
    # line is not staffed (486). The message offer says the advice first, tried twice too;
    # unheard, the message is still taken and the record says the advice was never heard.
    (tmp_path / "g.yaml").write_text(ADVICE_FLOW, encoding="utf-8")
    (tmp_path / "routes.yaml").write_text("default: g\nroutes: {}\n", encoding="utf-8")
    rig = Rig(called="g", speech=False, flows=tmp_path)
    rig.start()
    fever = await rig.until_prompt("Is the fever over 39")
    rig.call.send(_done(fever))
    await rig.until(lambda: rig.session._listening)
    rig.call.send(_digit("1"))
    advice = await rig.until_prompt("You should see a doctor today")
    rig.call.send(_failed(advice))
    await rig.until(lambda: len(rig.call.plays()) == 3)
    rig.call.send(_failed(rig.call.last_play()[0]))
    connecting = await rig.until_prompt("connect you to a nurse")
    rig.call.send(_done(connecting))
    await rig.until(lambda: _transferred_to(rig, FlowParams().nurse_uri))
    rig.call.send(_status(486, True))
    offer = await rig.until_prompt("nobody can take your call")
    assert rig.call.texts[offer].startswith(ADVICE), rig.call.texts[offer]
    rig.call.send(_failed(offer))
    await rig.until(lambda: sum(ADVICE in t for _, t in rig.call.plays()) == 4)
    rig.call.send(_failed(rig.call.last_play()[0]))
    await rig.until(lambda: _recording(rig))
    await rig.finish()
    (saved,) = rig.saved
    assert "unheard: advice" in saved.record.reasons, saved.record.reasons


async def test_a_triage_advice_before_staff_asked_for_below_u2_unheard_is_on_record(
    tmp_path: Path,
) -> None:
    # A 0 pressed during "Thank you." (no question left, U3): the advice, then "connecting
    # you" to staff. Its text to speech fails, both times: the transfer goes ahead, and the
    # record says the caller never heard the advice (before: skipped at its first failure,
    # nothing on record).
    (tmp_path / "g.yaml").write_text(ADVICE_AFTER_SAY_FLOW, encoding="utf-8")
    (tmp_path / "routes.yaml").write_text("default: g\nroutes: {}\n", encoding="utf-8")
    rig = Rig(called="g", speech=False, flows=tmp_path)
    tries = _failing_tts(rig, "You should see a doctor today")
    rig.start()
    fever = await rig.until_prompt("Is the fever over 39")
    rig.call.send(_done(fever))
    await rig.until(lambda: rig.session._listening)
    rig.call.send(_digit("1"))
    await rig.until_prompt("Thank you.")
    rig.call.send(_digit("0"))
    await rig.until(lambda: _transferred_to(rig, FlowParams().staff_uri))
    assert len(tries) == 2, tries  # said once more
    rig.call.send(_status(200, True))
    await rig.until(lambda: bool(rig.saved))
    await rig.finish()
    (saved,) = rig.saved
    assert "unheard: advice" in saved.record.reasons, saved.record.reasons


BACKED_FLOW = """\
id: s
language: en
human: staff
start: status
nodes:
  status:
    say: "Your results are ready in the patient portal."
    next: bye
    backs_outcome: told
    outcome_unheard: told_unheard
  bye:
    hangup: "Goodbye."
    outcome: told
"""


async def test_a_line_that_backs_an_outcome_unheard_twice_does_not_claim_it(
    tmp_path: Path,
) -> None:
    # The worker cannot play the status line (PlayDone failed), twice: the goodbye is
    # heard, yet the call must not end "told".
    (tmp_path / "s.yaml").write_text(BACKED_FLOW, encoding="utf-8")
    (tmp_path / "routes.yaml").write_text("default: s\nroutes: {}\n", encoding="utf-8")
    rig = Rig(called="s", speech=False, flows=tmp_path)
    rig.start()
    status = await rig.until_prompt("Your results are ready")
    rig.call.send(_failed(status))
    await rig.until(lambda: sum("Your results" in t for _, t in rig.call.plays()) == 2)
    rig.call.send(_failed(rig.call.last_play()[0]))
    bye = await rig.until_prompt("Goodbye.")
    rig.call.send(_done(bye))
    await rig.until(lambda: bool(rig.saved))
    await rig.finish()
    (saved,) = rig.saved
    assert saved.record.outcome == "told_unheard", saved.record.outcome
