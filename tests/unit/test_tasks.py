"""Stopping a background task keeps the stopper's own cancellation; a task that dies of a
defect is logged and told at once (sip_config/tasks.py)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from sip_config.tasks import cancel_and_wait, wait_ended, watch

log = logging.getLogger("test.tasks")


async def test_a_stop_cancelled_while_it_waits_for_the_task_is_cancelled() -> None:
    """serve's shutdown (or a session's stop) cancelled while it waits for a task it
    cancelled: ``suppress(CancelledError): await task`` swallowed that cancellation, and the
    stop went on as if nothing had asked it to end."""
    cleaned = asyncio.Event()

    async def slow_to_end() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await cleaned.wait()  # its clean-up takes a while

    task = asyncio.create_task(slow_to_end())
    await asyncio.sleep(0)
    went_on: list[str] = []

    async def stop() -> None:
        await cancel_and_wait(task)
        went_on.append("after the wait")

    stopper = asyncio.create_task(stop())
    await asyncio.sleep(0)  # the stop waits for the task now
    stopper.cancel()
    await asyncio.wait({stopper}, timeout=1)
    assert stopper.done(), "the stop did not end"
    assert stopper.cancelled(), "the stop's own cancellation was swallowed"
    assert went_on == []
    cleaned.set()
    await asyncio.wait({task}, timeout=5)
    assert task.cancelled()


async def test_the_task_s_own_end_is_returned_not_raised() -> None:
    async def fails() -> None:
        raise KeyError("defect")

    failing = asyncio.create_task(fails())
    await asyncio.sleep(0)
    assert isinstance(await cancel_and_wait(failing), KeyError)
    sleeping = asyncio.create_task(asyncio.sleep(3600))
    assert await cancel_and_wait(sleeping) is None
    done = asyncio.create_task(asyncio.sleep(0))
    assert await wait_ended(done) is None


async def test_a_task_that_dies_of_a_defect_is_logged_and_told_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="test.tasks")
    told: list[str] = []

    async def loop() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("a defect")

    task = asyncio.create_task(loop())
    watch(task, log, "the test loop", told.append)
    await asyncio.wait({task})
    await asyncio.sleep(0)  # done callbacks run soon after
    assert told == ["the test loop"]
    [record] = caplog.records
    assert record.levelno == logging.CRITICAL
    assert record.getMessage() == "the test loop failed: it no longer runs"
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)


async def test_a_task_cancelled_or_returned_is_not_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="test.tasks")
    told: list[str] = []
    cancelled = asyncio.create_task(asyncio.sleep(3600))
    returned = asyncio.create_task(asyncio.sleep(0))
    watch(cancelled, log, "cancelled", told.append)
    watch(returned, log, "returned", told.append)
    cancelled.cancel()
    await asyncio.wait({cancelled, returned})
    await asyncio.sleep(0)
    assert told == []
    assert caplog.records == []
