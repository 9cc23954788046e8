"""The fleet's record of its devices: each one's last result and its results per hour.

Mongo `devices`, one document per device (`_id` and `device_id` the device id; no
index but `_id`, which the console reads a page by), written by the consumer (never by
scanning tasks) with one bulk write of the results it applied since its last write,
at most every `SENDSCRIPT_FLEET_WRITE_INTERVAL_S` (`FleetBuffer`): a device's
results of those seconds cost one update, not one a batch. The update is most of
what a device document costs the embedded server (one statement and commit a
device), so held results are worth the few seconds a view lags:

- `last_task_id`, `last_record_id`, `last_result` (`SUCCESS`, `ERROR`,
  `SYSTEM_ERROR`), `last_error`, `last_finished_at`: the device's latest result
  applied; `first_seen`, `updated_at`.
- `hours`: 24 slots, `"0"`..`"23"` (the hour since the epoch modulo 24), each
  `{"h": hour since the epoch, "ok": n, "fail": n}`. A slot is reset when its hour
  comes round again, so a slot older than 24 h is dropped by the next update that
  reuses it, and readers sum only the slots of the last 24 hours.

Redis `{prefix}:devices:known`, a sorted set of every device id at score 0, is the
fleet view's index: ZRANGEBYLEX reads a page of ids from a cursor or a prefix at a
cost that does not grow with the farm (the embedded Mongo server reads every
document of an index range before it limits). The consumer adds its batch's
devices, a group's writer its members; a Redis that lost it has it rebuilt from
`devices` and `device_groups` (console/fleet.py).

A result counts once: only results whose exec record was still open when the batch
read it (the rule of the bench, `device_health.result_outcomes`), so a redelivered
batch changes nothing (a duplicate that two consumers apply at the same moment may
count twice: a view, not a decision).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import redis
import redis.asyncio
from pymongo import UpdateOne
from pymongo.asynchronous.collection import AsyncCollection

from sendscript.keys import Keys
from sendscript.models import ExecRecord, LogType, TaskLogMessage
from sendscript.status import RECORD_OPEN

HOURS = 24


# -- the arithmetic, pure ---------------------------------------------------------------


def hour_of(at: datetime) -> int:
    """Hours since the epoch."""
    return int(at.timestamp() // 3600)


def slot_of(hour: int) -> str:
    return str(hour % HOURS)


def add_to_hours(hours: Mapping[str, Mapping[str, int]], hour: int, ok: int, fail: int
                 ) -> dict[str, dict[str, int]]:
    """`hours` after `ok` successes and `fail` failures in `hour`: what the consumer's
    two updates do to a document (a slot of another hour starts again at zero)."""
    out = {k: dict(v) for k, v in hours.items()}
    slot = slot_of(hour)
    if out.get(slot, {}).get("h") != hour:
        out[slot] = {"h": hour, "ok": 0, "fail": 0}
    out[slot]["ok"] += ok
    out[slot]["fail"] += fail
    return out


def last_day(hours: Mapping[str, Any] | None, now: datetime) -> tuple[int, int]:
    """(successes, failures) over the last 24 hours, this one included."""
    current = hour_of(now)
    ok = fail = 0
    for slot in (hours or {}).values():
        if isinstance(slot, Mapping) and current - HOURS < int(slot.get("h", -1)) <= current:
            ok += int(slot.get("ok", 0))
            fail += int(slot.get("fail", 0))
    return ok, fail


@dataclass(frozen=True)
class DeviceResult:
    device_id: str
    task_id: str
    record_id: str
    result: str  # SUCCESS, ERROR, SYSTEM_ERROR
    error: str
    applied_at: datetime | None = None  # when the consumer applied it (FleetBuffer)

    @property
    def ok(self) -> bool:
        return self.result == LogType.SUCCESS


def device_results(finals: Sequence[TaskLogMessage], records: Mapping[str, ExecRecord]
                   ) -> list[DeviceResult]:
    """The results of a batch that count, in order: one per exec record still open."""
    out: list[DeviceResult] = []
    seen: set[str] = set()
    for msg in finals:
        record = records.get(msg.record_id)
        if record is None or msg.record_id in seen or record.status not in RECORD_OPEN:
            continue
        seen.add(msg.record_id)
        error = "" if msg.log_type == LogType.SUCCESS else msg.message[:300]
        out.append(DeviceResult(record.device_id, record.task_id, msg.record_id,
                                str(msg.log_type), error))
    return out


def device_updates(results: Sequence[DeviceResult], now: datetime,
                   slot_is_current: Set[str] = frozenset()) -> list[UpdateOne]:
    """The updates of a batch, to run in order in one bulk write. Per device: reset
    the hour's slot if it holds another hour (no upsert: a new document is made by the
    next), unless `slot_is_current` says this hour's slot was written already; then
    count the results and set the last one (upsert)."""
    hour = hour_of(now)
    slot = f"hours.{slot_of(hour)}"
    by_device: dict[str, list[DeviceResult]] = {}
    for r in results:
        by_device.setdefault(r.device_id, []).append(r)
    out: list[UpdateOne] = []
    for device, mine in by_device.items():
        ok = sum(r.ok for r in mine)
        last = mine[-1]
        if device not in slot_is_current:
            out.append(UpdateOne({"_id": device, f"{slot}.h": {"$ne": hour}},
                                 {"$set": {slot: {"h": hour, "ok": 0, "fail": 0}}}))
        out.append(UpdateOne(
            {"_id": device},
            {"$inc": {f"{slot}.ok": ok, f"{slot}.fail": len(mine) - ok},
             "$set": {"last_task_id": last.task_id, "last_record_id": last.record_id,
                      "last_result": last.result, "last_error": last.error,
                      "last_finished_at": last.applied_at or now, "updated_at": now},
             "$setOnInsert": {f"{slot}.h": hour, "first_seen": now, "device_id": device}},
            upsert=True))
    return out


async def write_results(col: AsyncCollection, results: Sequence[DeviceResult], now: datetime,
                        written: WrittenThisHour) -> None:
    """A batch's results into `devices` in one bulk write (`device_updates`); the
    devices are then known to hold this hour's slot."""
    await col.bulk_write(device_updates(results, now, written.current(now)), ordered=True)
    written.written(now, [r.device_id for r in results])


class FleetBuffer:
    """Results held for the `devices` documents until the next write (pure: the
    consumer adds each batch's results, and writes what `take` answers when `due`).

    Due once the oldest result held is `interval_s` old (0: at once) or `max_held`
    are held. A result keeps the time it was applied (`last_finished_at`) and counts
    in that hour's slot: `take` answers the results by hour, oldest first, each group
    to be written with the time of its last result."""

    def __init__(self, interval_s: float, max_held: int = 20_000) -> None:
        self.interval_s = interval_s
        self.max_held = max_held
        self.held: list[tuple[datetime, DeviceResult]] = []
        self.since: float | None = None  # monotonic seconds: when the oldest came

    def add(self, results: Sequence[DeviceResult], at: datetime, mono: float) -> None:
        if results and self.since is None:
            self.since = mono
        self.held += [(at, r) for r in results]

    def due(self, mono: float) -> bool:
        if self.since is None:
            return False
        return len(self.held) >= self.max_held or mono - self.since >= self.interval_s

    def take(self) -> list[tuple[datetime, list[DeviceResult]]]:
        by_hour: dict[int, list[tuple[datetime, DeviceResult]]] = {}
        for at, r in self.held:
            by_hour.setdefault(hour_of(at), []).append((at, r))
        self.held, self.since = [], None
        return [(max(at for at, _ in group), [replace(r, applied_at=at) for at, r in group])
                for _, group in sorted(by_hour.items())]


class WrittenThisHour:
    """The devices whose slot of the current hour this process has written: their
    next update needs no reset (no other writer can put another hour in that slot
    within the hour), so a device costs one update a batch, not two, after its first.
    Forgotten when the hour turns."""

    def __init__(self) -> None:
        self.hour = -1
        self.devices: set[str] = set()

    def current(self, now: datetime) -> set[str]:
        if hour_of(now) != self.hour:
            self.hour, self.devices = hour_of(now), set()
        return self.devices

    def written(self, now: datetime, devices: Iterable[str]) -> None:
        self.current(now).update(devices)


# -- Redis: the index of device ids -------------------------------------------------------


def known_args(devices: Iterable[str]) -> list[str | int]:
    """ZADD arguments (score 0 each) for `devices`, without repeats."""
    out: list[str | int] = []
    for device in dict.fromkeys(devices):
        out += [0, device]
    return out


async def note(client: redis.asyncio.Redis, keys: Keys, devices: Iterable[str]) -> None:
    args = known_args(devices)
    if args:
        await client.execute_command("ZADD", keys.devices_known, *args)


def note_sync(client: redis.Redis, keys: Keys, devices: Iterable[str]) -> None:
    args = list(known_args(devices))
    for i in range(0, len(args), 2000):
        client.execute_command("ZADD", keys.devices_known, *args[i:i + 2000])
