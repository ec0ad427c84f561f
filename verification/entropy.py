"""Random bytes from the kernel's CSPRNG, read 4 KiB at a time.

The bytes are the same kernel CSPRNG output as :mod:`secrets` draws, only fetched in blocks
(one ``getrandom()`` per 4 KiB, not one per id or code) and handed out once each. The blocks
save next to no CPU: the "about 5 % of a create" this module was written for (ed3618a) is not
reproduced. ``timeit``, best of 7 alternating runs of 200,000, three times (Linux 6.18,
CPython 3.11, 2026-12-08, under another load): ``os.urandom(16)`` 0.36-0.37 µs against
``token_bytes(16)`` 0.34-0.36 µs; a create's id and code (``token_urlsafe(24)`` and
``below(10**6)``) 1.69-2.05 µs through :mod:`secrets` against 1.49-1.87 µs here. That is 0.2
µs of the 250-330 µs of CPU a create takes (BENCHMARKS.md), under 0.1 % and well inside the
bench's noise; an earlier run on this machine had the buffer slower (1.24 µs against 1.46 µs
for 16 bytes, BENCHMARKS.md). The block is dropped in a forked child
(``os.register_at_fork``), so a parent and child never hand out the same bytes, and a lock
keeps two threads from taking the same slice.
"""

from __future__ import annotations

import base64
import os
import threading

BLOCK = 4096


class _Blocks:
    """The current block and how much of it is handed out."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.block = b""
        self.pos = 0

    def forget(self) -> None:
        self.block, self.pos = b"", 0

    def take(self, n: int) -> bytes:
        with self.lock:
            if self.pos + n > len(self.block):
                self.block, self.pos = os.urandom(BLOCK), 0
            out = self.block[self.pos : self.pos + n]
            self.pos += n
        return out


_blocks = _Blocks()
os.register_at_fork(after_in_child=_blocks.forget)


def token_bytes(n: int) -> bytes:
    """``n`` random bytes, never handed out before."""
    return _blocks.take(n) if n <= BLOCK else os.urandom(n)


def token_urlsafe(n: int) -> str:
    """``n`` random bytes as unpadded URL-safe base64 (as :func:`secrets.token_urlsafe`)."""
    return base64.urlsafe_b64encode(token_bytes(n)).rstrip(b"=").decode("ascii")


def below(limit: int) -> int:
    """A uniform random integer in ``[0, limit)``, for ``1 <= limit <= 2**32``.

    Rejection sampling on 32-bit draws: values past the last whole multiple of ``limit`` are
    drawn again, so no residue is more likely than another.
    """
    if not 1 <= limit <= 1 << 32:
        raise ValueError("limit must be 1..2**32")
    ceiling = (1 << 32) - (1 << 32) % limit
    while True:
        value = int.from_bytes(token_bytes(4), "big")
        if value < ceiling:
            return value % limit
