"""How the service starts its children (:mod:`sip_config.child_process`), on asyncio's loop (the
tests') and on uvloop (serve's), with a real child: its process group, session, umask and
user, and that asyncio's loop starts it without a ``fork()`` of this process."""

from __future__ import annotations

import asyncio
import mmap
import os
import subprocess
from collections.abc import Callable, Coroutine
from pathlib import Path

import pytest
import uvloop

from sip_config.child_process import RunAs, spawn_child
from tests.conftest import TouchedPages, proc_status

pytestmark = pytest.mark.integration

SLEEP = "/usr/bin/sleep"  # a path: the tests that hide setpriv empty PATH
SLEEP_EXE = os.path.realpath(SLEEP)
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def _own_umask() -> int:
    return int(proc_status(os.getpid())["Umask"], 8)


async def _child(umask: int | None = None, run_as: RunAs | None = None) -> dict[str, str]:
    """A child started as the service starts its own: its status, and the group and session
    checked here (it is killed before this returns)."""
    proc = await spawn_child(
        [SLEEP, "30"], stdin=asyncio.subprocess.DEVNULL, umask=umask, run_as=run_as
    )
    try:
        # setpriv exec's sleep in the same process; wait for it (the exec is the last step).
        loop = asyncio.get_running_loop()
        end = loop.time() + 5
        while os.readlink(f"/proc/{proc.pid}/exe") != SLEEP_EXE:
            assert loop.time() < end, "the child did not exec sleep within 5 s"
            await asyncio.sleep(0.01)
        assert os.getpgid(proc.pid) == proc.pid, "not in a process group of its own"
        assert os.getsid(proc.pid) == os.getsid(0), "not in the service's session"
        return proc_status(proc.pid)
    finally:
        proc.kill()
        await proc.wait()


def _on(loop: str, check: Callable[[], Coroutine[None, None, None]]) -> None:
    if loop == "uvloop":
        uvloop.run(check())
    else:
        asyncio.run(check())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_child_has_a_group_of_its_own_in_the_session_and_the_umask_asked(loop: str) -> None:
    async def check() -> None:
        assert (await _child(umask=0o077))["Umask"] == "0077"
        assert int((await _child())["Umask"], 8) == _own_umask()  # this process's

    _on(loop, check)


@needs_root
@pytest.mark.parametrize("setpriv", [True, False], ids=["setpriv", "no-setpriv"])
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_child_runs_as_the_user_asked_that_group_its_only_one(
    loop: str, setpriv: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As _redis_child_setup did it before (setgroups([gid]), setgid, setuid): real,
    # effective, saved and filesystem ids all the user's, and no group of root's kept.
    if not setpriv:
        monkeypatch.setenv("PATH", str(tmp_path))  # which("setpriv") finds none

    async def check() -> None:
        status = await _child(umask=0o077, run_as=RunAs(NOBODY, NOBODY))
        assert status["Uid"].split() == [str(NOBODY)] * 4
        assert status["Gid"].split() == [str(NOBODY)] * 4
        assert status["Groups"].split() == [str(NOBODY)]
        assert status["Umask"] == "0077"

    _on(loop, check)


async def test_asyncio_starts_a_child_without_a_fork_of_this_process() -> None:
    # With a preexec_fn (what the three children had), _posixsubprocess must fork(): on the
    # event loop's thread, time that grows with this process's memory (a 105 ms loop step in
    # a grown test process). Without one it vforks. TouchedPages tells which happened.
    pages = TouchedPages()
    try:
        forked = await asyncio.create_subprocess_exec("true", preexec_fn=os.setpgrp)
        await forked.wait()
        # The measure works here: a fork faults once a page.
        assert pages.faults_on_rewrite() >= TouchedPages.PAGES
        proc = await spawn_child(["true"], umask=0o077)
        await proc.wait()
        faults = pages.faults_on_rewrite()
        assert faults < TouchedPages.PAGES // 4, f"{faults} faults: the child was forked"
    finally:
        pages.close()


def test_touched_pages_tells_a_fork_where_the_kernel_refuses_the_huge_page_advice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A kernel built without THP answers MADV_NOHUGEPAGE with EINVAL, as it answers any advice
    # it does not know: one it knows nowhere stands in for it here.
    monkeypatch.setattr(mmap, "MADV_NOHUGEPAGE", 0x7EAD)
    # The stand-in is refused, as THP's advice is there.
    with mmap.mmap(-1, mmap.PAGESIZE) as probe, pytest.raises(OSError):
        probe.madvise(mmap.MADV_NOHUGEPAGE)
    pages = TouchedPages()
    try:
        subprocess.run(["true"], check=True, preexec_fn=os.setpgrp)
        assert pages.faults_on_rewrite() >= TouchedPages.PAGES
    finally:
        pages.close()
