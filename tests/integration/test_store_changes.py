"""``on_change`` of the store in a real Redis (it feeds ``clinic_verifications_total``): each
change of a verification is counted once, by the process that made it, also when the answer
to its write was lost (a timeout, a dropped connection) though the write landed, and when two
processes race to make it.

Losing an answer is done at the Redis edge: the script runs in Redis, then its caller gets
the error a stalled Redis gives after the store's timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.conftest import RedisServer
from tests.integration.conftest import MOBILE
from verification import rules
from verification.errors import StoreUnavailable
from verification.model import Channel, Policy, Status, Verification
from verification.numbers import parse_phone
from verification.redis_mux import RedisMux, Script
from verification.rules import Transition
from verification.store import VerificationStore

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]

POLICY = Policy()
VID = "d" * 32
Change = tuple[Verification | None, Verification]


@pytest.fixture
async def mux(redis_server: RedisServer) -> AsyncIterator[RedisMux]:
    mux = RedisMux(redis_server.url)
    try:
        yield mux
    finally:
        await mux.aclose()


def _store(mux: RedisMux, changes: list[Change]) -> VerificationStore:
    return VerificationStore(
        mux, limit_key=b"k" * 32, on_change=lambda old, new: changes.append((old, new))
    )


def _lose(mux: RedisMux, monkeypatch: pytest.MonkeyPatch, *, landed: bool) -> list[bool]:
    """The next script's answer is lost: after it ran (``landed``) or before. Returns a list
    that holds True once it was."""
    real = mux.evalsha
    lost: list[bool] = []

    async def evalsha(script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        if lost:
            return await real(script, keys, args)
        lost.append(True)
        if not landed:
            raise RedisConnectionError("the connection dropped before the write (test)")
        await real(script, keys, args)
        raise RedisTimeoutError("Redis did not answer within 2.0 s (test)")

    monkeypatch.setattr(mux, "evalsha", evalsha)
    return lost


def _made() -> Transition:
    return rules.create(
        verification_id=VID,
        phone=parse_phone(MOBILE),
        plan=(Channel.SMS,),
        code_length=6,
        now=time.time(),
        policy=POLICY,
    )


def _expire(v: Verification) -> tuple[Transition, None]:
    """The step timer, run past the verification's expiry."""
    return rules.tick(v, v.expires_at + 1, POLICY), None


def _statuses(changes: list[Change]) -> list[tuple[Status | None, Status]]:
    return [(old.status if old else None, new.status) for old, new in changes]


@pytest.mark.parametrize("landed", [True, False], ids=["landed", "lost"])
async def test_a_change_whose_answer_was_lost_is_counted_once(
    mux: RedisMux, monkeypatch: pytest.MonkeyPatch, landed: bool
) -> None:
    changes: list[Change] = []
    store = _store(mux, changes)
    made = await store.create(_made())
    lost = _lose(mux, monkeypatch, landed=landed)
    with pytest.raises(StoreUnavailable):
        await store.update(VID, _expire, known=made)
    assert lost
    # The timer tries again once Redis answers: landed, it finds the verification expired
    # and changes nothing; not landed, it expires it now.
    await store.update(VID, _expire, known=made)
    await store.get(VID)  # a later read counts nothing more
    assert _statuses(changes) == [(None, Status.PENDING), (Status.PENDING, Status.EXPIRED)]
    assert (await store.get(VID)).verification.status is Status.EXPIRED


async def test_a_create_whose_answer_was_lost_is_counted_when_read(
    mux: RedisMux, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As the dispatcher's settling of a create answered 503 reads it back.
    changes: list[Change] = []
    store = _store(mux, changes)
    made = _made()
    _lose(mux, monkeypatch, landed=True)
    with pytest.raises(StoreUnavailable):
        await store.create(made)
    assert changes == []
    await store.get(VID)
    await store.get(VID)
    assert changes == [(None, made.verification)]


async def test_a_change_two_processes_race_to_make_is_counted_once(mux: RedisMux) -> None:
    changes: list[Change] = []
    first, second = _store(mux, changes), _store(mux, changes)
    made = await first.create(_made())
    changes.clear()
    await asyncio.gather(
        *(s.update(VID, _expire, known=made) for s in (first, second, first, second))
    )
    assert _statuses(changes) == [(Status.PENDING, Status.EXPIRED)]
