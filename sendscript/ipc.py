"""Messages between the master and its worker processes (over multiprocessing pipes)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

# What became of a TaskHandle:
#   sent   - central-control accepted it; the device lock (fence) stays held
#   busy   - the device lock is held by someone else; the task is untouched
#   stale  - the task was no longer pending (another actor won); nothing done
#   failed - the attempt ended in failure and was recorded; the lock is released
#   retry  - the attempt failed and the task waits (retry_waiting) until `run_at`
#   error  - an infrastructure error before the task was claimed; try again later
#   unsent - central-control was unreachable and the request provably never left:
#            the attempt was undone (record deleted, task pending with its attempt
#            counter restored, lock released); try again soon, no attempt used
#   quota  - central-control said its quota is exhausted: undone as for unsent (no
#            attempt used); the master sets the quota pause
#   expired - the task's deadline passed before the POST: not sent, marked expired,
#            lock released; finished (a drop)
#   throttled - central-control answered 429 while an adaptive rate limit is set:
#            undone as for unsent (no attempt used); the limit lowers and honours
#            the answer's Retry-After
Outcome = Literal["sent", "busy", "stale", "failed", "retry", "error", "unsent", "quota",
                  "expired", "throttled"]


def heartbeat_interval_s(worker_timeout_s: float) -> float:
    """How often a worker says it is alive: often enough that a few lost beats
    never add up to the master's silence limit."""
    return min(1.0, worker_timeout_s / 5)


class _Msg(BaseModel):
    model_config = ConfigDict(frozen=True)


class WorkerOnline(_Msg):
    worker_id: int
    pid: int


class WorkerHeartbeat(_Msg):
    """Worker -> master, every `heartbeat_interval_s` from the worker's event loop:
    a worker that stops sending these is hung (its loop cannot run)."""

    worker_id: int


class TaskHandle(_Msg):
    task_id: str
    device_id: str
    attempt: int
    max_retries: int
    timeout_s: float
    priority: int
    queue: str
    script: dict[str, Any]
    retry_base_s: float | None = None
    deadline: datetime | None = None  # not sent after this (expire_at or queue max_wait)
    trace: dict[str, str] | None = None  # the task's trace context, when traced


class TaskLocked(_Msg):
    """Worker -> master, right after the device lock is taken and before the task is
    claimed: the fence this attempt holds. A worker that dies before its send
    leaves a lock only this fence may release; the master releases it at once
    (`master.recovery.Recovery.return_lost_tasks`) instead of waiting for the
    orphaned-lock sweep."""

    task_id: str
    fence: int


class TaskDone(_Msg):
    task_id: str
    device_id: str
    outcome: Outcome
    attempt: int  # the task's attempt counter as the worker left it
    fence: int | None = None
    error: str | None = None
    run_at: datetime | None = None  # for a retry
    # What the send said of central-control itself, for the circuit breaker: True it
    # accepted, False it failed in a way that says it is unwell (unreachable, timed
    # out, 408/429/5xx), None not asked or nothing about its health (busy, refused).
    central_ok: bool | None = None
    send_s: float | None = None  # the POST's duration, when one was made
    status: int | None = None  # central-control's HTTP status, when it refused
    retry_after_s: float | None = None  # its Retry-After header, when it sent one


class WorkerRetiring(_Msg):
    """Worker -> master: replace me (task or memory limit); I take no more tasks."""

    worker_id: int
    reason: str


class Shutdown(_Msg):
    """Master -> worker: finish what you hold, then exit."""

    reason: str = "shutdown"


class WorkerExit(_Msg):
    worker_id: int
    pid: int
    reason: str
    exitcode: int | None = None
