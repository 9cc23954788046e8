"""Cron and interval schedules: every master runs this; each fire is created once.

At a schedule's fire time a master creates the fire's tasks (ids derived from the
schedule, the fire time and the device, so a second master creating the same fire
finds them stored and queues nothing), queues those it created, then moves the
schedule's `next_fire_at` on by compare-and-set. A fire retried after an error
queues the tasks its failed try stored under this master (their insert landed though
its answer was lost); one that failed for good is left to `master.reconcile`. A
master that was down over several fire times applies the schedule's misfire policy
when it comes back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

from loguru import logger
from pymongo.asynchronous.database import AsyncDatabase

from sendscript.backoff import Backoff
from sendscript.cron import Plan, plan
from sendscript.failover import ride_out
from sendscript.groups import devices_of
from sendscript.models import Task, utcnow
from sendscript.schedules import Schedule, fire_batch_id, fire_tasks
from sendscript.settings import Settings
from sendscript.status import TaskStatus
from sendscript.store import GROUPS, SCHEDULES, TaskStore

MAX_SLEEP_S = 1.0


class Scheduler:
    def __init__(self, settings: Settings, db: AsyncDatabase, tasks: TaskStore,
                 on_tasks: Callable[[list[Task]], None], online_since: datetime) -> None:
        self.settings = settings
        self.schedules = db[SCHEDULES]
        self.groups = db[GROUPS]
        self.tasks = tasks
        self.on_tasks = on_tasks
        self.fired = 0
        # Fire times before this master started are ones no master fired in time.
        self.online_since = online_since

    def report(self) -> dict[str, Any]:
        return {"schedule_fires": self.fired}

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff(base_s=0.5, cap_s=10.0)
        loaded_at = 0.0
        schedules: list[Schedule] = []
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                if loop.time() - loaded_at >= self.settings.schedule_reload_s:
                    schedules = await self._load()
                    loaded_at = loop.time()
                now = utcnow()
                due = [s for s in schedules if s.next_fire_at and s.next_fire_at <= now]
                for schedule in due:
                    await self.fire(schedule, now)
                if due:
                    schedules = await self._load()
                    loaded_at = loop.time()
                backoff.succeeded("scheduler")
            except Exception as exc:
                await backoff.failed("scheduler", exc)
                continue
            wait = self._until_next(schedules, loaded_at, loop.time())
            try:
                await asyncio.wait_for(stop.wait(), wait)
            except TimeoutError:
                pass

    async def _load(self) -> list[Schedule]:
        found = []
        async for doc in self.schedules.find({"enabled": True}):
            try:
                found.append(Schedule.model_validate(doc))
            except ValueError as exc:
                logger.error("schedule {!r} is invalid and will not fire: {}", doc.get("_id"), exc)
        return found

    def _until_next(self, schedules: list[Schedule], loaded_at: float, now_mono: float) -> float:
        reload_in = self.settings.schedule_reload_s - (now_mono - loaded_at)
        wait = max(0.0, reload_in)
        now = utcnow()
        for s in schedules:
            if s.next_fire_at is not None:
                wait = min(wait, max(0.0, (s.next_fire_at - now).total_seconds()))
        return min(wait, MAX_SLEEP_S) if schedules else max(0.05, wait)

    async def fire(self, schedule: Schedule, now: datetime) -> int:
        """Create the due fire(s) of one schedule; how many of their tasks this master
        queued (created now, or stored under it by a failed try of the same fire)."""
        assert schedule.next_fire_at is not None
        p = await self._fired_already(schedule, plan(
            schedule.rule(), schedule.next_fire_at, now, schedule.misfire,
            self.settings.misfire_grace_s, self.online_since))
        if p.missed:
            logger.warning("schedule {}: {} fire time(s) missed; policy {}: {} catch-up run",
                           schedule.name, p.missed, schedule.misfire,
                           1 if schedule.misfire == "fire_once" else 0)
        devices = await self._targets(schedule)
        created: list[Task] = []
        for fire_at in p.fires:
            tasks = fire_tasks(schedule, fire_at, devices, self.settings.key_prefix,
                               self.settings.master_id, now)
            stored = await self.tasks.store(tasks)
            # Ours to queue whatever follows: those it created now, and those an earlier
            # try of this fire stored under this master and never queued. A schedule
            # update that fails next (a Mongo step-down) must not leave them pending
            # under a live master that holds them nowhere, where no sweep looks.
            mine = stored.created + await self._ours_unqueued(stored.stored_before)
            created += mine
            if mine:
                self.on_tasks(mine)
        # A compare-and-set on next_fire_at: run twice, the second matches nothing. Ridden
        # out through a failover, or the fire time it moves past would count as missed
        # on the next try, which fires a catch-up besides the fire stored here.
        moved = await ride_out(lambda: self.schedules.update_one(
            {"_id": schedule.name, "next_fire_at": schedule.next_fire_at},
            {"$set": {"next_fire_at": p.next_fire_at, "updated_at": now,
                      **({"last_fire_at": p.fires[-1]} if p.fires else {})},
             "$inc": {"fires": len(p.fires), "missed": p.missed}},
        ), self.settings.mongo_failover_s)
        if created:
            self.fired += len(p.fires)
            logger.info("schedule {} fired at {}: {} task(s)", schedule.name,
                        [f.isoformat() for f in p.fires], len(created))
        elif moved.matched_count:
            logger.debug("schedule {}: fire already created by another master", schedule.name)
        return len(created)

    async def _fired_already(self, schedule: Schedule, p: Plan) -> Plan:
        """A late fire time whose tasks are stored was fired, not missed: a master
        stored them and died (or lost Mongo) before it moved the schedule on. It is
        fired again, which creates nothing and queues what that try left unqueued, and
        counted as a fire, so the schedule's count matches the fires its tasks show."""
        skipped = [t for t in p.late if t not in p.fires]
        if not skipped:
            return p
        prefix = self.settings.key_prefix
        found = [t for t in skipped if await self.tasks.batch_exists(
            fire_batch_id(schedule.name, t, prefix))]
        if not found:
            return p
        return replace(p, fires=sorted([*p.fires, *found]), missed=p.missed - len(found),
                       late=tuple(t for t in p.late if t not in found))

    async def _ours_unqueued(self, stored_before: list[Task]) -> list[Task]:
        """Tasks of this fire found stored already that this master created: an earlier
        try of this fire stored them and then failed (its answer lost, a Mongo timeout),
        so nothing queued them. Those another master created are its own."""
        if not stored_before:
            return []
        me = self.settings.master_id
        return [t for t in await self.tasks.find_many(t.id for t in stored_before)
                if t.master == me and t.status == TaskStatus.PENDING]

    async def _targets(self, schedule: Schedule) -> list[str]:
        if schedule.device_ids is not None:
            return schedule.device_ids
        doc = await self.groups.find_one({"_id": schedule.group})
        devices = devices_of([doc]).get(schedule.group or "", []) if doc else []
        if not devices:
            logger.warning("schedule {}: group {!r} has no devices", schedule.name, schedule.group)
        return devices
