"""Flash-call verifications while SIP workers die and while more calls run than one worker holds.

The whole service runs as in :mod:`tests.integration.test_verify_sip_flash`; sipp is the
phone. Which worker placed a call is read from the wire (the INVITE's Via port is a worker's
port), so the tests need nothing of the pool but its public API. The route is over TCP: over
UDP ``serve`` places flash calls itself (:mod:`voice.sip.flash_uac`), over TCP the workers do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import Iterable
from pathlib import Path

import pytest

from tests.conftest import watch_loop_blocking
from tests.integration.test_sip_pool import Sipp, Wire, sipp_uas
from tests.integration.test_verify_sip_flash import (
    DEADLINE_S,
    Rig,
    SipService,
    create,
    event_types,
    make_rig,
    sip_service,
    wait_until_settled,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def rig(request: pytest.FixtureRequest) -> Rig:
    return make_rig(request)


def tcp_route(port: int) -> dict[str, str]:
    """A route over TCP, so the SIP workers place the flash calls (not ``serve``'s agent)."""
    return {"CLINIC_SIP_ROUTE": f"sip:{{e164}}@127.0.0.1:{port};transport=tcp"}


def mobile(i: int) -> str:
    """Distinct valid UK mobile numbers: the per-number limits (5 per 10 min) stay out of it."""
    return f"+4479111234{i:02d}"


def placed_by(invite: Wire, workers: Iterable[int]) -> int:
    """The pid of the worker (one of ``workers``) that placed the call: the owner of the TCP
    connection the INVITE came on (its Via names the connection's local port), found through
    /proc. Only the workers' fds are read (every process's, on a busy machine, took 14 ms a
    call). The kernel's walk for /proc/net/tcp still takes ~7 ms: where the loop is watched,
    call it in a thread (ten calls in one step held it 145 ms; the limit is 100)."""
    via = invite.msg.get("Via") or ""
    m = re.search(r"SIP/2\.0/TCP\s+[^:;\s]+:(\d+)", via, re.IGNORECASE)
    assert m, f"not a TCP Via: {via!r}"
    local = f"0100007F:{int(m.group(1)):04X}"
    with open("/proc/net/tcp") as f:
        inodes = {r[9] for r in (line.split() for line in f.readlines()[1:]) if r[1] == local}
    assert inodes, f"no TCP connection from port {m.group(1)}"
    for pid in workers:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return pid
    raise AssertionError(f"no worker owns the connection from port {m.group(1)}")


def invite_to(sipp: Sipp, phone: str) -> Wire:
    """The first INVITE sipp received for ``phone`` (retransmissions are the same request)."""
    found = [w for w in sipp.received("INVITE") if w.msg.uri.startswith(f"sip:{phone}@")]
    assert found, f"sipp received no INVITE for {phone}"
    return found[0]


async def wait_for_invite(sipp: Sipp, phone: str, deadline_s: float = DEADLINE_S) -> Wire:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while not any(w.msg.uri.startswith(f"sip:{phone}@") for w in sipp.received("INVITE")):
        if loop.time() > end:
            pytest.fail(f"sipp received no INVITE for {phone} within {deadline_s} s")
        await asyncio.sleep(0.05)
    return invite_to(sipp, phone)


async def wait_restarted(svc: SipService, dead_pid: int, deadline_s: float = DEADLINE_S) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    pool = svc.pool
    while not (
        pool.ready() and pool.stats()["restarts"] == 1 and dead_pid not in pool.worker_pids()
    ):
        if loop.time() > end:
            pytest.fail(f"the SIP worker was not restarted within {deadline_s} s: {pool.stats()}")
        await asyncio.sleep(0.05)


async def test_worker_killed_mid_flash_call_falls_back_and_is_restarted(
    rig: Rig, tmp_path: Path
) -> None:
    # 4 s of ringing leaves time to kill the worker while the phone rings.
    env = {"CLINIC_FLASHCALL_RING_S": "4", "CLINIC_SIP_WORKERS": "2"}
    async with (
        sipp_uas("sipp_verify_ring.xml", tmp_path, calls=6, tcp=True) as uas,
        sip_service(rig, uas.port, {**env, **tcp_route(uas.port)}) as svc,
    ):
        pool = svc.pool
        ports = [a.port for a in pool.worker_addresses()]
        pids = pool.worker_pids()
        assert len(ports) == len(pids) == 2, "two workers expected"

        victim_v = await create(svc.api, phone=mobile(1), method="flashcall", fallback=["sms"])
        await svc.api.wait_for_event(victim_v, "ringing")
        other_v = await create(svc.api, phone=mobile(2), method="flashcall", fallback=["sms"])
        await svc.api.wait_for_event(other_v, "ringing")
        dead_pid = placed_by(invite_to(uas, mobile(1)), pids)
        other_pid = placed_by(invite_to(uas, mobile(2)), pids)
        assert {dead_pid, other_pid} == set(pids), "the two calls share one worker"

        os.kill(dead_pid, signal.SIGKILL)

        # The call on the dead worker is lost: undeliverable, and SMS at once.
        v = await wait_until_settled(svc.api, victim_v, {"delivered", "failed"})
        assert event_types(v) == [
            "requested",
            "dispatched",
            "ringing",
            "undeliverable",
            "fallback",
            "dispatched",
            "delivered",
        ], v
        lost = next(e for e in v["events"] if e["type"] == "undeliverable")
        assert lost["channel"] == "flashcall" and lost["detail"].startswith("worker_lost"), lost
        assert v["channel"] == "sms"
        # The call on the other worker rings its 4 s and is cancelled as if nothing happened.
        o = await wait_until_settled(svc.api, other_v, {"delivered", "undeliverable"})
        assert event_types(o) == ["requested", "dispatched", "ringing", "delivered"], o
        assert uas.received("CANCEL"), "the surviving call was not cancelled after ringing"

        await wait_restarted(svc, dead_pid)
        new_pids = pool.worker_pids()
        # Two more calls at once: one per worker (the pool picks the emptiest), so the
        # restarted worker carries calls again.
        after = await asyncio.gather(
            *(create(svc.api, phone=mobile(i), method="flashcall", fallback=[]) for i in (3, 4))
        )
        for vid in after:
            a = await wait_until_settled(svc.api, vid, {"delivered", "undeliverable"})
            assert event_types(a) == ["requested", "dispatched", "ringing", "delivered"], a
        used = {placed_by(invite_to(uas, mobile(i)), new_pids) for i in (3, 4)}
        assert used == set(new_pids), f"calls after the restart used {used}, workers {new_pids}"
        assert pool.stats()["restarts"] == 1


async def test_ten_flash_calls_at_once_on_three_workers(rig: Rig, tmp_path: Path) -> None:
    # pjsua2 holds 4 calls per process (PJ_ETOOMANY on the 5th): 10 calls need 3 workers, and
    # none of the refusals inside the pool may reach a verification. Every slot is theirs
    # (the default keeps 3 of the 12 for callers: the 10th would wait for a call's end).
    count = 10
    env = {"CLINIC_SIP_WORKERS": "3", "CLINIC_SIP_CALLER_SLOTS": "0"}
    async with (
        sipp_uas("sipp_uas_ring.xml", tmp_path, calls=count, tcp=True) as uas,
        sip_service(rig, uas.port, {**env, **tcp_route(uas.port)}) as svc,
    ):
        # The service shares this loop: nothing it does for the calls may hold it > 100 ms
        # (watched from here on: the start-up's one-off work is not the calls' doing).
        with watch_loop_blocking(asyncio.get_running_loop()) as blocked:
            vids = await asyncio.gather(
                *(
                    create(svc.api, phone=mobile(i), method="flashcall", fallback=[])
                    for i in range(count)
                )
            )
            # Which worker placed each call, while it rings (its connection is up).
            pids = svc.pool.worker_pids()
            workers = {
                await asyncio.to_thread(placed_by, await wait_for_invite(uas, mobile(i)), pids)
                for i in range(count)
            }
            for vid in vids:
                v = await wait_until_settled(svc.api, vid, {"delivered", "undeliverable"})
                assert event_types(v) == ["requested", "dispatched", "ringing", "delivered"], v
                details = " ".join(e["detail"] for e in v["events"]).lower()
                assert "toomany" not in details and "capacity" not in details, v
        assert not blocked, "the event loop was blocked > 100 ms:\n  " + "\n  ".join(blocked)
        assert await uas.finish() == 0, "the sipp ring scenario did not complete every call"
        assert svc.pool.stats()["restarts"] == 0

    # The calls really overlapped: more were ringing at one moment than one worker holds.
    spans = []
    for i in range(count):
        invite = invite_to(uas, mobile(i))
        call_id = invite.msg.get("Call-ID")
        cancel = [w for w in uas.received("CANCEL") if w.msg.get("Call-ID") == call_id]
        assert cancel, f"call {i} was not cancelled"
        spans.append((invite.at, cancel[0].at))
    most = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert most > 4, f"at most {most} calls were up at once"
    assert len(workers) == 3, f"the calls used {len(workers)} of 3 workers"
