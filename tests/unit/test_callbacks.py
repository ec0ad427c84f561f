"""Where a callback URL may point: its form, and the addresses it may reach (table-driven)."""

from __future__ import annotations

import ipaddress

import pytest

from verification.callbacks import CallbackRefused, check_callback_url, reachable

LAN = (ipaddress.ip_network("10.20.0.0/16"),)


@pytest.mark.parametrize(
    ("address", "networks", "allowed"),
    [
        ("93.184.216.34", (), True),
        ("2606:2800:220:1:248:1893:25c8:1946", (), True),
        ("169.254.169.254", (), False),  # the cloud's metadata service
        ("127.0.0.1", (), False),
        ("::1", (), False),
        ("::ffff:127.0.0.1", (), False),  # loopback, written as IPv6
        ("::ffff:93.184.216.34", (), True),
        ("64:ff9b::7f00:1", (), False),  # NAT64 (RFC 6052): loopback behind the gateway
        ("64:ff9b::a9fe:a9fe", (), False),  # NAT64: the metadata service
        ("64:ff9b::5db8:d822", (), True),  # NAT64: a public IPv4 host
        ("64:ff9b:1::a00:1", (), False),  # local-use NAT64 (RFC 8215): the LAN's hosts
        ("2002:7f00:1::", (), False),  # 6to4 (RFC 3056) of loopback
        ("2002:a14:105::1", (), False),  # 6to4 of 10.20.1.5
        ("2002:a14:105::1", LAN, True),  # ...which the operator allowed
        ("2002:5db8:d822::1", (), True),  # 6to4 of a public host
        ("::7f00:1", (), False),  # IPv4-compatible (deprecated) loopback
        ("::ffff:0:7f00:1", (), False),  # SIIT's IPv4-translated loopback
        ("fec0::1", (), False),  # site-local (deprecated)
        ("100::1", (), False),  # discard-only
        ("10.20.1.5", (), False),
        ("10.20.1.5", LAN, True),
        ("10.21.1.5", LAN, False),
        ("192.168.1.1", (), False),
        ("172.16.0.1", (), False),
        ("100.64.0.1", (), False),  # carrier-grade NAT
        ("0.0.0.0", (), False),
        ("224.0.0.1", (), False),
        ("fe80::1", (), False),
        ("fc00::1", (), False),
        ("ff02::1", (), False),
    ],
)
def test_reachable(
    address: str, networks: tuple[ipaddress.IPv4Network, ...], allowed: bool
) -> None:
    assert reachable(ipaddress.ip_address(address), networks) is allowed


@pytest.mark.parametrize(
    "url",
    [
        "https://app.example.com/hooks/verify",
        "HTTPS://example.com/",
        "http://example.com:8080/cb?x=1",
        "https://bücher.example/cb",
        "http://93.184.216.34/cb",
        "http://[2606:2800:220:1:248:1893:25c8:1946]/cb",
        "http://0x5db8d822/cb",  # 93.184.216.34, a public address in another form
        "http://1572395042/cb",  # the same, as one decimal number
        "https://1.example/cb",  # a number, but not the last label: a name
        "https://app.example./cb",  # a name with the root's trailing dot
    ],
)
def test_accepted(url: str) -> None:
    check_callback_url(url)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://", "has no host"),
        ("https:///path", "has no host"),
        ("ftp://example.com/", "http(s)"),
        ("example.com/cb", "http(s)"),
        ("http://a b c/", "spaces"),
        ("http://example.com/\n", "spaces"),
        ("http://example.com/\x00", "control"),
        ("http://user:pw@example.com/", "credentials"),
        ("http://example.com:0/", "port 0"),
        ("http://example.com:99999/", "not a URL"),
        ("http://169.254.169.254/latest/meta-data/", "not a public address"),
        ("http://127.0.0.1:6379/", "not a public address"),
        ("http://[::1]/", "not a public address"),
        ("http://[64:ff9b::7f00:1]/", "not a public address"),
        ("http://[2002:7f00:1::]/", "not a public address"),
        ("http://10.0.0.1/", "not a public address"),
        ("http://-bad-.example/", "not a valid name"),
        ("http://" + "a" * 64 + ".example/", "not a valid name"),
        ("http://exa_mple.com/", "not a valid name"),
        # An address written as inet_aton reads it (getaddrinfo does, before any DNS lookup,
        # where the webhook connects) is judged as that address here too: a review found
        # these taken as names (201), and refused only when the webhook connected.
        ("http://127.1/", "'127.1' stands for 127.0.0.1, which is not a public address"),
        ("http://0/", "'0' stands for 0.0.0.0, which is not a public address"),
        ("http://2130706433/", "stands for 127.0.0.1, which is not a public"),
        ("http://0177.0.0.1/", "stands for 127.0.0.1, which is not a public"),
        ("http://0x7f000001/", "stands for 127.0.0.1, which is not a public"),
        ("http://0X7F.1/", "stands for 127.0.0.1, which is not a public"),
        ("http://0xa9.254.43518/", "stands for 169.254.169.254, which is not a public"),
        ("http://167772167:6379/", "stands for 10.0.0.7, which is not a public"),
        ("http://127.0.0.1./", "stands for 127.0.0.1, which is not a public"),
        ("http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/", "stands for 127.0.0.1"),  # full-width
        ("http://127\u30020\u30020\u30021/", "stands for 127.0.0.1"),  # ideographic full stops
        # Ends in a number, as no real name does, but is no address inet_aton reads: refused
        # rather than handed to DNS.
        ("http://999.1/", "ends in a number but is not an IPv4 address"),
        ("http://1.2.3.4.5/", "ends in a number but is not an IPv4 address"),
        ("http://08.1/", "ends in a number but is not an IPv4 address"),
        ("http://4294967296/", "ends in a number but is not an IPv4 address"),
        ("http://1.16777216/", "ends in a number but is not an IPv4 address"),
        ("http://app.example.1/", "ends in a number but is not an IPv4 address"),
    ],
)
def test_refused(url: str, why: str) -> None:
    with pytest.raises(CallbackRefused, match=why.replace("(", r"\(").replace(")", r"\)")):
        check_callback_url(url)


def test_a_named_private_network_is_allowed() -> None:
    check_callback_url("http://10.20.3.4:8443/cb", LAN)
    check_callback_url("http://10.20.259:8443/cb", LAN)  # 10.20.1.3, in another form
    with pytest.raises(CallbackRefused):
        check_callback_url("http://10.30.3.4/cb", LAN)
    with pytest.raises(CallbackRefused):
        check_callback_url("http://10.30.259/cb", LAN)
