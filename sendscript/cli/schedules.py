"""Recurring scripts (`sendscript schedule ...`)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from sendscript.cli.common import console, load_settings
from sendscript.models import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_PRIORITY,
    DEFAULT_QUEUE,
    DEFAULT_TIMEOUT_S,
)

schedule_app = typer.Typer(help="Recurring scripts: cron or interval.", no_args_is_help=True)


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
    with SendScriptClient(load_settings()) as client:
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

    with SendScriptClient(load_settings()) as client:
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

    with SendScriptClient(load_settings()) as client:
        sc = client.schedule_get(name)
    if sc is None:
        console.print(f"[red]no schedule {name}[/red]")
        raise typer.Exit(1)
    console.print_json(sc.model_dump_json(by_alias=True))


def _schedule_switch(name: str, action: str) -> None:
    from sendscript.client import SendScriptClient

    with SendScriptClient(load_settings()) as client:
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
