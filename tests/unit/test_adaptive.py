"""Adaptive rate limits: the AIMD rule (pure), the syntax, and reading Retry-After."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from sendscript.adaptive import AdaptParams, AdaptState, Signals, decide, hold_ms
from sendscript.limits import RateLimit, parse_limits
from sendscript.settings import Settings
from worker.central import retry_after

LIM = RateLimit("global", 20, 1000, 2, 100)
P = AdaptParams(decrease=0.5, step=0.1, latency_s=0.3)
T = 1_000_000


def test_the_syntax_marks_a_limit_adaptive_with_its_bounds() -> None:
    limits = parse_limits("global=20/1s~2..100,queue:bulk=5/2s")
    assert limits["global"] == LIM and limits["global"].rule == "20/1s~2..100"
    assert not limits["queue:bulk"].adaptive
    s = Settings(rate_limits="global=20/1s~2..100")
    assert Settings(rate_limits=s.to_env()["SENDSCRIPT_RATE_LIMITS"]).rate_limits == {
        "global": "20/1s~2..100"}
    for bad in ("global=20/1s~30..100", "global=20/1s~0..100", "global=20/1s~2.."):
        with pytest.raises(ValueError):
            parse_limits(bad)


def test_a_429_lowers_it_multiplicatively_once_a_duration_and_never_below_the_floor() -> None:
    state = AdaptState(20.0, 3, at_ms=T - 5000, down_at_ms=T - 5000)
    change = decide(LIM, state, Signals(throttled=4, retry_after_s=2), P, T)
    assert change is not None and change.value == 10.0 and change.decreased
    assert change.why == "429 x4, Retry-After 2s"
    # The 429s of the same overshoot, within a duration of the decrease: no more.
    lowered = AdaptState(10.0, 4, at_ms=T, down_at_ms=T)
    assert decide(LIM, lowered, Signals(throttled=9), P, T + 999) is None
    again = decide(LIM, lowered, Signals(throttled=1), P, T + 1000)
    assert again is not None and again.value == 5.0
    low = decide(LIM, AdaptState(3.0, 5), Signals(throttled=1), P, T)
    assert low is not None and low.value == 2.0  # the floor
    assert decide(LIM, AdaptState(2.0, 6), Signals(throttled=1), P, T) is None


def test_latency_above_the_target_lowers_it_and_a_held_limit_climbs_additively() -> None:
    state = AdaptState(20.0, 1, at_ms=T - 2000, down_at_ms=T - 2000)
    slow = decide(LIM, state, Signals(latency_s=0.5), P, T)
    assert slow is not None and slow.value == 10.0 and "latency" in slow.why
    assert decide(LIM, state, Signals(latency_s=0.2), P, T) is None  # fast, not held
    climb = decide(LIM, state, Signals(latency_s=0.2, held=3), P, T)
    assert climb is not None and climb.value == 30.0 and not climb.decreased  # +0.1 x 100
    # Once a duration at most, and never above the ceiling.
    assert decide(LIM, AdaptState(30.0, 2, at_ms=T - 500), Signals(held=3), P, T) is None
    top = decide(LIM, AdaptState(95.0, 2), Signals(held=3), P, T)
    assert top is not None and top.value == 100.0
    assert decide(LIM, AdaptState(100.0, 3), Signals(held=3), P, T) is None
    # No latency target: latency never lowers it.
    assert decide(LIM, state, Signals(latency_s=9.0), AdaptParams(), T) is None


def test_retry_after_reads_seconds_and_dates_and_holds_at_most_five_minutes() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after("3") == 3.0 and retry_after(" 1.5 ") == 1.5
    assert retry_after("Thu, 01 Jan 2026 12:00:10 GMT", now) == 10.0
    assert retry_after(None) is None and retry_after("soon") is None
    assert retry_after("-4") == 0.0
    assert hold_ms(Signals(throttled=1, retry_after_s=2.5)) == 2500
    assert hold_ms(Signals(throttled=1)) == 0
    assert hold_ms(Signals(throttled=1, retry_after_s=3600)) == 300_000
