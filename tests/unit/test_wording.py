"""The texts a phone gets, per language: picked by the locale's language, English otherwise."""

from __future__ import annotations

import pytest

from verification.wording import DEFAULT, WORDINGS, wording


@pytest.mark.parametrize(
    ("locale", "language"),
    [
        ("en", "en"),
        ("en-GB", "en"),
        ("nl", "nl"),
        ("nl-NL", "nl"),
        ("NL-be", "nl"),
        ("fr-FR", "en"),
        ("zz", "en"),
    ],
)
def test_the_locale_picks_the_language(locale: str, language: str) -> None:
    assert wording(locale).language == language


@pytest.mark.parametrize("language", list(WORDINGS))
def test_every_wording_names_the_clinic_and_holds_the_code_only_in_the_sms(language: str) -> None:
    w = wording(language)
    assert w.language == language
    sms = w.sms_text("Oak Clinic", "482913")
    assert "Oak Clinic" in sms and "482913" in sms
    assert "Oak Clinic" in w.head_text("Oak Clinic")
    assert "Oak Clinic" in w.keypress_text("Oak Clinic") and "1" in w.keypress_text("Oak")
    assert DEFAULT is WORDINGS["en"]
