"""What the service says to a phone, per language: the SMS and the spoken code's sentences.

A verification's ``locale`` (a language tag such as ``nl-NL``) picks the wording by its
language; a language without wording here gets English. Every text names the clinic, holds
the code where it must, and holds no health data. ``language`` is also the espeak-ng voice.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Wording:
    """The texts of one language; ``{clinic}`` and ``{code}`` are filled in."""

    language: str
    sms: str
    spoken_head: str  # said before the digits
    keypress: str  # asked before the code is read (a voicemail box never hears it)

    def sms_text(self, clinic: str, code: str) -> str:
        return self.sms.format(clinic=clinic, code=code)

    def head_text(self, clinic: str) -> str:
        return self.spoken_head.format(clinic=clinic)

    def keypress_text(self, clinic: str) -> str:
        return self.keypress.format(clinic=clinic)


WORDINGS: dict[str, Wording] = {
    "en": Wording(
        language="en",
        # "for <clinic>" reads well with any name, the default "the clinic" too.
        sms="{code} is your verification code for {clinic}. Do not share it.",
        # "Your {clinic} code is" read "Your the clinic code is" with the default name.
        spoken_head="Your verification code for {clinic} is",
        keypress="This is {clinic} with your verification code. Press 1 to hear it.",
    ),
    "nl": Wording(
        language="nl",
        sms="{code} is uw verificatiecode voor {clinic}. Deel deze code met niemand.",
        spoken_head="Uw code voor {clinic} is",
        keypress="U wordt gebeld door {clinic} met uw verificatiecode. Druk op 1 om hem te horen.",
    ),
}
DEFAULT = WORDINGS["en"]


def wording(locale: str) -> Wording:
    """The wording for a language tag: by its language subtag, case-blind; English else."""
    return WORDINGS.get(locale.split("-", 1)[0].lower(), DEFAULT)
