"""Submitting, looking at, cancelling and retrying tasks; fan-out batches."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Column, Table

from sendscript.cli.common import QUEUE_FULL_EXIT, clock, console, load_settings
from sendscript.models import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_PRIORITY,
    DEFAULT_QUEUE,
    DEFAULT_TIMEOUT_S,
)

task_app = typer.Typer(help="Look at and cancel tasks.", no_args_is_help=True)


batch_app = typer.Typer(help="Fan-out batches.", no_args_is_help=True)


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
    batch_id: Annotated[str | None, typer.Option(
        help="Fan-out: this batch id; again after a cut-short submit, it stores the rest.")]
    = None,
    dedupe_mode: Annotated[str | None, typer.Option(
        help="With --dedupe-key: until_start, until_result or window.")] = None,
    dedupe_window_s: Annotated[float | None, typer.Option(
        help="dedupe_mode window: hold the key this long after the result.")] = None,
    debounce_s: Annotated[float | None, typer.Option(
        help="With --dedupe-key: run the latest spec once the key is quiet this long.")]
    = None,
    debounce_max_s: Annotated[float | None, typer.Option(
        help="...and never later than this after the first submission.")] = None,
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
    keyed = {k: v for k, v in {"dedupe_key": dedupe_key, "dedupe_mode": dedupe_mode,
                               "dedupe_window_s": dedupe_window_s, "debounce_s": debounce_s,
                               "debounce_max_s": debounce_max_s}.items() if v is not None}
    with SendScriptClient(load_settings()) as client:
        if group or device_list:
            targets = [d.strip() for d in (device_list or "").split(",") if d.strip()] or None
            try:
                batch = client.submit_fanout(devices=targets, group=group, **keyed,
                                             batch_id=batch_id, **template)
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
                **template, **(keyed if count == 1 else {}),
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
        console.print(f"{s.task_id} {s.status}" + (
            "" if s.created else " (debounced into the existing task with this dedupe key)"
            if s.debounced else " (existing task with this dedupe key)"))
    else:
        console.print(f"submitted {len(submitted)} tasks over {devices} device(s)")


@task_app.command("info")
def task_info(task_id: str) -> None:
    """A task, its exec records and its logs."""
    from sendscript.client import SendScriptClient
    from sendscript.dedupe import describe as describe_dedupe

    with SendScriptClient(load_settings()) as client:
        task = client.get(task_id)
        if task is None:
            console.print(f"[red]no task {task_id}[/red]")
            raise typer.Exit(1)
        console.print_json(task.model_dump_json(by_alias=True))
        if line := describe_dedupe(task.to_doc(), client.settings.dedupe_window_s):
            console.print(f"dedupe: {line}", highlight=False)
        records = client.records(task_id)
    table = Table("attempt", Column("record", no_wrap=True, min_width=24), "worker", "lock",
                  "status", "started", "sent", "finished", "error", title="exec records")
    for r in records:
        table.add_row(str(r["attempt"]), r["_id"], r.get("worker", ""), str(r.get("lock_value")),
                      r.get("status", ""), clock(r.get("started_at")), clock(r.get("sent_at")),
                      clock(r.get("finished_at")), r.get("error") or "")
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

    with SendScriptClient(load_settings()) as client:
        tasks = client.list(status, limit)
    table = Table("device", "status", "prio", "attempt", "created", "finished", "error")
    table.columns.insert(0, Column("task", no_wrap=True, min_width=24))
    for t in tasks:
        table.add_row(t.id, t.device_id, str(t.status), str(t.priority), str(t.attempt),
                      clock(t.created_at), clock(t.finished_at), (t.last_error or "")[:60])
    console.print(table)


@task_app.command("cancel")
def task_cancel(task_id: str) -> None:
    """Cancel a task: at once if not yet sent; a sent one's result will not be applied."""
    from sendscript.client import SendScriptClient

    with SendScriptClient(load_settings()) as client:
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
    with SendScriptClient(load_settings()) as client:
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


@batch_app.command("info")
def batch_info(batch_id: str) -> None:
    """Progress of a fan-out batch, per status."""
    from sendscript.client import SendScriptClient

    with SendScriptClient(load_settings()) as client:
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

    with SendScriptClient(load_settings()) as client:
        if not client.batch_info(batch_id):
            console.print(f"[red]no batch {batch_id}[/red]")
            raise typer.Exit(1)
        n = client.cancel_batch(batch_id)
    console.print(f"cancelled {n} task(s) of batch {batch_id}")


def _print_pull_attempts(records: list[dict[str, Any]]) -> None:
    """A pull task's attempts: which agent leased it and the checkpoint it was handed."""
    table = Table("attempt", "agent", "status", "checkpoint handed over", title="pull attempts")
    for r in records:
        table.add_row(str(r["attempt"]), r.get("agent", ""), r.get("status", ""),
                      json.dumps(r.get("checkpoint_in"))[:200])
    console.print(table)
