"""The master process: intake, per-device dispatch over a worker pool, shutdown.

One asyncio loop. Tasks come in through `Intake`, wait on the `DeviceBoard`
until their device is free, and go to the least-loaded worker. Worker answers,
device-free events and the fallback lock check move devices along; every such
change schedules one dispatch pass (`_kick`), never a poll.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from loguru import logger

from master.board import DeviceBoard
from master.delays import DelayedTasks, percentiles
from master.events import DeviceFreeListener, LockChecker
from master.expiry import Expiry
from master.heartbeat import Heartbeat
from master.intake import Intake
from master.pool import WorkerPool, WorkerSlot
from master.recovery import Recovery
from master.scheduler import Scheduler
from master.sweeper import Sweeper
from sendscript import connect
from sendscript.backoff import Backoff
from sendscript.ipc import TaskDone, TaskHandle
from sendscript.locks import DeviceLocks
from sendscript.models import Task, utcnow
from sendscript.queue import Entry, IntakeQueue
from sendscript.settings import Settings
from sendscript.status import TaskStatus, task_cas
from sendscript.store import GROUPS, RecordStore, TaskStore, ensure_indexes

ERROR_COOLDOWN_S = 2.0


def task_handle(task: Task) -> TaskHandle:
    return TaskHandle(
        task_id=task.id, device_id=task.device_id, attempt=task.attempt,
        max_retries=task.max_retries, timeout_s=task.timeout_s, priority=task.priority,
        queue=task.queue, script=task.script, retry_base_s=task.retry_base_s,
    )


class Master:
    def __init__(self, settings: Settings) -> None:
        settings.require("redis_url", "mongo_url", "central_url")
        self.settings = settings
        self.board = DeviceBoard(settings.queues)
        self.stop_event = asyncio.Event()
        self.accepting = True
        self.outcomes: Counter[str] = Counter()
        self.started_at = utcnow()
        self._dispatch_scheduled = False
        self._background: list[asyncio.Task[None]] = []
        self._idle = asyncio.Event()  # set once stopping and no task is in flight
        self._jobs: set[asyncio.Task[Any]] = set()

    # -- lifecycle -------------------------------------------------------------------
    async def run(self) -> int:
        s = self.settings
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        self.redis = connect.redis_async(s)
        self.mongo = connect.mongo_async(s)
        db = connect.database(self.mongo)
        self.tasks = TaskStore(db)
        self.queue = IntakeQueue(self.redis, s.keys, s.master_id)
        self.locks = DeviceLocks(self.redis, s.keys)
        self.groups = db[GROUPS]
        self.intake = Intake(s, self.queue, self.tasks, self.groups, self._on_tasks,
                             self._on_scheduled, self._count)
        self.pool = WorkerPool(s, on_done=self._on_done, on_lost=self._on_lost,
                               on_change=self._kick)
        self.listener = DeviceFreeListener(self.redis, s.keys.device_free_channel,
                                           self._on_free, self._check_locks_soon)
        self.checker = LockChecker(self.locks, self.board.waiting_on_locks, self._on_lock_gone,
                                   s.free_check_interval_s)
        self.recovery = Recovery(s, self.redis, self.tasks, RecordStore(db))
        self.delayed = DelayedTasks(
            s, self.tasks, lambda: self.recovery.dead_masters(exclude=s.master_id),
            self._on_tasks)
        self.sweeper = Sweeper(s, self.redis, self.recovery, self._ingest_for)
        self.scheduler = Scheduler(s, db, self.tasks, self._on_tasks, self.started_at)
        self.expiry = Expiry(s, self.board, self.tasks, self.redis, self._kick)
        self.heartbeat = Heartbeat(self.redis, s, self.report, self.started_at)

        await self._until_ok("mongo indexes", lambda: ensure_indexes(
            db, max(s.retention_success_s, s.retention_failed_s)))
        logger.info("master {} starting {} worker(s) x {} tasks", s.master_id, s.workers,
                    s.worker_concurrency)
        self.pool.start()
        await self._until_ok("restore held tasks", self._restore)
        self._background = [
            asyncio.create_task(self.intake.run(self.stop_event), name="intake"),
            asyncio.create_task(self.listener.run(self.stop_event), name="device-free"),
            asyncio.create_task(self.checker.run(self.stop_event), name="lock-check"),
            asyncio.create_task(self.heartbeat.run(self.stop_event), name="heartbeat"),
            asyncio.create_task(self.delayed.run(self.stop_event), name="delayed"),
            asyncio.create_task(self.scheduler.run(self.stop_event), name="scheduler"),
            asyncio.create_task(self.expiry.run(self.stop_event), name="expiry"),
            asyncio.create_task(self.sweeper.run(self.stop_event), name="sweeper"),
        ]
        await self.stop_event.wait()
        await self._shutdown()
        return 0

    def request_stop(self, why: str = "stop") -> None:
        if not self.stop_event.is_set():
            logger.info("master {} stopping ({})", self.settings.master_id, why)
            self.stop_event.set()

    async def _restore(self) -> None:
        """Tasks this master held queued when it last stopped or died."""
        held = await self.tasks.held_by(self.settings.master_id, TaskStatus.PENDING)
        if held:
            logger.info("restoring {} queued task(s) held before restart", len(held))
            self._on_tasks(held)

    async def _shutdown(self) -> None:
        grace = self.settings.shutdown_grace_s
        intake_task = self._background[0]
        await asyncio.wait([intake_task], timeout=grace)  # it stores what it has taken
        self.accepting = False
        self._note_idle()
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            logger.warning("{} task(s) still in flight after {}s", self.pool.inflight(), grace)
        # Delayed tasks we hold stay ours in Mongo: a restart loads them again, and
        # once our heartbeat is gone the leader hands them to the others. Releasing
        # them one by one here would make a stop as slow as the heap is large.
        self.delayed.stop()
        queued = self.board.drain()
        if queued:
            ids = [t.id for t in queued]
            try:
                await self.queue.hand_back(ids)
                await self.tasks.disown(ids, self.settings.master_id)
                logger.info("handed {} queued task(s) back to the ready queue", len(ids))
            except Exception as exc:  # they stay ours in Mongo; a restart restores them
                logger.warning("could not hand back {} task(s): {!r}", len(ids), exc)
        await self.pool.stop(grace)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        try:
            await self.heartbeat.remove()
        except Exception as exc:
            logger.warning("heartbeat not removed: {!r}", exc)
        await self.redis.aclose()
        await self.mongo.close()
        logger.info("master {} stopped", self.settings.master_id)

    async def _until_ok(self, what: str, step: Any) -> None:
        backoff = Backoff(base_s=0.2, cap_s=5.0)
        while True:
            try:
                await step()
                backoff.succeeded(what)
                return
            except Exception as exc:
                await backoff.failed(what, exc)

    # -- dispatch ------------------------------------------------------------------------
    def _on_tasks(self, tasks: list[Task]) -> None:
        added = [t for t in tasks if self.board.add(t)]
        if added:
            self.expiry.track(added)
            self._kick()

    def _ingest_for(self, dead_id: str) -> Callable[[list[Entry]], Awaitable[None]]:
        """Store a dead master's queue items as ours, acknowledging them on its list."""
        intake = Intake(self.settings, IntakeQueue(self.redis, self.settings.keys, dead_id),
                        self.tasks, self.groups, self._on_tasks, self._on_scheduled, self._count)
        return intake.ingest

    async def _on_scheduled(self, tasks: list[Task]) -> None:
        await self.delayed.offer(tasks)

    async def _count(self, name: str, n: int) -> None:
        await self.redis.hincrby(self.settings.keys.stats, name, n)

    def _kick(self) -> None:
        if not self._dispatch_scheduled:
            self._dispatch_scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_scheduled = False
        if not self.accepting:
            return
        now = utcnow()
        expired: list[Task] = []
        while self.pool.free_capacity() > 0:
            task = self.board.next()
            if task is None:
                break
            if self.expiry.is_expired(task, now):
                self.board.finished(task.device_id)
                expired.append(task)
                continue
            slot = self.pool.select(task.device_id)
            if slot is None or not self.pool.dispatch(slot, task_handle(task)):
                self._cool_down(task)
        if expired:
            self._spawn(self.expiry.expire(expired, now), "expire tasks")

    def _spawn(self, coro: Any, what: str) -> None:
        """Run a side job; its failure is logged, never lost in an unread task."""
        task = asyncio.get_running_loop().create_task(coro)
        self._jobs.add(task)

        def _done(t: asyncio.Task[Any]) -> None:
            self._jobs.discard(t)
            if not t.cancelled() and t.exception() is not None:
                logger.warning("{} failed: {!r}", what, t.exception())

        task.add_done_callback(_done)

    def _cool_down(self, task: Task) -> None:
        self.board.failed_to_start(task)
        asyncio.get_running_loop().call_later(ERROR_COOLDOWN_S, self._wake, task.device_id)

    def _wake(self, device_id: str) -> None:
        self.board.wake(device_id)
        self._kick()

    # -- answers and events -------------------------------------------------------------
    def _on_done(self, slot: WorkerSlot, done: TaskDone) -> None:
        self.outcomes[done.outcome] += 1
        device = self.board.devices.get(done.device_id)
        task = device.inflight if device is not None else None
        if task is None or task.id != done.task_id:
            logger.error("answer for a task the board does not hold: {}", done)
            return
        task.attempt = done.attempt
        match done.outcome:
            case "sent":
                self.board.sent(done.device_id, done.fence or 0)
            case "busy":
                self.board.busy(task)
            case "stale" | "failed":
                self.board.finished(done.device_id)
            case "retry":
                self.board.finished(done.device_id)
                if done.run_at is not None:
                    self.delayed.hold(done.task_id, done.run_at)
            case "error":
                self._cool_down(task)
        self._note_idle()
        self._kick()

    def _note_idle(self) -> None:
        if not self.accepting and self.pool.inflight() == 0:
            self._idle.set()

    def _on_free(self, device_id: str, fence: int) -> None:
        if self.board.freed(device_id, fence):
            self._kick()

    def _on_lock_gone(self, device_id: str) -> None:
        if self.board.lock_gone(device_id):
            self._kick()

    def _check_locks_soon(self) -> None:
        self._spawn(self.checker.check(), "lock check")

    def _on_lost(self, slot: WorkerSlot, handles: list[TaskHandle]) -> None:
        self.outcomes["lost"] += len(handles)
        self._note_idle()
        self._spawn(self._recover_lost(slot.name, handles), "recover a dead worker's tasks")

    async def _recover_lost(self, worker_name: str, handles: list[TaskHandle]) -> None:
        """A worker died holding these: give claimed ones back as pending, then requeue."""
        backoff = Backoff(base_s=0.2, cap_s=5.0)
        while True:
            try:
                now = utcnow()
                for h in handles:
                    await self.tasks.cas(*task_cas(
                        h.task_id, TaskStatus.RUNNING, TaskStatus.PENDING, now,
                        extra_filter={"worker": worker_name},
                        set_={"last_error": f"worker {worker_name} died"},
                    ))
                current = {t.id: t for t in await self.tasks.find_many(h.task_id for h in handles)}
                break
            except Exception as exc:
                await backoff.failed("recover tasks of a dead worker", exc)
        backoff.succeeded("recover tasks of a dead worker")
        for h in handles:
            task = current.get(h.task_id)
            pending = task is not None and task.status == TaskStatus.PENDING
            self.board.lost(task if pending else None, h.device_id)
        logger.info("recovered {} task(s) of dead worker {}", len(handles), worker_name)
        self._kick()

    def report(self) -> dict[str, Any]:
        return {
            "workers_alive": len(self.pool.online()),
            "workers": self.settings.workers,
            "queued": self.board.queued,
            "held_devices": self.board.held_devices,
            "inflight": self.pool.inflight(),
            "taken": self.intake.taken,
            "quarantined": self.intake.quarantined,
            "outcomes": dict(self.outcomes),
            "device_free_events": self.listener.received,
            "freed_by_lock_check": self.checker.freed,
            "delayed_held": len(self.delayed.heap),
            "delayed_fired": self.delayed.fired,
            "delayed_fire_lateness": percentiles(self.delayed.lateness),
            "schedule_fires": self.scheduler.fired,
            "expired": self.expiry.expired,
            "running_by_queue": dict(self.board.running_by_queue),
            "leader": self.sweeper.lease.leading,
            "sweeps": self.sweeper.sweeps,
            "recovered": dict(self.sweeper.totals),
            "worker_names": [w.name for w in self.pool.online()],
            "workers_recycled": self.pool.recycled,
        }


def run(settings: Settings) -> int:
    from sendscript import runtime

    runtime.setup(settings, "master")
    return asyncio.run(Master(settings).run())
