"""Device health in the master: the bench gate that holds benched devices' tasks, and its
loop.

Naming: one noun per concern; `sendscript/device_health.py` holds its state and rule, shared by
every role, and `master/device_health.py` (this module) the master part that drives it.

The bench lives in Redis (`sendscript.device_health`), shared by every master. The
loop keeps the gate's view of it: it subscribes to the devices channel and reloads
the benched set on every message, and every heartbeat interval as well (a message
lost to a reconnect costs at most that long). It also records what this master's
workers say of devices (sends central-control refused for one) in one Lua call per
half second, not one per answer.

The gate answers from memory in O(1): a benched device's task is held (it stays
queued and uses no attempt) until the bench ends, when the dispatcher asks again; a
resume wakes the held devices at once (`WakeRequested`).

Incidents: `device_benched` (key: the device) when a bench starts and when it ends
or is lifted; `devices_benched` while more than `bench_alert_count` are benched.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis.asyncio
from loguru import logger

from master.bus import GO, Bus, Hold, Subscription, Verdict
from master.events import Incident, TaskAnswered, TasksWithdrawn, WakeRequested
from master.following import follow
from sendscript import device_health
from sendscript.device_health import BenchPolicy, Outcome
from sendscript.models import Task
from sendscript.settings import Settings

DEVICE_INCIDENT = "device_benched"
MANY_INCIDENT = "devices_benched"
MANY_KEY = "farm"
FLUSH_S = 0.5  # how often the answers' outcomes are recorded in Redis
MAX_PENDING = 10_000  # outcomes kept while Redis cannot be reached (the oldest go)
MARGIN_S = 0.05  # ask again this long after a bench ends, not a little before


@dataclass(frozen=True)
class Change:
    started: list[str]
    ended: list[str]
    wake: list[str]  # held devices no longer benched


class BenchGate:
    """The gate's state, pure: benched devices and their ends, the devices it holds."""

    def __init__(self) -> None:
        self.until: dict[str, float] = {}  # device -> bench end, epoch seconds
        self.held: dict[str, str] = {}  # device -> the task id held last
        self.holds = 0

    def admit(self, task: Task, now: datetime) -> Verdict:
        left = self.until.get(task.device_id, 0.0) - now.timestamp()
        if left <= 0:
            self.held.pop(task.device_id, None)
            return GO
        self.held[task.device_id] = task.id
        self.holds += 1
        return Hold("device benched", left + MARGIN_S)

    def update(self, until: Mapping[str, float], now: float) -> Change:
        """Apply the benches read (or learnt): which started, which ended, whom to wake."""
        fresh = {d: u for d, u in until.items() if u > now}
        started = [d for d in fresh if self.until.get(d, 0.0) <= now]
        ended = [d for d, u in self.until.items() if u > now and d not in fresh]
        ended += self.expire(now)
        self.until = fresh
        wake = [d for d in self.held if d not in fresh]
        for device in wake:
            del self.held[device]
        return Change(started, ended, wake)

    def add(self, device_id: str, until: float, now: float) -> bool:
        """A bench this master just made; True if it is news to the view."""
        was = self.until.get(device_id, 0.0) > now
        self.until[device_id] = max(until, self.until.get(device_id, 0.0))
        return not was

    def expire(self, now: float) -> list[str]:
        """Benches whose end passed, off the view (their held tasks' re-ask is due)."""
        gone = [d for d, u in self.until.items() if u <= now]
        for device in gone:
            del self.until[device]
        return gone

    def withdrawn(self, task_ids: set[str]) -> None:
        for device in [d for d, t in self.held.items() if t in task_ids]:
            del self.held[device]


class Benching:
    """The bench gate on the bus, the answers' outcomes, and the loop keeping the view."""

    def __init__(self, settings: Settings, bus: Bus, client: redis.asyncio.Redis) -> None:
        self.settings = settings
        self.bus = bus
        self.redis = client
        self.policy = BenchPolicy.of(settings)
        self.gate = BenchGate()
        self.pending: list[Outcome] = []
        self.recorded = 0
        self.benched_here = 0  # benches this master's outcomes made
        self.reloads = 0
        self.many = False  # the devices_benched incident is on

    def subscriptions(self) -> list[Subscription]:
        return [
            (TaskAnswered, self._on_answered),
            (TasksWithdrawn, lambda e: self.gate.withdrawn({t.id for t in e.tasks})),
        ]

    def _on_answered(self, event: TaskAnswered) -> None:
        a = event.answer
        if device_health.send_failure(a.outcome, a.error, a.central_ok):
            if len(self.pending) >= MAX_PENDING:
                del self.pending[0]
            self.pending.append(Outcome(a.device_id, False, a.error or ""))

    async def run(self, stop: asyncio.Event) -> None:
        await follow(self.redis, self.settings.keys.devices_channel, stop, what="benching",
                     interval_s=self.settings.heartbeat_interval_s, tick_s=FLUSH_S,
                     reload=self.reload, tick=self._tick)

    async def _tick(self, reloaded: bool) -> None:
        if not reloaded:  # benches that ended meanwhile
            self._apply(self.gate.update(self.gate.until, time.time()))
        await self.flush()

    async def reload(self) -> Change:
        until = await device_health.load(self.redis, self.settings.keys)
        self.reloads += 1
        change = self.gate.update(until, time.time())
        self._apply(change)
        return change

    async def flush(self) -> int:
        """Record the outcomes gathered since the last flush: one Lua call."""
        outcomes, self.pending = self.pending, []
        if not outcomes:
            return 0
        try:
            benched = await device_health.record(self.redis, self.settings.keys, self.policy,
                                                 outcomes)
        except Exception:
            self.pending = (outcomes + self.pending)[-MAX_PENDING:]
            raise
        self.recorded += len(outcomes)
        self.benched_here += len(benched)
        now = time.time()
        started = [b.device_id for b in benched
                   if self.gate.add(b.device_id, b.until_ms / 1000, now)]
        self._apply(Change(started, [], []))
        return len(outcomes)

    def _apply(self, change: Change) -> None:
        # Ends first: a device benched again as its last bench ended has both.
        for device in change.ended:
            logger.info("device {}: bench over", device)
            self.bus.emit(Incident(DEVICE_INCIDENT, device, False, "bench over"))
        for device in change.started:
            until = self.gate.until.get(device, 0.0)
            self.bus.emit(Incident(DEVICE_INCIDENT, device, True,
                                   f"benched until {_clock(until)}"))
        if change.wake:
            self.bus.emit(WakeRequested(change.wake))
        many = len(self.gate.until) > self.settings.bench_alert_count
        if many != self.many:
            self.many = many
            self.bus.emit(Incident(
                MANY_INCIDENT, MANY_KEY, many,
                f"{len(self.gate.until)} devices benched (alert above "
                f"{self.settings.bench_alert_count})"))

    def report(self) -> dict[str, Any]:
        return {
            "benched": {d: _clock(u) for d, u in sorted(self.gate.until.items(),
                                                        key=lambda x: x[1])[:50]},
            "benched_count": len(self.gate.until),
            "held": len(self.gate.held),
            "holds": self.gate.holds,
            "recorded": self.recorded,
            "benched_here": self.benched_here,
            "pending": len(self.pending),
            "reloads": self.reloads,
        }


def _clock(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s).astimezone().isoformat(timespec="seconds")
