"""The worker pool: spawn, watch, reap, recycle and restart worker processes.

Modelled on gunicorn's arbiter: each worker is a `spawn`ed process with a duplex
pipe; its exit is noticed at once through its process sentinel, its in-flight
tasks are handed back to the master, and it is replaced, with a growing delay
when workers keep dying young. A worker past its task or memory limit says it is
retiring: it gets no more tasks, a replacement starts at once, and it exits when
it has finished what it holds.

A worker that hangs instead of dying (its loop blocked, or a send that never
returns) is found by `master.watchdog` from its pipe heartbeat and the age of
the oldest task it holds, killed with SIGKILL, and then handled like any dead
worker: its tasks go back as `WorkerLost`, and it is replaced.

The pool speaks to the master's bus only: a worker's answer is `AnswerReceived`, a
dead worker's tasks `WorkerLost`, a worker online, retiring or gone `CapacityChanged`.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections import Counter
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from loguru import logger

from master.balancer import select_worker
from master.bus import Bus
from master.events import AnswerReceived, CapacityChanged, WorkerLost
from master.watchdog import hung_reason, limits, responsive
from sendscript.ipc import (
    Shutdown,
    TaskDone,
    TaskHandle,
    TaskLocked,
    WorkerExit,
    WorkerHeartbeat,
    WorkerOnline,
    WorkerRetiring,
)
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
        self.retiring: str | None = None
        # In the order they were handed over: the first is the oldest.
        self.inflight: dict[str, TaskHandle] = {}
        self.handed_at: dict[str, float] = {}
        self.fences: dict[str, int] = {}  # task id -> the lock fence it said it took
        self.devices: Counter[str] = Counter()
        self.started_at = time.monotonic()
        self.last_seen = self.started_at  # any message from it counts as a heartbeat
        self.exit_reason: str | None = None
        self.hung: str | None = None  # why it was killed as hung
        self.exited = asyncio.Event()

    @property
    def load(self) -> int:
        return len(self.inflight)

    def device_load(self, device_id: str) -> int:
        return self.devices[device_id]

    def take(self, handle: TaskHandle) -> None:
        self.inflight[handle.task_id] = handle
        self.handed_at[handle.task_id] = time.monotonic()
        self.devices[handle.device_id] += 1

    def oldest(self) -> tuple[str, float] | None:
        """(task id, when handed over) of the task it has held longest."""
        for task_id, at in self.handed_at.items():
            return task_id, at
        return None

    def drop(self, task_id: str) -> TaskHandle | None:
        handle = self.inflight.pop(task_id, None)
        self.handed_at.pop(task_id, None)
        self.fences.pop(task_id, None)
        if handle is not None:
            self.devices[handle.device_id] -= 1
            if self.devices[handle.device_id] <= 0:
                del self.devices[handle.device_id]
        return handle


class WorkerPool:
    def __init__(
        self, settings: Settings, bus: Bus, *,
        target: Callable[..., None] | None = None,
    ) -> None:
        self.settings = settings
        self.target = target  # the worker's entry point; worker.process.main by default
        self.bus = bus
        self.limits = limits(settings)  # a too-short task limit stops the master here
        self.ctx = multiprocessing.get_context("spawn")
        self.slots: dict[int, WorkerSlot] = {}
        self.stopping = False
        self.recycled = 0
        self._next_id = 0
        self._young_deaths = 0
        self._restart: asyncio.TimerHandle | None = None
        self._watch: asyncio.TimerHandle | None = None
        self.killed_hung = 0

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        self._fill()
        self._watch = asyncio.get_running_loop().call_later(self.limits.check_s, self._check)

    def _serving(self) -> list[WorkerSlot]:
        """Workers that count toward the pool size: not retiring, not exiting, not hung."""
        return [s for s in self.slots.values()
                if s.retiring is None and s.exit_reason is None and s.hung is None]

    def _fill(self) -> None:
        """Spawn workers until the pool has its size (unless a restart is held back)."""
        self._restart = None
        while not self.stopping and len(self._serving()) < self.settings.workers:
            self.spawn()

    def spawn(self) -> WorkerSlot:
        from worker.process import main as worker_main

        target = self.target or worker_main
        worker_id = self._next_id
        self._next_id += 1
        parent_end, child_end = self.ctx.Pipe(duplex=True)
        process = self.ctx.Process(
            target=target,
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
        if self._restart is not None:
            self._restart.cancel()
        # The watchdog keeps watching: a worker that hangs while draining is killed
        # now, and its tasks recovered, rather than at the end of the grace.
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
        if self._watch is not None:
            self._watch.cancel()

    # -- hung workers ----------------------------------------------------------------
    def _check(self) -> None:
        """The watchdog's tick: kill every worker that is hung."""
        now = time.monotonic()
        for slot in list(self.slots.values()):
            if slot.hung is not None:
                continue
            # Read what is waiting first: a master that was itself busy must not
            # take heartbeats it has not read yet for silence.
            self._on_readable(slot)
            reason = hung_reason(now, online=slot.online, last_seen=slot.last_seen,
                                 oldest_task=slot.oldest(), limits=self.limits)
            if reason is not None:
                self.kill_hung(slot, reason)
        self._watch = asyncio.get_running_loop().call_later(self.limits.check_s, self._check)

    def kill_hung(self, slot: WorkerSlot, reason: str) -> None:
        """SIGKILL a hung worker; its exit hands its tasks back (`_on_exit`)."""
        slot.hung = reason
        self.killed_hung += 1
        held = ", ".join(f"{h.task_id} (device {h.device_id}, attempt {h.attempt})"
                         for h in slot.inflight.values())
        logger.error("worker {} is hung: {}; killing it (SIGKILL). It held {} task(s){}{}",
                     slot.name, reason, slot.load, ": " if held else "", held)
        try:
            slot.process.kill()  # SIGKILL also ends a stopped (SIGSTOP) process
        except (OSError, ValueError) as exc:  # already gone: its sentinel fires anyway
            logger.warning("could not kill worker {}: {!r}", slot.name, exc)
        self.bus.emit(CapacityChanged())

    # -- dispatch ------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        online = self.online()
        return {"workers_alive": len(online), "workers": self.settings.workers,
                "inflight": self.inflight(), "worker_names": [w.name for w in online],
                "workers_recycled": self.recycled}

    def online(self) -> list[WorkerSlot]:
        """Workers that take tasks: online and heard from lately."""
        now = time.monotonic()
        return [s for s in self._serving()
                if s.online and responsive(now, s.last_seen, self.limits)]

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
        if slot.conn.closed:
            return
        try:
            while slot.conn.poll():
                self._on_message(slot, slot.conn.recv())
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(slot.conn.fileno())

    def _on_message(self, slot: WorkerSlot, msg: object) -> None:
        now = time.monotonic()
        silent_s = now - slot.last_seen
        slot.last_seen = now
        if slot.online and silent_s > self.limits.quiet_s:
            logger.info("worker {} heard from again after {:.1f}s of silence", slot.name,
                        silent_s)
            self.bus.emit(CapacityChanged())  # it takes tasks again
        if isinstance(msg, WorkerHeartbeat):
            return
        if isinstance(msg, TaskDone):
            if slot.drop(msg.task_id) is not None:
                self.bus.emit(AnswerReceived(slot.name, msg))
        elif isinstance(msg, TaskLocked):
            if msg.task_id in slot.inflight:
                slot.fences[msg.task_id] = msg.fence
        elif isinstance(msg, WorkerOnline):
            slot.online = True
            logger.info("worker {} online", slot.name)
            self.bus.emit(CapacityChanged())
        elif isinstance(msg, WorkerRetiring):
            self.retire(slot, msg.reason)
        elif isinstance(msg, WorkerExit):
            slot.exit_reason = msg.reason
        else:
            logger.error("unexpected message from {}: {!r}", slot.name, msg)

    def retire(self, slot: WorkerSlot, reason: str) -> None:
        """Recycle a worker: no new tasks, a replacement now, exit once drained."""
        if slot.retiring is not None:
            return
        slot.retiring = reason
        self.recycled += 1
        logger.info("recycling worker {} ({}); it finishes {} task(s) first", slot.name, reason,
                    slot.load)
        self._send(slot, Shutdown(reason=f"recycled: {reason}"))
        self._fill()
        self.bus.emit(CapacityChanged())

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
        fences = dict(slot.fences)
        slot.inflight.clear()
        slot.fences.clear()
        slot.handed_at.clear()
        slot.devices.clear()
        code = slot.process.exitcode
        if slot.hung is not None:
            logger.error("worker {} killed as hung (exit code {}); recovering its {} task(s) "
                         "as a dead worker's", slot.name, code, len(lost))
        elif slot.exit_reason is None or code:
            logger.error("worker {} died (exit code {}) holding {} task(s)", slot.name, code,
                         len(lost))
        else:
            logger.info("worker {} exited: {}", slot.name, slot.exit_reason)
        if lost:
            self.bus.emit(WorkerLost(slot.name, lost, fences))
        if not self.stopping:
            self._restart_later(slot)
        self.bus.emit(CapacityChanged())

    def _restart_later(self, slot: WorkerSlot) -> None:
        lived = time.monotonic() - slot.started_at
        planned = slot.exit_reason is not None and not slot.process.exitcode
        if planned or lived >= YOUNG_DEATH_S:
            self._young_deaths = 0
        else:
            self._young_deaths += 1
        if self._young_deaths == 0:
            self._fill()
            return
        if self._restart is not None:
            return  # a restart is already scheduled
        delay = min(self.settings.worker_restart_backoff_max_s,
                    0.5 * 2 ** (self._young_deaths - 1))
        logger.error(
            "workers keep dying ({} in a row, each within {:.0f}s of start); "
            "next start in {:.1f}s", self._young_deaths, YOUNG_DEATH_S, delay,
        )
        self._restart = asyncio.get_running_loop().call_later(delay, self._fill)

    def _send(self, slot: WorkerSlot, msg: object) -> bool:
        try:
            slot.conn.send(msg)
            return True
        except (BrokenPipeError, OSError) as exc:
            logger.warning("cannot reach worker {}: {!r}", slot.name, exc)
            return False
