"""Whose number an inbound call carries, and whether anyone vouches for it (RFC 3325), no I/O.

A SIP caller writes its own ``From``: a phone that dials the service directly (direct mode,
no PBX or trunk in front) can put any number there. RFC 3325 lets a trusted hop, a PBX that
authenticated its extension or a carrier's trunk, assert the caller's identity in
``P-Asserted-Identity``; that header means something only when the request came from such a
hop (section 9.1: from anyone else it is ignored, since a phone can write it as easily as
its ``From``). So a number counts as asserted only when both hold: the INVITE's source
address is one of ``CLINIC_SIP_TRUSTED_PEERS``, and it carries a ``P-Asserted-Identity``
with a phone number in it. Every other call's number is only claimed: the scheduling
webhook and the call record say so, so that nobody calls a stranger back with a patient's
health matter on the strength of a forged ``From``.

The source address is the one the packet came from (pjsip's ``srcAddress``), never a
``Via`` or ``Contact``, which the sender writes.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PAI = "p-asserted-identity"

# RFC 3966 section 5.1.1: visual separators a tel: or sip: number may carry.
_SEPARATORS = re.compile(r"[-.() ]")
_NUMBER = re.compile(r"\+?[0-9]{2,20}")
# A quoted display name (RFC 3261 section 25.1, quoted-string; one never closed runs to the
# end): a PBX passes the caller's own name on in it (Asterisk's caller ID name is the From's
# display name, whoever wrote it), so a "sip:" or "tel:" in it asserts nothing.
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"?')
_BRACKETED = re.compile(r"<([^>]*)>")
# A URI's number, read from the URI's start only (never from a parameter).
_SIP_USER = re.compile(r"\s*sips?:([^@;>\s]+)@", re.IGNORECASE)
_TEL = re.compile(r"\s*tel:([^;>,\s]+)", re.IGNORECASE)


class CallerIdentity(enum.StrEnum):
    """How far the caller's number can be believed."""

    # A trusted hop (CLINIC_SIP_TRUSTED_PEERS) sent the INVITE and asserted the number in
    # P-Asserted-Identity.
    ASSERTED = "asserted"
    # The caller's own From (or a P-Asserted-Identity nobody trusted vouches for): whatever
    # the caller chose.
    CLAIMED = "claimed"


@dataclass(frozen=True, slots=True)
class Caller:
    """The caller's number as the call record and the scheduling webhook show it."""

    number: str
    identity: CallerIdentity = CallerIdentity.CLAIMED

    @property
    def verified(self) -> bool:
        """True when a trusted hop asserted ``number``."""
        return self.identity is CallerIdentity.ASSERTED


def parse_trusted_peers(value: str) -> tuple[IpNetwork, ...]:
    """``CLINIC_SIP_TRUSTED_PEERS``: addresses or networks split by commas (``10.0.0.5``,
    ``10.0.0.0/24``, ``::1``). Raises ValueError naming the part it cannot read."""
    out: list[IpNetwork] = []
    for part in value.split(","):
        text = part.strip()
        if not text:
            continue
        try:
            net: IpNetwork = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is no IP address or network") from None
        mapped = net.network_address.ipv4_mapped if net.version == 6 else None
        if mapped is not None and net.prefixlen >= 96:
            # An IPv4 peer as a dual-stack socket shows it (::ffff:10.0.0.5): the source is
            # read as IPv4 (source_host), so the peer is too, or it never matched.
            net = ipaddress.IPv4Network(f"{mapped}/{net.prefixlen - 96}")
        out.append(net)
    return tuple(out)


# The widest networks CLINIC_SIP_TRUSTED_PEERS names without a warning at start: an IPv4 /8
# (16.7 million addresses), and an IPv6 /32 (the smallest block a registry allocates to one
# provider). Anything wider (0.0.0.0/0, ::/0, 10.0.0.0/7) is many operators' networks, and
# every sender there may assert any caller's number.
WIDEST_TRUSTED_PREFIX = {4: 8, 6: 32}


def too_broad(trusted: Iterable[IpNetwork]) -> tuple[IpNetwork, ...]:
    """The networks of ``trusted`` wider than :data:`WIDEST_TRUSTED_PREFIX` allows."""
    return tuple(n for n in trusted if n.prefixlen < WIDEST_TRUSTED_PREFIX[n.version])


def source_host(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address of a transport address as pjsip writes it (``127.0.0.1:5060``,
    ``[::1]:5060``), an IPv4 address an IPv6 one maps read as IPv4; None when unreadable."""
    text = address.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_trusted(address: str, trusted: Iterable[IpNetwork]) -> bool:
    """True when ``address`` (the INVITE's source) lies in one of ``trusted``."""
    ip = source_host(address)
    return ip is not None and any(ip.version == net.version and ip in net for net in trusted)


def asserted_number(value: str) -> str:
    """The phone number a P-Asserted-Identity value holds (``<sip:+316...@pbx>``,
    ``<tel:+31-6-...>``, either of two split by a comma); "" when it holds none
    (``anonymous``, an empty user)."""
    text = _QUOTED.sub("", value)
    # name-addr (``<...>``, the only form a display name may precede) or bare addr-specs.
    uris = [m.group(1) for m in _BRACKETED.finditer(text)] if "<" in text else text.split(",")
    for uri in uris:
        m = _SIP_USER.match(uri) or _TEL.match(uri)
        number = _SEPARATORS.sub("", m.group(1)) if m else ""
        if _NUMBER.fullmatch(number):
            return number
    return ""


def identify(
    from_user: str,
    headers: Iterable[tuple[str, str]],
    source: str,
    trusted: Iterable[IpNetwork],
) -> Caller:
    """The caller of an INVITE whose From's user part is ``from_user``, with ``headers``,
    received from ``source``: the asserted number when a trusted peer sent it with a
    P-Asserted-Identity that holds one, else the From's user part, only claimed."""
    if is_trusted(source, tuple(trusted)):
        for name, value in headers:
            if name.lower() == PAI:
                number = asserted_number(value)
                if number:
                    return Caller(number, CallerIdentity.ASSERTED)
    return Caller(from_user, CallerIdentity.CLAIMED)
