"""The IPv4 address an IPv6 address carries, where it carries one (pure).

Three forms put a whole IPv4 host inside an IPv6 address: IPv4-mapped (``::ffff:a.b.c.d``,
a dual-stack socket's view of an IPv4 peer), NAT64's well-known prefix (``64:ff9b::a.b.c.d``,
RFC 6052: an IPv4 host reached through a NAT64 gateway) and 6to4 (``2002:AABB:CCDD::/48``,
RFC 3056: the site behind IPv4 host ``AA.BB.CC.DD``). Whoever decides by address (a limit
that counts clients, a rule on where callbacks may go) must decide on that IPv4 host: as
IPv6 addresses, ``64:ff9b::7f00:1`` and ``2002:7f00:1::`` look global, and are loopback.
"""

from __future__ import annotations

import ipaddress

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 host ``address`` stands for, or None when it is a plain IPv6 address."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
    return address.sixtofour
