"""The cron-fire and kept checks find what they exist for (pure, no servers)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sendscript.dev.fires import check_fires, check_kept

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SCHEDULE = {"_id": "every2", "fires": 3}


def fire(at: datetime, device: str, task_id: str | None = None) -> dict[str, Any]:
    stamp = at.isoformat(timespec="milliseconds")
    return {"_id": task_id or f"{stamp}-{device}", "schedule": "every2", "device_id": device,
            "dedupe_key": f"schedule:every2:{stamp}:{device}",
            "run_at": at + timedelta(seconds=7)}  # moved on by a retry: not the fire time


def run(task_id: str, outcome: str = "SUCCESS", record: str = "r") -> dict[str, Any]:
    return {"task_id": task_id, "record_id": record, "outcome": outcome}


def fires(*offsets: float, devices: tuple[str, ...] = ("a", "b")) -> list[dict[str, Any]]:
    return [fire(T0 + timedelta(seconds=s), d) for s in offsets for d in devices]


def test_fires_one_interval_apart_pass() -> None:
    tasks = fires(0, 2, 4)
    tally = check_fires(SCHEDULE, tasks, [run(t["_id"]) for t in tasks], 2, 2.0)
    assert tally.problems() == [] and (tally.fires, tally.tasks) == (3, 6)


def test_a_second_stamp_inside_one_interval_is_a_double_fire() -> None:
    tally = check_fires({**SCHEDULE, "fires": 4}, fires(0, 2, 2.5, 4), [], 2, 2.0)
    assert tally.double == 1 and tally.problems()


def test_a_fire_missing_a_device_and_a_miscount_fail() -> None:
    tasks = [*fires(0, 2), fire(T0 + timedelta(seconds=4), "a")]
    tally = check_fires({**SCHEDULE, "fires": 2}, tasks, [], 2, 2.0)
    assert tally.incomplete == 1
    assert any("counts 2 fires" in p for p in tally.problems())


def test_a_fire_task_run_to_success_twice_fails() -> None:
    tasks = fires(0, 2, 4)
    runs = [run(tasks[0]["_id"], record="r1"), run(tasks[0]["_id"], record="r2")]
    assert check_fires(SCHEDULE, tasks, runs, 2, 2.0).run_twice == 1


def test_gaps_are_counted_not_failed() -> None:
    tally = check_fires(SCHEDULE, fires(0, 2, 8), [], 2, 2.0)
    assert tally.gaps == 2 and tally.problems() == []


def test_a_deleted_task_or_record_is_found() -> None:
    tasks = {"t1": {}, "t2": {}}
    records = [{"_id": "r1"}]
    kept = check_kept(["t1", "t2", "t3"], tasks, records,
                      [run("t1", record="r1"), run("t2", record="r2")])
    assert (kept.tasks_missing, kept.records_missing, kept.deleted_early) == (1, 1, 2)
    assert check_kept(["t1"], tasks, records, [run("t1", record="r1")]).deleted_early == 0
