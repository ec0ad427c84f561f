"""One-time codes (:mod:`verification.codes`): CSPRNG digits, stored only as an HMAC bound to
the verification, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest

from verification import codes, entropy

SECRET = b"s" * 32
VID = "A" * 32


@pytest.mark.parametrize("length", [4, 5, 6, 7, 8])
def test_new_code_is_length_ascii_digits(length: int) -> None:
    for _ in range(50):
        code = codes.new_code(length)
        assert len(code) == length
        assert code.isascii() and code.isdigit()
        assert codes.is_code_syntax(code, length)


@pytest.mark.parametrize("length", [-1, 0, 3, 9, 20])
def test_new_code_refuses_lengths_out_of_range(length: int) -> None:
    with pytest.raises(ValueError, match=r"4\.\.8"):
        codes.new_code(length)


@pytest.mark.parametrize(("drawn", "length", "code"), [(7, 6, "000007"), (0, 4, "0000"),
                                                      (99_999_999, 8, "99999999")])  # fmt: skip
def test_new_code_draws_from_the_csprng_and_keeps_leading_zeros(
    monkeypatch: pytest.MonkeyPatch, drawn: int, length: int, code: str
) -> None:
    bounds: list[int] = []

    def below(n: int) -> int:
        bounds.append(n)
        return drawn

    monkeypatch.setattr(entropy, "below", below)
    assert codes.new_code(length) == code
    assert bounds == [10**length]  # every code of the length is possible, none more likely


def test_new_codes_spread_over_the_whole_range() -> None:
    # 2000 draws of 4 digits: a leading zero is expected ~200 times, a repeat of one value
    # more than 10 times would mean a broken generator (p < 1e-9 for a uniform one).
    drawn = [codes.new_code(4) for _ in range(2000)]
    assert sum(c[0] == "0" for c in drawn) > 100
    assert max(drawn.count(c) for c in set(drawn)) <= 10


def test_code_hash_is_hmac_sha256_of_id_and_code() -> None:
    expected = hmac.new(SECRET, f"{VID}:123456".encode(), hashlib.sha256).hexdigest()
    assert codes.code_hash(SECRET, VID, "123456") == expected


@pytest.mark.parametrize(
    ("secret", "vid", "code"),
    [(b"t" * 32, VID, "123456"), (SECRET, "B" * 32, "123456"), (SECRET, VID, "123457")],
)
def test_code_hash_depends_on_secret_id_and_code(secret: bytes, vid: str, code: str) -> None:
    h = codes.code_hash(secret, vid, code)
    assert h != codes.code_hash(SECRET, VID, "123456")
    assert len(h) == 64 and "123456" not in h


@pytest.mark.parametrize(
    ("code", "sent", "expected"),
    [
        ("123456", ["123456"], True),
        ("123456", ["000000", "123456"], True),
        ("123456", ["123456", "000000"], True),
        ("123456", [], False),
        ("123456", ["654321"], False),
        ("012345", ["12345"], False),
        ("12345", ["012345"], False),
    ],
)
def test_matches(code: str, sent: list[str], expected: bool) -> None:
    hashes = tuple(codes.code_hash(SECRET, VID, c) for c in sent)
    assert codes.matches(SECRET, VID, code, hashes) is expected


def test_a_code_of_one_verification_does_not_match_another() -> None:
    hashes = (codes.code_hash(SECRET, VID, "123456"),)
    assert not codes.matches(SECRET, "B" * 32, "123456", hashes)
    assert not codes.matches(b"t" * 32, VID, "123456", hashes)


@pytest.mark.parametrize("position", [0, 1, 2])
def test_matches_compares_every_hash_in_constant_time(
    monkeypatch: pytest.MonkeyPatch, position: int
) -> None:
    hashes = [codes.code_hash(SECRET, VID, c) for c in ("111111", "222222", "333333")]
    hashes[position] = codes.code_hash(SECRET, VID, "999999")
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def compare(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", compare)
    assert codes.matches(SECRET, VID, "999999", tuple(hashes))
    assert len(calls) == 3, "stopped early: the time taken would tell which send matched"


@pytest.mark.parametrize(
    ("code", "length", "ok"),
    [
        ("123456", 6, True),
        ("000000", 6, True),
        ("1234", 4, True),
        ("12345678", 8, True),
        ("12345", 6, False),
        ("1234567", 6, False),
        ("", 6, False),
        ("12345a", 6, False),
        ("+12345", 6, False),
        (" 12345", 6, False),
        ("12 345", 6, False),
        ("-12345", 6, False),
        ("١٢٣٤٥٦", 6, False),  # Arabic-Indic digits: str.isdigit() says yes
        ("\uff11\uff12\uff13\uff14\uff15\uff16", 6, False),  # fullwidth
        ("\u00b2\u00b3\u00b9\u00b2\u00b3\u00b9", 6, False),  # superscripts are "digits" too
    ],
)
def test_is_code_syntax(code: str, length: int, ok: bool) -> None:
    assert codes.is_code_syntax(code, length) is ok


def test_codes_come_from_the_kernel_csprng() -> None:
    # Never `random`: its state can be recovered from outputs. entropy reads os.urandom.
    assert vars(codes)["entropy"] is entropy
    assert "random" not in vars(codes) and "random" not in vars(entropy)
    assert vars(entropy)["os"].urandom is os.urandom
