"""Parse and serialise SIP messages (RFC 3261 section 7), no I/O.

Just enough of SIP for the redirect front and for reading inbound headers: a start line,
ordered headers (compact forms expanded, section 7.3.3), and a body.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from voice.sip.outcome import SipStatus

# RFC 3261 section 7.3.3 (and RFC 3515 / 4028 / 6665 for r, x, o).
_COMPACT = {
    "i": "Call-ID",
    "m": "Contact",
    "e": "Content-Encoding",
    "l": "Content-Length",
    "c": "Content-Type",
    "f": "From",
    "s": "Subject",
    "k": "Supported",
    "t": "To",
    "v": "Via",
    "r": "Refer-To",
    "x": "Session-Expires",
    "o": "Event",
}
_CANONICAL = {
    n.lower(): n
    for n in (
        "Call-ID",
        "Contact",
        "Content-Length",
        "Content-Type",
        "From",
        "To",
        "Via",
        "CSeq",
        "Max-Forwards",
        "Allow",
        "Supported",
        "P-Asserted-Identity",
        "Record-Route",
        "Route",
    )
}


class SipParseError(ValueError):
    """The bytes are not a SIP message; ``status`` is what to answer (400)."""

    status = SipStatus.BAD_REQUEST


@dataclass(frozen=True, slots=True)
class SipMessage:
    """A request (``method`` set) or a response (``status`` set)."""

    method: str  # "" for a response
    uri: str  # request URI, "" for a response
    status: int  # 0 for a request
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""
    _index: dict[str, list[str]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_request(self) -> bool:
        """True for a request, False for a response."""
        return bool(self.method)

    def get(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        values = self.get_all(name)
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        """Every value of header ``name`` in order (comma-joined lists are not split)."""
        if not self._index:
            for n, v in self.headers:
                self._index.setdefault(n.lower(), []).append(v)
        return self._index.get(_canonical(name).lower(), [])


def _canonical(name: str) -> str:
    low = name.strip().lower()
    if low in _COMPACT:
        return _COMPACT[low]
    return _CANONICAL.get(low, name.strip())


# Control characters but HTAB and the LF that ends a line (a CRLF is one by then).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def parse(data: bytes, *, strict: bool = False) -> SipMessage:
    """Parse one whole SIP message (as received in a datagram or framed off a stream).

    ``strict`` (the front and the flash-call agent, which copy a request's headers into
    their answers): a control character in the head is a :class:`SipParseError`. Without
    it (what pjsip accepted already) one is kept: RFC 3261 25.1 allows an
    escaped one in a quoted string ("A\\<0x01>B" <sip:...>), and the worker must not lose a
    caller's Call-ID over a display name; a head that is not UTF-8 is read likewise, its
    other bytes as U+FFFD (strict: a :class:`SipParseError`)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = data.partition(b"\n\n")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        if strict:
            raise SipParseError("header section is not UTF-8") from None
        # What pjsip accepted already (RFC 3261 7.3 asks for UTF-8, an older PBX sends a
        # display name in Latin-1): the caller's number and Call-ID are ASCII, and are read;
        # a byte that is not UTF-8 becomes U+FFFD.
        text = head.decode("utf-8", errors="replace")
    text = text.replace("\r\n", "\n")
    if strict and _CONTROL.search(text):
        # RFC 3261 25.1: no control character but HTAB in a message's head. A lone CR or a
        # NUL kept in a value was copied into the answer (Via, From, To...): a line break
        # for a peer that ends lines at a CR.
        raise SipParseError("control character in the header section")
    lines = text.split("\n")
    start = lines[0].strip()
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t" and headers:  # folded continuation (section 7.3.1)
            name, value = headers[-1]
            # The fold is one space; a blank continuation adds nothing (a header folded
            # onto an empty line was " ", present but empty, and "" once re-serialised).
            headers[-1] = (name, f"{value} {line.strip()}".strip())
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            # Never quoted: a line may hold a caller's number, a flash call's code (its
            # Contact) or a transfer's summary, and this message is logged.
            raise SipParseError(f"bad header line ({len(line)} characters, no name and colon)")
        headers.append((_canonical(name), value.strip()))
    m = re.fullmatch(r"SIP/2\.0 ([1-6][0-9]{2}) ?(.*)", start)
    if m:
        return SipMessage("", "", int(m.group(1)), m.group(2), tuple(headers), body)
    m = re.fullmatch(r"([A-Za-z!%*_+`'~.-]+) (\S+) SIP/2\.0", start)
    if not m:
        # Nor this one: a Request-URI names the callee (a number; a flash call's code).
        raise SipParseError(f"bad start line ({len(start)} characters)")
    return SipMessage(m.group(1).upper(), m.group(2), 0, "", tuple(headers), body)


def serialise_response(
    request: SipMessage,
    status: int,
    *,
    reason: str = "",
    to_tag: str = "",
    extra: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """A response to ``request`` (section 8.2.6.2): Via, From, To, Call-ID, CSeq copied."""
    if not reason:
        try:
            reason = SipStatus(status).phrase
        except ValueError:
            reason = "Unknown"
    lines = [f"SIP/2.0 {status} {reason}"]
    lines += [f"Via: {v}" for v in request.get_all("Via")]
    lines.append(f"From: {request.get('From') or ''}")
    to = request.get("To") or ""
    if to_tag and header_tag(to) is None:  # a To with a tag is copied as it is (8.2.6.2)
        to = f"{to};tag={to_tag}"
    lines.append(f"To: {to}")
    lines.append(f"Call-ID: {request.get('Call-ID') or ''}")
    lines.append(f"CSeq: {request.get('CSeq') or ''}")
    lines += [f"{n}: {v}" for n, v in extra]
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def header_tag(value: str) -> str | None:
    """The ``tag`` parameter of a From or To value, None when it has none.

    Only the header's own parameters count: in a name-addr those after the ``>`` (a
    ``tag`` inside the ``<>`` is a URI parameter, section 20.10). A parameter's name is
    case-insensitive and a ``;`` may have whitespace around it (sections 7.3.1 and 25.1):
    ``;TAG=x`` or `` ; tag=x`` is a tag, where the front added a second one.
    """
    return header_param(value, "tag")


def header_param(value: str, name: str) -> str | None:
    """The header parameter ``name`` of a header value (``refer;id=7``, or a name-addr's
    after its ``>``), None when it has none; names are case-insensitive (section 7.3.1)."""
    params = value.rpartition(">")[2] if "<" in value else value
    for part in params.split(";")[1:]:
        key, _, found = part.partition("=")
        if key.strip().lower() == name:
            return found.strip()
    return None


_URI_USER = re.compile(r"sips?:([^@;>\s]+)@", re.IGNORECASE)


def user_part(value: str) -> str:
    """The user part of a URI or name-addr (``"A" <sip:+4479@host>;tag=x`` -> ``+4479``)."""
    m = _URI_USER.search(value)
    return m.group(1) if m else ""


# More digits than any message has bytes: read as this, not by int() (which refuses over
# 4,300 digits, a ValueError out of the TCP reader).
_HUGE_LENGTH = 10**18


def content_length(head: bytes) -> int | None:
    """Content-Length from a raw header section (for stream framing), None when absent; a
    number of more than 18 digits is ``10**18``, too large for any message."""
    m = re.search(rb"(?im)^(?:content-length|l)[ \t]*:[ \t]*([0-9]+)[ \t]*\r?$", head)
    if not m:
        return None
    digits = m.group(1).lstrip(b"0") or b"0"
    return int(digits) if len(digits) <= 18 else _HUGE_LENGTH
