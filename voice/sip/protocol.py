"""The typed messages between the SIP pool (asyncio, main process) and its workers.

Pure: no I/O. Each message is a frozen dataclass; on the wire it is one JSON object per
line, ``{"t": "<ClassName>", ...fields}``, with ``bytes`` as base64 (an :class:`AudioChunk`
of 20 ms at 8 kHz, 16-bit mono is 320 bytes, 428 characters). Commands go pool -> worker on
the worker's stdin, events worker -> pool on its stdout.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

import orjson

from voice.sip.outcome import CallOutcome

Headers = tuple[tuple[str, str], ...]


class ProtocolError(ValueError):
    """A line from the other side could not be decoded."""


class CallState(enum.StrEnum):
    """The states of a call the pool reports (pjsua's finer states are folded into these)."""

    TRYING = "trying"
    RINGING = "ringing"
    ANSWERED = "answered"
    ENDED = "ended"


# -- commands (pool -> worker) ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlaceCall:
    """Start an outbound call; ``flash`` means late offer and CANCEL after ``ring_s``."""

    call_id: str
    target_uri: str
    caller_id: str
    flash: bool
    ring_s: float
    answer_timeout_s: float
    pai: bool
    headers: Headers = ()


@dataclass(frozen=True, slots=True)
class Answer:
    """Answer an inbound call with 200 OK and SDP."""

    call_id: str


@dataclass(frozen=True, slots=True)
class Play:
    """Play a WAV file into the call; exactly one :class:`PlayDone` with the same ``play_id``
    follows: when it ends, is stopped, is replaced by the next Play, or could not start."""

    call_id: str
    path: str
    loop: bool = False
    play_id: int = 0


@dataclass(frozen=True, slots=True)
class StopPlay:
    """Stop what is playing (barge-in); a no-op, with no event, when nothing plays."""

    call_id: str


@dataclass(frozen=True, slots=True)
class StartListen:
    """Stream the caller's audio back as :class:`AudioChunk` events."""

    call_id: str


@dataclass(frozen=True, slots=True)
class Hangup:
    """End the call: BYE, CANCEL, or a final response (``sip_status``, 0: pjsua's default);
    ``retry_after_s``: a 503's ``Retry-After`` (RFC 3261 section 20.33; 0: none)."""

    call_id: str
    sip_status: int = 0
    retry_after_s: int = 0


@dataclass(frozen=True, slots=True)
class Transfer:
    """Blind transfer by REFER (RFC 3515)."""

    call_id: str
    uri: str
    headers: Headers = ()


@dataclass(frozen=True, slots=True)
class SendMessage:
    """Send a SIP MESSAGE (RFC 3428); a :class:`MessageResult` follows."""

    request_id: str
    target_uri: str
    caller_id: str
    text: str


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Hang up everything and exit."""


@dataclass(frozen=True, slots=True)
class Ping:
    """Say you are alive: the worker answers with its :class:`WorkerStatus` from its owner
    thread. A worker stopped (SIGSTOP), or whose owner thread hangs, keeps its pipes open,
    so its end of file never comes: only the missing answer tells the pool."""


# -- events (worker -> pool) --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallEvent:
    """A call changed state; ``outcome`` is set on ``ended``; ``at`` is wall time."""

    call_id: str
    state: CallState
    sip_status: int
    outcome: CallOutcome | None
    at: float


@dataclass(frozen=True, slots=True)
class PlaceFailed:
    """A :class:`PlaceCall` was refused by the worker before anything went on the wire."""

    call_id: str
    reason: str
    retryable: bool  # True: the worker was full, another one may take it


@dataclass(frozen=True, slots=True)
class IncomingCall:
    """A new inbound call (already ringing: the worker sent 180).

    ``call_id`` is the worker's id of the call; ``sip_call_id`` the Call-ID header of its
    INVITE, by which the pool finds the slot it reserved for the caller the front redirected
    ("" when the INVITE could not be read). ``free_slots`` is what a :class:`WorkerStatus`
    would say now, this call counted: the call takes its slot from the free ones and from
    the reserved ones in this one message. A status sent before it took the slot from the
    free ones while the reservation still held it: counted twice until the IncomingCall
    came. Sent the other way round, the slot would have been free for a moment (two calls
    for one slot).
    """

    call_id: str
    caller: str
    called: str
    free_slots: int
    headers: Headers = ()
    sip_call_id: str = ""
    # Where the INVITE came from, as pjsip saw the packet ("127.0.0.1:5060", "[::1]:5060"):
    # whether its P-Asserted-Identity is believed (voice/sip/caller_identity.py); "" unknown.
    source: str = ""


@dataclass(frozen=True, slots=True)
class Digit:
    """An RFC 4733 telephone-event from the caller."""

    call_id: str
    key: str


@dataclass(frozen=True, slots=True)
class PlayDone:
    """The :class:`Play` with ``play_id`` reached its end, or was stopped or replaced, or
    (``failed``) could not start: pjsua2 could not open the file or send it, or the call was
    gone, so nothing of it was heard; or could not play on after a hold (not heard to its end).

    Sent once per Play: a prompt that ends on its own just as a :class:`StopPlay` arrives
    must not end the NEXT prompt too, so a receiver matches the id, never just the event.
    """

    call_id: str
    play_id: int = 0
    failed: bool = False


@dataclass(frozen=True, slots=True)
class Hold:
    """The far end put the call on hold (``held``), or took it off hold: a re-INVITE or
    UPDATE whose SDP makes the call's audio stop (a=sendonly, a=inactive or c=0.0.0.0, RFC
    3264 section 8.4), or then start again. Sent on each change only, never after the end.

    While held the call's prompt stands still (it plays again from its start when the call
    is back, and its :class:`PlayDone` comes then) and the caller hears nothing: a receiver
    waiting for the caller (a question's listening timeout) waits for the hold's end too.
    """

    call_id: str
    held: bool


@dataclass(frozen=True, slots=True)
class TransferStatus:
    """Progress of a :class:`Transfer`: the REFER's answer, then the NOTIFYs (RFC 3515).

    ``sip_status`` is the status the transferee reports for its call to the target (1xx
    while it rings, 2xx answered, >= 300 failed) or the REFER's own final response when it
    was refused; ``final`` marks the last one. A refused REFER, or one that could not be
    sent, is ``final`` with its error status. What a failure means for who holds the caller
    (behind a PBX it may have taken the caller already) is :mod:`voice.sip.refer`'s.
    """

    call_id: str
    sip_status: int
    final: bool


@dataclass(frozen=True, slots=True)
class AudioChunk:
    """20 ms of the caller's audio: PCM16 little-endian, 8 kHz, mono."""

    call_id: str
    pcm: bytes


@dataclass(frozen=True, slots=True)
class MessageResult:
    """The final status of a :class:`SendMessage`."""

    request_id: str
    sip_status: int


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """The worker is up on ``port`` and has ``free_slots`` calls left, having taken in
    ``placed`` :class:`PlaceCall` commands (accepted or refused) since it started.

    The count lets the pool tell which of the calls it sent are in ``free_slots`` already:
    one message carries both, so no moment counts a call being placed twice (once as taken
    from the free slots, once as not yet acknowledged). An inbound call's slot is counted
    by its :class:`IncomingCall`, which carries the free slots itself.
    """

    free_slots: int
    port: int
    placed: int


@dataclass(frozen=True, slots=True)
class Stopping:
    """The worker stops of its own accord, sent SIGTERM by someone other than the pool (an
    operator, ``pkill``, systemd's control-group stop): it takes no more commands, and the
    calls it ends from now on were hung up by the service, as at the pool's Shutdown, not
    by their far ends."""


@dataclass(frozen=True, slots=True)
class StopAsked:
    """The worker was sent SIGTERM by someone other than the pool (``pkill``, an operator,
    systemd's control-group stop) and asks the pool to stop it: it goes on carrying out
    commands for the calls it has, so that they can be closed as at the service's stop (the
    closing notice, an urgent caller put through), and waits up to ``wait_s`` for the pool's
    :class:`Shutdown`. Past that, or at a second SIGTERM, it hangs its calls up itself
    (:class:`Stopping` first)."""

    wait_s: float


@dataclass(frozen=True, slots=True)
class CannotListen:
    """The worker cannot listen on ``addr`` (host:port), for ``reason`` (pjsua's: "Address
    already in use"), and exits: sent instead of its first :class:`WorkerStatus`."""

    addr: str
    reason: str


@dataclass(frozen=True, slots=True)
class Registered:
    """The registration state at the registrar changed."""

    ok: bool
    sip_status: int


Command = (
    PlaceCall
    | Answer
    | Play
    | StopPlay
    | StartListen
    | Hangup
    | Transfer
    | SendMessage
    | Shutdown
    | Ping
)
Event = (
    CallEvent
    | PlaceFailed
    | IncomingCall
    | Digit
    | PlayDone
    | Hold
    | TransferStatus
    | AudioChunk
    | MessageResult
    | WorkerStatus
    | Registered
    | Stopping
    | StopAsked
    | CannotListen
)
Message = Command | Event

_TYPES: dict[str, type[Any]] = {
    cls.__name__: cls for cls in (*typing.get_args(Command), *typing.get_args(Event))
}

Converter = Callable[[Any], Any]


def _converter(hint: Any) -> Converter:
    """A function that checks (and converts) one decoded JSON value for a field of ``hint``.

    Worked out once per field at import: resolving the hints per message was a quarter of
    the main process's CPU under inbound load, and walking them (typing.get_origin and
    friends) per field was still most of a message's decoding under flash-call load
    (py-spy, bench/asterisk_compare.py, 2026-11-29).
    """
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        conv = _converter(inner)
        return lambda value: None if value is None else conv(value)
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            item = _converter(args[0])

            def many(value: Any) -> tuple[Any, ...]:
                if not isinstance(value, list):
                    raise TypeError("expected a list")
                return tuple(item(v) for v in value)

            return many
        items = tuple(_converter(a) for a in args)

        def fixed(value: Any) -> tuple[Any, ...]:
            if not isinstance(value, list):
                raise TypeError("expected a list")
            return tuple(c(v) for c, v in zip(items, value, strict=True))

        return fixed
    if hint is bytes:

        def b64(value: Any) -> bytes:
            if not isinstance(value, str):
                raise TypeError("expected base64 text")
            return base64.b64decode(value, validate=True)

        return b64
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint
    if hint is float:

        def real(value: Any) -> float:
            if isinstance(value, float):
                return value
            if isinstance(value, int) and not isinstance(value, bool):
                return float(value)
            raise TypeError("expected float")

        return real
    if hint is int:

        def integer(value: Any) -> int:
            # JSON true is a Python bool, and bool is an int: isinstance alone let it in.
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            raise TypeError("expected int")

        return integer
    if isinstance(hint, type):
        name = hint.__name__

        def checked(value: Any) -> Any:
            if not isinstance(value, hint):
                raise TypeError(f"expected {name}")
            return value

        return checked
    return lambda value: value


# Each message type's fields with their converters, and whether any field holds bytes.
_FIELDS: dict[type[Any], tuple[tuple[str, Converter], ...]] = {
    cls: tuple(
        (f.name, _converter(typing.get_type_hints(cls)[f.name])) for f in dataclasses.fields(cls)
    )
    for cls in _TYPES.values()
}
_NAMES: dict[type[Any], tuple[str, ...]] = {
    cls: tuple(name for name, _ in fields) for cls, fields in _FIELDS.items()
}
_HAS_BYTES = frozenset(
    cls
    for cls in _TYPES.values()
    if any(typing.get_type_hints(cls)[f.name] is bytes for f in dataclasses.fields(cls))
)


def encode(msg: Message) -> bytes:
    """One message as one JSON line (ending in ``\\n``)."""
    cls = type(msg)
    out: dict[str, Any] = {"t": cls.__name__}
    if cls in _HAS_BYTES:
        for name in _NAMES[cls]:
            value = getattr(msg, name)
            if isinstance(value, bytes):
                value = base64.b64encode(value).decode("ascii")
            out[name] = value
    else:
        for name in _NAMES[cls]:
            out[name] = getattr(msg, name)
    # orjson: UTF-8 as is, tuples as arrays, enums as their values; about 5x faster than
    # json.dumps for these small objects.
    return orjson.dumps(out, option=orjson.OPT_APPEND_NEWLINE)


def decode(line: bytes | str) -> Message:
    """The message in one JSON line; raises :class:`ProtocolError` when it is not one."""
    try:
        raw = orjson.loads(line)
    except ValueError as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("t"), str):
        raise ProtocolError("expected an object with a 't' member")
    cls = _TYPES.get(raw.pop("t"))
    if cls is None:
        raise ProtocolError("unknown message type")
    try:
        kwargs = {name: conv(raw[name]) for name, conv in _FIELDS[cls] if name in raw}
        msg: Message = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"bad {cls.__name__}: {exc}") from None
    return msg
