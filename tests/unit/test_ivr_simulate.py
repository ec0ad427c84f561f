"""``flow simulate`` driven by scripted input."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from voice.ivr.engine import Digit, HangUp, NoInput, SpeechResult
from voice.ivr.simulate import main, parse_line

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


def test_simulate_an_emergency_by_route_and_speech() -> None:
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
