"""``flow check``: what a caller can reach and hear, beyond what the graph shows.

A branch on a setting, a prompt made of a webhook reply's field alone, a goodbye that claims
a triage's advice without saying it, and a choice only speech can take: each passed the
check and failed the caller on the line.
"""

from __future__ import annotations

from pathlib import Path

from voice.ivr.check import check_files


def findings(folder: Path, text: str) -> list[str]:
    (folder / "t.yaml").write_text(text, encoding="utf-8")
    (folder / "routes.yaml").write_text("default: t\nroutes: {}\n", encoding="utf-8")
    return [f.message and f"{f.line}: {f.message}" for f in check_files([folder])]


def test_a_branch_on_a_setting_is_found_and_names_what_a_branch_reads(tmp_path: Path) -> None:
    # {clinic_name} is spoken, never a value of the call: every caller took the default.
    got = findings(
        tmp_path,
        "id: t\nlanguage: en\nhuman: staff\nstart: pick\nnodes:\n"
        "  pick:\n    ask:\n      prompt: Which site?\n      save: site\n"
        "      choices:\n        - {key: '1', phrases: [north], label: north, goto: which}\n"
        "  which:\n    branch:\n      on: clinic_name\n"
        "      cases: {North Clinic: north}\n      default: bye\n"
        "  north: {hangup: North.}\n  bye: {hangup: Goodbye.}\n",
    )
    assert got == [
        "13: branch 'which' on 'clinic_name', a setting, not a value the call collects: every"
        " call takes its default (a branch reads urgency, hours or a value a step saves: site)"
    ]


def test_a_branch_on_nothing_collected_names_what_a_branch_reads(tmp_path: Path) -> None:
    got = findings(
        tmp_path,
        "id: t\nlanguage: en\nhuman: staff\nstart: post\nnodes:\n"
        "  post:\n    webhook: {url: scheduling, values: [], save: booking}\n"
        "    next: which\n    on_fail: bye\n"
        "  which:\n    branch: {on: bookng.ready, cases: {'yes': bye}, default: bye}\n"
        "  bye: {hangup: Goodbye.}\n",
    )
    assert got == [
        "11: branch on 'bookng.ready', which nothing collects (a branch reads urgency, hours"
        " or a value a step saves: booking.<field>)"
    ]


REPLY_ONLY = """\
id: t
language: en
human: staff
start: post
nodes:
  post:
    webhook: {url: scheduling, values: [], save: booking}
    next: told
    on_fail: bye
  told:
    say: "{booking.message}"
    next: bye
  bye: {hangup: "Goodbye."}
"""


def test_a_prompt_of_a_reply_field_alone_is_found(tmp_path: Path) -> None:
    # A reply without "message" (or with it empty) and the caller heard nothing at all.
    got = findings(tmp_path, REPLY_ONLY)
    assert got == [
        "11: say 'told' says only '{booking.message}', a webhook reply's field: a reply"
        ' without it would be silence; add words of your own ("Thank you. {booking.message}")'
    ]
    fixed = REPLY_ONLY.replace('"{booking.message}"', '"Thank you. {booking.message}"')
    assert findings(tmp_path, fixed) == []
    # A setting or a collected value has words of its own: not a finding.
    assert findings(tmp_path, REPLY_ONLY.replace("booking.message", "clinic_name")) == []


ADVICE = """\
id: t
language: en
human: nurse
start: breathing
nodes:
  breathing:
    ask:
      prompt: Are you short of breath?
      danger_sign: true
      choices:
        - {key: "1", phrases: ["yes"], label: "yes", urgency: U1, reason: breath, goto: er}
        - {key: "2", phrases: ["no"], label: "no", goto: fever}
  fever:
    ask:
      prompt: Have you had a fever for three days?
      choices:
        - {key: "1", phrases: ["yes"], label: "yes", urgency: U3, reason: fever, goto: grade}
        - {key: "2", phrases: ["no"], label: "no", goto: grade}
  grade:
    branch:
      on: urgency
      cases: {U3: advice, U5: home}
      default: nurse
  nurse:
    transfer: nurse
    outcome: transfer_nurse
  advice:
    say: "You should see a doctor today."
    next: today
  today:
    hangup: true
    outcome: same_day
  home:
    hangup: "Rest and drink enough. Goodbye."
    outcome: self_care
  er:
    transfer: nurse
    prompt: "Hang up and call {emergency_number} now, or stay on the line."
    outcome: call_emergency+transfer_nurse
"""


def test_an_advice_goodbye_with_no_words_is_found(tmp_path: Path) -> None:
    # The say before it is skipped should it fail; a goodbye's advice is said again, then
    # the nurse: the advice belongs in the goodbye.
    got = findings(tmp_path, ADVICE)
    assert got == [
        "31: hang-up 'today' ends with the advice 'same_day' but says none: write the advice"
        ' in its goodbye (hangup: "You should see a doctor today. ... Goodbye.")'
    ]
    fixed = ADVICE.replace("hangup: true", 'hangup: "You should see a doctor today. Goodbye."')
    assert findings(tmp_path, fixed) == []


MENU = """\
id: t
language: en
human: staff
start: menu
nodes:
  menu:
    ask:
      prompt: How can I help you?
      choices:
        - {key: "1", phrases: [appointment], label: appointment, goto: bye}
        - {phrases: [pharmacy], label: the pharmacy, goto: pharmacy}
  pharmacy:
    say: "The pharmacy opens at 8."
    next: bye
  bye: {hangup: "Goodbye."}
"""


def test_a_choice_only_speech_can_take_is_found(tmp_path: Path) -> None:
    # On a line without a speech model in the flow's language no word is heard.
    got = findings(tmp_path, MENU)
    assert got == [
        "11: choice 'the pharmacy' of ask 'menu' has phrases and no 'key': a caller on a line"
        " without speech (no speech model in the flow's language) cannot take it; give it a"
        " 'key'"
    ]
    assert (
        findings(tmp_path, MENU.replace("{phrases: [pharmacy]", '{key: "5", phrases: [pharmacy]'))
        == []
    )
    # Another word for a choice a key takes (same way, same value) leaves nobody out.
    alias = MENU.replace(
        "{phrases: [pharmacy], label: the pharmacy, goto: pharmacy}",
        "{key: '5', phrases: [pharmacy], label: the pharmacy, goto: pharmacy}\n"
        "        - {phrases: [chemist], value: '5', goto: pharmacy}",
    )
    assert findings(tmp_path, alias) == []
