"""Incidents the master can see for itself, raised on the bus as `Incident` events.

- `workers_dying` (key: this master's id): `alert_worker_deaths` workers exited
  unplanned (crashed, killed, killed as hung) within `alert_worker_deaths_window_s`;
  over once none died for that long. Deaths are read from the pool's slots each
  time capacity changes (every exit emits `CapacityChanged`) and on every check.
- `master_gone` (key: the master's id), leader only: a master whose heartbeat has
  been gone for `alert_master_gone_after_s` (a restart within it is no incident);
  over when it beats again. A master stopped on purpose and not started again
  counts too.
- `dead_letters` (key: the dead-letter topic), leader only: the `dead_lettered`
  counter of `{prefix}:stats` rose by `alert_dead_letters` within
  `alert_dead_letters_window_s`; over once it stayed flat that long.

The decisions are pure (`Episode`, `PoolDeaths`, `GoneMasters`); `Watches` feeds
them from the pool, Redis and the clock in its own loop. A master that stops
leading forgets the leader's incidents without announcing an end (the next
leader finds them on and, by the cluster-wide record, does not announce them
again; it announces their end).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import redis.asyncio

from master.bus import Bus, Subscription
from master.events import CapacityChanged, Incident, IncidentForgotten, MasterStopping
from sendscript.backoff import every
from sendscript.settings import Settings

WORKERS_DYING = "workers_dying"
MASTER_GONE = "master_gone"
DEAD_LETTERS = "dead_letters"
LEADER_KINDS = (MASTER_GONE, DEAD_LETTERS)


class Episode:
    """On once `threshold` counts fall within `window_s`; off once none came for
    `window_s`. `update` says True when it turns on, False when off, else None."""

    def __init__(self, threshold: int, window_s: float) -> None:
        self.threshold = threshold
        self.window_s = window_s
        self.on = False
        self._counts: deque[tuple[float, int]] = deque()

    def add(self, now: float, n: int = 1) -> None:
        if n > 0:
            self._counts.append((now, n))

    def within(self, now: float) -> int:
        while self._counts and self._counts[0][0] <= now - self.window_s:
            self._counts.popleft()
        return sum(n for _, n in self._counts)

    def update(self, now: float) -> bool | None:
        n = self.within(now)
        if not self.on and n >= self.threshold:
            self.on = True
            return True
        if self.on and n == 0:
            self.on = False
            return False
        return None

    def reset(self) -> None:
        self.on = False
        self._counts.clear()


class Slot(Protocol):
    """What `PoolDeaths` reads of a worker slot (master.pool.WorkerSlot)."""

    name: str
    exit_reason: str | None
    hung: str | None

    @property
    def process(self) -> Any: ...


def unplanned(slot: Slot) -> bool:
    """Died rather than exited: no exit said, a non-zero code, or killed as hung
    (the pool's own reading of an exit)."""
    return slot.hung is not None or slot.exit_reason is None or bool(slot.process.exitcode)


class PoolDeaths:
    """Workers that died since the last look, from two looks at the pool's slots
    (worker id -> slot; ids rise by one per spawn)."""

    def __init__(self) -> None:
        self._known: dict[int, Slot] = {}
        self._highest = -1

    def look(self, slots: Mapping[int, Slot]) -> list[str]:
        died = [s.name for wid, s in self._known.items() if wid not in slots and unplanned(s)]
        top = max(slots, default=self._highest)
        # Spawned and gone between two looks: it never came online (that is a look),
        # so it cannot have retired; it died young.
        died += [f"worker {wid} (before it came online)"
                 for wid in range(self._highest + 1, top)
                 if wid not in slots and wid not in self._known]
        self._known = dict(slots)
        self._highest = max(self._highest, top)
        return died


class GoneMasters:
    """Masters whose heartbeat is gone, from the masters hash and their alive keys.
    One seen alive and later missing from the hash (the leader's recovery removed
    its entry) is still gone until it beats again. A master back within `grace_s`
    (a restart) is never called gone."""

    def __init__(self, me: str, grace_s: float = 0.0) -> None:
        self.me = me
        self.grace_s = grace_s
        self.seen: set[str] = set()
        self.gone: set[str] = set()
        self.missing: dict[str, float] = {}  # master -> when first seen without heartbeat

    def look(self, listed: set[str], alive: set[str], now: float) -> list[tuple[str, bool]]:
        """(master id, gone) for every master whose state changed."""
        changes = [(m, False) for m in sorted(self.gone & alive)]
        self.gone -= alive
        self.seen |= alive
        silent = (listed | self.seen) - alive - {self.me}
        self.missing = {m: self.missing.get(m, now) for m in silent}
        for master in sorted(silent - self.gone):
            if now - self.missing[master] >= self.grace_s:
                self.gone.add(master)
                changes.append((master, True))
        return changes

    def reset(self) -> None:
        self.seen.clear()
        self.gone.clear()
        self.missing.clear()


class PoolView(Protocol):
    """What the watches read of the worker pool: its slots, by id."""

    @property
    def slots(self) -> Mapping[int, Slot]: ...


class Watches:
    def __init__(self, settings: Settings, bus: Bus, client: redis.asyncio.Redis,
                 pool: PoolView, leading: Callable[[], bool]) -> None:
        self.settings = settings
        self.bus = bus
        self.redis = client
        self.pool = pool
        self.leading = leading  # is this master the leader now? (the lease's view)
        self.deaths = PoolDeaths()
        self.dying = Episode(settings.alert_worker_deaths, settings.alert_worker_deaths_window_s)
        self.died: deque[str] = deque(maxlen=10)  # the latest deaths' names, for the detail
        self.masters = GoneMasters(settings.master_id, settings.alert_master_gone_after_s)
        self.dead_letters = Episode(settings.alert_dead_letters,
                                    settings.alert_dead_letters_window_s)
        self._dead_lettered: int | None = None
        self._led = False
        self._stopping = False

    def subscriptions(self) -> list[Subscription]:
        return [
            (CapacityChanged, lambda _: self._look_at_pool()),
            (MasterStopping, self._on_stopping),
        ]

    def _on_stopping(self, _: MasterStopping) -> None:
        self._stopping = True  # workers exiting now exit on purpose

    def _look_at_pool(self) -> None:
        if self._stopping:
            return
        died = self.deaths.look(self.pool.slots)
        if died:
            self.dying.add(time.monotonic(), len(died))
            self.died.extend(died)
            self._workers(time.monotonic())

    def _workers(self, now: float) -> None:
        turned = self.dying.update(now)
        if turned is None:
            return
        window = self.settings.alert_worker_deaths_window_s
        detail = (f"{self.dying.within(now)} worker(s) died within {window:g}s on master "
                  f"{self.settings.master_id}; latest: {', '.join(self.died)}" if turned else
                  f"no worker died for {window:g}s")
        self.bus.emit(Incident(WORKERS_DYING, self.settings.master_id, turned, detail))

    async def run(self, stop: asyncio.Event) -> None:
        await every(stop, self.settings.alert_check_interval_s, "incident watches", self.check)

    async def check(self) -> None:
        if self._stopping:
            return
        self._look_at_pool()
        self._workers(time.monotonic())
        if self.leading():
            self._led = True
            await self._check_masters()
            await self._check_dead_letters(time.monotonic())
        elif self._led:
            self._step_down()

    async def _check_masters(self) -> None:
        keys = self.settings.keys
        listed = {k.decode() for k in await self.redis.hkeys(keys.masters)}
        ids = sorted(listed | self.masters.seen)
        pipe = self.redis.pipeline(transaction=False)
        for master in ids:
            pipe.exists(keys.master_alive(master))
        alive = {m for m, up in zip(ids, await pipe.execute(), strict=True) if up}
        for master, gone in self.masters.look(listed, alive, time.monotonic()):
            detail = (f"master {master} stopped sending its heartbeat; the leader takes over "
                      f"its queue and tasks" if gone else f"master {master} is back")
            self.bus.emit(Incident(MASTER_GONE, master, gone, detail))

    async def _check_dead_letters(self, now: float) -> None:
        raw = await self.redis.hget(self.settings.keys.stats, "dead_lettered")
        value = int(raw or 0)
        if self._dead_lettered is not None:
            self.dead_letters.add(now, value - self._dead_lettered)
        self._dead_lettered = value
        turned = self.dead_letters.update(now)
        if turned is None:
            return
        window = self.settings.alert_dead_letters_window_s
        topic = self.settings.dlq_topic
        detail = (f"{self.dead_letters.within(now)} task log(s) dead-lettered within "
                  f"{window:g}s ({value} in all); see {topic}" if turned else
                  f"no task log dead-lettered for {window:g}s ({value} in all)")
        self.bus.emit(Incident(DEAD_LETTERS, topic, turned, detail))

    def _step_down(self) -> None:
        """No longer the leader: the next one watches; forget without announcing."""
        self._led = False
        for master in self.masters.gone:
            self.bus.emit(IncidentForgotten(MASTER_GONE, master))
        if self.dead_letters.on:
            self.bus.emit(IncidentForgotten(DEAD_LETTERS, self.settings.dlq_topic))
        self.masters.reset()
        self.dead_letters.reset()
        self._dead_lettered = None

    def report(self) -> dict[str, Any]:
        return {
            "worker_deaths": self.dying.within(time.monotonic()),
            "workers_dying": self.dying.on,
            "masters_gone": sorted(self.masters.gone),
            "dead_letters_rising": self.dead_letters.on,
        }
