"""What `sendscript status` shows: queues, tasks by status, locks, masters, consumers.

Each master's entry is its heartbeat, with its backpressure (`backpressure`: state,
held, high and low water) as the master reports it."""

from __future__ import annotations

import json
import time
from typing import Any

from sendscript import alerts, connect, counts, device_health, limits, pauses
from sendscript.breaker import BreakerState, Circuit
from sendscript.settings import Settings
from sendscript.store import TASKS


def breaker_view(settings: Settings, raw: bytes | None) -> dict[str, Any]:
    """The circuit breaker all masters share (master/circuit.py), with its limits; each
    master's heartbeat (`breaker`) adds its own gate, the drop-rate ladder and quota."""
    state = BreakerState.from_dict(json.loads(raw)) if raw else BreakerState()
    sends = sum(b[0] for b in state.buckets.values())
    fails = sum(b[1] for b in state.buckets.values())
    return {
        "state": str(state.circuit),
        "failure_rate": round(fails / sends, 3) if sends else None,
        "window_sends": sends,
        "streak": state.streak,
        "trips": state.trips,
        "open_for_s": round(max(0.0, state.open_until - time.time()), 1)
        if state.circuit is Circuit.OPEN else 0.0,
        "limits": {
            "degrade_at": settings.breaker_degrade_at,
            "recover_below": settings.breaker_recover_below,
            "trip_after": settings.breaker_trip_after,
            "degraded_concurrency": settings.breaker_degraded_concurrency,
            "drop_rate": {"degrade_at": settings.drop_degrade_at,
                          "open_at": settings.drop_open_at,
                          "hard_stop_at": settings.drop_hard_stop_at,
                          "window_s": settings.drop_window_s},
        },
    }


def gather(settings: Settings) -> dict[str, Any]:
    keys = settings.keys
    r = connect.redis_sync(settings)
    mongo = connect.mongo_sync(settings)
    try:
        db = connect.database(mongo)
        # Kept by the leader as tasks move (sendscript/counts.py); an aggregate over the
        # collection only until they are first built.
        kept = counts.read_sync(r, settings.key_prefix)
        by_status = kept.by_status if kept.built else {
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
            "tasks_counted": {"kept": kept.built, "lag_s": kept.lag_s},
            "locks_held": locks,
            "masters": sorted(masters, key=lambda m: m["master_id"]),
            "workers_alive": sum(m.get("workers_alive", 0) for m in masters if m["alive"]),
            "consumers": consumers,
            "stats": stats,
            "pauses": {s: p.to_dict() for s, p in pauses.list_sync(r, keys).items()},
            "breaker": breaker_view(settings, r.hget(keys.breaker, "state")),
            "alerts": alerts.records(r, keys, settings),
            "rate_limits": limits.status(r, keys, settings.rate_limits, masters),
            "benched": {"devices": device_health.benched_sync(r, keys),
                        "limits": {"after": settings.bench_after,
                                   "cooldown_s": settings.bench_cooldown_s,
                                   "cooldown_max_s": settings.bench_cooldown_max_s,
                                   "alert_count": settings.bench_alert_count}},
        }
    finally:
        r.close()
        mongo.close()
