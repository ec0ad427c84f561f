"""Where a verification's ``callback_url`` may point (pure).

A callback URL comes from an API client, and the service POSTs to it from inside the clinic's
network: without a rule it could be made to reach the cloud's metadata address, the service's
own Redis, or a host on the clinic's LAN (server-side request forgery). So a callback may
reach public addresses only, plus the networks the operator names in
``CLINIC_CALLBACK_NETWORKS`` (an app back-end on the clinic's LAN, or loopback for a test).

The URL is checked when the verification is made (:func:`check_callback_url`: its form, and
its host when that is an address, in any form inet_aton reads, such as ``127.1``); a host
name is checked each time it is resolved, when a webhook connects (:func:`reachable`, used by
the webhook sender's HTTP client), so a name that later resolves elsewhere is caught too.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from verification.addresses import embedded_ipv4

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


class CallbackRefused(ValueError):
    """The URL is not one the service will call back; the message says why."""


# NAT64 for one network's own use (RFC 8215): it reaches that network's IPv4 hosts, private
# ones included, and where in the address the IPv4 host sits is the network's choice.
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")
# Global unicast: every public IPv6 address is in it. Outside it (IPv4-compatible ::a.b.c.d,
# SIIT's ::ffff:0:a.b.c.d, site-local fec0::/10, ...) Python's is_global says yes to forms a
# host may route to itself or its LAN.
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")


def reachable(address: Address, networks: Sequence[Network] = ()) -> bool:
    """Whether a callback may connect to ``address`` (an IPv6 address that carries an IPv4
    host, :func:`~verification.addresses.embedded_ipv4`, is that host)."""
    if any(address in net for net in networks):
        return True
    if isinstance(address, ipaddress.IPv6Address):
        if address in _LOCAL_NAT64:
            return False
        ipv4 = embedded_ipv4(address)
        if ipv4 is None:
            return address in _GLOBAL_UNICAST and address.is_global and not address.is_multicast
        return reachable(ipv4, networks)
    return address.is_global and not address.is_multicast


def check_callback_url(url: str, networks: Sequence[Network] = ()) -> None:
    """Raise :class:`CallbackRefused` unless ``url`` is an http(s) URL the service may call."""
    if any(c.isspace() or not c.isprintable() for c in url):
        raise CallbackRefused("must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise CallbackRefused(f"is not a URL ({exc})") from None
    if parts.scheme.lower() not in {"http", "https"}:
        raise CallbackRefused("must be an http(s) URL")
    host = parts.hostname
    if not host:
        raise CallbackRefused("has no host")
    if parts.username is not None or parts.password is not None:
        raise CallbackRefused("must not hold credentials")
    if port == 0:
        raise CallbackRefused("has port 0")
    try:
        address: Address = ipaddress.ip_address(host)
        where = f"points at {address}"
    except ValueError:
        ascii_host = _ascii_name(host)
        numeric = _numeric_ipv4(ascii_host)
        if numeric is None:
            _check_labels(host, ascii_host)
            return
        address, where = numeric, f"host {host!r} stands for {numeric}"
    if not reachable(address, networks):
        raise CallbackRefused(
            f"{where}, which is not a public address "
            "(CLINIC_CALLBACK_NETWORKS names the private networks callbacks may reach)"
        )


def _ascii_name(host: str) -> str:
    """``host`` as the HTTP client connects to it (an international name in IDNA form;
    the codec also maps full-width digits and dots to ASCII ones)."""
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        raise CallbackRefused(f"host {host!r} is not a valid name") from None


def _check_labels(host: str, ascii_host: str) -> None:
    labels = ascii_host.rstrip(".").split(".")
    if len(ascii_host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise CallbackRefused(f"host {host!r} is not a valid name")


# One part of an IPv4 address as inet_aton reads it: hex (0x...), octal (a leading 0) or
# decimal. getaddrinfo, where a webhook connects, reads a host this way before any DNS
# lookup, so 127.1, 2130706433, 0177.0.0.1 and 0x7f000001 all reach 127.0.0.1.
_PART = re.compile(r"0[xX][0-9A-Fa-f]*|0[0-7]*|[1-9][0-9]*")
_ENDS_IN_NUMBER = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")


def _numeric_ipv4(ascii_host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a host of numbers stands for, or None for a name.

    A host whose last label is a number is read as an address, as the WHATWG URL standard
    reads it (no top-level domain is a number, so no real name is lost): one that does not
    make an inet_aton address (``999.1``, ``1.2.3.4.5``, ``08.1``) is refused, not looked up.
    """
    labels = ascii_host.split(".")
    if len(labels) > 1 and not labels[-1]:  # one trailing dot: the root, as in a name
        labels.pop()
    if not _ENDS_IN_NUMBER.fullmatch(labels[-1]):
        return None
    if len(labels) > 4 or not all(_PART.fullmatch(label) for label in labels):
        raise CallbackRefused(f"host {ascii_host!r} ends in a number but is not an IPv4 address")
    parts = [_part_value(label) for label in labels]
    # a.b.c.d; with fewer parts the last one fills the bytes left (a.b: b is 24 bits).
    last_bits = 8 * (5 - len(parts))
    if any(p > 255 for p in parts[:-1]) or parts[-1] >= 1 << last_bits:
        raise CallbackRefused(f"host {ascii_host!r} ends in a number but is not an IPv4 address")
    value = parts[-1]
    for i, p in enumerate(parts[:-1]):
        value |= p << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _part_value(label: str) -> int:
    if label[:2].lower() == "0x":
        return int(label[2:] or "0", 16)
    if len(label) > 1 and label.startswith("0"):
        return int(label, 8)
    return int(label)
