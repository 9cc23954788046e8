"""End-to-end throughput, latency and round trips per task of the whole service.

    python -m bench.throughput --tasks 500 --devices 100

Starts fresh embedded Redis, MongoDB (SecantusDB) and Pulsar (pulsar-lite) in a
temporary directory, the simulated farm, the consumer and the master with its
workers (`LocalStack`), submits every task as fast as it can and waits until
each one is terminal. Half the tasks go in as raw JSON specs LPUSHed with
redis-py (as a producer in any language would), half through the Python SDK
(`SendScriptClient.submit_many`), unless `--producer` picks one. One warm-up
task (`--warmup`) goes through the whole service first and is not measured.

Reported: throughput from the first submit to the last `finished_at`,
submit -> finished latency, the farm's overlap count (must be 0), and the round
trips to Redis and Mongo per task, for the service (master + workers + consumer)
and for the producer, against the budget (4 Redis, 3 Mongo; README, "Performance").

Progress is read from Redis (the consumers' and masters' heartbeats: results
applied, tasks failed or expired by a master), not by counting tasks in Mongo: a
count over script_tasks costs the embedded server ~80 ms of CPU, about 1 ms a task
when polled every 0.5 s. Mongo is read once at the end (statuses, latencies).
CPU time per task is read from /proc for each process tree (bench/cpu.py):
sendscript's own processes (master with its workers, consumer), the Mongo,
Redis and Pulsar servers and the simulated farm, over the measured window.

Round trips are counted by every process into the Redis hash `keys.roundtrips`.
Roles flush that hash every heartbeat interval and when they exit, so the
benchmark stops master and consumer gracefully *before* the servers and then
reads it. It also reads it once before the stop, after two heartbeat intervals,
and reports what the stop added (shutdown traffic, or counts only flushed at
exit). Producer figures include setting up its clients (connection handshakes,
the SDK's index creation), so they shrink as --tasks grows.

With `--backlog`, the first `--tasks` done are timed while the rest wait; then the
whole backlog is let finish. Either way every submitted spec is read back from
Mongo at the end (sendscript/dev/tally.py, by its `script.args.n`) and the tally printed:
terminal by status, lost (never stored), unfinished, duplicates. Exits 1 when a
task is lost, unfinished or stored twice, or the farm saw an overlap.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
from pymongo import MongoClient
from rich.console import Console
from rich.table import Table

from bench.cpu import CpuMeter
from sendscript import connect, roundtrips
from sendscript.client import SendScriptClient
from sendscript.dev import tally
from sendscript.dev.stack import LocalStack
from sendscript.settings import Settings
from sendscript.status import TERMINAL, TaskStatus
from sendscript.store import TASKS

SERVICE_ROLES = ("master", "worker", "consumer")
BUDGET = {"redis": 4.0, "mongo": 3.0}  # per task, the hot path's budget (README)
TERMINAL_NAMES = sorted(str(s) for s in TERMINAL)
BENCH_SCRIPT = "bench"  # script id of measured tasks; warm-up tasks use another
WARMUP_SCRIPT = "bench-warmup"
STALL_CHECK_S = 30.0  # counters still this long: ask Mongo whether all are terminal

console = Console(stderr=True)


@dataclass
class Options:
    tasks: int
    devices: int
    workers: int
    run_ms: float
    producer: str
    batch: int
    timeout_s: float
    heartbeat_s: float
    warmup: int
    keep: bool
    json: bool
    backlog: int = 0  # tasks pushed before measuring; then the first `tasks` done are timed
    min_replicas: int = 0  # >0: a Redis with this many replicas, every role WAITing for them


@dataclass
class ProducerStats:
    """What the benchmark's own producers did, counted in this process."""

    raw_tasks: int = 0
    sdk_tasks: int = 0
    raw: dict[str, int] = field(default_factory=dict)  # round trips by server
    sdk: dict[str, int] = field(default_factory=dict)
    first_submit: float = 0.0
    last_submit: float = 0.0


@dataclass
class Result:
    tasks: int
    devices: int
    workers: int
    run_ms: float
    producer: str
    elapsed_s: float
    submit_s: float
    tasks_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    statuses: dict[str, int]
    not_terminal: int
    not_successful: int
    overlaps: int
    farm: dict[str, Any]
    service_rt_per_task: dict[str, float]
    producer_rt_per_task: dict[str, float]
    roundtrips: dict[str, int]  # the hash, "{role}:{server}" -> count, after the stop
    roundtrips_added_by_stop: dict[str, int]
    producer_split: dict[str, dict[str, Any]]
    role_exit_codes: dict[str, int | None]
    cpu_ms_per_task: dict[str, float]  # process group -> CPU ms per task
    tally: dict[str, Any]  # every submitted spec read back (sendscript/dev/tally.py)
    ok: bool


# -- helpers -----------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def chunks(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def counted(before: dict[str, int]) -> dict[str, int]:
    """Round trips this process counted since `before` (a `roundtrips.snapshot()`)."""
    now = roundtrips.snapshot()
    return {k: v - before.get(k, 0) for k, v in now.items() if v - before.get(k, 0)}


def add_into(total: dict[str, int], delta: dict[str, int]) -> None:
    for k, v in delta.items():
        total[k] = total.get(k, 0) + v


def read_roundtrips(client: redis.Redis, key: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.hgetall(key).items()}


def per_task(counts: dict[str, int], roles: Sequence[str], tasks: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for server in ("redis", "mongo"):
        n = sum(counts.get(f"{role}:{server}", 0) for role in roles)
        out[server] = n / tasks if tasks else math.nan
    return out


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str,
             interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


# -- the run -----------------------------------------------------------------------------

def submit_all(settings: Settings, opts: Options) -> ProducerStats:
    """Push every task as fast as possible: raw LPUSH and/or SDK, batch by batch."""
    stats = ProducerStats()
    keys = settings.keys
    raw_client = connect.redis_sync(settings)  # counts its round trips like the SDK's
    sdk = SendScriptClient(settings)
    try:
        stats.first_submit = time.time()
        for batch in chunks(opts.tasks, opts.batch):
            now = time.time()
            specs = [{
                "device_id": f"phone-{i % opts.devices:05d}",
                "script": {"id": BENCH_SCRIPT, "args": {"n": i, "submitted": now}},
            } for i in batch]
            # "both": each batch half raw, half SDK, so the two kinds run side by side.
            cut = {"raw": len(specs), "sdk": 0}.get(opts.producer, len(specs) // 2)
            raw, via_sdk = specs[:cut], specs[cut:]
            if raw:
                before = roundtrips.snapshot()
                raw_client.lpush(keys.ready, *[json.dumps(s) for s in raw])
                stats.raw_tasks += len(raw)
                add_into(stats.raw, counted(before))
            if via_sdk:
                before = roundtrips.snapshot()
                sdk.submit_many(via_sdk)
                stats.sdk_tasks += len(via_sdk)
                add_into(stats.sdk, counted(before))
        stats.last_submit = time.time()
        sdk.flush_counters("producer")  # everything this process counted, raw and SDK
    finally:
        sdk.close()
        raw_client.close()
    return stats


def status_counts(db: Any, script_id: str = BENCH_SCRIPT) -> dict[str, int]:
    return {d["_id"]: d["n"] for d in db[TASKS].aggregate([
        {"$match": {"script.id": script_id}},
        {"$group": {"_id": "$status", "n": {"$sum": 1}}},
    ])}


def finished_so_far(client: redis.Redis, keys: Any) -> int:
    """Tasks finished, from Redis: results the consumers applied (their heartbeats)
    plus tasks masters ended themselves (failed, expired). Lags by a heartbeat."""
    done = 0
    for raw in client.hvals(keys.consumers):
        done += int(json.loads(raw).get("applied", 0))
    for raw in client.hvals(keys.masters):
        outcomes = json.loads(raw).get("outcomes", {})
        done += int(outcomes.get("failed", 0)) + int(outcomes.get("expired", 0))
    return done


def push_backlog(settings: Settings, opts: Options) -> ProducerStats:
    """Raw LPUSH of `opts.backlog` specs, as fast as Redis takes them: the master takes
    what its backpressure allows (SENDSCRIPT_HIGH_WATER) and the rest waits listed."""
    stats = ProducerStats(first_submit=time.time())
    client = redis.Redis.from_url(settings.redis_url or "")
    try:
        for batch in chunks(opts.backlog, 5000):
            client.lpush(settings.keys.ready, *[json.dumps({
                "device_id": f"phone-{i % opts.devices:05d}",
                "script": {"id": BENCH_SCRIPT, "args": {"n": i}}}) for i in batch])
    finally:
        client.close()
    stats.raw_tasks = opts.backlog
    stats.last_submit = time.time()
    console.print(f"pushed {opts.backlog} tasks in {stats.last_submit - stats.first_submit:.1f}s")
    return stats


def warm_up(settings: Settings, client: redis.Redis, n: int, timeout_s: float) -> None:
    """A few tasks through the whole service before measuring (connections, topics)."""
    start = finished_so_far(client, settings.keys)
    with SendScriptClient(settings) as sdk:
        sdk.submit_many([{"device_id": f"warmup-{i:03d}",
                          "script": {"id": WARMUP_SCRIPT, "args": {"n": i}}}
                         for i in range(n)])
        # This process's counts so far go to the hash now, so the reset drops them.
        sdk.flush_counters("producer")
    wait_for(lambda: finished_so_far(client, settings.keys) - start >= n, timeout_s,
             f"{n} warm-up task(s)", interval_s=0.2)


def wait_settled(stack: LocalStack, client: redis.Redis, db: Any, n: int, start: int,
                 timeout_s: float, script_id: str = BENCH_SCRIPT) -> None:
    """Wait until `n` more tasks are finished by the Redis counters (from `start`) and
    Mongo holds `n` terminal ones of `script_id`, the counters stall (they undercount
    a result applied by a call that timed out) with Mongo saying so, the timeout
    passes or a role dies. What became of each task is the read-back's to say."""
    keys = stack.effective.keys
    deadline = time.monotonic() + timeout_s
    last_report = 0.0
    seen, moved_at = -1, time.monotonic()
    while True:
        done = finished_so_far(client, keys) - start
        now = time.monotonic()
        if done != seen:
            seen, moved_at = done, now
        if done >= n or now - moved_at > STALL_CHECK_S:
            moved_at = now
            counts = status_counts(db, script_id)
            if sum(v for k, v in counts.items() if k in TERMINAL_NAMES) >= n:
                return
        if dead := stack.dead_roles():
            console.print(f"[red]role(s) exited during the run: {', '.join(dead)}[/red]")
            return
        if now > deadline:
            console.print(f"[red]timed out after {timeout_s:.0f}s[/red]")
            return
        if now - last_report > 5:
            last_report = now
            console.print(f"  {done}/{n} finished")
        time.sleep(0.25)


def read_back(db: Any, submitted: int) -> tally.Tally:
    """Every spec this run submitted (`script.args.n` 0 .. submitted-1), from Mongo."""
    return tally.by_key(db, range(submitted), {"script.id": BENCH_SCRIPT}, "script.args.n")


def process_groups(stack: LocalStack) -> dict[str, list[int]]:
    """Process trees by what they are, for the CPU split."""
    groups: dict[str, list[int]] = {
        "sendscript": [stack.roles[r].pid for r in ("master", "consumer") if r in stack.roles],
    }
    if stack.servers is not None:
        for name in ("mongo", "redis", "pulsar"):
            server = stack.servers.servers.get(name)
            if server is not None and server.proc is not None:
                groups[name] = [server.proc.pid]
    if "simulator" in stack.roles:
        groups["simulator"] = [stack.roles["simulator"].pid]
    return groups


def latencies_and_end(db: Any) -> tuple[list[float], float | None]:
    """Submit -> finished_at of each finished task, and the last finished_at."""
    lat: list[float] = []
    last: float | None = None
    cursor = db[TASKS].find({"script.id": BENCH_SCRIPT, "finished_at": {"$ne": None}},
                            {"finished_at": 1, "script.args.submitted": 1})
    for doc in cursor:
        finished: datetime = doc["finished_at"]
        end = finished.timestamp()
        last = end if last is None else max(last, end)
        submitted = doc.get("script", {}).get("args", {}).get("submitted")
        if isinstance(submitted, int | float):
            lat.append(end - submitted)
    return lat, last


def stop_roles(stack: LocalStack, grace_s: float) -> dict[str, int | None]:
    """Stop master and consumer gracefully (they flush their counters as they exit)."""
    codes: dict[str, int | None] = {}
    for name in ("master", "consumer"):
        role = stack.roles.get(name)
        if role is not None:
            codes[name] = role.stop(timeout_s=grace_s)
    return codes


def start_replicated_redis(data_dir: Path, replicas: int) -> list[Any]:
    """A Redis primary and `replicas` replicas in sync with it (primary first)."""
    from sendscript.dev.topologies import RedisNode

    primary = RedisNode(data_dir, "primary", [])
    primary.start()
    nodes = [primary]
    for n in range(replicas):
        node = RedisNode(data_dir, f"replica{n}", ["--replicaof", "127.0.0.1",
                                                   str(primary.port)])
        node.start()
        nodes.append(node)
    deadline = time.monotonic() + 30
    with primary.client() as client:
        while int(client.info("replication").get("connected_slaves", 0)) < replicas:
            if time.monotonic() > deadline:
                raise RuntimeError("replicas did not connect in 30 s")
            time.sleep(0.1)
    return nodes


def run(opts: Options) -> Result:
    data_dir = Path(tempfile.mkdtemp(prefix="sendscript-bench-"))
    extra_env = {"SENDSCRIPT_LOG_LEVEL": "WARNING",
                 "SENDSCRIPT_HEARTBEAT_INTERVAL_S": str(opts.heartbeat_s)}
    redis_nodes = start_replicated_redis(data_dir / "redis", opts.min_replicas) \
        if opts.min_replicas else []
    if opts.min_replicas:
        extra_env["SENDSCRIPT_REDIS_MIN_REPLICAS"] = str(opts.min_replicas)
    base = Settings(
        redis_url=redis_nodes[0].url if redis_nodes else None, mongo_url=None,
        pulsar_url=None, central_url=None, workers=opts.workers,
        heartbeat_interval_s=opts.heartbeat_s, redis_min_replicas=opts.min_replicas,
    )
    stack = LocalStack(
        base, workers=opts.workers, data_dir=data_dir,
        sim_args=["--run-ms", str(opts.run_ms)], extra_env=extra_env,
    )
    ok = False
    console.print(f"starting embedded servers and roles under {data_dir} ...")
    try:
        t0 = time.monotonic()
        stack.start(log_dir=data_dir / "logs")
        console.print(f"up in {time.monotonic() - t0:.1f}s: {stack.describe()}")
        result = _measure(stack, opts)
        ok = result.ok
        return result
    finally:
        stack.stop()  # what is left: the simulator, then the servers
        for node in redis_nodes:
            node.kill()
        if ok and not opts.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            for name, role in stack.roles.items():
                if tail := role.log_tail(15).strip():
                    console.print(f"--- last lines of {name}.log\n{tail}", markup=False)
            console.print(f"logs and data kept in {data_dir}")


def _measure(stack: LocalStack, opts: Options,
             extra_groups: dict[str, list[int]] | None = None) -> Result:
    """Measure a started stack; `extra_groups` names processes outside it (servers
    and farm started by the caller) for the CPU split."""
    settings = stack.effective
    key = settings.keys.roundtrips
    inspect_redis = redis.Redis.from_url(settings.redis_url or "")  # not counted
    mongo: MongoClient[Any] = MongoClient(settings.mongo_url, tz_aware=True)
    db = mongo.get_default_database(connect.DEFAULT_DB)
    heartbeat = opts.heartbeat_s
    try:
        # Start-up traffic: let every role flush it, then start counting from zero.
        wait_for(lambda: inspect_redis.hlen(settings.keys.consumers) > 0, 30, "the consumer")
        if opts.warmup:
            console.print(f"warming up with {opts.warmup} task(s) ...")
            warm_up(settings, inspect_redis, opts.warmup, timeout_s=120)
        time.sleep(2 * heartbeat + 0.2)
        inspect_redis.delete(key)
        start = finished_so_far(inspect_redis, settings.keys)
        meter = CpuMeter({**process_groups(stack), **(extra_groups or {})})
        meter.start()

        if opts.backlog:
            prod = push_backlog(settings, opts)
            start = finished_so_far(inspect_redis, settings.keys)
            meter.start()
            prod.first_submit = time.time()
            console.print(f"{opts.backlog} tasks waiting; timing the next {opts.tasks} done")
            wait_for(lambda: finished_so_far(inspect_redis, settings.keys) - start >= opts.tasks,
                     opts.timeout_s, f"{opts.tasks} tasks of the backlog", interval_s=0.25)
            cpu = meter.stop()
            lat, last_finished = [], time.time()
            console.print(f"timed; letting the rest of the {opts.backlog} finish")
            wait_settled(stack, inspect_redis, db, opts.backlog, start, opts.timeout_s)
        else:
            console.print(f"submitting {opts.tasks} tasks over {opts.devices} devices "
                          f"({opts.producer}) ...")
            prod = submit_all(settings, opts)
            console.print(f"submitted in {prod.last_submit - prod.first_submit:.2f}s; waiting")
            wait_settled(stack, inspect_redis, db, opts.tasks, start, opts.timeout_s)
            cpu = meter.stop()
            lat, last_finished = latencies_and_end(db)
        farm = stack.simulator_stats()

        # Counters: once live (after every role's periodic flush), once after the stop.
        time.sleep(2 * heartbeat + 0.2)
        live = read_roundtrips(inspect_redis, key)
        codes = stop_roles(stack, grace_s=max(30.0, settings.shutdown_grace_s + 10))
        final = read_roundtrips(inspect_redis, key)
        # After the stop: nothing may move any more.
        counted = read_back(db, opts.backlog or opts.tasks)
    finally:
        inspect_redis.close()
        mongo.close()

    counts = counted.statuses
    end = last_finished if last_finished is not None else time.time()
    elapsed = end - prod.first_submit
    # Timed: the first --tasks done of a backlog (by the counters), else every task.
    timed = opts.tasks if opts.backlog else counted.terminal
    overlaps = int(farm.get("overlaps", 0))
    added = {k: final.get(k, 0) - live.get(k, 0) for k in final
             if final.get(k, 0) != live.get(k, 0)}
    split = {
        "raw": {"tasks": prod.raw_tasks, **prod.raw},
        "sdk": {"tasks": prod.sdk_tasks, **prod.sdk},
    }
    return Result(
        tasks=opts.tasks, devices=opts.devices, workers=opts.workers, run_ms=opts.run_ms,
        producer=opts.producer,
        elapsed_s=elapsed,
        submit_s=prod.last_submit - prod.first_submit,
        tasks_per_s=timed / elapsed if elapsed > 0 else math.nan,
        latency_p50_ms=percentile(lat, 0.50) * 1000,
        latency_p99_ms=percentile(lat, 0.99) * 1000,
        latency_max_ms=max(lat) * 1000 if lat else math.nan,
        statuses=counts,
        not_terminal=counted.unfinished + counted.lost,
        not_successful=counted.submitted - counts.get(str(TaskStatus.SUCCESS), 0),
        overlaps=overlaps,
        farm={k: v for k, v in farm.items() if k != "config"},
        service_rt_per_task=per_task(final, SERVICE_ROLES, opts.tasks),
        producer_rt_per_task=per_task(final, ("producer",), opts.tasks),
        roundtrips=final,
        roundtrips_added_by_stop=added,
        producer_split=split,
        role_exit_codes=codes,
        cpu_ms_per_task={k: v * 1000 / opts.tasks for k, v in cpu.items()},
        tally=counted.as_dict(),
        ok=counted.ok and overlaps == 0,
    )


# -- output ------------------------------------------------------------------------------

def _fmt(x: float, digits: int = 2) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def render(r: Result) -> None:
    out = Console()
    summary = Table(title="sendscript throughput", show_header=False)
    summary.add_row("tasks / devices / workers", f"{r.tasks} / {r.devices} / {r.workers}")
    summary.add_row("simulated run time", f"{r.run_ms:g} ms")
    summary.add_row("producer", r.producer)
    summary.add_row("submit time", f"{r.submit_s:.2f} s")
    summary.add_row("elapsed (first submit -> last finished)", f"{r.elapsed_s:.2f} s")
    summary.add_row("throughput", f"{_fmt(r.tasks_per_s, 1)} tasks/s")
    summary.add_row("submit -> finished p50", f"{_fmt(r.latency_p50_ms, 0)} ms")
    summary.add_row("submit -> finished p99", f"{_fmt(r.latency_p99_ms, 0)} ms")
    summary.add_row("submit -> finished max", f"{_fmt(r.latency_max_ms, 0)} ms")
    summary.add_row("statuses", " ".join(f"{k}={v}" for k, v in sorted(r.statuses.items())))
    summary.add_row("not terminal", _flag(r.not_terminal))
    summary.add_row("not successful", _flag(r.not_successful))
    summary.add_row("overlaps seen by the farm", _flag(r.overlaps))
    summary.add_row("farm", f"accepted={r.farm.get('accepted')} "
                            f"refused_busy={r.farm.get('refused_busy')} "
                            f"published={r.farm.get('published')}")
    summary.add_row("role exit codes",
                    " ".join(f"{k}={v}" for k, v in r.role_exit_codes.items()))
    out.print(summary)

    cpu = Table(title="CPU per task (ms, from /proc, first submit -> all finished)")
    for name in r.cpu_ms_per_task:
        cpu.add_column(name, justify="right")
    cpu.add_column("all", justify="right")
    cpu.add_row(*[f"{v:.2f}" for v in r.cpu_ms_per_task.values()],
                f"{sum(r.cpu_ms_per_task.values()):.2f}")
    out.print(cpu)

    rt = Table(title="round trips per task")
    rt.add_column("who")
    rt.add_column("redis", justify="right")
    rt.add_column("mongo", justify="right")
    rt.add_column("budget (4 redis, 3 mongo)")
    svc = r.service_rt_per_task
    over = [s for s in ("redis", "mongo") if svc[s] > BUDGET[s]]
    rt.add_row("service (master+worker+consumer)", _fmt(svc["redis"]), _fmt(svc["mongo"]),
               "[red]over: " + ", ".join(over) + "[/red]" if over else "[green]within[/green]")
    for role in SERVICE_ROLES:
        rt.add_row(f"  {role}", *_role_row(r.roundtrips, role, r.tasks), "")
    prod = r.producer_rt_per_task
    rt.add_row("producer (this process)", _fmt(prod["redis"]), _fmt(prod["mongo"]), "")
    for name, split in r.producer_split.items():
        n = split.get("tasks", 0)
        if n:
            rt.add_row(f"  {name} ({n} tasks)", _fmt(split.get("redis", 0) / n),
                       _fmt(split.get("mongo", 0) / n), "")
    out.print(rt)
    totals = " ".join(f"{k}={v}" for k, v in sorted(r.roundtrips.items()))
    out.print(f"round-trip hash after the stop: {totals}")
    silent = [role for role in (*SERVICE_ROLES, "producer")
              if not any(k.startswith(f"{role}:") for k in r.roundtrips)]
    if silent:
        out.print(f"[yellow]no round trips reported by: {', '.join(silent)} "
                  f"(counters not flushed?)[/yellow]")
    if r.roundtrips_added_by_stop:
        added = " ".join(f"{k}=+{v}" for k, v in sorted(r.roundtrips_added_by_stop.items()))
        out.print(f"added by the graceful stop: {added}")
    print(tally.Tally.from_dict(r.tally).line(), flush=True)
    out.print("[green]ok[/green]" if r.ok else "[red]FAILED[/red] (a task lost, unfinished "
                                                "or stored twice, or the farm saw an overlap)")

def _role_row(counts: dict[str, int], role: str, tasks: int) -> tuple[str, str]:
    return (_fmt(counts.get(f"{role}:redis", 0) / tasks),
            _fmt(counts.get(f"{role}:mongo", 0) / tasks))


def _json_safe(value: Any) -> Any:
    """NaN (no latencies) as null, so the line is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def _flag(n: int) -> str:
    return f"[red]{n}[/red]" if n else "0"


# -- command line ------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=5000, help="tasks to submit (default 5000)")
    p.add_argument("--devices", type=int, default=500, help="devices (default 500)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--run-ms", type=float, default=50.0,
                   help="simulated script run time in ms (default 50)")
    p.add_argument("--producer", choices=("raw", "sdk", "both"), default="both",
                   help="raw LPUSH of JSON specs, SDK submit_many, or half each (default)")
    p.add_argument("--batch", type=int, default=100,
                   help="tasks per LPUSH / submit_many call (default 100)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for every task to be terminal "
                        "(default 120 + 0.1 s a task of --tasks or --backlog)")
    p.add_argument("--heartbeat", type=float, default=None,
                   help="roles' heartbeat / counter flush interval in s "
                        "(default: SENDSCRIPT_HEARTBEAT_INTERVAL_S or 2)")
    p.add_argument("--warmup", type=int, default=1,
                   help="tasks run through the service before measuring (default 1; 0: none)")
    p.add_argument("--keep", action="store_true", help="keep the data and logs directory")
    p.add_argument("--backlog", type=int, default=0,
                   help="push this many tasks first, then time the next --tasks done while "
                        "the rest wait (cost per task with a long queue; default 0: off)")
    p.add_argument("--json", action="store_true", help="also print one JSON result line")
    p.add_argument("--min-replicas", type=int, default=0,
                   help="run Redis with this many replicas and every role with "
                        "SENDSCRIPT_REDIS_MIN_REPLICAS set to it (default 0: one server)")
    a = p.parse_args(argv)
    if a.tasks < 1 or a.devices < 1 or a.workers < 1 or a.batch < 1:
        p.error("--tasks, --devices, --workers and --batch must be at least 1")
    if a.run_ms < 0:
        p.error("--run-ms must not be negative")
    heartbeat = a.heartbeat if a.heartbeat is not None else Settings().heartbeat_interval_s
    return Options(
        tasks=a.tasks, devices=a.devices, workers=a.workers, run_ms=a.run_ms,
        producer=a.producer, batch=a.batch,
        timeout_s=a.timeout if a.timeout is not None else 120 + 0.1 * max(a.tasks, a.backlog),
        heartbeat_s=heartbeat, warmup=max(0, a.warmup), keep=a.keep, json=a.json,
        backlog=max(0, a.backlog), min_replicas=max(0, a.min_replicas),
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    # A background run ignores SIGINT: SIGTERM ends it through run's finally block.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = run(opts)
    render(result)
    if opts.json:
        print(json.dumps(_json_safe(asdict(result)), default=str))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
