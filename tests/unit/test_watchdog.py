"""The hung-worker rules: limits derived from the timeouts, and who counts as hung."""

from __future__ import annotations

from typing import Any

import pytest

from master.watchdog import BOOT_S, Limits, handle_budget_s, hung_reason, limits, responsive
from sendscript.ipc import heartbeat_interval_s
from sendscript.settings import Settings

LIMITS = Limits(silence_s=30.0, boot_s=60.0, task_s=100.0, check_s=1.0, quiet_s=3.0)


def settings(**changes: Any) -> Settings:
    fields: dict[str, Any] = {"redis_timeout_s": 5.0, "mongo_timeout_s": 10.0,
                              "central_connect_timeout_s": 3.0, "central_timeout_s": 10.0,
                              "worker_timeout_s": 30.0, "worker_task_timeout_s": 0.0}
    fields.update(changes)
    return Settings(_env_file=None, **fields)  # type: ignore[call-arg]


def test_the_task_budget_adds_up_the_handlers_steps() -> None:
    # lock 2*5, claim 2*10, record 2*10, send 3+10, then 2*2*10 + 2*5 to end the attempt.
    assert handle_budget_s(settings()) == 10 + 20 + 20 + 13 + 50


@pytest.mark.parametrize("name", ["redis_timeout_s", "mongo_timeout_s",
                                  "central_connect_timeout_s", "central_timeout_s"])
def test_every_timeout_lengthens_the_budget(name: str) -> None:
    base = handle_budget_s(settings())
    assert handle_budget_s(settings(**{name: getattr(settings(), name) + 7.0})) >= base + 7.0


def test_by_default_the_task_limit_is_the_budget() -> None:
    got = limits(settings())
    assert got.task_s == handle_budget_s(settings())
    assert got.silence_s == 30.0 and got.boot_s == BOOT_S
    assert got.check_s <= 1.0


def test_a_configured_task_limit_above_the_budget_is_kept() -> None:
    assert limits(settings(worker_task_timeout_s=500.0)).task_s == 500.0


@pytest.mark.parametrize("task_s", [5.0, 100.0, 113.0])
def test_a_configured_task_limit_a_healthy_task_may_reach_is_refused(task_s: float) -> None:
    with pytest.raises(ValueError, match="would kill healthy workers"):
        limits(settings(worker_task_timeout_s=task_s))


def test_a_short_silence_limit_gets_more_time_to_boot_and_a_faster_check() -> None:
    got = limits(settings(worker_timeout_s=2.0))
    assert got.silence_s == 2.0 and got.boot_s == BOOT_S and got.check_s == 0.5


@pytest.mark.parametrize("timeout_s", [0.5, 2.0, 5.0, 30.0, 300.0])
def test_heartbeats_come_several_times_per_silence_limit(timeout_s: float) -> None:
    assert heartbeat_interval_s(timeout_s) * 5 <= timeout_s
    assert heartbeat_interval_s(timeout_s) <= 1.0


def test_a_worker_that_beats_and_holds_young_tasks_is_fine() -> None:
    assert hung_reason(100.0, online=True, last_seen=99.0, oldest_task=("t", 50.0),
                       limits=LIMITS) is None
    assert hung_reason(100.0, online=True, last_seen=70.0, oldest_task=None,
                       limits=LIMITS) is None  # exactly at the limit: not yet


def test_silence_past_the_limit_is_hung() -> None:
    reason = hung_reason(100.0, online=True, last_seen=69.0, oldest_task=None, limits=LIMITS)
    assert reason is not None and "no heartbeat for 31.0s" in reason and "30s" in reason


def test_before_it_is_online_a_worker_has_the_boot_limit() -> None:
    assert hung_reason(100.0, online=False, last_seen=50.0, oldest_task=None,
                       limits=LIMITS) is None
    reason = hung_reason(100.0, online=False, last_seen=39.0, oldest_task=None, limits=LIMITS)
    assert reason is not None and "before coming online" in reason


def test_a_task_held_past_the_limit_is_hung_even_with_heartbeats() -> None:
    reason = hung_reason(200.0, online=True, last_seen=199.5, oldest_task=("t-9", 99.0),
                         limits=LIMITS)
    assert reason is not None and "task t-9" in reason and "101.0s" in reason


def test_a_worker_missing_a_few_beats_gets_no_new_tasks() -> None:
    got = limits(settings(worker_timeout_s=30.0))
    assert got.quiet_s == 3.0, "three missed beats of one second"
    assert got.quiet_s < got.silence_s, "long before it counts as hung"
    assert responsive(10.0, 7.5, got) and responsive(10.0, 7.0, got)
    assert not responsive(10.0, 6.9, got)
