"""Errors and log lines about SIP text the service could not read say what was wrong, never
the text: a target URI holds the number called, and a header off the network may hold a
number or a code (README: "What the logs and the disk hold")."""

from __future__ import annotations

import logging

import pytest

from voice.sip import flash_dialog, message, pjsua

NUMBER = "+447400583920"


def _no_number(text: str) -> None:
    assert "583920" not in text and "447400" not in text, text


def test_an_unreadable_flash_call_target_is_not_quoted() -> None:
    # flash_uac keeps this text as the send's failure ("no SIP capacity: ...") and logs it.
    with pytest.raises(ValueError) as err:
        flash_dialog.target_host_port(f"tel:{NUMBER}")
    _no_number(str(err.value))


@pytest.mark.parametrize("cseq", [f"{NUMBER} REFER", "", f"x{NUMBER}"])
def test_an_unreadable_cseq_of_a_transfer_is_not_quoted(cseq: str) -> None:
    # The worker logs it: "call ...: a REFER of the transfer not read: <error>".
    msg = message.SipMessage("", "", 202, "Accepted", (("CSeq", cseq),), b"")
    with pytest.raises(ValueError) as err:
        pjsua._cseq(msg)
    _no_number(str(err.value))


def test_a_readable_cseq_is_read() -> None:
    msg = message.SipMessage("", "", 202, "Accepted", (("CSeq", " 7  REFER"),), b"")
    assert pjsua._cseq(msg) == 7


def test_a_flash_call_response_with_an_unreadable_cseq_is_not_quoted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=flash_dialog.__name__)
    msg = message.SipMessage("", "", 180, "Ringing", (("CSeq", f"{NUMBER} INVITE"),), b"")
    assert flash_dialog.cseq_of(msg) == (-1, "")
    assert caplog.records, "nothing logged"
    for record in caplog.records:
        _no_number(record.getMessage())
