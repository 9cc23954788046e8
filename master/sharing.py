"""Work sharing: with other masters alive, a master leaves in the ready list what it
cannot start soon.

The ready list is shared by every master; a task taken in sits on one master's
board until that master dispatches it. Alone, a master takes up to its high-water
mark (`master.backpressure`): nobody else could run those tasks. With peers, a
burst taken greedily by the master that woke first would wait on its board while
the others sat idle, and the burst would end when that one master finished. So
while other masters are alive a master takes only while its board holds fewer than
its share mark (`SENDSCRIPT_SHARE_PREFETCH`; by default four times its send
slots, workers x worker_concurrency), and the rest waits in Redis for whichever
master has room first.

Once at the mark, a master takes again when its board is down to half of it, a
batch at a time. Tasks on the board that cannot go now (a paused queue, a held or
busy device) must not shut a master out of work it could do: whenever it has send
slots free and no device ready to fill them, it takes as many as it has free
slots, share mark or not. Memory stays bounded by the high-water mark.

`ShareMark` is the rule (pure). `WorkSharing` drives it: the board's counts from
the bus events that change them (and a re-check each second), the number of live
peers from their heartbeats. Intake awaits its `open` event before a take, as it
does backpressure's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from master.bus import Subscription
from master.events import (
    TaskAnswered,
    TaskDispatched,
    TaskHeld,
    TasksQueued,
    TasksWithdrawn,
    WorkRecovered,
)
from sendscript.backoff import every, opened_before_stop
from sendscript.settings import Settings

RECHECK_S = 1.0


@dataclass
class ShareMark:
    """How many tasks one take may bring. `prefetch == 0` turns sharing off. Pure.

    Closed at the mark, open again once the board is down to half of it: a master
    that took one task per dispatch would pay a whole intake round (its Redis calls,
    a store, an acknowledgement) for each, and its CPU a task would grow with the
    number of masters."""

    prefetch: int
    peers: int = 0
    open: bool = True

    @property
    def sharing(self) -> bool:
        return self.prefetch > 0 and self.peers > 0

    def observe(self, queued: int) -> None:
        if queued >= self.prefetch:
            self.open = False
        elif queued <= self.prefetch // 2:
            self.open = True

    def room(self, load: Load, batch: int) -> int:
        if not self.sharing:
            return batch
        self.observe(load.queued)
        below_mark = self.prefetch - load.queued if self.open else 0
        # Nothing on the board can go and slots are free: take what fills them.
        idle_slots = load.free_slots if load.ready == 0 else 0
        return max(0, min(batch, max(below_mark, idle_slots)))


@dataclass(frozen=True)
class Load:
    """What the board and the pool hold now."""

    queued: int  # tasks on the board, whether they can go now or not
    ready: int  # devices ready to dispatch, waiting for a send slot
    free_slots: int  # send slots free in the pool


def share_prefetch(settings: Settings) -> int:
    """The share mark: the setting, or four times the master's send slots."""
    if settings.share_prefetch is not None:
        return settings.share_prefetch
    return 4 * settings.workers * settings.worker_concurrency


class Board(Protocol):
    @property
    def queued(self) -> int: ...

    @property
    def ready(self) -> int: ...


class WorkSharing:
    """The share mark on the master's bus, and the `open` event intake waits on."""

    def __init__(self, settings: Settings, board: Board, free_slots: Callable[[], int],
                 live_peers: Callable[[], Awaitable[int]]) -> None:
        self.settings = settings
        self.board = board  # read-only views: the board's counts, the pool's free slots
        self.free_slots = free_slots
        self.live_peers = live_peers  # other masters with a heartbeat
        self.mark = ShareMark(share_prefetch(settings))
        self.open = asyncio.Event()
        self.open.set()
        self.waits = 0  # times intake found the board at the mark

    def subscriptions(self) -> list[Subscription]:
        # The board's counts move on these: tasks queued, dispatched, withdrawn, put
        # back (a busy device's answer), a lost worker's tasks back, a device held.
        return [(kind, self._on_event) for kind in (
            TasksQueued, TaskDispatched, TasksWithdrawn, TaskAnswered, WorkRecovered,
            TaskHeld)]

    def _on_event(self, _event: object) -> None:
        self.update()

    def load(self) -> Load:
        return Load(self.board.queued, self.board.ready, self.free_slots())

    def update(self) -> None:
        # Alone (the common case) nothing is counted: this runs on every dispatch.
        if not self.mark.sharing or self.mark.room(self.load(), 1):
            self.open.set()
        else:
            self.open.clear()

    async def wait_open(self, stop: asyncio.Event) -> bool:
        """Until intake may take (True) or the master stops (False)."""
        self.update()
        if not self.open.is_set():
            self.waits += 1
        return await opened_before_stop(self.open, stop)

    def room(self, batch: int) -> int:
        return self.mark.room(self.load(), batch) if self.mark.sharing else batch

    async def run(self, stop: asyncio.Event) -> None:
        """Count the live peers once a heartbeat (a peer that starts or dies turns
        sharing on or off within one interval), and re-check the mark each second for
        the changes no event announces (a held device's hold ending, a worker back)."""
        async def count() -> None:
            self.mark.peers = await self.live_peers()
            self.update()

        async def recheck() -> None:
            self.update()

        await asyncio.gather(
            every(stop, self.settings.heartbeat_interval_s, "peer count", count),
            every(stop, RECHECK_S, "share mark re-check", recheck, wait_first=True))

    def report(self) -> dict[str, Any]:
        return {"sharing": self.mark.sharing, "share_prefetch": self.mark.prefetch,
                "live_peers": self.mark.peers, "share_waits": self.waits}
