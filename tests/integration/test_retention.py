"""The leader's retention sweep on the real store (master/retention.py): it deletes
the tasks due, their records and old logs, and nothing else."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pymongo import AsyncMongoClient, monitoring
from pymongo.asynchronous.database import AsyncDatabase

from master.retention import BATCH, EARLIEST, Retention, targets
from sendscript import connect
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


class Finds(monitoring.CommandListener):
    """The find commands a client sends, as sent."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "find":
            self.sent.append(dict(event.command))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def test_a_window_of_the_sweep_reads_the_expiry_index(
    settings: Settings, db: AsyncDatabase
) -> None:
    """Each read of a sweep leads with its window's range and names no index: the
    embedded server serves a query from its first clause's index (a seek), while a
    hint makes it walk the whole hinted index and decode every document in it."""
    now = utcnow()
    await db[TASKS].insert_many(
        [finished(f"done-{i}", now - timedelta(minutes=i), keep=timedelta(0))
         for i in range(5)]
        + [{"_id": f"open-{i}", "status": "pending", "updated_at": now - timedelta(hours=2)}
           for i in range(5)])
    await ensure_indexes(db)
    [success, _] = [t for t in targets(settings) if t.collection == TASKS]
    assert await db[TASKS].count_documents(success.due(EARLIEST, now, now)) == 4
    finds = Finds()  # on a client with the roles' options, listened to besides
    options = connect._mongo_kwargs(settings)
    options["event_listeners"] = [*options.get("event_listeners", []), finds]
    client: AsyncMongoClient = AsyncMongoClient(settings.mongo_url, **options)
    try:
        settings.retention_success_s = settings.retention_failed_s = 0.001
        done = await Retention(settings, connect.database(client)).sweep()
    finally:
        await client.close()
    assert done[TASKS] == 5
    assert sorted([d["_id"] async for d in db[TASKS].find()]) == [f"open-{i}" for i in range(5)]
    reads = [c for c in finds.sent if c["find"] == TASKS]
    assert reads, "the sweep read no window of the tasks"
    for command in reads:
        assert "hint" not in command
        assert next(iter(command["filter"])) == "updated_at"
    # Neither kind of document carries an index on purge_at any more.
    for collection in (TASKS, RECORDS):
        assert "purge_at_1" not in await db[collection].index_information()
