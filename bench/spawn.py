"""The event loop's time per child started, from a process holding a lot of touched memory:
the old way (``preexec_fn=os.setpgrp``, which makes CPython ``fork()``) against the service's
way (:func:`sip_config.child_process.spawn_child`, which lets it ``vfork()`` on asyncio's
loop), both in this one run, the first as the baseline.

The process first writes every page of ``--gib`` GiB of private memory (a grown ``serve`` or
test process: a fork copies the page tables of all of it, on the loop's thread). Then, on
asyncio's loop, it starts ``true`` ``--spawns`` times each way, the two ways taking turns,
and times each ``await`` of the start: wall time (nothing else runs on the loop, so that is
the loop step the start holds) and the loop thread's CPU time. A last row starts the same
children through ``spawn_child`` on uvloop (serve's loop), which forks whatever it is asked
(sip_config/child_process.py says why), for comparison. Ends with one JSON line.
Run: ``.venv/bin/python bench/spawn.py [--quick] [--gib 4] [--spawns 30]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

if __package__ in {None, ""}:
    # Run as a file (``python bench/spawn.py``): make the repo importable for ``bench``.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop

from bench.common import finish, parser, print_table
from sip_config.child_process import spawn_child

Start = Callable[[], Awaitable[asyncio.subprocess.Process]]


def _old() -> Awaitable[asyncio.subprocess.Process]:
    return asyncio.create_subprocess_exec(
        "true", stdin=asyncio.subprocess.DEVNULL, preexec_fn=os.setpgrp
    )


def _new() -> Awaitable[asyncio.subprocess.Process]:
    return spawn_child(["true"], stdin=asyncio.subprocess.DEVNULL, umask=0o077)


async def _timed(start: Start, wall: list[float], cpu: list[float]) -> None:
    t0, c0 = time.perf_counter(), time.thread_time()
    proc = await start()
    wall.append((time.perf_counter() - t0) * 1000)
    cpu.append((time.thread_time() - c0) * 1000)
    await proc.wait()


async def _asyncio_runs(spawns: int) -> dict[str, tuple[list[float], list[float]]]:
    runs: dict[str, tuple[list[float], list[float]]] = {"old": ([], []), "new": ([], [])}
    for _ in range(spawns):
        for way, start in (("old", _old), ("new", _new)):
            await _timed(start, *runs[way])
    return runs


async def _uvloop_run(spawns: int) -> tuple[list[float], list[float]]:
    wall: list[float] = []
    cpu: list[float] = []
    for _ in range(spawns):
        await _timed(_new, wall, cpu)
    return wall, cpu


def _touched(gib: float) -> mmap.mmap:
    size = int(gib * 2**30) // mmap.PAGESIZE * mmap.PAGESIZE
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    # 4 KiB pages, as a heap grown by small objects has them (THP would shrink the tables);
    # a kernel built without THP refuses the advice (EINVAL) and has 4 KiB pages anyway.
    with contextlib.suppress(OSError):
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    for offset in range(0, size, mmap.PAGESIZE):
        memory[offset] = 1
    return memory


def main() -> int:
    p = parser(__doc__.splitlines()[0] if __doc__ else "spawn")
    p.add_argument("--gib", type=float, default=4.0, help="touched memory (default 4 GiB)")
    p.add_argument("--spawns", type=int, default=30, help="children each way (default 30)")
    args = p.parse_args()
    spawns = 5 if args.quick else args.spawns

    def measure() -> dict[str, object]:
        memory = _touched(args.gib)
        try:
            runs = asyncio.run(_asyncio_runs(spawns))
            uv = uvloop.run(_uvloop_run(spawns))
        finally:
            memory.close()
        med = {way: (statistics.median(w), statistics.median(c)) for way, (w, c) in runs.items()}
        uv_med = (statistics.median(uv[0]), statistics.median(uv[1]))
        print(f"{args.gib:g} GiB touched, {spawns} children each way, medians in ms")
        print_table(
            ["way", "loop", "wall ms", "loop CPU ms"],
            [
                ["old: preexec_fn (fork)", "asyncio", *med["old"]],
                ["new: spawn_child (vfork)", "asyncio", *med["new"]],
                ["new: spawn_child (fork)", "uvloop", *uv_med],
            ],
        )
        ratio = med["old"][0] / med["new"][0]
        print(f"old / new, wall per start on asyncio's loop: {ratio:.0f}x")
        return {
            "bench": "spawn",
            "gib": args.gib,
            "spawns": spawns,
            "old_wall_ms": round(med["old"][0], 3),
            "old_cpu_ms": round(med["old"][1], 3),
            "new_wall_ms": round(med["new"][0], 3),
            "new_cpu_ms": round(med["new"][1], 3),
            "uvloop_wall_ms": round(uv_med[0], 3),
            "uvloop_cpu_ms": round(uv_med[1], 3),
            "old_over_new": round(ratio, 1),
        }

    return finish("spawn", args.quick, measure)


if __name__ == "__main__":
    sys.exit(main())
