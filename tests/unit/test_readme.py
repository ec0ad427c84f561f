"""The README documents every setting exactly as the code defines it."""

from __future__ import annotations

from pathlib import Path

from sip_config.settings import VARIABLES, markdown_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_has_the_generated_configuration_table() -> None:
    text = README.read_text()
    assert markdown_table() in text, "regenerate with: python -m sip_config.settings"


def test_every_variable_is_named_in_the_readme() -> None:
    text = README.read_text()
    missing = [v.name for v in VARIABLES if f"`{v.name}`" not in text]
    assert not missing


def test_readme_starts_with_the_two_commands() -> None:
    head = README.read_text()[:400]
    assert "make run" in head and "make test" in head


def test_every_module_is_named_in_the_architecture_table() -> None:
    """A newcomer finds every module from the README's folder table."""
    root = README.parent
    text = README.read_text()
    table = text[text.index("| folder | holds |") :]
    missing = [
        str(path.relative_to(root))
        for package in ("verification", "voice", "clinic_voice", "sip_config", "bench")
        for path in sorted((root / package).rglob("*.py"))
        if path.name != "__init__.py" and f"`{path.name}`" not in table
    ]
    assert not missing, f"modules the README's architecture table does not name: {missing}"
