"""The WARNING of inbound MESSAGEs pjsua answered 200 and the service dropped
(:meth:`voice.sip.pjsua.Engine._note_inbound_message`): at most once a minute, and every
one dropped counted in one, a burst's tail included, without a later MESSAGE to carry it."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace as NS

import pytest

from voice.sip import pjsua
from voice.sip.pjsua import Engine, EngineConfig


def test_a_bursts_tail_is_said_within_the_minute_after_without_another_message(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """1000 MESSAGEs in a second logged "1 inbound SIP MESSAGE(s)": the other 999 waited for
    a MESSAGE a minute later to be said, and without one (nor at the stop) never were."""
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])  # pjsua reads time.monotonic
    engine = Engine(EngineConfig("127.0.0.1", 0), lambda ev: None)
    engine._ep = NS(libHandleEvents=lambda ms: None)  # a pump without pjsua
    caplog.set_level(logging.WARNING, logger=pjsua.__name__)
    for i in range(1000):
        now[0] = 1000.0 + i / 1000
        engine._note_inbound_message("out of a dialog")
    said = [r.getMessage() for r in caplog.records if "inbound SIP MESSAGE" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("1 inbound SIP MESSAGE(s)"), said
    now[0] = 1030.0
    engine.pump(0)  # within the minute: not yet
    now[0] = 1061.0
    engine.pump(0)
    engine.pump(0)  # once
    said = [r.getMessage() for r in caplog.records if "inbound SIP MESSAGE" in r.getMessage()]
    assert len(said) == 2, said
    assert said[1].startswith("999 inbound SIP MESSAGE(s) (the last out of a dialog)"), said
    engine._ep = None
