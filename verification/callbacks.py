"""Where a verification's ``callback_url`` may point (pure).

A callback URL comes from an API client, and the service POSTs to it from inside the clinic's
network: without a rule it could be made to reach the cloud's metadata address, the service's
own Redis, or a host on the clinic's LAN (server-side request forgery). So a callback may
reach public addresses only, plus the networks the operator names in
``CLINIC_CALLBACK_NETWORKS`` (an app back-end on the clinic's LAN, or loopback for a test).

The URL is checked when the verification is made (:func:`check_callback_url`: its form, and
its host when that is an address); a host name is checked each time it is resolved, when a
webhook connects (:func:`reachable`, used by the webhook sender's HTTP client), so a name that
later resolves elsewhere is caught too.
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
        address = ipaddress.ip_address(host)
    except ValueError:
        _check_name(host)
        return
    if not reachable(address, networks):
        raise CallbackRefused(
            f"points at {address}, which is not a public address "
            "(CLINIC_CALLBACK_NETWORKS names the private networks callbacks may reach)"
        )


def _check_name(host: str) -> None:
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise CallbackRefused(f"host {host!r} is not a valid name") from None
    labels = ascii_host.rstrip(".").split(".")
    if len(ascii_host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise CallbackRefused(f"host {host!r} is not a valid name")
