"""The spoken verification code: "Your verification code for <clinic> is 4, 8, 1, 5, 2, 3".

The file is the pause before a reading, then the code said once: the voice-call channel
plays it twice, and so knows when the callee has heard it in full once (a callee who hangs up
as the last digit ends has heard it).

The words are the caller's (:mod:`verification.wording`, in the verification's language).
Composed from cached pieces (the sentence head and each digit, rendered once per voice and
rate by :class:`voice.media.tts.PromptRenderer`), so no file named after a code is ever cached.
The composed file is private to one call: written 0600 (in a :class:`PrivateFolder`: on tmpfs
when there is one) and deleted by the caller after use.
"""

from __future__ import annotations

import asyncio
import contextlib
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from voice.media.pcm import Pcm, read_wav, silence, wav_bytes
from voice.media.private_folder import PrivateFolder
from voice.media.tts import PromptRenderer

DIGITS = "0123456789"
# Silence between two digits of the code: time to write one down before the next. 0.25 s
# ran the digits together for an older listener ("4, 8, 1" as one word); 0.7 s is about a
# spoken comma and a half. A reading of 8 digits is then about 14 s (espeak-ng's English,
# its pause and tail included), well inside PLAY_TIMEOUT_S, and a voice step that reads
# twice after ringing 45 s and asking for 1 twice fits CLINIC_STEP_TIMEOUT_VOICE_S's 120.
DIGIT_GAP_S = 0.7
REPEAT_GAP_S = 1.0
TAIL_S = 0.3


def reading_s(head_s: float, digit_s: Sequence[float], length: int) -> float:
    """How long one reading of a ``length``-digit code can last, its pause and tail
    included: ``head_s`` the rendered head sentence, ``digit_s`` each rendered digit."""
    return REPEAT_GAP_S + head_s + length * (DIGIT_GAP_S + max(digit_s)) + TAIL_S


async def compose(
    renderer: PromptRenderer,
    head: str,
    code: str,
    out: PrivateFolder,
    *,
    voice: str = "en",
    rate_hz: int = 8000,
) -> Path:
    """A private WAV file: :data:`REPEAT_GAP_S` of silence, then ``head`` and the code's
    digits in ``voice``, then :data:`TAIL_S`, written in ``out`` (on tmpfs when there is
    one); the caller plays it twice, then deletes it.

    Cancelled while the file is being written (the thread writing it cannot be stopped), it
    waits for the thread and deletes the file before the cancel goes on: no caller is left to.
    """
    # Every digit, whichever the code holds: a cached piece's lookup touches its file's time,
    # which would otherwise show which digits this code has to anyone who can list the cache.
    pieces = [head, *DIGITS]
    paths = await renderer.prerender(pieces, voice=voice, rate_hz=rate_hz)
    by_text = dict(zip(pieces, paths, strict=True))
    writing = asyncio.ensure_future(asyncio.to_thread(_write, by_text, head, code, out, rate_hz))
    try:
        return await asyncio.shield(writing)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):  # the write failed: _write deleted its file
            (await writing).unlink(missing_ok=True)
        raise


def remove_stale(out: PrivateFolder, older_than_s: float, now: float) -> int:
    """Delete composed files older than ``older_than_s`` in every folder of ``out`` (left by
    a process that was killed during a call). Blocking. Returns how many."""
    return out.sweep("code-*.wav", older_than_s, now)


def _write(
    by_text: dict[str, Path], head: str, code: str, out: PrivateFolder, rate_hz: int
) -> Path:
    def load(text: str) -> array[int]:
        pcm = read_wav(by_text[text])
        assert pcm.rate_hz == rate_hz
        return pcm.samples

    once = array("h", load(head))
    gap = silence(DIGIT_GAP_S, rate_hz)
    for digit in code:
        once += gap
        once += load(digit)
    # The tail: the end of a play is its last sample leaving, and the BYE follows the
    # second at once; without it the last digit could be clipped.
    samples = silence(REPEAT_GAP_S, rate_hz) + once + silence(TAIL_S, rate_hz)
    # A file cut short is deleted by the folder (a part of the code is still the code).
    pcm = Pcm(samples, rate_hz)
    return out.write("code-", lambda file: write_pcm(file, pcm))


def write_pcm(file: BinaryIO, pcm: Pcm) -> None:
    """``pcm`` as a WAV file into ``file``, a new private file (through its descriptor)."""
    file.write(wav_bytes(pcm))
