"""The chaos run's checks fail on the findings they exist for (pure, no servers)."""

from __future__ import annotations

import json
import random
from typing import Any

from sendscript.dev.chaos import (
    BAD_ITEMS,
    BAD_LOGS,
    Report,
    check_fences,
    check_lost,
    check_refusals,
    check_sends,
    check_settled,
    report_json,
    stop_signal,
)


def task(task_id: str, status: str = "success", attempt: int = 1, **extra: Any) -> dict[str, Any]:
    return {"_id": task_id, "status": status, "attempt": attempt, "max_retries": 3,
            "device_id": "d1", "script": {"id": "chaos", "args": {}}, **extra}


def record(record_id: str, task_id: str, attempt: int, fence: int, status: str = "success",
           device: str = "d1") -> dict[str, Any]:
    return {"_id": record_id, "task_id": task_id, "attempt": attempt, "status": status,
            "device_id": device, "lock_value": fence}


def run(record_id: str, task_id: str, started: float, outcome: str = "SUCCESS",
        device: str = "d1") -> dict[str, Any]:
    return {"device_id": device, "task_id": task_id, "record_id": record_id,
            "started": started, "ended": started + 0.05, "outcome": outcome}


def test_a_clean_run_passes() -> None:
    rep = Report()
    tasks = {"t1": task("t1", attempt=2), "t2": task("t2", "failed")}
    records = [record("r1", "t1", 1, 1, "timeout"), record("r2", "t1", 2, 2),
               record("r3", "t2", 1, 3, "failed")]
    runs = [run("r1", "t1", 1.0, "SILENT"), run("r2", "t1", 2.0), run("r3", "t2", 3.0, "ERROR")]
    check_settled(rep, tasks)
    check_lost(rep, tasks, ["t1", "t2"], 0)
    check_sends(rep, tasks, records, runs)
    assert rep.problems() == []
    assert rep.success_reruns == 1 and rep.unexplained_runs == 0


def test_a_success_task_run_twice_under_one_attempt_fails() -> None:
    rep = Report()
    tasks = {"t1": task("t1")}
    # The second run's record is missing: the farm ran it with no retry recorded.
    check_sends(rep, tasks, [record("r1", "t1", 1, 1)],
                [run("r1", "t1", 1.0), run("r9", "t1", 2.0)])
    assert rep.unexplained_runs == 1 and rep.success_unexplained == 1
    assert rep.success_run_twice == 1
    assert not rep.ok() and "t1" in rep.unexplained[0]


def test_two_records_of_one_attempt_explain_one_run_only() -> None:
    rep = Report()
    records = [record("r1", "t1", 1, 1, "failed"), record("r2", "t1", 1, 2)]
    check_sends(rep, {"t1": task("t1")}, records, [run("r1", "t1", 1.0), run("r2", "t1", 2.0)])
    assert rep.unexplained_runs == 1


def test_a_record_of_another_task_explains_nothing() -> None:
    rep = Report()
    records = [record("r1", "t1", 1, 1, "failed"), record("r2", "t2", 2, 2)]
    tasks = {"t1": task("t1", attempt=2), "t2": task("t2")}
    check_sends(rep, tasks, records, [run("r1", "t1", 1.0, "ERROR"), run("r2", "t1", 2.0)])
    assert rep.unexplained_runs == 1
    assert rep.phantom_success == 1  # t2 is success with no run of its own


def test_one_attempt_sent_twice_and_sends_over_the_budget_fail() -> None:
    rep = Report()
    tasks = {"t1": task("t1", "failed", attempt=4, max_retries=1)}
    records = [record(f"r{i}", "t1", i, i, "failed") for i in (1, 2)]
    runs = [run("r1", "t1", 1.0, "ERROR"), run("r1", "t1", 2.0, "ERROR"),
            run("r2", "t1", 3.0, "ERROR")]
    check_sends(rep, tasks, records, runs)
    assert rep.duplicate_sends == 1 and rep.excess_sends == 1 and rep.unexplained_runs == 1
    assert not rep.ok()


def test_overlapping_runs_and_unknown_tasks_fail() -> None:
    rep = Report()
    runs = [run("r1", "t1", 1.0), run("r2", "t2", 1.01), run("r3", "gone", 5.0)]
    check_sends(rep, {"t1": task("t1"), "t2": task("t2")},
                [record("r1", "t1", 1, 1), record("r2", "t2", 1, 2)], runs)
    assert rep.overlaps == 1 and rep.unknown_sends == 1
    assert not rep.ok()


def test_two_success_records_of_one_task_fail() -> None:
    rep = Report()
    records = [record("r1", "t1", 1, 1), record("r2", "t1", 2, 2)]
    check_sends(rep, {"t1": task("t1", attempt=2)}, records,
                [run("r1", "t1", 1.0), run("r2", "t1", 2.0)])
    assert rep.records_success_twice == 1 and not rep.ok()


def test_a_reused_fence_fails_and_says_where() -> None:
    rep = Report()
    check_fences(rep, [record("r1", "t1", 1, 7), record("r2", "t2", 1, 7, device="d2"),
                       record("r3", "t3", 1, 8), record("r4", "t4", 1, 7)])
    assert rep.fence_repeats == 2 and rep.fence_repeats_same_device == 1
    assert "fence 7" in rep.fence_repeat_samples[0]
    assert not rep.ok()


def test_scheduled_tasks_are_not_settled() -> None:
    rep = Report()
    tasks = {"t1": task("t1", "retry_waiting"), "t2": task("t2", "waiting"),
             "t3": task("t3", "sent"), "t4": task("t4")}
    check_settled(rep, tasks)
    assert rep.unsettled == 3 and len(rep.unsettled_tasks) == 3
    assert not rep.ok()


def test_a_settle_timeout_fails_on_its_own() -> None:
    rep = Report(settle_timed_out=True)
    assert not rep.ok()


def test_leftovers_in_the_intake_lists_fail() -> None:
    assert not Report(intake_left={"processing": 1}).ok()


def test_lost_sdk_and_raw_tasks_and_unexplained_raw_duplicates() -> None:
    rep = Report()
    raw = {f"x{n}": task(f"x{n}", script={"id": "chaos", "args": {"raw": n % 2}})
           for n in range(3)}  # raw item 0 stored twice, 1 once, 2 never
    check_lost(rep, {"t1": task("t1"), **raw}, ["t1", "t2"], 3)
    assert rep.lost_sdk == ["t2"] and rep.lost_raw == [2] and rep.lost == 2
    assert rep.raw_duplicates == 1
    assert rep.read_back == ("read back from Mongo: 3 of 5 submitted task(s) terminal "
                             "(success=3); lost 2, unfinished 0, duplicates 1")
    assert set(rep.problems()) >= {"invariant 2: 2 accepted task(s) lost",
                                   "1 raw items stored twice, only 0 pushed again"}


def test_refused_input_must_be_there_with_its_reason() -> None:
    rep = Report()
    quarantined = [json.dumps({"item": item, "reason": "bad"}).encode() for item in BAD_ITEMS]
    letters = [json.dumps({"data": d.decode("utf-8", "replace"), "reason": "bad"}).encode()
               for d in BAD_LOGS]
    check_refusals(rep, quarantined, letters)
    assert rep.ok()
    check_refusals(rep, [*quarantined[1:], json.dumps({"item": "x"}).encode()], letters[:1])
    assert rep.bad_items_not_quarantined == 1 and rep.quarantined_without_reason == 1
    assert rep.bad_logs_not_dead_lettered == 1
    assert not rep.ok()


def test_servers_are_stopped_by_sigkill_then_sigterm_when_alternating() -> None:
    rand = random.Random(1)
    assert [stop_signal("alternate", n, rand) for n in range(4)] == [
        "SIGKILL", "SIGTERM", "SIGKILL", "SIGTERM"]
    assert stop_signal("sigkill", 1, rand) == "SIGKILL"
    assert {stop_signal("random", n, rand) for n in range(40)} == {"SIGKILL", "SIGTERM"}


def test_lost_tasks_are_dated_by_their_acceptance_and_the_report_is_json() -> None:
    rep = Report()
    rep.kills["worker"] += 1
    check_lost(rep, {}, ["t1", "t2"], 1, {"sdk:t1": 5.0, "sdk:t2": 5.0, "raw:0": 7.0})
    assert rep.lost_accepted_at == ["5.000: sdk:t1, sdk:t2", "7.000: raw:0"]
    assert json.loads(json.dumps(report_json(rep)))["kills"] == {"worker": 1}


def test_a_role_that_died_unkilled_fails() -> None:
    rep = Report()
    rep.exits["simulator"] += 1
    assert rep.problems() == ["roles died without being killed: {'simulator': 1}"]
