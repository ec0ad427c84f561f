"""What a SIP worker's own port answers to each request out of any call, over UDP and TCP.

A worker's port is reachable (direct mode redirects callers there; behind a PBX it is the
trunk), and pjsip drops a request no module takes without a word: ``FOO``, REGISTER, or a
BYE for no call got nothing, and the sender retransmitted it for 32 s. The worker's last
module (:mod:`voice.sip.pjsip_fallback`) answers those (RFC 3261 8.2.1); what pjsua answers
itself (SUBSCRIBE) is recorded beside them, but for a presence SUBSCRIBE, which pjsua's
presence server took (200, then NOTIFYs) and the worker refuses (489 Bad Event, RFC 6665).
OPTIONS gets a 200 of the worker's own that offers only what it serves (pjsua's offered
presence and MESSAGE bodies). MESSAGE: ``test_sip_inbound_message.py``. The README's table
of these answers is held to :func:`voice.sip.methods.worker_unhandled_status` by
``tests/unit/test_readme_sip.py``; this holds the workers to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sip_config.clock import SystemClock
from sip_config.settings import HostPort
from tests.conftest import sip_settings
from tests.integration.test_sip_inbound import sipp_uac
from tests.integration.test_sip_inbound_message import final_answer
from voice.sip import front, message, methods
from voice.sip.pool import CallHandle, OutboundCall, SipPool
from voice.sip.protocol import Digit

pytestmark = pytest.mark.integration

# Out of any call: the method, a header it carries, the status the worker answers, whether
# that answer carries pjsua's Allow, and who answers.
ANSWERS = [
    ("FOO", "", 501, True),  # ours: unknown (pjsip's endpoint dropped it)
    ("REGISTER", "", 405, True),  # ours: no registrar here
    ("PUBLISH", "", 405, True),  # ours
    ("BYE", "", 481, False),  # ours: no such call
    ("CANCEL", "", 481, False),  # ours: no such INVITE transaction
    ("INFO", "", 481, False),  # ours
    ("UPDATE", "", 481, False),  # ours
    ("PRACK", "", 481, False),  # ours
    ("NOTIFY", "Event: refer", 481, False),  # ours: no subscription
    ("NOTIFY", "Event: message-summary", 481, False),  # ours (pjsua's unsolicited MWI: 200)
    ("REFER", "Refer-To: <sip:1@127.0.0.1>", 481, False),  # ours
    ("OPTIONS", "", 200, True),  # ours, before pjsua's OPTIONS module
    ("MESSAGE", "", 405, True),  # ours, before pjsua's IM module (which answered 200)
    ("SUBSCRIBE", "Event: presence", 489, False),  # ours: no presence (pjsua took it: 200)
    ("SUBSCRIBE", "Event: dialog", 489, False),  # pjsua: Bad Event
    ("SUBSCRIBE", "", 400, False),  # pjsua: no Event header
]


@pytest.fixture
async def worker() -> AsyncIterator[tuple[SipPool, HostPort]]:
    pool = SipPool(sip_settings(1), clock=SystemClock())
    await pool.start()
    try:
        yield pool, pool.worker_addresses()[0]
    finally:
        await pool.stop()


def _request(method: str, header: str, transport: str, here: int, addr: HostPort) -> bytes:
    # A branch, tag and Call-ID of its own each: pjsip takes a request with a branch it saw as
    # that transaction's retransmission, and one with the From tag, Call-ID and CSeq of
    # another but a new branch as a merged request (482, RFC 3261 8.2.2.2).
    token = secrets.token_hex(6)
    lines = [
        f"{method} sip:6000@{addr} SIP/2.0",
        f"Via: SIP/2.0/{transport} 127.0.0.1:{here};branch=z9hG4bK-{token}",
        f"From: <sip:probe@127.0.0.1>;tag={token}",
        f"To: <sip:6000@{addr}>",
        f"Call-ID: {token}@probe",
        f"CSeq: 1 {method}",
        f"Contact: <sip:probe@127.0.0.1:{here}>",
        "Max-Forwards: 70",
        *([header] if header else []),
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def ask(addr: HostPort, method: str, header: str, tcp: bool, wait_s: float = 3.0) -> bytes:
    """Send one request from a socket of its own; the first final answer's bytes, or b""
    when none came within ``wait_s``."""
    kind = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(wait_s)
        here = s.getsockname()[1]
        req = _request(method, header, "TCP" if tcp else "UDP", here, addr)
        try:
            if tcp:
                s.connect((addr.host, addr.port))
                s.sendall(req)
            else:
                s.sendto(req, (addr.host, addr.port))
            data = b""
            while True:
                data += s.recv(65536)
                # A final answer (not 1xx), whole: its headers end, and it has no body.
                for block in data.split(b"\r\n\r\n")[:-1]:
                    if block.startswith(b"SIP/2.0 ") and not block.startswith(b"SIP/2.0 1"):
                        return block + b"\r\n\r\n"
        except TimeoutError:
            return b""


def allowed(answer: message.SipMessage) -> set[str]:
    return {m.strip() for m in (answer.get("Allow") or "").split(",") if m.strip()}


def assert_offers_only_what_is_served(options: message.SipMessage) -> None:
    """An answer to OPTIONS offers nothing the worker refuses: no event package (every
    SUBSCRIBE gets 489, and RFC 6665 4.4.4 makes ``Allow-Events`` the packages a UA takes
    SUBSCRIBEs for), no MESSAGE (405) nor its bodies, no presence documents. pjsua's answer
    had ``Allow-Events: presence, dialog, message-summary, refer`` and an ``Accept`` with
    ``text/plain``, ``application/pidf+xml`` and five more."""
    assert options.status == 200, options
    assert options.get("Allow-Events") is None, options
    assert "MESSAGE" not in allowed(options), options
    accept = {t.strip() for t in (options.get("Accept") or "").split(",") if t.strip()}
    assert accept == set(methods.WORKER_ACCEPT), options
    assert options.get("User-Agent") == "clinic-voice", options
    # Every INVITE with Replaces gets 403 (RFC 3891) and ICE is off: neither is offered.
    supported = {t.strip() for t in (options.get("Supported") or "").split(",") if t.strip()}
    assert not {"replaces", "trickle-ice"} & supported, options


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
async def test_a_worker_answers_every_request_out_of_a_call(
    worker: tuple[SipPool, HostPort], tcp: bool
) -> None:
    pool, addr = worker
    loop = asyncio.get_running_loop()
    options = message.parse(await loop.run_in_executor(None, ask, addr, "OPTIONS", "", tcp))
    pjsua_allow = allowed(options)
    assert {"INVITE", "BYE", "OPTIONS"} <= pjsua_allow, options
    assert_offers_only_what_is_served(options)
    got = {}
    for method, header, _, with_allow in ANSWERS:
        raw = await loop.run_in_executor(None, ask, addr, method, header, tcp)
        assert raw, f"no answer to {method} ({header or 'no header'})"
        answer = message.parse(raw)
        got[(method, header)] = answer.status
        assert (answer.get("Call-ID") or "").endswith("@probe"), answer
        if with_allow:  # RFC 3261 8.2.1: a 405 MUST carry Allow; pjsua's, as OPTIONS says
            assert allowed(answer) == pjsua_allow, answer
        if answer.status in (405, 501):
            assert method not in pjsua_allow, f"a {answer.status} to a method Allow offers"
    assert got == {(m, h): s for m, h, s, _ in ANSWERS}, got
    # The ours are the pure rule's, and the front agrees where it answers the same method.
    for method, _, status, _ in ANSWERS:
        if method not in ("OPTIONS", "SUBSCRIBE"):
            assert methods.worker_unhandled_status(method) == status, method
    assert front.status_for("FOO") == got[("FOO", "")] == 501  # as the front answers it
    # A method too long for pjsip's info text ("MSG TOO LONG" in 2.15): unknown, so 501.
    long = message.parse(await loop.run_in_executor(None, ask, addr, "X" * 300, "", tcp))
    assert long.status == 501 and allowed(long) == pjsua_allow, long
    # An ACK gets nothing (RFC 3261 17.2.3), and the worker lives on: no restart, still up.
    assert await loop.run_in_executor(None, ask, addr, "ACK", "", tcp, 1.0) == b""
    assert pool.stats()["restarts"] == 0 and pool.stats()["workers_up"] == 1


async def test_a_flood_of_unknown_requests_is_answered_and_a_call_still_goes_through(
    worker: tuple[SipPool, HostPort], tmp_path: Path
) -> None:
    """200 unknown requests over UDP in quick bursts, each answered 501; then a call to the worker
    goes as before, a MESSAGE inside it gets 405 (the early module's: before the call's
    dialog) and a digit after it arrives. A ctypes slip in
    every packet's path would abort the worker, and the pool would count a restart."""
    pool, addr = worker
    loop = asyncio.get_running_loop()
    # In bursts of 20, each answered before the next: 200 at once lost datagrams to a full
    # socket receive buffer on a loaded machine (each takes 1 KiB or more of it, whatever
    # its size), which UDP may do and is not what this tests.
    answers: list[int] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.setblocking(False)
        here = s.getsockname()[1]
        for _ in range(10):
            for _ in range(20):
                s.sendto(_request("FOO", "", "UDP", here, addr), (addr.host, addr.port))
            async with asyncio.timeout(10):
                for _ in range(20):
                    data = await loop.sock_recv(s, 65536)
                    answers.append(message.parse(data).status)
    assert answers == [501] * 200
    digits: list[str] = []

    async def handler(call: CallHandle) -> None:
        await call.answer()
        async for ev in call.events:
            if isinstance(ev, Digit):
                digits.append(ev.key)
                await call.hangup()

    pool.on_incoming(handler)
    code, text = await sipp_uac(addr, "sipp_uac_message_in_call.xml", "6000", tmp_path, 20)
    assert code == 0, f"the call did not go as before: {text[-3000:]}"
    assert final_answer("MESSAGE", text).status == 405
    assert digits == ["1"]
    assert pool.stats()["restarts"] == 0 and pool.stats()["workers_up"] == 1


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
async def test_a_presence_subscribe_gets_489_and_no_notify(
    worker: tuple[SipPool, HostPort], tcp: bool
) -> None:
    """The service offers no presence: a SUBSCRIBE with Event: presence gets 489 Bad Event
    (RFC 6665 4.2.1.1), and no NOTIFY follows (pjsua's presence server answered 200 and sent
    its first NOTIFY at once, then one at each refresh: a subscription kept for nothing)."""
    _, addr = worker
    loop = asyncio.get_running_loop()
    received = await loop.run_in_executor(None, _subscribe_and_listen, addr, tcp, 3.0)
    finals = [m for m in received if not m.is_request and m.status >= 200]
    notifies = [m for m in received if m.is_request and m.method == "NOTIFY"]
    got = ([m.status for m in finals], len(notifies))
    assert got == ([489], 0), f"answers and NOTIFYs: {got}"
    assert finals[0].reason == "Bad Event", finals[0]
    assert finals[0].get("Allow-Events") is None, finals[0]  # none taken by SUBSCRIBE


def _subscribe_and_listen(addr: HostPort, tcp: bool, listen_s: float) -> list[message.SipMessage]:
    """Send one SUBSCRIBE (Event: presence), then read whatever comes for ``listen_s``."""
    kind = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
    received: list[message.SipMessage] = []
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        here = s.getsockname()[1]
        req = _request("SUBSCRIBE", "Event: presence", "TCP" if tcp else "UDP", here, addr)
        if tcp:
            s.connect((addr.host, addr.port))
            s.sendall(req)
        else:
            s.sendto(req, (addr.host, addr.port))
        deadline = time.monotonic() + listen_s
        data = b""
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                data += s.recv(65536)
            except TimeoutError:
                break
        for block in data.split(b"\r\n\r\n"):  # a NOTIFY's body is a block of its own
            with contextlib.suppress(message.SipParseError):
                received.append(message.parse(block + b"\r\n\r\n"))
    return received


async def test_a_workers_invite_offers_neither_replaces_nor_trickle_ice(
    worker: tuple[SipPool, HostPort],
) -> None:
    """A call the worker places says, in its INVITE's ``Supported``, only what it serves: no
    ``replaces`` (an INVITE with Replaces gets 403, ``test_sip_toll_fraud.py``) and no
    ``trickle-ice`` (ICE is off). The far end is a bare UDP socket that never answers."""
    pool, _ = worker
    loop = asyncio.get_running_loop()
    got: asyncio.Queue[bytes] = asyncio.Queue()

    class Far(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str | int, int]) -> None:
            got.put_nowait(data)

    far, _ = await loop.create_datagram_endpoint(Far, local_addr=("127.0.0.1", 0))
    try:
        port = far.get_extra_info("sockname")[1]
        handle = await pool.place_call(
            OutboundCall(
                target_uri=f"sip:+14155556001@127.0.0.1:{port}",
                caller_id="+447400123456",
                flash=False,
                ring_s=1.0,
                answer_timeout_s=1.0,
            )
        )
        async with asyncio.timeout(5):
            invite = message.parse(await got.get())
        assert invite.method == "INVITE", invite
        supported = {t.strip() for t in (invite.get("Supported") or "").split(",")}
        assert "timer" in supported, invite  # the header is there, with what is served
        assert not {"replaces", "trickle-ice"} & supported, invite
        await handle.wait_ended(10)
    finally:
        far.close()
