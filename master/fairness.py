"""Which ready device goes next: priority first, then fair shares between flows. Pure.

A flow is what a task came with: its fan-out batch, or else its queue. Strict age
order across all devices would make a task for an idle device wait behind every
task of a 20,000-device fan-out pushed before it; here flows of one priority take
turns instead (start-time fair queuing: each flow carries a virtual time that
grows by 1 / weight per task served, and the flow with the smallest goes next),
so a single task starts within a few dispatches however large the batch ahead.
A higher priority always goes first.

Entries are (key, device id), key = (-priority, created, seq) of the device's
head task. The board says through `valid` whether an entry still stands (the
device may have been taken, or its head changed); stale ones are dropped here.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

SortKey = tuple[int, float, int]
Entry = tuple[SortKey, str]
Valid = Callable[[SortKey, str], bool]


class FairReady:
    def __init__(self) -> None:
        self._weights: dict[str, float] = {}  # flow -> share (1 unless given)
        self._flows: dict[str, list[Entry]] = {}
        self._order: list[tuple[int, float, int, str]] = []  # (-priority, vtime, seq, flow)
        self._listed: dict[str, tuple[int, float]] = {}  # flow -> its live order entry
        self._vtime: dict[str, float] = {}
        self._clock = 0.0
        self._seq = itertools.count()

    def push(self, flow: str, key: SortKey, device_id: str, weight: float = 1.0) -> None:
        self._weights[flow] = weight
        heapq.heappush(self._flows.setdefault(flow, []), (key, device_id))
        listed = self._listed.get(flow)
        if listed is None or key[0] < listed[0]:
            self._list(flow, key[0])

    def pop(self, valid: Valid) -> tuple[str, SortKey, str] | None:
        """The next valid entry (removed), with its flow; None if no device is ready."""
        while self._order:
            neg_priority, vtime, _, flow = heapq.heappop(self._order)
            if self._listed.get(flow) != (neg_priority, vtime):
                continue  # superseded by a newer entry of the same flow
            head = self._valid_head(flow, valid)
            if head is None:
                self._unlist(flow)
                continue
            if head[0][0] != neg_priority:
                self._list(flow, head[0][0])  # its best task left: list it as it is now
                continue
            heapq.heappop(self._flows[flow])
            self._serve(flow, vtime)
            return flow, head[0], head[1]
        return None

    def clear(self) -> None:
        self._flows.clear()
        self._order.clear()
        self._listed.clear()
        self._vtime.clear()
        self._weights.clear()

    def __len__(self) -> int:
        return sum(len(h) for h in self._flows.values())

    # -- internals --------------------------------------------------------------------
    def _valid_head(self, flow: str, valid: Valid) -> Entry | None:
        heap = self._flows.get(flow)
        while heap and not valid(*heap[0]):
            heapq.heappop(heap)
        return heap[0] if heap else None

    def _list(self, flow: str, neg_priority: int) -> None:
        vtime = self._vtime[flow] = max(self._vtime.get(flow, 0.0), self._clock)
        self._listed[flow] = (neg_priority, vtime)
        heapq.heappush(self._order, (neg_priority, vtime, next(self._seq), flow))

    def _unlist(self, flow: str) -> None:
        self._listed.pop(flow, None)
        self._flows.pop(flow, None)
        self._vtime.pop(flow, None)  # back later, it starts from the clock
        self._weights.pop(flow, None)

    def _serve(self, flow: str, vtime: float) -> None:
        self._clock = max(self._clock, vtime)
        self._vtime[flow] = vtime + 1.0 / self._weights.get(flow, 1.0)
        heap = self._flows[flow]
        if heap:
            self._list(flow, heap[0][0][0])
        else:
            self._unlist(flow)
