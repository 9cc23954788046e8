"""Pull-mode agents: leases per second with many agents, and due-to-lease latency.

    python -m bench.agents                      # 50 agents, 2,000 tasks
    python -m bench.agents --agents 50 --tasks 2000 --trickle 200 --json

Fresh embedded Redis and SecantusDB in a temporary directory and the agents role as
its own process (as `sendscript agents` runs it). The agents are `--agents`
coroutines of this process, each its own HTTP client speaking the API the SDKs
speak: register, heartbeat, long-poll lease (limit 1), complete.

1. Throughput: `--tasks` pull tasks stored at once; the agents lease and complete
   them as fast as the API lets them. Leases per second = tasks / (last lease - first
   lease), from the leases' own times in Mongo.
2. Latency: the agents wait on long polls while `--trickle` tasks are submitted at
   `--rate` a second, each due when stored; per task, its lease time minus the
   time it became due (`run_at`), p50 and p99. Then `--delayed` tasks due 2 s after
   they are stored (the sweep makes them pending, `SENDSCRIPT_AGENT_SWEEP_INTERVAL_S`).

Printed: both figures and, at the end, every submitted task read back from Mongo by
its id (sendscript/dev/tally.py): terminal by status, lost (never stored), unfinished,
duplicates. `ok` (exit 0) when that tally is clean and every task succeeded exactly
once (status success, one success record each).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pymongo import MongoClient

from sendscript import connect
from sendscript.agent_store import add_token_sync
from sendscript.client import SendScriptClient
from sendscript.dev import tally
from sendscript.dev.embedded import EmbeddedServers, free_port
from sendscript.dev.processes import RoleProcess, wait_until
from sendscript.settings import Settings
from sendscript.store import RECORDS, TASKS


@dataclass
class Options:
    agents: int = 50
    tasks: int = 2000
    trickle: int = 200
    rate: float = 20.0
    delayed: int = 50
    sweep_s: float = 0.5


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def agent_loop(url: str, token: str, agent_id: str, stop: asyncio.Event,
                     counts: dict[str, int], ready: asyncio.Event, n: int) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as http:
        r = await http.post("/api/agents/register", json={"agent_id": agent_id})
        r.raise_for_status()
        counts["registered"] += 1
        if counts["registered"] == n:
            ready.set()
        last_beat = time.monotonic()
        while not stop.is_set():
            if time.monotonic() - last_beat > 2:
                await http.post("/api/agents/heartbeat", json={"agent_id": agent_id})
                last_beat = time.monotonic()
            r = await http.post("/api/agents/lease",
                                json={"agent_id": agent_id, "limit": 1, "wait_s": 1})
            if r.status_code == 429:
                counts["throttled"] += 1
                await asyncio.sleep(0.2)
                continue
            r.raise_for_status()
            for task in r.json()["tasks"]:
                done = await http.post("/api/agents/complete", json={
                    "agent_id": agent_id, "task_id": task["task_id"],
                    "lease_token": task["lease_token"], "result": {"by": agent_id}})
                done.raise_for_status()
                counts["completed"] += 1


async def fleet(url: str, token: str, n: int, until: Any) -> dict[str, int]:
    stop = asyncio.Event()
    counts = {"completed": 0, "throttled": 0, "registered": 0}
    ready = asyncio.Event()
    loops = [asyncio.create_task(agent_loop(url, token, f"bench-{i:03d}", stop, counts, ready,
                                            n)) for i in range(n)]
    await ready.wait()  # every agent in place before the clock starts
    await asyncio.get_running_loop().run_in_executor(None, until)
    stop.set()
    await asyncio.gather(*loops)
    return counts


def submit(settings: Settings, n: int, phase: str, **extra: Any) -> list[str]:
    with SendScriptClient(settings) as client:
        specs = [{"mode": "pull", "script": {"id": phase, "args": {"i": i}}, **extra}
                 for i in range(n)]
        return [s.task_id for s in client.submit_many(specs)]


# Phases are told apart by script id, not by long `$in` lists (slow on SecantusDB).
def count(db: Any, phase: str) -> int:
    return int(db[TASKS].count_documents({"script.id": phase, "status": "success"}))


def lease_times(db: Any, phase: str) -> list[tuple[float, float]]:
    """(due, leased) in epoch seconds per task of a phase, for its successful attempt."""
    due = {d["_id"]: d["run_at"].timestamp() for d in db[TASKS].find(
        {"script.id": phase}, {"run_at": 1})}
    return [(due[r["task_id"]], r["started_at"].timestamp())
            for r in db[RECORDS].find({"status": "success"}, {"task_id": 1, "started_at": 1})
            if r["task_id"] in due]


def run(opts: Options) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-agents-"))
    servers = EmbeddedServers(tmp, ["redis", "mongo"])
    servers.start()
    port = free_port()
    settings = Settings(_env_file=None, **servers.urls(), key_prefix="bagents",
                        agents_port=port, agent_sweep_interval_s=opts.sweep_s,
                        agent_poll_interval_s=0.05, agent_lease_rate=1000,
                        agent_lease_burst=1000, log_level="WARNING")
    env = {**os.environ, **settings.to_env()}
    role = RoleProcess("agents", ["agents"], env, tmp / "logs").start()
    url = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {"agents": opts.agents, "tasks": opts.tasks}
    try:
        wait_until(lambda: _up(url), 60, what="the agents API")
        mongo: MongoClient = connect.mongo_sync(settings)
        db = connect.database(mongo)
        token = add_token_sync(db, "bench")

        # 1. throughput
        ids = submit(settings, opts.tasks, "throughput")
        counts = asyncio.run(fleet(url, token, opts.agents, lambda: wait_until(
            lambda: count(db, "throughput") == len(ids), 900, 0.5)))
        times = sorted(leased for _, leased in lease_times(db, "throughput"))
        span = times[-1] - times[0] if len(times) > 1 else float("nan")
        out["throughput"] = {"leases": len(times), "span_s": round(span, 2),
                             "leases_per_s": round((len(times) - 1) / span, 1),
                             "throttled": counts["throttled"]}

        # 2. latency: tasks due as they are stored, then tasks due later
        trickled: list[str] = []
        delayed: list[str] = []

        def feed() -> None:
            gap = 1.0 / opts.rate
            for _ in range(opts.trickle):
                trickled.extend(submit(settings, 1, "due_now"))
                time.sleep(gap)
            delayed.extend(submit(settings, opts.delayed, "delayed", run_at=time.time() + 2))
            wait_until(lambda: count(db, "due_now") + count(db, "delayed")
                       == len(trickled) + len(delayed), 300, 0.5)

        asyncio.run(fleet(url, token, opts.agents, feed))
        for name in ("due_now", "delayed"):
            waits = [leased - due for due, leased in lease_times(db, name)]
            out[name] = {"tasks": len(waits), "p50_ms": round(percentile(waits, 0.5) * 1000, 1),
                         "p99_ms": round(percentile(waits, 0.99) * 1000, 1),
                         "max_ms": round(max(waits) * 1000, 1)}
        every = ids + trickled + delayed
        counted = tally.by_ids(db, every)
        successes: dict[str, int] = {}
        for r in db[RECORDS].find({"status": "success"}, {"task_id": 1}):
            successes[r["task_id"]] = successes.get(r["task_id"], 0) + 1
        out["tally"] = counted.as_dict()
        out["read_back"] = counted.line()
        out["ok"] = (counted.ok and counted.statuses == {"success": len(every)}
                     and all(successes.get(t) == 1 for t in every))
        mongo.close()
    finally:
        role.stop(30)
        servers.stop()
    return out


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def render(out: dict[str, Any]) -> str:
    t, now, later = out["throughput"], out["due_now"], out["delayed"]
    return "\n".join([
        f"agents: {out['agents']} agents, {out['tasks']} tasks",
        f"  leases per second: {t['leases_per_s']} ({t['leases']} leases in {t['span_s']} s; "
        f"{t['throttled']} lease calls throttled)",
        f"  due -> lease, tasks due when stored ({now['tasks']}): p50 {now['p50_ms']} ms, "
        f"p99 {now['p99_ms']} ms, max {now['max_ms']} ms",
        f"  due -> lease, delayed tasks ({later['tasks']}, made pending by the sweep): "
        f"p50 {later['p50_ms']} ms, p99 {later['p99_ms']} ms",
        f"  {out['read_back']}",
        f"  {'ok' if out['ok'] else 'NOT OK'}: every task succeeded exactly once",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=50)
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--trickle", type=int, default=200)
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--delayed", type=int, default=50)
    ap.add_argument("--sweep-s", type=float, default=0.5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    out = run(Options(a.agents, a.tasks, a.trickle, a.rate, a.delayed, a.sweep_s))
    print(json.dumps(out, indent=2) if a.json else render(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
