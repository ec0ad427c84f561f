"""Which redis-server log lines the embedded Redis passes on, and at which level
(:func:`clinic_voice.redis_server.log_level`): the lines are those Redis 7.0.15 wrote."""

from __future__ import annotations

import logging

import pytest

from clinic_voice.redis_server import log_level

PID = "31640:M 05 Dec 2026 14:26:28.639"


@pytest.mark.parametrize(
    ("line", "level"),
    [
        # every start and stop: routine, though Redis marks them '#'
        ("31640:C 05 Dec 2026 14:26:28.639 # oO0OoO0OoO0Oo Redis is starting oO0OoO0OoO0Oo", 20),
        (f"{PID} # Redis version=7.0.15, bits=64, commit=00000000, modified=0, pid=31640", 20),
        (f"{PID} # Configuration loaded", 20),
        (f"{PID} # Server initialized", 20),
        (f"{PID} # User requested shutdown...", 20),
        (f"{PID} # Redis is now ready to exit, bye bye...", 20),
        # warnings stay warnings
        (f"{PID} # WARNING Memory overcommit must be enabled! Without it, a background save", 30),
        (f"{PID} # Background AOF rewrite terminated with error", 30),
        (f"{PID} # Asynchronous AOF fsync is taking too long (disk is busy?).", 30),
        # notices and the rest are not passed on
        (f"{PID} * Ready to accept connections unix", None),
        (f"{PID} - Accepted connection", None),
        ("not a log line # at all", 30),  # a '#' between spaces is read as Redis's mark
        ("", None),
    ],
)
def test_the_level_of_a_line(line: str, level: int | None) -> None:
    assert log_level(line) == level
    assert level in (None, logging.INFO, logging.WARNING)
