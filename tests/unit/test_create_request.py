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
