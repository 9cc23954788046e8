"""The dispatcher on the event seam, with an in-memory stand-in for the worker pool."""

from __future__ import annotations

import asyncio
from typing import Any

from master.board import DeviceBoard
from master.bus import GO, Bus, Drop, Hold, Verdict
from master.dispatch import Dispatcher
from master.events import (
    AnswerReceived,
    DeviceFreed,
    TaskAnswered,
    TaskDispatched,
    TasksQueued,
    TasksTaken,
    TasksWithdrawn,
    WithdrawRequested,
)
from sendscript.ipc import TaskDone, TaskHandle
from sendscript.models import Task


class Slot:
    name = "m/w0:1"


class Pool:
    """What the dispatcher asks of the pool: capacity, a worker, a send."""

    def __init__(self, capacity: int = 10) -> None:
        self.capacity = capacity
        self.sent: list[TaskHandle] = []

    def free_capacity(self) -> int:
        return self.capacity - len(self.sent)

    def select(self, device_id: str) -> Slot:
        return Slot()

    def dispatch(self, slot: Slot, handle: TaskHandle) -> bool:
        self.sent.append(handle)
        return True

    def inflight(self) -> int:
        return len(self.sent)


def task(task_id: str, device: str = "d1", priority: int = 5) -> Task:
    return Task.model_validate({"_id": task_id, "device_id": device, "script": {"id": "s"},
                                "priority": priority})


def setup() -> tuple[Bus, Pool, Dispatcher, dict[type, list[Any]]]:
    bus, pool = Bus(), Pool()
    dispatcher = Dispatcher(bus, DeviceBoard(), pool)  # type: ignore[arg-type]
    bus.attach(dispatcher)
    seen: dict[type, list[Any]] = {}
    for kind in (TasksQueued, TaskDispatched, TaskAnswered, TasksWithdrawn):
        bus.subscribe(kind, lambda e, k=kind: seen.setdefault(k, []).append(e))
    return bus, pool, dispatcher, seen


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_taken_tasks_are_queued_then_dispatched_one_per_device() -> None:
    bus, pool, _, seen = setup()
    bus.emit(TasksTaken([task("a"), task("b"), task("c", device="d2")], "intake"))
    await settle()
    assert [t.id for t in seen[TasksQueued][0].tasks] == ["a", "b", "c"]
    assert sorted(h.task_id for h in pool.sent) == ["a", "c"]  # b waits for d1
    assert {e.task.id for e in seen[TaskDispatched]} == {"a", "c"}


async def test_sent_answer_then_device_free_lets_the_next_task_go() -> None:
    bus, pool, _, seen = setup()
    bus.emit(TasksTaken([task("a"), task("b")], "intake"))
    await settle()
    pool.sent.clear()
    bus.emit(AnswerReceived(Slot.name, TaskDone(task_id="a", device_id="d1", outcome="sent",
                                                attempt=1, fence=41)))
    await settle()
    assert pool.sent == []  # the device stays held by fence 41
    answered = seen[TaskAnswered][0]
    assert (answered.task.id, answered.outcome, answered.worker) == ("a", "sent", Slot.name)
    assert answered.handled_s >= 0 and answered.waited_s >= 0
    bus.emit(DeviceFreed("d1", 40, "event"))  # an older fence frees nothing
    await settle()
    assert pool.sent == []
    bus.emit(DeviceFreed("d1", 41, "event"))
    await settle()
    assert [h.task_id for h in pool.sent] == ["b"]


async def test_a_gate_that_holds_keeps_the_task_and_asks_again_later() -> None:
    bus, pool, _, seen = setup()

    class PauseOnce:
        asked = 0

        def admit(self, t: Task, now: object) -> Verdict:
            self.asked += 1
            return Hold("paused", 0.05) if self.asked == 1 else GO

    gate = PauseOnce()
    bus.add_gate(gate)
    bus.emit(TasksTaken([task("a")], "intake"))
    await settle()
    assert pool.sent == [] and gate.asked == 1
    await asyncio.sleep(0.1)
    await settle()
    assert [h.task_id for h in pool.sent] == ["a"]
    assert TasksWithdrawn not in seen


async def test_a_gate_that_drops_withdraws_the_task_and_frees_the_device() -> None:
    bus, pool, _, seen = setup()

    class DropA:
        def admit(self, t: Task, now: object) -> Verdict:
            return Drop("expired") if t.id == "a" else GO

    bus.add_gate(DropA())
    bus.emit(TasksTaken([task("a", priority=9), task("b")], "intake"))
    await settle()
    withdrawn = seen[TasksWithdrawn][0]
    assert ([t.id for t in withdrawn.tasks], withdrawn.reason) == (["a"], "expired")
    assert [h.task_id for h in pool.sent] == ["b"]  # the device went on to the next task


async def test_withdraw_request_takes_only_queued_tasks_off() -> None:
    bus, _, _, seen = setup()
    bus.emit(TasksTaken([task("a"), task("b")], "intake"))
    await settle()
    bus.emit(WithdrawRequested(["a", "b", "unknown"], "expired"))
    await settle()
    assert [t.id for t in seen[TasksWithdrawn][0].tasks] == ["b"]  # a is in flight


async def test_stopping_dispatches_nothing_and_reports_idle_when_answers_are_in() -> None:
    bus, pool, dispatcher, _ = setup()
    bus.emit(TasksTaken([task("a")], "intake"))
    await settle()
    dispatcher.stop_dispatching()
    assert not dispatcher.idle.is_set()
    pool.sent.clear()
    bus.emit(AnswerReceived(Slot.name, TaskDone(task_id="a", device_id="d1",
                                                outcome="failed", attempt=1)))
    assert dispatcher.idle.is_set()
    bus.emit(TasksTaken([task("b")], "intake"))
    await settle()
    assert pool.sent == []
    assert [t.id for t in dispatcher.drain()] == ["b"]


async def test_a_retry_fired_while_a_stale_copy_is_in_flight_is_dispatched_after_it() -> None:
    # This master queued the task at attempt 0; another master ran attempt 1, which
    # failed and was retried, and this master fired the retry while its own copy was
    # still in flight. That copy comes back stale; the retry must still go.
    bus, pool, _, _ = setup()
    bus.emit(TasksTaken([task("a")], "intake"))
    await settle()
    assert [(h.task_id, h.attempt) for h in pool.sent] == [("a", 0)]
    retry = task("a").model_copy(update={"attempt": 1})
    bus.emit(TasksTaken([retry], "delayed"))
    await settle()
    pool.sent.clear()
    bus.emit(AnswerReceived(Slot.name, TaskDone(task_id="a", device_id="d1", outcome="stale",
                                                attempt=0)))
    await settle()
    assert [(h.task_id, h.attempt) for h in pool.sent] == [("a", 1)]
