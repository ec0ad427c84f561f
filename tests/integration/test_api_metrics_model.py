"""``/metrics`` held to what the API model sent (test_api_model.py's state machine, extended).

The machine of test_api_model.py (creates, checks, cancels, fallbacks, idempotent replays,
the per-number limit) runs against one real service (real HTTP, real redis-server), with a
few more steps of its own: requests to paths and methods no route takes (ids, phone numbers
and code-like digits in the path; no key, a wrong key, a right one), and bodies over 64 KiB.
After every step ``GET /metrics`` is scraped and:

- the text is valid Prometheus text format 0.0.4 (:func:`parse`, strict: no prometheus_client
  in the venv);
- no counter (histogram buckets, sums and counts included) ever goes down;
- ``clinic_http_requests_total`` by ``method``, ``route`` and ``status`` is what the test sent,
  from the scrape at the example's start; a path no route takes is ``route="unmatched"``;
- ``clinic_verifications_total`` by ``status`` is the model's: each verification made once
  ``pending``, then its final status;
- each histogram's buckets are cumulative, its ``_count`` is its ``+Inf`` bucket, and the
  latency count of each route is that route's requests;
- no label value holds a phone number, a code, a verification id or an API key, and the
  ``route`` labels are route templates (no raw path: their number stays bounded).

The machine's service is one process: its scrape is the whole service. Two more tests: a
method the client makes up (aiohttp's pure-Python parser takes any token) is counted as
``other``, never a label of its own; and ``serve`` with an HTTP worker (the helpers of
test_api_processes.py, embedded Redis), where every scrape, whichever process answers it,
is the sum over both processes of what was sent on fresh connections (a fixed sequence) and
is checked as above; one the worker did not answer in time (a slow machine: it says so in
``clinic_http_worker_snapshots_late_total``) may lag, never exceed, and is taken again.
Deterministic (``derandomize``, a seeded sequence), about 15 s on two cores with a warm
prompt cache.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import aiohttp.web_protocol
import pytest
from aiohttp.http_parser import HttpRequestParserPy
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule, run_state_machine_as_test

from tests.integration.conftest import (
    API_KEY,
    DEADLINE_S,
    OTHER_KEY,
    Answer,
    Api,
    OpenApiCollector,
    StartService,
    read_code,
    service_env,
)
from tests.integration.test_api_model import CREATE, ENV, PROFILE, ApiMachine
from tests.integration.test_api_processes import (
    Service,
    _data_dir,
    _embedded,
    _fresh_connection_request,
    _listeners,
    serve,
)
from tests.peers.sms_gateway import SmsGateway

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_blocking")]

METRICS_PROFILE = settings(PROFILE, max_examples=min(PROFILE.max_examples, 12))

Series = tuple[str, tuple[tuple[str, str], ...]]  # sample name, sorted labels

# -- a strict reader of text format 0.0.4 ----------------------------------------------------
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL_NAME = r"[a-zA-Z_][a-zA-Z0-9_]*"
_LABEL_VALUE = r'"(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(
    rf"(?P<name>{_NAME})"
    rf"(?:\{{(?P<labels>{_LABEL_NAME}={_LABEL_VALUE}(?:,{_LABEL_NAME}={_LABEL_VALUE})*)?\}})?"
    r" (?P<value>[+-]?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+|Inf)|NaN)"
    r"(?: -?[0-9]+)?"
)
_LABEL = re.compile(rf"({_LABEL_NAME})=({_LABEL_VALUE})")
_HELP = re.compile(rf"# HELP (?P<name>{_NAME}) (?P<text>(?:[^\\\n]|\\[\\n])*)")
_TYPE = re.compile(rf"# TYPE (?P<name>{_NAME}) (?P<kind>counter|gauge|histogram|summary|untyped)")
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def _unescape(quoted: str) -> str:
    return re.sub(r'\\[\\"n]', lambda m: _UNESCAPE[m.group(0)], quoted[1:-1])


@dataclass
class Exposition:
    """One scrape, read: each family's type and each series' value."""

    types: dict[str, str] = field(default_factory=dict)
    values: dict[Series, float] = field(default_factory=dict)

    def family(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {labels: v for (n, labels), v in self.values.items() if n == name}

    def counters(self) -> dict[Series, float]:
        """Every series that may only grow: counters, and histograms' buckets, sums, counts."""
        return {
            s: v
            for s, v in self.values.items()
            if self.types[_family_of(s[0], self.types)] in ("counter", "histogram")
        }


def _family_of(sample: str, types: dict[str, str]) -> str:
    if sample in types:
        return sample
    for suffix in ("_bucket", "_sum", "_count"):
        base = sample.removesuffix(suffix)
        if base != sample and types.get(base) == "histogram":
            return base
    raise AssertionError(f"sample {sample} of no declared family")


def parse(text: str) -> Exposition:
    """Read an exposition, failing on anything text format 0.0.4 does not allow: a line of no
    known form, a TYPE twice or after its samples, a family's samples not together, a series
    twice, a histogram without its ``+Inf`` bucket, ``_sum`` or ``_count``."""
    assert text.endswith("\n"), "an exposition ends with a newline"
    out = Exposition()
    helped: set[str] = set()
    sampled: set[str] = set()  # families with samples so far
    current: str | None = None
    for line in text[:-1].split("\n"):
        if line.startswith("#"):
            if line.startswith("# HELP "):
                m = _HELP.fullmatch(line)
                assert m, f"not a valid HELP line: {line!r}"
                assert m["name"] not in helped, f"HELP twice for {m['name']}"
                helped.add(m["name"])
            elif line.startswith("# TYPE "):
                m = _TYPE.fullmatch(line)
                assert m, f"not a valid TYPE line: {line!r}"
                name = m["name"]
                assert name not in out.types, f"TYPE twice for {name}"
                assert name not in sampled, f"TYPE of {name} after its samples"
                out.types[name] = m["kind"]
            continue
        assert line.strip(), "a blank line in the exposition"
        m = _SAMPLE.fullmatch(line)
        assert m, f"not a valid sample line: {line!r}"
        pairs = _LABEL.findall(m["labels"] or "")
        names = [k for k, _ in pairs]
        assert len(names) == len(set(names)), f"a label twice: {line!r}"
        labels = tuple(sorted((k, _unescape(v)) for k, v in pairs))
        family = _family_of(m["name"], out.types)
        if family != current:
            assert family not in sampled, f"the samples of {family} are not together"
            sampled.add(family)
            current = family
        series = (m["name"], labels)
        assert series not in out.values, f"a series twice: {line!r}"
        value = m["value"]
        out.values[series] = float("nan") if value == "NaN" else float(value)
    for name, kind in out.types.items():
        if kind == "counter":
            for labels, v in out.family(name).items():
                assert v >= 0 and not math.isnan(v), f"counter {name}{labels} = {v}"
        if kind == "histogram":
            _check_histogram(out, name)
    return out


def _whole(value: float) -> int:
    """A count: a whole number."""
    assert value.is_integer(), f"a count of {value}"
    return int(value)


def _check_histogram(out: Exposition, name: str) -> None:
    """Buckets cumulative in ``le`` order, ``+Inf`` last and equal to ``_count``."""
    buckets: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    for labels, v in out.family(f"{name}_bucket").items():
        le = dict(labels)["le"]
        rest = tuple(kv for kv in labels if kv[0] != "le")
        buckets.setdefault(rest, []).append((float(le), v))
    counts = out.family(f"{name}_count")
    sums = out.family(f"{name}_sum")
    assert set(buckets) == set(counts) == set(sums), f"{name}: bucket, _sum, _count sets differ"
    for labels, rows in buckets.items():
        rows.sort()
        assert rows[-1][0] == math.inf, f"{name}{labels}: no +Inf bucket"
        values = [v for _, v in rows]
        assert values == sorted(values), f"{name}{labels}: buckets not cumulative: {rows}"
        assert counts[labels] == rows[-1][1], f"{name}{labels}: _count is not the +Inf bucket"
        assert sums[labels] >= 0, f"{name}{labels}: negative _sum"


# -- the routes, as the test knows them ------------------------------------------------------
# (template, path pattern, methods): a request on none of them is route "unmatched".
ROUTES: tuple[tuple[str, re.Pattern[str], frozenset[str]], ...] = tuple(
    (template, re.compile(pattern), frozenset(methods))
    for template, pattern, methods in (
        (CREATE, r"/v1/verifications", {"POST"}),
        (f"{CREATE}/{{id}}", r"/v1/verifications/[^/]+", {"GET", "HEAD", "DELETE"}),
        (f"{CREATE}/{{id}}/check", r"/v1/verifications/[^/]+/check", {"POST"}),
        (f"{CREATE}/{{id}}/fallback", r"/v1/verifications/[^/]+/fallback", {"POST"}),
        ("/metrics", r"/metrics", {"GET", "HEAD"}),
        ("/healthz", r"/healthz", {"GET", "HEAD"}),
        ("/readyz", r"/readyz", {"GET", "HEAD"}),
        ("/openapi.json", r"/openapi\.json", {"GET", "HEAD"}),
    )
)
TEMPLATES = frozenset(t for t, _, _ in ROUTES) | {
    "/v1/calls",
    "/v1/calls/{id}",
    "/v1/calls/{id}/voicemail",
}


def route_of(method: str, path: str) -> tuple[str, bool]:
    """The route label a request must count under, and whether its path exists at all."""
    exists = False
    for template, pattern, methods in ROUTES:
        if pattern.fullmatch(path):
            exists = True
            if method in methods:
                return template, True
    return "unmatched", exists


# The methods counted under their own name; any other is "other" (unparsed: the parser refused
# the request).
METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}
)


def method_of(method: str) -> str:
    return method if method in METHODS else "other"


WRONG_KEY = "wrong-key-0123456789abcdef"
BIG = 64 * 1024 + 1  # one byte past client_max_size


class MetricsMachine(ApiMachine):
    """The API model, and what ``/metrics`` must say of it after every step."""

    # what every scrape of the run showed, for "never goes down" across examples
    last: ClassVar[dict[Series, float]]

    def __init__(self) -> None:
        super().__init__()
        self.sent: Counter[tuple[str, str, str]] = Counter()  # method, route, status
        self.paths: set[str] = set()  # pieces sent in paths that no label may hold
        self.base = self._scrape()

    # -- plumbing --------------------------------------------------------------------------

    def _count(self, method: str, path: str, answer: Answer) -> None:
        route, _ = route_of(method, path.partition("?")[0])
        self.sent[method_of(method), route, str(answer.status)] += 1

    def send(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        key: str = API_KEY,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        answer = super().send(method, path, body, key=key, headers=headers)
        self._count(method, path, answer)
        return answer

    def _raw(self, method: str, path: str, key: str | None, data: bytes | None = None) -> Answer:
        headers = {"Content-Type": "application/json"} if data is not None else None
        answer = self._run(self.api.request(method, path, key=key, data=data, headers=headers))
        self._count(method, path, answer)
        return answer

    def _scrape(self) -> Exposition:
        answer = self._run(self.api.request("GET", "/metrics", key=None))
        assert answer.status == 200, answer.text
        assert answer.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        got = parse(answer.text)
        # A scrape is counted once answered: the next one shows it.
        self._count("GET", "/metrics", answer)
        return got

    # -- steps of its own --------------------------------------------------------------------

    @rule(
        where=st.sampled_from(
            ["id under a route", "phone", "code", "no such route", "method", "outside /v1"]
        ),
        key=st.sampled_from(["right", "wrong", "none"]),
        # and two methods llhttp parses that are no label of their own
        method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "PROPFIND", "M-SEARCH"]),
    )
    def stray(self, where: str, key: str, method: str) -> None:
        """A path or method no route takes, with what must never become a label in it: 401
        without a right key under /v1, else 404 or 405; each counted as ``unmatched``."""
        vid = next(iter(self.v), "N" * 32)
        code = next(iter(self.codes), "123456")
        path = {
            "id under a route": f"{CREATE}/{vid}/nope",
            "phone": f"/v1/{self.limited_phone}",
            "code": f"{CREATE}/{vid}/check/{code}",
            "no such route": f"/v1/{vid}",
            "method": f"{CREATE}/{vid}",
            "outside /v1": f"/{code}/{vid}",
        }[where]
        if where == "method":
            method = "PUT"
        route, exists = route_of(method, path)
        if route != "unmatched":
            return  # a route takes it after all (GET or DELETE of a verification)
        known = {p for t in TEMPLATES for p in t.split("/")}
        self.paths |= {p for p in path.split("/") if p and p not in known and p != "nope"}
        answer = self._raw(method, path, {"right": API_KEY, "wrong": WRONG_KEY, "none": None}[key])
        if path.startswith("/v1/") and key != "right":
            answer.problem(401, "unauthorized")
        elif exists:
            answer.problem(405, "method-not-allowed")
        else:
            answer.problem(404, "not-found")

    @rule(route=st.sampled_from([CREATE, "check"]))
    def too_large(self, route: str) -> None:
        """A body past 64 KiB: 413, counted under its route."""
        path = CREATE if route == CREATE else f"{CREATE}/{next(iter(self.v), 'N' * 32)}/check"
        body = b'{"phone": "' + b"1" * BIG + b'"}'
        answer = self._raw("POST", path, API_KEY, body)
        answer.problem(413, "body-too-large")

    @rule(key=st.sampled_from([WRONG_KEY, None]))
    def no_right_key(self, key: str | None) -> None:
        """A route of /v1 without a right key: 401."""
        self._raw("GET", f"{CREATE}/{next(iter(self.v), 'N' * 32)}", key).problem(
            401, "unauthorized"
        )

    # -- after every step --------------------------------------------------------------------

    @invariant()
    def metrics_tell_the_truth(self) -> None:
        sent = Counter(self.sent)  # this scrape shows what was sent before it
        got = self._scrape()
        self._never_down(got)
        self._requests_as_sent(got, sent)
        self._verifications_as_modelled(got)
        self._latency_per_route(got)
        self._no_secret_in_labels(got)

    def _never_down(self, got: Exposition) -> None:
        now = got.counters()
        for series, before in type(self).last.items():
            assert series in now, f"{series} went away"
            assert now[series] >= before, f"{series} went down: {before} -> {now[series]}"
        type(self).last = now

    def _requests_as_sent(self, got: Exposition, sent: Counter[tuple[str, str, str]]) -> None:
        def by_key(e: Exposition) -> Counter[tuple[str, str, str]]:
            return Counter(
                {
                    (d["method"], d["route"], d["status"]): _whole(v)
                    for labels, v in e.family("clinic_http_requests_total").items()
                    for d in [dict(labels)]
                }
            )

        shown = by_key(got)
        shown.subtract(by_key(self.base))
        shown = +shown  # only what this example added
        assert shown == +sent, (
            f"requests counted {sorted(shown.items())}, sent {sorted(sent.items())}"
        )

    def _verifications_as_modelled(self, got: Exposition) -> None:
        want: Counter[tuple[str, str]] = Counter()
        for m in self.v.values():
            want["pending", "sms"] += 1
            if m.status != "pending":
                want[m.status, "sms"] += 1
        shown: Counter[tuple[str, str]] = Counter()
        for e, sign in ((got, 1), (self.base, -1)):
            for labels, v in e.family("clinic_verifications_total").items():
                d = dict(labels)
                shown[d["status"], d["channel"]] += sign * _whole(v)
        assert +shown == want, f"verifications counted {dict(shown)}, made {dict(want)}"

    def _latency_per_route(self, got: Exposition) -> None:
        requests: Counter[str] = Counter()
        for labels, v in got.family("clinic_http_requests_total").items():
            requests[dict(labels)["route"]] += _whole(v)
        counts = {
            dict(labels)["route"]: v
            for labels, v in got.family("clinic_http_request_duration_seconds_count").items()
        }
        assert counts == dict(requests), f"latency counts {counts}, requests {dict(requests)}"

    def _no_secret_in_labels(self, got: Exposition) -> None:
        secrets = (
            self.codes
            | set(self.v)
            | {m.phone for m in self.v.values()}
            | {self.limited_phone, API_KEY, OTHER_KEY, WRONG_KEY}
            | self.paths
        )
        for name, labels in got.values:
            for label, value in labels:
                assert not any(s in value for s in secrets), f"{name}: {label}={value!r}"
                if label != "le":  # a bucket's bound (0.0025) is digits, and no secret
                    assert not re.search(r"[0-9]{4,}", value), f"{name}: {label}={value!r}"
                if label == "route":
                    assert value in TEMPLATES | {"unmatched"}, f"{name}: route={value!r}"
                if label == "method":
                    assert value in METHODS | {"other", "unparsed"}, f"{name}: method={value!r}"


@pytest.fixture
async def service(
    start_service: StartService, sms_gateway: SmsGateway
) -> tuple[Api, asyncio.AbstractEventLoop]:
    """One service for every example, and the loop it runs on (as test_api_model.py)."""
    return await start_service(ENV), asyncio.get_running_loop()


def test_metrics_tell_what_the_api_model_sent(
    service: tuple[Api, asyncio.AbstractEventLoop], sms_gateway: SmsGateway
) -> None:
    api, loop = service
    bound = type(
        "BoundMetricsMachine",
        (MetricsMachine,),
        {"api": api, "gateway": sms_gateway, "loop": loop, "last": {}},
    )
    run_state_machine_as_test(bound, settings=METRICS_PROFILE)


async def test_a_method_the_client_makes_up_is_no_label(
    start_service: StartService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiohttp's pure-Python parser (what runs with AIOHTTP_NO_EXTENSIONS=1, or on PyPy) takes
    any token as a method: each counts as ``other``, never as a label of its own (a series
    each, kept for the life of the process: a caller without a key grew the registry and
    every scrape without bound), and none puts a phone number into a label."""
    monkeypatch.setattr(aiohttp.web_protocol, "HttpRequestParser", HttpRequestParserPy)
    api = await start_service({})
    made_up = [f"X{i:02d}" for i in range(40)] + ["+31612345678", "PROPFIND", "M-SEARCH"]
    for method in made_up:
        reader, writer = await asyncio.open_connection("127.0.0.1", api.client.port)
        try:
            writer.write(
                f"{method} /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode()
            )
            raw = await asyncio.wait_for(reader.read(), DEADLINE_S)
        finally:
            writer.close()
        assert raw.split(b" ", 2)[1] == b"405", (method, raw[:60])
    answer = await api.request("GET", "/metrics", key=None)
    got = parse(answer.text)
    requests = got.family("clinic_http_requests_total")
    methods = {dict(labels)["method"] for labels in requests}
    assert methods <= METHODS | {"other", "unparsed"}, sorted(methods)
    key = (("method", "other"), ("route", "unmatched"), ("status", "405"))
    assert requests[key] == len(made_up)


# -- several processes: one serve and its HTTP workers ---------------------------------------
# Requests of each kind, sent on fresh connections (the kernel spreads them over the processes):
# (method, path, key) with {vid} and {code} filled in; the answer's status is asserted.
_SPREAD: tuple[tuple[str, str, str, str | None, int], ...] = (
    ("create", "POST", CREATE, API_KEY, 201),
    ("get", "GET", f"{CREATE}/{{vid}}", API_KEY, 200),
    ("wrong code", "POST", f"{CREATE}/{{vid}}/check", API_KEY, 200),
    ("unknown id", "GET", f"{CREATE}/{'N' * 32}", API_KEY, 404),
    ("stray", "GET", f"{CREATE}/{{vid}}/{{code}}", API_KEY, 404),
    ("stray, no key", "GET", "/v1/{phone}", "", 401),
    ("method", "PUT", f"{CREATE}/{{vid}}", API_KEY, 405),
    ("outside", "GET", "/{code}", "", 404),
    ("health", "GET", "/healthz", "", 200),
)
_UNPARSED = b"GET /v1/verifications HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n"


@pytest.mark.timeout(300)  # a cold prompt cache takes most of this; warm runs take seconds
async def test_metrics_of_serve_and_its_http_workers_are_the_sum_of_what_was_sent(
    sms_gateway: SmsGateway, tmp_path: Path, openapi_responses: OpenApiCollector
) -> None:
    """CLINIC_HTTP_WORKERS=2: every scrape, whichever process answers it, counts every request
    answered before it, by method, route and status, once (each process its own, summed),
    and every verification state change once; it parses, and never goes down. (A scrape
    the worker was late for counts its last snapshot: see ``scrape``.)"""
    data = _data_dir(tmp_path, "data")
    env = _embedded(service_env("", data, sms_gateway)) | {"CLINIC_HTTP_WORKERS": "2"}
    rng = random.Random(28)  # a fixed sequence
    async with serve("S", env, tmp_path, openapi_responses) as s:
        port = int(s.base.rsplit(":", 1)[1])
        assert _listeners(port) == 2

        sent: Counter[tuple[str, str, str]] = Counter()
        base: Exposition | None = None  # the scrape the counts are taken from
        last: dict[Series, float] = {}
        late = 0  # clinic_http_worker_snapshots_late_total as last seen

        async def scrape() -> Exposition:
            """A scrape that every worker answered in time: it counts exactly what was sent.

            A scrape a worker did not answer within SNAPSHOT_DEADLINE_S (a slow machine)
            counts that worker's last snapshot and says so in LATE (README): it is held to
            what it may show (it parses, nothing goes down, nothing over what was sent), and
            the test scrapes again, rather than fail on a worker that was slow."""
            nonlocal last, late
            for _ in range(LATE_SCRAPES):
                status, text = await _fresh_connection_request(s, "GET", "/metrics", key="")
                assert status == 200, text
                got = parse(text)
                now = got.counters()
                for series, before in last.items():
                    assert now.get(series, -1) >= before, f"{series} went down or away"
                last = now
                assert (LATE, ()) in got.values, f"no {LATE} with HTTP workers"
                missed = _whole(got.values[LATE, ()])
                if missed == late:
                    return got
                late = missed
                if base is not None:  # else sent is counted from a scrape to come
                    over = _requests_since(got, base) - sent
                    assert not over, f"a late scrape counted more than was sent: {dict(over)}"
                    sent["GET", "/metrics", "200"] += 1
            pytest.fail(f"{LATE_SCRAPES} scrapes in a row missed an HTTP worker's numbers")

        made: list[tuple[str, str, str]] = []  # id, phone, code
        wrong: Counter[str] = Counter()  # wrong codes per verification
        base = await scrape()
        sent["GET", "/metrics", "200"] += 1
        for step in range(120):
            # 40 steps at random; then creates until serve and a worker each took one (the
            # kernel picks a process per connection: a few creates may all meet one)
            if step >= 40 and _both_created(await _read_log(s)):
                break
            pick = made and step < 40
            kind, method, path, key, want = rng.choice(_SPREAD) if pick else _SPREAD[0]
            body: Any = None
            vid, phone, code = rng.choice(made) if made else ("", "", "")
            if kind == "create":
                phone = f"+3162800{step:04d}"
                body = {"phone": phone}
            elif kind == "wrong code":
                if wrong[vid] >= 2:  # pending stays pending (5 checks), as the model counts
                    continue
                wrong[vid] += 1
                body = {"code": "".join(str((int(d) + 1) % 10) for d in code)}
            filled = path.format(vid=vid, code=code or "123456", phone=phone or "+31612345678")
            status, answer = await _fresh_connection_request(s, method, filled, body, key=key or "")
            assert status == want, (kind, filled, status, answer)
            if kind == "create":
                made.append((answer["id"], phone, await read_code(sms_gateway, len(made) + 1)))
            route, _ = route_of(method, filled)
            sent[method_of(method), route, str(status)] += 1
            if step % 4 == 3:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(_UNPARSED)
                raw = await asyncio.wait_for(reader.read(), 10)
                writer.close()
                assert raw.split(b" ", 2)[1] == b"400", raw[:40]
                sent["unparsed", "unmatched", "400"] += 1
            got = await scrape()
            shown = _requests_since(got, base)
            assert +shown == +sent, (
                f"counted {sorted((+shown).items())}, sent {sorted(sent.items())}"
            )
            # summed over the processes, each route's latency count is its requests (but the
            # ones the parser refused, which no route's middlewares answered)
            requests: Counter[str] = Counter()
            for labels, v in got.family("clinic_http_requests_total").items():
                if dict(labels)["method"] != "unparsed":
                    requests[dict(labels)["route"]] += _whole(v)
            latency = got.family("clinic_http_request_duration_seconds_count")
            assert {dict(labels)["route"]: _whole(v) for labels, v in latency.items()} == requests
            sent["GET", "/metrics", "200"] += 1
            created = got.family("clinic_verifications_total").get(
                (("channel", "sms"), ("status", "pending")), 0
            ) - base.family("clinic_verifications_total").get(
                (("channel", "sms"), ("status", "pending")), 0
            )
            assert created == len(made)
            secrets = {x for m in made for x in m} | {API_KEY}
            for _, labels in got.values:
                for label, value in labels:
                    assert not any(x in value for x in secrets), (label, value)
        assert _both_created(await _read_log(s)), "one process took all"


LATE = "clinic_http_worker_snapshots_late_total"
LATE_SCRAPES = 20  # each a worker missed took 0.5 s: 10 s of a worker that does not answer


def _requests_since(got: Exposition, base: Exposition) -> Counter[tuple[str, str, str]]:
    """``clinic_http_requests_total`` by method, route and status, from ``base`` to ``got``."""
    shown: Counter[tuple[str, str, str]] = Counter()
    for e, sign in ((got, 1), (base, -1)):
        for labels, v in e.family("clinic_http_requests_total").items():
            d = dict(labels)
            shown[d["method"], d["route"], d["status"]] += sign * _whole(v)
    return shown


async def _read_log(s: Service) -> str:
    """serve's log, read off the loop (no_blocking watches it; the log grows each step)."""
    return await asyncio.to_thread(s.log_path.read_text, errors="replace")


def _both_created(log: str) -> bool:
    """Whether serve and an HTTP worker each logged a create."""
    created_by = [line for line in log.splitlines() if ": created (sms)" in line]
    by_worker = any("http-worker-" in line for line in created_by)
    return by_worker and any("http-worker-" not in line for line in created_by)
