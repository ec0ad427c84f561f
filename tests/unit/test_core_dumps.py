"""serve, http-worker and secret reseal turn core dumps off before anything else (a dump
would hold calls, codes and CLINIC_SECRET in clear): sip_config/core_dumps.py. The SIP
workers' own limit is checked on real workers in tests/integration/test_privacy_logs.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Raise the soft limit to the hard one (what a host may allow), run the command with a bad
# setting (it stops at once, exit 2) and print its exit, whether it asked for a core limit of
# 0 (soft and hard), and the limits it left. The request is watched as well as the result: the
# hard limit may be 0 already here (the integration tests run serve's code in pytest's own
# process, and only CAP_SYS_RESOURCE may raise it again), where the result alone shows nothing.
PROBE = (
    "import resource, sys\n"
    "asked = []\n"
    "setrlimit = resource.setrlimit\n"
    "def watched(which, limits):\n"
    "    asked.append((which, tuple(limits)))\n"
    "    setrlimit(which, limits)\n"
    "resource.setrlimit = watched\n"
    "soft, hard = resource.getrlimit(resource.RLIMIT_CORE)\n"
    "setrlimit(resource.RLIMIT_CORE, (hard, hard))\n"
    "from clinic_voice.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print(rc, int((resource.RLIMIT_CORE, (0, 0)) in asked),"
    " *resource.getrlimit(resource.RLIMIT_CORE))\n"
)


@pytest.mark.parametrize("argv", [["serve"], ["http-worker"], ["secret", "reseal"]])
def test_the_service_commands_turn_core_dumps_off(argv: list[str], tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINIC_")}
    env.update(
        CLINIC_LOG_LEVEL="LOUD",  # refused: the command stops before it starts anything
        CLINIC_DATA_DIR=str(tmp_path),
        PYTHONPATH=str(ROOT),
    )
    extra = ["--index", "1", "--control", str(tmp_path / "c")] if argv == ["http-worker"] else []
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv, *extra],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "CLINIC_LOG_LEVEL" in done.stderr, done.stderr
    assert done.stdout.split() == ["2", "1", "0", "0"], (done.stdout, done.stderr)
