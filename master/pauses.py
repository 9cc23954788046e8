"""Pauses in the master: a gate that holds paused tasks, and the loop that keeps its view.

Naming: one noun per concern; `sendscript/pauses.py` holds its state and rule, shared by
every role, and `master/pauses.py` (this module) the master part that drives it.

The flags live in Redis (`sendscript.pauses`). The loop subscribes to their
channel and reloads the hash on every message, and every heartbeat interval as
well (a message lost to a reconnect costs at most that long); with group pauses
it also reads the paused groups' devices from Mongo, so the gate answers from
memory in O(1). A held task stays on the board and uses no attempt; when a pause
is lifted the gate's held devices are woken at once (`WakeRequested`), the
re-ask after `pause_recheck_s` being only the fallback.

Until the first load the gate holds every task: a master that starts during a
hard stop must not send anything before it has read the flags.

The quota pause lets one task through every `quota_probe_s` (one master at a
time, by an expiring Redis key); its "sent" answer lifts the pause for all.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis.asyncio
from loguru import logger
from pymongo.asynchronous.collection import AsyncCollection

from master.bus import GO, Bus, Hold, Subscription, Verdict
from master.events import Incident, TaskAnswered, TasksWithdrawn, WakeRequested
from master.following import follow
from master.jobs import Jobs
from sendscript import pauses
from sendscript.backoff import OutageLog
from sendscript.models import Task
from sendscript.pauses import HARD, QUOTA, Pause, PauseView
from sendscript.settings import Settings

LOADING = "loading"  # the scope a task is held by before the flags were first read
INCIDENT_KIND = {HARD: "hard_stop", QUOTA: "quota"}


def incident_kind(scope: str) -> str:
    return INCIDENT_KIND.get(scope, "paused")


@dataclass(frozen=True)
class Change:
    started: list[Pause]
    ended: list[Pause]
    wake: list[str]  # held devices no pause covers any more


class PauseGate:
    """The gate's state, pure: the view of the pauses, the devices it holds, the probe."""

    def __init__(self, recheck_s: float) -> None:
        self.recheck_s = recheck_s
        self.view: PauseView | None = None  # None: not loaded yet, hold everything
        self.held: dict[str, tuple[str, str, str]] = {}  # device -> (task id, queue, scope)
        self.probe_armed = False
        self.probe_task: str | None = None
        self.holds = 0
        self.probes = 0

    @property
    def quota(self) -> bool:
        """The quota pause is in force (as last loaded)."""
        return self.view is not None and self.view.quota

    def scope_of(self, queue: str, device_id: str) -> str | None:
        return LOADING if self.view is None else self.view.match(queue, device_id)

    def admit(self, task: Task, now: datetime) -> Verdict:
        scope = self.scope_of(task.queue, task.device_id)
        if scope is None or (scope == QUOTA and self._take_probe(task)):
            self.held.pop(task.device_id, None)
            return GO
        self.held[task.device_id] = (task.id, task.queue, scope)
        self.holds += 1
        return Hold(f"paused ({scope})", self.recheck_s)

    def _take_probe(self, task: Task) -> bool:
        if not self.probe_armed:
            return False
        self.probe_armed = False
        self.probe_task = task.id
        self.probes += 1
        return True

    def update(self, view: PauseView) -> Change:
        """Apply a new view: which pauses started and ended, which devices to wake."""
        before = {} if self.view is None else self.view.pauses
        started = [p for s, p in view.pauses.items() if s not in before]
        ended = [p for s, p in before.items() if s not in view.pauses]
        self.view = view
        wake = []
        for device_id, (task_id, queue, _) in list(self.held.items()):
            scope = view.match(queue, device_id)
            if scope is None:
                wake.append(device_id)
                del self.held[device_id]
            else:  # still held, maybe by another pause now
                self.held[device_id] = (task_id, queue, scope)
        if QUOTA not in view.pauses:
            self.probe_armed = False
        return Change(started, ended, wake)

    def arm_probe(self) -> list[str]:
        """Let the next quota-held task through; the devices to ask again for it."""
        self.probe_armed = True
        self.probe_task = None
        return [d for d, (_, _, scope) in self.held.items() if scope == QUOTA]

    def answered(self, task_id: str, outcome: str) -> bool:
        """True when this is the probe's answer and it says the task was sent."""
        if task_id != self.probe_task:
            return False
        self.probe_task = None
        return outcome == "sent"

    def withdrawn(self, task_ids: Iterable[str]) -> None:
        gone = set(task_ids)
        for device_id in [d for d, (t, _, _) in self.held.items() if t in gone]:
            del self.held[device_id]

    def held_by_scope(self) -> dict[str, int]:
        return dict(Counter(scope for _, _, scope in self.held.values()))


class Pausing:
    """The pause gate on the bus, and its loop: flags from Redis, groups from Mongo."""

    def __init__(self, settings: Settings, bus: Bus, client: redis.asyncio.Redis,
                 groups: AsyncCollection, jobs: Jobs) -> None:
        self.settings = settings
        self.bus = bus
        self.redis = client
        self.groups = groups
        self.jobs = jobs
        self.gate = PauseGate(settings.pause_recheck_s)
        self.reloads = 0
        self.incidents: Counter[str] = Counter()  # incidents raised, starts and ends
        self._next_probe: float | None = None
        self._members: dict[str, list[str]] = {}  # paused group -> its devices, last read
        self._mongo = OutageLog("pauses: paused groups' devices")

    def subscriptions(self) -> list[Subscription]:
        return [
            (TasksWithdrawn, lambda e: self.gate.withdrawn(t.id for t in e.tasks)),
            (TaskAnswered, self._on_answered),
        ]

    async def run(self, stop: asyncio.Event) -> None:
        await follow(self.redis, self.settings.keys.pauses_channel, stop, what="pauses",
                     interval_s=self.settings.heartbeat_interval_s, tick_s=1.0,
                     reload=self.reload, tick=lambda _: self.probe())

    async def reload(self) -> Change:
        """Read the flags (and the paused groups' devices); apply them to the gate."""
        flags = await pauses.load(self.redis, self.settings.keys)
        view = PauseView.build(flags)
        if view.groups:
            view = PauseView.build(flags, await self._group_members(view.groups))
        change = self.gate.update(view)
        self.reloads += 1
        for pause in change.started:
            logger.warning("pause {} set by {}: {}", pause.scope, pause.by, pause.reason)
            self._incident(pause, True)
            if pause.scope == QUOTA:
                self._next_probe = time.monotonic() + self.settings.quota_probe_s
        for pause in change.ended:
            logger.warning("pause {} lifted", pause.scope)
            self._incident(pause, False)
        if change.wake:
            self.bus.emit(WakeRequested(change.wake))
        return change

    async def _group_members(self, groups: list[str]) -> dict[str, list[str]]:
        """The paused groups' devices; while Mongo fails, the last ones read (a flag
        change in Redis must not wait for Mongo)."""
        try:
            docs = await self.groups.find({"_id": {"$in": groups}},
                                          {"devices": 1}).to_list(None)
        except Exception as exc:
            self._mongo.failed(exc)
            return {g: self._members.get(g, []) for g in groups}
        self._mongo.ok()
        self._members = {d["_id"]: list(d.get("devices", [])) for d in docs}
        return self._members

    def _incident(self, pause: Pause, active: bool) -> None:
        kind = incident_kind(pause.scope)
        self.incidents[kind] += 1
        self.bus.emit(Incident(kind, pause.scope, active, _detail(pause)))

    async def probe(self) -> bool:
        """While only quota holds tasks, arm one probe per interval across masters."""
        view = self.gate.view
        if view is None or not view.quota or view.everything is not None:
            return False
        now = time.monotonic()
        if self._next_probe is None or now < self._next_probe:
            return False
        probe_s = self.settings.quota_probe_s
        self._next_probe = now + probe_s
        if not await self.redis.set(self.settings.keys.quota_probe, self.settings.master_id,
                                    nx=True, px=int(probe_s * 1000)):
            return False  # another master probes this time
        wake = self.gate.arm_probe()
        logger.info("quota pause: letting one task through as a probe")
        if wake:
            self.bus.emit(WakeRequested(wake))
        return True

    def _on_answered(self, event: TaskAnswered) -> None:
        if self.gate.answered(event.task.id, event.outcome):
            logger.info("quota probe {} was sent: lifting the quota pause", event.task.id)
            self.jobs.spawn(pauses.clear_quota(self.redis, self.settings.keys),
                            "lift the quota pause")

    def report(self) -> dict[str, Any]:
        view = self.gate.view
        return {
            "loaded": view is not None,
            "active": {s: p.reason for s, p in view.pauses.items()} if view else {},
            "held": self.gate.held_by_scope(),
            "holds": self.gate.holds,
            "quota_probes": self.gate.probes,
            "reloads": self.reloads,
            "incidents": dict(self.incidents),
        }


def _detail(pause: Pause) -> str:
    return f"{pause.reason} (by {pause.by} at {pause.at})" if pause.by else pause.reason
