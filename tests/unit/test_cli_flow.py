"""``clinic-voice flow check`` and ``flow simulate`` through the CLI: every option is there."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from clinic_voice.cli import main
from voice.ivr import check, simulate

SHIPPED = Path(__file__).resolve().parents[2] / "ivr_flows"
_CLI = (sys.executable, "-m", "clinic_voice.cli")


@pytest.mark.parametrize(
    ("command", "tool_main", "options"),
    [
        (
            "simulate",
            simulate.main,
            [
                "flow",
                "--flows-dir",
                "--speech",
                "--emergency-number",
                "--transfer-fails",
                "--transfer {ok,fails,unconfirmed,unanswered,ask}",
            ],
        ),
        ("check", check.main, ["FILE_OR_DIR", "CLINIC_FLOWS_DIR"]),
    ],
)
def test_help_is_the_tools_own(
    capsys: pytest.CaptureFixture[str],
    command: str,
    tool_main: Callable[[Sequence[str]], int],
    options: list[str],
) -> None:
    # The CLI declared only the positional argument: --help hid --flows-dir, --speech, ...
    with pytest.raises(SystemExit) as exc:
        main(["flow", command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert tool_main(["--help"]) == 0
    assert text == capsys.readouterr().out
    assert text.startswith(f"usage: clinic-voice flow {command} ")
    assert [o for o in options if o not in text] == []


def test_simulate_options_reach_the_simulator(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("0\n"))
    argv = ["flow", "simulate", "main_menu", "--flows-dir", str(SHIPPED), "--speech"]
    assert main([*argv, "--transfer-fails", "--emergency-number", "999"]) == 0
    out = capsys.readouterr().out
    assert "(listening for keys or speech" in out
    assert "hang up and call 9 9 9." in out
    assert "   outcome: message_left" in out  # the transfer to staff failed


def test_a_bad_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["flow", "simulate", "triage", "--no-such-option"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_an_unknown_flow_through_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flow", "simulate", "nonexist", "--flows-dir", str(SHIPPED)]) == 2
    assert "no flow 'nonexist' (flows here: " in capsys.readouterr().err


def test_flow_check_through_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flow", "check", str(SHIPPED)]) == 0
    assert main(["flow", "check", str(SHIPPED / "absent.yaml")]) == 2
    assert "absent.yaml: no such file or directory" in capsys.readouterr().err


def test_a_reader_that_left_is_no_traceback() -> None:
    # "flow simulate ... | head -1": the pipe closed under the simulator's prints, and it
    # ended in a BrokenPipeError traceback (and another at Python's exit).
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [*_CLI, "flow", "simulate", "--flows-dir", str(SHIPPED), "triage"],
            input=b"1\n",
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 1
    assert b"Traceback" not in done.stderr, done.stderr.decode()[-2000:]
