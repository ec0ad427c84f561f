"""What the clinic line leaves in its logs and on disk, from real calls at DEBUG.

A caller with a real number (+31612345678) runs a danger-sign triage that transfers to the
nurse with the full summary (X-Clinic-Summary), then leaves a prescription message with a
date of birth and a patient number. Everything the service logs is captured: ``serve``'s own
records (``caplog``) and every line its SIP workers write to stderr, pjsua's own log included
(``capfd``: the service starts inside the test, so its workers inherit the captured fd 2).
None may hold the caller's number in any form, an answer, the summary or the message's
details; nor may a file the calls leave in the data dir or the private folders. The workers
are started with core dumps off: a dump of one would hold all of it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest

from clinic_voice.app import RUNTIME
from tests.integration.conftest import OpenApiCollector
from tests.peers.ivr_rig import Phone, phones, put_through_to_nurse, running_clinic_line

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CALL_S = 60.0
NUMBER = "+31612345678"
# The number as a log might carry it: E.164, digits only, national, international with 00,
# the national significant number (a SIP URI's user part is the first, as dialled).
NUMBER_FORMS = ("+31612345678", "31612345678", "0612345678", "0031612345678", "612345678")
DOB, PATIENT_NO = "01021980", "12345"
PRESCRIPTION_DTMF = ",".join(
    f"{key}@{0.5 + 0.25 * i:.2f}" for i, key in enumerate(["2", *DOB, "#", *PATIENT_NO, "#"])
)


@pytest.fixture
def core_dumps_allowed() -> Iterator[None]:
    """This process may dump core (soft limit raised to the hard one): what the service's
    workers inherit unless they turn it off themselves."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    if hard == 0:
        pytest.skip("the hard core-size limit is 0 already: nothing to turn off")
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))


def _core_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            return " ".join(line.split()[4:6])
    raise AssertionError(f"no core limit in /proc/{pid}/limits")


async def _message(tmp_path: Path) -> Path:
    """The caller's message: a 2 s tone 12 s into the call (a silent one is no request)."""
    wav = tmp_path / "message.wav"
    proc = await asyncio.create_subprocess_exec(
        "sox", "-n", "-r", "8000", "-c", "1", "-b", "16", str(wav), "synth", "2", "sine",
        "440", "vol", "0.5", "pad", "12", "0", stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(20):
        _, err = await proc.communicate()
    assert proc.returncode == 0, err
    return wav


def _files(folder: Path) -> Iterator[Path]:
    if folder.is_dir():
        yield from (p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.mark.usefixtures("core_dumps_allowed")
async def test_calls_at_debug_leave_no_number_answer_or_summary_in_logs_or_files(
    tmp_path: Path,
    openapi_responses: OpenApiCollector,
    ivr_prompt_cache: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    env = {"CLINIC_TRANSFER_SUMMARY": "full", "CLINIC_LOG_LEVEL": "DEBUG"}
    clinic = tmp_path / "clinic"
    clinic.mkdir()
    async with running_clinic_line(
        clinic, openapi_responses, env, prompt_cache=ivr_prompt_cache
    ) as line:
        pids = [w.pid for w in line.pool._workers]  # the workers' processes
        assert pids and all(pids), pids
        before = await line.call_ids()
        _, incoming = await put_through_to_nurse(
            line, "--call", line.uri("6000"), "--from-user", NUMBER,
            "--dtmf", "4@0.8,1@1.6", "--answers", "1",
        )  # fmt: skip
        triage = await line.new_record(before)
        before = await line.call_ids()
        async with phones() as started:
            caller = await Phone.start(
                "caller", "--call", line.uri("6000"), "--from-user", NUMBER,
                "--dtmf", f"{PRESCRIPTION_DTMF},#@15.0", "--play", str(await _message(tmp_path)),
            )  # fmt: skip
            started.append(caller)
            await caller.finish(CALL_S)
        message = await line.new_record(before)
        limits = {pid: _core_limit(pid) for pid in pids}
        renderer = line.app[RUNTIME].renderer
        assert renderer is not None
        data_dir = line.settings.data_dir
        private = await asyncio.to_thread(renderer.private.chain)
        left = [p for folder in (data_dir, *private) for p in _files(folder)]
    logged = capfd.readouterr()
    workers = logged.err + logged.out

    # The calls did what the test says, or the checks below prove nothing.
    assert NUMBER in triage["caller"] and NUMBER in message["caller"], (triage, message)
    summary = incoming["headers"].get("X-Clinic-Summary", "")
    assert "difficulty breathing" in summary, incoming
    assert triage["triage"]["urgency"] == "U1" and triage["values"]["breathing"] == "yes"
    assert message["outcome"] == "prescription_requested", message
    assert "worker[" in workers and "DEBUG" in workers, "the workers' log was not captured"
    lines = [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    assert any(triage["id"] in m for m in lines), "the call's own log lines were not captured"

    private_text = {
        *NUMBER_FORMS,
        summary,
        *(part.strip() for part in summary.split(";")),
        *triage["triage"]["reasons"],
        DOB,
        f"dob={DOB}",
        f"patient_no={PATIENT_NO}",
    }
    for name, text in [("serve", "\n".join(lines)), ("the SIP workers' stderr", workers)]:
        leaked = sorted({s for s in private_text if s.strip() and s in text})
        assert not leaked, f"{name} logged {leaked}"
    # The caller's number's last digits in a SIP URI (sip:+31612345678@, sip:0612345678@...).
    uri = re.compile(r"sip:[^@\s]*12345678@")
    assert not uri.search(workers + "\n".join(lines)), "a SIP URI with the caller's number"

    # No worker may dump core: its memory holds the calls.
    assert all(limit == "0 0" for limit in limits.values()), f"core dumps on: {limits}"
    # On disk, outside Redis: only sealed files (voicemail, records kept) and prompt caches.
    assert not [p for p in left if p.name.startswith("once-")], "a call's prompt stayed"
    for path in left:
        data = path.read_bytes()
        found = [s for s in (*NUMBER_FORMS, DOB, "breathing") if s.encode() in data]
        assert not found, f"{path} holds {found}"
