"""A changed ``CLINIC_SECRET`` with the old one in ``CLINIC_PREVIOUS_SECRETS``: which key a
code's check and a sealed record's opening try (the pure part; tests/integration/
test_secret_rotation.py runs it against Redis and the service). No Redis here."""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag

from clinic_voice.app import prepare_data_dir
from sip_config.settings import MAX_PREVIOUS_SECRETS, Settings, SettingsError
from verification import codes
from voice.ivr.store import CallStore
from voice.ivr.voicemail import Voicemails, VoicemailUnreadable

OLD = b"o" * 32  # the secret before the change
NEW = b"n" * 32
OTHER = b"x" * 32  # a secret nothing was made with
VID = "A" * 32
CODE = "123456"
DOC = {"values": {"complaint": "rash"}}
PCM = bytes(range(256)) * 4


def _store(secret: bytes, *previous: bytes) -> CallStore:
    redis: Any = None  # sealing and opening need no Redis
    return CallStore(redis, secret, retention_days=30, previous_secrets=previous)


# -- codes -------------------------------------------------------------------------------------


def test_a_code_hashed_with_a_previous_secret_checks_right_with_it_listed() -> None:
    sent = (codes.code_hash(OLD, VID, CODE),)
    assert codes.matches(NEW, VID, CODE, sent, (OLD,))
    assert codes.matches(NEW, VID, CODE, sent, (OTHER, OLD))  # any place in the list
    assert not codes.matches(NEW, VID, CODE, sent)  # without it: a wrong code, as before
    assert not codes.matches(NEW, VID, CODE, sent, (OTHER,))
    assert not codes.matches(NEW, VID, "654321", sent, (OLD,))
    assert not codes.matches(NEW, "B" * 32, CODE, sent, (OLD,))  # still bound to its id
    # A code sent after the change, and one of each in one verification.
    both = (codes.code_hash(OLD, VID, "111111"), codes.code_hash(NEW, VID, CODE))
    assert codes.matches(NEW, VID, CODE, both, (OLD,))
    assert codes.matches(NEW, VID, "111111", both, (OLD,))


@pytest.mark.parametrize("code", [CODE, "000000"])  # matched with the first secret, or none
def test_every_secret_is_compared_with_every_hash_whatever_matches(
    monkeypatch: pytest.MonkeyPatch, code: str
) -> None:
    compared: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def compare(a: str, b: str) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", compare)
    sent = (codes.code_hash(NEW, VID, CODE), codes.code_hash(NEW, VID, "222222"))
    codes.matches(NEW, VID, code, sent, (OLD, OTHER))
    assert len(compared) == 3 * 2  # no early exit: the time says nothing of what matched


# -- sealed records ----------------------------------------------------------------------------


def test_a_record_sealed_under_a_previous_secret_opens_with_it_listed() -> None:
    sealed = _store(OLD).seal("in-1", DOC)
    assert _store(NEW, OLD).open("in-1", sealed) == DOC
    assert _store(NEW, OTHER, OLD).open("in-1", sealed) == DOC
    with pytest.raises(InvalidTag):
        _store(NEW).open("in-1", sealed)  # without it: does not open, as before
    with pytest.raises(InvalidTag):
        _store(NEW, OTHER).open("in-1", sealed)
    with pytest.raises(InvalidTag):
        _store(NEW, OLD).open("in-2", sealed)  # still bound to its call id


def test_new_records_are_sealed_under_the_current_secret_only() -> None:
    rotated = _store(NEW, OLD)
    sealed = rotated.seal("in-1", DOC)
    assert _store(NEW).open("in-1", sealed) == DOC
    with pytest.raises(InvalidTag):
        _store(OLD).open("in-1", sealed)
    # A record kept on disk (the journal, a live call's) is checked the same way.
    times = {"started_at": "2026-01-05T10:00:00+00:00", "ended_at": "2026-01-05T10:01:00+00:00"}
    kept = _store(OLD).seal("in-2", times)
    assert rotated.reopen("in-2", kept).ended_at - rotated.reopen("in-2", kept).started_at == 60
    with pytest.raises(InvalidTag):
        _store(NEW).reopen("in-2", kept)


def test_reseal_puts_a_previous_secrets_record_under_the_current_one() -> None:
    old = _store(OLD).seal("in-1", DOC)
    rotated = _store(NEW, OTHER, OLD)
    new = rotated.reseal("in-1", old)
    assert new is not None and _store(NEW).open("in-1", new) == DOC
    with pytest.raises(InvalidTag):
        _store(OLD).open("in-1", new)
    assert rotated.reseal("in-1", new) is None  # under the current key: nothing to do
    with pytest.raises(InvalidTag):
        rotated.reseal("in-2", old)  # still bound to its call id
    with pytest.raises(InvalidTag):
        _store(NEW, OTHER).reseal("in-1", old)  # its secret not listed: does not open
    with pytest.raises(ValueError):
        rotated.reseal("in-1", "not base64!")


async def test_a_voicemail_sealed_under_a_previous_secret_plays_with_it_listed(
    tmp_path: Path,
) -> None:
    name = await Voicemails(tmp_path, _store(OLD)).save("in-1", PCM)
    assert await Voicemails(tmp_path, _store(NEW, OLD)).wav("in-1", name) is not None
    with pytest.raises(VoicemailUnreadable):
        await Voicemails(tmp_path, _store(NEW)).wav("in-1", name)
    newer = await Voicemails(tmp_path, _store(NEW, OLD)).save("in-1", PCM)
    with pytest.raises(VoicemailUnreadable):
        await Voicemails(tmp_path, _store(OLD)).wav("in-1", newer)


# -- settings ----------------------------------------------------------------------------------

S1, S2 = "a" * 32, "b" * 40


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("", ()),
        (S1, (S1,)),
        (f" {S1} , {S2},", (S1, S2)),
        (",".join([S1] * 16), (S1,) * 16),
        # one a secret file held before it was checked (tests/unit/test_data_dir.py)
        (f"{S1},short-secret", (S1, "short-secret")),
    ],
)
def test_previous_secrets_are_read_in_order(value: str, parsed: tuple[str, ...]) -> None:
    assert MAX_PREVIOUS_SECRETS == 16
    assert Settings.from_env({"CLINIC_PREVIOUS_SECRETS": value}).previous_secrets == parsed


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (",".join(["short-secret-leak"] * 17), "at most 16"),
        (",".join([S1] * 17), "at most 16"),
    ],
)
def test_bad_previous_secrets_are_refused_without_echoing_them(value: str, why: str) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"CLINIC_PREVIOUS_SECRETS": value})
    message = str(err.value)
    assert message.startswith("CLINIC_PREVIOUS_SECRETS=<hidden>: ") and why in message, message
    assert S1 not in message and "leak" not in message


@pytest.mark.parametrize("configured", [True, False])
def test_the_current_secret_listed_as_a_previous_one_is_refused(
    tmp_path: Path, configured: bool
) -> None:
    # The operator listed the old secret but did not set a new one: nothing would change.
    data = tmp_path / "data"
    data.mkdir()
    (data / "secret").write_text(S1 + "\n")
    (data / "secret").chmod(0o600)
    env = {"CLINIC_DATA_DIR": str(data), "CLINIC_PREVIOUS_SECRETS": f"{S2},{S1}"}
    if configured:
        env["CLINIC_SECRET"] = S1
    with pytest.raises(SettingsError, match="lists the current secret") as err:
        prepare_data_dir(Settings.from_env(env))
    assert S1 not in str(err.value)
    env["CLINIC_PREVIOUS_SECRETS"] = S2
    got = prepare_data_dir(Settings.from_env(env))
    assert (got.secret, got.previous_secrets) == (S1.encode(), (S2.encode(),))
