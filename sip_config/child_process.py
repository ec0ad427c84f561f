"""Starting one of the service's child processes (the embedded Redis, an HTTP worker, a SIP
worker) in a process group of its own, in the service's session, ended by the kernel if the
service dies, without Python code in the child where the event loop allows it.

Why without Python code: with a ``preexec_fn`` (or ``user=``/``group=``/``extra_groups=``)
CPython's ``_posixsubprocess`` must ``fork()``, copying the page tables of the whole service on
the event loop's thread, and write-protecting every page it has touched, so that each one's
next write faults; without, it uses ``vfork()``, whose cost does not grow with the parent's
memory. A grown test process's fork of ``redis-server`` took one loop step of 105 ms
(BENCHMARKS.md, "Spawning a child": ``bench/spawn.py``).

- Its own process group, so a Ctrl-C at the terminal (SIGINT to the foreground group) is the
  service's to handle. Not its own session: with the kernel's autogroup scheduling (on by
  default) every session is a group that gets an equal share of the CPU, and Redis (with its
  AOF rewrite child) and each HTTP worker in sessions of their own starved one another: an
  HTTP worker got 5 % of a core for 200 ms while a rewrite ran, and the API's latency tail
  reached 100-450 ms (BENCHMARKS.md).
- ``setpriv --pdeathsig TERM`` (util-linux) in front when it is installed: the service killed
  -9, the kernel sends the child SIGTERM, so no orphan keeps the AOF open or a port bound.
  setpriv also drops to ``run_as``'s user: it sets the parent-death signal after the change
  of user (which would clear it).
- On asyncio's loop, which starts children with :class:`subprocess.Popen`: ``process_group=0``
  and ``umask=`` (done by ``_posixsubprocess`` in C between vfork and exec). On uvloop (serve's
  loop) a ``preexec_fn`` does it: uvloop takes neither keyword, and gains nothing without
  one, since libuv's ``uv_spawn`` always forks on Linux (uvloop 0.23 links libuv 1.52's
  ``fork``; no ``vfork``, no ``posix_spawn`` there), and uvloop runs Python code in every
  child anyway (its ``pthread_atfork`` hook: ``PyOS_AfterFork_Child``, ``uv_loop_fork``).
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

# What a child's stdin, stdout or stderr is: asyncio.subprocess.PIPE, DEVNULL, STDOUT, None
# (the service's own), a file descriptor or a file.
Stream = int | IO[Any] | None


@dataclass(frozen=True, slots=True)
class RunAs:
    """The user a child runs as: ``uid`` and ``gid``, that group its only one (the
    supplementary groups are ``[gid]``)."""

    uid: int
    gid: int


async def spawn_child(
    argv: Sequence[str],
    *,
    stdin: Stream = None,
    stdout: Stream = None,
    stderr: Stream = None,
    env: Mapping[str, str] | None = None,
    umask: int | None = None,
    run_as: RunAs | None = None,
) -> asyncio.subprocess.Process:
    """Start ``argv`` as a child of this process in a process group of its own, in this
    process's session (see the module's docstring); ``umask``: the child's (None: this
    process's); ``run_as``: the user it runs as (None: this process's). ``env``: its
    environment (None: this process's). Raises :class:`OSError` as
    :func:`asyncio.create_subprocess_exec` does (fork or exec failed)."""
    # Looked up at each start: a setpriv installed or removed while the service runs counts.
    setpriv = shutil.which("setpriv")
    argv = [*setpriv_prefix(setpriv, run_as), *argv]
    loop = asyncio.get_running_loop()
    options: dict[str, Any]
    if isinstance(loop, asyncio.BaseEventLoop):  # Popen: no Python code in the child
        options = {"process_group": 0}
        if umask is not None:
            options["umask"] = umask
        if run_as is not None and setpriv is None:  # these make it fork, but in C alone
            options |= {"user": run_as.uid, "group": run_as.gid, "extra_groups": [run_as.gid]}
    else:  # uvloop: it forks and runs Python in the child whatever is asked (see above)
        drop = run_as if setpriv is None else None
        options = {"preexec_fn": functools.partial(_child_setup, umask, drop)}
    return await asyncio.create_subprocess_exec(
        *argv, stdin=stdin, stdout=stdout, stderr=stderr, env=env, **options
    )


def setpriv_prefix(setpriv: str | None, run_as: RunAs | None) -> list[str]:
    """What goes before a child's argv: ``setpriv`` (its path; None: not installed, nothing)
    with the parent-death signal, and ``run_as``'s user, group and groups."""
    if setpriv is None:
        return []
    prefix = [setpriv, "--pdeathsig", "TERM"]
    if run_as is not None:
        prefix += [
            f"--reuid={run_as.uid}",
            f"--regid={run_as.gid}",
            f"--groups={run_as.gid}",
        ]
    return [*prefix, "--"]


def _child_setup(umask: int | None, run_as: RunAs | None) -> None:
    """uvloop's ``preexec_fn``: in the child, between fork and exec."""
    os.setpgrp()
    if umask is not None:
        os.umask(umask)
    if run_as is not None:
        os.setgroups([run_as.gid])
        os.setgid(run_as.gid)
        os.setuid(run_as.uid)
