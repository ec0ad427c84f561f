"""Flash calls through the API against a sipp handset that rings until cancelled.

The service is the real thing: ``clinic-voice serve`` with its embedded Redis, the SIP pool
of ``CLINIC_SIP_WORKERS`` pjsua2 processes, its flash-call agent and
``CLINIC_FLASHCALL_RING_S=2``. Every flash call
goes to one sipp UAS (``bench/sipp/flash_uas_ring.xml``: 100, 180, then waits for CANCEL).

Method:

- an aiohttp client in this process offers ``POST /v1/verifications`` (``method: flashcall``,
  a distinct valid UK mobile ``+4479111xxxxx`` each) at a fixed rate for a few seconds per
  step (open loop: requests leave on schedule whatever the answers do), ramping the rate;
- ``dumpcap`` records the SIP between the workers and sipp on ``lo``; INVITE, 180, CANCEL
  and 487 times are the kernel's capture times. An INVITE is matched to its verification
  by the To user (the phone number). The 201's time is when the client read its headers
  (``time.time()``, the same clock as the capture);
- after a step every verification is read back: it must hold a ``delivered`` event (the
  flash call rang and was cancelled). Any non-201, ``undeliverable`` or missing INVITE is
  an error; the highest rate with zero errors is the sustained rate (the ramp stops at the
  first step with errors);
- calls in flight come from the wire (INVITE to the final response, overlapping), so they
  need no hook in the service;
- ring time precision: ``|CANCEL - (180 + ring_s)|`` per call;
- memory: the summed RSS of the worker processes idle (after start) and at the highest
  in-flight sample of the load; per call is the growth divided by the calls in flight then.

The full run repeats the ramp for 4, 8, 16 and 20 workers. Until 2026-12-03 the workers
placed the flash calls, each holding at most 4 (the pjsua2 wheel's limit), so a 2 s ring
capped a pool of N workers near 2 N calls/s. Flash calls over UDP now leave from ``serve``
itself (``voice/sip/flash_uac.py``) and no setting is bound by its workers: every setting
then holds the top rate (40/s), a floor, not a capacity (``bench/asterisk_compare.py`` ramps
to the machine's limit), and the RSS columns show the idle workers, which flash calls no
longer grow. ``--quick`` runs 20 workers only. Goals on the 2-core machine:
>= 64 calls in flight, >= 25 calls/s sustained, INVITE <= 20 ms p99 after the 201, CANCEL
within 50 ms of the ring time (p99). Prints a table, then one JSON line.

Run (as root, for the capture): ``.venv/bin/python bench/flashcall.py [--quick]``.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in {None, ""}:
    # Run as a file (``python bench/flashcall.py``): make the repo importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector

from bench.common import (
    REPO,
    SIPP_OTHER_SOCKETS,
    VENV_BIN,
    BenchError,
    Capture,
    Child,
    UdpPacket,
    child_pids,
    environ,
    finish,
    free_port,
    parser,
    percentile,
    print_table,
    rss_kib,
    sipp_path,
    wait_http,
    wait_warm,
)

RING_S = 2.0
PREFIX = "+447400"
NUMBER_BASE = "+4479111"  # + 5 digits: all valid UK mobiles for phonenumbers
GOAL_INFLIGHT = 64
GOAL_RATE = 25.0
GOAL_INVITE_P99_MS = 20.0
GOAL_CANCEL_MS = 50.0
NO_LIMIT = "1000000000/60"
SCENARIO = REPO / "bench" / "sipp" / "flash_uas_ring.xml"
SETTLE_S = RING_S + 20  # how long a step's verifications get to reach their delivery result


@dataclass(frozen=True, slots=True)
class Plan:
    """Worker settings, offered rates and step length: the full run or ``--quick``."""

    workers: tuple[int, ...]
    rates: tuple[int, ...]
    step_s: float


FULL = Plan(workers=(4, 8, 16, 20), rates=(5, 10, 15, 20, 25, 30, 32, 35, 38, 40), step_s=5.0)
QUICK = Plan(workers=(20,), rates=(20, 32, 40), step_s=3.0)


@dataclass(slots=True)
class Attempt:
    """One verification the client asked for."""

    phone: str
    sent_at: float = 0.0
    status: int = 0
    created_at: float = 0.0  # when the 201's headers were read (epoch s)
    id: str = ""
    result: str = ""  # "delivered", "undeliverable", "pending", or an HTTP error


@dataclass(frozen=True, slots=True)
class WireCall:
    """One flash call as seen on the wire (epoch seconds; 0.0 when not seen)."""

    call_id: str
    phone: str
    invite: float
    ringing: float
    cancel: float
    final: float


@dataclass(slots=True)
class Step:
    """The figures of one offered rate with one worker setting."""

    workers: int
    rate: int
    offered: int = 0
    sent_per_s: float = 0.0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    inflight_peak: int = 0
    invite_p50_ms: float = float("nan")
    invite_p99_ms: float = float("nan")
    cancel_p50_ms: float = float("nan")
    cancel_p99_ms: float = float("nan")
    rss_loaded_kib: int = 0

    @property
    def ok(self) -> bool:
        return self.errors == 0 and self.offered > 0


@dataclass(slots=True)
class Setting:
    """All steps of one ``CLINIC_SIP_WORKERS`` value."""

    workers: int
    rss_idle_kib: int = 0
    steps: list[Step] = field(default_factory=list)

    @property
    def best(self) -> Step | None:
        """The highest rate without errors."""
        good = [s for s in self.steps if s.ok]
        return max(good, key=lambda s: s.rate) if good else None


# -- the wire ---------------------------------------------------------------------------------


def _header(lines: Sequence[str], name: str) -> str:
    low = name.lower() + ":"
    for line in lines[1:]:
        if line.lower().startswith(low):
            return line.split(":", 1)[1].strip()
    return ""


def _user(uri_header: str) -> str:
    # "<sip:+447911100001@127.0.0.1:5080>;tag=x" -> "+447911100001"
    start = uri_header.find("sip:")
    if start < 0:
        return ""
    rest = uri_header[start + 4 :]
    return rest.split("@", 1)[0] if "@" in rest else ""


def wire_calls(packets: Sequence[UdpPacket], sipp_port: int) -> dict[str, WireCall]:
    """Flash calls by phone number, from the SIP on the sipp handset's port."""
    seen: dict[str, dict[str, Any]] = {}
    for p in packets:
        if sipp_port not in (p.src[1], p.dst[1]):
            continue
        text = p.payload.decode("utf-8", errors="replace")
        lines = text.split("\r\n")
        first = lines[0]
        call_id = _header(lines, "Call-ID")
        if not call_id:
            continue
        rec = seen.setdefault(call_id, {"phone": ""})
        if first.startswith("INVITE "):
            rec.setdefault("invite", p.at)  # the first send, not a retransmission
            rec["phone"] = _user(_header(lines, "To"))
        elif first.startswith("CANCEL "):
            rec.setdefault("cancel", p.at)
        elif first.startswith("SIP/2.0 180"):
            rec.setdefault("ringing", p.at)
        elif first.startswith("SIP/2.0 ") and "INVITE" in _header(lines, "CSeq"):
            code = int(first.split()[1])
            if code >= 200:
                rec.setdefault("final", p.at)
    out: dict[str, WireCall] = {}
    for call_id, rec in seen.items():
        if "invite" not in rec:
            continue
        out[rec["phone"]] = WireCall(
            call_id,
            rec["phone"],
            rec["invite"],
            rec.get("ringing", 0.0),
            rec.get("cancel", 0.0),
            rec.get("final", 0.0),
        )
    return out


def peak_overlap(intervals: Sequence[tuple[float, float]]) -> int:
    """The most intervals open at one instant."""
    edges = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    peak = now = 0
    for _, delta in edges:
        now += delta
        peak = max(peak, now)
    return peak


# -- the load ---------------------------------------------------------------------------------


class Numbers:
    """Distinct phone numbers across the whole run."""

    def __init__(self) -> None:
        self._next = 0

    def take(self) -> str:
        n = self._next
        self._next += 1
        if n > 99999:
            raise BenchError("ran out of distinct bench numbers")
        return f"{NUMBER_BASE}{n:05d}"


async def _create(session: ClientSession, url: str, a: Attempt) -> None:
    body = {"phone": a.phone, "method": "flashcall", "fallback": []}
    a.sent_at = time.time()
    try:
        async with session.post(f"{url}/v1/verifications", json=body) as resp:
            a.created_at = time.time()
            a.status = resp.status
            data = await resp.json(content_type=None)
    except (ClientError, TimeoutError) as exc:
        a.result = f"client error {type(exc).__name__}"
        return
    if resp.status == 201 and isinstance(data, dict):
        a.id = str(data["id"])
    else:
        a.result = f"HTTP {resp.status}"


async def _result(session: ClientSession, url: str, a: Attempt) -> str:
    async with session.get(f"{url}/v1/verifications/{a.id}") as resp:
        if resp.status != 200:
            return f"GET HTTP {resp.status}"
        data = await resp.json()
    events = {e["type"]: e.get("detail") or "" for e in data.get("events", [])}
    if "delivered" in events:
        return "delivered"
    for kind in ("undeliverable", "send_refused"):
        if kind in events:
            # The event's detail says why (no SIP capacity, a SIP status): the bench's
            # error table then tells a full pool from a failing peer.
            return f"{kind}: {events[kind]}" if events[kind] else kind
    return "pending"


class RssSampler:
    """Samples the summed RSS of the workers while the load runs; keeps the maximum."""

    def __init__(self, pids: Sequence[int]) -> None:
        self._pids = list(pids)
        self.peak_kib = 0

    def sample(self) -> None:
        self.peak_kib = max(self.peak_kib, sum(rss_kib(p) for p in self._pids))


async def offer(
    url: str, api_key: str, rate: int, *, step_s: float, numbers: Numbers, rss: RssSampler
) -> tuple[list[Attempt], float]:
    """Offer ``rate`` creates per second for ``step_s``; wait for every delivery result.

    Returns the attempts and the achieved send rate.
    """
    count = max(1, round(rate * step_s))
    attempts = [Attempt(numbers.take()) for _ in range(count)]
    headers = {"Authorization": f"Bearer {api_key}"}
    async with ClientSession(
        headers=headers, timeout=ClientTimeout(total=10), connector=TCPConnector(limit=0)
    ) as session:
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.05
        tasks = []
        next_sample = start
        for i, a in enumerate(attempts):
            due = start + i / rate
            while loop.time() < due:
                if loop.time() >= next_sample:
                    rss.sample()  # a few /proc reads: well under a millisecond
                    next_sample += 0.5
                await asyncio.sleep(max(0.0, min(due, next_sample) - loop.time()))
            tasks.append(asyncio.create_task(_create(session, url, a)))
        # Calls started near the end are still ringing: keep sampling through their ring.
        end_sampling = loop.time() + RING_S
        while loop.time() < end_sampling:
            rss.sample()
            await asyncio.sleep(0.25)
        await asyncio.gather(*tasks)
        sent_span = attempts[-1].sent_at - attempts[0].sent_at if count > 1 else 0.0
        pending = [a for a in attempts if a.id]
        deadline = loop.time() + SETTLE_S
        while pending:
            results = await asyncio.gather(*(_result(session, url, a) for a in pending))
            for a, r in zip(pending, results, strict=True):
                a.result = r
            pending = [a for a in pending if a.result == "pending"]
            if not pending or loop.time() > deadline:
                break
            await asyncio.sleep(0.5)
    achieved = (count - 1) / sent_span if sent_span > 0 else float(count)
    return attempts, achieved


# -- one worker setting -------------------------------------------------------------------------


def service_env(
    work: Path, *, http_port: int, sip_port: int, sipp_port: int, workers: int, api_key: str
) -> dict[str, str]:
    """Flash calls to sipp, embedded Redis, limits out of the way."""
    return environ(
        CLINIC_DATA_DIR=str(work / f"data-{workers}"),
        CLINIC_HTTP_ADDR=f"127.0.0.1:{http_port}",
        CLINIC_API_KEYS=api_key,
        CLINIC_SECRET=secrets.token_urlsafe(36),
        CLINIC_LOG_LEVEL="WARNING",
        CLINIC_SIP_ADDR=f"127.0.0.1:{sip_port}",
        CLINIC_SIP_WORKERS=str(workers),
        CLINIC_SIP_ROUTE=f"sip:{{e164}}@127.0.0.1:{sipp_port}",
        CLINIC_FLASHCALL_PREFIX=PREFIX,
        CLINIC_FLASHCALL_RING_S=f"{RING_S:g}",
        CLINIC_LIMIT_NUMBER_VERIFICATIONS="1000/60",
        CLINIC_LIMIT_NUMBER_SENDS="1000/60",
        CLINIC_LIMIT_PREFIX_SENDS=NO_LIMIT,
        CLINIC_LIMIT_KEY_REQUESTS=NO_LIMIT,
        CLINIC_LIMIT_IP_REQUESTS=NO_LIMIT,
    )


def run_setting(work: Path, workers: int, plan: Plan, numbers: Numbers) -> Setting:
    """Start sipp and the service with ``workers`` workers and ramp the offered rate."""
    api_key = secrets.token_hex(16)
    setting = Setting(workers)
    children: list[Child] = []
    try:
        sipp_port = free_port()
        children.append(
            Child(
                "sipp handset",
                [
                    sipp_path(),
                    "-sf",
                    str(SCENARIO),
                    "-i",
                    "127.0.0.1",
                    "-p",
                    str(sipp_port),
                    *SIPP_OTHER_SOCKETS,
                    "-nostdin",
                    "-trace_err",
                    "-error_file",
                    str(work / f"sipp-{workers}-errors.log"),
                ],
                work / f"sipp-{workers}.log",
            )
        )
        http_port = free_port()
        sip_port = free_port(count=workers + 1)
        cli = VENV_BIN / "clinic-voice"
        if not cli.exists():
            raise BenchError(f"{cli} is missing: run make venv")
        service = Child(
            f"clinic-voice serve ({workers} workers)",
            [str(cli), "serve"],
            work / f"service-{workers}.log",
            env=service_env(
                work,
                http_port=http_port,
                sip_port=sip_port,
                sipp_port=sipp_port,
                workers=workers,
                api_key=api_key,
            ),
        )
        children.append(service)
        url = f"http://127.0.0.1:{http_port}"
        wait_http(f"{url}/readyz", 90, service)
        wait_warm(f"{url}/readyz", 180, service)
        pids = child_pids(service.pid, "voice.sip.worker")
        if len(pids) != workers:
            raise BenchError(f"expected {workers} SIP worker processes, found {len(pids)}")
        setting.rss_idle_kib = sum(rss_kib(p) for p in pids)
        for rate in plan.rates:
            step = run_step(
                work,
                url,
                api_key=api_key,
                workers=workers,
                rate=rate,
                plan=plan,
                numbers=numbers,
                sipp_port=sipp_port,
                pids=pids,
            )
            setting.steps.append(step)
            for child in children:
                if child.returncode is not None:
                    raise BenchError(f"{child.name} died during the run:\n{child.tail()}")
            if not step.ok:
                break  # the first rate with errors ends the ramp
    finally:
        for child in reversed(children):
            child.stop()
    return setting


def run_step(
    work: Path,
    url: str,
    *,
    api_key: str,
    workers: int,
    rate: int,
    plan: Plan,
    numbers: Numbers,
    sipp_port: int,
    pids: Sequence[int],
) -> Step:
    """One offered rate: load, capture, read back, figures."""
    step = Step(workers, rate)
    capture = Capture(f"udp port {sipp_port}", work / f"flash-{workers}-{rate}.pcap", log_dir=work)
    rss = RssSampler(pids)
    try:
        attempts, step.sent_per_s = asyncio.run(
            offer(url, api_key, rate, step_s=plan.step_s, numbers=numbers, rss=rss)
        )
    finally:
        packets = capture.stop()
    step.offered = len(attempts)
    step.rss_loaded_kib = rss.peak_kib
    calls = wire_calls(packets, sipp_port)
    invite_ms: list[float] = []
    cancel_ms: list[float] = []
    intervals: list[tuple[float, float]] = []
    for a in attempts:
        kind = a.result if a.result != "delivered" else ""
        wire = calls.get(a.phone)
        if not kind and wire is None:
            kind = "no INVITE on the wire"
        if kind:
            step.error_kinds[kind] = step.error_kinds.get(kind, 0) + 1
            continue
        assert wire is not None
        invite_ms.append((wire.invite - a.created_at) * 1000)
        if wire.ringing and wire.cancel:
            cancel_ms.append(abs(wire.cancel - (wire.ringing + RING_S)) * 1000)
        intervals.append((wire.invite, wire.final or wire.cancel or wire.invite))
    step.errors = sum(step.error_kinds.values())
    step.inflight_peak = peak_overlap(
        [(w.invite, w.final or w.cancel or w.invite) for w in calls.values()]
    )
    step.invite_p50_ms = percentile(invite_ms, 50)
    step.invite_p99_ms = percentile(invite_ms, 99)
    step.cancel_p50_ms = percentile(cancel_ms, 50)
    step.cancel_p99_ms = percentile(cancel_ms, 99)
    return step


# -- report -------------------------------------------------------------------------------------


def _ms(value: float) -> float | None:
    """A figure for the JSON line: rounded, None when not measured (JSON has no NaN)."""
    return None if math.isnan(value) else round(value, 3)


def report(settings: list[Setting], quick: bool) -> dict[str, object]:
    """The table and the JSON figures (headline: the largest worker setting)."""
    rows = []
    for s in settings:
        for st in s.steps:
            rows.append(
                [
                    s.workers,
                    st.rate,
                    st.sent_per_s,
                    st.offered,
                    st.errors,
                    st.inflight_peak,
                    st.invite_p50_ms,
                    st.invite_p99_ms,
                    st.cancel_p50_ms,
                    st.cancel_p99_ms,
                    (st.rss_loaded_kib - s.rss_idle_kib) / 1024,
                ]
            )
    step_s = (QUICK if quick else FULL).step_s
    print(f"\nFlash-call bench: ring {RING_S:g} s, steps of {step_s:g} s")
    print_table(
        [
            "workers",
            "offered/s",
            "sent/s",
            "calls",
            "errors",
            "in flight",
            "INVITE p50 ms",
            "INVITE p99 ms",
            "CANCEL err p50 ms",
            "CANCEL err p99 ms",
            "RSS growth MiB",
        ],
        rows,
    )
    errs = [
        f"{s.workers} workers at {st.rate}/s: {st.error_kinds}"
        for s in settings
        for st in s.steps
        if st.errors
    ]
    if errs:
        print("errors: " + "; ".join(errs))
    print("\nCapacity against CLINIC_SIP_WORKERS (highest offered rate with zero errors):")
    cap_rows = []
    capacity: dict[str, object] = {}
    for s in settings:
        b = s.best
        peak = max((st.inflight_peak for st in s.steps if st.ok), default=0)
        per_call = 0.0
        loaded = [st for st in s.steps if st.ok and st.inflight_peak]
        if loaded:
            top = max(loaded, key=lambda st: st.inflight_peak)
            per_call = (top.rss_loaded_kib - s.rss_idle_kib) / top.inflight_peak
        cap_rows.append(
            [
                s.workers,
                b.rate if b else 0,
                b.sent_per_s if b else 0.0,
                peak,
                s.rss_idle_kib / s.workers / 1024,
                per_call,
            ]
        )
        capacity[str(s.workers)] = {
            "calls_per_s": b.rate if b else 0,
            "inflight_peak": peak,
        }
    print_table(
        ["workers", "calls/s", "sent/s", "in flight", "RSS/worker MiB", "RSS/call KiB"], cap_rows
    )
    head = settings[-1]
    best = head.best
    ok_steps = [st for st in head.steps if st.ok]
    inflight = max((st.inflight_peak for st in ok_steps), default=0)
    invite_p99 = best.invite_p99_ms if best else float("nan")
    cancel_p99 = best.cancel_p99_ms if best else float("nan")
    rate = float(best.rate) if best else 0.0
    per_worker_mib = head.rss_idle_kib / head.workers / 1024
    per_call_kib = float(cap_rows[-1][5])
    goals = {
        "inflight_peak": inflight >= GOAL_INFLIGHT,
        "calls_per_s": rate >= GOAL_RATE,
        "invite_p99_ms": invite_p99 <= GOAL_INVITE_P99_MS,
        "cancel_error_ms": cancel_p99 <= GOAL_CANCEL_MS,
    }
    print(
        f"\n{head.workers} workers: {rate:g} calls/s sustained (goal {GOAL_RATE:g}), "
        f"{inflight} in flight (goal {GOAL_INFLIGHT}), INVITE p99 {invite_p99:.1f} ms after "
        f"the 201 (goal {GOAL_INVITE_P99_MS:g}), CANCEL error p99 {cancel_p99:.1f} ms "
        f"(goal {GOAL_CANCEL_MS:g}); RSS {per_worker_mib:.1f} MiB/worker, "
        f"{per_call_kib:.0f} KiB/call"
    )
    return {
        "bench": "flashcall",
        "quick": quick,
        "ring_s": RING_S,
        "workers": head.workers,
        "calls_per_s": rate,
        "inflight_peak": inflight,
        # Also counting the first step with errors: what the pool held when it overflowed.
        "inflight_peak_any_step": max((st.inflight_peak for st in head.steps), default=0),
        "invite_p50_ms": _ms(best.invite_p50_ms) if best else None,
        "invite_p99_ms": _ms(invite_p99),
        "cancel_error_p50_ms": _ms(best.cancel_p50_ms) if best else None,
        "cancel_error_ms": _ms(cancel_p99),
        "rss_per_worker_mib": round(per_worker_mib, 2),
        "rss_per_call_kib": round(per_call_kib, 1),
        "capacity_by_workers": capacity,
        "goals_met": all(goals.values()),
        "goals": goals,
    }


def run(plan: Plan, quick: bool, keep: Path | None = None) -> dict[str, object]:
    """Every worker setting of ``plan``; returns the figures."""
    sipp_path()
    numbers = Numbers()
    settings: list[Setting] = []
    with tempfile.TemporaryDirectory(prefix="bench-flash-") as tmp:
        work = Path(tmp)
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            work = keep
        for workers in plan.workers:
            settings.append(run_setting(work, workers, plan, numbers))
    return report(settings, quick)


def main(argv: list[str] | None = None) -> int:
    """``bench/flashcall.py [--quick] [--strict] [--workers N ...]``."""
    p = parser(__doc__.splitlines()[0] if __doc__ else "flash-call bench")
    p.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    p.add_argument(
        "--workers", type=int, nargs="+", help="CLINIC_SIP_WORKERS values (default: by plan)"
    )
    p.add_argument("--keep", type=Path, help="keep captures and logs in this folder")
    args = p.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.workers:
        plan = Plan(tuple(args.workers), plan.rates, plan.step_s)
    return finish(
        "flashcall", args.quick, lambda: run(plan, args.quick, args.keep), strict=args.strict
    )


if __name__ == "__main__":
    sys.exit(main())
