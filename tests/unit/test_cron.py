"""cron.plan: what a schedule fires, and which fires count as missed (late, or before any
master was online to fire them)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from sendscript.cron import Misfire, Plan, Rule, plan

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def s(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


EVERY_10S = Rule(cron=None, interval_s=10.0, timezone="UTC", anchor=T0)
EVERY_5S_CRON = Rule(cron="*/5 * * * * *", interval_s=None, timezone="UTC", anchor=T0)


def test_nothing_due_fires_nothing() -> None:
    assert plan(EVERY_10S, s(30), s(25), "fire_once", 2.0, online_since=s(20)) == Plan(
        [], s(30), 0)


@pytest.mark.parametrize("misfire", ["fire_once", "skip"])
def test_without_online_since_fires_within_grace_are_on_time(misfire: Misfire) -> None:
    out = plan(EVERY_10S, s(0), s(25), misfire, 100.0)
    assert out == Plan([s(0), s(10), s(20)], s(30), 0)


@pytest.mark.parametrize("misfire", ["fire_once", "skip"])
def test_online_since_before_the_fires_changes_nothing(misfire: Misfire) -> None:
    out = plan(EVERY_10S, s(0), s(25), misfire, 100.0, online_since=s(-60))
    assert out == Plan([s(0), s(10), s(20)], s(30), 0)


def test_fires_before_online_since_are_missed_fire_once_catches_up_once() -> None:
    # No master was online at 0 s and 10 s; this one came up at 15 s. 20 s is on time.
    out = plan(EVERY_10S, s(0), s(25), "fire_once", 100.0, online_since=s(15))
    assert out == Plan([s(10), s(20)], s(30), 2), "one catch-up, at the latest missed time"


def test_fires_before_online_since_are_missed_skip_fires_none_of_them() -> None:
    out = plan(EVERY_10S, s(0), s(25), "skip", 100.0, online_since=s(15))
    assert out == Plan([s(20)], s(30), 2)


@pytest.mark.parametrize(("misfire", "fires"), [
    ("fire_once", [s(0), s(10)]),
    ("skip", [s(10)]),
])
def test_a_fire_exactly_at_online_since_is_on_time(misfire: Misfire,
                                                   fires: list[datetime]) -> None:
    out = plan(EVERY_10S, s(0), s(12), misfire, 100.0, online_since=s(10))
    assert out == Plan(fires, s(20), 1)


@pytest.mark.parametrize(("misfire", "fires"), [
    ("fire_once", [s(40), s(50)]),
    ("skip", [s(50)]),
])
def test_a_long_outage_gives_at_most_one_catch_up(misfire: Misfire,
                                                  fires: list[datetime]) -> None:
    out = plan(EVERY_10S, s(0), s(51), misfire, 100.0, online_since=s(45))
    assert out == Plan(fires, s(60), 5)


def test_late_by_grace_and_before_online_since_count_together() -> None:
    # 0 s: before online; 10 s: online but 11 s late (grace 2 s); 20 s: 1 s late, on time.
    out = plan(EVERY_10S, s(0), s(21), "fire_once", 2.0, online_since=s(5))
    assert out == Plan([s(10), s(20)], s(30), 2)


def test_on_time_fires_after_online_since_are_unaffected_by_it() -> None:
    out = plan(EVERY_10S, s(20), s(21), "skip", 2.0, online_since=s(15))
    assert out == Plan([s(20)], s(30), 0)


@pytest.mark.parametrize(("misfire", "fires"), [
    ("fire_once", [s(5), s(10)]),
    ("skip", [s(10)]),
])
def test_six_field_cron_with_online_since(misfire: Misfire, fires: list[datetime]) -> None:
    out = plan(EVERY_5S_CRON, s(0), s(12), misfire, 100.0, online_since=s(7))
    assert out == Plan(fires, s(15), 2)


def test_the_plan_names_its_late_fire_times() -> None:
    out = plan(EVERY_10S, s(0), s(21), "fire_once", 2.0, online_since=s(5))
    assert out.late == (s(0), s(10))
    assert plan(EVERY_10S, s(20), s(21), "skip", 2.0, online_since=s(15)).late == ()
