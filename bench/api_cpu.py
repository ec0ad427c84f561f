"""Where the machine goes per create: CPU per ``POST /v1/verifications``, process by process.

A diagnostic beside ``bench/api.py`` (which measures the speed goals against its echo
baseline): the same service (``bench.api.start_service``: embedded Redis, local SMS gateway
stand-in, ``CLINIC_HTTP_WORKERS`` = cores) under the same wrk create load at 50 connections.
For each measured run it reads ``/proc`` before and after and prints, per create:

- the CPU of the service's processes (``serve`` and its HTTP workers), its Redis and the
  SMS stand-in, from ``/proc/<pid>/stat``;
- the CPU of Redis's AOF rewrites (forked children, counted when Redis reaps them, so a
  rewrite still running at the end of a run is left out), from the same file;
- how long the service's and Redis's threads were runnable but waited for a CPU, from
  ``/proc/<pid>/task/<tid>/schedstat``: Redis answers every create, so its wait is
  everybody's;
- the whole machine's split (user, system, softirq, idle, iowait) from ``/proc/stat``.

This is what BENCHMARKS.md's "CPU per create" figures are read from. The noise between runs
on an idle machine is about +-3 us; ``--runs`` repeats the measurement. Ends with one JSON
line. Run: ``.venv/bin/python bench/api_cpu.py [--quick] [--runs N]``.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
from pathlib import Path

if __package__ in {None, ""}:
    # Run as a file (``python bench/api_cpu.py``): make the repo importable for ``bench``.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.api import CONNECTIONS, WRK_THREADS, Plan, create_script, start_service
from bench.common import (
    BenchError,
    Child,
    child_pids,
    cpu_seconds,
    finish,
    parser,
    print_table,
    run_wrk,
    runqueue_wait_seconds,
)

FULL = Plan(warmup_s=2, measure_s=10, verifications=100, paced_s=0)
QUICK = Plan(warmup_s=1, measure_s=3, verifications=100, paced_s=0)
_MACHINE = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def _machine_ticks() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1 : 1 + len(_MACHINE)]]


def _readings(groups: dict[str, list[int]]) -> dict[str, float]:
    """Seconds so far: CPU of each group, Redis's reaped AOF rewrites, run-queue waits."""
    out = {name: cpu_seconds(pids) for name, pids in groups.items()}
    out["redis rewrites"] = cpu_seconds(groups["redis"], reaped_children=True)
    for name in ("service", "redis"):
        wait = runqueue_wait_seconds(groups[name])
        if wait is not None:  # a kernel without schedstat: the columns say n/a
            out[f"{name} waiting"] = wait
    return out


def measure(
    base_url: str, script: Path, groups: dict[str, list[int]], seconds: int, base: int
) -> dict[str, object]:
    """One wrk run of ``seconds``; CPU per create (us) of each group and of the machine."""
    before = _readings(groups)
    ticks_before = _machine_ticks()
    result = run_wrk(
        base_url,
        script,
        connections=CONNECTIONS,
        threads=WRK_THREADS,
        duration_s=seconds,
        script_args=[str(base), str(WRK_THREADS)],
    )
    ticks = [b - a for a, b in zip(ticks_before, _machine_ticks(), strict=True)]
    creates = result.requests
    if creates <= 0 or result.errors:
        raise BenchError(f"the create run failed: {creates} creates, {result.errors} errors")
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    after = _readings(groups)
    per_create: dict[str, float] = {
        name: round(1e6 * (after[name] - before[name]) / creates, 1)
        for name in after
        if name in before
    }
    machine = {
        name: round(t * tick_us / creates, 1) for name, t in zip(_MACHINE, ticks, strict=True)
    }
    return {
        "creates_per_s": round(result.good_rps, 1),
        "us_per_create": per_create,
        "machine_us_per_create": machine,
    }


def run(plan: Plan, runs: int) -> dict[str, object]:
    api_key = secrets.token_hex(16)
    children: list[Child] = []
    with tempfile.TemporaryDirectory(prefix="bench-api-cpu-") as tmp:
        work = Path(tmp)
        try:
            target, _ = start_service(work, plan, api_key, children, {})
            sms, serve = children[0], children[-1]
            groups = {
                "service": [serve.pid, *child_pids(serve.pid, "http-worker")],
                "redis": child_pids(serve.pid, "redis-server"),
                "sms stand-in": [sms.pid],
            }
            if not groups["redis"]:
                raise BenchError("the service's embedded redis-server was not found")
            script = create_script(work / "create.lua", api_key)
            run_wrk(
                target.base_url,
                script,
                connections=CONNECTIONS,
                threads=WRK_THREADS,
                duration_s=plan.warmup_s,
                script_args=["0", str(WRK_THREADS)],
            )
            results = [
                measure(target.base_url, script, groups, plan.measure_s, (i + 1) * 1_000_000)
                for i in range(runs)
            ]
        finally:
            for child in reversed(children):
                child.stop()
    rows = []
    for i, r in enumerate(results, 1):
        per = r["us_per_create"]
        mach = r["machine_us_per_create"]
        assert isinstance(per, dict) and isinstance(mach, dict)
        rows.append(
            [
                i,
                r["creates_per_s"],
                per["service"],
                per["redis"],
                per["sms stand-in"],
                per["redis rewrites"],
                per.get("service waiting", "n/a"),
                per.get("redis waiting", "n/a"),
                mach["user"],
                mach["system"],
                mach["softirq"],
                round(mach["idle"] + mach["iowait"], 1),
            ]
        )
    print(
        f"\nCPU per create (us), wrk {CONNECTIONS} connections, {plan.measure_s} s a run; "
        "waiting: runnable but without a CPU (us per create); "
        "machine: /proc/stat over the same run"
    )
    print_table(
        [
            "run",
            "creates/s",
            "service",
            "redis",
            "sms stand-in",
            "redis rewrites",
            "service waiting",
            "redis waiting",
            "machine user",
            "system",
            "softirq",
            "idle+iowait",
        ],
        rows,
    )
    return {"bench": "api_cpu", "measure_s": plan.measure_s, "runs": results}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0] if __doc__ else "API CPU per create")
    p.add_argument("--runs", type=int, default=None, help="measured runs (default 3, quick 1)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    if runs < 1:
        p.error("--runs must be at least 1")
    return finish("api_cpu", args.quick, lambda: run(QUICK if args.quick else FULL, runs))


if __name__ == "__main__":
    sys.exit(main())
