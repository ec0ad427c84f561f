"""``flow simulate`` driven by scripted input."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from voice.ivr.engine import (
    Digit,
    Engine,
    HangUp,
    HangupCall,
    NoInput,
    Play,
    SpeechResult,
    Store,
    TransferCall,
)
from voice.ivr.flow import FlowParams, load_flows
from voice.ivr.session import TRANSFER_ANSWER_S
from voice.ivr.simulate import TransferEnding, main, parse_line, script_call

SHIPPED = Path(__file__).resolve().parents[2] / "ivr_flows"


def run(argv: list[str], lines: list[str]) -> tuple[int, list[str]]:
    feed: Iterator[str] = iter(lines)
    out: list[str] = []

    def read(prompt: str) -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    code = main(argv, input_fn=read, output_fn=out.append)
    return code, out


def test_parse_line() -> None:
    assert parse_line("12#") == [Digit("1"), Digit("2"), Digit("#")]
    assert parse_line(":silence") == [NoInput()]
    assert parse_line(":hangup") == [HangUp()]
    assert parse_line("yes please") == [SpeechResult("yes please", 1.0)]
    assert parse_line("~0.3 no") == [SpeechResult("no", 0.3)]


def test_simulate_a_triage_to_self_care() -> None:
    code, out = run(
        ["triage", "--flows-dir", str(SHIPPED)],
        ["1", "2", "2", "2", "2", "2", "8", ":values", "2", "5", ""],
    )
    assert code == 0
    text = "\n".join(out)
    assert "BOT: Is this call about yourself, a child, or someone else?" in text
    assert "   values: {'who': 'self'" in text
    assert "   urgency: U5, action: self_care" in text
    assert out[-1] == "-- call ended"


def test_simulate_an_emergency_by_route_and_speech(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLINIC_VOSK_LANGUAGE", "ko")  # a Korean model, for the Korean line
    code, out = run(["ko", "--flows-dir", str(SHIPPED), "--speech"], ["예"])
    assert code == 0
    text = "\n".join(out)
    assert "   transfer to sip:6100@127.0.0.1:5160" in text
    assert "   urgency: U1, action: call_emergency+transfer_nurse" in text


def test_simulate_webhook_reply_and_end_of_input() -> None:
    code, out = run(
        [str(SHIPPED / "results.yaml")],
        ["01021990#", "1234#", "ready=no"],
    )
    assert code == 0
    assert (
        "BOT: Your results are not ready yet. They will appear in the patient portal when they are."
        in out
    )
    assert out[-1] == "-- end of input"


def test_simulate_a_webhook_that_times_out() -> None:
    code, out = run([str(SHIPPED / "appointments.yaml")], ["1", "01021990#", "1234#", ":timeout"])
    assert code == 0
    assert "BOT: Sorry, the appointment system cannot be reached right now." in out


def test_simulate_reports_a_broken_folder(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text("id: x\nnodes: 3\n", encoding="utf-8")
    code, out = run(["x", "--flows-dir", str(tmp_path)], [])
    assert code == 1
    assert any(line.startswith(f"{tmp_path / 'x.yaml'}:") for line in out[0].splitlines())


def test_an_unknown_flow_id_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    # It used to fall through to the default route: main_menu ran and the exit was 0.
    code, out = run(["nonexist", "--flows-dir", str(SHIPPED)], [":hangup"])
    assert (code, out) == (2, [])
    err = capsys.readouterr().err
    assert "no flow 'nonexist' (flows here: appointments, main_menu, prescription," in err
    assert "called users in routes.yaml: 6000, 6001, 7001, ko, triage" in err


def test_a_called_user_routes_yaml_names_picks_its_flow() -> None:
    code, out = run(["6001", "--flows-dir", str(SHIPPED)], [":hangup"])
    assert code == 0
    assert out[0].startswith("-- triage (en)")


def test_the_default_folder_is_clinic_flows_dir(
    elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLINIC_FLOWS_DIR", str(SHIPPED))
    code, out = run(["triage"], [":hangup"])
    assert code == 0
    assert out[0].startswith("-- triage (en)")


def test_a_flow_file_is_found_by_its_path_not_its_stem(tmp_path: Path) -> None:
    flow = tmp_path / "hello.yaml"
    flow.write_text(
        "id: greeting\nlanguage: en\nstart: bye\nnodes:\n  bye: {hangup: Goodbye.}\n",
        encoding="utf-8",
    )
    code, out = run([str(flow)], [])
    assert code == 0
    assert out[0].startswith("-- greeting (en)")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["main_menu"], "CLINIC_FLOWS_DIR='ivr_flows' ({tmp}/ivr_flows): no such directory"),
        (["nofile.yaml"], "nofile.yaml: no such flow file"),
        (["x", "--flows-dir", "{tmp}/absent"], "--flows-dir '{tmp}/absent': no such directory"),
        (["x", "--flows-dir", "{tmp}/empty"], "--flows-dir '{tmp}/empty': no flows in it"),
        (["x", "--flows-dir", "{tmp}/routes_only"], "'{tmp}/routes_only': no flows in it"),
        (["x", "--flows-dir", "{tmp}/file"], "--flows-dir '{tmp}/file': not a directory"),
        (
            ["{tmp}/routes_only/routes.yaml", "--flows-dir", str(SHIPPED)],
            "{tmp}/routes_only/routes.yaml is not a flow of",
        ),
    ],
)
def test_what_is_not_there_is_a_clear_error(
    elsewhere: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    # These ended in a KeyError traceback, or ran a flow nobody asked for.
    (elsewhere / "empty").mkdir()
    (elsewhere / "routes_only").mkdir()
    (elsewhere / "routes_only" / "routes.yaml").write_text("default: x\n", encoding="utf-8")
    (elsewhere / "file").write_text("", encoding="utf-8")
    code, out = run([a.format(tmp=elsewhere) for a in argv], [])
    assert (code, out) == (2, [])
    err = capsys.readouterr().err
    assert err.startswith("clinic-voice flow simulate: ")
    assert message.format(tmp=elsewhere) in err
    assert err.count("\n") == 1


def test_a_misspelt_setting_is_an_error(
    elsewhere: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CLINIC_FLOW_DIR", str(SHIPPED))
    assert run(["triage"], []) == (2, [])
    assert "unknown setting(s): CLINIC_FLOW_DIR" in capsys.readouterr().err


def test_the_nurse_and_the_emergency_number_are_the_services(
    elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before, the simulator showed its own 112 and 6100@127.0.0.1:5160 whatever the clinic
    # had set: a flow author checking what callers hear saw another number.
    monkeypatch.setenv("CLINIC_EMERGENCY_NUMBER", "911")
    monkeypatch.setenv("CLINIC_NURSE_URI", "sip:nurse@pbx.example")
    monkeypatch.setenv("CLINIC_VOSK_LANGUAGE", "ko")
    code, out = run(["ko", "--flows-dir", str(SHIPPED), "--speech"], ["예"])
    assert code == 0
    text = "\n".join(out)
    assert "   transfer to sip:nurse@pbx.example" in text
    assert "9 1 1" in text and "1 1 2" not in text
    # The option still wins.
    code, out = run(
        ["ko", "--flows-dir", str(SHIPPED), "--speech", "--emergency-number", "999"], ["예"]
    )
    assert code == 0 and "9 9 9" in "\n".join(out)


def test_a_bad_service_setting_is_named(
    elsewhere: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CLINIC_EMERGENCY_NUMBER", "one-one-two")
    assert run(["triage", "--flows-dir", str(SHIPPED)], [":hangup"])[0] == 2
    assert "CLINIC_EMERGENCY_NUMBER" in capsys.readouterr().err


def test_simulate_shows_the_way_back_to_the_main_menu_and_its_cap() -> None:
    code, out = run(["6000", "--flows-dir", str(SHIPPED), "--open"], ["1", "9"] * 4)
    assert code == 0
    returns = [line for line in out if line.startswith("-- back to the main menu")]
    assert returns == [f"-- back to the main menu (main_menu), return {n} of 3" for n in (1, 2, 3)]
    assert "-- no more returns to the main menu (3 made): a human" in out
    assert "   transfer to sip:6200@127.0.0.1:5160" in out


@pytest.mark.parametrize(
    ("recorded", "said", "outcome"),
    [
        ("", "BOT: Thank you. Your message has been recorded", "message_left"),
        (
            ":silence",
            "BOT: Sorry, I did not hear a message. If this is an emergency",
            "transfer_failed",
        ),
        (":fail", "BOT: Sorry, your message could not be saved. If this is", "transfer_failed"),
    ],
)
def test_a_failed_transfer_shows_each_end_of_the_message(
    recorded: str, said: str, outcome: str
) -> None:
    # A message was always kept: "please call again later" (nothing heard, or not saved)
    # could not be shown with --transfer-fails.
    code, out = run(
        ["main_menu", "--flows-dir", str(SHIPPED), "--open", "--transfer-fails"],
        ["0", recorded],
    )
    assert code == 0
    assert [line for line in out if line.startswith(said)], out
    later = [line for line in out if line.endswith("Otherwise please call again later.")]
    assert bool(later) is (outcome != "message_left")
    assert f"   outcome: {outcome}" in out


# Each ending a transfer can have, as the caller (0: staff, open) meets it: the line that
# says which, then what the bot says (None: nothing, the PBX has the caller), the outcome.
TRANSFER_ENDINGS = [
    ("ok", "   (transfer answered)", None, "transfer_staff"),
    ("fails", "   (transfer failed)", "BOT: Sorry, nobody can take your call", "message_left"),
    (
        "unconfirmed",
        f"   (transfer unconfirmed: no answer {TRANSFER_ANSWER_S:g} s after the REFER)",
        "BOT: Sorry, nobody has answered. The clinic will call you back. If this is an"
        " emergency, hang up and call 1 1 2 now. Goodbye.",
        "transfer_unconfirmed",
    ),
    (
        "unanswered",
        "   (transfer unanswered: the PBX took the caller and reached nobody; the caller heard"
        " the PBX, not the bot)",
        None,
        "transfer_unanswered",
    ),
]


@pytest.mark.parametrize(("ending", "line", "said", "outcome"), TRANSFER_ENDINGS)
def test_the_tester_picks_how_a_transfer_ends(
    ending: str, line: str, said: str | None, outcome: str
) -> None:
    # Only answered or failed could be shown: not the call back promised when nobody
    # answers in time, nor the call a PBX took and lost.
    code, out = run(
        ["main_menu", "--flows-dir", str(SHIPPED), "--open", f"--transfer={ending}"], ["0", ""]
    )
    assert code == 0
    after = out[out.index("   transfer to sip:6200@127.0.0.1:5160") + 1 :]
    assert after[:2] == ["   (ringing)", line], out  # the ring tone until the answer
    bot = [text for text in after if text.startswith("BOT: ")]
    if said is None:
        assert bot == [], out
    else:
        assert bot[0].startswith(said), out
    assert f"   outcome: {outcome}" in after
    assert out[-1] == "-- call ended"


def test_an_urgent_caller_whose_transfer_is_unconfirmed_is_told_to_call_the_number(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CLINIC_VOSK_LANGUAGE", "ko")
    code, out = run(
        ["ko", "--flows-dir", str(SHIPPED), "--speech", "--transfer", "unconfirmed"], ["예"]
    )
    assert code == 0
    assert (
        "BOT: 죄송합니다. 아무에게도 연결하지 못했습니다. 지금 전화를 끊고 1 1 2번으로 전화하세요."
        in out
    )
    assert "   outcome: transfer_unconfirmed" in out
    assert "   urgency: U1, action: call_emergency+transfer_nurse" in out


def test_a_transfer_ending_can_be_typed_for_each_transfer() -> None:
    # --transfer ask: a line per transfer, as webhooks and recordings have. A caller who asks
    # for the nurse at a danger-sign question is U2; when that transfer fails, staff is tried:
    # two transfers, two lines (and a reply that is no ending is asked again).
    prompts: list[str] = []
    feed = iter(["4", "1", "0", ":nope", ":fail", ":unconfirmed"])

    def read(prompt: str) -> str:
        prompts.append(prompt)
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    out: list[str] = []
    code = main(
        ["main_menu", "--flows-dir", str(SHIPPED), "--open", "--transfer", "ask"],
        input_fn=read,
        output_fn=out.append,
    )
    assert code == 0, out
    asked = "transfer (Enter: answered, :fail, :unconfirmed, :unanswered or :hangup)> "
    assert prompts.count(asked) == 3, prompts
    assert "   not a transfer ending: ':nope'" in out
    ends = [line for line in out if line.startswith("   (transfer ")]
    assert ends[0] == "   (transfer failed)"
    assert ends[1].startswith("   (transfer unconfirmed")
    assert "   transfer to sip:6200@127.0.0.1:5160" in out  # staff, after the nurse
    # An urgent caller is told to call the emergency number, not promised a call back.
    assert (
        "BOT: Sorry, I could not reach anyone at the clinic. Please hang up now and call 1 1 2."
        in out
    )
    assert "   outcome: transfer_unconfirmed" in out


def test_transfer_fails_is_still_transfer_fails(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(
        ["main_menu", "--flows-dir", str(SHIPPED), "--open", "--transfer-fails"], ["0", ""]
    )
    assert code == 0 and "   (transfer failed)" in out and "   outcome: message_left" in out
    # Both at once is a usage error, not one silently winning.
    code, out = run(
        ["main_menu", "--flows-dir", str(SHIPPED), "--transfer-fails", "--transfer", "ok"], []
    )
    assert (code, out) == (2, [])
    assert "not allowed with argument" in capsys.readouterr().err


def _after(out: list[str], line: str) -> list[str]:
    return out[out.index(line) + 1 :]


@pytest.mark.parametrize(
    ("argv", "lines", "outcome", "kept"),
    [
        # The message for a call back after a failed transfer: the transfer failed (as
        # test_ivr_session_transfer.py's test_a_caller_who_hangs_up_at_the_beep_...).
        (["main_menu", "--open", "--transfer-fails"], ["0"], "transfer_failed", "callback_message"),
        # A flow's own recording: no request (tests/integration/test_ivr_keypad.py's
        # test_a_silent_message_is_not_a_request: caller_hung_up).
        (["prescription"], ["01021990#", "1234#"], "caller_hung_up", "prescription_message"),
    ],
)
def test_a_caller_who_hangs_up_at_the_beep_leaves_no_message(
    argv: list[str], lines: list[str], outcome: str, kept: str
) -> None:
    # ":hangup" at a recording was taken for a message: "thank you, your message has been
    # recorded", message_left or prescription_requested, for a call that left nothing.
    code, out = run([*argv, "--flows-dir", str(SHIPPED)], [*lines, ":hangup"])
    assert code == 0
    assert f"   outcome: {outcome}" in out, out
    assert not [line for line in out if kept in line], out
    after = _after(out, "   (the caller hung up at the beep: no message)")
    # Nobody is on the line to hear what the engine says to a silent message.
    assert not [line for line in after if line.startswith(("BOT: ", "   (hang up)"))], out
    assert out[-1] == "-- call ended"


def test_a_caller_who_hangs_up_during_a_webhook_has_its_reply_recorded() -> None:
    # ":hangup" at the reply was a reply: ok, empty, and the call went on. The session waits
    # for the request (an appointment still lands) and tells the engine of the hang-up after.
    code, out = run(
        [str(SHIPPED / "appointments.yaml")], ["1", "01021990#", "1234#", ":hangup", ":fail"]
    )
    assert code == 0
    assert "   outcome: caller_hung_up" in out, out
    after = _after(out, "   (the caller hung up: the request still runs, its reply is recorded)")
    assert not [line for line in after if line.startswith("BOT: ")], out
    code, out = run(
        [str(SHIPPED / "appointments.yaml")], ["1", "01021990#", "1234#", ":hangup", ""]
    )
    assert code == 0 and "   outcome: appointment_requested" in out, out


def test_a_caller_who_hangs_up_before_the_transfer_is_taken_on() -> None:
    code, out = run(
        ["main_menu", "--flows-dir", str(SHIPPED), "--open", "--transfer", "ask"], ["0", ":hangup"]
    )
    assert code == 0
    assert "   outcome: hung_up_before_transfer" in out, out
    assert "   (the caller hung up before the transfer was taken on)" in out


def _scripted(ending: TransferEnding, answers: list[str]) -> tuple[list[str], str]:
    """What script_call's caller hears on main_menu (0: staff) and the call's outcome."""
    engine = Engine(load_flows(SHIPPED), FlowParams())
    _, actions = script_call(engine, "main_menu", answers, transfer=ending)
    assert [a.uri for a in actions if isinstance(a, TransferCall)] == ["sip:6200@127.0.0.1:5160"]
    heard = [f"BOT: {a.text}" for a in actions if isinstance(a, Play)]
    (store,) = [a for a in actions if isinstance(a, Store)]
    return heard, store.record.outcome


@pytest.mark.parametrize("ending", [e for e in TransferEnding if e is not TransferEnding.ASK])
def test_script_call_ends_a_transfer_as_the_simulator_does(
    elsewhere: Path, ending: TransferEnding
) -> None:
    # script_call knew answered or failed only (transfer_ok): the same endings, the same
    # prompts and outcome as flow simulate --transfer for the same call.
    code, out = run(
        ["main_menu", "--flows-dir", str(SHIPPED), "--open", f"--transfer={ending}"], ["0", ""]
    )
    assert code == 0
    shown = [line for line in out if line.startswith("BOT: ")]
    (outcome,) = [line.removeprefix("   outcome: ") for line in out if "outcome:" in line]
    assert _scripted(ending, ["0"]) == (shown, outcome)
    # --transfer ask's replies, as the next answer
    reply = {"ok": "", "fails": ":fail"}.get(ending, f":{ending}")
    assert _scripted(TransferEnding.ASK, ["0", reply]) == (shown, outcome)


def test_script_call_unconfirmed_and_unanswered_transfers() -> None:
    engine = Engine(load_flows(SHIPPED), FlowParams())
    _, actions = script_call(engine, "main_menu", ["0"], transfer=TransferEnding.UNCONFIRMED)
    after = actions[next(i for i, a in enumerate(actions) if isinstance(a, TransferCall)) :]
    said = [a.text for a in after if isinstance(a, Play)]
    assert said == [
        "Sorry, nobody has answered. The clinic will call you back. If this is an emergency,"
        " hang up and call 1 1 2 now. Goodbye."
    ]
    assert [type(a) for a in after[-2:]] == [HangupCall, Store]
    assert isinstance(after[-1], Store) and after[-1].record.outcome == "transfer_unconfirmed"
    assert after[-1].record.transfer_target == "sip:6200@127.0.0.1:5160"
    # A PBX took the caller and reached nobody: the bot says nothing more, the call ends.
    _, actions = script_call(engine, "main_menu", ["0"], transfer=TransferEnding.UNANSWERED)
    after = actions[next(i for i, a in enumerate(actions) if isinstance(a, TransferCall)) + 1 :]
    assert [type(a) for a in after] == [HangupCall, Store]
    assert isinstance(after[-1], Store) and after[-1].record.outcome == "transfer_unanswered"
    assert after[-1].record.transfer_target is None
    # The caller hangs up before the transfer is taken on (--transfer ask's ":hangup").
    _, actions = script_call(engine, "main_menu", ["0", ":hangup"], transfer=TransferEnding.ASK)
    (store,) = [a for a in actions if isinstance(a, Store)]
    assert store.record.outcome == "hung_up_before_transfer"


def test_a_webhook_after_a_webhook_the_caller_hung_up_during_still_runs(tmp_path: Path) -> None:
    # The session holds the hang-up for every request under way, not only the first: the
    # second lookup's reply is the record's too (its outcome), then the hang-up.
    (tmp_path / "two.yaml").write_text(
        "id: two\nlanguage: en\nstart: first\nnodes:\n"
        "  first: {webhook: {url: scheduling, save: a}, next: second, on_fail: bye}\n"
        "  second: {webhook: {url: scheduling, save: b}, outcome: booked, next: bye,"
        " on_fail: bye}\n"
        "  bye: {say: Goodbye., next: end}\n  end: {hangup: ''}\n",
        encoding="utf-8",
    )
    code, out = run([str(tmp_path / "two.yaml")], [":hangup", "", ""])
    assert code == 0, out
    assert [line for line in out if line.startswith("   webhook scheduling")] == [
        "   webhook scheduling: {'call_id': 'simulated', 'caller': 'simulated', "
        "'caller_verified': False}"
    ] * 2
    assert "   outcome: booked" in out, out
    assert not [line for line in out if line.startswith("BOT: ")], out


UNHEARD = "   (speech is not listened for here: the caller hears nothing until the {} s timeout)"


@pytest.mark.parametrize(
    ("argv", "before", "words", "timeout"),
    [
        # No speech model: every question is keys-only.
        (["triage"], [], "yes please", "6"),
        # A digits entry takes no speech, with a model or without.
        (["results", "--speech"], [], "the first of february", "8"),
        # Part of an entry typed: the inter-digit time runs.
        (["results", "--speech"], ["0102"], "nineteen ninety", "6"),
    ],
)
def test_words_at_a_question_that_takes_no_speech_are_its_timeout(
    argv: list[str], before: list[str], words: str, timeout: str
) -> None:
    # Words there were dropped and the tester asked again, in silence: on a call nothing
    # listens for them, and the caller meets the question's timeout (its noinput reprompt,
    # then where its limit leads). The simulator now shows that, as :silence would.
    base = [*argv, "--flows-dir", str(SHIPPED), "--open"]
    code, said = run(base, [*before, *[words] * 4])
    assert code == 0
    notice = UNHEARD.format(timeout)
    assert notice in said, said
    code, silent = run(base, [*before, *[":silence"] * 4])
    assert code == 0
    assert [line for line in said if not line.startswith("   (speech is not")] == silent
    assert "BOT: Sorry, I did not hear anything." in "\n".join(silent)


def test_words_at_a_speech_question_are_heard() -> None:
    code, out = run(["main_menu", "--flows-dir", str(SHIPPED), "--speech", "--open"], ["nurse"])
    assert code == 0
    assert not [line for line in out if line.startswith("   (speech is not")], out
    assert "   transfer to sip:6200@127.0.0.1:5160" in out, out  # "nurse": a human, staff here


def test_script_call_words_at_a_keys_only_question_are_its_timeout() -> None:
    engine = Engine(load_flows(SHIPPED), FlowParams())
    said = script_call(engine, "triage", ["yes please"] * 3)
    assert said == script_call(engine, "triage", [":silence"] * 3)
    assert [p.input for p in said[0].path].count("noinput") == 3


PRESCRIPTION = ["01021990#", "1234#"]


@pytest.mark.parametrize(
    ("endings", "outcome", "message"),
    [
        ((), "prescription_requested", "test.wav"),
        (("",), "prescription_requested", "test.wav"),
        ((":silence",), "prescription_requested", "test.wav"),  # asked again, then a message
        ((":silence", ":silence"), "transfer_staff", None),
        ((":fail",), "transfer_staff", None),
        ((":hangup",), "caller_hung_up", None),
        # "#" after the beep ends the recording, nothing said (was: a message kept)
        (("#",), "prescription_requested", "test.wav"),  # asked again, then a message
        (("#", "12 #"), "transfer_staff", None),
    ],
)
def test_script_call_ends_a_recording_as_the_simulator_does(
    endings: tuple[str, ...], outcome: str, message: str | None
) -> None:
    # script_call kept every recording (test.wav): a silent, unsaved or hung-up message,
    # and what the caller hears then, could not be scripted.
    engine = Engine(load_flows(SHIPPED), FlowParams())
    _, actions = script_call(engine, "prescription", PRESCRIPTION, recordings=endings)
    (store,) = [a for a in actions if isinstance(a, Store)]
    assert store.record.outcome == outcome
    assert dict(store.record.values).get("prescription_message") == message
    # The same prompts as flow simulate, given the same endings at its recording lines.
    replies = [*endings, ""] if endings and endings[-1] == ":silence" else [*endings] or [""]
    code, out = run(
        ["prescription", "--flows-dir", str(SHIPPED), "--open"], [*PRESCRIPTION, *replies, ""]
    )
    assert code == 0
    assert [f"BOT: {a.text}" for a in actions if isinstance(a, Play)] == [
        line for line in out if line.startswith("BOT: ")
    ]
    assert f"   outcome: {outcome}" in out, out


def test_a_recording_follows_its_beep_and_a_hash_after_it_ends_it() -> None:
    # voice/ivr/session.py plays a beep, then records; a "#" then ends the recording (and
    # reaches nobody), other keys change nothing. The simulator showed no beep and took a
    # "#" typed at the recording line for a kept message.
    prompts: list[str] = []
    feed = iter([*PRESCRIPTION, "12", "#", ""])
    out: list[str] = []

    def read(prompt: str) -> str:
        prompts.append(prompt)
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    code = main(["prescription", "--flows-dir", str(SHIPPED)], read, out.append)
    assert code == 0, out
    recording = out.index("   (recording up to 60 s)")
    assert out[recording - 1] == "   (beep)", out
    assert out[recording + 1 : recording + 4] == [
        "   (keys do nothing during a recording, but # ends it)",
        "   (# ends the recording: nothing said before it, no message)",
        "BOT: Sorry, I did not hear a message. After the tone, say the name and strength of"
        " each medicine you need. Press hash when you are done.",
    ], out
    assert out.count("   (beep)") == 2, out  # and before the second try
    assert sum(p.startswith("recording (") for p in prompts) == 3, prompts
    assert "   outcome: prescription_requested" in out, out


def test_script_call_refuses_an_unknown_recording_ending() -> None:
    engine = Engine(load_flows(SHIPPED), FlowParams())
    with pytest.raises(ValueError, match="not a recording ending"):
        script_call(engine, "prescription", PRESCRIPTION, recordings=[":silent"])
    with pytest.raises(ValueError, match="not a recording ending"):
        script_call(engine, "prescription", PRESCRIPTION, recordings=["12"])  # no "#"


def test_speech_is_for_the_flows_in_the_models_language(
    elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # serve hears speech in CLINIC_VOSK_LANGUAGE's flows only (en unless set): the Korean
    # line runs keypad-only with an English model. --speech listened on every flow, so the
    # simulator put a "예" through that a call would never hear.
    argv = ["ko", "--flows-dir", str(SHIPPED), "--speech", "--open"]
    code, out = run(argv, ["예"])
    assert code == 0
    assert "-- keypad only: the speech model is en (CLINIC_VOSK_LANGUAGE), this flow ko" in out
    assert "   (listening for keys, 6 s)" in out, out
    assert UNHEARD.format("6") in out, out
    assert not [line for line in out if line.startswith("   transfer to")], out
    monkeypatch.setenv("CLINIC_VOSK_LANGUAGE", "ko")
    code, out = run(argv, ["예"])
    assert code == 0
    assert not [line for line in out if line.startswith("-- keypad only")], out
    assert "   (listening for keys or speech, 6 s)" in out, out
    assert "   transfer to sip:6100@127.0.0.1:5160" in out, out


@pytest.mark.parametrize(
    ("at", "hours", "closed"),
    [
        # Amsterdam springs 02:00 -> 03:00 on 2026-03-29: 02:30 is read as 03:30 CEST
        # (README), so a range the clocks skip stays closed and the hour after opens.
        ("2026-03-29T02:30", "sun 02:00-03:00", True),
        ("2026-03-29T02:30", "sun 03:00-04:00", False),
        ("2026-03-29T02:30+01:00", "sun 03:00-04:00", False),
        # Falls back 03:00 -> 02:00 on 2026-10-25: 02:30 passes twice, both open.
        ("2026-10-25T02:30", "sun 02:00-03:00", False),
        ("2026-10-25T02:30+01:00", "sun 02:00-03:00", False),
    ],
)
def test_at_a_wall_time_the_clocks_skip_is_the_hour_after_it(
    monkeypatch: pytest.MonkeyPatch, at: str, hours: str, closed: bool
) -> None:
    monkeypatch.setenv("CLINIC_TIMEZONE", "Europe/Amsterdam")
    monkeypatch.setenv("CLINIC_OPENING_HOURS", hours)
    code, out = run(["main_menu", "--flows-dir", str(SHIPPED), "--at", at], [":hangup"])
    assert code == 0
    assert ("-- the practice is closed (opening hours)" in out) is closed, out[:3]


DOB = (
    "BOT: Please enter the patient's date of birth as eight digits: two for the day, two for"
    " the month and four for the year, then press hash."
)
PATIENT_NO = "BOT: Please enter the patient number, then press hash."
INCOMPLETE = "Sorry, that entry was not complete. It needs 8 digits. "


@pytest.mark.parametrize(
    ("lines", "shown"),
    [
        # The whole entry and its # on one line: the caller waits for nothing after the
        # first digit (its 6 s inter-digit wait is cut by the rest), so none is shown. It
        # was: "(listening for keys, 4 s)" after the complete entry, before the next question.
        (["1", "01012000#"], [DOB, "   (listening for keys, 8 s)", PATIENT_NO]),
        # A pause after "0101": the entry waits 6 s after its last digit, as on a call.
        (
            ["1", "0101", "2000#"],
            [DOB, "   (listening for keys, 8 s)", "   (listening for keys, 6 s)", PATIENT_NO],
        ),
        # Typed ahead into the entry's prompt, one digit short: the nomatch follows at once.
        (
            ["12345678#"],
            [DOB, "   (prompt cut short)", "BOT: " + INCOMPLETE + DOB[5:]],
        ),
    ],
)
def test_a_keypad_entry_shows_only_the_waits_a_caller_meets(
    lines: list[str], shown: list[str]
) -> None:
    code, out = run(["appointments", "--flows-dir", str(SHIPPED)], lines)
    assert code == 0
    start = out.index(DOB)
    assert out[start : start + len(shown)] == shown, out
