"""A scriptable pjsua2 softphone for tests, run in its OWN process (one Endpoint per process).

Usage (``python -m tests.peers.softphone ...``)::

    --bind HOST            address to listen on (default 127.0.0.1)
    --port N               SIP port, UDP and TCP (default 0: a free one, printed in "ready")
    --call URI             place a call (follows 3xx redirects), e.g. sip:6000@127.0.0.1:5060
    --from-user USER       user part of From (default "softphone")
    --header "Name: value" extra header on the INVITE (repeatable)
    --answer               wait for one inbound call and answer it (200 OK)
    --answer-after S       ring S seconds before answering (default 0)
    --dtmf SPEC            RFC 4733 digits to send once the call is up: "1" (sent after 1 s),
                           "12#" (1 s apart) or timed "1@0.5,2@3.0" (seconds after answer)
    --record OUT.wav       record what the far end sends (8 kHz mono WAV, completed at exit)
    --play IN.wav          play a WAV to the far end once the call is up
    --duration S           hang up S seconds after the call is up (default: wait for BYE)
    --timeout S            give up after S seconds in total (default 30), exit status 2

It prints one JSON object per line on stdout, flushed: ``{"event": "ready", "port": N}``,
``{"event": "incoming", "from": ..., "to": ...}``, ``{"event": "state", "state": "EARLY",
"status": 180}``, ``{"event": "confirmed"}``, ``{"event": "dtmf_sent", "digit": "1"}``,
``{"event": "dtmf", "digit": "5"}`` (received), ``{"event": "ended", "status": 200}``.
Exit status 0 once a call has ended, 2 on timeout, 1 on a pjsua error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import pjsua2 as pj


def say(event: str, **fields: Any) -> None:
    """One JSON line on stdout."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def parse_dtmf(spec: str) -> list[tuple[float, str]]:
    """``"12"`` -> [(1.0, "1"), (2.0, "2")]; ``"1@0.5,2@3"`` -> [(0.5, "1"), (3.0, "2")]."""
    if not spec:
        return []
    if "@" not in spec:
        return [(1.0 + i, d) for i, d in enumerate(spec)]
    out = []
    for part in spec.split(","):
        digit, _, at = part.partition("@")
        out.append((float(at), digit.strip()))
    return sorted(out)


@dataclass
class State:
    """What the script still has to do."""

    args: argparse.Namespace
    dtmf: list[tuple[float, str]]
    call: Phone | None = None
    confirmed_at: float | None = None
    answer_at: float | None = None
    ended: bool = False
    keep: list[Any] = field(default_factory=list)  # players, recorders: alive until exit


class Phone(pj.Call):  # type: ignore[misc]
    def __init__(self, acc: Account, state: State, call_id: int = -1) -> None:
        if call_id >= 0:
            super().__init__(acc, call_id)
        else:
            super().__init__(acc)
        self.state = state

    def onCallState(self, prm: Any) -> None:
        info = self.getInfo()
        say("state", state=info.stateText, status=int(info.lastStatusCode))
        if info.state == pj.PJSIP_INV_STATE_CONFIRMED and self.state.confirmed_at is None:
            self.state.confirmed_at = time.monotonic()
            say("confirmed")
        elif info.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            say("ended", status=int(info.lastStatusCode), reason=str(info.lastReason))
            self.state.ended = True

    def onCallMediaState(self, prm: Any) -> None:
        info = self.getInfo()
        for i, m in enumerate(info.media):
            if m.type != pj.PJMEDIA_TYPE_AUDIO or m.status != pj.PJSUA_CALL_MEDIA_ACTIVE:
                continue
            aud = self.getAudioMedia(i)
            args = self.state.args
            if args.record and not any(
                isinstance(k, pj.AudioMediaRecorder) for k in self.state.keep
            ):
                rec = pj.AudioMediaRecorder()
                rec.createRecorder(args.record)
                aud.startTransmit(rec)
                self.state.keep.append(rec)
            if args.play and not any(isinstance(k, pj.AudioMediaPlayer) for k in self.state.keep):
                player = pj.AudioMediaPlayer()
                player.createPlayer(args.play, pj.PJMEDIA_FILE_NO_LOOP)
                player.startTransmit(aud)
                self.state.keep.append(player)
            say("media")

    def onDtmfDigit(self, prm: Any) -> None:
        say("dtmf", digit=str(prm.digit))

    def onCallRedirected(self, prm: Any) -> int:
        say("redirected", target=str(prm.targetUri))
        return int(pj.PJSIP_REDIRECT_ACCEPT)


class Account(pj.Account):  # type: ignore[misc]
    def __init__(self, state: State) -> None:
        super().__init__()
        self.state = state

    def onIncomingCall(self, prm: Any) -> None:
        call = Phone(self, self.state, prm.callId)
        info = call.getInfo()
        say("incoming", **{"from": str(info.remoteUri), "to": str(info.localUri)})
        if not self.state.args.answer or self.state.call is not None:
            op = pj.CallOpParam(True)
            op.statusCode = 486
            call.hangup(op)
            self.state.keep.append(call)
            return
        self.state.call = call
        op = pj.CallOpParam(True)
        op.statusCode = 180
        call.answer(op)
        self.state.answer_at = time.monotonic() + self.state.args.answer_after


def start_endpoint(bind: str, want_port: int) -> tuple[pj.Endpoint, int]:
    """The process's one Endpoint: owner-thread mode, no sound device, G.711 only."""
    ep = pj.Endpoint()
    ep.libCreate()
    cfg = pj.EpConfig()
    cfg.uaConfig.threadCnt = 0
    cfg.uaConfig.mainThreadOnly = True
    cfg.logConfig.level = 0
    cfg.logConfig.consoleLevel = 0
    cfg.medConfig.clockRate = 8000
    cfg.medConfig.sndClockRate = 8000
    cfg.medConfig.channelCount = 1
    cfg.medConfig.ecTailLen = 0
    ep.libInit(cfg)
    port = listen(ep, bind, want_port)
    ep.libStart()
    ep.audDevManager().setNullDev()
    for codec in ep.codecEnum2():
        keep = codec.codecId.startswith(("PCMU/8000", "PCMA/8000"))
        ep.codecSetPriority(codec.codecId, 200 if keep else 0)
    return ep, port


def account_config(user: str, bind: str, port: int) -> pj.AccountConfig:
    """An account that does not register, with RTP on any free port of ``bind``."""
    acfg = pj.AccountConfig()
    acfg.idUri = f"sip:{user}@{bind}:{port}"
    acfg.regConfig.registerOnAdd = False
    acfg.mediaConfig.transportConfig.port = 0
    acfg.mediaConfig.transportConfig.boundAddress = bind
    return acfg


def listen(ep: pj.Endpoint, host: str, want: int) -> int:
    """UDP and TCP on one port; with port 0 retry until a port is free for both."""
    tcfg = pj.TransportConfig()
    tcfg.boundAddress = host
    for _ in range(20 if want == 0 else 1):
        tcfg.port = want
        udp = ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tcfg)
        port = int(str(ep.transportGetInfo(udp).localName).rsplit(":", 1)[1])
        tcfg.port = port
        try:
            ep.transportCreate(pj.PJSIP_TRANSPORT_TCP, tcfg)
        except pj.Error:
            if want:
                raise
            ep.transportClose(udp)
            continue
        return port
    raise SystemExit("no port free for both UDP and TCP")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="scriptable pjsua2 softphone for tests")
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--call", default="")
    parser.add_argument("--from-user", default="softphone")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--answer", action="store_true")
    parser.add_argument("--answer-after", type=float, default=0.0)
    parser.add_argument("--dtmf", default="")
    parser.add_argument("--record", default="")
    parser.add_argument("--play", default="")
    parser.add_argument("--duration", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    if args.record:
        args.record = os.path.abspath(args.record)
    if args.play:
        args.play = os.path.abspath(args.play)
    state = State(args, parse_dtmf(args.dtmf))

    ep, port = start_endpoint(args.bind, args.port)
    acfg = account_config(args.from_user, args.bind, port)
    acc = Account(state)
    acc.create(acfg, True)
    say("ready", port=port)

    status = 0
    deadline = time.monotonic() + args.timeout
    try:
        if args.call:
            call = Phone(acc, state)
            op = pj.CallOpParam(True)
            for raw in args.header:
                name, _, value = raw.partition(":")
                h = pj.SipHeader()
                h.hName = name.strip()
                h.hValue = value.strip()
                op.txOption.headers.append(h)
            state.call = call
            call.makeCall(args.call, op)
        hung_up = False
        while not state.ended:
            ep.libHandleEvents(10)
            now = time.monotonic()
            if now > deadline:
                say("timeout")
                status = 2
                break
            live = state.call
            if live is None:
                continue
            if state.answer_at is not None and now >= state.answer_at:
                state.answer_at = None
                op = pj.CallOpParam(True)
                op.statusCode = 200
                live.answer(op)
            if state.confirmed_at is None:
                continue
            up_for = now - state.confirmed_at
            while state.dtmf and up_for >= state.dtmf[0][0]:
                _, digit = state.dtmf.pop(0)
                live.dialDtmf(digit)
                say("dtmf_sent", digit=digit)
            if args.duration and up_for >= args.duration and not hung_up:
                hung_up = True
                live.hangup(pj.CallOpParam(True))
        if not state.ended and state.call is not None:
            state.call.hangup(pj.CallOpParam(True))
            ep.libHandleEvents(100)
    except pj.Error as exc:
        say("error", reason=str(exc.info()))
        status = 1
    # Recorders complete their WAV header when destroyed: drop them before the library.
    state.keep = [k for k in state.keep if isinstance(k, pj.Call)]
    ep.libHandleEvents(20)
    ep.libDestroy()
    sys.stdout.flush()
    # Destroying a pjsua2 Call after the library can abort (call id assertion): skip the
    # interpreter's teardown, there is nothing left to flush.
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
