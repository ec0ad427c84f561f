"""The service's background tasks: stopping one without losing the caller's own cancellation,
and noticing one that dies of a defect.

Shared by every package (asyncio is the standard library's; nothing here does I/O).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any


async def cancel_and_wait(task: asyncio.Future[Any]) -> BaseException | None:
    """Cancel ``task`` and wait until it has ended; returns the exception it ended with
    (None when it returned or ended cancelled), for the caller to judge.

    A cancellation of the caller itself while it waits is raised, as any await raises it.
    ``task.cancel(); with suppress(CancelledError): await task`` lost that one: the
    caller's ``CancelledError`` is indistinguishable from the task's, and was swallowed, so a
    stop that was itself being cancelled (serve's shutdown, a session's stop) went on.
    """
    task.cancel()
    return await wait_ended(task)


async def wait_ended(task: asyncio.Future[Any]) -> BaseException | None:
    """Wait until ``task`` has ended, however it ends: the exception it ended with (None when
    it returned or ended cancelled). A cancellation of the caller while it waits is raised,
    and ``task`` is left running (see :func:`cancel_and_wait`)."""
    await asyncio.wait({task})  # raises the caller's cancellation; never the task's
    return None if task.cancelled() else task.exception()


def watch(
    task: asyncio.Task[Any],
    log: logging.Logger,
    what: str,
    on_failure: Callable[[str], None] | None = None,
) -> None:
    """Log ``task``'s death by an exception at once, with its traceback, and tell
    ``on_failure`` (``what`` failed): a task meant to run until it is stopped that dies of a
    defect would otherwise go unnoticed (asyncio says "exception was never retrieved" only
    when the task is collected, if ever). Cancelled or returned: nothing is said."""

    def ended(done: asyncio.Task[Any]) -> None:
        if done.cancelled():
            return
        exc = done.exception()  # retrieved: asyncio says nothing more of it
        if exc is None:
            return
        log.critical("%s failed: it no longer runs", what, exc_info=exc)
        if on_failure is not None:
            on_failure(what)

    task.add_done_callback(ended)
