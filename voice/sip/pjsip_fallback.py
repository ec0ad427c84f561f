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

A second module, at priority 31 (before the dialog layer and every module of pjsua's),
refuses each MESSAGE (:data:`voice.sip.methods.WORKER_REFUSED`) with 405, in a call or out
of one: pjsua's IM module answered it 200 ("delivered", RFC 3428 section 7) and the service
reads none. MESSAGE is first taken out of pjsip's ``Allow`` capability (a ``pjsip_allow_hdr``
read as 2.15 lays it out, checked: its type, its name, short method names), which the 405,
the OPTIONS answer and the calls' messages copy; when it cannot be, nothing changes.

The endpoint's ``Supported`` loses :data:`voice.sip.methods.WORKER_UNSUPPORTED` the same
way (``replaces``, refused 403, and ``trickle-ice``, with ICE off): pjsua registers both
unconditionally, and no pjsua2 setting takes them out of the OPTIONS answer and the calls'
INVITEs and 200s.

A third module, at priority 63 (after the dialog layer, so an OPTIONS inside a call still
goes to its dialog; before pjsua's OPTIONS module, 64), answers an OPTIONS out of any call
200 with what the worker serves: pjsip's ``Allow`` and ``Supported``, ``Accept``
:data:`voice.sip.methods.WORKER_ACCEPT` and no ``Allow-Events``. pjsua's answer copied every
capability its modules had registered: ``Allow-Events: presence, dialog, message-summary,
refer`` (RFC 6665 4.4.4: packages the UA takes SUBSCRIBEs for, where every SUBSCRIBE gets
489) and an ``Accept`` with ``text/plain`` and presence documents (MESSAGE gets 405). Those
capabilities are not changed in place: pjsip's event module copies its ``Allow-Events`` into
the REFERs the worker sends, and an empty one would be a malformed header there.
"""

from __future__ import annotations

import ctypes
import logging
import re
from collections.abc import Callable
from typing import Any

from voice.sip.methods import (
    WORKER_ACCEPT,
    WORKER_REFUSED,
    WORKER_UNSUPPORTED,
    worker_options_status,
    worker_refused_status,
    worker_unhandled_status,
)
from voice.sip.outcome import SipStatus

log = logging.getLogger(__name__)

# PJSIP_MOD_PRIORITY_APPLICATION (64 in 2.15's sip_module.h; 32 is UA_PROXY_LAYER, the
# dialog layer's) + 99, as pjsua_app.c's default handler: after every module of pjsua's.
_PRIORITY = 64 + 99
# PJSIP_MOD_PRIORITY_UA_PROXY_LAYER (32, the dialog layer's) - 1: after the transaction layer
# (16, which takes only retransmissions of its transactions), before the dialog layer, which
# hands a request of a call to the call (pjsua answers a MESSAGE there), and before pjsua's
# IM module (64, the MESSAGEs out of any dialog).
_EARLY_PRIORITY = 32 - 1
# PJSIP_MOD_PRIORITY_APPLICATION - 1: after the dialog layer (32) and its usages (48), which
# take a request of a call, before pjsua's OPTIONS module (64).
_OPTIONS_PRIORITY = 64 - 1
_MAX_ARRAY = 32  # PJSIP_GENERIC_ARRAY_MAX_COUNT (sip_config.h): the most values an Allow has
_H_ALLOW = 4  # pjsip_hdr_e PJSIP_H_ALLOW ("DO NOT CHANGE THE VALUE/ORDER OF THE HEADER IDs")
_H_SUPPORTED = 36  # pjsip_hdr_e PJSIP_H_SUPPORTED (pjsua2.PJSIP_H_SUPPORTED in the wheel)
# RFC 3261 25.1 token: what a method name and an option tag are made of.
_TOKEN = re.compile(rb"[A-Za-z0-9.!%*_+`'~-]+")
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


class _AllowHdr(ctypes.Structure):
    """``pjsip_allow_hdr`` (``pjsip_generic_array_hdr``, ``sip_msg.h``): the header's list
    links, type, name, short name and virtual table, then ``count`` and ``values``."""

    _fields_ = (
        ("prev", ctypes.c_void_p),
        ("next", ctypes.c_void_p),
        ("type", ctypes.c_int),
        ("name", _PjStr),
        ("sname", _PjStr),
        ("vptr", ctypes.c_void_p),
        ("count", ctypes.c_uint),
        ("values", _PjStr * _MAX_ARRAY),
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


def _last_resort(method: str) -> SipStatus | None:
    return worker_unhandled_status(method) if method else SipStatus.NOT_IMPLEMENTED


class _Fallback:
    """One pjsip module that answers, statelessly, the requests ``decide`` gives a status
    (None: left to the modules after it)."""

    def __init__(
        self,
        lib: ctypes.CDLL,
        *,
        name: bytes = b"clinic-voice-unhandled",
        priority: int = _PRIORITY,
        decide: Callable[[str], SipStatus | None] = _last_resort,
        user_agent: str = "",
    ) -> None:
        self._lib = lib
        self._decide = decide
        self._user_agent = user_agent
        self._name = ctypes.create_string_buffer(name)
        self._callback = _OnRxRequest(self._on_rx_request)
        self.module = _Module()
        self.module.name = _PjStr(ctypes.cast(self._name, ctypes.c_char_p), len(self._name.value))
        self.module.id = -1
        self.module.priority = priority
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
        status = self._decide(method)
        if status is None or lib.pjsip_rdata_get_tsx(rdata):
            return False  # an ACK; or one with a transaction, that is not ours to answer
        endpt = lib.pjsua_get_pjsip_endpt()
        if not endpt:
            return False
        head = _ListHead()
        head.prev = head.next = ctypes.addressof(head)
        pool = ctypes.c_void_p.from_address(rdata).value  # rdata->tp_info.pool
        if status is not SipStatus.CALL_DOES_NOT_EXIST and pool:
            self._add_capability(head, pool, endpt, _H_ALLOW, "Allow")
        if status is SipStatus.OK and pool:  # an OPTIONS (RFC 3261 11.2)
            self._add_capability(head, pool, endpt, _H_SUPPORTED, "Supported")
            self._add_text(head, pool, "Accept", ", ".join(WORKER_ACCEPT))
            if self._user_agent:
                self._add_text(head, pool, "User-Agent", self._user_agent)
        rc = lib.pjsip_endpt_respond_stateless(
            endpt, rdata, int(status), None, ctypes.addressof(head), None
        )
        if rc != 0:  # DEBUG: a flood of such requests must not flood the log
            log.debug("could not answer %d to a %r: pj status %d", status, method, rc)
            return False
        log.debug("answered %d to a %r", status, method)
        return True

    def _add_capability(
        self, head: _ListHead, pool: int, endpt: int, htype: int, name: str
    ) -> None:
        """Add a copy of the endpoint's capability header ``htype`` to ``head``, when it is
        the header ``name`` (a pjsip of another layout adds nothing)."""
        lib = self._lib
        header = lib.pjsip_endpt_get_capability(endpt, htype, None)
        if not header or not _is_header(header, htype, name):
            return
        copy = lib.pjsip_hdr_clone(pool, header)
        if copy:
            lib.pj_list_insert_before(ctypes.addressof(head), copy)

    def _add_text(self, head: _ListHead, pool: int, name: str, value: str) -> None:
        """Add the header ``name: value`` to ``head`` (pjsip copies both into ``pool``)."""
        raw_name, raw_value = name.encode("ascii"), value.encode("ascii")
        header = self._lib.pjsip_generic_string_hdr_create(
            pool,
            ctypes.byref(_PjStr(raw_name, len(raw_name))),
            ctypes.byref(_PjStr(raw_value, len(raw_value))),
        )
        if header:
            self._lib.pj_list_insert_before(ctypes.addressof(head), header)


def _is_header(address: int, htype: int, name: str) -> bool:
    """Whether the ``pjsip_hdr`` at ``address`` is of type ``htype`` and named ``name``."""
    header = _AllowHdr.from_address(address)  # its first fields are every header's
    return bool(header.type == htype and _text(address + _AllowHdr.name.offset) == name)


def _drop_from_allow(lib: ctypes.CDLL, endpt: int, methods: frozenset[str]) -> bool:
    """Take ``methods`` out of the endpoint's ``Allow`` (which pjsua's OPTIONS answer, its
    calls' INVITEs and 200s, and the 405s here copy); False, and nothing changed, when the
    header is not laid out as expected (a ``pjsip_allow_hdr`` named Allow, at most
    ``_MAX_ARRAY`` short values)."""
    return _drop_from_capability(lib, endpt, _H_ALLOW, "Allow", methods)


def _drop_from_capability(
    lib: ctypes.CDLL, endpt: int, htype: int, name: str, values: frozenset[str]
) -> bool:
    """Take ``values`` out of the endpoint's capability header ``htype`` (``Allow`` or
    ``Supported``: both a ``pjsip_generic_array_hdr``, laid out as :class:`_AllowHdr`);
    False, and nothing changed, when it is not the header ``name`` or not laid out so."""
    address = lib.pjsip_endpt_get_capability(endpt, htype, None)
    if not address:
        return False
    allow = _AllowHdr.from_address(address)
    count = int(allow.count)
    if allow.type != htype or _text(address + _AllowHdr.name.offset) != name:
        return False
    if count > _MAX_ARRAY:
        return False
    # By address, not through ctypes' fields: a c_char_p field reads as a bytes copy, and
    # one written back would point into that copy (freed: garbage in every Allow, seen).
    size = ctypes.sizeof(_PjStr)
    slots = [address + _AllowHdr.values.offset + i * size for i in range(count)]
    names = [_text(slot) for slot in slots]
    if any(not name for name in names):
        return False
    kept = [slot for slot, text in zip(slots, names, strict=True) if text not in values]
    for i, slot in enumerate(kept):  # each pj_str_t moved down over the ones taken out
        if slots[i] != slot:
            ctypes.memmove(slots[i], slot, size)
    allow.count = len(kept)
    return True


def _text(pj_str: int) -> str:
    """The text of the ``pj_str_t`` at address ``pj_str`` ("" when it has none, or is no
    short token: not a method name, an option tag such as ``100rel``, nor Allow)."""
    ptr = ctypes.c_void_p.from_address(pj_str).value
    slen = ctypes.c_ssize_t.from_address(pj_str + ctypes.sizeof(ctypes.c_void_p)).value
    if not ptr or not 0 < slen <= 32:
        return ""
    raw = ctypes.string_at(ptr, slen)
    return raw.decode("ascii") if _TOKEN.fullmatch(raw) else ""


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
        "pjsip_generic_string_hdr_create": (vp, [vp, vp, vp]),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes


def install(library: str, user_agent: str = "") -> bool:
    """Register the module on the running pjsua's endpoint; ``library`` is the path of the
    extension that carries pjsip (pjsua2's ``_pjsua2``: loaded already, so this opens the same
    copy). Call on the owner thread, after ``libInit``. False (and a warning) when it could
    not, or when the pjsip is not of a release in :data:`VERIFIED`: the worker then runs as
    before, silent to such requests. ``user_agent`` goes in the answers to OPTIONS, as in
    pjsua's."""
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
    _refuse_early(lib, endpt)
    _answer_options(lib, endpt, user_agent)
    if not _drop_from_capability(lib, endpt, _H_SUPPORTED, "Supported", WORKER_UNSUPPORTED):
        log.warning(
            "pjsip's Supported header is not as expected: the worker still offers %s",
            ", ".join(sorted(WORKER_UNSUPPORTED)),
        )
    return True


def _answer_options(lib: ctypes.CDLL, endpt: int, user_agent: str) -> None:
    """Answer OPTIONS out of any call before pjsua's module does (see the module's doc);
    when this module is not registered, pjsua answers them as before, with a warning."""
    options = _Fallback(
        lib,
        name=b"clinic-voice-options",
        priority=_OPTIONS_PRIORITY,
        decide=worker_options_status,
        user_agent=user_agent,
    )
    _KEPT.append(options)
    rc = lib.pjsip_endpt_register_module(endpt, ctypes.addressof(options.module))
    if rc != 0:
        log.warning(
            "cannot answer OPTIONS (pj status %d): pjsua's answer offers presence and "
            "MESSAGE bodies the worker refuses",
            rc,
        )


def _refuse_early(lib: ctypes.CDLL, endpt: int) -> None:
    """Refuse the methods of :data:`WORKER_REFUSED` (MESSAGE) before pjsua's modules, in a
    call or out of one, and take them out of the ``Allow`` first (a 405 whose Allow offers
    the method contradicts itself, RFC 3261 8.2.1). When the Allow cannot be changed, or the
    module not registered, pjsua answers them as before (200), with a warning."""
    if not _drop_from_allow(lib, endpt, WORKER_REFUSED):
        log.warning(
            "pjsip's Allow header is not as expected: inbound MESSAGEs stay answered 200 by "
            "pjsua (and dropped)"
        )
        return
    early = _Fallback(
        lib,
        name=b"clinic-voice-refused",
        priority=_EARLY_PRIORITY,
        decide=worker_refused_status,
    )
    _KEPT.append(early)
    rc = lib.pjsip_endpt_register_module(endpt, ctypes.addressof(early.module))
    if rc != 0:
        log.warning("cannot refuse inbound MESSAGEs (pj status %d): pjsua answers them 200", rc)
