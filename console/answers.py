"""What the JSON API answers, as /openapi.json describes it: the shapes of the main
answers, field for field as the routes have always sent them.

Every model keeps the fields it does not name (`extra="allow"`: a task document's own
fields pass through), and the routes send only the fields an answer holds
(`response_model_exclude_unset`), so typing an answer never adds, drops or renames one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sendscript.status import TaskStatus


class Answer(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class WhoAmI(Answer):
    name: str
    role: Literal["viewer", "operator"]
    can_act: bool
    open: bool = Field(description="an open console (loopback, no token yet): anyone acts")


class TaskRow(Answer):
    """A task as listed: its document without the script's arguments, the checkpoint,
    the result and the leases; `id` for `_id`, `script_id` for the script."""

    id: str
    script_id: str | None = None
    device_id: str
    status: TaskStatus
    queue: str | None = None
    priority: int | None = None
    attempt: int | None = None
    max_retries: int | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    finished_at: datetime | None = None
    last_error: str | None = None
    batch_id: str | None = None


class TaskPage(Answer):
    tasks: list[TaskRow]
    next: str | None = Field(description="`before` of the next page; null: no more")
    partial: bool = Field(description="the page's time ran out first: older matches may "
                                      "follow `next`")
    searched_to: datetime | None = Field(description="the oldest creation time searched")


class TaskDoc(Answer):
    """The task's document as stored (lease tokens left out)."""

    id: str = Field(alias="_id")
    device_id: str
    status: TaskStatus
    script: dict[str, Any]
    attempt: int | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


class HeldLease(Answer):
    agent: str | None
    leased_at: datetime | None
    deadline: datetime | None
    cap: datetime | None
    seq: int | None


class LastLease(Answer):
    agent: str | None
    outcome: str | None


class PullView(Answer):
    checkpoint: dict[str, Any] | None
    lease: HeldLease | None
    last_lease: LastLease | None
    result: dict[str, Any] | None


class Event(Answer):
    at: datetime
    what: str
    detail: str


class TaskDetail(Answer):
    task: TaskDoc
    records: list[dict[str, Any]] = Field(description="the attempts' records, oldest first")
    logs: list[dict[str, Any]] = Field(description="the device's log entries, oldest first")
    pull: PullView | None = Field(description="a pull task's agent side; null: pushed")
    timeline: list[Event]
    dedupe: str | None = Field(None, description="its dedupe key, mode and debounce state; "
                               "null: no key")


class Pause(Answer):
    scope: str
    reason: str
    by: str
    at: str = Field(description="ISO 8601, when it was set ('' if unknown)")


class AgentToken(Answer):
    id: str = Field(description="the token hash's head: tells same-named tokens apart")
    name: str
    prefixes: list[str]
    groups: list[str]
    created_at: datetime | None
    last_used: datetime | None = Field(description="when one of its agents was last seen")


class NewAgentToken(Answer):
    name: str
    token: str = Field(description="shown in this answer only")
    prefixes: list[str]
    groups: list[str]


class RemovedAgentTokens(Answer):
    removed: int
    name: str


class AgentTask(Answer):
    task_id: str
    device_id: str | None
    deadline: datetime | None
    cap: datetime | None


class AgentRow(Answer):
    id: str
    name: str
    labels: list[str]
    devices: list[str]
    version: str
    state: Literal["active", "lost"]
    stop: bool
    last_seen: datetime | None
    registered_at: datetime | None
    leases: int
    tasks: list[AgentTask]


class RunningTask(Answer):
    task_id: str | None
    attempt: int | None


class DeviceRow(Answer):
    """A device of the fleet view: its state now (Redis), its last result and its
    last 24 hours (the consumer's `devices` document)."""

    device_id: str
    state: Literal["free", "running", "benched", "paused"] = Field(
        description="running (holds a device lock) before benched before paused")
    locked: bool
    fence: str | None = Field(description="the device lock's fencing value")
    running: RunningTask | None = Field(description="the attempt holding the lock")
    benched_left_s: float | None
    paused: list[str] = Field(description="the pause scopes that hold its tasks")
    groups: list[str]
    streak: int = Field(description="failures in a row (device health)")
    last_task_id: str | None
    last_result: Literal["SUCCESS", "ERROR", "SYSTEM_ERROR"] | None
    last_error: str | None
    last_finished_at: datetime | None
    day_tasks: int = Field(description="results over the last 24 hours")
    day_ok: int
    day_failed: int
    day_success_rate: float | None = Field(description="day_ok / day_tasks; null: none")


class DevicePage(Answer):
    devices: list[DeviceRow]
    next: str | None = Field(description="`after` of the next page; null: no more")


class Alive(BaseModel):
    status: Literal["ok"]
    role: str
    uptime_s: float


class Check(BaseModel):
    ok: bool
    detail: str


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    role: str
    checks: dict[str, Check]
