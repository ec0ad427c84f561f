"""Which transport a CLINIC_SIP_ROUTE uses: over UDP ``serve`` places flash calls itself."""

from __future__ import annotations

import pytest

from verification.channels.sip_route import over_udp


@pytest.mark.parametrize(
    ("route", "udp"),
    [
        ("sip:{e164}@127.0.0.1:5160", True),
        ("sip:{e164}@pbx.example.org;transport=udp", True),
        ("sip:{e164}@pbx.example.org;transport=UDP", True),
        ("sip:{e164}@pbx.example.org:5060;transport=tcp", False),
        ("sip:{e164}@pbx.example.org;user=phone;transport=tls", False),
        ("sips:{e164}@pbx.example.org", False),
        ("SIPS:{e164}@pbx.example.org", False),
    ],
)
def test_over_udp(route: str, udp: bool) -> None:
    assert over_udp(route) is udp
