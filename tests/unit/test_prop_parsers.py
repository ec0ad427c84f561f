"""Properties of the other parsers of outside input (pure): phone numbers and caller-IDs,
opening hours, and a webhook's reply. Each returns a value or raises its own error."""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import string
import zoneinfo

from hypothesis import assume, given
from hypothesis import strategies as st

from verification import numbers
from verification.errors import InvalidNumber, NumberRefused
from verification.model import Phone
from voice.ivr import opening_hours, webhook

# -- phone numbers and caller-IDs -----------------------------------------------------------

_EXAMPLES = ["+31612345678", "+447400123456", "+12015550123", "+821012345678", "+390612345678"]
_PHONE_TEXT = st.text("+0123456789 ()./-", max_size=34) | st.sampled_from(_EXAMPLES)
_PHONE = _PHONE_TEXT | st.text(max_size=34) | st.builds("{} ".format, st.sampled_from(_EXAMPLES))
_REGION = st.none() | st.sampled_from(["NL", "GB", "US", "KR", "IT", "XK", "ZZ", "nl", "N"])


@given(_PHONE, _REGION)
def test_parse_phone_gives_a_phone_or_invalid_number(raw: str, region: str | None) -> None:
    try:
        phone = numbers.parse_phone(raw, region)
    except InvalidNumber:
        return
    assert numbers.parse_phone(phone.e164) == phone  # its E.164 form is the same number
    with contextlib.suppress(NumberRefused):
        numbers.enforce_policy(phone, frozenset({"NL", "GB"}))


_PREFIXES = st.sampled_from(["+447400", "+3197010", "+1201555", "+8210", "+39061"])
_DESTINATIONS = st.sampled_from(_EXAMPLES).map(numbers.parse_phone)


@given(_PREFIXES, st.integers(4, 8), _DESTINATIONS, st.data())
def test_the_cli_filter_matches_the_code_it_carries(
    prefix: str, length: int, destination: Phone, data: st.DataObject
) -> None:
    code = data.draw(st.text("0123456789", min_size=length, max_size=length))
    exit_code = data.draw(st.sampled_from(["+", "00", ""]))
    digits = prefix.lstrip("+") + code
    assert numbers.code_from_cli(exit_code + digits, prefix, length, destination) == code
    # A handset may show a separator between any two digits, and after the + or 00.
    spaced = f"{exit_code} {' '.join(digits)}".lstrip()
    assert numbers.code_from_cli(spaced, prefix, length, destination) == code


@given(st.text(max_size=70) | _PHONE_TEXT, _PREFIXES, st.integers(4, 8), _DESTINATIONS)
def test_code_from_any_caller_id_is_none_or_the_digits(
    cli: str, prefix: str, length: int, destination: Phone
) -> None:
    code = numbers.code_from_cli(cli, prefix, length, destination)
    assert code is None or (len(code) == length and code.isascii() and code.isdigit())


# -- opening hours --------------------------------------------------------------------------

_TIME = st.sampled_from(["00:00", "08:00", "12:30", "17:00", "23:59", "24:00", "24:01", "8:00"])
_DAYS = st.sampled_from([*opening_hours.DAYS, "mon-fri", "sat-sun", "sun-mon", "MON", "x"])
_RANGE = st.builds("{}-{}".format, _TIME, _TIME)
_GROUP = st.builds(
    "{} {}".format,
    st.lists(_DAYS, min_size=1, max_size=3).map(",".join),
    st.lists(_RANGE, min_size=1, max_size=3).map(",".join),
)
_SPEC = st.lists(_GROUP, min_size=1, max_size=4).map("; ".join) | st.text(max_size=40)
_ZONES = st.sampled_from(["Europe/Amsterdam", "America/New_York", "Asia/Seoul", "UTC"])
_INSTANT = st.datetimes(
    min_value=datetime.datetime(2000, 1, 1), max_value=datetime.datetime(2090, 1, 1)
)


@given(_SPEC)
def test_parse_week_gives_ordered_ranges_or_value_error(spec: str) -> None:
    try:
        week = opening_hours.parse_week(spec)
    except ValueError:
        return
    assert len(week) == 7
    for ranges in week:
        for r in ranges:
            assert 0 <= r.start < r.end <= 24 * 60
        assert all(a.end <= b.start for a, b in itertools.pairwise(ranges))


@st.composite
def weeks(draw: st.DrawFn) -> tuple[tuple[opening_hours.Range, ...], ...]:
    """A valid week: each day's ranges sorted and apart (they may touch)."""
    week = []
    for _ in opening_hours.DAYS:
        edges = sorted(draw(st.sets(st.integers(0, 24 * 60), max_size=6)))
        if len(edges) % 2:
            edges.pop()
        week.append(
            tuple(opening_hours.Range(a, b) for a, b in zip(edges[::2], edges[1::2], strict=False))
        )
    return tuple(week)


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def _spec(week: tuple[tuple[opening_hours.Range, ...], ...]) -> str:
    return "; ".join(
        f"{day} " + ",".join(f"{_hhmm(r.start)}-{_hhmm(r.end)}" for r in ranges)
        for day, ranges in zip(opening_hours.DAYS, week, strict=True)
        if ranges
    )


@given(weeks(), _ZONES, _INSTANT, st.sampled_from(["en", "ko"]))
def test_hours_written_out_read_back_and_answer_for_any_instant(
    week: tuple[tuple[opening_hours.Range, ...], ...],
    zone: str,
    naive: datetime.datetime,
    language: str,
) -> None:
    assume(any(week))
    assert opening_hours.parse_week(_spec(week)) == week
    hours = opening_hours.OpeningHours(week, zoneinfo.ZoneInfo(zone))
    at = naive.replace(tzinfo=datetime.UTC)
    hours.describe(language)
    nxt = hours.next_opening(at)
    # Within a week, unless every range of the week falls in a spring-forward gap.
    assert nxt is None or (nxt >= at and hours.is_open(nxt))


@given(
    st.lists(
        st.sampled_from(["2026-12-25", "2026-02-30", "2026-1-1", " ", "x"]) | st.text(max_size=12)
    ).map(",".join)
)
def test_closed_dates_give_dates_or_value_error(spec: str) -> None:
    with contextlib.suppress(ValueError):
        opening_hours.parse_closed_dates(spec)


# -- a webhook's reply ----------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=10,
)


@given(
    st.binary(max_size=100)
    | _JSON.map(lambda v: json.dumps(v).encode())
    | st.integers(1, 20000).map(lambda n: b'{"a": ' * n)
    | st.integers(1, 20000).map(lambda n: b"[" * n + b"]" * n)
)
def test_a_reply_body_gives_text_values(body: bytes) -> None:
    values = webhook.reply_values(body)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in values.items())


@given(
    st.text(max_size=60) | st.builds("http://{}/x".format, st.text(string.printable, max_size=30))
)
def test_in_clear_reads_any_url(url: str) -> None:
    host = webhook.in_clear(url)
    assert host is None or (host and url.lower().startswith("http:"))
