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
from rich.markup import escape
from rich.table import Column, Table

from sendscript.models import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_PRIORITY,
    DEFAULT_QUEUE,
    DEFAULT_TIMEOUT_S,
)
from sendscript.settings import Settings, settings_errors

app = typer.Typer(help="Dispatch scripts to the phones of a device farm.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
task_app = typer.Typer(help="Look at and cancel tasks.", no_args_is_help=True)
schedule_app = typer.Typer(help="Recurring scripts: cron or interval.", no_args_is_help=True)
group_app = typer.Typer(help="Device groups, targets of fan-outs and schedules.",
                        no_args_is_help=True)
batch_app = typer.Typer(help="Fan-out batches.", no_args_is_help=True)
app.add_typer(task_app, name="task")
app.add_typer(schedule_app, name="schedule")
app.add_typer(group_app, name="group")
app.add_typer(batch_app, name="batch")
console = Console()
QUEUE_FULL_EXIT = 75  # EX_TEMPFAIL: `submit` refused at SENDSCRIPT_READY_MAX, try later


def _settings() -> Settings:
    """The settings, or exit 2 with one line per setting that cannot be used."""
    from pydantic import ValidationError

    try:
        return Settings()
    except ValidationError as exc:
        for line in settings_errors(exc):
            typer.echo(f"sendscript: {line}", err=True)
        raise typer.Exit(2) from None


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
def agents() -> None:
    """Run the pull-mode agents API (SENDSCRIPT_AGENTS_HOST / _PORT)."""
    from agents.app import run

    raise typer.Exit(run(_settings()))


@app.command("console")
def console_role() -> None:
    """Run the console: pages, JSON API (/openapi.json) and live views, on
    SENDSCRIPT_CONSOLE_HOST:PORT (127.0.0.1:8600)."""
    from console.app import run

    raise typer.Exit(run(_settings()))


token_app = typer.Typer(help="The console's API tokens (viewer or operator).",
                        no_args_is_help=True)
app.add_typer(token_app, name="token")


def _token_db() -> Any:
    from sendscript import connect

    settings = _settings()
    return connect.mongo_sync(settings)


@token_app.command("add")
def token_add(name: str, role: str = typer.Option("viewer", help="viewer or operator")) -> None:
    """Create a token; it is shown once (Mongo keeps only its hash)."""
    from console import auth
    from sendscript import connect

    mongo = _token_db()
    try:
        token = auth.add_token(connect.database(mongo), name, role)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    finally:
        mongo.close()
    console.print(f"{role} token {name} (shown once; keep it):")
    print(token)


@token_app.command("list")
def token_list() -> None:
    """The tokens by name and role (never their text)."""
    from console import auth
    from sendscript import connect

    mongo = _token_db()
    try:
        rows = auth.list_tokens(connect.database(mongo))
    finally:
        mongo.close()
    table = Table("name", "role", "created", title="console tokens")
    for row in rows:
        table.add_row(row["name"], row["role"], str(row["created_at"] or ""))
    console.print(table)


@token_app.command("remove")
def token_remove(name: str) -> None:
    """Remove a token: its sessions end within a second."""
    from console import auth
    from sendscript import connect

    mongo = _token_db()
    try:
        removed = auth.remove_token(connect.database(mongo), name)
    finally:
        mongo.close()
    if not removed:
        console.print(f"[red]no token {name}[/red]")
        raise typer.Exit(1)
    console.print(f"token {name} removed")


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
    error_code: Annotated[str | None, typer.Option(help="Code carried by ERROR results.")]
    = None,
    seed: int | None = None,
) -> None:
    """Run a simulated farm: the central-control API plus devices reporting to Pulsar."""
    import asyncio

    from sendscript import log
    from sendscript.dev.simulator import FarmConfig, Simulator

    settings = _settings()
    settings.require("pulsar_url")
    log.configure("simulator", level=settings.log_level, json=settings.log_json)
    config = FarmConfig(
        run_ms=run_ms, jitter=jitter, fail_rate=fail_rate, system_error_rate=system_error_rate,
        http_error_rate=http_error_rate, silent_rate=silent_rate, duplicate_rate=duplicate_rate,
        accept_delay_ms=accept_delay_ms, progress=progress, error_code=error_code,
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
    from sendscript.dev.stack import LocalStack

    settings = _settings()
    stack = LocalStack(settings, workers=workers, sim_args=["--run-ms", str(run_ms)],
                       agents=True, console=True)
    stopping = False

    def _stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    stack.start(log_dir=None)
    console.print(f"[green]sendscript up[/green]: {stack.describe()}")
    if stack.console_url:
        console.print(f"console: {stack.console_url} (log in with a token: "
                      "`sendscript token add NAME --role operator`)")
    console.print("Ctrl-C stops everything.")
    try:
        while not stopping:
            if dead := stack.dead_roles():
                console.print(f"[red]{', '.join(dead)} exited; stopping[/red]")
                break
            time.sleep(0.5)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut it short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
    console.print("stopped")


@app.command()
def submit(
    device_id: Annotated[str | None, typer.Argument(help="Target device.")] = None,
    script: Annotated[str, typer.Option(help="Script as JSON.")] = '{"id": "demo", "args": {}}',
    priority: int = DEFAULT_PRIORITY,
    run_at: Annotated[str | None, typer.Option(help="ISO-8601 or epoch seconds.")] = None,
    dedupe_key: str | None = None,
    max_retries: int = DEFAULT_MAX_RETRIES,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    expire_at: Annotated[str | None, typer.Option(help="Expire if not started by then.")] = None,
    queue: str = DEFAULT_QUEUE,
    group: Annotated[str | None, typer.Option(help="Fan out to every device of a group.")]
    = None,
    device_list: Annotated[str | None, typer.Option(help="Fan out: comma-separated devices.")]
    = None,
    count: Annotated[int, typer.Option(help="Submit this many tasks...")] = 1,
    devices: Annotated[int, typer.Option(help="...spread over this many devices.")] = 1,
    device_prefix: str = "device-",
) -> None:
    """Submit one task; a fan-out (--group or --device-list); or --count N over --devices K."""
    from pydantic import ValidationError

    from sendscript.client import QueueFull, SendScriptClient
    from sendscript.models import TaskSpec, describe_error

    try:
        script_obj = json.loads(script)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"--script is not JSON: {exc}") from None
    template = {"script": script_obj, "priority": priority, "run_at": run_at,
                "max_retries": max_retries, "timeout_s": timeout_s, "expire_at": expire_at,
                "queue": queue}
    with SendScriptClient(_settings()) as client:
        if group or device_list:
            targets = [d.strip() for d in (device_list or "").split(",") if d.strip()] or None
            try:
                batch = client.submit_fanout(devices=targets, group=group,
                                             dedupe_key=dedupe_key, **template)
            except ValidationError as exc:
                raise typer.BadParameter(describe_error(exc)) from None
            except QueueFull as exc:
                console.print(f"[red]{exc}[/red]")
                raise typer.Exit(QUEUE_FULL_EXIT) from None
            except ValueError as exc:
                console.print(f"[red]{exc}[/red]")
                raise typer.Exit(1) from None
            new = sum(t.created for t in batch.tasks)
            console.print(f"batch {batch.batch_id}: {len(batch.tasks)} task(s), {new} new")
            return
        if device_id is None and count == 1 and devices == 1:
            raise typer.BadParameter("name a device, use --group / --device-list, or --count")
        try:
            specs = [TaskSpec.model_validate({
                "device_id": device_id if device_id and devices == 1
                else f"{device_prefix}{i % devices}",
                **template, "dedupe_key": dedupe_key if count == 1 else None,
            }) for i in range(count)]
        except ValidationError as exc:
            raise typer.BadParameter(describe_error(exc)) from None
        try:
            submitted = client.submit_many(specs)
        except QueueFull as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(QUEUE_FULL_EXIT) from None
    if len(submitted) == 1:
        s = submitted[0]
        console.print(f"{s.task_id} {s.status}" + ("" if s.created else
                                                    " (existing task with this dedupe key)"))
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
    table = Table("attempt", Column("record", no_wrap=True, min_width=24), "worker", "lock",
                  "status", "started", "sent", "finished", "error", title="exec records")
    for r in records:
        table.add_row(str(r["attempt"]), r["_id"], r.get("worker", ""), str(r.get("lock_value")),
                      r.get("status", ""), _t(r.get("started_at")), _t(r.get("sent_at")),
                      _t(r.get("finished_at")), r.get("error") or "")
    console.print(table)
    if task.pull:
        _print_pull_attempts(records)


@task_app.command("list")
def task_list(
    status: Annotated[str | None, typer.Option(help="Only tasks in this status.")] = None,
    limit: int = 50,
) -> None:
    """The newest tasks, optionally of one status."""
    from sendscript.client import SendScriptClient

    with SendScriptClient(_settings()) as client:
        tasks = client.list(status, limit)
    table = Table("device", "status", "prio", "attempt", "created", "finished", "error")
    table.columns.insert(0, Column("task", no_wrap=True, min_width=24))
    for t in tasks:
        table.add_row(t.id, t.device_id, str(t.status), str(t.priority), str(t.attempt),
                      _t(t.created_at), _t(t.finished_at), (t.last_error or "")[:60])
    console.print(table)


@task_app.command("cancel")
def task_cancel(task_id: str) -> None:
    """Cancel a task: at once if not yet sent; a sent one's result will not be applied."""
    from sendscript.client import SendScriptClient

    with SendScriptClient(_settings()) as client:
        try:
            was = client.cancel(task_id)
        except KeyError:
            console.print(f"[red]no task {task_id}[/red]")
            raise typer.Exit(1) from None
    if was is None:
        console.print(f"{task_id} had already finished; nothing to cancel")
        raise typer.Exit(1)
    console.print(f"{task_id} cancelled (was {was})")


@task_app.command("retry")
def task_retry(
    task_id: Annotated[str | None, typer.Argument(help="One task to run again.")] = None,
    status: Annotated[str | None, typer.Option(
        help="Or every task in this status: failed, expired or cancelled.")] = None,
    since: Annotated[str | None, typer.Option(help="...finished since (ISO-8601).")] = None,
    queue: Annotated[str | None, typer.Option(help="...of this queue.")] = None,
    attempts: Annotated[int | None, typer.Option(
        help="Attempts to grant (default: the task's own max_retries + 1).")] = None,
) -> None:
    """Run a failed, expired or cancelled task again (or all of one status)."""
    from sendscript.client import SendScriptClient

    if (task_id is None) == (status is None):
        raise typer.BadParameter("name a task, or use --status (with --since / --queue)")
    with SendScriptClient(_settings()) as client:
        if task_id is not None:
            try:
                ok = client.retry(task_id, attempts)
            except ValueError as exc:
                console.print(f"[red]{exc}[/red]")
                raise typer.Exit(1) from None
            if not ok:
                console.print(f"[red]{task_id} is not failed, expired or cancelled[/red]")
                raise typer.Exit(1)
            console.print(f"{task_id} queued again")
            return
        retried, skipped = client.retry_many(status or "", since, queue, attempts)
    console.print(f"queued {retried} task(s) again"
                  + (f"; {skipped} skipped (dedupe key taken)" if skipped else ""))


@app.command()
def recover(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show, change nothing.")] = False,
    lock_confirm_s: Annotated[float | None, typer.Option(
        help="Look at orphaned locks twice, this far apart "
             "(default: SENDSCRIPT_ORPHAN_LOCK_GRACE_S).")] = None,
) -> None:
    """Show and fix stuck work: overdue results, dead masters' queues and tasks,
    pending tasks no master holds, device locks no attempt holds."""
    import asyncio

    from master.recovery import recover_once

    settings = _settings()
    confirm = settings.orphan_lock_grace_s if lock_confirm_s is None else lock_confirm_s
    found = asyncio.run(recover_once(settings, dry=dry_run, lock_confirm_s=confirm))
    verb = "found" if dry_run else "fixed"
    table = Table("what", verb, "examples", title="sendscript recover")
    table.add_row("results overdue (timed out)", str(len(found.timed_out)),
                  ", ".join(found.timed_out[:3]))
    table.add_row("  of which retried", str(len(found.retried)), "")
    table.add_row("dead masters", str(len(found.dead_masters)), ", ".join(found.dead_masters[:3]))
    table.add_row("  queue items taken over", str(found.adopted_entries), "")
    table.add_row("tasks requeued", str(len(found.requeued)), ", ".join(found.requeued[:3]))
    table.add_row("orphaned device locks", str(len(found.orphan_locks)),
                  ", ".join(f"{d} (fence {f})" for d, f in found.orphan_locks[:3]))
    console.print(table)
    if not found.any():
        console.print("nothing stuck")


@batch_app.command("info")
def batch_info(batch_id: str) -> None:
    """Progress of a fan-out batch, per status."""
    from sendscript.client import SendScriptClient

    with SendScriptClient(_settings()) as client:
        counts = client.batch_info(batch_id)
    if not counts:
        console.print(f"[red]no batch {batch_id}[/red]")
        raise typer.Exit(1)
    table = Table("status", "tasks", title=f"batch {batch_id}")
    for name, n in sorted(counts.items()):
        table.add_row(name, str(n))
    table.add_row("total", str(sum(counts.values())))
    console.print(table)


@batch_app.command("cancel")
def batch_cancel(batch_id: str) -> None:
    """Cancel every unfinished task of a batch."""
    from sendscript.client import SendScriptClient

    with SendScriptClient(_settings()) as client:
        if not client.batch_info(batch_id):
            console.print(f"[red]no batch {batch_id}[/red]")
            raise typer.Exit(1)
        n = client.cancel_batch(batch_id)
    console.print(f"cancelled {n} task(s) of batch {batch_id}")


@group_app.command("add")
def group_add(name: str, devices: list[str]) -> None:
    """Add devices to a group (creating it)."""
    from sendscript.client import SendScriptClient

    with SendScriptClient(_settings()) as client:
        try:
            members = client.group_add(name, devices)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    console.print(f"group {name}: {len(members)} device(s)")


@group_app.command("list")
def group_list() -> None:
    """Every group and its devices."""
    from sendscript.client import SendScriptClient

    with SendScriptClient(_settings()) as client:
        groups = client.groups()
    table = Table("group", "devices", "members")
    for name, members in groups.items():
        shown = ", ".join(members[:10]) + (" ..." if len(members) > 10 else "")
        table.add_row(name, str(len(members)), shown)
    console.print(table)


@group_app.command("remove")
def group_remove(
    name: str,
    devices: Annotated[list[str] | None, typer.Argument(help="Devices to drop; none = all.")]
    = None,
) -> None:
    """Remove devices from a group, or the whole group."""
    from sendscript.client import SendScriptClient

    with SendScriptClient(_settings()) as client:
        before = set(client.group_devices(name))
        ok = client.group_remove(name, devices or [])
        gone = len(before - set(client.group_devices(name))) if devices else 0
    if not ok:
        console.print(f"[red]no group {name}[/red]")
        raise typer.Exit(1)
    console.print(f"group {name}: " + (f"removed {gone} device(s)" if devices else "removed"))


@schedule_app.command("add")
def schedule_add(
    name: str,
    script: Annotated[str, typer.Option(help="Script as JSON.")],
    cron: Annotated[str | None, typer.Option(
        help="Cron: 5 fields, or 6 with seconds first ('*/5 * * * * *').")] = None,
    every: Annotated[float | None, typer.Option(help="Interval in seconds.")] = None,
    tz: Annotated[str, typer.Option(help="Time zone of the cron expression.")] = "UTC",
    device: Annotated[list[str] | None, typer.Option(help="Target device (repeatable).")]
    = None,
    group: Annotated[str | None, typer.Option(help="Target device group.")] = None,
    misfire: Annotated[str, typer.Option(help="fire_once or skip.")] = "fire_once",
    priority: int = DEFAULT_PRIORITY,
    max_retries: int = DEFAULT_MAX_RETRIES,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    queue: str = DEFAULT_QUEUE,
    paused: Annotated[bool, typer.Option(help="Create it disabled.")] = False,
) -> None:
    """Add a cron or interval schedule."""
    from pydantic import ValidationError

    from sendscript.client import SendScriptClient
    from sendscript.models import describe_error
    from sendscript.schedules import Schedule

    try:
        schedule = Schedule.model_validate({
            "_id": name, "cron": cron, "interval_s": every, "timezone": tz,
            "template": {"script": json.loads(script), "priority": priority,
                         "max_retries": max_retries, "timeout_s": timeout_s, "queue": queue},
            "device_ids": device or None, "group": group, "misfire": misfire,
            "enabled": not paused,
        })
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"--script is not JSON: {exc}") from None
    except ValidationError as exc:
        raise typer.BadParameter(describe_error(exc)) from None
    with SendScriptClient(_settings()) as client:
        try:
            client.schedule_add(schedule)
        except ValueError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from None
    console.print(f"schedule {name} added; next fire {schedule.next_fire_at}")


@schedule_app.command("list")
def schedule_list() -> None:
    """Every schedule, when it fires next and how often it fired."""
    from sendscript.client import SendScriptClient

    with SendScriptClient(_settings()) as client:
        schedules = client.schedules()
    table = Table("schedule", "rule", "targets", "enabled", "next fire", "last fire", "fires",
                  "missed")
    for sc in schedules:
        rule = sc.cron or f"every {sc.interval_s:g}s"
        targets = f"group {sc.group}" if sc.group else ", ".join(sc.device_ids or [])
        table.add_row(sc.name, f"{rule} ({sc.timezone})", targets[:40],
                      "yes" if sc.enabled else "paused", str(sc.next_fire_at),
                      str(sc.last_fire_at or ""), str(sc.fires), str(sc.missed))
    console.print(table)


@schedule_app.command("show")
def schedule_show(name: str) -> None:
    """One schedule in full."""
    from sendscript.client import SendScriptClient

    with SendScriptClient(_settings()) as client:
        sc = client.schedule_get(name)
    if sc is None:
        console.print(f"[red]no schedule {name}[/red]")
        raise typer.Exit(1)
    console.print_json(sc.model_dump_json(by_alias=True))


def _schedule_switch(name: str, action: str) -> None:
    from sendscript.client import SendScriptClient

    with SendScriptClient(_settings()) as client:
        ok = getattr(client, f"schedule_{action}")(name)
    if not ok:
        console.print(f"[red]no schedule {name}[/red]")
        raise typer.Exit(1)
    console.print(f"schedule {name}: {action}d" if action != "resume" else
                  f"schedule {name}: resumed")


@schedule_app.command("pause")
def schedule_pause(name: str) -> None:
    """Stop firing (the schedule stays)."""
    _schedule_switch(name, "pause")


@schedule_app.command("resume")
def schedule_resume(name: str) -> None:
    """Fire again from now on."""
    _schedule_switch(name, "resume")


@schedule_app.command("remove")
def schedule_remove(name: str) -> None:
    """Delete a schedule (tasks it created stay)."""
    _schedule_switch(name, "remove")


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
           watch: Annotated[bool, typer.Option(
               "--watch", help="A live view, refreshed every second until Ctrl-C.")] = False
           ) -> None:
    """Queue length, tasks by status, locks held, masters and workers alive, consumers."""
    from sendscript.report import gather

    if watch:
        _watch_status(_settings())
        return
    info = gather(_settings())
    if as_json:
        console.print_json(json.dumps(info, default=str))
        return
    cap = info["queue_ready_max"]
    console.print(f"ready queue: {info['queue_ready']}" + (f" (cap {cap})" if cap else "")
                  + f"   quarantine: {info['queue_quarantine']}"
                  f"   device locks held: {info['locks_held']}"
                  f"   workers alive: {info['workers_alive']}")
    tasks = Table("status", "tasks", title="tasks")
    for name, n in sorted(info["tasks"].items()):
        tasks.add_row(name, str(n))
    console.print(tasks)
    masters = Table("master", "alive", "workers", "queued", "held devices", "in flight",
                    "intake: held/high/low", "updated", title="masters")
    for m in info["masters"]:
        bp = m.get("backpressure") or {}
        intake = (f"{bp.get('state')}: {bp.get('held')}/{bp.get('high_water')}/"
                  f"{bp.get('low_water')}" if bp else "")
        if bp.get("state") == "throttled":
            intake = f"[yellow]{intake}[/yellow]"
        masters.add_row(m["master_id"], "yes" if m["alive"] else "[red]no[/red]",
                        f"{m.get('workers_alive', 0)}/{m.get('workers', 0)}", str(m.get("queued")),
                        str(m.get("held_devices")), str(m.get("inflight")), intake,
                        m.get("updated_at", ""))
    console.print(masters)
    consumers = Table("consumer", "alive", "saved", "applied", "dead-lettered", "updated",
                      title="consumers")
    for c in info["consumers"]:
        consumers.add_row(c["name"], "yes" if c["alive"] else "[red]no[/red]", str(c["saved"]),
                          str(c["applied"]), str(c["dead_lettered"]), c["updated_at"])
    console.print(consumers)
    _print_pauses(info.get("pauses", {}))
    _print_alerts(info.get("alerts") or {}, info["masters"])
    _print_limits(info.get("rate_limits", []))
    _print_breaker(info.get("breaker") or {}, info["masters"])
    _print_benched(info.get("benched") or {})


# -- pauses ---------------------------------------------------------------------------------

pause_app = typer.Typer(help="Pause dispatch: everywhere, of a queue, a group or a device.",
                        invoke_without_command=True)
app.add_typer(pause_app, name="pause")
QueueOpt = Annotated[str | None, typer.Option(help="Only this queue's tasks.")]
GroupOpt = Annotated[str | None, typer.Option(help="Only the tasks of this group's devices.")]
DeviceOpt = Annotated[str | None, typer.Option(help="Only this device's tasks.")]


@pause_app.callback()
def pause(
    ctx: typer.Context,
    queue: QueueOpt = None,
    group: GroupOpt = None,
    device: DeviceOpt = None,
    hard: Annotated[bool, typer.Option(
        "--hard", help="The hard stop: only `resume --hard` lifts it.")] = False,
    reason: Annotated[str, typer.Option(help="Why (shown in status and alerts).")] = "",
) -> None:
    """Hold every task (or a queue's, a group's, a device's) until resumed: held tasks
    use no attempt. `pause list` shows the pauses."""
    from sendscript.client import SendScriptClient
    from sendscript.pauses import by_default

    if ctx.invoked_subcommand is not None:
        return
    with SendScriptClient(_settings()) as client:
        try:
            done = client.pause(queue, group, device, reason=reason, hard=hard, by=by_default())
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    console.print(f"paused {done.scope}" + (f": {done.reason}" if done.reason else ""))


@pause_app.command("list")
def pause_list() -> None:
    """The pauses in force."""
    from sendscript.client import SendScriptClient

    with SendScriptClient(_settings()) as client:
        _print_pauses(client.pauses())


@app.command()
def resume(
    queue: QueueOpt = None,
    group: GroupOpt = None,
    device: DeviceOpt = None,
    hard: Annotated[bool, typer.Option("--hard", help="Lift the hard stop.")] = False,
    quota: Annotated[bool, typer.Option("--quota", help="Lift the quota pause.")] = False,
) -> None:
    """Lift one pause: the global one, or the named queue's, group's or device's. The
    hard stop stays until `resume --hard`."""
    from sendscript.client import SendScriptClient
    from sendscript.pauses import HARD

    with SendScriptClient(_settings()) as client:
        try:
            lifted = client.resume(queue, group, device, hard=hard, quota=quota)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        left = client.pauses()
    if lifted is None:
        console.print("nothing to resume: that pause was not set")
    else:
        console.print(f"resumed {lifted.scope}")
    if HARD in left and not hard:
        console.print("[red]the hard stop is still on: `sendscript resume --hard` lifts it"
                      "[/red]")


def _print_pauses(pauses: dict[str, Any]) -> None:
    if not pauses:
        console.print("no pauses")
        return
    table = Table("scope", "reason", "by", "since", title="pauses")
    for scope, p in pauses.items():
        row = p if isinstance(p, dict) else p.to_dict()
        table.add_row(scope, row["reason"], row["by"], row["at"])
    console.print(table)


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
    from sendscript.dev.demo import run_demo

    # SIGTERM unwinds like Ctrl-C, so the servers and roles it started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    settings = _settings()
    code = run_demo(settings, tasks=tasks, devices=devices, workers=workers, run_ms=run_ms,
                    fail_rate=fail_rate, timeout_s=timeout_s,
                    data_dir=data_dir or settings.data_dir / f"demo-{os.getpid()}")
    raise typer.Exit(code)


def _print_breaker(shared: dict[str, Any], masters: list[dict[str, Any]]) -> None:
    """The shared circuit breaker on central-control, then each master's gate and ladder."""
    if not shared:
        return
    limits = shared.get("limits", {})
    state = shared.get("state")
    color = {"closed": "green", "degraded": "yellow"}.get(str(state), "red")
    opened = f" (probe in {shared['open_for_s']}s)" if state == "open" else ""
    console.print(
        f"circuit breaker: [{color}]{state}[/{color}]{opened}   failure rate: "
        f"{shared.get('failure_rate')} of {shared.get('window_sends')} sends   streak: "
        f"{shared.get('streak')}   trips: {shared.get('trips')}   limits: degrade at "
        f"{limits.get('degrade_at')}, recover below {limits.get('recover_below')}, open after "
        f"{limits.get('trip_after')} failures, degraded concurrency "
        f"{limits.get('degraded_concurrency')}")
    drop = limits.get("drop_rate", {})
    for m in masters:
        b = m.get("breaker") or {}
        d = b.get("drop_rate") or {}
        if b:
            console.print(
                f"  {m['master_id']}: gate {b.get('state')}, held {b.get('held')}; drop rate "
                f"{d.get('level')} ({d.get('dropped')} of {d.get('finished')}, limits "
                f"{drop.get('degrade_at')}/{drop.get('open_at')}/{drop.get('hard_stop_at')} "
                f"over {drop.get('window_s')}s); results lost (retried) "
                f"{d.get('lost_results', 0)}")


def _print_limits(limits: list[dict[str, Any]]) -> None:
    """Rate limits: the rule, this window's use across masters, the live masters' counts."""
    if not limits:
        return
    table = Table("limit", "max/time", "used in window", "window left", "reserved", "held",
                  "spent", title="rate limits (window use: all masters; counts: live masters)")
    for lim in limits:
        table.add_row(lim["name"], lim["rule"], str(lim["used"]), f"{lim['left_s']:.1f}s",
                      str(lim["reserved"]), str(lim["held"]), str(lim["spent"]))
    console.print(table)


def _print_alerts(alerts: dict[str, Any], masters: list[dict[str, Any]]) -> None:
    """Alert channels and limits, the incidents on across the cluster, each master's sends."""
    if not alerts:
        return
    channels = ", ".join(alerts["channels"]) or "none (logged only)"
    console.print(f"alerts: {channels}; at most {alerts['max_per_minute']}/min, "
                  f"{alerts['timeout_s']:g}s timeout per POST")
    if alerts["incidents"]:
        table = Table("incident", "key", "state", "announced by", title="incidents")
        for i in alerts["incidents"]:
            table.add_row(i["incident"], i["key"], "[red]on[/red]" if i["on"] else "ended",
                          i["by"])
        console.print(table)
    sends = Table("master", "sent", "throttled", "queue full", "queued", "failed",
                  "watching", title="alerts by master")
    for m in masters:
        a = m.get("alerts")
        if not a:
            continue
        failed = ", ".join(f"{ch} {n}" for ch, n in a["failed"].items() if n) or "0"
        watching = ", ".join(a["active"]) or ""
        sends.add_row(m["master_id"], str(a["sent"]), str(a["dropped_throttled"]),
                      str(a["dropped_queue_full"]), str(a["queued"]), failed, watching)
    console.print(sends)


# -- benched devices -------------------------------------------------------------------

device_app = typer.Typer(help="Devices benched after failures in a row.", no_args_is_help=True)
app.add_typer(device_app, name="device")


@device_app.command("list")
def device_list() -> None:
    """The benched devices: until when, why, failures in a row."""
    from sendscript.client import SendScriptClient

    with SendScriptClient(_settings()) as client:
        _print_benched({"devices": client.benched_devices()})


@device_app.command("resume")
def device_resume(device: str) -> None:
    """Lift a device's bench (once fixed) and forget its failures: its tasks run at once."""
    from sendscript.client import SendScriptClient

    with SendScriptClient(_settings()) as client:
        was = client.resume_device(device)
    console.print(f"resumed device {device}" if was
                  else f"device {device} was not benched (its failure streak is cleared)")


def _print_benched(benched: dict[str, Any]) -> None:
    devices, limits = benched.get("devices") or {}, benched.get("limits")
    if limits:
        console.print(f"benching: after {limits['after']} failures in a row, for "
                      f"{limits['cooldown_s']:g}s doubling up to {limits['cooldown_max_s']:g}s;"
                      f" alert above {limits['alert_count']} benched")
    if not devices:
        console.print("no benched devices")
        return
    table = Table("device", "until", "left", "streak", "bench #", "why",
                  title="benched devices")
    for device, b in devices.items():
        table.add_row(device, b["until"], f"{b['left_s']:g}s", str(b["streak"]),
                      str(b["level"]), b["why"])
    console.print(table)


def _t(value: Any) -> str:
    return value.strftime("%H:%M:%S.%f")[:-3] if value else ""


agent_app = typer.Typer(help="Pull-mode agents (the agents API).", no_args_is_help=True)
agent_token_app = typer.Typer(help="Agents' API tokens.", no_args_is_help=True)
app.add_typer(agent_app, name="agent")
agent_app.add_typer(agent_token_app, name="token")


@agent_app.command("list")
def agent_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
               ) -> None:
    """Registered agents: labels, devices, last seen, active or lost, leases held."""
    from sendscript import connect
    from sendscript.agent_store import AGENTS, agent_state
    from sendscript.models import PULL, utcnow
    from sendscript.store import TASKS

    settings = _settings()
    with connect.mongo_sync(settings) as mongo:
        db = connect.database(mongo)
        now = utcnow()
        agents = list(db[AGENTS].find({}, {"token": 0}).sort("_id", 1))
        held: dict[str, int] = {}
        for doc in db[TASKS].find({"mode": PULL, "status": "running"}, {"lease.agent": 1}):
            who = (doc.get("lease") or {}).get("agent", "")
            held[who] = held.get(who, 0) + 1
    for a in agents:
        a["state"] = agent_state(a, now, settings.agent_ttl_s)
        a["leases"] = held.get(a["_id"], 0)
    if as_json:
        console.print_json(json.dumps(agents, default=str))
        return
    table = Table("agent", "name", "state", "labels", "devices", "version", "leases",
                  "last seen", title=f"agents ({len(agents)})")
    for a in agents:
        state = a["state"] if a["state"] != "lost" else "[red]lost[/red]"
        table.add_row(a["_id"], a.get("name", ""), state, ",".join(a.get("labels", [])),
                      ",".join(a.get("devices", [])), a.get("version", ""), str(a["leases"]),
                      _t(a.get("last_seen")))
    console.print(table)


@agent_token_app.command("add")
def agent_token_add(
    name: str,
    prefix: Annotated[list[str] | None, typer.Option(
        "--prefix", help="Scope: device ids starting with this (repeatable).")] = None,
    group: Annotated[list[str] | None, typer.Option(
        "--group", help="Scope: the devices of this group (repeatable).")] = None,
) -> None:
    """Make an API token for agents; it is shown once (only its hash is stored). With a
    scope its agents may register and lease only those devices (and no task that names
    none); without, every device."""
    from sendscript import connect
    from sendscript.agent_store import add_token_sync

    with connect.mongo_sync(_settings()) as mongo:
        try:
            token = add_token_sync(connect.database(mongo), name, prefix or [], group or [])
        except ValueError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from None
    console.print(token, soft_wrap=True, highlight=False)


@agent_token_app.command("list")
def agent_token_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")]
                     = False) -> None:
    """Agents' tokens: name, short id, scope, created, last used (when one of its agents
    was last seen); never the token nor its hash."""
    from sendscript import connect
    from sendscript.agent_store import list_tokens_sync

    with connect.mongo_sync(_settings()) as mongo:
        rows = list_tokens_sync(connect.database(mongo))
    if as_json:
        console.print_json(json.dumps(rows, default=str))
        return
    table = Table("name", "id", "scope", "created", "last used",
                  title=f"agent tokens ({len(rows)})")
    for row in rows:
        scope = ",".join([f"{p}*" for p in row["prefixes"]]
                         + [f"group:{g}" for g in row["groups"]]) or "all devices"
        table.add_row(row["name"], row["id"], scope, str(row["created_at"] or ""),
                      str(row["last_used"] or ""))
    console.print(table)


@agent_token_app.command("remove")
def agent_token_remove(name: str) -> None:
    """Remove the tokens of that name (or short id from `list`): every agents process
    refuses them within a second; their agents are asked to stop and unbound."""
    from sendscript import connect
    from sendscript.agent_store import remove_token_sync

    with connect.mongo_sync(_settings()) as mongo:
        removed = remove_token_sync(connect.database(mongo), name)
    if not removed:
        console.print(f"[red]no agent token {name}[/red]")
        raise typer.Exit(1)
    console.print(f"agent token {name} removed ({removed})")


@agent_app.command("stop")
def agent_stop(agent_id: str) -> None:
    """Ask an agent to stop: its next heartbeat answers stop (it finishes or gives back
    what it holds); registering again clears the request."""
    from sendscript import connect
    from sendscript.agent_store import AGENTS

    with connect.mongo_sync(_settings()) as mongo:
        found = connect.database(mongo)[AGENTS].update_one({"_id": agent_id},
                                                           {"$set": {"stop": True}})
    if not found.matched_count:
        console.print(f"[red]no agent {agent_id}[/red]")
        raise typer.Exit(1)
    console.print(f"agent {agent_id} asked to stop")


def _print_pull_attempts(records: list[dict[str, Any]]) -> None:
    """A pull task's attempts: which agent leased it and the checkpoint it was handed."""
    table = Table("attempt", "agent", "status", "checkpoint handed over", title="pull attempts")
    for r in records:
        table.add_row(str(r["attempt"]), r.get("agent", ""), r.get("status", ""),
                      json.dumps(r.get("checkpoint_in"))[:200])
    console.print(table)


def main() -> None:
    from pymongo.errors import PyMongoError
    from redis.exceptions import RedisError

    try:
        app()
    except (PyMongoError, RedisError) as exc:
        # A command that cannot reach its servers says which and why, in one line on
        # stderr: never wrapped to the terminal's width, the driver's text never markup.
        server = "Mongo" if isinstance(exc, PyMongoError) else "Redis"
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        Console(stderr=True, soft_wrap=True).print(
            f"[red]sendscript: {server} did not answer: {escape(reason)}[/red]")
        raise SystemExit(2) from None


# -- monitoring: health and progress --------------------------------------------------------

monitor_app = typer.Typer(help="Health of the service; progress of tasks.", no_args_is_help=True)
app.add_typer(monitor_app, name="monitor")


def _status_view(info: dict[str, Any]) -> Any:
    from rich.console import Group

    cap = info["queue_ready_max"]
    counted = info.get("tasks_counted") or {}
    head = (f"ready queue: {info['queue_ready']}" + (f" (cap {cap})" if cap else "")
            + f"   quarantine: {info['queue_quarantine']}   device locks held: "
            f"{info['locks_held']}   workers alive: {info['workers_alive']}   breaker: "
            f"{(info.get('breaker') or {}).get('state')}   counts: "
            f"{counted.get('lag_s')} s old")
    tasks = Table("status", "tasks", title="tasks")
    for name, n in sorted(info["tasks"].items()):
        tasks.add_row(name, f"{n:,}")
    masters = Table("master", "alive", "workers", "queued", "in flight", "updated",
                    title="masters")
    for m in info["masters"]:
        masters.add_row(m["master_id"], "yes" if m["alive"] else "[red]no[/red]",
                        f"{m.get('workers_alive', 0)}/{m.get('workers', 0)}",
                        str(m.get("queued")), str(m.get("inflight")), m.get("updated_at", ""))
    consumers = Table("consumer", "alive", "applied", "dead-lettered", title="consumers")
    for c in info["consumers"]:
        consumers.add_row(c["name"], "yes" if c["alive"] else "[red]no[/red]",
                          str(c.get("applied")), str(c.get("dead_lettered")))
    return Group(head, tasks, masters, consumers)


def _watch_status(settings: Settings) -> None:
    import time

    from rich.live import Live

    from sendscript.report import gather

    with Live(_status_view(gather(settings)), console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(1.0)
                try:
                    live.update(_status_view(gather(settings)), refresh=True)
                except Exception as exc:  # a server away: say so, keep watching
                    live.update(f"[red]status unavailable: {exc!r}[/red]", refresh=True)
        except KeyboardInterrupt:
            pass


@monitor_app.command("health")
def monitor_health(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Roles alive, servers reachable, breaker, pauses, backpressure, task counts.
    Exits 1 when anything is unhealthy (for scripts and checks)."""
    from sendscript.report import gather, health_checks, reachable

    settings = _settings()
    try:
        info, error = gather(settings), None
    except Exception as exc:
        info, error = None, repr(exc)[:200]
    checks = health_checks(settings, info, error) + reachable(settings)
    healthy = all(ok for _, ok, _ in checks)
    if as_json:
        console.print_json(json.dumps({"healthy": healthy, "checks": [
            {"check": n, "ok": ok, "detail": d} for n, ok, d in checks]}))
    else:
        table = Table("check", "ok", "detail", title="healthy" if healthy else "UNHEALTHY")
        for name, ok, detail in checks:
            table.add_row(name, "yes" if ok else "[red]no[/red]", detail)
        console.print(table)
    if not healthy:
        raise typer.Exit(1)


@monitor_app.command("progress")
def monitor_progress(
    batch: Annotated[str | None, typer.Option(help="A fan-out batch; else all tasks.")] = None,
    interval: Annotated[float, typer.Option(help="Seconds between samples.")] = 1.0,
    once: Annotated[bool, typer.Option("--once", help="One sample, then exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (with --once).")] = False,
) -> None:
    """Progress of a batch or of all tasks: done, rate and ETA, live until done or Ctrl-C."""
    import time

    from rich.live import Live

    from sendscript.report import progress, progress_counts

    settings = _settings()
    samples = [(time.monotonic(), progress_counts(settings, batch))]
    title = f"batch {batch}" if batch else "all tasks"

    def view() -> Any:
        p = progress(samples[-60:])  # the rate over the last minute of samples
        eta = "-" if p["eta_s"] is None else f"{p['eta_s']:.0f} s"
        rate = "-" if p["rate_per_s"] is None else f"{p['rate_per_s']}/s"
        table = Table("status", "tasks", title=f"{title}: {p['done']:,}/{p['total']:,} done "
                      f"({p['percent']}%), {rate}, ETA {eta}")
        for name, n in sorted(p["by_status"].items()):
            table.add_row(name, f"{n:,}")
        return table

    if once:
        if as_json:
            console.print_json(json.dumps(progress(samples)))
        else:
            console.print(view())
        return
    with Live(view(), console=console, auto_refresh=False) as live:
        try:
            while progress(samples)["left"] > 0 or not samples[-1][1]:
                time.sleep(interval)
                samples.append((time.monotonic(), progress_counts(settings, batch)))
                live.update(view(), refresh=True)
        except KeyboardInterrupt:
            pass
