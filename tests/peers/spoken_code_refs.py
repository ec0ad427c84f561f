"""The digits of the service's own spoken-code file, as a reference a recording is matched
against (the integration and the Asterisk tiers both prove what a phone heard this way)."""

from __future__ import annotations

from pathlib import Path

from voice.media import spoken_code
from voice.media.pcm import read_wav, samples_to_bytes, silence
from voice.media.private_folder import PrivateFolder
from voice.media.tts import PromptRenderer


async def code_digits(
    renderer: PromptRenderer, head_text: str, code: str, scratch: Path, voice: str = "en"
) -> bytes:
    """The digits of ``spoken_code.compose``'s file for ``code`` (PCM16, 8 kHz).

    The file is a pause, then ``head_text`` ("Your verification code for <clinic> is"), then
    the digits. The head is the same for every code and would drown a one-digit difference,
    so the reference is the digits alone, cut at the lengths of the pieces it was composed
    from.
    """
    out = PrivateFolder(scratch, None, temp_root=scratch)  # a test's folder, not tmpfs
    composed = read_wav(await spoken_code.compose(renderer, head_text, code, out, voice=voice))
    start = len(silence(spoken_code.REPEAT_GAP_S, 8000))
    start += len(read_wav(await renderer.render(head_text, voice=voice)).samples)
    end = start
    for digit in code:
        end += len(silence(spoken_code.DIGIT_GAP_S, 8000))
        end += len(read_wav(await renderer.render(digit, voice=voice)).samples)
    return samples_to_bytes(composed.samples[start:end])
