"""The leader's sweeps: one master at a time recovers abandoned work.

Leadership is a lease in Redis (`{prefix}:leader`), taken with SET NX and renewed
by compare-and-expire; when its holder dies the lease lapses and another master
takes it. The sweeps themselves are compare-and-sets, so a moment with two
leaders (a paused process whose lease lapsed) double-applies nothing.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import redis.asyncio
from loguru import logger

from master.recovery import Found, IngestFor, Recovery
from sendscript.backoff import every
from sendscript.models import utcnow
from sendscript.settings import Settings

# Renew if ours, take it if free; 1 when we hold it after the call.
HOLD = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
LET_GO = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaderLease:
    def __init__(self, client: redis.asyncio.Redis, key: str, holder: str,
                 lease_s: float) -> None:
        self.key = key
        self.holder = holder
        self.lease_ms = int(lease_s * 1000)
        self._hold = client.register_script(HOLD)
        self._let_go = client.register_script(LET_GO)
        self.leading = False

    def is_leading(self) -> bool:
        """The read-only view other parts are handed: is this master the leader now?"""
        return self.leading

    async def hold(self) -> bool:
        held = bool(await self._hold(keys=[self.key], args=[self.holder, self.lease_ms]))
        if held != self.leading:
            logger.info("{} leadership of the sweeps ({})", "took" if held else "lost",
                        self.holder)
        self.leading = held
        return held

    async def let_go(self) -> None:
        if self.leading:
            await self._let_go(keys=[self.key], args=[self.holder])
            self.leading = False


def leader_lease(settings: Settings, client: redis.asyncio.Redis) -> LeaderLease:
    return LeaderLease(client, f"{settings.keys.prefix}:leader", settings.master_id,
                       settings.leader_lease_s)


class Sweeper:
    def __init__(self, settings: Settings, client: redis.asyncio.Redis, recovery: Recovery,
                 ingest_for: IngestFor, lease: LeaderLease | None = None) -> None:
        self.settings = settings
        self.recovery = recovery
        self.ingest_for = ingest_for
        self.lease = lease or leader_lease(settings, client)
        self.sweeps = 0
        self.totals: Counter[str] = Counter()
        self._orphans_checked: datetime | None = None

    def report(self) -> dict[str, Any]:
        return {"leader": self.lease.leading, "sweeps": self.sweeps,
                "recovered": dict(self.totals)}

    async def run(self, stop: asyncio.Event) -> None:
        await every(stop, self.settings.sweep_interval_s, "sweeps", self._lead_and_sweep)
        try:
            await self.lease.let_go()
        except Exception as exc:
            logger.debug("leader lease not released: {!r}", exc)

    async def _lead_and_sweep(self) -> None:
        if await self.lease.hold():
            await self.sweep()

    async def sweep(self) -> Found:
        found = Found()
        now = utcnow()
        r = self.recovery
        await r.time_out_results(now, found)
        await r.release_stuck_running(now, found)
        for dead in await r.dead_masters(exclude=self.settings.master_id):
            await r.recover_dead_master(dead, self.ingest_for, found)
        if self._orphans_due(now):
            await r.requeue_orphans(now, found)
            self._orphans_checked = now
        await r.release_orphan_locks(found)
        self.sweeps += 1
        self.totals.update({
            "timed_out": len(found.timed_out), "retried": len(found.retried),
            "dead_masters": len(found.dead_masters), "adopted_entries": found.adopted_entries,
            "requeued": len(found.requeued), "orphan_locks": len(found.orphan_locks),
        })
        return found

    def _orphans_due(self, now: datetime) -> bool:
        """Orphans are looked for once per grace, not every sweep: an orphan is a task
        older than the grace, and the query reads every pending task (the embedded
        server serves one clause of it from an index), 0.6 s of its time a sweep with
        25,000 tasks held."""
        last = self._orphans_checked
        return last is None or now - last >= timedelta(seconds=self.settings.orphan_grace_s)
