"""A dead worker's tasks go back on the board.

Subscribes to `WorkerLost`: the tasks the worker provably never sent are put back
to pending in Mongo with their locks released (`Recovery.return_lost_tasks`; one
it may have sent waits for its result), retried until the store
answers or the master stops (then the leader's stuck-running sweep does it),
and `WorkRecovered` tells the board which devices are no longer in flight and
which tasks to queue again.
"""

from __future__ import annotations

import asyncio

from loguru import logger

from master.bus import Bus, Subscription
from master.events import WorkerLost, WorkRecovered
from master.jobs import Jobs
from master.recovery import Recovery
from sendscript.backoff import Backoff

WHAT = "recover tasks of a dead worker"


class LostWork:
    def __init__(self, bus: Bus, recovery: Recovery, jobs: Jobs, stop: asyncio.Event) -> None:
        self.bus = bus
        self.recovery = recovery
        self.jobs = jobs
        self.stop = stop
        self.lost = 0

    def subscriptions(self) -> list[Subscription]:
        return [
            (WorkerLost, self._on_lost),
        ]

    def _on_lost(self, event: WorkerLost) -> None:
        self.lost += len(event.handles)
        if event.handles:
            self.jobs.spawn(self.recover(event), WHAT)

    async def recover(self, event: WorkerLost) -> None:
        backoff = Backoff(base_s=0.2, cap_s=5.0)
        ids = [h.task_id for h in event.handles]
        while True:
            try:
                pending = await self.recovery.return_lost_tasks(event.worker, ids,
                                                                 event.fences)
                break
            except Exception as exc:
                if await backoff.failed(WHAT, exc, self.stop):
                    logger.warning("stopping: {} task(s) of dead worker {} left to the sweeps",
                                   len(ids), event.worker)
                    return
        backoff.succeeded(WHAT)
        logger.info("recovered {} task(s) of dead worker {}", len(ids), event.worker)
        self.bus.emit(WorkRecovered(event.worker, [h.device_id for h in event.handles], pending))
