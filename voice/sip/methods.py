"""SIP request methods, and what a user agent server answers to a request nothing of it takes.

Pure: no I/O. RFC 3261 section 8.2.1: a method the UAS recognises but does not take gets
``405 Method Not Allowed`` with an ``Allow`` header, one it does not recognise at all ``501 Not
Implemented`` (section 21.5.2: "when a UAS does not recognize the request method"). A request
that only means something inside a dialog or a transaction the UAS does not have gets ``481
Call/Transaction Does Not Exist`` (RFC 3261 sections 9.2 for CANCEL, 12.2.2 for a request of a
dialog, 15.1.2 for BYE; RFC 3262 section 3 for PRACK, RFC 6665 section 4.1.3 for NOTIFY).

The front (:mod:`voice.sip.front`) and a SIP worker's last-resort answer
(:mod:`voice.sip.pjsip_fallback`) both read :data:`KNOWN` from here.
"""

from __future__ import annotations

from voice.sip.outcome import SipStatus

# Every method of RFC 3261 and of the extensions in use (RFC 3262 PRACK, RFC 3265/6665
# SUBSCRIBE and NOTIFY, RFC 3311 UPDATE, RFC 3428 MESSAGE, RFC 3515 REFER, RFC 3903 PUBLISH,
# RFC 6086 INFO): a request with one of these is recognised, whatever the answer.
KNOWN = frozenset(
    {
        "INVITE",
        "ACK",
        "CANCEL",
        "OPTIONS",
        "BYE",
        "REGISTER",
        "SUBSCRIBE",
        "NOTIFY",
        "PUBLISH",
        "MESSAGE",
        "INFO",
        "PRACK",
        "UPDATE",
        "REFER",
    }
)

# The methods a worker takes only inside one of its calls (a transfer's REFER and NOTIFYs,
# a key as INFO, a hang-up, a re-offer): pjsua lists them in its Allow, so out of any call
# the right answer is that there is no such call, not that the method is not allowed.
WORKER_IN_CALL_ONLY = frozenset({"BYE", "CANCEL", "INFO", "UPDATE", "PRACK", "NOTIFY", "REFER"})


# The methods a worker refuses before any module of pjsua's sees them, in a call or out of
# one: pjsua's IM module answered each MESSAGE 200 (delivered, RFC 3428 section 7) and the
# service reads none (README, "SIP MESSAGE"). The worker sends MESSAGEs (SMS over SIP): their
# responses are no requests, and are not touched.
WORKER_REFUSED = frozenset({"MESSAGE"})


# The bodies a worker reads in a request, the ``Accept`` of its answer to OPTIONS (RFC 3261
# 11.2, 20.1): SDP (its calls' offers), a key sent as INFO (``application/dtmf-relay``,
# README "SIP, capacity and scaling") and the NOTIFYs of its own transfers (RFC 3515 2.4.5).
# pjsua's answer listed every body a module of pjsua's had registered: presence documents
# (SUBSCRIBE is refused 489), ``text/plain`` and is-composing (MESSAGE is refused 405),
# dialog-info and message-summary (subscriptions the service never makes).
WORKER_ACCEPT = ("application/sdp", "application/dtmf-relay", "message/sipfrag;version=2.0")

# Option tags pjsua puts in a worker's ``Supported`` (its OPTIONS answer, the INVITEs and 200s
# of its calls) that the worker does not serve: ``replaces`` (RFC 3891; every INVITE with
# Replaces gets 403, voice/sip/pjsua.py) and ``trickle-ice`` (RFC 8840; ICE is off). A peer
# that believes them tries what is refused. Taken out at start (voice/sip/pjsip_fallback.py).
WORKER_UNSUPPORTED = frozenset({"replaces", "trickle-ice"})


def worker_options_status(method: str) -> SipStatus | None:
    """A SIP worker's answer to a request out of any call before pjsua's OPTIONS module
    (None: leave it to pjsua): 200 to OPTIONS, which the worker builds itself so that it
    offers only what is served (``Accept`` :data:`WORKER_ACCEPT`, no ``Allow-Events``)."""
    return SipStatus.OK if method == "OPTIONS" else None


def worker_refused_status(method: str) -> SipStatus | None:
    """A SIP worker's answer to a request before pjsua's modules (None: leave it to them):
    405 with an ``Allow`` that no longer offers it, for a method of :data:`WORKER_REFUSED`."""
    return SipStatus.METHOD_NOT_ALLOWED if method in WORKER_REFUSED else None


def worker_unhandled_status(method: str) -> SipStatus | None:
    """A SIP worker's answer to a request that no pjsua module took (None: send nothing).

    Such a request is out of any dialog (pjsip's dialog layer answers one with a To tag for
    no dialog 481 itself, and pjsua's modules take INVITE, OPTIONS, MESSAGE and SUBSCRIBE):
    an ACK gets nothing (RFC 3261 section 17.2.3), a method of a call 481, another known one
    405 and an unknown one 501 (both with pjsua's ``Allow``, as its OPTIONS answer has)."""
    if method == "ACK":
        return None
    if method in WORKER_IN_CALL_ONLY:
        return SipStatus.CALL_DOES_NOT_EXIST
    if method in KNOWN:
        return SipStatus.METHOD_NOT_ALLOWED
    return SipStatus.NOT_IMPLEMENTED
