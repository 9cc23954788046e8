"""The master's spans of a traced task: where it waited, and what held it.

Recorded after the fact from the master's events, each a child of the task's trace
context (`Task.trace`), so every attempt's waits sit in the task's one trace:

- `sendscript.wait.delayed`: a delayed task or a retry, from when it began to wait
  (created, or failed for a retry) until the delay heap handed it over;
- `sendscript.wait.queued`: on the board (for a first attempt taken at once, from
  its creation: the ready list included) until it went to a worker;
- `sendscript.wait.held`: a gate held it, named by `sendscript.gate` with its reason,
  from the first hold until another gate held it or it went on.

Subscribes to nothing when tracing is off (`sendscript.tracing.ON`), so it costs
nothing then. Memory: one small entry per traced task on the board.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from master.bus import Subscription
from master.events import (
    TaskAnswered,
    TaskDispatched,
    TaskHeld,
    TasksQueued,
    TasksTaken,
    TasksWithdrawn,
)
from sendscript import tracing
from sendscript.models import Task

# Answers that leave the task on the board: it waits again from the answer.
PUT_BACK = frozenset({"busy", "error", "unsent", "quota", "throttled"})
STARTED_LATE_S = 1.0  # due this long after creation: it waited in the delay heap first


@dataclass(slots=True)
class _Hold:
    gate: str
    reason: str
    since_ns: int
    times: int = 1


@dataclass(slots=True)
class _Waiting:
    since_ns: int
    hold: _Hold | None = None


def _now_ns() -> int:
    return time.time_ns()


class TaskTraces:
    def __init__(self) -> None:
        self._waiting: dict[str, _Waiting] = {}
        self.recorded = 0

    def subscriptions(self) -> list[Subscription]:
        if not tracing.ON:
            return []
        return [
            (TasksTaken, self._on_taken),
            (TasksQueued, self._on_queued),
            (TaskHeld, self._on_held),
            (TaskDispatched, self._on_dispatched),
            (TaskAnswered, self._on_answered),
            (TasksWithdrawn, self._on_withdrawn),
        ]

    # -- events -----------------------------------------------------------------------
    def _on_taken(self, event: TasksTaken) -> None:
        if event.source != "delayed":
            return
        for task in event.tasks:
            if task.trace:
                began = task.updated_at if task.attempt else task.created_at
                self._record("sendscript.wait.delayed", task, began, None,
                             {"sendscript.wait.kind": "retry" if task.attempt else "delay",
                              "sendscript.run_at": task.run_at})

    def _on_queued(self, event: TasksQueued) -> None:
        now = _now_ns()
        for task in event.tasks:
            if task.trace:
                self._waiting[task.id] = _Waiting(self._queued_since(task, now))

    def _on_held(self, event: TaskHeld) -> None:
        waiting = self._waiting.get(event.task.id)
        if waiting is None:
            return
        verdict, hold = event.verdict, waiting.hold
        if hold is not None and hold.gate == verdict.gate:
            hold.times += 1
            hold.reason = verdict.reason
            return
        now = _now_ns()
        self._end_hold(event.task, waiting, now)
        waiting.hold = _Hold(verdict.gate, verdict.reason, now)

    def _on_dispatched(self, event: TaskDispatched) -> None:
        waiting = self._waiting.pop(event.task.id, None)
        if waiting is None:
            return
        now = event.left_ns or _now_ns()  # the worker's spans may start before the event
        self._end_hold(event.task, waiting, now)
        self._record("sendscript.wait.queued", event.task, waiting.since_ns, now,
                     {"sendscript.worker": event.worker})

    def _on_answered(self, event: TaskAnswered) -> None:
        if event.outcome in PUT_BACK and event.task.trace:
            self._waiting[event.task.id] = _Waiting(_now_ns())

    def _on_withdrawn(self, event: TasksWithdrawn) -> None:
        now = _now_ns()
        for task in event.tasks:
            waiting = self._waiting.pop(task.id, None)
            if waiting is not None:
                self._end_hold(task, waiting, now)
                self._record("sendscript.wait.queued", task, waiting.since_ns, now,
                             {"sendscript.withdrawn": event.reason}, error=event.reason)

    # -- spans --------------------------------------------------------------------------
    def _queued_since(self, task: Task, now: int) -> int:
        """A first attempt due on creation waited from then (ready list and board);
        any other from now, its earlier wait being the delay heap's."""
        created = task.created_at
        due = task.run_at or created
        if task.attempt == 0 and (due - created).total_seconds() < STARTED_LATE_S:
            return min(now, int(created.timestamp() * 1e9))
        return now

    def _end_hold(self, task: Task, waiting: _Waiting, now: int) -> None:
        hold, waiting.hold = waiting.hold, None
        if hold is not None:
            self._record("sendscript.wait.held", task, hold.since_ns, now,
                         {"sendscript.gate": hold.gate, "sendscript.hold.reason": hold.reason,
                          "sendscript.hold.times": hold.times})

    def _record(self, name: str, task: Task, start: Any, end: Any,
                attrs: dict[str, Any], error: str | None = None) -> None:
        tracing.record(name, task.trace, start, end, {
            "sendscript.task_id": task.id, "sendscript.device_id": task.device_id,
            "sendscript.attempt": task.attempt, "sendscript.queue": task.queue, **attrs,
        }, error=error)
        self.recorded += 1

    def report(self) -> dict[str, Any]:
        return {"tracing": {"on": tracing.ON, "waiting": len(self._waiting),
                            "spans": self.recorded}}
