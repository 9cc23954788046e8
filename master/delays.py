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
from collections.abc import Awaitable, Callable, Iterable
from datetime import timedelta
from typing import Any

from loguru import logger

from sendscript.backoff import Backoff
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

    def pop_due(self, now: float) -> list[str]:
        due: list[str] = []
        while self._heap and self._heap[0][0] <= now:
            _, task_id = heapq.heappop(self._heap)
            if task_id in self._ids:
                self._ids.discard(task_id)
                due.append(task_id)
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
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due: float | None = None
        self._firing: asyncio.Task[None] | None = None

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff(base_s=0.5, cap_s=10.0)
        while not stop.is_set():
            try:
                await self.load()
                backoff.succeeded("delayed-task loader")
            except Exception as exc:
                await backoff.failed("delayed-task loader", exc)
                continue
            try:
                await asyncio.wait_for(stop.wait(), self.settings.delay_load_interval_s)
            except TimeoutError:
                pass

    async def load(self) -> int:
        """Claim what is due within the horizon: unheld, ours, or a dead master's."""
        horizon = utcnow() + timedelta(seconds=self.settings.delay_horizon_s)
        masters: list[str | None] = [None, self.settings.master_id, *await self.dead_masters()]
        docs = await self.tasks.scheduled_due(horizon, masters, LOAD_LIMIT)
        new = [d["_id"] for d in docs if d["_id"] not in self.heap]
        claimed = await self.tasks.claim_scheduled(new, self.settings.master_id, masters)
        self._hold(claimed)
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
        while ids := self.heap.pop_due(time.time()):
            while True:
                try:
                    pending = await self.tasks.fire(ids, self.settings.master_id, utcnow())
                    backoff.succeeded("fire delayed tasks")
                    break
                except Exception as exc:
                    await backoff.failed("fire delayed tasks", exc)
            self.fired += len(pending)
            if pending:
                self.on_due(pending)
        self._arm()

    async def release(self) -> int:
        """On shutdown: let go of held tasks so another master takes them at once."""
        if self._timer is not None:
            self._timer.cancel()
        ids = self.heap.drain()
        await self.tasks.release_scheduled(ids, self.settings.master_id)
        return len(ids)
