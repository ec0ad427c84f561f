"""Opening hours during a call: boundaries, closed dates and daylight saving (pure).

- :class:`voice.ivr.opening_hours.OpeningHours` against a brute-force reference in
  Europe/Amsterdam and Europe/London: an instant is turned into its wall clock from the zone's
  UTC offset at that instant, and the ranges and closed dates of that wall clock's day are
  read. Around the spring-forward (02:00 -> 03:00) and fall-back (03:00 -> 02:00) switches of
  any year in 1970-2100, with ranges touching 02:00-03:00, ``24:00`` and closed dates on
  those days; no exception for any instant in 1970-2100 (the README: a range the clocks skip
  does not open that day, one they pass twice is open both times).
- Whole calls through the shipped flows (driven as tests/unit/test_prop_engine.py drives
  them, its checks included) with the desk's hours read off a clock that every event moves
  on a few seconds, from just before closing time or a DST switch: "open" is asked at each
  decision (README "### Opening hours"), and whatever a decision finds, the caller is told
  what the record says: never "put through to staff" without a transfer to staff, a closed
  desk never without the closed notice, a triage verdict never recorded without its advice
  said, and a caller at U2 or more put through open or closed (test_prop_engine's checks).

The default run is deterministic and short; ``HYPOTHESIS_PROFILE=deep`` searches further
(tests/unit/conftest.py).
"""

from __future__ import annotations

import datetime
import zoneinfo
from collections import deque
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.test_prop_engine import (
    FLOW_IDS,
    MAX_EVENTS,
    STAFF,
    Driver,
    World,
    _check_end,
    _handle,
    _hang_up,
    _move,
    _result,
    _start,
)
from voice.ivr.engine import (
    OUT_OF_HOURS_OUTCOME,
    Digit,
    Engine,
    Phase,
    Play,
    PostWebhook,
    PromptDone,
    Store,
    TransferCall,
    WebhookResult,
)
from voice.ivr.flow import FlowParams, load_flows
from voice.ivr.opening_hours import OpeningHours, Range, parse_closed_dates, parse_week
from voice.ivr.triage import Urgency

ZONES = ["Europe/Amsterdam", "Europe/London"]
SPECS = [
    "mon-fri 08:00-17:00",
    "mon-sun 00:00-02:30",
    "mon-sun 02:30-24:00",
    "mon-sun 00:00-02:30,03:00-24:00",
    "mon-sun 02:00-03:00",
    "sat-sun 01:00-02:00,02:15-02:45; mon-fri 08:00-12:30,13:30-17:00",
    "sun 00:00-24:00",
]
_UTC = datetime.UTC
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=_UTC)
_END = datetime.datetime(2100, 12, 31, 23, 59, tzinfo=_UTC)


def _switches(zone: zoneinfo.ZoneInfo, year: int) -> list[datetime.datetime]:
    """The instants (UTC) at which ``zone``'s offset changes in ``year`` (days, then hours)."""
    out = []
    t = datetime.datetime(year, 1, 1, tzinfo=_UTC)
    day, hour = datetime.timedelta(days=1), datetime.timedelta(hours=1)
    while t.year == year:
        if (t + day).astimezone(zone).utcoffset() != t.astimezone(zone).utcoffset():
            h = t
            while h < t + day:
                if (h + hour).astimezone(zone).utcoffset() != h.astimezone(zone).utcoffset():
                    out.append(h + hour)
                h += hour
        t += day
    return out


_SWITCH_CACHE: dict[tuple[str, int], list[datetime.datetime]] = {}


def switches(zone: str, year: int) -> list[datetime.datetime]:
    key = (zone, year)
    if key not in _SWITCH_CACHE:
        _SWITCH_CACHE[key] = _switches(zoneinfo.ZoneInfo(zone), year)
    return _SWITCH_CACHE[key]


def reference_open(hours: OpeningHours, at: datetime.datetime) -> bool:
    """Open at ``at`` by brute force: the wall clock is UTC plus the zone's offset then."""
    utc = at.astimezone(_UTC)
    offset = hours.zone.utcoffset(utc.astimezone(hours.zone))
    assert offset is not None
    wall = utc.replace(tzinfo=None) + offset
    if wall.date() in hours.closed_dates:
        return False
    minute = wall.hour * 60 + wall.minute
    return any(r.start <= minute < r.end for r in hours.week[wall.weekday()])


@st.composite
def instants(draw: st.DrawFn, zone: str, week: tuple[tuple[Range, ...], ...]) -> datetime.datetime:
    """Within hours of a DST switch of a year in 1970-2100, at a range's edge on a switch's
    day or the days either side of it (either pass of a time passed twice, a second either
    side), or anywhere in those years."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        seconds = draw(st.integers(0, int((_END - _EPOCH).total_seconds())))
        return _EPOCH + datetime.timedelta(seconds=seconds)
    year = draw(st.integers(1970, 2100))
    # A year with no DST (Amsterdam before 1977): its middle.
    found = switches(zone, year) or [datetime.datetime(year, 7, 1, tzinfo=_UTC)]
    base = draw(st.sampled_from(found))
    if kind <= 2:
        tz = zoneinfo.ZoneInfo(zone)
        day = base.astimezone(tz).date() + datetime.timedelta(days=draw(st.integers(-1, 1)))
        edges = [m for r in week[day.weekday()] for m in (r.start, r.end)] or [0]
        wall = datetime.datetime.combine(day, datetime.time())
        wall += datetime.timedelta(minutes=draw(st.sampled_from(edges)))
        at = wall.replace(tzinfo=tz, fold=draw(st.integers(0, 1))).astimezone(_UTC)
        return at + datetime.timedelta(seconds=draw(st.sampled_from([-1, 0, 1])))
    near = st.integers(-3 * 3600, 3 * 3600) | st.integers(-2 * 86400, 2 * 86400)
    near |= st.sampled_from([-3600, -1800, -1, 0, 1, 1799, 1800, 3599, 3600])
    return base + datetime.timedelta(seconds=draw(near))


@given(st.sampled_from(ZONES), st.sampled_from(SPECS), st.data())
def test_open_is_the_wall_clocks_ranges_at_any_instant(
    zone_name: str, spec: str, data: st.DataObject
) -> None:
    zone = zoneinfo.ZoneInfo(zone_name)
    week = parse_week(spec)
    at = data.draw(instants(zone_name, week))
    day = at.astimezone(zone).date()
    # Closed dates on the day itself, or the days around it (the switch's eve and morrow).
    closed = data.draw(
        st.frozensets(st.integers(-1, 1).map(lambda n: day + datetime.timedelta(days=n)))
    )
    hours = OpeningHours(week, zone, closed)
    assert hours.is_open(at) == reference_open(hours, at), (at, at.astimezone(zone))
    assert hours.is_open(at.timestamp()) == hours.is_open(at)
    nxt = hours.next_opening(at)
    if nxt is None:
        return
    # "We open again at ...": a real opening, not before now, and nothing between is open.
    assert nxt.astimezone(_UTC) >= at and reference_open(hours, nxt)
    # Every range is 30 minutes long at least: steps of 15 minutes cannot jump one, and
    # the last hour before the opening is looked at minute by minute.
    t = at
    while t < nxt:
        assert not reference_open(hours, t), (at, t, nxt)
        far = nxt - t > datetime.timedelta(hours=1)
        t += datetime.timedelta(minutes=15 if far else 1)


@pytest.mark.parametrize("zone_name", ZONES)
@pytest.mark.parametrize("year", [1977, 1996, 2026, 2100])
def test_the_switch_days_as_the_readme_says(zone_name: str, year: int) -> None:
    """Spring: a range the clocks skip does not open; autumn: one passed twice opens twice."""
    zone = zoneinfo.ZoneInfo(zone_name)
    spring, autumn = switches(zone_name, year)
    minute = datetime.timedelta(minutes=1)
    # Amsterdam jumps 02:00 -> 03:00, London 01:00 -> 02:00: the hour the clocks skip.
    skipped = (spring - minute).astimezone(zone).hour + 1
    twice = OpeningHours(parse_week(f"mon-sun {skipped:02d}:15-{skipped:02d}:45"), zone)
    day = spring.astimezone(zone).date()
    start = datetime.datetime.combine(day, datetime.time(), zone).astimezone(_UTC)
    assert not any(twice.is_open(start + n * minute) for n in range(24 * 60))
    assert twice.is_open(autumn - 30 * minute) and twice.is_open(autumn + 30 * minute)
    assert not twice.is_open(autumn) and not twice.is_open(autumn - 60 * minute)
    # A closed date closes the whole local day, the hour passed twice included.
    shut = OpeningHours(
        twice.week, zone, parse_closed_dates(autumn.astimezone(zone).date().isoformat())
    )
    assert not shut.is_open(autumn - 30 * minute) and not shut.is_open(autumn + 30 * minute)


# -- whole calls around closing time and DST switches -------------------------------------------

# Instants (UTC) a call starts at: seconds before a weekday's 17:00 close and 08:00 opening in
# Amsterdam, before the spring-forward and fall-back switches of 2026 (Sundays: the DST specs
# open every day), and the midnight a closed date starts at.
_AMS = zoneinfo.ZoneInfo("Europe/Amsterdam")
_STARTS = {
    "friday 17:00": datetime.datetime(2026, 12, 4, 17, 0, tzinfo=_AMS),
    "monday 08:00": datetime.datetime(2026, 12, 7, 8, 0, tzinfo=_AMS),
    "spring forward": datetime.datetime(2026, 3, 29, 1, 0, tzinfo=_UTC),
    "fall back": datetime.datetime(2026, 10, 25, 1, 0, tzinfo=_UTC),
    "christmas day 00:00": datetime.datetime(2026, 12, 25, 0, 0, tzinfo=_AMS),
}
SHIPPED = Path(__file__).resolve().parents[2] / "ivr_flows"
DANGER_NO = ["1", "2", "2", "2", "2", "2"]  # yourself, five danger signs: no
_CALL_SPECS = ["mon-fri 08:00-17:00", "mon-sun 00:00-02:30", "mon-sun 02:30-24:00"]


class ClockWorld(World):
    """The desk's hours read off a clock the test moves (seconds since the epoch)."""

    def __init__(self, hours: OpeningHours, now: float) -> None:
        super().__init__()
        self.hours = hours
        self.now = now

    @property
    def open(self) -> bool:
        return self.hours.is_open(self.now)

    @open.setter
    def open(self, value: bool) -> None:
        # test_prop_engine's "clock" move: a minute passes.
        if hasattr(self, "now"):
            self.now += 60


def _tick(now: float, boundary: float, cross: bool, data: st.DataObject) -> float:
    """The clock before the next event: over the boundary when ``cross``, else a little on
    (kept before the boundary until then)."""
    if cross:
        return max(now, boundary + data.draw(st.sampled_from([0.0, 1.0, 30.0])))
    later = now + data.draw(st.sampled_from([0.0, 0.05, 0.1]))
    return later if now >= boundary or later < boundary else now


NOTICE_START = "The practice is closed."
# The advice a triage verdict's outcome stands for: said to a caller whose record has it.
ADVICE = {"same_day": "see a doctor today", "within_24h": "see a doctor within 24 hours"}


def _check_told(d: Driver) -> None:
    """The record says what the caller heard."""
    record = d.stores[0]
    said = " ".join(p.text for p in d.plays)
    if record.outcome == "transfer_staff":
        assert STAFF in d.transfers, "transfer_staff with no transfer to staff"
    if record.outcome == OUT_OF_HOURS_OUTCOME:
        assert NOTICE_START in said, "out_of_hours, and the caller was never told"
        assert record.transfer_target != STAFF
    closed_steps = sum(1 for s in d.state.path if s.input == "closed")
    assert closed_steps <= said.count(NOTICE_START), "a closed desk not told to the caller"
    advice = ADVICE.get(record.outcome)
    if advice and d.bot_hung_up and not d.transfers:
        assert advice in said, f"{record.outcome} recorded, never said: {said[-200:]}"


@pytest.mark.parametrize("flow_id", FLOW_IDS)
@given(data=st.data())
def test_a_call_across_a_boundary_tells_the_caller_what_its_record_says(
    flow_id: str, data: st.DataObject
) -> None:
    draw = data.draw
    start = draw(st.sampled_from(sorted(_STARTS)), label="start")
    spec = draw(st.sampled_from(_CALL_SPECS), label="hours")
    closed = parse_closed_dates("2026-12-25")
    hours = OpeningHours(parse_week(spec), _AMS, closed)
    # The boundary passes just before the event ``cross`` (any decision may be the first
    # after it); seconds pass between the events.
    boundary = _STARTS[start].timestamp()
    cross = draw(st.integers(0, 40), label="events before the boundary")
    world = ClockWorld(hours, boundary - 1 - 0.1 * cross)
    d = _start(flow_id, world, draw(st.booleans(), label="speech"), "urgency")
    typed: deque[str] = deque()
    while d.state.phase is not Phase.ENDED and d.events < MAX_EVENTS:
        world.now = _tick(world.now, boundary, d.events == cross, data)
        _move(data, d, typed)
    if d.state.phase is not Phase.ENDED:
        _hang_up(data, d, "")
    _check_end(d)
    _check_told(d)


# -- the triage's verdicts around closing time ------------------------------------------------

# Answers that reach each verdict of the shipped triage (a random caller seldom gets there).
U1 = ["1", "1"]  # yourself; serious difficulty breathing
U2 = [*DANGER_NO, "4", "1", "5"]  # short of breath at rest
U3 = [*DANGER_NO, "5", "2", "2", "1", "5"]  # stomach: vomiting, no belly pain, blood
U4 = [*DANGER_NO, "4", "2", "2", "1", "2", "5"]  # cough over three weeks
VERDICTS = {"U1": U1, "U2": U2, "U3": U3, "U4": U4}


@pytest.mark.parametrize("start", sorted(_STARTS))
@given(st.sampled_from(sorted(VERDICTS)), st.data())
def test_a_triage_verdict_across_a_boundary_is_told_and_urgent_callers_put_through(
    start: str, verdict: str, data: st.DataObject
) -> None:
    """The scripted caller reaches a verdict while the clock runs over closing (or opening)
    time or a DST switch: at any of its events, or while a webhook or a transfer is under
    way (its result comes after the boundary); the scheduling system and the transfers
    answer as drawn."""
    draw = data.draw
    spec = _CALL_SPECS[0] if "00" in start or "christmas" in start else None
    spec = spec or draw(st.sampled_from(_CALL_SPECS[1:]))
    hours = OpeningHours(parse_week(spec), _AMS, parse_closed_dates("2026-12-25"))
    boundary = _STARTS[start].timestamp()
    at_result = draw(st.sampled_from(["", "webhook", "transfer"]))
    cross = -1 if at_result else draw(st.integers(0, 2 * len(VERDICTS[verdict]) + 6))
    world = ClockWorld(hours, boundary - 1 - 0.1 * max(cross, 0))
    d = _start("triage", world, False, "urgency")
    typed = deque(VERDICTS[verdict])
    while d.state.phase is not Phase.ENDED:
        assert d.events < MAX_EVENTS
        world.now = _tick(world.now, boundary, d.events == cross, data)
        if d.playing:
            _handle(d, PromptDone())
        elif d.owed:
            kind = draw(st.sampled_from(d.owed))
            if kind == at_result:
                world.now = _tick(world.now, boundary, True, data)
            _handle(d, _result(data, kind))
        elif d.state.phase is Phase.LISTENING and typed:
            _handle(d, Digit(typed.popleft()))
        else:
            _hang_up(data, d, "")
    _check_end(d)  # a caller at U2 or more ends put through (test_prop_engine)
    _check_told(d)
    if verdict in {"U1", "U2"}:
        assert d.transfers, "an urgent caller never put through"


# -- regressions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("answers", "outcome"), [(U3, "same_day"), (U4, "within_24h")])
def test_a_triage_verdict_reached_before_closing_is_said_after_it(
    answers: list[str], outcome: str
) -> None:
    """The triage branches on the hours (open), the scheduling system then fails after 17:00:
    the caller is told the verdict and the out-of-hours service, as a caller who called after
    17:00 is, not only the practice's hours (with "if it cannot wait until then")."""
    now = [datetime.datetime(2026, 12, 4, 16, 59, 55, tzinfo=_AMS).timestamp()]
    hours = OpeningHours(parse_week("mon-fri 08:00-17:00"), _AMS)
    params = FlowParams(
        open_now=lambda: hours.is_open(now[0]),
        opening_hours=hours,
        out_of_hours_number="088 123 45 67",
    )
    engine = Engine(load_flows(SHIPPED), params)
    state, actions = engine.start(engine.flowset.get("triage"))
    said: list[str] = []
    typed = deque(answers)
    for _ in range(100):
        said += [a.text for a in actions if isinstance(a, Play)]
        assert not any(isinstance(a, TransferCall) for a in actions)
        if state.phase is Phase.ENDED:
            break
        if any(isinstance(a, PostWebhook) for a in actions):
            now[0] += 10  # the scheduling system times out: 17:00:05 by now
            state, actions = engine.handle(state, WebhookResult(False, {}))
        elif state.phase is Phase.PLAYING:
            state, actions = engine.handle(state, PromptDone())
        else:
            state, actions = engine.handle(state, Digit(typed.popleft()))
    store = actions[-1]
    assert isinstance(store, Store)
    assert store.record.outcome == outcome
    assert store.record.urgency in {Urgency.U3, Urgency.U4}
    assert ADVICE[outcome] in said[-1]
    assert "call the out-of-hours GP service on 0 8 8, 1 2 3, 4 5, 6 7" in said[-1]


def test_an_instant_given_as_a_skipped_wall_time_is_read_as_the_instant() -> None:
    """02:30 on Amsterdam's spring-forward night names no wall time; as an aware datetime
    (zoneinfo: fold 0, the offset before the switch) it is the instant 01:30 UTC, which the
    clock shows as 03:30 CEST. A range the clocks skip is not open at it, the hour after is."""
    skipped = datetime.datetime(2026, 3, 29, 2, 30, tzinfo=_AMS)
    gap = OpeningHours(parse_week("sun 02:00-03:00"), _AMS)
    after = OpeningHours(parse_week("sun 03:00-04:00"), _AMS)
    assert gap.local(skipped) == datetime.datetime(2026, 3, 29, 3, 30, tzinfo=_AMS)
    assert gap.local(skipped).utcoffset() == datetime.timedelta(hours=2)
    assert not gap.is_open(skipped)
    assert after.is_open(skipped)
    assert gap.is_open(skipped) == gap.is_open(skipped.timestamp())
