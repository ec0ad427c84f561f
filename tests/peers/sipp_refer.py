"""sipp scenarios for a caller whose side takes the clinic line's blind transfer (REFER).

The clinic line sends its REFER to the caller's side of the call (the caller's phone, or the
PBX in front of it: README "transfer"). :func:`scenario` writes a sipp UAC scenario for one
way of answering it (:class:`ReferAnswer`): the call is placed straight to a SIP worker,
answered, keys (``0`` unless told) are pressed as in-dialog INFOs (``application/dtmf-relay``,
which the worker takes as RFC 4733 keys), and the REFER that follows is answered as the plan
says: a digest challenge first (or none), a status (or none), NOTIFYs with the sipfrags and
subscription states given, in the CSeq order given, a second REFER's if planned, then either
the service's BYE is awaited or the caller hangs up. :func:`play` runs it once with sipp.

The call's audio is not sipp's: the SDP names ``[rtp_port]`` (sipp's ``-key rtp_port``), a
socket of the test that answers the service's RTP (see :mod:`tests.peers.rtp_peer`).
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import SIPP_OTHER_SOCKETS, free_port

CALLER_NUMBER = "+447700900123"


class Ending(enum.StrEnum):
    """How the scenario ends once the REFER has been answered."""

    SERVICE_BYE = "service_bye"  # the service hangs up (a transfer done): its BYE, answered
    CALLER_BYE = "caller_bye"  # the caller hangs up ``hangup_ms`` after the last step
    CALLER_BYE_NOW = "caller_bye_now"  # the caller hangs up right after the 202 (a PBX)


@dataclass(frozen=True, slots=True)
class Notify:
    """One NOTIFY of the REFER's subscription (RFC 3515 section 2.4.4).

    ``sipfrag``: the body (a status line, ``SIP/2.0 180 Ringing``, or anything for a broken
    one); ``state``: the Subscription-State; ``cseq``: its place in the dialog's CSeq order
    (NOTIFYs are sent in list order, so a smaller cseq after a larger one is out of order).
    """

    sipfrag: str
    state: str
    cseq: int
    pause_ms: int = 200  # before it is sent
    named: bool = False  # Event: refer;id=<the CSeq of the REFER it answers>, else no id


@dataclass(frozen=True, slots=True)
class ReferAnswer:
    """One way of answering the REFER.

    ``status``: the REFER's final response, or None for none at all (its retransmissions
    are then unexpected messages: run sipp without ``abortunexp``, see :func:`sipp_options`);
    ``headers``: extra header lines of that response. A NOTIFY sent after one with a higher
    CSeq gets the dialog's ``500 Invalid CSeq``, which sipp takes for an unexpected message
    too (its CSeq is below the call's): it is not waited for.

    ``digits``: the keys pressed (one INFO each, ``digit_gap_ms`` apart, CSeq 2, 3, ...:
    NOTIFYs need higher ones); ``challenge``: 401 or 407 to the first REFER (a digest
    challenge), whose retry (a new CSeq) then gets ``status``; ``second``: the NOTIFYs of a
    second REFER in the call (answered 202), sent after the first one's; ``refresh``: the
    status the first REFER's refresh is answered with, after its NOTIFYs (pjsip refreshes a
    subscription with a SUBSCRIBE 5 s before its Expires runs out: give the 202 a short one
    in ``headers``, and NOTIFYs with no ``expires``).

    ``trying_ms``: the first REFER is answered ``100 Trying`` at once and ``status`` this
    long after (pjsip's retransmissions of it meanwhile get the 100 again, from sipp);
    ``late``: NOTIFYs of the first REFER's subscription sent once the second REFER is
    answered, before the second's own NOTIFYs (an earlier transfer's late report).
    """

    name: str
    status: int | None
    notifies: tuple[Notify, ...] = ()
    headers: tuple[str, ...] = ()
    ending: Ending = Ending.CALLER_BYE
    hangup_ms: int = 6000
    digits: str = "0"
    digit_gap_ms: int = 1500
    challenge: int | None = None
    second: tuple[Notify, ...] | None = None
    refresh: int | None = None
    trying_ms: int | None = None
    late: tuple[Notify, ...] = ()


_REASONS = {
    100: "Trying",
    202: "Accepted",
    401: "Unauthorized",
    403: "Forbidden",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    489: "Bad Event",
    501: "Not Implemented",
    503: "Service Unavailable",
}
_CHALLENGE_HEADER = {401: "WWW-Authenticate", 407: "Proxy-Authenticate"}

_INVITE = """
  <send retrans="500">
    <![CDATA[
      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:{caller}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: sip:sipp@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=user1 53655765 2353687637 IN IP4 127.0.0.1
      s=-
      c=IN IP4 127.0.0.1
      t=0 0
      m=audio [rtp_port] RTP/AVP 0 101
      a=rtpmap:0 PCMU/8000
      a=rtpmap:101 telephone-event/8000
      a=fmtp:101 0-15
      a=sendrecv
    ]]>
  </send>
  <recv response="100" optional="true" />
  <recv response="180" optional="true" />
  <recv response="183" optional="true" />
  <recv response="200" rrs="true">
    <action>
      <ereg regexp=";tag=([^;&gt; \\r\\n]+)" search_in="hdr" header="To:" assign_to="svc_to,svc" />
    </action>
  </recv>
  <Reference variables="svc_to" />
  <send>
    <![CDATA[
      ACK [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
{dialog}
      CSeq: 1 ACK
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
"""

_INFO = """
  <pause milliseconds="{pause}" />
  <send retrans="500">
    <![CDATA[
      INFO [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
{dialog}
      CSeq: {cseq} INFO
      Max-Forwards: 70
      Content-Type: application/dtmf-relay
      Content-Length: [len]

      Signal={key}
      Duration=160
    ]]>
  </send>
  <recv response="200" />
"""

# The REFER's CSeq, for a NOTIFY that names it (Event: refer;id=...).
_RECV_REFER = """
  <recv request="REFER">
    <action>
      <ereg regexp="([0-9]+)" search_in="hdr" header="CSeq:" assign_to="refer_cseq,rc" />
    </action>
  </recv>
  <Reference variables="refer_cseq,rc" />
"""

_CHALLENGE = """
  <send>
    <![CDATA[
      SIP/2.0 {status} {reason}
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      {header}: Digest realm="clinic", nonce="[pid]refer[call_number]", algorithm=MD5
      Content-Length: 0
    ]]>
  </send>
"""

_DIALOG = """\
      From: sipp <sip:{caller}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>;tag=[$svc]
      Call-ID: [call_id]
      Contact: sip:sipp@[local_ip]:[local_port]"""

_RESPONSE = """
  <send>
    <![CDATA[
      SIP/2.0 {status} {reason}
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: sip:sipp@[local_ip]:[local_port]
{headers}      Content-Length: 0
    ]]>
  </send>
"""

_NOTIFY = """
  <pause milliseconds="{pause}" />
  <send{retrans}>
    <![CDATA[
      NOTIFY [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
{dialog}
      CSeq: {cseq} NOTIFY
      Max-Forwards: 70
      Event: {event}
      Subscription-State: {state}
      Content-Type: message/sipfrag;version=2.0
      Content-Length: [len]

      {sipfrag}
    ]]>
  </send>
  <recv response="200" />
"""

_CALLER_BYE = """
  <pause milliseconds="{pause}" />
  <send retrans="500">
    <![CDATA[
      BYE [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
{dialog}
      CSeq: 20 BYE
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
  <recv response="200" />
"""

_UNSUBSCRIBE = """
  <recv request="SUBSCRIBE" />
  <send>
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: sip:sipp@[local_ip]:[local_port]
      Expires: 0
      Content-Length: 0
    ]]>
  </send>
"""

_SERVICE_BYE = """
  <recv request="BYE" timeout="{timeout}" />
  <send>
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0
    ]]>
  </send>
"""


def sipp_options(answer: ReferAnswer) -> tuple[str, ...]:
    """sipp options the scenario needs: without ``abortunexp`` where an unexpected message
    is part of the plan (sipp would abort the call and send a BYE of its own)."""
    stale = any(
        n.cseq < max(m.cseq for m in answer.notifies[:i])
        for i, n in enumerate(answer.notifies)
        if i
    )
    lenient = answer.status is None or stale
    return ("-default_behaviors", "pingreply") if lenient else ()


def scenario(answer: ReferAnswer, *, bye_timeout_ms: int = 45000) -> str:
    """The sipp scenario XML for ``answer``."""
    dialog = _DIALOG.format(caller=CALLER_NUMBER)
    parts = [
        '<?xml version="1.0" encoding="ISO-8859-1" ?>',
        f'<scenario name="caller answers the REFER: {answer.name}">',
        _INVITE.format(caller=CALLER_NUMBER, dialog=dialog),
    ]
    for i, key in enumerate(answer.digits):
        pause = 800 if i == 0 else answer.digit_gap_ms
        parts.append(_INFO.format(pause=pause, dialog=dialog, cseq=2 + i, key=key))
    parts.append(_RECV_REFER)
    if answer.challenge is not None:
        parts.append(
            _CHALLENGE.format(
                status=answer.challenge,
                reason=_REASONS[answer.challenge],
                header=_CHALLENGE_HEADER[answer.challenge],
            )
        )
        parts.append(_RECV_REFER)  # sent again, with credentials and the next CSeq
    if answer.trying_ms is not None:
        parts.append(_RESPONSE.format(status=100, reason=_REASONS[100], headers=""))
        parts.append(f'  <pause milliseconds="{answer.trying_ms}" />')
    if answer.status is not None:
        headers = "".join(f"      {h}\n" for h in answer.headers)
        parts.append(
            _RESPONSE.format(status=answer.status, reason=_REASONS[answer.status], headers=headers)
        )
    parts.extend(_notifies(answer.notifies, dialog))
    if answer.refresh is not None:
        parts.append('  <recv request="SUBSCRIBE" />')
        parts.append(
            _RESPONSE.format(status=answer.refresh, reason=_REASONS[answer.refresh], headers="")
        )
    if answer.second is not None:
        parts.append(_RECV_REFER)
        parts.append(_RESPONSE.format(status=202, reason=_REASONS[202], headers=""))
        parts.extend(_notifies(answer.late, dialog))
        parts.extend(_notifies(answer.second, dialog))
    notifies = (*answer.notifies, *answer.late, *(answer.second or ()))
    if any(n.sipfrag.startswith("SIP/2.0 2") and n.state.startswith("active") for n in notifies):
        # A 2xx that keeps the subscription active: pjsua ends it (SUBSCRIBE, Expires: 0).
        parts.append(_UNSUBSCRIBE)
    if answer.ending is Ending.SERVICE_BYE:
        parts.append(_SERVICE_BYE.format(timeout=bye_timeout_ms))
    else:
        pause = 0 if answer.ending is Ending.CALLER_BYE_NOW else answer.hangup_ms
        parts.append(_CALLER_BYE.format(pause=pause, dialog=dialog))
    parts.append("</scenario>\n")
    return "\n".join(parts)


def _notifies(notifies: tuple[Notify, ...], dialog: str) -> list[str]:
    """One REFER's NOTIFYs, in list order (see :class:`Notify`)."""
    parts = []
    highest = 0
    for n in notifies:
        stale = n.cseq < highest
        highest = max(highest, n.cseq)
        notify = _NOTIFY.format(
            pause=n.pause_ms,
            dialog=dialog,
            cseq=n.cseq,
            event="refer;id=[$rc]" if n.named else "refer",
            state=n.state,
            sipfrag=n.sipfrag,
            retrans="" if stale else ' retrans="500"',
        )
        parts.append(notify.replace('  <recv response="200" />\n', "") if stale else notify)
    return parts


async def play(
    answer: ReferAnswer,
    address: str,
    tmp: Path,
    rtp_port: int,
    *,
    timeout_s: int,
    bye_timeout_ms: int = 45000,
    options: tuple[str, ...] | None = None,
) -> tuple[int, str]:
    """Play ``answer``'s scenario once from sipp, calling the main menu (6000) at ``address``
    (a SIP worker's) with its audio at the test's socket ``rtp_port``; sipp's exit code and
    the messages it traced (``-trace_msg``). The scenario and the trace are written in
    ``tmp``, named after the answer. ``options``: sipp's own (:func:`sipp_options` unless
    given); ``timeout_s``: the whole scenario's bound (sipp's ``-timeout``; it is killed 5 s
    after)."""
    path = tmp / f"{answer.name}.xml"
    # latin-1, as its XML declaration says
    path.write_text(scenario(answer, bye_timeout_ms=bye_timeout_ms), encoding="latin-1")
    trace = tmp / f"{answer.name}.log"
    proc = await asyncio.create_subprocess_exec(
        "sipp", address, "-sf", str(path),
        "-i", "127.0.0.1", "-p", str(free_port()), *SIPP_OTHER_SOCKETS,
        "-key", "rtp_port", str(rtp_port),
        *(sipp_options(answer) if options is None else options),
        "-s", "6000", "-m", "1", "-nostdin",
        "-trace_msg", "-message_file", str(trace), "-timeout", str(timeout_s),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with asyncio.timeout(timeout_s + 5):
            code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return code, trace.read_text(errors="replace") if trace.exists() else "(no trace)"
