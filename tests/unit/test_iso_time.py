"""The API's timestamps: ``iso`` must give exactly what datetime's isoformat gives."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from verification.wire import iso


def reference(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@pytest.mark.parametrize(
    "ts",
    [0.0, 1.0, 1_800_000_000.0, 1_800_000_000.9995, 1_800_000_000.9999995, 1_800_000_000.0004999,
     1_800_000_059.9999999, 1_796_083_199.9999996, 4_102_444_799.999, 1_800_000_000.0005],
)  # fmt: skip
def test_edges_match_datetime(ts: float) -> None:
    assert iso(ts) == reference(ts)


def test_random_times_match_datetime() -> None:
    rng = random.Random(7)
    for _ in range(50_000):
        ts = rng.uniform(1_700_000_000, 1_900_000_000)
        # Some right at a millisecond or second boundary, where rounding decides.
        if rng.random() < 0.3:
            ts = round(ts, rng.choice([0, 3, 6])) - rng.choice([0.0, 5e-7, 1e-7])
        assert iso(ts) == reference(ts), ts
