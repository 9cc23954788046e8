"""Delayed-task scheduling: how late the master fires, and what holding costs it.

    python -m bench.scheduling                      # every part
    python -m bench.scheduling --lateness --tasks 1000 --spread 20
    python -m bench.scheduling --memory --held 100000 --json
    python -m bench.scheduling --restart --restart-tasks 1000 --restart-spread 40

Each part starts its own fresh `LocalStack` (embedded Redis, SecantusDB and
pulsar-lite in a temporary directory, the simulated farm, the consumer and the
master with its workers) and tears it down afterwards.

1. Lateness (`--lateness`). One warm-up task goes through the whole service,
   then `--tasks` delayed tasks are submitted with the SDK (`submit_many`),
   their `run_at` spread evenly over `--spread` seconds starting `--start`
   seconds from now, over `--devices` devices (round robin, so a device's tasks
   are `devices * spread / tasks` seconds apart and never queue behind each
   other). When every task is terminal it reports
   (a) fire lateness as the master measures it (`delayed_fire_lateness` in its
       heartbeat: due time -> the waiting -> pending compare-and-set returned),
   (b) start lateness from Mongo: the exec record's `started_at` minus the
       task's `run_at` (p50 / p99 / max), with the tasks started early
       (`started_at < run_at`; must be 0) and the tasks with more than one exec
       record (must be 0).
   Mongo stores datetimes to the millisecond, so (b) has 1 ms resolution.

2. Memory (`--memory`). With the horizon widened (`SENDSCRIPT_DELAY_HORIZON_S`,
   default 300 s), the idle master's RSS is read (psutil, the master process
   itself, not its workers), then `--held` waiting tasks due `--due-min` ..
   `--due-max` seconds from now are submitted with `submit_many` in chunks of
   1000: each chunk is one `insert_many` into `script_tasks` plus one LPUSH of
   `{"task_id": ...}` references, so the master claims them through its
   intake (Redis ready list -> `offer` -> `claim_scheduled`), not through its
   periodic loader. Two master settings are changed for this part, because
   SecantusDB runs `{"_id": {"$in": ids}}` in time quadratic in len(ids)
   (about 0.04 s for 200 ids, 0.8 s for 1,000, 24 s for 5,000; real MongoDB
   does not): `--intake-batch` (SENDSCRIPT_INTAKE_BATCH, default 100 instead
   of 200) keeps each intake claim small, and `--load-interval`
   (SENDSCRIPT_DELAY_LOAD_INTERVAL_S, default 600 s instead of 20 s) keeps
   the periodic loader, which claims every unheld task it finds in one
   `update_many`, from meeting tens of thousands of tasks stored but not yet
   taken by the intake. Neither changes what the heap holds per task. Once the
   heartbeat says `delayed_held == --held`, the run waits `--settle` seconds,
   reads the RSS again and reports the difference, in MiB and in bytes per held
   task, with the peak RSS (VmHWM) of the master over its whole life. The
   tasks are due after the measurement ends; if one fires during it, the part
   fails. The stack is then stopped: the master gets SIGTERM, on which it
   releases every held task in one `update_many` (on SecantusDB, with tens of
   thousands of ids, that does not finish in minutes), and SIGKILL past
   `--stop-timeout`; the data directory is thrown away.

3. Restart (`--restart`). With the master's production defaults for the
   delay horizon, loader interval, heartbeat TTL and sweeps, `--restart-tasks`
   delayed tasks are submitted, due over the `--restart-spread` seconds that
   start `--restart-start` seconds from now, over `--devices` devices, with
   `--restart-held` more, one fan-out due 8 s after the last of them on devices
   of their own: what a busy master holds besides, and has to take back after a
   restart. They are cancelled (one update) 2 s after the last timed task is due,
   before they are due: a burst of thousands would time the farm, not the
   restart. `--kill-after` seconds after the first due time, the master
   process alone is SIGKILLed (its workers finish what they hold and exit) and
   started again at once with the same SENDSCRIPT_MASTER_ID. When every task
   is terminal it reports, from the farm's own record of each run
   (`/runs`: the time central-control accepted the script, full precision),
   start lateness (run start minus `run_at`) of the tasks due after the kill,
   p50 / p99 / max, split into those due while the new master was starting
   (kill -> its first heartbeat with every worker online: they wait for the
   start whatever the master does) and those due after it was up; the tasks
   started early (must be 0) and the tasks run more than once (must be 0); the
   restart time; and the new master's own fire lateness (its heartbeat).

Exits 1 when a task started early, ran twice, did not finish or never started
(lateness, restart), or when the heap never reached `--held` or fired during
the measurement (memory).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx
import psutil
import redis
from pymongo import MongoClient
from rich.console import Console
from rich.table import Table

from bench.throughput import (
    _json_safe,
    percentile,
    wait_for,
    warm_up,
)
from sendscript import connect
from sendscript.client import SendScriptClient
from sendscript.dev import tally
from sendscript.dev.stack import LocalStack
from sendscript.settings import Settings
from sendscript.store import RECORDS, TASKS

LATENESS_SCRIPT = "bench-delayed"
MEMORY_SCRIPT = "bench-held"
RESTART_SCRIPT = "bench-restart"
HELD_SCRIPT = "bench-restart-held"
# The held-besides tasks: due this long after the last timed one (within the horizon at
# the kill), cancelled in one update this long after it, before they are due.
HELD_DUE_AFTER_S = 8.0
HELD_CANCEL_AFTER_S = 2.0
MIB = 1024 * 1024

console = Console(stderr=True)


@dataclass
class Options:
    lateness: bool
    memory: bool
    restart: bool
    # Part 1.
    tasks: int
    devices: int
    start_s: float
    spread_s: float
    run_ms: float
    workers: int
    timeout_s: float
    # Part 2.
    held: int
    horizon_s: float
    due_min_s: float
    due_max_s: float
    chunk: int
    intake_batch: int
    load_interval_s: float
    settle_s: float
    stop_timeout_s: float
    # Part 3.
    restart_tasks: int
    restart_held: int
    restart_start_s: float
    restart_spread_s: float
    kill_after_s: float
    # Every part.
    heartbeat_s: float
    keep: bool
    json: bool


@dataclass
class LatenessResult:
    tasks: int
    devices: int
    workers: int
    start_s: float
    spread_s: float
    run_ms: float
    submit_s: float  # first submit_many call -> last one returned
    first_due_after_submit_s: float  # slack between the end of submitting and the first run_at
    statuses: dict[str, int]  # every submitted task read back (sendscript/dev/tally.py)
    not_terminal: int  # lost (never stored) or unfinished
    read_back: str  # the tally's line
    fired_by_master: int  # the heartbeat's delayed_fired
    fire_lateness_ms: dict[str, float]  # the heartbeat's delayed_fire_lateness
    start_lateness_ms: dict[str, float]  # started_at - run_at, first record of each task
    started: int  # tasks with at least one exec record
    never_started: int
    early: int  # exec records with started_at < run_at
    duplicates: int  # tasks with more than one exec record
    overlaps: int
    role_exit_codes: dict[str, int | None]
    ok: bool


@dataclass
class MemoryResult:
    held: int
    horizon_s: float
    due_min_s: float
    due_max_s: float
    intake: str
    intake_batch: int
    load_interval_s: float
    master_pid: int
    rss_idle_bytes: int
    rss_held_bytes: int
    rss_delta_mib: float
    bytes_per_task: float
    rss_peak_bytes: int | None  # VmHWM: the master's peak RSS since it started
    rss_samples_mib: list[float]  # during the settle, one every 0.5 s
    submit_s: float  # producer: first chunk -> last chunk stored and pushed
    held_after_s: float  # first chunk -> heartbeat delayed_held == held
    fired_during: int  # delayed_fired while measuring (must be 0)
    heartbeat: dict[str, Any]
    stop_s: float
    stop_graceful: bool
    ok: bool


@dataclass
class RestartResult:
    tasks: int
    devices: int
    workers: int
    start_s: float
    spread_s: float
    kill_after_s: float  # first due time -> SIGKILL
    held_extra: int  # --restart-held: due after the timed ones, not timed
    held_before_kill: int  # the old master's heartbeat delayed_held just before the kill
    restart_up_s: float  # SIGKILL -> the new master's heartbeat with every worker online
    due_before_kill: int
    due_while_starting: int  # due between the kill and the new master being up
    due_after_up: int
    # Farm run start minus run_at, first run of each task, per group.
    late_before_kill_ms: dict[str, float]
    late_while_starting_ms: dict[str, float]
    late_after_up_ms: dict[str, float]
    late_after_kill_ms: dict[str, float]  # the two groups above together
    new_master_fire_lateness_ms: dict[str, float]  # its heartbeat's delayed_fire_lateness
    new_master_fired: int
    statuses: dict[str, int]  # every submitted task read back (sendscript/dev/tally.py)
    not_terminal: int  # lost (never stored) or unfinished
    read_back: str  # the tally's line
    never_started: int
    early: int  # farm runs that started before the task's run_at
    run_twice: int  # tasks the farm ran more than once
    duplicates: int  # tasks with more than one exec record
    overlaps: int
    role_exit_codes: dict[str, int | None]
    ok: bool


@dataclass
class Report:
    lateness: LatenessResult | None = None
    memory: MemoryResult | None = None
    restart: RestartResult | None = None
    errors: dict[str, str] = field(default_factory=dict)
    durations_s: dict[str, float] = field(default_factory=dict)  # each part, start to end

    @property
    def ok(self) -> bool:
        return (not self.errors
                and (self.lateness is None or self.lateness.ok)
                and (self.memory is None or self.memory.ok)
                and (self.restart is None or self.restart.ok))


# -- helpers -----------------------------------------------------------------------------

def stats_ms(values: Sequence[float]) -> dict[str, float]:
    """p50 / p99 / max of seconds, in ms (nearest rank); NaN for no values."""
    return {"p50_ms": percentile(values, 0.50) * 1000,
            "p99_ms": percentile(values, 0.99) * 1000,
            "max_ms": max(values) * 1000 if values else math.nan}


def chunked(items: Sequence[dict[str, Any]], size: int) -> Iterator[Sequence[dict[str, Any]]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def heartbeat(client: redis.Redis, settings: Settings) -> dict[str, Any]:
    """The master's last heartbeat (empty before the first one)."""
    raw = client.hget(settings.keys.masters, settings.master_id)
    return json.loads(raw) if raw else {}


def rss(proc: psutil.Process) -> int:
    return int(proc.memory_info().rss)


def peak_rss(pid: int) -> int | None:
    """VmHWM of a process (Linux), in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def new_stack(opts: Options, prefix: str, extra_env: dict[str, str],
              sim_args: Sequence[str] = ()) -> tuple[LocalStack, Path]:
    base = Settings(
        redis_url=None, mongo_url=None, pulsar_url=None, central_url=None,
        workers=opts.workers, heartbeat_interval_s=opts.heartbeat_s,
    )
    data_dir = Path(tempfile.mkdtemp(prefix=prefix))
    env = {
        "SENDSCRIPT_LOG_LEVEL": "WARNING",
        "SENDSCRIPT_HEARTBEAT_INTERVAL_S": str(opts.heartbeat_s),
        **extra_env,
    }
    stack = LocalStack(base, workers=opts.workers, data_dir=data_dir,
                       sim_args=list(sim_args), extra_env=env)
    console.print(f"starting embedded servers and roles under {data_dir} ...")
    t0 = time.monotonic()
    stack.start(log_dir=data_dir / "logs")
    console.print(f"up in {time.monotonic() - t0:.1f}s: {stack.describe()}")
    return stack, data_dir


def tear_down(stack: LocalStack, data_dir: Path, ok: bool, keep: bool) -> None:
    stack.stop()
    if ok and not keep:
        shutil.rmtree(data_dir, ignore_errors=True)
        return
    for name, role in stack.roles.items():
        if tail := role.log_tail(15).strip():
            console.print(f"--- last lines of {name}.log\n{tail}", markup=False)
    console.print(f"logs and data kept in {data_dir}")


# -- part 1: lateness ----------------------------------------------------------------------

class _HasOk(Protocol):
    ok: bool


R = TypeVar("R", bound=_HasOk)


def measured(stack: LocalStack, data_dir: Path, opts: Options,
             measure: Callable[[LocalStack, Options], R]) -> R:
    """Run one part on its own stack and tear the stack down (kept on failure)."""
    ok = False
    try:
        result = measure(stack, opts)
        ok = result.ok
        return result
    finally:
        tear_down(stack, data_dir, ok, opts.keep)


def run_lateness(opts: Options) -> LatenessResult:
    stack, data_dir = new_stack(opts, "sendscript-bench-sched-", {},
                                ["--run-ms", str(opts.run_ms)])
    return measured(stack, data_dir, opts, _measure_lateness)


def wait_terminal(stack: LocalStack, db: Any, n: int, timeout_s: float,
                  script_id: str) -> None:
    """Until Mongo holds `n` terminal tasks of `script_id`, the timeout passes or a
    role dies; the read-back then says what became of each."""
    if why := tally.wait_terminal(db, {"script.id": script_id}, n, timeout_s,
                                  dead=stack.dead_roles):
        console.print(f"[red]{script_id}: {why}[/red]")


def _measure_lateness(stack: LocalStack, opts: Options) -> LatenessResult:
    settings = stack.effective
    inspect_redis = redis.Redis.from_url(settings.redis_url or "")
    mongo: MongoClient[Any] = MongoClient(settings.mongo_url, tz_aware=True)
    db = mongo.get_default_database(connect.DEFAULT_DB)
    try:
        wait_for(lambda: inspect_redis.hlen(settings.keys.consumers) > 0, 30, "the consumer")
        console.print("warming up with 1 task ...")
        warm_up(settings, inspect_redis, 1, timeout_s=120)

        n = opts.tasks
        t0 = time.time() + opts.start_s
        specs = [{
            "device_id": f"dev-{i % opts.devices:05d}",
            "script": {"id": LATENESS_SCRIPT, "args": {"i": i}},
            "run_at": t0 + opts.spread_s * i / n,
        } for i in range(n)]
        console.print(f"submitting {n} delayed tasks over {opts.devices} devices, due "
                      f"{opts.start_s:g}..{opts.start_s + opts.spread_s:g}s from now ...")
        ids: list[str] = []
        with SendScriptClient(settings) as client:
            first = time.time()
            for part in chunked(specs, 1000):
                ids.extend(s.task_id for s in client.submit_many(part))
            submitted = time.time()
        slack = t0 - submitted
        console.print(f"submitted in {submitted - first:.2f}s "
                      f"({slack:.2f}s before the first is due); waiting")
        if slack < 0:
            console.print("[yellow]submitting took longer than --start: the first tasks were "
                          "due before they were stored[/yellow]")

        wait_s = max(0.0, t0 + opts.spread_s - time.time()) + opts.timeout_s
        wait_terminal(stack, db, n, wait_s, LATENESS_SCRIPT)
        # The heartbeat that follows the last fire (it beats every heartbeat_s).
        hb: dict[str, Any] = {}
        try:
            wait_for(lambda: (hb.update(heartbeat(inspect_redis, settings))
                              or hb.get("delayed_fired", 0) >= n),
                     3 * opts.heartbeat_s + 5, "a heartbeat with every fire", interval_s=0.2)
        except TimeoutError as exc:
            console.print(f"[yellow]{exc}[/yellow]")
        farm = stack.simulator_stats()

        counted = tally.by_ids(db, ids)
        tasks = {d["_id"]: d["run_at"] for d in db[TASKS].find(
            {"_id": {"$in": ids}}, {"run_at": 1})}
        starts: dict[str, list[datetime]] = {}
        for rec in db[RECORDS].find({"task_id": {"$in": ids}}, {"task_id": 1, "started_at": 1}):
            starts.setdefault(rec["task_id"], []).append(rec["started_at"])
        codes = {name: stack.roles[name].stop(timeout_s=max(30.0, settings.shutdown_grace_s
                                                             + 10))
                 for name in ("master", "consumer") if name in stack.roles}
    finally:
        inspect_redis.close()
        mongo.close()

    late: list[float] = []
    early = 0
    for task_id, started in starts.items():
        run_at = tasks.get(task_id)
        if run_at is None:
            continue
        early += sum(1 for s in started if s < run_at)
        late.append((min(started) - run_at).total_seconds())
    duplicates = sum(1 for started in starts.values() if len(started) > 1)
    never_started = sum(1 for task_id in ids if task_id not in starts)
    overlaps = int(farm.get("overlaps", 0))
    fire = hb.get("delayed_fire_lateness") or {}
    return LatenessResult(
        tasks=n, devices=opts.devices, workers=opts.workers, start_s=opts.start_s,
        spread_s=opts.spread_s, run_ms=opts.run_ms,
        submit_s=submitted - first, first_due_after_submit_s=slack,
        statuses=counted.statuses, not_terminal=counted.lost + counted.unfinished,
        read_back=counted.line(),
        fired_by_master=int(hb.get("delayed_fired", 0)),
        fire_lateness_ms={k: float(fire.get(k, math.nan)) for k in ("p50_ms", "p99_ms", "max_ms")},
        start_lateness_ms=stats_ms(late),
        started=len(starts), never_started=never_started, early=early, duplicates=duplicates,
        overlaps=overlaps, role_exit_codes=codes,
        ok=early == 0 and duplicates == 0 and never_started == 0 and counted.ok
        and overlaps == 0,
    )


# -- part 2: memory ------------------------------------------------------------------------

def run_memory(opts: Options) -> MemoryResult:
    stack, data_dir = new_stack(opts, "sendscript-bench-mem-", {
        "SENDSCRIPT_DELAY_HORIZON_S": str(opts.horizon_s),
        "SENDSCRIPT_INTAKE_BATCH": str(opts.intake_batch),
        "SENDSCRIPT_DELAY_LOAD_INTERVAL_S": str(opts.load_interval_s),
        # Backpressure counts the delay heap: this part holds --held on purpose.
        "SENDSCRIPT_HIGH_WATER": "0",
    })
    return measured(stack, data_dir, opts, _measure_memory)


def _measure_memory(stack: LocalStack, opts: Options) -> MemoryResult:
    settings = stack.effective
    inspect_redis = redis.Redis.from_url(settings.redis_url or "")
    pid = stack.roles["master"].pid
    proc = psutil.Process(pid)
    n = opts.held
    try:
        hb = heartbeat(inspect_redis, settings)
        if hb.get("pid") != pid:
            raise RuntimeError(f"the heartbeat names pid {hb.get('pid')}, "
                               f"the master role is pid {pid}")
        time.sleep(opts.settle_s)  # idle: whatever start-up allocated is in
        idle = rss(proc)
        console.print(f"master pid {pid} idle RSS {idle / MIB:.1f} MiB")

        t0 = time.time()
        span = opts.due_max_s - opts.due_min_s
        specs = [{
            "device_id": f"dev-{i % opts.devices:05d}",
            "script": {"id": MEMORY_SCRIPT, "args": {"i": i}},
            "run_at": t0 + opts.due_min_s + span * i / n,
        } for i in range(n)]
        console.print(f"submitting {n} waiting tasks due {opts.due_min_s:g}..{opts.due_max_s:g}s "
                      f"from now in chunks of {opts.chunk} (insert_many + LPUSH of ids) ...")
        with SendScriptClient(settings) as client:
            for part in chunked(specs, opts.chunk):
                client.submit_many(part)
        submitted = time.time()
        del specs
        gc.collect()
        console.print(f"stored and pushed in {submitted - t0:.1f}s; waiting for the master "
                      "to hold them all")

        fire_deadline = t0 + opts.due_min_s
        last_report = 0.0
        while True:
            hb = heartbeat(inspect_redis, settings)
            held = int(hb.get("delayed_held", 0))
            if held >= n:
                break
            now = time.time()
            if stack.dead_roles():
                raise RuntimeError(f"role(s) exited: {', '.join(stack.dead_roles())}")
            if now + opts.settle_s + 1 > fire_deadline:
                raise TimeoutError(f"the master held {held}/{n} tasks "
                                   f"{now - t0:.0f}s after the first submit; the first are "
                                   f"due at {opts.due_min_s:g}s")
            if now - last_report > 5:
                last_report = now
                console.print(f"  held {held}/{n}  ({now - t0:.0f}s, master RSS "
                              f"{rss(proc) / MIB:.1f} MiB)")
            time.sleep(0.5)
        held_after = time.time() - t0
        console.print(f"all {n} held after {held_after:.1f}s; settling {opts.settle_s:g}s")

        samples: list[int] = []
        end = time.monotonic() + opts.settle_s
        while time.monotonic() < end:
            samples.append(rss(proc))
            time.sleep(0.5)
        samples.append(rss(proc))
        held_rss = samples[-1]
        peak = peak_rss(pid)
        hb = heartbeat(inspect_redis, settings)
        fired = int(hb.get("delayed_fired", 0))
        still_held = int(hb.get("delayed_held", 0))
        if time.time() > fire_deadline:
            console.print("[red]the measurement ran past the first due time[/red]")
    finally:
        inspect_redis.close()

    # Stop the master here, timed: on SIGTERM it releases every held task in Mongo.
    t_stop = time.monotonic()
    role = stack.roles["master"]
    code = role.stop(timeout_s=opts.stop_timeout_s)
    stop_s = time.monotonic() - t_stop
    graceful = code == 0
    console.print(f"master stopped in {stop_s:.1f}s "
                  f"({'gracefully' if graceful else f'exit code {code}'})")

    delta = held_rss - idle
    return MemoryResult(
        held=n, horizon_s=opts.horizon_s, due_min_s=opts.due_min_s, due_max_s=opts.due_max_s,
        intake="SDK submit_many (insert_many + LPUSH of task ids) -> master intake claims",
        intake_batch=opts.intake_batch, load_interval_s=opts.load_interval_s,
        master_pid=pid,
        rss_idle_bytes=idle, rss_held_bytes=held_rss, rss_delta_mib=delta / MIB,
        bytes_per_task=delta / n, rss_peak_bytes=peak,
        rss_samples_mib=[round(s / MIB, 1) for s in samples],
        submit_s=submitted - t0, held_after_s=held_after,
        fired_during=fired,
        heartbeat={k: hb.get(k) for k in ("delayed_held", "delayed_fired", "taken", "queued")},
        stop_s=stop_s, stop_graceful=graceful,
        ok=fired == 0 and still_held == n,
    )


# -- part 3: restart -----------------------------------------------------------------------

def run_restart(opts: Options) -> RestartResult:
    stack, data_dir = new_stack(opts, "sendscript-bench-restart-", {},
                                ["--run-ms", str(opts.run_ms)])
    return measured(stack, data_dir, opts, _measure_restart)


def _wait_restarted(client: redis.Redis, settings: Settings, pid: int, workers: int,
                    stack: LocalStack, timeout_s: float) -> float:
    """When the new master's heartbeat first names its pid with every worker online."""
    deadline = time.monotonic() + timeout_s
    while True:
        hb = heartbeat(client, settings)
        if hb.get("pid") == pid and hb.get("workers_alive") == workers:
            return time.time()
        if "master" in stack.dead_roles():
            raise RuntimeError(f"the restarted master exited:\n{stack.roles['master'].log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the restarted master was not up after {timeout_s:g}s")
        time.sleep(0.02)


def _measure_restart(stack: LocalStack, opts: Options) -> RestartResult:
    settings = stack.effective
    inspect_redis = redis.Redis.from_url(settings.redis_url or "")
    mongo: MongoClient[Any] = MongoClient(settings.mongo_url, tz_aware=True)
    db = mongo.get_default_database(connect.DEFAULT_DB)
    try:
        wait_for(lambda: inspect_redis.hlen(settings.keys.consumers) > 0, 30, "the consumer")
        console.print("warming up with 1 task ...")
        warm_up(settings, inspect_redis, 1, timeout_s=120)

        n = opts.restart_tasks
        t0 = time.time() + opts.restart_start_s
        specs = [{
            "device_id": f"dev-{i % opts.devices:05d}",
            "script": {"id": RESTART_SCRIPT, "args": {"i": i}},
            "run_at": t0 + opts.restart_spread_s * i / n,
        } for i in range(n)]
        console.print(f"submitting {n} delayed tasks due {opts.restart_start_s:g}.."
                      f"{opts.restart_start_s + opts.restart_spread_s:g}s from now; the master "
                      f"is killed {opts.kill_after_s:g}s after the first is due ...")
        m = opts.restart_held
        end = t0 + opts.restart_spread_s
        ids: list[str] = []
        with SendScriptClient(settings) as client:
            for part in chunked(specs, 1000):
                ids.extend(s.task_id for s in client.submit_many(part))
            held_batch = None
            if m:
                held_batch = client.submit_fanout(
                    {"id": HELD_SCRIPT}, devices=[f"held-{i:05d}" for i in range(m)],
                    run_at=end + HELD_DUE_AFTER_S)
                ids.extend(s.task_id for s in held_batch.tasks)
        if (slack := t0 - time.time()) < 0:
            console.print(f"[yellow]submitting ended {-slack:.1f}s after the first was due: "
                          "raise --restart-start[/yellow]")
        timed = set(ids[:n])

        kill_at = t0 + opts.kill_after_s
        if (pause := kill_at - time.time()) > 0:
            time.sleep(pause)
        held = int(heartbeat(inspect_redis, settings).get("delayed_held", 0))
        old = stack.roles["master"]
        log_dir = old.log_path.parent if old.log_path is not None else None
        killed_at = time.time()
        old.kill()
        new = stack.start_role("master", ["master"], log_dir)
        up_at = _wait_restarted(inspect_redis, settings, new.pid, opts.workers, stack, 120)
        console.print(f"master SIGKILLed holding {held} delayed task(s) and restarted: "
                      f"up again after {up_at - killed_at:.2f}s")

        if held_batch is not None:
            # Before they are due: they were there to be taken back, not to run.
            if (pause := end + HELD_CANCEL_AFTER_S - time.time()) > 0:
                time.sleep(pause)
            with SendScriptClient(settings) as client:
                cancelled = client.cancel_batch(held_batch.batch_id, "bench: held only")
            console.print(f"cancelled {cancelled}/{m} held-besides task(s)")
        wait_s = max(0.0, t0 + opts.restart_spread_s - time.time()) + opts.timeout_s
        wait_terminal(stack, db, n, wait_s, RESTART_SCRIPT)
        if m:
            wait_terminal(stack, db, m, opts.timeout_s, HELD_SCRIPT)
        counted = tally.by_ids(db, ids)  # the timed tasks and the held-besides ones
        done_at = datetime.now(UTC)
        hb: dict[str, Any] = {}
        try:  # a heartbeat from after the last fire
            wait_for(lambda: (hb.update(heartbeat(inspect_redis, settings))
                              or beat_time(hb) > done_at),
                     3 * opts.heartbeat_s + 5, "a heartbeat after the run", interval_s=0.2)
        except TimeoutError as exc:
            console.print(f"[yellow]{exc}[/yellow]")
        farm = stack.simulator_stats()
        every = set(ids)
        runs = [r for r in httpx.get(f"{stack.central_url}/runs", timeout=30).json()
                if r["task_id"] in every]
        run_at = {d["_id"]: d["run_at"].timestamp() for d in db[TASKS].find(
            {"_id": {"$in": ids}}, {"run_at": 1})}
        records = Counter(r["task_id"] for r in db[RECORDS].find(
            {"task_id": {"$in": ids}}, {"task_id": 1}))
        codes = {name: stack.roles[name].stop(timeout_s=max(30.0, settings.shutdown_grace_s
                                                             + 10))
                 for name in ("master", "consumer") if name in stack.roles}
    finally:
        inspect_redis.close()
        mongo.close()

    starts: dict[str, list[float]] = {}
    for r in runs:
        starts.setdefault(r["task_id"], []).append(float(r["started"]))
    early = sum(1 for task_id, ts in starts.items() for t in ts if t < run_at[task_id])
    groups: dict[str, list[float]] = {"before": [], "starting": [], "up": []}
    for task_id, ts in starts.items():
        if task_id not in timed:
            continue
        due = run_at[task_id]
        group = "before" if due < killed_at else "starting" if due < up_at else "up"
        groups[group].append(min(ts) - due)
    due_times = [due for task_id, due in run_at.items() if task_id in timed]
    never_started = sum(1 for task_id in timed if task_id not in starts)
    run_twice = sum(1 for ts in starts.values() if len(ts) > 1)
    duplicates = sum(1 for c in records.values() if c > 1)
    overlaps = int(farm.get("overlaps", 0))
    fire: dict[str, float] = {}
    if hb.get("pid") == new.pid:  # the new master's own figures, not the old one's
        fire = hb.get("delayed_fire_lateness") or {}
    return RestartResult(
        tasks=n, devices=opts.devices, workers=opts.workers, start_s=opts.restart_start_s,
        spread_s=opts.restart_spread_s, kill_after_s=opts.kill_after_s,
        held_extra=m, held_before_kill=held, restart_up_s=up_at - killed_at,
        due_before_kill=sum(1 for d in due_times if d < killed_at),
        due_while_starting=sum(1 for d in due_times if killed_at <= d < up_at),
        due_after_up=sum(1 for d in due_times if d >= up_at),
        late_before_kill_ms=stats_ms(groups["before"]),
        late_while_starting_ms=stats_ms(groups["starting"]),
        late_after_up_ms=stats_ms(groups["up"]),
        late_after_kill_ms=stats_ms(groups["starting"] + groups["up"]),
        new_master_fire_lateness_ms={k: float(fire.get(k, math.nan))
                                     for k in ("p50_ms", "p99_ms", "max_ms")},
        new_master_fired=int(hb.get("delayed_fired", 0)),
        statuses=counted.statuses, not_terminal=counted.lost + counted.unfinished,
        read_back=counted.line(),
        never_started=never_started,
        early=early, run_twice=run_twice, duplicates=duplicates, overlaps=overlaps,
        role_exit_codes=codes,
        ok=early == 0 and run_twice == 0 and duplicates == 0 and never_started == 0
        and counted.ok and overlaps == 0,
    )


def beat_time(hb: dict[str, Any]) -> datetime:
    """When a heartbeat was written (the epoch for none)."""
    return datetime.fromisoformat(hb.get("updated_at") or "1970-01-01T00:00:00+00:00")


# -- output ------------------------------------------------------------------------------

def _ms(stats: dict[str, float]) -> str:
    return " / ".join("-" if math.isnan(stats.get(k, math.nan)) else f"{stats[k]:.0f}"
                      for k in ("p50_ms", "p99_ms", "max_ms"))


def _flag(n: int) -> str:
    return f"[red]{n}[/red]" if n else "0"


def render(report: Report) -> None:
    out = Console()
    if (r := report.lateness) is not None:
        t = Table(title="delayed-task lateness", show_header=False)
        t.add_row("tasks / devices / workers", f"{r.tasks} / {r.devices} / {r.workers}")
        t.add_row("due", f"{r.start_s:g} .. {r.start_s + r.spread_s:g} s after submit start")
        t.add_row("submit time", f"{r.submit_s:.2f} s "
                                 f"(first due {r.first_due_after_submit_s:.2f} s later)")
        t.add_row("fired by the master", str(r.fired_by_master))
        t.add_row("fire lateness p50 / p99 / max (master)", f"{_ms(r.fire_lateness_ms)} ms")
        t.add_row("start lateness p50 / p99 / max (Mongo)", f"{_ms(r.start_lateness_ms)} ms")
        t.add_row("statuses", " ".join(f"{k}={v}" for k, v in sorted(r.statuses.items())))
        t.add_row("not terminal", _flag(r.not_terminal))
        t.add_row("read back", r.read_back)
        t.add_row("never started", _flag(r.never_started))
        t.add_row("started early", _flag(r.early))
        t.add_row("more than one exec record", _flag(r.duplicates))
        t.add_row("overlaps seen by the farm", _flag(r.overlaps))
        t.add_row("role exit codes", " ".join(f"{k}={v}" for k, v in r.role_exit_codes.items()))
        t.add_row("result", "[green]ok[/green]" if r.ok else "[red]FAILED[/red]")
        out.print(t)
    if (m := report.memory) is not None:
        t = Table(title="master memory for held delayed tasks", show_header=False)
        t.add_row("held tasks", f"{m.held} (due {m.due_min_s:g}..{m.due_max_s:g} s, "
                                f"horizon {m.horizon_s:g} s)")
        t.add_row("intake", f"{m.intake} (intake batch {m.intake_batch}, "
                            f"loader every {m.load_interval_s:g} s)")
        t.add_row("submit time / all held after", f"{m.submit_s:.1f} s / {m.held_after_s:.1f} s")
        t.add_row("master RSS idle", f"{m.rss_idle_bytes / MIB:.1f} MiB")
        t.add_row("master RSS holding", f"{m.rss_held_bytes / MIB:.1f} MiB")
        t.add_row("delta", f"{m.rss_delta_mib:.1f} MiB = {m.bytes_per_task:.0f} bytes per task "
                           f"({m.rss_delta_mib * 100_000 / m.held:.1f} MiB per 100,000)")
        if m.rss_peak_bytes is not None:
            t.add_row("master peak RSS (VmHWM)", f"{m.rss_peak_bytes / MIB:.1f} MiB")
        t.add_row("RSS while settling (MiB)", " ".join(f"{s:g}" for s in m.rss_samples_mib))
        t.add_row("fired during the measurement", _flag(m.fired_during))
        t.add_row("master stop (releases held tasks)",
                  f"{m.stop_s:.1f} s, {'graceful' if m.stop_graceful else 'not graceful'}")
        t.add_row("result", "[green]ok[/green]" if m.ok else "[red]FAILED[/red]")
        out.print(t)
    if (x := report.restart) is not None:
        t = Table(title="delayed tasks across a master SIGKILL and immediate restart",
                  show_header=False)
        t.add_row("tasks timed / held besides / devices / workers",
                  f"{x.tasks} / {x.held_extra} / {x.devices} / {x.workers}")
        t.add_row("due", f"{x.start_s:g} .. {x.start_s + x.spread_s:g} s after submit start; "
                         f"kill {x.kill_after_s:g} s after the first is due")
        t.add_row("held by the master at the kill", str(x.held_before_kill))
        t.add_row("kill -> restarted master up", f"{x.restart_up_s:.2f} s")
        t.add_row("due before the kill / while restarting / after up",
                  f"{x.due_before_kill} / {x.due_while_starting} / {x.due_after_up}")
        t.add_row("start lateness, due after the kill p50 / p99 / max",
                  f"{_ms(x.late_after_kill_ms)} ms")
        t.add_row("  due while restarting p50 / p99 / max", f"{_ms(x.late_while_starting_ms)} ms")
        t.add_row("  due after up p50 / p99 / max", f"{_ms(x.late_after_up_ms)} ms")
        t.add_row("start lateness, due before the kill p50 / p99 / max",
                  f"{_ms(x.late_before_kill_ms)} ms")
        t.add_row("new master: fired / fire lateness p50 / p99 / max",
                  f"{x.new_master_fired} / {_ms(x.new_master_fire_lateness_ms)} ms")
        t.add_row("statuses", " ".join(f"{k}={v}" for k, v in sorted(x.statuses.items())))
        t.add_row("not terminal", _flag(x.not_terminal))
        t.add_row("read back", x.read_back)
        t.add_row("never started", _flag(x.never_started))
        t.add_row("started early", _flag(x.early))
        t.add_row("run twice (farm) / more than one exec record",
                  f"{_flag(x.run_twice)} / {_flag(x.duplicates)}")
        t.add_row("overlaps seen by the farm", _flag(x.overlaps))
        t.add_row("role exit codes", " ".join(f"{k}={v}" for k, v in x.role_exit_codes.items()))
        t.add_row("result", "[green]ok[/green]" if x.ok else "[red]FAILED[/red]")
        out.print(t)
    for part, error in report.errors.items():
        out.print(f"[red]{part} failed: {error}[/red]")
    out.print("run time: " + ", ".join(f"{k} {v:.0f} s" for k, v in report.durations_s.items()))


# -- command line ------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench.scheduling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lateness", action="store_true", help="run part 1 (default: all)")
    p.add_argument("--memory", action="store_true", help="run part 2 (default: all)")
    p.add_argument("--restart", action="store_true", help="run part 3 (default: all)")
    g = p.add_argument_group("part 1: lateness")
    g.add_argument("--tasks", type=int, default=1000, help="delayed tasks (default 1000)")
    g.add_argument("--devices", type=int, default=200, help="devices (default 200)")
    g.add_argument("--start", type=float, default=3.0,
                   help="seconds from now to the first due time (default 3)")
    g.add_argument("--spread", type=float, default=20.0,
                   help="seconds over which the due times are spread (default 20)")
    g.add_argument("--run-ms", type=float, default=50.0,
                   help="simulated script run time in ms (default 50)")
    g.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    g.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait after the last due time (default 120)")
    g = p.add_argument_group("part 2: memory")
    g.add_argument("--held", type=int, default=100_000,
                   help="waiting tasks for the master to hold (default 100000)")
    g.add_argument("--horizon", type=float, default=300.0,
                   help="SENDSCRIPT_DELAY_HORIZON_S for the roles (default 300)")
    g.add_argument("--due-min", type=float, default=240.0,
                   help="first due time, seconds after the first submit (default 240)")
    g.add_argument("--due-max", type=float, default=250.0,
                   help="last due time, seconds after the first submit (default 250)")
    g.add_argument("--chunk", type=int, default=1000,
                   help="tasks per submit_many call (default 1000)")
    g.add_argument("--intake-batch", type=int, default=100,
                   help="SENDSCRIPT_INTAKE_BATCH for the master (default 100; see above)")
    g.add_argument("--load-interval", type=float, default=600.0,
                   help="SENDSCRIPT_DELAY_LOAD_INTERVAL_S for the master (default 600: "
                        "the periodic loader runs once, at start; see above)")
    g.add_argument("--settle", type=float, default=5.0,
                   help="seconds to let the idle / holding master settle before reading "
                        "RSS (default 5)")
    g.add_argument("--stop-timeout", type=float, default=10.0,
                   help="seconds the holding master gets to stop before SIGKILL (default 10)")
    g = p.add_argument_group("part 3: restart (also uses --devices, --workers, --run-ms, "
                             "--timeout)")
    g.add_argument("--restart-tasks", type=int, default=1000,
                   help="delayed tasks (default 1000)")
    g.add_argument("--restart-held", type=int, default=3000,
                   help="delayed tasks held besides, due 8 s after the last timed one, "
                        "cancelled before (default 3000; keep them within the 60 s horizon "
                        "at the kill)")
    g.add_argument("--restart-start", type=float, default=10.0,
                   help="seconds from now to the first due time (default 10)")
    g.add_argument("--restart-spread", type=float, default=40.0,
                   help="seconds over which the due times are spread (default 40)")
    g.add_argument("--kill-after", type=float, default=10.0,
                   help="seconds after the first due time to SIGKILL the master (default 10)")
    p.add_argument("--heartbeat", type=float, default=1.0,
                   help="roles' heartbeat interval in s (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the data and logs directories")
    p.add_argument("--json", action="store_true", help="also print one JSON result line")
    a = p.parse_args(argv)
    if min(a.tasks, a.devices, a.workers, a.held, a.chunk, a.intake_batch,
           a.restart_tasks) < 1:
        p.error("--tasks, --devices, --workers, --held, --chunk, --intake-batch and "
                "--restart-tasks must be at least 1")
    if not 0 <= a.kill_after <= a.restart_spread or a.restart_start < 0 or a.restart_held < 0:
        p.error("need 0 <= --kill-after <= --restart-spread, --restart-start >= 0 and "
                "--restart-held >= 0")
    if a.start < 0 or a.spread < 0 or a.run_ms < 0 or a.settle < 0:
        p.error("--start, --spread, --run-ms and --settle must not be negative")
    if not 0 < a.due_min <= a.due_max < a.horizon:
        p.error("need 0 < --due-min <= --due-max < --horizon (held tasks are due "
                "within the horizon)")
    every_part = not (a.lateness or a.memory or a.restart)
    return Options(
        lateness=a.lateness or every_part, memory=a.memory or every_part,
        restart=a.restart or every_part,
        tasks=a.tasks, devices=a.devices, start_s=a.start, spread_s=a.spread,
        run_ms=a.run_ms, workers=a.workers, timeout_s=a.timeout,
        held=a.held, horizon_s=a.horizon, due_min_s=a.due_min, due_max_s=a.due_max,
        chunk=a.chunk, intake_batch=a.intake_batch, load_interval_s=a.load_interval,
        settle_s=a.settle, stop_timeout_s=a.stop_timeout,
        restart_tasks=a.restart_tasks, restart_held=a.restart_held,
        restart_start_s=a.restart_start,
        restart_spread_s=a.restart_spread, kill_after_s=a.kill_after,
        heartbeat_s=a.heartbeat, keep=a.keep, json=a.json,
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    report = Report()
    if opts.lateness:
        t0 = time.monotonic()
        try:
            report.lateness = run_lateness(opts)
        except Exception as exc:
            report.errors["lateness"] = f"{type(exc).__name__}: {exc}"
        report.durations_s["lateness"] = time.monotonic() - t0
    if opts.memory:
        t0 = time.monotonic()
        try:
            report.memory = run_memory(opts)
        except Exception as exc:
            report.errors["memory"] = f"{type(exc).__name__}: {exc}"
        report.durations_s["memory"] = time.monotonic() - t0
    if opts.restart:
        t0 = time.monotonic()
        try:
            report.restart = run_restart(opts)
        except Exception as exc:
            report.errors["restart"] = f"{type(exc).__name__}: {exc}"
        report.durations_s["restart"] = time.monotonic() - t0
    render(report)
    if opts.json:
        line = {"lateness": asdict(report.lateness) if report.lateness else None,
                "memory": asdict(report.memory) if report.memory else None,
                "restart": asdict(report.restart) if report.restart else None,
                "errors": report.errors, "durations_s": report.durations_s, "ok": report.ok}
        print(json.dumps(_json_safe(line), default=str))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
