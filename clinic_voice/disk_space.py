"""The data dir's free space, shown in /metrics as ``clinic_data_dir_free_bytes``.

A full data dir stops calls being saved: the embedded Redis exits at the first write it cannot
append, and the call records wait on the same disk (README, "A full or read-only disk"). serve
reads the space every :data:`EVERY_S` seconds in a thread, never at a scrape: ``statvfs`` takes
microseconds on a local disk, but blocks for as long as a network file system that stopped
answering, and a scrape must not wait for that (nor start a thread that hangs per scrape:
one read is under way at a time, and the gauge keeps its last value meanwhile).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from clinic_voice.metrics import Gauge

log = logging.getLogger(__name__)

# Prometheus scrapes every 15 s to 1 min: each scrape sees a value at most this old.
EVERY_S = 5.0


def free_bytes(path: Path) -> int:
    """Bytes free on ``path``'s file system for a user that is not root (``df``'s Avail):
    serve's, and its Redis's. Blocks: call it in a thread."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


async def show_free_space(gauge: Gauge, path: Path, every_s: float = EVERY_S) -> None:
    """Set ``gauge`` to :func:`free_bytes` of ``path`` now and every ``every_s`` seconds,
    until cancelled. A read that fails (the data dir gone, an I/O error) leaves the gauge with
    no sample, rather than an old value read as the disk's state, and logs a WARNING (once,
    until a read succeeds again)."""
    failing = False
    while True:
        try:
            free = await asyncio.to_thread(free_bytes, path)
        except OSError as exc:
            gauge.clear()
            if not failing:
                log.warning("cannot read the free space of the data dir %s: %s", path, exc)
            failing = True
        else:
            gauge.set(free)
            if failing:
                log.info("the free space of the data dir %s reads again", path)
            failing = False
        await asyncio.sleep(every_s)
