"""Rate limits: how close to a global limit several masters together send, per second.

    python -m bench.limits                      # 2 masters, global=20/1s, 60 s
    python -m bench.limits --limit 50 --masters 3 --duration 30 --json

One fresh `LocalStack` (embedded Redis, SecantusDB and pulsar-lite in a temporary
directory, the simulated farm, the consumer and a master), plus `--masters - 1`
more masters on the same servers, every one with SENDSCRIPT_RATE_LIMITS set to
`global=LIMIT/1s`. Enough raw task specs to keep the limit saturated past the
measured span (`--limit` x (`--duration` + `--slack`)) are LPUSHed at once over
`--devices` devices, so that the limit, not the devices or the workers, is what
holds the sends back. Sends are the farm's accept times (the simulator's `/runs`,
`started`): the measured span is `--duration` whole seconds, starting at the first
whole second after every task was taken from the ready list and the first send.
Every task is then waited for and read back from Mongo by its `script.args.n`
(sendscript/dev/tally.py): terminal by status, lost (never stored), unfinished, duplicates.

Printed: the per-second counts' mean, min and max, the span's total against
LIMIT x duration and its error, the largest count in any one-second bucket, each
master's share (tokens spent) and its reservations (Lua calls) per second, tasks
held by the limit, statuses, attempts above 1, the farm's overlaps and the tally.

`ok` (exit 0) when the span's total is within `--tolerance` (default 5 %) of LIMIT x
duration, no task was sent twice, the tally is clean and every task succeeded, and
the limit stayed saturated over the whole span (the last send came after it).

`run(Options(...))` is the part `bench/protections.py` calls; `render` prints it.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from pymongo import MongoClient
from rich.console import Console
from rich.table import Table

from sendscript import connect
from sendscript.dev import tally
from sendscript.dev.processes import RoleProcess, wait_until
from sendscript.dev.stack import LocalStack
from sendscript.settings import Settings
from sendscript.store import TASKS

SCRIPT = "bench-limits"
console = Console(stderr=True)


@dataclass
class Options:
    limit: int = 20
    masters: int = 2
    duration_s: int = 60
    slack_s: int = 20  # tasks for this many seconds more than measured (start-up, intake)
    devices: int = 400
    workers: int = 2
    run_ms: float = 20.0
    tolerance: float = 0.05
    heartbeat_s: float = 0.5
    timeout_s: float = 300.0
    keep: bool = False
    json: bool = False


@dataclass
class Result:
    limit: int
    masters: int
    duration_s: int
    tasks: int
    devices: int
    per_second: list[int]
    mean: float
    min: int
    max: int
    total: int
    expected: int
    error_pct: float
    busiest_second: int  # over the whole run, any one-second bucket
    saturated: bool  # sends went on after the measured span
    spent_by_master: dict[str, int]
    reservations_per_s: dict[str, float]
    held_by_limit: int
    statuses: dict[str, int]  # every pushed spec read back (sendscript/dev/tally.py)
    tally: dict[str, Any]
    read_back: str  # the tally's line
    attempts_above_1: int
    sent_twice: int
    overlaps: int
    ok: bool
    notes: list[str] = field(default_factory=list)


def master_ids(opts: Options) -> list[str]:
    return [f"bench-limits-{chr(ord('a') + i)}" for i in range(opts.masters)]


def run(opts: Options) -> Result:
    ids = master_ids(opts)
    base = Settings(redis_url=None, mongo_url=None, pulsar_url=None, central_url=None,
                    workers=opts.workers, master_id=ids[0], key_prefix="benchlim",
                    heartbeat_interval_s=opts.heartbeat_s)
    data_dir = Path(tempfile.mkdtemp(prefix="sendscript-bench-limits-"))
    stack = LocalStack(
        base, workers=opts.workers, data_dir=data_dir,
        sim_args=["--run-ms", str(opts.run_ms), "--jitter", "0", "--no-progress"],
        extra_env={"SENDSCRIPT_LOG_LEVEL": "WARNING",
                   "SENDSCRIPT_RATE_LIMITS": f"global={opts.limit}/1s"},
    )
    others: list[RoleProcess] = []
    ok = False
    console.print(f"starting embedded servers and {opts.masters} master(s) under {data_dir} ...")
    try:
        stack.start(log_dir=data_dir / "logs")
        settings = stack.effective
        others = stack.start_masters(ids[1:], data_dir / "logs")
        result = _measure(stack, settings, opts, ids)
        ok = result.ok
        return result
    finally:
        for proc in others:
            proc.stop(timeout_s=60)
        stack.stop()
        if ok and not opts.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            console.print(f"logs and data kept in {data_dir}")


def _measure(stack: LocalStack, settings: Settings, opts: Options, ids: list[str]) -> Result:
    tasks = opts.limit * (opts.duration_s + opts.slack_s)
    client = redis.Redis.from_url(settings.redis_url or "", socket_timeout=10)
    mongo: MongoClient[Any] = MongoClient(settings.mongo_url, tz_aware=True)
    db = mongo.get_default_database(connect.DEFAULT_DB)
    notes: list[str] = []
    try:
        specs = [json.dumps({"device_id": f"lim-{i % opts.devices:05d}",
                             "script": {"id": SCRIPT, "args": {"n": i}}}) for i in range(tasks)]
        for start in range(0, tasks, 500):
            client.lpush(settings.keys.ready, *specs[start:start + 500])
        console.print(f"pushed {tasks} tasks over {opts.devices} devices; waiting for intake")
        wait_until(lambda: client.llen(settings.keys.ready) == 0, 120, 0.2, what="intake")
        taken_at = time.time()
        first = _first_send(stack)
        start = math.floor(max(taken_at, first)) + 1
        end = start + opts.duration_s
        console.print(f"measuring {opts.duration_s} s of sends at {opts.limit}/s ...")
        reports_at_start = _reports(client, settings, ids)
        time.sleep(max(0.0, end - time.time()) + 1.0)
        reports = _reports(client, settings, ids)
        if why := tally.wait_terminal(db, {"script.id": SCRIPT}, tasks, opts.timeout_s,
                                      dead=stack.dead_roles):
            notes.append(f"read-back: {why}")
        counted = tally.by_key(db, range(tasks), {"script.id": SCRIPT}, "script.args.n")
        runs = httpx.get(f"{stack.central_url}/runs", timeout=30).json()
        farm = stack.simulator_stats()
        attempts_above_1 = db[TASKS].count_documents({"script.id": SCRIPT,
                                                      "attempt": {"$gt": 1}})
    finally:
        client.close()
        mongo.close()

    started = [r["started"] for r in runs]
    buckets = Counter(int(t) for t in started)
    per_second = [buckets.get(s, 0) for s in range(start, end)]
    total = sum(per_second)
    expected = opts.limit * opts.duration_s
    error = (total - expected) / expected * 100
    saturated = bool(started) and max(started) >= end
    if not saturated:
        notes.append("the tasks ran out before the measured span ended: not saturated")
    sent_twice = len(started) - len({r["task_id"] for r in runs})
    span_s = max(1e-9, reports[ids[0]]["_at"] - reports_at_start[ids[0]]["_at"])
    success = counted.statuses.get("success", 0)
    ok = (abs(error) <= opts.tolerance * 100 and saturated and sent_twice == 0
          and counted.ok and success == tasks and int(farm.get("overlaps", 0)) == 0)
    return Result(
        limit=opts.limit, masters=opts.masters, duration_s=opts.duration_s, tasks=tasks,
        devices=opts.devices, per_second=per_second,
        mean=total / opts.duration_s, min=min(per_second), max=max(per_second),
        total=total, expected=expected, error_pct=error,
        busiest_second=max(buckets.values()) if buckets else 0, saturated=saturated,
        spent_by_master={m: _limit(r)["spent"] for m, r in reports.items()},
        reservations_per_s={
            m: (r["rate_limits"]["reservations"]
                - reports_at_start[m]["rate_limits"]["reservations"]) / span_s
            for m, r in reports.items()},
        held_by_limit=sum(r["rate_limits"]["held"] for r in reports.values()),
        statuses=counted.statuses, tally=counted.as_dict(), read_back=counted.line(),
        attempts_above_1=attempts_above_1, sent_twice=sent_twice,
        overlaps=int(farm.get("overlaps", 0)), ok=ok, notes=notes,
    )


def _first_send(stack: LocalStack) -> float:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        runs = httpx.get(f"{stack.central_url}/runs", timeout=30).json()
        if runs:
            return min(r["started"] for r in runs)
        time.sleep(0.2)
    raise TimeoutError("no send within 60 s")


def _reports(client: redis.Redis, settings: Settings, ids: list[str]) -> dict[str, Any]:
    out = {}
    for master_id in ids:
        raw = client.hget(settings.keys.masters, master_id)
        out[master_id] = {**json.loads(raw), "_at": time.time()} if raw else {}
    return out


def _limit(report: dict[str, Any]) -> dict[str, Any]:
    return report["rate_limits"]["limits"]["global"]


def render(r: Result, out: Console | None = None) -> None:
    out = out or Console()
    t = Table(title=f"rate limit global={r.limit}/1s, {r.masters} masters", show_header=False)
    t.add_row("tasks / devices", f"{r.tasks} / {r.devices}")
    t.add_row(f"sends per second over {r.duration_s} s",
              f"mean {r.mean:.2f}  min {r.min}  max {r.max}")
    t.add_row(f"total over {r.duration_s} s", f"{r.total} vs {r.expected} "
              f"({r.error_pct:+.2f} %)")
    t.add_row("busiest second of the run", str(r.busiest_second))
    t.add_row("limit saturated throughout", "yes" if r.saturated else "[red]no[/red]")
    t.add_row("tokens spent by master", ", ".join(f"{m} {n}"
                                                  for m, n in r.spent_by_master.items()))
    t.add_row("reservations (Lua calls) per s", ", ".join(
        f"{m} {x:.2f}" for m, x in r.reservations_per_s.items()))
    t.add_row("held by the limit (verdicts)", str(r.held_by_limit))
    t.add_row("statuses", " ".join(f"{k}={v}" for k, v in sorted(r.statuses.items())))
    t.add_row("attempts above 1 / sent twice / overlaps",
              f"{r.attempts_above_1} / {r.sent_twice} / {r.overlaps}")
    t.add_row("per-second counts", " ".join(map(str, r.per_second)))
    for note in r.notes:
        t.add_row("note", note)
    t.add_row("ok", "yes" if r.ok else "[red]no[/red]")
    out.print(t)
    out.print(r.read_back, markup=False, highlight=False, soft_wrap=True)


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench.limits", description=__doc__.split("\n")[0])
    d = Options()
    p.add_argument("--limit", type=int, default=d.limit, help="global tokens per second")
    p.add_argument("--masters", type=int, default=d.masters)
    p.add_argument("--duration", dest="duration_s", type=int, default=d.duration_s)
    p.add_argument("--slack", dest="slack_s", type=int, default=d.slack_s)
    p.add_argument("--devices", type=int, default=d.devices)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--run-ms", dest="run_ms", type=float, default=d.run_ms)
    p.add_argument("--tolerance", type=float, default=d.tolerance)
    p.add_argument("--timeout", dest="timeout_s", type=float, default=d.timeout_s)
    p.add_argument("--keep", action="store_true", help="keep data and logs")
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
    return Options(**vars(p.parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.masters < 1 or opts.limit < 1 or opts.duration_s < 1:
        raise SystemExit("--masters, --limit and --duration must be at least 1")
    result = run(opts)
    render(result)
    if opts.json:
        print(json.dumps(asdict(result)))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
