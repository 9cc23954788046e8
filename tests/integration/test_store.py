"""Mongo repositories on a real MongoDB-protocol server: inserts, claims, records, logs."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from sendscript.models import ExecRecord, LogType, Task, TaskLogMessage, new_id, utcnow
from sendscript.status import RETENTION, TaskStatus, task_cas
from sendscript.store import (
    DEVICES,
    LOGS,
    PULL_TASK_INDEXES,
    RECORDS,
    TASKS,
    Claim,
    LogStore,
    RecordStore,
    TaskStore,
    ensure_indexes,
    ensure_pull_indexes,
)


def task(task_id: str | None = None, **fields: Any) -> Task:
    values: dict[str, Any] = {"_id": task_id or new_id(), "device_id": "dev-1",
                              "script": {"id": "tap"}}
    values.update(fields)
    return Task(**values)


def record(task_id: str, attempt: int, **fields: Any) -> ExecRecord:
    values: dict[str, Any] = {"_id": new_id(), "task_id": task_id, "attempt": attempt,
                              "device_id": "dev-1", "lock_value": 1, "worker": "w",
                              "started_at": utcnow()}
    values.update(fields)
    return ExecRecord(**values)


async def test_ensure_indexes_is_idempotent_and_makes_records_unique(db: AsyncDatabase) -> None:
    await ensure_indexes(db)  # the fixture ran it once already
    info = await db[RECORDS].index_information()
    unique = [spec for spec in info.values() if spec.get("unique")]
    assert [spec["key"] for spec in unique] == [[("task_id", 1), ("attempt", 1)]]
    task_keys = [spec["key"] for spec in (await db[TASKS].index_information()).values()]
    assert [("status", 1), ("run_at", 1)] in task_keys
    log_keys = [spec["key"] for spec in (await db[LOGS].index_information()).values()]
    assert [("task_id", 1), ("timestamp", 1)] in log_keys


async def test_the_pull_indexes_are_made_by_the_agents_role_alone(db: AsyncDatabase) -> None:
    def names(info: dict[str, object]) -> set[str]:
        return set(info) - {"_id_"}

    pull = {model.document["name"] for model in PULL_TASK_INDEXES}
    await ensure_indexes(db)
    assert not pull & names(await db[TASKS].index_information())
    await ensure_pull_indexes(db)
    await ensure_pull_indexes(db)  # idempotent, as each agents role starts
    assert pull <= names(await db[TASKS].index_information())


async def test_ensure_indexes_drops_the_purge_at_indexes_an_earlier_version_made(
    db: AsyncDatabase
) -> None:
    for name in (TASKS, RECORDS):
        await db[name].create_index([("purge_at", 1)], expireAfterSeconds=0)
    await ensure_indexes(db)
    for name in (TASKS, RECORDS):
        assert "purge_at_1" not in await db[name].index_information()


async def test_records_keep_no_index_on_their_fence(db: AsyncDatabase) -> None:
    """Which attempt holds a lock is read through its owner and task; the lock_value
    index an earlier version made is dropped, as it cost every write of a record."""
    await db[RECORDS].create_index([("lock_value", 1)])
    await ensure_indexes(db)
    info = await db[RECORDS].index_information()
    assert "lock_value_1" not in info and "task_id_1_attempt_1" in info


async def test_devices_keep_no_index_but_their_id(db: AsyncDatabase) -> None:
    """The fleet view reads devices by `_id`; the device_id index an earlier version
    made is dropped, as it cost every update of a device."""
    await db[DEVICES].create_index([("device_id", 1)])
    await ensure_indexes(db)
    assert set(await db[DEVICES].index_information()) == {"_id_"}


async def put(db: AsyncDatabase, *tasks: Task) -> None:
    """Arrange: tasks stored as they are, whatever the store's own insert does."""
    await db[TASKS].insert_many([t.to_doc() for t in tasks])


async def test_store_says_what_was_stored_before(db: AsyncDatabase) -> None:
    tasks = TaskStore(db)
    t1, t2 = task("t1", priority=1), task("t2", priority=2)
    first = await tasks.store([t1, t2])
    assert [t.id for t in first.created] == ["t1", "t2"]
    assert first.stored_before == [] and first.deduplicated == {}

    again = task("t2", priority=9)
    second = await tasks.store([again, task("t3")])
    assert [t.id for t in second.created] == ["t3"]
    assert [t.id for t in second.stored_before] == ["t2"]
    assert (await tasks.store([])).created == []

    stored = {t.id: t for t in await tasks.find_many(["t1", "t2", "t3", "nope"])}
    assert set(stored) == {"t1", "t2", "t3"}
    assert stored["t2"].priority == 2, "the first stored task is kept, not overwritten"
    assert stored["t1"] == t1
    assert await db[TASKS].count_documents({}) == 3


async def test_store_in_chunks_keeps_each_task_in_its_place(db: AsyncDatabase) -> None:
    tasks = TaskStore(db)
    await put(db, task("t2"), task("t5"))
    result = await tasks.store([task(f"t{i}") for i in range(7)], chunk=3)
    assert sorted(t.id for t in result.created) == ["t0", "t1", "t3", "t4", "t6"]
    assert sorted(t.id for t in result.stored_before) == ["t2", "t5"]
    assert await db[TASKS].count_documents({}) == 7


async def test_store_refuses_a_second_unfinished_task_with_the_same_dedupe_key(
    db: AsyncDatabase,
) -> None:
    tasks = TaskStore(db)

    def keyed(task_id: str, key: str) -> Task:
        return task(task_id, dedupe_key=key, dedupe_active=key)

    first = await tasks.store([keyed("t1", "k1")])
    assert [t.id for t in first.created] == ["t1"]
    again = await tasks.store([keyed("t2", "k1"), keyed("t3", "k2"), keyed("t4", "k2")])
    assert [t.id for t in again.created] == ["t3"]
    assert again.deduplicated == {"t2": "t1", "t4": "t3"}
    assert again.stored_before == []
    assert {d["_id"] async for d in db[TASKS].find({})} == {"t1", "t3"}

    # Finished, t1 keeps its key for the dedupe window: a late duplicate is answered.
    flt, upd = task_cas("t1", TaskStatus.PENDING, TaskStatus.CANCELLED, utcnow())
    assert await tasks.cas(flt, upd)
    third = await tasks.store([keyed("t5", "k1")])
    assert third.created == [] and third.deduplicated == {"t5": "t1"}
    assert third.existing_status == {"t1": "cancelled"}


async def test_storing_a_keyed_task_again_is_stored_before_not_a_duplicate(
    db: AsyncDatabase,
) -> None:
    tasks = TaskStore(db)
    keyed = task("t1", dedupe_key="k1", dedupe_active="k1")
    assert [t.id for t in (await tasks.store([keyed])).created] == ["t1"]
    again = await tasks.store([keyed])
    assert again.deduplicated == {}
    assert [t.id for t in again.stored_before] == ["t1"]


async def test_claim_moves_pending_to_running(db: AsyncDatabase) -> None:
    tasks = TaskStore(db)
    stored = task("t1")
    await put(db, stored)
    now = utcnow() + timedelta(seconds=1)

    [record_id] = await tasks.claim_many([Claim("t1", 0, "w-1")], now)
    assert record_id is not None

    doc = await db[TASKS].find_one({"_id": "t1"})
    assert doc is not None
    assert doc["status"] == "running"
    assert doc["attempt"] == 1
    assert doc["record_id"] == record_id
    assert doc["worker"] == "w-1"
    assert doc["updated_at"] == now
    assert "finished_at" not in doc
    # The same attempt cannot be claimed twice.
    assert await tasks.claim_many([Claim("t1", 0, "w-2")], now) == [None]
    assert (await tasks.get("t1")).record_id == record_id  # type: ignore[union-attr]


async def test_concurrent_claims_of_one_task_have_one_winner(db: AsyncDatabase) -> None:
    tasks = TaskStore(db)
    ids = [f"t{i}" for i in range(20)]
    await put(db, *[task(i) for i in ids])
    now = utcnow()

    # Two workers race for every task, each in a batch of its own.
    a, b = await asyncio.gather(
        tasks.claim_many([Claim(i, 0, "w-a") for i in ids], now),
        tasks.claim_many([Claim(i, 0, "w-b") for i in ids], now),
    )
    for task_id, won_a, won_b in zip(ids, a, b, strict=True):
        assert (won_a is None) != (won_b is None), f"{task_id}: a={won_a} b={won_b}"
    docs = {d["_id"]: d async for d in db[TASKS].find({})}
    for task_id, won_a, won_b in zip(ids, a, b, strict=True):
        winner = "a" if won_a else "b"
        assert docs[task_id]["record_id"] == (won_a or won_b)
        assert docs[task_id]["worker"] == f"w-{winner}"
        assert docs[task_id]["attempt"] == 1
        assert docs[task_id]["status"] == "running"


async def test_two_claims_in_one_batch_have_one_winner(db: AsyncDatabase) -> None:
    tasks = TaskStore(db)
    await put(db, task("t1"), task("t2"))
    won = await tasks.claim_many(
        [Claim("t1", 0, "w"), Claim("t1", 0, "w"), Claim("t2", 0, "w")],
        utcnow(),
    )
    assert won[2] is not None
    assert [w is None for w in won[:2]].count(True) == 1
    winner = won[0] or won[1]
    assert (await tasks.get("t1")).record_id == winner  # type: ignore[union-attr]
    assert (await tasks.get("t2")).record_id == won[2]  # type: ignore[union-attr]


async def test_claim_with_a_stale_attempt_loses(db: AsyncDatabase) -> None:
    tasks = TaskStore(db)
    await put(db, task("t1", attempt=2), task("t2", status=TaskStatus.SENT))
    before = await db[TASKS].find_one({"_id": "t1"})

    won = await tasks.claim_many(
        [Claim("t1", 1, "w"), Claim("t2", 0, "w"), Claim("gone", 0, "w")],
        utcnow() + timedelta(seconds=1),
    )
    assert won == [None, None, None]
    assert await db[TASKS].find_one({"_id": "t1"}) == before
    assert (await tasks.get("t2")).status == TaskStatus.SENT  # type: ignore[union-attr]

    assert (await tasks.claim_many([Claim("t1", 2, "w")], utcnow()))[0] is not None
    assert (await tasks.get("t1")).attempt == 3  # type: ignore[union-attr]


async def test_one_record_per_task_attempt(db: AsyncDatabase) -> None:
    records = RecordStore(db)
    first = record("t1", 1)
    assert await records.insert_many([first]) == [True]

    # A second record for (t1, 1) is refused; the others of the batch are stored.
    second, other = record("t1", 1, worker="w-late"), record("t1", 2)
    assert await records.insert_many([second, other]) == [False, True]
    # Two for the same attempt in one batch: one is stored.
    twin_a, twin_b = record("t2", 1), record("t2", 1)
    assert await records.insert_many([twin_a, twin_b]) == [True, False]
    assert await records.insert_many([]) == []

    stored = await records.find_many([first.id, second.id, other.id, twin_a.id, twin_b.id])
    assert set(stored) == {first.id, other.id, twin_a.id}
    assert stored[first.id] == first
    assert await db[RECORDS].count_documents({"task_id": "t1", "attempt": 1}) == 1


async def test_a_redelivered_log_is_stored_once(db: AsyncDatabase) -> None:
    logs = LogStore(db)
    now = utcnow()

    def log(kind: LogType, message: str, ts: int) -> dict[str, Any]:
        return TaskLogMessage(recordId="r1", taskId="t1", deviceId="d1", logType=kind,
                              message=message, timestamp=ts).to_doc(now)

    one, two = log(LogType.INFO, "started", 1000), log(LogType.SUCCESS, "done", 2000)
    assert await logs.insert_many([one, two]) == 2
    three = log(LogType.PROGRESS, "50%", 1500)
    assert await logs.insert_many([two, three, one]) == 1
    assert await logs.insert_many([three]) == 0
    assert await logs.insert_many([]) == 0
    assert await db[LOGS].count_documents({}) == 3
    assert await db[LOGS].find_one({"_id": two["_id"]}) == two


async def test_adopt_disown_held_by(db: AsyncDatabase) -> None:
    tasks = TaskStore(db)
    await put(db, task("t1"), task("t2"), task("t3", status=TaskStatus.RUNNING),
              task("t4", status=TaskStatus.WAITING))

    async def held(master: str) -> set[str]:
        return {t.id for t in await tasks.held_by(master, TaskStatus.PENDING)}

    await tasks.adopt(["t1", "t2", "t3", "t4"], "m1")
    assert await held("m1") == {"t1", "t2"}
    docs = {d["_id"]: d async for d in db[TASKS].find({})}
    assert "master" not in docs["t3"] and "master" not in docs["t4"], "only pending is adopted"

    await tasks.adopt(["t2"], "m2")  # another master takes t2 over (e.g. handed back)
    assert await held("m1") == {"t1"}
    assert await held("m2") == {"t2"}

    await tasks.disown(["t1", "t2"], "m1")  # m1 lets go of what it holds, not of m2's
    assert await held("m1") == set()
    assert await held("m2") == {"t2"}
    assert "master" not in (await db[TASKS].find_one({"_id": "t1"}))  # type: ignore[operator]
    await tasks.adopt([], "m1")
    await tasks.disown([], "m2")
    assert await held("m2") == {"t2"}
    # held_by filters by status too.
    await db[TASKS].update_one({"_id": "t2"}, {"$set": {"status": "running"}})
    assert await held("m2") == set()
    assert [t.id for t in await tasks.held_by("m2", TaskStatus.RUNNING)] == ["t2"]


def keyed(task_id: str, key: str, **fields: Any) -> Task:
    return task(task_id, dedupe_key=key, dedupe_active=key, **fields)


async def finish(tasks: TaskStore, task_id: str, ago_s: float = 0) -> None:
    """Cancel a pending task (any terminal transition), finished `ago_s` seconds ago."""
    flt, upd = task_cas(task_id, TaskStatus.PENDING, TaskStatus.CANCELLED,
                        utcnow() - timedelta(seconds=ago_s))
    assert await tasks.cas(flt, upd)


async def test_a_finished_tasks_key_is_released_once_its_window_has_passed(
    db: AsyncDatabase,
) -> None:
    tasks = TaskStore(db, dedupe_window_s=3600)
    await tasks.store([keyed("recent", "k1"), keyed("old", "k2")])
    await finish(tasks, "recent", ago_s=3000)
    await finish(tasks, "old", ago_s=4000)

    result = await tasks.store([keyed("n1", "k1"), keyed("n2", "k2"), keyed("n3", "k2")])

    assert result.deduplicated == {"n1": "recent", "n3": "n2"}
    assert [t.id for t in result.created] == ["n2"]
    docs = {d["_id"]: d async for d in db[TASKS].find({}, {"dedupe_active": 1})}
    assert docs["recent"]["dedupe_active"] == "k1"
    assert "dedupe_active" not in docs["old"], "the old holder gave its key up"
    assert docs["n2"]["dedupe_active"] == "k2"


@pytest.fixture
def no_window() -> Any:
    """This process finishes tasks as with SENDSCRIPT_DEDUPE_WINDOW_S=0."""
    before = RETENTION.dedupe_window_s
    RETENTION.dedupe_window_s = 0
    yield
    RETENTION.dedupe_window_s = before


async def test_window_zero_frees_the_key_as_the_task_finishes(
    db: AsyncDatabase, no_window: None
) -> None:
    tasks = TaskStore(db)
    await tasks.store([keyed("t1", "k1")])
    await finish(tasks, "t1")
    assert "dedupe_active" not in await db[TASKS].find_one({"_id": "t1"})

    again = await tasks.store([keyed("t2", "k1")])
    assert [t.id for t in again.created] == ["t2"] and again.deduplicated == {}


async def test_a_store_without_window_releases_a_key_a_finisher_kept(db: AsyncDatabase) -> None:
    # A consumer configured with a window keeps the key; a store with none frees it.
    await TaskStore(db).store([keyed("t1", "k1")])
    await finish(TaskStore(db), "t1")
    again = await TaskStore(db, dedupe_window_s=0).store([keyed("t2", "k1")])
    assert [t.id for t in again.created] == ["t2"] and again.deduplicated == {}


async def test_an_unfinished_holder_keeps_its_key_whatever_its_age(db: AsyncDatabase) -> None:
    tasks = TaskStore(db, dedupe_window_s=0)
    await tasks.store([keyed("t1", "k1", created_at=utcnow() - timedelta(days=3))])
    again = await tasks.store([keyed("t2", "k1")])
    assert again.deduplicated == {"t2": "t1"} and again.created == []


async def test_documents_the_store_refuses_are_refused_and_the_rest_stored(
    db: AsyncDatabase,
) -> None:
    tasks = TaskStore(db)
    huge = task("huge", script={"blob": "x" * (16 * 1024 * 1024)})
    wide = task("wide", script={"n": 2**70})
    surrogate = task("surrogate", script={"s": "\ud800"})
    good = [task(f"g{i}") for i in range(3)]

    result = await tasks.store([good[0], huge, good[1], wide, surrogate, good[2]])

    assert [t.id for t in result.created] == ["g0", "g1", "g2"]
    assert set(result.refused) == {"huge", "wide", "surrogate"}
    assert "over the store's limit of 16777216 bytes" in result.refused["huge"]
    assert "8-byte ints" in result.refused["wide"]
    assert "surrogates not allowed" in result.refused["surrogate"]
    assert {d["_id"] async for d in db[TASKS].find({})} == {"g0", "g1", "g2"}


async def test_a_server_refusal_refuses_the_document_and_its_whole_fanout(
    db: AsyncDatabase,
) -> None:
    # The server's own refusal (a validator: code 121), not one the encoder sees first.
    await db.command("collMod", TASKS, validator={"device_id": {"$ne": "dev-bad"}})
    tasks = TaskStore(db)
    fanout = [task(f"f-{d}", device_id=d, batch_id="b1") for d in ("dev-a", "dev-bad", "dev-c")]
    alone = task("alone", device_id="dev-bad")

    result = await tasks.store([task("g0"), *fanout, alone, task("g1")])

    assert [t.id for t in result.created] == ["g0", "g1"]
    assert set(result.refused) == {"f-dev-a", "f-dev-bad", "f-dev-c", "alone"}
    assert "code 121" in result.refused["f-dev-a"] and "code 121" in result.refused["alone"]
    assert {d["_id"] async for d in db[TASKS].find({})} == {"g0", "g1"}, \
        "the fan-out's stored siblings were taken back"
