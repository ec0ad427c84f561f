"""``flow check`` on the mistakes a clinic's administrator makes editing a copy of the flows:
each must be a finding that names the file, the line and what to do, and a long flow must
be checked in time (``serve`` runs the same check at start)."""

from __future__ import annotations

from pathlib import Path

import pytest

import voice.ivr.check as check_module
from voice.ivr.check import check_files
from voice.ivr.engine import Engine, Listen, Play, PromptDone
from voice.ivr.flow import Ask, Branch, FlowParams, hears_speech, load_flow, load_flows

# A small triage: one danger sign, then an urgency branch. {prompt}, {cases} and {goodbye}
# are what each case below changes.
TRIAGE = """\
id: tri
language: en
human: nurse
start: breathing
nodes:
  breathing:
    ask:
      prompt: {prompt}
      danger_sign: true
      choices:
        - {{key: "1", phrases: ["yes"], label: "yes", urgency: U1, reason: breathing, goto: sos}}
        - {{key: "2", phrases: ["no"], label: "no", goto: after}}
  after:
    branch:
      on: urgency
      cases: {cases}
  sos:
    transfer: nurse
    prompt: "Call {{emergency_number}} now. Connecting you to a nurse."
    outcome: call_emergency+transfer_nurse
  nurse:
    transfer: nurse
    prompt: "Connecting you to a nurse."
    outcome: transfer_nurse
  bye:
    hangup: {goodbye}
{extra}"""

GOOD = {
    "prompt": '"Is there serious difficulty breathing?"',
    "cases": "{U0: sos, U1: sos, U2: nurse, U3: nurse, U4: nurse, U5: bye}",
    "goodbye": '"Goodbye."',
    "extra": "",
}
TODAY = '  today:\n    hangup: "Please see a doctor today."\n    outcome: same_day\n'


CASES: dict[str, tuple[dict[str, str], list[str]]] = {
    # The caller hears "for yes, press 1, for no, press 2" and no question: a "no" to a danger
    # sign never asked would end the call.
    "empty prompt": (
        {"prompt": '""'},
        ["8: ask 'breathing' has an empty 'prompt': write the question"],
    ),
    "blank prompt": (
        {"prompt": '"  "'},
        ["8: ask 'breathing' has an empty 'prompt': write the question"],
    ),
    # A case for a level no answer gives (U1 goes to the transfer, an unclear answer is
    # U2): the same-day advice is never reached.
    "unreachable urgency case": (
        {"cases": "{U0: sos, U1: sos, U2: nurse, U3: today, U4: nurse, U5: bye}", "extra": TODAY},
        [
            "14: branch 'after': case U3 is never taken, so 'today' is never reached (paths "
            "come here at U2, U5 only: no answer before it gives U3)"
        ],
    ),
    # "u2" is a level the schema reads as U2: the engine must take it as U2, not as a case
    # that never matches (the unclear answer's U2 caller went to the default: goodbye).
    "lowercase urgency case": ({"cases": "{u0: sos, u1: sos, u2: nurse, default_: bye}"}, []),
    # Two keys to YAML, one level: the engine takes the first, the check judged the second.
    "urgency case twice": (
        {"cases": "{U0: sos, U1: sos, U2: nurse, u2: bye, default_: bye}"},
        ["16: case 'u2' is U2, given already as 'U2'"],
    ),
}


def write(tmp_path: Path, **changes: str) -> Path:
    text = TRIAGE.format(**{**GOOD, **changes})
    if "default_: bye" in text:
        text = text.replace(", default_: bye}", "}\n      default: bye")
    path = tmp_path / "tri.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_good_triage_is_clean(tmp_path: Path) -> None:
    assert check_files([write(tmp_path)]) == []


@pytest.mark.parametrize("name", sorted(CASES))
def test_admin_mistakes(tmp_path: Path, name: str) -> None:
    changes, expected = CASES[name]
    path = write(tmp_path, **changes)
    got = [str(f) for f in check_files([path])]
    assert got == [f"{path}:{line}" for line in expected]


def test_a_lowercase_urgency_case_is_the_level(tmp_path: Path) -> None:
    flow = load_flow(write(tmp_path, cases="{u0: sos, u1: sos, u2: nurse, default_: bye}"))
    branch = flow.nodes["after"]
    assert isinstance(branch, Branch)
    assert branch.cases == (("U0", "sos"), ("U1", "sos"), ("U2", "nurse"))


def test_a_say_with_no_words(tmp_path: Path) -> None:
    path = tmp_path / "menu.yaml"
    path.write_text(
        'id: menu2\nlanguage: en\nstart: hi\nnodes:\n  hi:\n    say: ""\n    next: bye\n'
        '  bye:\n    hangup: "Goodbye."\n',
        encoding="utf-8",
    )
    assert [str(f) for f in check_files([path])] == [
        f"{path}:6: say 'hi' has no words: give it a text"
    ]


MENU = """\
id: front
language: en
start: pick
nodes:
  pick:
    ask:
      prompt: "How can I help?"
      choices:
        - {key: "1", label: forms, goto: "@forms"}
        - {key: "2", label: goodbye, goto: byee}
  bye:
    hangup: "Goodbye."
"""


def test_unknown_targets_say_what_was_meant(tmp_path: Path) -> None:
    (tmp_path / "front.yaml").write_text(MENU, encoding="utf-8")
    # The admin saved the new flow as .yml: flow check used to say only "unknown target".
    (tmp_path / "forms.yml").write_text("id: forms\n", encoding="utf-8")
    got = [str(f) for f in check_files([tmp_path])]
    front = tmp_path / "front.yaml"
    assert got == [
        f"{front}:9: unknown target '@forms' in 'pick' (only *.yaml files are read: "
        "rename forms.yml)",
        f"{front}:10: unknown target 'byee' in 'pick' (did you mean 'bye'?)",
    ]
    (tmp_path / "forms.yml").rename(tmp_path / "forms.yaml")
    (tmp_path / "forms.yaml").write_text("id: forms\nnodes: [\n", encoding="utf-8")
    got = [str(f) for f in check_files([tmp_path]) if f.file == str(front)]
    assert got[0] == (
        f"{front}:9: unknown target '@forms' in 'pick' (forms.yaml did not load: see its findings)"
    )


def test_an_empty_file_and_an_unknown_language(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("# to do\n", encoding="utf-8")
    nl = tmp_path / "nl.yaml"
    nl.write_text(
        'id: nl\nlanguage: nl\nstart: bye\nnodes:\n  bye:\n    hangup: "Dag."\n',
        encoding="utf-8",
    )
    got = [str(f) for f in check_files([tmp_path / "empty.yaml", nl])]
    assert got == [
        f"{tmp_path / 'empty.yaml'}:1: empty flow file: a flow needs id, language, start and nodes",
        # What to write instead, and why another language is not a flow edit.
        f"{nl}:2: unknown language 'nl': write one the service has its own texts for (en, ko);"
        " another language needs those texts translated first (its sorry, connecting and"
        " closed sentences: SYSTEM_TEXTS in voice/ivr/flow.py)",
    ]


def chain(tmp_path: Path, steps: int, kind: str) -> Path:
    lines = ["id: long", "language: en", "start: n0", "nodes:"]
    for i in range(steps):
        body = f'say: "Step {i}."' if kind == "say" else f'set: {{step: "{i}"}}'
        lines += [f"  n{i}:", f"    {body}", f"    next: n{i + 1}"]
    lines += [f"  n{steps}:", '    hangup: "Goodbye."']
    path = tmp_path / "long.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_a_long_flow_is_checked_in_linear_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 2000-step flow took 10 s and a 20000-step one over 10 minutes (each pass of a
    # fixpoint over every node went one step further back); serve runs this at start.
    calls = 0
    edges = check_module._Checker.edges

    def counted(self: check_module._Checker, ref: tuple[str, str]) -> list[tuple[str, str]]:
        nonlocal calls
        calls += 1
        return edges(self, ref)

    monkeypatch.setattr(check_module._Checker, "edges", counted)
    steps = 1500
    assert check_files([chain(tmp_path, steps, "say")]) == []
    assert calls <= 4 * steps


def test_a_long_chain_of_steps_that_never_wait(tmp_path: Path) -> None:
    # The search for loops that never wait recursed once per step: RecursionError past 1000.
    assert check_files([chain(tmp_path, 1500, "set")]) == []


def test_a_digits_size_of_the_wrong_type_is_one_finding(tmp_path: Path) -> None:
    # It was three: the type, then "at least 2" and the format's size, of the default 1.
    path = tmp_path / "dob.yaml"
    path.write_text(
        "id: dob\nlanguage: en\nstart: dob\nnodes:\n  dob:\n    ask:\n"
        '      prompt: "Your date of birth, then hash."\n'
        '      digits: {min: "8", max: 8, terminator: "#", format: date_ddmmyyyy}\n'
        '      next: bye\n  bye:\n    hangup: "Goodbye."\n',
        encoding="utf-8",
    )
    assert [str(f) for f in check_files([path])] == [f"{path}:8: 'min' must be a number"]


@pytest.mark.parametrize(
    ("target", "found"),
    [
        ("staff", False),
        ("sip:6300@pbx.example", False),
        ("sips:reception@10.0.0.5:5061", False),
        ("billing", True),
        ("sip:", True),
        ("sip:reception desk@", True),
    ],
)
def test_a_transfer_target(tmp_path: Path, target: str, found: bool) -> None:
    path = tmp_path / "desk.yaml"
    path.write_text(
        f'id: desk\nlanguage: en\nstart: to\nnodes:\n  to:\n    transfer: "{target}"\n',
        encoding="utf-8",
    )
    expected = f"{path}:6: transfer to staff, nurse or a sip: URI (sip:user@host), not {target!r}"
    assert [str(f) for f in check_files([path])] == ([expected] if found else [])


def two_choices(tmp_path: Path, first: str, second: str) -> Path:
    """A front flow whose question has the two choices ``first`` and ``second`` (flow
    mappings, on lines 9 and 10)."""
    path = tmp_path / "front.yaml"
    path.write_text(
        "id: front\nlanguage: en\nstart: pick\nnodes:\n  pick:\n    ask:\n"
        '      prompt: "How can I help?"\n      choices:\n'
        f"        - {first}\n        - {second}\n"
        '  bye:\n    hangup: "Goodbye."\n',
        encoding="utf-8",
    )
    return path


def test_a_phrase_in_two_choices(tmp_path: Path) -> None:
    # "repeat prescription" heard as both choices: the caller who says it is asked again.
    path = two_choices(
        tmp_path,
        '{key: "2", phrases: [prescription, repeat prescription], goto: bye}',
        '{key: "3", phrases: [results, repeat prescription, results], goto: bye}',
    )
    assert [str(f) for f in check_files([path])] == [
        f"{path}:10: phrase 'repeat prescription' is in two choices"
    ]


def test_a_called_number_yaml_reads_as_another(tmp_path: Path) -> None:
    # 06000 was the route 3072 (octal) and +31201234567 lost its +: never matched, those
    # callers reached the default flow, and flow check said ok.
    (tmp_path / "front.yaml").write_text(
        'id: front\nlanguage: en\nstart: bye\nnodes:\n  bye:\n    hangup: "Goodbye."\n',
        encoding="utf-8",
    )
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        'default: front\nroutes:\n  6000: front\n  "07000": front\n  06000: front\n'
        "  +31201234567: front\n",
        encoding="utf-8",
    )
    assert [str(f) for f in check_files([tmp_path])] == [
        f'{routes}:5: called user 06000 is read by YAML as 3072: write it in quotes, "06000"',
        f"{routes}:6: called user +31201234567 is read by YAML as 31201234567: write it in "
        'quotes, "+31201234567"',
    ]


def test_a_node_given_twice(tmp_path: Path) -> None:
    # A node pasted and not renamed: YAML kept the second in silence, the first was gone.
    path = tmp_path / "front.yaml"
    path.write_text(
        'id: front\nlanguage: en\nstart: bye\nnodes:\n  bye:\n    hangup: "Goodbye."\n'
        '  bye:\n    hangup: "Bye now."\n',
        encoding="utf-8",
    )
    assert [str(f) for f in check_files([path])] == [
        f"{path}:7: YAML: 'bye' is given twice (also on line 5): the second would replace the first"
    ]


def test_a_phrase_that_holds_another_choices_phrase(tmp_path: Path) -> None:
    # "test results" holds "results" of the other choice: heard as both, asked again.
    path = two_choices(
        tmp_path,
        '{key: "2", phrases: [results], label: results, goto: bye}',
        '{key: "3", phrases: [test results, lab], label: lab, goto: bye}',
    )
    assert [str(f) for f in check_files([path])] == [
        f"{path}:10: phrase 'test results' also matches 'results': a caller who says it is "
        "never understood"
    ]


# -- phrases are checked only where a call can hear them ------------------------------------

ENTRY = '{min: 4, max: 10, terminator: "#"}'
ASK_KINDS = {
    # mode, digits ("" none): what the ask is
    "keypad question": ("keypad", ""),
    "speech question": ("speech", ""),
    "keypad and speech question": ("both", ""),
    "keypad entry": ("both", ENTRY),
    "keypad entry, keypad mode": ("keypad", ENTRY),
}


def one_ask(tmp_path: Path, mode: str, choices: list[str], digits: str = "") -> Path:
    """A flow whose one question (in ``mode``, ``digits`` when given) has ``choices``, each on
    its own line from line 10."""
    path = tmp_path / "front.yaml"
    entry = f"      digits: {digits}\n      next: bye\n" if digits else ""
    listed = "".join(f"        - {c}\n" for c in choices)
    path.write_text(
        "id: front\nlanguage: en\nstart: pick\nnodes:\n  pick:\n    ask:\n"
        f'      mode: {mode}\n      prompt: "How can I help?"\n{entry}'
        + (f"      choices:\n{listed}" if choices else "")
        + '  bye:\n    hangup: "Goodbye."\n',
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize(("mode", "heard"), [("keypad", False), ("both", True), ("speech", True)])
def test_a_phrase_twice_is_a_finding_only_where_speech_is_heard(
    tmp_path: Path, mode: str, heard: bool
) -> None:
    # A keypad question never listens for words (Engine.speech_on): its phrases are never
    # heard, so two choices sharing one, or one holding another's, confuse no caller. Its
    # refusal stopped serve, and with it the clinic line, at start.
    path = one_ask(
        tmp_path,
        mode,
        [
            '{key: "1", phrases: [results, my results], label: results, goto: bye}',
            '{key: "2", phrases: [prescription, my results], label: prescription, goto: bye}',
            '{key: "3", phrases: [test results], goto: bye}',
        ],
    )
    never = "a caller who says it is never understood"
    expected = [
        f"{path}:11: phrase 'my results' is in two choices",
        f"{path}:12: phrase 'test results' also matches 'results': {never}",
    ]
    assert [str(f) for f in check_files([path])] == (expected if heard else [])


SPEECH_ONLY = (
    "choice 'yes' of ask 'pick' has phrases and no 'key': a caller on a line without speech"
    " (no speech model in the flow's language) cannot take it; give it a 'key'"
)


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("keypad", "a keypad question hears no speech: give it a 'key'"),
        # A question that takes speech falls back to the keypad on a line without a speech
        # model in its flow's language: its phrase-only choice is out of reach there.
        ("both", SPEECH_ONLY),
        ("speech", SPEECH_ONLY),
    ],
)
def test_a_questions_choice_needs_a_key(tmp_path: Path, mode: str, message: str) -> None:
    # Phrases alone: no caller with only a keypad can take the choice (a danger sign's
    # "yes" never given), and nothing said so.
    path = one_ask(
        tmp_path,
        mode,
        ['{key: "1", phrases: [no], goto: bye}', "{phrases: [yes], goto: bye}"],
    )
    assert [str(f) for f in check_files([path])] == [f"{path}:11: {message}"]


def test_a_keypad_entry_speaks_no_label(tmp_path: Path) -> None:
    # A keypad entry hears no speech: its hint says "press 9, then hash", never "say the
    # main menu", so its label is no spoken answer (the way back of the README's entries).
    digits = '{min: 8, max: 8, terminator: "#", format: date_ddmmyyyy}'
    path = one_ask(tmp_path, "both", ['{key: "9", label: the main menu, goto: bye}'], digits)
    assert [str(f) for f in check_files([path])] == []


@pytest.mark.parametrize("kind", sorted(ASK_KINDS))
def test_hears_speech_is_the_engines_listening(tmp_path: Path, kind: str) -> None:
    # The checker's "can a call hear it" is the engine's: with speech on for the flow's
    # language, the Listen of each kind of question takes speech exactly when hears_speech.
    mode, digits = ASK_KINDS[kind]
    choices = [] if digits else ['{key: "1", phrases: [one], label: one, goto: bye}']
    one_ask(tmp_path, mode, choices, digits)
    flowset = load_flows(tmp_path)
    ask = flowset.get("front").nodes["pick"]
    assert isinstance(ask, Ask)
    engine = Engine(flowset, FlowParams(speech_enabled=True, speech_language="en"))
    state, _ = engine.start(flowset.get("front"))
    state, actions = engine.handle(state, PromptDone())
    listens = [a for a in actions if isinstance(a, Listen)]
    assert len(listens) == 1, actions
    assert listens[0].speech is hears_speech(ask) is (mode != "keypad" and not digits)


# -- keys that are one key once read, prompts a step needs ---------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("1", '"1"'),  # an int and a text: the loader turns both into "1"
        ("01", '"1"'),  # YAML 1.1 reads 01 as the octal 1
        ("0x1", "1"),
        ("true", "True"),
    ],
)
def test_keys_that_are_one_key_once_read(tmp_path: Path, first: str, second: str) -> None:
    # The branch's second case replaced its first in silence: the caller who typed 1 went
    # where the flow never said.
    path = tmp_path / "front.yaml"
    path.write_text(
        "id: front\nlanguage: en\nstart: pick\nnodes:\n  pick:\n    ask:\n"
        '      mode: keypad\n      prompt: "Your choice?"\n      save: choice\n'
        '      choices:\n        - {key: "1", label: one, goto: route}\n'
        f"  route:\n    branch:\n      on: choice\n      cases:\n"
        f"        {first}: bye\n        {second}: desk\n      default: bye\n"
        '  bye:\n    hangup: "Goodbye."\n  desk:\n    transfer: staff\n',
        encoding="utf-8",
    )
    read = "True" if first == "true" else "1"
    assert [str(f) for f in check_files([path])] == [
        f"{path}:17: YAML: {read!r} is given twice in step 'route' ({first} on line 16, "
        f"{second} here: one key once read): the second would replace the first"
    ]


SPEECH_LINE_PROMPT = (
    "ask 'pick' has no 'prompt': a line with a speech model says the 'prompt' ('keypad_prompt' "
    "only without one): write the question as 'prompt', or make it 'mode: keypad'"
)


@pytest.mark.parametrize(
    ("ask", "finding"),
    [
        # Left out, or "prompt:" with nothing after it: as an empty one, no question.
        ("", "7: ask 'pick' has no 'prompt': write the question"),
        ("      prompt:\n", "7: ask 'pick' has no 'prompt': write the question"),
        # A keypad prompt alone: a line with a speech model says the prompt (Flow.ask_prompt),
        # and the caller would hear "Say one or press 1." and no question.
        ('      keypad_prompt: "Press 1 for one."\n', f"7: {SPEECH_LINE_PROMPT}"),
        ('      mode: both\n      keypad_prompt: "Press 1 for one."\n', f"7: {SPEECH_LINE_PROMPT}"),
        # A keypad question never says its prompt: its keypad prompt alone is sound.
        ('      mode: keypad\n      keypad_prompt: "Press 1 for one."\n', ""),
        ('      prompt: "Your choice?"\n', ""),
    ],
)
def test_an_ask_without_a_prompt(tmp_path: Path, ask: str, finding: str) -> None:
    path = tmp_path / "front.yaml"
    path.write_text(
        f"id: front\nlanguage: en\nstart: pick\nnodes:\n  pick:\n    ask:\n{ask}"
        '      choices:\n        - {key: "1", phrases: [one], label: one, goto: bye}\n'
        '  bye:\n    hangup: "Goodbye."\n',
        encoding="utf-8",
    )
    assert [str(f) for f in check_files([path])] == ([f"{path}:{finding}"] if finding else [])


@pytest.mark.parametrize("mode", ["keypad", "both"])
@pytest.mark.parametrize("speech", [False, True])
def test_a_keypad_entry_with_only_a_keypad_prompt_says_it_on_any_line(
    tmp_path: Path, mode: str, speech: bool
) -> None:
    # A keypad entry hears no speech on any line, so it never says its prompt: flow check
    # passes it, and the engine says its keypad prompt with a speech model too. It said the
    # empty prompt there: silence, then a wait for digits nobody asked for.
    path = tmp_path / "front.yaml"
    path.write_text(
        "id: front\nlanguage: en\nstart: pick\nnodes:\n  pick:\n    ask:\n"
        f'      mode: {mode}\n      keypad_prompt: "Enter the patient number, then hash."\n'
        "      digits: {min: 4, max: 10}\n      next: bye\n"
        '  bye:\n    hangup: "Goodbye."\n',
        encoding="utf-8",
    )
    assert [str(f) for f in check_files([path])] == []
    flowset = load_flows(tmp_path)
    engine = Engine(flowset, FlowParams(speech_enabled=speech))
    _, actions = engine.start(flowset.get("front"))
    assert [a.text for a in actions if isinstance(a, Play)] == [
        "Enter the patient number, then hash."
    ]


@pytest.mark.parametrize(
    ("step", "finding"),
    [
        # Blank words where the flow meant some: silence (or nothing), then the transfer or
        # the hang-up. Left out, the transfer or the hang-up comes at once, by design.
        ('transfer: staff\n    prompt: ""', "transfer 'hi' has an empty 'prompt'"),
        ('transfer: staff\n    prompt: "  "', "transfer 'hi' has an empty 'prompt'"),
        ("transfer: staff\n    prompt:", "transfer 'hi' has an empty 'prompt'"),
        ('hangup: "   "', "hangup 'hi' has a blank goodbye"),
        ("transfer: staff", ""),
        ('transfer: staff\n    prompt: "Connecting you."', ""),
        ("hangup: true", ""),
        ("hangup:", ""),
        ('hangup: ""', ""),  # no goodbye, as "hangup: true": the engine hangs up at once
        ('hangup: "Goodbye."', ""),
    ],
)
def test_a_blank_prompt_on_a_transfer_or_a_hangup(tmp_path: Path, step: str, finding: str) -> None:
    path = tmp_path / "front.yaml"
    path.write_text(
        f"id: front\nlanguage: en\nstart: hi\nnodes:\n  hi:\n    {step}\n", encoding="utf-8"
    )
    line = 7 if "prompt" in step else 6
    what = {
        "transfer": "write what the caller hears before the transfer, or leave 'prompt' out to "
        "transfer at once",
        "hangup": "write it, or write 'hangup: true' to hang up at once",
    }
    expected = (
        [f"{path}:{line}: {finding}: {what[finding.split(maxsplit=1)[0]]}"] if finding else []
    )
    assert [str(f) for f in check_files([path])] == expected


@pytest.mark.parametrize(
    ("cases", "finding"),
    [
        # The engine compares the saved text exactly: these cases were never taken.
        (
            '"Yes": desk',
            "case 'Yes' of branch 'route' is never taken: 'choice' is only ever "
            "'01', 'yes' (did you mean 'yes'? the engine compares the text exactly)",
        ),
        # YAML reads 01 as the octal 1: never the answer's "01".
        (
            "01: desk",
            "case '01' of branch 'route' is never taken: 'choice' is only ever '01', "
            "'yes' (YAML reads 01 as '1': write it in quotes, \"01\")",
        ),
        (
            '"1": desk',
            "case '1' of branch 'route' is never taken: 'choice' is only ever '01', "
            "'yes' (did you mean '01'? the engine compares the text exactly)",
        ),
        (
            "true: desk",
            "case 'true' of branch 'route' is never taken: 'choice' is only ever "
            "'01', 'yes' (YAML reads true as 'True')",
        ),
        (
            '"3": desk',
            "case '3' of branch 'route' is never taken: 'choice' is only ever '01', 'yes'",
        ),
        ('"yes": desk', ""),
        ('"01": desk', ""),
    ],
)
def test_a_branch_case_no_answer_equals(tmp_path: Path, cases: str, finding: str) -> None:
    path = tmp_path / "front.yaml"
    path.write_text(
        "id: front\nlanguage: en\nstart: pick\nnodes:\n  pick:\n    ask:\n"
        '      mode: keypad\n      prompt: "Your choice?"\n      save: choice\n'
        '      choices:\n        - {key: "1", label: one, value: "01", goto: route}\n'
        '        - {key: "2", label: two, value: "yes", goto: route}\n'
        "  route:\n    branch:\n      on: choice\n      cases:\n"
        f"        {cases}\n      default: bye\n"
        '  bye:\n    hangup: "Goodbye."\n  desk:\n    transfer: staff\n',
        encoding="utf-8",
    )
    expected = [f"{path}:17: {finding}"] if finding else []
    assert [str(f) for f in check_files([path])] == expected


@pytest.mark.parametrize(
    ("cases", "finding"),
    [
        # A keypad entry may hold any digits: "0042" is a case it can meet, but YAML reads
        # 0042 as the octal 34, which no entry of 0042 equals.
        (
            "0042: desk",
            "case '0042' of branch 'route': YAML reads 0042 as '34': write it in quotes, \"0042\"",
        ),
        ('"0042": desk', ""),
        ("1234: desk", ""),
    ],
)
def test_a_branch_case_on_an_entry_as_yaml_reads_it(
    tmp_path: Path, cases: str, finding: str
) -> None:
    path = tmp_path / "front.yaml"
    path.write_text(
        "id: front\nlanguage: en\nstart: pick\nnodes:\n  pick:\n    ask:\n"
        '      mode: keypad\n      prompt: "Your number?"\n      save: number\n'
        "      digits: {min: 4, max: 4}\n      next: route\n"
        "  route:\n    branch:\n      on: number\n      cases:\n"
        f"        {cases}\n      default: bye\n"
        '  bye:\n    hangup: "Goodbye."\n  desk:\n    transfer: staff\n',
        encoding="utf-8",
    )
    expected = [f"{path}:16: {finding}"] if finding else []
    assert [str(f) for f in check_files([path])] == expected


def test_a_branch_case_for_a_value_not_collected_yet(tmp_path: Path) -> None:
    # The engine reads a value not collected yet as "" (Engine._branch): a case "" is taken
    # by every caller who has not answered yet (here, the first time through). Refused as a
    # case "no answer equals", flow check stopped serve with this working flow.
    path = tmp_path / "front.yaml"
    path.write_text(
        "id: front\nlanguage: en\nstart: route\nnodes:\n"
        "  route:\n    branch:\n      on: choice\n      cases:\n"
        '        "": pick\n        "yes": desk\n      default: bye\n'
        "  pick:\n    ask:\n"
        '      mode: keypad\n      prompt: "Your choice?"\n      save: choice\n'
        '      choices:\n        - {key: "1", label: one, value: "yes", goto: route}\n'
        '        - {key: "2", label: two, value: "no", goto: route}\n'
        '  bye:\n    hangup: "Goodbye."\n  desk:\n    transfer: staff\n',
        encoding="utf-8",
    )
    assert [str(f) for f in check_files([path])] == []
    flowset = load_flows(tmp_path)
    engine = Engine(flowset, FlowParams())
    _, actions = engine.start(flowset.get("front"))
    assert [a.text for a in actions if isinstance(a, Play)] == [
        "Your choice? For one, press 1. For two, press 2."
    ]


@pytest.mark.parametrize(
    ("record", "finding"),
    [
        # The engine records at once: the caller hears the beep and no word of what to say.
        ("{max_s: 60, save: message}", "record 'message' has no 'prompt'"),
        ('{prompt: "", max_s: 60, save: message}', "record 'message' has no 'prompt'"),
        ('{prompt: "  ", max_s: 60, save: message}', "record 'message' has no 'prompt'"),
        ("{prompt: , max_s: 60, save: message}", "record 'message' has no 'prompt'"),
        ('{prompt: "After the tone, say your name.", save: message}', ""),
    ],
)
def test_a_record_step_says_what_to_record(tmp_path: Path, record: str, finding: str) -> None:
    path = tmp_path / "front.yaml"
    path.write_text(
        "id: front\nlanguage: en\nstart: message\nnodes:\n  message:\n"
        f"    record: {record}\n    next: bye\n"
        '  bye:\n    hangup: "Thank you."\n',
        encoding="utf-8",
    )
    expected = [f"{path}:6: {finding}: {BEFORE_THE_BEEP}"] if finding else []
    assert [str(f) for f in check_files([path])] == expected


BEFORE_THE_BEEP = (
    "say what to record before the beep (in it, or in a say that every way into it passes "
    "just before)"
)


@pytest.mark.parametrize(
    ("ways_in", "found"),
    [
        # "After the tone, ..." said by the step before, the record with no prompt of its
        # own: the caller knows what to say. Refused, it stopped the clinic line at start.
        (("say", "say"), False),
        # A question's answer leads straight to the beep: no word of what to record.
        (("ask", "ask"), True),
        # One way in passes the say, the other does not: that caller hears only the beep.
        (("say", "ask"), True),
    ],
)
def test_a_record_without_a_prompt_after_a_say(
    tmp_path: Path, ways_in: tuple[str, str], found: bool
) -> None:
    # The question's choice 1 goes on by the first way, its choice 2 by the second: through
    # the say, or straight from the question to the record.
    one, two = ("say" if w == "say" else "message" for w in ways_in)
    path = tmp_path / "front.yaml"
    path.write_text(
        "id: front\nlanguage: en\nstart: pick\nnodes:\n  pick:\n    ask:\n"
        '      mode: keypad\n      prompt: "A message?"\n      choices:\n'
        f'        - {{key: "1", label: one, goto: {one}}}\n'
        f'        - {{key: "2", label: two, goto: {two}}}\n'
        '  say:\n    say: "After the tone, say your name."\n    next: message\n'
        "  message:\n    record: {max_s: 60, save: message}\n    next: bye\n"
        '  bye:\n    hangup: "Thank you."\n',
        encoding="utf-8",
    )
    got = [str(f) for f in check_files([path]) if "unreachable" not in f.message]
    expected = [f"{path}:16: record 'message' has no 'prompt': {BEFORE_THE_BEEP}"]
    assert got == (expected if found else [])


@pytest.mark.parametrize(
    ("step", "found"),
    [
        # A say's words, as a mapping: blank is as empty (the plain form's rule).
        ('say: {text: "  "}\n    next: bye', True),
        ('say: {text: "Hello."}\n    next: bye', False),
        # Optional words: a transfer refers at once, a hang-up ends at once.
        ("transfer: staff", False),
        ("hangup: true", False),
    ],
)
def test_steps_whose_words_are_optional_stay_so(tmp_path: Path, step: str, found: bool) -> None:
    path = tmp_path / "front.yaml"
    path.write_text(
        f"id: front\nlanguage: en\nstart: hi\nnodes:\n  hi:\n    {step}\n"
        '  bye:\n    hangup: "Goodbye."\n',
        encoding="utf-8",
    )
    got = [str(f) for f in check_files([path]) if "unreachable" not in f.message]
    assert got == ([f"{path}:6: say 'hi' has no words: give it a text"] if found else [])
