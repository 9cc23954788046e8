"""The retry policy: error classes, the backoff schedule, attempts, and the failure CAS."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from sendscript.models import LogType, Task, TaskLogMessage, TaskSpec
from sendscript.retry import (
    Decision,
    RetryPolicy,
    decide,
    failure_cas,
    log_retryable,
)
from sendscript.settings import Settings
from sendscript.status import TaskStatus
from worker.central import classify_status

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
OPEN = [TaskStatus.RUNNING, TaskStatus.SENT]


def settings(**changes: Any) -> Settings:
    fields: dict[str, Any] = {"retry_base_s": 5.0, "retry_factor": 2.0, "retry_cap_s": 600.0,
                              "retry_jitter": 0.2, "queue_retry_base_s": {},
                              "final_error_codes": frozenset()}
    fields.update(changes)
    return Settings(_env_file=None, **fields)  # type: ignore[call-arg]


# -- error classes -----------------------------------------------------------------------------
@pytest.mark.parametrize(("status", "retryable"), [
    (408, True), (429, True), (409, True), (500, True), (502, True), (503, True), (504, True),
    (400, False), (401, False), (403, False), (404, False), (422, False),
])
def test_central_status_classes(status: int, retryable: bool) -> None:
    # The client's classification is the policy's: nothing widens it (409: device busy).
    assert classify_status(status) is retryable
    decision = decide(RetryPolicy(max_retries=3), 1, classify_status(status) is True,
                      f"HTTP {status}", NOW)
    assert decision.retry is retryable


FINAL = frozenset({"E_NO_APP", "E_BAD_SCRIPT"})


@pytest.mark.parametrize(("log_type", "code", "expected"), [
    (LogType.SYSTEM_ERROR, None, True),
    (LogType.SYSTEM_ERROR, "E_NO_APP", True),  # a system error retries whatever its code
    (LogType.ERROR, None, True),
    (LogType.ERROR, "E_FLAKY", True),
    (LogType.ERROR, "E_NO_APP", False),
    (LogType.ERROR, "e_no_app", True),  # codes are compared exactly
    (LogType.SUCCESS, None, False),
    (LogType.INFO, None, False),
    (LogType.PROGRESS, None, False),
])
def test_log_classes(log_type: LogType, code: str | None, expected: bool) -> None:
    assert log_retryable(log_type, code, FINAL) is expected


def test_with_no_final_codes_every_error_retries() -> None:
    assert log_retryable(LogType.ERROR, "E_NO_APP", frozenset()) is True


# -- the schedule ------------------------------------------------------------------------------
def test_schedule_is_base_times_factor_to_the_attempt_capped() -> None:
    policy = RetryPolicy(max_retries=10, base_s=5.0, factor=2.0, cap_s=600.0, jitter=0.0)
    delays = [policy.delay_s(n) for n in range(1, 10)]
    assert delays == [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 600.0, 600.0]


def test_schedule_with_another_factor_and_cap() -> None:
    policy = RetryPolicy(max_retries=10, base_s=2.0, factor=3.0, cap_s=50.0, jitter=0.0)
    assert [policy.delay_s(n) for n in range(1, 6)] == [2.0, 6.0, 18.0, 50.0, 50.0]


def test_policy_defaults() -> None:
    policy = RetryPolicy(max_retries=3)
    assert (policy.base_s, policy.factor, policy.cap_s, policy.jitter) == (5.0, 2.0, 600.0, 0.2)


@pytest.mark.parametrize("attempt", [1, 2, 4])
def test_jitter_spreads_within_its_bounds(attempt: int) -> None:
    policy = RetryPolicy(max_retries=10, base_s=5.0, factor=2.0, cap_s=600.0, jitter=0.2)
    raw = 5.0 * 2 ** (attempt - 1)
    rand = random.Random(99)
    values = [policy.delay_s(attempt, rand) for _ in range(400)]
    assert all(raw * 0.8 <= v <= raw * 1.2 for v in values)
    assert min(values) < raw * 0.85 and max(values) > raw * 1.15, "really spread"


def test_jitter_never_passes_the_cap() -> None:
    policy = RetryPolicy(max_retries=10, base_s=100.0, factor=2.0, cap_s=300.0, jitter=0.2)
    rand = random.Random(5)
    values = [policy.delay_s(6, rand) for _ in range(300)]
    assert all(240.0 <= v <= 300.0 for v in values)
    assert max(values) == 300.0


# -- decide ----------------------------------------------------------------------------------
def test_a_retryable_failure_with_attempts_left_retries_in_the_backoff_window() -> None:
    policy = RetryPolicy(max_retries=3, base_s=5.0, factor=2.0, cap_s=600.0, jitter=0.2)
    for attempt, raw in [(1, 5.0), (2, 10.0), (3, 20.0)]:
        d = decide(policy, attempt, True, "HTTP 503", NOW, random.Random(attempt))
        assert d.retry and d.reason == "HTTP 503"
        assert d.run_at is not None
        assert NOW + timedelta(seconds=raw * 0.8) <= d.run_at <= NOW + timedelta(seconds=raw * 1.2)


def test_run_at_is_now_plus_the_policys_delay() -> None:
    policy = RetryPolicy(max_retries=3, base_s=7.0, jitter=0.2)
    d = decide(policy, 2, True, "x", NOW, random.Random(11))
    assert d.run_at == NOW + timedelta(seconds=policy.delay_s(2, random.Random(11)))


@pytest.mark.parametrize(("max_retries", "attempt"), [(3, 4), (3, 5), (0, 1), (1, 2)])
def test_attempts_are_exhausted_at_max_retries_plus_one(max_retries: int, attempt: int) -> None:
    policy = RetryPolicy(max_retries=max_retries)
    d = decide(policy, attempt, True, "HTTP 503", NOW)
    assert d == Decision(False, f"HTTP 503 (attempts exhausted: {attempt} of {max_retries + 1})")


def test_the_attempt_before_the_last_still_retries() -> None:
    assert decide(RetryPolicy(max_retries=3), 3, True, "x", NOW).retry
    assert decide(RetryPolicy(max_retries=1), 1, True, "x", NOW).retry


def test_a_final_failure_fails_at_once_with_its_reason() -> None:
    d = decide(RetryPolicy(max_retries=3), 1, False, "HTTP 400 unknown script", NOW)
    assert d == Decision(False, "HTTP 400 unknown script")


# -- the failure CAS -------------------------------------------------------------------------
def test_failure_cas_for_a_retry_held_by_a_master() -> None:
    run_at = NOW + timedelta(seconds=9)
    flt, update = failure_cas("t1", OPEN, 2, Decision(True, "HTTP 503", run_at), NOW,
                              master="m-1")
    assert flt == {"_id": "t1", "attempt": 2, "status": {"$in": ["running", "sent"]}}
    assert update["$set"] == {"status": "retry_waiting", "updated_at": NOW, "run_at": run_at,
                              "last_error": "HTTP 503", "master": "m-1"}
    assert "$unset" not in update


def test_failure_cas_for_a_retry_any_master_may_take() -> None:
    run_at = NOW + timedelta(seconds=9)
    flt, update = failure_cas("t1", [TaskStatus.SENT], 1, Decision(True, "late", run_at), NOW)
    assert flt == {"_id": "t1", "attempt": 1, "status": "sent"}
    assert update["$set"]["status"] == "retry_waiting" and "master" not in update["$set"]
    assert update["$unset"] == {"master": ""}


def test_failure_cas_for_a_final_failure() -> None:
    flt, update = failure_cas("t1", OPEN, 4, Decision(False, "HTTP 400"), NOW, master="m-1")
    assert flt == {"_id": "t1", "attempt": 4, "status": {"$in": ["running", "sent"]}}
    fields = update["$set"]
    assert fields["status"] == "failed" and fields["last_error"] == "HTTP 400"
    assert fields["finished_at"] == NOW and fields["purge_at"] > NOW
    assert "run_at" not in fields and "master" not in fields
    # What happens to the dedupe key as a task ends is status.py's (tests/unit/test_status.py).
    assert "master" not in update.get("$unset", {})


# -- settings: which base applies, and their env form ------------------------------------------
def test_policy_base_is_the_tasks_then_its_queues_then_the_default() -> None:
    s = settings(retry_base_s=5.0, queue_retry_base_s={"bulk": 30.0}, retry_factor=3.0,
                 retry_cap_s=90.0, retry_jitter=0.1)
    assert s.retry_policy(2, "bulk", 1.5) == RetryPolicy(2, 1.5, 3.0, 90.0, 0.1)
    assert s.retry_policy(2, "bulk") == RetryPolicy(2, 30.0, 3.0, 90.0, 0.1)
    assert s.retry_policy(2, "high") == RetryPolicy(2, 5.0, 3.0, 90.0, 0.1)
    # A base of zero is the task's choice (retry at once), not "unset".
    assert s.retry_policy(2, "bulk", 0.0).base_s == 0.0


def test_retry_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENDSCRIPT_FINAL_ERROR_CODES", " E_NO_APP, E_BAD_SCRIPT ,,")
    monkeypatch.setenv("SENDSCRIPT_QUEUE_RETRY_BASE_S", "bulk=30, high=0.5")
    monkeypatch.setenv("SENDSCRIPT_RETRY_BASE_S", "2")
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.final_error_codes == frozenset({"E_NO_APP", "E_BAD_SCRIPT"})
    assert s.queue_retry_base_s == {"bulk": 30.0, "high": 0.5}
    assert s.retry_base_s == 2.0
    # And back: a child process given to_env() reads the same settings.
    env = s.to_env()
    assert env["SENDSCRIPT_FINAL_ERROR_CODES"] == "E_BAD_SCRIPT,E_NO_APP"
    for name in list(env):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    again = Settings(_env_file=None)  # type: ignore[call-arg]
    assert again.final_error_codes == s.final_error_codes
    assert again.queue_retry_base_s == s.queue_retry_base_s


@pytest.mark.parametrize("changes", [
    {"retry_factor": 0.5}, {"retry_jitter": 1.5}, {"retry_base_s": -1},
    {"queue_retry_base_s": "bulk"},
])
def test_bad_retry_settings_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        settings(**changes)


# -- models: an ERROR's code, a task's own base delay ------------------------------------------
@pytest.mark.parametrize("alias", ["code", "errorCode", "error_code"])
def test_log_code_aliases(alias: str) -> None:
    msg = TaskLogMessage.model_validate({"recordId": "r", "taskId": "t", "deviceId": "d",
                                         "logType": "ERROR", "timestamp": 1, alias: "E_NO_APP"})
    assert msg.code == "E_NO_APP"


@pytest.mark.parametrize(("value", "expected"), [("", None), (None, None), (42, "42")])
def test_log_code_normalised(value: Any, expected: str | None) -> None:
    msg = TaskLogMessage.model_validate({"recordId": "r", "taskId": "t", "deviceId": "d",
                                         "logType": "ERROR", "timestamp": 1, "code": value})
    assert msg.code == expected


def test_log_code_too_long_is_refused() -> None:
    with pytest.raises(ValidationError):
        TaskLogMessage.model_validate({"recordId": "r", "taskId": "t", "deviceId": "d",
                                       "logType": "ERROR", "timestamp": 1, "code": "x" * 201})


def test_task_retry_base_is_optional_bounded_and_carried_to_the_task() -> None:
    base = {"device_id": "d", "script": {"id": "s"}}
    assert TaskSpec.model_validate(base).retry_base_s is None
    spec = TaskSpec.model_validate({**base, "retry_base_s": 12.5})
    assert Task.from_spec(spec, now=NOW).retry_base_s == 12.5
    for bad in (-1, 86401):
        with pytest.raises(ValidationError):
            TaskSpec.model_validate({**base, "retry_base_s": bad})
