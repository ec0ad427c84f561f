"""The plan a create asks for (:func:`verification.api.parse_create`): which channel a
verification starts on when ``method`` is left out."""

from __future__ import annotations

import pytest

from verification.api import parse_create
from verification.errors import ChannelUnavailable, InvalidRequest
from verification.model import Channel

PHONE = "+31612345678"
FLASH, SMS, VOICE = Channel.FLASHCALL, Channel.SMS, Channel.VOICE


@pytest.mark.parametrize(
    ("body", "available", "plan"),
    [
        ({}, (FLASH, SMS, VOICE), (FLASH, SMS, VOICE)),
        ({"fallback": []}, (FLASH, SMS), (FLASH,)),
        # The method is the first configured channel the fallback list does not name.
        ({"fallback": ["flashcall"]}, (FLASH, SMS), (SMS, FLASH)),
        ({"fallback": ["flashcall", "sms"]}, (FLASH, SMS, VOICE), (VOICE, FLASH, SMS)),
        ({"method": "voice"}, (FLASH, SMS, VOICE), (VOICE, FLASH, SMS)),
    ],
)
def test_the_plan(
    body: dict[str, object], available: tuple[Channel, ...], plan: tuple[Channel, ...]
) -> None:
    assert parse_create({"phone": PHONE, **body}, available).plan == plan


@pytest.mark.parametrize(
    ("body", "available", "says"),
    [
        ({"fallback": ["sms"]}, (SMS,), "give 'method' too"),
        ({"method": "sms", "fallback": ["sms"]}, (SMS,), "appears twice"),
    ],
)
def test_a_plan_that_cannot_be(
    body: dict[str, object], available: tuple[Channel, ...], says: str
) -> None:
    with pytest.raises(InvalidRequest, match=says):
        parse_create({"phone": PHONE, **body}, available)


def test_a_channel_not_configured_names_what_would_configure_it() -> None:
    body = {"phone": PHONE, "method": "flashcall", "fallback": ["sms", "voice"]}
    with pytest.raises(ChannelUnavailable) as err:
        parse_create(body, (SMS,))
    assert err.value.detail == (
        "not configured here: flashcall (CLINIC_SIP_ROUTE and CLINIC_FLASHCALL_PREFIX),"
        " voice (CLINIC_SIP_ROUTE)"
    )
    assert err.value.extra == {"available": ["sms"]}


@pytest.mark.parametrize("region", ["NL", "US", "GB"])
def test_a_region_is_kept(region: str) -> None:
    assert parse_create({"phone": "0612345678", "region": region}, (SMS,)).region == region


@pytest.mark.parametrize("region", ["nl", "Nl", "NLD", "N", "12", "XX", "ZZ", "001", "N\u2060L"])
def test_a_region_that_is_no_country_names_its_field(region: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_create({"phone": "0612345678", "region": region}, (SMS,))
    assert err.value.extra.get("field") == "region"
    assert "such as NL" in err.value.detail


# A flash call's caller-ID is CLINIC_FLASHCALL_PREFIX + code: with "+447400" only a 6-digit
# code makes a valid UK number. A review found "+4474001234" (code_length 4) and
# "+44740012345678" (8) placed as caller-IDs that networks block or show as "unknown".
UK_FLASH_LENGTHS = (6,)


@pytest.mark.parametrize(
    ("body", "available", "plan"),
    [
        ({"code_length": 6}, (FLASH, SMS, VOICE), (FLASH, SMS, VOICE)),
        # not named: the default plan goes without the flash call
        ({"code_length": 8}, (FLASH, SMS, VOICE), (SMS, VOICE)),
        ({"code_length": 4, "method": "sms"}, (FLASH, SMS), (SMS,)),
    ],
)
def test_a_flash_call_needs_a_code_length_that_makes_a_valid_caller_id(
    body: dict[str, object], available: tuple[Channel, ...], plan: tuple[Channel, ...]
) -> None:
    req = parse_create({"phone": PHONE, **body}, available, (), UK_FLASH_LENGTHS)
    assert req.plan == plan


@pytest.mark.parametrize(
    "body",
    [
        {"code_length": 4, "method": "flashcall"},
        {"code_length": 8, "method": "sms", "fallback": ["flashcall"]},
    ],
)
def test_a_flash_call_asked_for_with_an_unfit_code_length_is_422(body: dict[str, object]) -> None:
    with pytest.raises(InvalidRequest, match="6-digit code") as err:
        parse_create({"phone": PHONE, **body}, (FLASH, SMS), (), UK_FLASH_LENGTHS)
    assert err.value.extra == {"field": "code_length"}


def test_only_a_flash_call_configured_and_an_unfit_code_length_is_422() -> None:
    with pytest.raises(InvalidRequest, match="6-digit code"):
        parse_create({"phone": PHONE, "code_length": 8}, (FLASH,), (), UK_FLASH_LENGTHS)


@pytest.mark.parametrize(
    ("body", "available"),
    [
        # CLINIC_FLASHCALL_PREFIX set, CLINIC_SIP_ROUTE not: no flash call to fit a code to.
        ({"code_length": 4, "method": "flashcall"}, (SMS,)),
        ({"code_length": 8, "method": "sms", "fallback": ["flashcall"]}, (SMS,)),
        # only the flash call configured, another channel asked for
        ({"code_length": 8, "method": "voice"}, (FLASH,)),
    ],
)
def test_a_channel_not_configured_is_channel_unavailable_whatever_the_code_length(
    body: dict[str, object], available: tuple[Channel, ...]
) -> None:
    with pytest.raises(ChannelUnavailable):
        parse_create({"phone": PHONE, **body}, available, (), UK_FLASH_LENGTHS)
