"""The fleet view: every device that has run a task or is in a group, a page at a time.

A page costs the same with 20,000 devices as with 20: its ids come from the Redis
index of device ids (ZRANGEBYLEX from a prefix or the cursor; a group's members
from its document), its figures from the `devices` documents of those ids (one read
by id), its live state from Redis for those ids only (one pipelined read: lock,
bench, failure streak, pauses) and, for the locked ones, the running task (the
open exec records of the tasks their locks name as owners: one read by index,
sendscript/lock_holders.py). Nothing scans tasks. See sendscript/fleet.py
for what the consumer keeps.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import itertools
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from console.data import Stores, lock_holders
from sendscript import fleet
from sendscript.groups import GROUP_NAME
from sendscript.store import DEVICES, GROUPS

MAX_PAGE = 200
MAX_GROUPS = 1000
MAX_GROUP_AGE_S = 30.0
ID_CHUNK = 50  # the embedded server's `$in` costs more than linearly in its length
CURSOR = r"^[A-Za-z0-9_=-]{2,600}$"
EVERYTHING = ("hard", "global", "quota")


class FleetQuery(BaseModel):
    """Which devices (an id prefix, a group) and the page (`after`: the previous
    page's `next`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    prefix: str = Field("", pattern=r"^[A-Za-z0-9_.:@/+= -]{0,200}$")
    group: str | None = Field(None, pattern=GROUP_NAME.pattern)
    after: str | None = Field(None, pattern=CURSOR)
    limit: int = Field(50, ge=1, le=MAX_PAGE)


def encode_cursor(device_id: str) -> str:
    return base64.urlsafe_b64encode(device_id.encode()).decode()


def decode_cursor(cursor: str) -> str:
    """The device id a cursor names; ValueError if it is none of ours."""
    try:
        return base64.urlsafe_b64decode(cursor.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError("not a cursor this view gave") from None


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def ensure_index(stores: Stores) -> bool:
    """Build the Redis index of device ids from Mongo if Redis lost it (or never had
    it); True if it was built now."""
    r, keys = stores.redis, stores.keys
    if r.exists(keys.devices_known_built):
        return False
    ids = [d["_id"] for d in stores.db[DEVICES].find({}, {"_id": 1})]
    for doc in stores.db[GROUPS].find({}, {"devices": 1}).limit(MAX_GROUPS):
        ids += [d for d in doc.get("devices", []) if isinstance(d, str)]
    fleet.note_sync(r, keys, ids)
    r.set(keys.devices_known_built, datetime.now(UTC).isoformat())
    return True


@dataclass
class GroupIndex:
    """Every group's members, sorted, and every member's groups: read whole only when
    a group changed (its `updated_at`, which the SDK and CLI set, or the set of
    groups) or after MAX_GROUP_AGE_S (a writer that leaves `updated_at` alone), so a
    page does not read a 20,000-device group's list each time."""

    signature: tuple[tuple[str, Any], ...]
    read_at: float
    members: dict[str, list[str]]
    of_device: dict[str, list[str]]

    @classmethod
    def read(cls, stores: Stores) -> GroupIndex:
        db, memo = stores.db, stores.memo
        signature = tuple((d["_id"], d.get("updated_at")) for d in db[GROUPS].find(
            {}, {"updated_at": 1}).sort("_id", 1).limit(MAX_GROUPS))
        kept = memo.get("groups")
        if isinstance(kept, GroupIndex) and kept.signature == signature \
                and time.monotonic() - kept.read_at < MAX_GROUP_AGE_S:
            return kept
        members: dict[str, list[str]] = {}
        of_device: dict[str, list[str]] = {}
        for doc in db[GROUPS].find({}, {"devices": 1}).sort("_id", 1).limit(MAX_GROUPS):
            devices = sorted({d for d in doc.get("devices", []) if isinstance(d, str)})
            members[doc["_id"]] = devices
            for d in devices:
                of_device.setdefault(d, []).append(doc["_id"])
        memo["groups"] = index = cls(signature, time.monotonic(), members, of_device)
        return index


def page_ids(stores: Stores, q: FleetQuery, groups: GroupIndex
             ) -> tuple[list[str], str | None]:
    """The page's device ids in id order, and the cursor of the next page."""
    after = decode_cursor(q.after) if q.after else None
    if q.group is not None:
        members = groups.members.get(q.group, [])
        start = bisect.bisect_right(members, after) if after is not None \
            and after >= q.prefix else bisect.bisect_left(members, q.prefix)
        ids: list[str] = []
        for d in itertools.islice(members, start, None):
            if not d.startswith(q.prefix) or len(ids) > q.limit:
                break
            ids.append(d)
    else:
        ensure_index(stores)
        low = b"(" + after.encode() if after is not None and after >= q.prefix \
            else b"[" + q.prefix.encode()
        # No UTF-8 text holds the byte 0xff: every id with the prefix sorts below this.
        high = b"(" + q.prefix.encode() + b"\xff" if q.prefix else b"+"
        ids = [_text(d) for d in stores.redis.zrangebylex(stores.keys.devices_known, low,
                                                          high, 0, q.limit + 1)]
    more = len(ids) > q.limit
    ids = ids[:q.limit]
    return ids, encode_cursor(ids[-1]) if more and ids else None


def documents(stores: Stores, ids: list[str]) -> dict[str, dict[str, Any]]:
    """The `devices` documents of `ids`, by `_id` in short lists: the embedded server
    answers an `_id` range by reading the whole collection, and `devices` keeps no
    other index (each would cost every update of a device)."""
    col = stores.db[DEVICES]
    out: dict[str, dict[str, Any]] = {}
    for i in range(0, len(ids), ID_CHUNK):
        out.update((d["_id"], d) for d in col.find({"_id": {"$in": ids[i:i + ID_CHUNK]}}))
    return out


def live_state(stores: Stores, ids: list[str]) -> tuple[list[Any], list[Any], list[Any],
                                                        dict[str, str]]:
    """Locks, bench ends and health entries of `ids`, and the pauses: one round trip."""
    r, keys = stores.redis, stores.keys
    pipe = r.pipeline(transaction=False)
    for d in ids:
        pipe.get(keys.device_lock(d))
    pipe.zmscore(keys.devices_benched, ids)
    pipe.hmget(keys.device_health, ids)
    pipe.hgetall(keys.pauses)
    raw = pipe.execute()
    n = len(ids)
    pauses = {_text(k): _text(v) for k, v in raw[n + 2].items()}
    return raw[:n], raw[n] or [None] * n, raw[n + 1], pauses


def running_tasks(stores: Stores, fences: dict[str, int]) -> dict[str, dict[str, Any]]:
    """device -> the attempt holding its lock now (task id, attempt), by the fence."""
    return {device: {"task_id": d.get("task_id"), "attempt": d.get("attempt")}
            for device, d in lock_holders(stores, fences).items()}


def fleet_page(stores: Stores, q: FleetQuery, now: datetime | None = None) -> dict[str, Any]:
    """One page of the fleet: each device's state now, last result and last 24 h."""
    now = now or datetime.now(UTC)
    groups = GroupIndex.read(stores)
    ids, cursor = page_ids(stores, q, groups)
    if not ids:
        return {"devices": [], "next": None}
    docs = documents(stores, ids)
    locks, benched, health, pauses = live_state(stores, ids)
    fences = {d: int(v) for d, v in zip(ids, locks, strict=True)
              if v is not None and _text(v).isdigit()}
    running = running_tasks(stores, fences)
    now_ms = int(time.time() * 1000)
    rows = []
    for i, d in enumerate(ids):
        until = int(benched[i]) if benched[i] is not None else 0
        rows.append(row(d, docs.get(d, {}), now, lock=_text(locks[i]) if locks[i] else None,
                        running=running.get(d), bench_left_ms=max(0, until - now_ms),
                        health=health[i], groups=groups.of_device.get(d, []),
                        pauses=pauses))
    return {"devices": rows, "next": cursor}


def paused_by(device_id: str, groups: list[str], pauses: dict[str, str]) -> list[str]:
    scopes = {*EVERYTHING, f"device:{device_id}", *(f"group:{g}" for g in groups)}
    return sorted(s for s in pauses if s in scopes)


def row(device_id: str, doc: dict[str, Any], now: datetime, *, lock: str | None,
        running: dict[str, Any] | None, bench_left_ms: int, health: bytes | str | None,
        groups: list[str], pauses: dict[str, str]) -> dict[str, Any]:
    """A device as the view lists it (pure: the tests check it on its own)."""
    ok, fail = fleet.last_day(doc.get("hours"), now)
    paused = paused_by(device_id, groups, pauses)
    entry: dict[str, Any] = {}
    if health:
        try:
            entry = json.loads(health)
        except ValueError:
            entry = {}
    state = ("running" if lock is not None else "benched" if bench_left_ms > 0
             else "paused" if paused else "free")
    return {
        "device_id": device_id, "state": state, "locked": lock is not None,
        "fence": lock, "running": running,
        "benched_left_s": round(bench_left_ms / 1000, 1) if bench_left_ms else None,
        "paused": paused, "groups": groups,
        "streak": int(entry.get("streak", 0)) if isinstance(entry, dict) else 0,
        "last_task_id": doc.get("last_task_id"), "last_result": doc.get("last_result"),
        "last_error": doc.get("last_error") or None,
        "last_finished_at": doc.get("last_finished_at"),
        "day_tasks": ok + fail, "day_ok": ok, "day_failed": fail,
        "day_success_rate": round(ok / (ok + fail), 3) if ok + fail else None,
    }
