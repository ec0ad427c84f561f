"""How long a worker's pump may wait: deadlines and listeners bound it, nothing else does."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pytest

from voice.sip.pjsua import LISTEN_PUMP_MS, MEDIA_PUMP_MS, Engine, EngineConfig


@dataclass
class _FakeCall:
    listener: object | None = None
    media_active: bool = False
    ring_deadline: float | None = None
    answer_deadline: float | None = None
    media_deadline: float | None = None
    redial: object | None = None


def _engine(*calls: _FakeCall) -> Engine:
    engine = Engine(EngineConfig("127.0.0.1", 0), lambda ev: None)
    engine._calls = {str(i): c for i, c in enumerate(calls)}  # type: ignore[misc]
    return engine


def test_no_call_waits_the_idle_time() -> None:
    assert _engine().pump_ms(500) == 500


def test_calls_without_media_do_not_shorten_the_wait() -> None:
    # Commands and the end of a play wake the pump; a flash call has no media.
    assert _engine(_FakeCall(), _FakeCall()).pump_ms(500) == 500


def test_a_call_with_media_bounds_the_wait_for_its_keypad_digits() -> None:
    # pjsua2 hands a digit over only at the start of the next libHandleEvents.
    assert _engine(_FakeCall(), _FakeCall(media_active=True)).pump_ms(500) == MEDIA_PUMP_MS
    assert MEDIA_PUMP_MS <= 75  # the keypad goal is 150 ms from digit to the next prompt


def test_a_listener_polls_faster_than_media_alone() -> None:
    call = _FakeCall(listener=object(), media_active=True)
    assert _engine(call, _FakeCall(media_active=True)).pump_ms(500) == LISTEN_PUMP_MS


def test_a_listener_polls_its_audio_chunks() -> None:
    assert _engine(_FakeCall(), _FakeCall(listener=object())).pump_ms(500) == LISTEN_PUMP_MS


@pytest.mark.parametrize("field", ["ring_deadline", "answer_deadline", "media_deadline"])
def test_the_nearest_deadline_bounds_the_wait(field: str) -> None:
    now = time.monotonic()
    deadline = now + 0.120
    near = _FakeCall()
    setattr(near, field, deadline)
    far = _FakeCall(ring_deadline=now + 0.300)
    engine = _engine(far, near)
    before = time.monotonic()
    wait = engine.pump_ms(500)
    after = time.monotonic()
    # The wait to the near deadline from when pump_ms read the clock, between the two readings
    # here: no fixed slack that a loaded machine's pause could exceed (20 ms were allowed).
    assert max(0, math.ceil((deadline - after) * 1000)) <= wait
    assert wait <= max(0, math.ceil((deadline - before) * 1000))


def test_a_passed_deadline_does_not_wait() -> None:
    assert _engine(_FakeCall(ring_deadline=time.monotonic() - 1)).pump_ms(500) == 0


def test_a_call_waiting_for_a_pjsua_slot_is_dialled_again_next_millisecond() -> None:
    assert _engine(_FakeCall(), _FakeCall(redial=object())).pump_ms(500) == 1
