"""The /proc readings the CPU bench (bench/api_cpu.py) reports, against processes of known use."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bench.common import cpu_seconds, runqueue_wait_seconds

BURN = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"


def test_reaped_children_count_a_finished_child_and_not_the_parent() -> None:
    me = [os.getpid()]
    own, reaped = cpu_seconds(me), cpu_seconds(me, reaped_children=True)
    subprocess.run([sys.executable, "-c", BURN], check=True)  # waited for: reaped
    # The child burnt 0.3 s (plus its start); this process only waited.
    assert cpu_seconds(me, reaped_children=True) - reaped >= 0.25
    assert cpu_seconds(me) - own < 0.2


def test_own_cpu_counts_this_process_burning() -> None:
    me = [os.getpid()]
    own = cpu_seconds(me)
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    assert cpu_seconds(me) - own >= 0.15


def test_gone_processes_count_zero() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert cpu_seconds([child.pid]) == 0
    assert runqueue_wait_seconds([child.pid]) is None


def _waited_while_spinning(count: int, cpu: int, seconds: float) -> tuple[float, float] | None:
    """Run-queue wait of ``count`` processes spinning on CPU ``cpu`` for about ``seconds``, and
    the wall time it was read over."""
    spin = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nprint(flush=True)\nwhile True: pass\n"
    burners = [
        subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE) for _ in range(count)
    ]
    try:
        for b in burners:  # pinned: a spinner still starting may run on another CPU
            assert b.stdout is not None
            assert b.stdout.readline() == b"\n", "a spinner ended before it was pinned"
        pids = [b.pid for b in burners]
        began = time.monotonic()
        before = runqueue_wait_seconds(pids)
        time.sleep(seconds)
        after = runqueue_wait_seconds(pids)
        wall = time.monotonic() - began
    finally:
        for b in burners:
            b.kill()
            b.wait()
            if b.stdout is not None:
                b.stdout.close()
    return None if before is None or after is None else (after - before, wall)


def test_runqueue_wait_counts_waiting_not_running() -> None:
    cpu = min(os.sched_getaffinity(0))
    measured = _waited_while_spinning(3, cpu, 0.6)
    if measured is None:  # a kernel without schedstat: the bench prints n/a
        return
    waited, wall = measured
    # Three always runnable on one CPU: while one runs (or another process does) the others
    # wait, so their waits add up to twice the wall time at least; running time, read by
    # mistake, adds up to the wall time at most. Other load on the CPU only adds to the waits:
    # no second measurement whose load may differ (a spinner alone, waiting 0.3 s of 0.6 s
    # when a neighbour's process came onto its CPU, failed "pair > alone + 0.3").
    assert waited > 1.5 * wall, (waited, wall)
