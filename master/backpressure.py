"""Backpressure: a master stops taking from the ready list while it holds too much.

However long the Redis ready list grows, a master holds at most about its high-water
number of tasks in memory: the tasks queued on its device board plus the delayed
tasks in its heap (intake sends the ones due within the horizon there, so that is
what grows when producers queue delayed work). At the high-water mark the intake
stops taking; items wait in Redis, where they cost the master nothing. Once
dispatch has brought the count down to the low-water mark, intake takes again.
The gap between the two marks keeps intake from flapping at the edge.

`WaterMarks` is the state machine (pure). `Backpressure` drives it from the bus:
every event that changes the count makes it read the count again (O(1): a
re-read, not a tally that could drift), with a slow periodic re-check for the
changes no event announces (the delay loader filling the heap, cancelled tasks
leaving it). Intake awaits its `open` event before each take, and takes at most
the room left below the mark. One fan-out item still becomes a task per device:
it alone may overshoot by its size (intake cannot know the size before reading it).
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import Any, Protocol

from loguru import logger

from master.bus import Bus, Subscription
from master.events import (
    Incident,
    TaskAnswered,
    TaskDispatched,
    TasksQueued,
    TasksTaken,
    TasksWithdrawn,
    WorkRecovered,
)
from sendscript.backoff import every, opened_before_stop
from sendscript.settings import Settings

HIGH_WATER = "high_water"  # the incident's kind
RECHECK_S = 1.0  # the re-check for changes no event announces


class Change(enum.Enum):
    CLOSED = "closed"  # reached high water: stop taking
    OPENED = "opened"  # back down to low water: take again


@dataclass
class WaterMarks:
    """Open until the count reaches `high`; then closed until it is down to `low`.
    `high == 0` turns backpressure off (always open). Pure."""

    high: int
    low: int
    open: bool = True
    closings: int = 0
    peak: int = 0  # the largest count observed

    def __post_init__(self) -> None:
        if self.high < 0 or self.low < 0:
            raise ValueError("SENDSCRIPT_HIGH_WATER and SENDSCRIPT_LOW_WATER must be >= 0")
        if self.high and self.low >= self.high:
            raise ValueError(f"SENDSCRIPT_LOW_WATER ({self.low}) must be below "
                             f"SENDSCRIPT_HIGH_WATER ({self.high})")

    @property
    def enabled(self) -> bool:
        return self.high > 0

    def observe(self, count: int) -> Change | None:
        """The count now; the change of state it makes, if any."""
        self.peak = max(self.peak, count)
        if not self.enabled:
            return None
        if self.open and count >= self.high:
            self.open = False
            self.closings += 1
            return Change.CLOSED
        if not self.open and count <= self.low:
            self.open = True
            return Change.OPENED
        return None

    def room(self, count: int, batch: int) -> int:
        """How many items one take may bring: a full batch far from the mark, only
        what fits below it near the mark (at least one while open, none while closed)."""
        if not self.enabled:
            return batch
        if not self.open:
            return 0
        return max(1, min(batch, self.high - count))


class Board(Protocol):
    @property
    def queued(self) -> int: ...


class Backlog:
    """The count the marks watch, read from two read-only views: the tasks queued on
    the board and those waiting in the delay heap."""

    def __init__(self, board: Board, delayed: Sized) -> None:
        self.board = board
        self.delayed = delayed

    def __call__(self) -> int:
        return self.board.queued + len(self.delayed)


class Backpressure:
    """The water marks on the master's bus, and the `open` event intake waits on."""

    def __init__(self, settings: Settings, bus: Bus, count: Callable[[], int]) -> None:
        self.settings = settings
        self.bus = bus
        self.count = count  # tasks this master holds: board queued + delay heap
        self.marks = WaterMarks(settings.high_water, settings.low_water)
        self.open = asyncio.Event()
        self.open.set()
        self._closed_at: float | None = None
        self.throttled_s = 0.0  # total time closed, finished spells only

    def subscriptions(self) -> list[Subscription]:
        # Events after which the count may have crossed a mark: tasks in (queued, a
        # busy device's task put back, a lost worker's tasks back), tasks out
        # (dispatched, withdrawn), delayed tasks fired out of the heap (taken).
        return [(kind, self._on_event) for kind in (
            TasksQueued, TaskDispatched, TasksWithdrawn, TaskAnswered, WorkRecovered, TasksTaken)]

    def _on_event(self, _event: object) -> None:
        self.update()

    def update(self) -> Change | None:
        """Read the count, move the marks; open or close, and say so once."""
        count = self.count()
        change = self.marks.observe(count)
        if change is Change.CLOSED:
            self.open.clear()
            self._closed_at = time.monotonic()
            logger.warning("high water: {} task(s) held (mark {}); intake paused until {}",
                           count, self.marks.high, self.marks.low)
            self.bus.emit(Incident(HIGH_WATER, self.settings.master_id, True,
                                   f"{count} tasks held >= high water {self.marks.high}; "
                                   f"intake paused until <= {self.marks.low}"))
        elif change is Change.OPENED:
            self.open.set()
            spell = time.monotonic() - (self._closed_at or time.monotonic())
            self.throttled_s += spell
            self._closed_at = None
            logger.info("low water: {} task(s) held (mark {}); intake resumes after {:.1f}s",
                        count, self.marks.low, spell)
            self.bus.emit(Incident(HIGH_WATER, self.settings.master_id, False,
                                   f"{count} tasks held <= low water {self.marks.low}; "
                                   f"intake resumed after {spell:.1f}s"))
        return change

    async def wait_open(self, stop: asyncio.Event) -> bool:
        """Until intake may take (True) or the master stops (False)."""
        self.update()
        return await opened_before_stop(self.open, stop)

    def room(self, batch: int) -> int:
        return self.marks.room(self.count(), batch)

    async def run(self, stop: asyncio.Event) -> None:
        async def recheck() -> None:
            self.update()

        await every(stop, RECHECK_S, "backpressure re-check", recheck, wait_first=True)

    def report(self) -> dict[str, Any]:
        marks = self.marks
        state = "off" if not marks.enabled else "open" if marks.open else "throttled"
        closed_for = time.monotonic() - self._closed_at if self._closed_at is not None else 0.0
        return {
            "state": state,
            "held": self.count(),
            "high_water": marks.high,
            "low_water": marks.low,
            "peak_held": marks.peak,
            "throttled_times": marks.closings,
            "throttled_s": round(self.throttled_s + closed_for, 3),
        }
