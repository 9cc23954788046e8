"""The master's metrics: a subscriber of the event seam, published every heartbeat.

Every figure comes from an event the master emits anyway (taken, dispatched,
answered with its timings, withdrawn, worker lost), so neither the dispatch path
nor the workers do anything for it. The snapshot goes to `{prefix}:metrics` (see
`sendscript.metrics`), where the console's `/metrics` reads every role's.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import redis.asyncio
from loguru import logger

from master.bus import Subscription
from master.events import TaskAnswered, TaskDispatched, TasksTaken, TasksWithdrawn, WorkerLost
from sendscript import metrics
from sendscript.backoff import every
from sendscript.settings import Settings


def metrics_key(settings: Settings) -> str:
    return f"{settings.keys.prefix}:metrics"


class Metering:
    def __init__(self, settings: Settings, client: redis.asyncio.Redis) -> None:
        self.settings = settings
        self.client = client
        self.m = metrics.setup("master", settings.master_id)
        self.outcomes: Counter[str] = Counter()  # answers by outcome, and tasks lost

    def subscriptions(self) -> list[Subscription]:
        return [
            (TasksTaken, self.on_taken),
            (TaskDispatched, self.on_dispatched),
            (TaskAnswered, self.on_answered),
            (TasksWithdrawn, self.on_withdrawn),
            (WorkerLost, self.on_lost),
        ]

    def on_taken(self, event: TasksTaken) -> None:
        for task in event.tasks:
            self.m.taken.labels(task.queue, event.source).inc()

    def on_dispatched(self, event: TaskDispatched) -> None:
        queue = event.task.queue
        self.m.dispatched.labels(queue).inc()
        self.m.queue_wait.labels(queue).observe(max(0.0, event.waited_s))

    def on_answered(self, event: TaskAnswered) -> None:
        queue = event.task.queue
        self.outcomes[event.outcome] += 1
        self.m.answered.labels(queue, event.outcome).inc()
        self.m.send_time.labels(queue).observe(max(0.0, event.handled_s))
        if event.outcome == "retry":
            self.m.retries.labels("worker").inc()

    def on_withdrawn(self, event: TasksWithdrawn) -> None:
        self.m.withdrawn.labels(event.reason).inc(len(event.tasks))

    def on_lost(self, event: WorkerLost) -> None:
        self.outcomes.update(lost=len(event.handles))
        self.m.lost.inc(len(event.handles))

    def report(self) -> dict[str, Any]:
        return {"outcomes": dict(self.outcomes)}

    async def run(self, stop: asyncio.Event) -> None:
        await every(stop, self.settings.heartbeat_interval_s, "metrics", self.publish)
        try:  # what the last moments counted
            await asyncio.wait_for(self.publish(), self.settings.redis_timeout_s)
        except Exception as exc:
            logger.debug("last metrics not published: {!r}", exc)

    async def publish(self) -> None:
        await metrics.beat(self.m, self.client, metrics_key(self.settings))
