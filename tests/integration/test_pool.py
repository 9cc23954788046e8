"""The worker pool with real spawned processes: a worker that keeps dying, hung workers
(a stopped process, a send that never returns), a stop while a send hangs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection
from typing import Any

import pytest
from loguru import logger
from pymongo.asynchronous.database import AsyncDatabase

from master.bus import Bus
from master.events import WorkerLost
from master.pool import WorkerPool
from sendscript.ipc import TaskHandle
from sendscript.models import Task, new_id
from sendscript.settings import Settings
from sendscript.store import RECORDS, TASKS


def die_at_once(worker_id: int, conn: Connection, settings_data: dict[str, Any]) -> None:
    """A worker entry point that crashes before it is online."""
    raise SystemExit(3)


async def test_a_worker_that_keeps_dying_is_restarted_with_growing_waits(
    settings: Settings,
) -> None:
    lines: list[str] = []
    starts: list[float] = []  # when each worker was spawned
    third_wait = asyncio.Event()

    def sink(message: str) -> None:
        lines.append(message)
        if "next start in 2.0s" in message:
            third_wait.set()

    sink_id = logger.add(sink, level="ERROR", format="{message}")
    pool = WorkerPool(settings.model_copy(update={"workers": 1,
                                                  "worker_restart_backoff_max_s": 8.0}),
                      Bus(), target=die_at_once)
    spawn = pool.spawn

    def timed_spawn() -> Any:
        starts.append(asyncio.get_running_loop().time())
        return spawn()

    pool.spawn = timed_spawn  # type: ignore[method-assign]
    try:
        pool.start()
        # Three deaths in a row: the third restart is announced after waits of 0.5 and 1 s.
        await asyncio.wait_for(third_wait.wait(), 60)
        spawned = pool._next_id
    finally:
        await pool.stop(2.0)
        logger.remove(sink_id)
    # One start per death, each after the announced, doubling wait: a few starts, not a spin.
    assert spawned == 3 and len(starts) == 3, (spawned, lines)
    loud = [line for line in lines if "keep dying" in line]
    waits = [line.rsplit("next start in ", 1)[1].strip() for line in loud]
    assert waits == ["0.5s", "1.0s", "2.0s"], lines
    gaps = [starts[1] - starts[0], starts[2] - starts[1]]
    assert gaps[0] >= 0.5 and gaps[1] >= 1.0, gaps
    assert all("died (exit code 3)" in line or "keep dying" in line for line in lines)


# -- hung workers: real worker processes on the real servers --------------------------------------
class Trickle:
    """A central-control that reads each request and then answers it one byte at a
    time, forever: no read ever waits long enough for the read timeout, so the
    worker's send never returns."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()
        self.url = ""
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            self.requests.append(json.loads(await reader.readexactly(length)))
            self.arrived.set()
            writer.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            while True:
                await writer.drain()
                await asyncio.sleep(0.2)
                writer.write(b"z")
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()


@pytest.fixture
async def trickle() -> AsyncIterator[Trickle]:
    server = Trickle()
    await server.start()
    yield server
    await server.stop()


class Lost:
    """What the pool hands back as lost, as the master would receive it."""

    def __init__(self) -> None:
        self.handles: list[TaskHandle] = []
        self.workers: list[str] = []
        self.event = asyncio.Event()

    def __call__(self, event: WorkerLost) -> None:
        self.workers.append(event.worker)
        self.handles += event.handles
        self.event.set()


async def until(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Wait on the test's own loop (the pool runs on it) until `predicate` holds."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        await asyncio.sleep(0.05)
    return value


async def stored_handle(db: AsyncDatabase, device: str) -> TaskHandle:
    task = Task(_id=new_id(), device_id=device, script={"id": "tap"}, timeout_s=30)
    await db[TASKS].insert_one(task.to_doc())
    return TaskHandle(task_id=task.id, device_id=device, attempt=0, max_retries=3,
                      timeout_s=30, priority=5, queue="default", script=task.script)


def pool_of_one(settings: Settings, lost: Lost, **changes: Any) -> WorkerPool:
    bus = Bus()
    bus.subscribe(WorkerLost, lost)
    return WorkerPool(settings.model_copy(update={"workers": 1, **changes}), bus)


def errors_logged() -> tuple[list[str], int]:
    lines: list[str] = []
    return lines, logger.add(lines.append, level="WARNING", format="{message}")


async def test_a_stopped_worker_is_killed_and_its_tasks_handed_back(
    settings: Settings, db: AsyncDatabase, trickle: Trickle,
) -> None:
    """SIGSTOP: the worker's loop cannot run, its heartbeat stops; the watchdog kills
    it, the task it was handed comes back as lost, and a new worker takes its place."""
    lines, sink = errors_logged()
    lost = Lost()
    pool = pool_of_one(settings, lost, central_url=trickle.url, worker_timeout_s=2.0)
    try:
        pool.start()
        [slot] = await until(pool.online, 60, "the worker online")
        os.kill(slot.process.pid, signal.SIGSTOP)
        handle = await stored_handle(db, "dev-stopped")
        assert pool.dispatch(slot, handle)
        await asyncio.wait_for(lost.event.wait(), 30)
        [fresh] = await until(pool.online, 60, "a new worker online")
    finally:
        await pool.stop(5.0)
        logger.remove(sink)
    assert lost.workers == [slot.name] and lost.handles == [handle]
    assert fresh.process.pid != slot.process.pid and slot.process.exitcode == -signal.SIGKILL
    [hung] = [line for line in lines if "is hung" in line]
    assert hung.startswith(f"worker {slot.name} is hung: no heartbeat for ")
    assert "(limit 2s)" in hung and "killing it (SIGKILL)" in hung
    assert f"It held 1 task(s): {handle.task_id} (device dev-stopped, attempt 0)" in hung
    assert pool.killed_hung == 1
    # It never ran: the task is as it was, for the master to dispatch again.
    task = await db[TASKS].find_one({"_id": handle.task_id})
    assert task is not None and task["status"] == "pending" and task["attempt"] == 0
    assert trickle.requests == []


async def test_a_send_that_never_returns_gets_its_worker_killed(
    settings: Settings, db: AsyncDatabase, trickle: Trickle,
) -> None:
    """The worker's loop runs (heartbeats go on) but its send never returns: the age
    of the task it holds gives it away. The task was claimed and may have been sent,
    so it comes back running with its record: the master's dead-worker recovery and
    the device lock decide what is next, exactly as for a worker that died mid-send."""
    lines, sink = errors_logged()
    lost = Lost()
    short = {"central_url": trickle.url, "worker_timeout_s": 2.0, "redis_timeout_s": 0.5,
             "mongo_timeout_s": 2.0, "central_connect_timeout_s": 0.5, "central_timeout_s": 1.0}
    pool = pool_of_one(settings, lost, **short)
    limit = pool.limits.task_s
    try:
        pool.start()
        [slot] = await until(pool.online, 60, "the worker online")
        handle = await stored_handle(db, "dev-trickle")
        assert pool.dispatch(slot, handle)
        await asyncio.wait_for(trickle.arrived.wait(), 30)
        await asyncio.wait_for(lost.event.wait(), limit + 30)
    finally:
        await pool.stop(5.0)
        logger.remove(sink)
    assert lost.handles == [handle] and slot.process.exitcode == -signal.SIGKILL
    [hung] = [line for line in lines if "is hung" in line]
    assert f"task {handle.task_id} in its hands for " in hung
    assert f"(limit {limit:g}s): a step that never returns" in hung
    assert [r["taskId"] for r in trickle.requests] == [handle.task_id]
    task = await db[TASKS].find_one({"_id": handle.task_id})
    assert task is not None and task["status"] == "running" and task["attempt"] == 1
    [rec] = [d async for d in db[RECORDS].find({"task_id": handle.task_id})]
    assert rec["status"] == "running" and rec["_id"] == trickle.requests[0]["recordId"]


async def test_a_worker_stopping_while_its_send_hangs_exits_within_the_grace(
    settings: Settings, db: AsyncDatabase, trickle: Trickle,
) -> None:
    """Asked to stop while central-control never answers (and the task limit is far
    off), the worker gives up waiting before the master's grace ends and exits by
    itself; the task it held is handed back as lost."""
    lines, sink = errors_logged()
    lost = Lost()
    grace = 12.0
    pool = pool_of_one(settings, lost, central_url=trickle.url, shutdown_grace_s=grace,
                       redis_timeout_s=1.0)
    try:
        pool.start()
        [slot] = await until(pool.online, 60, "the worker online")
        handle = await stored_handle(db, "dev-stop")
        assert pool.dispatch(slot, handle)
        await asyncio.wait_for(trickle.arrived.wait(), 30)
        assert pool.limits.task_s > 3 * grace, "the watchdog stays out of it"
        await pool.stop(grace)
    finally:
        logger.remove(sink)
    assert not any("outlived the grace period" in line for line in lines), lines
    assert slot.process.exitcode == 0 and slot.exited.is_set()
    assert lost.handles == [handle]
