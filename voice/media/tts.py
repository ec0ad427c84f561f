"""Spoken prompts: espeak-ng through pyttsx3's driver, on its own thread.

espeak-ng can be initialised only once per process and its state is global, so one daemon
thread per process owns it and every render goes through that thread; the event loop only
awaits a future. Output is PCM16 mono at the call's rate (resampled in
:mod:`voice.media.pcm`), made in memory and then written where it belongs, by that thread:

- a fixed text (a flow's prompt, the verification call's sentence head and digits) with
  :meth:`PromptRenderer.render` into the cache on disk (:mod:`voice.media.prompt_cache`),
  looked up there first, so a restart with the same flows renders nothing;
- a text of one call (what the caller said or was told, a webhook's reply) with
  :meth:`PromptRenderer.render_private` into a private file that the caller deletes after
  playing it. No path from this call leads into the cache.

Why pyttsx3's espeak-ng *binding* and not its ``Engine``: measured here with pyttsx3 2.99,
``save_to_file`` + ``runAndWait`` returns before espeak-ng has finished (its espeak driver
starts asynchronous ``AUDIO_OUTPUT_RETRIEVAL`` synthesis and leaves the loop at once), so
texts longer than about 2 s produced no file, the next render cancelled the previous one, and
the files it did write lacked ~13 % of the audio compared with ``espeak-ng -w``. Driving
``pyttsx3.drivers._espeak`` in ``AUDIO_OUTPUT_SYNCHRONOUS`` mode gives the same samples as
the espeak-ng command line.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import importlib.metadata
import itertools
import logging
import queue
import shutil
import subprocess
import threading
import time
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voice.media.leftovers import remove_files
from voice.media.pcm import Pcm, bytes_to_samples, resample, samples_to_bytes, wav_bytes
from voice.media.private_folder import PrivateFolder
from voice.media.prompt_cache import PromptCache, cache_key

log = logging.getLogger(__name__)

# espeak-ng voice names for the voices the service speaks; other espeak-ng names pass through.
VOICES: dict[str, str] = {"en": "en", "ko": "ko"}

# espeak-ng's own output rate for its formant voices (pyttsx3's driver assumes it too).
_ESPEAK_RATE_HZ = 22050

# How fast the prompts are spoken, in words per minute (CLINIC_TTS_WORDS_PER_MINUTE).
# espeak-ng's own default is 175, brisk over an 8 kHz line for an elderly or hard-of-hearing
# caller; plain-language telephone guidance puts prompts at 140-160. Set on every render (a
# pyttsx3 Engine elsewhere in the process could change it) and part of the cache key.
DEFAULT_WORDS_PER_MINUTE = 175
MIN_WORDS_PER_MINUTE, MAX_WORDS_PER_MINUTE = 80, 300


_SOX = shutil.which("sox")


def _sox_resample(sox: str, samples: array[int], src_hz: int, dst_hz: int) -> array[int]:
    """PCM16 mono at ``src_hz`` -> at ``dst_hz`` (sox's high-quality resampler)."""
    raw = ["-t", "raw", "-e", "signed-integer", "-b", "16", "-c", "1", "-L"]
    argv = [
        sox, "-q",
        *raw, "-r", str(src_hz), "-",  # little-endian input, as samples_to_bytes writes
        *raw, "-r", str(dst_hz), "-",
        "rate", "-h",
    ]  # fmt: skip
    done = subprocess.run(
        argv, input=samples_to_bytes(samples), capture_output=True, timeout=30, check=False
    )
    if done.returncode != 0:
        raise TtsError(f"sox could not resample: {done.stderr.decode(errors='replace')[:200]}")
    return bytes_to_samples(done.stdout)


def _resampler(sox: str | None) -> tuple[str | None, str]:
    """The sox to resample with (``None``: the pure-Python resampler) and what resamples,
    for the cache key: sox and its version, or the Python one. A sox that does not run is
    logged and left out: speech goes on, resampled in Python (slower: it holds the GIL)."""
    if sox is None:
        return None, "python-resampler"
    try:
        done = subprocess.run(
            [sox, "--version"], capture_output=True, timeout=10, check=False, text=True
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("sox does not run (%s): prompts are resampled in Python", exc)
        return None, "python-resampler"
    if done.returncode != 0:
        log.warning("sox --version exited %s: prompts are resampled in Python", done.returncode)
        return None, "python-resampler"
    return sox, done.stdout.strip().rsplit(" ", 1)[-1] or "sox"


# How long a cached prompt this process found is taken on trust before it is looked up
# again (a checksum and a touch of its time, on the speech thread): see PromptRenderer.
KNOWN_RECHECK_S = 600.0


class TtsError(RuntimeError):
    """Speech synthesis failed (espeak-ng or pyttsx3 missing, unknown voice, empty output)."""


@dataclass(frozen=True, slots=True)
class _Job:
    """Work for the speech thread: ``run`` there, its result or TtsError in ``done``."""

    run: Callable[[], Any]
    done: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)
    background: bool = False  # start-up prerendering: yields to anything a caller waits for


_URGENT, _BACKGROUND = 0, 1


class _SpeechThread:
    """The one thread that owns espeak-ng in this process (and the prompt cache's files)."""

    _instance: _SpeechThread | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        # (priority, sequence, job): a prompt a caller is waiting for goes before the
        # start-up prerendering of ~150 static prompts (found by bench/ivr.py: a U1 answer
        # waited behind the whole prerender queue).
        self._jobs: queue.PriorityQueue[tuple[int, int, _Job]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._espeak: Any = None
        self._rate_hz = _ESPEAK_RATE_HZ
        self._sox: str | None = None  # set by _start: a sox that runs, if any
        self._chunks: list[bytes] = []
        self.version: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, name="tts", daemon=True)
        self._thread.start()

    @classmethod
    def get(cls) -> _SpeechThread:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def submit(self, job: _Job) -> None:
        self._jobs.put((_BACKGROUND if job.background else _URGENT, next(self._seq), job))

    def _run(self) -> None:
        try:
            self.version.set_result(self._start())
        except Exception as exc:  # reported to every caller through the future
            log.error("text-to-speech unavailable: %s", exc)
            self.version.set_exception(TtsError(f"text-to-speech unavailable: {exc}"))
        while True:
            _, _, job = self._jobs.get()
            if not job.done.set_running_or_notify_cancel():
                continue
            try:
                result = job.run()
            except TtsError as exc:
                job.done.set_exception(exc)
            except Exception as exc:  # ctypes and file errors: still the caller's TtsError
                log.exception("text-to-speech failed")
                job.done.set_exception(TtsError(f"text-to-speech failed: {exc}"))
            else:
                job.done.set_result(result)

    def _start(self) -> str:
        """Initialise espeak-ng once; return the engine version for the cache key."""
        import pyttsx3.drivers._espeak as espeak
        from pyttsx3.drivers.espeak import EspeakDriver

        if not EspeakDriver._moduleInitialized:
            rate = espeak.Initialize(espeak.AUDIO_OUTPUT_SYNCHRONOUS, 1000)
            if rate == -1:
                raise TtsError("espeak-ng failed to initialise")
            self._rate_hz = int(rate)
            # A pyttsx3 Engine made later in this process must not initialise it again.
            EspeakDriver._moduleInitialized = True
        self._espeak = espeak
        info = espeak.Info(None)
        espeak_version = info.decode() if isinstance(info, bytes) else str(info)
        pyttsx3_version = importlib.metadata.version("pyttsx3")
        # The resampler is part of the audio too (sox and the Python one differ slightly).
        self._sox, resampler = _resampler(_SOX)
        return f"pyttsx3-{pyttsx3_version}/espeak-ng-{espeak_version}/{resampler}"

    def _on_audio(self, wav: Any, numsamples: int, _events: Any) -> int:
        # Called by espeak-ng on this thread, inside Synth: copy the samples and go on.
        if numsamples > 0 and wav:
            self._chunks.append(ctypes.string_at(wav, numsamples * 2))
        return 0

    def _synth(self, text: str, voice: str, words_per_minute: int) -> array[int]:
        espeak = self._espeak
        status = espeak.SetVoiceByName(VOICES.get(voice, voice).encode())
        if status != espeak.EE_OK:
            raise TtsError(f"espeak-ng has no voice {voice!r} (status {status})")
        status = espeak.SetParameter(espeak.RATE, words_per_minute, 0)
        if status != espeak.EE_OK:
            raise TtsError(f"espeak-ng refused {words_per_minute} words a minute ({status})")
        self._chunks = []
        # Set on every render: a pyttsx3 Engine elsewhere in the process would replace it.
        espeak.SetSynthCallback(self._on_audio)
        status = espeak.Synth(text, flags=espeak.CHARS_UTF8 | espeak.ENDPAUSE)
        if status != espeak.EE_OK:
            raise TtsError(f"espeak-ng failed to synthesise (status {status})")
        # Returns at once in synchronous mode; waits out a RETRIEVAL-mode init by pyttsx3.
        espeak.Synchronize()
        return bytes_to_samples(b"".join(self._chunks))

    def speak(
        self,
        text: str,
        voice: str,
        rate_hz: int,
        words_per_minute: int = DEFAULT_WORDS_PER_MINUTE,
    ) -> bytes:
        """The bytes of a WAV file of ``text`` (on this thread only)."""
        self.version.result()  # raises TtsError when espeak-ng could not start
        spoken = self._synth(text, voice, words_per_minute)
        if not spoken:
            raise TtsError("espeak-ng produced no audio")
        if self._sox is not None:
            # sox resamples in C while this thread waits without the GIL; the pure-Python
            # resampler held the GIL for ~0.1 s per prompt and stalled the event loop.
            samples = _sox_resample(self._sox, spoken, self._rate_hz, rate_hz)
        else:
            samples = resample(spoken, self._rate_hz, rate_hz)
        return wav_bytes(Pcm(samples, rate_hz))


class PromptRenderer:
    """Renders prompt text to WAV files for the call's media.

    Two calls, for two kinds of text. :meth:`render` is for fixed texts only (a flow's
    prompts, made from its text and the settings): they are kept in ``cache_dir`` (e.g.
    ``$CLINIC_DATA_DIR/prompts``) across restarts, named by a hash of their text.
    :meth:`render_private` is for everything made for one call (a caller's booking, a
    webhook's reply): a new 0600 file in ``private`` (:mod:`voice.media.private_folder`: on
    tmpfs when there is one, else ``private`` beside ``cache_dir``) that the caller deletes
    after playing it; never cached. A spoken code is
    composed from cached pieces instead (:mod:`voice.media.spoken_code`).

    Nothing here touches the disk on the event loop: lookups, writes and evictions run on
    the speech thread, a cache hit already seen in this process on no thread at all.
    """

    def __init__(
        self,
        cache_dir: Path,
        private: PrivateFolder | None = None,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        words_per_minute: int = DEFAULT_WORDS_PER_MINUTE,
    ) -> None:
        if not MIN_WORDS_PER_MINUTE <= words_per_minute <= MAX_WORDS_PER_MINUTE:
            raise TtsError(
                f"{words_per_minute} words a minute: not in "
                f"{MIN_WORDS_PER_MINUTE}..{MAX_WORDS_PER_MINUTE}"
            )
        self._words_per_minute = words_per_minute
        self._cache = PromptCache(cache_dir)
        # Default: the service's whose data dir holds ``cache_dir``.
        self._private = private if private is not None else PrivateFolder(cache_dir.parent)
        # key -> a file this process found whole or wrote, and when (``monotonic``): taken
        # on trust for KNOWN_RECHECK_S, then looked up again on the speech thread (checked,
        # its use marked), so a file removed meanwhile (an operator, another process's
        # eviction) is rendered again rather than handed to the SIP worker for good.
        self._known: dict[str, tuple[Path, float]] = {}
        self._monotonic = monotonic
        self._inflight: dict[str, tuple[asyncio.Future[Path], bool]] = {}
        self._renders = 0

    @property
    def renders(self) -> int:
        """How many times this renderer actually synthesised (cache misses and private
        texts)."""
        return self._renders

    @property
    def words_per_minute(self) -> int:
        """How fast this renderer's prompts are spoken."""
        return self._words_per_minute

    @property
    def cache_dir(self) -> Path:
        return self._cache.folder

    @property
    def private(self) -> PrivateFolder:
        """Where :meth:`render_private` writes (and a voice call's code is composed)."""
        return self._private

    def remove_leftovers(self) -> int:
        """Delete the :meth:`render_private` files a killed process left (and those older
        versions left among the cached prompts). Blocking: call it from a thread, before any
        call. Returns how many."""
        return self._private.sweep("once-*.wav", None, 0.0) + remove_files(
            self._cache.folder, "once-*.wav", None, 0.0
        )

    async def render(
        self,
        text: str,
        *,
        voice: str = "en",
        rate_hz: int = 8000,
        background: bool = False,
    ) -> Path:
        """A WAV file (PCM16 mono at ``rate_hz``) speaking ``text``, a *fixed* text: it is
        cached on disk. ``background`` renders yield to every other render (for start-up
        prerendering). Raises :class:`TtsError`.
        """
        _check(text, rate_hz)
        speech = _SpeechThread.get()
        version = await asyncio.wrap_future(speech.version)
        # The speed is part of the audio: a changed setting renders every prompt anew.
        key = cache_key(text, voice, rate_hz, f"{version}/{self._words_per_minute}wpm")
        known = self._known.get(key)
        if known is not None and self._monotonic() - known[1] < KNOWN_RECHECK_S:
            return known[0]
        pending = self._inflight.get(key)
        if pending is not None and (background or not pending[1]):
            return await asyncio.shield(pending[0])
        # A caller waiting for a text that is queued in the background gets its own urgent
        # job for it (the cache replaces the file atomically with the same bytes).
        task = asyncio.ensure_future(
            self._fetch(speech, key, text, voice, rate_hz, background=background)
        )
        self._inflight[key] = (task, background)

        def forget(_: object) -> None:
            if self._inflight.get(key, (None, False))[0] is task:
                del self._inflight[key]

        task.add_done_callback(forget)
        # shield: one cancelled waiter must not cancel the render the others wait for.
        return await asyncio.shield(task)

    async def render_private(self, text: str, *, voice: str = "en", rate_hz: int = 8000) -> Path:
        """A new private WAV file (0600, in the first folder of ``private`` that takes it: on
        tmpfs when there is one) speaking ``text``, a text of one call: never looked up in nor
        written to the cache. The caller deletes it after
        playing it. Raises :class:`TtsError`."""
        _check(text, rate_hz)
        speech = _SpeechThread.get()
        await asyncio.wrap_future(speech.version)
        folder = self._private
        wpm = self._words_per_minute

        def run() -> Path:
            wav = speech.speak(text, voice, rate_hz, wpm)
            return folder.write("once-", lambda file: file.write(wav))

        self._renders += 1
        log.debug("rendering a prompt of one call: voice=%s rate=%s", voice, rate_hz)
        job = _Job(run)
        speech.submit(job)
        try:
            path: Path = await asyncio.wrap_future(job.done)
        except asyncio.CancelledError:
            # The call's task went (its time limit, a stop) while the thread wrote the file:
            # nobody would delete it before the next start. The thread's own end does.
            job.done.add_done_callback(_unlink_result)
            raise
        return path

    async def _fetch(
        self,
        speech: _SpeechThread,
        key: str,
        text: str,
        voice: str,
        rate_hz: int,
        *,
        background: bool,
    ) -> Path:
        cache = self._cache
        wpm = self._words_per_minute

        def run() -> tuple[Path, bool]:
            hit = cache.lookup(key)
            if hit is not None:
                return hit, False
            return cache.store(key, speech.speak(text, voice, rate_hz, wpm)), True

        job = _Job(run, background=background)
        speech.submit(job)
        path, rendered = await asyncio.wrap_future(job.done)
        if rendered:
            self._renders += 1
            log.debug("rendered a prompt: voice=%s rate=%s file=%s", voice, rate_hz, path.name)
        self._known[key] = (path, self._monotonic())
        return path  # type: ignore[no-any-return]

    async def prerender(
        self,
        texts: Iterable[str],
        *,
        voice: str = "en",
        rate_hz: int = 8000,
        background: bool = False,
    ) -> list[Path]:
        """Render many fixed texts (static prompts at start-up: ``background=True``)."""
        return list(
            await asyncio.gather(
                *(
                    self.render(t, voice=voice, rate_hz=rate_hz, background=background)
                    for t in texts
                )
            )
        )

    async def evict_unused(self, now: float | None = None) -> int:
        """Remove the cached prompts this process has not asked for and no process used for
        a day (:meth:`voice.media.prompt_cache.PromptCache.evict`), on the speech thread
        behind the renders queued. Call it once every fixed text is rendered. Returns how
        many files went."""
        cache = self._cache
        at = time.time() if now is None else now
        job = _Job(lambda: cache.evict(at), background=True)
        _SpeechThread.get().submit(job)
        removed: int = await asyncio.wrap_future(job.done)
        return removed

    def render_sync(self, text: str, *, voice: str = "en", rate_hz: int = 8000) -> Path:
        """Blocking :meth:`render` for command-line tools; never call it on an event loop."""
        return asyncio.run(self.render(text, voice=voice, rate_hz=rate_hz))


def _unlink_result(done: concurrent.futures.Future[Any]) -> None:
    """Delete the file a finished private render made, its caller gone."""
    if not done.cancelled() and done.exception() is None:
        Path(done.result()).unlink(missing_ok=True)


def _check(text: str, rate_hz: int) -> None:
    if not text.strip():
        raise TtsError("nothing to say: empty prompt text")
    if not 4000 <= rate_hz <= 48000:
        raise TtsError(f"unsupported sample rate {rate_hz} Hz")
