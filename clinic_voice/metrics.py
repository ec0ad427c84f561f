"""A small Prometheus registry: counters, histograms and gauges, rendered as text format 0.0.4.

The HTTP worker processes of one service (``CLINIC_HTTP_WORKERS``) send snapshots of their
counters and histograms to the main process, which renders the sum: one scrape of any process
shows the whole service. Gauges are the main process's own (the SIP pool lives there): read
when it renders, never summed. Separate services sharing a Redis are scraped each (or summed
in Prometheus).
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

Labels = tuple[tuple[str, str], ...]
# A registry's values as plain JSON: {metric name: [[labels as [k, v] pairs, value...], ...]}
Snapshot = dict[str, list[list[Any]]]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def _fmt_value(value: float) -> str:
    # Every digit, as Go's ParseFloat reads it: ":g" kept six, so 1234567 requests became
    # 1.23457e+06 and the counter stood still between scrapes.
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _fmt_labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in items)
    return "{" + inner + "}"


class Counter:
    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help = help_text
        self._values: dict[Labels, float] = defaultdict(float)
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] += amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def snapshot(self) -> list[list[Any]]:
        with self._lock:
            return [[[list(kv) for kv in labels], v] for labels, v in self._values.items()]

    def add(self, rows: list[list[Any]]) -> None:
        """Add another registry's snapshot of this counter."""
        with self._lock:
            for labels, v in rows:
                self._values[tuple((str(k), str(x)) for k, x in labels)] += float(v)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for labels, v in sorted(self._values.items()):
            lines.append(f"{self.name}{_fmt_labels(labels)} {_fmt_value(v)}")
        return lines


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name = name
        self.help = help_text
        self.buckets = buckets
        self._counts: dict[Labels, list[int]] = {}
        self._sums: dict[Labels, float] = defaultdict(float)
        self._lock = threading.Lock()

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            counts = self._counts.setdefault(key, [0] * (len(self.buckets) + 1))
            counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sums[key] += value

    def snapshot(self) -> list[list[Any]]:
        with self._lock:
            return [
                [[list(kv) for kv in labels], list(counts), self._sums[labels]]
                for labels, counts in self._counts.items()
            ]

    def add(self, rows: list[list[Any]]) -> None:
        """Add another registry's snapshot of this histogram (same buckets)."""
        with self._lock:
            for labels, counts, total in rows:
                key = tuple((str(k), str(x)) for k, x in labels)
                mine = self._counts.setdefault(key, [0] * (len(self.buckets) + 1))
                if len(counts) != len(mine):
                    raise ValueError(f"{self.name}: snapshot has other buckets")
                for i, c in enumerate(counts):
                    mine[i] += int(c)
                self._sums[key] += float(total)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for labels, counts in sorted(self._counts.items()):
            total = 0
            for bound, c in zip(self.buckets, counts, strict=False):
                total += c
                lines.append(
                    f"{self.name}_bucket{_fmt_labels(labels, (('le', f'{bound:g}'),))} {total}"
                )
            total += counts[-1]
            lines.append(f"{self.name}_bucket{_fmt_labels(labels, (('le', '+Inf'),))} {total}")
            lines.append(f"{self.name}_sum{_fmt_labels(labels)} {_fmt_value(self._sums[labels])}")
            lines.append(f"{self.name}_count{_fmt_labels(labels)} {total}")
        return lines


class Gauge:
    """A value as it is now, set by the process that knows it (see :meth:`Metrics.on_render`).
    Not in snapshots: one process's state, which a sum over processes would not mean."""

    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help = help_text
        self._values: dict[Labels, float] = {}
        self._lock = threading.Lock()

    def set(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = float(value)

    def clear(self) -> None:
        """No value any more (what it measured is gone): rendered with no sample."""
        with self._lock:
            self._values.clear()

    def value(self, **labels: str) -> float | None:
        return self._values.get(tuple(sorted(labels.items())))

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge"]
        with self._lock:
            for labels, v in sorted(self._values.items()):
                lines.append(f"{self.name}{_fmt_labels(labels)} {_fmt_value(v)}")
        return lines


class Metrics:
    """The service's metrics."""

    def __init__(self) -> None:
        self.requests = Counter("clinic_http_requests_total", "HTTP requests by route and status")
        self.latency = Histogram(
            "clinic_http_request_duration_seconds", "HTTP request latency by route"
        )
        self.verifications = Counter(
            "clinic_verifications_total",
            "verification state changes by the status and channel entered (created, moved to "
            "another channel, approved, failed, expired, canceled), counted once by the process "
            "that made the change (API, channel report or timer); channel is flashcall, sms or "
            "voice (the last one entered once the plan is used up), none if all were skipped",
        )
        self.deliveries = Counter(
            "clinic_deliveries_total", "channel delivery reports by channel and outcome"
        )
        self.calls = Counter("clinic_calls_total", "clinic-line calls by outcome")
        # The voicemail's budget (voice/ivr/voicemail_budget.py), fed by serve's clinic line.
        self.voicemail_refused = Counter(
            "clinic_voicemail_refused_total",
            "voicemail messages not recorded for the voicemail's budget, by reason: disk_low "
            "(CLINIC_VOICEMAIL_MIN_FREE_MB), voicemail_full (CLINIC_VOICEMAIL_MAX_MB), "
            "caller_limit (CLINIC_VOICEMAIL_PER_CALLER_DAY); the caller was put through to a "
            "human",
        )
        self.webhooks = Counter(
            "clinic_webhooks_total",
            "webhook POSTs by outcome: delivered, retry (failed, tried again later), given_up "
            "(failed for the last time: the event is lost to its receiver), dropped (a job "
            "that cannot be read)",
        )
        # The SIP pool of serve (clinic_voice/wiring.py sets them before each render there).
        self.sip_workers = Gauge(
            "clinic_sip_workers",
            "SIP worker processes by state: up (takes calls), unregistered (up, but its "
            "registration with CLINIC_SIP_REGISTRAR failed), starting (started or restarted, "
            "not up yet), stopping (sent SIGTERM by someone else: no new call, its calls being "
            "closed), down (died, restarted after a backoff)",
        )
        self.sip_slots = Gauge(
            "clinic_sip_slots",
            "call slots of the SIP workers that are up, by state: in_use (a call up or being "
            "placed), reserved (held for a caller the SIP front redirected, on the way), free "
            "(a new call may take it)",
        )
        self.sip_slots_kept_for_callers = Gauge(
            "clinic_sip_slots_kept_for_callers",
            "free call slots an outbound (verification) call may not take "
            "(CLINIC_SIP_CALLER_SLOTS): one is placed only while more slots than this are free",
        )
        # The clinic line's journal (clinic_voice/clinic_line.py sets it before each render).
        self.call_records_on_disk = Gauge(
            "clinic_call_records_on_disk",
            "clinic-line call records on disk that Redis does not hold (not in GET /v1/calls), "
            "by state: kept (a save Redis did not take; replayed every 30 s), cut (calls a "
            "serve that died was running; saved once Redis takes them), unreadable (do not "
            "open with this service's keys: left for the operator)",
        )
        # Fed by serve's SIP pool (clinic_voice/wiring.py), as refused_busy in calls above.
        self.sip_worker_restarts = Counter(
            "clinic_sip_worker_restarts_total",
            "SIP worker processes restarted after they died or froze (each after its backoff)",
        )
        self.sip_kept_for_callers = Counter(
            "clinic_sip_outbound_kept_for_callers_total",
            "outbound (verification) calls not placed because the free call slots were kept "
            "for callers (CLINIC_SIP_CALLER_SLOTS); the verification fell back to its next channel",
        )
        # Fed by serve's HTTP workers' end of the control socket (clinic_voice/http_workers.py).
        self.http_worker_snapshots_late = Counter(
            "clinic_http_worker_snapshots_late_total",
            "HTTP workers that did not send their numbers within 0.5 s of a scrape asking for "
            "them: that scrape counted the last ones each had sent, and may lag its requests",
        )
        # serve's embedded Redis (clinic_voice/app.py): no sample with CLINIC_REDIS_URL set.
        self.redis_restarts = Counter(
            "clinic_redis_restarts_total",
            "restarts of the embedded redis-server tried by serve after it died (each after "
            "its backoff, counted whether or not it comes up: rising while Redis stays down); "
            "no sample when CLINIC_REDIS_URL names a Redis of the operator's",
        )
        # Read by serve every few seconds (clinic_voice/disk_space.py), never at a scrape.
        self.data_dir_free_bytes = Gauge(
            "clinic_data_dir_free_bytes",
            "bytes free for a user other than root (df's Avail; 0 if mounted read-only) on the "
            "file system of CLINIC_DATA_DIR (the embedded Redis's append-only file, call "
            "records kept on disk, voicemail), read every 5 s; no sample while unreadable",
        )
        self._on_render: list[Callable[[], None]] = []

    def on_render(self, refresh: Callable[[], None], *gauges: Gauge) -> Callable[[], None]:
        """Call ``refresh`` (which sets gauges) before each render of this registry; returns
        the function that stops that and clears ``gauges`` (what they measured is gone: no
        sample that would read as its state)."""
        self._on_render.append(refresh)

        def stop() -> None:
            self._on_render.remove(refresh)
            for gauge in gauges:
                gauge.clear()

        return stop

    def _gauges(self) -> tuple[Gauge, ...]:
        return (
            self.sip_workers,
            self.sip_slots,
            self.sip_slots_kept_for_callers,
            self.call_records_on_disk,
            self.data_dir_free_bytes,
        )

    def _all(self) -> tuple[Counter | Histogram, ...]:
        return (
            self.requests,
            self.latency,
            self.verifications,
            self.deliveries,
            self.calls,
            self.voicemail_refused,
            self.webhooks,
            self.sip_worker_restarts,
            self.sip_kept_for_callers,
            self.http_worker_snapshots_late,
            self.redis_restarts,
        )

    def snapshot(self) -> Snapshot:
        """Every counter's and histogram's value, as JSON (to send to another process)."""
        return {m.name: m.snapshot() for m in self._all()}

    def add(self, snapshot: Snapshot) -> None:
        """Add another registry's :meth:`snapshot` (unknown metric names are ignored)."""
        for m in self._all():
            m.add(snapshot.get(m.name, []))

    def render(self, others: Iterable[Snapshot] = ()) -> str:
        """Text format 0.0.4: this registry plus the sum of ``others`` (their counters and
        histograms; the gauges are this registry's, refreshed first)."""
        for refresh in list(self._on_render):
            refresh()
        source = self
        others = list(others)
        if others:
            source = Metrics()
            source.add(self.snapshot())
            for snap in others:
                source.add(snap)
        lines: list[str] = []
        for m in source._all():
            lines += m.render()
        for g in self._gauges():
            lines += g.render()
        return "\n".join(lines) + "\n"
