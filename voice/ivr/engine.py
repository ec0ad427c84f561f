"""The flow engine: a pure state machine from call events to call actions.

No I/O: the session (``voice/ivr/session.py``) owns SIP, audio, speech recognition, timers and
HTTP, feeds :class:`Event` s in and carries :class:`Action` s out::

    engine = Engine(flowset, params)
    state, actions = engine.start(flowset.route(called_user))
    while state.phase is not Phase.ENDED:
        state, actions = engine.handle(state, next_event())

VoiceXML semantics kept here:

* every prompt is a :class:`Play`; the session answers with :class:`PromptDone` when it has
  finished (not after a :class:`StopPlay`: the engine has already gone on), or with
  :class:`PromptFailed` when none of it was heard (text to speech or the media failed). An
  ask's :class:`Listen` comes after its prompt;
* a question whose prompt failed was not heard: it stays unheard (keys then follow the
  type-ahead rules below) and its prompt is played once more; failed again, the question is
  given up as one the caller cannot answer (its ``on_fail`` or the flow's human, at U2 at
  least on an urgent question, path step :data:`PROMPT_FAILED`); after
  :data:`MAX_UNHEARD_ASKS` such questions, the flow's human, never the ``on_fail``. Last
  words (a goodbye, a triage's advice, the closed notice, "call 112") are said once more
  too; unheard again, the call ends (a closed notice as :data:`OUT_OF_HOURS_UNHEARD_OUTCOME`,
  never "told"; a goodbye whose outcome says so as its ``outcome_unheard``), but for a
  triage's advice: the nurse takes the call, and should the nurse not answer, the advice
  comes before the message offer or the goodbye. Any prompt to a
  caller at U2 or more on the way to a human (the emergency advice, "connecting you"), and
  a triage's advice said before "connecting you" after a 0 with no question left, at any
  urgency, are said once more too; unheard again, the transfer goes ahead. Words that go
  on unheard so are the triage's reason ``unheard: <node>``, as is a triage's advice the
  call ends (or is put through) without having said again. A say that backs an outcome
  (``outcome_unheard``: the results' status) is said once more too; unheard again, the
  call goes on, and ends with its ``outcome_unheard`` wherever it would have ended with
  the outcome it backs. What to record (a record's prompt, or the say just before a record
  with none) is said once more too; unheard again, the caller goes to the flow's human, as
  for a question given up unheard, never to a beep nobody explained. Any other prompt that
  failed (a say, "connecting you" below U2) is skipped;
  during a ``barge_in`` prompt the session may deliver :class:`Digit` or :class:`SpeechResult`
  at once, the engine then answers :class:`StopPlay` and goes on;
* a webhook reply's fields become values ``<save>.<name>`` only when a flow reads them
  (:func:`voice.ivr.flow.read_values`) and they are at most :data:`MAX_REPLY_VALUE_CHARS`
  long;
* keys pressed while a prompt plays are kept (type-ahead) and consumed by the next ask, whose
  prompt is then skipped; keys pressed while a webhook runs are dropped when it answers (they
  were typed before the caller heard the question after it);
* each ask counts its noinputs and nomatches and tapers its reprompts; low confidence is a
  nomatch; when a counter runs out the caller goes to the ask's ``on_fail`` or a human;
* a choice that goes to ``@menu`` takes the caller back to the main menu (the routes'
  default flow, at its start): a jump, like any ``@flow`` target, with everything the call
  has reached kept (a triage's urgency too: the safety rules below hold to the end of the
  call); it saves no value. After :data:`MAX_MENU_RETURNS` returns the next one reaches the
  flow's human instead, so a call going round cannot grow its record without bound;
* a call's path keeps at most :data:`MAX_PATH_STEPS` steps, for a flow that routes a choice
  back to an earlier question and a caller (or a stuck key) going round it: past that, a
  :data:`PATH_CUT` step counts the steps cut between the call's first steps and its latest;
  the triage, the values and the outcome are not in the path and are never cut;
* anywhere, ``*`` repeats the prompt and ``0`` reaches a human (staff, or the nurse in the
  triage). Staff only while the desk is open (``FlowParams.open_now``, the opening hours):
  out of hours a ``0`` at a question hears the closed notice (hours, out-of-hours number,
  emergency number) and the question again, or the question its ``on_closed`` names (one
  that offers no desk) (:data:`MAX_CLOSED_ASKS` times a call; the next
  ``0`` hears the notice and the call ends); a question with ``on_closed`` that would be
  asked again out of hours (a reprompt, a ``*``, its failed prompt played again) goes the
  same way (notice, then the ``on_closed`` question; in the same count), and any other way
  to staff (a question given up, a message not kept, a ``transfer: staff`` step) ends the
  call after the notice (``out_of_hours``). Never for a caller at U2 or more, whom the
  safety rules put through, open or closed. The nurse has hours of its own
  (``FlowParams.nurse_open``, CLINIC_NURSE_HOURS), asked when a transfer to the nurse would
  be placed (its prompt said): out of them the nurse is not rung, and the transfer fails at
  once (path step ``transfer``: ``nurse_closed``), handled by the rules below as any failed
  transfer, not after a ring-out of an unstaffed line (a step's ``on_fail`` not taken when
  her transfer failed earlier in the call; a line CLINIC_STAFF_URI shares always rung);
* safety: a triage's urgency never goes down (checked on every step), any unclear answer to a
  danger-sign question raises the call to U2 at least, and an outcome less urgent than the
  call's urgency is replaced by a transfer to a nurse. On an urgent question (a danger sign,
  or any question with an answer that makes the call U2 or more, read off its effects) only a
  plain "no" is a no (words around it, or "no idea", make it unclear), and asking for a
  human or giving it up unanswered raises the call to U2. Only its "yes" answers an urgent
  question before it was heard (keys typed earlier are
  dropped, and keys pressed while it plays but for its "yes" and ``0``: a double press must
  not say "no" to the next question; talking over it is deliberate and still heard). An
  urgent caller (U2 or more)
  whose transfer fails is put through to the other human, and is never told to call again
  later;
* a caller below U2 whose transfer fails (and whose flow names no ``on_fail`` for it) may
  leave a message for a call back instead of being told to call again later
  (``message_left``); not during a stop, and not twice in one call. Out of opening hours
  the closed notice (the out-of-hours GP service) comes first, there and before the
  goodbye of a transfer failed or unconfirmed: the call back waits until the practice opens;
* a caller who hangs up before a transfer went through is recorded so
  (``hung_up_before_transfer``), not as transferred; a transfer the caller's side took on
  but never answered for is ``transfer_unconfirmed`` (someone calls back); one a PBX took
  the caller for and reached nobody with is ``transfer_unanswered``: the call ends at once,
  since the caller is no longer on its line (someone calls back);
* when the service stops (:class:`LineClosing`), the caller is told so, with the emergency
  number, and the call ends (``cut_shutdown``): at once while a prompt plays or the engine
  listens, or once a webhook, a transfer or a message under way has its result. A prompt
  that ends the call anyway, or puts the caller through to a human, is left to finish. A
  caller at U2 or more is put through to the nurse instead (never "call again later").

Events that do not fit the current phase (a late :class:`PromptDone`, a :class:`NoInput`
while a prompt plays) are stale races between threads and are ignored.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote

from voice.ivr.flow import (
    CLOSED_WORDS,
    HOURS,
    HUMAN_PHRASES,
    MENU_TARGET,
    MESSAGE_VALUE,
    PARAM_NAMES,
    REPEAT_PHRASES,
    UNSURE_PHRASES,
    Ask,
    Assess,
    Branch,
    Choice,
    Effect,
    EntryRefusal,
    Flow,
    FlowParams,
    FlowSet,
    Goto,
    Hangup,
    Human,
    Node,
    Record,
    Say,
    SetValues,
    Transfer,
    Webhook,
    grammar,
    node_outcome,
    placeholders,
    read_values,
    render,
)
from voice.ivr.triage import (
    TriageAction,
    TriageState,
    Urgency,
    action_allows,
    ensure_not_lowered,
)

log = logging.getLogger(__name__)

# A flow that runs this many nodes without waiting for the caller loops; flow check finds it,
# this keeps a broken flow from hanging the session.
MAX_STEPS = 200
# A caller sent back to the main menu (``@menu``) more than this often in one call reaches
# the flow's human instead: three wrong turns is someone the menu does not serve, and a call
# going round menu -> sub-flow -> menu would otherwise grow its path, its record and its
# live record on disk without bound (a path step for every node it passes).
MAX_MENU_RETURNS = 3
# Out of hours a 0 (or "operator") at a question hears the closed notice and the question
# again, this often in one call; the next one hears the notice and the call ends
# (``out_of_hours``). A caller who asked three times has heard the hours and the numbers to
# call three times; a stuck key, a fax tone or a PBX's DTMF loop would otherwise replay the
# notice for the whole call (MAX_CALL_S), holding a call slot and adding two path steps a
# press to the call's record and live record.
MAX_CLOSED_ASKS = 3
# Why a question with ``on_closed`` meets the closed desk without a 0: it was to be asked
# again (a noinput or nomatch reprompt, a ``*``, its prompt again after it failed) while the
# desk is closed, and it offers staff. The notice and its ``on_closed`` question instead,
# counted with the 0s above (two questions naming each other would otherwise swap in silence
# for the whole call).
ASKED_AGAIN = "asked again"
# A call's path keeps at most this many steps. A flow may route a choice back to an earlier
# question ("press 1 to hear this again", a confirmation whose "no" goes back to the entry):
# flow check accepts such a loop, since it waits for the caller each lap, but a caller going
# round (or a key stuck) would add steps for the whole call (MAX_CALL_S) to its record and
# its live record, each rewritten whole at every step. The longest path through the shipped
# flows is 96 steps (the main menu then the triage, every question taken to its noinput and
# nomatch limits), about 230 with the 3 returns to the menu and 3 closed-desk 0s on top; a
# real call takes 20 to 40. Past the cap the first PATH_HEAD steps stay, a PATH_CUT step
# counts those cut after them, and the latest steps follow (how the call ended): the record
# says it was cut and stays bounded (34 kB for a keypad loop, ~84 bytes a step, measured in
# tests/unit/test_ivr_path_cap.py; a transcript makes a step longer). Urgency, reasons,
# values and the outcome are not path steps: the cut never touches them.
MAX_PATH_STEPS = 400
PATH_HEAD = MAX_PATH_STEPS // 2
PATH_CUT = "steps_cut"  # a PathStep's input: its value is how many steps were cut there
# A webhook reply's field becomes a value only when a flow reads it (a text's placeholder, a
# branch, a webhook's values) and it is at most this long: a sentence to speak (the
# appointments' "message" is one). A reply of a megabyte of fields would otherwise grow the
# call's values, its record, its live record and a full transfer summary (a SIP header).
MAX_REPLY_VALUE_CHARS = 500
# The path step of a prompt the caller did not hear (PromptFailed), and the reason the triage
# notes when a question is given up for it.
PROMPT_FAILED = "prompt_failed"
# Questions given up unheard (their prompt failed twice) that take their ``on_fail`` in one
# call; the next goes to the flow's human. Prompts that keep failing are a broken text to
# speech or media path, and an on_fail that leads back to a question (flow check accepts it:
# each lap waits for the caller) would go round in silence, a failure needing no caller,
# until MAX_CALL_S.
MAX_UNHEARD_ASKS = 1
# The triage's reason for words the caller never heard (failed twice, the call went on): words
# to an urgent caller (the emergency advice before the nurse, "call 112" as last words), or a
# triage's advice ("see a doctor today, call the out-of-hours service now") said again
# before a message or the goodbye. The node names them: "unheard: emergency".
UNHEARD_REASON = "unheard: {}"
SUMMARY_HEADER = "X-Clinic-Summary"
URGENCY_HEADER = "X-Clinic-Urgency"


class EngineError(Exception):
    """The flow cannot go on (a loop or a missing node); the call ends with ``status``."""

    status = 500


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Digit:
    """A DTMF key (``0``-``9``, ``*``, ``#``)."""

    key: str


@dataclass(frozen=True, slots=True)
class SpeechResult:
    """What the recogniser heard, with its confidence 0..1 and how many words it heard
    outside the ask's phrases (said around the answer: "no, he is not breathing")."""

    text: str
    confidence: float
    unknown_words: int = 0


@dataclass(frozen=True, slots=True)
class NoInput:
    """The listen timeout passed with nothing (or, in a digits ask, nothing more) heard."""


@dataclass(frozen=True, slots=True)
class PromptDone:
    """The last :class:`Play` finished or was stopped."""


@dataclass(frozen=True, slots=True)
class PromptFailed:
    """The last :class:`Play` could not be played: text to speech failed, or the worker could
    not open or send its file (``PlayDone.failed``). The caller heard none of it."""


@dataclass(frozen=True, slots=True)
class WebhookResult:
    """The webhook answered (``ok``, with the reply's fields) or failed or timed out.

    ``unknown``: no answer within its time (not ``ok``). The request may well have arrived
    and been acted on (a booking made), so the record says ``timeout``, not ``failed``.
    """

    ok: bool
    data: Mapping[str, str] = field(default_factory=dict)
    unknown: bool = False


@dataclass(frozen=True, slots=True)
class TransferResult:
    """The transfer went through (``ok``) or failed. ``unconfirmed``: the caller's side took
    it on but gave no answer in time (the target may still ring); the call ends, and its
    record asks for a call back. ``unanswered`` (not ``ok``): a PBX took the caller from
    the call and then reached nobody (voice/sip/refer.py); the call ends at once, since
    nothing can reach the caller through it any more, and its record asks for a call back."""

    ok: bool
    unconfirmed: bool = False
    unanswered: bool = False


@dataclass(frozen=True, slots=True)
class RecordDone:
    """A recording ended; ``ref`` names it for the call record (a file name, not audio).

    No ``ref``: nothing was kept, because the caller said nothing (``silent``: asked once
    more, then a human) or because it could not be saved (a human takes the request);
    ``refused`` names why no message was recorded at all (the voicemail's budget:
    voice/ivr/voicemail_budget.py), taken as one that could not be saved, and the record's
    path says it in place of ``not_saved``.
    """

    ref: str = ""
    duration_s: float = 0.0
    silent: bool = False
    refused: str = ""

    @property
    def why_not_kept(self) -> str:
        """The record's path step for a message not kept."""
        return "silent" if self.silent else self.refused or "not_saved"


@dataclass(frozen=True, slots=True)
class HangUp:
    """The call ended: the caller hung up, or ``cut`` says why the service ended it
    (``"worker_lost"``, ``"shutdown"``, ``"held_too_long"``: voice/ivr/hold_limit.py), so the
    record does not blame the caller."""

    cut: str = ""


@dataclass(frozen=True, slots=True)
class LineClosing:
    """The service is stopping and the call cannot go on: tell the caller, then end it."""


Event = (
    Digit
    | SpeechResult
    | NoInput
    | PromptDone
    | PromptFailed
    | WebhookResult
    | TransferResult
    | RecordDone
    | HangUp
    | LineClosing
)


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Play:
    """Speak ``text`` (or play ``audio``); ``barge_in``: input may cut it short.

    ``private``: the text holds what this call collected or was told (a booking, a name):
    it is rendered for this play only, never into the prompt cache on disk."""

    text: str
    audio: str | None = None
    barge_in: bool = True
    language: str = "en"
    private: bool = False


@dataclass(frozen=True, slots=True)
class StopPlay:
    """Stop the prompt now (barge-in); the engine has moved on: no :class:`PromptDone` for it."""


@dataclass(frozen=True, slots=True)
class Listen:
    """Collect input: keys and (when ``speech``) one of ``phrases`` within ``timeout_s``."""

    phrases: tuple[str, ...]
    keys: tuple[str, ...]
    timeout_s: float
    speech: bool
    max_digits: int = 1
    terminator: str = ""
    language: str = "en"


@dataclass(frozen=True, slots=True)
class TransferCall:
    """Blind transfer (REFER) to ``uri`` with the call summary in ``headers``."""

    uri: str
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class RecordAudio:
    """Record the caller for at most ``max_s`` seconds; answer :class:`RecordDone`."""

    max_s: int


@dataclass(frozen=True, slots=True)
class PostWebhook:
    """POST ``values`` to the URL configured for ``url_key``; answer :class:`WebhookResult`."""

    url_key: str
    values: Mapping[str, str]
    timeout_s: float


@dataclass(frozen=True, slots=True)
class HangupCall:
    """End the call."""


@dataclass(frozen=True, slots=True)
class PathStep:
    """One node the call went through and the input that left it."""

    flow: str
    node: str
    input: str = ""  # "digit", "speech", "noinput", "nomatch", "webhook", "record", ...
    value: str = ""
    confidence: float | None = None


@dataclass(frozen=True, slots=True)
class CallRecord:
    """The result of a call, for the call store. Holds health data: never log it."""

    flow: str
    path: tuple[PathStep, ...]
    values: tuple[tuple[str, str], ...]
    urgency: Urgency | None
    reasons: tuple[str, ...]
    action: TriageAction | None
    transfer_target: str | None
    outcome: str


@dataclass(frozen=True, slots=True)
class Store:
    """Keep ``record`` (emitted once, when the call ends)."""

    record: CallRecord


# The names the task brief proposes; ``Transfer``/``Record``/``Hangup`` are also node kinds.
Action = Play | StopPlay | Listen | TransferCall | RecordAudio | PostWebhook | HangupCall | Store


# --------------------------------------------------------------------------- state


class Phase(enum.StrEnum):
    """What the call is waiting for."""

    PLAYING = "playing"  # a prompt: PromptDone
    LISTENING = "listening"  # input: Digit, SpeechResult, NoInput
    WEBHOOK = "webhook"
    TRANSFERRING = "transferring"
    RECORDING = "recording"
    ENDED = "ended"


class Pending(enum.StrEnum):
    """What happens when the current prompt is done."""

    NEXT = "next"  # a say node: go on
    LISTEN = "listen"  # an ask: listen
    TRANSFER = "transfer"
    RECORD = "record"
    MESSAGE = "message"  # a message for a call back, after a transfer failed
    HANGUP = "hangup"


class Close(enum.StrEnum):
    """Where the call is in the service's stop (:class:`LineClosing`)."""

    OPEN = "open"  # no stop
    ASKED = "asked"  # the caller is told at the next prompt or question
    TOLD = "told"  # the closing notice plays; the call ends after it


CLOSED_OUTCOME = "cut_shutdown"
# The record a call has on disk while it runs: what stays of it when serve dies mid-call.
LOST_OUTCOME = "cut_service_lost"
MESSAGE_OUTCOME = "message_left"
UNCONFIRMED_OUTCOME = "transfer_unconfirmed"
UNANSWERED_OUTCOME = "transfer_unanswered"
# The desk was closed: the caller was told so, with the out-of-hours and emergency numbers.
OUT_OF_HOURS_OUTCOME = "out_of_hours"
# Why a question was given up by its counters (Engine._count): out of hours, the notice
# and a message offer, not a hang-up.
GIVEN_UP = frozenset({"noinput limit", "nomatch limit"})
# The desk was closed and the caller heard none of the closed notice (it failed twice): nobody
# told them the numbers to call, so someone should call them back.
OUT_OF_HOURS_UNHEARD_OUTCOME = "out_of_hours_unheard"
MESSAGE_MAX_S = 60
# A transfer step's value when the nurse was not rung: out of CLINIC_NURSE_HOURS.
NURSE_CLOSED = "nurse_closed"


@dataclass(frozen=True, slots=True)
class CallState:
    """Everything the engine knows about one call; a new value on every step."""

    flow: str
    node: str
    phase: Phase = Phase.PLAYING
    pending: Pending = Pending.NEXT
    barge_in: bool = True
    values: tuple[tuple[str, str], ...] = ()
    typeahead: str = ""
    digits: str = ""
    noinput: int = 0
    nomatch: int = 0
    triage: TriageState | None = None
    path: tuple[PathStep, ...] = ()
    transfer_uri: str | None = None
    transfer_on_fail: str | None = None
    transfer_target: str | None = None
    transfers_failed: tuple[str, ...] = ()  # URIs a transfer of this call failed to reach
    outcome: str = ""
    achieved: str = ""  # a webhook step's outcome once its request arrived (kept by a stop)
    triage_action: TriageAction | None = None
    close: Close = Close.OPEN
    menu_returns: int = 0  # times sent back to the main menu (``@menu``)
    closed_asks: int = 0  # questions asked again after a 0 while the desk was closed
    steps: int = 0  # path steps taken, those the cap (MAX_PATH_STEPS) cut included
    recorded: bool = False  # a message recorded, or tried: kept past the path's cut
    # The question's prompt (or the last words) under way, its text before rendering: played
    # again should it fail; and whether the one under way is that second try.
    asked: str = ""
    prompt_retried: bool = False
    unheard_asks: int = 0  # questions given up because their prompt failed twice
    # A triage's advice (its last words) that failed twice, the nurse then tried: said again
    # before a message is taken, or the goodbye, should that transfer fail; "" once heard.
    unheard_advice: str = ""
    # Says whose words back an outcome (``outcome_unheard``) that failed twice: (the outcome
    # they back, the one the call ends with instead).
    unheard_outcomes: tuple[tuple[str, str], ...] = ()

    def value(self, name: str) -> str | None:
        """A collected value, or ``None``."""
        return dict(self.values).get(name)

    def with_value(self, name: str, value: str) -> CallState:
        """This state with ``name`` set to ``value``."""
        values = dict(self.values)
        values[name] = value
        return replace(self, values=tuple(values.items()))


Result = tuple[CallState, list[Action]]


def _triage_told(state: CallState) -> TriageState | None:
    """The call's triage as a record or a transfer summary tells it: with a triage's advice
    that failed twice and has not been said again yet (the nurse tried for it) noted as
    ``unheard: <node>``. The call may end before it is said again (the nurse's transfer
    taken, a PBX that reached nobody, a hang-up, the service gone): whoever takes or calls
    back the call must know the caller never heard it."""
    tri = state.triage
    if tri is not None and state.unheard_advice:
        tri = tri.note(UNHEARD_REASON.format(state.node))
    return tri


def record_of(state: CallState, outcome: str) -> CallRecord:
    """The record of a call at ``state`` that ends with ``outcome``: at its end, and while it
    runs, what stays of it should the service die now (``LOST_OUTCOME``)."""
    tri = _triage_told(state)
    return CallRecord(
        flow=state.flow,
        path=state.path,
        values=state.values,
        urgency=tri.urgency if tri else None,
        reasons=tri.reasons if tri else (),
        action=state.triage_action or (tri.action if tri else None),
        transfer_target=state.transfer_target,
        outcome=outcome,
    )


def add_step(path: tuple[PathStep, ...], step: PathStep) -> tuple[PathStep, ...]:
    """``path`` with ``step`` at its end, at most :data:`MAX_PATH_STEPS` long: once full, the
    oldest step after the first :data:`PATH_HEAD` is cut, and a :data:`PATH_CUT` step in its
    place counts the steps cut so far (where the cut began, and the latest steps, stay)."""
    if len(path) < MAX_PATH_STEPS:
        return (*path, step)
    mark = path[PATH_HEAD]
    if mark.input == PATH_CUT:
        cut = replace(mark, value=str(int(mark.value) + 1))
        return (*path[:PATH_HEAD], cut, *path[PATH_HEAD + 2 :], step)
    # The first cut: the marker takes the place of the first step cut, and one more goes.
    cut = PathStep(mark.flow, mark.node, PATH_CUT, "2")
    return (*path[:PATH_HEAD], cut, *path[PATH_HEAD + 2 :], step)


def normalise(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces (keeps Hangul and other letters)."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def phrase_in(phrase: str, heard: str) -> bool:
    """Whether the words of ``phrase`` occur in order, as whole words, in ``heard``."""
    want, got = normalise(phrase).split(), normalise(heard).split()
    return bool(want) and any(got[i : i + len(want)] == want for i in range(len(got)))


def _urgent(state: CallState) -> bool:
    """Whether the triage has made the call urgent (U2 or more): the safety rules' line."""
    return state.triage is not None and state.triage.urgency <= Urgency.U2


def _advice(state: CallState, node: Node | None) -> bool:
    """Whether the prompt under way is a triage's advice, the last words of a triage's
    goodbye (its outcome is a triage action), before any transfer was tried."""
    return (
        state.pending is Pending.HANGUP
        and isinstance(node, Hangup)
        and state.triage_action is not None
        and state.transfer_uri is None
    )


def _advice_to_human(state: CallState, node: Node | None) -> bool:
    """Whether the prompt under way carries a triage's advice before "connecting you": a 0
    pressed with no question left (while a say played, or a lookup ran) reached the advice's
    goodbye, which is said first (:meth:`Engine._terminal`). Unheard, whoever takes the call
    must know the caller never heard it, below U2 as at U2 or more."""
    return (
        state.pending is Pending.TRANSFER
        and isinstance(node, Hangup)
        and bool(node.prompt)
        and state.triage_action is not None
        and not state.unheard_advice
    )


def _backs_outcome(state: CallState, node: Node | None) -> bool:
    """Whether the prompt under way is a say whose words back an outcome (its
    ``outcome_unheard``: the results' status line)."""
    return state.pending is Pending.NEXT and isinstance(node, Say) and bool(node.outcome_unheard)


def _heard(state: CallState, node: Node | None) -> CallState:
    """``state`` once the prompt under way was heard in full: a say that backs an outcome,
    unheard on an earlier pass (the caller asked for it again), backs it again."""
    if _backs_outcome(state, node) and isinstance(node, Say) and state.unheard_outcomes:
        kept = tuple(p for p in state.unheard_outcomes if p[0] != node.backs_outcome)
        return replace(state, unheard_outcomes=kept)
    return state


def _safety_words(state: CallState, node: Node | None) -> bool:
    """Whether the prompt under way must be said once more should it fail: last words (the
    caller leaves with them), any prompt to an urgent caller on the way to a human (a say, or
    the transfer's own prompt: "this may be an emergency, hang up and call 112 now"), a
    triage's advice said before a human the caller asked for, a say whose words back an
    outcome, and a message offer that carries a triage's advice the caller has not heard or
    the closed notice."""
    if state.pending is Pending.HANGUP:
        return True
    if state.pending is Pending.MESSAGE:
        # The closed notice before the offer (the out-of-hours service, the emergency
        # number) is what the caller leaves with, as it is before a goodbye.
        return bool(state.unheard_advice) or _tells_closed(state)
    if _advice_to_human(state, node) or _backs_outcome(state, node):
        return True
    return _urgent(state) and (
        state.pending is Pending.TRANSFER
        or (state.pending is Pending.NEXT and isinstance(node, Say))
    )


def _tells_closed(state: CallState) -> bool:
    """Whether the prompt under way says the closed notice (``{closed_notice}``)."""
    return bool(placeholders(state.asked) & CLOSED_WORDS)


def _tellable(state: CallState) -> bool:
    """Whether the closing notice can be played now: the engine listens, or plays a prompt
    that neither ends the call nor puts the caller through to a human (both are left to
    finish: the caller is told goodbye, or reaches someone, either way)."""
    if state.phase is Phase.LISTENING:
        return True
    if not state.barge_in and (_urgent(state) or state.achieved):
        # A prompt nobody may talk over, to an urgent caller (the emergency advice) or after
        # a request arrived (its confirmation): cut mid-sentence, "call 112 now" or the
        # appointment's time would be lost. The notice waits for its end.
        return False
    return state.phase is Phase.PLAYING and state.pending not in {
        Pending.HANGUP,
        Pending.TRANSFER,
    }


def _recorded_before(state: CallState) -> bool:
    """Whether the call has recorded, or tried to record, a message already."""
    return state.recorded


def _escalates(choice: Choice) -> bool:
    """Whether taking ``choice`` makes the call more urgent (a danger sign's "yes")."""
    return choice.effect is not None and choice.effect.urgency is not None


def _makes_urgent(choice: Choice) -> bool:
    """Whether taking ``choice`` makes the call U2 or more (a nurse now)."""
    return (
        choice.effect is not None
        and choice.effect.urgency is not None
        and choice.effect.urgency <= Urgency.U2
    )


def urgent_question(ask: Ask) -> bool:
    """Whether an answer to ``ask`` can make the call U2 or more: a danger sign, or a
    question such as "short of breath at rest?". Read off the flow's effects, not its
    node names: whoever writes a flow gets the rules without naming anything."""
    return ask.danger_sign or any(_makes_urgent(c) for c in ask.choices)


def _safe_answer(ask: Ask, choice: Choice) -> bool:
    """Whether ``choice`` is the answer to ``ask`` that errs the safe way (its "yes"): the
    one that raises a danger sign's urgency, or makes an urgent question's call U2 or more.
    Said with other words, it still counts; any other answer must be said plainly."""
    return _escalates(choice) if ask.danger_sign else _makes_urgent(choice)


def _takes_hash(node: Node | None) -> bool:
    """Whether ``node`` is a question with a choice on the # key."""
    return isinstance(node, Ask) and any(c.key == "#" for c in node.choices)


def _plainly(choice: Choice, ev: SpeechResult) -> bool:
    """Whether ``ev`` is one of ``choice``'s phrases and nothing else."""
    heard = normalise(ev.text)
    return ev.unknown_words == 0 and any(normalise(p) == heard for p in choice.phrases)


# --------------------------------------------------------------------------- the engine


class Engine:
    """Runs flows of a :class:`FlowSet`; holds no per-call state (that is :class:`CallState`)."""

    def __init__(self, flowset: FlowSet, params: FlowParams) -> None:
        self.flowset = flowset
        self.params = params
        # The values a flow can use: a webhook reply's other fields are not kept.
        self.read_values = read_values(flowset)

    # -- public

    def start(self, flow: Flow) -> Result:
        """A new call in ``flow``: the state and the first actions."""
        state = CallState(flow=flow.id, node=flow.start)
        return self._enter(state, flow, flow.start, [])

    def handle(self, state: CallState, event: Event) -> Result:
        """Apply ``event`` to ``state``: the new state and the actions to carry out."""
        if state.phase is Phase.ENDED:
            return state, []
        if isinstance(event, HangUp):
            outcome = state.outcome or "caller_hung_up"
            transferring = state.phase is Phase.TRANSFERRING or state.pending is Pending.TRANSFER
            if transferring:
                # Before the REFER went through (or during "connecting you"): nobody took
                # the call, which an urgent caller's record must show.
                outcome = "hung_up_before_transfer"
            if event.cut and (transferring or not state.outcome):
                # Cut mid-call by the service: someone should call this patient back.
                outcome = f"cut_{event.cut}"
            return self._end(state, outcome, [], hangup=False)
        if isinstance(event, LineClosing):
            if state.close is not Close.OPEN:
                return state, []
            state = replace(state, close=Close.ASKED)
            return self._close(state, []) if _tellable(state) else (state, [])
        new, actions = self._dispatch(state, event)
        ensure_not_lowered(state.triage, new.triage)
        if new.close is Close.ASKED and _tellable(new):
            new, actions = self._close(new, actions)
        if new.phase is not state.phase or new.node != state.node:
            # Node ids name answers (e.g. "fever_ill"): only the flow and the phase are logged.
            log.debug("ivr %s: %s -> %s", new.flow, state.phase, new.phase)
        return new, actions

    # -- events by phase

    def _dispatch(self, state: CallState, event: Event) -> Result:
        flow = self.flowset.get(state.flow)
        node = flow.nodes.get(state.node)
        if isinstance(event, PromptDone):
            return (
                self._prompt_done(_heard(state, node), flow, node)
                if state.phase is Phase.PLAYING
                else (
                    state,
                    [],
                )
            )
        if isinstance(event, PromptFailed):
            if state.phase is Phase.PLAYING:
                return self._prompt_failed(state, flow, node)
            return state, []
        if isinstance(event, Digit):
            return self._digit(state, flow, node, event.key)
        if isinstance(event, SpeechResult):
            return self._speech(state, flow, node, event)
        if isinstance(event, NoInput):
            if state.phase is Phase.LISTENING and isinstance(node, Ask):
                return self._noinput(state, flow, node)
            return state, []
        if isinstance(event, WebhookResult):
            if state.phase is Phase.WEBHOOK and isinstance(node, Webhook):
                return self._webhook_done(state, flow, node, event)
            return state, []
        if isinstance(event, TransferResult):
            if state.phase is Phase.TRANSFERRING:
                if event.unanswered:
                    return self._transfer_unanswered(state)
                if event.unconfirmed:
                    return self._unconfirmed(state, flow)
                return self._transfer_done(state, flow, event.ok)
            return state, []
        if isinstance(event, RecordDone):
            if state.phase is Phase.RECORDING and state.pending is Pending.MESSAGE:
                return self._message_done(state, flow, event)
            if state.phase is Phase.RECORDING and isinstance(node, Record):
                return self._recorded(state, flow, node, event)
            return state, []
        return state, []

    def _recorded(self, state: CallState, flow: Flow, node: Record, ev: RecordDone) -> Result:
        if ev.ref:
            state = state.with_value(node.save, ev.ref)
            state = self._step(state, "record", f"{ev.duration_s:.0f}s")
            return self._enter(state, flow, node.next, [])
        # Nothing kept: never "your request has been recorded" for a message nobody can hear.
        state = self._step(state, "record", ev.why_not_kept)
        if ev.silent and state.noinput == 0:
            state = replace(
                state, noinput=1, phase=Phase.PLAYING, pending=Pending.RECORD, barge_in=False
            )
            text = f"{flow.texts('record_silent')} {node.prompt}".strip()
            state = replace(state, asked=text, prompt_retried=False)
            return state, [self._play(state, flow, text, barge_in=False)]
        why, said = ("no message", "record_silent") if ev.silent else ("not saved", "record_failed")
        return self._to_human(state, flow, why, [], before=flow.texts(said))

    def _prompt_failed(self, state: CallState, flow: Flow, node: Node | None) -> Result:
        """The prompt under way was not heard at all. A question stays unheard: no key
        typed before or during it answers it but as type-ahead may (an urgent question's
        "yes" or 0 only), and it is asked once more; failed again, it is given up as one the
        caller cannot answer (a question nobody hears cannot be answered by silence either).
        Safety words (:func:`_safety_words`: last words, an urgent caller's "call 112 now")
        are said once more too (:meth:`_unheard` once failed again). Any other prompt is
        skipped: what follows it still reaches the caller."""
        state = self._step(state, PROMPT_FAILED)
        if self._record_words(state, flow, node):
            # What to record (a record's prompt, or the say just before one with none):
            # unheard twice, the caller would hear only the beep, and a message nobody knew
            # to leave (the medicines? a name?), or a hang-up at a beep nobody explained. As
            # for a question given up unheard: the flow's human (out of hours with staff,
            # the closed notice), never a recording blind.
            if not state.prompt_retried:
                state = replace(state, prompt_retried=True)
                return state, [self._replay(state, flow, node)]
            return self._to_human(state, flow, PROMPT_FAILED, [])
        if _safety_words(state, node):
            if not state.prompt_retried:
                state = replace(state, prompt_retried=True)
                return state, [self._replay(state, flow, node)]
            return self._unheard(state, flow, node)
        if state.pending is not Pending.LISTEN or not isinstance(node, Ask):
            return self._prompt_done(state, flow, node)
        if not state.prompt_retried:
            if self._closed_counterpart(state, flow, node):
                # Closing time passed while it failed: asked again, as after a reprompt or a
                # *, it is the notice and its on_closed question (its second try), not the
                # open menu's "press 0 ... staff" once more.
                new, actions = self._closed_desk(state, flow, ASKED_AGAIN, [], before="")
                if new.pending is Pending.LISTEN:
                    new = replace(new, prompt_retried=True)
                return new, actions
            text = state.asked or flow.ask_prompt(node, self.speech_on(flow, node))
            new, actions = self._prompt(state, flow, node, text, [])
            return replace(new, prompt_retried=True), actions
        # Keys typed while it failed answer nothing after it; a 0 among them asks for what
        # this does anyway, or (on_fail) for a human at the next question.
        state = replace(
            state,
            typeahead="0" if "0" in state.typeahead else "",
            unheard_asks=state.unheard_asks + 1,
        )
        state = self._unanswered(state, node)
        if node.on_fail is None or state.unheard_asks > MAX_UNHEARD_ASKS:
            return self._to_human(state, flow, PROMPT_FAILED, [])
        return self._enter(state, flow, node.on_fail, [])

    def _record_words(self, state: CallState, flow: Flow, node: Node | None) -> bool:
        """Whether the prompt under way tells the caller what to record: a record's own
        prompt, or a say whose next step is a record with none (it beeps at once)."""
        if state.pending is Pending.RECORD and isinstance(node, Record):
            return bool(state.asked.strip())
        if state.pending is not Pending.NEXT or not isinstance(node, Say):
            return False
        try:
            other, node_id = self.flowset.resolve(flow, node.next)
        except KeyError:
            return False
        after = other.nodes.get(node_id)
        return isinstance(after, Record) and not after.prompt.strip()

    def _unheard(self, state: CallState, flow: Flow, node: Node | None) -> Result:
        """Safety words that failed twice. Last words are what the caller leaves with: a
        triage's advice ("see a doctor today, call the out-of-hours service now") goes to
        the nurse, rather than the call ending in silence with the advice on record as
        given; should the nurse not answer, the advice is said again before the message (or
        the goodbye). Anything else goes on as if heard (the transfer, the recording, the
        call's end), with the truth on record: an urgent caller's or a triage's words
        unheard are the triage's reason ``unheard: <node>``, and a closed notice unheard
        is not ``out_of_hours`` ("the caller was told") but :data:`OUT_OF_HOURS_UNHEARD_OUTCOME`,
        nor is a goodbye's outcome that says the caller was told something: the flow names
        what the call is instead (``outcome_unheard``), as a say does for the outcome its
        words back (kept in ``unheard_outcomes`` until the call ends)."""
        if _advice(state, node):
            state = replace(state, unheard_advice=state.asked)
            return self._to_human(state, flow, PROMPT_FAILED, [], text="safety_escalation")
        said_advice = _advice_to_human(state, node)
        if state.triage is not None and (_urgent(state) or state.unheard_advice or said_advice):
            reason = UNHEARD_REASON.format(state.node)
            state = replace(state, triage=state.triage.note(reason), unheard_advice="")
        if said_advice and isinstance(node, Hangup):
            # Said again before the message offer or the goodbye, should the transfer fail,
            # as the advice the nurse was tried for is (_advice).
            state = replace(state, unheard_advice=node.prompt)
        if (
            state.pending in {Pending.HANGUP, Pending.MESSAGE}
            and state.outcome == OUT_OF_HOURS_OUTCOME
        ):
            # The notice unheard (before a goodbye, or before the message offer out of
            # hours): nobody told the caller the numbers to call.
            state = replace(state, outcome=OUT_OF_HOURS_UNHEARD_OUTCOME)
        elif (
            state.pending is Pending.HANGUP
            and isinstance(node, Hangup)
            and node.outcome_unheard
            and state.outcome == node.outcome
        ):
            # A goodbye whose outcome says the caller was told something (the results'
            # status): the flow names what the call is when its words were never heard.
            state = replace(state, outcome=node.outcome_unheard)
        elif _backs_outcome(state, node) and isinstance(node, Say):
            # A line an outcome claims was said (the results' status): the call goes on, and
            # should it end with that outcome, it ends with the line's outcome_unheard.
            backed = (node.backs_outcome, node.outcome_unheard)
            state = replace(state, unheard_outcomes=(*state.unheard_outcomes, backed))
        return self._prompt_done(state, flow, node)

    def _replay(self, state: CallState, flow: Flow, node: Node | None) -> Play:
        """The prompt under way, once more (a say's recording, if it has one)."""
        if state.pending is Pending.NEXT and isinstance(node, Say):
            return self._say(state, flow, node)
        return self._play(state, flow, state.asked, barge_in=state.barge_in)

    def _prompt_done(self, state: CallState, flow: Flow, node: Node | None) -> Result:
        if state.unheard_advice and state.pending in {Pending.MESSAGE, Pending.HANGUP}:
            state = replace(state, unheard_advice="")  # heard, with the offer or goodbye
        if state.pending is Pending.LISTEN and isinstance(node, Ask):
            return self._listen(state, flow, node, [])
        if state.pending is Pending.NEXT and isinstance(node, Say):
            return self._enter(state, flow, node.next, [])
        if state.pending is Pending.TRANSFER and state.transfer_uri is not None:
            return self._refer(state, flow, [])
        if state.pending is Pending.RECORD and isinstance(node, Record):
            return replace(state, phase=Phase.RECORDING), [RecordAudio(node.max_s)]
        if state.pending is Pending.MESSAGE:
            return replace(state, phase=Phase.RECORDING), [RecordAudio(MESSAGE_MAX_S)]
        if state.pending is Pending.HANGUP:
            return self._end(state, state.outcome or "completed", [], hangup=True)
        return state, []

    def _digit(self, state: CallState, flow: Flow, node: Node | None, key: str) -> Result:
        if state.phase is Phase.LISTENING and isinstance(node, Ask):
            return self._key(state, flow, node, key)
        if state.phase is Phase.PLAYING and state.pending in {Pending.NEXT, Pending.LISTEN}:
            if key == "#" and not state.typeahead and not _takes_hash(node):
                # A hash ends an entry. With none under way (pressed after an entry that
                # ended by itself, or out of habit) it answers nothing: the prompt plays on,
                # or its question would be cut to silence.
                return state, []
            if state.pending is Pending.LISTEN and isinstance(node, Ask) and urgent_question(node):
                if key == "0":
                    new, actions = self._asked_for_human(
                        self._step(state, "digit", "0"), flow, node
                    )
                    return new, [StopPlay(), *actions]
                if not any(c.key == key and _safe_answer(node, c) for c in node.choices):
                    # Only a "yes" counts before the question was heard in full: a double
                    # press must not say "no" to it, and an early "yes" errs the safe way.
                    # As for a danger sign, so for any question whose answer can make the
                    # call U2 or more.
                    return state, []
            state = replace(state, typeahead=state.typeahead + key)
            if state.barge_in:
                new, actions = self._prompt_done(state, flow, node)
                return new, [StopPlay(), *actions]
            return state, []
        if state.phase is Phase.WEBHOOK:
            return replace(state, typeahead=state.typeahead + key), []
        return state, []

    def _speech(self, state: CallState, flow: Flow, node: Node | None, ev: SpeechResult) -> Result:
        if not isinstance(node, Ask):
            return state, []
        if state.phase is Phase.LISTENING:
            return self._heard(state, flow, node, ev)
        if state.phase is Phase.PLAYING and state.pending is Pending.LISTEN and state.barge_in:
            if node.digits is not None or not self.speech_on(flow, node):
                # Words this question does not take (a keypad entry's prompt: the result of
                # the question before, queued behind the key that answered it) answer
                # nothing and must not cut its prompt: no Listen would follow, and the
                # caller would wait in silence for no one.
                return state, []
            new, actions = self._heard(replace(state, phase=Phase.LISTENING), flow, node, ev)
            return new, [StopPlay(), *actions]
        return state, []

    # -- running nodes until one waits

    def _enter(self, state: CallState, flow: Flow, target: str, actions: list[Action]) -> Result:
        for _ in range(MAX_STEPS):
            if target == MENU_TARGET:
                if state.menu_returns >= MAX_MENU_RETURNS:
                    # Round and round: a person, not the menu once more (and the call's
                    # path, record and live record stop growing with it).
                    state = self._step(state, "menu", "limit")
                    return self._to_human(state, flow, "menu returns limit", actions)
                state = replace(state, menu_returns=state.menu_returns + 1)
            flow, node_id = self._resolve(flow, target)
            node = flow.nodes.get(node_id)
            if node is None:
                raise EngineError(f"{flow.id}: no node {node_id!r}")
            state = replace(
                state,
                flow=flow.id,
                node=node_id,
                noinput=0,
                nomatch=0,
                digits="",
                pending=Pending.NEXT,
            )
            if isinstance(node, SetValues):
                for name, text in node.values:
                    state = state.with_value(name, self._render(state, text, spoken=False))
                state = self._step(state)
                target = node.next
            elif isinstance(node, Assess):
                state = self._step(self._apply(state, node.effect))
                target = node.next
            elif isinstance(node, Goto):
                state = self._step(state)
                target = node.target
            elif isinstance(node, Branch):
                chosen = self._branch(state, node)
                state = self._step(state, "branch", chosen or "")
                if chosen is None:
                    raise EngineError(f"{flow.id}:{node.id}: no case and no default")
                target = chosen
            else:
                return self._wait_at(state, flow, node, actions)
        raise EngineError(f"{flow.id}: more than {MAX_STEPS} steps without waiting")

    def _wait_at(self, state: CallState, flow: Flow, node: Node, actions: list[Action]) -> Result:
        if isinstance(node, Say):
            state = replace(
                state,
                phase=Phase.PLAYING,
                pending=Pending.NEXT,
                barge_in=node.barge_in,
                asked=node.text,
                prompt_retried=False,
            )
            state = self._step(state)
            return state, [*actions, self._say(state, flow, node)]
        if isinstance(node, Ask):
            state = self._step(state)
            return self._ask(state, flow, node, actions)
        if isinstance(node, Webhook):
            values = {name: state.value(name) or "" for name in node.values}
            values.update({k: self._render(state, v, spoken=False) for k, v in node.extra})
            if state.triage is not None:
                values.setdefault("urgency", state.triage.urgency.name)
            state = self._step(replace(state, phase=Phase.WEBHOOK))
            return state, [*actions, PostWebhook(node.url, values, node.timeout_s)]
        if isinstance(node, Record):
            state = replace(
                state,
                phase=Phase.PLAYING,
                pending=Pending.RECORD,
                barge_in=False,
                asked=node.prompt,
                prompt_retried=False,
            )
            state = self._step(state)
            if not node.prompt:
                return replace(state, phase=Phase.RECORDING), [*actions, RecordAudio(node.max_s)]
            return state, [*actions, self._play(state, flow, node.prompt, barge_in=False)]
        if isinstance(node, Transfer | Hangup):
            return self._terminal(state, flow, node, actions)
        raise EngineError(f"{flow.id}:{state.node}: cannot run {type(node).__name__}")

    def _terminal(
        self, state: CallState, flow: Flow, node: Transfer | Hangup, actions: list[Action]
    ) -> Result:
        state = self._step(state)
        action = node_outcome(node)
        if action is not None and state.triage is None:
            state = replace(state, triage=TriageState())  # a triage that raised nothing: U5
        tri = state.triage
        unsafe = tri is not None and (
            (action is not None and not action_allows(action, tri.urgency))
            # A goodbye that is no triage action ends a call the triage graded (a same-day
            # caller told "thank you, goodbye", nothing booked): below its urgency too.
            or (isinstance(node, Hangup) and action is None and tri.urgency < Urgency.U5)
        )
        if unsafe:
            # The safety rule in code: never end a call below the urgency it has reached.
            log.error("ivr %s:%s: outcome below the call's urgency, escalating", flow.id, node.id)
            return self._to_human(
                state, flow, "outcome below urgency", actions, text="safety_escalation"
            )
        if isinstance(node, Hangup) and "0" in state.typeahead and self._desk_closed(state, flow):
            # A 0 with no question left, and nobody at the desk: the notice, then the goodbye
            # (as it is, when it tells the notice itself: once is enough).
            text = node.prompt
            if "closed_notice" not in placeholders(text):
                text = f"{{closed_notice}} {text}".strip()
            state = replace(
                self._step(state, "closed"),
                typeahead="",
                outcome=node.outcome,
                triage_action=action,
            )
            return self._last_words(state, flow, text, actions)
        if isinstance(node, Hangup) and "0" in state.typeahead:
            # A 0 pressed while the bot talked or waited on a lookup, with no question left
            # to take it: a human, before the call would end without one. A triage's last
            # words are its advice ("see a doctor today; if it gets worse, call 112"): said
            # first, and kept in the record; a goodbye is not.
            state = replace(self._step(state, "digit", "0"), typeahead="", triage_action=action)
            advice = node.prompt if action is not None else ""
            return self._to_human(state, flow, "caller asked", actions, before=advice)
        state = replace(state, outcome=node.outcome, triage_action=action)
        if isinstance(node, Hangup):
            if not node.prompt:
                return self._end(state, node.outcome, actions, hangup=True)
            return self._last_words(state, flow, node.prompt, actions)
        if node.to == Human.STAFF.value and self._desk_closed(state, flow, Human.STAFF):
            # Out of hours the desk would ring out: the notice instead, and the call ends (a
            # triage verdict stays its outcome; "transfer_staff" would claim a transfer).
            outcome = node.outcome if action is not None else state.achieved
            state = self._step(state, "closed")
            text = "{closed_notice}"
            return self._last_words(
                state, flow, text, actions, outcome=outcome or OUT_OF_HOURS_OUTCOME
            )
        uri = self.params.human_uri(node.to)
        state = replace(
            state,
            phase=Phase.PLAYING,
            pending=Pending.TRANSFER,
            barge_in=False,
            transfer_uri=uri,
            transfer_on_fail=node.on_fail,
            asked=node.prompt,
            prompt_retried=False,
        )
        if not node.prompt:
            return self._refer(state, flow, actions)
        return state, [*actions, self._play(state, flow, node.prompt, barge_in=False)]

    # -- asks

    def _ask(self, state: CallState, flow: Flow, ask: Ask, actions: list[Action]) -> Result:
        if state.typeahead and urgent_question(ask):
            # Keys pressed before this question was asked (a double press, a "2" meant for
            # the last one) must not answer an urgent question the caller has not heard; a 0
            # among them still asks for a human.
            typed = state.typeahead
            state = replace(self._step(state, "typeahead_dropped", typed), typeahead="")
            if "0" in typed:
                return self._asked_for_human(self._step(state, "digit", "0"), flow, ask)
        if state.typeahead:
            # Type-ahead: keys pressed during earlier prompts answer this ask, no prompt.
            return self._listen(state, flow, ask, actions)
        return self._prompt(
            state, flow, ask, flow.ask_prompt(ask, self.speech_on(flow, ask)), actions
        )

    def _prompt(
        self, state: CallState, flow: Flow, ask: Ask, text: str, actions: list[Action]
    ) -> Result:
        state = replace(
            state,
            phase=Phase.PLAYING,
            pending=Pending.LISTEN,
            barge_in=ask.barge_in,
            asked=text,
            prompt_retried=False,
        )
        return state, [*actions, self._play(state, flow, text, barge_in=ask.barge_in)]

    def _consume_typeahead(
        self, state: CallState, flow: Flow, ask: Ask, actions: list[Action]
    ) -> Result:
        node_id, flow_id = state.node, state.flow
        while state.typeahead and state.node == node_id and state.flow == flow_id:
            if state.phase is not Phase.LISTENING:
                break
            key, rest = state.typeahead[0], state.typeahead[1:]
            state, more = self._key(replace(state, typeahead=rest), flow, ask, key)
            actions = [*actions, *more]
        return state, actions

    def _listen(self, state: CallState, flow: Flow, ask: Ask, actions: list[Action]) -> Result:
        state = replace(state, phase=Phase.LISTENING)
        if state.typeahead:
            where = state.flow, state.node
            state, actions = self._consume_typeahead(state, flow, ask, actions)
            if state.phase is not Phase.LISTENING or (state.flow, state.node) != where:
                return state, actions
            actions = [a for a in actions if not isinstance(a, Listen)]  # one, below
            # Still at this question (part of an entry, a stray #): listen for the rest, with
            # its timeouts, or the caller would wait in silence for no one.
        speech = self.speech_on(flow, ask) and ask.digits is None
        lang = flow.language
        if ask.digits is not None:
            # An entry begun by keys typed ahead waits only the inter-digit time for more.
            wait_s = ask.digits.inter_digit_s if state.digits else ask.timeout_s
            listen = self._digits_listen(flow, ask, wait_s)
        else:
            phrases = grammar(ask, lang) if speech else ()
            keys = [c.key for c in ask.choices if c.key] + ["0", "*"]
            listen = Listen(phrases, tuple(keys), ask.timeout_s, speech, 1, "", lang)
        return state, [*actions, listen]

    @staticmethod
    def _digits_listen(flow: Flow, ask: Ask, timeout_s: float) -> Listen:
        assert ask.digits is not None
        return Listen(
            phrases=(),
            keys=tuple("0123456789*#"),
            timeout_s=timeout_s,
            speech=False,
            max_digits=ask.digits.max_digits,
            terminator=ask.digits.terminator,
            language=flow.language,
        )

    def _key(self, state: CallState, flow: Flow, ask: Ask, key: str) -> Result:
        if ask.digits is not None:
            return self._digit_entry(state, flow, ask, key)
        if key == "*":
            return self._repeat(state, flow, ask)
        if key == "0":
            return self._asked_for_human(self._step(state, "digit", "0"), flow, ask)
        chosen = self._keyed(state, flow, ask, key)
        if chosen is not None:
            return chosen
        if key == "#":
            return state, []  # a stray terminator from an earlier entry is no answer
        return self._nomatch(self._step(state, "nomatch", key), flow, ask, low_confidence=False)

    def _keyed(self, state: CallState, flow: Flow, ask: Ask, key: str) -> Result | None:
        """The choice of ``ask`` whose key is ``key``, taken; None when no choice has it."""
        for choice in ask.choices:
            if choice.key == key:
                return self._choose(
                    state,
                    flow=flow,
                    ask=ask,
                    choice=choice,
                    kind="digit",
                    heard=key,
                    confidence=None,
                )
        return None

    def _digit_entry(self, state: CallState, flow: Flow, ask: Ask, key: str) -> Result:
        spec = ask.digits
        assert spec is not None
        if key == "*":
            return self._repeat(replace(state, digits=""), flow, ask)
        if spec.terminator and key == spec.terminator:
            if not state.digits:
                # A hash typed after an entry that ended at max_digits: swallow it.
                return state, []
            return self._finish_digits(state, flow, ask)
        if key not in "0123456789":
            return self._nomatch(replace(state, digits=""), flow, ask, low_confidence=False)
        if len(state.digits) > spec.max_digits:
            return state, []  # over-long already: the rest is heard out, then refused
        first = not state.digits
        state = replace(state, digits=state.digits + key)
        if len(state.digits) == spec.max_digits and spec.ends_at_max:
            return self._finish_digits(state, flow, ask)
        if first:  # from now on the entry ends after inter_digit_s without a key
            return state, [self._digits_listen(flow, ask, spec.inter_digit_s)]
        return state, []

    def _finish_digits(self, state: CallState, flow: Flow, ask: Ask) -> Result:
        spec = ask.digits
        assert spec is not None
        entry = state.digits
        state = replace(state, digits="")
        if entry == "0":
            return self._to_human(self._step(state, "digit", "0"), flow, "caller asked", [])
        # One key as the whole entry: never a real one (min >= 2).
        chosen = self._keyed(state, flow, ask, entry)
        if chosen is not None:
            return chosen
        refused = spec.refusal(entry, self.params.today())
        if refused is not None:
            # Said why ("that entry was not complete. It needs 8 digits."), not "did not
            # understand": a slow typist cut off by the pause learns the digits were dropped.
            state = self._step(state, "nomatch", entry)
            return self._nomatch(state, flow, ask, low_confidence=False, refused=refused)
        if ask.save:
            state = state.with_value(ask.save, entry)
        state = self._step(state, "digits", entry)
        assert ask.next is not None
        return self._enter(state, flow, ask.next, [])

    def _heard(self, state: CallState, flow: Flow, ask: Ask, ev: SpeechResult) -> Result:
        if ask.digits is not None or not self.speech_on(flow, ask):
            return state, []
        lang = flow.language
        if ev.confidence < ask.min_confidence:
            state = self._step(state, "low_confidence", ev.text, ev.confidence)
            return self._nomatch(state, flow, ask, low_confidence=True)
        matches = [c for c in ask.choices if any(phrase_in(p, ev.text) for p in c.phrases)]
        urgent = urgent_question(ask)
        safe_yes = urgent and len(matches) == 1 and _safe_answer(ask, matches[0])
        if not safe_yes and any(phrase_in(p, ev.text) for p in UNSURE_PHRASES[lang]):
            # "No idea" holds "no"; but "yes, I don't know what to do" is a yes to a danger
            # sign (or an urgent question), which errs the safe way.
            state = self._step(state, "unsure", ev.text, ev.confidence)
            return self._nomatch(state, flow, ask, low_confidence=False)
        if len(matches) == 1:
            choice = matches[0]
            if urgent and not _safe_answer(ask, choice) and not _plainly(choice, ev):
                # "No, he is not breathing" or "no, he's gasping" holds "no": where an answer
                # can make the call urgent, that is unclear (a danger sign: U2 at once).
                state = self._step(state, "unclear", ev.text, ev.confidence)
                return self._nomatch(state, flow, ask, low_confidence=False)
            return self._choose(
                state,
                flow=flow,
                ask=ask,
                choice=choice,
                kind="speech",
                heard=ev.text,
                confidence=ev.confidence,
            )
        if not matches and any(phrase_in(p, ev.text) for p in HUMAN_PHRASES[lang]):
            state = self._step(state, "speech", ev.text, ev.confidence)
            return self._asked_for_human(state, flow, ask)
        if not matches and any(phrase_in(p, ev.text) for p in REPEAT_PHRASES[lang]):
            return self._repeat(state, flow, ask)
        state = self._step(state, "nomatch", ev.text, ev.confidence)
        return self._nomatch(state, flow, ask, low_confidence=False)

    def _asked_for_human(self, state: CallState, flow: Flow, ask: Ask) -> Result:
        """0 or "nurse": the flow's human. A danger sign or urgent question left unanswered
        makes the call U2: the nurse must not read an empty triage as "nothing urgent" (and
        "the person is unconscious" holds "person")."""
        return self._to_human(self._unanswered(state, ask), flow, "caller asked", [])

    @staticmethod
    def _unanswered(state: CallState, ask: Ask) -> CallState:
        """``state`` with ``ask`` given up unanswered: U2 at least if an answer could have
        made the call U2 or more, as for an unclear danger-sign answer. Not U1 even when the
        answer could have: the nurse it goes to decides that, not a guess from silence. The
        reason names the question, so the nurse sees which answer is missing."""
        if not urgent_question(ask):
            return state
        tri = state.triage or TriageState()
        return replace(state, triage=tri.raise_to(Urgency.U2, f"unanswered: {ask.id}"))

    def _choose(
        self,
        state: CallState,
        *,
        flow: Flow,
        ask: Ask,
        choice: Choice,
        kind: str,
        heard: str,
        confidence: float | None,
    ) -> Result:
        if ask.save and ask.digits is None and choice.goto != MENU_TARGET:
            # The way back to the menu answers nothing (no "9" as the appointment's action),
            # nor does an entry's choice (the entry's name holds entries only).
            state = state.with_value(ask.save, choice.value)
        state = self._step(state, kind, heard, confidence)
        if choice.effect is not None:
            state = self._apply(state, choice.effect)
        return self._enter(state, flow, choice.goto, [])

    def _repeat(self, state: CallState, flow: Flow, ask: Ask) -> Result:
        if self._closed_counterpart(state, flow, ask):
            return self._closed_desk(state, flow, ASKED_AGAIN, [], before="")
        return self._prompt(state, flow, ask, flow.ask_prompt(ask, self.speech_on(flow, ask)), [])

    def _closed_counterpart(self, state: CallState, flow: Flow, ask: Ask) -> bool:
        """Whether ``ask``, asked again now, would offer a desk that is closed: it names a
        question in ``on_closed`` (its closed-hours counterpart) and the desk is out of hours
        for this caller. The open menu read before closing time is then not read again."""
        instead = flow.nodes.get(ask.on_closed or "")
        return isinstance(instead, Ask) and instead is not ask and self._desk_closed(state, flow)

    def _noinput(self, state: CallState, flow: Flow, ask: Ask) -> Result:
        if ask.digits is not None and state.digits:
            # The inter-digit timeout ends an entry without a terminator.
            return self._finish_digits(state, flow, ask)
        state = self._step(state, "noinput")
        return self._count(replace(state, noinput=state.noinput + 1), flow, ask, "noinput")

    def _nomatch(
        self,
        state: CallState,
        flow: Flow,
        ask: Ask,
        low_confidence: bool,
        refused: EntryRefusal | None = None,
    ) -> Result:
        del low_confidence  # a low-confidence result is a nomatch (recorded in the path)
        state = replace(state, nomatch=state.nomatch + 1)
        return self._count(state, flow, ask, "nomatch", refused)

    def _count(
        self, state: CallState, flow: Flow, ask: Ask, kind: str, refused: EntryRefusal | None = None
    ) -> Result:
        count, limit = (
            (state.noinput, ask.max_noinput)
            if kind == "noinput"
            else (state.nomatch, ask.max_nomatch)
        )
        if ask.danger_sign:
            # Safety rule: an unclear answer to a danger sign is never read as "no".
            tri = state.triage or TriageState()
            state = replace(state, triage=tri.raise_to(Urgency.U2, f"unclear answer: {ask.id}"))
        if count >= limit:
            # An urgent question the caller could not answer ("short of breath at rest?"): the
            # call goes on at U2 at least, wherever it goes (a nurse, or the flow's on_fail),
            # never at the U5 of an empty triage. An unclear answer before that is asked
            # again without raising anything: a plain answer the next time stands.
            state = self._unanswered(state, ask)
            if ask.on_fail is None:
                return self._to_human(state, flow, f"{kind} limit", [])
            return self._enter(state, flow, ask.on_fail, [])
        if self._closed_counterpart(state, flow, ask):
            # Closing time passed while the caller listened: not "press 0 ... staff" again,
            # but the notice and the question that offers no desk, as after a 0. The
            # system's "did not hear" (not the question's own tapered words, which may
            # speak of the desk).
            state = replace(state, typeahead="")
            return self._closed_desk(state, flow, ASKED_AGAIN, [], before=flow.texts(kind))
        text = flow.reprompt(ask, kind, count, self.speech_on(flow, ask), refused)
        return self._prompt(replace(state, typeahead=""), flow, ask, text, [])

    # -- webhooks and transfers

    def _webhook_done(
        self, state: CallState, flow: Flow, node: Webhook, ev: WebhookResult
    ) -> Result:
        # Keys typed during the lookup (the rest of an over-long entry, a double press) were
        # typed before the caller heard what comes next: they must not answer it. A 0 still
        # asks for a human, as it does anywhere.
        state = replace(state, typeahead="0" if "0" in state.typeahead else "")
        read = {k: str(v) for k, v in ev.data.items() if f"{node.save}.{k}" in self.read_values}
        kept = {k: v for k, v in read.items() if len(v) <= MAX_REPLY_VALUE_CHARS}
        if len(kept) < len(read):
            # Counts only: a reply holds what the caller booked or was told.
            log.warning(
                "ivr %s: webhook reply: %d field(s) the flows read are over %d characters: "
                "left out",
                flow.id,
                len(read) - len(kept),
                MAX_REPLY_VALUE_CHARS,
            )
        if len(read) < len(ev.data):
            log.debug(
                "ivr %s: webhook reply: %d field(s) no flow reads: left out",
                flow.id,
                len(ev.data) - len(read),
            )
        for key, value in kept.items():
            state = state.with_value(f"{node.save}.{key}", value)
        state = self._step(
            state, "webhook", "ok" if ev.ok else "timeout" if ev.unknown else "failed"
        )
        if ev.ok and node.outcome:
            # What the call achieved once the request arrived (an appointment requested):
            # a caller hanging up during the confirmation does not undo it.
            state = replace(state, outcome=node.outcome, achieved=node.outcome)
        return self._enter(state, flow, node.next if ev.ok else node.on_fail, [])

    def _refer(self, state: CallState, flow: Flow, actions: list[Action]) -> Result:
        """Place the transfer to ``state.transfer_uri`` (its prompt, if any, said). The nurse
        out of CLINIC_NURSE_HOURS (``FlowParams.nurse_open``, asked now, at the instant the
        REFER would go out) is not rung: the transfer fails at once (path step ``transfer``
        :data:`NURSE_CLOSED`) and goes where a failed one goes, rather than after a ring-out
        of an unstaffed line (up to 180 s for an urgent caller told to stay on the line).
        A line the desk shares (CLINIC_STAFF_URI the same) is rung as before: the desk may
        answer it, and failed unrung it would count as the desk's too, whom an urgent caller
        would then never reach."""
        uri = state.transfer_uri
        assert uri is not None
        state = replace(state, phase=Phase.TRANSFERRING)
        params = self.params
        if uri == params.nurse_uri and uri != params.staff_uri and not params.nurse_open():
            new, more = self._transfer_done(state, flow, ok=False, why=NURSE_CLOSED)
            return new, [*actions, *more]
        return state, [*actions, TransferCall(uri, self._summary(state))]

    def _transfer_done(self, state: CallState, flow: Flow, ok: bool, why: str = "") -> Result:
        """The transfer went through, or failed (``why``: the path step's value, "failed"
        unless the target was not even rung). A nurse not rung who had failed this call
        before does not take the step's ``on_fail`` again, but the rules below: an
        ``on_fail`` that leads back to her transfer would go round at once, unrung (without
        a prompt, in a recursion that ends the call without a word)."""
        state = self._step(state, "transfer", "ok" if ok else why or "failed")
        if ok:
            state = replace(state, transfer_target=state.transfer_uri)
            return self._end(state, state.outcome or "transferred", [], hangup=True)
        if why == NURSE_CLOSED and state.transfer_uri in state.transfers_failed:
            state = replace(state, transfer_on_fail=None)
        if state.transfer_uri is not None:
            state = replace(state, transfers_failed=(*state.transfers_failed, state.transfer_uri))
        if state.transfer_on_fail is not None:
            target = state.transfer_on_fail
            state = replace(state, transfer_uri=None, transfer_on_fail=None)
            return self._enter(state, flow, target, [])
        urgent = _urgent(state)
        if urgent:
            # Often just told "this may be an emergency, stay on the line": never hang up on
            # such a caller while a human is left to try.
            left = [
                uri
                for uri in (self.params.nurse_uri, self.params.staff_uri)
                if uri and uri not in state.transfers_failed
            ]
            if left:
                state = replace(
                    state,
                    phase=Phase.PLAYING,
                    pending=Pending.TRANSFER,
                    barge_in=False,
                    transfer_uri=left[0],
                    transfer_on_fail=None,
                    asked=flow.texts("transfer_retry"),
                    prompt_retried=False,
                )
                # The record names who was reached: not the nurse when staff took it.
                human = Human.NURSE if left[0] == self.params.nurse_uri else Human.STAFF
                state = replace(state, outcome=f"transfer_{human.value}")
                return state, [self._play(state, flow, state.asked, barge_in=False)]
        # Out of hours the clinic's call back comes when it opens: the closed notice first
        # (the out-of-hours GP service), or "see a doctor today" would be lost overnight.
        before = f"{state.unheard_advice} {self._closed_words(state)}".strip()
        if not urgent and state.close is Close.OPEN and not _recorded_before(state):
            # Nobody to take the call: rather than "call again later", which loses what the
            # caller rang about, take a message for a call back (the record says who called).
            # A triage's advice the caller did not hear (the nurse was tried for it) first:
            # the clinic's call back may come too late for "see a doctor today".
            text = f"{before} {flow.texts('message_offer')}".strip()
            return self._offer_message(state, flow, text, outcome="transfer_failed")
        text = flow.texts("transfer_failed_urgent" if urgent else "transfer_failed")
        text = f"{before} {text}".strip()
        return self._last_words(state, flow, text, outcome="transfer_failed")

    def _closed_words(self, state: CallState) -> str:
        """``{closed_notice}`` when the practice is closed now, for a caller below U2 whose
        transfer failed: told "the clinic will call you back" or "call again later", a U3
        caller ("see a doctor today") would wait until it opens. The notice names the
        out-of-hours GP service only with CLINIC_OUT_OF_HOURS_NUMBER set (never an empty
        number). "" when open, for an urgent caller (the other human, then "call 112"), and
        after an unheard advice that tells the out-of-hours service itself."""
        if _urgent(state) or self.params.open_now():
            return ""
        if placeholders(state.unheard_advice) & CLOSED_WORDS:
            return ""
        return "{closed_notice}"

    def _unconfirmed(self, state: CallState, flow: Flow) -> Result:
        """A transfer the caller's side took on and never answered for: the call ends, with
        the emergency number (an urgent caller: only that), and a call back is promised."""
        state = self._step(state, "transfer", "unconfirmed")
        text = flow.texts("transfer_failed_urgent" if _urgent(state) else "transfer_unconfirmed")
        before = f"{state.unheard_advice} {self._closed_words(state)}".strip()
        text = f"{before} {text}".strip()
        return self._last_words(
            state, flow, text, transfer_target=state.transfer_uri, outcome=UNCONFIRMED_OUTCOME
        )

    def _transfer_unanswered(self, state: CallState) -> Result:
        """A PBX took the caller for the transfer and nobody took the call (its chain of
        humans reached nobody and it told the caller so, or the caller's channel ended
        before it sent anything). The caller is no longer on this call: nothing to say, no
        other human to try (the PBX tried them), so the call ends now. The outcome is not
        the flow's (a U1 caller's ``call_emergency+transfer_nurse``), which would tell the
        clinic a nurse took the call: nobody did, and nobody is named as the target."""
        state = self._step(state, "transfer", "unanswered")
        return self._end(state, UNANSWERED_OUTCOME, [], hangup=True)

    def _message_done(self, state: CallState, flow: Flow, ev: RecordDone) -> Result:
        """The message after a failed transfer: kept, the caller is thanked; none (silence,
        or it could not be saved), the caller is told to call again later."""
        if ev.ref:
            state = state.with_value(MESSAGE_VALUE, ev.ref)
            state = self._step(state, "record", f"{ev.duration_s:.0f}s")
            return self._last_words(
                state, flow, flow.texts("message_kept"), outcome=MESSAGE_OUTCOME
            )
        state = self._step(state, "record", ev.why_not_kept)
        if state.close is not Close.OPEN:
            # The stop ended the recording (during the beep, or before a word): not the
            # caller's silence. The closing notice, and a call back (cut_shutdown).
            return self._close(state, [])
        said = flow.texts("record_silent" if ev.silent else "record_failed")
        return self._last_words(state, flow, f"{said} {flow.texts('call_later')}")

    def _offer_message(
        self, state: CallState, flow: Flow, text: str, before: Sequence[Action] = (), **changes: Any
    ) -> Result:
        """Play ``text``, which ends with the message offer (after ``before``), nobody talking
        over it; the beep and the recording follow it. ``changes``: other fields of the state
        to set with it (the outcome, ...)."""
        state = replace(
            state,
            phase=Phase.PLAYING,
            pending=Pending.MESSAGE,
            barge_in=False,
            asked=text,
            prompt_retried=False,
            **changes,
        )
        return state, [*before, self._play(state, flow, text, barge_in=False)]

    def _last_words(
        self, state: CallState, flow: Flow, text: str, before: Sequence[Action] = (), **changes: Any
    ) -> Result:
        """Play ``text`` (after ``before``), nobody talking over it; the call ends after it.
        ``changes``: other fields of the state to set with it (the outcome, ...)."""
        state = replace(
            state,
            phase=Phase.PLAYING,
            pending=Pending.HANGUP,
            barge_in=False,
            asked=text,
            prompt_retried=False,
            **changes,
        )
        return state, [*before, self._play(state, flow, text, barge_in=False)]

    def _close(self, state: CallState, actions: list[Action]) -> Result:
        """The closing notice instead of the prompt or question in ``actions``; the call
        ends after it (``cut_shutdown``: someone should call this patient back). A caller at
        U2 or more is put through to the nurse instead."""
        flow = self.flowset.get(state.flow)
        kept = [a for a in actions if not isinstance(a, Play | StopPlay | Listen)]
        if _urgent(state):
            # The safety rules hold in a stop too: an urgent caller is never hung up on and
            # told to call again later, but put through to the nurse (a transfer to a person,
            # which the stop lets finish; a failed one goes on as any urgent transfer).
            state = replace(state, close=Close.TOLD)
            return self._to_human(
                state, flow, "line closing", [*kept, StopPlay()], text="closing_urgent"
            )
        # A triage's advice the caller has not heard (the message offer that carried it is
        # cut short by this notice): said first, as before a goodbye after a failed transfer.
        text = f"{state.unheard_advice} {flow.texts('closing')}".strip()
        return self._last_words(
            state,
            flow,
            text,
            [*kept, StopPlay()],
            close=Close.TOLD,
            # What the call achieved before the stop (a request that arrived) stays its
            # outcome; otherwise someone should call this patient back.
            outcome=state.achieved or CLOSED_OUTCOME,
        )

    def _to_human(
        self,
        state: CallState,
        flow: Flow,
        why: str,
        actions: list[Action],
        text: str = "",
        *,
        before: str = "",
    ) -> Result:
        """Put the caller through to the flow's human (0, failed asks, safety escalation).

        ``before``: said first (what went wrong), then the usual "connecting you".
        """
        human = flow.human
        if text in {"safety_escalation", "closing_urgent"}:
            human = Human.NURSE  # an urgent caller, or one about to be lowered: a clinician
        if self._desk_closed(state, flow, human):
            return self._closed_desk(state, flow, why, actions, before)
        uri = self.params.human_uri(human)
        if state.triage is not None:
            state = replace(state, triage=state.triage.note(why))
        state = replace(
            state,
            phase=Phase.PLAYING,
            pending=Pending.TRANSFER,
            barge_in=False,
            transfer_uri=uri,
            transfer_on_fail=None,
            outcome=f"transfer_{human.value}",
        )
        prompt = flow.texts(text) if text else flow.human_prompt()
        prompt = f"{before} {prompt}".strip()
        state = replace(state, asked=prompt, prompt_retried=False)
        return state, [*actions, self._play(state, flow, prompt, barge_in=False)]

    def _desk_closed(self, state: CallState, flow: Flow, human: Human | None = None) -> bool:
        """Whether ``human`` (default: the flow's) is staff and the desk is out of hours. Never
        for a caller at U2 or more: the safety rules put them through, open or closed."""
        human = flow.human if human is None else human
        return human is Human.STAFF and not _urgent(state) and not self.params.open_now()

    def _closed_desk(
        self, state: CallState, flow: Flow, why: str, actions: list[Action], before: str
    ) -> Result:
        """Staff asked for, or due, while the desk is closed: the closed notice. After a 0 (or
        "operator") at a question, the question again (the menus that work unattended stay
        open to the caller), or the question its ``on_closed`` names (one that offers no
        desk), at most :data:`MAX_CLOSED_ASKS` times a call; otherwise the call ends after
        it. A question with ``on_closed`` asked again (:data:`ASKED_AGAIN`: a reprompt, a
        ``*``, its failed prompt played again) goes the same way, in the same count."""
        node = flow.nodes.get(state.node)
        if why in {"caller asked", ASKED_AGAIN} and isinstance(node, Ask):
            if state.closed_asks < MAX_CLOSED_ASKS:
                state = replace(
                    self._step(state, "closed"),
                    closed_asks=state.closed_asks + 1,
                    typeahead="",
                    digits="",
                )
                instead = flow.nodes.get(node.on_closed or "")
                if isinstance(instead, Ask) and instead is not node:
                    # The open menu's "press 0 for staff" is not said again to a caller who
                    # just heard the desk is closed: its closed-hours counterpart is asked.
                    node = instead
                    state = self._step(
                        replace(state, node=node.id, noinput=0, nomatch=0, pending=Pending.NEXT)
                    )
                ask_text = flow.ask_prompt(node, self.speech_on(flow, node))
                text = f"{before} {{closed_notice}} {ask_text}".strip()
                return self._prompt(state, flow, node, text, actions)
            # Asked again and again (or a key stuck on 0): the notice once more, then goodbye.
            state = self._step(state, "closed", "limit")
        else:
            state = self._step(state, "closed")
        text = f"{before} {{closed_notice}}".strip()
        outcome = state.achieved or OUT_OF_HOURS_OUTCOME
        if why in GIVEN_UP and state.close is Close.OPEN and not _recorded_before(state):
            # A question given up (silence after silence at the closed menu, a date of birth
            # refused three times): while open, staff would take the call, and a message if
            # they did not answer. Closed, the notice, then the same message offer, rather
            # than a hang-up on a caller who may not manage the keypad at all. Kept, the
            # call is message_left (the clinic calls back when it opens); not, out_of_hours.
            text = f"{text} {flow.texts('message_offer')}"
            return self._offer_message(
                state, flow, text, actions, outcome=outcome, typeahead="", digits=""
            )
        return self._last_words(state, flow, text, actions, outcome=outcome)

    # -- helpers

    def _end(self, state: CallState, outcome: str, actions: list[Action], hangup: bool) -> Result:
        # An outcome that claims words the caller never heard (a say's outcome_unheard).
        outcome = dict(state.unheard_outcomes).get(outcome, outcome)
        state = replace(state, phase=Phase.ENDED, outcome=outcome)
        record = record_of(state, outcome)
        # The BYE first: the caller is not held on a silent line while the record is saved
        # (up to its patience with Redis down).
        ends = [HangupCall()] if hangup else []
        return state, [*actions, *ends, Store(record)]

    def _apply(self, state: CallState, effect: Effect) -> CallState:
        tri = state.triage or TriageState()
        if effect.risk is not None:
            tri = tri.add_risk(effect.risk)
        if effect.urgency is not None:
            tri = tri.raise_to(effect.urgency, effect.reason)
        return replace(state, triage=tri)

    def _branch(self, state: CallState, node: Branch) -> str | None:
        if node.on == "urgency":
            tri = state.triage or TriageState()
            current = tri.urgency.name
        elif node.on == HOURS:
            current = "open" if self.params.open_now() else "closed"
        else:
            current = state.value(node.on) or ""
        for value, target in node.cases:
            if value == current:
                return target
        return node.default

    def _resolve(self, flow: Flow, target: str) -> tuple[Flow, str]:
        try:
            return self.flowset.resolve(flow, target)
        except KeyError:
            raise EngineError(f"{flow.id}: unknown target {target!r}") from None

    def speech_on(self, flow: Flow, ask: Ask) -> bool:
        """Whether ``ask`` takes speech in ``flow`` (speech on for its language, not keypad)."""
        return self.params.speech_for(flow.language) and ask.mode.value != "keypad"

    def _render(self, state: CallState, text: str, *, spoken: bool = True) -> str:
        """``text`` filled in; ``spoken=False`` for values kept or sent, not said: the numbers
        as set (``112``), not as read out (``1 1 2``), in the record and a webhook's body."""
        values = dict(state.values)
        language = self.flowset.get(state.flow).language
        values.update(self.params.values(language, spoken=spoken))
        return render(text, values)

    def _say(self, state: CallState, flow: Flow, node: Say) -> Play:
        play = self._play(state, flow, node.text, barge_in=node.barge_in)
        if node.audio is not None:  # a recording: nothing is rendered from the text
            play = replace(play, audio=node.audio, private=False)
        return play

    def _play(self, state: CallState, flow: Flow, text: str, barge_in: bool) -> Play:
        private = not placeholders(text) <= PARAM_NAMES
        return Play(self._render(state, text), None, barge_in, flow.language, private)

    def _step(
        self,
        state: CallState,
        kind: str = "",
        value: str = "",
        confidence: float | None = None,
    ) -> CallState:
        step = PathStep(state.flow, state.node, kind, value, confidence)
        return replace(
            state,
            path=add_step(state.path, step),
            steps=state.steps + 1,
            recorded=state.recorded or kind == "record",
        )

    def _summary(self, state: CallState) -> tuple[tuple[str, str], ...]:
        """The headers a transfer carries (``FlowParams.transfer_summary``): the urgency, and
        with "full" the triage and the collected values, URL-quoted. They travel in clear
        SIP, past the caller's side of the call: health data only when asked for."""
        mode = self.params.transfer_summary
        headers: list[tuple[str, str]] = []
        tri = _triage_told(state)
        if tri is not None and mode != "none":
            headers.append((URGENCY_HEADER, tri.urgency.name))
        if mode == "full":
            parts = [f"flow={state.flow}"]
            if tri is not None:
                parts += [f"urgency={tri.urgency.name}", f"action={tri.action.value}"]
                parts.append("reasons=" + ",".join(quote(r, safe=" ") for r in tri.reasons))
            parts += [f"{k}={quote(v, safe=' ')}" for k, v in state.values]
            headers.insert(0, (SUMMARY_HEADER, "; ".join(parts)))
        return tuple(headers)
