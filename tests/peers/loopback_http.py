"""A local HTTP server on 127.0.0.1 for the peers the tests point the service at (the SMS
gateway, webhook receivers): one aiohttp app, its runner and the port it took."""

from __future__ import annotations

from typing import Any

from aiohttp import web


async def serve_on_loopback(
    app: web.Application, *, port: int = 0, **runner: Any
) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on 127.0.0.1:``port`` (0: a free one); the runner (to clean up) and the
    port. ``runner``: AppRunner options beyond ``access_log=None``, such as a short
    ``shutdown_timeout`` so a hanging request does not hold a test's teardown."""
    started = web.AppRunner(app, access_log=None, **runner)
    await started.setup()
    await web.TCPSite(started, "127.0.0.1", port).start()
    return started, int(started.addresses[0][1])
