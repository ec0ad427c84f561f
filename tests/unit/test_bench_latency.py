"""How bench/api_latency.py reads its curve: where the p99 goal holds."""

from __future__ import annotations

from bench.api_latency import Point, holds_up_to
from bench.common import WrkResult


def _point(ratio: float, p99_ms: float, errors: int = 0) -> Point:
    result = WrkResult(
        requests=1000,
        duration_s=10.0,
        non2xx=errors,
        socket_errors=0,
        p50_ms=1.0,
        p90_ms=2.0,
        p99_ms=p99_ms,
        max_ms=p99_ms + 1,
    )
    return Point("create", ratio, 100 * ratio, result, None)


def test_holds_up_to_the_last_point_before_the_first_miss_in_rising_order() -> None:
    # Given out of order; 0.30 is within the goal again but after a miss, so it does not count.
    points = [_point(0.30, 8.0), _point(0.10, 5.0), _point(0.20, 12.0), _point(0.15, 10.0)]
    assert holds_up_to(points, 10.0) == 0.15


def test_a_miss_at_the_lowest_rate_holds_nowhere() -> None:
    assert holds_up_to([_point(0.10, 10.5), _point(0.20, 4.0)], 10.0) is None


def test_errors_count_as_a_miss() -> None:
    assert holds_up_to([_point(0.10, 3.0), _point(0.20, 4.0, errors=1)], 10.0) == 0.10
