"""exponential_delay: the one backoff formula."""

from __future__ import annotations

import random

import pytest

from sendscript.backoff import exponential_delay


def test_attempt_one_is_base() -> None:
    assert exponential_delay(1, base_s=0.25, jitter=0) == 0.25


def test_attempt_zero_or_negative_is_base() -> None:
    assert exponential_delay(0, base_s=0.25, jitter=0) == 0.25
    assert exponential_delay(-3, base_s=0.25, jitter=0) == 0.25


def test_grows_by_factor() -> None:
    delays = [exponential_delay(n, base_s=0.5, jitter=0) for n in range(1, 6)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0]


def test_custom_factor() -> None:
    delays = [exponential_delay(n, base_s=1.0, factor=3.0, jitter=0) for n in range(1, 4)]
    assert delays == [1.0, 3.0, 9.0]


def test_capped() -> None:
    assert exponential_delay(10, base_s=1.0, cap_s=30.0, jitter=0) == 30.0
    assert exponential_delay(1000, base_s=1.0, cap_s=30.0, jitter=0) == 30.0


def test_base_above_cap_is_capped() -> None:
    assert exponential_delay(1, base_s=100.0, cap_s=5.0, jitter=0) == 5.0


@pytest.mark.parametrize("attempt", [1, 3, 5])
def test_jitter_stays_within_bounds(attempt: int) -> None:
    rand = random.Random(1234)
    raw = 0.5 * 2 ** (attempt - 1)
    values = [exponential_delay(attempt, base_s=0.5, jitter=0.25, rand=rand) for _ in range(500)]
    assert all(raw * 0.75 <= v <= raw * 1.25 for v in values)
    assert min(values) < raw * 0.8 and max(values) > raw * 1.2  # really spread
    assert len(set(values)) > 100


def test_jitter_never_exceeds_cap() -> None:
    rand = random.Random(7)
    values = [exponential_delay(20, base_s=1.0, cap_s=10.0, jitter=0.5, rand=rand)
              for _ in range(300)]
    assert all(5.0 <= v <= 10.0 for v in values)
    assert min(values) < 6.0


def test_jitter_is_reproducible_with_seed() -> None:
    a = [exponential_delay(3, base_s=1.0, rand=random.Random(42)) for _ in range(3)]
    b = [exponential_delay(3, base_s=1.0, rand=random.Random(42)) for _ in range(3)]
    assert a == b
    c = exponential_delay(3, base_s=1.0, rand=random.Random(43))
    assert c != a[0]


def test_wide_jitter_is_clamped_at_zero() -> None:
    rand = random.Random(0)
    values = [exponential_delay(2, base_s=1.0, jitter=1.5, rand=rand) for _ in range(300)]
    assert all(0.0 <= v <= 5.0 for v in values)
    assert min(values) == 0.0
