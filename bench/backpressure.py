"""Backpressure: a master's memory while a million items wait in the ready list.

    python -m bench.backpressure                          # 1,000,000 items, 60 s
    python -m bench.backpressure --items 200000 --duration 30 --json

One fresh `LocalStack` (embedded Redis, SecantusDB and pulsar-lite in a temporary
directory, the simulated farm, the consumer and the master with its workers), with
the master's SENDSCRIPT_HIGH_WATER / SENDSCRIPT_LOW_WATER set from `--high` / `--low`.
The master's RSS (VmRSS of /proc/<pid>/status: the master process, not its
workers) is read once idle. Then `--items` raw task specs (`{"device_id",
"script"}` over `--devices` devices) are LPUSHed onto the ready list in bulk:
redis-py pipelines (no transaction) of LPUSH commands of `--push-chunk` items each.
For `--duration` seconds the RSS is sampled every `--interval` seconds, with the
master's heartbeat (its backpressure state and the tasks it holds: board queued
plus delay heap) and the ready list's length. It prints RSS idle, right after the
push, at the end, the peak (of the samples, and VmHWM over the master's life),
the growth from the first sample at high water to the end, the tasks held
(heartbeat samples and the master's own peak), the ready list's length and how
many tasks ran meanwhile.

Then the master is stopped (it hands the tasks it holds back to the ready list, by
reference) and every pushed item is accounted for by its `script.args.i`
(sendscript/dev/tally.py): stored in Mongo (by status), or still listed raw in the ready
list or the master's intake lists, or lost; an item both stored and listed, or
stored twice, is a duplicate. Most items are still listed: they were never meant
to run within the run.

`ok` (exit 0) when no heartbeat sample and not the master's own peak held more than
high water plus one intake batch, the master did reach high water (else nothing
was measured), most items still wait in Redis, the RSS grew by less than
`--flat-mib` from the first sample at high water to the end, and no item is lost
(neither stored nor listed) or there twice.

`run(Options(...))` is the part `bench/protections.py` calls; `render` prints it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
from pymongo import MongoClient
from rich.console import Console
from rich.table import Table

from sendscript import connect
from sendscript.dev import tally
from sendscript.dev.stack import LocalStack
from sendscript.settings import Settings

MIB = 1024 * 1024
SCRIPT = "bench-backpressure"
LRANGE_CHUNK = 50_000  # items read a call when the lists are read back

console = Console(stderr=True)


@dataclass
class Options:
    items: int = 1_000_000
    duration_s: float = 60.0
    interval_s: float = 1.0
    high: int = 5000
    low: int = 1000
    intake_batch: int = 200
    devices: int = 1000
    run_ms: float = 200.0
    workers: int = 2
    push_chunk: int = 10_000
    pipeline_commands: int = 10
    flat_mib: float = 16.0
    heartbeat_s: float = 0.5
    keep: bool = False
    json: bool = False


@dataclass
class Sample:
    t_s: float  # since the push ended
    rss_mib: float
    held: int
    state: str
    ready: int


@dataclass
class Result:
    items: int
    high_water: int
    low_water: int
    intake_batch: int
    master_pid: int
    push_s: float
    rss_idle_mib: float
    rss_after_push_mib: float
    rss_end_mib: float
    rss_peak_mib: float  # the largest sample
    vmhwm_mib: float | None  # the master's peak over its whole life
    rss_growth_mib: float | None  # first sample at high water -> end
    held_max_sampled: int
    peak_held: int  # the master's own, at every event
    queued_end: int
    delayed_end: int
    ready_end: int
    taken: int  # items the master took off the ready list
    ran: int  # tasks with a worker answer (any outcome)
    throttled_times: int
    tally: dict[str, Any] = field(default_factory=dict)  # every pushed item accounted for
    read_back: str = ""  # the tally's line
    samples: list[Sample] = field(default_factory=list)
    ok: bool = False
    why_not: list[str] = field(default_factory=list)


def status_kib(pid: int, name: str) -> int | None:
    """A `Vm*:` line of /proc/<pid>/status (Linux), in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib(pid: int) -> float:
    kib = status_kib(pid, "VmRSS")
    if kib is None:
        raise RuntimeError(f"no VmRSS for pid {pid}: has the master exited?")
    return kib / 1024


def heartbeat(client: redis.Redis, settings: Settings) -> dict[str, Any]:
    raw = client.hget(settings.keys.masters, settings.master_id)
    return json.loads(raw) if raw else {}


def spec(i: int, devices: int) -> bytes:
    return json.dumps({"device_id": f"bp-{i % devices:05d}",
                       "script": {"id": SCRIPT, "args": {"i": i}}}).encode()


def push(client: redis.Redis, key: str, opts: Options) -> float:
    """LPUSH `items` raw specs in pipelines of LPUSH commands; seconds it took."""
    t0 = time.monotonic()
    per_pipe = opts.push_chunk * opts.pipeline_commands
    for start in range(0, opts.items, per_pipe):
        pipe = client.pipeline(transaction=False)
        for chunk in range(start, min(start + per_pipe, opts.items), opts.push_chunk):
            end = min(chunk + opts.push_chunk, opts.items)
            pipe.lpush(key, *[spec(i, opts.devices) for i in range(chunk, end)])
        pipe.execute()
    return time.monotonic() - t0


def run(opts: Options) -> Result:
    """The whole part on a stack of its own, torn down after (kept on failure)."""
    base = Settings(redis_url=None, mongo_url=None, pulsar_url=None, central_url=None,
                    workers=opts.workers, heartbeat_interval_s=opts.heartbeat_s)
    data_dir = Path(tempfile.mkdtemp(prefix="sendscript-bench-bp-"))
    stack = LocalStack(base, workers=opts.workers, data_dir=data_dir,
                       sim_args=["--run-ms", str(opts.run_ms)],
                       extra_env={
                           "SENDSCRIPT_LOG_LEVEL": "WARNING",
                           "SENDSCRIPT_HEARTBEAT_INTERVAL_S": str(opts.heartbeat_s),
                           "SENDSCRIPT_HIGH_WATER": str(opts.high),
                           "SENDSCRIPT_LOW_WATER": str(opts.low),
                           "SENDSCRIPT_INTAKE_BATCH": str(opts.intake_batch),
                       })
    ok = False
    console.print(f"starting embedded servers and roles under {data_dir} ...")
    try:
        stack.start(log_dir=data_dir / "logs")
        console.print(f"up: {stack.describe()}")
        result = _measure(stack, opts)
        ok = result.ok
        return result
    finally:
        # The master stops at once whatever waits in Redis: it hands its queued tasks
        # back and leaves the ready list to others.
        t0 = time.monotonic()
        stack.stop()
        console.print(f"stack stopped in {time.monotonic() - t0:.1f}s")
        if ok and not opts.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            for name, role in stack.roles.items():
                if tail := role.log_tail(15).strip():
                    console.print(f"--- last lines of {name}.log\n{tail}", markup=False)
            console.print(f"logs and data kept in {data_dir}")


def _measure(stack: LocalStack, opts: Options) -> Result:
    settings = stack.effective
    pid = stack.roles["master"].pid
    client = redis.Redis.from_url(settings.redis_url or "", socket_timeout=30)
    try:
        hb = heartbeat(client, settings)
        if hb.get("pid") != pid:
            raise RuntimeError(f"the heartbeat names pid {hb.get('pid')}, the master is {pid}")
        time.sleep(2 * opts.heartbeat_s)  # idle: what start-up allocated is in
        idle = rss_mib(pid)
        console.print(f"master pid {pid}: idle RSS {idle:.1f} MiB; pushing {opts.items} items "
                      f"(LPUSH of {opts.push_chunk}, {opts.pipeline_commands} per pipeline) ...")
        push_s = push(client, settings.keys.ready, opts)
        after_push = rss_mib(pid)
        console.print(f"pushed in {push_s:.1f}s; ready list {client.llen(settings.keys.ready)}; "
                      f"sampling for {opts.duration_s:g}s")

        samples: list[Sample] = []
        t0 = time.monotonic()
        while (now := time.monotonic()) - t0 <= opts.duration_s:
            if stack.dead_roles():
                raise RuntimeError(f"role(s) exited: {', '.join(stack.dead_roles())}")
            bp = heartbeat(client, settings).get("backpressure") or {}
            samples.append(Sample(round(now - t0, 2), round(rss_mib(pid), 1),
                                  int(bp.get("held", 0)), str(bp.get("state", "?")),
                                  int(client.llen(settings.keys.ready))))
            if len(samples) % max(1, int(10 / opts.interval_s)) == 1:
                s = samples[-1]
                console.print(f"  {s.t_s:5.0f}s  RSS {s.rss_mib:7.1f} MiB  held {s.held:6d} "
                              f"({s.state})  ready {s.ready}")
            time.sleep(max(0.0, opts.interval_s - (time.monotonic() - now)))
        time.sleep(2 * opts.heartbeat_s)  # a fresh heartbeat for the totals
        hb = heartbeat(client, settings)
        ready_end = int(client.llen(settings.keys.ready))
        vmhwm = status_kib(pid, "VmHWM")
        counted = read_back(stack, client, opts.items)
    finally:
        client.close()

    bp = hb.get("backpressure") or {}
    at_high = next((i for i, s in enumerate(samples) if s.state == "throttled"), None)
    growth = samples[-1].rss_mib - samples[at_high].rss_mib if at_high is not None else None
    bound = opts.high + opts.intake_batch
    result = Result(
        items=opts.items, high_water=opts.high, low_water=opts.low,
        intake_batch=opts.intake_batch, master_pid=pid, push_s=round(push_s, 2),
        rss_idle_mib=round(idle, 1), rss_after_push_mib=round(after_push, 1),
        rss_end_mib=samples[-1].rss_mib, rss_peak_mib=max(s.rss_mib for s in samples),
        vmhwm_mib=round(vmhwm / 1024, 1) if vmhwm else None,
        rss_growth_mib=round(growth, 1) if growth is not None else None,
        held_max_sampled=max(s.held for s in samples), peak_held=int(bp.get("peak_held", 0)),
        queued_end=int(hb.get("queued", 0)), delayed_end=int(hb.get("delayed_held", 0)),
        ready_end=ready_end, taken=int(hb.get("taken", 0)),
        ran=sum(int(v) for v in (hb.get("outcomes") or {}).values()),
        throttled_times=int(bp.get("throttled_times", 0)), samples=samples,
        tally=counted.as_dict(), read_back=counted.line(),
    )
    why = result.why_not
    if max(result.held_max_sampled, result.peak_held) > bound:
        why.append(f"held more than high water + one batch ({bound})")
    if at_high is None:
        why.append("the master never reached high water: nothing was measured")
    if ready_end < opts.items // 2:
        why.append("the master took more than half the items off the ready list")
    if growth is not None and growth > opts.flat_mib:
        why.append(f"RSS grew by {growth:.1f} MiB at high water (limit {opts.flat_mib:g})")
    if not counted.accounted:
        why.append(f"{counted.lost} item(s) neither stored nor listed, "
                   f"{counted.duplicates} there twice")
    result.ok = not why
    return result


def read_back(stack: LocalStack, client: redis.Redis, items: int) -> tally.Tally:
    """Every pushed item (`script.args.i` 0 .. items-1): stored in Mongo, or still
    listed raw in Redis. The master is stopped first, so that nothing moves between
    the two reads; what it held goes back to the ready list as references to stored
    tasks, which name no item."""
    settings = stack.effective
    keys = settings.keys
    stack.roles["master"].stop(timeout_s=max(30.0, settings.shutdown_grace_s + 10))
    lists = (keys.ready, keys.staging(settings.master_id), keys.processing(settings.master_id))
    listed = (tally.field_of(json.loads(item), "script.args.i")
              for key in lists for item in list_items(client, key))
    console.print("master stopped; reading back every pushed item ...")
    with MongoClient(settings.mongo_url, socketTimeoutMS=300_000) as mongo:
        return tally.by_key(mongo.get_default_database(connect.DEFAULT_DB), range(items),
                            {"script.id": SCRIPT}, "script.args.i", listed)


def list_items(client: redis.Redis, key: str) -> Iterator[bytes]:
    """A Redis list's items, `LRANGE_CHUNK` a call (nothing pushes or pops meanwhile)."""
    start = 0
    while batch := client.lrange(key, start, start + LRANGE_CHUNK - 1):
        yield from batch
        start += len(batch)


def render(r: Result, out: Console | None = None) -> None:
    out = out or Console()
    t = Table("backpressure", "value", title=f"master memory, {r.items} items in the ready list")
    t.add_row("high / low water, intake batch", f"{r.high_water} / {r.low_water}, "
                                                 f"{r.intake_batch}")
    t.add_row("push (LPUSH pipelines)", f"{r.items} items in {r.push_s:.1f} s")
    t.add_row("RSS idle / after push", f"{r.rss_idle_mib:.1f} / {r.rss_after_push_mib:.1f} MiB")
    t.add_row(f"RSS after {r.samples[-1].t_s:.0f} s" if r.samples else "RSS end",
              f"{r.rss_end_mib:.1f} MiB")
    t.add_row("RSS peak (samples / VmHWM)", f"{r.rss_peak_mib:.1f} / {r.vmhwm_mib} MiB")
    t.add_row("RSS growth at high water", "n/a" if r.rss_growth_mib is None
              else f"{r.rss_growth_mib:+.1f} MiB")
    t.add_row("held: sampled max / master's peak",
              f"{r.held_max_sampled} / {r.peak_held} (bound {r.high_water + r.intake_batch})")
    t.add_row("at the end: queued / delayed", f"{r.queued_end} / {r.delayed_end}")
    t.add_row("ready list at the end", str(r.ready_end))
    t.add_row("taken / ran meanwhile", f"{r.taken} / {r.ran}")
    t.add_row("throttled (times)", str(r.throttled_times))
    t.add_row("ok", "yes" if r.ok else f"[red]no: {'; '.join(r.why_not)}[/red]")
    out.print(t)
    out.print(r.read_back, markup=False, highlight=False, soft_wrap=True)


def parse_args(argv: Sequence[str] | None = None) -> Options:
    d = Options()
    p = argparse.ArgumentParser(prog="python -m bench.backpressure", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=d.items, help="items pushed (1,000,000)")
    p.add_argument("--duration", type=float, default=d.duration_s,
                   help="seconds sampled after the push (60)")
    p.add_argument("--interval", type=float, default=d.interval_s, help="sampling period (1)")
    p.add_argument("--high", type=int, default=d.high, help="SENDSCRIPT_HIGH_WATER (5000)")
    p.add_argument("--low", type=int, default=d.low, help="SENDSCRIPT_LOW_WATER (1000)")
    p.add_argument("--intake-batch", type=int, default=d.intake_batch,
                   help="SENDSCRIPT_INTAKE_BATCH (200)")
    p.add_argument("--devices", type=int, default=d.devices, help="devices (1000)")
    p.add_argument("--run-ms", type=float, default=d.run_ms, help="device run time (200)")
    p.add_argument("--workers", type=int, default=d.workers, help="worker processes (2)")
    p.add_argument("--push-chunk", type=int, default=d.push_chunk,
                   help="items per LPUSH (10000)")
    p.add_argument("--pipeline", type=int, default=d.pipeline_commands,
                   help="LPUSH commands per pipeline (10)")
    p.add_argument("--flat-mib", type=float, default=d.flat_mib,
                   help="largest RSS growth at high water that counts as flat (16)")
    p.add_argument("--keep", action="store_true", help="keep data and logs")
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
    a = p.parse_args(argv)
    return Options(items=a.items, duration_s=a.duration, interval_s=a.interval, high=a.high,
                   low=a.low, intake_batch=a.intake_batch, devices=a.devices,
                   run_ms=a.run_ms, workers=a.workers, push_chunk=a.push_chunk,
                   pipeline_commands=a.pipeline, flat_mib=a.flat_mib, keep=a.keep,
                   json=a.json)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    result = run(opts)
    render(result)
    if opts.json:
        print(json.dumps(asdict(result), default=str))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
