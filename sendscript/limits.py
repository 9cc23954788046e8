"""Cluster-wide rate limits: their syntax, and the sliding-window counts in Redis.

A rate limit allows `max` dispatches per `duration`, for every task (`global`), a
named queue (`queue:NAME`) or a device group (`group:NAME`), counted across every
master. The setting reads `NAME=MAX/DURATION,...`, e.g.
`global=20/1s,queue:bulk=5/2s,group:rack-7=1/1s` (duration: a number with `ms`,
`s`, `m` or `h`; a bare number is seconds; `20/s` means `20/1s`). A limit may be
adaptive: `global=20/1s~2..100` starts at 20 a second and follows the farm's
answers between 2 and 100 (`sendscript.adaptive`).

The window slides: no interval of `duration`, wherever it starts, holds more than
`max` sends. A master reserves tokens for all of its limits in one script call and
spends them locally, within a short spending window `spend` (ms) it names in the
call; Redis keeps each grant in `{prefix}:limit:{name}:grants` (a sorted set,
member `SEQ:COUNT`, score the end of its spending window) and their sum in the
hash `{prefix}:limit:{name}` (`d` the duration, `used`). A grant counts until
`duration` after its spending window ends: a token granted now may be spent as
late as `now + spend`, and a token granted once it stops counting is spent no
earlier than that plus `duration`. So every interval of `duration` sees at most
`max` spends, in Redis server time (every master agrees on it whatever its own
clock says); the price is that a busy limit passes at most `max` per
`duration + spend`. Unspent tokens given back leave their grant at once. A master
names a spending window longer than the one it spends in by
`rate_limit_send_allowance_s`, the time a dispatched task may take to reach
central-control, so that the farm too never sees more than `max` in a duration.

An adaptive limit's current value is the hash's `cur`, read by the same script (it
replaces `max`), with `hold`, a server time before which nothing is granted (a
`Retry-After`), and `v`, `why`, `at`, `down_at`: what last moved it and when.
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
_RULE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*(ms|s|m|h)?\s*"
                   r"(?:~\s*(\d+)\s*\.\.\s*(\d+)\s*)?$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
_TARGET = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
MIN_DURATION_MS = 10
MAX_DURATION_MS = 86_400_000
MAX_TOKENS = 1_000_000


@dataclass(frozen=True, slots=True)
class RateLimit:
    name: str  # "global", "queue:bulk", "group:rack-7"
    max: int  # an adaptive limit's starting value
    duration_ms: int
    floor: int | None = None  # adaptive: the bounds it moves between
    ceil: int | None = None

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
    def adaptive(self) -> bool:
        return self.floor is not None

    @property
    def rule(self) -> str:
        """`max/duration` (and `~floor..ceil`), as the setting writes it."""
        rule = f"{self.max}/{format_duration(self.duration_ms)}"
        return rule if self.floor is None else f"{rule}~{self.floor}..{self.ceil}"


def format_duration(ms: int) -> str:
    for unit in ("h", "m", "s"):
        if ms % _UNIT_MS[unit] == 0:
            return f"{ms // _UNIT_MS[unit]}{unit}"
    return f"{ms}ms"


def parse_rule(text: str) -> tuple[int, int, int | None, int | None]:
    """`20/1s` -> (20, 1000, None, None); `20/1s~2..100` -> (20, 1000, 2, 100);
    raises ValueError with what is wrong."""
    m = _RULE.match(text)
    if not m:
        raise ValueError(f"expected MAX/DURATION such as 20/1s or 5/500ms (adaptive: "
                         f"20/1s~2..100), got {text!r}")
    count, number, unit = int(m.group(1)), m.group(2), m.group(3) or "s"
    duration_ms = round(float(number or "1") * _UNIT_MS[unit])
    if not 1 <= count <= MAX_TOKENS:
        raise ValueError(f"{text!r}: max must be 1..{MAX_TOKENS}")
    if not MIN_DURATION_MS <= duration_ms <= MAX_DURATION_MS:
        raise ValueError(f"{text!r}: duration must be {MIN_DURATION_MS} ms .. 24 h")
    if m.group(4) is None:
        return count, duration_ms, None, None
    floor, ceil = int(m.group(4)), int(m.group(5))
    if not 1 <= floor <= count <= ceil <= MAX_TOKENS:
        raise ValueError(f"{text!r}: adaptive bounds need 1 <= floor <= max <= ceil "
                         f"<= {MAX_TOKENS}")
    return count, duration_ms, floor, ceil


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
        limits[name] = RateLimit(check_name(name), *parse_rule(str(rule)))
    return limits


# How long an adaptive limit keeps its value without a send: a day.
ADAPTIVE_KEEP_MS = 86_400_000

# KEYS per limit, 2 each: its hash and its grants' sorted set. ARGV per limit, 6 each:
# max, duration (ms), want (tokens asked for), back (unspent tokens given back),
# back_grant (the member of the grant they belong to, "" none), spend (ms: the
# spending window of what is granted now).
# For each limit, in Redis server time: grants that stopped counting (their spending
# window ended a duration ago or more) leave the sum; a count kept for another
# duration is dropped; tokens given back leave their grant; an adaptive limit's `cur`
# replaces max and its `hold` grants nothing before it ends; then up to `want` are
# granted, never past max, as one new grant. Keys live twice duration + spend; an
# adaptive limit's (with a `cur`) live ADAPTIVE_KEEP_MS, so that what it learned of the
# farm outlasts an idle spell (its grants' log cleans itself on each call).
# Returns {now_ms, then per limit: grant member ("" none), granted, used, max in force,
# end of the spending window, when the oldest counted grant stops counting (0: none),
# hold (0: none)}.
RESERVE = """
local ADAPTIVE_KEEP_MS = {keep}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {now}
for i = 1, #KEYS / 2 do
  local hash, log = KEYS[2 * i - 1], KEYS[2 * i]
  local b = (i - 1) * 6
  local max = tonumber(ARGV[b + 1])
  local dur = tonumber(ARGV[b + 2])
  local want = tonumber(ARGV[b + 3])
  local back = tonumber(ARGV[b + 4])
  local spend = tonumber(ARGV[b + 6])
  local stored = redis.call('HMGET', hash, 'd', 'used', 'cur', 'hold')
  local used = 0
  if tonumber(stored[1]) == dur then
    used = tonumber(stored[2]) or 0
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', log, '-inf', now - dur)) do
      used = used - tonumber(string.match(m, ':(%d+)$'))
    end
    redis.call('ZREMRANGEBYSCORE', log, '-inf', now - dur)
  else
    redis.call('DEL', log)
  end
  if back > 0 and ARGV[b + 5] ~= '' then
    local score = redis.call('ZSCORE', log, ARGV[b + 5])
    if score then
      local seq, count = string.match(ARGV[b + 5], '^(%d+):(%d+)$')
      local gone = math.min(back, tonumber(count))
      used = used - gone
      redis.call('ZREM', log, ARGV[b + 5])
      if tonumber(count) > gone then
        redis.call('ZADD', log, score, seq .. ':' .. (tonumber(count) - gone))
      end
    end
  end
  used = math.max(0, used)
  if stored[3] then max = math.max(1, math.floor(tonumber(stored[3]))) end
  local hold = tonumber(stored[4]) or 0
  if hold <= now then hold = 0 end
  local grant = 0
  if hold == 0 then grant = math.max(0, math.min(want, max - used)) end
  local member = ''
  if grant > 0 then
    member = redis.call('HINCRBY', hash, 'seq', 1) .. ':' .. grant
    redis.call('ZADD', log, now + spend, member)
    used = used + grant
  end
  redis.call('HSET', hash, 'd', dur, 'used', used)
  local keep = (dur + spend) * 2
  if stored[3] then keep = math.max(keep, ADAPTIVE_KEEP_MS) end
  redis.call('PEXPIRE', hash, math.max(keep, hold - now))
  redis.call('PEXPIRE', log, keep)
  local first = redis.call('ZRANGE', log, 0, 0, 'WITHSCORES')
  local frees = 0
  if first[2] then frees = tonumber(first[2]) + dur end
  for _, x in ipairs({member, grant, used, max, now + spend, frees, hold}) do
    out[#out + 1] = x
  end
end
return out
""".replace("{keep}", str(ADAPTIVE_KEEP_MS))


@dataclass(frozen=True, slots=True)
class Ask:
    limit: RateLimit
    want: int
    back: int = 0
    back_grant: str = ""  # the grant the tokens given back belong to
    spend_ms: int = 0  # the spending window asked for (0: the default)


@dataclass(frozen=True, slots=True)
class Granted:
    grant: str  # the grant's member in the sorted set ("" nothing granted)
    granted: int
    used: int  # by all masters in the sliding window, this grant included
    max: int = 0  # in force (an adaptive limit's current value)
    spend_end_ms: int = 0  # server time: the granted tokens are spent before this
    frees_ms: int = 0  # server time: the oldest counted grant stops counting (0: none)
    hold_ms: int = 0  # server time: nothing is granted before this (0: no hold)


@dataclass(frozen=True, slots=True)
class Reservation:
    now_ms: int  # Redis server time when the script ran
    grants: list[Granted]


def spend_ms(limit: RateLimit, asked_ms: int = 0) -> int:
    """The spending window: as asked (at least 5 ms, at most a day)."""
    return max(5, min(asked_ms or 100, MAX_DURATION_MS))


class RateLimiter:
    """Reserves (and gives back) tokens for many limits in one script call."""

    def __init__(self, client: redis.asyncio.Redis, keys: Keys) -> None:
        self._keys = keys
        self._reserve = client.register_script(RESERVE)

    async def reserve(self, asks: Sequence[Ask]) -> Reservation:
        keys: list[str] = []
        args: list[int | str] = []
        for a in asks:
            name = a.limit.name
            keys += [self._keys.rate_limit(name), self._keys.rate_limit_grants(name)]
            args += [a.limit.max, a.limit.duration_ms, a.want, a.back, a.back_grant,
                     spend_ms(a.limit, a.spend_ms)]
        out = await self._reserve(keys=keys, args=args)
        grants = [Granted(_text(out[i]), *(int(x) for x in out[i + 1:i + 7]))
                  for i in range(1, len(out), 7)]
        return Reservation(int(out[0]), grants)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# KEYS per limit: its hash and grants. The server's TIME, then per limit the hash's
# d, cur, hold, why, at and the counts of the grants that still count, read by the
# server that holds them (a pipelined TIME would ask any node of a cluster).
# ARGV: the durations, one per limit.
WINDOWS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {now}
for i = 1, #KEYS / 2 do
  local dur = tonumber(ARGV[i])
  local row = redis.call('HMGET', KEYS[2 * i - 1], 'd', 'cur', 'hold', 'why', 'at')
  local used, oldest = 0, 0
  if tonumber(row[1]) == dur then
    local live = redis.call('ZRANGEBYSCORE', KEYS[2 * i], '(' .. (now - dur), '+inf',
                            'WITHSCORES')
    for j = 1, #live, 2 do
      used = used + tonumber(string.match(live[j], ':(%d+)$'))
      if oldest == 0 then oldest = tonumber(live[j + 1]) end
    end
  end
  out[#out + 1] = {used, oldest, row[2] or '', row[3] or '', row[4] or '', row[5] or ''}
end
return out
"""


def window_use(client: redis.Redis, keys: Keys,
               limits: Sequence[RateLimit]) -> dict[str, dict[str, Any]]:
    """Each limit's sliding window as Redis has it (for status): `used`, `left_s` until
    its oldest counted grant stops counting, and an adaptive limit's `current` value,
    `why` it last moved, `moved_s` ago, `hold_s` left of a Retry-After hold."""
    if not limits:
        return {}
    names = [k for lim in limits
             for k in (keys.rate_limit(lim.name), keys.rate_limit_grants(lim.name))]
    now, *rows = client.eval(WINDOWS, len(names), *names, *[lim.duration_ms for lim in limits])
    now = int(now)
    out: dict[str, dict[str, Any]] = {}
    for limit, (used, oldest, cur, hold, why, at) in zip(limits, rows, strict=True):
        view: dict[str, Any] = {
            "used": int(used),
            "left_s": max(0.0, (int(oldest) + limit.duration_ms - now) / 1000) if int(oldest)
            else 0.0,
        }
        if limit.adaptive:
            cur, hold, why, at = (_text(x) for x in (cur, hold, why, at))
            view.update({
                "current": float(cur) if cur else float(limit.max),
                "why": why or "start",
                "moved_s": (now - int(at)) / 1000 if at else None,
                "hold_s": max(0.0, (int(hold) - now) / 1000) if hold else 0.0,
            })
        out[limit.name] = view
    return out


def status(client: redis.Redis, keys: Keys, configured: Mapping[str, str],
           masters: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """For `sendscript status`: every limit set here or reported by a live master, with
    its sliding window's use (Redis), an adaptive limit's current value and why, and
    the held / spent / reserved counts of the live masters' reports."""
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
