"""Delayed tasks: held in a heap, fired by a timer at their time, never early.

A master loads the waiting (and retry-waiting) tasks due within its horizon and
claims them in Mongo (`master` = its id), so two masters never both hold one.
Tasks held by a master whose heartbeat expired are claimed by the next loader.
A master that restarts takes back every task it still holds, whatever its due
time, before anything else and without claiming it again: it is its own
already, and a retry its worker scheduled past the horizon is nobody else's to
load. One timer is armed, for the earliest due time; firing is a compare-and-set
waiting -> pending that also checks `run_at <= now`. A task that did not fire
because its claim was taken from us (a leader that took a slow restart for a
death) is claimed again at once if nobody holds it now.
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

from master.bus import Subscription
from master.events import TaskAnswered
from sendscript.backoff import Backoff, every
from sendscript.models import Task, utcnow
from sendscript.settings import Settings
from sendscript.store import TaskStore

LOAD_LIMIT = 200_000
# Past any due time: a restarted master takes back all it holds, not only the horizon.
ANY_TIME = timedelta(days=365 * 100)


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
        # Mongo may say we hold a task the heap lacks: at start, and after a claim that
        # failed half way (applied, its read-back lost). The next load then takes back
        # all we hold; otherwise loads skip our own (they are in the heap). Counted, so a
        # claim failing while a take-back runs is not forgotten when that one ends.
        self._claim_failures = 0
        self._taken_back_upto: int | None = None  # the count when the last one began
        # Set when the master stops: a fire that fails is not retried past it.
        self._halt = asyncio.Event()

    def subscriptions(self) -> list[Subscription]:
        return [(TaskAnswered, self._on_answered)]

    def _on_answered(self, event: TaskAnswered) -> None:
        """A retry its worker scheduled: the task is ours in Mongo, waiting till `run_at`."""
        if event.outcome == "retry" and event.answer.run_at is not None:
            self.hold(event.task.id, event.answer.run_at)

    def __len__(self) -> int:
        return len(self.heap)

    def report(self) -> dict[str, Any]:
        return {"delayed_held": len(self.heap), "delayed_fired": self.fired,
                "delayed_fire_lateness": percentiles(self.lateness)}

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await every(stop, self.settings.delay_load_interval_s, "delayed-task loader",
                        self.load)
        finally:
            self._halt.set()

    async def take_back(self) -> int:
        """What this master held before a restart, all of it whatever its due time:
        one query, no claim (it is ours already)."""
        upto = self._claim_failures
        if self._taken_back_upto == upto:
            return 0
        me = self.settings.master_id
        docs = await self.tasks.scheduled_due(utcnow() + ANY_TIME, [me], LOAD_LIMIT)
        ours = [d for d in docs if d["_id"] not in self.heap]
        self._hold(ours)
        self._taken_back_upto = upto
        if ours:
            logger.info("took back {} delayed task(s) held before the restart", len(ours))
        return len(ours)

    async def load(self) -> int:
        """Claim what is due within the horizon and unheld or a dead master's; on the
        first load after a start, take back what this master held before, first."""
        taken = await self.take_back()
        horizon = utcnow() + timedelta(seconds=self.settings.delay_horizon_s)
        masters: list[str | None] = [None, *await self.dead_masters()]
        docs = await self.tasks.scheduled_due(horizon, masters, LOAD_LIMIT)
        new = [d["_id"] for d in docs if d["_id"] not in self.heap]
        claimed = await self._claim(new, masters)
        self._hold(claimed)
        if claimed:
            logger.info("holding {} delayed task(s) due within {:.0f}s", len(claimed),
                        self.settings.delay_horizon_s)
        return taken + len(claimed)

    async def offer(self, tasks: Iterable[Task]) -> None:
        """Scheduled tasks the intake just met: hold those due within the horizon now."""
        horizon = utcnow() + timedelta(seconds=self.settings.delay_horizon_s)
        soon = [t.id for t in tasks if t.run_at is not None and t.run_at <= horizon
                and t.master in (None, self.settings.master_id)]
        if soon:
            self._hold(await self._claim(soon, [None, self.settings.master_id]))

    async def _claim(self, task_ids: list[str], masters: list[str | None]) -> list[dict[str, Any]]:
        try:
            return await self.tasks.claim_scheduled(task_ids, self.settings.master_id, masters)
        except Exception:
            self._claim_failures += 1  # some may be ours now, unknown to the heap
            raise

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
        retaken: set[str] = set()  # once per pass: a claim lost again waits for a load
        while not self._halt.is_set() and (due := self.heap.pop_due(time.time())):
            ids = [task_id for task_id, _ in due]
            while True:
                try:
                    pending = await self.tasks.fire(ids, self.settings.master_id, utcnow())
                    backoff.succeeded("fire delayed tasks")
                    break
                except Exception as exc:
                    if await backoff.failed("fire delayed tasks", exc, self._halt):
                        # Stopping: they stay ours in Mongo, for a restart or the leader.
                        return
            fired_at = time.time()
            fired = {t.id for t in pending}
            self.lateness.extend(fired_at - when for task_id, when in due if task_id in fired)
            self.fired += len(pending)
            if pending:
                self.on_due(pending)
            if missed := [i for i in ids if i not in fired and i not in retaken]:
                retaken.update(missed)
                await self._retake(missed)
        self._arm()

    async def _retake(self, task_ids: list[str]) -> None:
        """Due tasks that did not fire: cancelled or done (nothing to do), or no longer
        held by us. A leader that took our slow restart for a death hands our tasks to
        nobody; claim those again and hold them, so they fire now, not at the next load."""
        try:
            masters: list[str | None] = [None, *await self.dead_masters()]
            retaken = await self._claim(task_ids, masters)
        except Exception as exc:  # the next load finds them, ours or not
            logger.warning("could not take back {} unfired delayed task(s): {!r}",
                           len(task_ids), exc)
            return
        if retaken:
            logger.info("took back {} delayed task(s) our claim on which was lost",
                        len(retaken))
            self._hold(retaken)

    def stop(self) -> None:
        """Fire nothing more (on shutdown; the tasks stay held by us in Mongo)."""
        self._halt.set()
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
