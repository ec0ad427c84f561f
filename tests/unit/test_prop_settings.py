"""Properties of the settings parser (pure): any ``CLINIC_*`` values give valid Settings or a
:class:`SettingsError` naming a variable, never another exception (a traceback at start
names nothing the operator can fix)."""

from __future__ import annotations

import re
import string

from hypothesis import given
from hypothesis import strategies as st

from sip_config.settings import (
    VARIABLES,
    Settings,
    SettingsError,
    flow_preview_from_env,
    flows_dir_from_env,
)

NAMES = [v.name for v in VARIABLES]
# Values near what each kind of setting takes, and the ways people get them wrong.
_NEAR = [
    *(v.default for v in VARIABLES),
    *["0", "1", "2", "64", "-1", "1.5", "0.1", "99999999", "1" * 5000, "٣", "1e3", "nan"],
    *["5/600", "0/1", "1/0", "5/" + "9" * 5000, "5 / 600", "/"],
    *["127.0.0.1:0", "[::1]:5060", "[zz]:1", "h:99999", "a:b:1", ":1", "[::1]", "h:00000"],
    *["NL", "nl, gb", "UK", "NL,,", "EU", "XX"],
    *["http://h", "https://h/x", "redis://h:1/0", "unix:///tmp/r.sock", "ftp://h"],
    *["+447400", "+1", "+999", "+31", "+4474001234567", "+0"],
    *["sip:{e164}@pbx", "sip:{x}@pbx", "sip:{}@pbx", "sips:6100@pbx", "tel:1"],
    *["mon-fri 08:00-17:00", "sun-mon 01:00-02:00", "mon 24:00-24:00", "mon 08:00-25:00"],
    *["mon-fri 08:00-12:00,11:00-13:00; sat 09:00-12:00", "mon-fri\t08:00-17:00", ";;"],
    *["2026-12-25", "2026-02-30", "9999-99-99", "2026-1-1", "0000-00-00"],
    *["Europe/Amsterdam", "Europe", "../etc", "zone.tab", "UTC", "/etc/localtime", "a\x00b"],
    *["10.0.0.0/8", "::/0", "1.2.3.4/33", "1.2.3.4", "fe80::1%eth0"],
    *["k" * 16, "k" * 15, "s" * 32, ",".join(["s" * 32] * 9), "true", "off", "maybe"],
    *["always", "everysec", "none", "full", "DEBUG", "en", "ko", "088 123 45 67", "+31 6"],
]
VALUES = st.sampled_from(_NEAR) | st.text(max_size=12) | st.text(string.printable, max_size=30)


@given(st.dictionaries(st.sampled_from(NAMES), VALUES, max_size=6))
def test_any_environment_gives_settings_or_an_error_naming_a_variable(env: dict[str, str]) -> None:
    try:
        Settings.from_env(env)
    except SettingsError as exc:
        assert re.search(r"CLINIC_[A-Z0-9_]+", str(exc)), str(exc)
    try:
        flow_preview_from_env(env)
    except SettingsError as exc:
        assert re.search(r"CLINIC_[A-Z0-9_]+", str(exc)), str(exc)
    flows_dir_from_env(env)


@given(st.sampled_from(NAMES), VALUES)
def test_any_value_of_one_variable(name: str, value: str) -> None:
    try:
        Settings.from_env({name: value})
    except SettingsError as exc:
        assert "CLINIC_" in str(exc)
