"""REFER subscriptions and digest challenges: a refresh challenged and sent again, one not
sent again, and a REFER challenged twice (pjsua skips the second challenge's callback)."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pjsua2 as pj
import pytest

from tests.unit.test_sip_refer import ACTIVE, DONE, _notify, _subs
from voice.sip.outcome import SipStatus
from voice.sip.pjsua import Engine, EngineConfig
from voice.sip.protocol import SendMessage, TransferStatus
from voice.sip.refer import ReferSubscriptions


def _subscribe(cseq: int, expires: int = 600) -> str:
    return (
        "SUBSCRIBE sip:caller@127.0.0.1:5070 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bK-s\r\n"
        f"CSeq: {cseq} SUBSCRIBE\r\nEvent: refer\r\nExpires: {expires}\r\n"
        "Content-Length: 0\r\n\r\n"
    )


def _response(cseq: int, status: int) -> str:
    return (
        f"SIP/2.0 {status} X\r\nVia: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bK-s\r\n"
        f"CSeq: {cseq} SUBSCRIBE\r\nContent-Length: 0\r\n\r\n"
    )


def _event(state: int, kind: int, cseq: int, status: int = 0, prev: int = 0) -> NS:
    tsx = NS(
        method="SUBSCRIBE",
        role=pj.PJSIP_ROLE_UAC,
        state=state,
        statusCode=status,
        lastTx=NS(wholeMsg=_subscribe(cseq)),
    )
    rdata = NS(wholeMsg=_response(cseq, status) if status else "")
    body = NS(tsxState=NS(tsx=tsx, type=kind, prevState=prev, src=NS(rdata=rdata)))
    return NS(type=pj.PJSIP_EVENT_TSX_STATE, body=body)


def test_a_challenged_refresh_sent_again_does_not_fail_the_transfer() -> None:
    # The newest transfer's subscription (202, NOTIFY 100 active) is refreshed; a proxy
    # challenges the SUBSCRIBE (407) and pjsip sends it again with credentials at once.
    # pjsua reports nothing (no state change): nothing ended, nothing may be reported.
    sent: list[object] = []
    engine = Engine(EngineConfig("127.0.0.1", 0), sent.append)
    call = NS(call_id="c1", refers=_subs(3), xfer_pending=True, ended=False, report_newest=None)
    e = _event(pj.PJSIP_TSX_STATE_CALLING, pj.PJSIP_EVENT_TX_MSG, 4)  # the refresh
    engine._on_subscribe_tsx(call, e.body.tsxState.tsx, e)  # type: ignore[arg-type]
    e = _event(
        pj.PJSIP_TSX_STATE_COMPLETED, pj.PJSIP_EVENT_RX_MSG, 4, 407, pj.PJSIP_TSX_STATE_CALLING
    )
    engine._on_subscribe_tsx(call, e.body.tsxState.tsx, e)  # type: ignore[arg-type]
    e = _event(pj.PJSIP_TSX_STATE_CALLING, pj.PJSIP_EVENT_TX_MSG, 5)  # sent again
    engine._on_subscribe_tsx(call, e.body.tsxState.tsx, e)  # type: ignore[arg-type]
    engine._report_unreported_ends()
    assert [ev for ev in sent if isinstance(ev, TransferStatus)] == []


def test_a_challenge_not_answered_does_not_bring_a_later_refresh_back_to_it() -> None:
    # The nurse's refresh is challenged and not sent again (no credentials for that realm):
    # pjsip ends that subscription. The staff desk's REFER is accepted; its own refresh must
    # not make the nurse's subscription live again, or staff's id-less NOTIFYs are "stale".
    subs = _subs(3)
    subs.subscribing(4, "refer", 600, now=590.0)
    subs.subscribe_answered(4, SipStatus.UNAUTHORIZED, now=590.1)  # not sent again
    subs.transfer()
    subs.sent(5)
    subs.answered(5, SipStatus.ACCEPTED)
    subs.subscribing(6, "refer", 600, now=1190.0)  # staff's refresh, much later
    subs.subscribe_answered(6, SipStatus.OK, now=1190.1)
    assert subs.notified(_notify(DONE, b"SIP/2.0 486 Busy Here"), now=1200.0).newest


def test_a_refer_challenged_twice_does_not_stay_live() -> None:
    # REFER 3 -> 407, REFER 4 (credentials) -> 407 again: pjsip gives up (pjsua reports 407,
    # final). pjsua_call_on_tsx_state_changed skips the second 407 (last_tx->auth_retry),
    # so the adapter never calls answered(4, 407): the model keeps the nurse's REFER live.
    subs = ReferSubscriptions()
    subs.transfer()
    subs.sent(3)
    subs.answered(3, SipStatus.PROXY_AUTHENTICATION_REQUIRED)
    subs.sent(4)
    # No callback for the second 407; pjsua's report of it, final, is counted: the adapter
    # then ends the newest subscription (onCallTransferStatus).
    subs.end_newest()
    subs.transfer()
    subs.sent(5)
    subs.answered(5, SipStatus.ACCEPTED)
    assert subs.notified(_notify(ACTIVE, b"SIP/2.0 180 Ringing"), now=1.0).newest


def _refer_event(state: int, kind: int, cseq: int, status: int = 0) -> NS:
    refer = (
        "REFER sip:caller@127.0.0.1:5070 SIP/2.0\r\n"
        f"CSeq: {cseq} REFER\r\nRefer-To: <sip:6200@pbx>\r\nContent-Length: 0\r\n\r\n"
    )
    answer = f"SIP/2.0 {status} X\r\nCSeq: {cseq} REFER\r\nContent-Length: 0\r\n\r\n"
    tsx = NS(
        method="REFER",
        role=pj.PJSIP_ROLE_UAC,
        state=state,
        statusCode=status,
        lastTx=NS(wholeMsg=refer),
    )
    rdata = NS(wholeMsg=answer if status else "")
    body = NS(tsxState=NS(tsx=tsx, type=kind, prevState=0, src=NS(rdata=rdata)))
    return NS(type=pj.PJSIP_EVENT_TSX_STATE, body=body)


def test_a_refused_refer_beside_an_earlier_live_subscription_is_reported() -> None:
    # The nurse's subscription is still live ("486, active", not ended by the phone); the
    # staff desk's REFER is refused (403). pjsip hands that REFER's transaction to the
    # nurse's subscription, whose reports were stopped: pjsua says nothing of the 403, and
    # the worker must report the failure itself rather than leave the caller ringing.
    sent: list[object] = []
    engine = Engine(EngineConfig("127.0.0.1", 0), sent.append)
    subs = _subs(3)
    subs.transfer()
    call = NS(call_id="c1", refers=subs, xfer_pending=True, ended=False, report_newest=None)
    e = _refer_event(pj.PJSIP_TSX_STATE_CALLING, pj.PJSIP_EVENT_TX_MSG, 5)
    engine._on_refer_tsx(call, e.body.tsxState.tsx, e)  # type: ignore[arg-type]
    e = _refer_event(pj.PJSIP_TSX_STATE_COMPLETED, pj.PJSIP_EVENT_RX_MSG, 5, 403)
    engine._on_refer_tsx(call, e.body.tsxState.tsx, e)  # type: ignore[arg-type]
    engine._report_unreported_ends()
    statuses = [ev for ev in sent if isinstance(ev, TransferStatus)]
    assert [(ev.sip_status, ev.final) for ev in statuses] == [
        (SipStatus.SERVER_INTERNAL_ERROR, True)
    ]


def test_a_refused_refer_pjsua_reports_is_reported_once() -> None:
    # With no earlier subscription live, pjsua reports the 403 in the same pass: the
    # transfer is no longer pending, and the worker adds nothing.
    sent: list[object] = []
    engine = Engine(EngineConfig("127.0.0.1", 0), sent.append)
    subs = ReferSubscriptions()
    subs.transfer()
    call = NS(call_id="c1", refers=subs, xfer_pending=True, ended=False, report_newest=None)
    e = _refer_event(pj.PJSIP_TSX_STATE_CALLING, pj.PJSIP_EVENT_TX_MSG, 3)
    engine._on_refer_tsx(call, e.body.tsxState.tsx, e)  # type: ignore[arg-type]
    e = _refer_event(pj.PJSIP_TSX_STATE_COMPLETED, pj.PJSIP_EVENT_RX_MSG, 3, 403)
    engine._on_refer_tsx(call, e.body.tsxState.tsx, e)  # type: ignore[arg-type]
    engine._on_transfer_status(call, 403, True)  # type: ignore[arg-type]  # pjsua's report
    engine._report_unreported_ends()
    statuses = [ev for ev in sent if isinstance(ev, TransferStatus)]
    assert [(ev.sip_status, ev.final) for ev in statuses] == [(403, True)]


@pytest.mark.parametrize(
    ("realm", "challenged", "refused"),
    [
        ("clinic", "elsewhere", True),
        ("clinic", "clinic", False),  # pjsip answered it: a 401 again is a wrong password
        ("clinic", "CLINIC", False),  # pjsip matches the realm ignoring case: answered too
        ("", "elsewhere", False),  # CLINIC_SIP_REALM unset: "*", every realm answered
    ],
)
def test_a_refer_challenged_for_another_realm_is_logged_with_that_realm(
    caplog: pytest.LogCaptureFixture, realm: str, challenged: str, refused: bool
) -> None:
    # pjsua answers a REFER's challenge itself, with CLINIC_SIP_REALM's credentials only:
    # one of another realm fails the REFER (as without credentials), said in one line.
    sent: list[object] = []
    engine = Engine(
        EngineConfig("127.0.0.1", 0, password="pw-never-logged", realm=realm), sent.append
    )
    call = NS(call_id="c1", refers=_subs(3), xfer_pending=True, ended=False, report_newest=None)
    e = _refer_event(pj.PJSIP_TSX_STATE_CALLING, pj.PJSIP_EVENT_TX_MSG, 5)
    engine._on_refer_tsx(call, e.body.tsxState.tsx, e)  # type: ignore[arg-type]
    e = _refer_event(pj.PJSIP_TSX_STATE_COMPLETED, pj.PJSIP_EVENT_RX_MSG, 5, 401)
    e.body.tsxState.src.rdata.wholeMsg = e.body.tsxState.src.rdata.wholeMsg.replace(
        "Content-Length",
        f'WWW-Authenticate: Digest realm="{challenged}", nonce="n0nce"\r\nContent-Length',
    )
    with caplog.at_level("WARNING", logger="voice.sip.pjsua"):
        engine._on_refer_tsx(call, e.body.tsxState.tsx, e)  # type: ignore[arg-type]
    lines = [r.getMessage() for r in caplog.records if "challenge" in r.getMessage()]
    if not refused:
        assert lines == []
        return
    assert lines == [
        "call c1: REFER: cannot answer the 401 challenge: realm 'elsewhere' is not the "
        "configured realm (CLINIC_SIP_REALM)"
    ]


def _ignore(_: object) -> None:
    pass


def _two_challenges(first: str, second: str) -> NS:
    e = _refer_event(pj.PJSIP_TSX_STATE_COMPLETED, pj.PJSIP_EVENT_RX_MSG, 5, 401)
    e.body.tsxState.src.rdata.wholeMsg = e.body.tsxState.src.rdata.wholeMsg.replace(
        "Content-Length",
        f'WWW-Authenticate: Digest realm="{first}", nonce="n1"\r\n'
        f'WWW-Authenticate: Digest realm="{second}", nonce="n2"\r\nContent-Length',
    )
    return e


@pytest.mark.parametrize(
    ("first", "second", "refused"),
    [
        ("elsewhere", "clinic", False),  # pjsip answered the second: a wrong password
        ("clinic", "elsewhere", False),
        ("elsewhere", "other", True),
    ],
)
def test_a_challenge_of_the_realm_among_several_is_not_called_refused(
    caplog: pytest.LogCaptureFixture, first: str, second: str, refused: bool
) -> None:
    # pjsip tries every challenge of a 401 (sip_auth_client.c): a final 401 whose second
    # challenge is of CLINIC_SIP_REALM was answered, and the first's realm is not why.
    engine = Engine(EngineConfig("127.0.0.1", 0, password="pw", realm="clinic"), _ignore)
    call = NS(call_id="c1", refers=_subs(3), xfer_pending=True, ended=False, report_newest=None)
    e = _refer_event(pj.PJSIP_TSX_STATE_CALLING, pj.PJSIP_EVENT_TX_MSG, 5)
    engine._on_refer_tsx(call, e.body.tsxState.tsx, e)  # type: ignore[arg-type]
    e = _two_challenges(first, second)
    with caplog.at_level("WARNING", logger="voice.sip.pjsua"):
        engine._on_refer_tsx(call, e.body.tsxState.tsx, e)  # type: ignore[arg-type]
    lines = [r.getMessage() for r in caplog.records if "challenge" in r.getMessage()]
    assert bool(lines) is refused, lines


def test_a_message_answers_the_challenge_of_its_realm_among_several() -> None:
    # The MESSAGE path answers a 401 itself (Engine._answer_challenge): the first challenge
    # of another realm refused the realm's own, and the SMS was undeliverable.
    engine = Engine(
        EngineConfig("127.0.0.1", 0, user="clinic", password="pw", realm="clinic"), _ignore
    )
    e = _two_challenges("elsewhere", "clinic")
    cmd = SendMessage("r1", "sip:+447700900123@pbx", "+441000", "123456")
    answer = engine._answer_challenge(NS(e=e), cmd, 401)
    assert answer is not None, "the challenge of CLINIC_SIP_REALM was there"
    header, value = answer
    assert header == "Authorization"
    assert 'realm="clinic"' in value and 'nonce="n2"' in value, value
