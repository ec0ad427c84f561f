"""A webhook reply's body as the flow sees it: the contract README documents, table-driven."""

from __future__ import annotations

from pathlib import Path

import pytest

from voice.ivr.engine import Engine, Play, PostWebhook
from voice.ivr.flow import FlowParams, load_flows
from voice.ivr.simulate import script_call
from voice.ivr.webhook import reply_values

SHIPPED = Path(__file__).resolve().parents[2] / "ivr_flows"

# (name, reply body, values the flow gets)
TABLE: list[tuple[str, bytes, dict[str, str]]] = [
    ("true is yes", b'{"ready": true}', {"ready": "yes"}),
    ("false is no", b'{"ready": false}', {"ready": "no"}),
    ("text stays text", b'{"message": "See you Monday."}', {"message": "See you Monday."}),
    ("numbers become text", b'{"slot": 3, "price": 12.5}', {"slot": "3", "price": "12.5"}),
    (
        "null, lists and objects are left out",
        b'{"a": null, "b": [1], "c": {}, "d": "x"}',
        {"d": "x"},
    ),
    # Python's json reads these as floats: "inf" and "nan" were values a flow spoke.
    (
        "numbers that are no number are left out",
        b'{"a": 1e999, "b": -1e999, "c": NaN, "d": Infinity, "e": -Infinity, "f": 2}',
        {"f": "2"},
    ),
    # Python reads no integer of over 4,300 digits from text: json.loads raised, and the
    # reply gave no values at all.
    (
        "an integer too long for Python is left out, not the rest",
        b'{"a": ' + b"9" * 4301 + b', "b": -' + b"9" * 4301 + b', "c": 4300, "d": "x"}',
        {"c": "4300", "d": "x"},
    ),
    ("an empty body: no values", b"", {}),
    ("only white space: no values", b" \r\n", {}),
    ("not JSON: no values", b"OK", {}),
    ("not UTF-8: no values", b"\xff\xfe", {}),
    ("JSON that is not an object: no values", b'["ready"]', {}),
    # json's decoder raised RecursionError past ~1,000 levels (found by test_prop_parsers.py)
    ("nested too deep for json: no values", b'{"a": ' * 1990, {}),
    ("closed, and as deep", b"[" * 5000 + b"]" * 5000, {}),
]


@pytest.mark.parametrize(("body", "values"), [t[1:] for t in TABLE], ids=[t[0] for t in TABLE])
def test_reply_values(body: bytes, values: dict[str, str]) -> None:
    assert reply_values(body) == values


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (b'{"ready": true}', "Your results are ready in the patient portal."),
        (b'{"ready": false}', "Your results are not ready yet."),
    ],
)
def test_a_boolean_ready_reaches_the_results_branch(body: bytes, said: str) -> None:
    engine = Engine(load_flows(SHIPPED), FlowParams())
    state, actions = script_call(
        engine, "results", ["01021990#", "1234#"], webhook_data=reply_values(body)
    )
    # "True" matched no case of the branch: every caller went to staff.
    assert (state.flow, state.node) == ("results", "more")
    assert any(isinstance(a, Play) and a.text.startswith(said) for a in actions)


# A flow that hands the clinic's numbers to the scheduling system and keeps one in the record.
NUMBERS_FLOW = """\
id: numbers
language: en
human: staff
start: keep
nodes:
  keep:
    set: {told: "{emergency_number}", service: "{out_of_hours_number}"}
    next: post
  post:
    webhook:
      url: scheduling
      values: [told]
      extra: {emergency: "{emergency_number}", out_of_hours: "{out_of_hours_number}"}
      save: booking
    next: bye
    on_fail: bye
  bye:
    hangup: "In an emergency, call {emergency_number}. Goodbye."
"""


def test_webhooks_and_records_carry_the_numbers_as_set_not_as_read_out(tmp_path: Path) -> None:
    # The spoken prompts read the numbers digit by digit ("1 1 2": text to speech said "one
    # hundred and twelve"); a webhook's body and a call's values are data for a machine and a
    # person reading the record: the number itself, as CLINIC_EMERGENCY_NUMBER has it.
    (tmp_path / "numbers.yaml").write_text(NUMBERS_FLOW, encoding="utf-8")
    params = FlowParams(emergency_number="112", out_of_hours_number="088 123-45")
    state, actions = script_call(Engine(load_flows(tmp_path), params), "numbers", [])
    (post,) = [a for a in actions if isinstance(a, PostWebhook)]
    assert dict(post.values) == {
        "told": "112",
        "emergency": "112",
        "out_of_hours": "088 123-45",
    }
    assert state.value("told") == "112" and state.value("service") == "088 123-45"
    # What the caller hears is read out as before.
    said = [a.text for a in actions if isinstance(a, Play)]
    assert said == ["In an emergency, call 1 1 2. Goodbye."]
