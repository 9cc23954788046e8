"""Queue caps across masters: a gate that lets a capped queue's task go only with a
slot reserved in Redis.

SENDSCRIPT_QUEUES caps how many of a queue's tasks hold devices at once (dispatched,
or sent and not yet freed), counted over every master. Each capped queue has a
sorted set `{prefix}:queue:cap:{queue}` (`Keys.queue_cap`) of task ids scored by
their expiry in Redis server time. The gate never calls Redis: a task without a slot
is held (no attempt used) and noted; the loop reserves slots for every noted task in
one script call, then wakes the devices of the tasks it got one for. A slot goes
back when its task is answered with anything but `sent`, when the device of a sent
one is freed, when its worker is lost or it is withdrawn. The loop renews this
master's slots every heartbeat interval; a dead master's lapse after
SENDSCRIPT_HEARTBEAT_TTL_S, so its share is not held for ever (its tasks still
running on devices then count no more).

Each master's board also parks a queue's tasks at the cap locally (`DeviceBoard`),
which spares Redis the asks of a master that alone fills the cap.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

import redis.asyncio

from master.bus import GO, Bus, Hold, Subscription, Verdict
from master.events import (
    DeviceFreed,
    MasterStopping,
    TaskAnswered,
    TasksWithdrawn,
    WakeRequested,
    WorkerLost,
)
from sendscript.backoff import Backoff
from sendscript.models import Task
from sendscript.settings import Settings

HOLD_S = 0.5  # a task without a slot asks again this soon (a grant wakes it sooner)

# KEYS one sorted set per queue; ARGV[1] the slots' lifetime (ms), then per key: the
# queue's cap, n, and n task ids. Drops lapsed slots, then grants each id a slot while
# the queue has fewer than its cap (an id holding one already keeps it, renewed).
# Returns the ids granted.
RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = now + tonumber(ARGV[1])
local out = {}
local a = 2
for i = 1, #KEYS do
  local cap = tonumber(ARGV[a])
  local n = tonumber(ARGV[a + 1])
  a = a + 2
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  for j = 1, n do
    local id = ARGV[a]
    a = a + 1
    if redis.call('ZSCORE', KEYS[i], id) or redis.call('ZCARD', KEYS[i]) < cap then
      redis.call('ZADD', KEYS[i], expiry, id)
      out[#out + 1] = id
    end
  end
end
return out
"""

# KEYS one sorted set per queue; ARGV[1] lifetime (ms), then per key: n, n task ids.
# Pushes back the expiry of the slots these ids still hold (none is added).
RENEW = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local a = 2
for i = 1, #KEYS do
  local n = tonumber(ARGV[a])
  for j = 1, n do
    redis.call('ZADD', KEYS[i], 'XX', expiry, ARGV[a + j])
  end
  a = a + n + 1
end
return 1
"""


class QueueSlots:
    """The Redis side: reserve, renew and release slots, one call each."""

    def __init__(self, client: redis.asyncio.Redis, settings: Settings) -> None:
        self._redis = client
        self._keys = settings.keys
        self._caps = settings.queues
        self._ttl_ms = int(settings.heartbeat_ttl_s * 1000)
        self._reserve = client.register_script(RESERVE)
        self._renew = client.register_script(RENEW)

    async def reserve(self, wanted: dict[str, list[str]]) -> list[str]:
        keys, args = [], [self._ttl_ms]
        for queue, ids in wanted.items():
            keys.append(self._keys.queue_cap(queue))
            args += [self._caps[queue], len(ids), *ids]
        got = await self._reserve(keys=keys, args=args) if keys else []
        return [g.decode() if isinstance(g, bytes) else str(g) for g in got]

    async def renew(self, held: dict[str, list[str]]) -> None:
        keys, args = [], [self._ttl_ms]
        for queue, ids in held.items():
            keys.append(self._keys.queue_cap(queue))
            args += [len(ids), *ids]
        if keys:
            await self._renew(keys=keys, args=args)

    async def release(self, slots: dict[str, list[str]]) -> None:
        if not slots:
            return
        pipe = self._redis.pipeline(transaction=False)
        for queue, ids in slots.items():
            pipe.zrem(self._keys.queue_cap(queue), *ids)
        await pipe.execute()

    async def holders(self, queue: str) -> list[str]:
        """Task ids holding a slot of `queue` now, lapsed ones included (tests, reports)."""
        return [m.decode() for m in await self._redis.zrange(self._keys.queue_cap(queue), 0, -1)]


def by_queue(items: dict[str, str]) -> dict[str, list[str]]:
    """task id -> queue, as queue -> task ids."""
    out: dict[str, list[str]] = {}
    for task_id, queue in items.items():
        out.setdefault(queue, []).append(task_id)
    return out


class QueueCaps:
    """The gate, the answers and frees that give slots back, and the loop."""

    def __init__(self, settings: Settings, bus: Bus, client: redis.asyncio.Redis) -> None:
        self.settings = settings
        self.bus = bus
        self.caps = dict(settings.queues)
        self.slots = QueueSlots(client, settings)
        self.granted: dict[str, str] = {}  # task id -> queue: slots this master holds
        self.wanted: dict[str, tuple[str, str]] = {}  # task id -> (queue, device) held
        self.returning: dict[str, str] = {}  # task id -> queue: slots to give back
        self.sent_on: dict[str, tuple[str, int]] = {}  # device -> (task id, fence)
        self.freed: dict[str, int] = {}  # device -> newest fence announced free
        self.held = 0  # hold verdicts in all (report)
        self.reservations = 0
        self._wake = asyncio.Event()
        self.gate: QueueCaps | None = self if self.caps else None  # no cap, no gate

    def subscriptions(self) -> list[Subscription]:
        if not self.caps:
            return []
        return [(TaskAnswered, self._on_answered), (DeviceFreed, self._on_freed),
                (WorkerLost, self._on_lost), (TasksWithdrawn, self._on_withdrawn),
                (MasterStopping, lambda _: self._wake.set())]

    # -- the gate ------------------------------------------------------------------------
    def admit(self, task: Task, now: datetime) -> Verdict:
        queue = task.queue
        if queue not in self.caps or task.id in self.granted:
            return GO
        self.held += 1
        self.wanted[task.id] = (queue, task.device_id)
        self._wake.set()
        return Hold(f"queue cap {queue}", HOLD_S)

    # -- slots given back ----------------------------------------------------------------
    def _give_back(self, task_id: str) -> None:
        queue = self.granted.pop(task_id, None)
        if queue is not None:
            self.returning[task_id] = queue
            self._wake.set()

    def _on_answered(self, event: TaskAnswered) -> None:
        task = event.task
        if task.id not in self.granted:
            return
        fence = event.answer.fence or 0
        # Sent: the device runs it until it is freed (which may have been announced
        # before the worker's answer came).
        if event.answer.outcome == "sent" and self.freed.get(task.device_id, 0) < fence:
            self.sent_on[task.device_id] = (task.id, fence)
        else:
            self._give_back(task.id)

    def _on_freed(self, event: DeviceFreed) -> None:
        if event.fence is not None:
            self.freed[event.device_id] = max(self.freed.get(event.device_id, 0), event.fence)
        held = self.sent_on.get(event.device_id)
        if held is not None and (event.fence is None or event.fence >= held[1]):
            del self.sent_on[event.device_id]
            self._give_back(held[0])

    def _on_lost(self, event: WorkerLost) -> None:
        for handle in event.handles:
            self._give_back(handle.task_id)

    def _on_withdrawn(self, event: TasksWithdrawn) -> None:
        for task in event.tasks:
            self.wanted.pop(task.id, None)
            self._give_back(task.id)

    # -- the loop --------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        if not self.caps:
            return
        backoff = Backoff(base_s=0.2, cap_s=5.0)
        renew_s = self.settings.heartbeat_interval_s
        renewed_at = time.monotonic()
        while not stop.is_set():
            self._wake.clear()
            try:
                await self.sync(renew=time.monotonic() - renewed_at >= renew_s)
                backoff.succeeded("queue caps")
            except Exception as exc:
                await backoff.failed("queue caps", exc, stop)
                continue
            if time.monotonic() - renewed_at >= renew_s:
                renewed_at = time.monotonic()
            try:
                await asyncio.wait_for(self._wake.wait(), renew_s)
            except TimeoutError:
                pass
        await self._release_all()

    async def sync(self, renew: bool = False) -> None:
        """Give back, reserve for the held tasks and wake their devices, renew."""
        timeout = self.settings.redis_timeout_s
        returning, self.returning = self.returning, {}
        try:
            await asyncio.wait_for(self.slots.release(by_queue(returning)), timeout)
        except Exception:
            self.returning.update(returning)  # given back on the next pass
            raise
        wanted, self.wanted = self.wanted, {}
        if wanted:
            got = await asyncio.wait_for(
                self.slots.reserve(by_queue({t: q for t, (q, _) in wanted.items()})), timeout)
            self.reservations += 1
            for task_id in got:
                self.granted[task_id] = wanted[task_id][0]
            if got:
                self.bus.emit(WakeRequested([wanted[t][1] for t in got]))
        if renew:
            await asyncio.wait_for(self.slots.renew(by_queue(self.granted)), timeout)

    async def _release_all(self) -> None:
        """A stopping master's slots, for the others (best effort: else they lapse)."""
        for task_id in list(self.granted):
            self._give_back(task_id)
        try:
            await asyncio.wait_for(self.slots.release(by_queue(self.returning)),
                                   self.settings.redis_timeout_s)
        except Exception:
            pass

    def report(self) -> dict[str, Any]:
        return {"caps": self.caps, "slots_held": len(self.granted), "held": self.held,
                "reservations": self.reservations}
