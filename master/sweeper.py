"""The leader's sweeps: one master at a time recovers abandoned work.

Leadership is the fenced lease of `master.leadership` (renewed by its own loop);
the sweeper sweeps while `is_leading()` says so, and each write of a sweep is
fenced by the lease's token (`Recovery` is handed the lease as its fence). The
sweeps are compare-and-sets besides, so the one write a paused leader may send
late (see `master.leadership`) double-applies nothing.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import redis.asyncio
from loguru import logger

from master.leadership import LeaderLease, NotLeading, leader_lease
from master.queue_drain import QueueDrain
from master.recovery import Found, IngestFor, Recovery
from sendscript.backoff import every
from sendscript.models import utcnow
from sendscript.settings import Settings


class Sweeper:
    def __init__(self, settings: Settings, client: redis.asyncio.Redis, recovery: Recovery,
                 ingest_for: IngestFor, lease: LeaderLease | None = None) -> None:
        self.settings = settings
        self.recovery = recovery
        self.ingest_for = ingest_for
        # A sweeper given no lease makes its own and renews it in its own loop.
        self.owns_lease = lease is None
        self.lease = lease or leader_lease(settings, client)
        self.sweeps = 0
        self.totals: Counter[str] = Counter()
        self._orphans_checked: datetime | None = None
        self.drain = QueueDrain()  # when the ready queue was last drained

    def report(self) -> dict[str, Any]:
        return {**self.lease.report(), "sweeps": self.sweeps,
                "recovered": dict(self.totals)}

    async def run(self, stop: asyncio.Event) -> None:
        sweeping = every(stop, self.settings.sweep_interval_s, "sweeps", self._sweep_if_leading)
        if self.owns_lease:
            await asyncio.gather(self.lease.run(stop), sweeping)
        else:
            await sweeping

    async def _sweep_if_leading(self) -> None:
        if not self.lease.is_leading():
            return
        try:
            await self.sweep()
        except NotLeading as exc:  # logged and counted by the lease
            logger.info("sweep stopped: {}", exc)

    async def sweep(self) -> Found:
        found = Found()
        now = utcnow()
        r = self.recovery
        await r.time_out_results(now, found)
        await r.release_stuck_running(now, found)
        for dead in await r.dead_masters(exclude=self.settings.master_id):
            if not self.lease.is_leading():
                raise NotLeading("recover a dead master: the local deadline passed")
            await r.recover_dead_master(dead, self.ingest_for, found)
        drained_at = self.drain.observe(now, *await r.queue_position())
        if self._orphans_due(now) and drained_at is not None:
            await r.requeue_orphans(now, found, drained_at=drained_at)
            self._orphans_checked = now
        await r.release_orphan_locks(found)
        self.sweeps += 1
        self.totals.update({
            "timed_out": len(found.timed_out), "retried": len(found.retried),
            "dead_masters": len(found.dead_masters), "adopted_entries": found.adopted_entries,
            "requeued": len(found.requeued), "orphan_locks": len(found.orphan_locks),
            "unsent": len(found.unsent),
        })
        return found

    def _orphans_due(self, now: datetime) -> bool:
        """Orphans are looked for once per grace, not every sweep: an orphan is a task
        older than the grace, and the query reads every pending task (the embedded
        server serves one clause of it from an index), 0.6 s of its time a sweep with
        25,000 tasks held."""
        last = self._orphans_checked
        return last is None or now - last >= timedelta(seconds=self.settings.orphan_grace_s)
