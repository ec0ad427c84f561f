"""The data dir's free space, shown in /metrics as ``clinic_data_dir_free_bytes``.

A full data dir stops calls being saved: the embedded Redis exits at the first write it cannot
append, and the call records wait on the same disk (README, "A full or read-only disk"). serve
reads the space every :data:`EVERY_S` seconds in a thread, never at a scrape: ``statvfs`` takes
microseconds on a local disk, but blocks for as long as a network file system that stopped
answering, and a scrape must not wait for that (nor start a thread that hangs per scrape:
one read is under way at a time). A read that has not answered within :data:`READ_LIMIT_S`
leaves the gauge with no sample, as one that failed: the last value would read as the disk's
state. The thread is a daemon of its own, not the loop's executor: asyncio.run and the
interpreter wait for the executor's threads at exit, and a ``statvfs`` that never returns
would hold serve's exit until systemd's SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from clinic_voice.metrics import Gauge

log = logging.getLogger(__name__)

# Prometheus scrapes every 15 s to 1 min: each scrape sees a value at most this old.
EVERY_S = 5.0
# A local disk answers in microseconds: one this slow is not answering (a network file system).
READ_LIMIT_S = 5.0


def available(st: os.statvfs_result) -> int:
    """Bytes a write by a user that is not root can still take (``df``'s Avail: under root,
    serve and its Redis may write the blocks kept for root too, so this warns earlier than
    their writes fail, never later); 0 on a file system mounted read-only (ext4 remounts so
    after an I/O error with ``errors=remount-ro``): every write fails there, as on a full one."""
    if st.f_flag & os.ST_RDONLY:
        return 0
    return st.f_bavail * st.f_frsize


def free_bytes(path: Path) -> int:
    """:func:`available` of ``path``'s file system. Blocks: call it in a thread."""
    return available(os.statvfs(path))


def size_bytes(path: Path) -> int:
    """The whole size of ``path``'s file system (``df``'s Size). Blocks: call it in a
    thread."""
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def _read_in_own_thread(
    path: Path, read: Callable[[Path], int] | None = None
) -> asyncio.Future[int]:
    """``read`` (:func:`free_bytes` when None) of ``path`` in a daemon thread of its own (see
    the module's docstring), its result or exception handed to the loop."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()

    def settle(free: int | None, exc: Exception | None) -> None:
        if done.done():  # cancelled meanwhile
            return
        if exc is not None:
            done.set_exception(exc)
        else:
            assert free is not None
            done.set_result(free)

    def run() -> None:
        free, failure = None, None
        try:
            free = (free_bytes if read is None else read)(path)
        except Exception as exc:  # handed to the loop: raised by the await
            failure = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(settle, free, failure)

    threading.Thread(target=run, name="data-dir-free-space", daemon=True).start()
    return done


async def read_size_bytes(path: Path, limit_s: float = READ_LIMIT_S) -> int | None:
    """:func:`size_bytes` of ``path``, read in a daemon thread of its own; None when the read
    fails or has not answered within ``limit_s`` (read once, at start)."""
    reading = _read_in_own_thread(path, size_bytes)
    reading.add_done_callback(_retrieved)
    done, _ = await asyncio.wait({reading}, timeout=limit_s)
    if not done or reading.cancelled() or reading.exception() is not None:
        return None
    return reading.result()


def _retrieved(reading: asyncio.Future[int]) -> None:
    """Mark a read's failure seen: a read nobody waited for to the end is no error to log."""
    if not reading.cancelled():
        reading.exception()


class FreeSpaceProbe:
    """:func:`free_bytes` of ``path`` for callers at any rate, with at most one read
    outstanding: a caller that finds one under way waits for its answer rather than start
    another. On a file system that stopped answering, a read per caller left a thread behind
    per caller (each ``statvfs`` blocked for good), as many as calls came in.

    :meth:`read` answers None when the read fails, or has not answered within ``limit_s`` of
    this caller's wait (:data:`READ_LIMIT_S` when None, read at each wait); the read goes on
    meanwhile, and the next caller after it answered starts a fresh one.
    """

    def __init__(self, path: Path, limit_s: float | None = None) -> None:
        self._path = path
        self._limit_s = limit_s
        self._reading: asyncio.Future[int] | None = None

    async def read(self) -> int | None:
        reading = self._reading
        if reading is None or reading.done():
            reading = _read_in_own_thread(self._path)
            reading.add_done_callback(_retrieved)
            self._reading = reading
        limit = READ_LIMIT_S if self._limit_s is None else self._limit_s
        # Never cancelled here: other callers may be waiting for the same read.
        done, _ = await asyncio.wait({reading}, timeout=limit)
        if not done or reading.cancelled():
            return None
        try:
            return reading.result()
        except OSError:
            return None


async def show_free_space(
    gauge: Gauge, path: Path, every_s: float = EVERY_S, limit_s: float | None = None
) -> None:
    """Set ``gauge`` to :func:`free_bytes` of ``path`` now and every ``every_s`` seconds,
    until cancelled. A read that fails (the data dir gone, an I/O error) or has not answered
    within ``limit_s`` (:data:`READ_LIMIT_S`) leaves the gauge with no sample, rather than an
    old value read as the disk's state, and logs a WARNING (once, until a read succeeds
    again); a read that hangs is waited for, never a second one started beside it."""
    failing = False

    def failed(why: object) -> None:
        nonlocal failing
        gauge.clear()
        if not failing:
            log.warning("cannot read the free space of the data dir %s: %s", path, why)
        failing = True

    while True:
        reading = _read_in_own_thread(path)
        try:
            limit = READ_LIMIT_S if limit_s is None else limit_s
            done, _ = await asyncio.wait({reading}, timeout=limit)
            if not done:
                failed(f"no answer within {limit:g} s")
            free = await reading
        except OSError as exc:
            failed(exc)
        else:
            gauge.set(free)
            if failing:
                log.info("the free space of the data dir %s reads again", path)
            failing = False
        finally:
            reading.cancel()  # cancelled while waiting: the thread's answer is dropped
        await asyncio.sleep(every_s)
