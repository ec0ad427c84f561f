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


def _waited_while_spinning(count: int, cpu: int, seconds: float) -> float | None:
    """Run-queue wait of ``count`` processes spinning on CPU ``cpu`` for ``seconds``."""
    spin = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass\n"
    burners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(count)]
    try:
        pids = [b.pid for b in burners]
        time.sleep(0.1)  # started and pinned
        before = runqueue_wait_seconds(pids)
        time.sleep(seconds)
        after = runqueue_wait_seconds(pids)
    finally:
        for b in burners:
            b.kill()
            b.wait()
    return None if before is None or after is None else after - before


def test_runqueue_wait_counts_waiting_not_running() -> None:
    cpu = min(os.sched_getaffinity(0))
    shared = _waited_while_spinning(2, cpu, 0.6)
    if shared is None:  # a kernel without schedstat: the bench prints n/a
        return
    alone = _waited_while_spinning(1, cpu, 0.6)
    assert alone is not None
    # Two on one CPU: while one runs the other waits, about 0.6 s in all. One alone ran the
    # whole time and hardly waited (running time, read by mistake, would be 0.6 s in both).
    # Compared with each other, not with a fixed bound for the one alone: other work on the
    # CPU (a loaded CI machine, tests beside) makes it wait too, and the pair a pair's more.
    assert shared > 0.3
    assert shared > alone + 0.3, (shared, alone)
