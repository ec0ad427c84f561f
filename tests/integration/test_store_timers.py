"""Step timers in a real Redis: a lease that found a record not due puts its timer back, but
never over the timer a newer write of the record has set since; and a timer that moves a
verification past its plan with no code out ends it, with its event and webhook.

The race it guards against: a process leases a verification's timer, reads the record and finds
it not due yet (its clock ran ahead of the writer's), and meanwhile a client's ``/fallback``
moves the record to a channel with a shorter step, setting the timer to that step's end. Were
the lease's time written back regardless, the new step's timeout would fire at the old one's.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sip_config.clock import FakeClock
from sip_config.settings import Settings
from tests.conftest import RedisServer
from tests.integration.conftest import MOBILE
from verification import rules
from verification.dispatcher import Dispatcher
from verification.model import Channel, EventKind, Policy, Status, Verification
from verification.numbers import parse_phone
from verification.redis_mux import RedisMux
from verification.store import (
    DUE,
    KEEP_AFTER_EXPIRY_S,
    PREFIX,
    WEBHOOK_JOBS,
    Stored,
    VerificationStore,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]

POLICY = Policy()
VID = "c" * 32


@pytest.fixture
async def mux(redis_server: RedisServer) -> AsyncIterator[RedisMux]:
    mux = RedisMux(redis_server.url)
    try:
        yield mux
    finally:
        await mux.aclose()


@pytest.fixture
def store(mux: RedisMux) -> VerificationStore:
    return VerificationStore(mux, limit_key=b"k" * 32)


async def _made(store: VerificationStore) -> Stored:
    """A verification sending an SMS (120 s step), then a flash call (33 s step)."""
    made = rules.create(
        verification_id=VID,
        phone=parse_phone(MOBILE),
        plan=(Channel.SMS, Channel.FLASHCALL),
        code_length=6,
        now=time.time(),
        policy=POLICY,
    )
    return await store.create(made)


async def _due(mux: RedisMux) -> float | None:
    score = await mux.execute("ZSCORE", DUE, VID)
    return None if score is None else float(score)


async def _lease(store: VerificationStore) -> None:
    """Lease the timer as a process whose clock runs past the step's end would."""
    assert await store.lease_due(time.time() + 3600, 30) == [VID]


async def test_a_lease_puts_back_the_timer_of_a_record_nobody_wrote(
    store: VerificationStore, mux: RedisMux
) -> None:
    read = await _made(store)
    await _lease(store)
    await store.reschedule(read)
    assert await _due(mux) == rules.due_at(read.verification)


async def test_a_lease_does_not_put_back_a_time_a_newer_write_replaced(
    store: VerificationStore, mux: RedisMux
) -> None:
    read = await _made(store)
    await _lease(store)
    # A client's /fallback lands between the lease's read and its reschedule.
    moved, _ = await store.update(
        VID, lambda v: (rules.request_fallback(v, time.time(), POLICY, None), None)
    )
    new_due = rules.due_at(moved.verification)
    old_due = rules.due_at(read.verification)
    assert new_due is not None and old_due is not None and new_due < old_due - 60
    await store.reschedule(read)
    assert await _due(mux) == new_due, "the flash call's 33 s step must end when it ends"


async def test_a_lease_drops_the_timer_of_a_record_gone_meanwhile(
    store: VerificationStore, mux: RedisMux
) -> None:
    read = await _made(store)
    await _lease(store)
    await mux.execute("DEL", f"cv:v:{VID}")  # expired from Redis meanwhile
    await store.reschedule(read)
    assert await _due(mux) is None


async def test_a_timer_past_the_plan_with_no_code_out_fails_it(
    mux: RedisMux, tmp_path: Path
) -> None:
    """An SMS whose send never left (its process stopped first), then a flash call the
    landline cannot take: the step timer moved it past the plan and left it pending, its
    timer set to the expiry, though no code could ever be typed in."""
    clock = FakeClock(time.time())
    store = VerificationStore(mux, global_webhook=True, limit_key=b"k" * 32)
    made = rules.create(
        verification_id=VID,
        phone=parse_phone("+31101234567"),  # a fixed line in Rotterdam
        plan=(Channel.SMS, Channel.FLASHCALL),
        code_length=6,
        now=clock.now(),
        policy=POLICY,
    )
    await store.create(made)  # its send is never started: the process stopped here
    dispatcher = Dispatcher(
        store=store,
        channels={},
        settings=Settings.from_env({"CLINIC_DATA_DIR": str(tmp_path)}).verification,
        policy=POLICY,
        secret=b"s" * 32,
        clinic_name="the clinic",
        clock=clock,
    )
    try:
        clock.advance(POLICY.step_timeout_s[Channel.SMS])
        assert await dispatcher.run_due() == 1
    finally:
        await dispatcher.stop()
    v = (await store.get(VID)).verification
    assert (v.status, v.channel, v.sends) == (Status.FAILED, None, 0)
    assert v.events[-1].kind is EventKind.FAILED
    assert await _due(mux) is None, "a final verification has no timer"
    jobs = [json.loads(p) for p in (await mux.execute("HGETALL", WEBHOOK_JOBS)).values()]
    failed = [j for j in jobs if j["event"]["kind"] == "failed"]
    assert [(j["status"], j["channel"], j["event"]["detail"]) for j in failed] == [
        ("failed", None, "no channel could deliver")
    ]


async def test_a_record_keeps_the_expiry_its_create_set_without_setting_it_again(
    store: VerificationStore, mux: RedisMux
) -> None:
    """A verification's lifetime never changes after its create, and Redis's HSET keeps a
    key's expiry: the writes after the create (reports, checks) leave it as it is instead of
    costing Redis a PEXPIREAT and the AOF a record each, and the record still goes a day after
    the verification expires."""
    made = await _made(store)
    record = f"{PREFIX}v:{VID}"
    ends_ms = int((made.verification.expires_at + KEEP_AFTER_EXPIRY_S) * 1000)
    assert int(await mux.execute("PEXPIRETIME", record)) == ends_ms
    await mux.execute("CONFIG", "RESETSTAT")

    def delivered(v: Verification) -> tuple[rules.Transition, None]:
        kind = rules.DeliveryKind.DELIVERED
        return rules.delivery(v, 0, kind, "", now=time.time(), policy=POLICY), None

    transition, _ = await store.update(VID, delivered, known=made)
    assert transition.verification != made.verification  # a write was made
    stats = await mux.execute("INFO", "commandstats")
    text = stats.decode() if isinstance(stats, bytes) else str(stats)
    assert "cmdstat_pexpireat:" not in text, text
    assert int(await mux.execute("PEXPIRETIME", record)) == ends_ms
