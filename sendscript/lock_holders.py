"""Which attempt holds a device lock: pure parts of the read, no I/O.

A device lock is held by the open exec record (running or sent) that carries its
fence as `lock_value`. The record is found through the task the lock was taken for,
with no index on the fence, which every write of a record would pay for (the
embedded server rewrites every index entry of a document on each of its writes):

- a lock names its task as owner (`{prefix}:lock:owners`, sendscript/locks.py): the
  open records of those tasks, by the records' (task, attempt) index. This also
  finds a task cancelled after it was sent, whose attempt still runs on the device
  and still holds the lock;
- a lock taken without an owner (an earlier version took an agent's so): the tasks
  running or sent on its device (the status index), then their current records by
  id.

Each record read fetches about the records it finds, as the read by fence did. The
reads go in chunks of ids (`store.chunks`): a server may match a long `$in` list
against every document it fetches, and a sweep names every lock held.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sendscript.locks import owner_entry
from sendscript.status import IN_FLIGHT, RECORD_OPEN
from sendscript.store import chunks

OPEN_TASKS = sorted(str(s) for s in IN_FLIGHT)
OPEN_RECORDS = sorted(str(s) for s in RECORD_OPEN)
TASK_FIELDS = {"record_id": 1}
RECORD_FIELDS = {"task_id": 1, "attempt": 1, "device_id": 1, "lock_value": 1, "status": 1}


def owner_task(entry: bytes | str | None, fence: int) -> str | None:
    """The task an owners-hash entry ("<fence> <task id> <worker>") names, if it was
    written for this fence; an entry of an earlier lock of the device says nothing."""
    found = owner_entry(entry, fence)
    return (found[1].partition(" ")[0] or None) if found else None


def owned_records(held: Mapping[str, int],
                  owned: Mapping[str, str | None]) -> list[dict[str, Any]]:
    """The reads of the open records of the tasks the `held` locks (device -> fence)
    name as owners (`owned`: device -> task id or None); none when none names one."""
    ids = sorted({t for d, t in owned.items() if t and d in held})
    return [{"task_id": {"$in": part}, "status": {"$in": OPEN_RECORDS}} for part in chunks(ids)]


def unowned_tasks(held: Mapping[str, int],
                  owned: Mapping[str, str | None]) -> list[dict[str, Any]]:
    """The reads of the tasks running or sent on the devices whose lock names no owner
    (a read of every running task: rare, and only for those); none when there are none."""
    unowned = sorted(d for d in held if not owned.get(d))
    return [{"status": {"$in": OPEN_TASKS}, "device_id": {"$in": part}}
            for part in chunks(unowned)]


def current_records(tasks: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The reads of the open records those tasks point at; none when they point at none."""
    ids = sorted({str(t["record_id"]) for t in tasks if t.get("record_id")})
    return [{"_id": {"$in": part}, "status": {"$in": OPEN_RECORDS}} for part in chunks(ids)]


def holding(held: Mapping[str, int],
            records: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """device -> the open record whose fence is the device's lock now."""
    return {r["device_id"]: r for r in records
            if r.get("status") in OPEN_RECORDS and r.get("device_id") in held
            and held[r["device_id"]] == r.get("lock_value")}
