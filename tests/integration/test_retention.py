"""The leader's retention sweep on the real store (master/retention.py): it deletes
the tasks due, their records and old logs, and nothing else."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from master.retention import BATCH, EARLIEST, Retention, targets
from sendscript.models import utcnow
from sendscript.settings import Settings
from sendscript.store import LOGS, RECORDS, TASKS, ensure_indexes


def finished(task_id: str, at: datetime, status: str = "success",
             keep: timedelta = timedelta(days=1)) -> dict[str, Any]:
    """A task as a finish writes it: updated_at the moment, purge_at that plus its keep."""
    return {"_id": task_id, "status": status, "updated_at": at, "purge_at": at + keep}


async def test_the_sweep_deletes_what_is_due_and_keeps_the_rest(
    settings: Settings, db: AsyncDatabase
) -> None:
    settings.retention_success_s = 86400
    settings.retention_failed_s = 3 * 86400  # logs: the longer, three days
    day, now = timedelta(days=1), utcnow()
    past = [now - timedelta(days=d, seconds=i) for d in (1, 4, 900) for i in range(1, 40)]
    one_batch = [now - day - timedelta(hours=5)] * (BATCH + 30)  # finished together
    due = ([finished(f"due-{i}", at) for i, at in enumerate(past + one_batch)]
           + [finished(f"due-failed-{i}", now - timedelta(days=3, hours=i + 1), status)
              for i, status in enumerate(["failed", "cancelled", "expired"])])
    kept = ([finished(f"kept-{i}", now - timedelta(hours=23)) for i in range(20)]
            # failed ones are kept three days
            + [finished(f"kept-failed-{i}", now - timedelta(days=2), status, 3 * day)
               for i, status in enumerate(["failed", "cancelled", "expired"])]
            # unfinished, however old
            + [{"_id": f"open-{i}", "status": "pending", "updated_at": now - 5 * day}
               for i in range(20)])
    for task in due[-3:] + kept[20:23]:
        task["purge_at"] = task["updated_at"] + 3 * day
    await db[TASKS].insert_many(due + kept)
    # A task's records go with it, whatever their own purge_at says.
    await db[RECORDS].insert_many(
        [{"_id": f"r-due-{i}-{a}", "task_id": f"due-{i}", "attempt": a}
         for i in range(30) for a in (1, 2)]
        + [{"_id": "r-kept", "task_id": "kept-0", "attempt": 1,
            "purge_at": now - timedelta(days=1)}])
    await db[LOGS].insert_many(
        [{"_id": f"l-old-{i}", "received_at": now - timedelta(days=4, minutes=i)}
         for i in range(25)]
        + [{"_id": "l-new", "received_at": now - timedelta(days=2)}])

    retention = Retention(settings, db)
    done = await retention.sweep()

    assert done == {TASKS: len(due), RECORDS: 60, LOGS: 25}
    left = {d["_id"] async for d in db[TASKS].find({}, {"_id": 1})}
    assert left == {t["_id"] for t in kept}
    assert [d["_id"] async for d in db[RECORDS].find({}, {"_id": 1})] == ["r-kept"]
    assert [d["_id"] async for d in db[LOGS].find({}, {"_id": 1})] == ["l-new"]

    # A task that becomes due later goes in a later sweep, from where this one ended.
    await db[TASKS].update_one({"_id": "kept-0"}, {"$set": {
        "updated_at": now - day - timedelta(seconds=1), "purge_at": now}})
    assert (await retention.sweep()) == {TASKS: 1, RECORDS: 1, LOGS: 0}
    assert await db[TASKS].count_documents({"_id": "kept-0"}) == 0


async def test_a_task_retried_since_it_finished_is_not_deleted(
    settings: Settings, db: AsyncDatabase
) -> None:
    settings.retention_success_s = settings.retention_failed_s = 60
    old = utcnow() - timedelta(hours=1)
    # Back to pending by a manual retry: no purge_at, though its updated_at were old.
    await db[TASKS].insert_many([finished("done", old, "failed", timedelta(seconds=60)),
                                 {"_id": "retried", "status": "pending", "updated_at": old}])
    assert (await Retention(settings, db).sweep())[TASKS] == 1
    assert [d["_id"] async for d in db[TASKS].find({}, {"_id": 1})] == ["retried"]


def index_names(plan: dict[str, Any]) -> set[str]:
    """The indexes a winning plan (explain's queryPlanner.winningPlan) reads."""
    names = {plan["indexName"]} if "indexName" in plan else set()
    for child in [plan.get("inputStage"), *plan.get("inputStages", [])]:
        if child:
            names |= index_names(child)
    return names


async def test_a_window_of_the_sweep_reads_the_expiry_index(
    settings: Settings, db: AsyncDatabase
) -> None:
    now = utcnow()
    await db[TASKS].insert_many(
        [finished(f"done-{i}", now - timedelta(minutes=i), keep=timedelta(0))
         for i in range(5)]
        + [{"_id": f"open-{i}", "status": "pending", "updated_at": now - timedelta(hours=2)}
           for i in range(5)])
    await ensure_indexes(db)
    for target in [t for t in targets(settings) if t.collection == TASKS]:
        for lo in (EARLIEST, now - timedelta(hours=1)):
            found = db[TASKS].find(target.due(lo, now, now), {"_id": 1}).limit(BATCH)
            explained = await found.hint(target.hint).explain()
            assert index_names(explained["queryPlanner"]["winningPlan"]) == {"updated_at_1"}
    [success, _] = [t for t in targets(settings) if t.collection == TASKS]
    assert await db[TASKS].count_documents(success.due(EARLIEST, now, now)) == 4
    # Neither kind of document carries an index on purge_at any more.
    for collection in (TASKS, RECORDS):
        assert "purge_at_1" not in await db[collection].index_information()
