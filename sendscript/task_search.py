"""The tasks' search documents: what a task is found by, kept apart from its status.

One document a task in `task_search`: the task's `_id` and the fields it is found by:
`created_at`, `device_id`, `queue`, `script_id`, and `batch_id` for a fan-out's tasks.
It is written before its task (`store.store_plan`) and deleted after it
(`master/retention.py`). None of its fields changes, except when a debounced
submission replaces the spec of the task it debounces into (`store._debounce_into`:
device, queue and script, then its search document too).

Why apart: the console's search, a device's history and a batch's tasks read newest
first by created_at, which takes three indexes. On `script_tasks` the embedded
SecantusDB would pay all three on every status change of every task (it rewrites every
index entry of a document, and reads its collection's whole index catalog, on each
write of it: `python -m bench.mongo_cost --per-index`); here they are paid once, by an
insert. On MongoDB, which pays an index only on a write that changes its keys, the
cost is one small insert a task, in the same batches as the tasks'.

Readers find ids here, newest first, and read the tasks by id. A search document
whose task is not there (a crash between the two inserts of a store, or between
retention's two deletes) is skipped by every reader, as each reads the task; the
leader deletes it once it is older than any task is kept
(`master/search_upkeep.py`).
"""

from __future__ import annotations

from typing import Any

from pymongo import ASCENDING, DESCENDING, IndexModel
from pymongo.errors import BulkWriteError

SEARCH = "task_search"
# Fields a search document carries besides `_id`: the task's, never changed.
FIELDS = ("created_at", "device_id", "queue", "batch_id")

SEARCH_INDEXES = [
    # Task search (console/search.py) newest first within a time window, alone or for
    # a device (or a group's devices), and a device's history (console/data.py).
    IndexModel([("created_at", DESCENDING)]),
    IndexModel([("device_id", ASCENDING), ("created_at", DESCENDING)]),
    # A batch's tasks newest first, and a fan-out's ties (one created_at) by id: the
    # batch view, search by batch, batch progress and cancel. Only fan-out tasks carry
    # batch_id. `$gt: ""` (any non-empty string) rather than `$type`: a server proves
    # `{batch_id: "b1"}` implies it and uses the index.
    IndexModel([("batch_id", ASCENDING), ("created_at", DESCENDING), ("_id", DESCENDING)],
               partialFilterExpression={"batch_id": {"$gt": ""}}),
]
# The same indexes on script_tasks, where an earlier version kept them: `backfill`
# copies the tasks stored then, and drops these once it has.
MOVED_INDEXES = ["created_at_-1", "device_id_1_created_at_-1",
                 "batch_id_1_created_at_-1__id_-1"]
BACKFILL_BATCH = 1000
# What a debounced submission may change of the task it replaces the spec of
# (`dedupe.REPLACED_FIELDS`), as its search document names them: updated with it.
REPLACED_SEARCH_FIELDS = ("device_id", "queue", "script_id")
# How many later submissions a debounced task took (the task's own count), on its
# search document too: the spec written with a higher count wins.
MERGES = "debounce_seq"
# What a task document gives its search document.
SEARCH_PROJECTION = {**{name: 1 for name in FIELDS}, "script.id": 1, MERGES: 1}
DUPLICATE_KEY = 11000


def search_doc(task: dict[str, Any]) -> dict[str, Any]:
    """The search document of a task document."""
    doc = {"_id": task["_id"]}
    for name in FIELDS:
        if task.get(name) is not None:
            doc[name] = task[name]
    script = task.get("script")
    if isinstance(script, dict) and script.get("id") is not None:
        doc["script_id"] = script["id"]
    if task.get(MERGES) is not None:
        doc[MERGES] = task[MERGES]
    return doc


def follow_spec(task: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(filter, update) bringing a debounced task's search document to the spec the
    task document read (`SEARCH_PROJECTION`) holds. Two submissions debouncing into
    one task at once may read it and write in either order: the filter lets a search
    document move only to a spec that took more submissions, so it ends with the
    task's last one."""
    found_by = search_doc(task)
    merges = int(task.get(MERGES) or 0)
    update: dict[str, Any] = {"$set": {MERGES: merges, **{
        k: found_by[k] for k in REPLACED_SEARCH_FIELDS if k in found_by}}}
    if gone := [k for k in REPLACED_SEARCH_FIELDS if k not in found_by]:
        update["$unset"] = {k: "" for k in gone}
    older = {"$or": [{MERGES: {"$lt": merges}}, {MERGES: {"$exists": False}}]}
    return {"_id": task["_id"], **older}, update


def only_duplicates(exc: BulkWriteError) -> bool:
    """Whether every document refused was refused as one stored before (a second try)."""
    errors = exc.details.get("writeErrors", [])
    return bool(errors) and all(e.get("code") == DUPLICATE_KEY for e in errors) \
        and not exc.details.get("writeConcernErrors")


def batch_filter(batch_id: str) -> dict[str, Any]:
    return {"batch_id": batch_id}
