"""Dedupe modes and debounce on a real MongoDB-protocol server, through the store the
masters and the SDK use: when each mode frees its key, and how debounced submissions
collapse into one task (also when two stores race, and against the delayed fire)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from sendscript import connect
from sendscript.models import Task, TaskSpec, new_id, utcnow
from sendscript.settings import Settings
from sendscript.status import TaskStatus, task_cas
from sendscript.store import TASKS, Claim, TaskStore, ensure_indexes


def spec_task(key: str = "k", now: datetime | None = None, master: str | None = None,
              **fields: Any) -> Task:
    spec = TaskSpec.model_validate({"device_id": "dev-1", "script": {"id": "tap"},
                                    "dedupe_key": key, **fields})
    task = Task.from_spec(spec, task_id=new_id(), now=now or utcnow())
    task.master = master
    return task


async def submit(tasks: TaskStore, **fields: Any) -> tuple[str, bool]:
    """Store one spec: (the task that answers it, whether it was created)."""
    mine = spec_task(**fields)
    stored = await tasks.store([mine])
    if stored.created:
        return mine.id, True
    return stored.deduplicated[mine.id], False


async def start(tasks: TaskStore, task_id: str) -> None:
    """Its first attempt starts: the workers' claim, pending -> running."""
    assert await tasks.claim_many([Claim(task_id, 0, "w1")], utcnow()) != [None]


async def finish(tasks: TaskStore, task_id: str, ago_s: float = 0.0) -> None:
    flt, upd = task_cas(task_id, TaskStatus.RUNNING, TaskStatus.SUCCESS,
                        utcnow() - timedelta(seconds=ago_s))
    assert await tasks.cas(flt, upd)


async def test_until_start_frees_the_key_when_the_attempt_starts(db: AsyncDatabase) -> None:
    tasks = TaskStore(db, dedupe_window_s=3600)
    first, created = await submit(tasks, dedupe_mode="until_start")
    assert created
    assert await submit(tasks, dedupe_mode="until_start") == (first, False)  # still pending
    await start(tasks, first)
    assert "dedupe_active" not in await db[TASKS].find_one({"_id": first})
    second, created = await submit(tasks, dedupe_mode="until_start")
    assert created and second != first


async def test_other_modes_keep_the_key_through_the_start(db: AsyncDatabase) -> None:
    tasks = TaskStore(db, dedupe_window_s=3600)
    for key, mode in (("a", None), ("b", "until_result"), ("c", "window")):
        first, _ = await submit(tasks, key=key, dedupe_mode=mode)
        await start(tasks, first)
        assert (await db[TASKS].find_one({"_id": first}))["dedupe_active"] == key
        assert await submit(tasks, key=key, dedupe_mode=mode) == (first, False)


async def test_until_result_frees_the_key_at_the_result_whatever_the_window(
    db: AsyncDatabase,
) -> None:
    tasks = TaskStore(db, dedupe_window_s=86400)
    first, _ = await submit(tasks, dedupe_mode="until_result")
    await start(tasks, first)
    await finish(tasks, first)
    second, created = await submit(tasks, dedupe_mode="until_result")
    assert created and second != first
    # No mode given: as always, held for the setting's window after the result.
    plain, _ = await submit(tasks, key="p")
    await start(tasks, plain)
    await finish(tasks, plain)
    assert await submit(tasks, key="p") == (plain, False)


async def test_window_holds_the_key_for_its_own_window_after_the_result(
    db: AsyncDatabase,
) -> None:
    tasks = TaskStore(db, dedupe_window_s=5)
    recent, _ = await submit(tasks, key="r", dedupe_window_s=60)
    old, _ = await submit(tasks, key="o", dedupe_mode="window", dedupe_window_s=60)
    setting, _ = await submit(tasks, key="s", dedupe_mode="window")
    for task_id, ago in ((recent, 30), (old, 90), (setting, 10)):
        await start(tasks, task_id)
        await finish(tasks, task_id, ago_s=ago)
    assert await submit(tasks, key="r") == (recent, False)  # 30 s < its 60 s
    again, created = await submit(tasks, key="o")
    assert created and again != old  # 90 s > its 60 s
    again, created = await submit(tasks, key="s", dedupe_mode="window")
    assert created and again != setting  # 10 s > the setting's 5 s


async def test_debounced_submissions_collapse_into_one_task_with_the_latest_spec(
    db: AsyncDatabase,
) -> None:
    tasks = TaskStore(db, dedupe_window_s=3600)
    first, created = await submit(tasks, script={"v": 1}, debounce_s=60, debounce_max_s=600)
    assert created
    before = await db[TASKS].find_one({"_id": first})
    for version in (2, 3):
        mine = spec_task(script={"v": version}, priority=version, debounce_s=60)
        stored = await tasks.store([mine])
        assert stored.debounced == {mine.id: first} and not stored.created
    doc = await db[TASKS].find_one({"_id": first})
    assert doc["status"] == "waiting" and doc["script"] == {"v": 3} and doc["priority"] == 3
    assert doc["debounce_seq"] == 2 and doc["run_at"] >= before["run_at"]
    assert doc["debounce_until"] == before["debounce_until"]  # the first's bound stays
    assert await db[TASKS].count_documents({"dedupe_key": "k"}) == 1


async def test_a_debounced_task_runs_no_later_than_the_max(db: AsyncDatabase) -> None:
    tasks = TaskStore(db, dedupe_window_s=3600)
    long_ago = utcnow() - timedelta(seconds=80)  # its max, 90 s, ends 10 s from now
    first = spec_task(now=long_ago, debounce_s=60, debounce_max_s=90)
    await tasks.store([first])
    await tasks.store([spec_task(script={"v": 2}, debounce_s=60)])
    doc = await db[TASKS].find_one({"_id": first.id})
    assert doc["script"] == {"v": 2}
    assert doc["run_at"] == doc["debounce_until"]  # not quiet-period (60 s) later


async def test_two_stores_racing_make_one_task(db: AsyncDatabase, settings: Settings) -> None:
    """Two masters' stores (their own clients) debounce 2 x 15 specs at once: one task,
    every later spec applied once (the sequence counts them), none lost or doubled."""
    other = connect.mongo_async(settings)
    try:
        second_db = connect.database(other)
        await ensure_indexes(second_db)
        stores = [TaskStore(db, dedupe_window_s=3600), TaskStore(second_db, dedupe_window_s=3600)]
        specs = [spec_task(script={"n": n}, debounce_s=60) for n in range(30)]
        answers = await asyncio.gather(*(stores[n % 2].store([s]) for n, s in enumerate(specs)))
    finally:
        await other.close()
    created = [t.id for a in answers for t in a.created]
    merged = [i for a in answers for i in a.debounced]
    assert len(created) == 1 and len(merged) == 29
    doc = await db[TASKS].find_one({"dedupe_key": "k"})
    assert doc["_id"] == created[0] and doc["debounce_seq"] == 29
    assert await db[TASKS].count_documents({"dedupe_key": "k"}) == 1


async def test_the_fire_and_a_later_submission_exclude_each_other(db: AsyncDatabase) -> None:
    tasks = TaskStore(db, dedupe_window_s=3600)
    first = spec_task(now=utcnow() - timedelta(seconds=10), master="m1", debounce_s=5)
    await tasks.store([first])  # its quiet period is over: due now
    # A later submission pushes it back: the fire at the old time finds it not due.
    await tasks.store([spec_task(script={"v": 2}, debounce_s=30)])
    assert await tasks.fire([first.id], "m1", utcnow()) == []
    doc = await db[TASKS].find_one({"_id": first.id})
    fired = await tasks.fire([first.id], "m1", doc["run_at"])
    assert [t.id for t in fired] == [first.id] and fired[0].script == {"v": 2}
    # Fired (pending): a debounced submission is a plain duplicate now, its spec unused.
    mine = spec_task(script={"v": 3}, debounce_s=30)
    stored = await tasks.store([mine])
    assert stored.deduplicated == {mine.id: first.id} and not stored.debounced
    assert (await db[TASKS].find_one({"_id": first.id}))["script"] == {"v": 2}
