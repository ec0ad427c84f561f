"""sip_config/clinic-voice.service: the README's unit ("Under systemd") as shipped, and lines
that keep ``serve``'s stop whole: systemd signals ``serve`` alone, waits out every stop
deadline of the code, and does not restart a configuration error; and no core dump from its
first instruction on."""

from __future__ import annotations

import configparser
import inspect
import re
import tomllib
from pathlib import Path

from clinic_voice import cli, clinic_line, http_workers
from clinic_voice.redis_server import LOG_PIPE_REAP_S, SHUTDOWN_ASK_S, EmbeddedRedis
from sip_config.settings import Settings
from tests.readme_text import README
from verification import dispatcher
from voice.sip import pjsua, pool

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "sip_config" / "clinic-voice.service"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    parser.read_string(UNIT.read_text())
    return parser


def stop_seconds(call_drain_s: float) -> float:
    """Every deadline of serve's stop, one after the other as if none overlapped."""
    redis_stop_s = float(inspect.signature(EmbeddedRedis).parameters["stop_deadline_s"].default)
    return (
        cli.SHUTDOWN_GRACE_S  # requests in flight
        + http_workers.STOP_DEADLINE_S
        + dispatcher.STOP_SETTLE_S
        + call_drain_s
        + clinic_line.CLOSE_NOTICE_S
        + pool.WORKER_STOP_S
        + pool.CALLS_WIND_UP_S
        + pool.TASKS_LEFT_S
        + SHUTDOWN_ASK_S  # the SHUTDOWN command's client timeout
        + 3 * redis_stop_s  # SHUTDOWN, SIGTERM, SIGKILL: each waited for
        + LOG_PIPE_REAP_S  # its log pipe's reader, after its exit
    )


def test_the_readme_shows_the_shipped_unit() -> None:
    blocks = re.findall(r"```ini\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert UNIT.read_text() in blocks, "README's unit is not sip_config/clinic-voice.service"


def test_systemd_signals_serve_alone_and_kills_only_what_is_left() -> None:
    service = unit()["Service"]
    assert service["KillMode"] == "mixed"
    assert service.get("KillSignal", "SIGTERM") == "SIGTERM"


def test_the_stop_timeout_outlasts_every_deadline_of_the_stop() -> None:
    drain_s = Settings.from_env({}).ivr.call_drain_s
    needed = stop_seconds(drain_s)
    assert needed == drain_s + 67, "the README's sum (CLINIC_CALL_DRAIN_S + 67 s) is stale"
    timeout_s = float(unit()["Service"]["TimeoutStopSec"])
    assert timeout_s >= needed + 10, (timeout_s, needed)
    text = " ".join(README.read_text(encoding="utf-8").split())
    assert f"`TimeoutStopSec={timeout_s:g}`" in text
    assert f"`CLINIC_CALL_DRAIN_S` + {needed - drain_s:g} s, {needed:g} s with the default" in text


def test_a_sip_worker_signalled_with_serve_gives_up_waiting_within_the_stop() -> None:
    """Under systemd's control-group stop a SIP worker waits for serve's drain and Shutdown
    (voice/sip/worker.py): its wait, as serve starts it, ends before the unit's timeout."""
    drain_s = Settings.from_env({}).ivr.call_drain_s
    extra_s = clinic_line.CLOSE_NOTICE_S + pool.STOP_ASKED_MARGIN_S
    assert drain_s + extra_s <= stop_seconds(drain_s)
    text = " ".join(README.read_text(encoding="utf-8").split())
    assert f"waits `CLINIC_CALL_DRAIN_S` + {extra_s:g} s at most" in text


def test_a_sip_workers_stop_deadline_leaves_room_for_its_wait_for_answers() -> None:
    # A worker's stop waits up to STOP_ANSWERS_S for the answers to its CANCELs and BYEs (a
    # 487 ACKed), then tears pjsua down and exits, which had 3 s before that wait: a deadline
    # with less kills a worker that is stopping as asked (-9, serve exits 1).
    assert pool.WORKER_STOP_S >= pjsua.STOP_ANSWERS_S + 3.0
    # The stop's un-REGISTER is waited for inside that wait, not after it (pjsua.stop).
    assert pjsua.UNREGISTER_S <= pjsua.STOP_ANSWERS_S


def test_a_failure_restarts_it_and_a_configuration_error_does_not() -> None:
    service = unit()["Service"]
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"].split() == ["2"]
    assert "1" not in service.get("SuccessExitStatus", "").split()


def test_it_runs_the_venvs_serve_from_the_checkout() -> None:
    service = unit()["Service"]
    checkout = service["WorkingDirectory"]
    assert service["ExecStart"] == f"{checkout}/.venv/bin/clinic-voice serve"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["clinic-voice"] == "clinic_voice.cli:main"
    assert service["EnvironmentFile"].startswith("-/"), "optional: every setting has a default"
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


def test_no_core_dump_even_before_serve_forbids_them_itself() -> None:
    """serve sets RLIMIT_CORE to 0 (sip_config/core_dumps.py) once Python has started: a
    crash before that (the interpreter, a native import) would dump under the host's limit."""
    service = unit()["Service"]
    assert service["LimitCORE"] == "0", "soft and hard: one number sets both"
    text = " ".join(README.read_text(encoding="utf-8").split())
    assert "- `LimitCORE=0`: no core dump, soft and hard limit" in text
    assert "the systemd unit (`LimitCORE=0`)" in text
