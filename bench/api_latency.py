"""The API's p99 at 50 connections against the rate offered: up to where the 10 ms goal holds.

``bench/api.py`` reads p99 at two points: at saturation (50 connections that never wait, where
the mean latency is 50 / throughput by Little's law) and paced to the goals' rates. This draws
the curve between and below them, in one invocation: the same echo server and the same service
(``bench.api.start_service``: embedded Redis, SMS gateway stand-in, one HTTP process per core),
the same create and check scripts, with the 50 connections paced to offer 0.10, 0.15, ... x
the echo server's rate measured first. For each point it prints the rate answered, p50, p90,
p99 and what the service's Redis went through (slow fsyncs, the worst stall), then, per kind,
the highest offered ratio up to which every point's p99 was within 10 ms, and every point
that was (one Redis stall can spoil a single point of the curve). Ends with one JSON
line. A diagnostic for choosing a latency goal, not a goal itself.

Run: ``.venv/bin/python bench/api_latency.py [--quick]``. Needs ``wrk``.
"""

from __future__ import annotations

import secrets
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if __package__ in {None, ""}:
    # Run as a file (``python bench/api_latency.py``): make the repo importable for ``bench``.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.api import (
    GOAL_P99_MS,
    Plan,
    RedisRun,
    RedisWatch,
    Target,
    check_script,
    create_script,
    measure,
    measure_paced,
    service_redis_url,
    start_service,
)
from bench.common import (
    BenchError,
    Child,
    WrkResult,
    finish,
    free_port,
    parser,
    print_table,
    python_child,
    wait_http,
    wrk_path,
)

FULL_RATIOS = (0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40)
QUICK_RATIOS = (0.10, 0.20, 0.30, 0.40)
# Enough verifications that each gets ~5 checks over all the points (two runs each) at an echo
# rate of ~13,000/s, as in bench/api.py: records the size production reads.
FULL = Plan(warmup_s=3, measure_s=15, verifications=90_000, paced_s=10)
QUICK = Plan(warmup_s=1, measure_s=5, verifications=10_000, paced_s=2)


@dataclass(frozen=True, slots=True)
class Point:
    """One paced run: what was offered, what came back, and what Redis went through."""

    kind: str
    ratio: float
    offered_per_s: float
    result: WrkResult
    redis: RedisRun | None

    def to_json(self) -> dict[str, object]:
        r = self.result
        out: dict[str, object] = {
            "kind": self.kind,
            "ratio": self.ratio,
            "offered_per_s": round(self.offered_per_s, 1),
            "answered_per_s": round(r.good_rps, 1),
            "p50_ms": r.p50_ms,
            "p90_ms": r.p90_ms,
            "p99_ms": r.p99_ms,
            "errors": r.errors,
        }
        if self.redis is not None:
            out["redis"] = {
                "aof_rewrites": self.redis.forks,
                "slow_fsync_s": self.redis.slow_fsync_s,
                "worst_stall_ms": self.redis.worst_ms,
                "worst_stall": self.redis.worst_event,
            }
        return out


def holds_up_to(points: list[Point], goal_ms: float) -> float | None:
    """The highest ratio up to which every point (in rising order) had p99 within ``goal_ms``
    and no errors; None when the lowest already missed."""
    best = None
    for p in sorted(points, key=lambda p: p.ratio):
        if p.result.p99_ms > goal_ms or p.result.errors:
            break
        best = p.ratio
    return best


def run(plan: Plan, ratios: tuple[float, ...]) -> dict[str, object]:
    wrk_path()
    api_key = secrets.token_hex(16)
    children: list[Child] = []
    points: list[Point] = []
    echo_rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-api-latency-") as tmp:
        work = Path(tmp)
        watch: RedisWatch | None = None
        try:
            echo_port = free_port()
            echo = python_child(
                "echo server", ["bench.api", "echo-server", str(echo_port)], work / "echo.log"
            )
            children.append(echo)
            wait_http(f"http://127.0.0.1:{echo_port}/", 20, echo, status=405)
            echo_t = Target("echo", f"http://127.0.0.1:{echo_port}")
            service_t, ids = start_service(work, plan, api_key, children, {})
            watch = RedisWatch.open(service_redis_url(work, {}))
            scripts = {
                "create": create_script(work / "create.lua", api_key),
                "check": check_script(work / "check.lua", api_key, ids),
            }
            for kind, script in scripts.items():
                echo_result = measure(echo_t, script, plan, base=0)
                echo_rates[kind] = echo_result.good_rps
                for i, ratio in enumerate(ratios):
                    result = measure_paced(
                        service_t,
                        work=work,
                        api_key=api_key,
                        ids=ids,
                        kind=kind,
                        echo=echo_result,
                        plan=plan,
                        watch=watch,
                        ratio=ratio,
                        base=(i + 1) * 2_000_000,  # two runs a point, a million numbers each
                    )
                    redis = watch.take() if watch is not None else None
                    points.append(Point(kind, ratio, ratio * echo_result.good_rps, result, redis))
                    if children[-1].returncode is not None:
                        raise BenchError(f"the service died during the run:\n{children[-1].tail()}")
        finally:
            if watch is not None:
                watch.close()
            for child in reversed(children):
                child.stop()
    return report(points, echo_rates, plan)


def report(points: list[Point], echo_rates: dict[str, float], plan: Plan) -> dict[str, object]:
    rows = []
    for p in points:
        r = p.result
        stall = f"{p.redis.worst_ms} ({p.redis.worst_event})" if p.redis else "n/a"
        rows.append(
            [
                p.kind,
                f"{p.ratio:.2f}",
                f"{p.offered_per_s:.0f}",
                f"{r.good_rps:.0f}",
                f"{r.p50_ms:.2f}",
                f"{r.p90_ms:.2f}",
                f"{r.p99_ms:.2f}",
                r.errors,
                p.redis.slow_fsync_s if p.redis else "n/a",
                stall,
            ]
        )
    print(
        f"\np99 against the rate offered: 50 connections paced for {plan.paced_s} s a point; "
        f"echo server: creates {echo_rates['create']:.0f}/s, checks {echo_rates['check']:.0f}/s"
    )
    print_table(
        [
            "kind",
            "x echo",
            "offered/s",
            "answered/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "errors",
            "s with a slow fsync",
            "worst Redis stall ms",
        ],
        rows,
    )
    figures: dict[str, object] = {
        "bench": "api_latency",
        "p99_goal_ms": GOAL_P99_MS,
        "paced_s": plan.paced_s,
        "echo_creates_per_s": round(echo_rates["create"], 1),
        "echo_checks_per_s": round(echo_rates["check"], 1),
        "points": [p.to_json() for p in points],
    }
    for kind in ("create", "check"):
        mine = [p for p in points if p.kind == kind]
        best = holds_up_to(mine, GOAL_P99_MS)
        within = [p.ratio for p in mine if p.result.p99_ms <= GOAL_P99_MS and not p.result.errors]
        figures[f"{kind}_p99_within_goal_up_to_ratio"] = best
        figures[f"{kind}_p99_within_goal_ratios"] = within
        where = (
            f"up to {best:.2f} x echo ({best * echo_rates[kind]:.0f}/s offered)"
            if best is not None
            else "not even at the lowest rate measured"
        )
        listed = ", ".join(f"{r:.2f}" for r in within) or "none"
        print(f"{kind}s: p99 within {GOAL_P99_MS:g} ms {where}; points within it: {listed}")
    return figures


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0] if __doc__ else "API latency against rate")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    plan, ratios = (QUICK, QUICK_RATIOS) if args.quick else (FULL, FULL_RATIOS)
    return finish("api_latency", args.quick, lambda: run(plan, ratios))


if __name__ == "__main__":
    sys.exit(main())
