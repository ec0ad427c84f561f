"""How every bench script ends (bench.common.finish): one JSON line and its exit status."""

from __future__ import annotations

import json

import pytest

from bench.common import BenchError, finish


def _last_json(out: str) -> dict[str, object]:
    line = out.strip().splitlines()[-1]
    data: dict[str, object] = json.loads(line)
    return data


def test_figures_are_the_last_line_with_quick_added(capsys: pytest.CaptureFixture[str]) -> None:
    assert finish("x", True, lambda: {"bench": "x", "rate": 3}) == 0
    assert _last_json(capsys.readouterr().out) == {"bench": "x", "rate": 3, "quick": True}


def test_a_missed_goal_fails_only_when_strict(capsys: pytest.CaptureFixture[str]) -> None:
    missed: dict[str, object] = {"bench": "x", "goals_met": False}
    assert finish("x", False, lambda: dict(missed)) == 0
    assert finish("x", False, lambda: dict(missed), strict=True) == 1
    assert finish("x", False, lambda: {"bench": "x", "goals_met": True}, strict=True) == 0


def test_a_bench_error_is_reported_on_stderr_and_as_json(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def broken() -> dict[str, object]:
        raise BenchError("the service died\nits last lines")

    assert finish("x", False, broken) == 1
    out, err = capsys.readouterr()
    assert "bench failed: the service died" in err
    assert _last_json(out) == {"bench": "x", "quick": False, "error": "the service died"}
