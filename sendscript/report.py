"""What `sendscript status` shows: queues, tasks by status, locks, masters, consumers.

Each master's entry is its heartbeat, with its backpressure (`backpressure`: state,
held, high and low water) as the master reports it."""

from __future__ import annotations

import json
from typing import Any

from sendscript import alerts, connect, limits, pauses
from sendscript.settings import Settings
from sendscript.store import TASKS


def gather(settings: Settings) -> dict[str, Any]:
    keys = settings.keys
    r = connect.redis_sync(settings)
    mongo = connect.mongo_sync(settings)
    try:
        db = connect.database(mongo)
        by_status = {
            d["_id"]: d["n"]
            for d in db[TASKS].aggregate([{"$group": {"_id": "$status", "n": {"$sum": 1}}}])
        }
        locks = sum(1 for _ in r.scan_iter(match=keys.device_lock_pattern, count=1000))
        masters = []
        for master_id, raw in r.hgetall(keys.masters).items():
            info = json.loads(raw)
            info["alive"] = bool(r.exists(keys.master_alive(master_id.decode())))
            masters.append(info)
        consumers = []
        for name, raw in r.hgetall(keys.consumers).items():
            info = json.loads(raw)
            info["alive"] = bool(r.exists(keys.consumer_alive(name.decode())))
            consumers.append(info)
        stats = {k.decode(): int(v) for k, v in r.hgetall(keys.stats).items()}
        return {
            "queue_ready": r.llen(keys.ready),
            "queue_ready_max": settings.ready_max,  # producers' cap, 0: none
            "queue_quarantine": r.llen(keys.quarantine),
            "tasks": by_status,
            "locks_held": locks,
            "masters": sorted(masters, key=lambda m: m["master_id"]),
            "workers_alive": sum(m.get("workers_alive", 0) for m in masters if m["alive"]),
            "consumers": consumers,
            "stats": stats,
            "pauses": {s: p.to_dict() for s, p in pauses.list_sync(r, keys).items()},
            "alerts": alerts.records(r, keys, settings),
            "rate_limits": limits.status(r, keys, settings.rate_limits, masters),
        }
    finally:
        r.close()
        mongo.close()
