"""A big fan-out is stored a chunk a round between the items behind it, and a crash
half way stores every device once (real Redis and Mongo)."""

from __future__ import annotations

import asyncio
import json
import time

import redis.asyncio
from pymongo.asynchronous.database import AsyncDatabase

from sendscript.settings import Settings
from sendscript.store import TASKS
from tests.integration.test_intake import make, quarantine, spec

SCRIPT = {"id": "tap", "args": {}}


def fanout(n: int, prefix: str = "f") -> bytes:
    # Pushed unsorted: the chunks follow device-id order whatever the item's order.
    return json.dumps({"device_ids": [f"{prefix}{i:05d}" for i in reversed(range(n))],
                       "script": SCRIPT}).encode()


async def fanout_tasks(db: AsyncDatabase, prefix: str = "f") -> list[str]:
    return [d["device_id"] async for d in db[TASKS].find(
        {"device_id": {"$regex": f"^{prefix}"}}, {"device_id": 1})]


async def test_a_fan_out_is_stored_a_chunk_a_round_and_the_items_behind_it_at_once(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    settings = settings.model_copy(update={"intake_fanout_chunk": 500})
    intake, queue, board = make(settings, redis_client, db)
    await redis_client.lpush(settings.keys.ready, fanout(1200), spec("single-1"),
                             spec("single-2"))
    entries = await queue.take(10)
    fan_tag = entries[0].tag

    await intake.ingest_round(entries)
    # The singles behind it are stored in the fan-out's first round, with its first chunk.
    assert await db[TASKS].count_documents({"device_id": {"$in": ["single-1", "single-2"]}}) == 2
    assert sorted(await fanout_tasks(db)) == [f"f{i:05d}" for i in range(500)]
    assert [e.tag for e in await queue.unfinished()] == [fan_tag]  # not acknowledged yet
    assert await redis_client.hget(settings.keys.fanout_cursors, fan_tag) == b"f00499"

    await intake.ingest_round([])
    assert len(await fanout_tasks(db)) == 1000
    await intake.ingest_round([])
    assert sorted(await fanout_tasks(db)) == [f"f{i:05d}" for i in range(1200)]
    assert await queue.unfinished() == []
    assert not await redis_client.exists(settings.keys.fanout_cursors)
    # One batch id for every chunk, every task handed to the board once.
    assert len(await db[TASKS].distinct("batch_id", {"device_id": {"$regex": "^f"}})) == 1
    assert len(board.ids) == len(set(board.ids)) == 1202


async def test_a_master_that_dies_half_way_through_a_fan_out_stores_each_device_once(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    settings = settings.model_copy(update={"intake_fanout_chunk": 400})
    intake, queue, _ = make(settings, redis_client, db)
    await redis_client.lpush(settings.keys.ready, fanout(1000))
    await intake.ingest_round(await queue.take(10))
    await intake.ingest_round([])
    assert len(await fanout_tasks(db)) == 800
    before = {d["_id"]: d["device_id"] async for d in db[TASKS].find({})}

    # Restarted: its processing list and the cursor say where to go on.
    restarted, restarted_queue, board = make(settings, redis_client, db)
    await restarted.ingest_round(await restarted_queue.unfinished())
    devices = await fanout_tasks(db)
    assert sorted(devices) == [f"f{i:05d}" for i in range(1000)]
    assert len(devices) == len(set(devices))
    assert sorted(t.device_id for t in board.ids_tasks()) == [f"f{i:05d}"
                                                             for i in range(800, 1000)]
    assert {d["_id"]: d["device_id"] async for d in db[TASKS].find(
        {"_id": {"$in": list(before)}})} == before
    assert await restarted_queue.unfinished() == []
    assert not await redis_client.exists(settings.keys.fanout_cursors)


async def test_a_chunk_stored_but_whose_cursor_was_lost_is_stored_once(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    settings = settings.model_copy(update={"intake_fanout_chunk": 300})
    intake, queue, _ = make(settings, redis_client, db)
    await redis_client.lpush(settings.keys.ready, fanout(700))
    await intake.ingest_round(await queue.take(10))
    # The crash fell between the store and the cursor's write: the next master
    # stores from the start, and the tag-derived ids find the tasks stored before.
    await redis_client.delete(settings.keys.fanout_cursors)
    restarted, restarted_queue, _ = make(settings, redis_client, db)
    await restarted.ingest(await restarted_queue.unfinished())
    devices = await fanout_tasks(db)
    assert sorted(devices) == [f"f{i:05d}" for i in range(700)]
    assert await restarted_queue.unfinished() == []


async def test_a_refused_fan_out_is_quarantined_on_its_first_chunk(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    settings = settings.model_copy(update={"intake_fanout_chunk": 100})
    intake, queue, _ = make(settings, redis_client, db)
    item = {"device_ids": [f"r{i}" for i in range(250)], "script": {"id": "x", "args": {
        "blob": "\udc80"}}}  # a lone surrogate: no store can encode it
    await redis_client.lpush(settings.keys.ready,
                             json.dumps(item, ensure_ascii=True).encode(), spec("after"))
    await intake.ingest(await queue.take(10))
    assert await db[TASKS].count_documents({"device_id": {"$regex": "^r"}}) == 0
    assert await db[TASKS].count_documents({"device_id": "after"}) == 1
    [record] = await quarantine(redis_client, settings)
    assert "were stored" not in record["reason"], record["reason"]  # refused whole
    assert await queue.unfinished() == []


async def test_a_fan_out_refused_on_a_later_chunk_is_quarantined_and_its_stored_tasks_stand(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    settings = settings.model_copy(update={"intake_fanout_chunk": 100})
    intake, queue, _ = make(settings, redis_client, db)
    # The server refuses one device's document (code 121): no check before could know.
    await db.command("collMod", TASKS, validator={"device_id": {"$ne": "f00150"}})
    await redis_client.lpush(settings.keys.ready, fanout(250))
    await intake.ingest(await queue.take(10))
    assert sorted(await fanout_tasks(db)) == [f"f{i:05d}" for i in range(100)]
    [record] = await quarantine(redis_client, settings)
    assert "code 121" in record["reason"] and "were stored" in record["reason"]
    assert await queue.unfinished() == []
    assert not await redis_client.exists(settings.keys.fanout_cursors)


async def test_singles_pushed_behind_a_fan_out_are_stored_before_it_is(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    """The running intake: what is pushed after a big fan-out does not wait for it."""
    settings = settings.model_copy(update={"intake_fanout_chunk": 200})
    intake, _, _ = make(settings, redis_client, db)
    stop = asyncio.Event()
    await redis_client.lpush(settings.keys.ready, fanout(3000))
    run = asyncio.create_task(intake.run(stop))
    try:
        deadline = time.monotonic() + 20
        while not await db[TASKS].count_documents({"device_id": {"$regex": "^f"}}):
            assert time.monotonic() < deadline, "the fan-out's first chunk was never stored"
            await asyncio.sleep(0.01)
        await redis_client.lpush(settings.keys.ready, *[spec(f"s{i}") for i in range(5)])
        while await db[TASKS].count_documents({"device_id": {"$regex": "^s"}}) < 5:
            assert time.monotonic() < deadline, "the singles were never stored"
            await asyncio.sleep(0.01)
        stored_then = await db[TASKS].count_documents({"device_id": {"$regex": "^f"}})
        assert stored_then < 3000, "the singles waited for the whole fan-out"
        while await db[TASKS].count_documents({"device_id": {"$regex": "^f"}}) < 3000:
            assert time.monotonic() < deadline, "the fan-out was never finished"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(run, 10)
    devices = await fanout_tasks(db)
    assert len(devices) == len(set(devices)) == 3000


async def test_a_fan_out_whose_device_task_is_not_valid_is_quarantined_and_stalls_nothing(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    settings = settings.model_copy(update={"intake_fanout_chunk": 100})
    intake, queue, _ = make(settings, redis_client, db)
    # Group members are written by other programs: one id longer than a task takes,
    # past the first chunk; members that are not strings; and a dedupe key that the
    # device suffix makes too long for a task. Each parses, each fails when carved.
    await db["device_groups"].insert_many([
        {"_id": "long", "devices": [f"g{i:05d}" for i in range(150)] + ["g" + "x" * 300]},
        {"_id": "mixed", "devices": ["m1", 7, None]},
    ])
    await redis_client.lpush(
        settings.keys.ready,
        json.dumps({"group": "long", "script": SCRIPT}).encode(),
        json.dumps({"group": "mixed", "script": SCRIPT}).encode(),
        json.dumps({"device_ids": ["k1", "k2"], "dedupe_key": "k" * 500,
                    "script": SCRIPT}).encode(),
        spec("after"))
    await intake.ingest(await queue.take(10))

    assert await db[TASKS].count_documents({"device_id": "after"}) == 1
    assert sorted(await fanout_tasks(db, "g")) == [f"g{i:05d}" for i in range(100)]
    assert await db[TASKS].count_documents({"device_id": {"$in": ["m1", "k1", "k2"]}}) == 0
    reasons = sorted(r["reason"] for r in await quarantine(redis_client, settings))
    assert len(reasons) == 3, reasons
    assert "not strings" in reasons[0]
    assert "'g" in reasons[1] and "device_id" in reasons[1] and "were stored" in reasons[1]
    assert "'k1'" in reasons[2] and "dedupe_key" in reasons[2]
    assert await queue.unfinished() == []
    assert not await redis_client.exists(settings.keys.fanout_cursors)
