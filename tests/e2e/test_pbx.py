"""The PBX alone: Asterisk 22 with the repository's configs and pjsua2 softphones.

These need no clinic-voice service: the service's side is played by softphones that use
its credentials (``clinic``), the way its workers will.
"""

from __future__ import annotations

import threading
import time
from array import array
from pathlib import Path

import pytest

from tests.e2e.conftest import PhoneFactory
from tests.e2e.rig import AsteriskRig
from tests.peers.pbx_softphone import Event, Softphone, display_name
from tests.peers.pbx_softphone import call_state as state
from voice.ivr.engine import SUMMARY_HEADER, URGENCY_HEADER
from voice.ivr.session import CALL_HEADER, refer_to
from voice.media.pcm import read_wav, rms_dbfs

# The first test may wait for the rootfs build (about a minute) in the session fixture.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

FLASH_CLI = "+447400123456"


def test_softphone_registers(asterisk: AsteriskRig, phone: PhoneFactory) -> None:
    phone("6001")
    contacts = asterisk.cli("pjsip show aor 6001")
    assert "Contact:  6001/sip:6001@127.0.0.1" in contacts, contacts


def test_wrong_password_is_refused(phone: PhoneFactory) -> None:
    refused = phone("6002", password="not-the-password", wait=False).expect("reg_failed")
    assert refused["code"] in {401, 403}, refused


def test_call_between_softphones_carries_rfc4733_dtmf(
    phone: PhoneFactory, asterisk: AsteriskRig
) -> None:
    a = phone("6001")
    b = phone("6002")
    a.send("call", uri=f"sip:6002@127.0.0.1:{asterisk.port}")
    incoming = b.expect("incoming")
    assert incoming["from_user"] == "6001"
    a.expect("call_state", where=state("CONFIRMED", 200))
    a.expect("media_active")
    b.expect("media_active")
    # Asterisk's strictrtp learns each side's RTP source from its first packets: let a few
    # flow before the telephone-events, or the first digit may be dropped in probation.
    threading.Event().wait(0.5)
    a.send("dtmf", digits="4#1")
    got = [b.expect("dtmf", timeout_s=5)["digit"] for _ in range(3)]
    assert got == ["4", "#", "1"]
    b.send("dtmf", digits="9")
    assert a.expect("dtmf", timeout_s=5)["digit"] == "9"
    a.send("hangup")
    b.expect("call_state", where=state("DISCONNECTED"))


def test_message_to_e164_reaches_the_softphone(phone: PhoneFactory, asterisk: AsteriskRig) -> None:
    target = phone("6001")
    service = phone("clinic", register=False)
    service.send(
        "message", uri=f"sip:+14155556001@127.0.0.1:{asterisk.port}", body="Your code: 481516"
    )
    assert service.expect("message_status")["code"] == 202
    got = target.expect("message", timeout_s=5)
    assert got["body"] == "Your code: 481516"
    assert got["content_type"] == "text/plain"


def test_message_to_a_phone_not_registered_is_accepted_and_dropped(
    phone: PhoneFactory, asterisk: AsteriskRig
) -> None:
    """Why the service's event for a 202 says "delivery not confirmed" (README, "Numbers to
    dial"): Asterisk answers 202 Accepted before its dialplan's MessageSend tries the phone
    (res_pjsip_messaging), so a phone that is not registered never gets the text and the
    sender hears nothing more. No dialplan can answer an error instead: only a MESSAGE whose
    number has no extension in the ``messages`` context is refused (404)."""
    service = phone("clinic", register=False)
    service.send(
        "message", uri=f"sip:+14155556002@127.0.0.1:{asterisk.port}", body="Your code: 271828"
    )
    assert service.expect("message_status")["code"] == 202
    # The phone registers after: the MESSAGE is gone, not held for it.
    late = phone("6002")
    with pytest.raises(AssertionError):
        late.expect("message", timeout_s=3)
    # The clinic line (700) has no extension in [messages]: refused at once.
    service.send("message", uri=f"sip:700@127.0.0.1:{asterisk.port}", body="Your code: 271828")
    assert service.expect("message_status")["code"] == 404


def test_the_service_reaches_6001_to_6099_only(phone: PhoneFactory, asterisk: AsteriskRig) -> None:
    """Asterisk's own pattern matching of [from-clinic] and [messages-from-clinic]: the ends
    of the test phones' range ring (480: not registered), and 6000 next to it, the nurse and
    6100 are refused: a call 403 (cause 21), a MESSAGE 404."""
    service = phone("clinic", register=False)
    at = f"@127.0.0.1:{asterisk.port}"
    for number, code in (
        ("+14155556001", 480),
        ("+14155556010", 480),
        ("+14155556099", 480),
        ("+14155556000", 403),
        ("6000", 403),
        ("14155556000", 403),
        ("+14155556100", 403),
    ):
        service.send("call", uri=f"sip:{number}{at}")
        ended = service.expect("call_state", where=state("DISCONNECTED"), timeout_s=10)
        assert ended["code"] == code, (number, ended)
    for number, code in (("+14155556099", 202), ("+14155556000", 404), ("6000", 404)):
        service.send("message", uri=f"sip:{number}{at}", body="Your code: 271828")
        assert service.expect("message_status")["code"] == code, number


def test_late_offer_flash_call_shows_the_caller_id_and_cancel_propagates(
    phone: PhoneFactory, asterisk: AsteriskRig
) -> None:
    target = phone("6001", answer="ring")
    service = phone("clinic", register=False)
    service.send(
        "call",
        uri=f"sip:+14155556001@127.0.0.1:{asterisk.port}",
        late_offer=True,
        from_uri=f"<sip:{FLASH_CLI}@127.0.0.1>",
        headers={"P-Asserted-Identity": f"<sip:{FLASH_CLI}@127.0.0.1>"},
    )
    incoming = target.expect("incoming", timeout_s=5)
    # The code is the caller-ID: Asterisk must pass it on unchanged, in From and PAI.
    assert incoming["from_user"] == FLASH_CLI, incoming
    assert incoming["pai_user"] == FLASH_CLI, incoming
    service.expect("call_state", where=state("EARLY", 180), timeout_s=5)
    service.send("hangup", code=487)  # CANCEL while ringing
    assert target.expect("call_state", where=state("DISCONNECTED"), timeout_s=5)["code"] == 487
    assert service.expect("call_state", where=state("DISCONNECTED"), timeout_s=5)["code"] == 487


def test_the_service_identity_needs_its_password(
    phone: PhoneFactory, asterisk: AsteriskRig
) -> None:
    target = phone("6001", answer="ring")
    intruder = phone("clinic", register=False, password="guessed")
    intruder.send(
        "call",
        uri=f"sip:+14155556001@127.0.0.1:{asterisk.port}",
        from_uri=f"<sip:{FLASH_CLI}@127.0.0.1>",
    )
    ended = intruder.expect("call_state", where=state("DISCONNECTED"), timeout_s=10)
    assert ended["code"] in {401, 403, 407}, ended
    assert not [e for e in target.drain(0.5) if e["event"] == "incoming"]


def test_clinic_line_is_congested_without_the_service(
    phone: PhoneFactory, asterisk: AsteriskRig
) -> None:
    caller = phone("6003")
    caller.send("call", uri=f"sip:700@127.0.0.1:{asterisk.port}")
    ended = caller.expect("call_state", where=state("DISCONNECTED"), timeout_s=10)
    assert ended["code"] >= 400, ended


def test_a_phone_that_is_not_registered_is_unavailable_not_unknown(
    phone: PhoneFactory, asterisk: AsteriskRig
) -> None:
    """A test phone that is not registered answers 480, not the 404 of a number that does
    not exist: the service reads 404 as not_found and 480 as unreachable."""
    caller = phone("6001")
    service = phone("clinic", register=False)
    for who, uri in (
        (caller, f"sip:6002@127.0.0.1:{asterisk.port}"),
        (service, f"sip:+14155556002@127.0.0.1:{asterisk.port}"),
        (caller, f"sip:701@127.0.0.1:{asterisk.port}"),
    ):
        who.send("call", uri=uri)
        ended = who.expect("call_state", where=state("DISCONNECTED"), timeout_s=10)
        assert ended["code"] == (404 if "701" in uri else 480), (uri, ended)


def test_clinic_line_hunts_past_full_workers(phone: PhoneFactory, asterisk: AsteriskRig) -> None:
    # Two "workers" registered as the service, each holding at most 4 calls (486 beyond),
    # like the service's SIP worker processes. Six calls to 700 must all be answered.
    workers = [phone("clinic", capacity=4) for _ in range(2)]
    contacts = asterisk.cli("pjsip show aor clinic")
    assert contacts.count("Contact:  clinic/") == 2, contacts
    callers = [phone("6001"), phone("6002")]
    for caller in callers:
        for number in ("700", "700", "+14155550700"):
            caller.send("call", uri=f"sip:{number}@127.0.0.1:{asterisk.port}")
    for caller in callers:
        for _ in range(3):
            caller.expect("call_state", where=state("CONFIRMED", 200), timeout_s=15)
    # A worker sees CONFIRMED when Asterisk's ACK arrives, maybe a moment after the caller.
    deadline = time.monotonic() + 5
    while True:
        answered = [
            sum(1 for e in w.drain(0.1) if e["event"] == "call_state" and e["state"] == "CONFIRMED")
            for w in workers
        ]
        if sum(answered) >= 6 or time.monotonic() > deadline:
            break
    assert sum(answered) == 6 and max(answered) <= 4, answered
    for caller in callers:
        caller.send("hangup")


def test_a_callers_hold_reaches_the_bot_and_so_does_its_end(
    phone: PhoneFactory, asterisk: AsteriskRig
) -> None:
    """6001 calls the clinic line and puts the call on hold, then takes it off hold: the
    bot's leg is held and taken back too (re-INVITEs from Asterisk), so the service can wait
    for the caller. Asterisk's default instead plays music on hold to the bot's leg and
    tells it nothing (moh_passthrough=yes on the clinic endpoint, pjsip.conf)."""
    bot = phone("clinic")
    caller = phone("6001")
    caller.send("call", uri=f"sip:700@127.0.0.1:{asterisk.port}")
    caller.expect("call_state", where=state("CONFIRMED", 200), timeout_s=10)
    bot.expect("call_state", where=state("CONFIRMED"), timeout_s=10)
    bot.expect("media_active", timeout_s=5)
    asterisk.wait_for_bridge()
    caller.send("hold")
    caller.expect("media_held", where=lambda e: e["by"] == "local", timeout_s=5)
    held = bot.expect("media_held", where=lambda e: e["by"] == "remote", timeout_s=5)
    caller.send("unhold")
    bot.expect("media_active", where=lambda e: e["at"] > held["at"], timeout_s=5)
    caller.send("hangup")
    bot.expect("call_state", where=state("DISCONNECTED"), timeout_s=10)


def test_transfer_from_the_bot_reaches_the_nurse(
    phone: PhoneFactory, asterisk: AsteriskRig
) -> None:
    bot = phone("clinic")
    nurse = phone("6100", answer_delay_s=0.5)
    caller = phone("6001")
    caller.send("call", uri=f"sip:700@127.0.0.1:{asterisk.port}")
    bot.expect("call_state", where=state("CONFIRMED"), timeout_s=10)
    # The service transfers after the caller has spoken or pressed keys, so long after
    # Asterisk bridged the call; a REFER right at the ACK could meet no bridge yet (400).
    asterisk.wait_for_bridge()
    bot.send("xfer", uri=f"sip:6100@127.0.0.1:{asterisk.port}")
    rung = nurse.expect("incoming", timeout_s=10)
    assert rung["from_user"] == "6001", rung
    nurse.expect("call_state", where=state("CONFIRMED"), timeout_s=10)
    # Asterisk reports the transfer done (NOTIFY 200) once the nurse answers; the bot
    # then ends its own leg.
    bot.expect("transfer_status", where=lambda e: e["final"] and e["code"] == 200)
    bot.expect("call_state", where=state("DISCONNECTED"), timeout_s=10)
    nurse.expect("media_active", timeout_s=5)
    caller.send("dtmf", digits="5")
    assert nurse.expect("dtmf", timeout_s=5)["digit"] == "5"
    caller.send("hangup")
    nurse.expect("call_state", where=state("DISCONNECTED"), timeout_s=10)


# What the service's transfer carries (voice/ivr/session.py): the same headers on the REFER
# and embedded in its Refer-To URI.
TRANSFER_HEADERS = {CALL_HEADER: "c-7f3a9b2e41d04c5f", URGENCY_HEADER: "U1"}


@pytest.mark.parametrize("reached", ["6100", "6200"])
def test_a_transfer_from_the_bot_shows_the_call_and_its_urgency_to_the_phone(
    phone: PhoneFactory, asterisk: AsteriskRig, reached: str
) -> None:
    """The nurse (or, when the nurse is not registered, the staff desk) gets X-Clinic-Call
    and X-Clinic-Urgency on Asterisk's INVITE, as the README promises staff phones; the
    summary stays behind (only the two short headers are copied). The urgency also leads
    the name in From, which a desk phone that shows no X- header does show."""
    bot = phone("clinic")
    target = phone(reached, answer="ring")
    caller = phone("6001")
    caller.send("call", uri=f"sip:700@127.0.0.1:{asterisk.port}")
    bot.expect("call_state", where=state("CONFIRMED"), timeout_s=10)
    asterisk.wait_for_bridge()
    sent = {**TRANSFER_HEADERS, SUMMARY_HEADER: "breathing difficulty"}
    uri = refer_to(f"sip:6100@127.0.0.1:{asterisk.port}", sent.items())
    bot.send("xfer", uri=uri, headers=sent)
    rung = target.expect("incoming", timeout_s=10)
    assert rung["from_user"] == "6001", rung
    assert {k: v for k, v in rung["x_headers"].items() if k.startswith("X-Clinic-")} == (
        TRANSFER_HEADERS
    ), rung
    assert display_name(rung["from_header"]) == "U1 Tester 6001", rung
    assert display_name(rung["pai"]) == "U1 Tester 6001", rung
    caller.send("hangup")
    target.expect("call_state", where=state("DISCONNECTED"), timeout_s=10)


@pytest.mark.parametrize(
    "sent",
    [
        {CALL_HEADER: "c-7f3a9b2e41d04c5f"},
        {CALL_HEADER: "c-7f3a9b2e41d04c5f", URGENCY_HEADER: "chest pain"},
    ],
    ids=["no-urgency", "not-a-level"],
)
def test_a_transfer_with_no_urgency_shows_the_caller_as_they_are(
    phone: PhoneFactory, asterisk: AsteriskRig, sent: dict[str, str]
) -> None:
    """CLINIC_TRANSFER_SUMMARY=none sends no X-Clinic-Urgency, and a value that is no level
    U0-U5 is not shown: the nurse's phone shows the caller's own name, nothing before it."""
    bot = phone("clinic")
    target = phone("6100", answer="ring")
    caller = phone("6001")
    caller.send("call", uri=f"sip:700@127.0.0.1:{asterisk.port}")
    bot.expect("call_state", where=state("CONFIRMED"), timeout_s=10)
    asterisk.wait_for_bridge()
    uri = refer_to(f"sip:6100@127.0.0.1:{asterisk.port}", sent.items())
    bot.send("xfer", uri=uri, headers=sent)
    rung = target.expect("incoming", timeout_s=10)
    assert display_name(rung["from_header"]) == "Tester 6001", rung
    assert display_name(rung["pai"]) == "Tester 6001", rung
    caller.send("hangup")
    target.expect("call_state", where=state("DISCONNECTED"), timeout_s=10)


def test_a_caller_cannot_transfer_the_bot_to_the_nurse(
    phone: PhoneFactory, asterisk: AsteriskRig
) -> None:
    """Only the bot's REFER may use [clinic-transfers]. A caller's own phone that sends a
    blind REFER on its call to the clinic line must not move the bot's leg to the nurse,
    let alone with X-Clinic-* headers of its own making (a forged call id and urgency on
    the nurse's screen): Asterisk refuses it (404), the nurse's phone does not ring, and
    the caller stays with the bot."""
    bot = phone("clinic")
    nurse = phone("6100", answer="ring")
    caller = phone("6001")
    caller.send("call", uri=f"sip:700@127.0.0.1:{asterisk.port}")
    bot.expect("call_state", where=state("CONFIRMED"), timeout_s=10)
    bot.expect("media_active", timeout_s=5)
    asterisk.wait_for_bridge()
    forged = {CALL_HEADER: "c-forged", URGENCY_HEADER: "U1"}
    uri = refer_to(f"sip:6100@127.0.0.1:{asterisk.port}", forged.items())
    caller.send("xfer", uri=uri, headers=forged)
    refused = caller.expect("transfer_status", where=lambda e: e["final"], timeout_s=5)
    assert not [e for e in nurse.drain(1.0) if e["event"] == "incoming"], nurse.story()
    assert refused["code"] == 404, refused
    # Nothing else changed: the caller's keys still reach the bot.
    threading.Event().wait(0.5)  # strictrtp learns the source first (see the DTMF test)
    caller.send("dtmf", digits="5")
    assert bot.expect("dtmf", timeout_s=5)["digit"] == "5"
    caller.send("hangup")
    bot.expect("call_state", where=state("DISCONNECTED"), timeout_s=10)


def test_the_phone_a_voice_code_call_reaches_cannot_transfer_it(
    phone: PhoneFactory, asterisk: AsteriskRig
) -> None:
    """The service's calls reach the patients' phones only ([from-clinic]): the phone that
    answers a voice-code call must not hand it on with a REFER either, to the nurse (who
    would hear the code read out) or anywhere else. Asterisk refuses it (404)."""
    bot = phone("clinic")
    nurse = phone("6100", answer="ring")
    callee = phone("6001")
    bot.send("call", uri=f"sip:+14155556001@127.0.0.1:{asterisk.port}")
    callee.expect("incoming", timeout_s=10)
    callee.send("answer")
    callee.expect("call_state", where=state("CONFIRMED"), timeout_s=10)
    asterisk.wait_for_bridge()
    callee.send("xfer", uri=f"sip:6100@127.0.0.1:{asterisk.port}")
    refused = callee.expect("transfer_status", where=lambda e: e["final"], timeout_s=5)
    assert not [e for e in nurse.drain(1.0) if e["event"] == "incoming"], nurse.story()
    assert refused["code"] == 404, refused
    callee.send("hangup")
    bot.expect("call_state", where=state("DISCONNECTED"), timeout_s=10)


def test_the_nurse_can_hand_a_transferred_caller_to_the_staff_desk(
    phone: PhoneFactory, asterisk: AsteriskRig
) -> None:
    """What the caller may not do, the nurse who took them from the bot still may: her
    REFER is looked up in [clinic-transfers], so the staff desk rings for the caller."""
    bot = phone("clinic")
    nurse = phone("6100")
    staff = phone("6200", answer="ring")
    caller = phone("6001")
    caller.send("call", uri=f"sip:700@127.0.0.1:{asterisk.port}")
    bot.expect("call_state", where=state("CONFIRMED"), timeout_s=10)
    asterisk.wait_for_bridge()
    uri = refer_to(f"sip:6100@127.0.0.1:{asterisk.port}", TRANSFER_HEADERS.items())
    bot.send("xfer", uri=uri, headers=TRANSFER_HEADERS)
    nurse.expect("call_state", where=state("CONFIRMED"), timeout_s=10)
    bot.expect("call_state", where=state("DISCONNECTED"), timeout_s=10)
    asterisk.wait_for_bridge()
    nurse.send("xfer", uri=f"sip:6200@127.0.0.1:{asterisk.port}")
    rung = staff.expect("incoming", timeout_s=10)
    assert rung["from_user"] == "6001", rung
    caller.send("hangup")
    staff.expect("call_state", where=state("DISCONNECTED"), timeout_s=10)


def test_a_transfer_nobody_takes_is_reported_busy_before_the_message(
    phone: PhoneFactory, asterisk: AsteriskRig
) -> None:
    """Neither the nurse (6100) nor the staff desk (6200) is registered: [transfer-failed]
    must tell the bot so (a final NOTIFY 486) before it plays its message. Without that,
    res_pjsip_refer takes the message's first audio frame for an answer and reports 200,
    and the bot records that a nurse took the call. The caller still hears the message
    (about 10 s) before Asterisk hangs up."""
    for ext in ("6100", "6200"):
        aor = asterisk.cli(f"pjsip show aor {ext}")
        assert f"Contact:  {ext}/" not in aor, f"{ext} is registered: {aor}"
    bot = phone("clinic")
    caller = phone("6001")
    caller.send("call", uri=f"sip:700@127.0.0.1:{asterisk.port}")
    bot.expect("call_state", where=state("CONFIRMED"), timeout_s=10)
    asterisk.wait_for_bridge()
    bot.send("xfer", uri=f"sip:6100@127.0.0.1:{asterisk.port}")
    told = bot.expect("transfer_status", where=lambda e: e["final"], timeout_s=10)
    assert told["code"] == 486, told
    ended = caller.expect("call_state", where=state("DISCONNECTED"), timeout_s=30)
    assert ended["at"] - told["at"] > 5.0, "the caller did not hear the message after it"


def test_the_bot_cannot_transfer_anywhere(phone: PhoneFactory, asterisk: AsteriskRig) -> None:
    bot = phone("clinic")
    other = phone("6002", answer="ring")
    caller = phone("6001")
    caller.send("call", uri=f"sip:700@127.0.0.1:{asterisk.port}")
    bot.expect("call_state", where=state("CONFIRMED"), timeout_s=10)
    asterisk.wait_for_bridge()  # refused for the target, not for a bridge not yet made
    bot.send("xfer", uri=f"sip:6002@127.0.0.1:{asterisk.port}")
    refused = bot.expect("transfer_status", where=lambda e: e["final"], timeout_s=5)
    assert refused["code"] == 404, refused  # 6002 is not in [clinic-transfers]
    assert not [e for e in other.drain(1.0) if e["event"] == "incoming"]
    caller.send("hangup")


def test_restart_keeps_registrations_and_calls_work(
    phone: PhoneFactory, asterisk: AsteriskRig
) -> None:
    a = phone("6001")
    b = phone("6002")
    asterisk.restart()
    # Contacts live in astdb, so registered phones stay reachable across a restart.
    a.send("call", uri=f"sip:6002@127.0.0.1:{asterisk.port}")
    b.expect("incoming", timeout_s=10)
    a.expect("call_state", where=state("CONFIRMED", 200), timeout_s=10)
    a.send("hangup")
    b.expect("call_state", where=state("DISCONNECTED"), timeout_s=10)


# Music on hold is louder than this over the hold (the opsound track it starts with measured
# -30 dBFS over its first 3 s), and no half second of it is silent; a pjsua softphone on a
# null sound device sends digital silence (-inf), which the caller hears before and after.
MUSIC_DBFS = -45.0
SILENCE_DBFS = -60.0
HOLD_FOR_S = 4.0


def _loudness(samples: array[int], rate_hz: int, start_s: float, end_s: float) -> float:
    """rms_dbfs of the recording between ``start_s`` and ``end_s`` (seconds into it)."""
    return rms_dbfs(samples[max(0, round(start_s * rate_hz)) : round(end_s * rate_hz)])


def _hold_and_listen(holder: Softphone, caller: Softphone, recording_from: Event) -> None:
    """``holder`` holds the call for HOLD_FOR_S, then takes it back; the caller hangs up. The
    caller's recording (begun at ``recording_from``) must carry music during the hold only."""
    # What the caller hears before the hold: the holder's silence.
    threading.Event().wait(1.5)
    asked = time.monotonic()
    holder.send("hold")
    held = holder.expect("media_held", where=lambda e: e["by"] == "local", timeout_s=5)
    threading.Event().wait(HOLD_FOR_S)
    unheld_at = time.monotonic()
    holder.send("unhold")
    back = holder.expect("media_active", where=lambda e: e["at"] > held["at"], timeout_s=5)
    threading.Event().wait(1.5)
    hung_up_at = time.monotonic()
    caller.send("hangup")
    caller.expect("call_state", where=state("DISCONNECTED"), timeout_s=10)
    recorded = caller.expect("recorded", timeout_s=10)
    assert recorded["complete"], f"the recording's WAV header was never completed: {recorded}"
    heard = read_wav(Path(recorded["path"]))
    t0 = recording_from["at"]
    # Margins: the re-INVITE's round trip, Asterisk starting or stopping the music, and the
    # recorder's start a moment after the media_active event.
    windows = {
        "before": (asked - 1.2 - t0, asked - 0.2 - t0),
        "on hold": (held["at"] + 0.5 - t0, unheld_at - 0.2 - t0),
        "after": (back["at"] + 0.5 - t0, hung_up_at - 0.2 - t0),
    }
    loud = {k: _loudness(heard.samples, heard.rate_hz, *w) for k, w in windows.items()}
    assert loud["on hold"] > MUSIC_DBFS, f"silence on hold (dBFS {loud}, {heard.duration_s} s)"
    start, end = windows["on hold"]
    halves = [
        _loudness(heard.samples, heard.rate_hz, at, at + 0.5)
        for at in (start + 0.5 * i for i in range(int((end - start) / 0.5)))
    ]
    assert min(halves) > SILENCE_DBFS, f"a gap in the music (dBFS per half second {halves})"
    assert loud["before"] < SILENCE_DBFS and loud["after"] < SILENCE_DBFS, (
        f"the music is not the hold's alone (dBFS {loud})"
    )


def test_a_caller_the_staff_desk_holds_hears_music(
    phone: PhoneFactory, asterisk: AsteriskRig, tmp_path: Path
) -> None:
    """6001 calls the staff desk (6200), which answers and puts the call on hold: the caller
    hears music on hold (musiconhold.conf, res_musiconhold in modules.conf), then silence
    again when the desk takes the call back. Before, the held caller heard silence."""
    staff = phone("6200")
    caller = phone("6001", record_dir=tmp_path / "calls")
    caller.send("call", uri=f"sip:6200@127.0.0.1:{asterisk.port}")
    caller.expect("call_state", where=state("CONFIRMED", 200), timeout_s=10)
    recording_from = caller.expect("media_active", timeout_s=5)
    staff.expect("media_active", timeout_s=5)
    asterisk.wait_for_bridge()
    _hold_and_listen(staff, caller, recording_from)


def test_a_caller_the_bot_put_through_to_the_nurse_hears_music_when_held(
    phone: PhoneFactory, asterisk: AsteriskRig, tmp_path: Path
) -> None:
    """The bot transfers 6001 to the nurse (a REFER, as for urgent triage); the nurse puts
    the caller on hold. Music for the caller, although the bot's own endpoint passes holds
    on (moh_passthrough=yes): that setting is the held leg's, and the caller's is a phone."""
    bot = phone("clinic")
    nurse = phone("6100", answer_delay_s=0.5)
    caller = phone("6001", record_dir=tmp_path / "calls")
    caller.send("call", uri=f"sip:700@127.0.0.1:{asterisk.port}")
    caller.expect("call_state", where=state("CONFIRMED", 200), timeout_s=10)
    recording_from = caller.expect("media_active", timeout_s=5)
    bot.expect("call_state", where=state("CONFIRMED"), timeout_s=10)
    asterisk.wait_for_bridge()
    bot.send("xfer", uri=f"sip:6100@127.0.0.1:{asterisk.port}")
    nurse.expect("call_state", where=state("CONFIRMED"), timeout_s=10)
    bot.expect("transfer_status", where=lambda e: e["final"] and e["code"] == 200)
    bot.expect("call_state", where=state("DISCONNECTED"), timeout_s=10)
    nurse.expect("media_active", timeout_s=5)
    asterisk.wait_for_bridge()
    _hold_and_listen(nurse, caller, recording_from)
