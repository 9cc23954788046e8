"""Intake.ingest on real Redis and Mongo: store, adopt, quarantine, survive a crash."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import redis.asyncio
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from master.intake import Intake
from sendscript.dev.embedded import free_port
from sendscript.models import Task, id_from_tag, utcnow
from sendscript.queue import Entry, IntakeQueue
from sendscript.settings import Settings
from sendscript.status import TaskStatus, task_cas
from sendscript.store import GROUPS, TASKS, Stored, TaskStore


class Board:
    """What the master's board (due tasks) and delay heap (scheduled ones) are handed."""

    def __init__(self) -> None:
        self.calls: list[list[Task]] = []
        self.scheduled: list[list[Task]] = []
        self.counts: list[tuple[str, int]] = []

    def __call__(self, tasks: list[Task]) -> None:
        self.calls.append(list(tasks))

    async def on_scheduled(self, tasks: list[Task]) -> None:
        self.scheduled.append(list(tasks))

    async def on_count(self, name: str, n: int) -> None:
        self.counts.append((name, n))

    @property
    def ids(self) -> list[str]:
        return [t.id for call in self.calls for t in call]

    def ids_tasks(self) -> list[Task]:
        return [t for call in self.calls for t in call]

    @property
    def scheduled_ids(self) -> list[str]:
        return [t.id for call in self.scheduled for t in call]


def spec(device: str, **extra: Any) -> bytes:
    return json.dumps({"device_id": device, "script": {"id": "tap", "args": {}}, **extra}).encode()


def make(settings: Settings, redis_client: redis.asyncio.Redis,
         db: AsyncDatabase) -> tuple[Intake, IntakeQueue, Board]:
    queue = IntakeQueue(redis_client, settings.keys, settings.master_id)
    board = Board()
    intake = Intake(settings, queue, TaskStore(db), groups=db[GROUPS], on_tasks=board,
                    on_scheduled=board.on_scheduled, on_count=board.on_count)
    return intake, queue, board


async def quarantine(redis_client: redis.asyncio.Redis, settings: Settings) -> list[dict]:
    raw = await redis_client.lrange(settings.keys.quarantine, 0, -1)
    return [json.loads(r) for r in reversed(raw)]


async def test_specs_are_stored_with_tag_derived_ids_and_handed_to_the_board(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    intake, queue, board = make(settings, redis_client, db)
    await redis_client.lpush(settings.keys.ready, spec("d1", priority=7, max_retries=1),
                             spec("d2", timeout_s=12.5, queue="vip"))
    entries = await queue.take(10)

    await intake.ingest(entries)

    ids = [id_from_tag(settings.key_prefix, e.tag) for e in entries]
    assert board.ids == ids
    docs = {d["_id"]: d async for d in db[TASKS].find({})}
    assert set(docs) == set(ids)
    first, second = docs[ids[0]], docs[ids[1]]
    assert first["device_id"] == "d1" and first["priority"] == 7 and first["max_retries"] == 1
    assert second["timeout_s"] == 12.5 and second["queue"] == "vip"
    for doc in (first, second):
        assert doc["status"] == "pending"
        assert doc["attempt"] == 0
        assert doc["master"] == settings.master_id
        assert doc["script"] == {"id": "tap", "args": {}}
    assert await queue.unfinished() == []
    assert await redis_client.llen(settings.keys.quarantine) == 0
    assert intake.taken == 2 and intake.quarantined == 0


async def test_ingesting_the_same_entries_again_creates_no_second_task(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    intake, queue, board = make(settings, redis_client, db)
    await redis_client.lpush(settings.keys.ready, spec("d1"), spec("d1"), spec("d2"))
    entries = await queue.take(10)
    await intake.ingest(entries)
    snapshot = [d async for d in db[TASKS].find({}).sort("_id")]
    assert len(snapshot) == 3

    # Crash after the insert, before the ack: the entries are still in processing.
    # A restarted master reads them back and ingests them again.
    await redis_client.lpush(settings.keys.processing(settings.master_id),
                             *[e.raw_entry for e in entries])
    restarted, restarted_queue, restarted_board = make(settings, redis_client, db)
    leftovers = await restarted_queue.unfinished()
    assert leftovers == entries
    await restarted.ingest(leftovers)

    assert [d async for d in db[TASKS].find({}).sort("_id")] == snapshot
    assert await restarted_queue.unfinished() == []
    assert await redis_client.llen(settings.keys.quarantine) == 0
    # The restarted master has an empty board: it must be given the stored tasks.
    assert len(board.ids) == 3
    assert sorted(restarted_board.ids) == sorted(board.ids)

    # And the same Entry objects once more, after they were acknowledged.
    await intake.ingest(entries)
    assert [d async for d in db[TASKS].find({}).sort("_id")] == snapshot
    assert await redis_client.llen(settings.keys.quarantine) == 0


async def test_reingesting_a_task_with_a_dedupe_key_hands_it_to_the_board_again(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    intake, queue, board = make(settings, redis_client, db)
    await redis_client.lpush(settings.keys.ready, spec("d1", dedupe_key="order-1"))
    entries = await queue.take(10)
    await intake.ingest(entries)
    assert len(board.ids) == 1

    await redis_client.lpush(settings.keys.processing(settings.master_id),
                             *[e.raw_entry for e in entries])
    restarted, restarted_queue, restarted_board = make(settings, redis_client, db)
    await restarted.ingest(await restarted_queue.unfinished())

    assert await db[TASKS].count_documents({}) == 1
    assert restarted_board.ids == board.ids, "the stored task is its own, not a duplicate"
    assert restarted_board.counts == []


async def test_crash_after_a_worker_claimed_does_not_hand_the_task_out_again(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    intake, queue, _ = make(settings, redis_client, db)
    await redis_client.lpush(settings.keys.ready, spec("d1"))
    entries = await queue.take(10)
    await intake.ingest(entries)
    [entry] = entries
    task_id = id_from_tag(settings.key_prefix, entry.tag)
    await db[TASKS].update_one({"_id": task_id}, {"$set": {"status": "running", "attempt": 1}})

    await redis_client.lpush(settings.keys.processing(settings.master_id), entry.raw_entry)
    restarted, restarted_queue, board = make(settings, redis_client, db)
    await restarted.ingest(await restarted_queue.unfinished())

    assert board.ids == []
    assert await db[TASKS].count_documents({}) == 1
    assert (await db[TASKS].find_one({"_id": task_id}))["status"] == "running"  # type: ignore[index]
    assert await restarted_queue.unfinished() == []


async def test_refs_are_adopted_unknown_refs_quarantined(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    await db[TASKS].insert_many([t.to_doc() for t in (
        Task(_id="known", device_id="d1", script={"id": "s"}),
        Task(_id="later", device_id="d2", script={"id": "s"}, status=TaskStatus.WAITING),
        Task(_id="others", device_id="d3", script={"id": "s"}, master="m-else"),
    )])
    intake, queue, board = make(settings, redis_client, db)
    refs = [{"task_id": "known"}, {"task_id": "later"}, {"task_id": "missing"},
            {"task_id": "others"}]
    await redis_client.lpush(settings.keys.ready, *[json.dumps(r) for r in refs])

    await intake.ingest(await queue.take(10))

    assert sorted(board.ids) == ["known", "others"]
    assert board.scheduled_ids == ["later"], "a waiting task goes to the delay heap"
    docs = {d["_id"]: d async for d in db[TASKS].find({})}
    assert docs["known"]["master"] == settings.master_id
    assert docs["others"]["master"] == settings.master_id, "a handed-back task is taken over"
    assert "master" not in docs["later"], "a waiting task is not queued, so not adopted"
    assert docs["later"]["status"] == "waiting"
    [q] = await quarantine(redis_client, settings)
    assert q["item"] == json.dumps({"task_id": "missing"})
    assert q["reason"] == "no task with task_id 'missing'"
    assert q["master"] == settings.master_id
    assert await queue.unfinished() == []
    assert await db[TASKS].count_documents({}) == 3
    assert intake.quarantined == 1


async def test_a_ref_to_a_task_held_by_this_master_is_taken_without_adopting_it(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    """The SDK stores a task due now held by a live master: that master, taking its
    reference, writes nothing more to hold it; a task held by none is adopted."""
    await db[TASKS].insert_many([t.to_doc() for t in (
        Task(_id="held", device_id="d1", script={"id": "s"}, master=settings.master_id),
        Task(_id="unheld", device_id="d2", script={"id": "s"}),
    )])
    intake, queue, board = make(settings, redis_client, db)
    adopted: list[str] = []
    adopt = intake.tasks.adopt

    async def counted(task_ids: Sequence[str], master_id: str) -> None:
        adopted.extend(task_ids)
        await adopt(task_ids, master_id)

    intake.tasks.adopt = counted  # type: ignore[method-assign]
    await redis_client.lpush(settings.keys.ready,
                             *[json.dumps({"task_id": t}) for t in ("held", "unheld")])
    await intake.ingest(await queue.take(10))
    assert sorted(board.ids) == ["held", "unheld"]
    assert adopted == ["unheld"]
    docs = {d["_id"]: d async for d in db[TASKS].find({})}
    assert {d["master"] for d in docs.values()} == {settings.master_id}


async def test_malformed_items_are_quarantined_with_reasons(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    intake, queue, board = make(settings, redis_client, db)
    bad: list[tuple[bytes, str]] = [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'"text"', "expected a JSON object, got str"),
        (json.dumps({"device_id": "d1"}).encode(), "script"),
        (spec("d1", priority=11), "priority"),
        (json.dumps({"device_id": 5, "script": {}}).encode(), "device_id"),
        (spec("d1", run_at="next tuesday"), "run_at"),
        (json.dumps({"task_id": ""}).encode(), "task_id"),
    ]
    await redis_client.lpush(settings.keys.ready, spec("ok-before"),
                             *[item for item, _ in bad], spec("ok-after"))

    await intake.ingest(await queue.take(100))

    found = await quarantine(redis_client, settings)
    assert len(found) == len(bad)
    by_item = {q["item"]: q["reason"] for q in found}
    for item, expected in bad:
        reason = by_item[item.decode("utf-8", "replace")]
        assert expected in reason, (item, reason)
    assert await redis_client.hget(settings.keys.stats, "quarantined") == str(len(bad)).encode()
    # The good items around them are stored and dispatched as usual.
    devices = sorted(t.device_id for call in board.calls for t in call)
    assert devices == ["ok-after", "ok-before"]
    assert await db[TASKS].count_documents({}) == 2
    assert await queue.unfinished() == []
    assert intake.quarantined == len(bad)


async def test_future_tasks_are_stored_waiting_and_not_dispatched(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    intake, queue, board = make(settings, redis_client, db)
    later = time.time() + 3600
    soon = time.time() + settings.delay_horizon_s / 2
    await redis_client.lpush(
        settings.keys.ready,
        spec("d-later", run_at=later),
        spec("d-iso", run_at="2999-01-01T00:00:00Z"),
        spec("d-soon", run_at=soon),
        spec("d-past", run_at=time.time() - 60),
        spec("d-now"),
    )
    await intake.ingest(await queue.take(10))

    docs = {d["device_id"]: d async for d in db[TASKS].find({})}
    assert len(docs) == 5
    for device in ("d-later", "d-iso", "d-soon"):
        assert docs[device]["status"] == "waiting", device
    assert abs(docs["d-later"]["run_at"].timestamp() - later) < 0.01
    assert docs["d-past"]["status"] == "pending"
    assert docs["d-now"]["status"] == "pending"
    # Only due tasks reach the board; the delayed ones go to the delay heap.
    assert sorted(t.device_id for call in board.calls for t in call) == ["d-now", "d-past"]
    assert sorted(t.device_id for call in board.scheduled for t in call) == [
        "d-iso", "d-later", "d-soon"]
    # Held by this master only when due within its horizon.
    assert docs["d-soon"]["master"] == settings.master_id
    assert "master" not in docs["d-later"] and "master" not in docs["d-iso"]
    assert await queue.unfinished() == []


async def test_fan_out_makes_one_task_per_device_once(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    await db[GROUPS].insert_one({"_id": "shelf-1", "devices": ["g1", "g2"]})
    intake, queue, board = make(settings, redis_client, db)
    script = {"id": "tap"}
    await redis_client.lpush(
        settings.keys.ready,
        json.dumps({"device_ids": ["a", "b", "a"], "script": script, "dedupe_key": "k"}),
        json.dumps({"group": "shelf-1", "script": script}),
        json.dumps({"group": "no-such-group", "script": script}),
        json.dumps({"device_ids": ["a"], "group": "shelf-1", "script": script}),
    )
    entries = await queue.take(10)
    await intake.ingest(entries)

    docs = [d async for d in db[TASKS].find({})]
    assert sorted(d["device_id"] for d in docs) == ["a", "b", "g1", "g2"]
    by_batch: dict[str, list[str]] = {}
    for d in docs:
        by_batch.setdefault(d["batch_id"], []).append(d["device_id"])
    assert sorted(map(sorted, by_batch.values())) == [["a", "b"], ["g1", "g2"]]
    assert {d["dedupe_key"] for d in docs if d["device_id"] in ("a", "b")} == {"k:a", "k:b"}
    assert sorted(board.ids) == sorted(d["_id"] for d in docs)
    reasons = sorted(q["reason"] for q in await quarantine(redis_client, settings))
    assert len(reasons) == 2
    assert "unknown or empty" in reasons[0] or "unknown or empty" in reasons[1]
    assert any("exactly one of device_ids or group" in r for r in reasons)

    # Crash before the ack: the fan-out is ingested again and creates nothing more.
    snapshot = [d async for d in db[TASKS].find({}).sort("_id")]
    await redis_client.lpush(settings.keys.processing(settings.master_id),
                             *[e.raw_entry for e in entries[:2]])
    restarted, restarted_queue, _ = make(settings, redis_client, db)
    await restarted.ingest(await restarted_queue.unfinished())
    assert [d async for d in db[TASKS].find({}).sort("_id")] == snapshot
    assert await restarted_queue.unfinished() == []


async def test_a_duplicate_submission_is_counted_not_stored(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    intake, queue, board = make(settings, redis_client, db)
    await redis_client.lpush(settings.keys.ready, spec("d1", dedupe_key="order-7"),
                             spec("d1", dedupe_key="order-7"))
    await intake.ingest(await queue.take(10))

    assert await db[TASKS].count_documents({}) == 1
    assert len(board.ids) == 1
    assert board.counts == [("deduplicated", 1)]
    assert intake.deduplicated == 1
    assert await queue.unfinished() == []
    assert await redis_client.llen(settings.keys.quarantine) == 0


async def test_nothing_but_refusals_calls_no_board(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    intake, queue, board = make(settings, redis_client, db)
    await redis_client.lpush(settings.keys.ready, b"nope")
    entries: list[Entry] = await queue.take(10)
    await intake.ingest(entries)
    assert board.calls == []
    assert len(await quarantine(redis_client, settings)) == 1


async def test_a_batch_that_failed_to_store_is_stored_once_mongo_is_back(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase,
) -> None:
    intake, _, board = make(settings, redis_client, db)
    away: AsyncMongoClient = AsyncMongoClient(
        f"mongodb://127.0.0.1:{free_port()}/t", serverSelectionTimeoutMS=200,
        connectTimeoutMS=200, tz_aware=True)
    store_failed = asyncio.Event()

    class AwayStore(TaskStore):
        async def store(self, tasks: Sequence[Task], chunk: int = 1000) -> Stored:
            try:
                return await super().store(tasks, chunk)
            except Exception:
                store_failed.set()
                raise

    intake.tasks = AwayStore(away.get_default_database())  # Mongo is away...
    await redis_client.lpush(settings.keys.ready, spec("d1"))
    stop = asyncio.Event()
    run = asyncio.create_task(intake.run(stop))
    try:
        processing = settings.keys.processing(settings.master_id)
        # Swapped before a store failed, the failure path this test is about never ran.
        await asyncio.wait_for(store_failed.wait(), 5)
        assert await redis_client.llen(processing) == 1  # the failed batch stays taken
        intake.tasks = TaskStore(db)  # ...and back
        deadline = time.monotonic() + 2.5
        while not await db[TASKS].count_documents({"device_id": "d1"}):
            assert time.monotonic() < deadline, "the taken item was never stored"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(run, 10)
        await away.close()
    assert [t.device_id for t in board.calls[-1]] == ["d1"]
    assert await redis_client.llen(processing) == 0


MIB = 1024 * 1024


async def test_items_the_store_refuses_are_quarantined_and_the_rest_of_their_batch_stored(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    # The largest limit: a script just under it passes validation, and its document
    # is still over Mongo's 16 MiB, so the store's own refusal is what stops it.
    settings = settings.model_copy(update={"max_script_bytes": 16 * MIB})
    intake, queue, board = make(settings, redis_client, db)
    # The server's refusal (code 121) for a device no encoder check can see coming.
    await db.command("collMod", TASKS, validator={"device_id": {"$ne": "dev-refused"}})
    bad = {
        "too large": spec("d1", script={"blob": "x" * (16 * MIB - 100)}),
        "over limit": spec("d1", script={"blob": "x" * (17 * MIB)}),
        "wide int": b'{"device_id": "d1", "script": {"n": 123456789012345678901234567890}}',
        "surrogate": b'{"device_id": "d1", "script": {"s": "\\ud800"}}',
        "server": spec("dev-refused"),
        "fan-out": json.dumps({"device_ids": ["f1", "dev-refused", "f2"],
                               "script": {"id": "tap"}}).encode(),
    }
    good = [spec(f"g{i}") for i in range(6)]
    good.append(json.dumps({"device_ids": ["f3", "f4"], "script": {"id": "tap"}}).encode())
    items = good[:3] + list(bad.values()) + good[3:]
    await redis_client.lpush(settings.keys.ready, *items)

    await intake.ingest(await queue.take(100))

    stored = sorted([d["device_id"] async for d in db[TASKS].find({})])
    assert stored == sorted([f"g{i}" for i in range(6)] + ["f3", "f4"])
    assert sorted(t.device_id for t in board.ids_tasks()) == stored
    records = await quarantine(redis_client, settings)
    assert len(records) == len(bad) and await queue.unfinished() == []
    reasons = {}
    for record in records:
        assert set(record) >= {"item", "reason", "master", "at"}
        assert record["master"] == settings.master_id
        # A large item is told by its size, the others by their whole text.
        kind = next(k for k, v in bad.items() if record.get("item_bytes") == len(v)
                    or record["item"] == v.decode("utf-8", "replace"))
        reasons[kind] = record
    assert "document of" in reasons["too large"]["reason"]
    assert "over the store's limit of 16777216 bytes" in reasons["too large"]["reason"]
    assert "over the limit of 16777216 bytes (SENDSCRIPT_MAX_SCRIPT_BYTES)" in \
        reasons["over limit"]["reason"]
    assert reasons["over limit"]["item_bytes"] == len(bad["over limit"])
    assert len(reasons["over limit"]["item"]) < 64 * 1024, "a large item is kept truncated"
    assert "only its first" in reasons["over limit"]["reason"]
    assert "8-byte ints" in reasons["wide int"]["reason"]
    assert "surrogates not allowed" in reasons["surrogate"]["reason"]
    assert "code 121" in reasons["server"]["reason"]
    assert "code 121" in reasons["fan-out"]["reason"]
    assert int(await redis_client.hget(settings.keys.stats, "quarantined")) == len(bad)


async def finish_all(db: AsyncDatabase, ago_s: float = 0) -> None:
    """Every pending task succeeds, `ago_s` seconds ago."""
    flt, upd = task_cas({}, TaskStatus.PENDING, TaskStatus.SUCCESS,
                        utcnow() - timedelta(seconds=ago_s))
    await db[TASKS].update_many(flt, upd)


async def test_a_duplicate_after_the_original_succeeded_is_answered_within_the_window(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    intake, queue, board = make(settings, redis_client, db)
    intake.tasks = TaskStore(db, dedupe_window_s=3600)
    await redis_client.lpush(settings.keys.ready, spec("d1", dedupe_key="order-8"))
    await intake.ingest(await queue.take(10))
    original = board.ids[0]
    await finish_all(db, ago_s=60)

    await redis_client.lpush(settings.keys.ready, spec("d1", dedupe_key="order-8"))
    await intake.ingest(await queue.take(10))

    assert [d["_id"] async for d in db[TASKS].find({})] == [original]
    assert board.ids == [original] and board.counts == [("deduplicated", 1)]
    assert await queue.unfinished() == []


async def test_a_duplicate_after_the_window_makes_a_new_task(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    intake, queue, board = make(settings, redis_client, db)
    intake.tasks = TaskStore(db, dedupe_window_s=3600)
    await redis_client.lpush(settings.keys.ready, spec("d1", dedupe_key="order-9"))
    await intake.ingest(await queue.take(10))
    original = board.ids[0]
    await finish_all(db, ago_s=3700)

    await redis_client.lpush(settings.keys.ready, spec("d1", dedupe_key="order-9"))
    await intake.ingest(await queue.take(10))

    assert len(board.ids) == 2 and board.ids[0] == original
    holders = [d["_id"] async for d in db[TASKS].find({"dedupe_active": "order-9"})]
    assert holders == [board.ids[1]]
    assert board.counts == []
