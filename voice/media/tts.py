"""Spoken prompts: espeak-ng through pyttsx3's driver, on its own thread, cached on disk.

espeak-ng can be initialised only once per process and its state is global, so one daemon
thread per process owns it and every render goes through that thread; the event loop only
awaits a future. Output is PCM16 mono at the call's rate (resampled in
:mod:`voice.media.pcm`), written atomically under a name that hashes the text, voice, rate and
engine version: a file that exists is complete and current.

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
import hashlib
import importlib.metadata
import itertools
import json
import logging
import os
import queue
import shutil
import subprocess
import tempfile
import threading
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voice.media.leftovers import remove_files
from voice.media.pcm import Pcm, bytes_to_samples, resample, samples_to_bytes, write_wav

log = logging.getLogger(__name__)

# espeak-ng voice names for the voices the service speaks; other espeak-ng names pass through.
VOICES: dict[str, str] = {"en": "en", "ko": "ko"}

# espeak-ng's own output rate for its formant voices (pyttsx3's driver assumes it too).
_ESPEAK_RATE_HZ = 22050


_SOX = shutil.which("sox")


def _sox_resample(samples: array[int], src_hz: int, dst_hz: int, out: Path) -> None:
    """PCM16 mono at ``src_hz`` -> a WAV file at ``dst_hz`` (sox's high-quality resampler)."""
    argv = [
        _SOX or "sox",
        "-q",
        "-t", "raw", "-r", str(src_hz), "-e", "signed-integer", "-b", "16", "-c", "1",
        "-L",  # little-endian input, as samples_to_bytes writes
        "-",
        "-t", "wav", "-r", str(dst_hz), "-e", "signed-integer", "-b", "16", "-c", "1",
        str(out),
        "rate", "-h",
    ]  # fmt: skip
    done = subprocess.run(
        argv, input=samples_to_bytes(samples), capture_output=True, timeout=30, check=False
    )
    if done.returncode != 0:
        raise TtsError(f"sox could not resample: {done.stderr.decode(errors='replace')[:200]}")


class TtsError(RuntimeError):
    """Speech synthesis failed (espeak-ng or pyttsx3 missing, unknown voice, empty output)."""


@dataclass(frozen=True, slots=True)
class _Job:
    text: str
    voice: str
    rate_hz: int
    out: Path
    done: concurrent.futures.Future[Path] = field(default_factory=concurrent.futures.Future)
    background: bool = False  # start-up prerendering: yields to anything a caller waits for


_URGENT, _BACKGROUND = 0, 1


class _SpeechThread:
    """The one thread that owns espeak-ng in this process."""

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
                self._render(job)
            except TtsError as exc:
                job.done.set_exception(exc)
            except Exception as exc:  # ctypes and file errors: still the caller's TtsError
                log.exception("text-to-speech failed")
                job.done.set_exception(TtsError(f"text-to-speech failed: {exc}"))
            else:
                job.done.set_result(job.out)

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
        return f"pyttsx3-{importlib.metadata.version('pyttsx3')}/espeak-ng-{espeak_version}"

    def _on_audio(self, wav: Any, numsamples: int, _events: Any) -> int:
        # Called by espeak-ng on this thread, inside Synth: copy the samples and go on.
        if numsamples > 0 and wav:
            self._chunks.append(ctypes.string_at(wav, numsamples * 2))
        return 0

    def _synth(self, text: str, voice: str) -> array[int]:
        espeak = self._espeak
        status = espeak.SetVoiceByName(VOICES.get(voice, voice).encode())
        if status != espeak.EE_OK:
            raise TtsError(f"espeak-ng has no voice {voice!r} (status {status})")
        self._chunks = []
        # Set on every render: a pyttsx3 Engine elsewhere in the process would replace it.
        espeak.SetSynthCallback(self._on_audio)
        status = espeak.Synth(text, flags=espeak.CHARS_UTF8 | espeak.ENDPAUSE)
        if status != espeak.EE_OK:
            raise TtsError(f"espeak-ng failed to synthesise (status {status})")
        # Returns at once in synchronous mode; waits out a RETRIEVAL-mode init by pyttsx3.
        espeak.Synchronize()
        return bytes_to_samples(b"".join(self._chunks))

    def _render(self, job: _Job) -> None:
        self.version.result()  # raises TtsError when espeak-ng could not start
        spoken = self._synth(job.text, job.voice)
        if not spoken:
            raise TtsError("espeak-ng produced no audio")
        fd, tmp_name = tempfile.mkstemp(suffix=".wav.tmp", dir=job.out.parent)
        os.close(fd)
        try:
            if _SOX is not None:
                # sox resamples in C while this thread waits without the GIL; the pure-Python
                # resampler held the GIL for ~0.1 s per prompt and stalled the event loop.
                _sox_resample(spoken, self._rate_hz, job.rate_hz, Path(tmp_name))
            else:
                pcm = Pcm(resample(spoken, self._rate_hz, job.rate_hz), job.rate_hz)
                write_wav(Path(tmp_name), pcm)
            os.replace(tmp_name, job.out)  # readers never see half a file
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise


class PromptRenderer:
    """Renders prompt text to WAV files for the call's media, once per text.

    ``cache_dir`` (e.g. ``$CLINIC_DATA_DIR/prompts``) is created if missing. Texts that
    hold a secret (a spoken code) should be rendered with ``cache=False`` or, better, be
    composed from cached pieces, because cached files are named by a hash of their text.
    """

    def __init__(self, cache_dir: Path) -> None:
        self._dir = cache_dir
        self._dir.mkdir(parents=True, exist_ok=True)
        self._inflight: dict[Path, tuple[asyncio.Future[Path], bool]] = {}
        self._renders = 0

    @property
    def renders(self) -> int:
        """How many times this renderer actually synthesised (cache misses)."""
        return self._renders

    def remove_leftovers(self) -> int:
        """Delete the ``cache=False`` files a killed process left (blocking: call it from a
        thread, before any call). Returns how many."""
        return remove_files(self._dir, "once-*.wav", None, 0.0)

    async def render(
        self,
        text: str,
        *,
        voice: str = "en",
        rate_hz: int = 8000,
        cache: bool = True,
        background: bool = False,
    ) -> Path:
        """A WAV file (PCM16 mono at ``rate_hz``) speaking ``text``.

        With ``cache=False`` the file gets a random name and belongs to the caller, who
        deletes it after playing it. ``background`` renders yield to every other render (for
        start-up prerendering). Raises :class:`TtsError`.
        """
        if not text.strip():
            raise TtsError("nothing to say: empty prompt text")
        if not 4000 <= rate_hz <= 48000:
            raise TtsError(f"unsupported sample rate {rate_hz} Hz")
        speech = _SpeechThread.get()
        version = await asyncio.wrap_future(speech.version)
        if not cache:
            fd, name = tempfile.mkstemp(prefix="once-", suffix=".wav", dir=self._dir)
            os.close(fd)
            return await self._synthesise(speech, text, voice, rate_hz, Path(name))
        path = self._dir / f"{_cache_key(text, voice, rate_hz, version)}.wav"
        pending = self._inflight.get(path)
        if pending is not None and (background or not pending[1]):
            return await asyncio.shield(pending[0])
        if path.exists():  # one stat of a local file: cheaper than a hop to the thread
            return path
        # A caller waiting for a text that is queued in the background gets its own urgent
        # render of it (the same bytes; the file is replaced atomically).
        task = asyncio.ensure_future(
            self._synthesise(speech, text, voice, rate_hz, path, background=background)
        )
        self._inflight[path] = (task, background)

        def forget(_: object) -> None:
            if self._inflight.get(path, (None, False))[0] is task:
                del self._inflight[path]

        task.add_done_callback(forget)
        # shield: one cancelled waiter must not cancel the render the others wait for.
        return await asyncio.shield(task)

    async def _synthesise(
        self,
        speech: _SpeechThread,
        text: str,
        voice: str,
        rate_hz: int,
        out: Path,
        *,
        background: bool = False,
    ) -> Path:
        self._renders += 1
        log.debug("rendering a prompt: voice=%s rate=%s file=%s", voice, rate_hz, out.name)
        job = _Job(text=text, voice=voice, rate_hz=rate_hz, out=out, background=background)
        speech.submit(job)
        return await asyncio.wrap_future(job.done)

    async def prerender(
        self,
        texts: Iterable[str],
        *,
        voice: str = "en",
        rate_hz: int = 8000,
        background: bool = False,
    ) -> list[Path]:
        """Render many texts (static prompts at start-up: ``background=True``)."""
        return list(
            await asyncio.gather(
                *(
                    self.render(t, voice=voice, rate_hz=rate_hz, background=background)
                    for t in texts
                )
            )
        )

    def render_sync(self, text: str, *, voice: str = "en", rate_hz: int = 8000) -> Path:
        """Blocking :meth:`render` for command-line tools; never call it on an event loop."""
        return asyncio.run(self.render(text, voice=voice, rate_hz=rate_hz))


def _cache_key(text: str, voice: str, rate_hz: int, version: str) -> str:
    blob = json.dumps([text, voice, rate_hz, version], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:32]
