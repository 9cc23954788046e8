"""The drop-rate ladder: too many lost tasks degrade, then open the breaker, then stop.

A drop is a task that will never run: withdrawn from the board as expired
(`TasksWithdrawn`, reason "expired"), expired at the worker right before its send
(answer `expired`), failed for good because its last attempt failed in a way that
says central-control is unwell (answer `failed` with `central_ok` False: timeouts,
408/429/5xx), or failed for good by the leader's result timeout sweep (its
`result_timeouts_final` counter in the stats hash). An attempt that will be retried
is not a drop, however it ended: a result timeout with attempts left is a lost
result, counted as its own signal (`result_timeouts`, shown as `lost_results`; it
already feeds the breaker's sends and the device's health) but not climbed on.

A drop is measured against the tasks that left the master's hands in the same
window: sent, failed for good, expired, or failed for good by a result timeout (a
drop is always counted as finished in the same second, so the window never holds
more drops than finished tasks). Every master adds its counts to one sliding window
in Redis (per-second fields of one hash, old ones pruned, the stats' counters folded
in once, all in one Lua call) and reads the window's totals back, so every master
climbs the same ladder within one sync:

    ok ──(≥ degrade_at)──► degrade ──(≥ open_at)──► open ──(≥ hard_stop_at)──► hard_stop

degrade: this master's breaker gate acts degraded (lower concurrency); open: the
shared breaker is tripped open once (its pause and probe then run as usual);
hard_stop: the hard-stop pause is set (sendscript/pauses.py), which only
`sendscript resume --hard` lifts; the ladder does not set it again while it stays
at that level. A level is left once the rate falls below `recover_ratio` of its
threshold, or when the window holds fewer than `min_volume` finished tasks.
Each level entered or left raises or resolves Incident("drop_rate", level).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import redis.asyncio
from loguru import logger

from master.bus import Bus, Subscription
from master.events import (
    BreakerFloorRequested,
    BreakerTripRequested,
    Incident,
    TaskAnswered,
    TasksWithdrawn,
)
from master.expiry import EXPIRED
from sendscript import pauses
from sendscript.backoff import every
from sendscript.breaker import Circuit
from sendscript.settings import Settings

INCIDENT = "drop_rate"
FINISHED = frozenset({"sent", "failed", "expired"})  # answers: the task left our hands


def is_finished(outcome: str) -> bool:
    """The answer says the task left the master's hands (a retry has not)."""
    return outcome in FINISHED


def is_drop(outcome: str, central_ok: bool | None) -> bool:
    """The answer says the task will never run through no fault of its own: expired,
    or failed for good after a last attempt that central-control's trouble ended.
    A task central-control refused for good (a 4xx) was answered, not dropped."""
    return outcome == "expired" or (outcome == "failed" and central_ok is False)


class Level(IntEnum):
    OK = 0
    DEGRADE = 1
    OPEN = 2
    HARD_STOP = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Window:
    """The shared window's totals: tasks finished, dropped, and results lost."""

    finished: int = 0
    dropped: int = 0
    lost_results: int = 0


@dataclass(frozen=True)
class LadderPolicy:
    min_volume: int = 100
    degrade_at: float = 0.10
    open_at: float = 0.15
    hard_stop_at: float = 0.20
    recover_ratio: float = 0.8  # leave a level below this share of its threshold

    def threshold(self, level: Level) -> float:
        return {Level.DEGRADE: self.degrade_at, Level.OPEN: self.open_at,
                Level.HARD_STOP: self.hard_stop_at}[level]


class DropLadder:
    """The ladder's level from the window's totals, pure."""

    def __init__(self, policy: LadderPolicy) -> None:
        self.policy = policy
        self.level = Level.OK
        self.rate: float | None = None

    def update(self, finished: int, dropped: int) -> tuple[Level, Level]:
        """(level before, level now) for the window's totals."""
        before = self.level
        p = self.policy
        if finished < p.min_volume:
            self.rate = None
            self.level = Level.OK  # too little to judge
            return before, self.level
        rate = self.rate = dropped / finished
        level = before
        while level < Level.HARD_STOP and rate >= p.threshold(Level(level + 1)):
            level = Level(level + 1)
        while level > Level.OK and rate < p.threshold(level) * (
                p.recover_ratio if level <= before else 1.0):
            level = Level(level - 1)
        self.level = level
        return before, level


def describe(window: Window, rate: float | None, policy: LadderPolicy, window_s: int) -> str:
    """What the ladder stands on, for logs, the hard stop's reason and incidents."""
    if rate is None:
        return (f"{window.finished} task(s) finished in {window_s}s, fewer than "
                f"{policy.min_volume} to judge ({window.dropped} dropped)")
    return (f"{window.dropped} of {window.finished} tasks dropped in {window_s}s "
            f"({rate:.0%})")


# KEYS[1] the drop-rate window (hash: `f:<second>` finished, `d:<second>` dropped,
# `l:<second>` results lost; `rt_seen`, `rf_seen` the stats' counters already folded
# in), KEYS[2] the stats hash (`result_timeouts`: every result timeout;
# `result_timeouts_final`: those that failed their task for good).
# ARGV[1] now in whole seconds, ARGV[2] the window in seconds, ARGV[3] finished to
# add, ARGV[4] dropped to add.
# Adds the counts to this second; folds in what any master's sweep counted since the
# last call (the first call only notes the counters): each result timeout as a lost
# result, each final one as a finished task and a drop; prunes the seconds out of the
# window and returns {finished, dropped, lost} over the window.
WINDOW = """
local now = tonumber(ARGV[1])
local cutoff = now - tonumber(ARGV[2])
local function fold(counter, seen_field)
  local total = tonumber(redis.call('HGET', KEYS[2], counter) or '0')
  local seen = redis.call('HGET', KEYS[1], seen_field)
  redis.call('HSET', KEYS[1], seen_field, total)
  if seen and total > tonumber(seen) then return total - tonumber(seen) end
  return 0
end
local lost = fold('result_timeouts', 'rt_seen')
local final = fold('result_timeouts_final', 'rf_seen')
local add_f = tonumber(ARGV[3]) + final
local add_d = tonumber(ARGV[4]) + final
if add_f > 0 then redis.call('HINCRBY', KEYS[1], 'f:' .. now, add_f) end
if add_d > 0 then redis.call('HINCRBY', KEYS[1], 'd:' .. now, add_d) end
if lost > 0 then redis.call('HINCRBY', KEYS[1], 'l:' .. now, lost) end
local fields = redis.call('HGETALL', KEYS[1])
local totals, old = {f = 0, d = 0, l = 0}, {}
for i = 1, #fields, 2 do
  local kind, second = string.match(fields[i], '^(%a):(%d+)$')
  if kind then
    if tonumber(second) <= cutoff then
      table.insert(old, fields[i])
    elseif totals[kind] then
      totals[kind] = totals[kind] + tonumber(fields[i + 1])
    end
  end
end
if #old > 0 then redis.call('HDEL', KEYS[1], unpack(old)) end
return {totals.f, totals.d, totals.l}
"""


def policy_from(settings: Settings) -> LadderPolicy:
    return LadderPolicy(min_volume=settings.drop_min_volume,
                        degrade_at=settings.drop_degrade_at, open_at=settings.drop_open_at,
                        hard_stop_at=settings.drop_hard_stop_at)


class DropRate:
    """The ladder on the bus: counts finished and dropped tasks, climbs in its loop."""

    def __init__(self, settings: Settings, bus: Bus, client: redis.asyncio.Redis) -> None:
        self.settings = settings
        self.bus = bus
        self.redis = client
        self.ladder = DropLadder(policy_from(settings))
        self._finished = 0
        self._dropped = 0
        self.window = Window()
        self.hard_stops = 0

    def subscriptions(self) -> list[Subscription]:
        return [
            (TaskAnswered, self._on_answered),
            (TasksWithdrawn, self._on_withdrawn),
        ]

    def _on_answered(self, event: TaskAnswered) -> None:
        if is_finished(event.outcome):
            self._finished += 1
            if is_drop(event.outcome, event.answer.central_ok):
                self._dropped += 1

    def _on_withdrawn(self, event: TasksWithdrawn) -> None:
        if event.reason == EXPIRED:
            self._finished += len(event.tasks)
            self._dropped += len(event.tasks)

    async def run(self, stop: asyncio.Event) -> None:
        await every(stop, self.settings.drop_sync_s, "drop rate", self.sync)

    async def sync(self) -> Level:
        s = self.settings
        finished, dropped = self._finished, self._dropped
        self._finished = self._dropped = 0
        try:
            totals = await self.redis.eval(  # type: ignore[misc]
                WINDOW, 2, s.keys.drop_rate, s.keys.stats, int(time.time()), s.drop_window_s,
                finished, dropped)
        except Exception:
            self._finished += finished
            self._dropped += dropped
            raise
        self.window = Window(*(int(t) for t in totals))
        before, after = self.ladder.update(self.window.finished, self.window.dropped)
        if after != before:
            try:
                await self._act(before, after)
            except Exception:
                self.ladder.level = before  # acted on again at the next sync
                raise
        return after

    async def _act(self, before: Level, after: Level) -> None:
        detail = describe(self.window, self.ladder.rate, self.ladder.policy,
                          self.settings.drop_window_s)
        logger.warning("drop rate: {} -> {}: {}", before.label, after.label, detail)
        if after >= Level.HARD_STOP > before:
            await pauses.set_hard_stop(self.redis, self.settings.keys,
                                       f"drop rate: {detail}")
            self.hard_stops += 1
        if after >= Level.OPEN > before:
            self.bus.emit(BreakerTripRequested(f"drop rate: {detail}"))
        self.bus.emit(BreakerFloorRequested(
            Circuit.DEGRADED if after >= Level.DEGRADE else Circuit.CLOSED))
        for level in Level:
            if before < level <= after:
                self.bus.emit(Incident(INCIDENT, level.label, True, detail))
            elif after < level <= before:
                self.bus.emit(Incident(INCIDENT, level.label, False, detail))

    def report(self) -> dict[str, Any]:
        p = self.ladder.policy
        rate = self.ladder.rate
        return {
            "level": self.ladder.level.label,
            "rate": round(rate, 3) if rate is not None else None,
            "finished": self.window.finished,
            "dropped": self.window.dropped,
            "lost_results": self.window.lost_results,
            "hard_stops": self.hard_stops,
            "limits": {"degrade_at": p.degrade_at, "open_at": p.open_at,
                       "hard_stop_at": p.hard_stop_at, "min_volume": p.min_volume,
                       "window_s": self.settings.drop_window_s},
        }
