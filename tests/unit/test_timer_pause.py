"""When the step timers hold off after a store outage (:mod:`verification.timer_pause`)."""

from __future__ import annotations

import pytest

from verification.timer_pause import TimerPause

QUIET_S = 5.0


def test_one_failed_command_is_a_blip_not_an_outage() -> None:
    pause = TimerPause(QUIET_S, blip_s=1.0)
    pause.failed(10.0)
    assert pause.paused(10.9), "long enough for a report kept in the blip to land"
    assert not pause.paused(11.0)
    pause.answered()
    pause.failed(12.4)  # another lone failure later: still not in a row
    assert not pause.paused(13.4)


def test_failures_in_a_row_pause_until_the_outage_has_been_over_for_quiet_s() -> None:
    pause = TimerPause(QUIET_S)
    pause.failed(10.0)
    pause.failed(10.2)
    assert pause.paused(10.2)
    for t in (10.4, 10.6, 30.0):  # a long outage: the loop's probes keep failing
        pause.failed(t)
    pause.answered()  # Redis is back at about 30.2
    assert pause.paused(34.9)
    assert not pause.paused(35.0)


@pytest.mark.parametrize("every_s", [1.2, 2.0, 3.0])
def test_a_redis_that_fails_now_and_then_does_not_hold_the_timers(every_s: float) -> None:
    # One failed command every few seconds, each followed by answers: the timers run again a
    # blip after each (a full pause on each would hold every fallback for as long as Redis
    # kept failing).
    pause = TimerPause(QUIET_S, blip_s=1.0)
    t = 0.0
    while t < 60.0:
        pause.failed(t)
        pause.answered()
        assert not pause.paused(t + 1.0)
        t += every_s


def test_a_lone_failure_after_an_outage_does_not_extend_its_pause() -> None:
    pause = TimerPause(QUIET_S, blip_s=1.0)
    pause.failed(0.0)
    pause.failed(0.2)  # paused until 5.2
    pause.answered()
    pause.failed(3.0)  # one failed probe while paused: a blip, within the pause
    pause.answered()
    assert not pause.paused(5.2)
