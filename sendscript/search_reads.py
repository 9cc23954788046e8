"""Reads of tasks through their search documents (sendscript/task_search.py): ids
found newest first, or by batch, then the tasks read by id. For the SDK, the CLI and
the console, all with the synchronous client."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from pymongo import DESCENDING
from pymongo.database import Database

from sendscript.store import ID_CHUNK, TASKS
from sendscript.task_search import SEARCH, batch_filter


def batch_ids(db: Database, batch_id: str, size: int) -> Iterator[list[str]]:
    """The ids of a batch's tasks, in lists of at most `size`."""
    part: list[str] = []
    for doc in db[SEARCH].find(batch_filter(batch_id), {"_id": 1}):
        part.append(doc["_id"])
        if len(part) >= size:
            yield part
            part = []
    if part:
        yield part


def batch_counts(db: Database, batch_id: str) -> dict[str, int]:
    """A fan-out batch's tasks by status: its ids from its search documents (the
    batch's index), its tasks by id."""
    counts: Counter[str] = Counter()
    for ids in batch_ids(db, batch_id, ID_CHUNK):
        for row in db[TASKS].aggregate([{"$match": {"_id": {"$in": ids}}},
                                        {"$group": {"_id": "$status", "n": {"$sum": 1}}}]):
            counts[row["_id"]] += row["n"]
    return dict(counts)


def newest(db: Database, limit: int, found_by: dict[str, Any] | None = None,
           changing: dict[str, Any] | None = None,
           projection: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The newest `limit` tasks whose search documents match `found_by` (fields of
    task_search.FIELDS, and script_id) and whose documents match `changing` (their
    status, say), newest first: the search documents in that order, their tasks read by
    id a chunk at a time until `limit` are found."""
    out: list[dict[str, Any]] = []
    cursor = db[SEARCH].find(found_by or {}, {"_id": 1}).sort(
        [("created_at", DESCENDING), ("_id", DESCENDING)])
    if not changing:
        cursor = cursor.limit(limit)
    part: list[str] = []
    for doc in cursor.batch_size(ID_CHUNK):
        part.append(doc["_id"])
        if len(part) >= ID_CHUNK:
            out += _tasks_in_order(db, part, changing, projection)
            part = []
            if len(out) >= limit:
                break
    out += _tasks_in_order(db, part, changing, projection)
    return out[:limit]


def _tasks_in_order(db: Database, ids: list[str], changing: dict[str, Any] | None,
                    projection: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not ids:
        return []
    tasks = {d["_id"]: d for d in db[TASKS].find({"_id": {"$in": ids}, **(changing or {})},
                                                 projection)}
    return [tasks[i] for i in ids if i in tasks]
