"""Opening hours, table-driven: the spec, open at an instant, the next opening, DST and midnight.

Europe/Amsterdam in 2026: clocks go forward on Sunday 29 March at 02:00 CET (01:00 UTC) to
03:00 CEST, and back on Sunday 25 October at 03:00 CEST (01:00 UTC) to 02:00 CET.
"""

from __future__ import annotations

import datetime
import zoneinfo

import pytest

from voice.ivr.opening_hours import (
    OpeningHours,
    Range,
    always_open,
    parse_closed_dates,
    parse_week,
)

AMS = zoneinfo.ZoneInfo("Europe/Amsterdam")
UTC = datetime.UTC
# Sunday's range lies wholly in the spring-forward gap, and is passed twice at fall-back.
SPEC = "mon-fri 08:00-12:30,13:30-17:00; sat 09:00-12:00; sun 02:15-02:45"
HOURS = OpeningHours(parse_week(SPEC), AMS)
NIGHT = OpeningHours(
    parse_week("fri 22:00-24:00; sat 00:00-02:00"),
    AMS,
    parse_closed_dates("2026-12-26"),
)
XMAS = OpeningHours(parse_week(SPEC), AMS, parse_closed_dates("2026-12-25,2026-12-26"))


def utc(y: int, mo: int, d: int, h: int, mi: int) -> datetime.datetime:
    return datetime.datetime(y, mo, d, h, mi, tzinfo=UTC)


def local(y: int, mo: int, d: int, h: int, mi: int) -> datetime.datetime:
    return datetime.datetime(y, mo, d, h, mi, tzinfo=AMS)


def test_parse_week() -> None:
    week = parse_week(" Mon-Wed,fri 08:00-12:30 ,13:30-17:00 ; sat 09:00-12:00; ")
    morning, afternoon = Range(8 * 60, 12 * 60 + 30), Range(13 * 60 + 30, 17 * 60)
    assert week == (
        (morning, afternoon),
        (morning, afternoon),
        (morning, afternoon),
        (),
        (morning, afternoon),
        (Range(9 * 60, 12 * 60),),
        (),
    )
    assert parse_week("sun 00:00-24:00")[6] == (Range(0, 1440),)


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("", "expected e.g."),
        ("mon-fri", "expected days then ranges"),
        ("monday 08:00-17:00", "is not a day"),
        ("fri-mon 08:00-17:00", "runs backwards"),
        ("mon 8:00-17:00", "is not a time"),
        ("mon 08:00-24:01", "past 24:00"),
        ("mon 08:60-17:00", "is not a time"),
        ("mon 17:00-08:00", "ends before it starts"),
        ("mon 08:00-08:00", "ends before it starts"),
        ("mon 08:00", "is not a range"),
        ("mon 08:00-12:00,11:00-17:00", "ranges overlap"),
        ("mon-fri 08:00-17:00; fri 18:00-20:00", "fri is named twice"),
    ],
)
def test_a_bad_spec_says_why(spec: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_week(spec)


def test_closed_dates() -> None:
    assert parse_closed_dates("") == frozenset()
    assert parse_closed_dates("2026-12-25, 2026-12-26,") == {
        datetime.date(2026, 12, 25),
        datetime.date(2026, 12, 26),
    }
    for bad in ("2026-02-30", "25-12-2026", "2026-1-5", "tomorrow"):
        with pytest.raises(ValueError, match="not a date YYYY-MM-DD"):
            parse_closed_dates(bad)


# (what, hours, instant, open)
OPEN_AT: list[tuple[str, OpeningHours, datetime.datetime, bool]] = [
    ("winter: 08:00 CET is 07:00 UTC", HOURS, utc(2026, 3, 27, 7, 0), True),
    ("winter: a minute before", HOURS, utc(2026, 3, 27, 6, 59), False),
    ("lunch starts at 12:30", HOURS, utc(2026, 3, 27, 11, 30), False),
    ("the last minute of the morning", HOURS, utc(2026, 3, 27, 11, 29), True),
    ("17:00 is closed", HOURS, utc(2026, 3, 27, 16, 0), False),
    ("16:59:59 is open", HOURS, utc(2026, 3, 27, 15, 59) + datetime.timedelta(seconds=59), True),
    ("summer: 08:00 CEST is 06:00 UTC", HOURS, utc(2026, 3, 30, 6, 0), True),
    ("summer: 07:00 UTC is 09:00, open", HOURS, utc(2026, 3, 30, 7, 0), True),
    ("summer: 15:30 UTC is 17:30, closed", HOURS, utc(2026, 3, 30, 15, 30), False),
    ("spring forward: 02:15-02:45 never comes", HOURS, utc(2026, 3, 29, 0, 59), False),
    ("spring forward: the switch reads 03:00", HOURS, utc(2026, 3, 29, 1, 0), False),
    ("fall back: 02:30 CEST, first pass", HOURS, utc(2026, 10, 25, 0, 30), True),
    ("fall back: 02:30 CET, second pass", HOURS, utc(2026, 10, 25, 1, 30), True),
    ("fall back: 03:00 CET", HOURS, utc(2026, 10, 25, 2, 0), False),
    ("a day in no group is closed", HOURS, local(2026, 12, 6, 10, 0), False),
    ("3 a.m. on a weekday", HOURS, local(2026, 12, 8, 3, 0), False),
    ("midnight: Friday 23:59", NIGHT, local(2026, 12, 4, 23, 59), True),
    ("midnight: Saturday 00:00", NIGHT, local(2026, 12, 5, 0, 0), True),
    ("midnight: Saturday 01:59", NIGHT, local(2026, 12, 5, 1, 59), True),
    ("midnight: Saturday 02:00", NIGHT, local(2026, 12, 5, 2, 0), False),
    ("midnight: Thursday 23:59", NIGHT, local(2026, 12, 3, 23, 59), False),
    ("a closed date starts at local midnight", NIGHT, local(2026, 12, 26, 0, 0), False),
    ("the evening before it", NIGHT, local(2026, 12, 25, 23, 59), True),
    ("Christmas at 10:00", XMAS, local(2026, 12, 25, 10, 0), False),
    ("Christmas Eve at 10:00", XMAS, local(2026, 12, 24, 10, 0), True),
    ("always open", always_open(AMS), local(2026, 12, 6, 3, 0), True),
    (
        "always open but a closed date",
        always_open(AMS, parse_closed_dates("2026-12-06")),
        local(2026, 12, 6, 3, 0),
        False,
    ),
]


@pytest.mark.parametrize(
    ("hours", "at", "expected"), [row[1:] for row in OPEN_AT], ids=[row[0] for row in OPEN_AT]
)
def test_open_at(hours: OpeningHours, at: datetime.datetime, expected: bool) -> None:
    assert hours.is_open(at) is expected
    assert hours.is_open(at.timestamp()) is expected  # POSIX seconds, as the clock gives


def test_a_naive_time_is_no_instant() -> None:
    with pytest.raises(ValueError, match="naive"):
        HOURS.is_open(datetime.datetime(2026, 12, 7, 10, 0))


NEXT: list[tuple[str, OpeningHours, datetime.datetime, datetime.datetime | None]] = [
    ("open now: now", HOURS, utc(2026, 3, 27, 7, 0), utc(2026, 3, 27, 7, 0)),
    ("lunch: 13:30", HOURS, local(2026, 3, 27, 12, 45), local(2026, 3, 27, 13, 30)),
    (
        "over spring forward: Sunday's range is skipped, Monday 08:00 CEST",
        HOURS,
        local(2026, 3, 28, 12, 0),
        utc(2026, 3, 30, 6, 0),
    ),
    (
        "a range begun in the gap opens at the switch",
        OpeningHours(parse_week("sun 02:30-04:00"), AMS),
        local(2026, 3, 28, 12, 0),
        utc(2026, 3, 29, 1, 0),
    ),
    ("fall back: the first pass", HOURS, local(2026, 10, 24, 12, 0), utc(2026, 10, 25, 0, 15)),
    (
        "fall back: after the first pass, the second",
        HOURS,
        utc(2026, 10, 25, 1, 5),
        utc(2026, 10, 25, 1, 15),
    ),
    (
        "fall back: clocks going back into a range open it again at the switch",
        OpeningHours(parse_week("sun 00:00-02:30"), AMS),
        utc(2026, 10, 25, 0, 40),
        utc(2026, 10, 25, 1, 0),
    ),
    ("after midnight's range", NIGHT, local(2026, 12, 5, 2, 0), local(2026, 12, 11, 22, 0)),
    (
        "over closed dates (Friday and Saturday): Sunday night's range",
        XMAS,
        local(2026, 12, 24, 17, 0),
        local(2026, 12, 27, 2, 15),
    ),
    ("never", OpeningHours(((),) * 7, AMS), local(2026, 12, 24, 17, 0), None),
]


@pytest.mark.parametrize(
    ("hours", "at", "expected"), [row[1:] for row in NEXT], ids=[row[0] for row in NEXT]
)
def test_next_opening(
    hours: OpeningHours, at: datetime.datetime, expected: datetime.datetime | None
) -> None:
    got = hours.next_opening(at)
    if expected is None:
        assert got is None
        return
    assert got is not None
    assert got.astimezone(UTC) == expected.astimezone(UTC)
    assert got.tzinfo is AMS
    assert hours.is_open(got)


def test_described_for_the_closed_notice() -> None:
    assert HOURS.describe() == (
        "Monday to Friday, 8 a.m. to 12:30 p.m., and 1:30 p.m. to 5 p.m.; Saturday, 9 a.m. "
        "to noon; Sunday, 2:15 a.m. to 2:45 a.m."
    )
    assert OpeningHours(parse_week("mon,wed 08:00-24:00"), AMS).describe() == (
        "Monday, 8 a.m. to midnight; Wednesday, 8 a.m. to midnight"
    )
    assert OpeningHours(parse_week("mon-fri 08:00-17:30"), AMS).describe("ko") == (
        "월요일부터 금요일까지 8시부터 17시 30분까지"
    )
    assert always_open(AMS).describe() == ""
