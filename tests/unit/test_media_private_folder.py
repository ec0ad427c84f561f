"""Where a call's private audio goes (voice/media/private_folder.py): a folder of this service
on tmpfs, else ``$CLINIC_DATA_DIR/private``, else one in the temporary folder; real files
throughout (``/dev/shm`` is tmpfs here; the full and read-only tmpfs are mounted when the
tests run as root, as the e2e tier does)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from voice.media import private_folder
from voice.media.private_folder import PREFIX, PrivateFolder, find_ram_root, folder_key

ROOT = os.geteuid() == 0


def _writer(data: bytes) -> Callable[[BinaryIO], object]:
    return lambda file: file.write(data)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """A data dir; whatever the test makes for it in /dev/shm goes at its end."""
    data = tmp_path / "data"
    data.mkdir()
    yield data
    shutil.rmtree(private_folder.SHM / f"{PREFIX}{folder_key(data)}", ignore_errors=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mounts a small tmpfs with the given options (root only), unmounted at the end."""
    if not ROOT:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        point = tmp_path / f"ram{len(mounted)}"
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"tmpfs cannot be mounted here: {done.stderr.decode()[:200]}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_tmpfs_is_chosen_and_the_folder_is_the_services_own(data_dir: Path) -> None:
    if find_ram_root({}) != private_folder.SHM:
        pytest.skip("no tmpfs at /dev/shm")
    folder = PrivateFolder(data_dir)  # as serve makes it: the RAM root found
    path = folder.write("once-", _writer(b"RIFF an appointment"))
    expected = private_folder.SHM / f"{PREFIX}{folder_key(data_dir)}"
    assert path.parent == expected, "a call's prompt went to a disk with /dev/shm at hand"
    assert folder.chain() == (expected, data_dir / "private", folder.chain()[-1])
    info = expected.lstat()
    assert (info.st_uid, _mode(expected)) == (os.geteuid(), 0o700)
    assert _mode(path) == 0o600 and path.read_bytes() == b"RIFF an appointment"
    assert not (data_dir / "private").exists(), "nothing of it on the data dir's disk"


def test_the_ram_root_is_read_from_the_mounts(tmp_path: Path) -> None:
    runtime, shm, plain = tmp_path / "run-user", tmp_path / "shm", tmp_path / "disk"
    for folder in (runtime, shm, plain):
        folder.mkdir()
    mounts = tmp_path / "mounts"
    mounts.write_text(
        f"/dev/sda1 / ext4 rw 0 0\ntmpfs {runtime} tmpfs rw 0 0\ntmpfs {shm} tmpfs rw 0 0\n"
    )
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    assert find_ram_root(env, mounts, shm) == runtime, "the user's own runtime folder first"
    assert find_ram_root({"XDG_RUNTIME_DIR": str(plain)}, mounts, shm) == shm
    assert find_ram_root({}, mounts, plain) is None, "a disk folder is no RAM root"
    # A later mount over a tmpfs (here: ext4 on the runtime folder) is what the path is on.
    mounts.write_text(f"tmpfs {runtime} tmpfs rw 0 0\n/dev/sdb1 {runtime} ext4 rw 0 0\n")
    assert find_ram_root(env, mounts, plain) is None
    assert find_ram_root(env, tmp_path / "no-mounts", shm) is None


def test_an_unusable_ram_root_falls_back_to_the_data_dir_said_once(
    tmp_path: Path, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    not_a_folder = tmp_path / "shm-file"
    not_a_folder.write_bytes(b"")
    folder = PrivateFolder(data_dir, not_a_folder, temp_root=tmp_path)
    caplog.set_level(logging.WARNING, private_folder.__name__)
    first = folder.write("once-", _writer(b"one"))
    second = folder.write("code-", _writer(b"two"))
    assert first.parent == second.parent == data_dir / "private"
    assert _mode(data_dir / "private") == 0o700 and _mode(first) == 0o600
    said = [m for m in caplog.messages if str(not_a_folder) in m]
    assert len(said) == 1 and "cannot be made" in said[0], caplog.messages


def test_a_read_only_tmpfs_falls_back_to_the_data_dir(
    tmpfs: Callable[[str], Path], data_dir: Path, tmp_path: Path
) -> None:
    ram = tmpfs("ro,size=64k")
    path = PrivateFolder(data_dir, ram, temp_root=tmp_path).write("once-", _writer(b"x"))
    assert path.parent == data_dir / "private"


def test_a_full_tmpfs_falls_back_per_write_and_says_it_once(
    tmpfs: Callable[[str], Path],
    data_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ram = tmpfs("size=16k,mode=1777")
    folder = PrivateFolder(data_dir, ram, temp_root=tmp_path)
    caplog.set_level(logging.DEBUG, private_folder.__name__)
    big = b"RIFF" + bytes(200_000)  # more than the tmpfs holds: ENOSPC
    spilled = [folder.write("once-", _writer(big)) for _ in range(2)]
    assert {p.parent for p in spilled} == {data_dir / "private"}
    ours = ram / f"{PREFIX}{folder_key(data_dir)}"
    assert list(ours.iterdir()) == [], "the part written to the full tmpfs was left there"
    warned = [
        r for r in caplog.records if r.levelno == logging.WARNING and str(ours) in r.msg % r.args
    ]
    assert len(warned) == 1 and "No space left on device" in warned[0].getMessage()
    small = folder.write("once-", _writer(b"RIFF short"))
    assert small.parent == ours, "a later write that fits goes to the tmpfs again"


def test_a_failing_write_tries_the_next_folder_and_removes_its_part(
    tmp_path: Path, data_dir: Path
) -> None:
    ram = tmp_path / "ram"
    ram.mkdir()
    folder = PrivateFolder(data_dir, ram, temp_root=tmp_path)
    ours = ram / f"{PREFIX}{folder_key(data_dir)}"

    tries: list[int] = []

    def full_in_ram(file: BinaryIO) -> None:
        file.write(b"RIFF part of")
        tries.append(1)
        if len(tries) == 1:  # the first folder of the chain: the RAM one
            raise OSError(errno.ENOSPC, "No space left on device")
        file.write(b" a code")

    path = folder.write("code-", full_in_ram)
    assert path.parent == data_dir / "private" and path.read_bytes() == b"RIFF part of a code"
    assert list(ours.iterdir()) == []

    def fails_everywhere(file: BinaryIO) -> None:
        file.write(b"RIFF part of")
        raise OSError(errno.EROFS, "Read-only file system")

    with pytest.raises(OSError, match="Read-only"):
        folder.write("code-", fails_everywhere)
    left = [p for f in folder.chain() if f.is_dir() for p in f.iterdir()]
    assert left == [path], "a part of a failed write was left behind"


def test_the_temporary_folder_is_the_last_resort(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.write_bytes(b"")  # no folder can be made in it
    temp = tmp_path / "tmp"
    temp.mkdir()
    folder = PrivateFolder(data_dir, None, temp_root=temp)
    path = folder.write("once-", _writer(b"x"))
    assert path.parent == temp / f"{PREFIX}{folder_key(data_dir)}"
    assert _mode(path.parent) == 0o700


def test_an_open_folder_of_ours_is_tightened(tmp_path: Path, data_dir: Path) -> None:
    ram = tmp_path / "ram"
    ours = ram / f"{PREFIX}{folder_key(data_dir)}"
    ours.mkdir(parents=True)
    ours.chmod(0o777)
    path = PrivateFolder(data_dir, ram, temp_root=tmp_path).write("once-", _writer(b"x"))
    assert path.parent == ours and _mode(ours) == 0o700


@pytest.mark.skipif(not ROOT, reason="giving a folder to another user needs root")
def test_a_folder_of_another_user_gives_way_to_one_of_ours_beside_it(
    tmp_path: Path, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The name is known to all (a hash of the data dir's path): a folder planted there
    must neither get a call's audio nor push it off tmpfs onto a disk."""
    ram = tmp_path / "ram"
    ram.mkdir()
    ram.chmod(0o1777)
    theirs = ram / f"{PREFIX}{folder_key(data_dir)}"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)  # made first by someone else, waiting for our files
    (theirs / "once-left.wav").write_bytes(b"theirs")
    folder = PrivateFolder(data_dir, ram, temp_root=tmp_path)
    path = folder.write("once-", _writer(b"x"))
    assert path.parent.parent == ram and path.parent != theirs, "pushed off the tmpfs"
    assert path.parent.name.startswith(f"{theirs.name}-") and _mode(path.parent) == 0o700
    assert theirs.stat().st_uid == 65534 and _mode(theirs) == 0o700, "theirs, untouched"
    assert any("owned by uid 65534" in m for m in caplog.messages), caplog.messages
    restarted = PrivateFolder(data_dir, ram, temp_root=tmp_path)  # a killed run's file
    assert restarted.sweep("once-*.wav", None, 0.0) == 1 and not path.exists()
    assert (theirs / "once-left.wav").exists(), "a sweep went into a folder not ours"
    folder.close()
    assert sorted(ram.iterdir()) == [theirs], "the stop left our folder beside theirs"


def test_a_link_in_place_of_the_folder_is_passed_over(tmp_path: Path, data_dir: Path) -> None:
    ram, elsewhere = tmp_path / "ram", tmp_path / "elsewhere"
    ram.mkdir()
    elsewhere.mkdir(mode=0o700)
    (ram / f"{PREFIX}{folder_key(data_dir)}").symlink_to(elsewhere)
    path = PrivateFolder(data_dir, ram, temp_root=tmp_path).write("once-", _writer(b"x"))
    assert path.parent.parent == ram and not path.parent.is_symlink()
    assert list(elsewhere.iterdir()) == []


def test_the_sweep_covers_every_folder_of_the_chain(tmp_path: Path, data_dir: Path) -> None:
    ram, temp = tmp_path / "ram", tmp_path / "tmp"
    ram.mkdir()
    temp.mkdir()
    key = folder_key(data_dir)
    folders = [ram / f"{PREFIX}{key}", data_dir / "private", temp / f"{PREFIX}{key}"]
    for folder in folders:
        folder.mkdir(mode=0o700)
        for name in ("once-a.wav", "code-b.wav", "notes.txt"):
            (folder / name).write_bytes(b"left by a killed serve")
    private = PrivateFolder(data_dir, ram, temp_root=temp)
    assert private.chain() == tuple(folders)
    assert private.sweep("once-*.wav", None, 0.0) == 3
    assert private.sweep("code-*.wav", None, 0.0) == 3
    assert [sorted(p.name for p in f.iterdir()) for f in folders] == [["notes.txt"]] * 3


def test_two_data_dirs_have_two_folders_and_sweep_only_their_own(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    ram.mkdir()
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    (tmp_path / "link").symlink_to(one)
    first = PrivateFolder(one, ram, temp_root=tmp_path)
    second = PrivateFolder(two, ram, temp_root=tmp_path)
    a = first.write("once-", _writer(b"one's caller"))
    b = second.write("once-", _writer(b"two's caller"))
    assert a.parent != b.parent and a.parent.parent == b.parent.parent == ram
    assert PrivateFolder(tmp_path / "link", ram).chain()[0] == a.parent, "keyed by real path"
    assert second.sweep("once-*.wav", None, 0.0) == 1
    assert a.exists() and not b.exists(), "one service swept another's call"


def test_a_folder_removed_under_a_running_service_is_made_again(
    tmp_path: Path, data_dir: Path
) -> None:
    ram = tmp_path / "ram"
    ram.mkdir()
    folder = PrivateFolder(data_dir, ram, temp_root=tmp_path)
    first = folder.write("once-", _writer(b"x"))
    shutil.rmtree(first.parent)  # an operator's clean-up of /dev/shm
    assert folder.write("once-", _writer(b"x")).parent == data_dir / "private"
    again = folder.write("once-", _writer(b"x"))
    assert again.parent == first.parent and _mode(first.parent) == 0o700


def test_a_stop_removes_the_services_empty_folders_outside_the_data_dir(
    tmp_path: Path, data_dir: Path
) -> None:
    ram = tmp_path / "ram"
    ram.mkdir()
    folder = PrivateFolder(data_dir, ram, temp_root=tmp_path)
    left = folder.write("code-", _writer(b"x"))  # a call the stop cut short, not yet deleted
    folder.close()
    assert left.exists(), "a stop deleted a file that the next start sweeps"
    left.unlink()
    folder.write("once-", _writer(b"x")).unlink()  # played and deleted
    (data_dir / "private").mkdir(mode=0o700)
    folder.close()
    assert list(ram.iterdir()) == [], "the tmpfs folder outlived the service"
    assert (data_dir / "private").is_dir(), "the data dir's own folder is kept"


def test_a_stop_after_a_sweep_removes_the_folder_a_killed_run_left(
    tmp_path: Path, data_dir: Path
) -> None:
    # serve killed during a call leaves its tmpfs folder with the code's file in it; the next
    # start sweeps the file. A run that then takes no call wrote nothing there, and its stop
    # left the empty clinic-voice-private-* folder in /dev/shm for good.
    ram = tmp_path / "ram"
    ram.mkdir()
    killed = PrivateFolder(data_dir, ram, temp_root=tmp_path)
    left = killed.write("code-", _writer(b"x"))  # no close: SIGKILL
    restarted = PrivateFolder(data_dir, ram, temp_root=tmp_path)
    assert restarted.sweep("code-*.wav", None, 0.0) == 1 and not left.exists()
    restarted.close()
    assert list(ram.iterdir()) == [], "the swept tmpfs folder outlived the service"
    assert not (data_dir / "private").exists()


def test_a_folder_replaced_under_a_running_service_is_checked_again(
    tmp_path: Path, data_dir: Path
) -> None:
    """The folder was ours at the first write; one put in its place later (a link here, a
    folder of another user in /tmp once a cleaner removed ours) must not get the next file."""
    ram, elsewhere = tmp_path / "ram", tmp_path / "elsewhere"
    ram.mkdir()
    elsewhere.mkdir(mode=0o755)
    folder = PrivateFolder(data_dir, ram, temp_root=tmp_path)
    first = folder.write("once-", _writer(b"x"))
    first.unlink()
    first.parent.rmdir()
    first.parent.symlink_to(elsewhere)
    path = folder.write("once-", _writer(b"RIFF a caller's booking"))
    assert list(elsewhere.iterdir()) == [], "a caller's prompt went through a planted link"
    assert path.parent == data_dir / "private"


@pytest.mark.skipif(not ROOT, reason="giving a folder to another user needs root")
def test_a_folder_of_another_user_put_in_place_of_ours_gets_nothing(
    tmp_path: Path, data_dir: Path
) -> None:
    ram = tmp_path / "ram"
    ram.mkdir(mode=0o1777)
    ram.chmod(0o1777)
    folder = PrivateFolder(data_dir, ram, temp_root=tmp_path)
    first = folder.write("once-", _writer(b"x"))
    first.unlink()
    first.parent.rmdir()  # gone (a clean-up of old folders), then made by another user
    first.parent.mkdir()
    first.parent.chmod(0o777)
    os.chown(first.parent, 65534, 65534)
    path = folder.write("once-", _writer(b"RIFF a caller's booking"))
    assert list(first.parent.iterdir()) == [], "a caller's prompt went to another's folder"
    assert path.parent != first.parent


def test_a_ram_root_others_may_write_in_unsticky_is_not_used(tmp_path: Path) -> None:
    """In a folder others may write in without the sticky bit, anyone can rename this
    service's folder away and put theirs (or a link) in its place, between the check and
    the SIP worker's open: ``$XDG_RUNTIME_DIR`` kept by ``su`` or pointing somewhere odd."""
    runtime, shm = tmp_path / "runtime", tmp_path / "shm"
    runtime.mkdir()
    shm.mkdir()
    runtime.chmod(0o777)
    shm.chmod(0o1777)
    mounts = tmp_path / "mounts"
    mounts.write_text(f"tmpfs {runtime} tmpfs rw 0 0\ntmpfs {shm} tmpfs rw 0 0\n")
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    assert find_ram_root(env, mounts, shm) == shm
    data_dir = tmp_path / "data"
    path = PrivateFolder(data_dir, runtime, temp_root=tmp_path).write("once-", _writer(b"x"))
    assert path.parent == data_dir / "private", "a folder made where others may swap it"


@pytest.mark.skipif(not ROOT, reason="giving a folder to another user needs root")
def test_the_runtime_folder_of_another_user_is_not_used(tmp_path: Path) -> None:
    """``su`` keeps the user's ``$XDG_RUNTIME_DIR``: serve as root must not make its folder
    in one that user owns (and may rename entries of)."""
    runtime, shm = tmp_path / "runtime", tmp_path / "shm"
    runtime.mkdir(mode=0o700)
    shm.mkdir()
    shm.chmod(0o1777)
    os.chown(runtime, 65534, 65534)
    mounts = tmp_path / "mounts"
    mounts.write_text(f"tmpfs {runtime} tmpfs rw 0 0\ntmpfs {shm} tmpfs rw 0 0\n")
    assert find_ram_root({"XDG_RUNTIME_DIR": str(runtime)}, mounts, shm) == shm
