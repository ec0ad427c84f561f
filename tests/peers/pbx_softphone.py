"""A pjsua2 softphone in its own process, driven by JSON lines, for the PBX tests.

Run ``python -m tests.peers.pbx_softphone --server 127.0.0.1:5160 --user 6001 --password
clinic-6001``. It registers (unless ``--no-register``), then reads commands from stdin and
prints events to stdout, one JSON object a line:

commands  ``{"cmd": "call", "uri": ..., "from_uri": ..., "headers": {...}, "late_offer": true}``,
          ``{"cmd": "answer"}``, ``{"cmd": "dtmf", "digits": "12"}``, ``{"cmd": "hangup"}``,
          ``{"cmd": "hold"}`` (a re-INVITE with a=sendonly, as a phone's hold button sends),
          ``{"cmd": "unhold"}`` (a re-INVITE with a=sendrecv), ``{"cmd": "xfer", "uri": ...,
          "headers": {...}}`` (blind REFER; the headers go on the REFER itself),
          ``{"cmd": "message", "uri": ..., "body": ...}``, ``{"cmd": "quit"}``
events    ``ready``, ``registered``, ``reg_failed``, ``incoming`` (with the INVITE's From,
          P-Asserted-Identity, its ``X-`` headers and whether it had SDP), ``call_state``,
          ``media_active``, ``media_held`` (the far end took our hold: ``local``; or holds
          us: ``remote``), ``dtmf``, ``transfer_status``, ``message``, ``message_status``,
          ``error``, ``recorded`` (with ``--record-dir``: a call's WAV file once its header
          is complete);
          each has ``at``, the ``time.monotonic()`` of when it happened

:class:`Softphone` is the test side: it starts the process and waits for events with
deadlines. pjsua2 is imported only in the child (one ``Endpoint`` per process).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
Event = dict[str, Any]


# -- test side -------------------------------------------------------------------------------
class Softphone:
    """A softphone process registered to a PBX, seen through its JSON events."""

    def __init__(
        self,
        server: str,
        user: str,
        password: str,
        *,
        register: bool = True,
        answer: str = "200",
        answer_delay_s: float = 0.0,
        capacity: int = 4,
        record_dir: Path | None = None,
    ) -> None:
        argv = [
            sys.executable,
            "-m",
            "tests.peers.pbx_softphone",
            "--server",
            server,
            "--user",
            user,
            "--password",
            password,
            "--answer",
            answer,
            "--answer-delay",
            str(answer_delay_s),
            "--capacity",
            str(capacity),
        ]
        if not register:
            argv.append("--no-register")
        if record_dir is not None:
            argv += ["--record-dir", str(record_dir)]
        self.user = user
        self.events: list[Event] = []
        self._queue: queue.Queue[Event | None] = queue.Queue()
        self._stderr: list[str] = []
        self._quit_sent = False
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                self._stderr.append(f"(stdout, not JSON) {line.rstrip()}")
                continue
            self._queue.put(event)
        self._queue.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line.rstrip())
            del self._stderr[:-200]

    def send(self, cmd: str, **fields: Any) -> None:
        """Send one command to the softphone."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
        self.proc.stdin.flush()

    def expect(
        self,
        event: str,
        timeout_s: float = 10,
        where: Callable[[Event], bool] | None = None,
    ) -> Event:
        """The next ``event`` (matching ``where``) within ``timeout_s``, else fail loudly."""
        # Events already seen but not consumed are checked first.
        for seen in self.events:
            if seen["event"] == event and not seen.get("_used") and (where is None or where(seen)):
                seen["_used"] = True
                return seen
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                got = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if got is None:
                raise AssertionError(
                    f"softphone {self.user} exited ({self.proc.poll()}) waiting for {event}; "
                    f"{self._story()}"
                )
            self.events.append(got)
            if got["event"] == event and (where is None or where(got)):
                got["_used"] = True
                return got
        raise AssertionError(
            f"softphone {self.user}: no {event!r} within {timeout_s} s; {self._story()}"
        )

    def drain(self, wait_s: float = 0.0) -> list[Event]:
        """Every event that arrived so far (waiting ``wait_s`` for more)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                got = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return self.events
            if got is None:
                return self.events
            self.events.append(got)

    def _story(self, last: int = 15) -> str:
        seen = [
            {k: v for k, v in e.items() if k not in {"_used", "at"}} for e in self.events[-last:]
        ]
        return f"events: {seen}; stderr tail: {self._stderr[-15:]}"

    def story(self) -> str:
        """Everything this softphone reported so far, for a failed test's output."""
        self.drain()
        return f"softphone {self.user}: {self._story(last=40)}"

    def begin_close(self) -> None:
        """Ask the softphone to hang up, unregister and exit (see :meth:`close`).

        ``quit`` goes out once: a second one can meet a process that is already exiting,
        whose pipe is then broken."""
        if self._quit_sent or self.proc.poll() is not None:
            return
        self._quit_sent = True
        try:
            self.send("quit")
        except OSError as exc:  # already gone (broken pipe): close() reaps it
            self._stderr.append(f"quit not delivered: {exc!r}")

    def close(self) -> None:
        """Hang up, unregister and end the process (killed if it does not end in 5 s)."""
        self.begin_close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                # A line left in stdin's buffer by a failed write is flushed again on close,
                # into the pipe of a process that has exited; the file is closed all the same.
                with contextlib.suppress(BrokenPipeError):
                    stream.close()

    def __enter__(self) -> Softphone:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def call_state(name: str, code: int | None = None) -> Callable[[Event], bool]:
    """A ``where=`` matcher for ``call_state`` events (``CONFIRMED``, ``DISCONNECTED``...)."""

    def match(e: Event) -> bool:
        return bool(e["state"] == name and (code is None or e["code"] == code))

    return match


def header(message: str, name: str) -> str:
    """The value of the first ``name`` header in a SIP message ("" when absent)."""
    m = re.search(rf"^{re.escape(name)}\s*:\s*(.*?)\r?$", message, re.MULTILINE | re.IGNORECASE)
    return m.group(1).strip() if m else ""


def x_headers(message: str) -> dict[str, str]:
    """The extension headers (``X-...``) of a SIP message, by name (the first of each)."""
    found: dict[str, str] = {}
    head = re.split(r"\r?\n\r?\n", message, maxsplit=1)[0]
    for m in re.finditer(r"^(X-[A-Za-z0-9-]+)\s*:\s*(.*?)\r?$", head, re.MULTILINE):
        found.setdefault(m.group(1), m.group(2).strip())
    return found


def display_name(value: str) -> str:
    """The display name of a From header's value (``"U1 Ann" <sip:6001@h>;tag=x`` ->
    ``U1 Ann``), "" when it has none."""
    m = re.match(r'\s*"((?:[^"\\]|\\.)*)"|\s*([^<"]*?)\s*<', value)
    if m is None:
        return ""
    return m.group(1) if m.group(1) is not None else m.group(2)


def uri_user(value: str) -> str:
    """The user part of the SIP URI in a header value (``"x" <sip:+4474@h>`` -> ``+4474``)."""
    m = re.search(r"sips?:([^@;>]+)@", value)
    return m.group(1) if m else ""


# -- softphone side (child process) --------------------------------------------------------
_events_out = sys.stdout


def _emit(event: str, **fields: Any) -> None:
    # "at": CLOCK_MONOTONIC, the same clock in every process, so tests can time events.
    _events_out.write(json.dumps({"event": event, "at": time.monotonic(), **fields}) + "\n")
    _events_out.flush()


def run(args: argparse.Namespace) -> int:
    """The softphone: pjsua2 on this (owner) thread, commands from a stdin reader thread."""
    global _events_out
    # pjsip logs to fd 1 before a log writer can be set (libCreate): events get their own
    # copy of stdout and fd 1 becomes stderr, so the JSON stream stays clean.
    _events_out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import pjsua2 as pj

    commands: queue.Queue[dict[str, Any] | None] = queue.Queue()
    held_by = {pj.PJSUA_CALL_MEDIA_LOCAL_HOLD: "local", pj.PJSUA_CALL_MEDIA_REMOTE_HOLD: "remote"}
    calls: dict[int, Any] = {}
    gone: list[Any] = []  # disconnected calls, dropped from the owner loop, never in callbacks
    recorders: dict[int, tuple[Any, Path]] = {}

    class StderrLog(pj.LogWriter):  # type: ignore[misc]
        def write(self, entry: Any) -> None:
            sys.stderr.write(entry.msg if entry.msg.endswith("\n") else entry.msg + "\n")

    class Call(pj.Call):  # type: ignore[misc]
        def onCallState(self, prm: Any) -> None:
            ci = self.getInfo()
            if ci.state == pj.PJSIP_INV_STATE_DISCONNECTED and ci.id in recorders:
                # Not destroyed here, inside pjsua's callback: the owner loop does it and
                # then reports the finished file as ``recorded``.
                finished.append(ci.id)
            _emit(
                "call_state",
                call=ci.id,
                state=ci.stateText,
                code=int(ci.lastStatusCode),
                reason=ci.lastReason,
                remote=ci.remoteUri,
            )
            if ci.state == pj.PJSIP_INV_STATE_DISCONNECTED:
                gone.append(calls.pop(ci.id, self))

        def onCallMediaState(self, prm: Any) -> None:
            ci = self.getInfo()
            for i, media in enumerate(ci.media):
                if media.type == pj.PJMEDIA_TYPE_AUDIO and media.status in held_by:
                    _emit("media_held", call=ci.id, by=held_by[media.status])
                if (
                    media.type == pj.PJMEDIA_TYPE_AUDIO
                    and media.status == pj.PJSUA_CALL_MEDIA_ACTIVE
                ):
                    _emit("media_active", call=ci.id)
                    if ci.id in recorders:
                        # New media (pjsua's UPDATE that locks the codec, an unhold) is a
                        # new stream in the conference bridge: the recording goes on from it.
                        try:
                            self.getAudioMedia(i).startTransmit(recorders[ci.id][0])
                        except pj.Error as exc:
                            _emit("error", call=ci.id, message=f"record: {exc.info()}")
                    elif args.record_dir:
                        path = Path(args.record_dir) / f"call-{ci.id}-{time.monotonic_ns()}.wav"
                        rec = pj.AudioMediaRecorder()
                        try:
                            rec.createRecorder(str(path))
                            self.getAudioMedia(i).startTransmit(rec)
                        except pj.Error as exc:  # told to the test, not lost in a callback
                            _emit("error", call=ci.id, message=f"record: {exc.info()}")
                            continue
                        recorders[ci.id] = (rec, path)

        def onCallTransferStatus(self, prm: Any) -> None:
            code = int(prm.statusCode)
            _emit("transfer_status", call=self.getId(), code=code, final=bool(prm.finalNotify))
            if prm.finalNotify and 200 <= code < 300:
                # RFC 5589 section 6: the transferor ends its leg once the transfer worked.
                to_hang_up.append(self.getId())

        def onDtmfDigit(self, prm: Any) -> None:
            _emit("dtmf", call=self.getId(), digit=prm.digit)

    class Account(pj.Account):  # type: ignore[misc]
        def onRegState(self, prm: Any) -> None:
            info = self.getInfo()
            if prm.code == 200 and info.regExpiresSec > 0:
                _emit("registered", code=200, expires=int(info.regExpiresSec))
            elif prm.code == 200:
                _emit("unregistered", code=200)
            else:
                _emit("reg_failed", code=int(prm.code), reason=prm.reason)

        def onIncomingCall(self, prm: Any) -> None:
            call = Call(self, prm.callId)
            calls[prm.callId] = call
            msg = prm.rdata.wholeMsg
            from_value = header(msg, "From") or header(msg, "f")
            pai = header(msg, "P-Asserted-Identity")
            has_sdp = "\r\n\r\nv=0" in msg or "\n\nv=0" in msg
            _emit(
                "incoming",
                call=prm.callId,
                from_header=from_value,
                from_user=uri_user(from_value),
                pai=pai,
                pai_user=uri_user(pai),
                has_sdp=has_sdp,
                x_headers=x_headers(msg),
            )
            op = pj.CallOpParam()
            # Like a service worker: at most --capacity calls, then 486 Busy Here.
            full = len(calls) > args.capacity
            op.statusCode = 486 if full or args.answer == "busy" else 180
            call.answer(op)
            if op.statusCode == 180 and args.answer == "200":
                pending_answers.append((time.monotonic() + args.answer_delay, prm.callId))

        def onInstantMessage(self, prm: Any) -> None:
            _emit(
                "message",
                from_uri=prm.fromUri,
                to_uri=prm.toUri,
                body=prm.msgBody,
                content_type=prm.contentType,
            )

        def onInstantMessageStatus(self, prm: Any) -> None:
            _emit("message_status", code=int(prm.code), reason=prm.reason)

    pending_answers: list[tuple[float, int]] = []
    finished: list[int] = []  # calls whose recorder is to be closed by the owner loop
    to_hang_up: list[int] = []
    buddies: list[Any] = []

    if args.record_dir:
        Path(args.record_dir).mkdir(parents=True, exist_ok=True)
    ep = pj.Endpoint()
    ep.libCreate()
    cfg = pj.EpConfig()
    cfg.uaConfig.threadCnt = 0
    cfg.uaConfig.mainThreadOnly = True
    cfg.uaConfig.userAgent = f"clinic-voice-test-softphone/{args.user}"
    writer = StderrLog()
    cfg.logConfig.writer = writer
    cfg.logConfig.level = args.log_level
    cfg.logConfig.consoleLevel = args.log_level
    cfg.logConfig.decor = 0
    ep.libInit(cfg)
    tcfg = pj.TransportConfig()
    tcfg.port = 0
    tcfg.boundAddress = "127.0.0.1"
    tcfg.publicAddress = "127.0.0.1"
    ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tcfg)
    ep.libStart()
    ep.audDevManager().setNullDev()
    # G.711 only: a small SDP keeps every INVITE under the 1300-byte UDP limit
    # (RFC 3261 18.1.1), and it is what the PBX allows anyway.
    for codec in ep.codecEnum2():
        keep = codec.codecId.startswith(("PCMU/", "PCMA/"))
        ep.codecSetPriority(codec.codecId, 200 if keep else 0)

    acfg = pj.AccountConfig()
    acfg.idUri = f"sip:{args.user}@{args.server}"
    acfg.regConfig.registrarUri = f"sip:{args.server}"
    acfg.regConfig.registerOnAdd = not args.no_register
    acfg.regConfig.timeoutSec = 300
    acfg.sipConfig.authCreds.append(pj.AuthCredInfo("digest", "*", args.user, 0, args.password))
    acfg.natConfig.sipOutboundUse = 0
    # RTP on a free loopback port: the default 4000 collided between softphones started
    # together (one fell back to another port mid-start and its first RTP went missing).
    acfg.mediaConfig.transportConfig.port = 0
    acfg.mediaConfig.transportConfig.boundAddress = "127.0.0.1"
    acc = Account()
    acc.create(acfg)

    def reader() -> None:
        for line in sys.stdin:
            if line.strip():
                try:
                    commands.put(json.loads(line))
                except ValueError:
                    _emit("error", message=f"not JSON: {line.strip()[:80]}")
        commands.put(None)

    threading.Thread(target=reader, daemon=True).start()
    _emit("ready", user=args.user)

    running = True
    while running:
        ep.libHandleEvents(10)
        gone.clear()
        while finished:
            call_id = finished.pop()
            entry = recorders.pop(call_id, None)
            if entry is None:
                continue
            path = entry[1]
            # The last reference: its destructor removes the port from the conference
            # bridge and completes the WAV header (sizes), possibly a few frames later.
            del entry
            _emit("recorded", call=call_id, **_finish_wav(ep, path, deadline_s=3.0))
        now = time.monotonic()
        for item in [p for p in pending_answers if p[0] <= now]:
            pending_answers.remove(item)
            call = calls.get(item[1])
            if call is not None:
                op = pj.CallOpParam()
                op.statusCode = 200
                try:
                    call.answer(op)
                except pj.Error as exc:
                    _emit("error", message=f"answer: {exc.info()}")
        while to_hang_up:
            call = calls.get(to_hang_up.pop())
            if call is not None:
                call.hangup(pj.CallOpParam(True))
        while True:
            try:
                cmd = commands.get_nowait()
            except queue.Empty:
                break
            if cmd is None or cmd.get("cmd") == "quit":
                running = False
                break
            try:
                _command(pj, cmd, acc=acc, calls=calls, buddies=buddies, call_cls=Call)
            except pj.Error as exc:
                _emit("error", cmd=cmd.get("cmd"), message=exc.info())
            except (KeyError, ValueError) as exc:
                _emit("error", cmd=cmd.get("cmd"), message=repr(exc))

    ep.hangupAllCalls()
    deadline = time.monotonic() + 2
    while calls and time.monotonic() < deadline:
        ep.libHandleEvents(20)
    left = [path for _, path in recorders.values()]
    recorders.clear()
    for path in left:
        _emit("recorded", call=-1, **_finish_wav(ep, path, deadline_s=1.0))
    if not args.no_register:
        try:
            acc.setRegistration(False)
        except pj.Error as exc:
            sys.stderr.write(f"unregister: {exc.info()}\n")
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            ep.libHandleEvents(20)
    _events_out.flush()
    # pjsua2 objects destroyed by the interpreter after libDestroy can abort it; the
    # process has nothing left to flush, so leave without running finalisers.
    ep.libDestroy()
    os._exit(0)


def wav_complete(path: Path) -> bool:
    """True when the RIFF and data sizes in the header of ``path`` match its length."""
    try:
        with open(path, "rb") as f:
            head = f.read(44)
            size = f.seek(0, os.SEEK_END)
    except OSError:
        return False
    if len(head) < 44 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return False
    riff = int.from_bytes(head[4:8], "little")
    data = int.from_bytes(head[40:44], "little")
    return riff == size - 8 and data == size - 44


def _finish_wav(ep: Any, path: Path, deadline_s: float) -> dict[str, Any]:
    """Pump pjsua until the recorder at ``path`` has written its header (or the deadline)."""
    deadline = time.monotonic() + deadline_s
    while not wav_complete(path) and time.monotonic() < deadline:
        ep.libHandleEvents(10)
    size = path.stat().st_size if path.exists() else 0
    return {"path": str(path), "complete": wav_complete(path), "bytes": size}


def _command(
    pj: Any,
    cmd: dict[str, Any],
    *,
    acc: Any,
    calls: dict[int, Any],
    buddies: list[Any],
    call_cls: Any,
) -> None:
    name = cmd["cmd"]
    if name == "call":
        call = call_cls(acc)
        op = pj.CallOpParam(True)
        if cmd.get("late_offer"):
            op.opt.flag = pj.PJSUA_CALL_NO_SDP_OFFER
        if cmd.get("from_uri"):
            op.txOption.localUri = cmd["from_uri"]
        for hname, hvalue in cmd.get("headers", {}).items():
            h = pj.SipHeader()
            h.hName = hname
            h.hValue = hvalue
            op.txOption.headers.append(h)
        call.makeCall(cmd["uri"], op)
        calls[call.getId()] = call
        _emit("calling", call=call.getId(), uri=cmd["uri"])
    elif name == "answer":
        for call in list(calls.values()):
            op = pj.CallOpParam()
            op.statusCode = 200
            call.answer(op)
    elif name == "dtmf":
        for call in list(calls.values()):
            call.dialDtmf(cmd["digits"])
    elif name == "hangup":
        for call in list(calls.values()):
            op = pj.CallOpParam()
            # 487 while early makes pjsua send CANCEL (RFC 3261 9.1)
            op.statusCode = cmd.get("code", 603)
            call.hangup(op)
    elif name == "hold":
        for call in list(calls.values()):
            call.setHold(pj.CallOpParam(True))
    elif name == "unhold":
        for call in list(calls.values()):
            op = pj.CallOpParam(True)
            op.opt.flag = pj.PJSUA_CALL_UNHOLD
            call.reinvite(op)
    elif name == "xfer":
        for call in list(calls.values()):
            op = pj.CallOpParam(True)
            for hname, hvalue in cmd.get("headers", {}).items():  # on the REFER itself
                h = pj.SipHeader()
                h.hName = hname
                h.hValue = hvalue
                op.txOption.headers.append(h)
            call.xfer(cmd["uri"], op)
    elif name == "message":
        bcfg = pj.BuddyConfig()
        bcfg.uri = cmd["uri"]
        bcfg.subscribe = False
        buddy = pj.Buddy()
        buddy.create(acc, bcfg)
        buddies.append(buddy)
        mp = pj.SendInstantMessageParam()
        mp.content = cmd["body"]
        buddy.sendInstantMessage(mp)
    else:
        _emit("error", message=f"unknown command {name!r}")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the softphone."""
    parser = argparse.ArgumentParser(prog="python -m tests.peers.pbx_softphone")
    parser.add_argument("--server", required=True, help="PBX host:port, e.g. 127.0.0.1:5160")
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--no-register", action="store_true")
    parser.add_argument("--answer", choices=["200", "ring", "busy"], default="200")
    parser.add_argument("--capacity", type=int, default=4, help="calls held before 486")
    parser.add_argument("--answer-delay", type=float, default=0.0)
    parser.add_argument("--record-dir", default="")
    parser.add_argument("--log-level", type=int, default=1)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
