"""``flow check``: clean on the shipped flows, exact ``file:line: message`` on broken ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from voice.ivr.check import check_files, main
from voice.ivr.flow import Say, load_flows
from voice.media.pcm import Pcm, silence, write_wav

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "ivr_flows"
BROKEN = ROOT / "tests" / "data" / "flows"

# Each broken flow and the findings it must produce (line: message), no more, no fewer.
EXPECTED: dict[str, list[str]] = {
    "unknown_target.yaml": ["10: unknown target 'nowhere' in 'menu'"],
    "unreachable.yaml": ["9: unreachable node 'orphan'"],
    "dead_end.yaml": ["14: dead end: branch 'route' on 'answer' has no default"],
    "never_ends.yaml": [
        "7: path never ends: no hang-up or transfer after 'first'",
        "12: path never ends: no hang-up or transfer after 'second'",
    ],
    "danger_to_self_care.yaml": [
        "15: urgency would go down: outcome self_care reached at U1 (path: breathing > advice)",
    ],
    "danger_no_human.yaml": [
        "8: danger-sign ask 'chest': no input or no match can end without a human (hang-up 'bye')",
        "19: call can end without a human at U2 (path: chest > bye)",
    ],
    "reserved_key.yaml": ["10: key 0 is reserved (0: a human, *: repeat)"],
    "reserved_value.yaml": [
        "11: 'callback_message' is the engine's own value",
        "14: 'callback_message' is the engine's own value",
    ],
    "schema.yaml": [
        "7: dead end: node 'intro' has no 'next'",
        "8: unknown key 'nxt' in a say node",
        "10: unknown urgency 'U9' (expected U0..U5)",
    ],
    "loop.yaml": [
        "7: loop without waiting for the caller at 'a'",
        "7: path never ends: no hang-up or transfer after 'a'",
        "10: path never ends: no hang-up or transfer after 'b'",
    ],
    "bad_yaml.yaml": ["5: YAML: expected ',' or ']', but got '<stream end>'"],
    "unspoken_label.yaml": [
        # What the caller is told to say, and what to write: the phrases to pick from.
        "12: label 'moving an appointment' is spoken as an answer but none of its phrases"
        ' matches it: the hint says "Say moving an appointment or press 2"; add \'moving an'
        " appointment' to its phrases (move, change), or make the label one of them",
        "14: label 'something else' is spoken as an answer but none of its phrases matches it:"
        " the hint says \"Say something else or press 4\"; add 'something else' to its phrases"
        " (it has none), or make the label one of them",
        "15: label 'other than book' is spoken as an answer but also matches 'book'",
    ],
    "audio_files.yaml": [
        "8: audio 'welcome-missing.wav': no such file (next to the flow file)",
        "12: audio 'audio_files.yaml' is not a WAV file (file does not start with RIFF id)",
    ],
    "webhook_steps.yaml": [
        "14: unknown placeholder {patient_name}",
        "14: webhook posts 'clinic_name', which nothing collects",
        "14: webhook posts 'date_of_birth', which nothing collects",
        "15: unknown webhook url 'schedulng': write 'url: scheduling' (the service has:"
        " scheduling); its address is set by CLINIC_SCHEDULING_WEBHOOK",
        "20: a webhook's outcome cannot be the triage action 'self_care'",
    ],
    "no_danger_first.yaml": [
        "16: 'fever_days' grades the call before any danger-sign question was asked"
        " (path: complaint > fever_days)",
        "22: 'same_day' grades the call before any danger-sign question was asked"
        " (path: complaint > fever_days > same_day)",
        "25: 'self_care' grades the call before any danger-sign question was asked"
        " (path: complaint > self_care)",
    ],
    "goodbye_at_u3.yaml": [
        "24: call can end at U3 with outcome 'completed', which is no triage action"
        " (path: breathing > fever_days > bye)",
    ],
    "u1_to_staff.yaml": [
        "15: call can end at U1 with outcome 'transfer_staff': expected"
        " call_emergency+transfer_nurse (path: breathing > desk)",
    ],
    "unsafe_outcomes.yaml": [
        "9: ask 'bleeding' has an answer giving U1 or U0: mark it danger_sign: true",
        "18: hang-up 'bye' with outcome 'transfer_nurse': an outcome that promises a human"
        " needs a transfer",
    ],
}


def test_shipped_flows_are_clean() -> None:
    assert [str(f) for f in check_files([SHIPPED])] == []


def test_each_shipped_file_is_clean_on_its_own() -> None:
    files = sorted(SHIPPED.glob("*.yaml"))
    assert len(files) >= 6
    assert [str(f) for f in check_files(files)] == []


def test_every_broken_flow_is_covered() -> None:
    assert sorted(p.name for p in BROKEN.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_broken_flow_findings(name: str) -> None:
    path = BROKEN / name
    got = [str(f) for f in check_files([path])]
    assert got == [f"{path}:{line}" for line in EXPECTED[name]]


def test_main_prints_findings_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    path = BROKEN / "unknown_target.yaml"
    assert main([str(path)]) == 1
    assert capsys.readouterr().out == f"{path}:10: unknown target 'nowhere' in 'menu'\n"


def test_main_exits_0_on_the_shipped_flows(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(SHIPPED)]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # Exit 2, not 1 (findings): nothing was checked.
        (["{broken}/absent.yaml"], "{broken}/absent.yaml: no such file or directory"),
        (["{tmp}/empty"], "{tmp}/empty: no flows in it"),
        (["{tmp}/routes_only"], "{tmp}/routes_only: no flows in it"),
        ([], "CLINIC_FLOWS_DIR='ivr_flows' ({tmp}/ivr_flows): no such directory"),
    ],
)
def test_main_refuses_to_check_nothing(
    elsewhere: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    # An empty folder, or none (run outside the repository), printed "ok" and exited 0.
    (elsewhere / "empty").mkdir()
    (elsewhere / "routes_only").mkdir()
    (elsewhere / "routes_only" / "routes.yaml").write_text("default: x\n", encoding="utf-8")
    assert main([a.format(broken=BROKEN, tmp=elsewhere) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("clinic-voice flow check: ")
    assert message.format(broken=BROKEN, tmp=elsewhere) in err
    assert err.count("\n") == 1


def test_main_defaults_to_clinic_flows_dir(
    elsewhere: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CLINIC_FLOWS_DIR", str(SHIPPED))
    assert main([]) == 0
    assert capsys.readouterr().err == f"ok: {SHIPPED}\n"


def test_main_refuses_a_misspelt_setting(
    elsewhere: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # CLINIC_FLOW_DIR would otherwise be ignored: the check would look in ./ivr_flows.
    monkeypatch.setenv("CLINIC_FLOW_DIR", str(SHIPPED))
    assert main([]) == 2
    assert "unknown setting(s): CLINIC_FLOW_DIR" in capsys.readouterr().err


def test_a_route_to_a_missing_flow_is_found(tmp_path: Path) -> None:
    (tmp_path / "only.yaml").write_text(
        "id: only\nlanguage: en\nstart: bye\nnodes:\n  bye: {hangup: true}\n", encoding="utf-8"
    )
    (tmp_path / "routes.yaml").write_text(
        "default: only\nroutes:\n  '6000': ghost\n", encoding="utf-8"
    )
    got = [str(f) for f in check_files([tmp_path])]
    assert got == [f"{tmp_path / 'routes.yaml'}:3: unknown flow 'ghost' for route 6000"]


def test_a_recording_is_found_next_to_its_flow_file(tmp_path: Path) -> None:
    write_wav(tmp_path / "welcome.wav", Pcm(silence(0.1, 8000), 8000))
    (tmp_path / "hello.yaml").write_text(
        "id: hello\nlanguage: en\nstart: welcome\nnodes:\n"
        "  welcome:\n    say: {audio: welcome.wav}\n    next: bye\n"
        "  bye:\n    hangup: Goodbye.\n",
        encoding="utf-8",
    )
    assert [str(f) for f in check_files([tmp_path / "hello.yaml"])] == []
    say = load_flows(tmp_path).get("hello").nodes["welcome"]
    assert isinstance(say, Say) and say.audio == str(tmp_path / "welcome.wav")


def test_an_unknown_placeholder_in_a_choice_label_is_found(tmp_path: Path) -> None:
    # A label is spoken in the hint ("Press 1 for {offer.first}"): checked as a prompt is.
    (tmp_path / "t.yaml").write_text(
        "id: t\nlanguage: en\nhuman: staff\nstart: post\nnodes:\n"
        "  post:\n    webhook: {url: scheduling, values: [], save: offer}\n"
        "    next: pick\n    on_fail: bye\n"
        "  pick:\n    ask:\n      mode: keypad\n      prompt: 'The first free time is:'\n"
        "      choices:\n        - {key: '1', label: '{ofer.first}', goto: bye}\n"
        "  bye:\n    hangup: Goodbye.\n    outcome: done\n"
    )
    got = [str(f) for f in check_files([tmp_path])]
    assert got == [f"{tmp_path / 't.yaml'}:11: unknown placeholder {{ofer.first}}"]


def write_flows(folder: Path, flows: dict[str, str], default: str) -> Path:
    for name, text in flows.items():
        (folder / f"{name}.yaml").write_text(text, encoding="utf-8")
    (folder / "routes.yaml").write_text(f"default: {default}\nroutes: {{}}\n", encoding="utf-8")
    return folder


FRONT_DOOR = """\
id: front
language: en
start: pick
nodes:
  pick:
    ask:
      prompt: "Pick."
      choices:
        - {key: "1", phrases: [forms], label: forms, goto: "@forms"}
        - {key: "2", phrases: [goodbye], label: goodbye, goto: bye}
  bye: {hangup: "Goodbye."}
"""
FORMS = """\
id: forms
language: en
start: which
nodes:
  which:
    ask:
      prompt: "Which form?"
      choices:
        - {key: "1", phrases: [sick note], label: sick note, goto: noted}
        - {key: "9", phrases: [main menu], label: the main menu, goto: "@menu"}
  noted: {hangup: "Noted."}
"""


def test_a_way_back_to_the_menu_is_no_endless_path(tmp_path: Path) -> None:
    # front -> forms -> @menu -> front is a cycle the caller leaves by answering.
    folder = write_flows(tmp_path, {"front": FRONT_DOOR, "forms": FORMS}, "front")
    assert [str(f) for f in check_files([folder])] == []


def test_a_menu_and_sub_flow_with_no_way_out_still_never_end(tmp_path: Path) -> None:
    # Nothing but the way back: the engine's cap on returns (a human) is no way out.
    front = FRONT_DOOR.replace(
        '        - {key: "2", phrases: [goodbye], label: goodbye, goto: bye}\n', ""
    )
    front = front.replace('  bye: {hangup: "Goodbye."}\n', "")
    forms = FORMS.replace("goto: noted}", 'goto: "@menu"}').replace(
        '  noted: {hangup: "Noted."}\n', ""
    )
    forms = forms.replace("[main menu], label: the main menu", "[back], label: back")
    folder = write_flows(tmp_path, {"front": front, "forms": forms}, "front")
    assert [str(f) for f in check_files([folder])] == [
        f"{folder / 'forms.yaml'}:6: path never ends: no hang-up or transfer after 'which'",
        f"{folder / 'front.yaml'}:6: path never ends: no hang-up or transfer after 'pick'",
    ]


def test_the_way_back_needs_the_routes_default_flow(tmp_path: Path) -> None:
    folder = write_flows(tmp_path, {"forms": FORMS}, "front")
    got = [str(f) for f in check_files([folder])]
    assert got == [
        f"{folder / 'forms.yaml'}:10: unknown target '@menu' in 'which': the routes' default "
        "flow 'front' is missing",
        f"{folder / 'routes.yaml'}:1: unknown flow 'front' for route (default)",
    ]


def test_the_way_back_after_a_danger_sign_question_is_refused(tmp_path: Path) -> None:
    triage = """\
id: tri
language: en
human: nurse
start: breathing
nodes:
  breathing:
    ask:
      prompt: "Any difficulty breathing?"
      danger_sign: true
      choices:
        - {key: "1", phrases: ["yes"], label: "yes", urgency: U1, reason: breathing, goto: nurse}
        - {key: "2", phrases: ["no"], label: "no", goto: more}
  more:
    ask:
      prompt: "Anything else?"
      choices:
        - {key: "1", phrases: [done], label: done, goto: nurse}
        - {key: "9", phrases: [main menu], label: the main menu, goto: "@menu"}
  nurse:
    transfer: nurse
    outcome: call_emergency+transfer_nurse
"""
    folder = write_flows(tmp_path, {"front": FRONT_DOOR, "forms": FORMS, "tri": triage}, "front")
    assert [str(f) for f in check_files([folder / "tri.yaml"])] == [
        f"{folder / 'tri.yaml'}:18: 'more' goes back to the menu after a danger-sign question"
        " or a triage answer (path: breathing > more)",
    ]
    # The same way back before the first danger sign is a caller's wrong turn: allowed.
    before = triage.replace("start: breathing", "start: more").replace(
        "goto: more}", "goto: nurse}"
    )
    before = before.replace(
        'goto: nurse}\n        - {key: "9"', 'goto: breathing}\n        - {key: "9"'
    )
    write_flows(tmp_path, {"tri": before}, "front")
    assert [str(f) for f in check_files([folder / "tri.yaml"])] == []


# -- paths across flows (``@name``): a sub-flow reached with the state the path has ----------

ASKS_U2 = """\
id: tri
language: en
human: nurse
start: breathing
nodes:
  breathing:
    ask:
      prompt: "Any difficulty breathing?"
      danger_sign: true
      choices:
        - {key: "1", phrases: ["yes"], label: "yes", urgency: U1, reason: breathing, goto: nurse}
        - {key: "2", phrases: ["no"], label: "no", goto: rest}
  rest:
    ask:
      prompt: "Short of breath at rest?"
      choices:
        - {key: "1", phrases: ["yes"], label: "yes", urgency: U2, reason: breath, goto: "@forms"}
        - {key: "2", phrases: ["no"], label: "no", goto: nurse}
  nurse:
    transfer: nurse
    outcome: call_emergency+transfer_nurse
"""


def test_a_sub_flow_that_ends_without_a_human_at_the_urgency_reached_is_found(
    tmp_path: Path,
) -> None:
    # tri makes the call U2, then jumps to forms, whose goodbye is fine for a call that starts
    # there (U5) but ends this one without a clinician: the engine would turn it into a
    # transfer to the nurse ("outcome below urgency", logged as an error), so it is the
    # flow's fault, as within one flow. Found in tri (its state is the cause), with the chain.
    forms = FORMS.replace(
        '\n        - {key: "9", phrases: [main menu], label: the main menu, goto: "@menu"}', ""
    )
    folder = write_flows(tmp_path, {"front": FRONT_DOOR, "forms": forms, "tri": ASKS_U2}, "front")
    assert [str(f) for f in check_files([folder])] == [
        f"{folder / 'tri.yaml'}:14: 'noted' in flow 'forms': call can end without a human at"
        " U2 (flows: tri > forms; path: breathing > rest > @forms:which > noted)",
    ]
    assert [str(f) for f in check_files([folder / "forms.yaml"])] == []


def test_a_way_back_to_the_menu_in_a_sub_flow_after_a_triage_answer_is_found(
    tmp_path: Path,
) -> None:
    # forms offers the way back (fine from the menu); reached from tri at U2 it is the way
    # back "after a triage answer" the README refuses, also in a flow such a path reaches.
    folder = write_flows(tmp_path, {"front": FRONT_DOOR, "forms": FORMS, "tri": ASKS_U2}, "front")
    got = [str(f) for f in check_files([folder / "tri.yaml"])]
    assert (
        f"{folder / 'tri.yaml'}:14: 'which' in flow 'forms' goes back to the menu after a"
        " danger-sign question or a triage answer (flows: tri > forms; path: breathing > rest"
        " > @forms:which)"
    ) in got, got
    assert [str(f) for f in check_files([folder / "forms.yaml"])] == []


def test_a_jump_past_the_danger_signs_that_grades_is_found(tmp_path: Path) -> None:
    # front jumps into tri at its breath question, past the danger sign tri asks first: the
    # path grades the call before any danger-sign question. tri's own walk never meets it.
    tri = ASKS_U2.replace('goto: "@forms"}', "goto: nurse}")
    front = FRONT_DOOR.replace('goto: "@forms"}', 'goto: "@tri:rest"}')
    folder = write_flows(tmp_path, {"front": front, "tri": tri}, "front")
    assert [str(f) for f in check_files([folder])] == [
        f"{folder / 'front.yaml'}:6: 'rest' in flow 'tri' grades the call before any"
        " danger-sign question was asked (flows: front > tri; path: pick > @tri:rest)",
    ]


def test_a_menu_to_triage_to_nurse_path_across_flows_is_clean(tmp_path: Path) -> None:
    # The legitimate crossing: the menu sends the caller to the triage, whose urgent answer
    # goes on to a flow of its own that puts them through to the nurse.
    tri = ASKS_U2.replace('goto: "@forms"}', 'goto: "@nurse_line"}')
    nurse_line = """\
id: nurse_line
language: en
human: nurse
start: connect
nodes:
  connect:
    transfer: nurse
    prompt: "Connecting you to a nurse."
    outcome: transfer_nurse
"""
    front = FRONT_DOOR.replace('goto: "@forms"}', 'goto: "@tri"}')
    folder = write_flows(tmp_path, {"front": front, "tri": tri, "nurse_line": nurse_line}, "front")
    assert [str(f) for f in check_files([folder])] == []


def test_a_refused_way_back_in_the_shipped_triage_is_one_finding(tmp_path: Path) -> None:
    # The way back offered at the complaint, after the danger signs. Before, the replay went
    # on round the menu in that state, so the one refused return was also found in
    # appointments, prescription and results (their own ways back and goodbyes, at U2) and
    # in the triage's first question again: 11 findings for one fault, printed by serve too.
    folder = tmp_path / "flows"
    folder.mkdir()
    for source in SHIPPED.glob("*.yaml"):
        (folder / source.name).write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    triage = (folder / "triage.yaml").read_text(encoding="utf-8")
    last = "goto: other_daily}\n"
    assert triage.count(last) == 1
    back = '        - {key: "9", phrases: [main menu], label: the main menu, goto: "@menu"}\n'
    (folder / "triage.yaml").write_text(triage.replace(last, last + back), encoding="utf-8")
    line = 1 + triage[: triage.index(last)].count("\n") + 1
    expected = [
        f"{folder / 'triage.yaml'}:{line}: 'complaint' goes back to the menu after a"
        " danger-sign question or a triage answer (path: intro > for_whom > breathing > chest"
        " > conscious > bleeding > stroke > complaint)",
    ]
    assert [str(f) for f in check_files([folder])] == expected
    assert [str(f) for f in check_files(sorted(folder.glob("*.yaml")))] == expected


# Files that crashed `flow check` (and serve) with a traceback, found by
# tests/unit/test_prop_flows.py: each is now a finding on its line, and exit 1.
CRASHERS: list[tuple[bytes, str]] = [
    (b"id: f\n# caf\xe9\nstart: a\n", "2: not UTF-8 text (byte 0xe9): save it as UTF-8"),
    (b"id: f\nstart: a\nlanguage: 2026-13-45\n", "3: YAML: cannot read '2026-13-45' as timestamp"),
    (b"id: f\nhuman: !!timestamp x\n", "2: YAML: cannot read 'x' as timestamp"),
    (b"id: f\nstart: !!int x\n", "2: YAML: cannot read 'x' as int"),
    (b"id: f\nstart: !!float x\n", "2: YAML: cannot read 'x' as float"),
    (b"id: f\nstart: !!bool x\n", "2: YAML: cannot read 'x' as bool"),
    (b"id: f\nstart: !!map [1]\n", "2: YAML: expected a mapping node, but found sequence"),
    (b"id: f\nstart: !!map x\n", "2: YAML: expected a mapping node, but found scalar"),
    (
        b"id: f\n\nstart: " + b"1" * 5000 + b"\n",
        "3: YAML: cannot read '11111111111111111111...' as int",
    ),
    (b"id: f\nlanguage: 0x" + b"f" * 4000, "2: YAML: cannot read '0xffffffffffffffffff...' as int"),
    (b"[" * 3000, "1: YAML: nested too deeply"),
    (
        b'id: f\nstart: a\nnodes:\n  a:\n    say: {text: hi, audio: "a\\0.wav"}\n    next: a\n',
        "5: audio 'a\\x00.wav' is not a file name (a NUL character)",
    ),
]


@pytest.mark.parametrize(("data", "finding"), CRASHERS)
def test_what_yaml_cannot_read_is_a_finding_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data: bytes, finding: str
) -> None:
    path = tmp_path / "f.yaml"
    path.write_bytes(data)
    assert main([str(tmp_path)]) == 1
    assert f"{path}:{finding}\n" in capsys.readouterr().out


# An unconscious caller (U0) asked one more graded question, then told "see a doctor today";
# a "no" goes to the nurse, so the U0 path is the only one that goes down.
U0_THEN_GRADED = """\
id: t
language: en
human: nurse
start: conscious
nodes:
  conscious:
    ask:
      prompt: "Is the patient unconscious?"
      danger_sign: true
      choices:
        - {key: "1", phrases: ["yes"], label: "yes", urgency: U0, reason: unconscious, goto: pain}
        - {key: "2", phrases: ["no"], label: "no", goto: nurse}
  pain:
    ask:
      prompt: "Is the pain severe?"
      choices:
        - {key: "1", phrases: ["yes"], label: "yes", urgency: U3, reason: severe pain, goto: today}
        - {key: "2", phrases: ["no"], label: "no", urgency: U4, reason: mild pain, goto: today}
  today:
    hangup: "See a doctor today. Goodbye."
    outcome: same_day
  nurse:
    transfer: nurse
    prompt: "Connecting you to a nurse."
    outcome: transfer_nurse
"""
# A U0 answer sent through a branch on urgency, whose U0 case is the emergency.
U0_THROUGH_BRANCH = """\
id: t
language: en
human: nurse
start: conscious
nodes:
  conscious:
    ask:
      prompt: "Is the patient unconscious?"
      danger_sign: true
      choices:
        - {key: "1", phrases: ["yes"], label: "yes", urgency: U0, reason: coma, goto: outcome}
        - {key: "2", phrases: ["no"], label: "no", goto: outcome}
  outcome:
    branch:
      on: urgency
      cases: {U0: emergency, U5: advice}
      default: nurse
  emergency:
    transfer: nurse
    prompt: "Call 112 now. Connecting you to a nurse."
    outcome: call_emergency+transfer_nurse
  nurse:
    transfer: nurse
    prompt: "Connecting you to a nurse."
    outcome: transfer_nurse
  advice:
    hangup: "Rest. Goodbye."
    outcome: self_care
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # U0 is an IntEnum 0: read as false, the replay took it for "no urgency yet" (U5),
        # let the next answer set U3 and passed "same day" for an unconscious patient.
        (
            U0_THEN_GRADED,
            [
                "20: urgency would go down: outcome same_day reached at U0 (path: conscious > "
                "pain > today)"
            ],
        ),
        # ... and followed a branch on urgency to its U5 case, self-care, finding a fault
        # the flow does not have (and missing that its U0 case is reached).
        (U0_THROUGH_BRANCH, []),
    ],
    ids=["missed", "false_finding"],
)
def test_the_replay_keeps_u0(tmp_path: Path, text: str, expected: list[str]) -> None:
    (tmp_path / "t.yaml").write_text(text, encoding="utf-8")
    got = [str(f) for f in check_files([tmp_path / "t.yaml"])]
    assert got == [f"{tmp_path / 't.yaml'}:{line}" for line in expected]
