"""``replace_private``: a file put in place of one that is there, keeping its age; nothing
written when none is (sip_config/private_file.py). On the real file system, no Redis."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from sip_config.private_file import replace_private, write_private


def test_a_file_replaced_keeps_its_modification_time_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "voicemail" / "call-1-0a1b2c3d.sealed"
    write_private(path, "old")
    path.chmod(0o640)
    old = time.time() - 3 * 86400
    os.utime(path, (old, old))
    before = path.stat().st_mtime_ns
    assert replace_private(path, "new")
    assert path.read_text() == "new"
    assert path.stat().st_mtime_ns == before  # the sweep would otherwise keep it longer
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_nothing_is_written_where_no_file_is(tmp_path: Path) -> None:
    path = tmp_path / "call-1.sealed"
    assert not replace_private(path, "new")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_run_as_root_a_file_replaced_keeps_its_owner_and_group(tmp_path: Path) -> None:
    # clinic-voice secret reseal run by root, with serve running as a user of its own: a
    # root-owned 0600 file in its place is one serve cannot read.
    path = tmp_path / "voicemail" / "call-1-0a1b2c3d.sealed"
    write_private(path, "old")
    os.chown(path, 65534, 65533)
    assert replace_private(path, "new")
    st = path.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65533, 0o600)
    assert path.read_text() == "new"
