"""The worker pool: spawn, watch, reap and restart worker processes.

Modelled on gunicorn's arbiter: each worker is a `spawn`ed process with a duplex
pipe; its exit is noticed at once through its process sentinel, its in-flight
tasks are handed back to the master, and it is replaced, with a growing delay
when it keeps dying young.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections import Counter
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from loguru import logger

from master.balancer import select_worker
from sendscript.ipc import Shutdown, TaskDone, TaskHandle, WorkerExit, WorkerOnline
from sendscript.settings import Settings

YOUNG_DEATH_S = 10.0  # a worker dying sooner than this counts toward backoff


class WorkerSlot:
    def __init__(
        self, worker_id: int, process: BaseProcess, conn: Connection, capacity: int,
        master_id: str,
    ) -> None:
        self.worker_id = worker_id
        self.process = process
        self.conn = conn
        self.capacity = capacity
        self.name = f"{master_id}/w{worker_id}:{process.pid}"
        self.online = False
        self.inflight: dict[str, TaskHandle] = {}
        self.devices: Counter[str] = Counter()
        self.started_at = time.monotonic()
        self.exit_reason: str | None = None
        self.exited = asyncio.Event()

    @property
    def load(self) -> int:
        return len(self.inflight)

    def device_load(self, device_id: str) -> int:
        return self.devices[device_id]

    def take(self, handle: TaskHandle) -> None:
        self.inflight[handle.task_id] = handle
        self.devices[handle.device_id] += 1

    def drop(self, task_id: str) -> TaskHandle | None:
        handle = self.inflight.pop(task_id, None)
        if handle is not None:
            self.devices[handle.device_id] -= 1
            if self.devices[handle.device_id] <= 0:
                del self.devices[handle.device_id]
        return handle


OnDone = Callable[[WorkerSlot, TaskDone], None]
OnLost = Callable[[WorkerSlot, list[TaskHandle]], None]
OnChange = Callable[[], None]


class WorkerPool:
    def __init__(
        self, settings: Settings, *, on_done: OnDone, on_lost: OnLost, on_change: OnChange
    ) -> None:
        self.settings = settings
        self.on_done = on_done
        self.on_lost = on_lost
        self.on_change = on_change
        self.ctx = multiprocessing.get_context("spawn")
        self.slots: dict[int, WorkerSlot] = {}
        self.stopping = False
        self._young_deaths: Counter[int] = Counter()
        self._restarts: dict[int, asyncio.TimerHandle] = {}

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        for worker_id in range(self.settings.workers):
            self.spawn(worker_id)

    def spawn(self, worker_id: int) -> WorkerSlot:
        from worker.process import main as worker_main

        self._restarts.pop(worker_id, None)
        parent_end, child_end = self.ctx.Pipe(duplex=True)
        process = self.ctx.Process(
            target=worker_main,
            args=(worker_id, child_end, self.settings.model_dump()),
            name=f"sendscript-worker-{worker_id}",
        )
        process.start()
        child_end.close()
        slot = WorkerSlot(worker_id, process, parent_end, self.settings.worker_concurrency,
                          self.settings.master_id)
        self.slots[worker_id] = slot
        loop = asyncio.get_running_loop()
        loop.add_reader(parent_end.fileno(), self._on_readable, slot)
        loop.add_reader(process.sentinel, self._on_exit, slot)
        logger.info("spawned worker {} (pid {})", worker_id, process.pid)
        return slot

    async def stop(self, grace_s: float) -> None:
        """Ask every worker to finish what it holds and exit; kill what outlives grace."""
        self.stopping = True
        for handle in self._restarts.values():
            handle.cancel()
        self._restarts.clear()
        slots = list(self.slots.values())
        for slot in slots:
            self._send(slot, Shutdown(reason="master stopping"))
        waits = [asyncio.create_task(s.exited.wait()) for s in slots]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=grace_s)
            for task in pending:
                task.cancel()
        for slot in list(self.slots.values()):
            logger.warning("worker {} outlived the grace period; terminating", slot.name)
            slot.process.terminate()
            slot.process.join(2)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join(2)
            self._on_exit(slot)

    # -- dispatch ------------------------------------------------------------------
    def online(self) -> list[WorkerSlot]:
        return [s for s in self.slots.values() if s.online and s.exit_reason is None]

    def free_capacity(self) -> int:
        return sum(max(0, s.capacity - s.load) for s in self.online())

    def inflight(self) -> int:
        return sum(s.load for s in self.slots.values())

    def select(self, device_id: str) -> WorkerSlot | None:
        return select_worker(self.online(), device_id)

    def dispatch(self, slot: WorkerSlot, handle: TaskHandle) -> bool:
        slot.take(handle)
        if self._send(slot, handle):
            return True
        slot.drop(handle.task_id)
        return False

    # -- events from workers ---------------------------------------------------------
    def _on_readable(self, slot: WorkerSlot) -> None:
        try:
            while slot.conn.poll():
                self._on_message(slot, slot.conn.recv())
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(slot.conn.fileno())

    def _on_message(self, slot: WorkerSlot, msg: object) -> None:
        if isinstance(msg, TaskDone):
            if slot.drop(msg.task_id) is not None:
                self.on_done(slot, msg)
        elif isinstance(msg, WorkerOnline):
            slot.online = True
            logger.info("worker {} online", slot.name)
            self.on_change()
        elif isinstance(msg, WorkerExit):
            slot.exit_reason = msg.reason
        else:
            logger.error("unexpected message from {}: {!r}", slot.name, msg)

    def _on_exit(self, slot: WorkerSlot) -> None:
        """The process is gone: read what it said last, hand back its tasks, replace it."""
        if self.slots.get(slot.worker_id) is not slot:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(slot.process.sentinel)
        self._on_readable(slot)
        loop.remove_reader(slot.conn.fileno())
        slot.process.join(0.1)
        slot.conn.close()
        del self.slots[slot.worker_id]
        slot.exited.set()
        lost = list(slot.inflight.values())
        slot.inflight.clear()
        slot.devices.clear()
        code = slot.process.exitcode
        if slot.exit_reason is None or code:
            logger.error("worker {} died (exit code {}) holding {} task(s)", slot.name, code,
                         len(lost))
        else:
            logger.info("worker {} exited: {}", slot.name, slot.exit_reason)
        if lost:
            self.on_lost(slot, lost)
        if not self.stopping:
            self._restart_later(slot)
        self.on_change()

    def _restart_later(self, slot: WorkerSlot) -> None:
        lived = time.monotonic() - slot.started_at
        if lived < YOUNG_DEATH_S and slot.exit_reason is None:
            self._young_deaths[slot.worker_id] += 1
        else:
            self._young_deaths[slot.worker_id] = 0
        deaths = self._young_deaths[slot.worker_id]
        if deaths == 0:
            self.spawn(slot.worker_id)
            return
        delay = min(self.settings.worker_restart_backoff_max_s, 0.5 * 2 ** (deaths - 1))
        logger.error(
            "worker {} keeps dying ({} times in a row, each within {:.0f}s of start); "
            "restarting in {:.1f}s", slot.worker_id, deaths, YOUNG_DEATH_S, delay,
        )
        self._restarts[slot.worker_id] = asyncio.get_running_loop().call_later(
            delay, self._restart_if_running, slot.worker_id
        )

    def _restart_if_running(self, worker_id: int) -> None:
        if not self.stopping and worker_id not in self.slots:
            self.spawn(worker_id)

    def _send(self, slot: WorkerSlot, msg: object) -> bool:
        try:
            slot.conn.send(msg)
            return True
        except (BrokenPipeError, OSError) as exc:
            logger.warning("cannot reach worker {}: {!r}", slot.name, exc)
            return False
