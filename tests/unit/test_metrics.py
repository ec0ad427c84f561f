"""The Prometheus registry (:mod:`clinic_voice.metrics`): counters, histograms and the text
format 0.0.4 they render to, read back by a small strict parser."""

from __future__ import annotations

import re
import threading

import pytest

from clinic_voice.metrics import LATENCY_BUCKETS, Counter, Gauge, Histogram, Metrics

# One sample line: name, optional {labels}, a value Go's ParseFloat reads (no timestamps).
_SAMPLE = re.compile(
    r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r'(?:\{(?P<labels>[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*")*)\})?'
    r" (?P<value>[+-]?(?:[0-9]+(?:\.[0-9]*)?(?:e[+-]?[0-9]+)?|Inf|NaN))"
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Sample = tuple[str, dict[str, str], float]


def parse(text: str) -> list[Sample]:
    """Samples of an exposition; fails on any line that is not valid text format."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    samples: list[Sample] = []
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in {"counter", "histogram", "gauge"}, line
            assert name not in typed, f"TYPE twice for {name}"
            typed.add(name)
            continue
        m = _SAMPLE.fullmatch(line)
        assert m, f"not a valid sample line: {line!r}"
        labels = {k: v for k, v in _LABEL.findall(m.group("labels") or "")}
        samples.append((m.group("name"), labels, float(m.group("value"))))
    return samples


@pytest.mark.parametrize(
    ("incs", "expected"),
    [
        ([1.0], "1"),
        ([1.0, 1.0, 1.0], "3"),
        ([0.5], "0.5"),
        ([1_234_567.0], "1234567"),  # ":g" rendered 1.23457e+06
        ([123_456_789_012.0], "123456789012"),
        ([0.1, 0.2], "0.30000000000000004"),
    ],
)
def test_counter_renders_every_digit(incs: list[float], expected: str) -> None:
    c = Counter("x_total", "help")
    for amount in incs:
        c.inc(amount)
    assert c.render()[-1] == f"x_total {expected}"
    assert parse("\n".join(c.render()) + "\n")[-1][2] == sum(incs)


def test_counter_labels_are_order_independent() -> None:
    c = Counter("req_total", "requests")
    c.inc(route="/a", status="200")
    c.inc(status="200", route="/a")
    c.inc(route="/b", status="500")
    assert c.value(status="200", route="/a") == 2
    assert c.value(route="/b", status="500") == 1
    assert c.value(route="/c", status="200") == 0
    assert c.render() == [
        "# HELP req_total requests",
        "# TYPE req_total counter",
        'req_total{route="/a",status="200"} 2',
        'req_total{route="/b",status="500"} 1',
    ]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ('say "hi"', 'say \\"hi\\"'),
        ("back\\slash", "back\\\\slash"),
        ("two\nlines", "two lines"),
        ("plain", "plain"),
    ],
)
def test_label_values_are_escaped(value: str, shown: str) -> None:
    c = Counter("e_total", "escapes")
    c.inc(v=value)
    line = c.render()[-1]
    assert line == f'e_total{{v="{shown}"}} 1'
    assert parse(line + "\n")


def test_counter_is_safe_across_threads() -> None:
    c = Counter("t_total", "threads")

    def work() -> None:
        for _ in range(5000):
            c.inc(k="v")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive(), "an incrementing thread hung"
    assert c.value(k="v") == 20000


@pytest.mark.parametrize(
    ("observations", "cumulative"),
    [
        ([], None),
        ([0.001], [1, 1, 1, 1]),  # a value on a bound counts in that bucket (le = <=)
        ([0.0005, 0.0011, 0.003, 10.0], [1, 2, 3, 4]),
        ([0.0, 0.0025, 0.0025], [1, 3, 3, 3]),
    ],
)
def test_histogram_buckets_are_cumulative(
    observations: list[float], cumulative: list[int] | None
) -> None:
    h = Histogram("lat_seconds", "latency", buckets=(0.001, 0.0025, 0.005))
    for o in observations:
        h.observe(o, route="/x")
    samples = parse("\n".join(h.render()) + "\n")
    if cumulative is None:
        assert samples == []
        return
    buckets = [(s[1]["le"], s[2]) for s in samples if s[0] == "lat_seconds_bucket"]
    assert buckets == [
        ("0.001", cumulative[0]),
        ("0.0025", cumulative[1]),
        ("0.005", cumulative[2]),
        ("+Inf", cumulative[3]),
    ]
    by_name = {s[0]: s[2] for s in samples}
    assert by_name["lat_seconds_count"] == len(observations)
    assert by_name["lat_seconds_sum"] == pytest.approx(sum(observations))
    assert all(s[1].get("route") == "/x" for s in samples)


def test_histogram_sum_keeps_every_digit() -> None:
    h = Histogram("d_seconds", "d")
    for _ in range(3):
        h.observe(412_345.5)
    sums = [s for s in parse("\n".join(h.render()) + "\n") if s[0] == "d_seconds_sum"]
    assert sums == [("d_seconds_sum", {}, 1_237_036.5)]


def test_histogram_series_per_label_set() -> None:
    h = Histogram("s_seconds", "s", buckets=(1.0,))
    h.observe(0.5, route="/a")
    h.observe(2.0, route="/b")
    h.observe(0.7, route="/a")
    samples = parse("\n".join(h.render()) + "\n")
    count = {s[1]["route"]: s[2] for s in samples if s[0] == "s_seconds_count"}
    assert count == {"/a": 2, "/b": 1}


def test_default_latency_buckets_are_sorted() -> None:
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))


def test_service_metrics_render_as_one_valid_exposition() -> None:
    m = Metrics()
    m.requests.inc(route="/v1/verifications", method="POST", status="201")
    m.latency.observe(0.012, route="/v1/verifications")
    m.verifications.inc(status="approved", channel="sms")
    m.deliveries.inc(channel="flashcall", outcome="ringing")
    m.calls.inc(outcome="transferred")
    m.sip_workers.set(2, state="up")
    m.sip_slots.set(3, state="in_use")
    m.sip_slots_kept_for_callers.set(1)
    m.sip_worker_restarts.inc()
    m.sip_kept_for_callers.inc()
    m.redis_restarts.inc()
    m.data_dir_free_bytes.set(52_613_349_376)
    text = m.render()
    samples = parse(text)
    names = {s[0] for s in samples}
    assert {
        "clinic_http_requests_total",
        "clinic_http_request_duration_seconds_bucket",
        "clinic_http_request_duration_seconds_count",
        "clinic_verifications_total",
        "clinic_deliveries_total",
        "clinic_calls_total",
        "clinic_sip_workers",
        "clinic_sip_slots",
        "clinic_sip_slots_kept_for_callers",
        "clinic_sip_worker_restarts_total",
        "clinic_sip_outbound_kept_for_callers_total",
        "clinic_redis_restarts_total",
        "clinic_data_dir_free_bytes",
    } <= names
    assert ("clinic_data_dir_free_bytes", {}, 52_613_349_376) in samples
    for metric, kind in (
        ("clinic_http_requests_total", "counter"),
        ("clinic_http_request_duration_seconds", "histogram"),
        ("clinic_verifications_total", "counter"),
        ("clinic_deliveries_total", "counter"),
        ("clinic_calls_total", "counter"),
        ("clinic_sip_workers", "gauge"),
        ("clinic_sip_slots", "gauge"),
        ("clinic_sip_slots_kept_for_callers", "gauge"),
        ("clinic_sip_worker_restarts_total", "counter"),
        ("clinic_sip_outbound_kept_for_callers_total", "counter"),
        ("clinic_redis_restarts_total", "counter"),
        ("clinic_data_dir_free_bytes", "gauge"),
    ):
        assert f"# HELP {metric} " in text
        assert f"# TYPE {metric} {kind}\n" in text


def test_empty_registry_still_renders_valid_text() -> None:
    assert parse(Metrics().render()) == []


def test_gauges_are_the_rendering_registry_s_own_refreshed_at_each_render() -> None:
    # serve renders every scrape, with the HTTP workers' snapshots: its SIP pool's gauges
    # are read then, and never summed with a worker's (which has no pool).
    serve, worker = Metrics(), Metrics()
    worker.calls.inc(outcome="transferred")
    worker.sip_slots.set(9, state="in_use")  # never sent: a snapshot has no gauges
    assert "clinic_sip_slots" not in worker.snapshot()
    in_use = iter(range(1, 100))
    stop = serve.on_render(lambda: serve.sip_slots.set(next(in_use), state="in_use"))
    for expected in (1, 2):
        samples = parse(serve.render([worker.snapshot()]))
        assert ("clinic_sip_slots", {"state": "in_use"}, expected) in samples
        assert ("clinic_calls_total", {"outcome": "transferred"}, 1) in samples
    stop()
    assert serve.sip_slots.value(state="in_use") == 2, "not refreshed once stopped"


def test_gauge_renders_its_values_as_they_are_now() -> None:
    g = Gauge("g_things", "things")
    g.set(3, state="b")
    g.set(1.5, state="a")
    g.set(0, state="b")
    assert g.render() == [
        "# HELP g_things things",
        "# TYPE g_things gauge",
        'g_things{state="a"} 1.5',
        'g_things{state="b"} 0',
    ]
    g.clear()
    assert g.render() == ["# HELP g_things things", "# TYPE g_things gauge"]
