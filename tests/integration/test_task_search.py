"""The tasks' search documents (sendscript/task_search.py) on the real servers: one for
every task stored, through the store's own plan (async TaskStore and the SDK's sync
driver), none for a task not stored, the backfill of tasks an older version stored
without them, and retention deleting them with their tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pymongo import AsyncMongoClient, monitoring
from pymongo.asynchronous.database import AsyncDatabase

from master.retention import EARLIEST, Retention
from master.search_upkeep import SearchUpkeep, backfill_search
from sendscript import connect
from sendscript.client import SendScriptClient
from sendscript.models import Task, TaskSpec, new_id, utcnow
from sendscript.settings import Settings
from sendscript.status import TaskStatus, task_cas
from sendscript.store import (
    TASKS,
    DeleteOp,
    StoreOp,
    StorePlan,
    TaskStore,
    UpdateOp,
    ensure_indexes,
    run_plan_async,
    store_plan,
)
from sendscript.task_search import (
    BACKFILL_BATCH,
    MOVED_INDEXES,
    SEARCH,
    SEARCH_INDEXES,
    search_doc,
)

# What each of the three search indexes is, by its name: on task_search now, on
# script_tasks in an earlier version.
SEARCH_KEYS = {
    "created_at_-1": [("created_at", -1)],
    "device_id_1_created_at_-1": [("device_id", 1), ("created_at", -1)],
    "batch_id_1_created_at_-1__id_-1": [("batch_id", 1), ("created_at", -1), ("_id", -1)],
}


def task(task_id: str, **fields: Any) -> Task:
    values: dict[str, Any] = {"_id": task_id, "device_id": "dev-1", "script": {"id": "tap"}}
    values.update(fields)
    return Task(**values)


def keyed(task_id: str, key: str, **fields: Any) -> Task:
    return task(task_id, dedupe_key=key, dedupe_active=key, **fields)


async def searched(db: AsyncDatabase) -> dict[str, dict[str, Any]]:
    """Every search document, by id."""
    return {d["_id"]: d async for d in db[SEARCH].find({})}


async def stored(db: AsyncDatabase) -> dict[str, dict[str, Any]]:
    """Every task document, by id."""
    return {d["_id"]: d async for d in db[TASKS].find({})}


def expected(doc: dict[str, Any]) -> dict[str, Any]:
    """The search document a stored task document should have, written out here
    field by field (not through `search_doc`, the code under test)."""
    out = {"_id": doc["_id"], "created_at": doc["created_at"], "device_id": doc["device_id"],
           "queue": doc["queue"]}
    if "id" in doc["script"]:
        out["script_id"] = doc["script"]["id"]
    if "batch_id" in doc:
        out["batch_id"] = doc["batch_id"]
    if "debounce_seq" in doc:
        out["debounce_seq"] = doc["debounce_seq"]
    return out


async def assert_one_search_doc_per_task(db: AsyncDatabase) -> None:
    tasks, docs = await stored(db), await searched(db)
    assert set(docs) == set(tasks)
    for task_id, doc in tasks.items():
        assert docs[task_id] == expected(doc), task_id
    assert await db[SEARCH].count_documents({}) == len(tasks)


# --- 1. every task stored has its search document; where the indexes are -------------


async def test_every_stored_task_gets_one_search_document_with_its_fields(
    db: AsyncDatabase,
) -> None:
    tasks = TaskStore(db)
    at = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)  # ms: as Mongo keeps it
    singles = [task("s1", device_id="dev-a", script={"id": "tap", "args": {"x": 1}},
                    queue="bulk", created_at=at),
               task("s2", device_id="dev-b", script={"id": "swipe"}),
               task("s3", device_id="dev-c", script={"steps": [1, 2]})]  # no script id
    fanout = [task(f"f-{d}", device_id=d, script={"id": "reboot"}, batch_id="b1",
                   created_at=at) for d in ("dev-x", "dev-y", "dev-z")]

    result = await tasks.store([*singles, *fanout], chunk=2)

    assert sorted(t.id for t in result.created) == sorted(t.id for t in singles + fanout)
    docs = await searched(db)
    assert set(docs) == {"s1", "s2", "s3", "f-dev-x", "f-dev-y", "f-dev-z"}
    # Concrete values, as the tasks were given.
    assert docs["s1"] == {"_id": "s1", "created_at": at, "device_id": "dev-a",
                          "queue": "bulk", "script_id": "tap"}
    assert docs["s2"]["script_id"] == "swipe" and docs["s2"]["device_id"] == "dev-b"
    assert "script_id" not in docs["s3"], "a script without an id gives no script_id"
    assert all("batch_id" not in docs[s.id] for s in singles)
    assert {docs[f.id]["batch_id"] for f in fanout} == {"b1"}
    assert {docs[f.id]["device_id"] for f in fanout} == {"dev-x", "dev-y", "dev-z"}
    # And each is its task's, field for field (created_at as the store keeps it).
    await assert_one_search_doc_per_task(db)
    assert await tasks.batch_exists("b1") and not await tasks.batch_exists("b2")


async def test_the_search_indexes_are_on_task_search_and_not_on_script_tasks(
    db: AsyncDatabase,
) -> None:
    await ensure_indexes(db)  # the fixture ran it once already: idempotent
    on_tasks = await db[TASKS].index_information()
    assert not set(MOVED_INDEXES) & set(on_tasks)
    assert not [spec for spec in on_tasks.values()
                if spec["key"] in list(SEARCH_KEYS.values())]
    on_search = await db[SEARCH].index_information()
    assert set(on_search) == {"_id_", *SEARCH_KEYS}
    for name, keys in SEARCH_KEYS.items():
        assert on_search[name]["key"] == keys, name
    assert on_search["batch_id_1_created_at_-1__id_-1"]["partialFilterExpression"] == {
        "batch_id": {"$gt": ""}}
    assert sorted(MOVED_INDEXES) == sorted(SEARCH_KEYS)


def test_the_sdks_submissions_get_their_search_documents(sdk: SendScriptClient) -> None:
    """The sync driver of the same plan (run_plan_sync), as a producer stores."""
    one = sdk.submit("p1", {"id": "sync", "args": {}}, queue="bulk")
    many = sdk.submit_many([TaskSpec(device_id="p2", script={"id": "a"}),
                            TaskSpec(device_id="p3", script={"id": "b"})])
    batch = sdk.submit_fanout({"id": "fan"}, devices=["f1", "f2"], batch_id="bx")
    # A resumed fan-out (same batch id): stored before, no second search document.
    again = sdk.submit_fanout({"id": "fan"}, devices=["f1", "f2", "f3"], batch_id="bx")
    assert [t.created for t in again.tasks] == [False, False, True]

    tasks = {d["_id"]: d for d in sdk._db[TASKS].find({})}
    docs = {d["_id"]: d for d in sdk._db[SEARCH].find({})}
    ids = {one.task_id, *(s.task_id for s in many), *(t.task_id for t in again.tasks)}
    assert set(tasks) == set(docs) == ids and len(ids) == 6
    for task_id, doc in tasks.items():
        assert docs[task_id] == expected(doc), task_id
    assert docs[one.task_id]["device_id"] == "p1" and docs[one.task_id]["queue"] == "bulk"
    assert docs[one.task_id]["script_id"] == "sync" and "batch_id" not in docs[one.task_id]
    assert sorted(docs[t.task_id]["device_id"] for t in again.tasks) == ["f1", "f2", "f3"]
    assert {docs[t.task_id]["batch_id"] for t in again.tasks} == {"bx"}
    assert [t.task_id for t in batch.tasks] == [t.task_id for t in again.tasks[:2]]
    assert sdk._db[TASKS].index_information().keys().isdisjoint(MOVED_INDEXES)


# --- 2. a re-ingest --------------------------------------------------------------


async def test_storing_the_same_tasks_again_leaves_one_search_document_each(
    db: AsyncDatabase,
) -> None:
    tasks = TaskStore(db)
    batch = [task("t1", device_id="dev-a"), task("t2", device_id="dev-b"),
             *[task(f"f{i}", device_id=f"d{i}", batch_id="b1") for i in range(3)]]
    first = await tasks.store(batch, chunk=2)
    before = await searched(db)
    assert len(first.created) == 5 and len(before) == 5

    again = await tasks.store(batch, chunk=2)

    assert again.created == [] and again.refused == {} and again.deduplicated == {}
    assert sorted(t.id for t in again.stored_before) == ["f0", "f1", "f2", "t1", "t2"]
    assert await searched(db) == before
    assert await db[SEARCH].count_documents({}) == 5
    await assert_one_search_doc_per_task(db)


async def test_a_second_try_after_the_search_documents_went_in_stores_the_tasks(
    db: AsyncDatabase,
) -> None:
    """A producer died between the two inserts: its search documents are there, its
    tasks not. The second try stores the tasks and keeps the one search document."""
    batch = [task("t1", device_id="dev-a"), task("f0", device_id="d0", batch_id="b1")]
    await db[SEARCH].insert_many([search_doc(t.to_doc()) for t in batch])
    assert await db[TASKS].count_documents({}) == 0
    # batch_exists reads the search documents: a store of the batch began.
    assert await TaskStore(db).batch_exists("b1")

    result = await TaskStore(db).store(batch)

    assert sorted(t.id for t in result.created) == ["f0", "t1"]
    assert result.stored_before == []
    await assert_one_search_doc_per_task(db)


async def test_a_re_ingest_of_a_task_stored_without_one_writes_its_search_document(
    db: AsyncDatabase,
) -> None:
    """A task an older version stored (no search document): stored before, and it
    gets its search document from the second store."""
    old = task("old", device_id="dev-o", script={"id": "legacy"})
    await db[TASKS].insert_one(old.to_doc())

    result = await TaskStore(db).store([old])

    assert [t.id for t in result.stored_before] == ["old"] and result.created == []
    docs = await searched(db)
    assert set(docs) == {"old"}
    assert docs["old"]["device_id"] == "dev-o" and docs["old"]["script_id"] == "legacy"


# --- 3. a task deduplicated into the key's holder -------------------------------------


async def test_a_deduplicated_task_leaves_no_search_document_and_the_holder_keeps_its_own(
    db: AsyncDatabase,
) -> None:
    tasks = TaskStore(db, dedupe_window_s=3600)
    first = await tasks.store([keyed("t1", "k1", device_id="dev-h")])
    assert [t.id for t in first.created] == ["t1"]
    holder = (await searched(db))["t1"]

    # t2 answered by t1 (stored before); t4 by t3, stored in the same call.
    again = await tasks.store([keyed("t2", "k1", device_id="dev-2"), keyed("t3", "k2"),
                               keyed("t4", "k2", device_id="dev-4")])

    assert again.deduplicated == {"t2": "t1", "t4": "t3"}
    assert [t.id for t in again.created] == ["t3"]
    docs = await searched(db)
    assert set(docs) == {"t1", "t3"}
    assert docs["t1"] == holder, "the holder's search document is left as it was"
    await assert_one_search_doc_per_task(db)


async def test_a_task_taking_a_released_key_keeps_its_search_document(
    db: AsyncDatabase,
) -> None:
    """A second round of the store: n2 takes the key an old holder gave up (inserted
    again, its search document written again), n3 is answered by n2."""
    tasks = TaskStore(db, dedupe_window_s=3600)
    await tasks.store([keyed("old", "k2")])
    flt, upd = task_cas("old", TaskStatus.PENDING, TaskStatus.CANCELLED,
                        utcnow() - timedelta(seconds=4000))
    assert await tasks.cas(flt, upd)

    result = await tasks.store([keyed("n2", "k2", device_id="dev-n2"), keyed("n3", "k2")])

    assert [t.id for t in result.created] == ["n2"] and result.deduplicated == {"n3": "n2"}
    docs = await searched(db)
    assert set(docs) == {"old", "n2"}
    assert docs["n2"]["device_id"] == "dev-n2"
    await assert_one_search_doc_per_task(db)


def debounced(key: str, device: str, script_id: str) -> Task:
    spec = TaskSpec.model_validate({"device_id": device, "script": {"id": script_id},
                                    "dedupe_key": key, "debounce_s": 600,
                                    "debounce_max_s": 900})
    return Task.from_spec(spec, task_id=new_id(), now=utcnow())


async def test_a_debounced_submission_leaves_no_search_document_of_its_own(
    db: AsyncDatabase,
) -> None:
    tasks = TaskStore(db, dedupe_window_s=3600)
    first = debounced("k", "p1", "sync")
    assert [t.id for t in (await tasks.store([first])).created] == [first.id]
    later = debounced("k", "p1", "sync")

    result = await tasks.store([later])

    assert result.debounced == {later.id: first.id}
    assert set(await searched(db)) == {first.id}
    await assert_one_search_doc_per_task(db)


async def test_a_debounced_submission_that_moves_the_task_moves_its_search_document(
    db: AsyncDatabase,
) -> None:
    tasks = TaskStore(db, dedupe_window_s=3600)
    first = debounced("k", "p1", "sync")
    await tasks.store([first])
    later = debounced("k", "p2", "sync2")
    assert (await tasks.store([later])).debounced == {later.id: first.id}
    doc = await db[TASKS].find_one({"_id": first.id})
    assert doc["device_id"] == "p2" and doc["script"] == {"id": "sync2"}
    search = await db[SEARCH].find_one({"_id": first.id})
    assert (search["device_id"], search["script_id"]) == ("p2", "sync2")


def interposing(plan: StorePlan, before: Callable[[StoreOp], bool],
                other: Generator[StoreOp, Any, Any]) -> StorePlan:
    """The store's plan, with the operations of `other` run right before the first of
    the plan's own for which `before` is true."""
    answer: Any = None
    done_other = False
    while True:
        try:
            op = plan.send(answer)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        if not done_other and before(op):
            done_other = True
            yield from other
        answer = yield op


def finishing_first(plan: StorePlan, other: StorePlan) -> StorePlan:
    """The store's plan, with all of `other` run right before the plan's first write
    of a search document: another producer's submission that overtakes this one."""
    return interposing(plan, lambda op: isinstance(op, UpdateOp) and op.search, other)


async def test_two_submissions_debouncing_at_once_leave_the_search_document_on_the_last_spec(
    db: AsyncDatabase,
) -> None:
    """The one whose spec lands first writes its search document last: it must not
    take the task's search document back to its own device and script."""
    tasks = TaskStore(db, dedupe_window_s=3600)
    first = debounced("k", "p1", "sync")
    await tasks.store([first])
    early, late = debounced("k", "p2", "early"), debounced("k", "p3", "late")
    plan = finishing_first(store_plan([early], utcnow(), 3600.0),
                           store_plan([late], utcnow(), 3600.0))

    result = await run_plan_async(db[TASKS], plan)

    assert result.debounced == {early.id: first.id}
    doc = await db[TASKS].find_one({"_id": first.id})
    assert (doc["device_id"], doc["script"], doc["debounce_seq"]) == ("p3", {"id": "late"}, 2)
    search = await db[SEARCH].find_one({"_id": first.id})
    assert (search["device_id"], search["script_id"]) == ("p3", "late")
    assert set(await searched(db)) == {first.id}


# --- 4. tasks refused for good --------------------------------------------------------


async def test_a_task_refused_before_the_write_leaves_no_search_document(
    db: AsyncDatabase,
) -> None:
    """Refused by the encoder (encoding_refusal): alone, and a fan-out whose one
    sibling cannot be stored."""
    tasks = TaskStore(db)
    wide = task("wide", script={"n": 2**70})
    surrogate = task("surrogate", script={"s": "\ud800"})
    fanout = [task("b-a", device_id="a", batch_id="bad"),
              task("b-b", device_id="b", batch_id="bad", script={"n": 2**70}),
              task("b-c", device_id="c", batch_id="bad")]

    result = await tasks.store([task("g0"), wide, *fanout, surrogate, task("g1")], chunk=2)

    assert sorted(t.id for t in result.created) == ["g0", "g1"]
    assert set(result.refused) == {"wide", "surrogate", "b-a", "b-b", "b-c"}
    assert set(await searched(db)) == {"g0", "g1"}
    await assert_one_search_doc_per_task(db)
    assert not await tasks.batch_exists("bad")


async def test_a_server_refusal_takes_back_the_search_documents_of_the_whole_fanout(
    db: AsyncDatabase,
) -> None:
    """Refused by the server (a validator: code 121) after the search documents went
    in: the refused task's, and its fan-out siblings' (stored in an earlier chunk and
    taken back, or in the same chunk), come out again."""
    await db.command("collMod", TASKS, validator={"device_id": {"$ne": "dev-bad"}})
    tasks = TaskStore(db)
    fanout = [task(f"f-{d}", device_id=d, batch_id="b1")
              for d in ("dev-a", "dev-b", "dev-c", "dev-bad", "dev-e")]
    alone = task("alone", device_id="dev-bad")

    result = await tasks.store([task("g0"), *fanout, alone, task("g1")], chunk=2)

    assert sorted(t.id for t in result.created) == ["g0", "g1"]
    assert set(result.refused) == {t.id for t in fanout} | {"alone"}
    assert "code 121" in result.refused["f-dev-a"]
    assert set(await stored(db)) == {"g0", "g1"}
    assert set(await searched(db)) == {"g0", "g1"}
    await assert_one_search_doc_per_task(db)
    assert not await tasks.batch_exists("b1")


def claiming_before_the_undo(plan: StorePlan, task_id: str) -> StorePlan:
    """The store's plan, with a worker's claim of `task_id` run right before the plan
    takes back the stored siblings of a refused fan-out (its first delete of tasks)."""
    def claim() -> Generator[StoreOp, Any, None]:
        yield UpdateOp(*task_cas(task_id, TaskStatus.PENDING, TaskStatus.RUNNING, utcnow(),
                                 attempt=0, set_={"attempt": 1, "worker": "w1"}))

    return interposing(plan, lambda op: isinstance(op, DeleteOp) and not op.search, claim())


async def test_a_sibling_claimed_before_the_take_back_keeps_its_search_document(
    db: AsyncDatabase,
) -> None:
    await db.command("collMod", TASKS, validator={"device_id": {"$ne": "dev-bad"}})
    fanout = [task(f"f-{d}", device_id=d, batch_id="b1")
              for d in ("dev-a", "dev-b", "dev-bad")]
    plan = claiming_before_the_undo(store_plan(fanout, utcnow(), 0.0, chunk=2), "f-dev-a")
    await run_plan_async(db[TASKS], plan)
    left = await stored(db)
    assert set(left) == {"f-dev-a"} and left["f-dev-a"]["attempt"] == 1
    assert set(await searched(db)) == {"f-dev-a"}


def test_the_sdks_refused_fanout_leaves_no_search_document(sdk: SendScriptClient) -> None:
    sdk._db.command("collMod", TASKS, validator={"device_id": {"$ne": "dev-refused"}})
    kept = sdk.submit("d0", {"id": "x"})
    with pytest.raises(ValueError, match=r"fan-out refused: .*code 121"):
        sdk.submit_fanout({"id": "x"}, devices=["f1", "dev-refused", "f2"], batch_id="bz")
    assert [d["_id"] for d in sdk._db[SEARCH].find({})] == [kept.task_id]
    assert sdk._db[SEARCH].count_documents({"batch_id": "bz"}) == 0


# --- 5. the backfill of tasks an older version stored ----------------------------------


async def old_version(db: AsyncDatabase, docs: list[dict[str, Any]]) -> None:
    """As an earlier version left things: the search indexes on script_tasks, the
    tasks stored there without search documents."""
    await db[TASKS].create_indexes(SEARCH_INDEXES)
    assert set(MOVED_INDEXES) <= set(await db[TASKS].index_information())
    if docs:
        await db[TASKS].insert_many(docs)


def old_docs(n: int) -> list[dict[str, Any]]:
    now = utcnow()
    docs = []
    for i in range(n):
        fields: dict[str, Any] = {"device_id": f"dev-{i % 7}", "queue": f"q{i % 3}",
                                  "created_at": now - timedelta(seconds=i),
                                  "status": "success" if i % 2 else "pending"}
        if i % 5 == 0:
            fields["batch_id"] = f"b{i % 2}"
        if i % 11 == 0:
            fields["script"] = {"steps": []}  # no script id
        else:
            fields["script"] = {"id": f"s{i % 4}"}
        docs.append(task(f"old-{i:05d}", **fields).to_doc())
    return docs


async def test_the_backfill_writes_every_old_tasks_search_document_then_drops_the_indexes(
    db: AsyncDatabase, settings: Settings,
) -> None:
    n = BACKFILL_BATCH + 37  # more than one batch of the backfill
    await old_version(db, old_docs(n))
    # One task stored by this version meanwhile: its search document is there already.
    await TaskStore(db).store([task("new", device_id="dev-new")])
    assert await db[SEARCH].count_documents({}) == 1

    backfill = SearchUpkeep(settings, db, lambda: True)
    written = await backfill.backfill()

    assert written == n and backfill.written == n
    await assert_one_search_doc_per_task(db)
    assert await db[SEARCH].count_documents({}) == n + 1
    docs = await searched(db)
    assert docs["old-00000"]["batch_id"] == "b0" and "script_id" not in docs["old-00000"]
    assert docs["old-00001"]["script_id"] == "s1" and docs["old-00001"]["queue"] == "q1"
    assert docs["old-00001"]["device_id"] == "dev-1" and "batch_id" not in docs["old-00001"]
    assert not set(MOVED_INDEXES) & set(await db[TASKS].index_information())
    # The batch index of task_search answers the old batches now.
    assert await TaskStore(db).batch_exists("b1")

    assert await backfill_search(db) == 0, "done: a second run writes nothing"
    assert await backfill.backfill() == 0 and backfill.written == n


async def test_a_backfill_stopped_half_way_keeps_the_indexes_and_finishes_next_time(
    db: AsyncDatabase,
) -> None:
    n = BACKFILL_BATCH + 5
    await old_version(db, old_docs(n))
    stop = asyncio.Event()
    stop.set()

    first = await backfill_search(db, stop)

    assert first == BACKFILL_BATCH, "stops after the first batch"
    assert set(MOVED_INDEXES) <= set(await db[TASKS].index_information())
    assert await db[SEARCH].count_documents({}) == BACKFILL_BATCH
    assert await backfill_search(db) == 5
    await assert_one_search_doc_per_task(db)
    assert not set(MOVED_INDEXES) & set(await db[TASKS].index_information())


async def test_one_moved_index_left_is_enough_for_a_backfill(db: AsyncDatabase) -> None:
    """A producer on an older SDK made one of them again (and stored tasks)."""
    await db[TASKS].create_index([("created_at", -1)])
    await db[TASKS].insert_many(old_docs(4))
    assert await backfill_search(db) == 4
    await assert_one_search_doc_per_task(db)
    assert "created_at_-1" not in await db[TASKS].index_information()


class Reads(monitoring.CommandListener):
    """The commands a client sends that read a collection, by collection."""

    READS = ("find", "aggregate", "count", "distinct")

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name in self.READS:
            self.sent.append((event.command_name, event.command[event.command_name]))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def test_without_a_moved_index_the_backfill_writes_nothing_and_reads_no_task(
    db: AsyncDatabase, settings: Settings,
) -> None:
    # Tasks without search documents, but no moved index: no backfill is due.
    await db[TASKS].insert_many(old_docs(3))
    reads = Reads()
    options = connect._mongo_kwargs(settings)
    options["event_listeners"] = [*options.get("event_listeners", []), reads]
    client: AsyncMongoClient = AsyncMongoClient(settings.mongo_url, **options)
    try:
        listened = connect.database(client)
        assert await backfill_search(listened) == 0
        assert await SearchUpkeep(settings, listened, lambda: True).backfill() == 0
        # The listener works: a read of the tasks would have been seen.
        assert await listened[TASKS].find_one({"_id": "old-00000"}) is not None
    finally:
        await client.close()
    assert reads.sent == [("find", TASKS)], reads.sent
    assert await db[SEARCH].count_documents({}) == 0


# --- 6. retention ----------------------------------------------------------------------


def finished_fields(at: datetime, keep: timedelta = timedelta(seconds=60)) -> dict[str, Any]:
    """What a finish writes, back-dated: updated_at the moment, purge_at that plus keep."""
    return {"status": "success", "updated_at": at, "finished_at": at, "purge_at": at + keep}


async def test_retention_deletes_the_search_documents_of_the_tasks_it_deletes(
    settings: Settings, db: AsyncDatabase,
) -> None:
    settings.retention_success_s = settings.retention_failed_s = 60
    tasks = TaskStore(db)
    old = utcnow() - timedelta(hours=2)
    due = [f"due-{i}" for i in range(5)]
    kept_recent = [f"recent-{i}" for i in range(3)]
    kept_open = ["open-0", "open-1"]
    await tasks.store([task(i) for i in due + kept_recent + kept_open])
    await db[TASKS].update_many({"_id": {"$in": due}}, {"$set": finished_fields(old)})
    recent = utcnow() - timedelta(seconds=5)
    await db[TASKS].update_many({"_id": {"$in": kept_recent}},
                                {"$set": finished_fields(recent)})
    # Unfinished, however old.
    await db[TASKS].update_many({"_id": {"$in": kept_open}}, {"$set": {"updated_at": old}})
    assert await db[SEARCH].count_documents({}) == 10

    done = await Retention(settings, db).sweep()

    assert done[TASKS] == 5
    assert set(await stored(db)) == set(kept_recent + kept_open)
    assert set(await searched(db)) == set(kept_recent + kept_open)
    await assert_one_search_doc_per_task(db)


async def test_a_task_no_longer_due_when_the_delete_runs_keeps_its_search_document(
    settings: Settings, db: AsyncDatabase,
) -> None:
    """Found due, then retried by hand before the delete: the delete (which names
    `due` again) keeps it, and its search document stays with it."""
    settings.retention_success_s = settings.retention_failed_s = 60
    tasks = TaskStore(db)
    old = utcnow() - timedelta(hours=2)
    await tasks.store([task("due-0"), task("due-1"), task("retried")])
    await db[TASKS].update_many({}, {"$set": finished_fields(old)})
    retention = Retention(settings, db)
    [success, _, _] = retention.targets
    now = utcnow()
    due = success.due(EARLIEST, now, now)
    found = sorted([d["_id"] async for d in db[TASKS].find(due, {"_id": 1})])
    assert found == ["due-0", "due-1", "retried"]
    # Back to pending by a manual retry between the read and the delete.
    await db[TASKS].update_one({"_id": "retried"}, {
        "$set": {"status": "pending"}, "$unset": {"purge_at": "", "finished_at": ""}})
    done = {TASKS: 0, "task_exec_records": 0, "task_logs": 0}

    await retention._delete(success, found, due, done)

    assert done[TASKS] == 2
    assert set(await stored(db)) == {"retried"}
    assert set(await searched(db)) == {"retried"}
    await assert_one_search_doc_per_task(db)


# --- orphans: search documents a crash left without their task ---------------------------


async def test_the_leader_deletes_search_documents_whose_task_is_gone_once_old_enough(
    settings: Settings, db: AsyncDatabase,
) -> None:
    settings.retention_success_s, settings.retention_failed_s = 7 * 86400, 30 * 86400
    now = utcnow()
    long_ago = now - timedelta(days=40)
    # A task waiting since long ago keeps its search document; orphans of long ago
    # go (more than one read's worth: they are read a thousand at a time); a recent
    # orphan stays until it is as old (its task may only be on its way in).
    await TaskStore(db).store([task("waiting", created_at=long_ago), task("fresh")])
    orphans = [{"_id": f"orphan-{i:04d}", "created_at": long_ago + timedelta(seconds=i),
                "device_id": "dev-1", "queue": "default"} for i in range(1500)]
    await db[SEARCH].insert_many(orphans)
    await db[SEARCH].insert_one({"_id": "recent-orphan", "created_at": now,
                                 "device_id": "dev-1", "queue": "default"})
    upkeep = SearchUpkeep(settings, db, lambda: True)

    assert await upkeep.drop_orphans(now=now) == 1500

    assert set(await searched(db)) == {"waiting", "fresh", "recent-orphan"}
    assert upkeep.orphans == 1500 and upkeep.checked_to == now - timedelta(days=31)
    assert await upkeep.drop_orphans(now=now) == 0
    # A month on, the recent orphan is old enough too.
    assert await upkeep.drop_orphans(now=now + timedelta(days=32)) == 1
    assert set(await searched(db)) == {"waiting", "fresh"}


async def test_a_fan_out_wider_than_a_read_does_not_stop_the_orphan_search(
    settings: Settings, db: AsyncDatabase,
) -> None:
    settings.retention_success_s = settings.retention_failed_s = 86400
    now = utcnow()
    at = now - timedelta(days=5)
    # 1,200 tasks of one instant (a fan-out, still kept), then an orphan later: the
    # search steps past the instant rather than read its first thousand forever.
    await TaskStore(db).store([task(f"fan-{i:04d}", created_at=at, batch_id="b")
                               for i in range(1200)])
    await db[SEARCH].insert_one({"_id": "later", "created_at": at + timedelta(hours=1)})
    upkeep = SearchUpkeep(settings, db, lambda: True)

    assert await upkeep.drop_orphans(now=now) == 1

    assert await db[SEARCH].count_documents({"_id": "later"}) == 0
    assert await db[SEARCH].count_documents({"batch_id": "b"}) == 1200
    assert upkeep.checked_to == now - timedelta(days=2)
