"""What a voice-code call reports when its code's readings do not all play (plain regression
tests of faults tests/unit/test_prop_sip_channels.py found): the README's rule is that the call
delivers when the code was read to its end at least once, and only then."""

from __future__ import annotations

from pathlib import Path

from tests.unit.test_prop_sip_channels import CallStory, voice_call_story
from verification.model import EventKind, Status
from verification.rules import DeliveryKind

ANSWERED = ("answer", 0.1, 200)


def test_a_code_the_worker_could_not_play_is_not_delivered(tmp_path: Path) -> None:
    # pjsua2 could not open or send the code's file (each of the two readings): the worker
    # reports each play's end at once, and a plain end counted as the code read twice.
    story = CallStory((), ANSWERED, (), 2.0, None, frozenset({1, 2}), None, False)
    worker, ledger = voice_call_story(tmp_path / "private", "481523", story, keypress=False)
    assert worker.code_heard == 0
    last = ledger.reports[-1]
    assert (last.kind, last.detail) == (
        DeliveryKind.UNDELIVERABLE,
        "answered, but the code could not be played",
    )
    assert [e.kind for e in ledger.v.events][-2:] == [EventKind.UNDELIVERABLE, EventKind.FALLBACK]


def test_a_call_put_on_hold_during_the_repeat_has_delivered_the_code(tmp_path: Path) -> None:
    # The first reading ended, then the call went on hold and the repeat never ended: the
    # code was heard in full once, yet this was undeliverable (and the next channel sent a
    # second code at once).
    story = CallStory((), ANSWERED, (), 2.0, 1, frozenset(), None, False)
    worker, ledger = voice_call_story(tmp_path / "private", "481523", story, keypress=False)
    assert worker.code_heard == 1 and worker.hangups
    last = ledger.reports[-1]
    assert (last.kind, last.detail) == (
        DeliveryKind.DELIVERED,
        "code read once, then nothing could be played in 30 s (on hold?)",
    )
    assert ledger.v.status is Status.PENDING and ledger.v.step == 0 and not ledger.v.sending


def test_a_question_the_worker_could_not_play_is_not_waited_on(tmp_path: Path) -> None:
    # pjsua2 could not play the "press 1" question (both times): the callee heard nothing,
    # yet each failed play counted as the question asked, so the call waited 8 s twice for
    # a 1 nobody was asked for and blamed the callee ("voicemail?").
    story = CallStory((), ANSWERED, (), 2.0, None, frozenset({1, 2}), None, False)
    worker, ledger = voice_call_story(tmp_path / "private", "481523", story, keypress=True)
    last = ledger.reports[-1]
    assert (last.kind, last.detail) == (
        DeliveryKind.UNDELIVERABLE,
        "answered, but the question could not be played",
    )
    assert worker.plays == 1 and worker.code_heard == 0 and worker.hangups
