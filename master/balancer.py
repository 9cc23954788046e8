"""Which worker gets a device's task: device affinity, then load. Pure logic.

Prefer a worker that holds no task of this device, least loaded first; failing
that, the worker holding fewest tasks of the device, then least loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar


class WorkerLoad(Protocol):
    @property
    def load(self) -> int: ...

    @property
    def capacity(self) -> int: ...

    def device_load(self, device_id: str) -> int: ...


W = TypeVar("W", bound="WorkerLoad")


def select_worker(workers: Sequence[W], device_id: str) -> W | None:
    ready = [w for w in workers if w.load < w.capacity]
    if not ready:
        return None
    untouched = [w for w in ready if w.device_load(device_id) == 0]
    if untouched:
        return min(untouched, key=lambda w: w.load)
    return min(ready, key=lambda w: (w.device_load(device_id), w.load))
