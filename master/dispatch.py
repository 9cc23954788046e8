"""Dispatch: the board's tasks to the pool's workers, driven by the master's events.

The dispatcher owns the device board. Taken tasks go on it; every change that can
let a task go (an answer, a freed device, a cool-down over, a worker online)
schedules one dispatch pass (`kick`), never a poll. Before a task goes to a
worker the gates are asked (`Bus.admit`); what the board does with each worker
answer is decided here and announced as `TaskAnswered`, with its timings.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from loguru import logger

from master.board import DeviceBoard
from master.bus import Bus, Drop, Go, Subscription
from master.events import (
    AnswerReceived,
    CapacityChanged,
    DeviceFreed,
    TaskAnswered,
    TaskDispatched,
    TaskHeld,
    TasksQueued,
    TasksTaken,
    TasksWithdrawn,
    WakeRequested,
    WithdrawRequested,
    WorkerLost,
    WorkRecovered,
)
from master.pool import WorkerPool
from sendscript.ipc import TaskHandle
from sendscript.models import Task, utcnow

ERROR_COOLDOWN_S = 2.0


def task_handle(task: Task, max_wait: dict[str, float] | None = None) -> TaskHandle:
    return TaskHandle(
        task_id=task.id, device_id=task.device_id, attempt=task.attempt,
        max_retries=task.max_retries, timeout_s=task.timeout_s, priority=task.priority,
        queue=task.queue, script=task.script, retry_base_s=task.retry_base_s,
        deadline=task.deadline(max_wait or {}),  # the worker checks it before the POST
        trace=task.trace,
    )


class Dispatcher:
    def __init__(self, bus: Bus, board: DeviceBoard, pool: WorkerPool,
                 max_wait: dict[str, float] | None = None) -> None:
        self.bus = bus
        self.max_wait = max_wait or {}  # queue -> max wait: part of a task's deadline
        self.board = board
        self.pool = pool
        self.accepting = True
        self.idle = asyncio.Event()  # set once stopped and nothing is in flight
        self._scheduled = False
        self._queued_at: dict[str, float] = {}  # task id -> when it went on the board
        self._dispatched: dict[str, tuple[float, float]] = {}  # task id -> (at, waited_s)

    def subscriptions(self) -> list[Subscription]:
        return [
            (TasksTaken, self._on_taken),
            (WithdrawRequested, self._on_withdraw),
            (DeviceFreed, self._on_freed),
            (AnswerReceived, self._on_answer),
            (WorkerLost, self._on_lost),
            (WorkRecovered, self._on_recovered),
            (CapacityChanged, lambda _: self.kick()),
            (WakeRequested, self._on_wake),
        ]

    # -- events ---------------------------------------------------------------------------
    def _on_answer(self, event: AnswerReceived) -> None:
        done = event.answer
        device = self.board.devices.get(done.device_id)
        task = device.inflight if device is not None else None
        if task is None or task.id != done.task_id:
            logger.error("answer for a task the board does not hold: {}", done)
            return
        task.attempt = done.attempt
        at, waited = self._dispatched.pop(task.id, (time.monotonic(), 0.0))
        match done.outcome:
            case "sent":
                self.board.sent(done.device_id, done.fence or 0)
            case "busy":
                self._put_back(task, self.board.busy)
            case "stale" | "failed" | "retry" | "expired":
                self.board.finished(done.device_id)
            case "error" | "unsent" | "quota" | "throttled":
                self._cool_down(task, ERROR_COOLDOWN_S)
        self.bus.emit(TaskAnswered(task, done, event.worker, waited, time.monotonic() - at))
        self._note_idle()
        self.kick()

    def _on_lost(self, event: WorkerLost) -> None:
        for h in event.handles:
            self._dispatched.pop(h.task_id, None)
        self._note_idle()

    def _on_taken(self, event: TasksTaken) -> None:
        added = [t for t in event.tasks if self.board.add(t)]
        if added:
            now = time.monotonic()
            for task in added:
                self._queued_at[task.id] = now
            self.bus.emit(TasksQueued(added))
            self.kick()

    def _on_withdraw(self, event: WithdrawRequested) -> None:
        removed = [t for t in map(self.board.remove, event.task_ids) if t is not None]
        for task in removed:
            self._queued_at.pop(task.id, None)
        if removed:
            self.bus.emit(TasksWithdrawn(removed, event.reason))
            self.kick()

    def _on_freed(self, event: DeviceFreed) -> None:
        if event.fence is None:
            changed = self.board.lock_gone(event.device_id)
        else:
            changed = self.board.freed(event.device_id, event.fence)
        if changed:
            self.kick()

    def _on_wake(self, event: WakeRequested) -> None:
        for device_id in event.device_ids:
            self.board.wake(device_id)
        self.kick()

    def _on_recovered(self, event: WorkRecovered) -> None:
        pending = {t.device_id: t for t in event.pending}
        now = time.monotonic()
        for device_id in event.devices:
            task = pending.get(device_id)
            if task is not None:
                self._queued_at[task.id] = now
            self.board.lost(task, device_id)
        self.kick()

    # -- dispatching ------------------------------------------------------------------------
    def kick(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._scheduled = False
        if not self.accepting:
            return
        now = utcnow()
        dropped: dict[str, list[Task]] = {}
        while self.pool.free_capacity() > 0:
            task = self.board.next()
            if task is None:
                break
            verdict = self.bus.admit(task, now)
            if isinstance(verdict, Drop):
                self.board.finished(task.device_id)
                self._queued_at.pop(task.id, None)
                dropped.setdefault(verdict.reason, []).append(task)
            elif not isinstance(verdict, Go):
                self._cool_down(task, verdict.retry_s)
                self.bus.emit(TaskHeld(task, verdict))
            else:
                self._send(task)
        for reason, tasks in dropped.items():
            self.bus.emit(TasksWithdrawn(tasks, reason))

    def _send(self, task: Task) -> None:
        slot = self.pool.select(task.device_id)
        handle = task_handle(task, self.max_wait)
        left_ns = time.time_ns()
        if slot is None or not self.pool.dispatch(slot, handle):
            self._cool_down(task, ERROR_COOLDOWN_S)
            return
        now = time.monotonic()
        waited = now - self._queued_at.pop(task.id, now)
        self._dispatched[task.id] = (now, waited)
        self.bus.emit(TaskDispatched(task, slot.name, waited, left_ns))

    def _put_back(self, task: Task, how: Callable[[Task], None]) -> None:
        self._queued_at[task.id] = time.monotonic()
        how(task)

    def _cool_down(self, task: Task, seconds: float) -> None:
        self._put_back(task, self.board.failed_to_start)
        asyncio.get_running_loop().call_later(seconds, self._wake, task.device_id)

    def _wake(self, device_id: str) -> None:
        self.board.wake(device_id)
        self.kick()

    # -- stopping ------------------------------------------------------------------------------
    def stop_dispatching(self) -> None:
        self.accepting = False
        self._note_idle()

    def _note_idle(self) -> None:
        if not self.accepting and self.pool.inflight() == 0:
            self.idle.set()

    def report(self) -> dict[str, Any]:
        board = self.board
        return {"queued": board.queued, "held_devices": board.held_devices,
                "running_by_queue": dict(board.running_by_queue)}

    def drain(self) -> list[Task]:
        """Everything still queued, off the board (to hand back at stop)."""
        tasks = self.board.drain()
        for task in tasks:
            self._queued_at.pop(task.id, None)
        return tasks
