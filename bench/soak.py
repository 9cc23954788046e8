"""A long run: does throughput or memory drift as tasks go through?

    python -m bench.soak --tasks 200000 --devices 200 --window 10000

Starts the embedded stack (servers, simulated farm answering at once, consumer,
master with its workers) and feeds raw task specs into the ready list, keeping
at most `--outstanding` submitted but unfinished (the master's backpressure
would hold the rest anyway). Progress is read from Redis (bench.throughput's
finished_so_far), never from Mongo. After every `--window` finished tasks it
prints the window's tasks/s, the RSS of the master, each worker and the
consumer, and the CPU ms per task of each process group (sendscript's own
processes, the Mongo, Redis and Pulsar servers, the farm) in that window.

Verdict: throughput and memory are flat when the last window's tasks/s is
within 10 % of the first's and no role's RSS grew by more than 10 % from the
first window to the last. At the end every submitted spec is read back from Mongo
(sendscript/dev/tally.py, by its `script.args.n`) and the tally printed: terminal by
status, lost (never stored), unfinished, duplicates. Exits 1 when the run is not
flat, or when any task is lost, unfinished or stored twice.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import redis
from pymongo import MongoClient
from rich.console import Console

from bench.cpu import CpuMeter, tree_rss_mb
from bench.throughput import BENCH_SCRIPT, finished_so_far, process_groups
from sendscript.dev import tally
from sendscript.dev.stack import LocalStack
from sendscript.settings import Settings
from sendscript.store import TASKS

console = Console(stderr=True)
TOLERANCE = 0.10
# Redis counters undercount a result whose apply timed out on the client but reached
# the store (the redelivery finds it applied). Past this long without progress once
# everything is submitted, Mongo is asked whether any task is still open; if none is,
# the run ends and the read-back tally says what became of every task.
STALL_CHECK_S = 30.0
TERMINAL = sorted(tally.TERMINAL_NAMES)


def mongo_client(settings: Settings) -> MongoClient[dict[str, Any]]:
    return MongoClient(settings.mongo_url, retryWrites=False, socketTimeoutMS=300_000)


def still_open(settings: Settings) -> int:
    with mongo_client(settings) as mongo:
        return mongo.get_default_database("sendscript")[TASKS].count_documents(
            {"status": {"$nin": TERMINAL}})


def read_back(settings: Settings, submitted: int) -> tally.Tally:
    """Every spec this soak pushed (`script.args.n` 0 .. submitted-1), from Mongo."""
    with mongo_client(settings) as mongo:
        return tally.by_key(mongo.get_default_database("sendscript"), range(submitted),
                            {"script.id": BENCH_SCRIPT}, "script.args.n")


@dataclass
class Window:
    done: int
    elapsed_s: float
    tasks_per_s: float
    rss_mb: dict[str, float]
    cpu_ms_per_task: dict[str, float]


def role_rss(stack: LocalStack) -> dict[str, float]:
    """RSS of the master, each of its worker processes, and the consumer."""
    out = {"master": tree_rss_mb(stack.roles["master"].pid),
           "consumer": tree_rss_mb(stack.roles["consumer"].pid)}
    try:
        children = psutil.Process(stack.roles["master"].pid).children()
    except psutil.Error:
        children = []
    workers = sorted((c for c in children if "resource_tracker" not in " ".join(c.cmdline())),
                     key=lambda c: c.pid)
    for i, child in enumerate(workers):
        out[f"worker{i}"] = tree_rss_mb(child.pid)
    return out


def run(opts: argparse.Namespace) -> tuple[list[Window], tally.Tally]:
    base = Settings(redis_url=None, mongo_url=None, pulsar_url=None, central_url=None,
                    workers=opts.workers, heartbeat_interval_s=1.0)
    data_dir = Path(tempfile.mkdtemp(prefix="sendscript-soak-"))
    stack = LocalStack(base, workers=opts.workers, data_dir=data_dir,
                       sim_args=["--run-ms", "0"],
                       extra_env={"SENDSCRIPT_LOG_LEVEL": "WARNING",
                                  "SENDSCRIPT_HEARTBEAT_INTERVAL_S": "1"})
    windows: list[Window] = []
    ok = False
    try:
        stack.start(log_dir=data_dir / "logs")
        settings = stack.effective
        client = redis.Redis.from_url(settings.redis_url or "")
        keys = settings.keys
        start = finished_so_far(client, keys)
        submitted = 0
        meter = CpuMeter(process_groups(stack))
        meter.start()
        t_window, done_window = time.monotonic(), 0
        deadline = time.monotonic() + opts.timeout
        seen, moved_at = -1, time.monotonic()
        settled = False
        while True:
            done = finished_so_far(client, keys) - start
            if done != seen:
                seen, moved_at = done, time.monotonic()
            elif submitted >= opts.tasks and time.monotonic() - moved_at > STALL_CHECK_S:
                if still_open(settings) == 0:
                    console.print(f"the counters stalled at {done} of {opts.tasks} and Mongo "
                                  "holds no open task: the read-back decides")
                    settled = True
                moved_at = time.monotonic()
            while submitted < opts.tasks and submitted - done < opts.outstanding:
                n = min(1000, opts.tasks - submitted)
                client.lpush(keys.ready, *[json.dumps({
                    "device_id": f"phone-{i % opts.devices:05d}",
                    "script": {"id": BENCH_SCRIPT, "args": {"n": i}}})
                    for i in range(submitted, submitted + n)])
                submitted += n
            if done - done_window >= opts.window or done >= opts.tasks or settled:
                now = time.monotonic()
                cpu = meter.stop()
                meter.start()
                n = done - done_window
                w = Window(done, now - t_window, n / (now - t_window), role_rss(stack),
                           {k: v * 1000 / max(1, n) for k, v in cpu.items()})
                if n > 0:  # a stall right after a window adds an empty one otherwise
                    windows.append(w)
                    print_window(w)
                t_window, done_window = now, done
                if done >= opts.tasks or settled:
                    break
            if dead := stack.dead_roles():
                raise RuntimeError(f"role(s) exited during the soak: {dead}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{done} of {opts.tasks} finished at the timeout")
            time.sleep(0.25)
        client.close()
        counted = read_back(settings, submitted)
        ok = counted.ok
        return windows, counted
    finally:
        stack.stop()
        if ok and not opts.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            console.print(f"data and logs kept in {data_dir}")


def print_window(w: Window) -> None:
    rss = " ".join(f"{k}={v:.0f}" for k, v in w.rss_mb.items())
    cpu = " ".join(f"{k}={v:.2f}" for k, v in w.cpu_ms_per_task.items())
    print(f"{w.done:>8} done  {w.tasks_per_s:7.1f} tasks/s  RSS MB {rss}  CPU ms/task {cpu}",
          flush=True)


def verdict(windows: list[Window]) -> tuple[bool, list[str]]:
    if len(windows) < 2:
        return True, ["fewer than two windows: nothing to compare"]
    first, last = windows[0], windows[-1]
    notes = [f"tasks/s first {first.tasks_per_s:.1f}, last {last.tasks_per_s:.1f} "
             f"({last.tasks_per_s / first.tasks_per_s - 1:+.1%})"]
    flat = last.tasks_per_s >= first.tasks_per_s * (1 - TOLERANCE)
    for role, mb in first.rss_mb.items():
        end = last.rss_mb.get(role)
        if end is None or mb <= 0:
            continue
        notes.append(f"{role} RSS {mb:.0f} -> {end:.0f} MB ({end / mb - 1:+.1%})")
        flat = flat and end <= mb * (1 + TOLERANCE)
    return flat, notes


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=200_000)
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--window", type=int, default=10_000, help="tasks per reported window")
    p.add_argument("--outstanding", type=int, default=5_000,
                   help="most tasks submitted and not finished (default 5000)")
    p.add_argument("--timeout", type=float, default=4 * 3600.0)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", action="store_true")
    opts = p.parse_args(argv)
    # A background run ignores SIGINT: SIGTERM ends it through run's finally block,
    # which stops the stack it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    windows, counted = run(opts)
    flat, notes = verdict(windows)
    for note in notes:
        print(note)
    print("flat" if flat else "NOT flat (beyond 10 %)")
    print(counted.line())
    if opts.json:
        print(json.dumps({"windows": [asdict(w) for w in windows],
                          "tally": counted.as_dict()}))
    return 0 if flat and counted.ok else 1


if __name__ == "__main__":
    sys.exit(main())
