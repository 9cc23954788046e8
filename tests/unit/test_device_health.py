"""The streak and bench rules (pure), the gate, and which answers and results count."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from master.bus import Go, Hold
from master.device_health import BenchGate
from sendscript.device_health import (
    BenchPolicy,
    DeviceHealth,
    Outcome,
    is_late,
    result_outcomes,
    send_failure,
)
from sendscript.models import ExecRecord, Task, TaskLogMessage

POLICY = BenchPolicy(after=3, base_s=60, cap_s=200)
T0 = 1_700_000_000_000


def fail(device: str = "d1", why: str = "SYSTEM_ERROR: x") -> Outcome:
    return Outcome(device, False, why)


def ok(device: str = "d1") -> Outcome:
    return Outcome(device, True)


def test_cooldown_doubles_per_bench_in_a_row_up_to_the_cap() -> None:
    assert [POLICY.cooldown_s(n) for n in (1, 2, 3, 4)] == [60, 120, 200, 200]


def test_benched_at_the_nth_failure_in_a_row_not_before() -> None:
    h = DeviceHealth(POLICY)
    assert h.apply([fail(), fail()], T0) == []
    benched = h.apply([fail(why="result timeout")], T0)
    assert [(b.device_id, b.until_ms, b.level, b.streak) for b in benched] == [
        ("d1", T0 + 60_000, 1, 3)]
    assert h.entries["d1"].why == "result timeout"
    assert h.benched == {"d1": T0 + 60_000}


def test_a_success_resets_the_streak() -> None:
    h = DeviceHealth(POLICY)
    h.apply([fail(), fail(), ok(), fail(), fail()], T0)
    assert h.benched == {}
    assert h.entries["d1"].streak == 2
    h.apply([ok()], T0)
    assert "d1" not in h.entries  # nothing left to remember


def test_failures_while_benched_count_but_do_not_extend_it() -> None:
    h = DeviceHealth(POLICY)
    h.apply([fail()] * 3, T0)
    assert h.apply([fail(), fail()], T0 + 1_000) == []
    assert h.benched == {"d1": T0 + 60_000}
    assert h.entries["d1"].streak == 5


def test_after_a_bench_one_more_failure_benches_again_for_longer() -> None:
    h = DeviceHealth(POLICY)
    h.apply([fail()] * 3, T0)
    later = T0 + 61_000
    again = h.apply([fail()], later)
    assert [(b.until_ms, b.level) for b in again] == [(later + 120_000, 2)]
    third = h.apply([fail()], later + 121_000)
    assert [(b.until_ms - (later + 121_000), b.level) for b in third] == [(200_000, 3)]


def test_a_success_during_a_bench_keeps_the_bench_but_resets_the_level() -> None:
    h = DeviceHealth(POLICY)
    h.apply([fail()] * 3, T0)
    h.apply([ok()], T0 + 1_000)
    assert h.benched == {"d1": T0 + 60_000}
    assert (h.entries["d1"].streak, h.entries["d1"].level) == (0, 0)
    assert h.apply([fail()] * 3, T0 + 61_000)[0].level == 1


def test_devices_are_counted_apart_and_resume_forgets() -> None:
    h = DeviceHealth(POLICY)
    h.apply([fail("a"), fail("b"), fail("a"), fail("b"), fail("a")], T0)
    assert set(h.benched) == {"a"}
    assert h.entries["b"].streak == 2
    assert h.resume("a") is True
    assert "a" not in h.entries and h.benched == {}
    assert h.resume("a") is False


def test_bench_after_zero_never_benches() -> None:
    h = DeviceHealth(BenchPolicy(after=0, base_s=60, cap_s=60))
    assert h.apply([fail()] * 10, T0) == []
    assert h.entries["d1"].streak == 10


# -- what counts ------------------------------------------------------------------------


def test_send_failures_that_count_against_the_device() -> None:
    refused = "central-control final: HTTP 404 device unknown"
    assert send_failure("failed", refused, None)
    assert send_failure("retry", "central-control final: refused: {'success': False}", None)
    # central-control unwell (5xx, 408, 429, unreachable): the breaker's, not the device's
    assert not send_failure("retry", "central-control retryable: HTTP 503", False)
    assert not send_failure("retry", "central-control retryable: HTTP 409 busy", None)
    assert not send_failure("failed", "attempts exhausted (4 of 4)", None)
    for outcome in ("sent", "busy", "stale", "error", "unsent", "quota", "expired"):
        assert not send_failure(outcome, refused, None)


def _record(rid: str, device: str, status: str = "sent",
            deadline: datetime | None = None) -> ExecRecord:
    return ExecRecord(_id=rid, task_id=f"t-{rid}", attempt=1, device_id=device, lock_value=1,
                      worker="w", started_at=datetime.now(UTC), status=status,
                      deadline=deadline)


def _log(rid: str, device: str, kind: str) -> TaskLogMessage:
    return TaskLogMessage.model_validate({"recordId": rid, "taskId": f"t-{rid}",
                                          "deviceId": device, "logType": kind,
                                          "message": "m", "timestamp": 1})


def test_results_system_error_fails_success_resets_error_says_nothing() -> None:
    records = {r.id: r for r in (_record("r1", "a"), _record("r2", "b"), _record("r3", "c"),
                                 _record("r4", "d", status="success"))}
    finals = [_log("r1", "a", "SYSTEM_ERROR"), _log("r2", "b", "SUCCESS"),
              _log("r3", "c", "ERROR"), _log("r4", "d", "SYSTEM_ERROR"),  # applied already
              _log("r1", "a", "SYSTEM_ERROR"),  # a duplicate in the batch
              _log("r9", "e", "SYSTEM_ERROR")]  # unknown record
    outcomes, late = result_outcomes(finals, records, datetime.now(UTC))
    assert outcomes == [Outcome("a", False, "SYSTEM_ERROR: m"), Outcome("b", True)]
    assert late == 0


def test_a_result_after_the_deadline_is_late() -> None:
    now = datetime.now(UTC)
    past, future = now - timedelta(seconds=1), now + timedelta(seconds=60)
    assert is_late(_record("r1", "a", deadline=past), now)
    assert not is_late(_record("r2", "a", deadline=future), now)
    assert not is_late(_record("r3", "a"), now)
    records = {"r1": _record("r1", "a", deadline=past), "r2": _record("r2", "b", deadline=past),
               "r3": _record("r3", "c", deadline=future)}
    finals = [_log("r1", "a", "SUCCESS"), _log("r2", "b", "ERROR"), _log("r3", "c", "SUCCESS"),
              _log("r1", "a", "SUCCESS")]
    assert result_outcomes(finals, records, now)[1] == 2


# -- the gate ---------------------------------------------------------------------------


def _task(device: str) -> Task:
    return Task(_id=f"t-{device}", device_id=device, script={"id": "s"})


def test_gate_holds_a_benched_device_until_its_end() -> None:
    gate = BenchGate()
    now = datetime.now(UTC)
    t = now.timestamp()
    change = gate.update({"a": t + 30, "old": t - 1}, t)
    assert change.started == ["a"] and change.ended == []
    verdict = gate.admit(_task("a"), now)
    assert isinstance(verdict, Hold) and 30 <= verdict.retry_s <= 30.1
    assert isinstance(gate.admit(_task("b"), now), Go)
    assert isinstance(gate.admit(_task("a"), now + timedelta(seconds=31)), Go)
    assert gate.held == {}


def test_gate_update_resume_wakes_and_ends_expiry_ends() -> None:
    gate = BenchGate()
    t = datetime.now(UTC).timestamp()
    gate.update({"a": t + 30, "b": t + 5}, t)
    gate.admit(_task("a"), datetime.fromtimestamp(t, UTC))
    gate.admit(_task("b"), datetime.fromtimestamp(t, UTC))
    change = gate.update({"b": t + 5}, t + 1)  # a resumed
    assert (change.started, change.ended, change.wake) == ([], ["a"], ["a"])
    change = gate.update({}, t + 6)  # b's bench ran out
    assert (change.started, change.ended, change.wake) == ([], ["b"], ["b"])
    # benched again while the view still has its ended bench: end, then start
    gate.update({"c": t + 10}, t + 6)
    change = gate.update({"c": t + 100}, t + 11)
    assert (change.started, change.ended) == (["c"], ["c"])


def test_gate_add_is_news_only_once() -> None:
    gate = BenchGate()
    t = 1000.0
    assert gate.add("a", t + 10, t) is True
    assert gate.add("a", t + 10, t + 1) is False
    assert gate.update({"a": t + 10}, t + 2).started == []
