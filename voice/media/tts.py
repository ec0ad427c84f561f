"""Spoken prompts: pyttsx3 (espeak-ng) on its own thread, WAV files cached on disk.

pyttsx3 engines are not thread-safe, espeak-ng can be initialised only once per process and
``runAndWait`` blocks, so one daemon thread per process owns the engine and every render in
the process goes through it. The event loop only awaits a future. Output is PCM16 mono at the
call's rate (resampled in :mod:`voice.media.pcm`), written atomically under a name that hashes
the text, voice, rate and engine version: a file that exists is complete and current.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import importlib.metadata
import json
import logging
import os
import queue
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voice.media.pcm import Pcm, PcmError, read_wav, resample, write_wav

log = logging.getLogger(__name__)

# espeak-ng voice names for the voices the service speaks.
VOICES: dict[str, str] = {"en": "en", "ko": "ko"}


class TtsError(RuntimeError):
    """Speech synthesis failed (espeak-ng or pyttsx3 missing, unknown voice, empty output)."""


@dataclass(frozen=True, slots=True)
class _Job:
    text: str
    voice: str
    rate_hz: int
    out: Path
    done: concurrent.futures.Future[Path] = field(default_factory=concurrent.futures.Future)


class _SpeechThread:
    """The one thread that owns the pyttsx3 engine in this process."""

    _instance: _SpeechThread | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._engine: Any = None
        self._errors: list[BaseException] = []
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
        self._jobs.put(job)

    def _run(self) -> None:
        try:
            self.version.set_result(self._engine_version())
        except Exception as exc:  # reported to every caller through the future
            log.error("text-to-speech unavailable: %s", exc)
            self.version.set_exception(TtsError(f"text-to-speech unavailable: {exc}"))
        while True:
            job = self._jobs.get()
            if not job.done.set_running_or_notify_cancel():
                continue
            try:
                self._render(job)
            except TtsError as exc:
                job.done.set_exception(exc)
            except Exception as exc:  # pyttsx3 raises bare RuntimeError/ValueError/OSError
                log.exception("text-to-speech failed")
                job.done.set_exception(TtsError(f"text-to-speech failed: {exc}"))
            else:
                job.done.set_result(job.out)

    def _engine_version(self) -> str:
        import pyttsx3.drivers._espeak as espeak

        info = espeak.Info(None)
        espeak_version = info.decode() if isinstance(info, bytes) else str(info)
        return f"pyttsx3-{importlib.metadata.version('pyttsx3')}/espeak-ng-{espeak_version}"

    def _new_engine(self) -> Any:
        import pyttsx3

        # pyttsx3.init() would hand back a shared, possibly wedged engine; build our own.
        engine = pyttsx3.Engine("espeak")
        engine.connect("error", self._on_error)
        return engine

    def _on_error(self, exception: BaseException | None = None, **_: object) -> None:
        # pyttsx3 reports failed queued commands (e.g. an unknown voice) here, not by raising.
        self._errors.append(exception or TtsError("unknown pyttsx3 error"))

    def _render(self, job: _Job) -> None:
        self.version.result()  # raises TtsError when espeak-ng could not start
        if self._engine is None:
            self._engine = self._new_engine()
        engine = self._engine
        self._errors.clear()
        fd, raw_name = tempfile.mkstemp(suffix=".raw.wav", dir=job.out.parent)
        os.close(fd)
        raw = Path(raw_name)
        try:
            try:
                engine.setProperty("voice", VOICES.get(job.voice, job.voice))
                engine.save_to_file(job.text, raw_name)
                engine.runAndWait()
            except Exception:
                # A failed runAndWait leaves the engine "in loop" for ever: start afresh.
                self._engine = None
                raise
            if self._errors:
                raise TtsError(f"espeak-ng refused voice {job.voice!r}: {self._errors[0]}")
            try:
                spoken = read_wav(raw)
            except PcmError as exc:
                raise TtsError(f"espeak-ng wrote no usable audio: {exc}") from exc
            if not spoken.samples:
                raise TtsError("espeak-ng produced no audio")
            pcm = Pcm(resample(spoken.samples, spoken.rate_hz, job.rate_hz), job.rate_hz)
            fd, tmp_name = tempfile.mkstemp(suffix=".wav.tmp", dir=job.out.parent)
            os.close(fd)
            try:
                write_wav(Path(tmp_name), pcm)
                os.replace(tmp_name, job.out)  # readers never see half a file
            except BaseException:
                Path(tmp_name).unlink(missing_ok=True)
                raise
        finally:
            raw.unlink(missing_ok=True)


class PromptRenderer:
    """Renders prompt text to WAV files for the call's media, once per text.

    ``cache_dir`` (e.g. ``$CLINIC_DATA_DIR/prompts``) is created if missing. Texts that
    hold a secret (a spoken code) should be rendered with ``cache=False`` or, better, be
    composed from cached pieces, because cached files are named by a hash of their text.
    """

    def __init__(self, cache_dir: Path) -> None:
        self._dir = cache_dir
        self._dir.mkdir(parents=True, exist_ok=True)
        self._inflight: dict[Path, asyncio.Future[Path]] = {}
        self._renders = 0

    @property
    def renders(self) -> int:
        """How many times this renderer actually synthesised (cache misses)."""
        return self._renders

    async def render(
        self, text: str, *, voice: str = "en", rate_hz: int = 8000, cache: bool = True
    ) -> Path:
        """A WAV file (PCM16 mono at ``rate_hz``) speaking ``text``.

        With ``cache=False`` the file gets a random name and belongs to the caller, who
        deletes it after playing it. Raises :class:`TtsError`.
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
        if pending is not None:
            return await asyncio.shield(pending)
        if path.exists():  # one stat of a local file: cheaper than a hop to the thread
            return path
        task = asyncio.ensure_future(self._synthesise(speech, text, voice, rate_hz, path))
        self._inflight[path] = task
        task.add_done_callback(lambda _: self._inflight.pop(path, None))
        # shield: one cancelled waiter must not cancel the render the others wait for.
        return await asyncio.shield(task)

    async def _synthesise(
        self, speech: _SpeechThread, text: str, voice: str, rate_hz: int, out: Path
    ) -> Path:
        self._renders += 1
        log.debug("rendering a prompt: voice=%s rate=%s file=%s", voice, rate_hz, out.name)
        job = _Job(text=text, voice=voice, rate_hz=rate_hz, out=out)
        speech.submit(job)
        return await asyncio.wrap_future(job.done)

    async def prerender(
        self, texts: Iterable[str], *, voice: str = "en", rate_hz: int = 8000
    ) -> list[Path]:
        """Render the static prompts at start-up so the first caller does not wait."""
        return list(
            await asyncio.gather(*(self.render(t, voice=voice, rate_hz=rate_hz) for t in texts))
        )

    def render_sync(self, text: str, *, voice: str = "en", rate_hz: int = 8000) -> Path:
        """Blocking :meth:`render` for command-line tools; never call it on an event loop."""
        return asyncio.run(self.render(text, voice=voice, rate_hz=rate_hz))


def _cache_key(text: str, voice: str, rate_hz: int, version: str) -> str:
    blob = json.dumps([text, voice, rate_hz, version], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:32]
