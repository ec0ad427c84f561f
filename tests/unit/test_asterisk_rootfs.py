"""The rig's cached Asterisk chroot is built again when it lacks a package the configs need."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.e2e import rig


def _built(root: Path, marker: str) -> Path:
    (root / "usr/sbin").mkdir(parents=True)
    (root / "usr/sbin/asterisk").write_text("")
    (root / "etc").mkdir()
    (root / rig.DONE_MARKER).write_text(marker)
    return root


def test_a_rootfs_built_with_every_package_is_ready(tmp_path: Path) -> None:
    marker = f"built from http://mirror\npackages: {' '.join(rig.PACKAGES)}\n"
    assert rig.rootfs_ready(_built(tmp_path / "root", marker))


def test_a_rootfs_cached_before_the_music_on_hold_package_is_not_ready(tmp_path: Path) -> None:
    """The markers of earlier builds: one line, or a list without asterisk-moh-opsound-gsm.
    Taken as ready, the cached chroot ran the new musiconhold.conf with no files to play."""
    assert not rig.rootfs_ready(_built(tmp_path / "a", "built from http://mirror\n"))
    older = "built from http://mirror\npackages: asterisk asterisk-core-sounds-en\n"
    assert not rig.rootfs_ready(_built(tmp_path / "b", older))
    assert not rig.rootfs_ready(tmp_path / "never-built")


def test_a_stale_rootfs_an_asterisk_runs_in_is_not_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rebuilding it would unmount /proc and /dev under that Asterisk and delete its files:
    the build stops with a message instead, and the tree is left as it was."""
    root = _built(tmp_path / "asterisk-sid", "built from http://mirror\n")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/sbin/{name}")
    monkeypatch.setattr(rig, "chrooted_pids", lambda path: [4242] if path == root else [])
    with pytest.raises(rig.RigError, match=r"Asterisk runs in it \(pids 4242\)"):
        rig.build_rootfs(root, mirror="http://mirror")
    assert (root / "usr/sbin/asterisk").is_file()
