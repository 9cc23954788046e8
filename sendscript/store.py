"""Mongo repositories: `script_tasks`, `task_exec_records`, `task_logs`.

Every status change goes through `sendscript.status` (task_cas / record_cas);
this module only runs them, one at a time or in bulk.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import bson
from pymongo import ASCENDING, DESCENDING, IndexModel, UpdateMany, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError, OperationFailure
from pymongo.results import BulkWriteResult

from sendscript.dedupe import HOLDER_FIELDS, KEY_AT_CLAIM, debounce_merge, debouncing, holder_hold_s
from sendscript.failover import ride_out
from sendscript.models import ExecRecord, Task, new_id, utcnow
from sendscript.refusals import encoding_refusal, permanent_write_errors, transient_write_errors
from sendscript.status import (
    RETENTION,
    SCHEDULED,
    RecordStatus,
    TaskStatus,
    dedupe_released,
    record_cas,
    release_dedupe,
    task_cas,
)
from sendscript.task_search import (
    DUPLICATE_KEY,
    SEARCH,
    SEARCH_INDEXES,
    SEARCH_PROJECTION,
    batch_filter,
    follow_spec,
    only_duplicates,
    search_doc,
)

TASKS = "script_tasks"
RECORDS = "task_exec_records"
LOGS = "task_logs"
SCHEDULES = "schedules"
GROUPS = "device_groups"
DEVICES = "devices"  # one per device: its last result and hourly counts (sendscript/fleet.py)
INDEX_NOT_FOUND = 27
MIN_FIELDS = {"_id": 1, "run_at": 1, "status": 1, "master": 1}

UPDATED_INDEX_NAME = "updated_at_1"
# What moved since a time: the leader's task counts (sendscript/counts.py), the orphan
# sweep, and retention (master/retention.py: a finished task's updated_at is when it
# finished). The one task index that every status change pays for on MongoDB.
UPDATED_INDEX = IndexModel([("updated_at", ASCENDING)], name=UPDATED_INDEX_NAME)

# Few indexes on purpose. MongoDB pays an index on a write that changes its keys; the
# embedded SecantusDB pays every index of a collection on every write of any of its
# documents, partial or not (it reads the index catalog and rewrites the document's
# entries each time): about 0.25 ms of its CPU a task an index on script_tasks, whether
# the task is in it or not (`python -m bench.mongo_cost --per-index`).
TASK_INDEXES = [
    # due and delayed tasks, sweeps by status, restore of a master's pending tasks
    IndexModel([("status", ASCENDING), ("run_at", ASCENDING)]),
    # a dedupe key is unique among the tasks holding it: unfinished ones, and finished
    # ones within SENDSCRIPT_DEDUPE_WINDOW_S (released by the next duplicate after it)
    IndexModel([("dedupe_active", ASCENDING)], unique=True,
               partialFilterExpression={"dedupe_active": {"$type": "string"}}),
    UPDATED_INDEX,  # what moved since a time (above)
    # Search newest first (by created_at, alone, for a device or for a batch) is served
    # by the tasks' search documents and their indexes (sendscript/task_search.py), so
    # that no status change pays for them.
]
# Pull tasks (agents/): the lease query (pending, best first), the lease sweep (running
# by deadline) and an agent's heartbeat (its cancelled leases). Only pull tasks carry
# `mode` and `lease`, so on MongoDB pushed tasks pay nothing for these; on the embedded
# server every task write would (above). So the agents role makes them
# (`ensure_pull_indexes`), and a farm that runs no agents does without.
PULL_TASK_INDEXES = [
    IndexModel([("mode", ASCENDING), ("status", ASCENDING), ("priority", DESCENDING),
                ("created_at", ASCENDING)], partialFilterExpression={"mode": {"$type": "string"}}),
    IndexModel([("lease.agent", ASCENDING)],
               partialFilterExpression={"lease.agent": {"$type": "string"}}),
]
RECORD_INDEXES = [
    # one record per attempt, and a task's history. Which attempt holds a device lock
    # is read through the lock's owner and its task (sendscript/lock_holders.py), not
    # by an index on the fence that every write of a record would pay for.
    IndexModel([("task_id", ASCENDING), ("attempt", ASCENDING)], unique=True),
]


def log_indexes(retention_s: float) -> list[IndexModel]:
    return [
        IndexModel([("task_id", ASCENDING), ("timestamp", ASCENDING)]),
        IndexModel([("received_at", ASCENDING)], expireAfterSeconds=int(retention_s)),
    ]


def all_indexes(log_retention_s: float) -> dict[str, list[IndexModel]]:
    """The indexes of each collection. `devices` has none but `_id` (the device id): the
    fleet view reads a page by its ids in short `$in` lists (console/fleet.py), and a
    secondary index would cost every update of a device on the embedded server."""
    return {TASKS: TASK_INDEXES, RECORDS: RECORD_INDEXES, LOGS: log_indexes(log_retention_s),
            SEARCH: SEARCH_INDEXES}


# Indexes an earlier version made that nothing reads any more: dropped, as each costs
# every write. batch_id_1 (partial on `$type`) was never chosen by the embedded server;
# the purge_at TTL indexes gave way to the leader's retention through updated_at;
# devices' device_id_1 to reads by `_id`; records' lock_value_1 to reads through the
# lock's owner (sendscript/lock_holders.py).
OBSOLETE_INDEXES = {TASKS: ["batch_id_1", "purge_at_1"],
                    RECORDS: ["purge_at_1", "lock_value_1"], DEVICES: ["device_id_1"]}


async def ensure_pull_indexes(db: AsyncDatabase) -> None:
    await db[TASKS].create_indexes(PULL_TASK_INDEXES)


async def ensure_indexes(db: AsyncDatabase, log_retention_s: float = 30 * 86400) -> None:
    for name, indexes in all_indexes(log_retention_s).items():
        await db[name].create_indexes(indexes)
    for name, obsolete in OBSOLETE_INDEXES.items():
        present = await db[name].index_information()
        for index in obsolete:
            if index in present:
                await drop_index(db[name], index)


async def drop_index(col: AsyncCollection, name: str) -> None:
    """Drop an index, unless another process dropped it first."""
    try:
        await col.drop_index(name)
    except OperationFailure as exc:
        if exc.code != INDEX_NOT_FOUND:
            raise


async def insert_search(db: AsyncDatabase, docs: list[dict[str, Any]]) -> int:
    """Insert search documents; one stored before is left as it is (a search document
    of a task is the same each time it is made). Answers how many were new."""
    if not docs:
        return 0
    try:
        return len((await db[SEARCH].insert_many(docs, ordered=False)).inserted_ids)
    except BulkWriteError as exc:
        if not only_duplicates(exc):
            raise
        return int(exc.details.get("nInserted", 0))


# Reads and writes by id go in `$in` lists of at most this many. The embedded server
# matches each document a statement fetches against the statement's whole list, so a
# document costs it more the longer the list: a read by id 0.08 ms of its CPU in lists
# of 32, 0.22 in lists of 250, 1.7 in lists of 2,000, and an update 0.43, 0.69 and
# 3.8 (`python -m bench.mongo_cost --in-lists`). Shorter lists than 32 save no more,
# and each statement has a cost of its own.
ID_CHUNK = 32


def chunks(ids: Iterable[str], size: int = ID_CHUNK) -> list[list[str]]:
    items = list(ids)
    return [items[i:i + size] for i in range(0, len(items), size)]


def duplicate_indexes(exc: BulkWriteError) -> set[int]:
    """Indexes of the documents refused as duplicates; re-raise anything else."""
    errors = exc.details.get("writeErrors", [])
    if any(e.get("code") != DUPLICATE_KEY for e in errors) or exc.details.get(
        "writeConcernErrors"
    ):
        raise exc
    return {e["index"] for e in errors}


def _dedupe_refusal(err: dict[str, Any]) -> bool:
    pattern = err.get("keyPattern") or {}
    return "dedupe_active" in pattern or "dedupe_active" in err.get("errmsg", "")


@dataclass
class Stored:
    """What became of tasks handed to `TaskStore.store` (or the SDK)."""

    created: list[Task] = field(default_factory=list)
    stored_before: list[Task] = field(default_factory=list)  # same id: a re-ingest
    deduplicated: dict[str, str] = field(default_factory=dict)  # our id -> existing task id
    existing_status: dict[str, str] = field(default_factory=dict)  # existing id -> status
    # Our id -> why the store refuses it for good (too large, not encodable, refused
    # by the server). A fan-out batch is refused whole: none of its tasks is kept.
    refused: dict[str, str] = field(default_factory=dict)
    # Our id -> the debouncing task whose spec ours replaced (also in `deduplicated`).
    debounced: dict[str, str] = field(default_factory=dict)


# The store's steps, written once as a generator of operations (a plan) that an async
# driver (TaskStore) and a sync one (the SDK) run against their own collection.
@dataclass(frozen=True, slots=True)
class InsertOp:
    """insert_many, unordered; answers the BulkWriteError or None."""

    docs: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class SearchInsertOp:
    """insert_many of search documents, unordered; one stored before is left as it is
    (it is the same: a search document never changes). Answers None."""

    docs: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class FindOp:
    """find; answers the list of documents."""

    filter: dict[str, Any]
    projection: dict[str, Any]


@dataclass(frozen=True, slots=True)
class UpdateOp:
    """update_one (of a task, or with `search` of a search document); answers the
    matched count."""

    filter: dict[str, Any]
    update: dict[str, Any] | list[dict[str, Any]]  # a document, or a pipeline
    search: bool = False


@dataclass(frozen=True, slots=True)
class DeleteOp:
    """delete_many (of tasks, or with `search` of search documents); answers the
    deleted count."""

    filter: dict[str, Any]
    search: bool = False


StoreOp = InsertOp | SearchInsertOp | FindOp | UpdateOp | DeleteOp
StorePlan = Generator[StoreOp, Any, Stored]
# A key may change hands between our insert and our look-up (its holder finished with
# no window, or another producer released it first), or a debouncing holder may move
# on under us (another submission, its fire): insert again, this many times.
DEDUPE_ROUNDS = 8


# Documents an insert statement holds at most. The embedded server holds a collection's
# lock for a whole statement (about 0.6 ms a task document): a fan-out's 500 in one
# statement made every claim and result behind it wait a third of a second, a wait
# each single task pushed behind the fan-out met at every one of its steps.
INSERT_DOCS = 100


def _unit(task: Task) -> str:
    """What is refused together: a fan-out batch, else the task alone."""
    return f"batch:{task.batch_id}" if task.batch_id else f"task:{task.id}"


def store_plan(
    tasks: Sequence[Task], now: datetime, window_s: float, chunk: int = INSERT_DOCS
) -> StorePlan:
    """Store tasks: new ones are inserted; one stored before under the same id (a
    re-ingest) is said so; one whose dedupe key a task holds is answered with that
    task, unless that task's hold is over (sendscript/dedupe.py; `window_s` is
    SENDSCRIPT_DEDUPE_WINDOW_S), when its key is released and ours is stored; a
    debounced one whose key a debouncing task holds replaces that task's spec. A
    document the store refuses for good is refused with the reason (with its whole
    fan-out batch) and the others are stored. An error retrying can
    cure (server away, transient codes) is raised: the caller tries the batch again,
    and the ids make that second try find the first."""
    out = Stored()
    docs = [t.to_doc() for t in tasks]
    refused: dict[str, str] = {}  # unit -> reason, over every chunk (a fan-out may span many)
    for task, doc in zip(tasks, docs, strict=True):
        if reason := encoding_refusal(doc):
            refused.setdefault(_unit(task), reason)
    inserted: set[str] = set()
    same_id: set[str] = set()
    searched: set[str] = set()  # ids whose search document we wrote
    for start in range(0, len(tasks), chunk):
        part = [(t, d) for t, d in zip(tasks[start:start + chunk], docs[start:start + chunk],
                                       strict=True) if _unit(t) not in refused]
        yield from _store_chunk(part, now, window_s, out, refused, inserted, same_id,
                                searched)
    undo = [t.id for t in tasks if t.id in inserted and _unit(t) in refused]
    kept: set[str] = set()  # siblings a worker claimed meanwhile: they stay, and run
    if undo:  # fan-out siblings of a refused task: the batch is refused whole
        for ids in chunks(undo):
            if (yield DeleteOp({"_id": {"$in": ids}, "attempt": 0})) < len(ids):
                kept.update(d["_id"] for d in (yield FindOp({"_id": {"$in": ids}},
                                                            {"_id": 1})))
    # Search documents go in before their tasks (a task is never without one); those
    # whose task was not stored (refused, or answered by the task holding its dedupe
    # key) come out again. Only ours: no task has our id, or it would be `same_id`.
    unstored = [t.id for t in tasks if t.id in searched and t.id not in same_id
                and t.id not in kept and (t.id not in inserted or _unit(t) in refused)]
    for ids in chunks(unstored):
        yield DeleteOp({"_id": {"$in": ids}}, search=True)
    for task in tasks:
        unit = _unit(task)
        if unit in refused:
            out.refused[task.id] = refused[unit]
            out.deduplicated.pop(task.id, None)
        elif task.id in same_id:
            out.stored_before.append(task)
        elif task.id in inserted:
            out.created.append(task)
    return out


def _store_chunk(
    part: list[tuple[Task, dict[str, Any]]], now: datetime, window_s: float, out: Stored,
    refused: dict[str, str], inserted: set[str], same_id: set[str], searched: set[str],
) -> Generator[StoreOp, Any, None]:
    """Insert one chunk; note its ids inserted, stored before, deduplicated or refused."""
    todo = list(range(len(part)))
    for _ in range(DEDUPE_ROUNDS):
        if not todo:
            break
        # A dedupe round inserts again what its key refused: its search document is in.
        if fresh := [i for i in todo if part[i][0].id not in searched]:
            yield SearchInsertOp([search_doc(part[i][1]) for i in fresh])
            searched.update(part[i][0].id for i in fresh)
        exc = yield InsertOp([part[i][1] for i in todo])
        errors: dict[int, dict[str, Any]] = {}
        if exc is not None:
            if transient_write_errors(exc):
                raise exc
            for j, reason in permanent_write_errors(exc).items():
                refused.setdefault(_unit(part[todo[j]][0]), reason)
            errors = {todo[e["index"]]: e for e in exc.details.get("writeErrors", [])}
        dedupe = [i for i, e in errors.items() if e.get("code") == DUPLICATE_KEY
                  and _dedupe_refusal(e)]
        same_id |= {part[i][0].id for i, e in errors.items() if e.get("code") == DUPLICATE_KEY
                    and not _dedupe_refusal(e)}
        inserted |= {part[i][0].id for i in todo if i not in errors}
        todo = []
        if not dedupe:
            break
        keys: dict[str, list[int]] = {}  # several of ours may share a key
        for i in dedupe:
            keys.setdefault(str(part[i][0].dedupe_active), []).append(i)
        held: dict[str, Any] = {}
        for named in chunks(keys):
            held.update({d["dedupe_active"]: d for d in (
                yield FindOp({"dedupe_active": {"$in": named}}, HOLDER_FIELDS))})
        for key, mine in keys.items():
            doc = held.get(key)
            hold_s = holder_hold_s(doc, window_s) if doc is not None else 0.0
            if doc is not None and dedupe_released(doc, now, hold_s):
                # Whoever wins this compare-and-set, the key is free: insert again.
                yield UpdateOp(*release_dedupe(doc["_id"], key, now, hold_s))
                doc = None
            for i in mine:
                task = part[i][0]
                if doc is None:  # free now: the first of ours takes it, the rest dedupe
                    todo.append(i)
                elif doc["_id"] == task.id:  # our own task, stored before a crash
                    same_id.add(task.id)
                elif task.debounce_s is not None and debouncing(doc):
                    doc = yield from _debounce_into(doc, part[i], now, out)
                    if doc is None:  # it moved on under us: look again
                        todo.append(i)
                else:
                    out.deduplicated[task.id] = doc["_id"]
                    out.existing_status[doc["_id"]] = doc["status"]
    if todo:
        raise RuntimeError(f"{len(todo)} dedupe key(s) kept changing hands; try again")


def _debounce_into(
    holder: dict[str, Any], mine: tuple[Task, dict[str, Any]], now: datetime, out: Stored,
) -> Generator[StoreOp, Any, dict[str, Any] | None]:
    """Replace a debouncing holder's spec with ours (one update); the holder, or None
    if it fired or finished meanwhile."""
    task, doc = mine
    if not (yield UpdateOp(*debounce_merge(holder, doc, now))):
        return None
    # The spec replaced may name another device, queue or script: so does the holder's
    # search document now, as the task holds it (another submission may have replaced
    # ours already).
    now_held = yield FindOp({"_id": holder["_id"]}, SEARCH_PROJECTION)
    if now_held:
        yield UpdateOp(*follow_spec(now_held[0]), search=True)
    out.deduplicated[task.id] = out.debounced[task.id] = holder["_id"]
    out.existing_status[holder["_id"]] = holder["status"]
    return holder


async def run_plan_async(col: AsyncCollection, plan: StorePlan) -> Stored:
    answer: Any = None
    while True:
        try:
            op = plan.send(answer)
        except StopIteration as done:
            stored: Stored = done.value
            return stored
        if isinstance(op, InsertOp):
            try:
                await col.insert_many(op.docs, ordered=False)
                answer = None
            except BulkWriteError as exc:
                answer = exc
        elif isinstance(op, SearchInsertOp):
            await insert_search(col.database, op.docs)
            answer = None
        elif isinstance(op, FindOp):
            answer = [d async for d in col.find(op.filter, op.projection)]
        elif isinstance(op, UpdateOp):
            target = col.database[SEARCH] if op.search else col
            answer = (await target.update_one(op.filter, op.update)).matched_count
        else:
            target = col.database[SEARCH] if op.search else col
            answer = (await target.delete_many(op.filter)).deleted_count


def run_plan_sync(col: Collection, plan: StorePlan) -> Stored:
    answer: Any = None
    while True:
        try:
            op = plan.send(answer)
        except StopIteration as done:
            stored: Stored = done.value
            return stored
        if isinstance(op, InsertOp):
            try:
                col.insert_many(op.docs, ordered=False)
                answer = None
            except BulkWriteError as exc:
                answer = exc
        elif isinstance(op, SearchInsertOp):
            try:
                col.database[SEARCH].insert_many(op.docs, ordered=False)
            except BulkWriteError as exc:
                if not only_duplicates(exc):
                    raise
            answer = None
        elif isinstance(op, FindOp):
            answer = list(col.find(op.filter, op.projection))
        elif isinstance(op, UpdateOp):
            target = col.database[SEARCH] if op.search else col
            answer = target.update_one(op.filter, op.update).matched_count
        else:
            target = col.database[SEARCH] if op.search else col
            answer = target.delete_many(op.filter).deleted_count


@dataclass(frozen=True, slots=True)
class Claim:
    """A worker's bid to run attempt `attempt + 1` of a pending task."""

    task_id: str
    attempt: int
    worker: str


# Filter fields that name one document each. A CAS filter naming a task by `_id` may
# also name its attempt's `record_id`: a record id is minted for one claim of one task.
ID_FIELDS = ("_id", "record_id")


def merged_writes(updates: Sequence[tuple[dict[str, Any], Any]]) -> list[UpdateOne | UpdateMany]:
    """(filter, update) compare-and-sets as the fewest statements with the same effect.

    The embedded server commits (journaled: syncs) each statement of a bulk write on
    its own, so N updates cost N commits. Pairs that differ only in the documents
    they name (the ID_FIELDS values) run as one update_many over those ids: each
    document still gets the same compare-and-set (its expected status and attempt are
    in the filter, and a document another actor moved is left alone). Naming `_id`
    and `record_id` by `$in` together matches task t only through t's own record id,
    since a record id is minted for one task. The matched count is the same, except
    that a pair repeated in one batch counts once (the repeat would not match)."""
    groups: dict[bytes, tuple[list[str], dict[str, Any], Any, dict[str, list[Any]]]] = {}
    single: list[UpdateOne | UpdateMany] = []
    for flt, update in updates:
        ids = {k: flt[k] for k in ID_FIELDS if isinstance(flt.get(k), str)}
        if "_id" not in ids:
            single.append(UpdateOne(flt, update))
            continue
        rest = {k: v for k, v in flt.items() if k not in ids}
        key = bson.encode({"ids": sorted(ids), "filter": rest, "update": update})
        group = groups.setdefault(key, (sorted(ids), rest, update, {k: [] for k in ids}))
        for k, v in ids.items():
            group[3][k].append(v)
    writes: list[UpdateOne | UpdateMany] = []
    for fields, rest, update, values in groups.values():
        n = len(values["_id"])
        if n == 1:
            writes.append(UpdateOne({**{k: values[k][0] for k in fields}, **rest}, update))
            continue
        for start in range(0, n, ID_CHUNK):
            named = {k: {"$in": values[k][start:start + ID_CHUNK]} for k in fields}
            writes.append(UpdateMany({**named, **rest}, update))
    return writes + single


class TaskStore:
    def __init__(self, db: AsyncDatabase, dedupe_window_s: float | None = None) -> None:
        self.col = db[TASKS]
        self.dedupe_window_s = dedupe_window_s  # None: the process's (configure_retention)

    async def store(self, tasks: Sequence[Task], chunk: int = INSERT_DOCS) -> Stored:
        """Insert tasks; say which were new, stored before, duplicates or refused
        (see `store_plan`)."""
        window = RETENTION.dedupe_window_s if self.dedupe_window_s is None \
            else self.dedupe_window_s
        return await run_plan_async(self.col, store_plan(tasks, utcnow(), window, chunk))

    async def get(self, task_id: str) -> Task | None:
        doc = await self.col.find_one({"_id": task_id})
        return Task.model_validate(doc) if doc else None

    async def batch_exists(self, batch_id: str) -> bool:
        """Whether a store of the batch began: a search document of it is stored (they
        go in before their tasks), read through its batch index."""
        return await self.col.database[SEARCH].find_one(
            batch_filter(batch_id), {"_id": 1}) is not None

    async def find_many(self, task_ids: Iterable[str]) -> list[Task]:
        return [Task.model_validate(d) for part in chunks(task_ids)
                async for d in self.col.find({"_id": {"$in": part}})]

    async def retry_fields(self, task_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """What a retry decision needs of each task."""
        return {d["_id"]: d for part in chunks(task_ids) async for d in self.col.find(
            {"_id": {"$in": part}}, {"max_retries": 1, "queue": 1, "retry_base_s": 1})}

    async def adopt(self, task_ids: Sequence[str], master_id: str) -> None:
        """Mark queued tasks as held by this master (for its restart, and for sweeps)."""
        for part in chunks(task_ids):
            await self.col.update_many(
                {"_id": {"$in": part}, "status": str(TaskStatus.PENDING)},
                {"$set": {"master": master_id}},
            )

    async def disown(self, task_ids: Sequence[str], master_id: str) -> None:
        for part in chunks(task_ids):
            await self.col.update_many(
                {"_id": {"$in": part}, "master": master_id}, {"$unset": {"master": ""}})

    async def held_by(self, master_id: str, status: TaskStatus) -> list[Task]:
        cursor = self.col.find({"status": str(status), "master": master_id})
        return [Task.model_validate(d) async for d in cursor]

    async def scheduled_due(
        self, before: datetime, masters: Sequence[str | None], limit: int
    ) -> list[dict[str, Any]]:
        """Waiting / retry-waiting tasks due before `before`, held by one of `masters`.

        One query per status of exactly (status, run_at range), matched on `master`
        here: a server that serves one clause from an index (the embedded one) then
        reads only what is due, not every scheduled task, however many wait."""
        holders = set(masters)
        due: list[dict[str, Any]] = []
        for status in SCHEDULED:
            cursor = self.col.find({"status": str(status), "run_at": {"$lte": before}},
                                   MIN_FIELDS)
            due += [d async for d in cursor if d.get("master") in holders]
        due.sort(key=lambda d: d["run_at"])
        return due[:limit]

    async def claim_scheduled(
        self, task_ids: Sequence[str], master_id: str, masters: Sequence[str | None]
    ) -> list[dict[str, Any]]:
        """Take scheduled tasks held by nobody, by us, or by a dead master; what we now hold."""
        scheduled = [str(s) for s in SCHEDULED]
        held: list[dict[str, Any]] = []
        for part in chunks(task_ids):
            await self.col.update_many(
                {"_id": {"$in": part}, "status": {"$in": scheduled},
                 "master": {"$in": list(masters)}},
                {"$set": {"master": master_id}},
            )
            held += [d async for d in self.col.find(
                {"_id": {"$in": part}, "status": {"$in": scheduled}, "master": master_id},
                MIN_FIELDS)]
        return held

    async def fire(self, task_ids: Sequence[str], master_id: str, now: datetime) -> list[Task]:
        """Scheduled -> pending for those of ours that are due; the tasks now pending."""
        pending: list[Task] = []
        for part in chunks(task_ids):
            flt, update = task_cas(
                part, SCHEDULED, TaskStatus.PENDING, now,
                extra_filter={"master": master_id, "run_at": {"$lte": now}},
            )
            await self.col.update_many(flt, update)
            pending += [Task.model_validate(d) async for d in self.col.find(
                {"_id": {"$in": part}, "master": master_id, "status": str(TaskStatus.PENDING)})]
        return pending

    async def claim_many(self, claims: Sequence[Claim], now: datetime,
                         failover_s: float = 0.0) -> list[str | None]:
        """pending -> running for each claim, bumping the attempt; the record id of each
        claim that won (None: the task is not pending at that attempt, another won).

        Through a failover (transient errors, sendscript/failover.py) the same
        statements, with the same tokens, are sent again for up to `failover_s`: one
        that had landed matches nothing the second time, and the read-back of the
        tokens then says which claims are ours. So a claim the server applied but did
        not acknowledge is neither lost (the task stuck running, its attempt spent)
        nor made twice.

        One statement per attempt and worker, not per task (each statement costs the
        embedded server a journaled commit): the server sets each task's record id to
        `{token}-{task id}`, the token fresh for the statement, so a claim won is told
        from one lost by the record id the task carries. A task claimed twice in one
        batch has its claims in different statements: one wins."""
        groups: dict[tuple[int, str, int], list[int]] = {}
        seen: Counter[str] = Counter()
        for i, c in enumerate(claims):
            groups.setdefault((c.attempt, c.worker, seen[c.task_id]), []).append(i)
            seen[c.task_id] += 1
        expected: list[str] = [""] * len(claims)
        ops = []
        for (attempt, worker, _), members in groups.items():
            for part in chunks(members):
                token = new_id()
                flt, upd = task_cas(
                    [claims[i].task_id for i in part], TaskStatus.PENDING, TaskStatus.RUNNING,
                    now, attempt=attempt, set_={"attempt": attempt + 1, "worker": worker},
                )
                fields = {k: {"$literal": v} for k, v in upd.pop("$set").items()}
                if upd:  # a claim only sets fields; anything else would be lost here
                    raise ValueError(f"claim update has more than $set: {sorted(upd)}")
                fields["record_id"] = {"$concat": [f"{token}-", "$_id"]}
                fields["dedupe_active"] = KEY_AT_CLAIM  # until_start: the key is free now
                ops.append(UpdateMany(flt, [{"$set": fields}]))
                for i in part:
                    expected[i] = f"{token}-{claims[i].task_id}"
        if not ops:
            return []
        tries = 0

        async def write() -> BulkWriteResult:
            nonlocal tries
            tries += 1
            return await self.col.bulk_write(ops, ordered=False)

        result = await ride_out(write, failover_s)
        if tries == 1 and result.matched_count == len(claims):
            return list(expected)
        # Someone else won some of them, or an earlier try may have landed: read back
        # which ones carry our record id (at the client's read concern: majority on a
        # replica set, so a claim a failover may still take back is not counted).
        ids = list({c.task_id for c in claims})

        async def read() -> dict[str, Any]:
            return {d["_id"]: d.get("record_id") for part in chunks(ids)
                    async for d in self.col.find({"_id": {"$in": part}}, {"record_id": 1})}

        current = await ride_out(read, failover_s)
        return [e if current.get(c.task_id) == e else None
                for c, e in zip(claims, expected, strict=True)]

    async def run_updates(self, updates: Sequence[tuple[dict[str, Any], Any]]) -> int:
        """Run (filter, update) CAS pairs in one round trip, merged where they differ
        only in the documents they name (merged_writes); how many matched."""
        if not updates:
            return 0
        result = await self.col.bulk_write(merged_writes(updates), ordered=False)
        return result.matched_count

    async def cas(self, flt: dict[str, Any], update: dict[str, Any]) -> bool:
        result = await self.col.update_one(flt, update)
        return result.matched_count == 1

    async def count_by_status(self) -> dict[str, int]:
        cursor = await self.col.aggregate([{"$group": {"_id": "$status", "n": {"$sum": 1}}}])
        return {d["_id"]: d["n"] async for d in cursor}


class RecordStore:
    def __init__(self, db: AsyncDatabase) -> None:
        self.col = db[RECORDS]

    async def insert_many(self, records: Sequence[ExecRecord],
                          failover_s: float = 0.0) -> list[bool]:
        """Store records; False where that (task, attempt) has another record already.

        A record refused as a duplicate of its own id is ours if the stored one is
        this record (its attempt and fence): an earlier try landed though its answer
        was lost (a failover, retried for up to `failover_s`). A record id is minted
        for one claim, so the only other writer of it is recovery, which takes the
        id of an attempt it found never sent (`Recovery.take_unsent_attempt`): that
        stored record says the attempt must not be sent, and the insert is refused."""
        if not records:
            return []
        docs = [r.to_doc() for r in records]

        async def insert() -> set[int]:
            try:
                await self.col.insert_many(docs, ordered=False)
            except BulkWriteError as exc:
                return duplicate_indexes(exc)
            return set()

        dups = await ride_out(insert, failover_s)
        if dups:
            ids = [records[i].id for i in dups]

            async def stored() -> dict[str, tuple[Any, Any]]:
                return {d["_id"]: (d.get("attempt"), d.get("lock_value")) for part in chunks(ids)
                        async for d in self.col.find({"_id": {"$in": part}},
                                                     {"attempt": 1, "lock_value": 1})}

            found = await ride_out(stored, failover_s)
            dups -= {i for i in dups
                     if found.get(records[i].id) == (records[i].attempt, records[i].lock_value)}
        return [i not in dups for i in range(len(records))]

    async def find_many(self, record_ids: Iterable[str]) -> dict[str, ExecRecord]:
        return {d["_id"]: ExecRecord.model_validate(d) for part in chunks(record_ids)
                async for d in self.col.find({"_id": {"$in": part}})}

    async def run_updates(self, updates: Sequence[tuple[dict[str, Any], Any]]) -> int:
        """As TaskStore.run_updates: merged where only the record ids differ."""
        if not updates:
            return 0
        result = await self.col.bulk_write(merged_writes(updates), ordered=False)
        return result.matched_count

    async def finish(
        self, record_id: str, to: RecordStatus, now: datetime, error: str | None = None
    ) -> bool:
        flt, upd = record_cas(
            record_id,
            {RecordStatus.RUNNING, RecordStatus.SENT},
            to,
            now,
            set_={"error": error} if error else None,
        )
        return (await self.col.update_one(flt, upd)).matched_count == 1


class LogStore:
    def __init__(self, db: AsyncDatabase) -> None:
        self.col = db[LOGS]

    async def insert_many(self, docs: Sequence[dict[str, Any]]) -> int:
        """Save logs; one saved before (a redelivery) is skipped. How many are new."""
        if not docs:
            return 0
        try:
            await self.col.insert_many(list(docs), ordered=False)
        except BulkWriteError as exc:
            return len(docs) - len(duplicate_indexes(exc))
        return len(docs)
