"""The fleet view at farm scale: what a Devices page and its searches cost with `--fleet`
devices (20,000), and what the consumer's upkeep of the `devices` documents costs per
result. Run by `python -m bench.console` (its `fleet` part).

Seeded the way the service writes them: `devices` documents through the consumer's
own updates (sendscript/fleet.py), the Redis index of ids rebuilt from them as the
console does when Redis lost it, a group of every device and one of 50, a tenth of
the devices locked (the owner, the task and the open exec record that hold each
lock, as a worker leaves them), some benched, one
group paused. Each page timed is checked: its ids are exactly the next ids of the
seeded set in order, and every locked device on it says which task runs.
"""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime
from typing import Any

from bench.cpu import tree_cpu_s
from bench.timing import median_ms
from console.data import Stores
from console.fleet import FleetQuery, ensure_index, fleet_page
from console.search import BUDGET_MS
from sendscript import pauses
from sendscript.fleet import DeviceResult, device_updates
from sendscript.settings import Settings
from sendscript.store import DEVICES, GROUPS, RECORDS, TASKS


def device_name(i: int) -> str:
    return f"phone-{i:05d}"


def seed(stores: Stores, n: int, batch: int) -> dict[str, Any]:
    db, r, keys = stores.db, stores.redis, stores.keys
    for name in (DEVICES, RECORDS):
        db[name].delete_many({})
    # The view lists every group's members: a group of another part of the bench (the
    # task search's) would put its devices on the pages checked against ours.
    db[GROUPS].delete_many({"_id": {"$nin": ["fleet", "rack-7"]}})
    r.delete(keys.devices_known, keys.devices_known_built, keys.devices_benched)
    started = time.perf_counter()
    now = datetime.now(UTC)
    for start in range(0, n, batch):
        results = [DeviceResult(device_name(i), f"t-{i}", f"r-{i}",
                                "SUCCESS" if i % 7 else "ERROR", "" if i % 7 else "no app")
                   for i in range(start, min(n, start + batch))]
        # new documents: nothing to reset
        db[DEVICES].bulk_write(device_updates(results, now, {r.device_id for r in results}),
                               ordered=True)
    fill_s = time.perf_counter() - started
    everyone = [device_name(i) for i in range(n)]
    db[GROUPS].replace_one({"_id": "fleet"}, {"_id": "fleet", "devices": everyone}, upsert=True)
    db[GROUPS].replace_one({"_id": "rack-7"}, {"_id": "rack-7", "devices": everyone[700:750]},
                           upsert=True)
    locked = everyone[::10]
    pipe = r.pipeline(transaction=False)
    for i, device in enumerate(locked):  # as a worker locks: the owner names the task
        pipe.set(keys.device_lock(device), 1_000_000 + i, px=600_000)
        pipe.hset(keys.lock_owners, device, f"{1_000_000 + i} run-{device} bench/w-0")
    pipe.zadd(keys.devices_benched, {d: int(time.time() * 1000) + 600_000
                                     for d in everyone[5::97]})
    pipe.execute()
    db[TASKS].delete_many({"_id": {"$in": [f"run-{d}" for d in locked]}})
    db[TASKS].insert_many([{"_id": f"run-{device}", "device_id": device, "status": "sent",
                            "attempt": 1, "record_id": f"run-{i}"}
                           for i, device in enumerate(locked)])
    db[RECORDS].insert_many([{"_id": f"run-{i}", "task_id": f"run-{device}", "attempt": 1,
                              "device_id": device, "lock_value": 1_000_000 + i,
                              "status": "sent"}
                             for i, device in enumerate(locked)])
    pauses.pause_sync(r, keys, "group:rack-7", "bench")
    started = time.perf_counter()
    ensure_index(stores)
    return {"devices": n, "fill_s": round(fill_s, 1), "index_build_s":
            round(time.perf_counter() - started, 2), "locked": len(locked),
            "stored": db[DEVICES].estimated_document_count()}


def expected_ids(n: int, q: FleetQuery, after: str | None) -> list[str]:
    everyone = [device_name(i) for i in range(n)]
    if q.group == "rack-7":
        everyone = everyone[700:750]
    return [d for d in everyone if d.startswith(q.prefix) and (after is None or d > after)
            ][:q.limit]


def page_right(stores: Stores, n: int, q: FleetQuery, after_id: str | None) -> bool:
    page = fleet_page(stores, q)
    got = [d["device_id"] for d in page["devices"]]
    runs = all(d["running"] == {"task_id": f"run-{d['device_id']}", "attempt": 1}
               for d in page["devices"] if d["state"] == "running")
    locked = [d for d in page["devices"] if int(d["device_id"][-5:]) % 10 == 0]
    return (got == expected_ids(n, q, after_id) and runs
            and all(d["state"] == "running" for d in locked))


def cases(n: int) -> dict[str, FleetQuery]:
    return {
        "all, first page (50)": FleetQuery(),
        "all, a page of 200": FleetQuery(limit=200),
        "id prefix phone-123 (10)": FleetQuery(prefix="phone-123"),
        f"id prefix phone-1 ({min(n, 20000) // 2:,}+)": FleetQuery(prefix="phone-1"),
        f"group fleet ({n:,})": FleetQuery(group="fleet"),
        "group rack-7 (50, paused)": FleetQuery(group="rack-7"),
    }


def bench_pages(stores: Stores, n: int, repeat: int, deep: int) -> list[dict[str, Any]]:
    rows = []
    for name, q in cases(n).items():
        first_ms = median_ms(lambda q=q: fleet_page(stores, q), repeat)
        right = page_right(stores, n, q, None)
        page, pages, after_id = fleet_page(stores, q), 1, None
        while page["next"] and pages < deep:
            after_id = page["devices"][-1]["device_id"]
            q_next = q.model_copy(update={"after": page["next"]})
            page = fleet_page(stores, q_next)
            pages += 1
        deep_ms = None
        if pages > 1:
            q_deep = q.model_copy(update={"after": q_next.after})
            deep_ms = median_ms(lambda q=q_deep: fleet_page(stores, q), repeat)
            right = right and page_right(stores, n, q_deep, after_id)
        rows.append({"page": name, "first_ms": first_ms, "deep_page": pages if deep_ms else None,
                     "deep_ms": deep_ms, "right": right,
                     "within_budget": max(first_ms, deep_ms or 0) <= BUDGET_MS})
    return rows


def bench_upkeep(stores: Stores, batch: int, repeat: int, mongo_pid: int | None
                 ) -> dict[str, Any]:
    """The consumer's write for a batch of `batch` results on as many devices (the
    worst case: no two on one device), on the seeded collection: a batch's first write
    of the hour (a reset and a count per device) and the steady state (a count per
    device). Wall time, and the Mongo server's CPU per result when its pid is known
    (wall time on a shared machine is mostly waiting)."""
    out: dict[str, Any] = {"batch": batch}
    now = datetime.now(UTC)
    everyone = {device_name(i) for i in range(batch)}
    for name, current in (("first_of_hour", frozenset()), ("steady", everyone)):
        walls, cpus = [], []
        for k in range(repeat):
            results = [DeviceResult(device_name(i), f"u{k}-{i}", f"ur{k}-{i}", "SUCCESS", "")
                       for i in range(batch)]
            updates = device_updates(results, now, current)
            cpu_before = tree_cpu_s(mongo_pid) if mongo_pid else 0.0
            started = time.perf_counter()
            stores.db[DEVICES].bulk_write(updates, ordered=True)
            walls.append((time.perf_counter() - started) * 1000)
            cpus.append(((tree_cpu_s(mongo_pid) - cpu_before) * 1000) if mongo_pid else 0.0)
        out[name] = {"ops": len(updates), "wall_ms": round(statistics.median(walls), 1),
                     "wall_ms_per_result": round(statistics.median(walls) / batch, 3),
                     "server_cpu_ms_per_result": round(statistics.median(cpus) / batch, 3)
                     if mongo_pid else None}
    return out


def run(settings: Settings, n: int, repeat: int, deep: int, batch: int,
        mongo_pid: int | None = None) -> dict[str, Any]:
    stores = Stores.open(settings)
    try:
        out = {"seed": seed(stores, n, 200)}
        out["pages"] = bench_pages(stores, n, repeat, deep)
        out["upkeep"] = bench_upkeep(stores, batch, repeat, mongo_pid)
        out["budget_ms"] = BUDGET_MS
        return out
    finally:  # the tasks holding the locks are the view's, not the task search's
        stores.db[TASKS].delete_many(
            {"_id": {"$in": [f"run-{device_name(i)}" for i in range(0, n, 10)]}})
        stores.close()
