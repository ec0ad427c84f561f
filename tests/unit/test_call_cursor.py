"""``GET /v1/calls``'s cursor: the start and id of a page's last call, read back as given."""

from __future__ import annotations

import pytest

from voice.ivr.cursor import Cursor, CursorInvalid

T0 = 1_800_000_000.123


@pytest.mark.parametrize(
    "cursor",
    [
        Cursor(T0, "c-1"),
        Cursor(1765118964.5171368, "A_b-9" * 12),
        Cursor(1800000000.0, "x"),
        Cursor(T0, None),
    ],
)
def test_a_cursor_given_out_is_read_back_as_it_was(cursor: Cursor) -> None:
    assert Cursor.parse(str(cursor)) == cursor


def test_a_cursor_names_the_start_and_the_call() -> None:
    assert str(Cursor(T0, "c-1")) == "1800000000.123~c-1"


def test_a_cursor_of_before_is_the_start_alone() -> None:
    # What the API gave out before the call id was added: still taken.
    assert Cursor.parse("1800000000.123") == Cursor(T0, None)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "yesterday",
        "1.5e9",
        "-1",
        "1800000000.",
        "~c-1",
        "1800000000~",
        "1800000000~c 1",
        "1800000000~c/1",
        "1800000000~" + "c" * 65,
        "1800000000.5~c-1~c-2",
        "\u0661800000000",
    ],
)
def test_anything_else_is_no_cursor(text: str) -> None:
    with pytest.raises(CursorInvalid):
        Cursor.parse(text)


def test_the_calls_of_its_start_after_it_are_those_below_its_id_bytewise() -> None:
    # Redis lists one score's members bytewise, here descending: "Z" < "_" < "a".
    same = ["a", "Z", "c-2", "_x", "c-10", "c-1"]
    assert Cursor(T0, None).after(same) == ["c-2", "c-10", "c-1", "a", "_x", "Z"]
    assert Cursor(T0, "c-10").after(same) == ["c-1", "a", "_x", "Z"]
    assert Cursor(T0, "a").after(same) == ["_x", "Z"]
    assert Cursor(T0, "Z").after(same) == []
    # The cursor's own call gone (erased between two pages): the rest all the same.
    assert Cursor(T0, "b").after(same) == ["a", "_x", "Z"]
