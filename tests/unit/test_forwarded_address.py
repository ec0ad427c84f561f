"""The client address in one X-Forwarded-For hop (:func:`clinic_voice.http.forwarded_address`)."""

from __future__ import annotations

import pytest

from clinic_voice.http import forwarded_address


@pytest.mark.parametrize(
    ("hop", "address"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("203.0.113.9:4711", "203.0.113.9"),  # a proxy that adds the client's port
        ("2001:db8::1", "2001:db8::1"),
        ("2001:DB8:0::1", "2001:db8::1"),  # one spelling, whatever the proxy wrote
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:4711", "2001:db8::1"),
        ("::ffff:203.0.113.9", "::ffff:cb00:7109"),  # mapped: the limits count it as IPv4
        ("203.0.113.9:", None),
        ("203.0.113.9:123456", None),
        ("203.0.113.9:٤٧", None),  # Arabic-Indic digits are not a port
        ("[2001:db8::1]4711", None),
        ("[2001:db8::1", None),
        ("[203.0.113.9]:x", None),
        ("unknown", None),
        ("_hidden", None),  # RFC 7239 obfuscated identifiers
        ("", None),
    ],
)
def test_a_hop_is_an_address_with_or_without_a_port(hop: str, address: str | None) -> None:
    assert forwarded_address(hop) == address
