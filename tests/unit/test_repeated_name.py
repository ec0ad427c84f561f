"""A JSON member name given twice in one object (:func:`verification.request.repeated_name`),
in every place and spelling one can hide: the quick scan and the second parse must agree."""

from __future__ import annotations

import codecs

import orjson
import pytest

from verification.errors import InvalidRequest
from verification.request import repeated_name

CASES = [
    (b'{"phone": "+31612345678", "method": "sms"}', None),
    (b'{"phone": "+31612345678", "phone": "+31687654321"}', "phone"),
    (b'{"phone": "a", "ph\\u006fne": "b"}', "phone"),  # the same name, written another way
    (b'{"a": {"x": 1, "x": 2}}', "x"),  # in a nested object
    (b'{"a": [{"x": 1}, {"y": 1, "y": 2}]}', "y"),  # in an object in an array
    (b'{"a": {"x": 1}, "b": {"x": 2}}', None),  # one name in two objects is fine
    (b'{"phone": "phone"}', None),  # a name that is also a value
    (b'{"code": "\\"code\\""}', None),  # a quoted name inside an escaped value
    (b'{"\\u00e9": 1, "\xc3\xa9": 2}', "\u00e9"),  # UTF-8 and escaped, the same name
    (b'{"\xc3\xa9": 1, "e": 2}', None),
    (codecs.BOM_UTF8 + b'{"a": 1, "a": 2}', "a"),
]


@pytest.mark.parametrize(("raw", "expected"), CASES)
def test_a_name_given_twice_is_found(raw: bytes, expected: str | None) -> None:
    body = orjson.loads(raw.removeprefix(codecs.BOM_UTF8))  # valid JSON, as the API checks
    assert repeated_name(raw, body) == expected


def test_too_deep_for_the_exact_parse_is_refused_not_a_crash() -> None:
    # orjson reads up to 1024 levels; json's recursion may stop before that.
    raw = b'{"a": ' * 1000 + b"1" + b"}" * 1000
    with pytest.raises(InvalidRequest):
        repeated_name(raw, {"a": {}})
