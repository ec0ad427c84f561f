"""The flow engine, table-driven: VoiceXML counters, type-ahead, barge-in, 0 and *, safety."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import date
from pathlib import Path

import pytest

from voice.ivr.engine import (
    MAX_REPLY_VALUE_CHARS,
    OUT_OF_HOURS_UNHEARD_OUTCOME,
    PROMPT_FAILED,
    SUMMARY_HEADER,
    Action,
    CallRecord,
    CallState,
    Close,
    Digit,
    Engine,
    Event,
    HangUp,
    HangupCall,
    LineClosing,
    Listen,
    NoInput,
    Pending,
    Phase,
    Play,
    PostWebhook,
    PromptDone,
    PromptFailed,
    RecordAudio,
    RecordDone,
    SpeechResult,
    StopPlay,
    Store,
    TransferCall,
    TransferResult,
    WebhookResult,
)
from voice.ivr.flow import FlowParams, FlowSet, load_flows
from voice.ivr.simulate import TransferEnding, script_call
from voice.ivr.triage import Urgency

SHIPPED = Path(__file__).resolve().parents[2] / "ivr_flows"
STAFF = FlowParams().staff_uri
NURSE = FlowParams().nurse_uri

TEST_FLOW = """\
id: t
language: en
human: staff
start: hello
nodes:
  hello:
    say: "Hello from {clinic_name}."
    next: menu
  menu:
    ask:
      prompt: "Pick one."
      save: pick
      noinput: ["I did not hear you.", "Still nothing."]
      nomatch: ["That is not an option."]
      min_confidence: 0.5
      choices:
        - {key: "1", phrases: [apples], value: apple, label: apples, goto: number}
        - {key: "2", phrases: [pears], value: pear, label: pears, goto: vm}
  number:
    ask:
      mode: keypad
      prompt: "Enter your number then hash."
      digits: {min: 3, max: 5, terminator: "#"}
      save: number
      next: post
  post:
    webhook: {url: scheduling, values: [pick, number], save: reply}
    next: done
    on_fail: sorry
  done:
    say: "Booked {reply.when}."
    next: bye
  sorry:
    transfer: staff
    prompt: "Connecting you."
  vm:
    record: {prompt: "Speak after the tone.", max_s: 30, save: message}
    next: bye
  bye:
    hangup: "Goodbye."
    outcome: done
"""


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    (tmp_path / "t.yaml").write_text(TEST_FLOW, encoding="utf-8")
    return Engine(load_flows(tmp_path), FlowParams(speech_enabled=True, clinic_name="Oak"))


@pytest.fixture(scope="module")
def shipped() -> FlowSet:
    return load_flows(SHIPPED)


def feed(engine: Engine, events: list[Event]) -> tuple[CallState, list[list[Action]]]:
    state, first = engine.start(engine.flowset.get("t"))
    steps = [first]
    for event in events:
        state, actions = engine.handle(state, event)
        steps.append(actions)
    return state, steps


def texts(actions: list[Action]) -> list[str]:
    return [a.text for a in actions if isinstance(a, Play)]


DONE = PromptDone()
OFFER = (
    "Sorry, nobody can take your call right now. If this is an emergency, hang up and call 1 1 2 "
    "now. Otherwise, after the tone, please say your name, your date of birth and why you are "
    "calling, and the clinic will call you back. Press hash when you are done."
)
MESSAGE_KEPT = (
    "Thank you. Your message has been recorded, and the clinic will call you back. Goodbye."
)

# (name, events, the last step's actions as (type name, key text) pairs, final phase)
TABLE: list[tuple[str, list[Event], list[tuple[str, str]], Phase]] = [
    (
        "greeting then prompt",
        [DONE],
        [("Play", "Pick one. Say apples or press 1. Say pears or press 2.")],
        Phase.PLAYING,
    ),
    ("listen after the prompt", [DONE, DONE], [("Listen", "")], Phase.LISTENING),
    (
        "noinput tapers 1",
        [DONE, DONE, NoInput()],
        [("Play", "I did not hear you. Pick one. Say apples or press 1. Say pears or press 2.")],
        Phase.PLAYING,
    ),
    (
        "noinput tapers 2",
        [DONE, DONE, NoInput(), DONE, NoInput()],
        [("Play", "Still nothing. Pick one. Say apples or press 1. Say pears or press 2.")],
        Phase.PLAYING,
    ),
    (
        "noinput limit reaches staff",
        [DONE, DONE, NoInput(), DONE, NoInput(), DONE, NoInput()],
        [("Play", "Connecting you to a member of staff.")],
        Phase.PLAYING,
    ),
    (
        "wrong key is a nomatch",
        [DONE, DONE, Digit("7")],
        [("Play", "That is not an option. Pick one. Say apples or press 1. Say pears or press 2.")],
        Phase.PLAYING,
    ),
    (
        "low confidence is a nomatch",
        [DONE, DONE, SpeechResult("apples", 0.2)],
        [("Play", "That is not an option. Pick one. Say apples or press 1. Say pears or press 2.")],
        Phase.PLAYING,
    ),
    (
        "star repeats",
        [DONE, DONE, Digit("*")],
        [("Play", "Pick one. Say apples or press 1. Say pears or press 2.")],
        Phase.PLAYING,
    ),
    (
        "zero reaches staff",
        [DONE, DONE, Digit("0")],
        [("Play", "Connecting you to a member of staff.")],
        Phase.PLAYING,
    ),
    (
        "'operator' reaches staff",
        [DONE, DONE, SpeechResult("operator please", 0.9)],
        [("Play", "Connecting you to a member of staff.")],
        Phase.PLAYING,
    ),
    (
        "speech picks a choice",
        [DONE, DONE, SpeechResult("pears", 0.9)],
        [("Play", "Speak after the tone.")],
        Phase.PLAYING,
    ),
    (
        "barge-in by key stops the prompt",
        [DONE, Digit("2")],
        [("StopPlay", ""), ("Play", "Speak after the tone.")],
        Phase.PLAYING,
    ),
    (
        "barge-in by speech",
        [DONE, SpeechResult("apples", 0.9)],
        [("StopPlay", ""), ("Play", "Enter your number then hash.")],
        Phase.PLAYING,
    ),
    (
        "type-ahead skips the prompt",
        [Digit("1")],
        [("StopPlay", ""), ("Play", "Enter your number then hash.")],
        Phase.PLAYING,
    ),
    (
        "part of an entry typed over its prompt: listen for the rest",
        [Digit("1"), Digit("1")],
        [("StopPlay", ""), ("Listen", "")],
        Phase.LISTENING,
    ),
    (
        "the rest of an entry typed over its prompt completes it",
        [Digit("1"), Digit("1"), Digit("2"), Digit("3"), Digit("#")],
        [("PostWebhook", "")],
        Phase.WEBHOOK,
    ),
    (
        "a stray hash over a prompt answers nothing: the prompt plays on",
        [DONE, Digit("#")],
        [],
        Phase.PLAYING,
    ),
    (
        "and its question is heard and listened for",
        [DONE, Digit("#"), DONE],
        [("Listen", "")],
        Phase.LISTENING,
    ),
    (
        "digits collect until hash",
        [Digit("1"), DONE, DONE, Digit("1"), Digit("2"), Digit("3"), Digit("#")],
        [("PostWebhook", "")],
        Phase.WEBHOOK,
    ),
    (
        "an entry at its max waits for the hash: it may be a longer one typed on",
        [Digit("1"), DONE, DONE, *[Digit(k) for k in "12345"]],
        [],
        Phase.LISTENING,
    ),
    (
        "and the hash ends it",
        [Digit("1"), DONE, DONE, *[Digit(k) for k in "12345#"]],
        [("PostWebhook", "")],
        Phase.WEBHOOK,
    ),
    (
        "or the inter-digit timeout",
        [Digit("1"), DONE, DONE, *[Digit(k) for k in "12345"], NoInput()],
        [("PostWebhook", "")],
        Phase.WEBHOOK,
    ),
    (
        "a digit more is refused, not cut off",
        [Digit("1"), DONE, DONE, *[Digit(k) for k in "1234567#"]],
        [("Play", "Sorry, that entry had too many digits. Enter your number then hash.")],
        Phase.PLAYING,
    ),
    (
        "also when the timeout ends it",
        [Digit("1"), DONE, DONE, *[Digit(k) for k in "123456"], NoInput()],
        [("Play", "Sorry, that entry had too many digits. Enter your number then hash.")],
        Phase.PLAYING,
    ),
    (
        "too few digits is a nomatch, and the caller is told so",
        [Digit("1"), DONE, DONE, Digit("1"), Digit("2"), Digit("#")],
        [
            (
                "Play",
                "Sorry, that entry was not complete. It needs at least 3 digits. "
                "Enter your number then hash.",
            )
        ],
        Phase.PLAYING,
    ),
    (
        "0 alone in a digits ask is staff",
        [Digit("1"), DONE, DONE, Digit("0"), Digit("#")],
        [("Play", "Connecting you to a member of staff.")],
        Phase.PLAYING,
    ),
    (
        "interdigit timeout completes",
        [Digit("1"), DONE, DONE, Digit("1"), Digit("2"), Digit("3"), NoInput()],
        [("PostWebhook", "")],
        Phase.WEBHOOK,
    ),
    (
        "webhook reply is spoken",
        [
            Digit("1"),
            DONE,
            DONE,
            *[Digit(k) for k in "123#"],
            WebhookResult(True, {"when": "Monday 9:00"}),
        ],
        [("Play", "Booked Monday 9:00.")],
        Phase.PLAYING,
    ),
    (
        "webhook failure goes on_fail",
        [Digit("1"), DONE, DONE, *[Digit(k) for k in "123#"], WebhookResult(False)],
        [("Play", "Connecting you.")],
        Phase.PLAYING,
    ),
    ("record after its prompt", [Digit("2"), DONE], [("RecordAudio", "")], Phase.RECORDING),
    (
        "recording done goes on",
        [Digit("2"), DONE, RecordDone("m.wav", 4)],
        [("Play", "Goodbye.")],
        Phase.PLAYING,
    ),
    (
        "a silent message is asked for once more",
        [Digit("2"), DONE, RecordDone(duration_s=12, silent=True)],
        [("Play", "Sorry, I did not hear a message. Speak after the tone.")],
        Phase.PLAYING,
    ),
    (
        "and recorded again after its prompt",
        [Digit("2"), DONE, RecordDone(silent=True), DONE],
        [("RecordAudio", "")],
        Phase.RECORDING,
    ),
    (
        "silent twice: a human takes the request",
        [Digit("2"), DONE, RecordDone(silent=True), DONE, RecordDone(silent=True)],
        [("Play", "Sorry, I did not hear a message. Connecting you to a member of staff.")],
        Phase.PLAYING,
    ),
    (
        "a message that could not be saved: a human takes the request",
        [Digit("2"), DONE, RecordDone(duration_s=9)],
        [("Play", "Sorry, your message could not be saved. Connecting you to a member of staff.")],
        Phase.PLAYING,
    ),
    (
        "goodbye then hang up",
        [Digit("2"), DONE, RecordDone("m.wav", 4), DONE],
        [("HangupCall", ""), ("Store", "")],  # the BYE does not wait for the save
        Phase.ENDED,
    ),
    ("caller hangs up", [DONE, HangUp()], [("Store", "")], Phase.ENDED),
    (
        "stale events are ignored",
        [DONE, DONE, DONE, TransferResult(True), WebhookResult(True)],
        [],
        Phase.LISTENING,
    ),
    (
        "transfer failure: the caller may leave a message",
        [DONE, DONE, Digit("0"), DONE, TransferResult(False)],
        [("Play", OFFER)],
        Phase.PLAYING,
    ),
    (
        "which is recorded after its prompt",
        [DONE, DONE, Digit("0"), DONE, TransferResult(False), DONE],
        [("RecordAudio", "")],
        Phase.RECORDING,
    ),
]


def describe(actions: list[Action]) -> list[tuple[str, str]]:
    return [(type(a).__name__, getattr(a, "text", "")) for a in actions]


@pytest.mark.parametrize(
    ("events", "expected", "phase"), [t[1:] for t in TABLE], ids=[t[0] for t in TABLE]
)
def test_engine_table(
    engine: Engine, events: list[Event], expected: list[tuple[str, str]], phase: Phase
) -> None:
    state, steps = feed(engine, events)
    assert describe(steps[-1]) == expected
    assert state.phase is phase


def test_first_prompt_renders_parameters(engine: Engine) -> None:
    _, steps = feed(engine, [])
    assert texts(steps[0]) == ["Hello from Oak."]


def test_listen_offers_choices_and_the_global_words(engine: Engine) -> None:
    _, steps = feed(engine, [DONE, DONE])
    listen = steps[-1][0]
    assert isinstance(listen, Listen)
    assert listen.keys == ("1", "2", "0", "*")
    assert {"apples", "pears", "operator", "repeat"} <= set(listen.phrases)
    assert listen.speech and listen.max_digits == 1


def test_webhook_posts_the_collected_values(engine: Engine) -> None:
    _, steps = feed(engine, [Digit("1"), DONE, DONE, *[Digit(k) for k in "4567#"]])
    post = steps[-1][0]
    assert isinstance(post, PostWebhook)
    assert (post.url_key, dict(post.values)) == ("scheduling", {"pick": "apple", "number": "4567"})


def test_the_record_keeps_path_values_and_outcome(engine: Engine) -> None:
    state, actions = script_call(engine, "t", ["1", "123#"], webhook_data={"when": "today"})
    assert state.phase is Phase.ENDED
    store = next(a for a in actions if isinstance(a, Store))
    rec = store.record
    assert rec.outcome == "done"
    assert dict(rec.values) == {"pick": "apple", "number": "123", "reply.when": "today"}
    assert [(s.node, s.input, s.value) for s in rec.path if s.input] == [
        ("menu", "digit", "1"),
        ("number", "digits", "123"),
        ("post", "webhook", "ok"),
    ]
    assert [type(a) for a in actions[-2:]] == [HangupCall, Store]


def test_a_webhook_reply_keeps_only_the_fields_a_flow_reads(engine: Engine) -> None:
    # A server answering with many (or new) field names must not grow the call's values and
    # its records: only {reply.when} is read anywhere in this flow set.
    many = {f"field{i}": "x" * 40 for i in range(5000)}
    _, actions = script_call(engine, "t", ["1", "123#"], webhook_data={**many, "when": "today"})
    store = next(a for a in actions if isinstance(a, Store))
    assert dict(store.record.values) == {"pick": "apple", "number": "123", "reply.when": "today"}


OFFER_FLOW = """\
id: t
language: en
human: staff
start: post
nodes:
  post:
    webhook: {url: scheduling, values: [], save: offer}
    next: pick
    on_fail: bye
  pick:
    ask:
      mode: keypad
      prompt: "The first free time is:"
      save: slot
      choices:
        - {key: "1", label: "{offer.first}", value: first, goto: bye}
  bye:
    hangup: "Goodbye."
    outcome: done
"""


def test_a_webhook_field_spoken_in_a_choice_label_is_kept(tmp_path: Path) -> None:
    # The hint "For {offer.first}, press 1" is spoken (Flow.ask_prompt): a read, as a prompt's
    # placeholder is. Left out, the caller heard "For , press 1." with a clean flow check.
    (tmp_path / "t.yaml").write_text(OFFER_FLOW, encoding="utf-8")
    engine = Engine(load_flows(tmp_path), FlowParams())
    _, actions = script_call(engine, "t", ["1"], webhook_data={"first": "Monday at nine"})
    said = [a.text for a in actions if isinstance(a, Play)]
    assert said[0] == "The first free time is: For Monday at nine, press 1."


def test_an_over_long_webhook_field_is_left_out_and_counted(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "Monday at nine with Dr Oak. " * 40
    assert len(secret) > MAX_REPLY_VALUE_CHARS
    with caplog.at_level(logging.DEBUG, logger="voice.ivr.engine"):
        _, actions = script_call(
            engine, "t", ["1", "123#"], webhook_data={"when": secret, "other": "x"}
        )
    assert "Booked ." in [a.text for a in actions if isinstance(a, Play)]
    store = next(a for a in actions if isinstance(a, Store))
    assert "reply.when" not in dict(store.record.values)
    logged = [r.getMessage() for r in caplog.records]
    assert any("1 field(s) the flows read are over 500 characters" in m for m in logged)
    assert any("1 field(s) no flow reads" in m for m in logged)
    assert not any("Monday" in m or "other" in m for m in logged)  # counts, never content


def test_a_transfer_carries_the_summary_only_when_asked(engine: Engine) -> None:
    events: list[Event] = [
        Digit("1"), DONE, DONE, *[Digit(k) for k in "123#"], WebhookResult(False), DONE
    ]  # fmt: skip
    full = Engine(engine.flowset, replace(engine.params, transfer_summary="full"))
    transfer = feed(full, events)[1][-1][0]
    assert isinstance(transfer, TransferCall) and transfer.uri == STAFF
    assert dict(transfer.headers) == {SUMMARY_HEADER: "flow=t; pick=apple; number=123"}
    # The default ("urgency"): no answers in the SIP headers; this flow has no triage.
    transfer = feed(engine, events)[1][-1][0]
    assert isinstance(transfer, TransferCall) and transfer.headers == ()


@pytest.mark.parametrize(
    ("mode", "headers"),
    [
        ("none", set()),
        ("urgency", {"X-Clinic-Urgency"}),
        ("full", {"X-Clinic-Urgency", SUMMARY_HEADER}),
    ],
)
def test_a_triage_transfer_tells_the_urgency_unless_told_not_to(
    shipped: FlowSet, mode: str, headers: set[str]
) -> None:
    engine = Engine(shipped, FlowParams(transfer_summary=mode))
    _, actions = script_call(engine, "triage", ["1", "1"])
    transfer = next(a for a in actions if isinstance(a, TransferCall))
    assert {name for name, _ in transfer.headers} == headers
    if mode == "full":
        assert "difficulty breathing" in dict(transfer.headers)[SUMMARY_HEADER]


def test_after_the_end_nothing_happens(engine: Engine) -> None:
    state, _ = feed(engine, [HangUp()])
    assert engine.handle(state, Digit("1")) == (state, [])


# -- shipped flows ----------------------------------------------------------------------------


def test_keypad_only_prompts_name_the_answer_before_its_key(shipped: FlowSet) -> None:
    # "For yes, press 1": the listener knows what the key is for before the number to
    # remember (it was "Press 1 for yes": the key first, its meaning after).
    engine = Engine(shipped, FlowParams(speech_enabled=False))
    state, actions = script_call(engine, "triage", ["1"])
    assert state.node == "breathing"
    assert texts(actions)[-1].endswith("For yes, press 1. For no, press 2.")
    listen = actions[-1]
    assert isinstance(listen, Listen) and not listen.speech and listen.phrases == ()


def test_speech_prompts_say_say_yes(shipped: FlowSet) -> None:
    engine = Engine(shipped, FlowParams(speech_enabled=True))
    _, actions = script_call(engine, "triage", ["1"])
    assert texts(actions)[-1].endswith("Say yes or press 1. Say no or press 2.")


def test_spoken_yes_to_breathing_is_an_emergency(shipped: FlowSet) -> None:
    engine = Engine(shipped, FlowParams(speech_enabled=True))
    _, actions = script_call(engine, "triage", ["myself", "yeah"])
    store = next(a for a in actions if isinstance(a, Store))
    assert store.record.urgency is Urgency.U1
    step = next(s for s in store.record.path if s.node == "breathing" and s.input)
    assert (step.input, step.value, step.confidence) == ("speech", "yeah", 1.0)


def test_low_confidence_on_a_danger_sign_escalates(shipped: FlowSet) -> None:
    engine = Engine(shipped, FlowParams(speech_enabled=True))
    state, actions = script_call(engine, "triage", ["1", "~0.2 no", "~0.3 no"])
    assert state.phase is Phase.ENDED
    store = next(a for a in actions if isinstance(a, Store))
    assert store.record.urgency is Urgency.U2
    assert store.record.transfer_target == NURSE


def test_zero_in_the_triage_reaches_the_nurse(shipped: FlowSet) -> None:
    engine = Engine(shipped, FlowParams())
    _, actions = script_call(engine, "triage", ["1", "2", "0"])
    transfers = [a for a in actions if isinstance(a, TransferCall)]
    assert [t.uri for t in transfers] == [NURSE]


def test_korean_flow_yes_transfers_to_the_nurse(shipped: FlowSet) -> None:
    engine = Engine(shipped, FlowParams(speech_enabled=True))
    flow = shipped.route("ko")
    assert (flow.id, flow.language) == ("triage_ko", "ko")
    _, actions = script_call(engine, flow.id, ["예"])
    store = next(a for a in actions if isinstance(a, Store))
    assert (store.record.urgency, store.record.transfer_target) == (Urgency.U1, NURSE)
    plays = [a for a in actions if isinstance(a, Play)]
    assert plays[1].language == "ko" and plays[1].text.startswith("숨쉬기가 힘드세요?")


def test_korean_flow_opens_with_the_emergency_number_and_the_keys(shipped: FlowSet) -> None:
    # The walk-through: the Korean line began at the breathing question, with no emergency
    # advice and no word of 0 (the nurse) or * (again), which the English triage's opening
    # tells. Its opening now says them first, in Korean.
    engine = Engine(shipped, FlowParams(speech_enabled=True))
    _, actions = engine.start(shipped.get("triage_ko"))
    (opening,) = [a for a in actions if isinstance(a, Play)]
    assert opening.language == "ko"
    assert "응급 상황이면 전화를 끊고 1 1 2번으로 전화하세요." in opening.text
    assert "간호사와 통화하려면 0번" in opening.text and "별표" in opening.text
    assert not opening.text.startswith("숨쉬기가 힘드세요?")


@pytest.mark.parametrize("open_now", [True, False], ids=["open", "closed"])
@pytest.mark.parametrize("answer", ["아니요", "2"])
def test_korean_flow_no_reaches_the_nurse(shipped: FlowSet, answer: str, open_now: bool) -> None:
    # The Korean flow asks one danger sign of five: its "no" is no finished triage, so it
    # is never "thank you, goodbye" (a U5 end with chest pain, consciousness, bleeding and
    # stroke signs unasked), but U2 and the nurse; out of hours, the out-of-hours service
    # first.
    engine = Engine(shipped, FlowParams(speech_enabled=True, open_now=lambda: open_now))
    state, actions = script_call(engine, "triage_ko", [answer])
    assert state.phase is Phase.ENDED
    store = next(a for a in actions if isinstance(a, Store))
    assert (store.record.outcome, store.record.transfer_target) == ("transfer_nurse", NURSE)
    # U2, as for a danger sign left unanswered: the nurse must not read U5 (all clear).
    assert store.record.urgency is Urgency.U2
    said = " ".join(texts(actions))
    assert "안녕히 계세요" not in said
    assert ("진료 시간이 아닙니다" in said) is not open_now


def test_main_menu_4_enters_the_triage(shipped: FlowSet) -> None:
    engine = Engine(shipped, FlowParams())
    state, _ = script_call(engine, "main_menu", ["4"])
    assert (state.flow, state.node) == ("triage", "for_whom")


def test_appointment_is_posted_and_confirmed(shipped: FlowSet) -> None:
    engine = Engine(shipped, FlowParams())
    state, actions = script_call(
        engine,
        "main_menu",
        ["1", "1", "01021990#", "123456#"],
        webhook_data={"message": "See you Monday."},
    )
    post = next(a for a in actions if isinstance(a, PostWebhook))
    assert dict(post.values) == {
        "appt_action": "book",
        "dob": "01021990",
        "patient_number": "123456",
        "request": "appointment",
    }
    assert (
        "Thank you. Your request to book an appointment has been received. See you Monday."
        in texts(actions)
    )
    assert state.outcome == "appointment_requested"


def test_results_are_never_read_out(shipped: FlowSet) -> None:
    engine = Engine(shipped, FlowParams())
    _, actions = script_call(
        engine, "results", ["01021990#", "1234#", "2"], webhook_data={"ready": "yes"}
    )
    assert any("ready in the patient portal" in t for t in texts(actions))


def test_prescription_records_a_bounded_message(shipped: FlowSet) -> None:
    engine = Engine(shipped, FlowParams())
    state, actions = script_call(engine, "prescription", ["01021990#", "1234#"])
    assert [a.max_s for a in actions if isinstance(a, RecordAudio)] == [60]
    assert state.outcome == "prescription_requested"


# -- safety of the triage (found by a review that drove the shipped flow) ----------------------


def record_of(actions: list[Action]) -> Store:
    return next(a for a in actions if isinstance(a, Store))


def test_an_urgent_caller_whose_nurse_transfer_fails_is_put_through_to_staff(
    shipped: FlowSet,
) -> None:
    engine = Engine(shipped, FlowParams())
    state, actions = script_call(engine, "triage", ["1", "1"], transfer=TransferEnding.FAILS)
    assert [a.uri for a in actions if isinstance(a, TransferCall)] == [NURSE, STAFF]
    said = " ".join(texts(actions))
    assert "I am trying someone else at the clinic" in said
    assert "Please hang up now and call 1 1 2." in said
    assert "call again later" not in said  # never to a caller at U1
    store = record_of(actions)
    assert (store.record.urgency, store.record.outcome) == (Urgency.U1, "transfer_failed")
    assert state.transfers_failed == (NURSE, STAFF)


def test_a_caller_at_u2_whose_transfer_fails_gets_the_other_human_too(shipped: FlowSet) -> None:
    engine = Engine(shipped, FlowParams())
    # no red flag, then severe sudden pain: U2, "speak to a nurse now"
    answers = ["1", "2", "2", "2", "2", "2", "2", "3", "1", "5"]
    _, actions = script_call(engine, "triage", answers, transfer=TransferEnding.FAILS)
    assert [a.uri for a in actions if isinstance(a, TransferCall)] == [NURSE, STAFF]
    assert record_of(actions).record.urgency is Urgency.U2


def test_a_failed_transfer_that_is_not_urgent_takes_a_message(engine: Engine) -> None:
    # the test flow's webhook fails -> staff transfer; it fails too: no triage, no retry
    _, actions = script_call(
        engine, "t", ["1", "123#"], webhook_ok=False, transfer=TransferEnding.FAILS
    )
    assert [a.uri for a in actions if isinstance(a, TransferCall)] == [STAFF]
    assert texts(actions)[-2:] == [OFFER, MESSAGE_KEPT]
    record = record_of(actions).record
    assert record.outcome == "message_left" and record.urgency is None


def test_an_urgent_caller_nobody_reached_is_never_asked_for_a_message(
    shipped: FlowSet,
) -> None:
    engine = Engine(shipped, FlowParams())
    answers = ["1", "2", "2", "2", "2", "2", "2", "3", "1", "5"]  # U2, as above
    _, actions = script_call(engine, "triage", answers, transfer=TransferEnding.FAILS)
    assert not any(isinstance(a, RecordAudio) for a in actions)
    assert texts(actions)[-1] == (
        "Sorry, I could not reach anyone at the clinic. Please hang up now and call 1 1 2."
    )
    assert record_of(actions).record.outcome == "transfer_failed"


@pytest.mark.parametrize("heard", ["yes he is gasping", "yes I don't know what to do", "yes maybe"])
def test_a_yes_with_more_words_still_escalates(shipped: FlowSet, heard: str) -> None:
    engine = Engine(shipped, FlowParams(speech_enabled=True))
    _, actions = script_call(engine, "triage", ["myself", heard])
    assert record_of(actions).record.urgency is Urgency.U1


@pytest.mark.parametrize(
    "heard",
    [
        "no, he is not breathing at all",  # a negation around the answer
        "I have no idea",  # unsure, and holds "no"
        "not sure",
    ],
)
def test_only_a_plain_no_answers_a_danger_sign(shipped: FlowSet, heard: str) -> None:
    engine = Engine(shipped, FlowParams(speech_enabled=True))
    state, _ = script_call(engine, "triage", ["myself", heard])
    assert state.node == "breathing" and state.value("breathing") is None
    assert state.triage is not None and state.triage.urgency is Urgency.U2


def test_a_no_with_unknown_words_around_it_is_unclear(shipped: FlowSet) -> None:
    engine = Engine(shipped, FlowParams(speech_enabled=True))
    state, _ = script_call(engine, "triage", ["myself"])
    state, _ = engine.handle(state, PromptDone())
    state, _ = engine.handle(state, SpeechResult("no", 0.9, unknown_words=3))
    assert state.node == "breathing" and state.value("breathing") is None
    state, _ = engine.handle(state, PromptDone())
    state, _ = engine.handle(state, SpeechResult("no", 0.9))
    assert (state.node, state.value("breathing")) == ("chest", "no")


def test_unsure_on_an_ordinary_question_is_asked_again_without_escalation(
    shipped: FlowSet,
) -> None:
    engine = Engine(shipped, FlowParams(speech_enabled=True))
    state, _ = script_call(engine, "triage", ["1", "2", "2", "2", "2", "2", "1", "no idea"])
    assert state.node == "fever_ill" and state.value("fever_very_ill") is None
    assert state.triage is None or state.triage.urgency is Urgency.U5


# The triage's five danger signs answered "no", then a complaint: its first question is one
# whose "yes" makes the call U2 (not a danger sign).
TO_URGENT_QUESTION = {
    "fever_ill": ["1", "2", "2", "2", "2", "2", "1"],
    "cough_rest": ["1", "2", "2", "2", "2", "2", "4"],
    "stomach_severe": ["1", "2", "2", "2", "2", "2", "5"],
}


@pytest.mark.parametrize("node", sorted(TO_URGENT_QUESTION))
@pytest.mark.parametrize("heard", ["no, he's gasping", "no but it is getting worse"])
def test_only_a_plain_no_answers_a_question_whose_yes_is_urgent(
    shipped: FlowSet, node: str, heard: str
) -> None:
    engine = Engine(shipped, FlowParams(speech_enabled=True))
    state, _ = script_call(engine, "triage", [*TO_URGENT_QUESTION[node], heard])
    assert state.node == node, f"{heard!r} answered {node}"
    assert state.path[-1].input == "unclear"
    state, _ = script_call(engine, "triage", [*TO_URGENT_QUESTION[node], heard, "no"])
    assert state.node != node, "a plain no the second time answers it"


@pytest.mark.parametrize("node", sorted(TO_URGENT_QUESTION))
def test_a_yes_with_more_words_to_an_urgent_question_counts(shipped: FlowSet, node: str) -> None:
    engine = Engine(shipped, FlowParams(speech_enabled=True))
    state, _ = script_call(engine, "triage", [*TO_URGENT_QUESTION[node], "yes, I think so"])
    assert state.triage is not None and state.triage.urgency is Urgency.U2


def test_a_no_with_words_around_it_on_an_ordinary_question_still_counts(
    shipped: FlowSet,
) -> None:
    # cough_long's "yes" is U4, no U2: words around its "no" are fine.
    engine = Engine(shipped, FlowParams(speech_enabled=True))
    state, _ = script_call(engine, "triage", [*TO_URGENT_QUESTION["cough_rest"], "no", "no"])
    assert state.node == "cough_long"
    state, _ = engine.handle(state, PromptDone())
    state, _ = engine.handle(state, SpeechResult("no, only a week", 1.0))
    assert state.value("cough_long") == "no"


@pytest.mark.parametrize("node", sorted(TO_URGENT_QUESTION))
@pytest.mark.parametrize(
    "lines",
    [["0"], ["nurse"], [":silence"] * 3, ["no he's gasping"] * 3],
    ids=["zero", "nurse", "silence", "unclear"],
)
def test_an_urgent_question_left_unanswered_reaches_the_nurse_at_u2(
    shipped: FlowSet, node: str, lines: list[str]
) -> None:
    # Not U5: the nurse must see that an answer that could make the call urgent is missing.
    engine = Engine(shipped, FlowParams(speech_enabled=True))
    _, actions = script_call(engine, "triage", [*TO_URGENT_QUESTION[node], *lines])
    transfer = next(a for a in actions if isinstance(a, TransferCall))
    assert transfer.uri == NURSE
    assert ("X-Clinic-Urgency", "U2") in transfer.headers
    record = record_of(actions).record
    assert record.urgency is Urgency.U2
    assert f"unanswered: {node}" in record.reasons


@pytest.mark.parametrize("node", sorted(TO_URGENT_QUESTION))
def test_keys_typed_before_an_urgent_question_do_not_answer_it(shipped: FlowSet, node: str) -> None:
    # "42" in one go (a double press, or typing ahead): the "2" must not say "no" to
    # "short of breath at rest?" before the caller heard it, as for a danger sign.
    engine = Engine(shipped, FlowParams())
    keys = TO_URGENT_QUESTION[node]
    state, _ = script_call(engine, "triage", [*keys[:-1], keys[-1] + "2"])
    assert (state.node, state.value(node), state.typeahead) == (node, None, ""), state.path[-3:]
    assert state.triage is None or state.triage.urgency is Urgency.U5


def test_a_no_pressed_while_an_urgent_question_plays_is_dropped(shipped: FlowSet) -> None:
    engine = Engine(shipped, FlowParams())
    state, _ = script_call(engine, "triage", TO_URGENT_QUESTION["cough_rest"])
    assert (state.node, state.phase) == ("cough_rest", Phase.LISTENING)
    state, _ = engine.handle(state, NoInput())  # asked again: its prompt plays
    assert state.phase is Phase.PLAYING
    state, _ = engine.handle(state, Digit("2"))
    assert (state.node, state.typeahead) == ("cough_rest", "")
    state, _ = engine.handle(state, Digit("1"))  # its "yes" errs the safe way: taken
    assert state.triage is not None and state.triage.urgency is Urgency.U2


def test_an_unclear_answer_to_an_urgent_question_then_a_no_does_not_escalate(
    shipped: FlowSet,
) -> None:
    # Asked again, not raised at once (unlike a danger sign): the plain answer stands.
    engine = Engine(shipped, FlowParams(speech_enabled=True))
    state, _ = script_call(engine, "triage", [*TO_URGENT_QUESTION["cough_rest"], "not sure", "no"])
    assert state.node == "cough_blood"
    assert state.triage is None or state.triage.urgency is Urgency.U5


@pytest.mark.parametrize("line", ["0", "the person is unconscious", "nurse"])
def test_asking_for_a_human_at_a_danger_sign_makes_the_call_urgent(
    shipped: FlowSet, line: str
) -> None:
    engine = Engine(shipped, FlowParams(speech_enabled=True))
    _, actions = script_call(engine, "triage", ["1", "2", "2", line])
    transfer = next(a for a in actions if isinstance(a, TransferCall))
    assert transfer.uri == NURSE
    assert ("X-Clinic-Urgency", "U2") in transfer.headers
    assert "unanswered: conscious" in record_of(actions).record.reasons


def test_a_double_press_does_not_answer_the_next_danger_sign(shipped: FlowSet) -> None:
    engine = Engine(shipped, FlowParams())
    state, actions = script_call(engine, "triage", ["1", "2", "22"])
    # The second 2 came while "unconscious?" was being asked: dropped, not a "no".
    assert (state.node, state.phase) == ("conscious", Phase.LISTENING)
    assert state.value("unconscious") is None
    assert not any(type(a).__name__ == "StopPlay" for a in actions)


DANGER_FLOW = """\
id: d
language: en
human: nurse
start: hello
nodes:
  hello:
    say: {text: "Listen carefully.", barge_in: false}
    next: breathing
  breathing:
    ask:
      prompt: "Trouble breathing?"
      danger_sign: true
      save: breathing
      choices:
        - {key: "1", phrases: [yes], label: "yes", urgency: U1, reason: b, goto: help}
        - {key: "2", phrases: ["no"], value: "no", label: "no", goto: help}
  help:
    transfer: nurse
    outcome: call_emergency+transfer_nurse
"""


def test_keys_typed_before_a_danger_sign_do_not_answer_it(tmp_path: Path) -> None:
    (tmp_path / "d.yaml").write_text(DANGER_FLOW, encoding="utf-8")
    engine = Engine(load_flows(tmp_path), FlowParams())
    state, _ = engine.start(engine.flowset.get("d"))
    state, _ = engine.handle(state, Digit("2"))  # during "Listen carefully."
    assert state.typeahead == "2"
    state, actions = engine.handle(state, PromptDone())
    assert (state.node, state.phase, state.typeahead) == ("breathing", Phase.PLAYING, "")
    assert texts(actions) == ["Trouble breathing? For yes, press 1. For no, press 2."]
    assert any(s.input == "typeahead_dropped" and s.value == "2" for s in state.path)


def _breathing_asked_again(engine: Engine) -> CallState:
    """The breathing question's reprompt playing (after one silence)."""
    state, _ = script_call(engine, "triage", ["1"])
    assert (state.node, state.phase) == ("breathing", Phase.LISTENING)
    state, _ = engine.handle(state, NoInput())
    assert (state.node, state.phase) == ("breathing", Phase.PLAYING)
    return state


def test_zero_during_a_danger_sign_prompt_still_reaches_a_human(shipped: FlowSet) -> None:
    engine = Engine(shipped, FlowParams())
    state, actions = engine.handle(_breathing_asked_again(engine), Digit("0"))
    assert isinstance(actions[0], StopPlay)
    state, actions = engine.handle(state, PromptDone())  # "Connecting you to a nurse."
    assert [a.uri for a in actions if isinstance(a, TransferCall)] == [NURSE]


def test_a_yes_pressed_while_a_danger_sign_plays_is_taken(shipped: FlowSet) -> None:
    # "... For yes, press 1." and the caller presses 1 before the prompt has ended.
    engine = Engine(shipped, FlowParams())
    state, actions = engine.handle(_breathing_asked_again(engine), Digit("1"))
    assert isinstance(actions[0], StopPlay) and state.node == "emergency"
    assert state.triage is not None and state.triage.urgency is Urgency.U1


def test_a_no_pressed_while_a_danger_sign_plays_is_dropped(shipped: FlowSet) -> None:
    engine = Engine(shipped, FlowParams())
    state, actions = engine.handle(_breathing_asked_again(engine), Digit("2"))
    assert actions == [] and (state.node, state.phase) == ("breathing", Phase.PLAYING)


def test_a_zero_typed_before_a_danger_sign_reaches_a_human(tmp_path: Path) -> None:
    (tmp_path / "d.yaml").write_text(DANGER_FLOW, encoding="utf-8")
    engine = Engine(load_flows(tmp_path), FlowParams())
    state, _ = engine.start(engine.flowset.get("d"))
    state, _ = engine.handle(state, Digit("0"))  # during the greeting, which takes no barge-in
    state, _ = engine.handle(state, PromptDone())
    assert state.pending is Pending.TRANSFER
    assert state.triage is not None and state.triage.urgency is Urgency.U2


def _at_the_emergency_transfer(engine: Engine) -> CallState:
    state, _ = script_call(engine, "triage", ["1"])
    state, _ = engine.handle(state, PromptDone())
    state, _ = engine.handle(state, Digit("1"))  # breathing: yes -> "This may be an emergency"
    state, _ = engine.handle(state, PromptDone())  # -> "Connecting you to a nurse now."
    assert (state.node, state.pending) == ("emergency_transfer", Pending.TRANSFER)
    return state


@pytest.mark.parametrize("refer_out", [False, True])
def test_hanging_up_before_the_transfer_is_not_recorded_as_one(
    shipped: FlowSet, refer_out: bool
) -> None:
    engine = Engine(shipped, FlowParams())
    state = _at_the_emergency_transfer(engine)
    if refer_out:
        state, actions = engine.handle(state, PromptDone())
        assert state.phase is Phase.TRANSFERRING and isinstance(actions[-1], TransferCall)
    state, actions = engine.handle(state, HangUp())
    store = record_of(actions)
    assert store.record.outcome == "hung_up_before_transfer"
    assert (store.record.urgency, store.record.transfer_target) == (Urgency.U1, None)


def test_a_transfer_that_went_through_is_recorded_as_one(shipped: FlowSet) -> None:
    engine = Engine(shipped, FlowParams())
    state = _at_the_emergency_transfer(engine)
    state, _ = engine.handle(state, PromptDone())
    state, actions = engine.handle(state, TransferResult(True))
    assert record_of(actions).record.outcome == "call_emergency+transfer_nurse"
    state, actions = engine.handle(state, HangUp())  # the worker's BYE after the REFER
    assert actions == []


def test_a_very_ill_fever_caller_is_still_asked_about_meningitis(shipped: FlowSet) -> None:
    engine = Engine(shipped, FlowParams())
    state, _ = script_call(engine, "triage", ["1", "2", "2", "2", "2", "2", "1", "1"])
    assert state.node == "fever_rash"


def test_a_prompt_with_the_calls_values_is_private(engine: Engine) -> None:
    _, steps = feed(
        engine, [DONE, DONE, Digit("1"), DONE, *map(Digit, "123#"), WebhookResult(True, {})]
    )
    plays = [a for step in steps for a in step if isinstance(a, Play)]
    assert [(p.text, p.private) for p in plays if "Booked" in p.text] == [("Booked .", True)]
    # the greeting names only the clinic (a setting): cached like every static prompt
    assert (plays[0].text, plays[0].private) == ("Hello from Oak.", False)


@pytest.mark.parametrize("refused", ["disk_low", "voicemail_full", "caller_limit"])
def test_a_message_refused_by_the_budget_goes_to_staff_and_says_why(
    engine: Engine, refused: str
) -> None:
    """No message recorded (voice/ivr/voicemail_budget.py): as one that could not be saved
    (the caller is told and put through to staff), the record's path naming why."""
    state, steps = feed(engine, [Digit("2"), DONE, RecordDone(refused=refused)])
    assert texts(steps[-1])[0].startswith("Sorry, your message could not be saved.")
    for event in (DONE, TransferResult(True)):
        state, _ = engine.handle(state, event)
    assert state.value("message") is None
    assert [s.value for s in state.path if s.input == "record"] == [refused]
    assert state.outcome == "transfer_staff"


@pytest.mark.parametrize("silent", [True, False])
def test_a_message_not_kept_is_never_recorded_as_one(engine: Engine, silent: bool) -> None:
    events: list[Event] = [Digit("2"), DONE, RecordDone(silent=silent)]
    if silent:
        events += [DONE, RecordDone(silent=True)]
    state, _ = feed(engine, [*events, DONE, TransferResult(True)])
    assert state.value("message") is None, "a message nobody can hear was recorded as one"
    kept = [s.value for s in state.path if s.input == "record"]
    assert kept == (["silent", "silent"] if silent else ["not_saved"])
    assert state.outcome == "transfer_staff"


@pytest.mark.parametrize(
    ("events", "cut", "outcome"),
    [
        ([DONE], "", "caller_hung_up"),
        ([DONE], "worker_lost", "cut_worker_lost"),  # mid-menu: someone should call back
        ([DONE, DONE, Digit("0")], "shutdown", "cut_shutdown"),  # during "connecting you"
        ([DONE, DONE, Digit("0")], "", "hung_up_before_transfer"),
        # The goodbye was under way: the call had reached its end, whatever cut it.
        ([Digit("2"), DONE, RecordDone("m.wav", 4)], "shutdown", "done"),
    ],
)
def test_a_call_cut_by_the_service_says_so(
    engine: Engine, events: list[Event], cut: str, outcome: str
) -> None:
    state, steps = feed(engine, [*events, HangUp(cut)])
    assert state.phase is Phase.ENDED
    (store,) = [a for a in steps[-1] if isinstance(a, Store)]
    assert store.record.outcome == outcome


# -- keys typed while a webhook runs (review of the non-triage menus) -------------------------


@pytest.mark.parametrize(
    "entry",
    [
        "1234567890#2",  # a key typed over the post
        "1234567890#2#",  # and a stray hash
    ],
)
def test_keys_typed_during_a_lookup_do_not_answer_the_next_question(
    shipped: FlowSet, entry: str
) -> None:
    engine = Engine(shipped, FlowParams())
    state, actions = script_call(
        engine, "results", ["01021990#", entry], webhook_data={"ready": "yes"}
    )
    post = next(a for a in actions if isinstance(a, PostWebhook))
    assert post.values["patient_number"] == "1234567890"
    # "2" would have said "no" to "discuss your results with staff?" before it was asked.
    assert (state.flow, state.node, state.phase) == ("results", "more", Phase.LISTENING)
    assert any(t.startswith("Would you like to discuss") for t in texts(actions))


@pytest.mark.parametrize(
    ("said", "value"), [("book", "book"), ("move", "move"), ("cancel", "cancel")]
)
def test_saying_an_appointment_hint_picks_its_choice(
    shipped: FlowSet, said: str, value: str
) -> None:
    engine = Engine(shipped, FlowParams(speech_enabled=True))
    state, actions = engine.start(shipped.get("appointments"))
    assert f"Say {said} or press" in texts(actions)[0]
    state, _ = engine.handle(state, PromptDone())
    state, _ = engine.handle(state, SpeechResult(said, 0.9))
    assert (state.node, state.value("appt_action")) == ("dob", value)


def test_the_appointment_menu_on_the_keypad_reads_naturally(shipped: FlowSet) -> None:
    _, actions = Engine(shipped, FlowParams()).start(shipped.get("appointments"))
    assert texts(actions) == [
        "To book an appointment, press 1. To move an appointment, press 2. To cancel an "
        "appointment, press 3. For the main menu, press 9."
    ]


# -- a date of birth must be a date (review of the non-triage menus) --------------------------

TODAY = date(2026, 3, 1)

# (entry, whether it is taken) with today 1 March 2026
DATES_OF_BIRTH: list[tuple[str, bool]] = [
    ("01021990", True),
    ("29022000", True),  # a leap day
    ("01032026", True),  # born today
    ("01031896", True),  # 130 years ago to the day
    ("99999999", False),
    ("00000000", False),
    ("00011990", False),  # day 0
    ("01131990", False),  # month 13
    ("31041990", False),  # 31 April
    ("29021999", False),  # not a leap year
    ("02032026", False),  # tomorrow
    ("01012030", False),  # in the future
    ("28021896", False),  # more than 130 years ago
]


@pytest.mark.parametrize("flow_id", ["appointments", "results", "prescription"])
@pytest.mark.parametrize(("entry", "taken"), DATES_OF_BIRTH)
def test_a_date_of_birth_must_be_a_real_past_date(
    shipped: FlowSet, flow_id: str, entry: str, taken: bool
) -> None:
    engine = Engine(shipped, FlowParams(today=lambda: TODAY))
    answers = ["1"] if flow_id == "appointments" else []
    state, actions = script_call(engine, flow_id, [*answers, f"{entry}#"])
    if taken:
        assert (state.node, state.value("dob")) == ("patient_no", entry)
    else:
        # A nomatch like a short entry: asked again, nothing saved, the caller told why.
        assert (state.node, state.nomatch, state.value("dob")) == ("dob", 1, None)
        assert texts(actions)[-1].startswith("Sorry, that is not a valid date of birth.")


def test_three_impossible_dates_of_birth_reach_staff(shipped: FlowSet) -> None:
    engine = Engine(shipped, FlowParams(today=lambda: TODAY))
    state, actions = script_call(engine, "results", ["99999999#", "00000000#", "31022000#"])
    assert not any(isinstance(a, PostWebhook) for a in actions)
    assert state.outcome == "transfer_staff"
    assert [a.uri for a in actions if isinstance(a, TransferCall)] == [STAFF]


def test_a_date_ends_at_its_hash_or_after_the_inter_digit_wait(shipped: FlowSet) -> None:
    engine = Engine(shipped, FlowParams(today=lambda: TODAY))
    state, actions = script_call(engine, "results", ["01021990"])
    assert (state.node, state.digits) == ("dob", "01021990")  # waits: a digit more may come
    listens = [a for a in actions if isinstance(a, Listen)]
    assert listens[-1].timeout_s == 6.0, listens  # after the first digit: the inter-digit wait
    state, _ = engine.handle(state, NoInput())
    assert (state.node, state.value("dob")) == ("patient_no", "01021990")


def test_a_date_of_birth_cut_short_by_a_pause_is_told_as_incomplete(shipped: FlowSet) -> None:
    # A slow typist finding the year on a landline keypad: the pause ended the entry, and
    # "Sorry, I did not understand" left the caller to guess that the digits were dropped.
    # The wait between digits is 6 s (was 4), and the caller hears what happened and how
    # many digits the entry needs, then the question again; nothing is saved.
    engine = Engine(shipped, FlowParams(today=lambda: TODAY))
    state, actions = script_call(engine, "results", ["0102"])
    assert [a for a in actions if isinstance(a, Listen)][-1].timeout_s == 6.0
    state, actions = engine.handle(state, NoInput())
    assert (state.node, state.nomatch, state.value("dob")) == ("dob", 1, None)
    assert texts(actions)[-1].startswith(
        "Sorry, that entry was not complete. It needs 8 digits. For test results, please enter"
    )
    # The patient number (4 to 10 digits) says its least.
    state, actions = script_call(engine, "results", ["01021990#", "12"])
    state, actions = engine.handle(state, NoInput())
    assert texts(actions)[-1] == (
        "Sorry, that entry was not complete. It needs at least 4 digits. "
        "Please enter the patient number, then press hash."
    )
    # Rendered at start-up with the other prompts, not while the caller waits.
    assert texts(actions)[-1] in shipped.get("results").static_prompts(FlowParams())


def test_a_ninth_digit_of_a_date_is_refused_not_typed_into_the_patient_number(
    shipped: FlowSet,
) -> None:
    # The last 5 pressed twice: "5" became the first digit of the patient number, posted.
    engine = Engine(shipped, FlowParams(today=lambda: TODAY))
    state, actions = script_call(engine, "results", ["010219905", "12345#"])
    assert state.value("dob") is None and state.value("patient_number") is None
    assert ("dob", "nomatch") in [(s.node, s.input) for s in state.path]
    assert not [a for a in actions if isinstance(a, PostWebhook)]


@pytest.mark.parametrize("entry", ["12345678902#", "123456789012345#"])
def test_an_over_long_patient_number_is_refused_not_cut_off(shipped: FlowSet, entry: str) -> None:
    # 11 digits taken as their first 10 would book, or look up, another patient's number.
    engine = Engine(shipped, FlowParams())
    state, actions = script_call(engine, "results", ["01021990#", entry])
    assert not [a for a in actions if isinstance(a, PostWebhook)]
    assert ("patient_no", "nomatch") in [(s.node, s.input) for s in state.path]
    assert (state.node, state.phase) == ("patient_no", Phase.LISTENING)
    assert texts(actions)[-1].startswith("Sorry")


def test_a_zero_typed_during_a_lookup_still_reaches_a_human(shipped: FlowSet) -> None:
    # The other keys typed during the lookup are dropped; a 0 asks for a human anywhere.
    engine = Engine(shipped, FlowParams())
    state, actions = script_call(
        engine, "results", ["01021990#", "1234567890#0"], webhook_data={"ready": "yes"}
    )
    post = next(a for a in actions if isinstance(a, PostWebhook))
    assert post.values["patient_number"] == "1234567890"
    assert any(s.node == "more" and (s.input, s.value) == ("digit", "0") for s in state.path)
    assert state.transfer_uri == STAFF, state


def _booking(shipped: FlowSet, *events: Event) -> tuple[CallState, list[Action]]:
    """An appointments call up to its request (book, a date of birth, a patient number), the
    request answered by ``events[0]``, then the rest of ``events``."""
    engine = Engine(shipped, FlowParams())
    state, first = engine.start(shipped.get("appointments"))
    seen = list(first)
    keys: list[Event] = [DONE, Digit("1"), *map(Digit, "01021990#"), *map(Digit, "1234567890#")]
    for event in [*keys, *events]:
        if state.phase is Phase.PLAYING and not isinstance(event, PromptDone | HangUp):
            state, actions = engine.handle(state, DONE)  # the prompt ends before the key
            seen += actions
        state, actions = engine.handle(state, event)
        seen += actions
    return state, seen


def _stored(actions: list[Action]) -> CallRecord:
    (store,) = [a for a in actions if isinstance(a, Store)]
    return store.record


def test_a_booking_made_stays_the_outcome_when_the_caller_hangs_up_on_its_confirmation(
    shipped: FlowSet,
) -> None:
    # The request arrived: staff filtering by outcome must not read it as nothing done.
    _, actions = _booking(shipped, WebhookResult(True, {"message": "Monday at nine."}), HangUp())
    record = _stored(actions)
    assert record.outcome == "appointment_requested", record
    assert ("post", "webhook", "ok") in [(s.node, s.input, s.value) for s in record.path]


def test_the_confirmation_plays_to_its_end_and_a_zero_typed_over_it_reaches_staff(
    shipped: FlowSet,
) -> None:
    # The scheduler's message (the appointment's time) is not cut by a key; a 0 typed
    # during the request or the confirmation still reaches a human before the goodbye.
    state, actions = _booking(shipped, Digit("0"), WebhookResult(True, {"message": "Monday."}))
    assert state.phase is Phase.PLAYING and texts(actions)[-1].endswith("Monday.")
    state, more = Engine(shipped, FlowParams()).handle(state, Digit("5"))
    assert more == [] and state.phase is Phase.PLAYING  # no barge-in: plays on
    state, more = Engine(shipped, FlowParams()).handle(state, DONE)
    assert state.transfer_uri == STAFF and state.outcome == "transfer_staff", state
    assert texts(more) == ["Connecting you to a member of staff."]


def test_a_request_with_no_answer_in_time_is_recorded_as_such_not_as_failed(
    shipped: FlowSet,
) -> None:
    # A slow scheduler may have booked it: "failed" would have staff book it twice.
    state, actions = _booking(shipped, WebhookResult(False, unknown=True))
    assert ("post", "webhook", "timeout") in [(s.node, s.input, s.value) for s in state.path]
    assert texts(actions)[-1] == "Sorry, the appointment system cannot be reached right now."


def _triage_to_same_day(shipped: FlowSet) -> tuple[Engine, CallState]:
    """A triage call up to its same-day request (the webhook under way)."""
    engine = Engine(shipped, FlowParams())
    state, _ = engine.start(shipped.get("triage"))
    for event in [DONE, DONE, *[e for k in "122222811" for e in (Digit(k), DONE)]]:
        state, _ = engine.handle(state, event)
    assert state.phase is Phase.WEBHOOK and state.node == "same_day", state
    return engine, state


def test_a_zero_during_a_triage_request_hears_the_advice_before_the_nurse(
    shipped: FlowSet,
) -> None:
    # The advice ("see a doctor today; if it gets worse, call 1 1 2") is the triage's last
    # word: a 0 must not skip it, and the record keeps what was advised.
    engine, state = _triage_to_same_day(shipped)
    state, _ = engine.handle(state, Digit("0"))
    state, actions = engine.handle(state, WebhookResult(True, {}))
    while state.pending is not Pending.TRANSFER:
        state, actions = engine.handle(state, DONE)
    (said,) = texts(actions)
    assert "1 1 2" in said and said.endswith("Connecting you to a nurse."), said
    assert state.triage_action is not None and state.outcome == "transfer_nurse"


def test_a_stop_does_not_cut_a_booking_s_confirmation_nor_undo_its_outcome(
    shipped: FlowSet,
) -> None:
    state, actions = _booking(shipped, WebhookResult(True, {"message": "Monday at nine."}))
    engine = Engine(shipped, FlowParams())
    state, actions = engine.handle(state, LineClosing())
    assert actions == [], "the confirmation plays to its end"
    state, actions = engine.handle(state, DONE)
    while not any(isinstance(a, Store) for a in actions):
        state, actions = engine.handle(state, DONE)
    assert _stored(actions).outcome == "appointment_requested"


# --------------------------------------------------------------------------- the service stops

CLOSING = (
    "Sorry, this line has to close for a few minutes. If this is an emergency, hang up and "
    "call 1 1 2 now. Otherwise please call again later."
)
NOTICE = [("StopPlay", ""), ("Play", CLOSING)]


@pytest.mark.parametrize(
    "before",
    [[], [DONE], [DONE, DONE]],
    ids=["a prompt plays", "the question plays", "the engine listens"],
)
def test_a_stop_tells_the_caller_then_ends_the_call(engine: Engine, before: list[Event]) -> None:
    state, steps = feed(engine, [*before, LineClosing()])
    assert describe(steps[-1]) == NOTICE
    assert state.phase is Phase.PLAYING and state.close is Close.TOLD
    assert not steps[-1][-1].barge_in  # type: ignore[union-attr]
    # Keys and a second stop change nothing; the end of the notice ends the call.
    for event in (Digit("1"), Digit("0"), LineClosing(), NoInput()):
        state, actions = engine.handle(state, event)
        assert actions == [], event
    state, actions = engine.handle(state, DONE)
    assert [type(a).__name__ for a in actions] == ["HangupCall", "Store"]
    assert record_of(actions).record.outcome == "cut_shutdown"
    assert state.phase is Phase.ENDED


def test_a_caller_who_hangs_up_on_the_notice_is_still_a_cut_call(engine: Engine) -> None:
    state, _ = feed(engine, [DONE, LineClosing()])
    state, actions = engine.handle(state, HangUp())
    assert record_of(actions).record.outcome == "cut_shutdown"


def test_a_stop_during_a_webhook_waits_for_its_result(engine: Engine) -> None:
    keys = [Digit(k) for k in "1123#"]
    state, steps = feed(engine, [DONE, DONE, *keys, LineClosing()])
    assert steps[-1] == [] and state.phase is Phase.WEBHOOK
    state, actions = engine.handle(state, WebhookResult(True, {"when": "Monday"}))
    assert describe(actions) == NOTICE  # not "Booked Monday.": the call cannot go on
    assert state.value("reply.when") == "Monday"  # the result is in the record
    state, actions = engine.handle(state, DONE)
    record = record_of(actions).record
    assert record.outcome == "cut_shutdown"
    assert ("post", "webhook") in [(p.node, p.input) for p in record.path]


def test_a_stop_during_a_message_keeps_it_then_lets_the_goodbye_finish(engine: Engine) -> None:
    state, _ = feed(engine, [DONE, DONE, Digit("2"), DONE, LineClosing()])
    assert state.phase is Phase.RECORDING
    state, actions = engine.handle(state, RecordDone("vm-1", 4.0))
    # The goodbye ends the call anyway: it plays, not the notice.
    assert texts(actions) == ["Goodbye."]
    state, actions = engine.handle(state, DONE)
    record = record_of(actions).record
    assert record.outcome == "done" and dict(record.values)["message"] == "vm-1"


def test_a_stop_before_the_tone_tells_the_caller(engine: Engine) -> None:
    _, steps = feed(engine, [DONE, DONE, Digit("2"), LineClosing()])
    assert describe(steps[-1]) == NOTICE


def test_a_stop_lets_a_transfer_to_a_human_go_on(engine: Engine) -> None:
    state, steps = feed(engine, [DONE, Digit("0"), LineClosing()])
    assert steps[-1] == [] and state.pending is Pending.TRANSFER
    state, actions = engine.handle(state, DONE)
    assert [type(a).__name__ for a in actions] == ["TransferCall"]
    state, actions = engine.handle(state, TransferResult(True))
    assert record_of(actions).record.outcome == "transfer_staff"


def test_a_stop_then_a_failed_transfer_says_why_it_ends(engine: Engine) -> None:
    state, _ = feed(engine, [DONE, Digit("0"), LineClosing(), DONE])
    state, actions = engine.handle(state, TransferResult(False))
    assert texts(actions) == [
        "Sorry, I could not connect you. If this is an emergency, hang up and call 1 1 2 now. "
        "Otherwise please call again later."
    ]
    state, actions = engine.handle(state, DONE)
    assert record_of(actions).record.outcome == "transfer_failed"


def test_the_closing_notice_is_rendered_at_start(shipped: FlowSet) -> None:
    params = FlowParams(emergency_number="911")
    for flow in shipped.flows.values():
        notice = flow.texts("closing").replace("{emergency_number}", "9 1 1")
        assert notice in flow.static_prompts(params), flow.id


def test_a_stop_puts_an_urgent_caller_through_to_the_nurse(shipped: FlowSet) -> None:
    # An unclear answer to the breathing question makes the call U2; it is asked again. The
    # safety rules hold in a stop too: no "call again later" and no hang-up for this caller.
    engine = Engine(shipped, FlowParams(speech_enabled=False))
    state, _ = engine.start(shipped.get("triage"))
    for event in (DONE, DONE, Digit("1"), DONE, NoInput()):
        state, _ = engine.handle(state, event)
    assert state.triage is not None and state.triage.urgency is Urgency.U2
    state, actions = engine.handle(state, LineClosing())
    assert [type(a).__name__ for a in actions] == ["StopPlay", "Play"]
    assert "call again later" not in texts(actions)[0]
    assert state.pending is Pending.TRANSFER and state.transfer_uri == NURSE
    assert engine.handle(state, LineClosing()) == (state, [])
    state, actions = engine.handle(state, DONE)
    assert [type(a).__name__ for a in actions] == ["TransferCall"]
    state, actions = engine.handle(state, TransferResult(True))
    record = record_of(actions).record
    assert record.outcome == "transfer_nurse" and record.transfer_target == NURSE


# -- nobody to take the call: a message for a call back

STAFF_FAILED: list[Event] = [DONE, DONE, Digit("0"), DONE, TransferResult(False)]


def test_a_message_left_when_nobody_answers_is_kept_for_a_call_back(engine: Engine) -> None:
    state, steps = feed(engine, [*STAFF_FAILED, DONE])
    assert steps[-1] == [RecordAudio(60)]
    state, actions = engine.handle(state, RecordDone("vm-2", 7.0))
    assert texts(actions) == [
        "Thank you. Your message has been recorded, and the clinic will call you back. Goodbye."
    ]
    # A hang-up during the thanks: the message is what the call left.
    state, actions = engine.handle(state, HangUp())
    record = record_of(actions).record
    assert record.outcome == "message_left"
    assert dict(record.values)["callback_message"] == "vm-2"
    assert [(s.input, s.value) for s in record.path][-2:] == [
        ("transfer", "failed"),
        ("record", "7s"),
    ]
    assert record.transfer_target is None


@pytest.mark.parametrize(
    ("done", "said", "kept"),
    [
        (RecordDone(duration_s=20, silent=True), "Sorry, I did not hear a message.", "silent"),
        (RecordDone(duration_s=9), "Sorry, your message could not be saved.", "not_saved"),
        (RecordDone(refused="disk_low"), "Sorry, your message could not be saved.", "disk_low"),
    ],
)
def test_no_message_kept_after_a_failed_transfer_ends_as_before(
    engine: Engine, done: RecordDone, said: str, kept: str
) -> None:
    state, _ = feed(engine, [*STAFF_FAILED, DONE])
    state, actions = engine.handle(state, done)
    assert texts(actions) == [
        f"{said} If this is an emergency, hang up and call 1 1 2 now. Otherwise please call "
        "again later."
    ]
    state, actions = engine.handle(state, DONE)
    record = record_of(actions).record
    assert record.outcome == "transfer_failed" and "callback_message" not in dict(record.values)
    assert [(s.input, s.value) for s in record.path][-1] == ("record", kept)
    assert isinstance(actions[0], HangupCall)


def test_a_hang_up_before_the_tone_is_a_failed_transfer(engine: Engine) -> None:
    state, _ = feed(engine, STAFF_FAILED)
    _, actions = engine.handle(state, HangUp())
    assert record_of(actions).record.outcome == "transfer_failed"


def test_a_call_that_recorded_already_is_not_asked_for_a_message_again(engine: Engine) -> None:
    # The voicemail could not be saved, staff took no call: "call again later" as before,
    # not a second message that may fail the same way.
    state, steps = feed(engine, [Digit("2"), DONE, RecordDone(duration_s=9), DONE])
    assert [type(a).__name__ for a in steps[-1]] == ["TransferCall"]
    state, actions = engine.handle(state, TransferResult(False))
    assert texts(actions) == [
        "Sorry, I could not connect you. If this is an emergency, hang up and call 1 1 2 now. "
        "Otherwise please call again later."
    ]


def test_a_stop_during_the_offer_tells_the_caller_and_ends(engine: Engine) -> None:
    state, _ = feed(engine, STAFF_FAILED)
    state, actions = engine.handle(state, LineClosing())
    assert describe(actions) == NOTICE
    state, actions = engine.handle(state, DONE)
    assert record_of(actions).record.outcome == "cut_shutdown"


def test_a_stop_during_the_message_keeps_it_and_thanks_the_caller(engine: Engine) -> None:
    # The session ends the recording at the stop as with "#"; the thanks ends the call.
    state, _ = feed(engine, [*STAFF_FAILED, DONE])
    state, actions = engine.handle(state, LineClosing())
    assert actions == []
    state, actions = engine.handle(state, RecordDone("vm-3", 4.0))
    assert texts(actions)[0].startswith("Thank you. Your message has been recorded")
    state, actions = engine.handle(state, DONE)
    assert record_of(actions).record.outcome == "message_left"


def test_keys_and_words_during_the_offer_change_nothing(engine: Engine) -> None:
    state, _ = feed(engine, STAFF_FAILED)
    for event in (Digit("0"), Digit("1"), SpeechResult("staff", 0.9)):
        assert engine.handle(state, event) == (state, [])


# -- urgent transfers: who took the call, and a stop during the emergency advice


def _triage_at_the_advice(engine: Engine) -> tuple[CallState, list[Action]]:
    """The triage, "yourself", then "yes" to the breathing question: U1, the emergency
    advice playing."""
    state, _ = engine.start(engine.flowset.get("triage"))
    actions: list[Action] = []
    for event in (DONE, DONE, Digit("1"), DONE, Digit("1")):
        state, actions = engine.handle(state, event)
    assert state.triage is not None and state.triage.urgency is Urgency.U1
    assert "call 1 1 2 now" in texts(actions)[0]
    return state, actions


def test_staff_who_take_an_urgent_call_the_nurse_missed_are_named_in_the_outcome(
    shipped: FlowSet,
) -> None:
    engine = Engine(shipped, FlowParams(speech_enabled=False))
    state, _ = _triage_at_the_advice(engine)
    for event in (DONE, DONE):  # the advice, then "connecting you to a nurse now"
        state, actions = engine.handle(state, event)
    assert [a.uri for a in actions if isinstance(a, TransferCall)] == [NURSE]
    state, _ = engine.handle(state, TransferResult(False))
    state, actions = engine.handle(state, DONE)
    assert [a.uri for a in actions if isinstance(a, TransferCall)] == [STAFF]
    _, actions = engine.handle(state, TransferResult(True))
    record = record_of(actions).record
    # Not "call_emergency+transfer_nurse": nobody reading it may think a nurse spoke to them.
    assert (record.outcome, record.transfer_target) == ("transfer_staff", STAFF)
    assert record.action is not None and record.action.value == "call_emergency+transfer_nurse"


def test_a_stop_lets_the_emergency_advice_finish_and_the_nurse_be_tried(
    shipped: FlowSet,
) -> None:
    engine = Engine(shipped, FlowParams(speech_enabled=False))
    state, _ = _triage_at_the_advice(engine)
    state, actions = engine.handle(state, LineClosing())
    assert actions == [], "the emergency advice was cut mid-sentence"
    state, actions = engine.handle(state, DONE)
    assert texts(actions) == ["Connecting you to a nurse now."]
    state, actions = engine.handle(state, DONE)
    assert [a.uri for a in actions if isinstance(a, TransferCall)] == [NURSE]


def test_a_stop_at_an_urgent_question_gives_the_emergency_number(shipped: FlowSet) -> None:
    engine = Engine(shipped, FlowParams(speech_enabled=False))
    state, _ = engine.start(shipped.get("triage"))
    for event in (DONE, DONE, Digit("1"), DONE, NoInput()):  # unclear: U2, asked again
        state, _ = engine.handle(state, event)
    state, actions = engine.handle(state, LineClosing())
    assert texts(actions) == [
        "If this is an emergency, hang up and call 1 1 2 now. Otherwise stay on the line: to be "
        "safe, I will connect you to a nurse."
    ]
    assert state.transfer_uri == NURSE


def test_a_stop_that_ends_the_message_before_a_word_tells_the_caller_why(
    engine: Engine,
) -> None:
    # The session ends the recording at the stop: during the beep it is empty. That is no
    # silence of the caller's ("I did not hear a message"): the closing notice, cut_shutdown.
    state, _ = feed(engine, [*STAFF_FAILED, DONE])
    state, _ = engine.handle(state, LineClosing())
    state, actions = engine.handle(state, RecordDone(duration_s=0.0, silent=True))
    assert describe(actions) == NOTICE
    state, actions = engine.handle(state, DONE)
    assert record_of(actions).record.outcome == "cut_shutdown"


def test_a_transfer_never_answered_ends_with_a_word_and_a_call_back(engine: Engine) -> None:
    state, _ = feed(engine, [DONE, DONE, Digit("0"), DONE])
    state, actions = engine.handle(state, TransferResult(True, unconfirmed=True))
    assert texts(actions) == [
        "Sorry, nobody has answered. The clinic will call you back. If this is an emergency, "
        "hang up and call 1 1 2 now. Goodbye."
    ]
    state, actions = engine.handle(state, HangUp())  # the caller hangs up during it
    record = record_of(actions).record
    assert (record.outcome, record.transfer_target) == ("transfer_unconfirmed", STAFF)
    assert [(s.input, s.value) for s in record.path][-1] == ("transfer", "unconfirmed")


def test_an_urgent_transfer_never_answered_ends_with_the_emergency_number(
    shipped: FlowSet,
) -> None:
    engine = Engine(shipped, FlowParams(speech_enabled=False))
    state, _ = _triage_at_the_advice(engine)
    for event in (DONE, DONE):
        state, _ = engine.handle(state, event)
    state, actions = engine.handle(state, TransferResult(True, unconfirmed=True))
    assert texts(actions) == [
        "Sorry, I could not reach anyone at the clinic. Please hang up now and call 1 1 2."
    ]
    _, actions = engine.handle(state, DONE)
    assert isinstance(actions[0], HangupCall)
    assert record_of(actions).record.outcome == "transfer_unconfirmed"


def test_an_urgent_caller_the_pbx_took_and_nobody_answered_is_recorded_as_such(
    shipped: FlowSet,
) -> None:
    # Behind a PBX that reported its transfer chain reached nobody (486 after the 202): the
    # caller hears the PBX's message, not ours, and no other human is tried from here (the
    # PBX tried them). The record must not say a nurse took the call.
    engine = Engine(shipped, FlowParams(speech_enabled=False))
    state, _ = _triage_at_the_advice(engine)
    for event in (DONE, DONE):  # the advice, then "connecting you to a nurse now"
        state, actions = engine.handle(state, event)
    assert [a.uri for a in actions if isinstance(a, TransferCall)] == [NURSE]
    state, actions = engine.handle(state, TransferResult(False, unanswered=True))
    assert state.phase is Phase.ENDED
    assert [type(a) for a in actions] == [HangupCall, Store]
    record = record_of(actions).record
    assert (record.outcome, record.transfer_target) == ("transfer_unanswered", None)
    assert record.urgency is Urgency.U1
    assert [(s.input, s.value) for s in record.path][-1] == ("transfer", "unanswered")


def test_words_over_a_keypad_entry_prompt_do_not_cut_it(shipped: FlowSet) -> None:
    """Found by tests/unit/test_prop_engine.py: "1" typed over the appointments' first
    question, then a speech result (the session delivers one queued behind the key) while the
    date-of-birth prompt plays. The entry takes no speech: the prompt was stopped and the
    engine listened with no Listen sent, so the caller waited in silence for no one."""
    engine = Engine(shipped, FlowParams(speech_enabled=True))
    state, _ = engine.start(shipped.get("appointments"))
    state, actions = engine.handle(state, Digit("1"))
    assert state.node == "dob" and state.phase is Phase.PLAYING
    state, actions = engine.handle(state, SpeechResult("operator", 1.0))
    assert actions == [] and state.phase is Phase.PLAYING and state.node == "dob"
    state, actions = engine.handle(state, PromptDone())
    assert state.phase is Phase.LISTENING and any(isinstance(a, Listen) for a in actions)


# -- a prompt the caller did not hear (PromptFailed) -------------------------------------------

FAILED = PromptFailed()
ON_FAIL_FLOW = """\
id: f
language: en
human: staff
start: short
nodes:
  short:
    ask:
      prompt: "Short of breath at rest?"
      on_fail: careful
      choices:
        - {key: "1", phrases: ["yes"], urgency: U2, reason: short of breath, goto: nurse}
        - {key: "2", phrases: ["no"], goto: bye}
  careful:
    transfer: nurse
    prompt: "Let me put you through."
  nurse:
    transfer: nurse
    prompt: "Connecting you to a nurse."
  bye:
    transfer: staff
    prompt: "Connecting you."
"""


def test_a_message_that_failed_is_skipped(engine: Engine) -> None:
    state, steps = feed(engine, [FAILED])
    assert texts(steps[-1]) == ["Pick one. Say apples or press 1. Say pears or press 2."]
    assert (state.node, state.phase) == ("menu", Phase.PLAYING)
    assert ("hello", PROMPT_FAILED) in [(s.node, s.input) for s in state.path]


def test_a_question_that_failed_is_asked_once_more_then_given_up(engine: Engine) -> None:
    state, steps = feed(engine, [DONE, FAILED])
    assert (state.node, state.phase, state.pending) == ("menu", Phase.PLAYING, Pending.LISTEN)
    assert texts(steps[-1]) == texts(steps[-2])  # the same prompt again
    state, actions = engine.handle(state, FAILED)
    assert (state.pending, state.transfer_uri) == (Pending.TRANSFER, STAFF)
    assert [s.input for s in state.path].count(PROMPT_FAILED) == 2
    assert not any(isinstance(a, Listen) for a in actions)


def test_a_reprompt_that_failed_is_tried_once_more_too(engine: Engine) -> None:
    # One failure, heard on the second try; later the noinput reprompt fails: tried again.
    state, _ = feed(engine, [DONE, FAILED, DONE, NoInput()])
    state, actions = engine.handle(state, FAILED)
    assert texts(actions) == [
        "I did not hear you. Pick one. Say apples or press 1. Say pears or press 2."
    ]
    assert (state.pending, state.phase) == (Pending.LISTEN, Phase.PLAYING)


def test_a_late_prompt_failed_changes_nothing(engine: Engine) -> None:
    state, _ = feed(engine, [DONE, DONE])  # listening at the menu
    assert state.phase is Phase.LISTENING
    assert engine.handle(state, FAILED) == (state, [])


def test_an_urgent_question_that_failed_twice_takes_its_on_fail_at_u2(tmp_path: Path) -> None:
    (tmp_path / "f.yaml").write_text(ON_FAIL_FLOW, encoding="utf-8")
    engine = Engine(load_flows(tmp_path), FlowParams())
    state, _ = engine.start(engine.flowset.get("f"))
    state, _ = engine.handle(state, FAILED)
    state, actions = engine.handle(state, Digit("2"))  # a no, typed before it was heard
    assert actions == [] and state.node == "short"
    state, actions = engine.handle(state, FAILED)
    assert texts(actions) == ["Let me put you through."]
    assert state.triage is not None and state.triage.urgency is Urgency.U2
    assert "unanswered: short" in state.triage.reasons


ADVICE_FLOW = """\
id: g
language: en
human: staff
start: fever
nodes:
  fever:
    ask:
      prompt: "Is the fever over 39 degrees?"
      choices:
        - {key: "1", phrases: ["yes"], urgency: U3, reason: high fever, goto: advice}
        - {key: "2", phrases: ["no"], goto: bye}
  advice:
    hangup: >-
      You should see a doctor today. The practice is closed, so call the out-of-hours
      service now. In an emergency, call {emergency_number}. Goodbye.
    outcome: same_day
  bye:
    hangup: "Thank you for calling. Goodbye."
"""
ADVICE = (
    "You should see a doctor today. The practice is closed, so call the out-of-hours service "
    "now. In an emergency, call 1 1 2. Goodbye."
)


def _advice_call(tmp_path: Path, key: str) -> tuple[Engine, CallState]:
    (tmp_path / "g.yaml").write_text(ADVICE_FLOW, encoding="utf-8")
    engine = Engine(load_flows(tmp_path), FlowParams())
    state, _ = engine.start(engine.flowset.get("g"))
    state, _ = engine.handle(state, DONE)
    state, _ = engine.handle(state, Digit(key))
    assert state.pending is Pending.HANGUP
    return engine, state


def test_a_triage_advice_that_failed_is_said_again_then_the_nurse_takes_the_call(
    tmp_path: Path,
) -> None:
    # "See a doctor today, call the out-of-hours service now" unheard: the call must not end
    # in silence with the advice recorded as given.
    engine, state = _advice_call(tmp_path, "1")
    state, actions = engine.handle(state, FAILED)
    assert texts(actions) == [ADVICE] and state.pending is Pending.HANGUP
    state, actions = engine.handle(state, FAILED)
    assert state.phase is not Phase.ENDED
    assert (state.pending, state.transfer_uri) == (Pending.TRANSFER, NURSE)
    assert state.triage is not None and PROMPT_FAILED in state.triage.reasons
    state, actions = engine.handle(state, FAILED)  # "connecting you" unheard: put through
    assert [type(a) for a in actions] == [TransferCall]


def test_a_triage_advice_that_failed_asks_the_nurse_once(tmp_path: Path) -> None:
    # The nurse could not be reached: the message's thanks that fail (twice: last words are
    # said once more) end the call, no loop.
    engine, state = _advice_call(tmp_path, "1")
    events: list[Event] = [FAILED, FAILED, FAILED, TransferResult(False), DONE]
    for event in [*events, RecordDone("vm", 5.0)]:
        state, actions = engine.handle(state, event)
    assert (state.pending, state.outcome) == (Pending.HANGUP, "message_left")
    state, actions = engine.handle(state, FAILED)
    assert state.phase is Phase.PLAYING and len(texts(actions)) == 1
    state, actions = engine.handle(state, FAILED)
    assert state.phase is Phase.ENDED and any(isinstance(a, HangupCall) for a in actions)


def test_a_goodbye_that_failed_twice_ends_the_call(tmp_path: Path) -> None:
    engine, state = _advice_call(tmp_path, "2")
    state, actions = engine.handle(state, FAILED)
    assert texts(actions) == ["Thank you for calling. Goodbye."]  # last words: once more
    state, actions = engine.handle(state, FAILED)
    assert state.phase is Phase.ENDED and any(isinstance(a, HangupCall) for a in actions)
    assert state.outcome == "completed"


# A question's on_fail that leads back to a question: flow check accepts it (each lap waits
# for the caller), and a caller who cannot answer goes round with the noinput counters.
ROUND_FLOW = """\
id: r
language: en
human: staff
start: first
nodes:
  first:
    ask:
      prompt: "Press 1 for a call back."
      on_fail: once_more
      choices:
        - {key: "1", phrases: ["yes"], goto: bye}
  once_more:
    say: "Let us try that once more."
    next: first
  bye:
    hangup: "Goodbye."
"""


def test_prompts_that_keep_failing_round_an_on_fail_loop_reach_the_human(
    tmp_path: Path,
) -> None:
    # Every prompt fails (a broken media path): the question given up takes its on_fail,
    # which asks it again. Failures come at once, nothing waits for the caller: the call
    # must reach a human, not go round in silence until MAX_CALL_S.
    (tmp_path / "r.yaml").write_text(ROUND_FLOW, encoding="utf-8")
    engine = Engine(load_flows(tmp_path), FlowParams(open_now=lambda: True))
    state, _ = engine.start(engine.flowset.get("r"))
    transfers: list[TransferCall] = []
    for _ in range(20):
        state, actions = engine.handle(state, FAILED)
        transfers += [a for a in actions if isinstance(a, TransferCall)]
        if transfers:
            break
    assert [t.uri for t in transfers] == [STAFF], (state.node, state.pending)
    given_up = [s for s in state.path if s.input == PROMPT_FAILED]
    assert len(given_up) <= 6, len(given_up)  # twice, its on_fail's say, twice: the human


def test_an_urgent_callers_last_words_that_failed_are_said_once_more(tmp_path: Path) -> None:
    # Nobody could be reached: "hang up now and call 1 1 2" is all an urgent caller has left.
    # Unheard, it is said once more before the call ends; unheard again, the call ends.
    (tmp_path / "f.yaml").write_text(ON_FAIL_FLOW, encoding="utf-8")
    engine = Engine(load_flows(tmp_path), FlowParams())
    state, _ = engine.start(engine.flowset.get("f"))
    events: list[Event] = [DONE, Digit("1"), DONE, TransferResult(False), DONE]
    for event in [*events, TransferResult(False)]:
        state, actions = engine.handle(state, event)
    assert state.triage is not None and state.triage.urgency <= Urgency.U2
    last = texts(actions)
    assert len(last) == 1 and "call 1 1 2" in last[0] and state.pending is Pending.HANGUP
    state, actions = engine.handle(state, FAILED)
    assert texts(actions) == last and state.phase is Phase.PLAYING
    state, actions = engine.handle(state, FAILED)
    assert state.phase is Phase.ENDED and any(isinstance(a, HangupCall) for a in actions)
    assert state.outcome == "transfer_failed"


def test_a_closed_notice_that_failed_is_said_once_more(engine: Engine) -> None:
    # Out of hours, a 0 asked three times, then once more: the notice (the out-of-hours and
    # emergency numbers) and the call ends, as out_of_hours: "the caller was told so".
    # Unheard, it is said once more; unheard again, the call ends.
    closed = Engine(engine.flowset, replace(engine.params, open_now=lambda: False))
    state, _ = closed.start(closed.flowset.get("t"))
    zero_again: list[Event] = [Digit("0"), DONE]
    events: list[Event] = [DONE, DONE, *zero_again * 3, Digit("0")]
    for event in events:
        state, actions = closed.handle(state, event)
    notice = texts(actions)
    assert len(notice) == 1 and "1 1 2" in notice[0] and state.pending is Pending.HANGUP
    assert state.outcome == "out_of_hours"
    state, actions = closed.handle(state, FAILED)
    assert texts(actions) == notice and state.phase is Phase.PLAYING
    heard, _ = closed.handle(state, DONE)  # heard the second time: told
    assert heard.phase is Phase.ENDED and heard.outcome == "out_of_hours"
    state, actions = closed.handle(state, FAILED)
    assert state.phase is Phase.ENDED and any(isinstance(a, HangupCall) for a in actions)
    # Unheard twice: nobody told the caller the numbers to call; never "out_of_hours".
    (store,) = [a for a in actions if isinstance(a, Store)]
    assert state.outcome == store.record.outcome == OUT_OF_HOURS_UNHEARD_OUTCOME


def _to_emergency(shipped: FlowSet, flow_id: str) -> tuple[Engine, CallState, list[str]]:
    """A shipped triage, its first danger sign answered "yes" (U1): the emergency advice
    ("hang up and call 1 1 2 now") plays."""
    engine = Engine(shipped, FlowParams())
    state, _ = engine.start(shipped.get(flow_id))
    if flow_id == "triage":  # the intro, then "about yourself?": 1
        events: list[Event] = [DONE, DONE, Digit("1")]
        for event in events:
            state, _ = engine.handle(state, event)
    state, _ = engine.handle(state, DONE)  # the breathing question, heard
    state, actions = engine.handle(state, Digit("1"))
    advice = texts(actions)
    assert len(advice) == 1 and "1 1 2" in advice[0]
    assert state.triage is not None and state.triage.urgency <= Urgency.U1
    return engine, state, advice


@pytest.mark.parametrize("flow_id", ["triage", "triage_ko"])
def test_the_emergency_advice_that_failed_is_said_once_more(shipped: FlowSet, flow_id: str) -> None:
    # "Hang up and call 1 1 2 now", before the nurse transfer (a say in triage, the transfer's
    # own prompt in triage_ko): unheard, it is said again, not skipped.
    engine, state, advice = _to_emergency(shipped, flow_id)
    state, actions = engine.handle(state, FAILED)
    assert texts(actions) == advice and not any(isinstance(a, TransferCall) for a in actions)
    assert [s.input for s in state.path].count(PROMPT_FAILED) == 1
    state, actions = engine.handle(state, DONE)  # heard the second time: nothing noted
    while not any(isinstance(a, TransferCall) for a in actions):
        state, actions = engine.handle(state, DONE)
    assert state.triage is not None
    assert not [r for r in state.triage.reasons if r.startswith("unheard")]


@pytest.mark.parametrize("flow_id", ["triage", "triage_ko"])
def test_the_emergency_advice_unheard_twice_goes_to_the_nurse_on_record(
    shipped: FlowSet, flow_id: str
) -> None:
    engine, state, _ = _to_emergency(shipped, flow_id)
    state, _ = engine.handle(state, FAILED)
    state, actions = engine.handle(state, FAILED)
    while not any(isinstance(a, TransferCall) for a in actions):  # "connecting you", heard
        assert state.phase is Phase.PLAYING, state.phase
        state, actions = engine.handle(state, DONE)
    (transfer,) = [a for a in actions if isinstance(a, TransferCall)]
    assert transfer.uri == NURSE
    assert state.triage is not None and "unheard: emergency" in state.triage.reasons
    state, actions = engine.handle(state, TransferResult(True))
    (store,) = [a for a in actions if isinstance(a, Store)]
    assert "unheard: emergency" in store.record.reasons
    assert store.record.urgency is not None and store.record.urgency <= Urgency.U1


def _advice_to_message(tmp_path: Path) -> tuple[Engine, CallState, list[str]]:
    """A triage's advice unheard twice, the nurse tried for it and not reached (an unstaffed
    nurse line out of hours): the message offer plays."""
    engine, state = _advice_call(tmp_path, "1")
    events: list[Event] = [FAILED, FAILED, DONE, TransferResult(False)]
    for event in events:
        state, actions = engine.handle(state, event)
    assert state.pending is Pending.MESSAGE
    return engine, state, texts(actions)


def test_a_triage_advice_never_heard_is_said_before_the_message(tmp_path: Path) -> None:
    # "See a doctor today, call the out-of-hours service now": a call back tomorrow comes too
    # late for it. The message offer says it first; heard then, nothing is noted.
    engine, state, offer = _advice_to_message(tmp_path)
    assert offer == [f"{ADVICE} {OFFER}"]
    state, actions = engine.handle(state, DONE)
    assert [type(a) for a in actions] == [RecordAudio]
    state, actions = engine.handle(state, RecordDone("vm", 5.0))
    state, actions = engine.handle(state, DONE)
    (store,) = [a for a in actions if isinstance(a, Store)]
    assert store.record.outcome == "message_left"
    assert not [r for r in store.record.reasons if r.startswith("unheard")]


def test_a_triage_advice_unheard_before_the_message_too_is_on_record(tmp_path: Path) -> None:
    engine, state, offer = _advice_to_message(tmp_path)
    state, actions = engine.handle(state, FAILED)
    assert texts(actions) == offer and state.pending is Pending.MESSAGE  # once more
    state, actions = engine.handle(state, FAILED)
    assert [type(a) for a in actions] == [RecordAudio]  # the message is still taken
    state, actions = engine.handle(state, RecordDone("vm", 5.0))
    state, actions = engine.handle(state, DONE)
    (store,) = [a for a in actions if isinstance(a, Store)]
    assert store.record.outcome == "message_left"
    assert "unheard: advice" in store.record.reasons, store.record.reasons


def test_a_triage_advice_never_heard_is_said_before_the_goodbye(tmp_path: Path) -> None:
    # No message to take (the call recorded one already, or the line closes): the goodbye
    # after the failed transfer carries the advice; unheard twice, it is on record.
    engine, state = _advice_call(tmp_path, "1")
    state = replace(state, recorded=True)
    events: list[Event] = [FAILED, FAILED, DONE]
    for event in events:
        state, _ = engine.handle(state, event)
    state, actions = engine.handle(state, TransferResult(False))
    (said,) = texts(actions)
    assert said.startswith(ADVICE) and state.pending is Pending.HANGUP
    state, actions = engine.handle(state, FAILED)
    assert texts(actions) == [said]
    state, actions = engine.handle(state, FAILED)
    (store,) = [a for a in actions if isinstance(a, Store)]
    assert store.record.outcome == "transfer_failed"
    assert "unheard: advice" in store.record.reasons


def test_a_stop_during_the_message_offer_still_says_the_unheard_advice(tmp_path: Path) -> None:
    # The line closes while the offer that carries the advice plays: the closing words cut
    # it short. Before, they said nothing of the advice and their end counted it as heard:
    # the caller left without "call the out-of-hours service now", and the record said nothing.
    engine, state, _ = _advice_to_message(tmp_path)
    state, actions = engine.handle(state, LineClosing())
    (said,) = texts(actions)
    assert said == f"{ADVICE} {CLOSING}"
    assert state.pending is Pending.HANGUP
    state, actions = engine.handle(state, FAILED)
    assert texts(actions) == [said]  # last words: once more
    state, actions = engine.handle(state, FAILED)
    (store,) = [a for a in actions if isinstance(a, Store)]
    assert store.record.outcome == "cut_shutdown"
    assert "unheard: advice" in store.record.reasons, store.record.reasons


def test_the_words_that_carry_an_unheard_advice_are_rendered_at_start(tmp_path: Path) -> None:
    # Said after the advice failed to play twice and the nurse was not reached: rendered at
    # start-up as every text that depends only on the settings, not while the caller waits.
    engine, state, offer = _advice_to_message(tmp_path)
    said = list(offer)
    engine, state = _advice_call(tmp_path, "1")
    state = replace(state, recorded=True)  # no message: the goodbye carries it
    events: list[Event] = [FAILED, FAILED, DONE, TransferResult(False)]
    for event in events:
        state, actions = engine.handle(state, event)
    said += texts(actions)
    engine, state = _advice_call(tmp_path, "1")
    events = [FAILED, FAILED, DONE, TransferResult(False, unconfirmed=True)]
    for event in events:
        state, actions = engine.handle(state, event)
    said += texts(actions)
    assert len(said) == 3 and all(s.startswith(ADVICE) for s in said), said
    said.append(f"{ADVICE} {CLOSING}")  # the line closed during the message offer
    prompts = engine.flowset.get("g").static_prompts(engine.params)
    assert [s for s in said if s not in prompts] == []


@pytest.mark.parametrize(
    ("ending", "outcome"),
    [
        (TransferResult(False, unanswered=True), "transfer_unanswered"),
        (HangUp(), "hung_up_before_transfer"),
        (TransferResult(True), "transfer_nurse"),
    ],
)
def test_a_triage_advice_never_said_again_is_on_record_however_the_call_ends(
    tmp_path: Path, ending: Event, outcome: str
) -> None:
    # The advice failed twice and the nurse was tried for it; the call then ends before the
    # advice is said again (a PBX that reached nobody, the caller's hang-up, or the transfer
    # taken). Before, the record said only prompt_failed: nothing told whoever calls back that
    # the caller never heard "see a doctor today, call the out-of-hours service now".
    engine, state = _advice_call(tmp_path, "1")
    for event in (FAILED, FAILED, DONE):
        state, actions = engine.handle(state, event)
    assert [type(a) for a in actions] == [TransferCall]
    state, actions = engine.handle(state, ending)
    (store,) = [a for a in actions if isinstance(a, Store)]
    assert store.record.outcome == outcome
    assert PROMPT_FAILED in store.record.reasons
    assert "unheard: advice" in store.record.reasons, store.record.reasons


def test_the_nurse_taking_an_unheard_advice_is_told_it_was_unheard(tmp_path: Path) -> None:
    # With CLINIC_TRANSFER_SUMMARY=full the nurse reads the triage's reasons: that the caller
    # never heard the advice is what the nurse must say first.
    (tmp_path / "g.yaml").write_text(ADVICE_FLOW, encoding="utf-8")
    engine = Engine(load_flows(tmp_path), FlowParams(transfer_summary="full"))
    state, _ = engine.start(engine.flowset.get("g"))
    for event in (DONE, Digit("1"), FAILED, FAILED, DONE):
        state, actions = engine.handle(state, event)
    (transfer,) = [a for a in actions if isinstance(a, TransferCall)]
    summary = dict(transfer.headers)[SUMMARY_HEADER]
    assert "unheard%3A advice" in summary, summary


# The fever answered, a short say before the advice: a 0 pressed while it plays reaches the
# advice's goodbye with no question left to take it (as during a lookup): the advice, then
# "connecting you" to staff, below U2 (U3).
ADVICE_AFTER_SAY_FLOW = ADVICE_FLOW.replace("goto: advice}", "goto: noted}").replace(
    "  advice:\n",
    '  noted:\n    say: "Thank you."\n    next: advice\n  advice:\n',
)


def _advice_before_staff(tmp_path: Path) -> tuple[Engine, CallState, str]:
    """The advice said before "connecting you", after a 0 below U2: its prompt plays."""
    (tmp_path / "g.yaml").write_text(ADVICE_AFTER_SAY_FLOW, encoding="utf-8")
    engine = Engine(load_flows(tmp_path), FlowParams(transfer_summary="full"))
    state, _ = engine.start(engine.flowset.get("g"))
    for event in (DONE, Digit("1")):
        state, _ = engine.handle(state, event)
    assert state.node == "noted"
    state, actions = engine.handle(state, Digit("0"))  # while "Thank you." plays
    (said,) = texts(actions)
    assert said.startswith(ADVICE) and state.pending is Pending.TRANSFER, said
    assert state.triage is not None and state.triage.urgency is Urgency.U3
    return engine, state, said


def test_a_triage_advice_before_a_human_asked_for_below_u2_unheard_is_on_record(
    tmp_path: Path,
) -> None:
    # The caller pressed 0 below U2: the advice is said first, then "connecting you". Its
    # words failed: before, the prompt was skipped as any say and the transfer went ahead
    # with nothing in the record or the summary to tell staff the caller never heard "see a
    # doctor today, call the out-of-hours service now" (the U2+ path said so).
    engine, state, said = _advice_before_staff(tmp_path)
    state, actions = engine.handle(state, FAILED)
    assert texts(actions) == [said], "not said once more"
    state, actions = engine.handle(state, FAILED)
    (transfer,) = [a for a in actions if isinstance(a, TransferCall)]
    assert transfer.uri == FlowParams().staff_uri  # the transfer goes ahead
    assert "unheard%3A advice" in dict(transfer.headers)[SUMMARY_HEADER]
    state, actions = engine.handle(state, TransferResult(True))
    (store,) = [a for a in actions if isinstance(a, Store)]
    assert store.record.outcome == "transfer_staff"
    assert "unheard: advice" in store.record.reasons, store.record.reasons
    assert [s.input for s in store.record.path].count(PROMPT_FAILED) == 2


def test_a_triage_advice_before_a_human_heard_the_second_time_is_not_noted(
    tmp_path: Path,
) -> None:
    engine, state, _ = _advice_before_staff(tmp_path)
    for event in (FAILED, DONE):
        state, actions = engine.handle(state, event)
    assert [type(a) for a in actions] == [TransferCall]
    state, actions = engine.handle(state, TransferResult(True))
    (store,) = [a for a in actions if isinstance(a, Store)]
    assert not [r for r in store.record.reasons if r.startswith("unheard")]


def test_an_advice_before_a_human_unheard_twice_is_said_before_the_message_offer(
    tmp_path: Path,
) -> None:
    # the advice said before "connecting you" after a 0 (below U2) fails twice; the
    # transfer goes ahead and fails: the message offer (or the goodbye) must carry the advice
    # the caller never heard, as on the goodbye's own path (unheard_advice).
    engine, state, _ = _advice_before_staff(tmp_path)
    for event in (FAILED, FAILED):
        state, actions = engine.handle(state, event)
    state, actions = engine.handle(state, TransferResult(False))
    assert state.pending is Pending.MESSAGE
    (offer,) = texts(actions)
    assert offer.startswith(ADVICE), offer


REPEAT_STATUS_FLOW = """\
id: r
language: en
human: staff
start: status
nodes:
  status:
    say: "Your results are ready in the patient portal."
    next: again
    backs_outcome: results_status_given
    outcome_unheard: results_status_unheard
  again:
    ask:
      prompt: "To hear that again, press 1. Otherwise press 2."
      choices:
        - {key: "1", phrases: ["again"], label: again, goto: status}
        - {key: "2", phrases: ["no"], label: no, goto: bye}
  bye:
    hangup: "Goodbye."
    outcome: results_status_given
"""


def test_a_backed_say_heard_on_a_later_pass_backs_its_outcome(tmp_path: Path) -> None:
    # the status unheard twice, then asked for again and heard in full: the caller
    # was told, yet the record says results_status_unheard (the pair is never dropped).
    (tmp_path / "r.yaml").write_text(REPEAT_STATUS_FLOW, encoding="utf-8")
    engine = Engine(load_flows(tmp_path), FlowParams())
    state, _ = engine.start(engine.flowset.get("r"))
    for event in (FAILED, FAILED, DONE, Digit("1"), DONE, DONE, Digit("2")):
        state, actions = engine.handle(state, event)
    state, actions = engine.handle(state, DONE)  # "Goodbye." heard
    (store,) = [a for a in actions if isinstance(a, Store)]
    assert store.record.outcome == "results_status_given", store.record.outcome


RECORD_FLOW = """\
id: r
language: en
human: staff
start: tell
nodes:
  tell:
    say: "After the tone, say the name of each medicine you need."
    next: message
  message:
    record: {max_s: 60, save: note}
    next: thanks
  asked:
    record: {prompt: "After the tone, say your name.", max_s: 30, save: note}
    next: thanks
  thanks:
    hangup: "Thank you. Goodbye."
    outcome: prescription_requested
"""


@pytest.mark.parametrize("start", ["tell", "asked"])
def test_what_to_record_unheard_twice_reaches_a_human_not_a_bare_beep(
    tmp_path: Path, start: str
) -> None:
    # The words before the beep (a say just before a record with no prompt, or the
    # record's own prompt) failed: said once more; failed again, the caller heard only the
    # beep and left a message nobody asked for, or hung up at it. A human, as for a
    # question nobody heard.
    (tmp_path / "r.yaml").write_text(RECORD_FLOW.replace("start: tell", f"start: {start}"))
    engine = Engine(load_flows(tmp_path), FlowParams())
    state, first = engine.start(engine.flowset.get("r"))
    state, again = engine.handle(state, FAILED)
    assert texts(again) == texts(first) and not any(isinstance(a, RecordAudio) for a in again)
    state, actions = engine.handle(state, FAILED)
    assert not any(isinstance(a, RecordAudio) for a in actions)
    assert (state.pending, state.transfer_uri) == (Pending.TRANSFER, STAFF)
    assert [s.input for s in state.path].count(PROMPT_FAILED) == 2
    # Heard on its second try: the recording goes ahead.
    state, _ = engine.start(engine.flowset.get("r"))
    state, _ = engine.handle(state, FAILED)
    state, actions = engine.handle(state, DONE)
    assert actions == [RecordAudio(60 if start == "tell" else 30)]
