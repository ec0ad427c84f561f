"""Phone-number policy and caller-ID matching (:mod:`verification.numbers`), as tables.

Example numbers of the refused types come from phonenumbers' own metadata
(``example_number_for_type``), so the tests follow the library's idea of each range.
"""

from __future__ import annotations

import re
import time

import phonenumbers
import pytest
from phonenumbers import PhoneNumberType

from verification import codes, numbers, rules
from verification.errors import InvalidNumber, NumberRefused
from verification.model import Channel, FlashCallInfo, NumberKind, Phone, Policy, Status
from verification.numbers import (
    REFUSED_KINDS,
    cli_filter,
    code_from_cli,
    enforce_policy,
    parse_phone,
    prefix_key,
    split_country_code,
    trunk_prefix,
)


def _fullwidth(text: str) -> str:
    """The same characters from the Unicode fullwidth block (U+FF0B for +, U+FF10.. digits)."""
    return text.translate({ord(c): ord(c) + 0xFEE0 for c in "+0123456789"})


# -- parse_phone --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "region", "e164", "country", "kind"),
    [
        ("+31612345678", None, "+31612345678", "NL", NumberKind.MOBILE),
        ("0612345678", "NL", "+31612345678", "NL", NumberKind.MOBILE),
        ("06-12345678", "NL", "+31612345678", "NL", NumberKind.MOBILE),
        ("0031612345678", "NL", "+31612345678", "NL", NumberKind.MOBILE),
        ("+31 6 1234 5678", None, "+31612345678", "NL", NumberKind.MOBILE),
        ("+31 (0)6 12345678", None, "+31612345678", "NL", NumberKind.MOBILE),
        ("+31201234567", None, "+31201234567", "NL", NumberKind.FIXED_LINE),
        ("020 123 4567", "NL", "+31201234567", "NL", NumberKind.FIXED_LINE),
        ("+447400123456", None, "+447400123456", "GB", NumberKind.MOBILE),
        ("07400 123456", "GB", "+447400123456", "GB", NumberKind.MOBILE),
        ("+44 20 7946 0000", None, "+442079460000", "GB", NumberKind.FIXED_LINE),
        ("+1 201-555-0123", None, "+12015550123", "US", NumberKind.FIXED_LINE_OR_MOBILE),
        ("(201) 555.0123", "US", "+12015550123", "US", NumberKind.FIXED_LINE_OR_MOBILE),
        ("+1 416 555 0123", None, "+14165550123", "CA", NumberKind.FIXED_LINE_OR_MOBILE),
        ("+31612345678", "NL", "+31612345678", "NL", NumberKind.MOBILE),  # region agrees
        ("0032 470 12 34 56", "NL", "+32470123456", "BE", NumberKind.MOBILE),  # dialled from NL
        # +1 is shared: a region of the same country code agrees; the number decides which
        ("+1 416 555 0123", "US", "+14165550123", "CA", NumberKind.FIXED_LINE_OR_MOBILE),
        ("+4915123456789", None, "+4915123456789", "DE", NumberKind.MOBILE),
        ("+318001234", None, "+318001234", "NL", NumberKind.TOLL_FREE),
        ("+80012345678", None, "+80012345678", "001", NumberKind.TOLL_FREE),
    ],
)
def test_valid_numbers(
    raw: str, region: str | None, e164: str, country: str, kind: NumberKind
) -> None:
    phone = parse_phone(raw, region)
    assert (phone.e164, phone.region, phone.kind) == (e164, country, kind)
    assert phone.e164 == f"+{phone.country_code}{phone.national_number}"


@pytest.mark.parametrize(
    ("raw", "region", "why"),
    [
        ("", None, "1..32"),
        ("+", None, "ASCII digits"),
        ("()", None, "E.164"),
        ("+3" + "1" * 31, None, "1..32"),  # 33 characters
        ("+31 6 CALL NOW", None, "ASCII digits"),  # vanity letters are refused, not mapped
        ("+3161234567a", None, "ASCII digits"),
        ("0800-FLOWERS", "US", "ASCII digits"),
        ("٠١٢", None, "ASCII digits"),  # Arabic-Indic digits
        ("+٣١٦١٢٣٤٥٦٧٨", None, "ASCII digits"),
        (_fullwidth("+31612345678"), None, "ASCII digits"),
        ("+31612345678\n", None, "ASCII digits"),
        ("+31\t612345678", None, "ASCII digits"),
        ("++31612345678", None, "ASCII digits"),
        ("+31612345678 ext. 5", None, "ASCII digits"),
        ("0612345678", None, "E.164"),  # national without a region
        ("612345678", None, "E.164"),
        ("0612345678", "nl", "region"),
        ("0612345678", "NLD", "region"),
        ("0612345678", "N1", "region"),
        ("0612345678", "ZZ", "not a phone number"),
        ("+32470123456", "NL", "+32 is not NL's"),  # a + number and a region disagree
        ("+31612345678", "XX", "region XX is not a country code"),
        ("+9991234567", None, "not a phone number"),  # no such country code
        ("+3161234", None, "not a valid"),  # too short
        ("+316123456789012", None, "not a valid"),  # too long for NL
        ("+3161234567890123456", None, "not a valid"),  # too long for anyone
        ("+31012345678", None, "not a valid"),  # a trunk prefix inside E.164
        ("+12005550123", None, "not a valid"),  # area code 200 is not assigned
    ],
)
def test_invalid_numbers_are_422(raw: str, region: str | None, why: str) -> None:
    with pytest.raises(InvalidNumber) as err:
        parse_phone(raw, region)
    assert err.value.status == 422
    assert err.value.slug == "invalid-number"
    assert why in err.value.detail


# -- policy: refused kinds and countries ----------------------------------------------------------


@pytest.mark.parametrize(
    ("region", "kind"),
    [
        ("GB", PhoneNumberType.PREMIUM_RATE),
        ("NL", PhoneNumberType.PREMIUM_RATE),
        ("US", PhoneNumberType.PREMIUM_RATE),
        ("DE", PhoneNumberType.SHARED_COST),
        ("FR", PhoneNumberType.SHARED_COST),
        ("BE", PhoneNumberType.SHARED_COST),
        ("GB", PhoneNumberType.UAN),
        ("NL", PhoneNumberType.UAN),
        ("FR", PhoneNumberType.UAN),
        ("DE", PhoneNumberType.VOICEMAIL),
        ("CH", PhoneNumberType.VOICEMAIL),
        ("IT", PhoneNumberType.VOICEMAIL),
        ("GB", PhoneNumberType.PAGER),
    ],
)
def test_refused_kinds_are_403_with_the_reason(region: str, kind: int) -> None:
    example = phonenumbers.example_number_for_type(region, kind)
    assert example is not None, f"phonenumbers has no example of type {kind} for {region}"
    e164 = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)
    national = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.NATIONAL)
    for raw, reg in ((e164, None), (national, region)):
        phone = parse_phone(raw, reg)
        assert phone.e164 == e164
        assert phone.kind in REFUSED_KINDS, f"{raw} parsed as {phone.kind}"
        with pytest.raises(NumberRefused) as err:
            enforce_policy(phone, frozenset())
        assert err.value.status == 403
        assert err.value.extra == {"reason": phone.kind.value}
        assert err.value.detail == REFUSED_KINDS[phone.kind]


def test_the_issue_s_refused_kinds_are_all_in_the_table() -> None:
    required = {
        NumberKind.PREMIUM_RATE,
        NumberKind.SHARED_COST,
        NumberKind.UAN,
        NumberKind.VOICEMAIL,
        NumberKind.UNKNOWN,
    }
    assert required <= REFUSED_KINDS.keys()


def test_unknown_kind_is_refused() -> None:
    # phonenumbers never validates a number of unknown type; a record can still say so.
    phone = Phone("+31612345678", "NL", 31, "612345678", NumberKind.UNKNOWN)
    with pytest.raises(NumberRefused) as err:
        enforce_policy(phone, frozenset())
    assert err.value.extra == {"reason": "unknown"}


@pytest.mark.parametrize(
    "raw",
    [
        "+31612345678",  # mobile
        "+31201234567",  # fixed line
        "+12015550123",  # fixed line or mobile
        "+318001234",  # toll free
        "+31851234567",  # VoIP
        "+447012345678",  # personal number
    ],
)
def test_other_kinds_are_served(raw: str) -> None:
    enforce_policy(parse_phone(raw), frozenset())


@pytest.mark.parametrize(
    ("raw", "allowed", "served"),
    [
        ("+31612345678", frozenset(), True),
        ("+31612345678", frozenset({"NL"}), True),
        ("+31612345678", frozenset({"NL", "BE"}), True),
        ("+31612345678", frozenset({"BE"}), False),
        ("+32470123456", frozenset({"NL", "BE"}), True),
        ("+12015550123", frozenset({"CA"}), False),  # +1 is shared: the region decides
        ("+14165550123", frozenset({"CA"}), True),
        ("+447400123456", frozenset({"GB"}), True),
        ("+447400123456", frozenset({"NL"}), False),
    ],
)
def test_allowed_countries(raw: str, allowed: frozenset[str], served: bool) -> None:
    phone = parse_phone(raw)
    if served:
        enforce_policy(phone, allowed)
        return
    with pytest.raises(NumberRefused) as err:
        enforce_policy(phone, allowed)
    assert err.value.status == 403
    assert err.value.extra == {"reason": "country"}
    assert "not served" in err.value.detail


@pytest.mark.parametrize(
    "raw",
    [
        "+870772123456",  # Inmarsat
        "+881612345678",  # a global satellite system
        "+883510012345",  # an international network
        "+80012345678",  # international freephone
    ],
)
@pytest.mark.parametrize("allowed", [frozenset(), frozenset({"NL"})])
def test_numbers_of_international_networks_are_refused(raw: str, allowed: frozenset[str]) -> None:
    phone = parse_phone(raw)
    assert phone.region == "001"
    with pytest.raises(NumberRefused) as err:
        enforce_policy(phone, allowed)
    assert err.value.extra == {"reason": "non_geographic"}
    assert f"+{phone.country_code}" in err.value.detail


# -- prefixes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "digits", "key"),
    [
        ("+31612345678", 4, "+316123"),
        ("+31612345678", 1, "+316"),
        ("+447400123456", 4, "+447400"),
        ("+12015550123", 3, "+1201"),
        ("+31612345678", 20, "+31612345678"),
    ],
)
def test_prefix_key(raw: str, digits: int, key: str) -> None:
    assert prefix_key(parse_phone(raw), digits) == key


@pytest.mark.parametrize(
    ("prefix", "split"),
    [
        ("+447400", (44, "7400")),
        ("+1201555", (1, "201555")),
        ("+31", (31, "")),
        ("+3197", (31, "97")),
        ("+3519", (351, "9")),
        ("+7912", (7, "912")),
        ("447400", (44, "7400")),
    ],
)
def test_split_country_code(prefix: str, split: tuple[int, str]) -> None:
    assert split_country_code(prefix) == split


@pytest.mark.parametrize("prefix", ["+", "+0", "+999", "+2"])
def test_split_country_code_refuses_a_prefix_without_one(prefix: str) -> None:
    with pytest.raises(ValueError):
        split_country_code(prefix)


@pytest.mark.parametrize(
    ("region", "trunk"),
    [("GB", "0"), ("NL", "0"), ("DE", "0"), ("US", "1"), ("IT", ""), ("001", "")],
)
def test_trunk_prefix(region: str, trunk: str) -> None:
    assert trunk_prefix(region) == trunk


# -- cli_filter and code_from_cli -----------------------------------------------------------------

UK = parse_phone("+447400123456")
NL = parse_phone("+31612345678")
US = parse_phone("+12015550123")
ES = parse_phone("+34612345678")
IT = parse_phone("+393123456789")
UK_PREFIX, NL_PREFIX, US_PREFIX = "+447400", "+3197010", "+1201555"
ES_PREFIX, IT_PREFIX = "+34910", "+39061"  # countries without a trunk prefix
# A prefix that is a country code alone: the code is the whole national number.
NO, HU = parse_phone("+4721234567"), parse_phone("+3612345678")

# (caller-ID as shown, prefix, code length, destination, expected code)
MATCHING: list[tuple[str, str, int, Phone, str]] = [
    # UK prefix to a UK handset: every international form, and the national form with 0
    ("+447400123456", UK_PREFIX, 6, UK, "123456"),
    ("00447400123456", UK_PREFIX, 6, UK, "123456"),
    ("447400123456", UK_PREFIX, 6, UK, "123456"),
    ("07400123456", UK_PREFIX, 6, UK, "123456"),
    ("+44 7400 123456", UK_PREFIX, 6, UK, "123456"),
    ("+44-7400-123-456", UK_PREFIX, 6, UK, "123456"),
    ("0044 7400 123 456", UK_PREFIX, 6, UK, "123456"),
    ("00 44 7400 123456", UK_PREFIX, 6, UK, "123456"),
    ("+ 44 7400 123456", UK_PREFIX, 6, UK, "123456"),
    ("07400 123 456", UK_PREFIX, 6, UK, "123456"),
    ("0 7400-123456", UK_PREFIX, 6, UK, "123456"),
    ("  +447400000000  ", UK_PREFIX, 6, UK, "000000"),  # surrounding blanks are trimmed
    ("+447400123456\n", UK_PREFIX, 6, UK, "123456"),
    ("+4474001234", UK_PREFIX, 4, UK, "1234"),
    ("+44740012345678", UK_PREFIX, 8, UK, "12345678"),
    # UK prefix to a Dutch or US handset: international forms only
    ("+447400123456", UK_PREFIX, 6, NL, "123456"),
    ("00447400123456", UK_PREFIX, 6, NL, "123456"),
    ("447400123456", UK_PREFIX, 6, NL, "123456"),
    ("+447400123456", UK_PREFIX, 6, US, "123456"),
    ("44 7400 123456", UK_PREFIX, 6, US, "123456"),
    # NL prefix to a Dutch handset
    ("+31970101234", NL_PREFIX, 4, NL, "1234"),
    ("0031970101234", NL_PREFIX, 4, NL, "1234"),
    ("31970101234", NL_PREFIX, 4, NL, "1234"),
    ("0970101234", NL_PREFIX, 4, NL, "1234"),
    ("097 010 1234", NL_PREFIX, 4, NL, "1234"),
    ("+31 97 010 12 34", NL_PREFIX, 4, NL, "1234"),
    # US prefix to a US handset: the trunk prefix 1 makes the national form
    ("+12015551234", US_PREFIX, 4, US, "1234"),
    ("0012015551234", US_PREFIX, 4, US, "1234"),
    ("12015551234", US_PREFIX, 4, US, "1234"),
    ("1-201-555-1234", US_PREFIX, 4, US, "1234"),
    ("+1 201-555-1234", US_PREFIX, 4, US, "1234"),
    ("+12015550000", US_PREFIX, 4, UK, "0000"),
    # a NANP phone shows a NANP caller-ID with ten digits, without the trunk prefix 1
    ("2015551234", US_PREFIX, 4, US, "1234"),
    ("201-555-1234", US_PREFIX, 4, US, "1234"),
    ("201 555 1234", US_PREFIX, 4, US, "1234"),
    # and an international one with its exit code 011 (AU 0011, JP 010, RU 810)
    ("011447400123456", UK_PREFIX, 6, US, "123456"),
    ("011 44 7400 123456", UK_PREFIX, 6, US, "123456"),
    ("0011447400123456", UK_PREFIX, 6, parse_phone("+61412345678"), "123456"),
    ("010447400123456", UK_PREFIX, 6, parse_phone("+819012345678"), "123456"),
    ("810447400123456", UK_PREFIX, 6, parse_phone("+79123456789"), "123456"),
    # national without the trunk prefix, as some networks present it
    ("7400123456", UK_PREFIX, 6, UK, "123456"),
    ("970101234", NL_PREFIX, 4, NL, "1234"),
    # no trunk prefix: the national form is the bare national number
    ("910123456", ES_PREFIX, 6, ES, "123456"),
    ("910 12 34 56", ES_PREFIX, 6, ES, "123456"),
    ("+34910123456", ES_PREFIX, 6, ES, "123456"),
    ("061123456", IT_PREFIX, 6, IT, "123456"),
    ("06 1123456", IT_PREFIX, 6, IT, "123456"),
    ("0039061123456", IT_PREFIX, 6, IT, "123456"),
    # the national forms of a caller-ID whose prefix is its country code alone
    ("21234567", "+47", 8, NO, "21234567"),
    ("2123 4567", "+47", 8, NO, "21234567"),
    ("0612345678", "+36", 8, HU, "12345678"),
    ("12345678", "+36", 8, HU, "12345678"),
]

# (caller-ID, prefix, code length, destination, why it is not ours)
NOT_MATCHING: list[tuple[str, str, int, Phone, str]] = [
    ("+447401123456", UK_PREFIX, 6, UK, "wrong prefix"),
    ("+447400123456", "+447401", 6, UK, "wrong prefix"),
    ("+317400123456", UK_PREFIX, 6, UK, "wrong country code"),
    ("+44740012345", UK_PREFIX, 6, UK, "code too short"),
    ("+4474001234567", UK_PREFIX, 6, UK, "code too long"),
    ("07400123456", UK_PREFIX, 5, UK, "code length differs"),
    ("07400123456", UK_PREFIX, 6, NL, "UK national form on a Dutch handset"),
    ("07400123456", UK_PREFIX, 6, US, "UK national form on a US handset"),
    ("0970101234", NL_PREFIX, 4, UK, "Dutch national form on a UK handset"),
    ("910123456", ES_PREFIX, 6, UK, "Spanish national form on a UK handset"),
    ("0910123456", ES_PREFIX, 6, ES, "Spain has no trunk prefix"),
    ("011447400123456", UK_PREFIX, 6, NL, "the NANP's exit code on a Dutch handset"),
    ("7400123456", UK_PREFIX, 6, US, "a UK national number on a US handset"),
    ("061123456", IT_PREFIX, 6, NL, "Italian national form on a Dutch handset"),
    ("+447400l23456", UK_PREFIX, 6, UK, "a letter"),
    ("+44740012345a", UK_PREFIX, 6, UK, "a letter"),
    ("+4474OO123456", UK_PREFIX, 6, UK, "letters O for zeros"),
    ("++447400123456", UK_PREFIX, 6, UK, "two plus signs"),
    ("+00447400123456", UK_PREFIX, 6, UK, "plus and 00"),
    ("000447400123456", UK_PREFIX, 6, UK, "three zeros"),
    ("+07400123456", UK_PREFIX, 6, UK, "plus before a national form"),
    ("-447400123456", UK_PREFIX, 6, UK, "a leading dash"),
    ("+447400123456-", UK_PREFIX, 6, UK, "a trailing dash"),
    ("+44 (0) 7400 123456", UK_PREFIX, 6, UK, "parentheses"),
    ("+44.7400.123456", UK_PREFIX, 6, UK, "dots"),
    ("+44740012345٦", UK_PREFIX, 6, UK, "an Arabic-Indic digit"),
    (_fullwidth("+44") + "7400123456", UK_PREFIX, 6, UK, "fullwidth digits"),
    ("", UK_PREFIX, 6, UK, "empty"),
    ("anonymous", UK_PREFIX, 6, UK, "withheld"),
    ("+447400123456\n+447400654321", UK_PREFIX, 6, UK, "two lines"),
]


@pytest.mark.parametrize(("cli", "prefix", "length", "dest", "code"), MATCHING)
def test_code_from_cli_accepts_every_form_a_phone_shows(
    cli: str, prefix: str, length: int, dest: Phone, code: str
) -> None:
    assert code_from_cli(cli, prefix, length, dest) == code
    assert re.fullmatch(cli_filter(prefix, length, dest), cli.strip()), "cli_filter disagrees"


@pytest.mark.parametrize(("cli", "prefix", "length", "dest", "why"), NOT_MATCHING)
def test_code_from_cli_refuses_what_is_not_ours(
    cli: str, prefix: str, length: int, dest: Phone, why: str
) -> None:
    assert code_from_cli(cli, prefix, length, dest) is None, why
    assert re.fullmatch(cli_filter(prefix, length, dest), cli.strip()) is None, why


# -- a run of separators in a check's caller-ID (product decision 15, option b) -------------------

# (as written, as matched): a run of spaces and dashes between two digits, or between the
# "+" and a digit, is one separator; anything else is left for cli_filter to judge.
COLLAPSED: list[tuple[str, str]] = [
    ("07400  123456", "07400 123456"),  # a run of spaces
    ("07400" + " " * 9 + "123456", "07400 123456"),
    ("07400--123456", "07400 123456"),  # a run of dashes
    ("07400 - 123456", "07400 123456"),  # mixed
    ("07400- -123456", "07400 123456"),
    ("0  7400 -- 12--34  56", "0 7400 12 34 56"),  # several runs
    ("+ 447400123456", "+ 447400123456"),  # a leading + and one space: already one
    ("+  447400123456", "+ 447400123456"),  # a run between the + and the digits
    ("+ - 447400123456", "+ 447400123456"),
    ("+--447400123456", "+ 447400123456"),
    ("07400 123456", "07400 123456"),  # one separator stays as written
    ("07400-123456", "07400-123456"),
    ("07400123456", "07400123456"),
    ("  07400  123456  ", "  07400 123456  "),  # at the ends: left (code_from_cli strips)
    ("--07400 123456", "--07400 123456"),
    ("07400 123456 --", "07400 123456 --"),
    ("- 07400", "- 07400"),
    ("  ", "  "),  # only separators
    ("- -", "- -"),
    ("+  ", "+  "),
    ("", ""),
    ("07400\t\t123456", "07400\t\t123456"),  # a tab is no separator
]


@pytest.mark.parametrize(("cli", "collapsed"), COLLAPSED)
def test_collapse_separators_reads_a_run_between_digits_as_one(cli: str, collapsed: str) -> None:
    assert numbers.collapse_separators(cli) == collapsed


# (caller-ID as the app sends it, prefix, code length, destination, code read or None)
RUNS: list[tuple[str, str, int, Phone, str | None]] = [
    ("07400  123456", UK_PREFIX, 6, UK, "123456"),
    ("07400 - 123456", UK_PREFIX, 6, UK, "123456"),
    ("07400--123456", UK_PREFIX, 6, UK, "123456"),
    ("+44  7400123456", UK_PREFIX, 6, UK, "123456"),
    ("+  44 7400  123 -- 456", UK_PREFIX, 6, UK, "123456"),
    ("+ - 447400123456", UK_PREFIX, 6, UK, "123456"),
    ("00  44 7400 123456", UK_PREFIX, 6, UK, "123456"),
    ("011 -- 44 7400 123456", UK_PREFIX, 6, US, "123456"),
    ("201  555 - 1234", US_PREFIX, 4, US, "1234"),
    ("  07400   000000  ", UK_PREFIX, 6, UK, "000000"),  # ends trimmed as before
    ("07400  654321", UK_PREFIX, 6, UK, "654321"),  # another code: read as that code
    # what a run does not make ours
    ("-  447400123456", UK_PREFIX, 6, UK, None),  # a leading dash, as before
    ("--07400 123456", UK_PREFIX, 6, UK, None),
    ("+447400123456--", UK_PREFIX, 6, UK, None),  # a trailing dash, as before
    ("+447400123456 -", UK_PREFIX, 6, UK, None),
    ("07400  12345", UK_PREFIX, 6, UK, None),  # code too short
    ("07401  123456", UK_PREFIX, 6, UK, None),  # wrong prefix
    ("07400  123456", UK_PREFIX, 6, NL, None),  # UK national form on a Dutch handset
    ("44+  7400123456", UK_PREFIX, 6, UK, None),  # a + that does not lead
    ("+ (0)  7400 123456", UK_PREFIX, 6, UK, None),
    ("      ", UK_PREFIX, 6, UK, None),  # only separators
    ("- - -", UK_PREFIX, 6, UK, None),
]


@pytest.mark.parametrize(("cli", "prefix", "length", "dest", "code"), RUNS)
def test_code_from_cli_reads_a_run_of_separators_as_one(
    cli: str, prefix: str, length: int, dest: Phone, code: str | None
) -> None:
    assert code_from_cli(cli, prefix, length, dest) == code
    # The published filter is unchanged: it is matched against the collapsed form.
    pattern = cli_filter(prefix, length, dest)
    assert bool(re.fullmatch(pattern, numbers.collapse_separators(cli.strip()))) is (
        code is not None
    )


@pytest.mark.parametrize(
    "cli",
    [
        "1" + " " * 100_000,  # a run no digit follows: scanned from each character if quadratic
        "1" + "- " * 50_000 + "x",
        "+" + "-" * 100_000,
        " " * 100_000 + "1",
        ("1" + "  " * 9) * 5_000 + "1",
    ],
)
def test_collapse_separators_is_linear_in_a_long_run(cli: str) -> None:
    began = time.perf_counter()
    numbers.collapse_separators(cli)
    # About 6 ms here; a regex that retries the run from each of its characters takes
    # minutes on 100k characters.
    assert time.perf_counter() - began < 0.5
    began = time.perf_counter()
    assert code_from_cli(cli, UK_PREFIX, 6, UK) is None  # the API caps it at 64 anyway
    assert time.perf_counter() - began < 0.5


@pytest.mark.parametrize(
    ("cli", "status", "attempts_left"),
    [
        ("07400  123456", Status.APPROVED, 5),
        ("+44 - 7400 -- 123456", Status.APPROVED, 5),
        ("07400  654321", Status.PENDING, 4),  # a wrong code: a wrong check, an attempt spent
        ("+44 - 7400 -- 123455", Status.PENDING, 4),
    ],
)
def test_a_check_with_a_run_of_separators_approves_the_right_code_only(
    cli: str, status: Status, attempts_left: int
) -> None:
    """As the API's check reads a ``cli``: code_from_cli, codes.matches, rules.check."""
    secret, vid, now = b"s" * 32, "v" * 32, 1_800_000_000.0
    flash = FlashCallInfo(UK_PREFIX, 6, cli_filter(UK_PREFIX, 6, UK), 20)
    created = rules.create(
        verification_id=vid,
        phone=UK,
        plan=(Channel.FLASHCALL,),
        code_length=6,
        now=now,
        policy=Policy(),
        flashcall=flash,
    ).verification
    v = rules.code_sent(created, 0, codes.code_hash(secret, vid, "123456"), now).verification
    candidate = code_from_cli(cli, UK_PREFIX, 6, UK)
    matched = candidate is not None and codes.matches(secret, vid, candidate, v.code_hashes)
    _, answer = rules.check(v, matched, now + 5, Policy())
    assert (answer.status, answer.attempts_left) == (status, attempts_left)


def test_code_from_cli_does_not_read_an_overlong_caller_id() -> None:
    assert code_from_cli("+447400123456" + " " * 60, UK_PREFIX, 6, UK) is None


@pytest.mark.parametrize("dest", [UK, NL, US])
@pytest.mark.parametrize(("prefix", "length"), [(UK_PREFIX, 6), (NL_PREFIX, 4), (US_PREFIX, 8)])
def test_cli_filter_is_an_anchored_regex_that_every_engine_reads(
    dest: Phone, prefix: str, length: int
) -> None:
    pattern = cli_filter(prefix, length, dest)
    assert pattern.startswith("^(?:") and pattern.endswith(")$")
    re.compile(pattern)
    # Only constructs that Java, ICU (Swift) and ECMAScript read alike: no lookarounds,
    # named groups, possessives or inline flags.
    assert not re.search(r"\(\?[^:]", pattern), pattern


@pytest.mark.parametrize(
    ("length", "code"), [(4, "0000"), (5, "00000"), (6, "999999"), (7, "0123456"), (8, "00000001")]
)
def test_code_from_cli_keeps_leading_zeros(length: int, code: str) -> None:
    assert code_from_cli(f"+447400{code}", UK_PREFIX, length, UK) == code
    assert code_from_cli(f"07400 {code}", UK_PREFIX, length, UK) == code


def test_max_input_length_matches_the_api_schema() -> None:
    assert numbers.MAX_INPUT_LENGTH == 32


def _example_numbers() -> list[str]:
    """Every example number phonenumbers has (all regions and types, non-geographic ones
    too), and each with its last digit changed and with a digit added or dropped."""
    out: set[str] = set()
    numbers_found = []
    for region in phonenumbers.SUPPORTED_REGIONS:
        for ptype in PhoneNumberType.values():
            n = phonenumbers.example_number_for_type(region, ptype)
            if n is not None:
                numbers_found.append(n)
    for cc in phonenumbers.COUNTRY_CODES_FOR_NON_GEO_REGIONS:
        n = phonenumbers.example_number_for_non_geo_entity(cc)
        if n is not None:
            numbers_found.append(n)
    for n in numbers_found:
        e164 = phonenumbers.format_number(n, phonenumbers.PhoneNumberFormat.E164)
        last = int(e164[-1])
        out.update({e164, e164[:-1] + str((last + 5) % 10), e164 + "7", e164[:-1]})
    return sorted(out)


def test_validity_is_the_same_as_phonenumbers_is_valid_number() -> None:
    # parse_phone decides validity by number type (one pass over the patterns); it must
    # agree with phonenumbers.is_valid_number on every number it can be shown.
    samples = _example_numbers()
    assert len(samples) > 3000
    disagree = []
    for raw in samples:
        try:
            parsed = phonenumbers.parse(raw, None)
        except phonenumbers.NumberParseException:
            continue
        try:
            parse_phone(raw)
            ours = True
        except InvalidNumber:
            ours = False
        if ours != phonenumbers.is_valid_number(parsed):
            disagree.append(raw)
    assert disagree == []


def _e164_variants() -> list[str]:
    """The example numbers and their variants, plus the forms where parse() does more than
    split off a country code: a national prefix after it (+31 0 6..., +7 8 9...), leading
    zeros (Italy), unknown and unassigned country codes, the shortest and longest inputs."""
    out = set(_example_numbers())
    for raw in list(out):
        cc, _ = numbers.split_country_code(raw[:4])
        digits = raw[1 + len(str(cc)) :]
        prefix = numbers.trunk_prefix(phonenumbers.region_code_for_country_code(cc))
        out.update({f"+{cc}{prefix or '0'}{digits}", f"+{cc}0{digits}", f"+{cc}00{digits}"})
    out.update(f"+{d}" for d in ("1", "12", "123", "1234", "999123456", "80012345678", "0123"))
    out.update({"+" + "4" * 18, "+" + "4" * 21, "+3906" + "0" * 10, "+390000", "+3900"})
    return sorted(out)


def test_the_e164_fast_path_parses_as_phonenumbers_does() -> None:
    # parse_phone skips phonenumbers.parse() for "+digits"; where it answers, it must give
    # the very PhoneNumber parse() gives, and it must leave every error to parse().
    samples = _e164_variants()
    assert len(samples) > 10000
    answered = 0
    for raw in samples:
        fast = numbers._parse_e164(raw)
        try:
            slow = phonenumbers.parse(raw, None)
        except phonenumbers.NumberParseException:
            assert fast is None, raw
            continue
        if fast is not None:
            answered += 1
            assert fast == slow, raw
    assert answered > 0.95 * len(samples) - 20


# -- which code lengths make a valid caller-ID -----------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "lengths"),
    [
        ("+447400", (6,)),  # UK mobile: 10 national digits
        ("+4915112", (6,)),
        ("+1201555", (4,)),  # NANP: 10 digits
        ("+316", (8,)),  # a short prefix: valid for some codes of that length
        ("+39061", (4, 5, 6, 7, 8)),  # Italian fixed lines vary in length
        ("+31", ()),  # no country's number is its country code and 4..8 digits
        ("+999", ()),  # no country code at all
    ],
)
def test_cli_code_lengths(prefix: str, lengths: tuple[int, ...]) -> None:
    from verification.numbers import cli_code_lengths

    assert cli_code_lengths(prefix) == lengths


@pytest.mark.parametrize(
    ("raw", "region"),
    [(" +31612345678", None), ("+31612345678 ", None), ("  0612345678\t", "NL")],
)
def test_spaces_around_a_number_are_not_part_of_it(raw: str, region: str | None) -> None:
    # " +3161..." was 422 "give the number in E.164" while "+3161... " passed.
    assert parse_phone(raw, region).e164 == "+31612345678"


@pytest.mark.parametrize("raw", ["", " ", "\t \t"])
def test_a_phone_of_only_spaces_is_empty(raw: str) -> None:
    with pytest.raises(InvalidNumber, match=r"1\.\.") as err:
        parse_phone(raw)
    assert err.value.status == 422
