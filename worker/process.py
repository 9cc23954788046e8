"""The worker process: reads TaskHandles from its pipe, runs them, answers TaskDone.

Started by the master with the `spawn` context; opens its own connections. It
stops when the master says so, when its pipe closes (the master died), or on
SIGTERM, and finishes the tasks it holds first, for as long as the master's
shutdown grace allows (a server being down must not keep it past the grace: what
it still holds then is recovered by the master as a dead worker's). Its event
loop sends a heartbeat on the pipe: a worker whose loop cannot run is found hung.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from multiprocessing.connection import Connection
from typing import Any

import psutil
from loguru import logger

from sendscript import connect, roundtrips, runtime, tracing
from sendscript.backoff import OutageLog
from sendscript.ipc import (
    Shutdown,
    TaskDone,
    TaskHandle,
    TaskLocked,
    WorkerExit,
    WorkerHeartbeat,
    WorkerOnline,
    WorkerRetiring,
    heartbeat_interval_s,
)
from sendscript.settings import Settings
from worker.central import CentralClient
from worker.handler import ScriptHandler

CLOSE_S = 2.0  # each client's close, bounded: a server that is down must not hold the exit


def main(worker_id: int, conn: Connection, settings_data: dict[str, Any]) -> None:
    """Process entry point (the target the master spawns)."""
    # Ctrl-C reaches the whole process group; only the master decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = Settings(**settings_data)
    runtime.setup(settings, f"worker-{worker_id}")
    try:
        asyncio.run(WorkerProcess(worker_id, conn, settings).run())
    except Exception:
        logger.exception("worker crashed")
        raise SystemExit(1) from None
    finally:
        tracing.shutdown()


class WorkerProcess:
    def __init__(self, worker_id: int, conn: Connection, settings: Settings) -> None:
        self.worker_id = worker_id
        self.conn = conn
        self.settings = settings
        self.name = f"{settings.master_id}/w{worker_id}:{os.getpid()}"
        self.inflight: set[asyncio.Task[None]] = set()
        self.stopping = asyncio.Event()
        self.exit_reason = "shutdown"
        self.handler: ScriptHandler | None = None
        self.handled = 0
        self.retiring = False
        self.outage = OutageLog("worker: redis/mongo")
        self.unreachable = OutageLog("worker: central-control unreachable")
        self._memory_checked = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        redis_client = connect.redis_async(self.settings)
        mongo = connect.mongo_async(self.settings)
        central = CentralClient(
            self.settings.central_url or "",
            connect_timeout_s=self.settings.central_connect_timeout_s,
            timeout_s=self.settings.central_timeout_s,
            max_connections=self.settings.worker_concurrency,
        )
        self.handler = ScriptHandler(
            redis_client=redis_client, db=connect.database(mongo), central=central,
            settings=self.settings, worker_name=self.name, on_locked=self._on_locked,
        )
        loop.add_signal_handler(signal.SIGTERM, self._stop, "SIGTERM")
        loop.add_reader(self.conn.fileno(), self._on_readable)
        self._send(WorkerOnline(worker_id=self.worker_id, pid=os.getpid()))
        logger.info("worker {} online", self.name)
        beats = asyncio.create_task(self._heartbeats())
        flusher = asyncio.create_task(self._flush_counters(redis_client))
        try:
            await self.stopping.wait()
            loop.remove_reader(self.conn.fileno())
            await self._drain()
        finally:
            flusher.cancel()
            await self._flush_once(redis_client)
            self._send(WorkerExit(worker_id=self.worker_id, pid=os.getpid(),
                                  reason=self.exit_reason, exitcode=0))
            for what, close in (("central-control", central.aclose), ("redis", redis_client.aclose),
                                ("mongo", mongo.close)):
                try:
                    await asyncio.wait_for(close(), CLOSE_S)
                except Exception as exc:
                    logger.warning("worker {}: {} client not closed: {!r}", self.name, what, exc)
            beats.cancel()
        logger.info("worker {} exits ({})", self.name, self.exit_reason)

    def drain_limit_s(self) -> float:
        """How long the tasks held at stop may take: what is left of the master's
        grace once the counters are flushed and the clients closed."""
        s = self.settings
        return max(0.0, s.shutdown_grace_s - s.redis_timeout_s - 3 * CLOSE_S - 1.0)

    async def _drain(self) -> None:
        if not self.inflight:
            return
        _, late = await asyncio.wait(self.inflight, timeout=self.drain_limit_s())
        if not late:
            return
        # No answer goes out for these: the master recovers them when we exit, as
        # it recovers a dead worker's tasks (whatever step each had reached).
        logger.warning("worker {}: {} task(s) still running at the end of the shutdown grace; "
                       "leaving them to the master's recovery", self.name, len(late))
        for task in late:
            task.cancel()
        await asyncio.wait(late, timeout=CLOSE_S)

    async def _heartbeats(self) -> None:
        interval = heartbeat_interval_s(self.settings.worker_timeout_s)
        beat = WorkerHeartbeat(worker_id=self.worker_id)
        while True:
            self._send(beat)
            await asyncio.sleep(interval)

    def _on_locked(self, task_id: str, fence: int) -> None:
        self._send(TaskLocked(task_id=task_id, fence=fence))

    def _stop(self, reason: str) -> None:
        if not self.stopping.is_set():
            self.exit_reason = reason
            self.stopping.set()

    def _on_readable(self) -> None:
        try:
            while self.conn.poll():
                self._on_message(self.conn.recv())
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(self.conn.fileno())
            self._stop("master gone")

    def _on_message(self, msg: object) -> None:
        if isinstance(msg, TaskHandle):
            task = asyncio.create_task(self._run_one(msg))
            self.inflight.add(task)
            task.add_done_callback(self.inflight.discard)
        elif isinstance(msg, Shutdown):
            self._stop(msg.reason)
        else:
            logger.error("unexpected message from master: {!r}", msg)

    async def _run_one(self, handle: TaskHandle) -> None:
        assert self.handler is not None
        try:
            done = await self.handler.handle(handle)
        except Exception as exc:  # a bug must not take the worker down with it
            logger.exception("task {} raised", handle.task_id)
            done = TaskDone(task_id=handle.task_id, device_id=handle.device_id,
                            outcome="error", attempt=handle.attempt, error=repr(exc))
        if done.outcome == "error":  # a server is away: say so once, not per task
            self.outage.failed(done.error)
        elif done.outcome == "unsent":  # Redis and Mongo answered; central-control did not
            self.outage.ok()
            self.unreachable.failed(done.error)
        else:
            self.outage.ok()
            if done.outcome in ("sent", "failed", "retry"):
                self.unreachable.ok()
            if done.outcome in ("failed", "retry"):
                logger.info("task {} on {}: {} ({})", done.task_id, done.device_id,
                            done.outcome, done.error)
        self._send(done)
        self.handled += 1
        limit = self.settings.worker_max_tasks
        if limit and self.handled >= limit:
            self._retire(f"handled {self.handled} tasks (max {limit})")
        self._check_memory()

    def _retire(self, reason: str) -> None:
        """Ask to be replaced; the master stops sending tasks and tells us to stop."""
        if not self.retiring:
            self.retiring = True
            logger.info("worker {} retiring: {}", self.name, reason)
            self._send(WorkerRetiring(worker_id=self.worker_id, reason=reason))

    def _check_memory(self) -> None:
        """After a task, at most once a second: over the memory limit, retire."""
        limit_mb = self.settings.worker_max_memory_mb
        now = time.monotonic()
        if not limit_mb or self.retiring or now - self._memory_checked < 1.0:
            return
        self._memory_checked = now
        rss_mb = psutil.Process().memory_info().rss / 2**20
        if rss_mb > limit_mb:
            self._retire(f"memory {rss_mb:.0f} MB over {limit_mb:g} MB")

    def _send(self, msg: object) -> None:
        try:
            self.conn.send(msg)
        except (BrokenPipeError, OSError):
            self._stop("master gone")

    async def _flush_counters(self, client: Any) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            await self._flush_once(client)

    async def _flush_once(self, client: Any) -> None:
        try:
            await roundtrips.flush(client, self.settings.keys.roundtrips, "worker")
        except Exception as exc:
            logger.debug("round-trip counters not flushed: {!r}", exc)
