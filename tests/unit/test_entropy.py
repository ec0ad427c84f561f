"""The buffered CSPRNG: bytes handed out once, a fresh block in a forked child, and
uniform bounded draws (no modulo bias)."""

from __future__ import annotations

import os
import threading
from collections import Counter

import pytest

from verification import entropy


def test_bytes_are_never_handed_out_twice() -> None:
    # 4-byte tokens across many blocks: a repeat would mean a block or a slice reused
    # (p of a true repeat among 20,000 32-bit draws is about 5 %: use 16-byte tokens).
    seen = {entropy.token_bytes(16) for _ in range(20_000)}
    assert len(seen) == 20_000


def test_token_sizes_and_urlsafe_form() -> None:
    assert len(entropy.token_bytes(0)) == 0
    assert len(entropy.token_bytes(entropy.BLOCK + 1)) == entropy.BLOCK + 1
    token = entropy.token_urlsafe(24)
    assert len(token) == 32 and token.replace("-", "").replace("_", "").isalnum()


def test_threads_never_share_a_slice() -> None:
    got: list[bytes] = []

    def draw() -> None:
        got.extend(entropy.token_bytes(16) for _ in range(2_000))

    threads = [threading.Thread(target=draw) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 8_000


def test_a_forked_child_does_not_repeat_its_parent() -> None:
    entropy.token_bytes(1)  # the parent holds a partly used block
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: send what it draws next
        os.write(write, entropy.token_bytes(32))
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64)
    os.close(read)
    assert child != entropy.token_bytes(32)


@pytest.mark.parametrize("limit", [0, -1, (1 << 32) + 1])
def test_below_refuses_bad_limits(limit: int) -> None:
    with pytest.raises(ValueError):
        entropy.below(limit)


def test_below_is_uniform_without_modulo_bias(monkeypatch: pytest.MonkeyPatch) -> None:
    # 3 does not divide 2**32: the top value 2**32 - 1 (whose residue would be 0 one time too
    # many) must be drawn again, not reduced.
    draws = iter([(1 << 32) - 1, 5])
    monkeypatch.setattr(entropy, "token_bytes", lambda n: next(draws).to_bytes(4, "big"))
    assert entropy.below(3) == 2


def test_below_spreads_over_its_range() -> None:
    counts = Counter(entropy.below(10) for _ in range(20_000))
    assert set(counts) == set(range(10))
    assert all(1_700 < n < 2_300 for n in counts.values()), counts
