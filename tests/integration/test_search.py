"""Task search on the real server: every filter finds exactly the matching tasks,
newest first, and following the cursor pages through all of them once each, ties
of a fan-out (one created_at) included."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from console import search
from console.search import SearchPage, TaskQuery, search_tasks
from sendscript.models import Task, TaskSpec, utcnow
from sendscript.store import GROUPS, TASKS, TaskStore


async def _all(db: AsyncDatabase, query: TaskQuery) -> tuple[list[str], int]:
    ids: list[str] = []
    pages = 0
    page: SearchPage | None = None
    while page is None or page.next_after:
        after = page.next_after if page else None
        page = await search_tasks(db, TaskQuery(**{**query.__dict__, "after": after}))
        ids += [d["_id"] for d in page.items]
        pages += 1
        # A page is full unless it is the last or says it ran out of time.
        assert page.partial or not page.next_after or len(page.items) == query.limit
    return ids, pages


def _expected(docs: list[dict], keep) -> list[str]:  # type: ignore[no-untyped-def]
    chosen = [d for d in docs if keep(d)]
    chosen.sort(key=lambda d: (d["created_at"], d["_id"]), reverse=True)
    return [d["_id"] for d in chosen]


async def test_filters_and_pages(db: AsyncDatabase, monkeypatch: pytest.MonkeyPatch) -> None:
    # A loaded machine can spend a page's time budget and end it early (a partial page,
    # tested on its own); here the page count must follow from the limit alone.
    monkeypatch.setattr(search, "BUDGET_MS", 60_000)
    rng = random.Random(5)
    now = utcnow()
    tasks = []
    for i in range(300):
        spec = TaskSpec(device_id=f"d{i % 9}", script={"id": f"s{i % 4}"},
                        queue="bulk" if i % 3 == 0 else "default")
        # spread over two days; a fan-out of 40 shares one created_at
        created = now - timedelta(minutes=30) if i < 40 else now - timedelta(
            seconds=rng.randrange(2 * 86400))
        task = Task.from_spec(spec, now=now, batch_id="b1" if i < 40 else None)
        task.created_at = created
        if i % 5 == 0:
            task.last_error = f"ERROR [E_{i % 2}]: (no) .*"
        tasks.append(task)
    await TaskStore(db).store(tasks)
    await db[TASKS].update_many({"last_error": {"$exists": True}}, {"$set": {"status": "failed"}})
    # Retried tasks run long after they were created: the status search, which reads
    # (status, run_at), must still place them by created_at.
    for i, task in enumerate(tasks[40::7]):
        await db[TASKS].update_one({"_id": task.id}, {"$set": {
            "status": "retry_waiting", "run_at": task.created_at + timedelta(hours=i % 40)}})
    # ... and a due time in the past is kept, up to an hour before creation
    for i, task in enumerate(tasks[41::11]):
        await db[TASKS].update_one({"_id": task.id}, {"$set": {
            "run_at": task.created_at - timedelta(minutes=i % 60)}})
    await db[GROUPS].insert_one({"_id": "g", "devices": ["d1", "d2"]})
    docs = [d async for d in db[TASKS].find({})]
    lo, hi = now - timedelta(hours=12), now - timedelta(hours=1)

    cases = [
        (TaskQuery(limit=7), lambda d: True),
        (TaskQuery(device_id="d3", limit=5), lambda d: d["device_id"] == "d3"),
        (TaskQuery(group="g", limit=9), lambda d: d["device_id"] in ("d1", "d2")),
        (TaskQuery(queue="bulk", script_id="s0"),
         lambda d: d["queue"] == "bulk" and d["script"]["id"] == "s0"),
        (TaskQuery(statuses=("failed",), limit=4), lambda d: d["status"] == "failed"),
        (TaskQuery(statuses=("retry_waiting", "pending"), limit=6),
         lambda d: d["status"] in ("retry_waiting", "pending")),
        (TaskQuery(statuses=("retry_waiting",), queue="bulk", created_from=lo, limit=2),
         lambda d: d["status"] == "retry_waiting" and d["queue"] == "bulk"
         and d["created_at"].replace(tzinfo=now.tzinfo) >= lo),
        (TaskQuery(devices=("d4", "d7"), statuses=("pending",), limit=8),
         lambda d: d["device_id"] in ("d4", "d7") and d["status"] == "pending"),
        (TaskQuery(error_prefix="ERROR [E_1]: (no) .*", limit=3),
         lambda d: str(d.get("last_error", "")).startswith("ERROR [E_1]")),
        (TaskQuery(error_prefix=".*"), lambda d: False),  # a regex is text, not a pattern
        (TaskQuery(batch_id="b1", limit=6), lambda d: d.get("batch_id") == "b1"),
        (TaskQuery(created_from=lo, created_to=hi, limit=10),
         lambda d: lo <= d["created_at"].replace(tzinfo=now.tzinfo) < hi),
        (TaskQuery(group="none"), lambda d: False),
    ]
    for query, keep in cases:
        want = _expected(docs, keep)
        got, pages = await _all(db, query)
        assert got == want, query
        assert pages == max(1, -(-len(want) // query.limit)), query


async def test_a_task_on_the_lower_bound_is_found(db: AsyncDatabase) -> None:
    """created_from is inclusive: a task created exactly then is on the page, whichever
    index serves the query (the batch's, a device's, created_at alone, a status's)."""
    now = utcnow().replace(microsecond=0)
    tasks = []
    for i in range(31):
        task = Task.from_spec(TaskSpec(device_id=f"e{i % 3}", script={"id": "x"}), now=now,
                              batch_id="edge")
        task.created_at = now - timedelta(seconds=i)
        tasks.append(task)
    await TaskStore(db).store(tasks)
    edge = tasks[15].created_at
    for query in (TaskQuery(batch_id="edge", created_from=edge),
                  TaskQuery(device_id=tasks[15].device_id, created_from=edge),
                  TaskQuery(created_from=edge),
                  TaskQuery(statuses=("pending",), created_from=edge)):
        got, _ = await _all(db, query)
        assert tasks[15].id in got, query
        want = [t.id for t in tasks[:16] if query.device_id in (None, t.device_id)]
        assert sorted(got) == sorted(want), query
