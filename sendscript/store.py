"""Mongo repositories: `script_tasks`, `task_exec_records`, `task_logs`.

Every status change goes through `sendscript.status` (task_cas / record_cas);
this module only runs them, one at a time or in bulk.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, IndexModel, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from sendscript.models import ExecRecord, Task
from sendscript.status import SCHEDULED, RecordStatus, TaskStatus, record_cas, task_cas

TASKS = "script_tasks"
RECORDS = "task_exec_records"
LOGS = "task_logs"
SCHEDULES = "schedules"
GROUPS = "device_groups"
DUPLICATE_KEY = 11000
MIN_FIELDS = {"_id": 1, "run_at": 1, "status": 1, "master": 1}

# Few indexes on purpose: every index is paid on every status change.
TASK_INDEXES = [
    # due and delayed tasks, sweeps by status, restore of a master's pending tasks
    IndexModel([("status", ASCENDING), ("run_at", ASCENDING)]),
    # a dedupe key is unique among unfinished tasks (the field is unset when they end)
    IndexModel([("dedupe_active", ASCENDING)], unique=True,
               partialFilterExpression={"dedupe_active": {"$type": "string"}}),
    IndexModel([("batch_id", ASCENDING)],
               partialFilterExpression={"batch_id": {"$type": "string"}}),
    # retention: set when a task finishes
    IndexModel([("purge_at", ASCENDING)], expireAfterSeconds=0),
]
RECORD_INDEXES = [
    # one record per attempt, and a task's history
    IndexModel([("task_id", ASCENDING), ("attempt", ASCENDING)], unique=True),
    # which attempt holds a device lock (recovery of orphaned locks)
    IndexModel([("lock_value", ASCENDING)]),
    IndexModel([("purge_at", ASCENDING)], expireAfterSeconds=0),
]


def log_indexes(retention_s: float) -> list[IndexModel]:
    return [
        IndexModel([("task_id", ASCENDING), ("timestamp", ASCENDING)]),
        IndexModel([("received_at", ASCENDING)], expireAfterSeconds=int(retention_s)),
    ]


def all_indexes(log_retention_s: float) -> dict[str, list[IndexModel]]:
    return {TASKS: TASK_INDEXES, RECORDS: RECORD_INDEXES, LOGS: log_indexes(log_retention_s)}


async def ensure_indexes(db: AsyncDatabase, log_retention_s: float = 30 * 86400) -> None:
    for name, indexes in all_indexes(log_retention_s).items():
        await db[name].create_indexes(indexes)


# Long `$in` lists are slow on some servers (quadratic on the embedded one): queries
# by id go in chunks of this many.
ID_CHUNK = 250


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


def split_duplicates(exc: BulkWriteError) -> tuple[set[int], set[int]]:
    """Refused inserts: (stored before under the same id, refused for their dedupe key)."""
    same_id: set[int] = set()
    dedupe: set[int] = set()
    duplicate_indexes(exc)  # re-raises anything that is not a duplicate
    for err in exc.details.get("writeErrors", []):
        pattern = err.get("keyPattern") or {}
        if "dedupe_active" in pattern or "dedupe_active" in err.get("errmsg", ""):
            dedupe.add(err["index"])
        else:
            same_id.add(err["index"])
    return same_id, dedupe


@dataclass
class Stored:
    """What became of tasks handed to `TaskStore.store`."""

    created: list[Task] = field(default_factory=list)
    stored_before: list[Task] = field(default_factory=list)  # same id: a re-ingest
    deduplicated: dict[str, str] = field(default_factory=dict)  # our id -> existing task id


@dataclass(frozen=True, slots=True)
class Claim:
    """A worker's bid to run attempt `attempt + 1` of a pending task."""

    task_id: str
    attempt: int
    record_id: str
    worker: str


class TaskStore:
    def __init__(self, db: AsyncDatabase) -> None:
        self.col = db[TASKS]

    async def store(self, tasks: Sequence[Task], chunk: int = 1000) -> Stored:
        """Insert tasks; say which were new, stored before, or refused as duplicates."""
        out = Stored()
        for start in range(0, len(tasks), chunk):
            part = tasks[start:start + chunk]
            try:
                await self.col.insert_many([t.to_doc() for t in part], ordered=False)
                same_id: set[int] = set()
                dedupe: set[int] = set()
            except BulkWriteError as exc:
                same_id, dedupe = split_duplicates(exc)
            if dedupe:
                keys = {part[i].dedupe_active: i for i in dedupe}
                async for doc in self.col.find({"dedupe_active": {"$in": list(keys)}},
                                               {"dedupe_active": 1}):
                    i = keys[doc["dedupe_active"]]
                    if doc["_id"] == part[i].id:  # our own task, stored before a crash
                        same_id.add(i)
                    else:
                        out.deduplicated[part[i].id] = doc["_id"]
            for i, task in enumerate(part):
                if i in same_id:
                    out.stored_before.append(task)
                elif i not in dedupe:
                    out.created.append(task)
        return out

    async def get(self, task_id: str) -> Task | None:
        doc = await self.col.find_one({"_id": task_id})
        return Task.model_validate(doc) if doc else None

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
        """Waiting / retry-waiting tasks due before `before`, held by one of `masters`."""
        cursor = self.col.find(
            {"status": {"$in": [str(s) for s in SCHEDULED]}, "run_at": {"$lte": before},
             "master": {"$in": list(masters)}},
            MIN_FIELDS,
        ).limit(limit)
        return [d async for d in cursor]

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

    async def claim_many(self, claims: Sequence[Claim], now: datetime) -> list[bool]:
        """pending -> running for each claim, bumping the attempt; which ones won."""
        ops = []
        for c in claims:
            flt, upd = task_cas(
                c.task_id,
                TaskStatus.PENDING,
                TaskStatus.RUNNING,
                now,
                attempt=c.attempt,
                set_={"attempt": c.attempt + 1, "record_id": c.record_id, "worker": c.worker},
            )
            ops.append(UpdateOne(flt, upd))
        result = await self.col.bulk_write(ops, ordered=False)
        if result.matched_count == len(claims):
            return [True] * len(claims)
        # Someone else won some of them: read back which ones carry our record id.
        current = {
            d["_id"]: d.get("record_id")
            async for d in self.col.find(
                {"_id": {"$in": [c.task_id for c in claims]}}, {"record_id": 1}
            )
        }
        return [current.get(c.task_id) == c.record_id for c in claims]

    async def run_updates(self, updates: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> int:
        """Run (filter, update) CAS pairs in one round trip; how many matched."""
        if not updates:
            return 0
        result = await self.col.bulk_write([UpdateOne(f, u) for f, u in updates], ordered=False)
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

    async def insert_many(self, records: Sequence[ExecRecord]) -> list[bool]:
        """Store records; False where that (task, attempt) has a record already."""
        if not records:
            return []
        try:
            await self.col.insert_many([r.to_doc() for r in records], ordered=False)
        except BulkWriteError as exc:
            dups = duplicate_indexes(exc)
            return [i not in dups for i in range(len(records))]
        return [True] * len(records)

    async def find_many(self, record_ids: Iterable[str]) -> dict[str, ExecRecord]:
        return {d["_id"]: ExecRecord.model_validate(d) for part in chunks(record_ids)
                async for d in self.col.find({"_id": {"$in": part}})}

    async def run_updates(self, updates: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> int:
        if not updates:
            return 0
        result = await self.col.bulk_write([UpdateOne(f, u) for f, u in updates], ordered=False)
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
