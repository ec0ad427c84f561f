"""Phone-number policy (phonenumbers) and caller-ID matching for flash calls.

Pure: parsing, the types the service refuses (premium-rate and friends are where SMS pumping
fraud makes its money), the prefix used by the anti-pumping limit, and the regular expression
that matches a flash call's caller-ID in every form a handset may show it.
"""

from __future__ import annotations

import functools
import re

import phonenumbers
from phonenumbers import PhoneNumber, PhoneNumberType
from phonenumbers import phonenumberutil as _pnu
from phonenumbers import re_util as _pn_re

from verification import codes
from verification.errors import InvalidNumber, NumberRefused
from verification.model import NumberKind, Phone

# phonenumbers compiles its metadata's patterns through re.compile() on every use: nine times
# for one NL mobile, each a look-up in re's cache (about 0.3 us), and re keeps only 512 while
# the metadata holds thousands, so traffic from many countries would compile them again and
# again. Its own cache keeps every pattern it has compiled (2 us less per number here).
_pn_re.enable_pattern_cache()

MAX_INPUT_LENGTH = 32
# What a person may type around the digits. Letters (vanity numbers) and non-ASCII digits are
# refused rather than guessed at: phonenumbers would quietly map both to digits.
_ALLOWED = re.compile(r"\+?[0-9 ()./-]+")
_SEPARATORS = re.compile(r"[ ()./-]")
# A run of spaces and dashes between two digits, or between the "+" and a digit: a check's
# caller-ID reads it as one separator (product decision 15, option b), while cli_filter
# allows one. Linear (a 100k-character run in about 6 ms here): the lookbehind admits a run
# only at its first character, so a run not followed by a digit is scanned once, not once
# from each of its characters.
_SEPARATOR_RUN = re.compile(r"(?<=[0-9+])[ -]{2,}(?=[0-9])")
# The form nearly every client sends: "+" and the digits, nothing else (see _parse_e164).
_E164_DIGITS = re.compile(r"\+([1-9][0-9]{2,30})")
# Test results after which phonenumbers keeps a national prefix it could strip.
_KEEP_PREFIX = frozenset(
    {
        _pnu.ValidationResult.TOO_SHORT,
        _pnu.ValidationResult.IS_POSSIBLE_LOCAL_ONLY,
        _pnu.ValidationResult.INVALID_LENGTH,
    }
)

_KINDS = {
    PhoneNumberType.MOBILE: NumberKind.MOBILE,
    PhoneNumberType.FIXED_LINE: NumberKind.FIXED_LINE,
    PhoneNumberType.FIXED_LINE_OR_MOBILE: NumberKind.FIXED_LINE_OR_MOBILE,
    PhoneNumberType.TOLL_FREE: NumberKind.TOLL_FREE,
    PhoneNumberType.PREMIUM_RATE: NumberKind.PREMIUM_RATE,
    PhoneNumberType.SHARED_COST: NumberKind.SHARED_COST,
    PhoneNumberType.VOIP: NumberKind.VOIP,
    PhoneNumberType.PERSONAL_NUMBER: NumberKind.PERSONAL_NUMBER,
    PhoneNumberType.PAGER: NumberKind.PAGER,
    PhoneNumberType.UAN: NumberKind.UAN,
    PhoneNumberType.VOICEMAIL: NumberKind.VOICEMAIL,
    PhoneNumberType.UNKNOWN: NumberKind.UNKNOWN,
}

#: phonenumbers' region of country codes that belong to no country (+800, +808, +870, +881,
#: +882, +883, +888, +979): satellite systems, international networks, UIFN freephone.
NON_GEOGRAPHIC = "001"

#: Types the service never sends to, with the reason given to the client.
REFUSED_KINDS: dict[NumberKind, str] = {
    NumberKind.PREMIUM_RATE: "premium-rate numbers are refused (toll fraud risk)",
    NumberKind.SHARED_COST: "shared-cost numbers are refused (toll fraud risk)",
    NumberKind.UAN: "universal access numbers are refused",
    NumberKind.VOICEMAIL: "voicemail-access numbers are refused",
    NumberKind.UNKNOWN: "numbers of unknown type are refused (unassigned range?)",
    NumberKind.PAGER: "pager numbers cannot receive codes",
}


def is_region(region: str) -> bool:
    """Whether ``region`` is a country phonenumbers knows, as two capital letters (``NL``)."""
    return len(region) == 2 and region in phonenumbers.SUPPORTED_REGIONS


def parse_phone(raw: str, region: str | None = None) -> Phone:
    """Parse and validate: E.164, or national digits with a two-letter ``region``.

    Raises :class:`InvalidNumber` (422) for anything that is not a valid, assigned-looking
    number.
    """
    if len(raw) > MAX_INPUT_LENGTH:
        raise InvalidNumber(f"phone must be 1..{MAX_INPUT_LENGTH} characters")
    # Spaces around it (pasted from a form): " +3161..." was refused as not E.164 while
    # "+3161... " passed, as separators do. Both pass now.
    raw = raw.strip(" \t")
    if not raw:
        raise InvalidNumber(f"phone must be 1..{MAX_INPUT_LENGTH} characters")
    if not raw.isascii() or not _ALLOWED.fullmatch(raw):
        raise InvalidNumber("phone may hold only ASCII digits, a leading + and separators")
    if region is not None and not re.fullmatch(r"[A-Z]{2}", region):
        raise InvalidNumber("region must be a two-letter country code such as NL")
    if not raw.startswith("+") and region is None:
        raise InvalidNumber("give the number in E.164 (+31612345678) or add a region")
    num = _parse_e164(raw)
    if num is None:
        try:
            num = phonenumbers.parse(raw, region)
        except phonenumbers.NumberParseException as exc:
            raise InvalidNumber(f"not a phone number: {exc._msg}") from None
    if (
        region is not None
        and raw.startswith("+")
        and num.country_code != phonenumbers.country_code_for_region(region)
    ):
        # "+32..." with region NL: one of the two is a mistake, and which one is not ours to
        # guess. ("0032..." with region NL is NL's way to dial Belgium: no contradiction.)
        if not phonenumbers.country_code_for_region(region):
            raise InvalidNumber(f"region {region} is not a country code")
        raise InvalidNumber(f"the number's country code +{num.country_code} is not {region}'s")
    # is_valid_number(num) is number_type(num) != UNKNOWN for the number's own region: one
    # pass over the metadata's patterns instead of two (tests/unit/test_numbers.py holds the
    # two equal over every example number phonenumbers knows, and broken variants of them).
    num_region = phonenumbers.region_code_for_number(num)
    kind = phonenumbers.number_type(num) if num_region else PhoneNumberType.UNKNOWN
    if kind == PhoneNumberType.UNKNOWN:
        raise InvalidNumber("not a valid phone number for its country")
    return Phone(
        e164=phonenumbers.format_number(num, phonenumbers.PhoneNumberFormat.E164),
        region=num_region or "",
        country_code=int(num.country_code or 0),
        national_number=phonenumbers.national_significant_number(num),
        kind=_KINDS.get(kind, NumberKind.UNKNOWN),
    )


def _parse_e164(raw: str) -> PhoneNumber | None:
    """``phonenumbers.parse(raw)`` for a bare ``+digits`` number, or None to leave it to that.

    The same steps and result (the region plays no part once a number starts with "+"), less
    the general machinery parse() runs first for any text (RFC 3966 contexts, extensions,
    IDD prefixes, punctuation): 2.4 us against 9.3 us, on every create. Anything out of the
    ordinary (no known country code, too short or too long) goes to parse() for its error.
    tests/unit/test_numbers.py holds the two equal over every example number phonenumbers
    knows and broken variants of them.
    """
    m = _E164_DIGITS.fullmatch(raw)
    if m is None:
        return None
    digits = m.group(1)
    for n in (1, 2, 3):  # country codes are 1-3 digits, tried shortest first as parse() does
        cc = int(digits[:n])
        if cc in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            national = digits[n:]
            break
    else:
        return None
    meta = phonenumbers.PhoneMetadata.metadata_for_region_or_calling_code(
        cc, phonenumbers.region_code_for_country_code(cc)
    )
    if meta is None or len(national) < _pnu._MIN_LENGTH_FOR_NSN:
        return None
    # A national prefix after the country code ("+31 06...") is dropped when what remains
    # still has a possible length, as parse() does.
    _, stripped, _ = _pnu._maybe_strip_national_prefix_carrier_code(national, meta)
    if _pnu._test_number_length(stripped, meta) not in _KEEP_PREFIX:
        national = stripped
    if not _pnu._MIN_LENGTH_FOR_NSN <= len(national) <= _pnu._MAX_LENGTH_FOR_NSN:
        return None
    num = PhoneNumber(country_code=cc, national_number=int(national))
    _pnu._set_italian_leading_zeros_for_phone_number(national, num)
    return num


def enforce_policy(phone: Phone, allowed_countries: frozenset[str]) -> None:
    """Raise :class:`NumberRefused` (403) for numbers the service will not send to."""
    reason = REFUSED_KINDS.get(phone.kind)
    if reason:
        raise NumberRefused(reason, reason=phone.kind.value)
    if phone.region == NON_GEOGRAPHIC:
        raise NumberRefused(
            f"numbers of international networks (+{phone.country_code}: satellite phones, "
            "global services, international freephone) are refused: no clinic's patient "
            "needs one, and they are a favourite of SMS pumping",
            reason="non_geographic",
        )
    if allowed_countries and phone.region not in allowed_countries:
        raise NumberRefused(
            f"numbers in {phone.region or 'this country'} are not served here",
            reason="country",
        )


def prefix_key(phone: Phone, national_digits: int) -> str:
    """Country code plus the leading national digits: the unit of the anti-pumping limit."""
    return f"+{phone.country_code}{phone.national_number[:national_digits]}"


def split_country_code(e164_prefix: str) -> tuple[int, str]:
    """``+447400`` -> ``(44, "7400")``: the country code and the national part of a prefix."""
    digits = e164_prefix.lstrip("+")
    for n in (1, 2, 3):
        cc = int(digits[:n])
        if cc in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            return cc, digits[n:]
    raise ValueError(f"{e164_prefix} does not start with a country code")


def trunk_prefix(region: str) -> str:
    """The national (trunk) prefix dialled before national numbers, e.g. ``0`` in NL."""
    meta = phonenumbers.PhoneMetadata.metadata_for_region(region)
    return (meta.national_prefix or "") if meta else ""


def _spaced(digits: str) -> str:
    # A handset or a person may show separators between any two digits.
    return "[ -]?".join(digits)


def exit_code(region: str) -> str:
    """The digits dialled before a country code from ``region`` when they are not ``00``:
    ``011`` in the NANP, ``0011`` in AU, ``010`` in JP, ``810`` in RU; "" otherwise.

    Some networks and handsets show an international caller-ID with them (``011 44 ...`` on
    a US phone) instead of ``+``.
    """
    meta = phonenumbers.PhoneMetadata.metadata_for_region(region) if region else None
    if meta is None:
        return ""
    for idd in (meta.preferred_international_prefix, meta.international_prefix):
        digits = (idd or "").replace("~", "")  # "8~10": dial 8, wait for a tone, dial 10
        if digits.isdigit():
            return "" if digits == "00" else digits
    return ""


def cli_filter(cli_prefix: str, code_length: int, destination: Phone) -> str:
    """A regex matching the flash call's caller-ID as the destination's handset may show it.

    Forms (Sinch calls this the CLI filter): international with ``+``, ``00``, the
    destination country's own exit code (``011`` in the NANP) or nothing in front; when the
    caller-ID is in the destination's country, national with its trunk prefix and without it
    (a NANP phone shows ``201 555 1234``, not ``1 201 555 1234``; so do Chinese, Colombian,
    Peruvian... mobiles); spaces and dashes between digits.
    """
    cc, national = split_country_code(cli_prefix)
    intl = _spaced(f"{cc}{national}")
    code = f"(?:[ -]?[0-9]){{{code_length}}}"
    exits = [r"\+", "00"]
    idd = exit_code(destination.region)
    if idd:
        exits.append(idd)
    # A separator only after a "+" or an exit code: a caller-ID never starts with a space or
    # a dash.
    forms = [rf"(?:(?:{'|'.join(exits)})[ -]?)?{intl}{code}"]
    # Where there is no trunk prefix (IT, ES, DK, NO, PT, GR...) the national form is the bare
    # national number: "06 1234...", not "+39 06 1234...".
    # A prefix that is a country code alone ("+47") has the code as its whole national
    # number: a Norwegian phone shows "2123 4567", the code and nothing else.
    trunk = trunk_prefix(destination.region)
    if cc == destination.country_code:
        for digits in dict.fromkeys((trunk + national, national)):
            forms.append(rf"{_spaced(digits)}{code}")
    return "^(?:" + "|".join(forms) + ")$"


@functools.lru_cache(maxsize=8)
def cli_code_lengths(cli_prefix: str) -> tuple[int, ...]:
    """The code lengths for which ``cli_prefix`` + code is a valid number of its country.

    A caller-ID that is no valid number is blocked, or replaced by "unknown", by many
    networks (Ofcom's CLI guidance, the FCC's STIR/SHAKEN rules, BNetzA): the phone would
    ring with no code to read. A length fits when prefix + code has a length the country's
    numbers have, whatever the code (0..0, 5..5, 9..9 are tried), and makes a valid number
    for one of those codes at least (validity may depend on the code's digits when the
    prefix is short).
    """
    try:
        split_country_code(cli_prefix)
    except ValueError:
        return ()
    fits = []
    for length in range(codes.MIN_LENGTH, codes.MAX_LENGTH + 1):
        try:
            samples = [phonenumbers.parse(cli_prefix + d * length) for d in "059"]
        except phonenumbers.NumberParseException:
            continue
        possible = all(
            phonenumbers.is_possible_number_with_reason(n) == _pnu.ValidationResult.IS_POSSIBLE
            for n in samples
        )
        if possible and any(phonenumbers.is_valid_number(n) for n in samples):
            fits.append(length)
    return tuple(fits)


def collapse_separators(cli: str) -> str:
    """``cli`` with each run of spaces and dashes between two digits, or between a ``+`` and
    a digit, read as one separator: ``07400  123456`` and ``07400 - 123456`` become
    ``07400 123456``. Separators at either end are left as they are."""
    return _SEPARATOR_RUN.sub(" ", cli)


def code_from_cli(cli: str, cli_prefix: str, code_length: int, destination: Phone) -> str | None:
    """The code digits carried by a reported caller-ID, or None if it is not ours.

    Before matching ``cli_filter`` (unchanged, as apps have it), blanks at the ends are
    trimmed and a run of separators inside is read as one (:func:`collapse_separators`).
    """
    if len(cli) > MAX_INPUT_LENGTH * 2 or not cli.isascii():
        return None
    # The digits are taken from the stripped form too: a trailing newline or tab would
    # otherwise end up in the "code".
    cli = collapse_separators(cli.strip())
    if not re.fullmatch(cli_filter(cli_prefix, code_length, destination), cli):
        return None
    digits = _SEPARATORS.sub("", cli).lstrip("+")
    return digits[-code_length:]
