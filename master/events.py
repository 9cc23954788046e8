"""The master's events: what happened, emitted once on the bus (`master.bus`).

Each is a frozen record of one fact — tasks taken in, queued on the board,
dispatched, answered, a device freed, a worker lost, the master stopping, an
incident — or of one request a part makes of another (withdraw, wake). Parts
subscribe to the events they react to; none of them calls another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from master.bus import Hold
from sendscript.breaker import Circuit
from sendscript.ipc import TaskDone, TaskHandle
from sendscript.models import Task


@dataclass(frozen=True, slots=True)
class TasksTaken:
    """Due tasks handed to the master: from intake, the delay heap, a schedule, a
    restart's restore or recovery. Not yet on the board."""

    tasks: list[Task]
    source: str


@dataclass(frozen=True, slots=True)
class TasksQueued:
    """Tasks now waiting on the board for their device (new ones only)."""

    tasks: list[Task]


@dataclass(frozen=True, slots=True)
class TaskDispatched:
    task: Task
    worker: str
    waited_s: float  # on the board, since it was queued (or put back)
    # When it left the board (wall clock, ns), taken before the hand-off to the worker:
    # the worker may start on it before this event is emitted.
    left_ns: int = 0


@dataclass(frozen=True, slots=True)
class TaskHeld:
    """A gate held a queued task (`verdict.gate` names which): it stays on the board
    and is asked again after the verdict's `retry_s`."""

    task: Task
    verdict: Hold


@dataclass(frozen=True, slots=True)
class TaskAnswered:
    """A worker's answer for a dispatched task, with the outcome and its timings."""

    task: Task
    answer: TaskDone
    worker: str
    waited_s: float  # on the board before dispatch
    handled_s: float  # dispatch to answer: lock, claim, record, POST

    @property
    def outcome(self) -> str:
        return self.answer.outcome


@dataclass(frozen=True, slots=True)
class AnswerReceived:
    """A worker's answer as the pool read it off the pipe; the dispatcher decides what
    the board does with it and announces `TaskAnswered`."""

    worker: str
    answer: TaskDone


@dataclass(frozen=True, slots=True)
class TasksWithdrawn:
    """Queued tasks taken off the board without being dispatched."""

    tasks: list[Task]
    reason: str  # e.g. "expired"


@dataclass(frozen=True, slots=True)
class WithdrawRequested:
    """Ask the board to take these queued tasks off (those it still has)."""

    task_ids: list[str]
    reason: str


@dataclass(frozen=True, slots=True)
class WakeRequested:
    """Ask again now about these devices' tasks that a gate held (a pause was lifted):
    their cool-down ends early."""

    device_ids: list[str]


@dataclass(frozen=True, slots=True)
class DeviceFreed:
    device_id: str
    fence: int | None  # None: the fallback check found the lock gone
    via: Literal["event", "lock-check"]


@dataclass(frozen=True, slots=True)
class FreeEventsMissed:
    """The device-free channel was (re)subscribed: events may have been missed while it
    was down, so the fallback lock check should look now."""


@dataclass(frozen=True, slots=True)
class WorkerLost:
    """A worker died (or was killed) holding these tasks; `fences`: the device lock
    each had taken (task id -> fence), as the worker said before claiming it."""

    worker: str
    handles: list[TaskHandle]
    fences: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WorkRecovered:
    """A lost worker's tasks, as Mongo now has them: the pending ones go back on the
    board; the device of every one is no longer in flight."""

    worker: str
    devices: list[str]
    pending: list[Task]


@dataclass(frozen=True, slots=True)
class CapacityChanged:
    """Workers came online, retired or exited: dispatch may go on."""


@dataclass(frozen=True, slots=True)
class MasterStopping:
    why: str


@dataclass(frozen=True, slots=True)
class Incident:
    """Something an operator must hear of began (`active`) or is over. `kind` says
    what (high_water, breaker_open, device_benched, drop_rate, hard_stop,
    workers_dying, master_gone, dead_letters, ...), `key` which one; a kind and
    key name one incident, so each is announced once when it starts and once
    when it ends."""

    kind: str
    key: str
    active: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class IncidentForgotten:
    """This master no longer watches the incident (another leads now): forget it
    without announcing an end."""

    kind: str
    key: str


@dataclass(frozen=True, slots=True)
class BreakerTripRequested:
    """Open the shared circuit breaker at its next sync (the drop-rate ladder asks)."""

    why: str


@dataclass(frozen=True, slots=True)
class BreakerFloorRequested:
    """Let this master's breaker gate act no better than `floor`, whatever the shared
    state (the drop-rate ladder asks: DEGRADED while the drop rate is high)."""

    floor: Circuit
