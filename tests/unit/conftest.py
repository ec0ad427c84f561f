"""Fixtures shared by the unit tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run from outside the repository, with no ``CLINIC_*`` variable set."""
    for name in [n for n in os.environ if n.startswith("CLINIC_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# Property tests (tests/unit/test_prop_*.py): the same examples on every run (derandomize),
# few enough for the unit tier. HYPOTHESIS_PROFILE=deep searches much further, at random, to
# look for new faults (each one found gets a plain regression test of its own).
settings.register_profile(
    "unit", derandomize=True, max_examples=100, deadline=None, database=None, print_blob=True
)
settings.register_profile(
    "deep",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "5000")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "unit"))
