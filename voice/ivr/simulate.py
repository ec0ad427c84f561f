"""``clinic-voice flow simulate FLOW``: run a flow in the terminal, without a phone.

What the tester types is :data:`HELP` (also ``--help``'s text). Usage errors (no such flow,
folder or file) exit 2 with one line on stderr, a flow that does not load exits 1 with its
findings, a call that ends or runs out of input exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import enum
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from sip_config.settings import SettingsError, flow_preview_from_env, flows_dir_from_env
from voice.ivr.engine import (
    MAX_MENU_RETURNS,
    NURSE_CLOSED,
    Action,
    CallState,
    Digit,
    Engine,
    Event,
    HangUp,
    HangupCall,
    Listen,
    NoInput,
    PathStep,
    Phase,
    Play,
    PostWebhook,
    PromptDone,
    PromptFailed,
    RecordAudio,
    RecordDone,
    SpeechResult,
    StopPlay,
    Store,
    TransferCall,
    TransferResult,
    WebhookResult,
)
from voice.ivr.flow import (
    Ask,
    Flow,
    FlowError,
    FlowParams,
    FlowSet,
    flows_folder_problem,
    grammar,
    load_flows,
)

DTMF = set("0123456789*#")

HELP = """\
Run a flow in the terminal, without a phone.

Type keys (1, or 12031985#: several keys in one line arrive as type-ahead while the next
prompt plays) or words (a speech result with confidence 1.0; "~0.3 yes" gives confidence
0.3; at a question that takes no speech, a keypad one, a digits entry, or any without
--speech, nothing listens for words on a call: the question times out, as ":silence").
":silence" is a listen timeout, ":hangup" hangs up, ":values" shows what was
collected. Webhooks show their values (with the call_id and caller a call adds, both
"simulated" here) and ask for a reply ("key=value ...", ":fail" or ":timeout"; ":hangup":
the caller hangs up while it runs, and the reply is asked for next), recordings, after the
beep, for what was recorded (Enter: a message, ":silence" or ":fail": not saved,
":hangup": the caller hangs up at the beep and leaves none; keys: a "#" ends the recording
there, nothing said, other keys do nothing; keys typed ahead arrive before the beep ends,
when "#" ends nothing). Transfers ring, and end as --transfer says: answered (ok, the default),
fails (as --transfer-fails), unconfirmed (no answer in time: the clinic will call back),
unanswered (a PBX took the caller and reached nobody), or ask (a line per transfer: Enter,
":fail", ":unconfirmed", ":unanswered", or ":hangup": the caller hangs up before the
transfer is taken on). Prompts and tones are printed as the caller would hear them; none
once the caller has hung up. --unheard NODE makes every prompt played at that node fail (the
caller hears none of it, as when the text to speech or the media path fails), to walk what
the engine does then: a question or last words said once more, a say skipped, an outcome
the line backed recorded as unheard.
The practice is open or closed by CLINIC_OPENING_HOURS now, or at --at, or as --open or
--closed say; --at is also the day a date of birth is checked against. The nurse line is
staffed or not by CLINIC_NURSE_HOURS at the same moment, or as --nurse-open or
--nurse-closed say.
"""


class TransferEnding(enum.StrEnum):
    """How a simulated transfer ends (``--transfer``), as the SIP side reports it."""

    OK = "ok"  # a human answered: the caller is put through
    FAILS = "fails"  # refused, busy, not taken on: the flow goes on
    UNCONFIRMED = "unconfirmed"  # taken on, no answer in time: a call back is promised
    UNANSWERED = "unanswered"  # a PBX took the caller and reached nobody: the call ends
    ASK = "ask"  # a line per transfer


# What each ending is for the engine, and the line that says it (what the caller then hears
# is the engine's own prompts): for the simulator and script_call alike. 180 s:
# TRANSFER_ANSWER_S in voice/ivr/session.py, not imported here (it brings asyncio and the
# media stack); a test holds them equal.
_TRANSFER_ENDINGS: dict[TransferEnding, tuple[TransferResult, str]] = {
    TransferEnding.OK: (TransferResult(ok=True), "   (transfer answered)"),
    TransferEnding.FAILS: (TransferResult(ok=False), "   (transfer failed)"),
    TransferEnding.UNCONFIRMED: (
        TransferResult(ok=True, unconfirmed=True),
        "   (transfer unconfirmed: no answer 180 s after the REFER)",
    ),
    TransferEnding.UNANSWERED: (
        TransferResult(ok=False, unanswered=True),
        "   (transfer unanswered: the PBX took the caller and reached nobody; the caller "
        "heard the PBX, not the bot)",
    ),
}
# The interactive line's replies (--transfer ask, and script_call's answers for it). None:
# the caller hangs up before the transfer is taken on (the session then sends the engine its
# HangUp alone, no TransferResult: hung_up_before_transfer).
_TRANSFER_REPLIES: dict[str, TransferEnding | None] = {
    "": TransferEnding.OK,
    ":fail": TransferEnding.FAILS,
    ":unconfirmed": TransferEnding.UNCONFIRMED,
    ":unanswered": TransferEnding.UNANSWERED,
    ":hangup": None,
}
# The actions the session does not carry out once the caller has hung up (_NEEDS_THE_CALLER
# in voice/ivr/session.py, and StopPlay: no prompt plays to cut short): nobody hears a
# prompt, nothing is listened for, transferred or recorded. The engine has them from a
# result that came before it was told of the hang-up.
_NEEDS_THE_CALLER = (Play, StopPlay, Listen, TransferCall, RecordAudio)


def transfer_events(ending: TransferEnding | None) -> list[Event]:
    """What the session tells the engine when a transfer ends so (None: the caller hung up
    before it was taken on)."""
    if ending is None:
        return [HangUp()]
    return [_TRANSFER_ENDINGS[ending][0]]


# The endings of a recording (recording_events), as script_call takes them: a message (""),
# none said, one not saved, a hang-up at the beep; and keys that hold a "#" (_ended_by_hash).
_RECORDING_REPLIES = frozenset({"", ":silence", ":fail", ":hangup"})
# What a real call adds to a webhook's values (voice/ivr/session.py), as the simulator shows.
# A simulated caller's number is nobody's assertion (voice/sip/caller_identity.py).
SIMULATED_CALL_VALUES: dict[str, str | bool] = {
    "call_id": "simulated",
    "caller": "simulated",
    "caller_verified": False,
}


def _keys(text: str) -> bool:
    """Whether ``text`` is keys only (some, and white space)."""
    return bool(text.strip()) and all(ch in DTMF or ch.isspace() for ch in text)


def _ended_by_hash(reply: str) -> bool:
    """Whether a recording reply is keys that end the recording (``#``, RECORD_TERMINATOR in
    voice/ivr/session.py)."""
    return _keys(reply) and "#" in reply


def recording_events(
    reply: str, *, ref: str = "simulated.wav", duration_s: float = 5
) -> list[Event]:
    """What the session tells the engine for a recording the tester describes by ``reply``
    (Enter: a message, ``:silence``, ``:fail`` or ``:hangup``; keys that hold a ``#``: the
    caller ends the recording there, having said nothing; anything else is a message, kept
    as ``ref``, ``duration_s`` long)."""
    if _ended_by_hash(reply):
        # voice/ivr/session.py: after the beep, "#" ends the recording and reaches nobody;
        # other keys reach the engine, which takes none while it records. Pressed at once,
        # the recording holds no speech: silent, as a call's would be.
        keys: list[Event] = [Digit(ch) for ch in reply if ch in DTMF and ch != "#"]
        return [*keys, RecordDone(silent=True)]
    if reply == ":silence":  # nothing said after the beep (or only noise)
        return [RecordDone(silent=True)]
    if reply == ":fail":  # spoken, but it could not be saved
        return [RecordDone(duration_s=duration_s)]
    if reply == ":hangup":
        # voice/ivr/session.py: the recording ends with the call, the audio is checked as any
        # message (none at the beep: silent, nothing saved), and the HangUp follows its
        # RecordDone: the record says so (a "silent" record step, the call's outcome).
        return [RecordDone(silent=True), HangUp()]
    return [RecordDone(ref=ref, duration_s=duration_s)]


def unheard_speech_timeout(engine: Engine, state: CallState) -> float | None:
    """The timeout a caller who speaks now meets, when the session does not listen for
    speech where the engine waits; None when it does (or the engine does not listen).

    voice/ivr/session.py arms a recogniser only for a Listen with speech and phrases: not at
    a keypad question, a digits entry, or in a flow whose language has no speech model. There
    the words are never heard: no event reaches the engine, and the listen timer runs out
    (NoInput: the noinput reprompt, then the question's on_fail or a human)."""
    if state.phase is not Phase.LISTENING:
        return None
    flow = engine.flowset.get(state.flow)
    ask = flow.nodes.get(state.node)
    if not isinstance(ask, Ask):
        return None
    if ask.digits is None and engine.speech_on(flow, ask) and grammar(ask, flow.language):
        return None
    if ask.digits is not None and state.digits:
        return ask.digits.inter_digit_s  # an entry under way: the inter-digit time
    return ask.timeout_s


def parse_line(line: str) -> list[Event]:
    """The events a typed line stands for."""
    text = line.strip()
    if text in {":silence", ""}:
        return [NoInput()]
    if text == ":hangup":
        return [HangUp()]
    if all(ch in DTMF or ch.isspace() for ch in text):
        return [Digit(ch) for ch in text if not ch.isspace()]
    confidence = 1.0
    if text.startswith("~"):
        head, _, rest = text[1:].partition(" ")
        try:
            confidence = float(head)
        except ValueError:
            confidence = 1.0
        else:
            text = rest
    return [SpeechResult(text, confidence)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The simulator's arguments: on its own parser and on ``clinic-voice flow simulate``'s,
    so that ``--help`` shows every one either way."""
    parser.add_argument(
        "flow",
        help="a flow id, a called user that routes.yaml names (6000, ko), or a flow file",
    )
    parser.add_argument(
        "--flows-dir",
        type=Path,
        default=None,
        help="folder of the flows and routes.yaml (default: a flow file's own folder, "
        "else CLINIC_FLOWS_DIR, as serve reads it: ivr_flows when unset)",
    )
    parser.add_argument(
        "--speech",
        action="store_true",
        help="prompts and listening as with a speech model, for flows in its language "
        "(CLINIC_VOSK_LANGUAGE, as serve reads it: en when unset); others run keypad-only",
    )
    parser.add_argument(
        "--emergency-number",
        default=None,
        help="the number the prompts tell an urgent caller to call (default: "
        "CLINIC_EMERGENCY_NUMBER, as serve reads it: 112 when unset)",
    )
    transfer = parser.add_mutually_exclusive_group()
    transfer.add_argument(
        "--transfer",
        choices=[e.value for e in TransferEnding],
        # None, not "ok": argparse takes a value equal to the default as not given, so
        # "--transfer-fails --transfer ok" would pass as one of them.
        default=None,
        help="how every transfer ends: answered (ok, the default), fails, unconfirmed (no "
        "answer in time: the clinic will call back), unanswered (a PBX took the caller and "
        "reached nobody), or ask: a line per transfer",
    )
    transfer.add_argument(
        "--transfer-fails",
        dest="transfer",
        action="store_const",
        const=TransferEnding.FAILS.value,
        help="every transfer fails, to walk the paths that follow one (--transfer fails)",
    )
    parser.add_argument(
        "--unheard",
        action="append",
        default=[],
        metavar="NODE",
        help="every prompt played at this node (NODE, or FLOW:NODE for one flow's) fails, "
        "unheard (repeatable): what the "
        "engine does when the text to speech or the media path fails there",
    )
    hours = parser.add_mutually_exclusive_group()
    hours.add_argument(
        "--at",
        type=_local_time,
        default=None,
        metavar="YYYY-MM-DDTHH:MM",
        help="call at this time, in CLINIC_TIMEZONE unless it names an offset: open or closed "
        "by CLINIC_OPENING_HOURS and CLINIC_CLOSED_DATES then (default: now)",
    )
    hours.add_argument(
        "--closed",
        dest="open_as",
        action="store_const",
        const=False,
        default=None,
        help="the practice is closed (as out of CLINIC_OPENING_HOURS)",
    )
    hours.add_argument(
        "--open",
        dest="open_as",
        action="store_const",
        const=True,
        help="the practice is open",
    )
    nurse = parser.add_mutually_exclusive_group()
    nurse.add_argument(
        "--nurse-closed",
        dest="nurse_open_as",
        action="store_const",
        const=False,
        default=None,
        help="the nurse line is not staffed (as out of CLINIC_NURSE_HOURS): a transfer to the "
        "nurse fails at once, unrung",
    )
    nurse.add_argument(
        "--nurse-open",
        dest="nurse_open_as",
        action="store_const",
        const=True,
        help="the nurse line is staffed",
    )


def _local_time(text: str) -> datetime.datetime:
    try:
        return datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time YYYY-MM-DDTHH:MM") from None


def main(
    argv: Sequence[str] | None = None,
    input_fn: Callable[[str], str] = input,
    output_fn: Callable[[str], None] = print,
) -> int:
    """Run the simulator; 0 when the call ended normally, 1 on a flow error, 2 on bad usage."""
    parser = argparse.ArgumentParser(
        prog="clinic-voice flow simulate",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:
        return int(exc.code or 0) and 2
    return run(args, input_fn, output_fn)


class _UsageError(Exception):
    """What was asked for is not there: exit 2, one line on stderr, no traceback."""


def run(
    args: argparse.Namespace,
    input_fn: Callable[[str], str] = input,
    output_fn: Callable[[str], None] = print,
) -> int:
    """Run the simulator with parsed :func:`add_arguments` (exit codes as :func:`main`)."""
    try:
        flowset, flow = _load(args.flow, args.flows_dir)
    except _UsageError as exc:
        print(f"clinic-voice flow simulate: {exc}", file=sys.stderr)
        return 2
    except FlowError as exc:
        output_fn(str(exc))
        return 1
    try:
        # The staff and nurse addresses, the emergency number, the clinic's name and what a
        # transfer tells its target, as serve has them: before, the simulator showed its own
        # (112 where the clinic has set another number).
        preview = flow_preview_from_env()
    except SettingsError as exc:
        print(f"clinic-voice flow simulate: configuration error: {exc}", file=sys.stderr)
        return 2
    hours = preview.hours
    at: datetime.datetime | None = args.at
    if at is not None and at.tzinfo is None:
        at = at.replace(tzinfo=hours.zone)
    open_as: bool | None = args.open_as
    if open_as is not None:
        is_open = open_as
    elif at is not None:
        is_open = hours.is_open(at)
    else:
        is_open = hours.is_open(time.time())
    nurse_open_as: bool | None = args.nurse_open_as
    if nurse_open_as is not None:
        nurse_open = nurse_open_as
    else:
        nurse_open = preview.nurse_hours.is_open(at if at is not None else time.time())
    # --at is the call's moment for the dates too: a date of birth is checked against that
    # day (not in the future), as a call then would check it.
    day = at.astimezone(hours.zone).date() if at is not None else None
    params = FlowParams(
        today=(lambda: day) if day is not None else datetime.date.today,
        open_now=lambda: is_open,
        nurse_open=lambda: nurse_open,
        opening_hours=hours,
        out_of_hours_number=preview.out_of_hours_number,
        staff_uri=preview.staff_uri,
        nurse_uri=preview.nurse_uri,
        emergency_number=args.emergency_number or preview.emergency_number,
        clinic_name=preview.clinic_name,
        transfer_summary=preview.transfer_summary,
        speech_enabled=args.speech,
        # As serve has it: the model hears its own language only (a Korean model hears
        # English answers as nothing), and flows in others run keypad-only.
        speech_language=preview.speech_language,
    )
    unheard = frozenset(args.unheard)
    unknown = sorted(n for n in unheard if not _names_a_node(flowset, n))
    if unknown:
        print(
            f"clinic-voice flow simulate: --unheard: no node {', '.join(map(repr, unknown))} "
            f"in the flows of {flow.path.parent}",
            file=sys.stderr,
        )
        return 2
    engine = Engine(flowset, params)
    transfer = TransferEnding(args.transfer or TransferEnding.OK)
    output_fn(f"-- {flow.id} ({flow.language}); keys, words, :silence, :hangup, :values")
    if not is_open:
        output_fn("-- the practice is closed (opening hours)")
    if not nurse_open and preview.nurse_uri != preview.staff_uri:
        # (A line the desk shares is rung at any hour, as on a call.)
        output_fn("-- the nurse line is not staffed (nurse hours): a nurse transfer fails, unrung")
    if args.speech and not params.speech_for(flow.language):
        output_fn(
            f"-- keypad only: the speech model is {preview.speech_language} "
            f"(CLINIC_VOSK_LANGUAGE), this flow {flow.language}"
        )
    state, actions = engine.start(flow)
    queue: deque[Event] = deque()
    # A wait the keys typed on the same line cut short (an entry's first digit starts its
    # inter-digit wait, and the rest of "01012000#" follows at once): shown only if the
    # question still waits once those keys are in, as a caller who paused there would.
    held: tuple[Listen, str, str] | None = None
    while True:
        for action in actions:
            if not _hung_up(queue):
                if isinstance(action, Listen) and queue and isinstance(queue[0], Digit):
                    held = (action, state.flow, state.node)
                    continue
                held = None
                queue.extend(_show(action, output_fn, input_fn, transfer))
            elif not isinstance(action, _NEEDS_THE_CALLER):
                # The caller has gone and the engine is told next: a webhook still runs (the
                # session holds the hang-up for its result), nothing else is carried out.
                queue.extendleft(reversed(_show(action, output_fn, input_fn, transfer)))
        if held is not None and not queue:
            listen, flow_id, node_id = held
            held = None
            if state.phase is Phase.LISTENING and (state.flow, state.node) == (flow_id, node_id):
                _show(listen, output_fn, input_fn, transfer)
        if state.phase is Phase.ENDED:
            output_fn("-- call ended")
            return 0
        event = _next_event(engine, state, queue, input_fn, output_fn, unheard=unheard)
        if event is None:
            return 0
        before = state
        state, actions = engine.handle(state, event)
        _show_menu_return(before, state, output_fn)
        _show_nurse_closed(before, state, output_fn)


def _hung_up(queue: deque[Event]) -> bool:
    """Whether the caller has hung up and the engine is still to be told."""
    return any(isinstance(event, HangUp) for event in queue)


def _load(name: str, flows_dir: Path | None) -> tuple[FlowSet, Flow]:
    """The flows and the one ``name`` picks; :class:`_UsageError` when either is not there."""
    target = Path(name)
    is_file = target.suffix == ".yaml"
    if is_file and not target.is_file():
        raise _UsageError(f"{name}: no such flow file")
    hint = ""
    if flows_dir is not None:
        folder, source = flows_dir, f"--flows-dir {str(flows_dir)!r}"
    elif is_file:
        folder, source = target.parent, f"{str(target.parent)!r} (the flow file's folder)"
    else:
        try:
            folder = flows_dir_from_env()
        except SettingsError as exc:
            raise _UsageError(f"configuration error: {exc}") from None
        # Named, with the folder it means here: run outside the repository, the default
        # (relative) folder is not the one meant.
        source = f"CLINIC_FLOWS_DIR={str(folder)!r} ({folder.absolute()})"
        hint = "; set CLINIC_FLOWS_DIR or give --flows-dir"
    problem = flows_folder_problem(folder)
    if problem:
        raise _UsageError(f"{source}: {problem}{hint}")
    flowset = load_flows(folder)
    if is_file:
        # By file, not by name: a flow's id is its ``id:``, which need not be the file's stem.
        for flow in flowset.flows.values():
            if flow.path.resolve() == target.resolve():
                return flowset, flow
        raise _UsageError(f"{name} is not a flow of {folder} ({_known(flowset)})")
    if name in flowset.flows:
        return flowset, flowset.flows[name]
    if name in flowset.routes:
        return flowset, flowset.route(name)
    # Not flowset.route(name): that answers anything unknown with the default flow, right for
    # a call to an unrouted number, wrong for a typo, which then ran main_menu and exited 0.
    raise _UsageError(f"no flow {name!r} ({_known(flowset)}; folder {folder})")


def _known(flowset: FlowSet) -> str:
    text = f"flows here: {', '.join(sorted(flowset.flows))}"
    if flowset.routes:
        text += f"; called users in routes.yaml: {', '.join(sorted(flowset.routes))}"
    return text


def _next_event(
    engine: Engine,
    state: CallState,
    queue: deque[Event],
    input_fn: Callable[[str], str],
    output_fn: Callable[[str], None],
    *,
    unheard: frozenset[str] = frozenset(),
) -> Event | None:
    # Typed events first (type-ahead), then the prompt's end, then ask the tester.
    if queue:
        return queue.popleft()
    if state.phase is Phase.PLAYING:
        if _unheard_here(state, unheard):
            output_fn("   (prompt failed: the caller heard none of it)")
        return _prompt_end(state, unheard)
    while True:
        try:
            line = input_fn("> ")
        except EOFError:
            output_fn("-- end of input")
            return None
        if line.strip() == ":values":
            output_fn(f"   values: {dict(state.values)}")
            if state.triage is not None:
                output_fn(f"   urgency: {state.triage.urgency.name} {list(state.triage.reasons)}")
            continue
        events = parse_line(line)
        queue.extend(events[1:])
        timeout_s = unheard_speech_timeout(engine, state)
        if isinstance(events[0], SpeechResult) and timeout_s is not None:
            # Not asked again in silence: the caller's words go unheard and the question
            # times out, as on a call (the noinput reprompt, or where its limit leads).
            output_fn(
                f"   (speech is not listened for here: the caller hears nothing until the "
                f"{timeout_s:g} s timeout)"
            )
            return NoInput()
        return events[0]


def _prompt_end(state: CallState, unheard: frozenset[str]) -> Event:
    """How the prompt under way ends: unheard at a node ``--unheard`` names."""
    return PromptFailed() if _unheard_here(state, unheard) else PromptDone()


def _unheard_here(state: CallState, unheard: frozenset[str]) -> bool:
    """Whether ``unheard`` names the node under way: as ``flow:node``, or as ``node`` in any
    flow (``bye`` is in several)."""
    return state.node in unheard or f"{state.flow}:{state.node}" in unheard


def _names_a_node(flowset: FlowSet, name: str) -> bool:
    """Whether ``name`` (``node`` or ``flow:node``) is a node of the flows."""
    flow_id, _, node_id = name.rpartition(":")
    if flow_id:
        return flow_id in flowset.flows and node_id in flowset.flows[flow_id].nodes
    return any(node_id in f.nodes for f in flowset.flows.values())


def _show_menu_return(
    before: CallState, after: CallState, output_fn: Callable[[str], None]
) -> None:
    """A line for a return to the main menu (``@menu``), or for the one the cap refused."""
    if after.menu_returns > before.menu_returns:
        output_fn(
            f"-- back to the main menu ({after.flow}), return {after.menu_returns} of "
            f"{MAX_MENU_RETURNS}"
        )
    elif any(p.input == "menu" for p in _new_steps(before, after)):
        output_fn(f"-- no more returns to the main menu ({MAX_MENU_RETURNS} made): a human")


def _show_nurse_closed(
    before: CallState, after: CallState, output_fn: Callable[[str], None]
) -> None:
    """A line for a transfer to the nurse that failed unrung (out of the nurse's hours): no
    ``transfer to`` or ``(ringing)`` shows it, and the failure's words follow at once."""
    if any(p.input == "transfer" and p.value == NURSE_CLOSED for p in _new_steps(before, after)):
        output_fn("   (the nurse line is not staffed: not rung, the transfer fails)")


def _new_steps(before: CallState, after: CallState) -> tuple[PathStep, ...]:
    """The path steps ``after`` took since ``before`` (counted, not by the path's length,
    which stops growing at the cap)."""
    added = min(after.steps - before.steps, len(after.path))
    return after.path[len(after.path) - added :] if added > 0 else ()


def _show(
    action: Action,
    output_fn: Callable[[str], None],
    input_fn: Callable[[str], str],
    transfer: TransferEnding,
) -> list[Event]:
    """Print ``action``; the events that answer it (asking the tester when one does)."""
    if isinstance(action, Play):
        output_fn(f"BOT: {action.text}" if action.audio is None else f"BOT: [audio {action.audio}]")
    elif isinstance(action, StopPlay):
        output_fn("   (prompt cut short)")
    elif isinstance(action, Listen):
        what = "keys" + (" or speech" if action.speech else "")
        output_fn(f"   (listening for {what}, {action.timeout_s:g} s)")
    elif isinstance(action, PostWebhook):
        # As voice/ivr/session.py posts them: the call's id and caller over the flow's own.
        posted = {**action.values, **SIMULATED_CALL_VALUES}
        output_fn(f"   webhook {action.url_key}: {posted}")
        return _ask_webhook(input_fn, output_fn)
    elif isinstance(action, TransferCall):
        output_fn(f"   transfer to {action.uri}")
        for name, value in action.headers:
            output_fn(f"   {name}: {value}")
        # voice/ivr/session.py plays a ring tone from the REFER until the transfer's answer.
        output_fn("   (ringing)")
        ending = _ask_transfer(input_fn, output_fn) if transfer is TransferEnding.ASK else transfer
        if ending is None:
            output_fn("   (the caller hung up before the transfer was taken on)")
        else:
            output_fn(_TRANSFER_ENDINGS[ending][1])
        return transfer_events(ending)
    elif isinstance(action, RecordAudio):
        # The session's beep (voice/ivr/session.py), and the recording after it.
        output_fn("   (beep)")
        output_fn(f"   (recording up to {action.max_s} s)")
        # Asked, as a webhook's reply is: a message that was always kept hid what a caller
        # hears when it is not (silence, a full disk), e.g. "please call again later" after
        # a failed transfer's message for a call back (--transfer-fails).
        while True:
            try:
                reply = input_fn(
                    "recording (Enter: a message, :silence, :fail, :hangup at the beep, "
                    "or keys: # ends it)> "
                ).strip()
            except EOFError:
                reply = ""
            if not _keys(reply) or _ended_by_hash(reply):
                break
            output_fn("   (keys do nothing during a recording, but # ends it)")
        if reply == ":hangup":
            output_fn("   (the caller hung up at the beep: no message)")
        elif _ended_by_hash(reply):
            output_fn("   (# ends the recording: nothing said before it, no message)")
        return recording_events(reply)
    elif isinstance(action, Store):
        rec = action.record
        output_fn(f"   outcome: {rec.outcome}")
        if rec.urgency is not None:
            action_name = rec.action.value if rec.action else "-"
            output_fn(f"   urgency: {rec.urgency.name}, action: {action_name}")
            output_fn(f"   reasons: {', '.join(rec.reasons) or '-'}")
        output_fn(f"   values: {dict(rec.values)}")
    elif isinstance(action, HangupCall):
        output_fn("   (hang up)")
    return []


def _ask_webhook(input_fn: Callable[[str], str], output_fn: Callable[[str], None]) -> list[Event]:
    """The tester's reply to one webhook; ``:hangup`` first: the caller hangs up while it
    runs. The session then waits for the request (an appointment still lands, and its
    result goes in the record) and tells the engine of the hang-up after it."""
    hung_up = False
    while True:
        try:
            reply = input_fn("webhook reply (key=value ..., :fail, :timeout or :hangup)> ")
        except EOFError:
            reply = ":fail"
        reply = reply.strip()
        if reply != ":hangup":
            break
        if not hung_up:
            output_fn("   (the caller hung up: the request still runs, its reply is recorded)")
        hung_up = True
    if reply == ":fail":
        result = WebhookResult(ok=False)
    elif reply == ":timeout":  # no answer in time: it may have arrived
        result = WebhookResult(ok=False, unknown=True)
    else:
        result = WebhookResult(
            ok=True, data=dict(p.split("=", 1) for p in reply.split() if "=" in p)
        )
    return [result, HangUp()] if hung_up else [result]


def _ask_transfer(
    input_fn: Callable[[str], str], output_fn: Callable[[str], None]
) -> TransferEnding | None:
    """The tester's ending for one transfer (``--transfer ask``; None: the caller hung up
    before it was taken on); answered at end of input, as transfers are by default."""
    while True:
        try:
            reply = input_fn(
                "transfer (Enter: answered, :fail, :unconfirmed, :unanswered or :hangup)> "
            )
        except EOFError:
            return TransferEnding.OK
        if reply.strip() in _TRANSFER_REPLIES:
            return _TRANSFER_REPLIES[reply.strip()]
        output_fn(f"   not a transfer ending: {reply.strip()!r}")


def script_call(
    engine: Engine,
    flow_id: str,
    answers: Sequence[str],
    *,
    webhook_ok: bool = True,
    webhook_data: dict[str, str] | None = None,
    transfer: TransferEnding = TransferEnding.OK,
    recordings: Sequence[str] = (),
    unheard: frozenset[str] = frozenset(),
) -> tuple[CallState, list[Action]]:
    """Drive a call with typed ``answers`` (as in the simulator); return the state and actions.

    Prompts finish at once, webhooks answer by the keyword arguments, and transfers end as
    ``transfer`` says, as with ``flow simulate --transfer``: with :attr:`TransferEnding.ASK`
    each transfer takes the next answer as its ending (``""``, ``:fail``, ``:unconfirmed``,
    ``:unanswered`` or ``:hangup``). The call's recordings end as ``recordings`` say, in
    turn, as the simulator's recording line does (``""``: a message, kept as ``test.wav``;
    ``:silence``, ``:fail``, ``:hangup`` at the beep, or keys holding a ``#``: nothing
    said); those past them keep a message. Prompts played at the nodes ``unheard`` names
    fail, as with ``flow simulate --unheard``.
    Words at a question that takes no speech go unheard: its timeout, as in the simulator.
    Once the caller has hung up, the actions that need the caller are not carried out (nor
    listed). Stops when the call ends or the answers run out while the engine listens (or a
    transfer waits for its answer).
    """
    endings = deque(recordings)
    for ending in endings:
        if ending not in _RECORDING_REPLIES and not _ended_by_hash(ending):
            raise ValueError(f"not a recording ending: {ending!r}")
    state, actions = engine.start(engine.flowset.get(flow_id))
    seen: list[Action] = list(actions)
    queue: deque[Event] = deque()
    lines = deque(answers)
    for _ in range(10_000):
        for action in actions:
            if isinstance(action, PostWebhook):
                result = WebhookResult(webhook_ok, webhook_data or {})
                # After a hang-up the request still runs, and the HangUp follows its result.
                if _hung_up(queue):
                    queue.appendleft(result)
                else:
                    queue.append(result)
            elif isinstance(action, TransferCall):
                if transfer is not TransferEnding.ASK:
                    queue.extend(transfer_events(transfer))
                elif lines:
                    reply = lines.popleft().strip()
                    if reply not in _TRANSFER_REPLIES:
                        raise ValueError(f"not a transfer ending: {reply!r}")
                    queue.extend(transfer_events(_TRANSFER_REPLIES[reply]))
            elif isinstance(action, RecordAudio):
                ending = endings.popleft() if endings else ""
                queue.extend(recording_events(ending, ref="test.wav", duration_s=3.0))
        if state.phase is Phase.ENDED:
            break
        if queue:
            event: Event = queue.popleft()
        elif state.phase is Phase.PLAYING:
            event = _prompt_end(state, unheard)
        elif lines:
            events = parse_line(lines.popleft())
            event = events[0]
            queue.extend(events[1:])
            not_listened = unheard_speech_timeout(engine, state) is not None
            if isinstance(event, SpeechResult) and not_listened:
                event = NoInput()  # words nothing listens for: the question's timeout
        else:
            break
        state, actions = engine.handle(state, event)
        if _hung_up(queue):
            actions = [a for a in actions if not isinstance(a, _NEEDS_THE_CALLER)]
        seen += actions
    return state, seen


if __name__ == "__main__":
    raise SystemExit(main())
