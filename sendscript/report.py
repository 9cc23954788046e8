"""What `sendscript status` shows: queues, tasks by status, locks, masters, consumers.

Each master's entry is its heartbeat, with its backpressure (`backpressure`: state,
held, high and low water) as the master reports it."""

from __future__ import annotations

import json
import time
from typing import Any

from sendscript import alerts, connect, counts, device_health, limits, pauses
from sendscript.breaker import BreakerState, Circuit
from sendscript.search_reads import batch_counts
from sendscript.settings import Settings
from sendscript.store import TASKS


def breaker_view(settings: Settings, raw: bytes | None) -> dict[str, Any]:
    """The circuit breaker all masters share (master/breaker.py), with its limits; each
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
        kept = counts.read_sync(r, settings.keys.prefix)
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


# -- `sendscript monitor health` / `progress` ---------------------------------------------


def health_checks(settings: Settings, info: dict[str, Any] | None, error: str | None = None
                  ) -> list[tuple[str, bool, str]]:
    """(check, ok, detail) for `monitor health`; `info` is `gather`'s answer (None when
    Redis or Mongo could not be read: `error` says why)."""
    if info is None:
        return [("redis and mongo", False, error or "unreachable")]
    checks: list[tuple[str, bool, str]] = [("redis and mongo", True, "answer")]
    alive = [m for m in info["masters"] if m["alive"]]
    checks.append(("masters alive", bool(alive),
                   f"{len(alive)} of {len(info['masters'])} known"))
    workers = sum(m.get("workers_alive", 0) for m in alive)
    wanted = sum(m.get("workers", 0) for m in alive)
    checks.append(("workers online", workers > 0 and workers == wanted, f"{workers}/{wanted}"))
    consumers = [c for c in info["consumers"] if c["alive"]]
    checks.append(("consumers alive", bool(consumers), f"{len(consumers)}"))
    breaker = info.get("breaker") or {}
    checks.append(("circuit breaker", breaker.get("state") not in ("open", "half_open"),
                   str(breaker.get("state"))))
    paused = list(info.get("pauses") or {})
    checks.append(("pauses", not paused, ", ".join(paused) or "none"))
    throttled = [m["master_id"] for m in alive
                 if (m.get("backpressure") or {}).get("state") == "throttled"]
    checks.append(("backpressure", not throttled,
                   f"throttled: {', '.join(throttled)}" if throttled else "open"))
    counted = info.get("tasks_counted") or {}
    lag = counted.get("lag_s")
    fresh = bool(counted.get("kept")) and lag is not None and lag < max(
        30.0, 6 * settings.counts_interval_s)
    checks.append(("task counts", fresh, f"last pass {lag} s ago" if lag is not None
                   else "not built"))
    return checks


def reachable(settings: Settings, timeout_s: float = 3.0) -> list[tuple[str, bool, str]]:
    """Central-control and Pulsar answer at all (any HTTP answer; a TCP connect)."""
    import socket
    from urllib.parse import urlparse

    import httpx

    out: list[tuple[str, bool, str]] = []
    if settings.central_url:
        try:
            code = httpx.get(settings.central_url, timeout=timeout_s).status_code
            out.append(("central-control", True, f"HTTP {code}"))
        except httpx.HTTPError as exc:
            out.append(("central-control", False, type(exc).__name__))
    if settings.pulsar_url:
        url = urlparse(settings.pulsar_url)
        try:
            with socket.create_connection((url.hostname or "localhost", url.port or 6650),
                                          timeout=timeout_s):
                out.append(("pulsar", True, "connects"))
        except OSError as exc:
            out.append(("pulsar", False, str(exc)[:80]))
    return out


TERMINAL_STATUSES = ("success", "failed", "cancelled", "expired")


def progress_counts(settings: Settings, batch_id: str | None) -> dict[str, int]:
    """Tasks per status: a batch's (read through its search documents), or all tasks'
    (the kept counts)."""
    if batch_id is None:
        r = connect.redis_sync(settings)
        try:
            return counts.read_sync(r, settings.keys.prefix).by_status
        finally:
            r.close()
    mongo = connect.mongo_sync(settings)
    try:
        db = connect.database(mongo)
        return batch_counts(db, batch_id)
    finally:
        mongo.close()


def progress(samples: list[tuple[float, dict[str, int]]]) -> dict[str, Any]:
    """Done, rate (tasks finished per second over the samples) and ETA of the latest."""
    at, latest = samples[-1]
    total = sum(latest.values())
    done = sum(latest.get(s, 0) for s in TERMINAL_STATUSES)
    rate = None
    if len(samples) > 1:
        first_at, first = samples[0]
        elapsed = at - first_at
        finished = done - sum(first.get(s, 0) for s in TERMINAL_STATUSES)
        rate = finished / elapsed if elapsed > 0 else None
    left = total - done
    eta = left / rate if rate else (0.0 if left == 0 else None)
    return {"total": total, "done": done, "left": left,
            "percent": round(100 * done / total, 1) if total else 100.0,
            "rate_per_s": round(rate, 2) if rate is not None else None,
            "eta_s": round(eta, 1) if eta is not None else None, "by_status": latest}
