"""The task and exec-record state machines: every status change is built here.

Each transition is a compare-and-set in Mongo: the filter names the expected
status (and attempt where it matters). A CAS that matches nothing means another
actor won the race; callers treat that as an answer, not an error.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any


class TaskStatus(StrEnum):
    WAITING = "waiting"
    PENDING = "pending"
    RUNNING = "running"
    SENT = "sent"
    SUCCESS = "success"
    FAILED = "failed"
    RETRY_WAITING = "retry_waiting"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class RecordStatus(StrEnum):
    RUNNING = "running"
    SENT = "sent"
    SUCCESS = "success"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


S = TaskStatus
TERMINAL: frozenset[TaskStatus] = frozenset({S.SUCCESS, S.FAILED, S.CANCELLED, S.EXPIRED})
ACTIVE: frozenset[TaskStatus] = frozenset(TaskStatus) - TERMINAL
# A task with an attempt in a worker's or an agent's hands: its device is locked for it.
IN_FLIGHT: frozenset[TaskStatus] = frozenset({S.RUNNING, S.SENT})

# A device result for attempt k may arrive after the master put the task back
# (its worker died mid-send) while the attempt number is still k: applying it
# then saves running the script twice. Hence pending/retry_waiting -> terminal.
TASK_TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    S.WAITING: frozenset({S.PENDING, S.CANCELLED, S.EXPIRED}),
    S.PENDING: frozenset(
        {S.RUNNING, S.WAITING, S.SUCCESS, S.FAILED, S.CANCELLED, S.EXPIRED}
    ),
    # running -> expired: a worker found the deadline past right before the POST.
    S.RUNNING: frozenset(
        {S.SENT, S.PENDING, S.SUCCESS, S.FAILED, S.RETRY_WAITING, S.CANCELLED, S.EXPIRED}
    ),
    S.SENT: frozenset({S.SUCCESS, S.FAILED, S.RETRY_WAITING, S.CANCELLED}),
    S.RETRY_WAITING: frozenset({S.PENDING, S.SUCCESS, S.FAILED, S.CANCELLED, S.EXPIRED}),
    S.SUCCESS: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
    S.EXPIRED: frozenset(),
}

R = RecordStatus
RECORD_TERMINAL: frozenset[RecordStatus] = frozenset({R.SUCCESS, R.FAILED, R.TIMEOUT, R.CANCELLED})
# An attempt that may still run on its device: its record holds the device's lock, and a
# result for it counts.
RECORD_OPEN: frozenset[RecordStatus] = frozenset(RecordStatus) - RECORD_TERMINAL
RECORD_TRANSITIONS: dict[RecordStatus, frozenset[RecordStatus]] = {
    R.RUNNING: frozenset({R.SENT, R.SUCCESS, R.FAILED, R.TIMEOUT, R.CANCELLED}),
    R.SENT: frozenset({R.SUCCESS, R.FAILED, R.TIMEOUT, R.CANCELLED}),
    R.SUCCESS: frozenset(),
    R.FAILED: frozenset(),
    R.TIMEOUT: frozenset(),
    R.CANCELLED: frozenset(),
}


class InvalidTransition(ValueError):
    pass


@dataclass
class Retention:
    """How long finished tasks and records are kept (a TTL index reads `purge_at`), and
    how long a finished task keeps its dedupe key (0: released as it finishes)."""

    success_s: float = 7 * 86400
    failed_s: float = 30 * 86400
    dedupe_window_s: float = 86400

    def purge_at(self, status: str, now: datetime) -> datetime:
        keep = self.success_s if status in (S.SUCCESS, R.SUCCESS) else self.failed_s
        return now + timedelta(seconds=keep)


RETENTION = Retention()


def configure_retention(
    success_s: float, failed_s: float, dedupe_window_s: float | None = None
) -> None:
    """Set once per process from the settings, before any task finishes."""
    RETENTION.success_s = success_s
    RETENTION.failed_s = failed_s
    if dedupe_window_s is not None:
        RETENTION.dedupe_window_s = dedupe_window_s


def _sources(
    frm: TaskStatus | RecordStatus | Iterable[Any],
) -> list[Any]:
    if isinstance(frm, StrEnum):
        return [frm]
    return sorted(frm)


def _check(table: dict[Any, frozenset[Any]], sources: list[Any], to: Any) -> None:
    for src in sources:
        if to not in table[src]:
            raise InvalidTransition(f"{src} -> {to} is not a transition")


CANCELLABLE: frozenset[TaskStatus] = frozenset(
    {S.WAITING, S.PENDING, S.RETRY_WAITING, S.RUNNING, S.SENT}
)
SCHEDULED: frozenset[TaskStatus] = frozenset({S.WAITING, S.RETRY_WAITING})


def task_cas(
    task_id: str | list[str] | dict[str, Any],
    frm: TaskStatus | Iterable[TaskStatus],
    to: TaskStatus,
    now: datetime,
    *,
    attempt: int | None = None,
    set_: dict[str, Any] | None = None,
    unset: Iterable[str] = (),
    inc: dict[str, int] | None = None,
    extra_filter: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(filter, update) moving a task from `frm` to `to`: one id, a list of ids
    (for update_many), or a filter naming the tasks (a batch)."""
    sources = _sources(frm)
    _check(TASK_TRANSITIONS, sources, to)
    if isinstance(task_id, dict):
        flt: dict[str, Any] = dict(task_id)
    elif isinstance(task_id, list):
        flt = {"_id": {"$in": task_id}}
    else:
        flt = {"_id": task_id}
    flt["status"] = sources[0] if len(sources) == 1 else {"$in": [str(s) for s in sources]}
    if attempt is not None:
        flt["attempt"] = attempt
    if extra_filter:
        flt.update(extra_filter)
    fields: dict[str, Any] = {"status": str(to), "updated_at": now}
    unset = list(unset)
    if to in TERMINAL:
        fields["finished_at"] = now
        fields["purge_at"] = RETENTION.purge_at(to, now)
        if RETENTION.dedupe_window_s <= 0:
            # No window: the key is free as the task ends. With a window the finished
            # task keeps it, and a later duplicate releases it once the window has
            # passed (release_dedupe): no extra write when a task finishes.
            unset.append("dedupe_active")
    if set_:
        fields.update(set_)
    update: dict[str, Any] = {"$set": fields}
    if inc:
        update["$inc"] = inc
    if unset:
        update["$unset"] = {name: "" for name in unset}
    return flt, update


def record_cas(
    record_id: str,
    frm: RecordStatus | Iterable[RecordStatus],
    to: RecordStatus,
    now: datetime,
    *,
    set_: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(filter, update) for moving one exec record from `frm` to `to`."""
    sources = _sources(frm)
    _check(RECORD_TRANSITIONS, sources, to)
    flt: dict[str, Any] = {"_id": record_id}
    flt["status"] = sources[0] if len(sources) == 1 else {"$in": [str(s) for s in sources]}
    fields: dict[str, Any] = {"status": str(to)}
    if to in RECORD_TERMINAL:
        fields["finished_at"] = now
        fields["purge_at"] = RETENTION.purge_at(to, now)
    if set_:
        fields.update(set_)
    return flt, {"$set": fields}


def record_sent(
    record_id: str, sent_at: datetime, send_error: str | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Stamp `sent_at` on a record and move it running -> sent if it is still running.

    The device may report before the worker gets here; then the record is already
    final and keeps its status, but the time it was sent is still worth keeping.
    `send_error` notes a send whose answer was lost (it may have been accepted).
    """
    _check(RECORD_TRANSITIONS, [R.RUNNING], R.SENT)
    status = {"$cond": [{"$eq": ["$status", str(R.RUNNING)]}, str(R.SENT), "$status"]}
    fields: dict[str, Any] = {"sent_at": sent_at, "status": status}
    if send_error:
        fields["send_error"] = send_error
    return {"_id": record_id}, [{"$set": fields}]


RETRYABLE_BY_HAND: frozenset[TaskStatus] = frozenset({S.FAILED, S.EXPIRED, S.CANCELLED})


def manual_retry(
    task_id: str, now: datetime, attempts: int | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """An operator's override of a final status: failed / expired / cancelled -> pending.

    The task keeps its history (attempt count, records) and gets `attempts` more
    tries (default: its original budget, max_retries + 1), so the limit of sends
    per task stays `max_retries + 1` with the raised max_retries.
    """
    more: Any = attempts if attempts is not None else {"$add": ["$max_retries", 1]}
    flt = {"_id": task_id, "status": {"$in": sorted(str(x) for x in RETRYABLE_BY_HAND)}}
    return flt, [
        {"$set": {"status": str(S.PENDING), "updated_at": now, "run_at": now,
                  "max_retries": {"$add": ["$attempt", more, -1]},
                  "dedupe_active": "$dedupe_key", "retried_by_hand": {
                      "$add": [{"$ifNull": ["$retried_by_hand", 0]}, 1]}}},
        {"$unset": ["finished_at", "purge_at", "master"]},
    ]


def release_dedupe(
    task_id: str, key: str, now: datetime, window_s: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(filter, update) freeing the dedupe key of a task that finished more than
    `window_s` ago, so that a new submission with that key can be stored. The filter
    names the key, a final status and the age: a task retried by hand meanwhile, or
    finished too recently, keeps its key. Not a status change."""
    return (
        {"_id": task_id, "dedupe_active": key, "status": {"$in": sorted(str(x) for x in TERMINAL)},
         "finished_at": {"$lte": now - timedelta(seconds=window_s)}},
        {"$unset": {"dedupe_active": ""}},
    )


def dedupe_released(doc: dict[str, Any], now: datetime, window_s: float) -> bool:
    """Whether the task `doc` (status, finished_at) no longer holds its dedupe key."""
    finished = doc.get("finished_at")
    if doc.get("status") not in TERMINAL or finished is None:
        return False
    if finished.tzinfo is None:  # pymongo answers naive UTC unless told otherwise
        finished = finished.replace(tzinfo=now.tzinfo)
    return finished <= now - timedelta(seconds=window_s)
