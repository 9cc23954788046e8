"""Adaptive limits: how an adaptive global limit follows a farm's hidden capacity.

    python -m bench.adaptive                       # 40/s -> 20/s -> 60/s, 1 and 2 masters
    python -m bench.adaptive --capacities 30,60 --phase 30 --masters 2 --json

Per masters count (`--masters`, default `1,2`): one fresh `LocalStack` (embedded
Redis, SecantusDB and pulsar-lite in a temporary directory, the simulated farm,
the consumer and a master) plus the other masters on the same servers, every one
with SENDSCRIPT_RATE_LIMITS=`global=START/1s~2..CEIL`. The farm has a hidden
capacity (`simulate --capacity`, changed live through its `/config` every
`--phase` seconds): above it, a 429 with `Retry-After`. Raw task specs are kept
outstanding (pushed onto the ready list whenever fewer than 300 wait for the farm
to accept them) over `--devices` devices, so that the limit, not the tasks, is what
holds sends back. The limit's shared value is read from Redis four times a second;
the farm's accept and 429 times from its `/runs` and `/throttled`.

Per phase: the capacity; the limit's settled value (the mean of its samples over
the phase's last `--tail` share) and its error against the capacity; the time to
settle (from the change until the limit stays within `--tolerance` of the capacity
for the rest of the phase); the share of 429s among the farm's answers over that
same last part. After the last phase the capacity is lifted, feeding stops, and
every pushed spec is waited for and read back from Mongo by its `script.args.n`
(sendscript/dev/tally.py).

Exit 1 when a phase misses a target (error within `--tolerance`, 10 %; settled
within `--settle`, 30 s; 429 share under `--max-429`, 2 %), a task did not succeed,
or the tally is not clean.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
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
from sendscript.dev.processes import RoleProcess
from sendscript.dev.stack import LocalStack
from sendscript.settings import Settings
from sendscript.store import TASKS

SCRIPT = "bench-adaptive"
# Tasks pushed and not yet accepted by the farm are kept at about this many: enough
# that the limit always holds some back, few enough to drain once the phases end.
BACKLOG, FEED_CHUNK = 300, 100
console = Console(stderr=True)


@dataclass
class Options:
    capacities: list[float] = field(default_factory=lambda: [40.0, 20.0, 60.0])
    phase_s: float = 45.0
    tail: float = 0.35  # the phase's last part: settled value, 429 share
    start: int = 30
    floor: int = 2
    ceil: int = 100
    masters: list[int] = field(default_factory=lambda: [1, 2])
    devices: int = 400
    workers: int = 2
    run_ms: float = 20.0
    sample_s: float = 0.25
    tolerance: float = 0.10
    settle_s: float = 30.0
    max_429: float = 0.02
    timeout_s: float = 300.0
    keep: bool = False
    json: bool = False


@dataclass
class Phase:
    capacity: float
    settled: float  # the limit's mean over the phase's last part
    error_pct: float
    settle_s: float | None  # None: never settled within the tolerance
    share_429: float  # of the farm's answers over the phase's last part
    answers: int  # the farm's answers over that part (accepted and 429)
    sends_per_s: float  # accepted over that part
    ok: bool


@dataclass
class Run:
    masters: int
    rule: str
    phases: list[Phase]
    tasks: int
    statuses: dict[str, int]
    tally: dict[str, Any]
    read_back: str
    attempts_above_1: int
    throttled: int  # 429s in all
    ok: bool
    notes: list[str] = field(default_factory=list)
    # (seconds from the first phase's start, the limit's value, why it last moved)
    samples: list[tuple[float, float, str]] = field(default_factory=list)


def run_all(opts: Options) -> list[Run]:
    return [run(opts, n) for n in opts.masters]


def run(opts: Options, masters: int) -> Run:
    ids = [f"bench-adaptive-{chr(ord('a') + i)}" for i in range(masters)]
    rule = f"global={opts.start}/1s~{opts.floor}..{opts.ceil}"
    base = Settings(redis_url=None, mongo_url=None, pulsar_url=None, central_url=None,
                    workers=opts.workers, master_id=ids[0], key_prefix="benchada")
    data_dir = Path(tempfile.mkdtemp(prefix="sendscript-bench-adaptive-"))
    stack = LocalStack(
        base, workers=opts.workers, data_dir=data_dir,
        sim_args=["--run-ms", str(opts.run_ms), "--jitter", "0", "--no-progress",
                  "--capacity", f"{opts.capacities[0]:g}"],
        extra_env={"SENDSCRIPT_LOG_LEVEL": "WARNING", "SENDSCRIPT_RATE_LIMITS": rule},
    )
    others: list[RoleProcess] = []
    ok = False
    console.print(f"{masters} master(s), {rule}: starting under {data_dir} ...")
    try:
        stack.start(log_dir=data_dir / "logs")
        settings = stack.effective
        others = stack.start_masters(ids[1:], data_dir / "logs")
        result = _measure(stack, settings, opts, masters, rule)
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


def _measure(stack: LocalStack, settings: Settings, opts: Options, masters: int,
             rule: str) -> Run:
    client = redis.Redis.from_url(settings.redis_url or "", socket_timeout=10)
    mongo: MongoClient[Any] = MongoClient(settings.mongo_url, tz_aware=True)
    db = mongo.get_default_database(connect.DEFAULT_DB)
    farm = httpx.Client(base_url=stack.central_url or "", timeout=30)
    notes: list[str] = []
    pushed = 0
    samples: list[tuple[float, float]] = []  # (time, the limit's shared value)
    whys: list[str] = []  # why it last moved, at each sample
    starts: list[float] = []  # each phase's start
    try:
        for capacity in opts.capacities:
            farm.post("/config", json={"capacity": capacity}).raise_for_status()
            starts.append(time.time())
            console.print(f"  capacity {capacity:g}/s for {opts.phase_s:g} s")
            end = starts[-1] + opts.phase_s
            while (now := time.time()) < end:
                while pushed - int(farm.get("/stats").json()["accepted"]) < BACKLOG:
                    specs = [json.dumps({"device_id": f"ad-{n % opts.devices:05d}",
                                         "script": {"id": SCRIPT, "args": {"n": n}}})
                             for n in range(pushed, pushed + FEED_CHUNK)]
                    client.lpush(settings.keys.ready, *specs)
                    pushed += FEED_CHUNK
                cur, why = client.hmget(settings.keys.rate_limit("global"), "cur", "why")
                samples.append((now, float(cur) if cur else float(opts.start)))
                whys.append(why.decode() if why else "")
                time.sleep(max(0.0, opts.sample_s - (time.time() - now)))
        starts.append(time.time())
        farm.post("/config", json={"capacity": None}).raise_for_status()
        console.print(f"  capacity lifted; waiting for the {pushed} tasks pushed")
        if why := tally.wait_terminal(db, {"script.id": SCRIPT}, pushed, opts.timeout_s,
                                      dead=stack.dead_roles):
            notes.append(f"read-back: {why}")
        counted = tally.by_key(db, range(pushed), {"script.id": SCRIPT}, "script.args.n")
        accepted = [r["started"] for r in farm.get("/runs").json()]
        throttled = [t["at"] for t in farm.get("/throttled").json()]
        attempts_above_1 = db[TASKS].count_documents({"script.id": SCRIPT,
                                                      "attempt": {"$gt": 1}})
    finally:
        farm.close()
        client.close()
        mongo.close()

    phases = [phase(opts, cap, samples, accepted, throttled, s, e)
              for cap, s, e in zip(opts.capacities, starts, starts[1:], strict=False)]
    success = counted.statuses.get("success", 0)
    ok = all(p.ok for p in phases) and counted.ok and success == pushed
    t0 = starts[0]
    trace = [(round(t - t0, 2), v, w) for (t, v), w in zip(samples, whys, strict=True)]
    return Run(masters, rule, phases, pushed, counted.statuses, counted.as_dict(),
               counted.line(), attempts_above_1, len(throttled), ok, notes, trace)


def phase(opts: Options, capacity: float, samples: list[tuple[float, float]],
          accepted: list[float], throttled: list[float], start: float, end: float) -> Phase:
    """One phase's figures from the limit's samples and the farm's answers. Pure."""
    tail_from = end - opts.tail * (end - start)
    tail = [v for t, v in samples if tail_from <= t < end]
    settled = sum(tail) / len(tail) if tail else 0.0
    error = (settled - capacity) / capacity * 100
    band = opts.tolerance * capacity
    inside = [(t, abs(v - capacity) <= band) for t, v in samples if start <= t < end]
    settle_s: float | None = None
    for t, good in reversed(inside):  # the start of the last run of samples in the band
        if not good:
            break
        settle_s = t - start
    ok_n = sum(1 for t in accepted if tail_from <= t < end)
    no_n = sum(1 for t in throttled if tail_from <= t < end)
    share = no_n / (ok_n + no_n) if ok_n + no_n else 0.0
    ok = (abs(error) <= opts.tolerance * 100 and settle_s is not None
          and settle_s <= opts.settle_s and share < opts.max_429)
    return Phase(capacity, settled, error, settle_s, share, ok_n + no_n,
                 ok_n / max(1e-9, end - tail_from), ok)


def render(runs: list[Run], opts: Options, out: Console | None = None) -> None:
    out = out or Console()
    t = Table(title=f"adaptive global limit vs a hidden capacity ({opts.phase_s:g} s phases; "
                    f"settled: mean of the last {opts.tail:.0%})")
    for col in ("masters", "capacity/s", "settled", "error", "settle time", "429 share",
                "sends/s", "ok"):
        t.add_column(col, justify="right")
    for r in runs:
        for p in r.phases:
            t.add_row(str(r.masters), f"{p.capacity:g}", f"{p.settled:.1f}",
                      f"{p.error_pct:+.1f} %",
                      "never" if p.settle_s is None else f"{p.settle_s:.1f} s",
                      f"{p.share_429:.2%}", f"{p.sends_per_s:.1f}",
                      "yes" if p.ok else "[red]no[/red]")
    out.print(t)
    out.print(f"targets: error within ±{opts.tolerance:.0%}, settled within "
              f"{opts.settle_s:g} s, 429 share under {opts.max_429:.0%}")
    for r in runs:
        out.print(f"{r.masters} master(s), {r.rule}: {r.throttled} 429s in all, "
                  f"attempts above 1: {r.attempts_above_1}", markup=False, highlight=False)
        out.print(r.read_back, markup=False, highlight=False, soft_wrap=True)
        for note in r.notes:
            out.print(f"note: {note}", markup=False, highlight=False)
    out.print("ok" if all(r.ok for r in runs) else "[red]targets missed[/red]")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench.adaptive",
                                description=__doc__.split("\n")[0])
    d = Options()
    p.add_argument("--capacities", type=_floats, default=d.capacities,
                   help="the farm's capacity per phase, per second (e.g. 40,20,60)")
    p.add_argument("--phase", dest="phase_s", type=float, default=d.phase_s)
    p.add_argument("--tail", type=float, default=d.tail)
    p.add_argument("--start", type=int, default=d.start)
    p.add_argument("--floor", type=int, default=d.floor)
    p.add_argument("--ceil", type=int, default=d.ceil)
    p.add_argument("--masters", type=lambda s: [int(x) for x in s.split(",")],
                   default=d.masters, help="masters counts to run, e.g. 1,2")
    p.add_argument("--devices", type=int, default=d.devices)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--run-ms", dest="run_ms", type=float, default=d.run_ms)
    p.add_argument("--tolerance", type=float, default=d.tolerance)
    p.add_argument("--settle", dest="settle_s", type=float, default=d.settle_s)
    p.add_argument("--max-429", dest="max_429", type=float, default=d.max_429)
    p.add_argument("--timeout", dest="timeout_s", type=float, default=d.timeout_s)
    p.add_argument("--keep", action="store_true", help="keep data and logs")
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
    return Options(**vars(p.parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if not opts.capacities or min(opts.masters) < 1 or not 0 < opts.tail <= 1:
        raise SystemExit("--capacities must name a phase, --masters be at least 1, "
                         "--tail within (0, 1]")
    runs = run_all(opts)
    render(runs, opts)
    if opts.json:
        print(json.dumps([asdict(r) for r in runs]))
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
