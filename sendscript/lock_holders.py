"""Which attempt holds a device lock: pure parts of the read, no I/O.

A device lock is held by the open exec record (running or sent) that carries its
fence as `lock_value`. That record is the current attempt (`record_id`) of its
task, and the task is found two ways, both by indexes every task write pays for
already:

- by the lock's owner (`{prefix}:lock:owners`, sendscript/locks.py): the task the
  worker or agent took the lock for. This also finds a task cancelled after it was
  sent, whose attempt still runs on the device and still holds the lock;
- for a lock taken without an owner (an earlier version took an agent's so), among
  the tasks running or sent on its device (the status index).

Then the records by id. Reading the holders of N locks is two reads by id, and no
write of an exec record pays for an index on its fence: the embedded
server rewrites every index entry of a document on each of its writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sendscript.status import RecordStatus, TaskStatus

OPEN_TASKS = [str(TaskStatus.RUNNING), str(TaskStatus.SENT)]
OPEN_RECORDS = [str(RecordStatus.RUNNING), str(RecordStatus.SENT)]
TASK_FIELDS = {"record_id": 1}
RECORD_FIELDS = {"task_id": 1, "attempt": 1, "device_id": 1, "lock_value": 1, "status": 1}


def owner_task(entry: bytes | str | None, fence: int) -> str | None:
    """The task an owners-hash entry ("<fence> <task id> <worker>") names, if it was
    written for this fence; an entry of an earlier lock of the device says nothing."""
    if not entry:
        return None
    text = entry.decode() if isinstance(entry, bytes) else entry
    parts = text.split(" ")
    if len(parts) < 2 or parts[0] != str(fence) or not parts[1]:
        return None
    return parts[1]


def task_queries(held: Mapping[str, int],
                 owned: Mapping[str, str | None]) -> list[dict[str, Any]]:
    """The task reads that find every candidate holder of the `held` locks (device ->
    fence), given the task each lock's owner names (`owned`: device -> task id or
    None): the owners' tasks by id, and for the locks with no owner the tasks running
    or sent on their devices (a read of every running task: rare, and only for
    those)."""
    queries: list[dict[str, Any]] = []
    ids = sorted({t for d, t in owned.items() if t and d in held})
    if ids:
        queries.append({"_id": {"$in": ids}})
    unowned = sorted(d for d in held if not owned.get(d))
    if unowned:
        queries.append({"status": {"$in": OPEN_TASKS}, "device_id": {"$in": unowned}})
    return queries


def record_query(tasks: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The open records those tasks point at; None when they point at none."""
    ids = sorted({str(t["record_id"]) for t in tasks if t.get("record_id")})
    if not ids:
        return None
    return {"_id": {"$in": ids}, "status": {"$in": OPEN_RECORDS}}


def holding(held: Mapping[str, int],
            records: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """device -> the open record whose fence is the device's lock now."""
    return {r["device_id"]: r for r in records
            if r.get("status") in OPEN_RECORDS and r.get("device_id") in held
            and held[r["device_id"]] == r.get("lock_value")}
