"""Device health shared by every role in Redis: failure streaks, the bench, resume.

A device whose last `bench_after` attempts failed is benched for a cool-down: every
master holds its tasks (no attempt used) until the cool-down ends or an operator
lifts it (`sendscript device resume D`). The failures counted are the device's:
SYSTEM_ERROR results (the consumer), result timeouts (the leader's sweep) and sends
central-control refused for it (the master, from its workers' answers). A SUCCESS
result resets the streak and the level. Each bench in a row without a success
lasts twice as long as the one before, up to the cap (`BenchPolicy.cooldown_s`).

Redis:
- `{prefix}:devices:health` — hash device -> JSON `{"streak", "level", "until_ms",
  "since_ms", "why", "last"}`: the failures in a row, the benches in a row, the
  current (or last) bench's end and start, why it was benched, the last failure;
  a device with no failure since its last success has no entry.
- `{prefix}:devices:benched` — sorted set device -> bench end (epoch ms); ended
  benches are pruned by the next update.
- `{prefix}:events:devices` — channel: a bench or a resume, so masters reload the
  set at once (they reload it now and then as well).

Every update is one Lua call for a batch of outcomes (a consumer batch, a sweep, a
master's answers of the last half second), never one per task. `DeviceHealth` is
the same rule in Python, pure: unit tests check the rule on it, and the
integration test checks the script against it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis
import redis.asyncio
from loguru import logger

from sendscript.backoff import OutageLog
from sendscript.keys import Keys
from sendscript.models import ExecRecord, LogType, TaskLogMessage
from sendscript.status import RECORD_OPEN

OK = "ok"
FAIL = "fail"
DEVICE_BUSY = "HTTP 409"  # central-control says the device is busy: not a sick device
SEND_ERROR = "central-control "  # how a worker's answer names a refused send

# KEYS[1] the health hash, KEYS[2] the benched sorted set, KEYS[3] the stats hash.
# ARGV[1] now (epoch ms), ARGV[2] bench_after (0: never bench), ARGV[3] the first
# cool-down (ms), ARGV[4] the longest (ms), ARGV[5] the devices channel, ARGV[6] late
# results to add to the stats' `late_results`; then one triple per outcome, in order:
# ARGV[7+3i] device, ARGV[8+3i] `ok` or `fail`, ARGV[9+3i] the failure's reason.
# A failure adds one to the streak; at bench_after in a row, a device not benched now
# is benched for cooldown(level+1) and its level goes up (a failure while benched only
# counts). A success zeroes streak and level (a bench in progress runs its course)
# and drops the entry when the device is not benched. Publishes the benched devices
# on the channel in the same step. Returns {device, until_ms, level, streak, ...} for
# the devices this call benched.
RECORD = """
local now = tonumber(ARGV[1])
local after = tonumber(ARGV[2])
local base = tonumber(ARGV[3])
local cap = tonumber(ARGV[4])
local out, names = {}, {}
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
for i = 7, #ARGV, 3 do
  local device, kind, reason = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local raw = redis.call('HGET', KEYS[1], device)
  local e = raw and cjson.decode(raw) or {streak = 0, level = 0, until_ms = 0}
  local benched = (tonumber(e.until_ms) or 0) > now
  if kind == 'ok' then
    if benched then
      e.streak = 0
      e.level = 0
      redis.call('HSET', KEYS[1], device, cjson.encode(e))
    elseif raw then
      redis.call('HDEL', KEYS[1], device)
    end
  else
    e.streak = (tonumber(e.streak) or 0) + 1
    e.last = reason
    if after > 0 and e.streak >= after and not benched then
      e.level = (tonumber(e.level) or 0) + 1
      local cool = math.min(base * math.pow(2, e.level - 1), cap)
      e.until_ms = now + cool
      e.since_ms = now
      e.why = reason
      redis.call('ZADD', KEYS[2], e.until_ms, device)
      table.insert(out, device)
      table.insert(out, tostring(e.until_ms))
      table.insert(out, e.level)
      table.insert(out, e.streak)
      table.insert(names, device)
    end
    redis.call('HSET', KEYS[1], device, cjson.encode(e))
  end
end
if #names > 0 then
  redis.call('HINCRBY', KEYS[3], 'devices_benched', #names)
  redis.call('PUBLISH', ARGV[5], cjson.encode({benched = names}))
end
if tonumber(ARGV[6]) > 0 then
  redis.call('HINCRBY', KEYS[3], 'late_results', tonumber(ARGV[6]))
end
return out
"""

# KEYS[1] the health hash, KEYS[2] the benched sorted set. ARGV[1] the devices
# channel, ARGV[2] the device. Lifts its bench and forgets its streak and level (an
# operator says it is fixed), publishing the resume in the same step. Returns 1 if it
# was benched, else 0.
RESUME = """
local was = redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[1], ARGV[2])
redis.call('PUBLISH', ARGV[1], cjson.encode({resumed = ARGV[2]}))
return was
"""


# -- the rule, pure ---------------------------------------------------------------------


@dataclass(frozen=True)
class BenchPolicy:
    after: int  # failures in a row that bench a device; 0: never
    base_s: float  # the first cool-down
    cap_s: float  # the longest

    def cooldown_s(self, level: int) -> float:
        """The cool-down of the `level`-th bench in a row (1-based)."""
        return min(self.base_s * 2 ** (max(level, 1) - 1), self.cap_s)

    @classmethod
    def of(cls, settings: Any) -> BenchPolicy:
        return cls(settings.bench_after, settings.bench_cooldown_s,
                   settings.bench_cooldown_max_s)


@dataclass(frozen=True)
class Outcome:
    """One attempt's verdict on its device: ok (a success) or a failure and why."""

    device_id: str
    ok: bool
    reason: str = ""


@dataclass
class Entry:
    streak: int = 0
    level: int = 0
    until_ms: int = 0
    since_ms: int = 0
    why: str = ""
    last: str = ""


@dataclass(frozen=True)
class Benched:
    device_id: str
    until_ms: int
    level: int
    streak: int


@dataclass
class DeviceHealth:
    """The RECORD script's rule in memory (what the tests check it against)."""

    policy: BenchPolicy
    entries: dict[str, Entry] = field(default_factory=dict)
    benched: dict[str, int] = field(default_factory=dict)  # device -> until ms

    def apply(self, outcomes: Iterable[Outcome], now_ms: int) -> list[Benched]:
        self.benched = {d: u for d, u in self.benched.items() if u > now_ms}
        out = []
        for o in outcomes:
            e = self.entries.get(o.device_id)
            is_benched = e is not None and e.until_ms > now_ms
            if o.ok:
                if is_benched:
                    assert e is not None
                    e.streak = e.level = 0
                else:
                    self.entries.pop(o.device_id, None)
                continue
            e = self.entries.setdefault(o.device_id, Entry())
            e.streak += 1
            e.last = o.reason
            if self.policy.after > 0 and e.streak >= self.policy.after and not is_benched:
                e.level += 1
                e.until_ms = now_ms + int(self.policy.cooldown_s(e.level) * 1000)
                e.since_ms = now_ms
                e.why = o.reason
                self.benched[o.device_id] = e.until_ms
                out.append(Benched(o.device_id, e.until_ms, e.level, e.streak))
        return out

    def resume(self, device_id: str) -> bool:
        self.entries.pop(device_id, None)
        return self.benched.pop(device_id, None) is not None


def send_failure(outcome: str, error: str | None, central_ok: bool | None) -> bool:
    """Does a worker's answer count against its device? A send central-control
    refused for it (outcome retry or failed, the error a send error), but not a busy
    device (409) and not an answer that says central-control itself is unwell
    (unreachable, 408/429/5xx: the circuit breaker's input, or every device would be
    benched by one outage). Busy locks, stale tasks and Mongo errors are other outcomes."""
    return (outcome in ("retry", "failed") and central_ok is not False
            and error is not None and error.startswith(SEND_ERROR)
            and DEVICE_BUSY not in error)


def is_late(record: ExecRecord, now: datetime) -> bool:
    """A result after its task's deadline (expire_at, or its queue's max_wait after it
    was due), which the worker stored on the exec record."""
    return record.deadline is not None and now > record.deadline


def result_outcomes(finals: Sequence[TaskLogMessage], records: Mapping[str, ExecRecord],
                    now: datetime) -> tuple[list[Outcome], int]:
    """What a consumer batch's results say of their devices, and how many are late.

    Only results whose exec record is still open count (a redelivered or duplicated
    log finds it closed, or met it earlier in the batch): SUCCESS is ok, SYSTEM_ERROR
    a failure; ERROR (the script failed, the device worked) says nothing."""
    outcomes: list[Outcome] = []
    late = 0
    seen: set[str] = set()
    for msg in finals:
        record = records.get(msg.record_id)
        if record is None or msg.record_id in seen or record.status not in RECORD_OPEN:
            continue
        seen.add(msg.record_id)
        late += is_late(record, now)
        if msg.log_type == LogType.SUCCESS:
            outcomes.append(Outcome(record.device_id, True))
        elif msg.log_type == LogType.SYSTEM_ERROR:
            outcomes.append(Outcome(record.device_id, False,
                                    f"SYSTEM_ERROR: {msg.message}"[:300]))
    return outcomes, late


# -- Redis --------------------------------------------------------------------------------


def _record_args(keys: Keys, policy: BenchPolicy, outcomes: Sequence[Outcome], now_ms: int,
                 late: int) -> list[Any]:
    args: list[Any] = [now_ms, policy.after, int(policy.base_s * 1000),
                       int(policy.cap_s * 1000), keys.devices_channel, late]
    for o in outcomes:
        args += [o.device_id, OK if o.ok else FAIL, o.reason[:300]]
    return args


def _benched(raw: Sequence[Any]) -> list[Benched]:
    def text(v: Any) -> str:
        return v.decode() if isinstance(v, bytes) else str(v)

    return [Benched(text(raw[i]), int(float(text(raw[i + 1]))), int(raw[i + 2]),
                    int(raw[i + 3])) for i in range(0, len(raw), 4)]


async def record(client: redis.asyncio.Redis, keys: Keys, policy: BenchPolicy,
                 outcomes: Sequence[Outcome], late: int = 0,
                 now_ms: int | None = None) -> list[Benched]:
    """Apply a batch of outcomes (and add `late` late results): one round trip, none
    when there is nothing to say. The devices it benched."""
    if not outcomes and not late:
        return []
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    raw = await client.eval(RECORD, 3, keys.device_health, keys.devices_benched,  # type: ignore[misc]
                            keys.stats, *_record_args(keys, policy, outcomes, now_ms, late))
    benched = _benched(raw)
    for b in benched:
        logger.warning("device {} benched for {:.0f}s (bench {} in a row) after {} failures "
                       "in a row", b.device_id, (b.until_ms - now_ms) / 1000, b.level, b.streak)
    return benched


_outage = OutageLog("device health: outcomes not recorded")


async def record_quietly(client: redis.asyncio.Redis, keys: Keys, policy: BenchPolicy,
                         outcomes: Sequence[Outcome], late: int = 0) -> list[Benched]:
    """`record` for callers whose own work is done: a failure is logged (once per
    outage) and the outcomes are lost, never the caller's work."""
    try:
        benched = await record(client, keys, policy, outcomes, late)
    except Exception as exc:
        _outage.failed(exc)
        return []
    _outage.ok()
    return benched


async def record_results(client: redis.asyncio.Redis, settings: Any,
                         finals: Sequence[TaskLogMessage], records: Mapping[str, ExecRecord],
                         now: datetime) -> list[Benched]:
    """The consumer's one call per batch of results: their outcomes and late count."""
    outcomes, late = result_outcomes(finals, records, now)
    return await record_quietly(client, settings.keys, BenchPolicy.of(settings), outcomes,
                                late)


async def load(client: redis.asyncio.Redis, keys: Keys,
               now_ms: int | None = None) -> dict[str, float]:
    """The benches in force: device -> end (epoch seconds)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    raw = await client.zrangebyscore(keys.devices_benched, f"({now_ms}", "+inf",
                                     withscores=True)
    return {(d.decode() if isinstance(d, bytes) else d): s / 1000 for d, s in raw}


async def resume(client: redis.asyncio.Redis, keys: Keys, device_id: str) -> bool:
    return bool(await client.eval(RESUME, 2, keys.device_health,  # type: ignore[misc]
                                  keys.devices_benched, keys.devices_channel, device_id))


def resume_sync(client: redis.Redis, keys: Keys, device_id: str) -> bool:
    """Lift a device's bench and forget its failures; every master lets its tasks go
    within a second. False if it was not benched (its streak is forgotten anyway)."""
    return bool(client.eval(RESUME, 2, keys.device_health, keys.devices_benched,
                            keys.devices_channel, device_id))


def benched_sync(client: redis.Redis, keys: Keys, now: float | None = None
                 ) -> dict[str, dict[str, Any]]:
    """The benched devices, soonest end first: until (ISO), seconds left, why, streak,
    level (benches in a row), since."""
    now_ms = int((time.time() if now is None else now) * 1000)
    raw = client.zrangebyscore(keys.devices_benched, f"({now_ms}", "+inf", withscores=True)
    devices = [d.decode() for d, _ in raw]
    docs = client.hmget(keys.device_health, devices) if devices else []
    out: dict[str, dict[str, Any]] = {}
    for (device, until_ms), doc in zip(raw, docs, strict=True):
        e = json.loads(doc) if doc else {}
        out[device.decode()] = {
            "until": datetime.fromtimestamp(until_ms / 1000).astimezone().isoformat(
                timespec="seconds"),
            "left_s": round((until_ms - now_ms) / 1000, 1),
            "why": e.get("why", ""),
            "streak": int(e.get("streak", 0)),
            "level": int(e.get("level", 0)),
            "since": datetime.fromtimestamp(e["since_ms"] / 1000).astimezone().isoformat(
                timespec="seconds") if e.get("since_ms") else "",
        }
    return out
