"""Adaptive rate limits: the AIMD rule (pure), the syntax, and reading Retry-After."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from sendscript.adaptive import AdaptParams, AdaptState, Change, Signals, decide, hold_ms
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
    assert change.why == "429 x4, Retry-After 2s" and change.plateau == 19.0
    # The 429s of the same overshoot, within a duration of the decrease: no more.
    lowered = AdaptState(10.0, 4, at_ms=T, down_at_ms=T)
    assert decide(LIM, lowered, Signals(throttled=9), P, T + 999) is None
    again = decide(LIM, lowered, Signals(throttled=1), P, T + 1000)
    assert again is not None and again.value == 5.0
    low = decide(LIM, AdaptState(3.0, 5), Signals(throttled=1), P, T)
    assert low is not None and low.value == 2.0  # the floor
    assert decide(LIM, AdaptState(2.0, 6), Signals(throttled=1), P, T) is None


def test_latency_above_the_target_lowers_it_and_the_first_look_anchors_a_curve() -> None:
    state = AdaptState(20.0, 1, at_ms=T - 2000, down_at_ms=T - 2000, plateau=20.0,
                       base=20.0, epoch_ms=T - 2000)
    slow = decide(LIM, state, Signals(latency_s=0.5), P, T)
    assert slow is not None and slow.value == 10.0 and "latency" in slow.why
    assert slow.plateau == 19.0  # one below the value that was too much
    assert decide(LIM, state, Signals(latency_s=0.2), P, T) is None  # fast, not held
    # No latency target: latency never lowers it.
    assert decide(LIM, state, Signals(latency_s=9.0), AdaptParams(), T) is None
    # A limit no look has anchored yet: a curve from where it is, nothing else moves.
    fresh = decide(LIM, AdaptState(20.0), Signals(held=5), P, T)
    assert fresh == Change(20.0, "start", False, plateau=20.0)


# After a 429 at 41: down to 36.9, a curve through 36.9 that lingers at 40. With
# step 0.0625 of that plateau it climbs 2.5 tokens in 5 s past it; it reaches the
# plateau k = (3.1 / 0.02) ** (1/3) = 5.37 s after the decrease.
AIMD = AdaptParams(decrease=0.9, step=0.0625)
DOWN = AdaptState(36.9, 7, at_ms=T, down_at_ms=T, plateau=40.0, base=36.9, epoch_ms=T)


HELD = Signals(held=3)


def climb(state: AdaptState, after_s: float, seen: Signals = HELD) -> float:
    change = decide(LIM, state, seen, AIMD, state.epoch_ms + round(after_s * 1000))
    return state.value if change is None else change.value


def test_a_held_limit_climbs_back_fast_lingers_below_the_429_then_probes_faster() -> None:
    assert climb(DOWN, 0.0) == 36.9  # the tokens in force would not change: no write
    assert 37.0 <= climb(DOWN, 0.5) < 38.0  # fast at first
    assert 39.5 <= climb(DOWN, 3.0) < 40.0  # most of the way back in 3 s
    # Near the plateau, for seconds: the value the farm last took without a 429.
    at_plateau = [climb(DOWN, t) for t in (4.5, 5.0, 5.5, 6.0)]
    assert all(39.9 <= v <= 40.05 for v in at_plateau), at_plateau
    # Past it, ever faster: 2.5 tokens 5 s on (step x plateau), 8x that 10 s on.
    assert climb(DOWN, 5.37 + 5) == pytest.approx(42.5, abs=0.1)
    assert climb(DOWN, 5.37 + 10) == pytest.approx(60.0, abs=0.2)
    assert climb(DOWN, 60) == 100.0  # never above the ceiling


def test_a_429_while_probing_past_the_plateau_goes_back_just_below_it() -> None:
    # Probing at 41 over a plateau of 40: back to 39, not 36.9; the new plateau is 40.
    probing = AdaptState(41.0, 8, at_ms=T, down_at_ms=T - 9000, plateau=40.0, base=36.9,
                         epoch_ms=T - 9000)
    change = decide(LIM, probing, Signals(throttled=2), AIMD, T)
    assert change is not None and change.value == 39.0 and change.plateau == 40.0
    # A 429 again a duration later, below the plateau now: the capacity fell, and the
    # cut is multiplicative as before.
    after = AdaptState(39.0, 9, at_ms=T, down_at_ms=T, plateau=40.0, base=39.0, epoch_ms=T)
    again = decide(LIM, after, Signals(throttled=3), AIMD, T + 1000)
    assert again is not None and again.value == pytest.approx(35.1)
    # Far above its plateau (a climb from a low start), the usual cut.
    high = AdaptState(60.0, 3, down_at_ms=T - 9000, plateau=30.0, base=30.0, epoch_ms=T - 9000)
    cut = decide(LIM, high, Signals(throttled=1), AIMD, T)
    assert cut is not None and cut.value == pytest.approx(54.0)


def test_the_climb_scales_with_the_plateau_not_the_ceiling() -> None:
    # The same curve in durations, a farm that takes 20 a second against one that
    # takes 40: half the tokens at every point past the plateau.
    def past_plateau(plateau: float, after_s: float) -> float:
        base = plateau * 0.9
        state = AdaptState(base, 7, at_ms=T, down_at_ms=T, plateau=plateau, base=base,
                           epoch_ms=T)
        k = ((plateau - base) / (0.0625 * plateau / 125)) ** (1 / 3)
        return climb(state, k + after_s) - plateau
    assert past_plateau(20, 5) == pytest.approx(1.25, abs=0.06)
    assert past_plateau(40, 5) == pytest.approx(2.5, abs=0.06)
    assert past_plateau(20, 10) == pytest.approx(10.0, abs=0.1)
    # Not with the value it has reached: the curve is one curve, it does not compound.
    up = AdaptState(21.0, 8, at_ms=T, down_at_ms=T, plateau=20.0, base=18.0, epoch_ms=T)
    same = AdaptState(20.0, 8, at_ms=T, down_at_ms=T, plateau=20.0, base=18.0, epoch_ms=T)
    assert climb(up, 12) == climb(same, 12) > 22.0


def test_it_climbs_only_while_holding_tasks_back_and_never_under_a_hold() -> None:
    assert climb(DOWN, 10, Signals()) == 36.9  # the limit is not what holds tasks back
    held = AdaptState(36.9, 7, at_ms=T, down_at_ms=T, plateau=40.0, base=36.9,
                      epoch_ms=T, hold_ms=T + 3000)
    assert climb(held, 2.9) == 36.9  # a Retry-After in force: no climb
    # The curve's time counts from the hold's end: 1 s past it is 1 s past a decrease.
    assert climb(held, 4.0) == climb(DOWN, 1.0)
    top = AdaptState(100.0, 9, plateau=100.0, base=100.0, epoch_ms=T - 60_000)
    assert decide(LIM, top, Signals(held=3), AIMD, T) is None


def test_retry_after_reads_seconds_and_dates_and_holds_at_most_five_minutes() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after("3") == 3.0 and retry_after(" 1.5 ") == 1.5
    assert retry_after("Thu, 01 Jan 2026 12:00:10 GMT", now) == 10.0
    assert retry_after(None) is None and retry_after("soon") is None
    assert retry_after("-4") == 0.0
    assert hold_ms(Signals(throttled=1, retry_after_s=2.5)) == 2500
    assert hold_ms(Signals(throttled=1)) == 0
    assert hold_ms(Signals(throttled=1, retry_after_s=3600)) == 300_000
