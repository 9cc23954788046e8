"""Delayed tasks: held in a heap, fired by a timer at their time, never early.

A master loads the waiting (and retry-waiting) tasks due within its horizon and
claims them in Mongo (`master` = its id), so two masters never both hold one.
Tasks held by a master whose heartbeat expired are claimed by the next loader,
and a master that restarts finds its own again. One timer is armed, for the
earliest due time; firing is a compare-and-set waiting -> pending that also
checks `run_at <= now`.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from loguru import logger

from sendscript.backoff import Backoff, every
from sendscript.models import Task, utcnow
from sendscript.settings import Settings
from sendscript.store import TaskStore

LOAD_LIMIT = 200_000


class DelayHeap:
    """Task ids by due time (epoch seconds). Pure."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []
        self._ids: set[str] = set()

    def push(self, task_id: str, due: float) -> bool:
        if task_id in self._ids:
            return False
        self._ids.add(task_id)
        heapq.heappush(self._heap, (due, task_id))
        return True

    def pop_due(self, now: float) -> list[tuple[str, float]]:
        """(task id, due time) of every task due by `now`."""
        due: list[tuple[str, float]] = []
        while self._heap and self._heap[0][0] <= now:
            when, task_id = heapq.heappop(self._heap)
            if task_id in self._ids:
                self._ids.discard(task_id)
                due.append((task_id, when))
        return due

    def next_due(self) -> float | None:
        while self._heap and self._heap[0][1] not in self._ids:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def drain(self) -> list[str]:
        ids = list(self._ids)
        self._heap.clear()
        self._ids.clear()
        return ids

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)


class DelayedTasks:
    def __init__(
        self,
        settings: Settings,
        tasks: TaskStore,
        dead_masters: Callable[[], Awaitable[list[str]]],
        on_due: Callable[[list[Task]], None],
    ) -> None:
        self.settings = settings
        self.tasks = tasks
        self.dead_masters = dead_masters
        self.on_due = on_due
        self.heap = DelayHeap()
        self.fired = 0
        # Seconds from due time to pending, for the most recent fires.
        self.lateness: deque[float] = deque(maxlen=10_000)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due: float | None = None
        self._firing: asyncio.Task[None] | None = None
        self._loaded_once = False

    async def run(self, stop: asyncio.Event) -> None:
        await every(stop, self.settings.delay_load_interval_s, "delayed-task loader", self.load)

    async def load(self) -> int:
        """Claim what is due within the horizon: unheld, a dead master's, and (on the
        first load after a start) what this master held before."""
        horizon = utcnow() + timedelta(seconds=self.settings.delay_horizon_s)
        masters: list[str | None] = [None, *await self.dead_masters()]
        if not self._loaded_once:  # later, ours are in the heap already
            masters.append(self.settings.master_id)
        docs = await self.tasks.scheduled_due(horizon, masters, LOAD_LIMIT)
        new = [d["_id"] for d in docs if d["_id"] not in self.heap]
        claimed = await self.tasks.claim_scheduled(
            new, self.settings.master_id, [*masters, self.settings.master_id])
        self._hold(claimed)
        self._loaded_once = True
        if claimed:
            logger.info("holding {} delayed task(s) due within {:.0f}s", len(claimed),
                        self.settings.delay_horizon_s)
        return len(claimed)

    async def offer(self, tasks: Iterable[Task]) -> None:
        """Scheduled tasks the intake just met: hold those due within the horizon now."""
        horizon = utcnow() + timedelta(seconds=self.settings.delay_horizon_s)
        soon = [t.id for t in tasks if t.run_at is not None and t.run_at <= horizon
                and t.master in (None, self.settings.master_id)]
        if soon:
            me = self.settings.master_id
            self._hold(await self.tasks.claim_scheduled(soon, me, [None, me]))

    def hold(self, task_id: str, run_at: datetime) -> None:
        """A task this master already holds in Mongo (a retry its worker decided)."""
        self.heap.push(task_id, run_at.timestamp())
        self._arm()

    def _hold(self, docs: list[dict[str, Any]]) -> None:
        for doc in docs:
            self.heap.push(doc["_id"], doc["run_at"].timestamp())
        self._arm()

    def _arm(self) -> None:
        due = self.heap.next_due()
        if due is None or (self._timer is not None and self._timer_due == due):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_due = due
        self._timer = asyncio.get_running_loop().call_later(
            max(0.0, due - time.time()), self._on_timer
        )

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_due = None
        if self._firing is None or self._firing.done():
            self._firing = asyncio.get_running_loop().create_task(self._fire())

    async def _fire(self) -> None:
        backoff = Backoff(base_s=0.2, cap_s=5.0)
        while due := self.heap.pop_due(time.time()):
            ids = [task_id for task_id, _ in due]
            while True:
                try:
                    pending = await self.tasks.fire(ids, self.settings.master_id, utcnow())
                    backoff.succeeded("fire delayed tasks")
                    break
                except Exception as exc:
                    await backoff.failed("fire delayed tasks", exc)
            fired_at = time.time()
            fired = {t.id for t in pending}
            self.lateness.extend(fired_at - when for task_id, when in due if task_id in fired)
            self.fired += len(pending)
            if pending:
                self.on_due(pending)
        self._arm()

    def stop(self) -> None:
        """Fire nothing more (on shutdown; the tasks stay held by us in Mongo)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.heap.drain()


def percentiles(values: Iterable[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50_ms": pick(0.5) * 1000, "p99_ms": pick(0.99) * 1000,
            "max_ms": ordered[-1] * 1000}
