"""Expiry: a task not started by its deadline becomes `expired`, counted as a drop.

The deadline is `Task.deadline`: the task's `expire_at`, or its queue's `max_wait`
after it was due, whichever comes first. Only tasks with a deadline are tracked, in
a heap by deadline; the sweep asks for those still queued to be withdrawn from the
board, and the gate drops one that reaches dispatch past its deadline.
"""

from __future__ import annotations

import asyncio
import heapq
from collections import Counter
from datetime import datetime
from typing import Any

import redis.asyncio
from loguru import logger

from master.bus import GO, Bus, Drop, Subscription, Verdict
from master.events import TasksQueued, TasksWithdrawn, WithdrawRequested
from master.jobs import Jobs
from sendscript.backoff import every
from sendscript.models import Task, utcnow
from sendscript.settings import Settings
from sendscript.status import TaskStatus, task_cas
from sendscript.store import TaskStore

EXPIRED = "expired"


class Expiry:
    """Tracks queued tasks' deadlines; a gate that drops expired tasks at dispatch."""

    def __init__(self, settings: Settings, bus: Bus, tasks: TaskStore,
                 client: redis.asyncio.Redis, jobs: Jobs) -> None:
        self.settings = settings
        self.bus = bus
        self.tasks = tasks
        self.redis = client
        self.jobs = jobs
        self._heap: list[tuple[float, str]] = []
        self._unwritten: list[Task] = []  # off the board, not yet marked expired
        self.expired = 0
        self.gate = self

    def subscriptions(self) -> list[Subscription]:
        return [
            (TasksQueued, self._track),
            (TasksWithdrawn, self._on_withdrawn),
        ]

    def _track(self, event: TasksQueued) -> None:
        for task in event.tasks:
            when = task.deadline(self.settings.queue_max_wait)
            if when is not None:
                heapq.heappush(self._heap, (when.timestamp(), task.id))

    def admit(self, task: Task, now: datetime) -> Verdict:
        when = task.deadline(self.settings.queue_max_wait)
        return Drop(EXPIRED) if when is not None and when <= now else GO

    def _on_withdrawn(self, event: TasksWithdrawn) -> None:
        if event.reason == EXPIRED:
            self._unwritten.extend(event.tasks)
            self.jobs.spawn(self.write(), "mark tasks expired")

    def report(self) -> dict[str, Any]:
        return {"expired": self.expired}

    async def run(self, stop: asyncio.Event) -> None:
        await every(stop, self.settings.expiry_check_interval_s, "expiry", self.sweep,
                    wait_first=True)

    async def sweep(self) -> int:
        """Withdraw the queued tasks whose deadline passed, then mark them expired."""
        now = utcnow().timestamp()
        due: list[str] = []
        while self._heap and self._heap[0][0] <= now:
            due.append(heapq.heappop(self._heap)[1])
        if due:
            self.bus.emit(WithdrawRequested(due, EXPIRED))
        return await self.write()

    async def write(self) -> int:
        """pending -> expired with the reason; count the drops per queue. What cannot
        be written now is kept for the next sweep."""
        tasks, self._unwritten = self._unwritten, []
        if not tasks:
            return 0
        now = utcnow()
        by_queue: Counter[str] = Counter()
        for i, task in enumerate(tasks):
            when = task.deadline(self.settings.queue_max_wait)
            reason = f"expired: not started by {when.isoformat() if when else now.isoformat()}"
            try:
                changed = await self.tasks.cas(*task_cas(
                    task.id, TaskStatus.PENDING, TaskStatus.EXPIRED, now,
                    set_={"last_error": reason}))
            except Exception:
                self._unwritten.extend(tasks[i:])
                raise
            if changed:
                by_queue[task.queue] += 1
        if by_queue:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hincrby(self.settings.keys.stats, "expired", sum(by_queue.values()))
            for queue, n in by_queue.items():
                pipe.hincrby(self.settings.keys.stats, f"expired:{queue}", n)
            await pipe.execute()
            self.expired += sum(by_queue.values())
            logger.info("expired {} task(s) not started in time: {}", sum(by_queue.values()),
                        dict(by_queue))
        return len(tasks)
