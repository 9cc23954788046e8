"""Retention: the leader deletes finished tasks, their records and old logs when due.

Why not the server's TTL monitor alone: the embedded SecantusDB's sweeper decodes
every document of every collection that has a TTL index, under its global lock,
once a minute. With about 700,000 tasks stored that froze the server for 11-15 s a
minute, and the freeze grows with what is stored, not with what expires. So the
embedded server runs with its sweeper off, and the leader master deletes what is due
here, reading windows of the expiry field's index: its work is proportional to what
expires. On MongoDB the logs' TTL index stays (`store.all_indexes`) and deletes the
same logs, whichever comes first; tasks and records have no TTL index.

What is due, per collection: `script_tasks` past their `purge_at`; their exec records
and search documents with them; `task_logs` received more than the longest retention
ago (the log TTL).

Finished tasks are found through the `updated_at` index, which the counts keeper, the
orphan sweep and reconciliation read as well: a finished task's `updated_at` is the
moment it finished, and its `purge_at` that moment plus its status's retention, so
the tasks of one retention class whose `updated_at` is older than that retention are
the due ones (the query names the class and `purge_at` besides). The query leads
with the window's range and names no index: the embedded server serves a query from
the index of its first clause, a seek to the window, while a hint makes it walk the
whole hinted index and decode every document it holds (half a second at 20,000
tasks, every read of every sweep); MongoDB's planner tries the indexes the filter
can use and keeps the one that answers first. An index on `purge_at` itself costs
every write of every task on the embedded server, and one on the records every write
of every record; neither is kept. A record is deleted with its task, so a task's
history lasts as long as the task.

Each delete is fenced by the leader lease's token (`fence.guard` right before it,
`master.leadership`): a master that stopped leading deletes nothing more. The
delete names what it expects besides (still due), so even the one delete a
process paused between its check and its send may issue late removes only what
was due anyway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from loguru import logger
from pymongo.asynchronous.database import AsyncDatabase

from master.leadership import Fence, NotLeading
from sendscript.backoff import every
from sendscript.models import utcnow
from sendscript.settings import Settings
from sendscript.status import TERMINAL, TaskStatus
from sendscript.store import LOGS, RECORDS, TASKS, chunks
from sendscript.task_search import SEARCH

BATCH = 1000  # documents one query returns, and one delete removes, at most
READS = 200  # reads of one collection per sweep at most: the rest waits for the next
# Nothing due can be older than this: a window starts here on a new leader, and
# doubles across the empty years in a few queries.
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
FIRST_WIDTH = timedelta(hours=1)
MIN_WIDTH = timedelta(milliseconds=1)
MAX_WIDTH = timedelta(days=3650)
# The window is not allowed to close behind this much of the recent past: a document
# written by a host whose clock is behind ours can be due a little before our now.
OVERLAP = timedelta(seconds=60)


@dataclass
class PurgeWindow:
    """Which range of an expiry field to read next (pure: no I/O).

    Everything before `floor` is known deleted, so a sweep starts there and reads
    `pos <= value < min(pos + width, cutoff)` until it has read up to the cutoff.
    The server materialises a whole window, so the width adapts to keep a read near
    `BATCH` documents: halved when a read comes back full (the rest of that window
    is read again), doubled when it comes back sparse.
    """

    floor: datetime = EARLIEST
    width: timedelta = FIRST_WIDTH
    pos: datetime | None = None  # the running sweep's position

    def next(self, cutoff: datetime) -> tuple[datetime, datetime] | None:
        """The next window of a sweep up to `cutoff`, or None when it is done."""
        pos = self.floor if self.pos is None else self.pos
        if pos >= cutoff:
            self.pos = None
            return None
        self.pos = pos
        return pos, pos + min(self.width, cutoff - pos)

    def read(self, window: tuple[datetime, datetime], found: int, cutoff: datetime) -> None:
        """Record that a read of `window` found `found` documents (and deleted them)."""
        if found >= BATCH:
            self.width = max(self.width / 2, MIN_WIDTH)
            return
        hi = window[1]
        self.pos = hi
        self.floor = max(self.floor, min(hi, cutoff - OVERLAP))
        if found * 4 < BATCH:
            self.width = min(self.width * 2, MAX_WIDTH)


@dataclass
class Target:
    """One collection's expiry: documents whose `key` is before `cutoff(now)`, that
    match `also` as well (an index on `key` serves a window's read)."""

    collection: str
    key: str
    cutoff: Callable[[datetime], datetime]
    also: Callable[[datetime], dict[str, Any]] = lambda now: {}
    window: PurgeWindow = field(default_factory=PurgeWindow)

    def due(self, lo: datetime, hi: datetime, now: datetime) -> dict[str, Any]:
        """The window's range first: the clause the embedded server reads an index for."""
        return {**due_in(self.key, lo, hi), **self.also(now)}


def finished_in(statuses: list[str]) -> Callable[[datetime], dict[str, Any]]:
    """Tasks of one retention class due now (a task retried meanwhile has no purge_at)."""
    status: Any = statuses[0] if len(statuses) == 1 else {"$in": statuses}
    return lambda now: {"status": status, "purge_at": {"$lte": now}}


def targets(settings: Settings) -> list[Target]:
    keep_success = timedelta(seconds=settings.retention_success_s)
    keep_failed = timedelta(seconds=settings.retention_failed_s)
    failed = sorted(str(s) for s in TERMINAL if s != TaskStatus.SUCCESS)
    log_keep = max(keep_success, keep_failed)
    return [Target(TASKS, "updated_at", lambda now: now - keep_success,
                   finished_in([str(TaskStatus.SUCCESS)])),
            Target(TASKS, "updated_at", lambda now: now - keep_failed,
                   finished_in(failed)),
            Target(LOGS, "received_at", lambda now: now - log_keep)]


def due_in(key: str, lo: datetime, hi: datetime) -> dict[str, Any]:
    """The documents of one window: a range of the expiry field's index."""
    return {key: {"$gte": lo, "$lt": hi}}


class Retention:
    """The leader's retention sweep, every `SENDSCRIPT_RETENTION_SWEEP_S` seconds."""

    def __init__(self, settings: Settings, db: AsyncDatabase,
                 leading: Callable[[], bool] = lambda: True,
                 fence: Fence | None = None) -> None:
        self.settings = settings
        self.db = db
        self.leading = leading
        self.fence = fence
        self.targets = targets(settings)
        self.deleted: dict[str, int] = {TASKS: 0, RECORDS: 0, LOGS: 0}

    async def run(self, stop: asyncio.Event) -> None:
        async def step() -> None:
            if self.leading():
                try:
                    await self.sweep(stop)
                except NotLeading as exc:  # logged and counted by the lease
                    logger.info("retention stopped: {}", exc)
            else:  # a new leader starts from the beginning: what it knew may be stale
                for target in self.targets:
                    target.window = PurgeWindow()

        await every(stop, self.settings.retention_sweep_s, "retention", step)

    async def sweep(self, stop: asyncio.Event | None = None) -> dict[str, int]:
        """Delete everything due now, window by window; answer the counts deleted."""
        now = utcnow()
        done = {TASKS: 0, RECORDS: 0, LOGS: 0}
        for target in self.targets:
            await self._sweep_one(target, now, stop, done)
        if any(done.values()):
            logger.info("retention deleted {}", {k: v for k, v in done.items() if v})
        for name, count in done.items():
            self.deleted[name] += count
        return done

    async def _sweep_one(self, target: Target, now: datetime,
                         stop: asyncio.Event | None, done: dict[str, int]) -> None:
        col = self.db[target.collection]
        cutoff = target.cutoff(now)
        for _ in range(READS):
            if (window := target.window.next(cutoff)) is None:
                break
            if (stop is not None and stop.is_set()) or not self.leading():
                target.window.pos = None
                break
            due = target.due(*window, now)
            ids = [d["_id"] async for d in col.find(due, {"_id": 1}).limit(BATCH)]
            if ids:
                await self._delete(target, ids, due, done)
            target.window.read(window, len(ids), cutoff)

    async def _delete(self, target: Target, ids: list[Any], due: dict[str, Any],
                      done: dict[str, int]) -> None:
        # In parts: the embedded server matches each document against the whole `$in`.
        for part in chunks(ids):
            if self.fence is not None:  # right before each part's deletes
                await self.fence.guard(f"retention delete in {target.collection}")
            if target.collection == TASKS:
                # The records first: a crash between the two leaves tasks the next
                # sweep finds again, never records no task leads to.
                result = await self.db[RECORDS].delete_many({"task_id": {"$in": part}})
                done[RECORDS] += result.deleted_count
            # Still due as the delete runs: the window's whole filter again.
            result = await self.db[target.collection].delete_many(
                {"_id": {"$in": part}, **due})
            done[target.collection] += result.deleted_count
            if target.collection == TASKS:
                await self._delete_search(part, result.deleted_count)

    async def _delete_search(self, ids: list[Any], deleted: int) -> None:
        """The search documents of the tasks just deleted. After the tasks: a crash
        between leaves search documents no task answers, which readers skip, never a
        task search cannot find. A task that stopped being due under the delete (retried
        by hand) was kept, and so is its search document."""
        gone = ids
        if deleted < len(ids):
            kept = {d["_id"] async for d in self.db[TASKS].find({"_id": {"$in": ids}},
                                                                {"_id": 1})}
            gone = [i for i in ids if i not in kept]
        if gone:
            await self.db[SEARCH].delete_many({"_id": {"$in": gone}})
