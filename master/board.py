"""Per-device queues and which device may be dispatched next. Pure logic, no I/O.

A device holds at most one dispatched task at a time. After its worker reports
the script sent, the device stays held by that attempt's lock fence until the
consumer announces the fence freed (or the fallback check finds the lock gone).
Within a device, higher priority goes first, then older. Across devices, the
device whose head task has the highest priority goes first; at one priority,
flows (a fan-out batch, or else a queue) take fair turns, weighted per queue,
and within a flow the oldest goes first (`master.fairness`).
The board also counts, per named queue, the tasks that hold a device (dispatched
or sent and not yet freed), so the master can cap what a queue runs at once.

A task may reach the board again at a newer attempt while an older copy of it is
queued or in flight here: two masters held it (a queue item a Redis failover kept
after one took it, a dead master's tasks handed out while it was only cut off), the
other ran an attempt, which failed and was retried, and this master fired the retry.
The older copy can only go stale (its claim names the older attempt), so the newer
one takes its place, or follows it once it is no longer in flight; refused, the
task would stay pending, held by this master, on no board.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from master.fairness import FairReady, SortKey
from sendscript.models import Task


def sort_key(task: Task, seq: int) -> SortKey:
    return (-task.priority, task.created_at.timestamp(), seq)


def flow_of(task: Task) -> str:
    """Whose turn a task shares: its fan-out batch, else its queue."""
    return f"batch:{task.batch_id}" if task.batch_id else f"queue:{task.queue}"


@dataclass
class Device:
    id: str
    queue: list[tuple[SortKey, Task]] = field(default_factory=list)
    inflight: Task | None = None
    held_fence: int | None = None  # our sent attempt still holds the device lock
    blocked: bool = False  # someone else holds the lock
    cooling: bool = False  # an error just happened; wait for wake()
    freed_fence: int = 0  # newest fence announced free
    holder_queue: str | None = None  # queue of our task that holds the device
    successor: Task | None = None  # the in-flight task again, at a newer attempt

    @property
    def free(self) -> bool:
        return (
            self.inflight is None
            and self.held_fence is None
            and not self.blocked
            and not self.cooling
        )

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing held: the board may forget it."""
        return self.free and not self.queue

    def head(self) -> tuple[SortKey, Task] | None:
        return self.queue[0] if self.queue else None


class DeviceBoard:
    def __init__(self, caps: dict[str, int] | None = None,
                 weights: dict[str, float] | None = None) -> None:
        self.caps = dict(caps or {})  # queue -> most tasks holding devices at once
        self.weights = dict(weights or {})  # queue -> share of dispatch turns (default 1)
        self.devices: dict[str, Device] = {}
        self._ready = FairReady()
        self._queued: dict[str, tuple[SortKey, str]] = {}  # task id -> (key, device id)
        self._seq = itertools.count()
        self._back_seq = itertools.count(-1, -1)  # put back: ahead of every queued peer
        self.running_by_queue: Counter[str] = Counter()
        # Ready entries whose head task's queue is at its cap, until a slot frees.
        self._parked: dict[str, list[tuple[SortKey, str]]] = {}

    # -- adding and taking -------------------------------------------------
    def add(self, task: Task) -> bool:
        """Queue a pending task; False if the board holds it already (a copy at an
        older attempt is replaced by it, or followed by it if in flight)."""
        if task.id in self._queued:
            self._replace_queued(task)
            return False
        if self._is_inflight(task):
            self._follow_inflight(task)
            return False
        key = sort_key(task, next(self._seq))
        self._push(task, key)
        return True

    def put_back(self, task: Task) -> None:
        """Return a dispatched task to the head of its device's queue."""
        key = sort_key(task, next(self._back_seq))
        if task.id not in self._queued:
            self._push(task, key)

    def next(self) -> Task | None:
        """The next task to dispatch, marking its device in flight; None if none may go."""
        while (entry := self._ready.pop(self._stands)) is not None:
            _, key, device_id = entry
            device = self.devices[device_id]
            task = device.queue[0][1]
            if self._at_cap(task.queue):
                self._parked.setdefault(task.queue, []).append((key, device_id))
                continue
            heapq.heappop(device.queue)
            del self._queued[task.id]
            device.inflight = task
            device.holder_queue = task.queue
            self.running_by_queue[task.queue] += 1
            return task
        return None

    def _stands(self, key: SortKey, device_id: str) -> bool:
        """A ready entry still names a free device whose head task has this key."""
        device = self.devices.get(device_id)
        return (device is not None and device.free and bool(device.queue)
                and device.queue[0][0] == key)

    # -- what happened to a dispatched task ----------------------------------
    def sent(self, device_id: str, fence: int) -> None:
        device = self._device(device_id)
        self._land(device, None)
        if device.freed_fence < fence:
            device.held_fence = fence
        else:
            self._end_hold(device)
        self._settle(device)

    def busy(self, task: Task) -> None:
        """The device lock is someone else's: keep the task, wait for a free event."""
        device = self._device(task.device_id)
        task = self._land(device, task)
        device.blocked = True
        self._end_hold(device)
        self.put_back(task)

    def finished(self, device_id: str) -> None:
        """The attempt ended (failed, stale) and its lock was released."""
        device = self._device(device_id)
        self._land(device, None)
        self._end_hold(device)
        self._settle(device)

    def failed_to_start(self, task: Task) -> None:
        """An infrastructure error before the task was claimed: keep it, cool down."""
        device = self._device(task.device_id)
        task = self._land(device, task)
        device.cooling = True
        self._end_hold(device)
        self.put_back(task)

    def lost(self, task: Task | None, device_id: str) -> None:
        """The worker died holding the task: whatever lock it took decides what's next."""
        device = self._device(device_id)
        task = self._land(device, task)
        self._end_hold(device)
        if task is not None:
            self.put_back(task)
        self._settle(device)

    # -- device events ---------------------------------------------------------
    def freed(self, device_id: str, fence: int) -> bool:
        """A lock was released (consumer event). True if the device became free."""
        device = self.devices.get(device_id)
        if device is None:
            return False
        device.freed_fence = max(device.freed_fence, fence)
        was_free = device.free
        if device.held_fence is not None and fence >= device.held_fence:
            device.held_fence = None
            self._end_hold(device)
        if device.blocked:
            device.blocked = False  # try again; the lock tells us if it is taken anew
        self._settle(device)
        return device.free and not was_free

    def lock_gone(self, device_id: str) -> bool:
        """The fallback check found no lock: whatever we waited for is over."""
        device = self.devices.get(device_id)
        if device is None or device.inflight is not None:
            return False
        was_free = device.free
        if device.held_fence is not None:
            device.held_fence = None
            self._end_hold(device)
        device.blocked = False
        self._settle(device)
        return device.free and not was_free

    def wake(self, device_id: str) -> None:
        device = self.devices.get(device_id)
        if device is not None and device.cooling:
            device.cooling = False
            self._settle(device)

    # -- views -----------------------------------------------------------------
    def waiting_on_locks(self) -> list[str]:
        """Devices with queued work that wait for a lock to go."""
        return [
            d.id for d in self.devices.values()
            if d.queue and d.inflight is None and (d.held_fence is not None or d.blocked)
        ]

    def remove(self, task_id: str) -> Task | None:
        """Take one queued (not dispatched) task off the board."""
        entry = self._queued.pop(task_id, None)
        if entry is None:
            return None
        key, device_id = entry
        device = self.devices[device_id]
        index = next(i for i, (k, _) in enumerate(device.queue) if k == key)
        _, task = device.queue.pop(index)
        heapq.heapify(device.queue)
        if device.free and device.queue and index == 0:
            self._ready_push(device)
        if device.idle:
            del self.devices[device.id]
        return task

    def queued_tasks(self) -> Iterator[Task]:
        for device in self.devices.values():
            for _, task in device.queue:
                yield task

    def drain(self) -> list[Task]:
        """Take every queued (not dispatched) task off the board."""
        tasks = list(self.queued_tasks())
        for device in self.devices.values():
            device.queue.clear()
        self._queued.clear()
        self._ready.clear()
        self._parked.clear()
        for device_id in [d.id for d in self.devices.values() if d.idle]:
            del self.devices[device_id]
        return tasks

    @property
    def queued(self) -> int:
        return len(self._queued)

    @property
    def ready(self) -> int:
        """Devices ready to dispatch now (free, with a task), waiting for a send slot.
        An upper bound: an entry gone stale is dropped only when dispatch reaches it."""
        return len(self._ready)

    @property
    def held_devices(self) -> int:
        return sum(1 for d in self.devices.values() if not d.free)

    def contains(self, task_id: str) -> bool:
        return task_id in self._queued

    def holds(self, task_id: str) -> bool:
        """Queued, in flight, or following its own in-flight copy."""
        return task_id in self._queued or any(
            t is not None and t.id == task_id
            for d in self.devices.values() for t in (d.inflight, d.successor))

    # -- internals ---------------------------------------------------------------
    def _device(self, device_id: str) -> Device:
        device = self.devices.get(device_id)
        if device is None:
            device = self.devices[device_id] = Device(device_id)
        return device

    def _land(self, device: Device, task: Task | None) -> Task | None:
        """The in-flight task is back or done: what to put back in its place (its newer
        copy, if one came meanwhile; one that is not put back is queued here)."""
        device.inflight = None
        successor, device.successor = device.successor, None
        if successor is None:
            return task
        if task is None:
            self.put_back(successor)
            return None
        return successor

    def _replace_queued(self, task: Task) -> None:
        key, device_id = self._queued[task.id]
        device = self.devices[device_id]
        index = next(i for i, (k, _) in enumerate(device.queue) if k == key)
        if task.attempt > device.queue[index][1].attempt:
            device.queue[index] = (key, task)  # same key: the heap order holds

    def _follow_inflight(self, task: Task) -> None:
        device = self.devices[task.device_id]
        newest = device.successor or device.inflight
        if newest is not None and task.attempt > newest.attempt:
            device.successor = task

    def _is_inflight(self, task: Task) -> bool:
        device = self.devices.get(task.device_id)
        return device is not None and device.inflight is not None and (
            device.inflight.id == task.id
        )

    def _push(self, task: Task, key: SortKey) -> None:
        device = self._device(task.device_id)
        heapq.heappush(device.queue, (key, task))
        self._queued[task.id] = (key, device.id)
        if device.free and device.queue[0][0] == key:
            self._ready_push(device)

    def _at_cap(self, queue: str) -> bool:
        cap = self.caps.get(queue)
        return cap is not None and self.running_by_queue[queue] >= cap

    def _end_hold(self, device: Device) -> None:
        queue = device.holder_queue
        if queue is None:
            return
        device.holder_queue = None
        self.running_by_queue[queue] -= 1
        if self.running_by_queue[queue] <= 0:
            del self.running_by_queue[queue]
        if not self._at_cap(queue):
            for _, device_id in self._parked.pop(queue, []):
                device = self.devices.get(device_id)
                if device is not None and device.free and device.queue:
                    self._ready_push(device)

    def _settle(self, device: Device) -> None:
        if device.idle:
            del self.devices[device.id]
        elif device.free and device.queue:
            self._ready_push(device)

    def _ready_push(self, device: Device) -> None:
        key, task = device.queue[0]
        self._ready.push(flow_of(task), key, device.id, self.weights.get(task.queue, 1.0))
