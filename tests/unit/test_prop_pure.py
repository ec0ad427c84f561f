"""Properties of pure modules, each stated from the module's docstring or the README.

- :mod:`verification.numbers`: a flash call's caller-ID, in every form the README and
  ``cli_filter`` say a phone may show it, is matched and read back to its code, and a
  caller-ID that is none of those forms is not.
- :mod:`voice.ivr.opening_hours`: the next opening is open and nothing before it is, across
  DST switches and closed dates; a week written as a spec reads back the same.
- :mod:`voice.media.g711` and :mod:`voice.media.pcm`: round trips within the codec's error,
  lengths kept.
- :mod:`verification.wording` and :mod:`voice.media.spoken_code`: the code's digits, in order,
  and no other digits.
- :mod:`verification.limits`: fixed windows and their time to live; subjects as counted.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import re
import tempfile
import zoneinfo
from array import array
from collections.abc import Sequence
from pathlib import Path

import phonenumbers
from hypothesis import assume, given
from hypothesis import strategies as st

from sip_config.settings import Rate
from verification import codes, limits, numbers, wording
from verification.addresses import embedded_ipv4
from verification.model import Phone
from voice.ivr import opening_hours
from voice.ivr.opening_hours import OpeningHours, Range
from voice.media import g711, pcm, spoken_code
from voice.media.private_folder import PrivateFolder

_DIGITS = "0123456789"

# -- caller-IDs of flash calls ------------------------------------------------------------------

_REGIONS = ["GB", "NL", "US", "CA", "AU", "JP", "RU", "KZ", "IT", "ES", "DE", "KR", "BR", "IS"]
_REGIONS += ["JE", "CN", "CO", "PE", "FR", "BE", "SG", "NO", "MX", "AR", "IN", "HU", "FI", "NZ"]
_TYPES = [phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE]


def _example(region: str, kind: int) -> str | None:
    num = phonenumbers.example_number_for_type(region, kind)
    if num is None:
        return None
    return phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164)


_EXAMPLE_NUMBERS = sorted({e for r in _REGIONS for t in _TYPES if (e := _example(r, t))})


def _prefix_of(e164: str, length: int) -> str | None:
    """``e164`` less its last ``length`` digits, when that is a prefix flash calls may use
    (``serve`` refuses the others: sip_config/settings.py)."""
    prefix = e164[:-length]
    if len(prefix) - 1 + codes.MAX_LENGTH > 15 or length not in numbers.cli_code_lengths(prefix):
        return None
    return prefix


@st.composite
def flash_calls(draw: st.DrawFn) -> tuple[str, int, str, Phone]:
    """A prefix, a code length it is offered with, a code and a destination (half the time in
    the prefix's country, where the national forms apply)."""
    e164 = draw(st.sampled_from(_EXAMPLE_NUMBERS))
    # Now and then the whole national number: a prefix that is a country code alone (+47).
    national = phonenumbers.national_significant_number(phonenumbers.parse(e164))
    length = draw(st.integers(codes.MIN_LENGTH, codes.MAX_LENGTH) | st.just(len(national)))
    prefix = _prefix_of(e164, length)
    assume(prefix is not None)
    assert prefix is not None
    code = draw(st.text(_DIGITS, min_size=length, max_size=length))
    same = [e for e in _EXAMPLE_NUMBERS if e.startswith(prefix[:3])]
    dest = draw(st.sampled_from(same) | st.sampled_from(_EXAMPLE_NUMBERS))
    destination = numbers.parse_phone(dest)
    return prefix, length, code, destination


def _heads(prefix: str, destination: Phone) -> set[tuple[str, str]]:
    """The README's forms, as what comes before the code: (in front, digits). International
    with +, 00, the destination's exit code or nothing in front; national with and without the
    trunk prefix when the caller-ID is in the destination's country."""
    cc, national = numbers.split_country_code(prefix)
    intl = f"{cc}{national}"
    heads = {("+", intl), ("00", intl), ("", intl)}
    if idd := numbers.exit_code(destination.region):
        heads.add((idd, intl))
    if cc == destination.country_code:
        heads |= {("", numbers.trunk_prefix(destination.region) + national), ("", national)}
    return heads


def _written(head: tuple[str, str], code: str, seps: Sequence[str]) -> str:
    """``head`` and ``code`` with ``seps[i]`` (nothing, a space or a dash) before digit
    ``i + 1``: between digits, and after what is in front (not inside an exit code: no phone
    shows "0 0 44")."""
    front, digits = head
    out = front
    for i, c in enumerate(digits + code):
        out += (seps[i % len(seps)] if out else "") + c
    return out


_SEPS = st.lists(st.sampled_from(["", "", " ", "-"]), min_size=1, max_size=24)


@given(flash_calls(), st.data(), _SEPS)
def test_every_form_of_a_flash_callers_id_reads_back_to_its_code(
    call: tuple[str, int, str, Phone], data: st.DataObject, seps: list[str]
) -> None:
    prefix, length, code, destination = call
    heads = sorted(_heads(prefix, destination))
    head = data.draw(st.sampled_from(heads))
    cli = _written(head, code, seps)
    pattern = numbers.cli_filter(prefix, length, destination)
    assert re.fullmatch(pattern, cli), (cli, pattern)
    assert numbers.code_from_cli(cli, prefix, length, destination) == code
    # Another code's caller-ID, in the same form, is read as that code, never as this one.
    other = data.draw(st.text(_DIGITS, min_size=length, max_size=length))
    assert numbers.code_from_cli(_written(head, other, seps), prefix, length, destination) == other


# Runs a person or a handset may leave between digits.
_RUNS = st.lists(st.sampled_from(["  ", "--", " - ", "- -", " " * 5]), min_size=1, max_size=3)


@given(flash_calls(), st.data(), _SEPS, _RUNS)
def test_a_run_of_separators_in_a_flash_callers_id_reads_as_one(
    call: tuple[str, int, str, Phone], data: st.DataObject, seps: list[str], runs: list[str]
) -> None:
    """README: a check reads a run of spaces and dashes between digits (or after the "+") as
    one separator. Every form cli_filter matches still matches once collapsed, and the same
    form with runs inserted into it still reads back to its code, though cli_filter (as
    published, unchanged) does not match it."""
    prefix, length, code, destination = call
    head = data.draw(st.sampled_from(sorted(_heads(prefix, destination))))
    pattern = numbers.cli_filter(prefix, length, destination)
    cli = _written(head, code, seps)
    assert re.fullmatch(pattern, cli), (cli, pattern)
    assert re.fullmatch(pattern, numbers.collapse_separators(cli)), cli
    # Runs inserted before some digits (not the first, when nothing is in front of it).
    n = len(head[1]) + len(code)
    first = 0 if head[0] else 1
    at = data.draw(st.lists(st.integers(first, n - 1), min_size=len(runs), max_size=len(runs)))
    wider = [seps[i % len(seps)] for i in range(n)]
    for i, run in zip(at, runs, strict=True):
        wider[i] += run
    wide = _written(head, code, wider)
    assume(len(wide) <= 2 * numbers.MAX_INPUT_LENGTH)  # longer is read as no caller-ID at all
    assert not re.fullmatch(pattern, wide), wide
    assert numbers.code_from_cli(wide, prefix, length, destination) == code, wide
    # Another code's caller-ID, written the same way, is read as that code.
    other = data.draw(st.text(_DIGITS, min_size=length, max_size=length))
    got = numbers.code_from_cli(_written(head, other, wider), prefix, length, destination)
    assert got == other


@given(
    flash_calls(),
    st.sampled_from(["+", "00", "011", "0011", ""]),
    st.text(_DIGITS, max_size=14),
    _SEPS,
)
def test_a_caller_id_in_none_of_the_forms_is_not_ours(
    call: tuple[str, int, str, Phone], front: str, digits: str, seps: list[str]
) -> None:
    prefix, length, code, destination = call
    heads = _heads(prefix, destination)
    written = {f + d for f, d in heads}
    assume(front + digits not in written and (front or digits))
    cli = _written((front, digits), code, seps)
    assert not re.fullmatch(numbers.cli_filter(prefix, length, destination), cli), cli
    assert numbers.code_from_cli(cli, prefix, length, destination) is None


# -- opening hours ------------------------------------------------------------------------------

# Zones with DST (Lord Howe: 30 minutes; Chatham: +12:45/+13:45; Santiago and Sydney: southern),
# and one without.
_ZONES = [
    "Europe/Amsterdam",
    "America/New_York",
    "Australia/Lord_Howe",
    "Pacific/Chatham",
    "America/Santiago",
    "Australia/Sydney",
    "Asia/Seoul",
]
_STEP_MIN = 5  # ranges below start and end on multiples of 5 minutes, as do all zone offsets


@st.composite
def weeks(draw: st.DrawFn) -> tuple[tuple[Range, ...], ...]:
    """A week of ranges on 5-minute edges, some days closed, ranges often on a DST night's
    switching hours (01:00-04:00)."""
    edge = (
        st.integers(0, 24 * 60 // _STEP_MIN).map(lambda n: n * _STEP_MIN)
        | st.integers(60 // _STEP_MIN, 4 * 60 // _STEP_MIN).map(lambda n: n * _STEP_MIN)
        | st.integers(0, 4 * 4).map(lambda n: n * 15)
    )
    week = []
    for _ in opening_hours.DAYS:
        edges = sorted(draw(st.sets(edge, max_size=4)))
        if len(edges) % 2:
            edges.pop()
        week.append(tuple(Range(a, b) for a, b in zip(edges[::2], edges[1::2], strict=True)))
    return tuple(week)


def _switches(zone: zoneinfo.ZoneInfo, year: int) -> list[datetime.datetime]:
    """The instants (UTC) at which ``zone``'s offset changes in ``year``."""
    out = []
    t = datetime.datetime(year, 1, 1, tzinfo=datetime.UTC)
    step = datetime.timedelta(hours=1)
    while t.year == year:
        if (t + step).astimezone(zone).utcoffset() != t.astimezone(zone).utcoffset():
            out.append(t + step)
        t += step
    return out


_SWITCHES = {z: _switches(zoneinfo.ZoneInfo(z), 2026) for z in _ZONES}


@st.composite
def instants(draw: st.DrawFn, zone: str) -> datetime.datetime:
    """Near one of the zone's DST switches in 2026 (hours or a week either side), or anywhere
    in the year."""
    switches = _SWITCHES[zone]
    base = draw(st.sampled_from(switches)) if switches else datetime.datetime(2026, 6, 1)
    base = base.replace(tzinfo=datetime.UTC)
    seconds = draw(
        st.integers(-3 * 3600, 3 * 3600)
        | st.integers(-7 * 86400, 7 * 86400)
        | st.integers(-190 * 86400, 190 * 86400)
    )
    return base + datetime.timedelta(seconds=seconds)


@st.composite
def closings(draw: st.DrawFn, week: tuple[tuple[Range, ...], ...], zone: str) -> datetime.datetime:
    """When a range closes (its first pass), on a day around one of the zone's DST switches."""
    switches = _SWITCHES[zone] or [datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)]
    base = draw(st.sampled_from(switches)).astimezone(zoneinfo.ZoneInfo(zone)).date()
    day = base + datetime.timedelta(days=draw(st.sampled_from([0, -1, 1])))
    ranges = week[day.weekday()]
    end = draw(st.sampled_from(ranges)).end if ranges else 0
    wall = datetime.datetime.combine(day, datetime.time()) + datetime.timedelta(minutes=end)
    return wall.replace(tzinfo=zoneinfo.ZoneInfo(zone))


@given(weeks(), st.sampled_from(_ZONES), st.data())
def test_the_next_opening_is_open_and_nothing_before_it_is(
    week: tuple[tuple[Range, ...], ...], zone_name: str, data: st.DataObject
) -> None:
    zone = zoneinfo.ZoneInfo(zone_name)
    at = data.draw(instants(zone_name) | closings(week, zone_name))
    day = at.astimezone(zone).date()
    closed = data.draw(
        st.frozensets(st.integers(-1, 9).map(lambda n: day + datetime.timedelta(days=n)))
    )
    hours = OpeningHours(week, zone, closed)
    nxt = hours.next_opening(at)
    # Instants in UTC below: datetimes of one zone compare and add as wall clocks (fold
    # ignored), and PEP 495 makes one in a fold unequal to any of another zone.
    at = at.astimezone(datetime.UTC)
    if nxt is None:
        # Never within a year: only a week whose every range falls in a spring-forward gap.
        assert not any(
            hours.is_open(at + datetime.timedelta(minutes=m)) for m in range(0, 14 * 1440, 5)
        )
        return
    assert nxt.tzinfo is zone
    nxt_utc = nxt.astimezone(datetime.UTC)
    assert nxt_utc >= at
    assert hours.is_open(nxt)
    assert not hours.is_open(at) or nxt_utc == at
    # Open or closed changes only on a 5-minute edge of UTC here: every interval between
    # two edges from ``at`` to ``nxt`` is looked at once.
    t = at.replace(second=0, microsecond=0) + datetime.timedelta(minutes=1)
    t += datetime.timedelta(minutes=-t.minute % _STEP_MIN)
    while t < nxt_utc:
        assert not hours.is_open(t), (t, nxt)
        t += datetime.timedelta(minutes=_STEP_MIN)
    # ... and it is an edge itself, or ``at``: the first instant it is open.
    assert nxt_utc == at or nxt.timestamp() % (_STEP_MIN * 60) == 0


_DAY_FORMS = st.sampled_from(["list", "run"])


@given(weeks(), _DAY_FORMS)
def test_a_week_written_as_a_spec_reads_back(
    week: tuple[tuple[Range, ...], ...], form: str
) -> None:
    """The docstring's grammar: groups split by ";" in any order, days as one, a run
    (mon-fri) or a list (mon,wed), ranges split by ","."""
    assume(any(week))
    by_ranges: dict[tuple[Range, ...], list[int]] = {}
    for i, ranges in enumerate(week):
        if ranges:
            by_ranges.setdefault(ranges, []).append(i)
    groups = []
    for ranges, days in by_ranges.items():
        times = ",".join(f"{r.start // 60:02d}:{r.start % 60:02d}-" + _hhmm(r.end) for r in ranges)
        if form == "run":
            runs: list[list[int]] = []
            for d in days:
                if runs and runs[-1][-1] == d - 1:
                    runs[-1].append(d)
                else:
                    runs.append([d])
            names = [
                opening_hours.DAYS[r[0]]
                if len(r) == 1
                else f"{opening_hours.DAYS[r[0]]}-{opening_hours.DAYS[r[-1]]}"
                for r in runs
            ]
        else:
            names = [opening_hours.DAYS[d] for d in days]
        groups.append(f"{','.join(names)} {times}")
    assert opening_hours.parse_week("; ".join(reversed(groups))) == week


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


# -- G.711 µ-law and PCM16 ----------------------------------------------------------------------

_SAMPLES = st.lists(st.integers(-32768, 32767), max_size=200).map(lambda s: array("h", s))


@given(_SAMPLES)
def test_ulaw_round_trip_within_half_a_step(samples: array[int]) -> None:
    data = g711.ulaw_encode(samples)
    back = g711.ulaw_decode(data)
    assert len(data) == len(back) == len(samples)
    for x, y in zip(samples, back, strict=True):
        clipped = max(-32635, min(32635, x))
        # A segment's step is 1/16 of its lower edge (magnitude + 132), and decoding gives the
        # middle of the step: off by at most half a step, (|x| + 132) / 32.
        assert abs(y - clipped) <= (abs(clipped) + 132) / 32, (x, y)
        assert y == 0 or (y > 0) == (x > 0)
    # Decoded audio goes through the codec unchanged (a call's second hop adds no noise).
    assert g711.ulaw_decode(g711.ulaw_encode(back)) == back


@given(st.integers(-32768, 32767), st.integers(-32768, 32767))
def test_ulaw_keeps_the_order_of_samples(a: int, b: int) -> None:
    ya, yb = g711.ulaw_decode(g711.ulaw_encode(array("h", [min(a, b), max(a, b)])))
    assert ya <= yb


@given(_SAMPLES)
def test_pcm16_bytes_and_wav_round_trip(samples: array[int]) -> None:
    data = pcm.samples_to_bytes(samples)
    assert len(data) == 2 * len(samples)
    assert pcm.bytes_to_samples(data) == samples
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "a.wav"
        pcm.write_wav(path, pcm.Pcm(samples, 8000))
        pcm.check_wav(path)
        assert pcm.read_wav(path) == pcm.Pcm(samples, 8000)


_RATES = st.sampled_from([8000, 11025, 16000, 22050, 44100, 48000])


@given(_RATES, _RATES, st.integers(-30000, 30000), st.integers(0, 400))
def test_resample_keeps_length_and_a_level(src: int, dst: int, level: int, n: int) -> None:
    out = pcm.resample(array("h", [level] * n), src, dst)
    assert len(out) == (n * dst // src if src != dst else n)
    # Unity gain at DC: away from the ends (where the filter sees the zero padding) a
    # constant stays that constant.
    half = 60 * max(1, dst // src)
    for v in out[half:-half]:
        assert abs(v - level) <= 1 + abs(level) * 1e-6, (v, level)


# -- the code in words --------------------------------------------------------------------------

_CLINIC = st.text(
    st.characters(codec="utf-8", exclude_categories=["Nd", "No", "Cc", "Cs", "Zl", "Zp"]),
    min_size=1,
    max_size=40,
).filter(str.isprintable)
_CODE = st.integers(codes.MIN_LENGTH, codes.MAX_LENGTH).flatmap(
    lambda n: st.text(_DIGITS, min_size=n, max_size=n)
)
_LOCALES = st.sampled_from([*wording.WORDINGS, "nl-NL", "NL-be", "en-GB", "fr", "ko-KR", ""])


@given(_LOCALES, _CLINIC, _CODE)
def test_an_sms_holds_the_code_and_no_other_digit(locale: str, clinic: str, code: str) -> None:
    # A clinic name without digits: one with digits (CLINIC_NAME="Clinic 24") brings its own.
    words = wording.wording(locale)
    text = words.sms_text(clinic, code)
    assert "".join(c for c in text if c.isdigit()) == code
    assert code in text  # together, as one word the phone can offer to fill in
    # The spoken head says no digit of its own; the keypress prompt only the key to press.
    assert not any(c.isdigit() for c in words.head_text(clinic))
    assert [c for c in words.keypress_text(clinic) if c.isdigit()] == ["1"]
    assert "{" not in text.replace(clinic, "")


class _ToneRenderer:
    """Each text is 5 ms of one level: the head 99, digit d 1000 + 100 d."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder

    async def prerender(
        self, texts: Sequence[str], *, voice: str = "en", rate_hz: int = 8000
    ) -> list[Path]:
        paths = []
        for i, text in enumerate(texts):
            level = 1000 + 100 * int(text) if text.isdigit() else 99
            path = self._folder / f"piece-{i}.wav"
            pcm.write_wav(path, pcm.Pcm(array("h", [level] * 40), rate_hz))
            paths.append(path)
        return paths


@given(_CODE, st.sampled_from(sorted(wording.WORDINGS)))
def test_the_spoken_code_says_the_head_then_each_digit_in_order(code: str, language: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        head = wording.WORDINGS[language].head_text("the clinic")
        made = asyncio.run(
            spoken_code.compose(
                _ToneRenderer(Path(folder)),  # type: ignore[arg-type]
                head,
                code,
                PrivateFolder(Path(folder), None, temp_root=Path(folder)),
                voice=language,
            )
        )
        samples = pcm.read_wav(made).samples
    pieces: list[int] = []
    for v in samples:
        if v and (not pieces or pieces[-1] != v):
            pieces.append(v)
        elif not v and pieces and pieces[-1] != 0:
            pieces.append(0)
    said = [p for p in pieces if p]
    assert said == [99] + [1000 + 100 * int(d) for d in code]
    assert samples[: 8000 * int(spoken_code.REPEAT_GAP_S)] == array("h", [0] * 8000)


# -- rate limits --------------------------------------------------------------------------------

_DIGEST = limits.SubjectDigest(b"k" * 32)
_WINDOWS = st.sampled_from([1, 60, 600, 3600, 86400]) | st.integers(1, 10**6)


@given(st.sampled_from(list(limits.LimitName)), _WINDOWS, st.integers(0, 2**42), st.integers(0, 10))
def test_a_fixed_window_lives_until_the_next_edge(
    name: limits.LimitName, window_s: int, now_ms: int, later_ms: int
) -> None:
    check = limits.LimitCheck(name, "+31612345678", Rate(5, window_s))
    key, ms = check.counter(now_ms, _DIGEST)
    if check.sliding:
        assert ms == window_s * 1000
        assert check.counter(now_ms + later_ms * 997_001, _DIGEST)[0] == key
        return
    assert 0 < ms <= window_s * 1000
    assert (now_ms + ms) % (window_s * 1000) == 0
    # The same counter up to the edge, a new one from it.
    assert check.counter(now_ms + ms - 1, _DIGEST) == (key, 1)
    assert check.counter(now_ms + ms, _DIGEST)[0] != key
    assert check.key(now_ms / 1000, _DIGEST) == key


@given(st.text(max_size=30), st.booleans(), st.integers(1, 4))
def test_a_subject_digest_is_the_same_kept_or_not(subject: str, keep: bool, keep_max: int) -> None:
    digest = limits.SubjectDigest(b"secret" * 6, keep_max=keep_max)
    for i in range(6):
        digest(f"other {i}", True)
    assert digest(subject, keep) == digest(subject, not keep)
    assert re.fullmatch("[0-9a-f]{24}", digest(subject, keep))  # the subject is not in it
    assert len(digest._kept) <= keep_max


@given(st.integers(0, 2**128 - 1), st.integers(0, 2**64 - 1), st.sampled_from([48, 56, 64]))
def test_addresses_of_one_ipv6_network_count_as_one(addr: int, low: int, prefix: int) -> None:
    ip = ipaddress.IPv6Address(addr)
    assume(embedded_ipv4(ip) is None)
    net = ipaddress.IPv6Network((ip, prefix), strict=False)
    neighbour = ipaddress.IPv6Address(int(net.network_address) | (low % net.num_addresses))
    assume(embedded_ipv4(neighbour) is None)
    assert (
        limits.address_subject(str(ip), prefix)
        == limits.address_subject(str(neighbour), prefix)
        == str(net)
    )


@given(st.integers(0, 2**32 - 1))
def test_an_ipv4_client_counts_as_itself_seen_through_ipv6(n: int) -> None:
    v4 = ipaddress.IPv4Address(n)
    assert limits.address_subject(str(v4)) == str(v4)
    assert limits.address_subject(f"::ffff:{v4}") == str(v4)
