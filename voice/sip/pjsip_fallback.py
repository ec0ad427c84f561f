"""A SIP worker's answer to a request that no pjsua module takes: pjsip's last module.

pjsip's endpoint drops a request no module takes, with one log line at level 4 ("dropped/
unhandled by any modules", ``endpt_on_rx_msg`` in ``sip_endpoint.c``). The 405 an RFC 3261
UAS owes comes from the pjsua *application* (``mod_default_handler`` in ``pjsua_app.c``), not
from the pjsua library, and pjsua2 cannot register a module. So a method nothing of pjsua's
takes (an unknown one such as ``FOO``, REGISTER, PUBLISH; and BYE, INFO, UPDATE, PRACK, NOTIFY
out of any call) sent straight to a worker's port got no answer at all: its sender retransmits
it for 32 s (Timer F) and then takes the worker for dead.

This module registers one, as ``pjsua_app.c`` does (priority ``PJSIP_MOD_PRIORITY_APPLICATION
+ 99``, after every module of pjsua's), through ctypes on the pjsip that pjsua2's extension
carries and exports. Its ``on_rx_request`` answers statelessly with
:func:`voice.sip.methods.worker_unhandled_status`, and a 405 or 501 carries pjsip's own
``Allow`` (the one the worker's OPTIONS answer has).

Why it cannot hurt the worker: pjsip calls it on the owner thread, inside ``libHandleEvents``
(``threadCnt=0``, ``mainThreadOnly``), as pjsua2's own callbacks are; the struct and the
callback are kept for the life of the process (pjsip's endpoint reads the struct until
``libDestroy`` unregisters it); it reads nothing of pjsip's structs but the first field of
``pjsip_rx_data`` (its pool, first since pjsip 0.5) and the method name from
``pjsip_rx_data_get_info``; it answers only a request with no transaction (what
``pjsip_endpt_respond_stateless`` asserts) and never an ACK; and any failure, at install or
in the callback, leaves the request to pjsip as before (dropped) with a log line.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

from voice.sip.methods import worker_unhandled_status
from voice.sip.outcome import SipStatus

log = logging.getLogger(__name__)

# PJSIP_MOD_PRIORITY_APPLICATION (64 in 2.15's sip_module.h; 32 is UA_PROXY_LAYER, the
# dialog layer's) + 99, as pjsua_app.c's default handler: after every module of pjsua's.
_PRIORITY = 64 + 99
_H_ALLOW = 4  # pjsip_hdr_e PJSIP_H_ALLOW ("DO NOT CHANGE THE VALUE/ORDER OF THE HEADER IDs")
_INFO_PREFIX = "Request msg "  # pjsip_rx_data_get_info: "Request msg FOO/cseq=1 (rdata0x..)"
# The (major, minor) of the pjsip releases whose pjsip_module, pjsip_rx_data's first field,
# info text and function signatures this was checked against (pjsip 2.15.1, the wheel's).
# On another release a changed struct would make pjsip call through a wrong pointer and
# abort the worker with its live calls: the module is not installed there, with a warning,
# until someone checks that release's sip_module.h, sip_types.h and sip_transport.c.
VERIFIED = frozenset({(2, 15)})


class _PjStr(ctypes.Structure):
    _fields_ = (("ptr", ctypes.c_char_p), ("slen", ctypes.c_ssize_t))


_OnRxRequest = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)


class _Module(ctypes.Structure):
    """``pjsip_module`` (``sip_module.h``): list links, name, id, priority, then callbacks."""

    _fields_ = (
        ("prev", ctypes.c_void_p),
        ("next", ctypes.c_void_p),
        ("name", _PjStr),
        ("id", ctypes.c_int),
        ("priority", ctypes.c_int),
        ("load", ctypes.c_void_p),
        ("start", ctypes.c_void_p),
        ("stop", ctypes.c_void_p),
        ("unload", ctypes.c_void_p),
        ("on_rx_request", _OnRxRequest),
        ("on_rx_response", ctypes.c_void_p),
        ("on_tx_request", ctypes.c_void_p),
        ("on_tx_response", ctypes.c_void_p),
        ("on_tsx_state", ctypes.c_void_p),
    )


class _ListHead(ctypes.Structure):
    """The head of a ``pjsip_hdr`` list: pjsip reads only its ``prev`` and ``next``."""

    _fields_ = (("prev", ctypes.c_void_p), ("next", ctypes.c_void_p))


# Every module installed in this process, kept for good: pjsip's endpoint links to the
# struct, and calls the callback, until libDestroy (a few hundred bytes each).
_KEPT: list[_Fallback] = []


def verified(version: str) -> bool:
    """Whether ``pj_get_version()``'s text (``2.15.1``, ``2.15-dev``) is of a release in
    :data:`VERIFIED`."""
    parts = version.split(".", 2)
    if len(parts) < 2 or not parts[0].isdigit():
        return False
    minor = parts[1].split("-", 1)[0]
    return minor.isdigit() and (int(parts[0]), int(minor)) in VERIFIED


def method_of(info: str) -> str:
    """The method in a ``pjsip_rx_data_get_info`` text of a request; "" when it has none
    (pjsip 2.15 gives ``MSG TOO LONG`` when the text would pass 127 characters, older ones
    the object's name: a method that long is no method anyone knows)."""
    if not info.startswith(_INFO_PREFIX):
        return ""
    method, slash, _ = info[len(_INFO_PREFIX) :].partition("/")
    return method if slash else ""


class _Fallback:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self._name = ctypes.create_string_buffer(b"clinic-voice-unhandled")
        self._callback = _OnRxRequest(self._on_rx_request)
        self.module = _Module()
        self.module.name = _PjStr(ctypes.cast(self._name, ctypes.c_char_p), len(self._name.value))
        self.module.id = -1
        self.module.priority = _PRIORITY
        self.module.on_rx_request = self._callback

    def _on_rx_request(self, rdata: int | None) -> int:
        """pjsip's ``on_rx_request``: 1 when answered here, 0 to leave it to pjsip."""
        try:
            return 1 if rdata and self._answer(rdata) else 0
        except Exception:  # a ctypes callback must not raise: pjsip drops it as before
            log.exception("could not answer a request no pjsua module took")
            return 0

    def _answer(self, rdata: int) -> bool:
        lib = self._lib
        info = lib.pjsip_rx_data_get_info(rdata)
        method = method_of(info.decode("ascii", "replace") if info else "")
        status = worker_unhandled_status(method) if method else SipStatus.NOT_IMPLEMENTED
        if status is None or lib.pjsip_rdata_get_tsx(rdata):
            return False  # an ACK; or one with a transaction, that is not ours to answer
        endpt = lib.pjsua_get_pjsip_endpt()
        if not endpt:
            return False
        head = _ListHead()
        head.prev = head.next = ctypes.addressof(head)
        if status is not SipStatus.CALL_DOES_NOT_EXIST:
            allow = lib.pjsip_endpt_get_capability(endpt, _H_ALLOW, None)
            pool = ctypes.c_void_p.from_address(rdata).value  # rdata->tp_info.pool
            copy = lib.pjsip_hdr_clone(pool, allow) if allow and pool else None
            if copy:
                lib.pj_list_insert_before(ctypes.addressof(head), copy)
        rc = lib.pjsip_endpt_respond_stateless(
            endpt, rdata, int(status), None, ctypes.addressof(head), None
        )
        if rc != 0:  # DEBUG: a flood of such requests must not flood the log
            log.debug(
                "could not answer %d to a %r out of any call: pj status %d", status, method, rc
            )
            return False
        log.debug("answered %d to a %r out of any call", status, method)
        return True


def _bind(lib: ctypes.CDLL) -> None:
    """Prototypes of the pjsip functions used (a missing one raises AttributeError)."""
    vp, i = ctypes.c_void_p, ctypes.c_int
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "pj_get_version": (ctypes.c_char_p, []),
        "pjsua_get_pjsip_endpt": (vp, []),
        "pjsip_endpt_register_module": (i, [vp, vp]),
        "pjsip_rx_data_get_info": (ctypes.c_char_p, [vp]),
        "pjsip_rdata_get_tsx": (vp, [vp]),
        "pjsip_endpt_get_capability": (vp, [vp, i, vp]),
        "pjsip_hdr_clone": (vp, [vp, vp]),
        "pj_list_insert_before": (None, [vp, vp]),
        "pjsip_endpt_respond_stateless": (i, [vp, vp, i, vp, vp, vp]),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes


def install(library: str) -> bool:
    """Register the module on the running pjsua's endpoint; ``library`` is the path of the
    extension that carries pjsip (pjsua2's ``_pjsua2``: loaded already, so this opens the same
    copy). Call on the owner thread, after ``libInit``. False (and a warning) when it could
    not, or when the pjsip is not of a release in :data:`VERIFIED`: the worker then runs as
    before, silent to such requests."""
    try:
        lib = ctypes.CDLL(library)
        _bind(lib)
        version = (lib.pj_get_version() or b"").decode("ascii", "replace")
        if not verified(version):
            log.warning(
                "pjsip %s is not a release this module was checked against (%s): "
                "requests no pjsua module takes stay unanswered",
                version or "of unknown version",
                ", ".join(f"{major}.{minor}" for major, minor in sorted(VERIFIED)),
            )
            return False
        endpt = lib.pjsua_get_pjsip_endpt()
        if not endpt:
            log.warning("no pjsip endpoint: requests no module takes stay unanswered")
            return False
        fallback = _Fallback(lib)
        _KEPT.append(fallback)  # before registering: pjsip keeps a pointer to it
        rc = lib.pjsip_endpt_register_module(endpt, ctypes.addressof(fallback.module))
    except (OSError, AttributeError) as exc:
        log.warning("cannot answer requests no pjsua module takes: %s", exc)
        return False
    if rc != 0:
        log.warning("cannot answer requests no pjsua module takes: pj status %d", rc)
        return False
    return True
