"""`sendscript demo`: the whole service on embedded servers, a few hundred tasks, a summary."""

from __future__ import annotations

import shutil
import signal
import socket
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sendscript import connect
from sendscript.client import SendScriptClient
from sendscript.dev.stack import LocalStack
from sendscript.settings import Settings
from sendscript.status import TERMINAL
from sendscript.store import TASKS

console = Console()


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def run_demo(settings: Settings, *, tasks: int, devices: int, workers: int, run_ms: float,
             fail_rate: float, timeout_s: float, data_dir: Path) -> int:
    # A demo never touches configured servers: fresh embedded ones, and the simulated farm.
    local = settings.model_copy(update={
        "redis_url": None, "mongo_url": None, "pulsar_url": None, "central_url": None,
    })
    # The console too, on its port if that is free (another console may hold it).
    port = settings.console_port if port_free(settings.console_port) else 0
    stack = LocalStack(local, workers=workers, data_dir=data_dir,
                       sim_args=["--run-ms", str(run_ms), "--fail-rate", str(fail_rate)],
                       extra_env={"SENDSCRIPT_LOG_LEVEL": "WARNING",
                                  "SENDSCRIPT_CONSOLE_PORT": str(port),
                                  # the demo's throwaway data: no token to make first
                                  "SENDSCRIPT_CONSOLE_OPEN": "true"}, console=True)
    console.print(f"starting embedded Redis, MongoDB (SecantusDB) and Pulsar (pulsar-lite) "
                  f"under {data_dir} ...")
    ok = False
    try:
        stack.start(log_dir=data_dir / "logs")
        console.print(f"[green]up[/green]: {stack.describe()}")
        if stack.console_url:
            console.print(f"console: {stack.console_url} (open while the demo runs)")
        ok = _run(stack, tasks=tasks, devices=devices, timeout_s=timeout_s)
    finally:
        # Once cleaning up, a second Ctrl-C or SIGTERM must not leave servers behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
    if ok:
        shutil.rmtree(data_dir, ignore_errors=True)
    else:
        console.print(f"logs and data kept in {data_dir}")
    return 0 if ok else 1


def _run(stack: LocalStack, *, tasks: int, devices: int, timeout_s: float) -> bool:
    settings = stack.effective
    specs = [{"device_id": f"phone-{i % devices:03d}",
              "script": {"id": "demo-script", "args": {"n": i}}} for i in range(tasks)]
    mongo = connect.mongo_sync(settings)
    col = connect.database(mongo)[TASKS]
    started = time.time()
    with SendScriptClient(settings) as client:
        for start in range(0, len(specs), 100):
            client.submit_many(specs[start:start + 100])
    console.print(f"submitted {tasks} tasks over {devices} devices")
    counts: dict[str, int] = {}
    with Progress(TextColumn("[bold]tasks"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console) as progress:
        bar = progress.add_task("", total=tasks)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            counts = {d["_id"]: d["n"] for d in col.aggregate(
                [{"$group": {"_id": "$status", "n": {"$sum": 1}}}])}
            done = sum(n for s, n in counts.items() if s in TERMINAL)
            progress.update(bar, completed=done,
                            description=" ".join(f"{k}={v}" for k, v in sorted(counts.items())))
            if done >= tasks:
                break
            time.sleep(0.25)
    latencies = [
        (d["finished_at"] - d["created_at"]).total_seconds()
        for d in col.find({"status": "success"}, {"created_at": 1, "finished_at": 1})
    ]
    last = col.find_one({"finished_at": {"$exists": True}}, sort=[("finished_at", -1)])
    mongo.close()
    elapsed = (last["finished_at"].timestamp() - started) if last else time.time() - started
    farm = stack.simulator_stats()
    terminal = sum(n for s, n in counts.items() if s in TERMINAL)
    table = Table(title="sendscript demo", show_header=False)
    table.add_row("tasks", str(tasks))
    table.add_row("success", str(counts.get("success", 0)))
    table.add_row("failed", str(counts.get("failed", 0)))
    table.add_row("not finished", str(tasks - terminal))
    table.add_row("throughput", f"{tasks / elapsed:.1f} tasks/s" if elapsed > 0 else "-")
    table.add_row("submit -> success p50", f"{percentile(latencies, 0.5) * 1000:.0f} ms")
    table.add_row("submit -> success p99", f"{percentile(latencies, 0.99) * 1000:.0f} ms")
    if latencies:
        table.add_row("submit -> success mean", f"{statistics.mean(latencies) * 1000:.0f} ms")
    table.add_row("scripts the farm ran", str(farm["accepted"]))
    table.add_row("overlaps seen by the farm", str(farm["overlaps"]))
    console.print(table)
    ok = terminal == tasks and farm["overlaps"] == 0
    console.print("[green]demo passed[/green]" if ok else "[red]demo failed[/red]")
    return ok
