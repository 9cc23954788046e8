"""Tasks per status kept by the leader's keeper equal an aggregate over the collection
after tasks moved through every kind of compare-and-set: claims, sends, results,
retries, multi-source results and cancels, expiries, manual retries, a dead worker's
tasks put back, tasks moved while the keeper was away, and retention's deletes."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta
from typing import Any

import redis.asyncio
from pymongo.asynchronous.database import AsyncDatabase

from master.retention import Retention
from sendscript import counts
from sendscript.models import Task, TaskSpec, utcnow
from sendscript.retry import Decision, failure_cas
from sendscript.settings import Settings
from sendscript.status import (
    CANCELLABLE,
    RETRYABLE_BY_HAND,
    TaskStatus,
    configure_retention,
    manual_retry,
    task_cas,
)
from sendscript.store import TASKS, TaskStore

S = TaskStatus


async def _aggregate(db: AsyncDatabase) -> dict[str, int]:
    cursor = await db[TASKS].aggregate([{"$group": {"_id": "$status", "n": {"$sum": 1}}}])
    return {d["_id"]: d["n"] async for d in cursor}


async def _kept(client: redis.asyncio.Redis, settings: Settings) -> dict[str, int]:
    return (await counts.read(client, settings.keys.prefix)).by_status


async def _ids(db: AsyncDatabase, status: S) -> list[dict[str, Any]]:
    return [d async for d in db[TASKS].find({"status": str(status)}, {"attempt": 1})]


async def _move(db: AsyncDatabase, rng: random.Random) -> None:
    """One round of moves, each through the production CAS builders."""
    now = utcnow()
    col = db[TASKS]
    pending = await _ids(db, S.PENDING)
    rng.shuffle(pending)
    for d in pending[: len(pending) // 2]:  # a worker's claim
        await col.update_one(*task_cas(d["_id"], S.PENDING, S.RUNNING, now,
                                       attempt=d["attempt"],
                                       set_={"attempt": d["attempt"] + 1, "worker": "w1"}))
    for d in await _ids(db, S.RUNNING):
        roll = rng.random()
        if roll < 0.5:
            await col.update_one(*task_cas(d["_id"], S.RUNNING, S.SENT, now,
                                           attempt=d["attempt"]))
        elif roll < 0.7:  # its worker died: put back
            await col.update_one(*task_cas(d["_id"], S.RUNNING, S.PENDING, now))
    for d in await _ids(db, S.SENT):
        roll = rng.random()
        result_from = {S.RUNNING, S.SENT, S.PENDING, S.RETRY_WAITING}  # several sources
        if roll < 0.5:
            await col.update_one(*task_cas(d["_id"], result_from, S.SUCCESS, now,
                                           attempt=d["attempt"]))
        elif roll < 0.8:
            retry = rng.random() < 0.6
            decision = Decision(retry, "ERROR: no", now + timedelta(seconds=1) if retry else None)
            await col.update_one(*failure_cas(d["_id"], {S.RUNNING, S.SENT}, d["attempt"],
                                              decision, now))
    for d in await _ids(db, S.RETRY_WAITING):
        if rng.random() < 0.7:
            await col.update_one(*task_cas(d["_id"], S.RETRY_WAITING, S.PENDING, now))
    for d in await _ids(db, S.WAITING):
        roll = rng.random()
        if roll < 0.3:
            await col.update_one(*task_cas(d["_id"], S.WAITING, S.EXPIRED, now))
        elif roll < 0.6:
            await col.update_one(*task_cas(d["_id"], S.WAITING, S.PENDING, now))
    everything = [d async for d in col.find({}, {"_id": 1})]
    for d in rng.sample(everything, k=min(10, len(everything))):  # cancels from anywhere
        await col.update_one(*task_cas(d["_id"], CANCELLABLE, S.CANCELLED, now))
    finished = [d async for d in col.find(
        {"status": {"$in": sorted(str(s) for s in RETRYABLE_BY_HAND)}}, {"_id": 1})]
    for d in rng.sample(finished, k=min(5, len(finished))):  # an operator's retries
        await col.update_one(*manual_retry(d["_id"], now))


async def _store(store: TaskStore, n: int, rng: random.Random) -> None:
    now = utcnow()
    tasks = []
    for i in range(n):
        delayed = rng.random() < 0.2
        spec = TaskSpec(device_id=f"d{i % 37}", script={"id": "s"},
                        run_at=now + timedelta(hours=1) if delayed else None)
        task = Task.from_spec(spec, now=now)
        # created over the last hour (many buckets), stored now
        task.created_at = now - timedelta(seconds=rng.randrange(3600))
        tasks.append(task)
    await store.store(tasks)


async def test_counts_equal_an_aggregate_after_every_kind_of_move(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    settings.counts_overlap_s = 2.0
    rng = random.Random(10)
    store = TaskStore(db)
    await _store(store, 400, rng)
    keeper = counts.CountKeeper(settings, redis_client, db)
    first = await keeper.run_pass()
    assert first.rebuilt
    assert await _kept(redis_client, settings) == await _aggregate(db)
    for _ in range(6):
        await _move(db, rng)
        await _store(store, 20, rng)
        report = await keeper.run_pass()
        assert not report.rebuilt and report.changed_tasks > 0
        assert await _kept(redis_client, settings) == await _aggregate(db)
    # Moves while no keeper ran (a leader died, another takes over later): the next
    # pass of a new keeper finds them from the watermark in Redis.
    await _move(db, rng)
    await _move(db, rng)
    await counts.CountKeeper(settings, redis_client, db).run_pass()
    agg = await _aggregate(db)
    assert await _kept(redis_client, settings) == agg
    assert len(agg) >= 6, agg  # the run did reach most statuses


async def test_retention_deletes_are_counted_out(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    settings.counts_purge_lag_s = 0.0
    store = TaskStore(db)
    await _store(store, 60, random.Random(3))
    keeper = counts.CountKeeper(settings, redis_client, db)
    await keeper.run_pass()
    configure_retention(1.0, 1.0, 0.0)  # finished tasks are purged a second later
    try:
        now = utcnow()
        pending = [d["_id"] async for d in db[TASKS].find({"status": "pending"}, {"_id": 1})]
        await db[TASKS].update_many(*task_cas(pending[:30], S.PENDING, S.CANCELLED, now))
    finally:
        configure_retention(7 * 86400, 30 * 86400, 86400)
    await keeper.run_pass()
    assert (await _kept(redis_client, settings)).get("cancelled") == 30
    # The leader's retention sweep deletes them once due.
    settings.retention_success_s = settings.retention_failed_s = 1.0
    retention = Retention(settings, db)
    deadline = utcnow() + timedelta(seconds=30)
    while (await _aggregate(db)).get("cancelled") and utcnow() < deadline:
        await retention.sweep()
        await keeper.run_pass()
    assert "cancelled" not in await _aggregate(db)
    assert retention.deleted[TASKS] == 30
    await keeper.run_pass()
    assert await _kept(redis_client, settings) == await _aggregate(db)


async def test_buckets_that_keep_moving_are_read_whole_once_then_from_memory(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    settings.counts_overlap_s = 2.0
    settings.counts_refresh_s = 3600.0
    store = TaskStore(db)
    now = utcnow()
    tasks = [Task.from_spec(TaskSpec(device_id=f"d{i}", script={"id": "s"}), now=now)
             for i in range(60)]
    for i, t in enumerate(tasks):  # two buckets, 30 tasks each
        t.created_at = now - timedelta(seconds=600 if i % 2 else 1200)
    await store.store(tasks)
    keeper = counts.CountKeeper(settings, redis_client, db)
    assert (await keeper.run_pass()).rebuilt

    async def move(ids: list[str], src: S, dst: S, **fields: Any) -> None:
        flt, upd = task_cas(ids, src, dst, utcnow())
        upd["$set"].update(fields)
        await db[TASKS].update_many(flt, upd)

    ids = [t.id for t in tasks]
    await move(ids[:40], S.PENDING, S.RUNNING)
    first = await keeper.run_pass()
    assert (first.recounted, first.read_whole) == (2, 2)  # not known yet: read whole
    assert first.read_tasks == first.changed_tasks + 60
    for src, dst in ((S.RUNNING, S.SENT), (S.SENT, S.SUCCESS)):
        await move(ids[:20], src, dst)
        report = await keeper.run_pass()
        assert (report.recounted, report.read_whole) == (2, 0)  # from memory
        assert report.read_tasks == report.changed_tasks
        assert await _kept(redis_client, settings) == await _aggregate(db)
    # A write that did not set updated_at is seen once the bucket is next read whole.
    await db[TASKS].update_one({"_id": ids[59]}, {"$set": {"status": "cancelled"}})
    keeper.book.refresh_s = 0.0
    await move(ids[20:22], S.RUNNING, S.SENT)
    assert (await keeper.run_pass()).read_whole == 2
    assert await _kept(redis_client, settings) == await _aggregate(db)
    # Another keeper passed in between (a leader came and went): ours read whole again.
    keeper.book.refresh_s = 3600.0
    await counts.CountKeeper(settings, redis_client, db).run_pass()
    await move(ids[22:24], S.RUNNING, S.SENT)
    assert (await keeper.run_pass()).read_whole == 2
    await move(ids[24:26], S.RUNNING, S.SENT)
    assert (await keeper.run_pass()).read_whole == 0
    assert await _kept(redis_client, settings) == await _aggregate(db)


async def test_buckets_begun_after_the_watch_are_never_read_whole(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    """Tasks stored after the keeper began watching are each read as they change: their
    buckets are counted from memory alone, and the counts still equal an aggregate."""
    settings.counts_overlap_s = 2.0
    settings.counts_refresh_s = 3600.0
    settings.counts_bucket_s = 1  # the buckets of the tasks below begin after the watch
    store = TaskStore(db)
    old = [Task.from_spec(TaskSpec(device_id=f"d{i}", script={"id": "s"}),
                          now=utcnow() - timedelta(seconds=600)) for i in range(20)]
    await store.store(old)
    keeper = counts.CountKeeper(settings, redis_client, db)
    assert (await keeper.run_pass()).rebuilt
    await keeper.run_pass()  # the watch begins
    steps = [(S.PENDING, S.RUNNING), (S.RUNNING, S.SENT), (S.SENT, S.SUCCESS)]
    batches: list[list[str]] = []
    for _ in range(4):
        new = [Task.from_spec(TaskSpec(device_id=f"d{i}", script={"id": "s"}), now=utcnow())
               for i in range(15)]
        await store.store(new)
        batches.append([t.id for t in new])
        # each batch a step on: claimed, then sent, then done
        for ids, (src, dst) in zip(reversed(batches), steps, strict=False):
            await db[TASKS].update_many(*task_cas(ids[:10], src, dst, utcnow()))
        report = await keeper.run_pass()
        assert report.read_whole == 0 and report.changed_tasks > 0
        assert report.read_tasks == report.changed_tasks
        assert await _kept(redis_client, settings) == await _aggregate(db)
        await asyncio.sleep(0.3)
    # The bucket of the tasks stored before the watch moves: read whole.
    flt, upd = task_cas(old[0].id, S.PENDING, S.CANCELLED, utcnow())
    await db[TASKS].update_one(flt, upd)
    assert (await keeper.run_pass()).read_whole == 1
    assert await _kept(redis_client, settings) == await _aggregate(db)


async def test_a_change_visible_after_the_pass_its_time_belongs_to_is_read_an_overlap_later(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    settings.counts_overlap_s = 1.0
    store = TaskStore(db)
    now = utcnow()
    tasks = [Task.from_spec(TaskSpec(device_id=f"d{i}", script={"id": "s"}), now=now)
             for i in range(10)]
    await store.store(tasks)
    keeper = counts.CountKeeper(settings, redis_client, db)
    await keeper.run_pass()  # rebuild
    await keeper.run_pass()
    # A write stamped before the last pass read but committed after it: a writer's
    # clock behind, or a write in flight. The next pass reads only what is newer...
    flt, upd = task_cas(tasks[0].id, S.PENDING, S.CANCELLED, utcnow() - timedelta(seconds=0.3))
    await db[TASKS].update_one(flt, upd)
    report = await keeper.run_pass()
    assert report.changed_tasks == 0
    assert (await _kept(redis_client, settings)).get("cancelled") is None
    # ... and the passes after it read the window again once it is an overlap old.
    await asyncio.sleep(1.2)
    await keeper.run_pass()
    await keeper.run_pass()
    assert await _kept(redis_client, settings) == await _aggregate(db) == {
        "pending": 9, "cancelled": 1}
