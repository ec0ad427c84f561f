"""Fills ``CLINIC_SIP_ROUTE`` for one number: ``{e164}``, ``{digits}``, ``{national}``."""

from __future__ import annotations

import re

from verification.model import Phone
from verification.numbers import trunk_prefix
from voice.sip.pool import SipPool


def sip_target(template: str, phone: Phone) -> str:
    """``sip:{e164}@pbx`` -> ``sip:+31612345678@pbx`` (national: trunk prefix + number)."""
    national = trunk_prefix(phone.region) + phone.national_number
    return template.format(e164=phone.e164, digits=phone.e164.lstrip("+"), national=national)


def over_udp(template: str) -> bool:
    """Whether a route sends over UDP: a ``sip:`` URI without a ``transport`` other than udp."""
    low = template.lower()
    if low.startswith("sips:"):
        return False
    m = re.search(r";transport=([a-z]+)", low)
    return m is None or m.group(1) == "udp"


def can_send(pool: SipPool) -> bool:
    """Whether a SIP channel can send now: at least one worker is up.

    Not :meth:`SipPool.ready`, which wants every worker up: while one worker restarts after a
    crash the others still place calls, and a channel that said "not available" then would
    fail the very verifications the crash already hit. (/readyz asks
    :meth:`SipPool.serving`: every worker at start, then one.)
    """
    return pool.any_worker_up()  # not a count over every worker: this is asked per send
