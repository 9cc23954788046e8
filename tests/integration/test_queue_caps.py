"""Queue caps across two masters on the real Redis: the slots of a capped queue are
shared (never more than the cap granted in all), go back on an answer, a freed
device or a withdrawal, and a dead master's lapse while a live one's are renewed."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio

from master.bus import Bus, Go, Hold
from master.events import DeviceFreed, TaskAnswered, TasksWithdrawn, WakeRequested
from master.queue_caps import QueueCaps
from sendscript.ipc import TaskDone
from sendscript.models import Task, utcnow
from sendscript.settings import Settings


def task(n: int, queue: str = "vip") -> Task:
    return Task.model_validate({"_id": f"t{n}", "device_id": f"d{n}", "script": {"id": "s"},
                                "queue": queue})


def answered(t: Task, outcome: str, fence: int | None = None) -> TaskAnswered:
    done = TaskDone(task_id=t.id, device_id=t.device_id, outcome=outcome, attempt=1,  # type: ignore[arg-type]
                    fence=fence)
    return TaskAnswered(t, done, "w0", 0.0, 0.0)


class Master:
    """One master's cap part on its own bus, as master/app.py wires it."""

    def __init__(self, settings: Settings, client: redis.asyncio.Redis) -> None:
        self.bus = Bus()
        self.caps = QueueCaps(settings, self.bus, client)
        self.bus.attach(self.caps)
        assert self.caps.gate is not None
        self.bus.add_gate(self.caps.gate)
        self.woken: list[str] = []
        self.bus.subscribe(WakeRequested, lambda e: self.woken.extend(e.device_ids))

    async def ask(self, *tasks: Task) -> list[bool]:
        """Admit each; reserve for those held (one script call): which may go now."""
        first = [self.bus.admit(t, utcnow()) for t in tasks]
        await self.caps.sync()
        return [isinstance(v, Go) or t.id in self.caps.granted
                for t, v in zip(tasks, first, strict=True)]


async def test_two_masters_share_a_queue_cap(settings: Settings,
                                             redis_client: redis.asyncio.Redis) -> None:
    settings = settings.model_copy(update={"queues": {"vip": 2}})
    a, b = Master(settings, redis_client), Master(settings, redis_client)
    ta = [task(n) for n in range(3)]
    tb = [task(n) for n in range(3, 6)]
    assert await a.ask(*ta) == [True, True, False]
    assert a.woken == ["d0", "d1"]  # granted: their devices are woken at once
    assert await b.ask(*tb) == [False, False, False]  # the cap holds across masters
    assert isinstance(b.bus.admit(task(9, "other"), utcnow()), Go)  # uncapped queue

    a.bus.emit(answered(ta[0], "failed"))  # answered: its slot goes back
    await a.caps.sync()
    assert await b.ask(tb[0]) == [True]
    assert await b.ask(tb[1]) == [False]

    a.bus.emit(answered(ta[1], "sent", fence=7))  # sent: held until the device is freed
    await a.caps.sync()
    assert await b.ask(tb[1]) == [False]
    a.bus.emit(DeviceFreed("d1", 6, "event"))  # an older fence frees nothing
    await a.caps.sync()
    assert await b.ask(tb[1]) == [False]
    a.bus.emit(DeviceFreed("d1", 7, "event"))
    await a.caps.sync()
    assert await b.ask(tb[1]) == [True]

    b.bus.emit(TasksWithdrawn([tb[0]], "expired"))
    await b.caps.sync()
    assert sorted(await a.caps.slots.holders("vip")) == ["t4"]
    assert isinstance(b.bus.admit(tb[1], utcnow()), Go)  # a slot is kept until answered


async def test_a_dead_masters_slots_lapse_a_live_ones_are_renewed(
        settings: Settings, redis_client: redis.asyncio.Redis) -> None:
    settings = settings.model_copy(update={"queues": {"vip": 1}, "heartbeat_ttl_s": 1.0,
                                           "heartbeat_interval_s": 0.2})
    live, dead, other = (Master(settings, redis_client) for _ in range(3))
    assert await live.ask(task(1)) == [True]
    stop = asyncio.Event()
    renewing = asyncio.create_task(live.caps.run(stop))
    try:
        deadline = time.monotonic() + 2.0  # twice the slots' lifetime
        while time.monotonic() < deadline:
            assert await other.ask(task(2)) == [False]  # renewed: never lapses
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        await renewing  # a stopping master gives its slots back
    assert await other.ask(task(2)) == [True]

    assert await dead.ask(task(3, "vip")) == [False]  # `other` holds the one slot
    # `other` dies (no renewal, no release): its slot lapses after the TTL.
    deadline = time.monotonic() + 5.0
    while not await dead.ask(task(3)) == [True]:
        assert time.monotonic() < deadline, "a dead master's slot never lapsed"
        await asyncio.sleep(0.2)
    assert await dead.caps.slots.holders("vip") == ["t3"]
    assert isinstance(other.bus.admit(task(4), utcnow()), Hold)
