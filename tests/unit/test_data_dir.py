"""The data dir: its lock (one ``serve`` each) and the API key and secret generated into it."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from clinic_voice.app import DataDirInUse, lock_data_dir, prepare_data_dir
from sip_config.settings import Settings


def _settings(data: Path) -> Settings:
    return Settings.from_env({"CLINIC_DATA_DIR": str(data)})


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_second_lock_is_refused_naming_the_data_dir_and_the_holder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    held = lock_data_dir(data)
    try:
        assert not os.get_inheritable(held), "a child would keep the lock after serve"
        # flock locks an open file, so a second open in this process conflicts as another
        # process's would.
        with pytest.raises(DataDirInUse) as refused:
            lock_data_dir(data)
        assert f"data dir {data.resolve()} is in use" in str(refused.value)
        assert f"pid {os.getpid()}" in str(refused.value)
    finally:
        os.close(held)
    os.close(lock_data_dir(data))  # the file stays behind; only a holder blocks


def test_generated_key_and_secret_are_private_over_an_empty_0644_placeholder(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for name in ("api-key", "calls-api-key", "secret"):
        (data / name).touch()
        (data / name).chmod(0o644)
    got = prepare_data_dir(_settings(data))
    keys, calls_keys, secret = got.api_keys, got.calls_api_keys, got.secret
    assert (data / "api-key").read_text() == keys[0] + "\n" and len(keys[0]) >= 32
    assert (data / "calls-api-key").read_text() == calls_keys[0] + "\n"
    assert len(calls_keys[0]) >= 32 and calls_keys != keys
    assert (data / "secret").read_text() == secret.decode() + "\n" and len(secret) >= 32
    assert _mode(data / "api-key") == _mode(data / "secret") == 0o600
    assert _mode(data / "calls-api-key") == 0o600
    names = sorted(p.name for p in data.iterdir())
    assert names == ["api-key", "calls-api-key", "secret"], "a temp file left"


def test_an_existing_key_readable_by_others_is_kept_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "api-key").write_text("the-operators-own-key-0123456789\n")
    (data / "api-key").chmod(0o640)
    (data / "secret").write_text("s" * 64 + "\n")
    (data / "secret").chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="clinic_voice.app"):
        keys = prepare_data_dir(_settings(data)).api_keys
    assert keys == ("the-operators-own-key-0123456789",)
    assert _mode(data / "api-key") == 0o640, "the operator's file is left as it is"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{(data / 'api-key').resolve()} is readable by other users (mode 640): chmod 600 it"
    ]


@pytest.mark.parametrize(
    ("name", "written", "named"),
    [
        ("api-key", "abc", "not one API key (16+ characters"),
        # a rotation's "old,new" was taken as one key with a comma, which no client sends
        ("api-key", "a" * 20 + "," + "b" * 20, "or give several in CLINIC_API_KEYS"),
        ("calls-api-key", "short", "or give several in CLINIC_CALLS_API_KEYS"),
        ("secret", "too-short-for-a-secret", "a secret needs at least 32 characters"),
    ],
)
def test_a_key_or_secret_written_into_its_file_is_held_to_the_variables_rule(
    tmp_path: Path, name: str, written: str, named: str
) -> None:
    """The generated files are the operator's to write (README: "Changing the secret" step
    2, "Changing the API keys"): a value the variable would refuse stops the start (exit 2,
    a SettingsError), where it was taken as it was: a 3-character API key."""
    from sip_config.settings import SettingsError

    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / name).write_text(written + "\n")
    (data / name).chmod(0o600)
    with pytest.raises(SettingsError) as refused:
        prepare_data_dir(_settings(data))
    assert str(refused.value).startswith(f"{(data / name).resolve()}: ")
    assert named in str(refused.value)
    assert written not in str(refused.value), "a key or secret quoted in a log line"


def test_secret_reseal_holds_the_secret_file_to_the_same_rule(tmp_path: Path) -> None:
    from clinic_voice.app import current_secrets
    from sip_config.settings import SettingsError

    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "secret").write_text("short\n")
    with pytest.raises(SettingsError, match="a secret needs at least 32 characters"):
        current_secrets(_settings(data))
    (data / "secret").write_text("s" * 32 + "\n")
    assert current_secrets(_settings(data))[0] == b"s" * 32


@pytest.mark.parametrize("ending", ["\n", "\r\n", ""])
def test_a_short_secret_an_older_version_took_from_its_file_has_a_way_out(
    tmp_path: Path, ending: str
) -> None:
    """Before the secret file was checked, a secret under 32 characters written there by hand
    was taken, and sealed the records. Refused at start now, the way out the refusal names
    (a new secret there, the old one in CLINIC_PREVIOUS_SECRETS) must start, and reseal:
    CLINIC_PREVIOUS_SECRETS refused the old one too (32 characters), so nothing sealed under
    it could be kept but by staying on the old version."""
    from clinic_voice.app import current_secrets
    from sip_config.settings import SettingsError

    old, new = "written-by-hand-2019", "n" * 43
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "secret").write_text(old + ending)
    (data / "secret").chmod(0o600)
    with pytest.raises(SettingsError) as refused:
        prepare_data_dir(_settings(data))
    assert "list this one in CLINIC_PREVIOUS_SECRETS" in str(refused.value)
    assert old not in str(refused.value)

    (data / "secret").write_text(new + ending)
    env = {"CLINIC_DATA_DIR": str(data), "CLINIC_PREVIOUS_SECRETS": old}
    got = prepare_data_dir(Settings.from_env(env))
    assert (got.secret, got.previous_secrets) == (new.encode(), (old.encode(),))
    assert current_secrets(Settings.from_env(env)) == (new.encode(), (old.encode(),))
