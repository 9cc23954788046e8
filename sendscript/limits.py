"""Cluster-wide rate limits: their syntax, and the window counters in Redis.

A rate limit allows `max` dispatches per `duration`, for every task (`global`), a
named queue (`queue:NAME`) or a device group (`group:NAME`), counted across every
master. The setting reads `NAME=MAX/DURATION,...`, e.g.
`global=20/1s,queue:bulk=5/2s,group:rack-7=1/1s` (duration: a number with `ms`,
`s`, `m` or `h`; a bare number is seconds; `20/s` means `20/1s`).

Windows are fixed, as BullMQ's limiter's are: window `w` of a limit covers Redis
server time `[w * duration, (w + 1) * duration)`, so every master agrees on them
whatever its own clock says. `{prefix}:limit:{name}` is a hash of the window the
count belongs to (`d` the duration in ms, `w` its index) and `used`, the tokens
handed out in it to all masters together. A master reserves tokens for all of its
limits in one script call and spends them locally; a count from an older window
(or another duration) counts for nothing, so unspent tokens lapse with their
window. As with any fixed window, up to 2 x max may go within one duration that
straddles two windows; never more than max within one window.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio

from sendscript.keys import Keys

KINDS = ("global", "queue", "group")
_RULE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*(ms|s|m|h)?\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
_TARGET = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
MIN_DURATION_MS = 10
MAX_DURATION_MS = 86_400_000
MAX_TOKENS = 1_000_000


@dataclass(frozen=True, slots=True)
class RateLimit:
    name: str  # "global", "queue:bulk", "group:rack-7"
    max: int
    duration_ms: int

    @property
    def kind(self) -> str:
        return self.name.partition(":")[0]

    @property
    def target(self) -> str:
        """The queue or group it limits ("" for global)."""
        return self.name.partition(":")[2]

    @property
    def duration_s(self) -> float:
        return self.duration_ms / 1000

    @property
    def rule(self) -> str:
        """`max/duration`, as the setting writes it."""
        return f"{self.max}/{format_duration(self.duration_ms)}"


def format_duration(ms: int) -> str:
    for unit in ("h", "m", "s"):
        if ms % _UNIT_MS[unit] == 0:
            return f"{ms // _UNIT_MS[unit]}{unit}"
    return f"{ms}ms"


def parse_rule(text: str) -> tuple[int, int]:
    """`20/1s` -> (20, 1000); raises ValueError with what is wrong."""
    m = _RULE.match(text)
    if not m:
        raise ValueError(f"expected MAX/DURATION such as 20/1s or 5/500ms, got {text!r}")
    count, number, unit = int(m.group(1)), m.group(2), m.group(3) or "s"
    duration_ms = round(float(number or "1") * _UNIT_MS[unit])
    if not 1 <= count <= MAX_TOKENS:
        raise ValueError(f"{text!r}: max must be 1..{MAX_TOKENS}")
    if not MIN_DURATION_MS <= duration_ms <= MAX_DURATION_MS:
        raise ValueError(f"{text!r}: duration must be {MIN_DURATION_MS} ms .. 24 h")
    return count, duration_ms


def check_name(name: str) -> str:
    kind, sep, target = name.partition(":")
    if kind not in KINDS:
        raise ValueError(f"rate limit {name!r}: name must be global, queue:NAME or group:NAME")
    if kind == "global" and sep:
        raise ValueError(f"rate limit {name!r}: global takes no name")
    if kind != "global" and not _TARGET.match(target):
        raise ValueError(f"rate limit {name!r}: {kind} name must be 1-200 of A-Z a-z 0-9 _ . : -")
    return name


def parse_limits(value: str | Mapping[str, Any]) -> dict[str, RateLimit]:
    """`global=20/1s,queue:bulk=5/2s` (or a mapping name -> rule) -> name -> RateLimit."""
    if isinstance(value, str):
        pairs: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in value.split(","))):
            name, sep, rule = part.partition("=")
            if not sep:
                raise ValueError(f"rate limit {part!r}: expected NAME=MAX/DURATION")
            if name.strip() in pairs:
                raise ValueError(f"rate limit {name.strip()!r} given twice")
            pairs[name.strip()] = rule
        value = pairs
    limits: dict[str, RateLimit] = {}
    for name, rule in value.items():
        count, duration_ms = parse_rule(str(rule))
        limits[name] = RateLimit(check_name(name), count, duration_ms)
    return limits


# KEYS[i] the window hash of limit i; ARGV per limit, 5 each: max, duration (ms), want
# (tokens asked for), back (unspent tokens given back), back_window (the window index
# those tokens belong to).
# For each limit, in Redis server time: a count of an older window or of another
# duration is dropped; tokens given back for the current window are subtracted; then
# up to `want` are granted, never past max. The hash lives two durations.
# Returns {now_ms, then per limit: window index, granted, used}.
RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {now}
for i = 1, #KEYS do
  local b = (i - 1) * 5
  local max = tonumber(ARGV[b + 1])
  local dur = tonumber(ARGV[b + 2])
  local want = tonumber(ARGV[b + 3])
  local back = tonumber(ARGV[b + 4])
  local w = math.floor(now / dur)
  local stored = redis.call('HMGET', KEYS[i], 'd', 'w', 'used')
  local used = 0
  if tonumber(stored[1]) == dur and tonumber(stored[2]) == w then
    used = tonumber(stored[3]) or 0
  end
  if back > 0 and tonumber(ARGV[b + 5]) == w then
    used = math.max(0, used - back)
  end
  local grant = math.max(0, math.min(want, max - used))
  used = used + grant
  redis.call('HSET', KEYS[i], 'd', dur, 'w', string.format('%d', w), 'used', used)
  redis.call('PEXPIRE', KEYS[i], dur * 2)
  out[#out + 1] = w
  out[#out + 1] = grant
  out[#out + 1] = used
end
return out
"""


@dataclass(frozen=True, slots=True)
class Ask:
    limit: RateLimit
    want: int
    back: int = 0
    back_window: int = -1


@dataclass(frozen=True, slots=True)
class Granted:
    window: int
    granted: int
    used: int  # by all masters in this window, this grant included


@dataclass(frozen=True, slots=True)
class Reservation:
    now_ms: int  # Redis server time when the script ran
    grants: list[Granted]


class RateLimiter:
    """Reserves (and gives back) tokens for many limits in one script call."""

    def __init__(self, client: redis.asyncio.Redis, keys: Keys) -> None:
        self._keys = keys
        self._reserve = client.register_script(RESERVE)

    async def reserve(self, asks: Sequence[Ask]) -> Reservation:
        keys = [self._keys.rate_limit(a.limit.name) for a in asks]
        args: list[int] = []
        for a in asks:
            args += [a.limit.max, a.limit.duration_ms, a.want, a.back, a.back_window]
        out = [int(x) for x in await self._reserve(keys=keys, args=args)]
        grants = [Granted(*out[i:i + 3]) for i in range(1, len(out), 3)]
        return Reservation(out[0], grants)


# KEYS the limits' hashes. The server's TIME and each hash's d, w, used, read by the
# server that holds them (a pipelined TIME would ask any node of a cluster).
WINDOWS = """
local out = {redis.call('TIME')}
for _, key in ipairs(KEYS) do out[#out + 1] = redis.call('HMGET', key, 'd', 'w', 'used') end
return out
"""


def window_use(client: redis.Redis, keys: Keys,
               limits: Sequence[RateLimit]) -> dict[str, dict[str, Any]]:
    """Each limit's current window as Redis has it: used and seconds left (for status)."""
    if not limits:
        return {}
    names = [keys.rate_limit(limit.name) for limit in limits]
    seconds, micros, *rows = _flatten_time(client.eval(WINDOWS, len(names), *names))
    now_ms = seconds * 1000 + micros // 1000
    out: dict[str, dict[str, Any]] = {}
    for limit, (d, w, used) in zip(limits, rows, strict=True):
        window = now_ms // limit.duration_ms
        current = d is not None and int(d) == limit.duration_ms and int(w) == window
        out[limit.name] = {
            "used": int(used) if current and used is not None else 0,
            "left_s": ((window + 1) * limit.duration_ms - now_ms) / 1000,
        }
    return out


def _flatten_time(results: list[Any]) -> list[Any]:
    (seconds, micros), *rest = results
    return [int(seconds), int(micros), *rest]


def status(client: redis.Redis, keys: Keys, configured: Mapping[str, str],
           masters: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """For `sendscript status`: every limit set here or reported by a live master, with
    its current window's use (Redis) and the held / spent / reserved counts of the
    live masters' reports."""
    rules = dict(configured)
    live = [m.get("rate_limits", {}).get("limits", {}) for m in masters if m.get("alive")]
    for reported in live:
        for name, view in reported.items():
            rules.setdefault(name, view.get("rule", ""))
    limits = [RateLimit(name, *parse_rule(rule)) for name, rule in sorted(rules.items())]
    use = window_use(client, keys, limits)
    return [{
        "name": limit.name, "rule": limit.rule, **use[limit.name],
        **{k: sum(int(r.get(limit.name, {}).get(f, 0)) for r in live)
           for k, f in (("reserved", "tokens"), ("held", "held"), ("spent", "spent"))},
    } for limit in limits]
