"""The README's text for the tests that hold it to the code (tests/unit/test_readme_*.py)."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def section(title: str) -> str:
    """The text under the ``## title`` heading, up to the next ``## `` heading."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def folded(title: str) -> str:
    """:func:`section`, its line breaks and indents folded to single spaces (a claim quoted
    from it matches however the paragraph is wrapped)."""
    return " ".join(section(title).split())
