"""``serve``'s end of the control socket (:mod:`clinic_voice.http_workers`) against a real unix
socket whose other end plays an HTTP worker: what a scrape counts of a worker that answers its
snapshot request in time, and of one that does not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import orjson
import pytest

from clinic_voice.http_workers import SNAPSHOT_DEADLINE_S, HttpWorkers, control_path, encode
from clinic_voice.metrics import Metrics
from verification.dispatcher import Dispatcher
from verification.model import Channel

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]

LATE = "clinic_http_worker_snapshots_late_total"


class _NoChannels:
    """What the state pushed to workers reads of the dispatcher: no channel of its own."""

    def local_channels(self) -> frozenset[Channel]:
        return frozenset()

    def channel_ready(self, channel: Channel) -> bool:
        return False


def _requests(n: int) -> dict[str, Any]:
    """A worker's snapshot: ``n`` requests answered."""
    worker = Metrics()
    worker.requests.inc(n, route="/healthz", method="GET", status="200")
    return worker.snapshot()


@pytest.fixture
async def workers(tmp_path: Path) -> AsyncIterator[HttpWorkers]:
    """serve's end with no worker processes of its own (count 1): the test connects as one."""
    hw = HttpWorkers(
        count=1,
        data_dir=tmp_path,
        env={},
        dispatcher=cast(Dispatcher, _NoChannels()),
        checks=dict,
        warming=list,
        metrics=Metrics(),
        misconfigure=lambda reason: None,
    )
    await hw.start()
    try:
        yield hw
    finally:
        await hw.stop()


class _Worker:
    """An HTTP worker connected as index 1 that answers 5 requests between two snapshot
    requests; it sends its numbers when asked while ``answering``, else never (stopped,
    swapping, its loop blocked)."""

    def __init__(self) -> None:
        self.answering = True
        self.answered = 3
        self.writer: asyncio.StreamWriter | None = None

    async def run(self, path: Path) -> None:
        reader, self.writer = await asyncio.open_unix_connection(str(path))
        self.writer.write(encode({"op": "hello", "index": 1}))
        while line := await reader.readline():
            msg = orjson.loads(line)
            if msg["op"] == "snapshot" and self.answering:
                snapshot = _requests(self.answered)
                self.writer.write(encode({"op": "metrics", "snapshot": snapshot, "n": msg["n"]}))
                self.answered += 5


def _value(text: str, sample: str) -> str:
    (line,) = (x for x in text.splitlines() if x.startswith(sample + " "))
    return line.rsplit(" ", 1)[1]


HEALTHZ = 'clinic_http_requests_total{method="GET",route="/healthz",status="200"}'


@pytest.mark.parametrize("answers", [True, False])
async def test_a_scrape_counts_a_late_worker_with_its_last_numbers_and_says_so(
    workers: HttpWorkers, tmp_path: Path, answers: bool
) -> None:
    assert _value(await workers.render_metrics(), LATE) == "0", "shown from the start"
    worker = _Worker()
    running = asyncio.create_task(worker.run(control_path(tmp_path)))
    try:
        loop = asyncio.get_running_loop()
        end = loop.time() + 5.0
        while HEALTHZ not in await workers.render_metrics():  # until serve reads its hello
            assert loop.time() < end, "serve did not ask the worker for its numbers"
            await asyncio.sleep(0.01)
        assert worker.answered == 8
        worker.answering = answers
        started = loop.time()
        text = await workers.render_metrics()
        if answers:
            assert _value(text, HEALTHZ) == "8", "the numbers it sent when asked"
            assert _value(text, LATE) == "0"
        else:
            assert loop.time() - started >= SNAPSHOT_DEADLINE_S, "it waited for the answer"
            assert _value(text, HEALTHZ) == "3", "the last numbers it sent, not the 8 it has"
            assert _value(text, LATE) == "1", "this scrape says it may lag"
    finally:
        assert worker.writer is not None
        worker.writer.close()
        await worker.writer.wait_closed()
        await running
