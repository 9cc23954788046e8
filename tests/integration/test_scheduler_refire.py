"""A schedule's fire retried after an error whose insert had landed (its answer lost
to a Mongo timeout): the retry queues the tasks the failed try stored under this
master, and leaves another master's to it. On a real Mongo."""

from __future__ import annotations

from datetime import timedelta

from pymongo.asynchronous.database import AsyncDatabase

from master.scheduler import Scheduler
from sendscript.models import Task, utcnow
from sendscript.schedules import Schedule, fire_tasks
from sendscript.settings import Settings
from sendscript.store import SCHEDULES, TaskStore


async def test_a_retried_fire_queues_what_its_failed_try_stored(
    settings: Settings, db: AsyncDatabase,
) -> None:
    now = utcnow()
    fire_at = now - timedelta(seconds=0.5)
    schedule = Schedule.model_validate({
        "_id": "refire", "interval_s": 60.0, "template": {"script": {"id": "x"}},
        "device_ids": ["d-mine", "d-theirs", "d-new"], "next_fire_at": fire_at,
        "anchor": fire_at})  # one fire due: the next is a minute on
    await db[SCHEDULES].insert_one(schedule.to_doc())
    tasks = TaskStore(db)
    mine, theirs, _ = fire_tasks(schedule, fire_at, ["d-mine", "d-theirs", "d-new"],
                                 settings.key_prefix, settings.master_id, fire_at)
    theirs.master = "another-master"
    # The failed try's insert: two of the three landed, one of them by another master
    # (it fired the same time; what it stored it queued itself).
    await tasks.store([mine, theirs])
    queued: list[Task] = []
    scheduler = Scheduler(settings, db, tasks, queued.extend, now - timedelta(seconds=60))

    assert await scheduler.fire(schedule, now) == 2
    assert sorted(t.device_id for t in queued) == ["d-mine", "d-new"]
    moved = await db[SCHEDULES].find_one({"_id": "refire"})
    assert moved is not None and moved["next_fire_at"] > now


async def test_a_late_fire_whose_tasks_are_stored_counts_as_fired(
    settings: Settings, db: AsyncDatabase,
) -> None:
    # Two fire times are late beyond grace. A master that died stored the first's tasks
    # before it moved the schedule on: that fire happened, and the catch-up is the
    # second. The schedule counts both as fires, and only the second as missed (late:
    # run as the policy's catch-up).
    now = utcnow()
    first = now - timedelta(seconds=19.5)  # and 9.5 s ago; the next is in 0.5 s
    devices = ["d-1", "d-2"]
    schedule = Schedule.model_validate({
        "_id": "late", "interval_s": 10.0, "template": {"script": {"id": "x"}},
        "device_ids": devices, "next_fire_at": first, "anchor": first})
    await db[SCHEDULES].insert_one(schedule.to_doc())
    tasks = TaskStore(db)
    await tasks.store(fire_tasks(schedule, first, devices, settings.key_prefix,
                                 settings.master_id, first))
    queued: list[Task] = []
    scheduler = Scheduler(settings, db, tasks, queued.extend, now - timedelta(seconds=60))

    # The first fire's tasks were stored under this master's id and never queued.
    assert await scheduler.fire(schedule, now) == 4
    assert sorted(t.device_id for t in queued) == ["d-1", "d-1", "d-2", "d-2"]
    moved = await db[SCHEDULES].find_one({"_id": "late"})
    assert moved is not None
    assert (moved["fires"], moved["missed"]) == (2, 1)


async def test_late_fire_times_with_no_tasks_stay_missed(
    settings: Settings, db: AsyncDatabase,
) -> None:
    now = utcnow()
    first = now - timedelta(seconds=19.5)  # and 9.5 s ago; the next is in 0.5 s
    schedule = Schedule.model_validate({
        "_id": "missed", "interval_s": 10.0, "template": {"script": {"id": "x"}},
        "device_ids": ["d-1"], "next_fire_at": first, "anchor": first})
    await db[SCHEDULES].insert_one(schedule.to_doc())
    queued: list[Task] = []
    scheduler = Scheduler(settings, db, TaskStore(db), queued.extend,
                          now - timedelta(seconds=60))

    assert await scheduler.fire(schedule, now) == 1  # one catch-up, at the latest
    moved = await db[SCHEDULES].find_one({"_id": "missed"})
    assert moved is not None
    assert (moved["fires"], moved["missed"]) == (1, 2)
