"""A dead master's attempts in flight, on real Redis and Mongo: one its worker never
sent (no exec record) is taken back at once, its attempt unused and its lock
released, and a worker that outlived its master can no longer send it; one with a
record may have been sent and waits."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import redis.asyncio
from pymongo.asynchronous.database import AsyncDatabase

from master.recovery import NEVER_SENT, Found, Recovery
from sendscript.locks import DeviceLocks, lock_owner
from sendscript.models import ExecRecord, Task, new_id, utcnow
from sendscript.settings import Settings
from sendscript.status import RecordStatus, TaskStatus
from sendscript.store import RECORDS, TASKS, RecordStore, TaskStore

DEAD = "m-dead"
WORKER = f"{DEAD}/w0:4242"


@pytest.fixture
def recovery(settings: Settings, redis_client: redis.asyncio.Redis,
             db: AsyncDatabase) -> Recovery:
    return Recovery(settings, redis_client, TaskStore(db), RecordStore(db))


@pytest.fixture
def locks(settings: Settings, redis_client: redis.asyncio.Redis) -> DeviceLocks:
    return DeviceLocks(redis_client, settings.keys)


async def claimed(db: AsyncDatabase, locks: DeviceLocks, device: str, *,
                  worker: str = WORKER, attempt: int = 1, recorded: bool = False,
                  claimed_ago_s: float = 1.0) -> tuple[str, str, int]:
    """A task its worker locked (naming it as the lock's owner, as workers do) and
    claimed, with its exec record (the pre-send marker) or not: (task, record id, fence)."""
    task_id, record_id = new_id(), new_id()
    [fence] = await locks.acquire_many([(device, 600_000, lock_owner(task_id, worker))])
    assert fence > 0
    doc = Task(_id=task_id, device_id=device, script={"id": "tap"}, status=TaskStatus.RUNNING,
               attempt=attempt, timeout_s=120, record_id=record_id, worker=worker,
               master=worker.partition("/")[0]).to_doc()
    doc["updated_at"] = utcnow() - timedelta(seconds=claimed_ago_s)
    await db[TASKS].insert_one(doc)
    if recorded:
        await db[RECORDS].insert_one(record(task_id, record_id, attempt, device, fence))
    return task_id, record_id, fence


def record(task_id: str, record_id: str, attempt: int, device: str, fence: int) -> dict[str, Any]:
    return ExecRecord(_id=record_id, task_id=task_id, attempt=attempt, device_id=device,
                      lock_value=fence, worker=WORKER, started_at=utcnow()).to_doc()


async def task(db: AsyncDatabase, task_id: str) -> dict[str, Any]:
    found = await db[TASKS].find_one({"_id": task_id})
    assert found is not None
    return found


async def test_unsent_attempts_go_back_at_once_and_maybe_sent_ones_wait(
    recovery: Recovery, db: AsyncDatabase, locks: DeviceLocks,
) -> None:
    unsent, unsent_rec, _ = await claimed(db, locks, "dev-a", attempt=2)
    maybe, _, maybe_fence = await claimed(db, locks, "dev-b", recorded=True)
    live, _, live_fence = await claimed(db, locks, "dev-c", worker="m-live/w0:7")

    inflight = await recovery.return_unsent_attempts(DEAD)

    assert inflight.released == [unsent] and inflight.waiting == [maybe]
    doc = await task(db, unsent)
    assert doc["status"] == "pending" and doc["attempt"] == 1  # attempt 2 given back
    assert not {"record_id", "worker", "master"} & doc.keys()
    assert f"master {DEAD} died before its worker sent it" in doc["last_error"]
    # Its record id is taken as never sent; attempt 2 stays free for its next claim.
    mark = await db[RECORDS].find_one({"_id": unsent_rec})
    assert mark is not None and mark["attempt"] == -2 and mark["status"] == "cancelled"
    assert mark["error"] == NEVER_SENT and mark["purge_at"] > utcnow()
    assert await locks.holders(["dev-a", "dev-b", "dev-c"]) == [None, maybe_fence, live_fence]
    assert (await task(db, maybe))["status"] == "running"
    assert (await task(db, live))["status"] == "running"

    # Twice is once.
    again = await recovery.return_unsent_attempts(DEAD)
    assert again.released == [] and again.waiting == [maybe]


async def test_a_worker_that_outlived_its_master_cannot_send_what_was_taken_back(
    recovery: Recovery, db: AsyncDatabase, locks: DeviceLocks,
) -> None:
    """The worker was between its claim and its record when its master died; recovery
    takes the attempt; then the worker goes on. Its record (the last step before its
    POST) is refused, so it gives up instead of sending, and the next claim of the
    same attempt number records normally."""
    task_id, record_id, fence = await claimed(db, locks, "dev-a", attempt=1)
    assert (await recovery.return_unsent_attempts(DEAD)).released == [task_id]

    records = RecordStore(db)
    assert await records.insert_many([ExecRecord.model_validate(
        record(task_id, record_id, 1, "dev-a", fence))]) == [False]
    # The next claim of attempt 1, under its own record id, is stored.
    assert await records.insert_many([ExecRecord.model_validate(
        record(task_id, new_id(), 1, "dev-a", fence + 1))]) == [True]


async def test_a_record_that_landed_first_wins_and_the_attempt_waits(
    recovery: Recovery, db: AsyncDatabase, locks: DeviceLocks,
) -> None:
    task_id, record_id, fence = await claimed(db, locks, "dev-a")
    doc = Task.model_validate(await task(db, task_id))
    # The worker's record lands between recovery's read and its own insert.
    await db[RECORDS].insert_one(record(task_id, record_id, 1, "dev-a", fence))
    assert not await recovery.take_unsent_attempt(doc, utcnow())
    # And its own earlier mark, found again (a pass that died half way), counts as taken.
    other, other_rec, _ = await claimed(db, locks, "dev-b")
    other_doc = Task.model_validate(await task(db, other))
    assert await recovery.take_unsent_attempt(other_doc, utcnow())
    assert await recovery.take_unsent_attempt(other_doc, utcnow())
    assert (await db[RECORDS].find_one({"_id": other_rec}) or {})["status"] == str(
        RecordStatus.CANCELLED)


async def test_the_restarting_master_skips_its_live_workers_and_a_lock_taken_since(
    recovery: Recovery, db: AsyncDatabase, locks: DeviceLocks,
    redis_client: redis.asyncio.Redis, settings: Settings,
) -> None:
    mine, _, mine_fence = await claimed(db, locks, "dev-a", worker=f"{DEAD}/w0:9999")
    old, _, old_fence = await claimed(db, locks, "dev-b")
    # The old worker's lock expired and another worker locked the device for the same
    # task (a copy of it another master's board held): not the dead worker's lock.
    await redis_client.delete(settings.keys.device_lock("dev-b"))
    [newer] = await locks.acquire_many([("dev-b", 60_000, lock_owner(old, "m-other/w1:5"))])

    inflight = await recovery.return_unsent_attempts(DEAD, skip_workers={f"{DEAD}/w0:9999"})

    assert inflight.released == [old]
    assert (await task(db, mine))["status"] == "running"
    assert await locks.holders(["dev-a", "dev-b"]) == [mine_fence, newer]
    assert newer > old_fence


async def test_the_leader_takes_back_a_dead_masters_unsent_attempts_and_pushes_them(
    recovery: Recovery, db: AsyncDatabase, locks: DeviceLocks,
    redis_client: redis.asyncio.Redis, settings: Settings,
) -> None:
    unsent, _, _ = await claimed(db, locks, "dev-a")
    maybe, _, _ = await claimed(db, locks, "dev-b", recorded=True)
    await redis_client.hset(settings.keys.masters, DEAD, "{}")  # no alive key: dead

    async def nothing_to_ingest(entries: list[Any]) -> None:
        raise AssertionError("no queue items were held")

    found = Found()
    await recovery.recover_dead_master(DEAD, lambda _: nothing_to_ingest, found)

    assert found.unsent == [unsent] and unsent in found.requeued
    pushed = await redis_client.lrange(settings.keys.ready, 0, -1)
    assert [p for p in pushed if unsent.encode() in p] and not [
        p for p in pushed if maybe.encode() in p]
    assert (await task(db, unsent))["status"] == "pending"
    assert (await task(db, maybe))["status"] == "running"
    assert await locks.holders(["dev-a"]) == [None]
