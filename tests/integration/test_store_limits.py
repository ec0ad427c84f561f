"""Limits counted with a write, against a real Redis: a move that sends counts its send in the
same atomic step as the write, and only if it writes. A client's ``/fallback`` that lost the
race to the step timer moves nothing and so counts nothing against the number's sends.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import pytest

from sip_config.settings import Rate
from tests.conftest import RedisServer
from tests.integration.conftest import MOBILE
from verification import rules
from verification.errors import NotOnChannel, RateLimited
from verification.limits import LimitCheck, LimitName
from verification.model import Channel, EventKind, Policy, Verification
from verification.numbers import parse_phone
from verification.redis_mux import RedisMux
from verification.store import Stored, VerificationStore

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]

POLICY = Policy()
PHONE = parse_phone(MOBILE)
ONE_SEND = LimitCheck(LimitName.NUMBER_SENDS, PHONE.e164, Rate(1, 600))


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[VerificationStore]:
    mux = RedisMux(redis_server.url)
    try:
        yield VerificationStore(mux, limit_key=b"k" * 32)
    finally:
        await mux.aclose()


async def _made(store: VerificationStore, vid: str) -> Stored:
    made = rules.create(
        verification_id=vid,
        phone=PHONE,
        plan=(Channel.SMS, Channel.VOICE),
        code_length=6,
        now=time.time(),
        policy=POLICY,
    )
    return await store.create(made)


def _client_fallback(seen: int | None) -> Callable[[Verification], tuple[rules.Transition, None]]:
    """A client's /fallback that read the record at step ``seen``."""
    return lambda v: (rules.request_fallback(v, time.time(), POLICY, seen), None)


async def _counted_fallback(
    store: VerificationStore, seen: Stored
) -> tuple[rules.Transition, None, Stored]:
    """A client's /fallback that read ``seen``, counting the number's one send with its move."""
    return await store.update_stored(
        seen.verification.id,
        _client_fallback(seen.verification.step),
        known=seen,
        checks=[ONE_SEND],
        now=time.time(),
    )


async def test_a_fallback_that_lost_the_race_counts_no_send(store: VerificationStore) -> None:
    stale = await _made(store, "a" * 32)
    # Another writer (the step timer, or another request) moves first...
    await store.update(stale.verification.id, _client_fallback(None))
    # ...then the client's request, which read the record before that move, writes.
    transition, _, written = await _counted_fallback(store, stale)
    assert written.verification.step == 1, "one move, not two"
    assert transition.verification == written.verification, "the request changed nothing"
    decision = await store.hit_limits([ONE_SEND], time.time())
    assert decision.allowed, "the lost request must not have counted the number's one send"


async def test_a_fallback_that_lost_the_race_at_the_limit_is_not_refused(
    store: VerificationStore,
) -> None:
    # The step timer's move used the number's last send: the client's request, which asked
    # for that very move, is answered with the verification as it is, not 429.
    stale = await _made(store, "d" * 32)
    await store.update(stale.verification.id, _client_fallback(None))
    assert (await store.hit_limits([ONE_SEND], time.time())).allowed  # the timer's send
    _, _, written = await _counted_fallback(store, stale)
    assert written.verification.step == 1


async def test_a_fallback_from_a_channel_left_since_its_read_is_refused_at_the_write(
    store: VerificationStore,
) -> None:
    # The request's read found SMS (its ``from``), and passed on it; another writer moved the
    # verification before the request's write. The write is made against the record as read
    # (compare-and-set): it fails, and the change, applied again to the record as it is now,
    # refuses. A check on the read alone moved it twice.
    stale = await _made(store, "f" * 32)
    vid = stale.verification.id
    await store.update(vid, _client_fallback(None))
    with pytest.raises(NotOnChannel) as err:
        await store.update_stored(
            vid,
            lambda v: (
                rules.request_fallback(v, time.time(), POLICY, 0, moving_from=Channel.SMS),
                None,
            ),
            known=stale,
            checks=[ONE_SEND],
            now=time.time(),
        )
    assert err.value.extra == {"channel": "voice"}
    assert (await store.get(vid)).verification.step == 1, "one move, not two"
    assert (await store.hit_limits([ONE_SEND], time.time())).allowed, "nothing counted"


async def test_a_fallback_that_moves_counts_its_send_once(store: VerificationStore) -> None:
    stored = await _made(store, "b" * 32)
    _, _, written = await _counted_fallback(store, stored)
    assert written.verification.step == 1
    assert not (await store.hit_limits([ONE_SEND], time.time())).allowed


async def test_a_fallback_that_sends_nothing_counts_no_send(store: VerificationStore) -> None:
    # A review found a /fallback refused by the verification's own send limit (it moves, and
    # records send_refused) counting a send against the number all the same: an app asking
    # again and again could use up the patient's sends for the next verifications.
    stored = await _made(store, "e" * 32)
    one_send = Policy(max_sends=1)  # the first send (its step) has used it
    sent = rules.code_sent(stored.verification, 0, "hash", time.time()).verification
    _, _, stored = await store.update_stored(sent.id, lambda _v: (rules.Transition(sent), None))
    transition, _, written = await store.update_stored(
        sent.id,
        lambda v: (rules.request_fallback(v, time.time(), one_send, 0), None),
        known=stored,
        checks=[ONE_SEND],
        now=time.time(),
    )
    # It moves past the plan (no step may send again: channel null), and records why.
    assert transition.send is None and written.verification.channel is None
    assert [e.kind for e in written.verification.events[-2:]] == [
        EventKind.SEND_REFUSED,
        EventKind.FALLBACK,
    ]
    assert (await store.hit_limits([ONE_SEND], time.time())).allowed, "nothing was sent"


async def test_a_fallback_over_the_limit_moves_nothing(store: VerificationStore) -> None:
    assert (await store.hit_limits([ONE_SEND], time.time())).allowed  # the one send, used
    stored = await _made(store, "c" * 32)
    with pytest.raises(RateLimited):
        await _counted_fallback(store, stored)
    assert (await store.get(stored.verification.id)).verification.step == 0


async def test_a_gate_refuses_at_its_counters_limit_and_never_counts(
    store: VerificationStore,
) -> None:
    # An address's wrong API keys: counted by the wrong keys, compared by every request.
    t0 = 1_800_000_000.0  # a multiple of the window: 60 s left in it
    wrong = LimitCheck(LimitName.AUTH_FAILURES, "203.0.113.9", Rate(2, 60))
    gate = LimitCheck(LimitName.AUTH_FAILURES, "203.0.113.9", Rate(2, 60), counted=False)
    requests = LimitCheck(LimitName.KEY_REQUESTS, "key-1", Rate(100, 60))
    for _ in range(5):
        assert (await store.hit_limits([requests, gate], t0)).allowed, "a gate counts nothing"
    # First counted 15 s into its window: the counter lives the 45 s left (Redis's time).
    assert (await store.hit_limits([wrong], t0 + 15)).allowed
    assert (await store.hit_limits([requests, gate], t0 + 15)).allowed, "1 of 2 used"
    assert (await store.hit_limits([wrong], t0 + 15)).allowed
    refused = await store.hit_limits([requests, gate], t0 + 15)
    assert not refused.allowed and refused.blocked_by == gate
    assert refused.retry_after_s == 45, "until the counter's window ends"
    assert not (await store.hit_limits([wrong], t0 + 15)).allowed
    # All or nothing: the refused requests counted no request of the key.
    seventh = [LimitCheck(LimitName.KEY_REQUESTS, "key-1", Rate(7, 60))]
    assert (await store.hit_limits(seventh, t0)).allowed, "6 requests were counted, not 7"
    assert not (await store.hit_limits(seventh, t0)).allowed, "the 7th is counted"
    assert (await store.hit_limits([requests, gate], t0 + 60)).allowed, "the next window"
