"""The leader's retention sweep on the real store (master/retention.py): it deletes
what is due in tasks, records and logs, and nothing else."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from master.retention import BATCH, EARLIEST, Retention, due_in
from sendscript.models import utcnow
from sendscript.settings import Settings
from sendscript.store import LOGS, RECORDS, TASKS


async def test_the_sweep_deletes_what_is_due_and_keeps_the_rest(
    settings: Settings, db: AsyncDatabase
) -> None:
    settings.retention_success_s = settings.retention_failed_s = 86400  # logs: a day
    now = utcnow()
    past = [now - timedelta(days=d, seconds=i) for d in (0, 3, 900) for i in range(1, 40)]
    one_batch = [now - timedelta(hours=5)] * (BATCH + 30)  # a batch that finished together
    tasks = ([{"_id": f"due-{i}", "status": "success", "purge_at": at}
              for i, at in enumerate(past + one_batch)]
             + [{"_id": f"kept-{i}", "status": "success", "purge_at": now + timedelta(hours=1)}
                for i in range(20)]
             + [{"_id": f"open-{i}", "status": "pending"} for i in range(20)])
    await db[TASKS].insert_many(tasks)
    await db[RECORDS].insert_many(
        [{"_id": f"r-due-{i}", "task_id": f"t{i}", "attempt": 1,
          "purge_at": now - timedelta(minutes=i + 1)} for i in range(30)]
        + [{"_id": "r-kept", "task_id": "t", "attempt": 1,
            "purge_at": now + timedelta(days=1)}])
    await db[LOGS].insert_many(
        [{"_id": f"l-old-{i}", "received_at": now - timedelta(days=2, minutes=i)}
         for i in range(25)]
        + [{"_id": "l-new", "received_at": now - timedelta(hours=1)}])

    retention = Retention(settings, db)
    done = await retention.sweep()

    assert done == {TASKS: len(past) + len(one_batch), RECORDS: 30, LOGS: 25}
    left = {d["_id"] async for d in db[TASKS].find({}, {"_id": 1})}
    assert left == {t["_id"] for t in tasks if not t["_id"].startswith("due-")}
    assert [d["_id"] async for d in db[RECORDS].find({}, {"_id": 1})] == ["r-kept"]
    assert [d["_id"] async for d in db[LOGS].find({}, {"_id": 1})] == ["l-new"]

    # A task that becomes due later goes in a later sweep, from where this one ended.
    await db[TASKS].update_one({"_id": "kept-0"}, {"$set": {"purge_at": utcnow()}})
    assert (await retention.sweep())[TASKS] == 1
    assert await db[TASKS].count_documents({"_id": "kept-0"}) == 0


def index_names(plan: dict[str, Any]) -> set[str]:
    """The indexes a winning plan (explain's queryPlanner.winningPlan) reads."""
    names = {plan["indexName"]} if "indexName" in plan else set()
    for child in [plan.get("inputStage"), *plan.get("inputStages", [])]:
        if child:
            names |= index_names(child)
    return names


async def test_a_window_of_the_sweep_reads_the_expiry_index(db: AsyncDatabase) -> None:
    now = utcnow()
    for collection in (TASKS, RECORDS):
        # task_id, attempt: a record's unique pair
        await db[collection].insert_many(
            [{"_id": f"done-{i}", "task_id": f"done-{i}", "attempt": 1, "status": "success",
              "purge_at": now - timedelta(minutes=i)} for i in range(5)]
            + [{"_id": f"open-{i}", "task_id": f"open-{i}", "attempt": 1, "status": "pending"}
               for i in range(5)])
        for lo in (EARLIEST, now - timedelta(hours=1)):
            explained = await db[collection].find(due_in("purge_at", lo, now),
                                                  {"_id": 1}).limit(BATCH).explain()
            assert index_names(explained["queryPlanner"]["winningPlan"]) == {"purge_at_1"}
        assert await db[collection].count_documents(due_in("purge_at", EARLIEST, now)) == 4

