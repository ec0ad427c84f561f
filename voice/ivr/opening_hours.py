"""The practice's opening hours: when the staff desk is staffed, as plain rules on instants.

Pure: no clock is read here. The service asks :meth:`OpeningHours.is_open` with its clock's
time; tests pass the instants they want. Hours are wall-clock times in the clinic's time zone
(``CLINIC_TIMEZONE``), so a DST switch moves nothing: "08:00" is 08:00 local in winter and in
summer, and the zone turns an instant into that wall clock.

The spec (``CLINIC_OPENING_HOURS``)::

    mon-fri 08:00-12:30,13:30-17:00; sat 09:00-12:00

Groups are separated by ``;``. A group is days (``mon``, ``mon-fri``, ``mon,wed,fri``; the
names ``mon tue wed thu fri sat sun``) and one or more ranges ``HH:MM-HH:MM`` separated by
``,``. A range starts at its first minute and ends before its last (``08:00-17:00`` is open
at 16:59, closed at 17:00); ``24:00`` ends a day, and a range past midnight is written as two
(``fri 22:00-24:00; sat 00:00-02:00``). A day named in no group is closed all day; a day in
two groups, or overlapping ranges, is an error (a typo must not open the desk at night).
Closed dates (``CLINIC_CLOSED_DATES``: ``2026-12-25,2026-12-26``) close whole local days.
"""

from __future__ import annotations

import datetime
import itertools
import re
from dataclasses import dataclass

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # datetime.weekday() order
_DAY_NAMES = {
    "en": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "ko": ("월요일", "화요일", "수요일", "목요일", "금요일", "토요일", "일요일"),
}
_TIME = re.compile(r"([01][0-9]|2[0-4]):([0-5][0-9])")
# How far next_opening looks: a year of closed dates plus a week.
_HORIZON_DAYS = 366 + 7


@dataclass(frozen=True, slots=True, order=True)
class Range:
    """Open from minute ``start`` of the local day up to (not including) minute ``end``."""

    start: int
    end: int

    def __contains__(self, minute: int) -> bool:
        return self.start <= minute < self.end


@dataclass(frozen=True, slots=True)
class OpeningHours:
    """Weekly ranges (Monday first), closed dates and the zone they are read in."""

    week: tuple[tuple[Range, ...], ...]
    zone: datetime.tzinfo
    closed_dates: frozenset[datetime.date] = frozenset()

    def local(self, at: datetime.datetime | float) -> datetime.datetime:
        """``at`` (an aware datetime, or POSIX seconds) as the clinic's wall clock."""
        if isinstance(at, int | float):
            return datetime.datetime.fromtimestamp(at, self.zone)
        if at.tzinfo is None:
            raise ValueError("a naive datetime is no instant: give it a zone")
        # Through UTC: astimezone to the datetime's own tzinfo changes nothing, so a wall time
        # the clocks skip (02:30 on a spring-forward night, fold 0: the offset before the
        # switch) would be read as itself; its instant shows as the hour after it (03:30).
        return at.astimezone(datetime.UTC).astimezone(self.zone)

    def is_open(self, at: datetime.datetime | float) -> bool:
        """Whether the desk is open at the instant ``at``."""
        wall = self.local(at)
        if wall.date() in self.closed_dates:
            return False
        minute = wall.hour * 60 + wall.minute
        return any(minute in r for r in self.week[wall.weekday()])

    def next_opening(self, at: datetime.datetime | float) -> datetime.datetime | None:
        """The first instant from ``at`` on at which the desk is open (``at`` itself when it
        is open), in the clinic's zone; ``None`` when it never opens within a year."""
        wall = self.local(at)
        if self.is_open(wall):
            return wall
        # Instants are compared in UTC: two datetimes of one tzinfo compare by their wall
        # clocks, fold ignored, so the two passes of 02:15 on a fall-back night are "equal".
        now = wall.astimezone(datetime.UTC)
        for offset in range(_HORIZON_DAYS):
            day = wall.date() + datetime.timedelta(days=offset)
            if day in self.closed_dates:
                continue
            ranges = self.week[day.weekday()]
            if not ranges:
                continue
            # The desk opens where the wall clock enters a range: at its start, or at a
            # fall-back switch that turns the clock back into it (02:30 CEST closes a range
            # of 00:00-02:30, and 02:00 CET opens it again).
            candidates = [s for r in ranges for s in _starts(day, r.start, self.zone)]
            candidates += _fall_back(day, self.zone)
            # A range wholly in a spring-forward gap never opens that day: is_open says so at
            # its start (the first instant after the gap).
            opened = [c for c in candidates if c > now and self.is_open(c)]
            if opened:
                return min(opened).astimezone(self.zone)
        return None

    def describe(self, language: str = "en") -> str:
        """The weekly hours as a sentence for a prompt ("Monday to Friday, 8 a.m. to 5
        p.m.; Saturday, 9 a.m. to noon"): consecutive days with the same ranges merge."""
        if self.week == ALWAYS:
            return ""  # no weekly hours to tell (closed dates alone)
        names = _DAY_NAMES.get(language, _DAY_NAMES["en"])
        groups: list[tuple[int, int, tuple[Range, ...]]] = []
        for i, ranges in enumerate(self.week):
            if not ranges:
                continue
            if groups and groups[-1][1] == i - 1 and groups[-1][2] == ranges:
                groups[-1] = (groups[-1][0], i, ranges)
            else:
                groups.append((i, i, ranges))
        parts = []
        for first, last, ranges in groups:
            if language == "ko":
                days = names[first] if first == last else f"{names[first]}부터 {names[last]}까지"
                times = ", ".join(
                    f"{_clock_ko(r.start)}부터 {_clock_ko(r.end)}까지" for r in ranges
                )
                parts.append(f"{days} {times}")
            else:
                days = names[first] if first == last else f"{names[first]} to {names[last]}"
                times = ", and ".join(f"{_clock_en(r.start)} to {_clock_en(r.end)}" for r in ranges)
                parts.append(f"{days}, {times}")
        return "; ".join(parts)


def _starts(day: datetime.date, minute: int, zone: datetime.tzinfo) -> list[datetime.datetime]:
    """In UTC, the first instants at which the wall clock of ``zone`` reads ``minute`` of ``day`` or
    later: one, or two when the clocks pass that time twice (fall back). A time they skip
    (spring forward) starts at the switch, the first instant past the gap."""
    naive = datetime.datetime.combine(day, datetime.time()) + datetime.timedelta(minutes=minute)
    # PEP 495: fold=0 reads a time with the offset before a switch, fold=1 with the one after.
    first = naive.replace(tzinfo=zone).astimezone(datetime.UTC)
    second = naive.replace(tzinfo=zone, fold=1).astimezone(datetime.UTC)
    if first.astimezone(zone).replace(tzinfo=None) != naive:
        # In a gap: fold=1 lands before it and fold=0 after it; the switch lies between.
        lo, hi = int(second.timestamp()), int(first.timestamp())
        while hi - lo > 1:
            mid = (lo + hi) // 2
            wall = datetime.datetime.fromtimestamp(mid, zone).replace(tzinfo=None)
            lo, hi = (mid, hi) if wall < naive else (lo, mid)
        return [datetime.datetime.fromtimestamp(hi, datetime.UTC)]
    return sorted({first, second})


def _fall_back(day: datetime.date, zone: datetime.tzinfo) -> list[datetime.datetime]:
    """In UTC, the instant during local ``day`` (its end included) at which the clocks of
    ``zone`` go back, if they do: the first instant of the second pass."""
    lo = int(_starts(day, 0, zone)[0].timestamp())
    hi = int(_starts(day + datetime.timedelta(days=1), 0, zone)[0].timestamp())

    def offset(t: int) -> datetime.timedelta | None:
        return datetime.datetime.fromtimestamp(t, zone).utcoffset()

    before, after = offset(lo), offset(hi)
    if before is None or after is None or after >= before:
        return []
    # One switch a day at most: the offset is ``before`` up to it and ``after`` from it.
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if offset(mid) == before else (lo, mid)
    return [datetime.datetime.fromtimestamp(hi, datetime.UTC)]


def _clock_en(minute: int) -> str:
    hour, mins = divmod(minute, 60)
    if minute in (0, 24 * 60):
        return "midnight"
    if minute == 12 * 60:
        return "noon"
    suffix = "a.m." if hour < 12 else "p.m."
    hour12 = hour % 12 or 12
    return f"{hour12}:{mins:02d} {suffix}" if mins else f"{hour12} {suffix}"


def _clock_ko(minute: int) -> str:
    hour, mins = divmod(minute, 60)
    return f"{hour}시 {mins}분" if mins else f"{hour}시"


def _minute(text: str) -> int:
    m = _TIME.fullmatch(text)
    if not m:
        raise ValueError(f"{text!r} is not a time HH:MM (00:00..24:00)")
    minute = int(m.group(1)) * 60 + int(m.group(2))
    if minute > 24 * 60:
        raise ValueError(f"{text!r} is past 24:00")
    return minute


def _days(text: str) -> list[int]:
    out: list[int] = []
    for item in text.split(","):
        first, dash, last = item.strip().lower().partition("-")
        if first not in DAYS or (dash and last not in DAYS):
            raise ValueError(f"{item.strip()!r} is not a day or days (mon..sun, mon-fri)")
        lo = DAYS.index(first)
        hi = DAYS.index(last) if dash else lo
        if hi < lo:
            raise ValueError(f"{item.strip()!r} runs backwards (write sat-sun, not sun-sat)")
        out += range(lo, hi + 1)
    return out


def parse_week(spec: str) -> tuple[tuple[Range, ...], ...]:
    """The weekly ranges of a ``CLINIC_OPENING_HOURS`` spec; :class:`ValueError` says why not.

    An empty spec is an error here: "always open" is the setting left unset.
    """
    week: list[list[Range] | None] = [None] * 7
    groups = [g.strip() for g in spec.split(";")]
    if not any(groups):
        raise ValueError("expected e.g. 'mon-fri 08:00-17:00; sat 09:00-12:00'")
    for group in groups:
        if not group:
            continue  # a trailing ";"
        days_text, _, ranges_text = group.partition(" ")
        if not ranges_text.strip():
            raise ValueError(f"{group!r}: expected days then ranges, e.g. 'mon-fri 08:00-17:00'")
        ranges: list[Range] = []
        for item in ranges_text.split(","):
            start_text, dash, end_text = item.strip().partition("-")
            if not dash:
                raise ValueError(f"{item.strip()!r} is not a range HH:MM-HH:MM")
            r = Range(_minute(start_text.strip()), _minute(end_text.strip()))
            if r.end <= r.start:
                raise ValueError(
                    f"{item.strip()!r} ends before it starts (past midnight: two ranges, "
                    "'fri 22:00-24:00; sat 00:00-02:00')"
                )
            ranges.append(r)
        ranges.sort()
        for a, b in itertools.pairwise(ranges):
            if b.start < a.end:
                raise ValueError(f"{group!r}: ranges overlap")
        for day in _days(days_text):
            if week[day] is not None:
                raise ValueError(f"{DAYS[day]} is named twice")
            week[day] = ranges
    return tuple(tuple(d or ()) for d in week)


def parse_closed_dates(spec: str) -> frozenset[datetime.date]:
    """``2026-12-25,2026-12-26`` as dates; empty is none."""
    out: set[datetime.date] = set()
    for item in spec.split(","):
        if not item.strip():
            continue
        try:
            if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", item.strip()):
                raise ValueError
            out.add(datetime.date.fromisoformat(item.strip()))
        except ValueError:
            raise ValueError(f"{item.strip()!r} is not a date YYYY-MM-DD") from None
    return frozenset(out)


ALWAYS = tuple((Range(0, 24 * 60),) for _ in DAYS)


def always_open(
    zone: datetime.tzinfo, closed_dates: frozenset[datetime.date] = frozenset()
) -> OpeningHours:
    """The hours of a line with no ``CLINIC_OPENING_HOURS``: open at every instant but on
    ``closed_dates``."""
    return OpeningHours(ALWAYS, zone, closed_dates)
