"""Intake under backpressure on real Redis and Mongo: while throttled it still takes back
its own processing list and still stops; nothing leaves the ready list until the low
mark; the first take after reopening brings only what fits below the high mark."""

from __future__ import annotations

import asyncio
import json

import redis.asyncio
from pymongo.asynchronous.database import AsyncDatabase

from master.backpressure import Backpressure
from master.bus import Bus
from master.events import TasksWithdrawn
from master.intake import Intake
from sendscript.models import Task
from sendscript.queue import IntakeQueue
from sendscript.settings import Settings
from sendscript.store import GROUPS, TaskStore

HIGH, LOW, BATCH = 10, 4, 50


class Board:
    def __init__(self) -> None:
        self.calls: list[list[Task]] = []
        self.gone = 0  # tasks the test says were dispatched meanwhile

    def __call__(self, tasks: list[Task]) -> None:
        self.calls.append(list(tasks))

    def held(self) -> int:
        return sum(map(len, self.calls)) - self.gone


class Watched:
    """The real throttle, telling the test when intake waits on it while closed."""

    def __init__(self, inner: Backpressure) -> None:
        self.inner = inner
        self.blocked = asyncio.Event()

    async def wait_open(self, stop: asyncio.Event) -> bool:
        self.inner.update()
        if not self.inner.open.is_set():
            self.blocked.set()
        return await self.inner.wait_open(stop)

    def room(self, batch: int) -> int:
        return self.inner.room(batch)


def spec(n: int) -> bytes:
    return json.dumps({"device_id": f"d{n}", "script": {"id": "tap"}}).encode()


async def nothing(*_: object) -> None:
    return None


async def test_throttled_intake_takes_back_its_processing_list_waits_and_stops(
    settings: Settings, redis_client: redis.asyncio.Redis, db: AsyncDatabase
) -> None:
    settings = settings.model_copy(update={"high_water": HIGH, "low_water": LOW,
                                           "intake_batch": BATCH})
    bus, board = Bus(), Board()
    backpressure = Backpressure(settings, bus, board.held)
    bus.attach(backpressure)
    throttle = Watched(backpressure)
    queue = IntakeQueue(redis_client, settings.keys, settings.master_id)
    intake = Intake(settings, queue, TaskStore(db), db[GROUPS], board, nothing, nothing,
                    throttles=[throttle])
    ready = settings.keys.ready
    # A crash left one item in processing, and the master already holds its high water.
    await redis_client.lpush(ready, spec(0))
    assert len(await queue.take(1)) == 1
    board.gone = -HIGH
    await redis_client.lpush(ready, *[spec(n) for n in range(1, 31)])

    stop = asyncio.Event()
    run = asyncio.create_task(intake.run(stop))
    try:
        await asyncio.wait_for(throttle.blocked.wait(), 10)
        # The leftover was taken back first, throttled or not; the ready list is untouched.
        assert [t.device_id for call in board.calls for t in call] == ["d0"]
        assert await redis_client.llen(ready) == 30
        assert backpressure.report()["state"] == "throttled"

        # Dispatch brings the count down to the low mark: intake takes what fits below
        # the high mark (6 of a 50-item batch), then waits again.
        throttle.blocked.clear()
        board.gone = sum(map(len, board.calls)) - LOW
        bus.emit(TasksWithdrawn([], "dispatched, as far as this test goes"))
        await asyncio.wait_for(throttle.blocked.wait(), 10)
        assert [len(call) for call in board.calls] == [1, HIGH - LOW]
        assert await redis_client.llen(ready) == 30 - (HIGH - LOW)
        assert board.held() == HIGH

        stop.set()  # throttled, it still notices the stop
        await asyncio.wait_for(run, 5)
    finally:
        stop.set()
        if not run.done():
            run.cancel()
    assert await redis_client.llen(settings.keys.processing(settings.master_id)) == 0
    assert await redis_client.llen(ready) == 30 - (HIGH - LOW)  # left for other masters
    assert backpressure.marks.closings == 2

