"""The circuit breaker's state machine, driven by outcomes and a clock."""

from __future__ import annotations

import pytest

from sendscript.breaker import (
    BreakerPolicy,
    BreakerState,
    Circuit,
    CircuitBreaker,
    InvalidCircuitChange,
)

POLICY = BreakerPolicy(window_s=60, min_volume=10, degrade_at=0.7, recover_below=0.35,
                       trip_after=20, pauses_s=(10, 20, 40, 60))


def feed(b: CircuitBreaker, ok: int, failed: int, now: float) -> Circuit:
    b.record([True] * ok + [False] * failed, now)
    return b.state.circuit


def test_low_volume_never_degrades() -> None:
    b = CircuitBreaker(POLICY)
    assert feed(b, 0, 9, 0) is Circuit.CLOSED  # 9 failures: below min volume and streak


def test_failure_rate_degrades_and_recovery_closes() -> None:
    b = CircuitBreaker(POLICY)
    assert feed(b, 3, 7, 0) is Circuit.DEGRADED  # 70 %
    assert feed(b, 20, 0, 1) is Circuit.CLOSED  # 7 / 30 = 23 % < 35 %


def test_degraded_stays_while_the_rate_is_between_the_thresholds() -> None:
    b = CircuitBreaker(POLICY)
    feed(b, 3, 7, 0)
    feed(b, 7, 3, 1)  # 10 / 20 = 50 %
    assert b.evaluate(2) is Circuit.DEGRADED


def test_old_buckets_leave_the_window() -> None:
    b = CircuitBreaker(POLICY)
    feed(b, 3, 7, 0)
    assert b.evaluate(30) is Circuit.DEGRADED
    assert b.failure_rate() == pytest.approx(0.7)
    assert b.evaluate(59.5) is Circuit.DEGRADED
    assert b.evaluate(61) is Circuit.CLOSED  # a whole window with nothing to judge
    assert b.failure_rate() is None


def test_consecutive_failures_open_and_the_pause_grows() -> None:
    b = CircuitBreaker(POLICY)
    pauses = []
    now = 0.0
    for _ in range(5):
        assert feed(b, 0, 20, now) is Circuit.OPEN
        pauses.append(b.retry_in(now))
        assert not b.allow(now + 1)
        now = b.state.open_until
        assert b.allow(now)  # half-open: one probe
        assert b.state.circuit is Circuit.HALF_OPEN
        assert not b.allow(now)  # the probe is out: wait for it
        assert feed(b, 0, 1, now) is Circuit.OPEN  # the probe failed
        pauses.append(b.retry_in(now))
        now = b.state.open_until
        b.allow(now)
        assert feed(b, 1, 0, now) is Circuit.DEGRADED  # the probe worked
    assert pauses[:4] == [10, 20, 40, 60]
    assert max(pauses) == 60


def test_a_window_closed_resets_the_pause() -> None:
    b = CircuitBreaker(POLICY)
    feed(b, 0, 20, 0)
    b.allow(10)
    feed(b, 1, 0, 10)  # degraded after the probe, trips = 1
    assert b.evaluate(10 + 61) is Circuit.CLOSED
    assert b.evaluate(10 + 61 + 61) is Circuit.CLOSED
    feed(b, 0, 20, 200)
    assert b.retry_in(200) == 10


def test_a_success_ends_the_streak() -> None:
    b = CircuitBreaker(POLICY)
    feed(b, 0, 19, 0)
    b.record([True], 0)
    assert feed(b, 50, 19, 1) is not Circuit.OPEN


def test_state_round_trips_through_a_dict() -> None:
    b = CircuitBreaker(POLICY)
    feed(b, 3, 7, 5)
    copy = CircuitBreaker(POLICY, BreakerState.from_dict(b.state.to_dict()))
    assert copy.state == b.state


def test_only_listed_transitions_happen() -> None:
    b = CircuitBreaker(POLICY)
    with pytest.raises(InvalidCircuitChange):
        b._move(Circuit.HALF_OPEN, 0)
