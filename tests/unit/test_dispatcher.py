"""The dispatcher's pure helpers (its sends run against real peers in tests/integration)."""

from __future__ import annotations

import pytest

from verification.dispatcher import id_lines


@pytest.mark.parametrize(
    ("count", "lines"),
    [
        (0, []),
        (1, ["v0"]),
        (3, ["v0, v1, v2"]),
        (4, ["v0, v1, v2", "v3"]),
        (7, ["v0, v1, v2", "v3, v4, v5", "v6"]),
    ],
)
def test_a_shutdown_names_every_id_a_few_to_a_line(count: int, lines: list[str]) -> None:
    assert id_lines({f"v{n}": None for n in range(count)}, per_line=3) == lines
