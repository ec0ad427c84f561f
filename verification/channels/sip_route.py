"""Fills ``CLINIC_SIP_ROUTE`` for one number: ``{e164}``, ``{digits}``, ``{national}``."""

from __future__ import annotations

from verification.model import Phone
from verification.numbers import trunk_prefix


def sip_target(template: str, phone: Phone) -> str:
    """``sip:{e164}@pbx`` -> ``sip:+31612345678@pbx`` (national: trunk prefix + number)."""
    national = trunk_prefix(phone.region) + phone.national_number
    return template.format(e164=phone.e164, digits=phone.e164.lstrip("+"), national=national)
