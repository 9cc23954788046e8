"""The `sendscript` command line (Typer)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from sendscript.settings import Settings

app = typer.Typer(help="Dispatch scripts to the phones of a device farm.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
task_app = typer.Typer(help="Look at tasks.", no_args_is_help=True)
app.add_typer(task_app, name="task")
console = Console()


def _settings() -> Settings:
    return Settings()


@app.command()
def master() -> None:
    """Run the master: intake, per-device dispatch, worker pool."""
    from master.app import run

    raise typer.Exit(run(_settings()))


@app.command()
def consumer() -> None:
    """Run the Pulsar task-log consumer."""
    from consumers.task_log import run

    raise typer.Exit(run(_settings()))


@app.command()
def simulate(
    host: str = "127.0.0.1",
    port: int = 8700,
    run_ms: Annotated[float, typer.Option(help="How long a script runs on a device.")] = 200.0,
    jitter: Annotated[float, typer.Option(help="Run time spread, as a fraction.")] = 0.5,
    fail_rate: Annotated[float, typer.Option(help="Share of runs ending in ERROR.")] = 0.0,
    system_error_rate: Annotated[float, typer.Option(help="Share ending in SYSTEM_ERROR.")] = 0.0,
    http_error_rate: Annotated[float, typer.Option(help="Share of sends answered 503.")] = 0.0,
    silent_rate: Annotated[float, typer.Option(help="Share of runs never reported.")] = 0.0,
    duplicate_rate: Annotated[float, typer.Option(help="Share of results sent twice.")] = 0.0,
    accept_delay_ms: Annotated[float, typer.Option(help="Answer sends this late.")] = 0.0,
    progress: Annotated[bool, typer.Option(help="Report PROGRESS halfway through.")] = True,
    seed: int | None = None,
) -> None:
    """Run a simulated farm: the central-control API plus devices reporting to Pulsar."""
    import asyncio

    from sendscript import log
    from sendscript.simulator import FarmConfig, Simulator

    settings = _settings()
    settings.require("pulsar_url")
    log.configure("simulator", level=settings.log_level, json=settings.log_json)
    config = FarmConfig(
        run_ms=run_ms, jitter=jitter, fail_rate=fail_rate, system_error_rate=system_error_rate,
        http_error_rate=http_error_rate, silent_rate=silent_rate, duplicate_rate=duplicate_rate,
        accept_delay_ms=accept_delay_ms, progress=progress,
    )
    sim = Simulator(settings.pulsar_url or "", settings.task_log_topic, config, seed=seed)
    asyncio.run(sim.serve(host, port))


@app.command()
def up(
    workers: Annotated[int | None, typer.Option(help="Worker processes.")] = None,
    run_ms: Annotated[float, typer.Option(help="Simulated script run time.")] = 200.0,
) -> None:
    """Everything on one host: embedded servers where no URL is set, master, consumer,
    and the simulated farm where no central-control URL is set. Ctrl-C stops it all."""
    from sendscript.stack import LocalStack

    settings = _settings()
    stack = LocalStack(settings, workers=workers, sim_args=["--run-ms", str(run_ms)])
    stopping = False

    def _stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    stack.start(log_dir=None)
    console.print(f"[green]sendscript up[/green]: {stack.describe()}")
    console.print("Ctrl-C stops everything.")
    try:
        while not stopping:
            if dead := stack.dead_roles():
                console.print(f"[red]{', '.join(dead)} exited; stopping[/red]")
                break
            time.sleep(0.5)
    finally:
        stack.stop()
    console.print("stopped")


@app.command()
def submit(
    device_id: Annotated[str | None, typer.Argument(help="Target device.")] = None,
    script: Annotated[str, typer.Option(help="Script as JSON.")] = '{"id": "demo", "args": {}}',
    priority: int = 5,
    run_at: Annotated[str | None, typer.Option(help="ISO-8601 or epoch seconds.")] = None,
    dedupe_key: str | None = None,
    max_retries: int = 3,
    timeout_s: float = 300.0,
    queue: str = "default",
    count: Annotated[int, typer.Option(help="Submit this many tasks...")] = 1,
    devices: Annotated[int, typer.Option(help="...spread over this many devices.")] = 1,
    device_prefix: str = "device-",
) -> None:
    """Submit one task, or --count N spread over --devices K."""
    from sendscript.client import SendScriptClient

    try:
        script_obj = json.loads(script)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"--script is not JSON: {exc}") from None
    if device_id is None and count == 1 and devices == 1:
        raise typer.BadParameter("name a device, or use --count and --devices")
    specs = []
    for i in range(count):
        target = device_id if device_id and devices == 1 else f"{device_prefix}{i % devices}"
        specs.append({
            "device_id": target, "script": script_obj, "priority": priority, "run_at": run_at,
            "dedupe_key": dedupe_key if count == 1 else None, "max_retries": max_retries,
            "timeout_s": timeout_s, "queue": queue,
        })
    with SendScriptClient(_settings()) as client:
        submitted = client.submit_many(specs)
    if len(submitted) == 1:
        s = submitted[0]
        console.print(f"{s.task_id} {s.status}" + ("" if s.created else " (existing task)"))
    else:
        console.print(f"submitted {len(submitted)} tasks over {devices} device(s)")


@task_app.command("info")
def task_info(task_id: str) -> None:
    """A task, its exec records and its logs."""
    from sendscript.client import SendScriptClient

    with SendScriptClient(_settings()) as client:
        task = client.get(task_id)
        if task is None:
            console.print(f"[red]no task {task_id}[/red]")
            raise typer.Exit(1)
        console.print_json(task.model_dump_json(by_alias=True))
        records = client.records(task_id)
    table = Table("attempt", "record", "worker", "lock", "status", "started", "sent", "finished",
                  "error", title="exec records")
    for r in records:
        table.add_row(str(r["attempt"]), r["_id"], r.get("worker", ""), str(r.get("lock_value")),
                      r.get("status", ""), _t(r.get("started_at")), _t(r.get("sent_at")),
                      _t(r.get("finished_at")), r.get("error") or "")
    console.print(table)


@task_app.command("list")
def task_list(
    status: Annotated[str | None, typer.Option(help="Only tasks in this status.")] = None,
    limit: int = 50,
) -> None:
    """The newest tasks, optionally of one status."""
    from sendscript.client import SendScriptClient

    with SendScriptClient(_settings()) as client:
        tasks = client.list(status, limit)
    table = Table("task", "device", "status", "prio", "attempt", "created", "finished", "error")
    for t in tasks:
        table.add_row(t.id, t.device_id, str(t.status), str(t.priority), str(t.attempt),
                      _t(t.created_at), _t(t.finished_at), (t.last_error or "")[:60])
    console.print(table)


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Queue length, tasks by status, locks held, masters and workers alive, consumers."""
    from sendscript.report import gather

    info = gather(_settings())
    if as_json:
        console.print_json(json.dumps(info, default=str))
        return
    console.print(f"ready queue: {info['queue_ready']}   quarantine: {info['queue_quarantine']}"
                  f"   device locks held: {info['locks_held']}"
                  f"   workers alive: {info['workers_alive']}")
    tasks = Table("status", "tasks", title="tasks")
    for name, n in sorted(info["tasks"].items()):
        tasks.add_row(name, str(n))
    console.print(tasks)
    masters = Table("master", "alive", "workers", "queued", "held devices", "in flight",
                    "updated", title="masters")
    for m in info["masters"]:
        masters.add_row(m["master_id"], "yes" if m["alive"] else "[red]no[/red]",
                        f"{m.get('workers_alive', 0)}/{m.get('workers', 0)}", str(m.get("queued")),
                        str(m.get("held_devices")), str(m.get("inflight")), m.get("updated_at", ""))
    console.print(masters)
    consumers = Table("consumer", "alive", "saved", "applied", "dead-lettered", "updated",
                      title="consumers")
    for c in info["consumers"]:
        consumers.add_row(c["name"], "yes" if c["alive"] else "[red]no[/red]", str(c["saved"]),
                          str(c["applied"]), str(c["dead_lettered"]), c["updated_at"])
    console.print(consumers)


@app.command()
def demo(
    tasks: Annotated[int, typer.Option(help="Tasks to submit.")] = 300,
    devices: Annotated[int, typer.Option(help="Simulated devices.")] = 30,
    workers: int = 2,
    run_ms: Annotated[float, typer.Option(help="Simulated script run time.")] = 100.0,
    fail_rate: Annotated[float, typer.Option(help="Share of runs the devices fail.")] = 0.0,
    timeout_s: Annotated[float, typer.Option(help="Give up after this long.")] = 300.0,
    data_dir: Annotated[Path | None, typer.Option(help="Where the embedded servers keep data.")]
    = None,
) -> None:
    """Start everything on embedded servers, run a few hundred tasks, print a summary."""
    from sendscript.demo import run_demo

    settings = _settings()
    code = run_demo(settings, tasks=tasks, devices=devices, workers=workers, run_ms=run_ms,
                    fail_rate=fail_rate, timeout_s=timeout_s,
                    data_dir=data_dir or settings.data_dir / f"demo-{os.getpid()}")
    raise typer.Exit(code)


def _t(value: Any) -> str:
    return value.strftime("%H:%M:%S.%f")[:-3] if value else ""


def main() -> None:
    app()
