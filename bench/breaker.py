"""The circuit breaker: how soon a central-control outage opens it, how soon full speed
returns after recovery.

    python -m bench.breaker                       # 503 outage, production breaker settings
    python -m bench.breaker --mode timeout --central-timeout 2 --json
    python -m bench.breaker --env SENDSCRIPT_BREAKER_TRIP_AFTER=50

One fresh `LocalStack` (embedded Redis, SecantusDB and pulsar-lite in a temporary
directory, the simulated farm, the consumer and one master) with the breaker's
settings as configured (production defaults unless `--env` says otherwise). A
producer thread submits `--rate` tasks per second over `--devices` devices (round
robin) for the whole run, each with `--max-retries` so that the outage fails none
for good. Sends are the farm's accepted requests (`/stats`, `accepted`), sampled
every `--sample` seconds.

1. Baseline: after `--warm` seconds, the accepted rate over `--baseline` seconds.
2. Outage: the farm answers every send with 503 (`--mode 503`), or answers after the
   client's read timeout (`--mode timeout`: `--central-timeout` is set on the master
   and the farm waits one second longer). Measured: outage start -> the shared
   breaker (Redis) says open, and -> degraded if it went through it.
3. The outage goes on `--outage` seconds after the breaker opened, then the farm is
   healthy again. Measured: recovery -> the breaker closed again, and -> full speed,
   the first moment the accepted rate over the last `--speed-window` seconds
   reaches `--full` (90 %) of the baseline.

4. The producer stops; once Mongo holds every submitted task terminal (within
   `--timeout`), each is read back by its id (sendscript/dev/tally.py) and the tally printed:
   terminal by status, lost (never stored), unfinished, duplicates.

`run(Options(...))` is the part `bench/protections.py` calls; `render` prints it.
`ok` (exit 0) when the breaker opened and full speed came back, each within
`--timeout`, and the tally is clean.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
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
from sendscript.client import SendScriptClient
from sendscript.dev import tally
from sendscript.dev.stack import LocalStack
from sendscript.settings import Settings

SCRIPT = "bench-breaker"
console = Console(stderr=True)


@dataclass
class Options:
    mode: str = "503"  # or "timeout"
    rate: float = 100.0  # tasks submitted per second
    devices: int = 500
    workers: int = 2
    run_ms: float = 50.0
    max_retries: int = 100
    central_timeout_s: float = 2.0  # the master's read timeout (timeout mode)
    warm_s: float = 5.0
    baseline_s: float = 5.0
    outage_s: float = 5.0  # after the breaker opened
    speed_window_s: float = 1.0
    full: float = 0.9
    sample_s: float = 0.05
    timeout_s: float = 300.0
    env: dict[str, str] = field(default_factory=dict)
    keep: bool = False
    json: bool = False


@dataclass
class Result:
    mode: str
    settings: dict[str, Any]
    baseline_per_s: float
    to_degraded_s: float | None  # outage start -> degraded (None: went straight to open)
    to_open_s: float | None
    failures_before_open: int | None  # farm's refused (503) or late answers until open
    to_closed_s: float | None  # recovery -> closed again
    to_full_speed_s: float | None  # recovery -> accepted rate back at `full` x baseline
    trips: int
    after_recovery_per_s: list[int]  # accepted sends in each whole second after recovery
    tally: dict[str, Any]  # every submitted task read back (sendscript/dev/tally.py)
    read_back: str  # the tally's line
    ok: bool
    notes: list[str] = field(default_factory=list)


class Producer(threading.Thread):
    """Submits `rate` tasks a second until stopped."""

    def __init__(self, settings: Settings, opts: Options) -> None:
        super().__init__(daemon=True)
        self.client = SendScriptClient(settings)
        self.opts = opts
        self.stop_event = threading.Event()
        self.submitted = 0
        self.ids: list[str] = []  # what the SDK stored, read back at the end
        self.error: BaseException | None = None

    def run(self) -> None:
        o = self.opts
        tick = 0.1
        start = time.monotonic()
        try:
            while not self.stop_event.is_set():
                due = int((time.monotonic() - start) * o.rate) - self.submitted
                if due > 0:
                    specs = [{"device_id": f"bd-{(self.submitted + i) % o.devices}",
                              "script": {"id": SCRIPT}, "max_retries": o.max_retries}
                             for i in range(due)]
                    self.ids += [s.task_id for s in self.client.submit_many(specs)]
                    self.submitted += due
                self.stop_event.wait(tick)
        except BaseException as exc:  # reported by the run
            self.error = exc
        finally:
            self.client.close()


class Farm:
    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=10)

    def accepted(self) -> int:
        return int(self.http.get("/stats").json()["accepted"])

    def configure(self, **config: Any) -> None:
        self.http.post("/config", json=config).raise_for_status()

    def stats(self) -> dict[str, Any]:
        return dict(self.http.get("/stats").json())


def circuit(client: redis.Redis, settings: Settings) -> dict[str, Any]:
    raw = client.hget(settings.keys.breaker, "state")
    return json.loads(raw) if raw else {"circuit": "closed", "trips": 0}


def run(opts: Options) -> Result:
    env = {"SENDSCRIPT_LOG_LEVEL": "WARNING", **opts.env}
    if opts.mode == "timeout":
        env.setdefault("SENDSCRIPT_CENTRAL_TIMEOUT_S", str(opts.central_timeout_s))
    base = Settings(redis_url=None, mongo_url=None, pulsar_url=None, central_url=None,
                    workers=opts.workers, key_prefix="benchbrk", heartbeat_interval_s=0.5)
    data_dir = Path(tempfile.mkdtemp(prefix="sendscript-bench-breaker-"))
    stack = LocalStack(base, workers=opts.workers, data_dir=data_dir,
                       sim_args=["--run-ms", str(opts.run_ms), "--jitter", "0", "--no-progress"],
                       extra_env=env)
    console.print(f"starting embedded servers and roles under {data_dir} ...")
    ok = False
    try:
        stack.start(log_dir=data_dir / "logs")
        result = _measure(stack, opts, env)
        ok = result.ok
        return result
    finally:
        stack.stop()
        if ok and not opts.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            console.print(f"logs and data kept in {data_dir}")


def _measure(stack: LocalStack, opts: Options, env: dict[str, str]) -> Result:
    settings = stack.effective
    client = redis.Redis.from_url(settings.redis_url or "", socket_timeout=10)
    farm = Farm(stack.central_url or "")
    producer = Producer(settings, opts)
    samples: list[tuple[float, int]] = []  # (monotonic time, accepted so far)
    notes: list[str] = []

    def sample() -> tuple[float, int]:
        point = (time.monotonic(), farm.accepted())
        samples.append(point)
        return point

    def rate_over(window_s: float) -> float:
        now, last = samples[-1]
        first = next(((t, n) for t, n in reversed(samples) if t <= now - window_s),
                     samples[0])
        span = now - first[0]
        return (last - first[1]) / span if span > 0 else 0.0

    def until(what: str, done: Any) -> float | None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < opts.timeout_s:
            sample()
            if done():
                return time.monotonic()
            time.sleep(opts.sample_s)
        notes.append(f"timed out waiting for {what}")
        return None

    try:
        producer.start()
        time.sleep(opts.warm_s)
        _, before = sample()
        t0 = time.monotonic()
        time.sleep(opts.baseline_s)
        t1, after = sample()
        baseline = (after - before) / (t1 - t0)
        console.print(f"baseline: {baseline:.1f} sends/s")

        http_errors = int(farm.stats()["http_errors"])
        late_before = int(farm.stats()["accepted"])
        outage_at = time.monotonic()
        if opts.mode == "timeout":
            delay_ms = (float(env["SENDSCRIPT_CENTRAL_TIMEOUT_S"]) + 1.0) * 1000
            farm.configure(accept_delay_ms=delay_ms)
        else:
            farm.configure(http_error_rate=1.0, http_error_status=503)
        degraded_at: float | None = None

        def opened() -> bool:
            nonlocal degraded_at
            state = circuit(client, settings)["circuit"]
            if state == "degraded" and degraded_at is None:
                degraded_at = time.monotonic()
            return bool(state == "open")

        open_at = until("the breaker to open", opened)
        stats = farm.stats()
        failures = (int(stats["http_errors"]) - http_errors if opts.mode == "503"
                    else int(stats["accepted"]) - late_before)
        if open_at is not None:
            console.print(f"open {open_at - outage_at:.2f}s after the outage began")
            time.sleep(opts.outage_s)
        farm.configure(http_error_rate=0.0, accept_delay_ms=0.0)
        recovered_at = time.monotonic()
        closed_at: float | None = None

        def full_speed() -> bool:
            nonlocal closed_at
            if closed_at is None and circuit(client, settings)["circuit"] == "closed":
                closed_at = time.monotonic()
            return (samples[-1][0] - recovered_at >= opts.speed_window_s
                    and rate_over(opts.speed_window_s) >= opts.full * baseline)

        full_at = until("full speed", full_speed)
        if closed_at is None:
            closed_at = until("the breaker to close",
                              lambda: circuit(client, settings)["circuit"] == "closed")
        trips = int(circuit(client, settings).get("trips", 0))
    finally:
        producer.stop_event.set()
        producer.join(timeout=30)
        client.close()
    counted = read_back(stack, producer.ids, opts.timeout_s, notes)
    if producer.error is not None:
        notes.append(f"producer failed: {producer.error!r}")
    defaults = Settings()
    shown = {"SENDSCRIPT_BREAKER_TRIP_AFTER": str(defaults.breaker_trip_after),
             "SENDSCRIPT_BREAKER_PAUSES_S": ",".join(f"{p:g}" for p in defaults.breaker_pauses_s),
             **{k: v for k, v in env.items() if k.startswith("SENDSCRIPT_BREAKER")
                or k == "SENDSCRIPT_CENTRAL_TIMEOUT_S"}}

    def since(start: float, at: float | None) -> float | None:
        return round(at - start, 3) if at is not None else None

    return Result(
        mode=opts.mode, settings=shown, baseline_per_s=round(baseline, 1),
        to_degraded_s=since(outage_at, degraded_at), to_open_s=since(outage_at, open_at),
        failures_before_open=failures if open_at is not None else None,
        to_closed_s=since(recovered_at, closed_at),
        to_full_speed_s=since(recovered_at, full_at), trips=trips,
        after_recovery_per_s=_per_second(samples, recovered_at),
        tally=counted.as_dict(), read_back=counted.line(),
        ok=open_at is not None and full_at is not None and producer.error is None
        and counted.ok,
        notes=notes)


def read_back(stack: LocalStack, ids: list[str], timeout_s: float,
              notes: list[str]) -> tally.Tally:
    """Every task the producer submitted, from Mongo, once all are terminal (or the
    wait ends: the tally then says which are not)."""
    settings = stack.effective
    console.print(f"waiting for the {len(ids)} submitted task(s) to be terminal ...")
    with MongoClient(settings.mongo_url, socketTimeoutMS=60_000) as mongo:
        db = mongo.get_default_database(connect.DEFAULT_DB)
        if why := tally.wait_terminal(db, {"script.id": SCRIPT}, len(ids), timeout_s,
                                      dead=stack.dead_roles):
            notes.append(f"read-back: {why}")
        return tally.by_ids(db, ids)


def _per_second(samples: list[tuple[float, int]], start: float) -> list[int]:
    """Accepted sends in each whole second after `start`, from the samples."""
    at = [(t, n) for t, n in samples if t >= start]
    counts: list[int] = []
    while at and at[0][0] + len(counts) + 1 <= at[-1][0]:
        edge = at[0][0] + len(counts)
        before = next(n for t, n in reversed(at) if t <= edge)
        after = next(n for t, n in reversed(at) if t <= edge + 1)
        counts.append(after - before)
    return counts


def render(r: Result, out: Console | None = None) -> None:
    out = out or Console()
    t = Table(title=f"circuit breaker, {r.mode} outage", show_header=False)
    t.add_row("settings", ", ".join(f"{k}={v}" for k, v in r.settings.items()))
    t.add_row("baseline sends/s", f"{r.baseline_per_s}")
    t.add_row("outage -> degraded", _s(r.to_degraded_s))
    t.add_row("outage -> open", _s(r.to_open_s))
    t.add_row("failed sends before open", str(r.failures_before_open))
    t.add_row("recovery -> closed", _s(r.to_closed_s))
    t.add_row("recovery -> full speed", _s(r.to_full_speed_s))
    t.add_row("trips", str(r.trips))
    t.add_row("sends/s after recovery", " ".join(map(str, r.after_recovery_per_s[:40])))
    t.add_row("ok", "yes" if r.ok else "[red]no[/red]")
    for note in r.notes:
        t.add_row("note", note)
    out.print(t)
    out.print(r.read_back, markup=False, highlight=False, soft_wrap=True)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench.breaker",
                                description=(__doc__ or "").split("\n")[0])
    d = Options()
    p.add_argument("--mode", choices=("503", "timeout"), default=d.mode)
    p.add_argument("--rate", type=float, default=d.rate, help="tasks submitted per second")
    p.add_argument("--devices", type=int, default=d.devices)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--run-ms", dest="run_ms", type=float, default=d.run_ms)
    p.add_argument("--central-timeout", dest="central_timeout_s", type=float,
                   default=d.central_timeout_s)
    p.add_argument("--warm", dest="warm_s", type=float, default=d.warm_s)
    p.add_argument("--baseline", dest="baseline_s", type=float, default=d.baseline_s)
    p.add_argument("--outage", dest="outage_s", type=float, default=d.outage_s)
    p.add_argument("--speed-window", dest="speed_window_s", type=float,
                   default=d.speed_window_s)
    p.add_argument("--full", type=float, default=d.full)
    p.add_argument("--timeout", dest="timeout_s", type=float, default=d.timeout_s)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting for the roles, e.g. SENDSCRIPT_BREAKER_TRIP_AFTER=50")
    p.add_argument("--keep", action="store_true", help="keep data and logs")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    return Options(mode=args.mode, rate=args.rate, devices=args.devices, workers=args.workers,
                   run_ms=args.run_ms, central_timeout_s=args.central_timeout_s,
                   warm_s=args.warm_s, baseline_s=args.baseline_s, outage_s=args.outage_s,
                   speed_window_s=args.speed_window_s, full=args.full,
                   timeout_s=args.timeout_s, env=env, keep=args.keep, json=args.json)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    result = run(opts)
    render(result)
    if opts.json:
        print(json.dumps(asdict(result)))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
