"""The clinic line with a caller who puts it on hold while their message is being recorded:
the whole service (SIP front, pjsua workers, sessions, Redis) and a pjsua2 phone as the
caller on loopback (tests/peers/ivr_phone.py: its hold is pjsua's re-INVITE, a=sendonly).

The flow records a message at once ("Speak after the tone.", at most 60 s). The caller holds
the call 3 s after the answer (just after the beep, before a word) for 15 s, then says a
sentence (espeak-ng) and presses #. The message's no-speech guard (12 s after the beep) ran
on during the hold: the message ended as silent while the caller was away, and what they
said after coming back was not the message. Now the guard waits out the hold.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_ivr_speech import run
from tests.peers.ivr_rig import ClinicLine, Phone, clinic_line_fixture, phones

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

CALL_S = 60.0
HOLD_AT_S, HOLD_S = 3.0, 15.0  # the beep ends about 2 s after the answer
SPEAK_AT_S = HOLD_AT_S + HOLD_S + 1.0
FLOW = """\
id: main_menu
language: en
human: staff
start: message
nodes:
  message:
    record:
      prompt: "Speak after the tone."
      max_s: 60
      save: message
    next: thanks
  thanks:
    hangup: "Thank you."
    outcome: message_taken
"""


line = clinic_line_fixture(main_menu=FLOW)


async def test_a_caller_who_holds_before_speaking_leaves_the_message_when_back(
    line: ClinicLine, tmp_path: Path
) -> None:
    raw, said = tmp_path / "said-22k.wav", tmp_path / "said.wav"
    await run("espeak-ng", "-v", "en", "-w", str(raw), "I need my blood pressure tablets.")
    await run("sox", str(raw), "-r", "8000", "-c", "1", "-b", "16", str(said), "pad", "0", "0.5")
    hash_at = SPEAK_AT_S + 4.0
    before = await line.call_ids()
    async with phones() as started:
        caller = await Phone.start(
            "caller", "--call", line.uri("6000"),
            "--hold-at", str(HOLD_AT_S), "--hold-for", str(HOLD_S),
            "--play", str(said), "--play-at", str(SPEAK_AT_S),
            "--dtmf", f"#@{hash_at}", "--timeout", str(CALL_S),
        )  # fmt: skip
        started.append(caller)
        await caller.finish(CALL_S)
    assert caller.find("unheld") is not None, caller.report()
    record = await line.new_record(before)
    recorded = [s["value"] for s in record["path"] if s["input"] == "record"]
    # Before: ["silent", ...]: the message ended 12 s after the beep, during the hold.
    assert len(recorded) == 1 and recorded[0] != "silent", record["path"]
    assert record["outcome"] == "message_taken", record
    # The speech after the hold is in it: about 1 s before the hold and 6 s after it.
    assert float(recorded[0].rstrip("s")) >= 4.0, recorded
    answer = await line.get(f"/v1/calls/{record['id']}/voicemail")
    assert answer.status == 200, answer
