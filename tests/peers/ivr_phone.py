"""A pjsua2 phone for the clinic-line tests, run in its OWN process (one Endpoint per process).

Two roles, both printing one JSON object a line on stdout (flushed), each with the ``leg`` it
is about (``main``: the call placed or answered; ``xfer``: the call a REFER made us place):

caller  ``--call URI [--dtmf "4@0.5,1@0.7"] [--answers 4,1,2] [--play IN.wav] [--play-at S]
        [--record OUT.wav] [--header "Name: value"]`` places the call (follows the front's
        302; each ``--header`` goes on its INVITE: a P-Asserted-Identity, say), sends RFC 4733
        digits at the given seconds after the answer, then (``--answers``) each digit once the bot
        has spoken and then been quiet for ``--answer-gap`` seconds (a caller who listens to
        each question: the bot takes no early key for a danger sign); an answer written
        ``KEY@S`` is typed ahead instead, S seconds after the key before it (into the next
        question's prompt: for a question that takes early keys), plays a WAV to the far end
        ``--play-at`` seconds after the answer. ``--hangup-when-quiet Q``: once every
        ``--answers`` key is sent, hangs up when the bot has spoken and then been quiet for
        ``Q`` seconds (it has said what follows the last key, and waits), reported as
        ``hung_up_when_quiet``. ``--hold-at S --hold-for H``: puts the call on hold (pjsua's
        re-INVITE, a=sendonly) S seconds after the answer and takes it off hold (a=sendrecv)
        H seconds later, reported as ``held`` and ``unheld``.
        A REFER is accepted (pjsua's default answer, 202) and reported as
        ``{"event": "transfer_request", "to": URI}``; the new call is the ``xfer`` leg and
        is hung up ``--xfer-hold`` seconds after it is answered. ``--hangup-on-refer``: the
        first call is hung up as soon as the REFER is accepted (a PBX that sends its BYE
        before the final NOTIFY).
callee  ``--answer [--duration S]`` answers one inbound call and reports
        ``{"event": "incoming", "from", "to", "headers": {X-*...}}`` (the INVITE's X- headers,
        so a test can read the summary a transfer carries), then hangs up after ``S``.

The process exits 0 once every leg has ended (2 on ``--timeout``, 1 on a pjsua error).
pjsua2's camelCase stays in this file; the test reads only the JSON lines.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

import pjsua2 as pj

from tests.peers import softphone
from tests.peers.softphone import account_config, parse_dtmf, start_endpoint

_STARTED = time.monotonic()


def say(event: str, **fields: Any) -> None:
    """One JSON line on stdout, with ``t``: seconds since the phone started."""
    softphone.say(event, t=round(time.monotonic() - _STARTED, 3), **fields)


@dataclass
class Leg:
    """One call of this phone and what is still to be done on it."""

    name: str
    call: Call | None = None
    confirmed_at: float | None = None
    answer_at: float | None = None
    hangup_at: float | None = None
    ended: bool = False
    hung_up: bool = False


@dataclass
class State:
    """Everything the pump loop needs."""

    args: argparse.Namespace
    dtmf: list[tuple[float, str]]
    legs: list[Leg] = field(default_factory=list)
    played: bool = False
    held: bool = False  # --hold-at done
    unheld: bool = False  # --hold-for done
    keep: list[Any] = field(default_factory=list)  # players, recorders: alive until exit
    answers: list[tuple[str, float | None]] = field(default_factory=list)  # key, typed after
    last_key_at: float = 0.0  # seconds after the answer the last key was sent
    heard: Heard | None = None


class Heard:
    """Follows the recording of what the bot says, to tell when it has finished a prompt.

    pjmedia's WAV writer flushes in blocks, so the file lags the call by a block or so:
    the quiet is counted in samples of the file, never by the clock, and is never early."""

    LOUD = 300  # mean |sample| of a 20 ms frame above this is speech (espeak-ng: thousands)

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0
        self.rate = 0
        self.quiet = 0  # samples of quiet since the last speech
        self.spoke = False  # speech since the last key
        self.read = 0  # samples read so far (the recording starts with the call's media)
        self.skip_to = 0  # samples before this one are past (said before the last key)
        self._rest = b""

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                if not self.rate:
                    head = f.read(44)
                    if len(head) < 44:
                        return
                    self.rate = int.from_bytes(head[24:28], "little")
                    self.offset = 44
                f.seek(self.offset)
                data = self._rest + f.read()
                self.offset = f.tell()
        except OSError:
            return
        frame = self.rate // 50 * 2
        whole = len(data) - len(data) % frame
        self._rest = data[whole:]
        for i in range(0, whole, frame):
            samples = array("h", data[i : i + frame])
            if sys.byteorder != "little":
                samples.byteswap()
            self.read += len(samples)
            if self.read <= self.skip_to:
                continue
            if sum(abs(x) for x in samples) / len(samples) > self.LOUD:
                self.quiet, self.spoke = 0, True
            else:
                self.quiet += len(samples)

    def key_sent(self, at_s: float) -> None:
        """A key went out ``at_s`` seconds into the call: what was said before it is past.

        A key typed into a prompt cuts it short, and the file still holds the words before
        the key for a block or so: they must not count as the next question's."""
        self.poll()
        self.spoke, self.quiet = False, 0
        if self.rate:
            self.skip_to = max(self.skip_to, round(at_s * self.rate))

    def done_speaking(self, gap_s: float) -> bool:
        return self.spoke and self.rate > 0 and self.quiet >= gap_s * self.rate


class Call(pj.Call):  # type: ignore[misc]
    def __init__(self, acc: Account, state: State, leg: Leg, call_id: int = -1) -> None:
        if call_id >= 0:
            super().__init__(acc, call_id)
        else:
            super().__init__(acc)
        self.acc = acc
        self.state = state
        self.leg = leg
        leg.call = self

    def onCallState(self, prm: Any) -> None:
        info = self.getInfo()
        status = int(info.lastStatusCode)
        if info.state == pj.PJSIP_INV_STATE_CONFIRMED and self.leg.confirmed_at is None:
            self.leg.confirmed_at = time.monotonic()
            say("confirmed", leg=self.leg.name)
            hold = self.state.args.xfer_hold if self.leg.name == "xfer" else 0.0
            if hold:
                self.leg.hangup_at = self.leg.confirmed_at + hold
        elif info.state == pj.PJSIP_INV_STATE_DISCONNECTED and not self.leg.ended:
            self.leg.ended = True
            say("ended", leg=self.leg.name, status=status, reason=str(info.lastReason))

    def onCallMediaState(self, prm: Any) -> None:
        if self.leg.name != "main":
            return
        args = self.state.args
        info = self.getInfo()
        for i, m in enumerate(info.media):
            if m.type != pj.PJMEDIA_TYPE_AUDIO or m.status != pj.PJSUA_CALL_MEDIA_ACTIVE:
                continue
            if args.record and not any(
                isinstance(k, pj.AudioMediaRecorder) for k in self.state.keep
            ):
                rec = pj.AudioMediaRecorder()
                rec.createRecorder(args.record)
                self.getAudioMedia(i).startTransmit(rec)
                self.state.keep.append(rec)
            say("media", leg=self.leg.name)

    def onDtmfDigit(self, prm: Any) -> None:
        say("dtmf", leg=self.leg.name, digit=str(prm.digit))

    def onCallRedirected(self, prm: Any) -> int:
        say("redirected", leg=self.leg.name, target=str(prm.targetUri))
        return int(pj.PJSIP_REDIRECT_ACCEPT)

    def onCallTransferRequest(self, prm: Any) -> None:
        say("transfer_request", leg=self.leg.name, to=str(prm.dstUri), status=int(prm.statusCode))
        leg = Leg("xfer")
        self.state.legs.append(leg)
        if self.state.args.hangup_on_refer:
            self.leg.hangup_at = time.monotonic()
        # Our own Call object for the new leg, so its states are reported like the first.
        prm.newCall = Call(self.acc, self.state, leg)


class Account(pj.Account):  # type: ignore[misc]
    def __init__(self, state: State) -> None:
        super().__init__()
        self.state = state

    def onIncomingCall(self, prm: Any) -> None:
        args = self.state.args
        busy = not args.answer or any(leg.name == "main" for leg in self.state.legs)
        leg = Leg("main" if not busy else "refused")
        call = Call(self, self.state, leg, prm.callId)
        info = call.getInfo()
        say(
            "incoming",
            leg=leg.name,
            headers=_x_headers(str(prm.rdata.wholeMsg)),
            **{"from": str(info.remoteUri), "to": str(info.localUri)},
        )
        op = pj.CallOpParam(True)
        if busy:
            op.statusCode = 486
            call.hangup(op)
            self.state.keep.append(call)
            return
        self.state.legs.append(leg)
        op.statusCode = 180
        call.answer(op)
        leg.answer_at = time.monotonic() + args.answer_after
        if args.duration:
            leg.hangup_at = leg.answer_at + args.duration


def _x_headers(raw: str) -> dict[str, str]:
    """The X- headers of a SIP message (the head only, folded lines not expected)."""
    head = raw.split("\r\n\r\n", 1)[0]
    out: dict[str, str] = {}
    for line in head.split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip().lower().startswith("x-"):
            out[name.strip()] = value.strip()
    return out


def _pump(ep: pj.Endpoint, state: State, deadline: float) -> int:
    args = state.args
    while True:
        ep.libHandleEvents(10)
        now = time.monotonic()
        if state.legs and all(leg.ended for leg in state.legs):
            return 0
        if now > deadline:
            say("timeout")
            return 2
        for leg in state.legs:
            call = leg.call
            if call is None or leg.ended:
                continue
            if leg.answer_at is not None and now >= leg.answer_at:
                leg.answer_at = None
                op = pj.CallOpParam(True)
                op.statusCode = 200
                call.answer(op)
            if leg.hangup_at is not None and now >= leg.hangup_at and not leg.hung_up:
                leg.hung_up = True
                call.hangup(pj.CallOpParam(True))
            if leg.name != "main" or leg.confirmed_at is None:
                continue
            up_for = now - leg.confirmed_at
            while state.dtmf and up_for >= state.dtmf[0][0]:
                _, digit = state.dtmf.pop(0)
                call.dialDtmf(digit)
                say("dtmf_sent", leg=leg.name, digit=digit, at=round(up_for, 3))
                state.last_key_at = up_for
                if not state.dtmf and state.heard is not None:
                    state.heard.key_sent(up_for)  # what was said before the last key is past
            if state.answers and state.heard is not None and not state.dtmf:
                # After the timed keys (type-ahead into the menus), the ones that listen, or
                # are typed ahead into a question's prompt.
                digit, after = state.answers[0]
                if after is None:
                    state.heard.poll()
                    due = state.heard.done_speaking(args.answer_gap)
                else:
                    due = up_for >= state.last_key_at + after
                if due:
                    state.answers.pop(0)
                    call.dialDtmf(digit)
                    state.last_key_at = up_for
                    state.heard.key_sent(up_for)
                    say("dtmf_sent", leg=leg.name, digit=digit, at=round(up_for, 3))
            elif args.hangup_when_quiet and state.heard is not None and not state.dtmf:
                # Every key sent: what follows the last one was said once the bot is quiet.
                state.heard.poll()
                if state.heard.done_speaking(args.hangup_when_quiet) and not leg.hung_up:
                    leg.hung_up = True
                    call.hangup(pj.CallOpParam(True))
                    say("hung_up_when_quiet", leg=leg.name, at=round(up_for, 3))
            if args.hold_at and not state.held and up_for >= args.hold_at:
                state.held = True
                call.setHold(pj.CallOpParam(True))
                say("held", leg=leg.name, at=round(up_for, 3))
            if state.held and not state.unheld and up_for >= args.hold_at + args.hold_for:
                state.unheld = True
                prm = pj.CallOpParam(True)
                prm.opt.flag = pj.PJSUA_CALL_UNHOLD
                call.reinvite(prm)
                say("unheld", leg=leg.name, at=round(up_for, 3))
            if args.play and not state.played and up_for >= args.play_at:
                state.played = True
                player = pj.AudioMediaPlayer()
                player.createPlayer(args.play, pj.PJMEDIA_FILE_NO_LOOP)
                player.startTransmit(call.getAudioMedia(-1))
                state.keep.append(player)
                say("playing", leg=leg.name, at=round(up_for, 3))
            if args.duration and up_for >= args.duration and not leg.hung_up:
                leg.hung_up = True
                call.hangup(pj.CallOpParam(True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="pjsua2 phone for the clinic-line tests")
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--call", default="")
    parser.add_argument("--from-user", default="patient")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--answer", action="store_true")
    parser.add_argument("--answer-after", type=float, default=0.0)
    parser.add_argument("--dtmf", default="")
    parser.add_argument("--answers", default="")
    parser.add_argument("--answer-gap", type=float, default=0.8)
    parser.add_argument("--hangup-when-quiet", type=float, default=0.0)
    parser.add_argument("--play", default="")
    parser.add_argument("--play-at", type=float, default=0.0)
    parser.add_argument("--record", default="")
    parser.add_argument("--hold-at", type=float, default=0.0)
    parser.add_argument("--hold-for", type=float, default=0.0)
    parser.add_argument("--duration", type=float, default=0.0)
    parser.add_argument("--xfer-hold", type=float, default=0.5)
    parser.add_argument("--hangup-on-refer", action="store_true")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    args.record = os.path.abspath(args.record) if args.record else ""
    args.play = os.path.abspath(args.play) if args.play else ""
    state = State(args, parse_dtmf(args.dtmf))
    scratch = ""
    if args.answers:
        for answer in filter(None, (a.strip() for a in args.answers.split(","))):
            key, at, after = answer.partition("@")
            state.answers.append((key, float(after) if at else None))
        if not args.record:
            fd, scratch = tempfile.mkstemp(prefix="ivr-phone-", suffix=".wav")
            os.close(fd)
            args.record = scratch
        state.heard = Heard(args.record)

    ep, port = start_endpoint(args.bind, args.port)
    acfg = account_config(args.from_user, args.bind, port)
    acc = Account(state)
    acc.create(acfg, True)
    say("ready", port=port)

    status = 0
    try:
        if args.call:
            leg = Leg("main")
            state.legs.append(leg)
            prm = pj.CallOpParam(True)
            for line in args.header:  # "Name: value", on the INVITE (and its redirect)
                name, _, value = line.partition(":")
                header = pj.SipHeader()
                header.hName, header.hValue = name.strip(), value.strip()
                prm.txOption.headers.append(header)
            Call(acc, state, leg).makeCall(args.call, prm)
        status = _pump(ep, state, time.monotonic() + args.timeout)
        for leg in state.legs:
            if leg.call is not None and not leg.ended:
                leg.call.hangup(pj.CallOpParam(True))
        ep.libHandleEvents(100)
    except pj.Error as exc:
        say("error", reason=str(exc.info()))
        status = 1
    # Recorders complete their WAV header when destroyed: drop them before the library.
    state.keep = [k for k in state.keep if isinstance(k, pj.Call)]
    ep.libHandleEvents(20)
    ep.libDestroy()
    if scratch:
        os.unlink(scratch)
    # Destroying a pjsua2 Call after the library can abort (call id assertion): skip the
    # interpreter's teardown, there is nothing left to flush.
    os._exit(status)


if __name__ == "__main__":
    raise SystemExit(main())
