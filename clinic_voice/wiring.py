"""Which optional parts run, from the settings: the SIP pool, the SIP channels, the clinic line.

The composition point between :mod:`clinic_voice.app` (HTTP, Redis, dispatcher) and the
telephony packages, so the app itself knows nothing of pjsua2.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from aiohttp import web

from clinic_voice.app import Runtime
from sip_config.settings import Settings
from verification.channels.base import ChannelAdapter
from verification.model import Channel

Context = Callable[[web.Application], AsyncIterator[None]]


def extra_contexts(settings: Settings) -> list[Context]:
    """Cleanup contexts started after Redis and before the dispatcher."""
    return []


def channel_factories(
    settings: Settings,
) -> dict[Channel, Callable[[Runtime], ChannelAdapter | None]]:
    """Delivery channels beyond the HTTP SMS gateway."""
    return {}
