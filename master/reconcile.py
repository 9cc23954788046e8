"""Reconcile held tasks: a task Mongo says this master holds goes on its board.

A pending task whose `master` is this master is expected on its board (queued or in
flight). One that is not was dropped between a store and the event that queues it:
a schedule's fire whose insert landed though the call failed (a Mongo timeout) and
whose retry found the tasks stored already, an intake batch that died between
adopting and queueing, or a task the SDK stored held by this master (sendscript/
client.py) whose push was lost or never made (its producer died). Nothing else
would ever queue it: the leader's orphan sweep takes only unheld tasks, and
dead-master recovery only a dead master's. It would stay `pending` at its attempt
forever.

Every `reconcile_interval_s` this master lists its pending tasks last changed more
than `reconcile_grace_s` ago, and keeps those its board does not hold and no
reference on the ready list names (the intake will bring those). A task seen so on
two looks at least the grace apart (`Suspects`: a task only passing between steps
is on the board again by then) is read again and, still pending and ours, put on
the board as `TasksTaken` (source `reconcile`). The board takes a task it holds
already as a no-op, so a late event of the path that dropped it adds no second copy;
running it stays the claim's compare-and-set.

Cost: one query per interval that the embedded server serves from its
`(status, run_at)` or `updated_at` index (it reads the pending tasks changed before
the cutoff, the board's own included: with tens of thousands queued that is a
fraction of a second of the embedded server's CPU, hence the 30 s default, the
orphan sweep's cadence); nothing more while nothing is missing. Tasks the SDK
stored held by this master that wait on the ready list for longer than the grace
(a deep backlog) cost a read of that list a look (`_on_ready_list`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import redis.asyncio
from loguru import logger

from sendscript.backoff import every
from sendscript.models import Task, utcnow
from sendscript.queue import ref_item
from sendscript.settings import Settings
from sendscript.status import TaskStatus
from sendscript.store import TaskStore

LIMIT = 10_000  # candidates one look reads at most, the longest unchanged first
READY_READ_MAX = 50_000  # ready-list items a look reads to tell what is queued


@dataclass
class Suspects:
    """Task ids seen missing, and since when (monotonic seconds). Pure."""

    since: dict[str, float] = field(default_factory=dict)

    def look(self, missing: Iterable[str], now: float, grace_s: float) -> list[str]:
        """Record one look's missing ids; those missing on every look for at least
        `grace_s`. An id not missing now is forgotten: it starts over if missed again."""
        self.since = {t: self.since.get(t, now) for t in missing}
        return sorted(t for t, first in self.since.items() if now - first >= grace_s)

    def forget(self, task_ids: Iterable[str]) -> None:
        for task_id in task_ids:
            self.since.pop(task_id, None)


class HeldTasks:
    """The named duty `reconcile_held`: this master's pending tasks off its board."""

    def __init__(self, settings: Settings, client: redis.asyncio.Redis, tasks: TaskStore,
                 holds: Callable[[str], bool], on_tasks: Callable[[list[Task]], None]) -> None:
        self.settings = settings
        self.redis = client
        self.tasks = tasks
        self.holds = holds  # the board's view: does it hold this task (queued or in flight)
        self.on_tasks = on_tasks
        self.suspects = Suspects()
        self.reconciled = 0

    def report(self) -> dict[str, Any]:
        return {"reconciled": self.reconciled}

    async def run(self, stop: asyncio.Event) -> None:
        await every(stop, self.settings.reconcile_interval_s, "reconcile held tasks",
                    self.reconcile_held, wait_first=True)

    async def reconcile_held(self) -> list[Task]:
        """One look; the tasks put back on the board."""
        me, grace = self.settings.master_id, self.settings.reconcile_grace_s
        cutoff = utcnow() - timedelta(seconds=grace)
        ids = [d["_id"] async for d in self.tasks.col.find(
            {"status": str(TaskStatus.PENDING), "master": me, "updated_at": {"$lte": cutoff},
             "mode": {"$ne": "pull"}}, {"_id": 1}).sort("updated_at", 1).limit(LIMIT)]
        missing = [t for t in ids if not self.holds(t)]
        sure = self.suspects.look(missing, time.monotonic(), grace)
        if not sure:
            return []
        queued = await self._on_ready_list(sure)
        found = [t for t in await self.tasks.find_many(t for t in sure if t not in queued)
                 if t.status == TaskStatus.PENDING and t.master == me and not self.holds(t.id)]
        self.suspects.forget(sure)
        if found:
            self.reconciled += len(found)
            logger.warning("{} pending task(s) held by master {} were on no board (a store "
                           "whose answer was lost?): queued now: {}", len(found), me,
                           [t.id for t in found[:10]])
            await self.redis.hincrby(self.settings.keys.stats, "reconciled", len(found))
            self.on_tasks(found)
        return found

    async def _on_ready_list(self, task_ids: list[str]) -> set[str]:
        """The ids a reference on the ready list names (as pushed by sendscript): the
        list read once, not searched once an id (which costs Redis the list's length
        each). A list longer than `READY_READ_MAX` counts every id as on it: tasks the
        SDK stored held by this master wait there behind a deep backlog, and the
        intake brings them; the next look checks again."""
        key = self.settings.keys.ready
        if await self.redis.llen(key) > READY_READ_MAX:
            return set(task_ids)
        refs = {item.decode() if isinstance(item, bytes) else item
                for item in await self.redis.lrange(key, 0, READY_READ_MAX)}
        return {t for t in task_ids if ref_item(t) in refs}
