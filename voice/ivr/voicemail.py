"""Voicemail: a caller's recorded message. Health data, kept sealed in the data dir.

Each message is one file ``<call id>-<8 hex>.sealed`` in ``$CLINIC_DATA_DIR/voicemail``
(0600, in a 0700 folder), sealed with the call records' key and bound to its own name, and
named in its call record's values. It lives as long as call records do
(``CLINIC_CALL_RETENTION_DAYS``): :meth:`Voicemails.sweep` deletes older files, and
``GET /v1/calls/{id}/voicemail`` plays one back as WAV.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag

from sip_config.private_file import write_private
from voice.ivr.store import CallStore
from voice.media.leftovers import remove_files
from voice.media.pcm import Pcm, bytes_to_samples, wav_bytes

RATE_HZ = 8000
# A message's file name; the call id part is that of the call records (voice/ivr/api.py).
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}-[0-9a-f]{8}\.sealed")


class Voicemails:
    """The voicemail folder of one data dir."""

    def __init__(self, folder: Path, store: CallStore) -> None:
        self._folder = folder
        self._store = store

    async def save(self, call_id: str, pcm16: bytes) -> str:
        """Seal and write ``pcm16`` (8 kHz mono) for ``call_id``; return its name."""
        name = f"{call_id}-{secrets.token_hex(4)}.sealed"
        # Sealing a minute of message (hex, JSON, AES-GCM, base64) takes ~15 ms: off the loop.
        await asyncio.to_thread(self._seal_and_write, name, pcm16)
        return name

    def _seal_and_write(self, name: str, pcm16: bytes) -> None:
        write_private(self._folder / name, self._store.seal(name, {"pcm16_8k": pcm16.hex()}))

    async def wav(self, call_id: str, name: str) -> bytes | None:
        """The message ``name`` of ``call_id`` as a WAV file, or None when it is gone (or
        is not that call's, or does not open with this service's key)."""
        if not NAME.fullmatch(name) or not name.startswith(f"{call_id}-"):
            return None
        # Reading, opening and the WAV: about 10 ms for a minute of message, off the loop.
        return await asyncio.to_thread(self._read_wav, name)

    def _read_wav(self, name: str) -> bytes | None:
        try:
            sealed = (self._folder / name).read_text()
            pcm = bytes.fromhex(self._store.open(name, sealed)["pcm16_8k"])
        except (OSError, ValueError, KeyError, InvalidTag):
            return None
        return wav_bytes(Pcm(bytes_to_samples(pcm), RATE_HZ))

    def sweep(self, older_than_s: float, now: float) -> int:
        """Delete messages older than ``older_than_s`` (blocking: run it in a thread).
        Returns how many (a write cut short by a crash leaves its hidden temp file: an hour
        on, it goes too, uncounted)."""
        remove_files(self._folder, ".*.tmp", 3600.0, now)
        return remove_files(self._folder, "*.sealed", older_than_s, now)
