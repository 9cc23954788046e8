"""The master's recovery sweeps leave pull tasks' leases to the agents role: a leased
pull task past its timeout or silent past running_stuck_s is not timed out, put back or
requeued by them (a master would then dispatch it to central-control)."""

from __future__ import annotations

from datetime import timedelta

import redis.asyncio
from pymongo.asynchronous.database import AsyncDatabase

from master.recovery import Found, Recovery
from sendscript.models import PULL_HOLDER, Task, TaskSpec, utcnow
from sendscript.settings import Settings
from sendscript.store import TASKS, RecordStore, TaskStore


async def test_recovery_sweeps_skip_leased_pull_tasks(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    old = utcnow() - timedelta(hours=1)
    docs = []
    for mode, device in (("pull", "*"), ("push", "d1")):
        task = Task.from_spec(TaskSpec.model_validate(
            {"mode": mode, "device_id": device, "script": {}, "timeout_s": 5}))
        doc = task.to_doc() | {"status": "running", "attempt": 1, "updated_at": old,
                               "record_id": f"r-{mode}"}
        docs.append(doc)
    await db[TASKS].insert_many(docs)
    recovery = Recovery(settings, redis_client, TaskStore(db), RecordStore(db))
    found = Found()
    now = utcnow()
    await recovery.time_out_results(now, found)
    await recovery.release_stuck_running(now, found)
    pull, push = docs
    assert found.timed_out == [push["_id"]]  # the pushed one only
    after = await db[TASKS].find_one({"_id": pull["_id"]})
    assert (after["status"], after["master"], after["attempt"]) == ("running", PULL_HOLDER, 1)
    assert (await db[TASKS].find_one({"_id": push["_id"]}))["status"] == "retry_waiting"
