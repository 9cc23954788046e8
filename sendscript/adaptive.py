"""Adaptive rate limits: the rule that moves a limit from the farm's answers, and its
state in Redis.

A limit written `global=20/1s~2..100` starts at 20 a second and moves between 2
and 100, as TCP CUBIC moves its window:

- down, multiplied by `rate_limit_adapt_decrease` (default 0.9), on a 429 from
  central-control or when the mean send latency of a look exceeds
  `rate_limit_adapt_latency_s` (off by default); at most once a duration, since the
  429s of one overshoot arrive together;
- but a 429 met while probing at or above the curve's plateau (the highest value
  the farm last took) only brings it back to one below that plateau, when that is
  higher: the edge was found where it was, and a full cut there would leave the
  steady state swinging by a tenth of the capacity at every probe; a second 429
  (below the plateau now) cuts multiplicatively, so a capacity that fell is
  followed down as fast as before;
- nothing is granted under it until a 429's `Retry-After` has passed (`hold`), on
  every master: the reservation script reads the hold;
- up, while the limit holds tasks back and no hold is in force, along a cubic
  curve anchored at the last decrease: it comes back fast towards the plateau (one
  token below the value that drew the 429: the highest one the farm took), lingers
  there, then probes above it ever faster, so that a farm that took more finds the
  limit again within seconds while a steady farm sees a 429 only every few
  durations. Past its plateau the curve climbs `rate_limit_adapt_step` x the
  plateau in 5 durations (default 0.02), 8 times that in 10 (+166 % in 22): the
  probe scales with the capacity found, so a slow farm is not overshot by a fast
  climb, and a farm that took three times more is found within about 30
  durations. Time on the curve counts from the decrease or the end of its hold,
  whichever is later.

The value lives in the limit's Redis hash (`sendscript.limits`), shared by every
master and changed live: each master proposes a change as a compare-and-set on the
hash's version `v`, so two masters seeing the same 429s lower it once; a decrease
(and the first look at a limit) anchors the curve: `p` its plateau, `base` the
value it starts from and `epoch` when.
`decide` is the whole rule, pure; `AdaptiveStore` reads and writes the hash.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio

from sendscript.keys import Keys
from sendscript.limits import ADAPTIVE_KEEP_MS, RateLimit

MAX_HOLD_S = 300.0  # a Retry-After longer than this is taken as this
CURVE_DURATIONS = 5  # past its plateau the curve climbs step x ceiling in this many


@dataclass(frozen=True, slots=True)
class AdaptParams:
    decrease: float = 0.9  # the value is multiplied by this on a 429 or slow sends
    step: float = 0.025  # of the ceiling: the climb past the plateau in 5 durations
    latency_s: float | None = None  # mean send latency above this is a push down


@dataclass(frozen=True, slots=True)
class AdaptState:
    """An adaptive limit as Redis has it."""

    value: float
    version: int = 0
    at_ms: int = 0  # server time of the last change
    down_at_ms: int = 0  # and of the last decrease
    why: str = "start"
    plateau: float = 0.0  # the climbing curve: where it lingers,
    base: float = 0.0  # the value it starts from
    epoch_ms: int = 0  # and when (0: not anchored yet)
    hold_ms: int = 0  # server time before which nothing is granted (0: none)


@dataclass(frozen=True, slots=True)
class Signals:
    """What one master saw of one limit's tasks since it last looked."""

    throttled: int = 0  # 429 answers
    retry_after_s: float | None = None  # the longest Retry-After among them
    latency_s: float | None = None  # mean send latency of the answers
    held: int = 0  # tasks the limit held back (it is the bottleneck)


@dataclass(frozen=True, slots=True)
class Change:
    value: float
    why: str
    decreased: bool
    plateau: float | None = None  # anchors a new curve here, from `value`, now


def decide(limit: RateLimit, state: AdaptState, seen: Signals, params: AdaptParams,
           now_ms: int) -> Change | None:
    """The limit's next value, or None to leave it."""
    floor, ceil = float(limit.floor or 1), float(limit.ceil or limit.max)
    down = None
    if seen.throttled:
        down = f"429 x{seen.throttled}"
        if seen.retry_after_s is not None:
            down += f", Retry-After {seen.retry_after_s:g}s"
    elif params.latency_s is not None and seen.latency_s is not None \
            and seen.latency_s > params.latency_s:
        down = f"latency {seen.latency_s:.3f}s > {params.latency_s:g}s"
    if down is not None:
        if now_ms - state.down_at_ms < limit.duration_ms or state.value <= floor:
            return None
        value = state.value * params.decrease
        if seen.throttled and state.epoch_ms and state.value >= state.plateau:
            value = max(value, state.plateau - 1)  # a probe past the edge: back below it
        value = max(floor, value)
        return Change(value, down, True, plateau=max(value, state.value - 1))
    if not state.epoch_ms:  # a curve to climb along, from the value it starts at
        return Change(state.value, state.why, False, plateau=state.value)
    if not seen.held or now_ms < state.hold_ms or state.value >= ceil:
        return None
    t = (now_ms - max(state.epoch_ms, state.hold_ms)) / limit.duration_ms
    # The climb scales with where the limit works (its plateau), not with its ceiling:
    # a farm taking 20 a second is probed by tenths of a token, one taking 80 by tokens.
    # (Scaled with the value instead, it compounds: a long climb runs away.)
    scale = max(state.plateau, floor, 1.0)
    target = min(ceil, curve(state, params.step * scale / CURVE_DURATIONS ** 3, t))
    if math.floor(target) <= math.floor(state.value):  # the tokens in force: unchanged
        return None
    return Change(target, "climb", False)


def curve(state: AdaptState, c: float, t: float) -> float:
    """The cubic through `base` at t = 0, flat at `plateau` (t = k), steeper past it:
    plateau + c (t - k)^3, t in durations."""
    k = ((max(0.0, state.plateau - state.base)) / c) ** (1 / 3)
    return state.plateau + c * (t - k) ** 3


def hold_ms(seen: Signals) -> int:
    """How long a Retry-After holds the limit, in ms (0: no hold)."""
    if seen.retry_after_s is None or seen.retry_after_s <= 0:
        return 0
    return round(min(seen.retry_after_s, MAX_HOLD_S) * 1000)


# KEYS the limits' hashes. The server time, then per hash cur, v, at, down_at, why,
# p, base, epoch, hold.
READ = """
local t = redis.call('TIME')
local out = {tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)}
for _, key in ipairs(KEYS) do
  out[#out + 1] = redis.call('HMGET', key, 'cur', 'v', 'at', 'down_at', 'why', 'p', 'base',
                             'epoch', 'hold')
end
return out
"""

# KEYS the limits' hashes; ARGV per limit, 6 each: the version the change was decided
# on, the new value ("" none), why, decreased (1/0), hold (ms, 0 none), the plateau of
# a curve the change anchors ("" none).
# A change applies only if the version is unchanged (no other master moved it since);
# a hold applies always and only ever lengthens. Returns the changes applied (1/0).
WRITE = """
local KEEP_MS = {keep}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i, key in ipairs(KEYS) do
  local b = (i - 1) * 6
  local hold = tonumber(ARGV[b + 5])
  if hold > 0 then
    local until_ms = now + hold
    if until_ms > (tonumber(redis.call('HGET', key, 'hold')) or 0) then
      redis.call('HSET', key, 'hold', until_ms)
    end
  end
  local applied = 0
  local v = tonumber(redis.call('HGET', key, 'v')) or 0
  if ARGV[b + 2] ~= '' and v == tonumber(ARGV[b + 1]) then
    redis.call('HSET', key, 'cur', ARGV[b + 2], 'why', ARGV[b + 3], 'at', now)
    redis.call('HINCRBY', key, 'v', 1)
    if ARGV[b + 4] == '1' then redis.call('HSET', key, 'down_at', now) end
    if ARGV[b + 6] ~= '' then
      redis.call('HSET', key, 'p', ARGV[b + 6], 'base', ARGV[b + 2], 'epoch', now)
    end
    applied = 1
  end
  if redis.call('PTTL', key) < KEEP_MS then redis.call('PEXPIRE', key, KEEP_MS) end
  out[#out + 1] = applied
end
return out
""".replace("{keep}", str(ADAPTIVE_KEEP_MS))


@dataclass(frozen=True, slots=True)
class Proposal:
    limit: RateLimit
    version: int
    change: Change | None
    hold_ms: int = 0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else ("" if value is None else str(value))


class AdaptiveStore:
    """The adaptive limits' hashes: read their state, propose changes."""

    def __init__(self, client: redis.asyncio.Redis, keys: Keys) -> None:
        self._keys = keys
        self._read = client.register_script(READ)
        self._write = client.register_script(WRITE)

    async def read(self, limits: Sequence[RateLimit]) -> tuple[int, list[AdaptState]]:
        """Redis server time (ms) and each limit's state."""
        now, *rows = await self._read(keys=[self._keys.rate_limit(lim.name) for lim in limits])
        states = []
        for limit, row in zip(limits, rows, strict=True):
            cur, v, at, down, why, plateau, base, epoch, hold = (_text(x) for x in row)
            states.append(AdaptState(
                float(cur) if cur else float(limit.max), int(v or 0), int(at or 0),
                int(down or 0), why or "start", float(plateau or 0), float(base or 0),
                int(epoch or 0), int(hold or 0)))
        return int(now), states

    async def write(self, proposals: Sequence[Proposal]) -> list[bool]:
        keys, args = [], []
        for p in proposals:
            keys.append(self._keys.rate_limit(p.limit.name))
            c = p.change
            anchor = "" if c is None or c.plateau is None else f"{c.plateau:.3f}"
            args += [p.version, "" if c is None else f"{c.value:.3f}",
                     "" if c is None else c.why, int(bool(c and c.decreased)), p.hold_ms,
                     anchor]
        return [bool(x) for x in await self._write(keys=keys, args=args)]
