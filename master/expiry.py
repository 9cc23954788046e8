"""Expiry: a task not started by its deadline becomes `expired`, counted as a drop.

The deadline is the task's `expire_at`, or its queue's `max_wait` after it was due,
whichever comes first. Only tasks with a deadline are tracked, in a heap by
deadline; the sweep takes those that are still queued off the board.
"""

from __future__ import annotations

import asyncio
import heapq
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta

import redis.asyncio
from loguru import logger

from master.board import DeviceBoard
from sendscript.backoff import every
from sendscript.models import Task, utcnow
from sendscript.settings import Settings
from sendscript.status import TaskStatus, task_cas
from sendscript.store import TaskStore


def deadline(task: Task, max_wait: dict[str, float]) -> datetime | None:
    limits = [task.expire_at] if task.expire_at else []
    if task.queue in max_wait:
        due = task.run_at or task.created_at
        limits.append(due + timedelta(seconds=max_wait[task.queue]))
    return min(limits) if limits else None


class Expiry:
    def __init__(self, settings: Settings, board: DeviceBoard, tasks: TaskStore,
                 client: redis.asyncio.Redis, on_change: Callable[[], None]) -> None:
        self.settings = settings
        self.board = board
        self.tasks = tasks
        self.redis = client
        self.on_change = on_change
        self._heap: list[tuple[float, str]] = []
        self._unwritten: list[Task] = []  # off the board, not yet marked (a server was away)
        self.expired = 0

    def track(self, tasks: list[Task]) -> None:
        for task in tasks:
            when = deadline(task, self.settings.queue_max_wait)
            if when is not None:
                heapq.heappush(self._heap, (when.timestamp(), task.id))

    def is_expired(self, task: Task, now: datetime) -> bool:
        when = deadline(task, self.settings.queue_max_wait)
        return when is not None and when <= now

    async def run(self, stop: asyncio.Event) -> None:
        await every(stop, self.settings.expiry_check_interval_s, "expiry", self.sweep,
                    wait_first=True)

    async def sweep(self) -> int:
        now = utcnow()
        due, self._unwritten = self._unwritten, []
        while self._heap and self._heap[0][0] <= now.timestamp():
            _, task_id = heapq.heappop(self._heap)
            task = self.board.remove(task_id)
            if task is not None:
                due.append(task)
        if due:
            await self.expire(due, now)
            self.on_change()
        return len(due)

    async def expire(self, tasks: list[Task], now: datetime) -> None:
        """pending -> expired with the reason; count the drops per queue. What cannot
        be written now is kept for the next sweep."""
        by_queue: Counter[str] = Counter()
        for i, task in enumerate(tasks):
            when = deadline(task, self.settings.queue_max_wait)
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
