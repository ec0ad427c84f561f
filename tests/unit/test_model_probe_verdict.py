"""voice.media.model_probe's verdict on how its child ended, with a small Python child standing
in for the probe (no vosk): only vosk's refusal or a crash (SIGSEGV, SIGABRT, ...) is proof of a
damaged model (serve: exit 2, which the shipped unit never restarts); a child killed from
outside (SIGKILL: the kernel's OOM killer) or one that could not run is a start error (exit 1,
restarted). And a probe cancelled (a stop during serve's start) leaves no child behind."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from voice.media import model_probe
from voice.media.model_probe import ProbeFailed, model_fault

_NO_CORE = "import resource; resource.setrlimit(resource.RLIMIT_CORE, (0, 0)); "


def _stand_in(monkeypatch: pytest.MonkeyPatch, code: str) -> None:
    argv = [sys.executable, "-c", _NO_CORE + code]
    monkeypatch.setattr(model_probe, "_probe_argv", lambda path: argv)


@pytest.mark.parametrize("sig", ["SIGSEGV", "SIGABRT", "SIGBUS"])
async def test_a_crash_is_a_damaged_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sig: str
) -> None:
    _stand_in(
        monkeypatch,
        f"import os, signal; print('recogniser', flush=True); os.kill(os.getpid(), signal.{sig})",
    )
    fault = await model_fault(tmp_path, timeout_s=30)
    assert fault == f"the probe died of {sig} making a grammar recogniser"


async def test_vosks_refusal_is_a_damaged_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _stand_in(
        monkeypatch,
        "import sys; print('load', flush=True); "
        "print('model_probe: vosk refused it: Failed to create a model', file=sys.stderr); "
        "sys.exit(1)",
    )
    assert await model_fault(tmp_path, timeout_s=30) == (
        "vosk refused it (Failed to create a model)"
    )


async def test_a_probe_killed_from_outside_proves_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The OOM killer's SIGKILL: the probe holds a second copy of the model. An exit 2 for it
    # ("a damaged vosk model (unpack it again)") kept serve down under RestartPreventExitStatus=2.
    _stand_in(
        monkeypatch,
        "import os, signal; print('load', flush=True); os.kill(os.getpid(), signal.SIGKILL)",
    )
    with pytest.raises(ProbeFailed, match="died of SIGKILL loading the model") as caught:
        await model_fault(tmp_path, timeout_s=30)
    assert isinstance(caught.value, OSError)  # serve's start error: exit 1, restarted


async def test_a_probe_that_cannot_run_proves_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(
        model_probe,
        "_probe_argv",
        lambda path: [sys.executable, "-m", "voice.media.no_such_probe", str(path)],
    )
    with pytest.raises(ProbeFailed, match=r"status 1 loading the model \(.*No module named"):
        await model_fault(tmp_path, timeout_s=30)


async def test_a_cancelled_probe_leaves_no_child(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    _stand_in(
        monkeypatch,
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
        "print('load', flush=True); time.sleep(60)",
    )
    task = asyncio.create_task(model_fault(tmp_path, timeout_s=90))
    loop = asyncio.get_running_loop()
    end = loop.time() + 20
    while not pid_file.exists() or not pid_file.read_text():
        assert loop.time() < end, "the stand-in probe did not start within 20 s"
        await asyncio.sleep(0.05)
    pid = int(pid_file.read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return  # killed and reaped
    os.kill(pid, 9)
    pytest.fail("the probe's child outlived its cancelled probe")
