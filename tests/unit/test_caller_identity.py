"""Whether a clinic-line caller's number is asserted by a trusted hop or only claimed
(voice/sip/caller_identity.py), and how that reaches the call handle, the call record and
the scheduling webhook. A real SIP call: tests/integration/test_ivr_caller_identity.py."""

from __future__ import annotations

import asyncio
import re

import pytest

from sip_config.clock import FakeClock
from sip_config.settings import Settings, SettingsError
from tests.conftest import sip_settings
from tests.unit.test_readme_layout import endpoints
from voice.ivr.call_record import CallResult
from voice.ivr.engine import CallRecord
from voice.sip.caller_identity import (
    Caller,
    CallerIdentity,
    asserted_number,
    identify,
    parse_trusted_peers,
    source_host,
    too_broad,
)
from voice.sip.pool import CallHandle, SipPool
from voice.sip.protocol import IncomingCall

PBX = parse_trusted_peers("10.0.0.5, 192.168.1.0/24, fd00::7")
PAI = "P-Asserted-Identity"

ASSERTED = CallerIdentity.ASSERTED
CLAIMED = CallerIdentity.CLAIMED

CASES = [
    # (why, From user, headers, source, the caller)
    ("direct mode: the caller's own From", "+31612345678", (), "203.0.113.9:5060",
     Caller("+31612345678", CLAIMED)),
    ("a forged PAI from an untrusted address is ignored (RFC 3325 9.1)", "+31612345678",
     ((PAI, "<sip:+31687654321@pbx>"),), "203.0.113.9:5060", Caller("+31612345678", CLAIMED)),
    ("the trusted PBX asserts the number", "6001", ((PAI, "<sip:+31612345678@pbx>"),),
     "10.0.0.5:5060", Caller("+31612345678", ASSERTED)),
    ("the PAI wins over the From the PBX passed on", "anonymous",
     ((PAI, '"Patient" <sip:+31612345678@pbx;user=phone>'),), "10.0.0.5:5060",
     Caller("+31612345678", ASSERTED)),
    ("a trusted peer with no PAI: its From is not an assertion", "+31612345678", (),
     "10.0.0.5:5060", Caller("+31612345678", CLAIMED)),
    ("a network of trusted peers, header name in lower case", "x",
     (("p-asserted-identity", "<tel:+31-6-1234-5678>"),), "192.168.1.77:5080",
     Caller("+31612345678", ASSERTED)),
    ("an anonymous assertion holds no number", "+31612345678",
     ((PAI, "<sip:anonymous@anonymous.invalid>"),), "10.0.0.5:5060",
     Caller("+31612345678", CLAIMED)),
    ("IPv6 peer", "x", ((PAI, "<sip:6001@pbx>"),), "[fd00::7]:5060", Caller("6001", ASSERTED)),
    ("an IPv4 peer in an IPv6-mapped source", "x", ((PAI, "<sip:6001@pbx>"),),
     "[::ffff:10.0.0.5]:5060", Caller("6001", ASSERTED)),
    ("a neighbour of the trusted address", "+31612345678", ((PAI, "<sip:+3161@pbx>"),),
     "10.0.0.6:5060", Caller("+31612345678", CLAIMED)),
    ("no source known", "+31612345678", ((PAI, "<sip:+3161@pbx>"),), "",
     Caller("+31612345678", CLAIMED)),
]  # fmt: skip


@pytest.mark.parametrize(("why", "from_user", "headers", "source", "want"), CASES)
def test_the_trust_decision(
    why: str, from_user: str, headers: tuple[tuple[str, str], ...], source: str, want: Caller
) -> None:
    assert identify(from_user, headers, source, PBX) == want, why


def test_with_no_trusted_peers_no_number_is_verified() -> None:
    pai = ((PAI, "<sip:+31612345678@pbx>"),)
    got = identify("+31612345678", pai, "127.0.0.1:5060", ())
    assert got == Caller("+31612345678", CLAIMED) and not got.verified


@pytest.mark.parametrize(
    ("value", "number"),
    [
        ("<sip:+31612345678@pbx>", "+31612345678"),
        ("<sip:6001@127.0.0.1:5160>", "6001"),
        ("<tel:+1-201-555-0123>", "+12015550123"),
        ("<sip:anonymous@anonymous.invalid>, <tel:+31612345678>", "+31612345678"),
        ("<sip:@pbx>", ""),
        ("<sip:+31 6 12 (34) 56.78@pbx>", ""),  # a space ends the user part: no number here
        ("garbage", ""),
    ],
)
def test_the_number_a_pai_holds(value: str, number: str) -> None:
    assert asserted_number(value) == number


@pytest.mark.parametrize(
    "value",
    [
        '"sip:+31600000000@x" <sip:anonymous@anonymous.invalid>',
        '"tel:+31600000000 x" <sip:anonymous@pbx>',
        '"a, <tel:+31600000000>" <sip:anonymous@pbx>',
        '"a \\" <tel:+31600000000>" <sip:anonymous@pbx>',  # an escaped quote inside
        '"sip:+31600000000@x <sip:anonymous@pbx>',  # a quote never closed
    ],
)
def test_a_number_in_the_display_name_asserts_nothing(value: str) -> None:
    """A PBX passes the caller's own display name on in its PAI (Asterisk's caller ID name is
    the From's display name): a caller who writes a number there is not asserted."""
    assert asserted_number(value) == ""
    got = identify("anonymous", ((PAI, value),), "10.0.0.5:5060", PBX)
    assert got == Caller("anonymous", CLAIMED)


def test_the_pbx_number_wins_over_a_display_name_that_holds_another() -> None:
    value = '"sip:+31600000000@x" <sip:+31612345678@pbx>'
    assert asserted_number(value) == "+31612345678"


@pytest.mark.parametrize(
    ("address", "host"),
    [("127.0.0.1:5060", "127.0.0.1"), ("[::1]:5060", "::1"), ("::1", "::1"), ("x:1", None)],
)
def test_source_host(address: str, host: str | None) -> None:
    got = source_host(address)
    assert (str(got) if got is not None else None) == host


def test_the_setting_is_parsed_and_checked() -> None:
    env = {"CLINIC_SIP_TRUSTED_PEERS": "10.0.0.5,10.1.0.0/16"}
    assert [str(n) for n in Settings.from_env(env).sip.trusted_peers] == [
        "10.0.0.5/32",
        "10.1.0.0/16",
    ]
    assert Settings.from_env({}).sip.trusted_peers == ()
    with pytest.raises(SettingsError, match=re.escape("CLINIC_SIP_TRUSTED_PEERS='pbx.example': ")):
        Settings.from_env({"CLINIC_SIP_TRUSTED_PEERS": "pbx.example"})


@pytest.mark.parametrize(
    ("value", "broad"),
    [
        ("0.0.0.0/0", ["0.0.0.0/0"]),
        ("::/0", ["::/0"]),
        ("10.0.0.5, 10.0.0.0/7, 192.168.0.0/16", ["10.0.0.0/7"]),
        ("10.0.0.0/8, 172.16.0.0/12, 2001:db8::/32, ::1", []),
        ("2000::/3, 2001:db8::/31", ["2000::/3", "2001:db8::/31"]),
        ("::ffff:0.0.0.0/96", ["0.0.0.0/0"]),  # every IPv4 sender, as a dual stack shows it
        ("", []),
    ],
)
def test_a_network_wider_than_one_operators_is_too_broad(value: str, broad: list[str]) -> None:
    """Trusting 0.0.0.0/0 believes every sender's P-Asserted-Identity: serve warns at start
    about the networks wider than an IPv4 /8 or an IPv6 /32."""
    assert [str(n) for n in too_broad(parse_trusted_peers(value))] == broad


async def _handle_for(pool: SipPool, ev: IncomingCall) -> CallHandle:
    handles: list[CallHandle] = []

    async def handler(handle: CallHandle) -> None:
        handles.append(handle)

    pool.on_incoming(handler)
    w = pool._workers[0]
    w.up, w.free_slots = True, 4
    pool._dispatch(w, ev)
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(handles) == 1, handles
    return handles[0]


async def test_the_pool_gives_the_session_the_asserted_number() -> None:
    trusted = sip_settings(1, trusted_peers=parse_trusted_peers("127.0.0.2"))
    pai = ((PAI, "<sip:+31612345678@pbx>"),)
    pool = SipPool(trusted, clock=FakeClock())
    pool._running = True
    h = await _handle_for(pool, IncomingCall("in-1", "6001", "700", 3, pai, "c1", "127.0.0.2:5"))
    assert (h.caller, h.caller_identity) == ("+31612345678", ASSERTED)


async def test_the_pool_gives_the_session_a_claimed_number_from_anyone_else() -> None:
    trusted = sip_settings(1, trusted_peers=parse_trusted_peers("127.0.0.2"))
    pai = ((PAI, "<sip:+31612345678@pbx>"),)
    pool = SipPool(trusted, clock=FakeClock())
    pool._running = True
    h = await _handle_for(pool, IncomingCall("in-1", "666", "700", 3, pai, "c1", "127.0.0.1:5"))
    assert (h.caller, h.caller_identity) == ("666", CLAIMED)


def test_the_call_record_says_whether_the_number_was_verified() -> None:
    record = CallRecord("triage", (), (), None, (), None, None, "same_day")
    claimed = CallResult("in-1", "+3161", "700", 0.0, 1.0, record)
    assert claimed.to_json()["caller_verified"] is False
    asserted = CallResult("in-1", "+3161", "700", 0.0, 1.0, record, caller_identity=ASSERTED)
    assert asserted.to_json()["caller_verified"] is True


def test_the_shipped_asterisk_asserts_only_the_number_it_has_for_a_phone() -> None:
    """README: behind the shipped Asterisk, CLINIC_SIP_TRUSTED_PEERS may name it. Its PAI is
    then believed, so it must be the extension's own callerid: a phone whose PAI it trusted
    (trust_id_inbound) could have any number of its choice asserted to the clinic line."""
    phones = {n: o for n, o in endpoints().items() if o.get("context") == "from-phones"}
    assert phones
    for name, options in phones.items():
        assert options.get("trust_id_inbound", "no") == "no", f"{name} asserts its own number"
        assert options.get("callerid", "").endswith(f"<{name}>"), (name, options)
        assert options.get("send_pai") == "yes", name


@pytest.mark.parametrize("source", ["10.0.0.5:5060", "[::ffff:10.0.0.5]:5060"])
def test_a_peer_given_as_an_ipv4_mapped_address_is_trusted(source: str) -> None:
    """Before, ::ffff:10.0.0.5 (as a dual-stack socket writes an IPv4 peer) never matched:
    the source is read as IPv4, the setting stayed IPv6, and the PBX asserted nothing."""
    peers = parse_trusted_peers("::ffff:10.0.0.5, ::ffff:192.168.0.0/120")
    assert [str(n) for n in peers] == ["10.0.0.5/32", "192.168.0.0/24"]
    pai = ((PAI, "<sip:+31612345678@pbx>"),)
    assert identify("6001", pai, source, peers) == Caller("+31612345678", ASSERTED)
