"""An HTTP worker process's end of the control socket to ``serve`` (see
:mod:`clinic_voice.http_workers`): it forwards SIP sends (and says when their verification
became final here, so ``serve`` stops them), learns which channels ``serve`` has
and whether they are ready, reports its metrics, and asks for the service's /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from clinic_voice.http_workers import MAX_LINE, encode
from clinic_voice.metrics import Metrics
from sip_config.tasks import watch
from verification.model import Channel

log = logging.getLogger(__name__)

METRICS_EVERY_S = 1.0
FIRST_STATE_DEADLINE_S = 30.0
RENDER_DEADLINE_S = 2.0
# serve sends its state every STATE_EVERY_S (0.5 s): none for this long, and serve is stuck
# (stopped, swapping, a loop that blocks), though its connection stays open.
STATE_STALE_S = 2.0


class MainLinkError(RuntimeError):
    """The control connection to ``serve`` is down."""


class MainLink:
    """The :class:`verification.dispatcher.Forwarder` of an HTTP worker, and more."""

    def __init__(self, path: Path, index: int, metrics: Metrics) -> None:
        self._path = path
        self._index = index
        self._metrics = metrics
        self._writer: asyncio.StreamWriter | None = None
        self._channels: dict[Channel, bool] = {}
        self._checks: dict[str, bool] = {}
        self._warming: list[str] = []
        self._calls_on_disk: int | None = None
        self._state_at = 0.0  # time.monotonic() of serve's last state
        self._renders: dict[int, asyncio.Future[str]] = {}
        self._numbers = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False  # this worker is stopping: serve's going away is expected
        self.lost = asyncio.Event()  # set when serve went away: the worker stops

    async def start(self, on_failure: Callable[[str], None] | None = None) -> None:
        """Connect and wait for ``serve``'s first state (so the channels are known).
        ``on_failure`` is told when a task of the link dies of a defect (Runtime.fail: the
        worker stops and exits 1, and serve starts it again): the reader's death stopped the
        worker as if serve had gone (exit 0, nothing logged but "serve closed the control
        connection"), and the metrics pusher's left serve summing this worker's numbers of
        then for good."""
        reader, self._writer = await asyncio.open_unix_connection(str(self._path), limit=MAX_LINE)
        self._writer.write(encode({"op": "hello", "index": self._index}))
        first = await asyncio.wait_for(reader.readline(), FIRST_STATE_DEADLINE_S)
        if not first:
            raise MainLinkError("serve closed the control connection at once")
        self._handle(orjson.loads(first))
        self._tasks = [
            asyncio.create_task(self._read(reader), name="main-link-read"),
            asyncio.create_task(self._push_metrics(), name="main-link-metrics"),
        ]
        reading, pushing = self._tasks
        watch(reading, log, "the control connection's reader", on_failure)
        watch(pushing, log, "the metrics pushed to serve", on_failure)

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._writer is not None:
            with contextlib.suppress(ConnectionError, MainLinkError):
                self._send({"op": "metrics", "snapshot": self._metrics.snapshot()})
                await self._writer.drain()
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()

    # -- Forwarder -------------------------------------------------------------------------------
    def channels(self) -> frozenset[Channel]:
        return frozenset(self._channels)

    def ready(self, channel: Channel) -> bool:
        return not self.lost.is_set() and self._channels.get(channel, False)

    def forward(self, vid: str, step: int, channel: Channel, counted: bool) -> bool:
        try:
            self._send(
                {
                    "op": "send",
                    "vid": vid,
                    "step": step,
                    "channel": channel.value,
                    "counted": counted,
                }
            )
        except MainLinkError:
            return False
        return True

    def settled(self, vid: str) -> None:
        # Best effort: without serve there is no send of this worker's to stop anyway, and
        # serve's own watch of its sends (Dispatcher.watch_sends) catches a lost message.
        with contextlib.suppress(MainLinkError):
            self._send({"op": "settled", "vid": vid})

    def moved(self, vid: str, step: int) -> None:
        # Best effort, as settled(): serve's own step timer and reports end that send anyway.
        with contextlib.suppress(MainLinkError):
            self._send({"op": "moved", "vid": vid, "step": step})

    def listening(self) -> None:
        """Tell ``serve`` this worker's HTTP socket is bound (it counts as ready from then)."""
        with contextlib.suppress(MainLinkError):
            self._send({"op": "listening"})

    # -- what serve says -------------------------------------------------------------------------
    def main_ready(self) -> bool:
        """``serve`` is connected, has said its state within STATE_STALE_S, and its own
        readiness checks pass (for this worker's /readyz)."""
        if self.lost.is_set() or time.monotonic() - self._state_at > STATE_STALE_S:
            return False
        return all(self._checks.values())

    def warming(self) -> list[str]:
        """What ``serve`` is still warming up (its /readyz ``warming``, e.g. prompts)."""
        return list(self._warming)

    def calls_on_disk(self) -> int | None:
        """How many call records wait on disk by ``serve``'s count (its ``GET /v1/calls``
        says the same), as of its last state; None when it counts none."""
        return self._calls_on_disk

    async def render_metrics(self) -> str:
        """The whole service's /metrics, summed by ``serve`` (with this worker's latest)."""
        n = next(self._numbers)
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._renders[n] = fut
        try:
            self._send({"op": "render", "n": n})  # serve asks every worker for its numbers
            return await asyncio.wait_for(fut, RENDER_DEADLINE_S)
        except TimeoutError:
            raise MainLinkError("serve did not answer the metrics request") from None
        finally:
            self._renders.pop(n, None)

    # -- internals -------------------------------------------------------------------------------
    def _send(self, message: dict[str, Any]) -> None:
        if self._writer is None or self.lost.is_set() or self._writer.is_closing():
            raise MainLinkError("no control connection to serve")
        self._writer.write(encode(message))

    def _handle(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "state":
            self._channels = {Channel(c): bool(ok) for c, ok in msg["channels"].items()}
            self._checks = {str(k): bool(v) for k, v in msg["checks"].items()}
            self._warming = [str(w) for w in msg.get("warming", [])]
            on_disk = msg.get("calls_on_disk")
            self._calls_on_disk = None if on_disk is None else int(on_disk)
            self._state_at = time.monotonic()
        elif op == "snapshot":
            snapshot = self._metrics.snapshot()
            with contextlib.suppress(MainLinkError):  # serve gone: _read ends, the worker stops
                self._send({"op": "metrics", "snapshot": snapshot, "n": msg["n"]})
        elif op == "rendered":
            fut = self._renders.get(int(msg["n"]))
            if fut is not None and not fut.done():
                fut.set_result(str(msg["text"]))
        else:
            raise ValueError(f"unknown control message {op!r}")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        defect = False
        try:
            while line := await reader.readline():
                self._handle(orjson.loads(line))
        except (ConnectionError, ValueError, KeyError, orjson.JSONDecodeError) as exc:
            log.error("control connection to serve failed: %s", exc)
        except Exception:
            defect = True  # not serve's doing: the watch logs it (see start)
            raise
        finally:
            if not self.lost.is_set() and not self._stopping and not defect:
                log.warning("serve closed the control connection: this HTTP worker stops")
            self.lost.set()
            for fut in self._renders.values():
                if not fut.done():
                    fut.set_exception(MainLinkError("serve went away"))

    async def _push_metrics(self) -> None:
        while True:
            await asyncio.sleep(METRICS_EVERY_S)
            try:
                self._send({"op": "metrics", "snapshot": self._metrics.snapshot()})
            except MainLinkError:
                return
