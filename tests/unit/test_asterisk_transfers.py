"""Who may reach the nurse (6100) and the staff desk (6200) on the shipped Asterisk.

In direct mode the REFER's ``Refer-To`` shows every transferred caller CLINIC_NURSE_URI and
CLINIC_STAFF_URI (README, "The clinic line"); behind the shipped Asterisk the REFER goes to
the PBX, which looks it up in ``[clinic-transfers]`` alone, and the people it reaches take
calls from authenticated endpoints only. These read the shipped configuration, as Asterisk
does, so a change that opens the nurse's extension to strangers fails here.
"""

from __future__ import annotations

import re

from tests.readme_text import README
from tests.unit.test_readme_layout import (
    PBX,
    dial,
    dialplan,
    endpoints,
    matches,
    pjsip_sections,
)

NURSE, STAFF = "6100", "6200"


def test_no_stranger_reaches_an_extension_without_a_password() -> None:
    """Every endpoint authenticates (``auth``), and none takes the calls nobody is identified
    for: ``anonymous`` in ``endpoint_identifier_order`` finds no ``[anonymous]`` endpoint,
    so an INVITE from a stranger to sip:6100@ is challenged and refused."""
    found = endpoints()
    assert {NURSE, STAFF} <= set(found)
    for name, options in found.items():
        assert options.get("auth"), f"endpoint {name} takes calls without a password"
    assert "anonymous" not in found
    (general,) = [o for _, o in pjsip_sections() if o.get("type") == "global"]
    order = general.get("endpoint_identifier_order", "")
    assert "ip" not in order.split(","), order  # an address says nothing here (pjsip.conf)


def test_a_refer_from_the_service_reaches_the_nurse_and_the_staff_desk_only() -> None:
    """The bot's REFERs are looked up in the context ``[clinic-line]`` hands its channel
    (``TRANSFER_CONTEXT``): it holds 6100 and 6200 and includes nothing, so a REFER cannot
    ring another extension or leave the PBX. The caller's own channel gets a context with
    nothing in it, and none of it is inherited (``__``): a caller's REFER is refused
    (``tests/e2e/test_pbx.py``), not looked up where the bot's is."""
    plan = dialplan()
    text = (PBX / "extensions.conf").read_text().splitlines()
    sets = [line for line in text if "TRANSFER_CONTEXT=" in line.split(";", 1)[0]]
    assert sets and not [line for line in sets if "_TRANSFER_CONTEXT=" in line], sets
    named = {re.sub(r"\).*", "", line.split("TRANSFER_CONTEXT=", 1)[1]) for line in sets}
    assert named == {"clinic-transfers", "caller-transfers"}, sets
    assert plan["caller-transfers"] == [], plan["caller-transfers"]
    line = text.index("[clinic-line]")
    section = text[line : text.index("", line)]  # up to its first blank line
    assert any("Set(TRANSFER_CONTEXT=caller-transfers)" in x for x in section), section
    assert any("Dial(${WORKER},20,b(bot-leg^s^1))" in x for x in section), section
    assert plan["bot-leg"][0] == ("s", "1,Set(TRANSFER_CONTEXT=clinic-transfers)")
    transfers = plan["clinic-transfers"]
    assert not [p for p, _ in transfers if p.startswith("include:")], transfers
    assert sorted(p for p, _ in transfers) == [NURSE, STAFF], transfers
    for number in ("6001", "+14155556001", "0044123456789", "700"):
        assert not any(matches(p, number) for p, _ in transfers), number
    assert endpoints()["clinic"]["context"] == "from-clinic"  # the service's own calls
    # ... whose far end (a voice-code call's phone) cannot hand them on either.
    assert endpoints()["clinic"].get("set_var") == "__TRANSFER_CONTEXT=caller-transfers"


def test_the_readme_says_who_learns_the_transfer_addresses_in_direct_mode() -> None:
    text = " ".join(README.read_text().split())
    assert re.search(
        r"In direct mode every transferred caller learns the nurse's and the staff's SIP "
        r"addresses\.\*\* Without `CLINIC_SIP_REGISTRAR` the REFER goes to the caller's own "
        r"phone, and its `Refer-To` is `CLINIC_NURSE_URI` or `CLINIC_STAFF_URI`",
        text,
    )
    assert "run the service behind the PBX (`CLINIC_SIP_REGISTRAR`" in text
    assert "`[clinic-transfers]` alone (the `TRANSFER_CONTEXT` that `[clinic-line]` sets)" in text


def test_the_service_reaches_the_test_phones_6001_to_6099_and_nothing_next_to_them() -> None:
    """Whoever holds an API key chooses the number a flash call, voice-code call or SMS over
    SIP goes to: ``[from-clinic]`` and ``[messages-from-clinic]`` take exactly the range the
    README gives, in each of its three forms. 6000 is not in it (``_60XX`` let it ring), nor
    are the nurse, the staff desk or the numbers around the range."""
    text = " ".join(README.read_text().split())
    first, last = re.findall(
        r"the test softphones only, `\+1415555(\d{4})` … `\+1415555(\d{4})`", text
    )[0]
    assert (first, last) == ("6001", "6099")
    messages = dialplan()["messages-from-clinic"]
    for extension in range(5990, 6210):
        reached = 6001 <= extension <= 6099
        for number in (f"{extension}", f"+1415555{extension}", f"1415555{extension}"):
            went = dial(number, "from-clinic")
            assert went == (("ring-phone", str(extension)) if reached else ("Hangup", "21")), number
            sends = [rest for pattern, rest in messages if matches(pattern, number)]
            assert len(sends) == (1 if reached else 0), (number, sends)
            for rest in sends:
                strip = re.fullmatch(r"1,MessageSend\(pjsip:\$\{EXTEN(?::(\d+))?\},.*\)", rest)
                assert strip is not None, rest
                assert number[int(strip.group(1) or 0) :] == str(extension), (number, rest)
