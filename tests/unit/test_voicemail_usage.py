"""The messages' bytes kept as they change (voice/ivr/voicemail_usage.py), a listing racing
with writes and erasures included."""

from __future__ import annotations

from voice.ivr.voicemail_usage import StoredBytes


def test_nothing_is_known_before_a_first_listing() -> None:
    stored = StoredBytes()
    stored.written("a", 10)
    assert stored.total is None
    stored.scan_begins()
    stored.scan_ends({"a": 10, "b": 5})
    assert stored.total == 15


def test_writes_and_erasures_move_the_total() -> None:
    stored = StoredBytes()
    stored.scan_begins()
    stored.scan_ends({"a": 10})
    stored.written("b", 7)
    stored.written("b", 8)  # written again: counted once, at its size
    stored.removed(["a", "never"])
    assert stored.total == 8


def test_what_changes_during_a_listing_overrides_what_it_found() -> None:
    """The listing (in a thread) may or may not have seen a file written or deleted
    meanwhile: what the loop was told of wins, whichever the listing saw."""
    stored = StoredBytes()
    stored.scan_begins()
    stored.scan_ends({"a": 10, "b": 20})
    stored.scan_begins()
    stored.written("c", 30)  # seen by the listing as its write's temp file, 12 bytes
    stored.removed(["a"])  # seen by the listing before its deletion
    stored.written("d", 40)  # not seen at all
    assert stored.total == 20 + 30 + 40  # moving meanwhile
    stored.scan_ends({"a": 10, "b": 21, "c": 12})
    assert stored.total == 21 + 30 + 40


def test_a_failed_listing_keeps_the_count() -> None:
    stored = StoredBytes()
    stored.scan_begins()
    stored.scan_ends({"a": 10})
    stored.scan_begins()
    stored.written("b", 5)
    stored.scan_failed()
    stored.removed(["a"])
    assert stored.total == 5
