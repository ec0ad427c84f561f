"""PromptRenderer with the real pyttsx3 + espeak-ng."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import wave
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiohttp import web

from clinic_voice.app import RUNTIME
from clinic_voice.wiring import extra_contexts
from sip_config.settings import Settings
from verification.wording import wording
from voice.media import spoken_code
from voice.media.pcm import read_wav, rms_dbfs
from voice.media.private_folder import PrivateFolder
from voice.media.tts import PromptRenderer, TtsError

pytestmark = pytest.mark.integration


def wav_format(path: Path) -> tuple[int, int, int]:
    with wave.open(str(path), "rb") as w:
        return w.getframerate(), w.getnchannels(), w.getsampwidth()


@pytest.mark.parametrize(
    ("text", "voice", "rate_hz", "min_s"),
    [
        ("Welcome to the clinic. Press 1 for appointments.", "en", 8000, 2.0),
        ("예", "ko", 8000, 0.2),
        ("증상이 있습니까?", "ko", 16000, 0.8),
    ],
)
async def test_renders_speech_at_the_call_rate(
    tmp_path: Path, text: str, voice: str, rate_hz: int, min_s: float
) -> None:
    path = await PromptRenderer(tmp_path).render(text, voice=voice, rate_hz=rate_hz)
    assert wav_format(path) == (rate_hz, 1, 2)
    pcm = read_wav(path)
    assert min_s < pcm.duration_s < 10
    assert rms_dbfs(pcm.samples) > -35, "the prompt is (nearly) silent"


async def test_cache_hit_does_not_render_again(tmp_path: Path) -> None:
    renderer = PromptRenderer(tmp_path)
    first = await renderer.render("Your appointment is confirmed.")
    mtime = first.stat().st_mtime_ns
    again = await renderer.render("Your appointment is confirmed.")
    assert again == first
    assert renderer.renders == 1
    assert first.stat().st_mtime_ns == mtime
    # A new process (a new renderer on the same directory) reuses the file on disk.
    restarted = PromptRenderer(tmp_path)
    assert await restarted.render("Your appointment is confirmed.") == first
    assert restarted.renders == 0
    # Voice and rate are part of the key.
    other = await renderer.render("Your appointment is confirmed.", rate_hz=16000)
    assert other != first
    assert renderer.renders == 2


async def test_concurrent_requests_render_once(tmp_path: Path) -> None:
    renderer = PromptRenderer(tmp_path)
    paths = await asyncio.gather(*(renderer.render("Please hold the line.") for _ in range(8)))
    assert len(set(paths)) == 1
    assert renderer.renders == 1
    left = await asyncio.to_thread(lambda: [p.name for p in tmp_path.iterdir()])
    assert left == [paths[0].name], "temp files left behind"


async def test_rendering_does_not_block_the_loop(tmp_path: Path) -> None:
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)
    started = time.monotonic()
    # ~100 s of speech: synthesis and resampling take a few hundred ms.
    text = " ".join(f"Option {n}: please listen carefully to the menu." for n in range(1, 41))
    await PromptRenderer(tmp_path).render(text, rate_hz=16000)
    elapsed = time.monotonic() - started
    stop.set()
    await asyncio.wait_for(tick, timeout=5)
    print(f"render {elapsed:.3f} s, longest loop gap {max(gaps) * 1000:.1f} ms")
    assert elapsed > 0.1, f"render took only {elapsed:.3f} s: nothing to measure"
    assert max(gaps) < 0.1, f"the loop stalled for {max(gaps):.3f} s during a render"


async def test_prerender_then_every_prompt_is_cached(tmp_path: Path) -> None:
    renderer = PromptRenderer(tmp_path)
    texts = ["Press 1 for yes.", "Press 2 for no.", "Goodbye."]
    paths = await renderer.prerender(texts)
    assert len(set(paths)) == 3
    assert all(p.exists() for p in paths)
    assert [await renderer.render(t) for t in texts] == paths
    assert renderer.renders == 3


async def test_a_private_render_is_a_file_of_its_own_and_never_cached(tmp_path: Path) -> None:
    private = PrivateFolder(tmp_path)  # as serve's: on tmpfs when there is one
    renderer = PromptRenderer(tmp_path / "prompts", private)
    one = await renderer.render_private("Your appointment is on 3 May at 10:00.")
    two = await renderer.render_private("Your appointment is on 3 May at 10:00.")
    assert one != two and one.parent == (await asyncio.to_thread(private.chain))[0]
    assert one.stat().st_mode & 0o077 == 0, "a caller's prompt must not be world-readable"
    assert read_wav(one).samples
    assert renderer.renders == 2
    assert not (tmp_path / "prompts").exists() or not any((tmp_path / "prompts").iterdir())
    await asyncio.to_thread(shutil.rmtree, one.parent, True)  # a folder on /dev/shm


async def test_failures_raise_tts_error_and_the_engine_recovers(tmp_path: Path) -> None:
    renderer = PromptRenderer(tmp_path)
    with pytest.raises(TtsError, match="voice"):
        await renderer.render("hello", voice="zz-no-such-voice")
    with pytest.raises(TtsError, match="empty"):
        await renderer.render("   ")
    with pytest.raises(TtsError, match="rate"):
        await renderer.render("hello", rate_hz=100)
    assert read_wav(await renderer.render("Still speaking.")).samples
    left = await asyncio.to_thread(lambda: [p.name for p in tmp_path.iterdir()])
    assert len(left) == 1, f"temp files left behind: {left}"


def test_render_sync_for_command_line_tools(tmp_path: Path) -> None:
    path = PromptRenderer(tmp_path).render_sync("Flow check passed.")
    assert wav_format(path) == (8000, 1, 2)


async def test_long_prompt_is_as_long_as_espeak_ng_says_it(tmp_path: Path) -> None:
    # pyttsx3 2.99's Engine lost ~13 % of long texts and returned before the file existed;
    # the renderer must give all of what the espeak-ng command line gives.
    text = " ".join(f"Option {n}: please listen carefully to the menu." for n in range(1, 8))
    cli = tmp_path / "cli.wav"
    proc = await asyncio.create_subprocess_exec("espeak-ng", "-v", "en", "-w", str(cli), text)
    assert await asyncio.wait_for(proc.wait(), timeout=30) == 0
    expected = read_wav(cli).duration_s
    ours = read_wav(await PromptRenderer(tmp_path / "p").render(text, rate_hz=8000)).duration_s
    assert abs(ours - expected) < 0.01 * expected, f"ours {ours:.2f} s, espeak-ng {expected:.2f} s"


async def test_the_speed_setting_slows_the_prompts_as_espeak_ng_does(tmp_path: Path) -> None:
    # CLINIC_TTS_WORDS_PER_MINUTE: 140 words a minute for older callers is as espeak-ng -s 140
    # says it, a quarter longer than its own 175.
    text = "Is there chest pain or pressure on the chest? Press 1 for yes. Press 2 for no."
    cli = tmp_path / "cli.wav"
    proc = await asyncio.create_subprocess_exec(
        "espeak-ng", "-v", "en", "-s", "140", "-w", str(cli), text
    )
    assert await asyncio.wait_for(proc.wait(), timeout=30) == 0
    expected = read_wav(cli).duration_s
    prompts = tmp_path / "p"
    slow = PromptRenderer(prompts, words_per_minute=140)
    brisk = PromptRenderer(prompts)
    slow_s = read_wav(await slow.render(text, rate_hz=8000)).duration_s
    brisk_s = read_wav(await brisk.render(text, rate_hz=8000)).duration_s
    assert abs(slow_s - expected) < 0.01 * expected, f"ours {slow_s:.2f} s, cli {expected:.2f} s"
    assert slow_s > 1.15 * brisk_s, f"140 wpm: {slow_s:.2f} s, 175 wpm: {brisk_s:.2f} s"
    # The speed stays with the renderer: the next one at 175 is not slowed by the last.
    again_s = read_wav(await brisk.render(text + " ", rate_hz=8000)).duration_s
    assert abs(again_s - brisk_s) < 0.05 * brisk_s


async def test_a_callers_prompt_goes_before_background_prerendering(tmp_path: Path) -> None:
    renderer = PromptRenderer(tmp_path)
    many = [f"Background prompt number {n}, to fill the queue." for n in range(40)]
    background = asyncio.ensure_future(renderer.prerender(many, background=True))
    await asyncio.sleep(0.05)  # the queue is full of background jobs now
    urgent = await renderer.render("Call 112 now.")
    assert urgent.exists()
    done_before = await asyncio.to_thread(
        lambda: len([p for p in tmp_path.glob("*.wav") if p != urgent])
    )
    assert done_before < len(many) // 2, (
        f"{done_before} of {len(many)} background prompts were rendered before the caller's"
    )
    await background
    # The same text asked for while it waits in the background gets its own urgent render.
    again = [f"Another background prompt {n}." for n in range(30)]
    queued = asyncio.ensure_future(renderer.prerender(again, background=True))
    await asyncio.sleep(0.05)
    path = await renderer.render(again[-1])
    assert path.exists() and not queued.done()
    await queued


FLOW_TEXTS = [
    "Welcome to the clinic.",
    "Press 1 for appointments, 2 for test results.",
    "Please hold the line.",
    "Goodbye.",
]


async def test_a_restart_with_the_same_prompts_renders_nothing(tmp_path: Path) -> None:
    first = PromptRenderer(tmp_path / "prompts")
    paths = await first.prerender(FLOW_TEXTS, background=True)
    assert first.renders == len(FLOW_TEXTS)
    assert await first.evict_unused() == 0
    # A restart: a new renderer (and cache) on the same folder.
    restarted = PromptRenderer(tmp_path / "prompts")
    started = time.monotonic()
    assert await restarted.prerender(FLOW_TEXTS, background=True) == paths
    warm_s = time.monotonic() - started
    print(f"warm prerender of {len(FLOW_TEXTS)} prompts: {warm_s * 1000:.1f} ms")
    assert restarted.renders == 0, "a restart rendered cached prompts again"
    # Asked again in this process: no lookup on disk, no render.
    assert await restarted.render(FLOW_TEXTS[0]) == paths[0]
    assert restarted.renders == 0


async def test_a_changed_text_and_a_damaged_file_are_the_only_renders(tmp_path: Path) -> None:
    first = PromptRenderer(tmp_path / "prompts")
    paths = await first.prerender(FLOW_TEXTS)
    damaged = paths[1]
    data = await asyncio.to_thread(damaged.read_bytes)
    await asyncio.to_thread(damaged.write_bytes, data[: len(data) // 2])  # cut short
    edited = [*FLOW_TEXTS[:-1], "Goodbye, and get well soon."]
    restarted = PromptRenderer(tmp_path / "prompts")
    again = await restarted.prerender(edited)
    assert restarted.renders == 2, "only the damaged file and the changed text render"
    assert again[0] == paths[0] and again[2] == paths[2]
    # Rendered again whole, not played cut short (espeak-ng may differ by a sample or two).
    assert abs(len(await asyncio.to_thread(again[1].read_bytes)) - len(data)) < len(data) // 100
    # The old "Goodbye." is unused by this run: it goes once no process used it for a day.
    assert await restarted.evict_unused(time.time() + 60) == 0
    assert await restarted.evict_unused(time.time() + 2 * 86400) == 1
    assert not paths[3].exists()
    assert all(p.exists() for p in again)


async def test_a_voice_codes_rendering_leaves_no_file(tmp_path: Path) -> None:
    """The code is said from cached pieces (the sentence head, each digit) into a private
    file that the channel deletes: nothing the cache keeps says the code, and nothing of it
    is left once the channel is done."""
    prompts, private = tmp_path / "prompts", tmp_path / "private"
    renderer = PromptRenderer(prompts, PrivateFolder(tmp_path, None, temp_root=tmp_path))
    words = wording("en")
    head = words.head_text("Example Clinic")
    # What serve renders at start (clinic_voice/wiring.py): the head and the ten digits.
    await renderer.prerender([head, *(str(d) for d in range(10))])
    before = await asyncio.to_thread(lambda: sorted(p.name for p in prompts.iterdir()))
    renders = renderer.renders
    code_wav = await spoken_code.compose(renderer, head, "481523", renderer.private)
    assert renderer.renders == renders, "a code's reading rendered a text"
    after = await asyncio.to_thread(lambda: sorted(p.name for p in prompts.iterdir()))
    assert after == before, "the code's reading added a file to the prompt cache"
    assert code_wav.parent == private and code_wav.stat().st_mode & 0o777 == 0o600
    await asyncio.to_thread(code_wav.unlink)  # as VoiceCallChannel.send does after the call
    assert await asyncio.to_thread(lambda: list(private.iterdir())) == []
    # And a text of one call never reaches the cache.
    once = await renderer.render_private(f"{head} 4, 8, 1, 5, 2, 3.")
    assert once.parent == private
    assert await asyncio.to_thread(lambda: sorted(p.name for p in prompts.iterdir())) == before
    await asyncio.to_thread(once.unlink)


async def test_serves_start_sweeps_every_private_folder_of_its_chain(tmp_path: Path) -> None:
    """A serve killed during calls leaves their private files in whichever folder took them
    (tmpfs, the data dir, the temporary folder): the next start removes them from all, and
    its own renderer writes to the first (tmpfs here)."""
    data = tmp_path / "data"
    settings = Settings.from_env(
        {"CLINIC_DATA_DIR": str(data), "CLINIC_TTS_WORDS_PER_MINUTE": "150"}
    )
    chain = await asyncio.to_thread(PrivateFolder(data).chain)
    old = time.time() - 3600

    def plant() -> None:
        for folder in chain:
            folder.mkdir(mode=0o700, parents=True)
            for name in ("code-left.wav", "once-left.wav"):
                (folder / name).write_bytes(b"RIFF a caller's")
                os.utime(folder / name, (old, old))

    fake = web.Application()
    rt = cast(Any, SimpleNamespace(renderer=None))
    fake[RUNTIME] = rt
    try:
        await asyncio.to_thread(plant)
        prompts_ctx = extra_contexts(settings, cast(Any, None))[0]
        started = prompts_ctx(fake)
        await started.__anext__()  # serve's start, up to where it serves
        left = await asyncio.to_thread(lambda: [p for f in chain for p in f.iterdir()])
        assert left == [], f"a killed run's private files survived the start: {left}"
        assert rt.renderer.words_per_minute == 150  # CLINIC_TTS_WORDS_PER_MINUTE reaches it
        wav = await rt.renderer.render_private("Your appointment is on Tuesday.")
        assert wav.parent == chain[0]
        await asyncio.to_thread(wav.unlink)
        with pytest.raises(StopAsyncIteration):
            await started.__anext__()  # serve's stop
        assert not await asyncio.to_thread(chain[0].exists), "the stop left its tmpfs folder"
    finally:
        for folder in chain:  # tmpfs and the temporary folder are outside tmp_path
            if not folder.is_relative_to(tmp_path):
                await asyncio.to_thread(shutil.rmtree, folder, True)


LONG_NAME = "Saint Bartholomew Family Health Practice"  # CLINIC_NAME's longest: 40 characters


@pytest.mark.parametrize(("step_s", "warned"), [("100", True), ("150", False)])
async def test_serve_warns_of_a_voice_step_too_short_for_the_code_read_twice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, step_s: str, warned: bool
) -> None:
    """CLINIC_STEP_TIMEOUT_VOICE_S may be 100 (VOICE_CALL_S, "about 95 s" of ringing, the
    question twice and the code read twice). With 0.7 s between the code's digits an 8-digit
    code read twice after a long clinic name takes longer: the step moved on during the
    repeat, and the last channel's rules place the call again. serve says so at its start,
    measured on the prompts it rendered."""
    assert len(LONG_NAME) == 40
    settings = Settings.from_env(
        {
            "CLINIC_DATA_DIR": str(tmp_path / "data"),
            "CLINIC_NAME": LONG_NAME,
            "CLINIC_STEP_TIMEOUT_VOICE_S": step_s,
        }
    )
    fake = web.Application()
    fake[RUNTIME] = cast(Any, SimpleNamespace(renderer=None))
    started = extra_contexts(settings, cast(Any, None))[0](fake)
    await started.__anext__()  # serve's start, up to where it serves
    with pytest.raises(StopAsyncIteration):
        await started.__anext__()
    said = [
        r.getMessage() for r in caplog.records if "CLINIC_STEP_TIMEOUT_VOICE_S" in r.getMessage()
    ]
    assert bool(said) is warned, said
    if warned:
        assert said[0].startswith("CLINIC_STEP_TIMEOUT_VOICE_S is 100 s, and a voice call can"), (
            said
        )
