"""The reliable intake queue in Redis.

Producers LPUSH onto `ready`. A master moves items into a processing list of its
own and tags each with a unique sequence in the same atomic step, so an item
re-read after a crash is recognised and stored once. An item leaves the
processing list only when its task is stored in Mongo (or it is quarantined).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio

from sendscript import replicas
from sendscript.keys import Keys
from sendscript.replicas import ReplicaWait

# KEYS: staging, ready, processing, seq; ARGV[1]: how many at most.
TAKE = """
local out = {}
local n = tonumber(ARGV[1])
local now = redis.call('TIME')
local function take(src)
  while #out < n do
    local item = redis.call('RPOP', src)
    if not item then return end
    local seq = redis.call('INCR', KEYS[4])
    local entry = seq .. '.' .. now[1] .. now[2] .. ' ' .. item
    redis.call('LPUSH', KEYS[3], entry)
    out[#out + 1] = entry
  end
end
take(KEYS[1])
take(KEYS[2])
return out
"""


# A quarantined item is kept whole up to this size; past it, its first this many
# bytes and its size (a 17 MB item in the quarantine list would be a burden too).
QUARANTINE_ITEM_BYTES = 8 * 1024


def ref_item(task_id: str) -> str:
    """The queue item naming a stored task: `{"task_id": ...}` (the contract)."""
    return json.dumps({"task_id": task_id})


def push_refs(client: Any, ready_key: str, task_ids: Iterable[str],
              wait: ReplicaWait | None = None) -> Any:
    """LPUSH a reference per task, first id taken first; with a sync redis client
    this pushes, with an async one it returns the awaitable. None if no ids. With
    `wait`, WAITs for replicas after it (`replicas.NotReplicated` if too few)."""
    items = [ref_item(t) for t in task_ids]
    return replicas.push(client, ready_key, items, wait, what=f"push of {len(items)} task(s)")


def quarantine_record(item: bytes, reason: str, master: str, at: str) -> dict[str, Any]:
    """`{"item", "reason", "master", "at"}`; an item over QUARANTINE_ITEM_BYTES is
    kept truncated, with its size in `item_bytes` and in the reason."""
    record: dict[str, Any] = {"item": item[:QUARANTINE_ITEM_BYTES].decode("utf-8", "replace"),
                              "reason": reason, "master": master, "at": at}
    if len(item) > QUARANTINE_ITEM_BYTES:
        record["reason"] = (f"{reason} (item of {len(item)} bytes: only its first "
                            f"{QUARANTINE_ITEM_BYTES} bytes are kept here)")
        record["item_bytes"] = len(item)
    return record


@dataclass(frozen=True, slots=True)
class Entry:
    """One tagged item of a processing list."""

    raw_entry: bytes

    @property
    def tag(self) -> str:
        return self.raw_entry.split(b" ", 1)[0].decode()

    @property
    def item(self) -> bytes:
        parts = self.raw_entry.split(b" ", 1)
        return parts[1] if len(parts) > 1 else b""


class IntakeQueue:
    def __init__(self, client: redis.asyncio.Redis, keys: Keys, master_id: str,
                 wait: ReplicaWait | None = None) -> None:
        self._redis = client
        self._wait = wait  # replicas to WAIT for after a hand-back
        self._keys = keys
        self._staging = keys.staging(master_id)
        self._processing = keys.processing(master_id)
        self._master_id = master_id
        self._take = client.register_script(TAKE)

    async def take(self, limit: int) -> list[Entry]:
        keys = [self._staging, self._keys.ready, self._processing, self._keys.intake_seq]
        return [Entry(e) for e in await self._take(keys=keys, args=[limit])]

    async def tag_staging(self) -> list[Entry]:
        """Tag what waits in staging into the processing list (a takeover's first step)."""
        keys = [self._staging, self._staging, self._processing, self._keys.intake_seq]
        return [Entry(e) for e in await self._take(keys=keys, args=[1_000_000])]

    async def wait(self, timeout_s: float) -> bool:
        """Block until an item arrives (it lands in staging, for `take`)."""
        moved = await self._redis.blmove(
            self._keys.ready, self._staging, timeout_s, "RIGHT", "LEFT"
        )
        return moved is not None

    async def unfinished(self) -> list[Entry]:
        """Entries taken before a crash and never acknowledged, oldest first."""
        entries = await self._redis.lrange(self._processing, 0, -1)
        return [Entry(e) for e in reversed(entries)]

    async def ack(self, done: list[Entry], quarantined: list[tuple[Entry, str]],
                  cursors: dict[str, str | None] | None = None) -> None:
        """Drop stored entries; move refused ones to quarantine with their reasons; in
        the same step, set (a device) or drop (None) the fan-out cursors named."""
        if not done and not quarantined and not cursors:
            return
        at = datetime.now(UTC).isoformat()
        pipe = self._redis.pipeline(transaction=True)
        for tag, device in (cursors or {}).items():
            if device is None:
                pipe.hdel(self._keys.fanout_cursors, tag)
            else:
                pipe.hset(self._keys.fanout_cursors, tag, device)
        for entry in done:
            pipe.lrem(self._processing, 1, entry.raw_entry)
        for entry, reason in quarantined:
            record = quarantine_record(entry.item, reason, self._master_id, at)
            pipe.lpush(self._keys.quarantine, json.dumps(record))
            pipe.lrem(self._processing, 1, entry.raw_entry)
        if quarantined:
            pipe.hincrby(self._keys.stats, "quarantined", len(quarantined))
        await pipe.execute()

    async def fanout_cursors(self, tags: list[str]) -> dict[str, str]:
        """The last device stored of each fan-out item named that is part stored."""
        if not tags:
            return {}
        values = await self._redis.hmget(self._keys.fanout_cursors, tags)
        return {t: v.decode() if isinstance(v, bytes) else v
                for t, v in zip(tags, values, strict=True) if v is not None}

    async def hand_back(self, task_ids: list[str]) -> None:
        """Put task ids at the head of the ready queue, for any master to take next.
        Raises `replicas.NotReplicated` if pushed but too few replicas confirmed."""
        if task_ids:
            # RPUSH puts the last argument nearest the taking end: reverse to keep order.
            await replicas.push(self._redis, self._keys.ready,
                                [ref_item(t) for t in reversed(task_ids)], self._wait,
                                what=f"hand-back of {len(task_ids)} task(s)", head=True)

    async def backlog(self) -> int:
        return int(await self._redis.llen(self._keys.ready))
