"""What a SIP worker answers to a request no pjsua module took (pure), and the text of pjsip
that the answer's method is read from."""

from __future__ import annotations

import logging

import pytest

from voice.sip import front, methods, pjsip_fallback
from voice.sip.outcome import SipStatus
from voice.sip.pjsip_fallback import method_of, verified
from voice.sip.pjsua import _extension_path


@pytest.mark.parametrize(
    ("method", "status"),
    [
        ("ACK", None),  # never answered (RFC 3261 17.2.3)
        ("FOO", SipStatus.NOT_IMPLEMENTED),  # not recognised: 501 (21.5.2)
        ("invite", SipStatus.NOT_IMPLEMENTED),  # methods are case-sensitive (7.1)
        ("REGISTER", SipStatus.METHOD_NOT_ALLOWED),  # recognised, not taken: 405 (8.2.1)
        ("PUBLISH", SipStatus.METHOD_NOT_ALLOWED),
        ("BYE", SipStatus.CALL_DOES_NOT_EXIST),  # no such call (15.1.2)
        ("CANCEL", SipStatus.CALL_DOES_NOT_EXIST),  # no such transaction (9.2)
        ("INFO", SipStatus.CALL_DOES_NOT_EXIST),
        ("UPDATE", SipStatus.CALL_DOES_NOT_EXIST),
        ("PRACK", SipStatus.CALL_DOES_NOT_EXIST),  # RFC 3262 section 3
        ("NOTIFY", SipStatus.CALL_DOES_NOT_EXIST),  # RFC 6665 section 4.1.3
        ("REFER", SipStatus.CALL_DOES_NOT_EXIST),  # a transfer of no call of ours
    ],
)
def test_a_workers_answer_to_a_request_nothing_took(method: str, status: SipStatus | None) -> None:
    assert methods.worker_unhandled_status(method) == status


def test_a_405_or_501_never_names_a_method_pjsua_offers() -> None:
    """A method pjsua lists in its Allow (its OPTIONS answer) gets 481 out of a call, never a
    405 that contradicts the Allow it carries."""
    pjsua_allow = {"PRACK", "INVITE", "ACK", "BYE", "CANCEL", "UPDATE", "INFO", "SUBSCRIBE"}
    pjsua_allow |= {"NOTIFY", "REFER", "MESSAGE", "OPTIONS"}
    in_calls = pjsua_allow - {"INVITE", "ACK", "SUBSCRIBE", "MESSAGE", "OPTIONS"}
    assert in_calls == methods.WORKER_IN_CALL_ONLY
    for method in methods.WORKER_IN_CALL_ONLY:
        assert methods.worker_unhandled_status(method) is SipStatus.CALL_DOES_NOT_EXIST


@pytest.mark.parametrize("method", sorted(methods.KNOWN | {"FOO", "", "message"}))
def test_only_message_is_refused_before_pjsuas_modules(method: str) -> None:
    """MESSAGE is refused 405 before pjsua (its IM module answered 200: "delivered", RFC 3428
    section 7), as the front refuses it; everything else is left to pjsua and the last module
    (an INVITE, a call's BYE or REFER must reach their dialogs)."""
    want = SipStatus.METHOD_NOT_ALLOWED if method == "MESSAGE" else None
    assert methods.worker_refused_status(method) == want
    if want is not None:
        assert front.status_for(method) == want


@pytest.mark.parametrize("method", sorted(methods.KNOWN | {"FOO", "X-CLINIC"}))
def test_the_worker_and_the_front_agree_on_what_is_a_method(method: str) -> None:
    """Both read KNOWN: a method one of them calls unknown (501) the other does too."""
    worker = methods.worker_unhandled_status(method)
    if method in ("ACK", "OPTIONS"):
        return  # never unknown; the front answers OPTIONS 200 and no ACK
    unknown_to_front = front.status_for(method) is SipStatus.NOT_IMPLEMENTED
    assert unknown_to_front == (worker is SipStatus.NOT_IMPLEMENTED), method


@pytest.mark.parametrize(
    ("info", "method"),
    [
        ("Request msg FOO/cseq=1 (rdata0x7f3a1c003e28)", "FOO"),
        ("Request msg BYE/cseq=4711 (rdata0x1)", "BYE"),
        ("Request msg X-A.B!~*'/cseq=2 (rdata0x1)", "X-A.B!~*'"),  # any token (RFC 3261 25.1)
        ("MSG TOO LONG", ""),  # pjsip 2.15's text past 127 characters (a method of 80 or more)
        ("rdata0x7f3a1c003e28", ""),  # an older pjsip's: the object's name
        ("Response msg 200/OPTIONS/cseq=1 (rdata0x1)", ""),
        ("Request msg FOO", ""),
        ("", ""),
    ],
)
def test_the_method_is_read_from_pjsips_text(info: str, method: str) -> None:
    assert method_of(info) == method


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("2.15.1", True),  # the wheel's, checked against 2.15's headers and texts
        ("2.15", True),
        ("2.15-dev", True),
        ("2.16.0", False),  # a struct or a text may have changed: not installed
        ("2.14.1", False),
        ("3.15.1", False),
        ("2.1", False),
        ("", False),
        ("garbage", False),
    ],
)
def test_only_a_verified_pjsip_release_gets_the_module(version: str, ok: bool) -> None:
    assert verified(version) is ok


def test_an_unverified_pjsip_gets_no_module_and_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The real extension's pjsip, taken as one not checked: install refuses before it
    touches pjsip's endpoint, and says which release it saw and which it knows."""
    monkeypatch.setattr(pjsip_fallback, "VERIFIED", frozenset({(9, 9)}), raising=False)
    with caplog.at_level(logging.WARNING, logger=pjsip_fallback.__name__):
        assert pjsip_fallback.install(_extension_path()) is False
    assert "pjsip 2.15" in caplog.text and "(9.9)" in caplog.text, caplog.text


def test_a_worker_answers_options_itself_and_accepts_no_body_it_refuses() -> None:
    """Only OPTIONS is answered by the worker's OPTIONS module; its ``Accept`` names no body
    of a method the worker refuses (MESSAGE's text/plain, is-composing) nor a presence or
    other event document (every SUBSCRIBE gets 489)."""
    assert methods.worker_options_status("OPTIONS") == SipStatus.OK
    for method in [*sorted(methods.KNOWN - {"OPTIONS"}), "FOO", ""]:
        assert methods.worker_options_status(method) is None, method
    refused = {
        "text/plain",
        "application/im-iscomposing+xml",
        "application/pidf+xml",
        "application/xpidf+xml",
        "application/dialog-info+xml",
        "application/simple-message-summary",
    }
    assert "application/sdp" in methods.WORKER_ACCEPT
    assert not refused & set(methods.WORKER_ACCEPT)
