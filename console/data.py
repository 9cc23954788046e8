"""What the console shows, read from the service's own stores (sync clients, bounded).

Every read is capped (a page, a number of keys, a time) so a page costs the same on a
big farm as on a small one; nothing here writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from pymongo import DESCENDING, MongoClient
from pymongo.database import Database

from console.filters import Page, TaskFilter, to_query
from console.search import TaskQuery, search_tasks_sync
from sendscript import alerts, connect, counts, device_health, fleet, limits, pauses
from sendscript.agent_store import agents_sync, leases_held_sync
from sendscript.dedupe import describe as describe_dedupe
from sendscript.keys import Keys
from sendscript.lock_holders import (
    RECORD_FIELDS,
    TASK_FIELDS,
    current_records,
    holding,
    owned_records,
    owner_task,
    unowned_tasks,
)
from sendscript.models import PULL
from sendscript.report import breaker_view
from sendscript.search_reads import batch_counts, newest
from sendscript.settings import Settings
from sendscript.store import (
    DEVICES,
    GROUPS,
    LOGS,
    RECORDS,
    SCHEDULES,
    TASKS,
)
from sendscript.task_search import SEARCH

AUDIT = "audit"
MAX_LOGS = 500
MAX_RECORDS = 200
MAX_AGENTS = 1000
MAX_LEASES = 5000
IDLE_MS = 500


@dataclass
class Stores:
    """The console's connections: one Redis and one Mongo client per process."""

    settings: Settings
    redis: redis.Redis
    mongo: MongoClient
    db: Database
    # What a read may keep between requests of this process (console/fleet.py: the
    # groups' members), each entry checked against the stores before it is used.
    memo: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def open(cls, settings: Settings) -> Stores:
        mongo = connect.mongo_sync(settings)
        return cls(settings, connect.redis_sync(settings), mongo, connect.database(mongo))

    @property
    def keys(self) -> Keys:
        return self.settings.keys

    def close(self) -> None:
        self.redis.close()
        self.mongo.close()


def _text(value: bytes | str | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def _json(raw: bytes | str | None) -> dict[str, Any]:
    try:
        doc = json.loads(raw or "{}")
        return doc if isinstance(doc, dict) else {"value": doc}
    except ValueError:
        return {"unreadable": _text(raw)[:200]}


# -- overview ------------------------------------------------------------------------------


def status_counts(stores: Stores) -> dict[str, int]:
    """Tasks per status: the counts the leader keeps in Redis as tasks move
    (sendscript/counts.py, one round trip), or, until they are first built, the
    aggregate `sendscript status` falls back to."""
    kept = counts.read_sync(stores.redis, stores.settings.keys.prefix)
    if kept.built:
        return dict(kept.by_status)
    return {d["_id"]: d["n"] for d in
            stores.db[TASKS].aggregate([{"$group": {"_id": "$status", "n": {"$sum": 1}}}])}


def heartbeats(stores: Stores) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(masters, consumers) from their heartbeat hashes, each with `alive`."""
    r, keys = stores.redis, stores.keys
    out: list[list[dict[str, Any]]] = []
    for hash_key, alive_key, ident in ((keys.masters, keys.master_alive, "master_id"),
                                       (keys.consumers, keys.consumer_alive, "name")):
        raw = r.hgetall(hash_key)
        names = [_text(k) for k in raw]
        alive = r.mget([alive_key(n) for n in names]) if names else []
        rows = []
        for name, value, up in zip(names, raw.values(), alive, strict=True):
            info = _json(value)
            info.setdefault(ident, name)
            info["alive"] = up is not None
            rows.append(info)
        out.append(sorted(rows, key=lambda i: (not i["alive"], str(i.get(ident)))))
    return out[0], out[1]


def overview(stores: Stores, by_status: dict[str, int] | None = None,
             beats: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None
             ) -> dict[str, Any]:
    r, keys, settings = stores.redis, stores.keys, stores.settings
    masters, consumers = beats or heartbeats(stores)
    live = [m for m in masters if m["alive"]]
    pipe = r.pipeline(transaction=False)
    pipe.llen(keys.ready)
    pipe.llen(keys.quarantine)
    pipe.hgetall(keys.stats)
    pipe.hget(keys.breaker, "state")
    ready, quarantined, stats, breaker_raw = pipe.execute()
    return {
        "tasks": by_status if by_status is not None else status_counts(stores),
        "queues": {"ready": ready, "quarantine": quarantined,
                   "held": sum(int(m.get("queued", 0)) for m in live),
                   "delayed_held": sum(int(m.get("delayed_held", 0)) for m in live),
                   "inflight": sum(int(m.get("inflight", 0)) for m in live)},
        "alive": {"masters": len(live), "masters_known": len(masters),
                  "workers": sum(int(m.get("workers_alive", 0)) for m in live),
                  "consumers": sum(1 for c in consumers if c["alive"])},
        "masters": [{"master_id": m.get("master_id"), "alive": m["alive"],
                     "workers_alive": m.get("workers_alive"),
                     "backpressure": m.get("backpressure"),
                     "breaker": (m.get("breaker") or {}).get("state")
                     if isinstance(m.get("breaker"), dict) else m.get("breaker"),
                     "pauses": m.get("pauses")} for m in masters],
        "pauses": {s: p.to_dict() for s, p in pauses.list_sync(r, keys).items()},
        "breaker": breaker_view(settings, breaker_raw),
        "rate_limits": rate_limits(r, settings, masters),
        "stats": {_text(k): int(v) for k, v in stats.items()},
        "incidents": alerts.records(r, keys, settings)["incidents"],
    }


def rate_limits(r: redis.Redis, settings: Settings, masters: list[dict[str, Any]]
                ) -> list[dict[str, Any]]:
    """Every rate limit set here or reported by a live master, as `status` shows it
    (one script call), each with `shown`: an adaptive limit's current value, why it
    last moved and the hold left of a Retry-After."""
    rows = limits.status(r, settings.keys, settings.rate_limits, masters)
    for row in rows:
        row["shown"] = limit_line(row)
    return rows


def limit_line(row: dict[str, Any]) -> str:
    """`global 12/1s (20/1s~2..100): 429 x3, Retry-After 2s, hold 1.4s`; a fixed
    limit: `queue:bulk 5/2s`."""
    if "current" not in row:
        return f"{row['name']} {row['rule']}"
    rule = limits.RateLimit(row["name"], *limits.parse_rule(row["rule"]))
    line = (f"{row['name']} {row['current']:.1f}/{limits.format_duration(rule.duration_ms)} "
            f"({row['rule']}): {row['why']}")
    if row.get("hold_s"):
        line += f", hold {row['hold_s']:.1f}s"
    return line


def rate_totals(masters: list[dict[str, Any]], consumers: list[dict[str, Any]]
                ) -> tuple[int, int]:
    """(sends, results) counted so far by the live roles: the sampler turns their
    differences into rates."""
    sends = sum(int((m.get("outcomes") or {}).get("sent", 0)) for m in masters if m["alive"])
    results = sum(int(c.get("applied", 0)) for c in consumers if c["alive"])
    return sends, results


# -- tasks ---------------------------------------------------------------------------------


def group_members(db: Database, group: str) -> list[str]:
    doc = db[GROUPS].find_one({"_id": group}, {"devices": 1})
    return list(doc.get("devices", [])) if doc else []


def task_query(db: Database, flt: TaskFilter) -> dict[str, Any]:
    return to_query(flt, group_members(db, flt.group) if flt.group else None)


TASK_ROW = {"_id": 1, "device_id": 1, "status": 1, "queue": 1, "script.id": 1, "attempt": 1,
            "priority": 1, "created_at": 1, "updated_at": 1, "last_error": 1, "batch_id": 1}


def _row(doc: dict[str, Any]) -> dict[str, Any]:
    """A task row: `id` for `_id`, the script's id for the script."""
    doc["id"] = doc.pop("_id")
    doc["script_id"] = (doc.pop("script", None) or {}).get("id")
    return doc


def search_tasks(stores: Stores, flt: TaskFilter, page: Page) -> dict[str, Any]:
    """One page, newest first, through the service's task search (console/search.py:
    bounded windows of the created_at indexes, keyset cursor). SearchError: a 4xx."""
    q = TaskQuery(device_id=flt.device, group=flt.group, queue=flt.queue,
                  script_id=flt.script, statuses=[str(flt.status)] if flt.status else [],
                  error_prefix=flt.error, batch_id=flt.batch, created_from=flt.since,
                  created_to=flt.until, limit=page.limit, after=page.before)
    found = search_tasks_sync(stores.db, q)
    # partial: the page's time ran out first; older matches may follow `next`
    return {"tasks": [_row(d) for d in found.items], "next": found.next_after,
            "partial": found.partial, "searched_to": found.searched_to}


def task_exists(stores: Stores, task_id: str) -> bool:
    return stores.db[TASKS].find_one({"_id": task_id}, {"_id": 1}) is not None


def task_detail(stores: Stores, task_id: str) -> dict[str, Any] | None:
    db = stores.db
    task = db[TASKS].find_one({"_id": task_id})
    if task is None:
        return None
    records = list(db[RECORDS].find({"task_id": task_id}, {"lease_token": 0})
                   .sort("attempt", 1).limit(MAX_RECORDS))
    logs = list(db[LOGS].find({"task_id": task_id}).sort("timestamp", 1).limit(MAX_LOGS))
    task = without_lease_tokens(task)
    return {"task": task, "records": records, "logs": logs, "pull": pull_view(task),
            "timeline": timeline(task, records, logs),
            "dedupe": describe_dedupe(task, stores.settings.dedupe_window_s)}


def without_lease_tokens(task: dict[str, Any]) -> dict[str, Any]:
    """The task as shown: a lease token lets whoever holds it complete or fail the
    task through the agents API, so neither the lease's nor the last one's leaves."""
    for field in ("lease", "last_lease"):
        if isinstance(task.get(field), dict):
            task[field] = {k: v for k, v in task[field].items() if k != "token"}
    return task


def pull_view(task: dict[str, Any]) -> dict[str, Any] | None:
    """A pull task's agent side: its checkpoint, the lease held now (who, until when),
    how the last one ended and the result; None for a pushed task."""
    if task.get("mode") != PULL:
        return None
    lease = task.get("lease") or {}
    last = task.get("last_lease") or {}
    return {"checkpoint": task.get("checkpoint"),
            "lease": {"agent": lease.get("agent"), "leased_at": lease.get("leased_at"),
                      "deadline": lease.get("deadline"), "cap": lease.get("cap"),
                      "seq": lease.get("seq")} if lease else None,
            "last_lease": {"agent": last.get("agent"), "outcome": last.get("outcome")}
            if last else None,
            "result": task.get("result")}


def timeline(task: dict[str, Any], records: list[dict[str, Any]],
             logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every dated event of a task, oldest first."""
    events: list[dict[str, Any]] = []

    def add(at: Any, what: str, detail: str = "") -> None:
        if at is not None:
            events.append({"at": at, "what": what, "detail": detail})

    add(task.get("created_at"), "created", f"queue {task.get('queue', 'default')}")
    for rec in records:
        n = rec.get("attempt")
        add(rec.get("started_at"), f"attempt {n} started", f"worker {rec.get('worker', '')}")
        add(rec.get("sent_at"), f"attempt {n} sent", rec.get("send_error") or "")
        add(rec.get("finished_at"), f"attempt {n} {rec.get('status')}", rec.get("error") or "")
    for log in logs:
        add(log.get("received_at"), f"log {log.get('log_type')}", str(log.get("message", ""))[:200])
    add(task.get("finished_at"), f"task {task.get('status')}", task.get("last_error") or "")
    return sorted(events, key=lambda e: e["at"])


# -- devices -------------------------------------------------------------------------------


def _locks(stores: Stores, devices: list[str]) -> dict[str, dict[str, Any]]:
    if not devices:
        return {}
    pipe = stores.redis.pipeline(transaction=False)
    for d in devices:
        pipe.get(stores.keys.device_lock(d))
        pipe.pttl(stores.keys.device_lock(d))
    raw = pipe.execute()
    out = {}
    for i, d in enumerate(devices):
        value, ttl = raw[2 * i], raw[2 * i + 1]
        if value is not None:
            out[d] = {"fence": _text(value), "ttl_s": round(ttl / 1000, 1) if ttl > 0 else None}
    return out


def lock_holders(stores: Stores, held: dict[str, int]) -> dict[str, Any]:
    """device -> the open exec record holding its lock (`held`: device -> fence), read
    through the task the lock was taken for (sendscript/lock_holders.py)."""
    if not held:
        return {}
    entries = stores.redis.hmget(stores.keys.lock_owners, list(held))
    owned = {d: owner_task(e, held[d]) for d, e in zip(held, entries, strict=True)}
    reads = owned_records(held, owned)
    tasks = [t for q in unowned_tasks(held, owned) for t in stores.db[TASKS].find(q, TASK_FIELDS)]
    reads += current_records(tasks)
    return dict(holding(held, [r for q in reads
                               for r in stores.db[RECORDS].find(q, RECORD_FIELDS)]))


def device_detail(stores: Stores, device_id: str) -> dict[str, Any]:
    r, keys, db = stores.redis, stores.keys, stores.db
    lock = _locks(stores, [device_id]).get(device_id)
    running = None
    if lock is not None and lock["fence"].isdigit():
        rec = lock_holders(stores, {device_id: int(lock["fence"])}).get(device_id)
        if rec is not None:
            running = {"task_id": rec.get("task_id"), "attempt": rec.get("attempt"),
                       "record_id": rec.get("_id"), "status": rec.get("status")}
    recent = newest(db, 20, {"device_id": device_id}, projection=TASK_ROW)
    health = _json(r.hget(keys.device_health, device_id)) if r.hexists(
        keys.device_health, device_id) else {}
    groups = [d["_id"] for d in db[GROUPS].find({"devices": device_id}, {"_id": 1}).limit(100)]
    active = pauses.list_sync(r, keys)
    kept = db[DEVICES].find_one({"_id": device_id}) or {}
    ok, failed = fleet.last_day(kept.get("hours"), datetime.now(UTC))
    return {
        "device_id": device_id, "locked": lock is not None, "lock": lock, "running": running,
        "last_task_id": kept.get("last_task_id"), "last_result": kept.get("last_result"),
        "last_finished_at": kept.get("last_finished_at"),
        "day": {"tasks": ok + failed, "ok": ok, "failed": failed},
        "recent": [_row(t) for t in recent],
        "health": health, "streak": int(health.get("streak", 0)),
        "benched": device_health.benched_sync(r, keys).get(device_id),
        "groups": groups,
        "paused": [s for s in active if s in ("global", "hard", f"device:{device_id}")
                   or s in {f"group:{g}" for g in groups}],
    }


# -- agents --------------------------------------------------------------------------------


def leases_held(stores: Stores, limit: int = MAX_LEASES) -> dict[str, list[dict[str, Any]]]:
    """Running pull tasks per leasing agent."""
    return leases_held_sync(stores.db, limit)


def agents(stores: Stores, limit: int = MAX_AGENTS) -> list[dict[str, Any]]:
    """Registered agents, their state (`active`, or `lost` once silent for
    SENDSCRIPT_AGENT_TTL_S) and the leases they hold; never the token they registered
    with."""
    held = leases_held(stores)
    out = []
    for doc in agents_sync(stores.db, stores.settings.agent_ttl_s, limit):
        leases = sorted(held.get(doc["_id"], []), key=lambda x: x["task_id"])
        out.append({"id": doc["_id"], "name": doc.get("name", ""),
                    "labels": doc.get("labels", []), "devices": doc.get("devices", []),
                    "version": doc.get("version", ""),
                    "state": doc["state"], "stop": bool(doc.get("stop")),
                    "last_seen": doc.get("last_seen"), "registered_at": doc.get("registered_at"),
                    "leases": len(leases), "tasks": leases})
    return out


# -- the rest --------------------------------------------------------------------------------


def schedules(stores: Stores) -> list[dict[str, Any]]:
    out = []
    for d in stores.db[SCHEDULES].find().sort("_id", 1).limit(1000):
        out.append({"name": d["_id"], "cron": d.get("cron"), "interval_s": d.get("interval_s"),
                    "timezone": d.get("timezone"), "enabled": d.get("enabled", True),
                    "next_fire_at": d.get("next_fire_at"), "last_fire_at": d.get("last_fire_at"),
                    "fires": d.get("fires", 0), "missed": d.get("missed", 0),
                    "group": d.get("group"), "devices": len(d.get("device_ids") or []),
                    "script_id": ((d.get("template") or {}).get("script") or {}).get("id")})
    return out


def batches(stores: Stores, limit: int = 20) -> list[dict[str, Any]]:
    """The newest fan-out batches with their progress per status."""
    seen: dict[str, Any] = {}
    for d in stores.db[SEARCH].find({"batch_id": {"$type": "string"}},
                                    {"batch_id": 1, "created_at": 1}) \
            .sort("created_at", DESCENDING).limit(5000):
        seen.setdefault(d["batch_id"], d.get("created_at"))
        if len(seen) >= limit:
            break
    out = []
    for batch_id, created in seen.items():
        counts = batch_counts(stores.db, batch_id)
        total = sum(counts.values())
        done = sum(n for s, n in counts.items() if s in ("success", "failed", "cancelled",
                                                          "expired"))
        out.append({"batch_id": batch_id, "created_at": created, "total": total, "done": done,
                    "counts": counts})
    return out


def entry_id(raw: bytes | str) -> str:
    """A quarantine entry's id: the hash of its stored text (the list has no other)."""
    data = raw if isinstance(raw, bytes) else raw.encode()
    return hashlib.sha256(data).hexdigest()[:32]


def quarantine(stores: Stores, limit: int = 200) -> list[dict[str, Any]]:
    out = []
    for raw in stores.redis.lrange(stores.keys.quarantine, 0, limit - 1):
        doc = _json(raw)
        out.append({"id": entry_id(raw), "reason": doc.get("reason", ""),
                    "item": str(doc.get("item", ""))[:2000], "master": doc.get("master", ""),
                    "at": doc.get("at", "")})
    return out


def dead_letters(settings: Settings, limit: int = 200, timeout_s: float = 3.0
                 ) -> list[dict[str, Any]]:
    """The dead-letter topic from its earliest message: at most `limit`, for at most
    about `timeout_s` (a Reader: it takes nothing from any subscription)."""
    import time

    import pulsar

    client = pulsar.Client(settings.pulsar_url or "", **connect.pulsar_kwargs(settings, timeout_s),
                           logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error))
    out: list[dict[str, Any]] = []
    try:
        reader = client.create_reader(settings.dlq_topic, pulsar.MessageId.earliest)
        deadline = time.monotonic() + timeout_s
        # No has_message_available(): pulsar-lite cannot answer getLastMessageId. A read
        # that waits IDLE_MS in vain means the topic has nothing more.
        while len(out) < limit and time.monotonic() < deadline:
            left_ms = int((deadline - time.monotonic()) * 1000)
            try:
                msg = reader.read_next(timeout_millis=max(50, min(IDLE_MS, left_ms)))
            except pulsar.Timeout:
                break
            doc = _json(msg.data())
            out.append({"id": str(msg.message_id()), "reason": doc.get("reason", ""),
                        "data": str(doc.get("data", ""))[:2000],
                        "at": msg.publish_timestamp()})
        reader.close()
    finally:
        client.close()
    return out


def audit(stores: Stores, limit: int = 200) -> list[dict[str, Any]]:
    out = []
    for d in stores.db[AUDIT].find().sort("at", DESCENDING).limit(limit):
        d["id"] = str(d.pop("_id"))
        out.append(d)
    return out
