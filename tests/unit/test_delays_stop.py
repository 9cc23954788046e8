"""The delay heap's fire retries end when the master stops.

Mongo here is a real client pointed at a port nothing listens on, so every fire
fails the way an unreachable server makes it fail; no server is needed.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from master.delays import DelayedTasks
from sendscript import connect
from sendscript.dev.embedded import free_port
from sendscript.models import Task, utcnow
from sendscript.settings import Settings
from sendscript.store import TaskStore


def unreachable() -> Settings:
    return Settings(redis_url=None, mongo_url=f"mongodb://127.0.0.1:{free_port()}/t",
                    mongo_timeout_s=0.2, master_id="m-stop")


async def no_dead_masters() -> list[str]:
    return []


async def firing_of(delayed: DelayedTasks) -> asyncio.Task[None]:
    """The fire the due task started (it fails, and retries while nothing stops it)."""
    for _ in range(500):
        if delayed._firing is not None:
            return delayed._firing
        await asyncio.sleep(0.01)
    raise AssertionError("the due task was never fired")


async def test_a_fire_that_keeps_failing_ends_on_stop() -> None:
    settings = unreachable()
    client = connect.mongo_async(settings)
    fired: list[Task] = []
    delayed = DelayedTasks(settings, TaskStore(connect.database(client)), no_dead_masters,
                           fired.extend)
    try:
        delayed.hold("due-now", utcnow() - timedelta(seconds=1))
        firing = await firing_of(delayed)
        delayed.stop()
        # Before, it retried forever: this waited until the timeout.
        await asyncio.wait_for(firing, 30)
        assert fired == [] and delayed.fired == 0
        assert len(delayed.heap) == 0
    finally:
        await client.close()


async def test_a_fire_that_keeps_failing_ends_when_run_is_stopped() -> None:
    settings = unreachable()
    client = connect.mongo_async(settings)
    delayed = DelayedTasks(settings, TaskStore(connect.database(client)), no_dead_masters,
                           lambda tasks: None)
    stop = asyncio.Event()
    runner = asyncio.create_task(delayed.run(stop))  # its loads fail too
    try:
        delayed.hold("due-now", utcnow() - timedelta(seconds=1))
        firing = await firing_of(delayed)
        stop.set()
        await asyncio.wait_for(runner, 30)
        await asyncio.wait_for(firing, 30)
        assert delayed.fired == 0
    finally:
        runner.cancel()
        await client.close()
