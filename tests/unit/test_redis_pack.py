"""The multiplexer's RESP packing is byte for byte what redis-py sends."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection

from verification.redis_mux import Arg, pack

COMMANDS: list[tuple[Arg, ...]] = [
    ("PING",),
    ("SET", "k", "v", "NX", "EX", 60),
    ("EVALSHA", "ab12", 2, "k1", "k2", 1.5, -3, 1700000000.123),
    ("HSET", "h", "doc", b'{"id":"x"}\x00\xff', "ver", "\u00e9\u4e2d"),
    ("SET", "empty", ""),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: str(c[0]))
def test_pack_matches_redis_py(command: tuple[Arg, ...]) -> None:
    assert pack(command) == b"".join(Connection().pack_command(*command))


@pytest.mark.parametrize("bad", [True, None, ["list"]])
def test_pack_refuses_what_redis_py_refuses(bad: object) -> None:
    with pytest.raises(TypeError):
        pack(("SET", "k", bad))  # type: ignore[arg-type]
