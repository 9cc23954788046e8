"""Recovery of abandoned work and the leader lease, on real Redis and Mongo: result
timeouts, dead masters (with the real intake), orphaned tasks and orphaned locks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import redis.asyncio
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ServerSelectionTimeoutError

from master.intake import Intake
from master.leadership import LeaderLease, NotLeading, token_of
from master.recovery import Found, Recovery
from master.retention import Retention
from master.sweeper import Sweeper
from sendscript.dev.embedded import free_port
from sendscript.locks import DeviceLocks, lock_owner
from sendscript.models import ExecRecord, Task, TaskSpec, id_from_tag, new_id, utcnow
from sendscript.queue import Entry, IntakeQueue, push_refs
from sendscript.settings import Settings
from sendscript.status import RecordStatus, TaskStatus
from sendscript.store import GROUPS, RECORDS, TASKS, RecordStore, TaskStore
from tests.integration.conftest import FreeEvents

SCRIPT = {"id": "tap"}


def recovery_settings(settings: Settings, **changes: Any) -> Settings:
    fields: dict[str, Any] = {"retry_base_s": 20.0, "retry_factor": 2.0, "retry_cap_s": 600.0,
                              "retry_jitter": 0.2, "orphan_grace_s": 30.0}
    fields.update(changes)
    return settings.model_copy(update=fields)


@pytest.fixture
def recovery(settings: Settings, redis_client: redis.asyncio.Redis,
             db: AsyncDatabase) -> Recovery:
    return Recovery(recovery_settings(settings), redis_client, TaskStore(db), RecordStore(db))


@pytest.fixture
def locks(settings: Settings, redis_client: redis.asyncio.Redis) -> DeviceLocks:
    return DeviceLocks(redis_client, settings.keys)


async def ready(client: redis.asyncio.Redis, settings: Settings) -> list[str]:
    """Task ids on the ready list, oldest first."""
    items = await client.lrange(settings.keys.ready, 0, -1)
    return [json.loads(i)["task_id"] for i in reversed(items)]


async def put_task(db: AsyncDatabase, device: str, status: TaskStatus, *,
                   updated_at: datetime | None = None, **fields: Any) -> str:
    task = Task(_id=new_id(), device_id=device, script=SCRIPT, status=status, **fields)
    doc = task.to_doc()
    if updated_at is not None:
        doc["updated_at"] = updated_at
    await db[TASKS].insert_one(doc)
    return task.id


async def sent_task(db: AsyncDatabase, locks: DeviceLocks, device: str, *, sent_at: datetime,
                    attempt: int = 1, max_retries: int = 3, timeout_s: float = 30.0,
                    status: TaskStatus = TaskStatus.SENT) -> tuple[str, str, int]:
    """A task sent (or stuck running) since `sent_at`, its open record, its device lock."""
    [fence] = await locks.acquire_many([(device, 600_000)])
    assert fence > 0
    record_id = new_id()
    task_id = await put_task(db, device, status, updated_at=sent_at, attempt=attempt,
                             max_retries=max_retries, timeout_s=timeout_s,
                             record_id=record_id, worker="w-1", master="m-1")
    record_status = RecordStatus.SENT if status == TaskStatus.SENT else RecordStatus.RUNNING
    await db[RECORDS].insert_one(ExecRecord(
        _id=record_id, task_id=task_id, attempt=attempt, device_id=device, lock_value=fence,
        worker="w-1", started_at=sent_at, sent_at=sent_at, status=record_status).to_doc())
    return task_id, record_id, fence


async def doc(db: AsyncDatabase, collection: str, _id: str) -> dict[str, Any]:
    found = await db[collection].find_one({"_id": _id})
    assert found is not None, f"{collection} {_id} is gone"
    return found


# -- result timeouts ---------------------------------------------------------------------------
async def test_overdue_results_retry_or_fail_and_free_their_devices(
    settings: Settings, recovery: Recovery, db: AsyncDatabase, locks: DeviceLocks,
    redis_client: redis.asyncio.Redis, free_events: FreeEvents,
) -> None:
    now = utcnow()
    retried, retried_rec, retried_fence = await sent_task(
        db, locks, "dev-retry", sent_at=now - timedelta(seconds=31), attempt=1)
    stuck, stuck_rec, stuck_fence = await sent_task(
        db, locks, "dev-stuck", sent_at=now - timedelta(seconds=30), attempt=2,
        status=TaskStatus.RUNNING)  # exactly at its timeout: overdue
    last, last_rec, last_fence = await sent_task(
        db, locks, "dev-last", sent_at=now - timedelta(seconds=100), attempt=4, max_retries=3)
    waiting, waiting_rec, waiting_fence = await sent_task(
        db, locks, "dev-wait", sent_at=now - timedelta(seconds=29))
    untouched = await doc(db, TASKS, waiting)

    found = Found()
    await recovery.time_out_results(now, found)

    assert sorted(found.timed_out) == sorted([retried, stuck, last])
    assert sorted(found.retried) == sorted([retried, stuck])
    reason = "result timeout: no result within 30s"
    for task_id, attempt, raw in [(retried, 1, 20.0), (stuck, 2, 40.0)]:
        task = await doc(db, TASKS, task_id)
        assert task["status"] == "retry_waiting" and task["attempt"] == attempt
        assert task["last_error"] == reason and "master" not in task
        assert now + timedelta(seconds=raw * 0.8) <= task["run_at"]
        assert task["run_at"] <= now + timedelta(seconds=raw * 1.2)
        assert task.get("finished_at") is None
    task = await doc(db, TASKS, last)
    assert task["status"] == "failed" and task["finished_at"] == now
    assert task["last_error"] == f"{reason} (attempts exhausted: 4 of 4)"
    for record_id in (retried_rec, stuck_rec, last_rec):
        rec = await doc(db, RECORDS, record_id)
        assert rec["status"] == "timeout" and rec["error"] == reason
        assert rec["finished_at"] == now
    # Not yet overdue: nothing changes, its device stays locked.
    assert await doc(db, TASKS, waiting) == untouched
    assert (await doc(db, RECORDS, waiting_rec))["status"] == "sent"
    assert await locks.holders(["dev-retry", "dev-stuck", "dev-last", "dev-wait"]) == [
        None, None, None, waiting_fence]
    events = await free_events.collect()
    assert sorted((e["device_id"], e["fence"]) for e in events) == sorted([
        ("dev-retry", retried_fence), ("dev-stuck", stuck_fence), ("dev-last", last_fence)])
    assert sorted(await ready(redis_client, settings)) == sorted([retried, stuck])
    assert await redis_client.hget(settings.keys.stats, "result_timeouts") == b"3"
    # Only the task with no attempt left is lost (the drop-rate ladder counts it).
    assert await redis_client.hget(settings.keys.stats, "result_timeouts_final") == b"1"


async def test_a_timeout_releases_only_its_own_fence(
    recovery: Recovery, db: AsyncDatabase, locks: DeviceLocks,
    redis_client: redis.asyncio.Redis, settings: Settings,
) -> None:
    now = utcnow()
    task_id, _, fence = await sent_task(db, locks, "dev-1", sent_at=now - timedelta(seconds=60))
    # The lock expired and another attempt locked the device since.
    await redis_client.delete(settings.keys.device_lock("dev-1"))
    [newer] = await locks.acquire_many([("dev-1", 60_000)])
    assert newer > fence

    await recovery.time_out_results(now, Found())

    assert (await doc(db, TASKS, task_id))["status"] == "retry_waiting"
    assert await locks.holders(["dev-1"]) == [newer]


async def test_a_dry_run_reports_and_changes_nothing(
    recovery: Recovery, db: AsyncDatabase, locks: DeviceLocks,
    redis_client: redis.asyncio.Redis, settings: Settings,
) -> None:
    now = utcnow()
    task_id, _, fence = await sent_task(db, locks, "dev-1", sent_at=now - timedelta(seconds=60))
    before = await doc(db, TASKS, task_id)
    found = Found()
    await recovery.time_out_results(now, found, dry=True)
    assert found.timed_out == [task_id] and found.retried == []
    assert await doc(db, TASKS, task_id) == before
    assert await locks.holders(["dev-1"]) == [fence]
    assert await ready(redis_client, settings) == []


async def test_timing_out_twice_in_a_row_transitions_each_task_once(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase,
    locks: DeviceLocks,
) -> None:
    now = utcnow()
    ids = [(await sent_task(db, locks, f"dev-{i}", sent_at=now - timedelta(seconds=60)))[0]
           for i in range(3)]
    a = Recovery(recovery_settings(settings), redis_client, TaskStore(db), RecordStore(db))
    b = Recovery(recovery_settings(settings), redis_client, TaskStore(db), RecordStore(db))
    first, second = Found(), Found()

    await a.time_out_results(now, first)
    after_first = [await doc(db, TASKS, i) for i in ids]
    await b.time_out_results(now + timedelta(seconds=1), second)

    assert sorted(first.timed_out) == sorted(ids) and second.timed_out == []
    assert [await doc(db, TASKS, i) for i in ids] == after_first
    assert all(t["status"] == "retry_waiting" for t in after_first)
    assert sorted(await ready(redis_client, settings)) == sorted(ids)


async def race(settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase,
               locks: DeviceLocks) -> tuple[list[str], list[Found], datetime]:
    """Two masters time out the same overdue tasks at the same moment."""
    now = utcnow()
    ids = [(await sent_task(db, locks, f"dev-{i}", sent_at=now - timedelta(seconds=60)))[0]
           for i in range(4)]
    racers = [Recovery(recovery_settings(settings), redis_client, TaskStore(db),
                       RecordStore(db)) for _ in range(2)]
    found = [Found(), Found()]
    await asyncio.gather(*(r.time_out_results(now, f) for r, f in zip(racers, found,
                                                                     strict=True)))
    return ids, found, now


async def test_two_masters_racing_leave_each_task_transitioned_once(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase,
    locks: DeviceLocks,
) -> None:
    ids, _, now = await race(settings, redis_client, db, locks)
    for task_id in ids:
        task = await doc(db, TASKS, task_id)
        assert task["status"] == "retry_waiting" and task["attempt"] == 1
        assert task["updated_at"] == now
        rec = await doc(db, RECORDS, task["record_id"])
        assert rec["status"] == "timeout"
    assert await db[RECORDS].count_documents({}) == len(ids)
    assert await locks.holders([f"dev-{i}" for i in range(4)]) == [None] * 4


async def test_two_masters_racing_push_and_count_each_retry_once(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase,
    locks: DeviceLocks,
) -> None:
    ids, found, _ = await race(settings, redis_client, db, locks)
    assert sorted(await ready(redis_client, settings)) == sorted(ids)
    assert await redis_client.hget(settings.keys.stats, "result_timeouts") == b"4"
    assert await redis_client.hget(settings.keys.stats, "result_timeouts_final") is None
    assert sorted(found[0].retried + found[1].retried) == sorted(ids)


# -- dead masters ------------------------------------------------------------------------------
async def test_dead_masters_are_those_without_an_alive_key(
    settings: Settings, recovery: Recovery, redis_client: redis.asyncio.Redis,
) -> None:
    keys = settings.keys
    await redis_client.hset(keys.masters, mapping={"m-me": "{}", "m-up": "{}", "m-gone": "{}"})
    await redis_client.set(keys.master_alive("m-up"), "1", px=60_000)
    assert await recovery.dead_masters(exclude="m-me") == ["m-gone"]
    assert sorted(await recovery.dead_masters()) == ["m-gone", "m-me"]
    await redis_client.set(keys.master_alive("m-gone"), "1", px=60_000)
    assert await recovery.dead_masters(exclude="m-me") == []


class Callbacks:
    def __init__(self) -> None:
        self.pending: list[Task] = []
        self.scheduled: list[Task] = []

    def on_tasks(self, tasks: list[Task]) -> None:
        self.pending.extend(tasks)

    async def on_scheduled(self, tasks: list[Task]) -> None:
        self.scheduled.extend(tasks)

    async def on_count(self, name: str, n: int) -> None:
        pass


async def test_a_dead_masters_work_is_taken_over_once(
    settings: Settings, recovery: Recovery, redis_client: redis.asyncio.Redis,
    db: AsyncDatabase,
) -> None:
    keys, dead, me = settings.keys, "m-dead", settings.master_id
    tasks = TaskStore(db)
    # The dead master took three items: it stored the first one's task and died
    # before acknowledging any; a fourth item waited in its staging list.
    for device in ("dev-a", "dev-b", "dev-c"):
        await redis_client.lpush(keys.ready, json.dumps({"device_id": device,
                                                         "script": SCRIPT}))
    taken = await IntakeQueue(redis_client, keys, dead).take(10)
    assert len(taken) == 3
    stored_first = Task.from_spec(TaskSpec(device_id="dev-a", script=SCRIPT),
                                  task_id=id_from_tag(settings.key_prefix, taken[0].tag))
    stored_first.master = dead
    assert len((await tasks.store([stored_first])).created) == 1
    await redis_client.lpush(keys.staging(dead), json.dumps({"device_id": "dev-d",
                                                             "script": SCRIPT}))
    # Tasks it held in Mongo: queued ones go back to everyone; a sent one is not its to give.
    held_pending = await put_task(db, "dev-p", TaskStatus.PENDING, master=dead)
    held_retry = await put_task(db, "dev-r", TaskStatus.RETRY_WAITING, master=dead)
    held_sent = await put_task(db, "dev-s", TaskStatus.SENT, master=dead, attempt=1)
    others = await put_task(db, "dev-o", TaskStatus.PENDING, master="m-alive")
    untouched = [await doc(db, TASKS, i) for i in (held_sent, others)]
    await redis_client.hset(keys.masters, mapping={dead: "{}", "m-alive": "{}"})
    await redis_client.set(keys.master_alive("m-alive"), "1", px=60_000)

    calls = Callbacks()

    def ingest_for(dead_id: str) -> Any:  # the taker's intake, acknowledging on dead_id
        return Intake(settings, IntakeQueue(redis_client, keys, dead_id), tasks, db[GROUPS],
                      calls.on_tasks, calls.on_scheduled, calls.on_count).ingest

    assert await recovery.dead_masters(exclude=me) == [dead]
    found = Found()
    await recovery.recover_dead_master(dead, ingest_for, found)

    assert found.dead_masters == [dead] and found.adopted_entries == 4
    for name in (keys.processing(dead), keys.staging(dead), keys.processing(me)):
        assert await redis_client.llen(name) == 0, name
    # One task per item, the tagged ones under the ids their tags give (the stored one
    # found, not stored twice), all now held by the taker and handed on once.
    for device in ("dev-a", "dev-b", "dev-c", "dev-d"):
        assert await db[TASKS].count_documents({"device_id": device}) == 1, device
    expected_ids = {id_from_tag(settings.key_prefix, e.tag) for e in taken}
    by_device = {d["device_id"]: d async for d in db[TASKS].find(
        {"device_id": {"$in": ["dev-a", "dev-b", "dev-c", "dev-d"]}})}
    assert {by_device[d]["_id"] for d in ("dev-a", "dev-b", "dev-c")} == expected_ids
    assert by_device["dev-a"]["created_at"] == stored_first.created_at
    assert all(d["master"] == me and d["status"] == "pending" for d in by_device.values())
    assert sorted(t.device_id for t in calls.pending) == ["dev-a", "dev-b", "dev-c", "dev-d"]
    assert calls.scheduled == []
    # What it held in Mongo is unowned and pushed for any master.
    assert sorted(found.requeued) == sorted([held_pending, held_retry])
    for task_id in (held_pending, held_retry):
        assert "master" not in await doc(db, TASKS, task_id)
    assert sorted(await ready(redis_client, settings)) == sorted([held_pending, held_retry])
    assert [await doc(db, TASKS, i) for i in (held_sent, others)] == untouched
    assert await redis_client.hkeys(keys.masters) == [b"m-alive"]

    # Another master doing the same afterwards finds nothing left to do.
    again = Found()
    await recovery.recover_dead_master(dead, ingest_for, again)
    assert again.adopted_entries == 0 and again.requeued == []
    assert len(calls.pending) == 4
    assert await redis_client.llen(keys.ready) == 2
    assert await db[TASKS].count_documents({}) == 8


async def test_a_dead_masters_tasks_are_not_pushed_again_by_the_orphan_sweep_after(
    settings: Settings, recovery: Recovery, redis_client: redis.asyncio.Redis,
    db: AsyncDatabase,
) -> None:
    # Queued long ago by a master that died: the takeover pushes them, and the orphan
    # sweep of the same pass must not find them unheld and old and push them again
    # (two masters would each queue a copy, and one copy goes stale on its board).
    keys, dead = settings.keys, "m-dead"
    long_ago = utcnow() - timedelta(hours=1)
    held = [await put_task(db, f"dev-{i}", TaskStatus.PENDING, master=dead,
                           updated_at=long_ago) for i in range(3)]
    await redis_client.hset(keys.masters, mapping={dead: "{}"})

    def ingest_for(dead_id: str) -> Any:
        raise AssertionError("no queue items to store")

    found = Found()
    await recovery.recover_dead_master(dead, ingest_for, found)
    await recovery.requeue_orphans(utcnow(), found)
    assert sorted(found.requeued) == sorted(held)
    assert sorted(await ready(redis_client, settings)) == sorted(held)
    # Still orphans a grace later, if no master took them: then pushed again.
    later = Found()
    await recovery.requeue_orphans(utcnow() + timedelta(seconds=31), later)
    assert sorted(later.requeued) == sorted(held)


async def test_adopted_entries_keep_their_tags(
    settings: Settings, recovery: Recovery, redis_client: redis.asyncio.Redis,
) -> None:
    keys = settings.keys
    for n in range(3):
        await redis_client.lpush(keys.ready, json.dumps({"n": n}))
    taken = await IntakeQueue(redis_client, keys, "m-dead").take(10)
    seen: list[Entry] = []

    async def ingest(entries: list[Entry]) -> None:
        seen.extend(entries)

    await redis_client.hset(keys.masters, "m-dead", "{}")
    await recovery.recover_dead_master("m-dead", lambda _dead: ingest, Found())
    assert [e.raw_entry for e in seen] == [e.raw_entry for e in taken], "same tags, same order"
    # Not acknowledged by this ingest: they stay on the dead master's list, and so does
    # the dead master, for the next sweep.
    assert await redis_client.lrange(keys.processing("m-dead"), 0, -1) == [
        e.raw_entry for e in reversed(taken)]
    assert await redis_client.hkeys(keys.masters) == [b"m-dead"]


# -- orphaned tasks ----------------------------------------------------------------------------
async def test_pending_tasks_nobody_holds_are_requeued_once_after_the_grace(
    settings: Settings, recovery: Recovery, redis_client: redis.asyncio.Redis,
    db: AsyncDatabase,
) -> None:
    now = utcnow()
    old = now - timedelta(seconds=31)
    orphan = await put_task(db, "dev-1", TaskStatus.PENDING, updated_at=old)
    null_master = await put_task(db, "dev-2", TaskStatus.PENDING, updated_at=old)
    await db[TASKS].update_one({"_id": null_master}, {"$set": {"master": None}})
    young = await put_task(db, "dev-3", TaskStatus.PENDING,
                           updated_at=now - timedelta(seconds=29))
    held = await put_task(db, "dev-4", TaskStatus.PENDING, updated_at=old, master="m-1")
    waiting = await put_task(db, "dev-5", TaskStatus.WAITING, updated_at=old)
    others = [await doc(db, TASKS, i) for i in (young, held, waiting)]

    first = Found()
    await recovery.requeue_orphans(now, first)
    assert sorted(first.requeued) == sorted([orphan, null_master])
    assert sorted(await ready(redis_client, settings)) == sorted([orphan, null_master])

    second = Found()
    await recovery.requeue_orphans(now + timedelta(seconds=29), second)
    assert second.requeued == [young], "pushed ones wait a grace again; the young one is due"
    assert sorted(await ready(redis_client, settings)) == sorted([orphan, null_master, young])
    assert [await doc(db, TASKS, i) for i in (held, waiting)] == others[1:]
    assert (await doc(db, TASKS, orphan))["updated_at"] == now

    # Still not taken after another grace: pushed again.
    third = Found()
    await recovery.requeue_orphans(now + timedelta(seconds=31), third)
    assert sorted(third.requeued) == sorted([orphan, null_master])


async def test_ids_still_waiting_in_a_deep_queue_are_not_pushed_again(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase,
) -> None:
    # A producer stored 40 tasks and pushed their ids behind items no master has
    # taken yet; another stored one and died before its push: the one orphan.
    s = recovery_settings(settings, orphan_grace_s=1.0, master_id="m-live")
    sweeper = Sweeper(s, redis_client, Recovery(s, redis_client, TaskStore(db),
                                                RecordStore(db)), lambda _dead: None)
    old = utcnow() - timedelta(minutes=5)
    queued = [await put_task(db, f"q-{i}", TaskStatus.PENDING, updated_at=old)
              for i in range(40)]
    orphan = await put_task(db, "lost", TaskStatus.PENDING, updated_at=old)
    await redis_client.lpush(settings.keys.ready, *[json.dumps({"n": i}) for i in range(20)])
    await push_refs(redis_client, settings.keys.ready, queued)

    for _ in range(3):  # three sweeps a grace apart: the queue has not moved
        found = await sweeper.sweep()
        assert found.requeued == [], "a new leader does not know the queue was drained"
        sweeper._orphans_checked = None
    # Pushed behind them all, the first sweep after all 60 are taken finds the orphan:
    # its id was never in the queue.
    queue = IntakeQueue(redis_client, settings.keys, "m-live")
    await queue.take(59)
    assert (await sweeper.sweep()).requeued == []
    await queue.take(10)
    await TaskStore(db).adopt(queued, "m-live")  # as the intake does with what it takes
    sweeper._orphans_checked = None
    assert (await sweeper.sweep()).requeued == [orphan]
    assert await ready(redis_client, settings) == [orphan]


# -- orphaned locks ----------------------------------------------------------------------------
async def test_orphaned_locks_are_released_on_the_second_pass(
    settings: Settings, recovery: Recovery, redis_client: redis.asyncio.Redis,
    db: AsyncDatabase, locks: DeviceLocks, free_events: FreeEvents,
) -> None:
    now = utcnow()
    [bare] = await locks.acquire_many([("dev-bare", 600_000)])  # no record at all
    _, _, held = await sent_task(db, locks, "dev-held", sent_at=now)  # open record
    _, finished_rec, done = await sent_task(db, locks, "dev-done", sent_at=now)
    await db[RECORDS].update_one({"_id": finished_rec}, {"$set": {"status": "success"}})

    first = Found()
    await recovery.release_orphan_locks(first, grace_s=0.5)
    assert first.orphan_locks == []
    assert await locks.holders(["dev-bare", "dev-held", "dev-done"]) == [bare, held, done]

    await asyncio.sleep(0.6)  # orphaned for longer than the grace now
    second = Found()
    await recovery.release_orphan_locks(second, grace_s=0.5)
    assert second.orphan_locks == sorted([("dev-bare", bare), ("dev-done", done)])
    assert await locks.holders(["dev-bare", "dev-held", "dev-done"]) == [None, held, None]
    events = await free_events.collect()
    assert sorted((e["device_id"], e["fence"]) for e in events) == sorted(
        [("dev-bare", bare), ("dev-done", done)])

    third = Found()
    await recovery.release_orphan_locks(third, grace_s=0.5)
    assert third.orphan_locks == []
    assert await locks.holders(["dev-held"]) == [held]


async def test_a_lock_is_read_through_its_owner_and_its_task(
    recovery: Recovery, db: AsyncDatabase, locks: DeviceLocks,
) -> None:
    """No index on the records' fences: a lock is held by the open record its owner's
    task points at. A task cancelled after it was sent still runs on its device, so its
    lock stays; a lock with no owner is matched among the tasks running or sent."""
    now = utcnow()
    fences: dict[str, int] = {}
    for device, status, owned in [("dev-sent", TaskStatus.SENT, True),
                                  ("dev-cancelled", TaskStatus.CANCELLED, True),
                                  ("dev-finished", TaskStatus.SUCCESS, True),
                                  ("dev-unowned", TaskStatus.RUNNING, False),
                                  ("dev-unowned-cancelled", TaskStatus.CANCELLED, False)]:
        task_id, record_id = new_id(), new_id()
        [fence] = await locks.acquire_many(
            [(device, 600_000, lock_owner(task_id, "m-1/w-0"))] if owned
            else [(device, 600_000)])
        fences[device] = fence
        await db[TASKS].insert_one(Task(
            _id=task_id, device_id=device, script=SCRIPT, status=status, attempt=1,
            record_id=record_id, worker="m-1/w-0", master="m-1").to_doc())
        await db[RECORDS].insert_one(ExecRecord(
            _id=record_id, task_id=task_id, attempt=1, device_id=device, lock_value=fence,
            worker="m-1/w-0", started_at=now, sent_at=now,
            status=RecordStatus.SUCCESS if status == TaskStatus.SUCCESS
            else RecordStatus.SENT).to_doc())

    found = Found()
    await recovery.release_orphan_locks(found, confirm=False)
    # Without an owner, the cancelled task's lock cannot be told from an orphan: an
    # earlier version took agents' locks so, and such a lock goes after the grace.
    assert found.orphan_locks == sorted([("dev-finished", fences["dev-finished"]),
                                         ("dev-unowned-cancelled",
                                          fences["dev-unowned-cancelled"])])
    kept = ["dev-sent", "dev-cancelled", "dev-unowned"]
    assert await locks.holders(kept) == [fences[d] for d in kept]


async def test_a_lock_taken_anew_between_passes_is_not_released(
    settings: Settings, recovery: Recovery, redis_client: redis.asyncio.Redis,
    locks: DeviceLocks,
) -> None:
    [old] = await locks.acquire_many([("dev-1", 600_000)])
    await recovery.release_orphan_locks(Found(), grace_s=0.3)
    # Its holder finished; another worker locked the device and is about to record it.
    await locks.release_many([("dev-1", old)])
    [new] = await locks.acquire_many([("dev-1", 600_000)])
    await asyncio.sleep(0.4)
    found = Found()
    await recovery.release_orphan_locks(found, grace_s=0.3)
    assert found.orphan_locks == [] and await locks.holders(["dev-1"]) == [new]
    await asyncio.sleep(0.4)  # the new fence too, once it has looked orphaned long enough
    found = Found()
    await recovery.release_orphan_locks(found, grace_s=0.3)
    assert found.orphan_locks == [("dev-1", new)]


async def test_orphaned_locks_without_confirmation_and_dry(
    recovery: Recovery, locks: DeviceLocks,
) -> None:
    [a] = await locks.acquire_many([("dev-a", 600_000)])
    dry = Found()
    await recovery.release_orphan_locks(dry, dry=True, confirm=False)
    assert dry.orphan_locks == [("dev-a", a)] and await locks.holders(["dev-a"]) == [a]
    now = Found()
    await recovery.release_orphan_locks(now, confirm=False)
    assert now.orphan_locks == [("dev-a", a)] and await locks.holders(["dev-a"]) == [None]


# -- the leader lease --------------------------------------------------------------------------
LEASE_S = 0.4


def leases(client: redis.asyncio.Redis, settings: Settings) -> tuple[LeaderLease, LeaderLease]:
    key = f"{settings.keys.prefix}:leader"
    return (LeaderLease(client, key, "m-a", LEASE_S), LeaderLease(client, key, "m-b", LEASE_S))


async def test_one_holder_among_two(settings: Settings,
                                    redis_client: redis.asyncio.Redis) -> None:
    a, b = leases(redis_client, settings)
    held = await asyncio.gather(a.hold(), b.hold())
    assert sorted(held) == [False, True]
    winner, loser = (a, b) if held[0] else (b, a)
    assert winner.leading and not loser.leading
    value = (await redis_client.get(winner.key)).decode()
    assert value.startswith(f"{winner.holder}#") and token_of(value) == winner.token
    assert await loser.hold() is False


async def test_the_holder_renews_its_lease(settings: Settings,
                                           redis_client: redis.asyncio.Redis) -> None:
    a, b = leases(redis_client, settings)
    assert await a.hold()
    token = a.token
    for _ in range(3):  # past the lease in all, renewed within its local deadline each time
        await asyncio.sleep(LEASE_S * 0.4)
        assert await a.hold()
        assert await redis_client.pttl(a.key) > LEASE_S * 1000 * 0.8
        assert await b.hold() is False
    # Renewals keep the term's token; only an acquisition draws a new one.
    assert a.token == token and (await redis_client.get(a.key)).decode() == f"m-a#{token}"


async def test_another_master_takes_over_after_expiry(
    settings: Settings, redis_client: redis.asyncio.Redis,
) -> None:
    a, b = leases(redis_client, settings)
    assert await a.hold()
    old = a.token
    assert await b.hold() is False
    await asyncio.sleep(LEASE_S + 0.2)  # a paused: its lease lapses
    assert not a.leading  # by its own clock, before it asks Redis
    assert await b.hold() and b.leading
    assert b.token is not None and old is not None and b.token > old
    # The old holder, not yet told, still thinks it holds its term's value: letting go
    # with it does not end the new holder's lease.
    assert a.term.value is not None
    await a.let_go()
    assert (await redis_client.get(b.key)).decode() == f"m-b#{b.token}"
    assert await a.hold() is False and not a.leading


async def test_let_go_hands_over_at_once(settings: Settings,
                                         redis_client: redis.asyncio.Redis) -> None:
    a, b = leases(redis_client, settings)
    assert await a.hold()
    await b.let_go()  # not leading: does nothing
    assert (await redis_client.get(a.key)).decode() == f"m-a#{a.token}"
    await a.let_go()
    assert not a.leading and await redis_client.exists(a.key) == 0
    assert await b.hold()


async def test_only_the_leader_sweeps_and_lets_go_when_stopped(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase,
) -> None:
    sweepers = []
    for master in ("m-a", "m-b"):
        s = recovery_settings(settings, master_id=master, sweep_interval_s=0.05,
                              leader_lease_s=0.6)
        rec = Recovery(s, redis_client, TaskStore(db), RecordStore(db))

        async def ingest(entries: list[Entry]) -> None:
            pass

        sweepers.append(Sweeper(s, redis_client, rec, ingest))
    tries = [0, 0]  # each sweeper's bids for the lease: the loser must have bid too

    def counted(i: int, hold: Any) -> Any:
        async def bid() -> bool:
            tries[i] += 1
            return bool(await hold())
        return bid

    for i, sw in enumerate(sweepers):
        sw.lease.hold = counted(i, sw.lease.hold)  # type: ignore[method-assign]
    stop = asyncio.Event()
    runs = [asyncio.create_task(sw.run(stop)) for sw in sweepers]
    for _ in range(500):  # both bid three times, one of them swept each time
        if min(tries) >= 3 and max(sw.sweeps for sw in sweepers) >= 3:
            break
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.gather(*runs)
    counts = sorted(sw.sweeps for sw in sweepers)
    assert min(tries) >= 3, tries
    assert counts[0] == 0 and counts[1] >= 3, counts
    assert await redis_client.exists(f"{settings.keys.prefix}:leader") == 0


async def deposed(client: redis.asyncio.Redis, a: LeaderLease, b: LeaderLease) -> None:
    """`a` led; its key lapsed in Redis (a partition, a pause) and `b` took the lease,
    while `a`'s own deadline has not passed yet: only the token tells `a` apart."""
    assert await a.hold()
    await client.delete(a.key)
    assert await b.hold()
    assert a.is_leading() and b.token is not None and a.token is not None
    assert b.token > a.token


async def test_a_deposed_leader_pushes_nothing(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase,
) -> None:
    key = f"{settings.keys.prefix}:leader"
    a, b = LeaderLease(redis_client, key, "m-a", 30.0), LeaderLease(redis_client, key, "m-b", 30.0)
    await deposed(redis_client, a, b)
    orphan = await put_task(db, "dev-o", TaskStatus.PENDING,
                            updated_at=utcnow() - timedelta(hours=1))
    old = Recovery(recovery_settings(settings, orphan_grace_s=1.0), redis_client, TaskStore(db),
                   RecordStore(db), fence=a)
    with pytest.raises(NotLeading):
        await old.requeue_orphans(utcnow(), Found())
    with pytest.raises(NotLeading):  # the push alone: checked in the same script
        await a.push("test", settings.keys.ready, ["x"])
    assert await ready(redis_client, settings) == []
    doc = await db[TASKS].find_one({"_id": orphan})
    assert doc["updated_at"] < utcnow() - timedelta(minutes=30)  # not touched either
    assert a.fenced_refusals == 2 and not a.is_leading()
    # The new leader does what the old one was refused.
    new = Recovery(recovery_settings(settings, orphan_grace_s=1.0), redis_client,
                   TaskStore(db), RecordStore(db), fence=b)
    found = Found()
    await new.requeue_orphans(utcnow(), found)
    assert found.requeued == [orphan] and await ready(redis_client, settings) == [orphan]


async def test_a_deposed_leader_deletes_nothing(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase,
) -> None:
    key = f"{settings.keys.prefix}:leader"
    a, b = LeaderLease(redis_client, key, "m-a", 30.0), LeaderLease(redis_client, key, "m-b", 30.0)
    await deposed(redis_client, a, b)
    due = utcnow() - timedelta(minutes=5)
    await db[TASKS].insert_many([{"_id": f"due-{i}", "status": "success", "purge_at": due,
                                  "updated_at": due - timedelta(days=400)} for i in range(5)])
    old = Retention(settings, db, a.is_leading, a)
    with pytest.raises(NotLeading):
        await old.sweep()
    assert await db[TASKS].count_documents({"purge_at": due}) == 5
    assert a.fenced_refusals == 1
    assert (await Retention(settings, db, b.is_leading, b).sweep())[TASKS] == 5


@pytest.fixture
async def unreachable_db(settings: Settings) -> AsyncIterator[AsyncDatabase]:
    """A real Mongo client whose server is away: every operation fails fast."""
    client: AsyncMongoClient = AsyncMongoClient(
        f"mongodb://127.0.0.1:{free_port()}/t", serverSelectionTimeoutMS=200,
        connectTimeoutMS=200, tz_aware=True)
    yield client.get_default_database()
    await client.close()


async def test_a_takeover_whose_ingest_failed_is_completed_by_the_next_sweep(
    settings: Settings, recovery: Recovery, redis_client: redis.asyncio.Redis,
    db: AsyncDatabase, unreachable_db: AsyncDatabase,
) -> None:
    keys, dead, me = settings.keys, "m-dead", settings.master_id
    await redis_client.lpush(keys.ready, json.dumps({"device_id": "dev-a", "script": SCRIPT}))
    assert len(await IntakeQueue(redis_client, keys, dead).take(10)) == 1
    await redis_client.hset(keys.masters, dead, "{}")
    calls = Callbacks()

    def ingest_on(database: AsyncDatabase) -> Any:
        def ingest_for(dead_id: str) -> Any:
            return Intake(settings, IntakeQueue(redis_client, keys, dead_id),
                          TaskStore(database), database[GROUPS], calls.on_tasks,
                          calls.on_scheduled, calls.on_count).ingest
        return ingest_for

    with pytest.raises(ServerSelectionTimeoutError):  # Mongo is away during the takeover
        await recovery.recover_dead_master(dead, ingest_on(unreachable_db), Found())
    assert await recovery.dead_masters(exclude=me) == [dead], "the sweep will try again"
    await recovery.recover_dead_master(dead, ingest_on(db), Found())  # Mongo back

    assert await db[TASKS].count_documents({"device_id": "dev-a"}) == 1
    assert [t.device_id for t in calls.pending] == ["dev-a"]
    assert await redis_client.llen(keys.processing(me)) == 0
