"""What a flow's webhook reply means to the flow: pure, so the contract is tested without HTTP.

The session POSTs a ``webhook`` step's values and, on a 2xx answer, hands the reply body to
:func:`reply_values`; each value lands in the call as ``<save>.<name>`` (``booking.message``,
``results.ready``), where flows speak it or branch on it.
"""

from __future__ import annotations

import ipaddress
import json
import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from voice.ivr.flow import FlowSet, Webhook


def reply_values(body: bytes) -> dict[str, str]:
    """The values a 2xx reply ``body`` gives the flow.

    A JSON object's text, number and boolean members become texts; a boolean is ``yes`` or
    ``no`` (what flows branch on: ``{"ready": true}`` must not read ``True``). Other members
    (null, lists, objects) are left out, and so are numbers that are no number: Python's
    json reads ``NaN`` and ``Infinity`` (not JSON: RFC 8259 section 6) and a number past a
    double's range (``1e999``) as such, which would be "nan" or "inf" for a flow to speak or
    branch on; and so is an integer longer than Python reads from text (4,300 digits by
    default, ``sys.set_int_max_str_digits``), which failed the whole reply. An empty body, one
    that is not JSON, or JSON that is not an object gives no values: the request arrived,
    which is the step's success.
    """
    try:
        data: Any = json.loads(body, parse_int=_int_or_none) if body.strip() else {}
    except ValueError:  # not JSON, or not UTF-8 (UnicodeDecodeError is a ValueError)
        return {}
    except RecursionError:  # nested deeper than json's C decoder goes ('{"a": ' * 2000)
        return {}
    if not isinstance(data, dict):
        return {}
    out: dict[str, str] = {}
    for name, value in data.items():
        if isinstance(value, bool):
            out[str(name)] = "yes" if value else "no"
        elif isinstance(value, float) and not math.isfinite(value):
            continue
        elif isinstance(value, str | int | float):
            out[str(name)] = str(value)
    return out


def _int_or_none(digits: str) -> int | None:
    """A JSON integer, or None (left out, as null is) past Python's int-from-text limit."""
    try:
        return int(digits)
    except ValueError:  # "Exceeds the limit (4300 digits) for integer string conversion"
        return None


def unconfigured(flowset: FlowSet, urls: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    """URL keys a flow's ``webhook`` step names but ``urls`` leaves empty, with those flows.

    Every call through such a step takes its ``on_fail`` branch: worth one warning at start.
    """
    out: dict[str, set[str]] = {}
    for flow in flowset.flows.values():
        for node in flow.nodes.values():
            if isinstance(node, Webhook) and not urls.get(node.url):
                out.setdefault(node.url, set()).add(flow.id)
    return {key: tuple(sorted(ids)) for key, ids in sorted(out.items())}


def in_clear(url: str) -> str | None:
    """The host a POST to ``url`` would reach unencrypted, over a network: an ``http://``
    URL whose host is not loopback (``localhost``, 127.0.0.0/8, ``::1``: a proxy on the same
    host that adds TLS). None for ``https://``, loopback, or no URL."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return None  # not a URL: the settings refused it already
    if parts.scheme.lower() != "http" or not host:
        return None
    if host == "localhost" or host.endswith(".localhost"):  # RFC 6761 6.3: always loopback
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass  # a name
    return host
