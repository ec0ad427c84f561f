"""The dispatcher's pure helpers (its sends run against real peers in tests/integration)."""

from __future__ import annotations

import pytest

from verification.dispatcher import _some


@pytest.mark.parametrize(
    ("count", "line"),
    [
        (0, ""),
        (1, "v0"),
        (3, "v0, v1, v2"),
        (4, "v0, v1, v2 and 1 more"),
        (25, "v0, v1, v2 and 22 more"),
    ],
)
def test_a_shutdown_line_lists_some_ids_then_how_many_more(count: int, line: str) -> None:
    assert _some({f"v{n}": None for n in range(count)}, at_most=3) == line
