"""The 503 a worker sends at its stop (Engine._refuse_at_stop): once per caller, and only to a
call pjsua has not ended. pjsua2's ``Call::hangup`` acts on the call id alone (call.cpp), and
pjsua gives that id to the next call once a call is over: a hang-up of a call already ended
is at best an error, at worst another call's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from voice.sip.outcome import SipStatus
from voice.sip.pjsua import Engine, EngineConfig


@dataclass
class _FakeEp:
    """pjsua's endpoint (pjsua2's method names): what the stop asks of it, no network."""

    calls: list[str] = field(default_factory=list)

    def hangupAllCalls(self) -> None:
        self.calls.append("hangupAllCalls")

    def libHandleEvents(self, ms: int) -> int:
        return 0

    def libDestroy(self, flags: int = 0) -> None:
        self.calls.append("libDestroy")


@dataclass
class _FakeCall:
    """A call as the engine keeps it; its hang-up ends it at once, as pjsua's final answer
    to an INVITE does (DISCONNECTED inside ``hangup``: out of the engine's calls)."""

    engine: Engine
    call_id: str
    outbound: bool = False
    answered: bool = False
    ended: bool = False
    redial: object | None = None
    hangups: list[int] = field(default_factory=list)

    def hangup(self, prm: Any) -> None:
        self.hangups.append(int(prm.statusCode))
        self.engine._calls.pop(self.call_id, None)


def _engine() -> tuple[Engine, _FakeEp]:
    engine = Engine(EngineConfig("127.0.0.1", 0), lambda ev: None)
    ep = _FakeEp()
    engine._ep = ep
    return engine, ep


def _add(engine: Engine, call: _FakeCall) -> _FakeCall:
    engine._calls[call.call_id] = call  # type: ignore[assignment]
    return call


def test_each_caller_refused_at_the_stop_gets_one_503() -> None:
    engine, ep = _engine()
    # An INVITE come while stopping (Engine._on_incoming): ended, queued for its 503.
    queued = _add(engine, _FakeCall(engine, "in-queued", ended=True))
    engine._to_refuse.append(queued)  # type: ignore[arg-type]
    ringing = _add(engine, _FakeCall(engine, "in-ringing"))
    answered = _add(engine, _FakeCall(engine, "in-answered", answered=True))
    outbound = _add(engine, _FakeCall(engine, "out", outbound=True))
    engine.stop()
    assert queued.hangups == [SipStatus.SERVICE_UNAVAILABLE], "hung up again once over"
    assert ringing.hangups == [SipStatus.SERVICE_UNAVAILABLE]
    assert answered.hangups == outbound.hangups == [], "hangupAllCalls's: a BYE, a CANCEL"
    assert ep.calls == ["hangupAllCalls", "libDestroy"]


def test_a_call_over_before_its_503_is_not_hung_up() -> None:
    """The caller's CANCEL came in the same pass as the INVITE: pjsua answered it 487 and
    ended the call (out of the engine's calls), and its call id may be another's now."""
    engine, _ = _engine()
    engine.stopping = True
    gone = _FakeCall(engine, "in-cancelled", ended=True)
    engine._to_refuse.append(gone)  # type: ignore[arg-type]
    live = _add(engine, _FakeCall(engine, "in-live", ended=True))
    engine._to_refuse.append(live)  # type: ignore[arg-type]
    engine.pump(0)
    assert gone.hangups == [], "a hang-up of a call pjsua had ended"
    assert live.hangups == [SipStatus.SERVICE_UNAVAILABLE]
    assert engine._to_refuse == []
