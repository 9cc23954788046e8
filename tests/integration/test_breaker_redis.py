"""The breaker and the drop-rate ladder shared through real Redis by several masters
(each a CircuitBreakerPart / DropRate on a bus of its own, as in two processes)."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio

from master.breaker import CircuitBreakerPart
from master.bus import Bus, Hold
from master.droprate import DropRate, Level, Window
from master.events import Incident, TaskAnswered, TasksWithdrawn
from sendscript import pauses
from sendscript.breaker import Circuit
from sendscript.ipc import TaskDone
from sendscript.models import Task, new_id, utcnow
from sendscript.settings import Settings


class Master:
    def __init__(self, settings: Settings, client: redis.asyncio.Redis) -> None:
        self.bus = Bus()
        self.incidents: list[Incident] = []
        self.bus.subscribe(Incident, self.incidents.append)
        self.breaker = CircuitBreakerPart(settings, self.bus, client, lambda: 0)
        self.drops = DropRate(settings, self.bus, client)  # tells the breaker by event
        self.bus.attach(self.breaker, self.drops)
        self.bus.add_gate(self.breaker.gate)

    def answer(self, ok: bool | None, n: int = 1, outcome: str = "sent") -> None:
        for _ in range(n):
            task = Task(_id=new_id(), device_id="d", script={"id": "tap"})
            done = TaskDone(task_id=task.id, device_id="d", outcome=outcome, attempt=1,
                            central_ok=ok)
            self.bus.emit(TaskAnswered(task, done, "w", 0.0, 0.0))

    def answer_task(self, task: Task, ok: bool | None, outcome: str) -> None:
        done = TaskDone(task_id=task.id, device_id=task.device_id, outcome=outcome,
                        attempt=0, central_ok=ok)
        self.bus.emit(TaskAnswered(task, done, "w", 0.0, 0.0))

    def expire(self, n: int) -> None:
        tasks = [Task(_id=new_id(), device_id=f"d{i}", script={"id": "tap"}) for i in range(n)]
        self.bus.emit(TasksWithdrawn(tasks, "expired"))

    def held(self) -> bool:
        task = Task(_id=new_id(), device_id="dx", script={"id": "tap"})
        return isinstance(self.breaker.gate.admit(task, utcnow()), Hold)


def shared(settings: Settings, **update: object) -> Settings:
    return settings.model_copy(update={"breaker_trip_after": 5, "breaker_min_volume": 1000,
                                       "breaker_pauses_s": (0.3,), **update})


async def test_one_master_opens_the_breaker_and_the_other_sees_it(
    settings: Settings, redis_client: redis.asyncio.Redis,
) -> None:
    s = shared(settings)
    a, b = Master(s, redis_client), Master(s, redis_client)
    await b.breaker.sync()
    a.answer(False, 5)
    await a.breaker.sync()
    assert a.breaker.gate.circuit is Circuit.OPEN and a.held()
    await b.breaker.sync()
    assert b.breaker.gate.circuit is Circuit.OPEN and b.held()
    for m in (a, b):
        assert [(i.kind, i.active) for i in m.incidents] == [("breaker_open", True)]


async def test_concurrent_merges_lose_no_outcome(
    settings: Settings, redis_client: redis.asyncio.Redis,
) -> None:
    s = shared(settings, breaker_trip_after=100)
    masters = [Master(s, redis_client) for _ in range(4)]
    for m in masters:
        m.answer(False, 10)
    await asyncio.gather(*(m.breaker.sync() for m in masters))
    last = await masters[0].breaker.sync()
    assert last.state.streak == 40
    assert sum(b[0] for b in last.state.buckets.values()) == 40
    assert sum(m.breaker.conflicts for m in masters) > 0  # the CAS was exercised


async def test_half_open_lets_exactly_one_probe_through_the_cluster_then_recovers(
    settings: Settings, redis_client: redis.asyncio.Redis,
) -> None:
    s = shared(settings)
    masters = [Master(s, redis_client) for _ in range(3)]
    masters[0].answer(False, 5)
    await masters[0].breaker.sync()

    async def half_open() -> bool:
        await asyncio.gather(*(m.breaker.sync() for m in masters))
        return all(m.breaker.gate.circuit is Circuit.HALF_OPEN for m in masters)

    deadline = time.monotonic() + 5
    while not await half_open():
        assert time.monotonic() < deadline, "the open pause never ended"
        await asyncio.sleep(0.05)
    for m in masters:
        assert m.held()  # each wants a probe
    await asyncio.gather(*(m.breaker.sync() for m in masters))
    assert sorted(m.breaker.gate.permits for m in masters) == [0, 0, 1]
    prober = next(m for m in masters if m.breaker.gate.permits)
    assert not prober.held()  # the probe goes
    prober.answer(True)
    await prober.breaker.sync()
    await asyncio.gather(*(m.breaker.sync() for m in masters))
    assert {m.breaker.gate.circuit for m in masters} == {Circuit.DEGRADED}


async def test_the_drop_window_is_shared_and_counts_result_timeouts_once(
    settings: Settings, redis_client: redis.asyncio.Redis,
) -> None:
    s = settings.model_copy(update={"drop_min_volume": 1000, "drop_window_s": 2})
    a, b = Master(s, redis_client), Master(s, redis_client)
    await a.drops.sync()  # notes the result timeouts so far
    a.answer(True, 10)
    a.expire(1)
    b.answer(None, 9, outcome="sent")
    b.answer(None, 5, outcome="retry")  # not finished: it will be tried again
    b.answer(False, 2, outcome="retry")  # nor a drop, whatever ended the attempt
    b.answer(False, 1, outcome="failed")  # its last attempt ended by a 5xx: dropped
    b.answer(None, 1, outcome="failed")  # refused for good: finished, not dropped
    # Five results lost by the sweep, two of them on their last attempt.
    await redis_client.hincrby(s.keys.stats, "result_timeouts", 5)
    await redis_client.hincrby(s.keys.stats, "result_timeouts_final", 2)
    await asyncio.gather(a.drops.sync(), b.drops.sync())
    await a.drops.sync()
    assert a.drops.window == Window(finished=24, dropped=4, lost_results=5)
    report = a.drops.report()
    assert (report["finished"], report["dropped"], report["lost_results"]) == (24, 4, 5)

    async def pruned() -> bool:
        await a.drops.sync()
        return a.drops.window == Window()

    deadline = time.monotonic() + 6
    while not await pruned():
        assert time.monotonic() < deadline, "old seconds never left the window"
        await asyncio.sleep(0.2)


async def test_lost_results_that_are_retried_climb_no_level(
    settings: Settings, redis_client: redis.asyncio.Redis,
) -> None:
    """An outage's ambiguous sends: 100 of 438 sent tasks time out with attempts left.
    They are lost results, shown as such; no level, no hard stop."""
    s = shared(settings, drop_min_volume=100, drop_window_s=60)
    a = Master(s, redis_client)
    await a.drops.sync()  # notes the counters so far
    a.answer(True, 438)
    await redis_client.hincrby(s.keys.stats, "result_timeouts", 100)
    assert await a.drops.sync() is Level.OK
    assert a.drops.window == Window(finished=438, dropped=0, lost_results=100)
    assert pauses.HARD not in await pauses.load(redis_client, s.keys)
    assert not [i for i in a.incidents if i.kind == "drop_rate"]


async def test_the_ladder_climbs_to_a_hard_stop_and_trips_the_breaker(
    settings: Settings, redis_client: redis.asyncio.Redis,
) -> None:
    s = shared(settings, drop_min_volume=10, breaker_pauses_s=(60.0,))
    a = Master(s, redis_client)
    a.answer(True, 20)
    assert await a.drops.sync() is Level.OK
    a.expire(3)  # 3 of 23: degrade
    assert await a.drops.sync() is Level.DEGRADE
    assert a.breaker.gate.effective() is Circuit.DEGRADED
    a.expire(4)  # 7 of 27: straight past open to the hard stop
    assert await a.drops.sync() is Level.HARD_STOP
    flags = await pauses.load(redis_client, s.keys)
    assert pauses.HARD in flags and "drop rate" in flags[pauses.HARD].reason
    await a.breaker.sync()
    assert a.breaker.gate.circuit is Circuit.OPEN
    assert [(i.kind, i.key, i.active) for i in a.incidents if i.kind == "drop_rate"] == [
        ("drop_rate", "degrade", True), ("drop_rate", "open", True),
        ("drop_rate", "hard_stop", True)]
    await pauses.resume(redis_client, s.keys, pauses.HARD)
    a.expire(1)
    assert await a.drops.sync() is Level.HARD_STOP
    assert pauses.HARD not in await pauses.load(redis_client, s.keys)  # not set again


async def test_a_probe_that_said_nothing_of_central_is_given_back(
    settings: Settings, redis_client: redis.asyncio.Redis,
) -> None:
    s = shared(settings, breaker_probe_timeout_s=600)
    a, b = Master(s, redis_client), Master(s, redis_client)
    a.answer(False, 5)
    await a.breaker.sync()
    deadline = time.monotonic() + 5
    while (await a.breaker.sync()).state.circuit is not Circuit.HALF_OPEN:
        assert time.monotonic() < deadline, "the open pause never ended"
        await asyncio.sleep(0.05)
    assert a.held()
    await a.breaker.sync()
    probe = Task(_id=new_id(), device_id="busy-device", script={"id": "tap"})
    assert not isinstance(a.breaker.gate.admit(probe, utcnow()), Hold)
    await b.breaker.sync()
    assert b.held()  # the one probe is out
    await b.breaker.sync()
    assert b.breaker.gate.permits == 0
    a.answer_task(probe, None, "busy")  # its device was busy: nothing learned
    await a.breaker.sync()
    await b.breaker.sync()
    assert b.breaker.gate.permits == 1  # handed out again at once, not after 600 s
