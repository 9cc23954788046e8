"""Device groups (`sendscript group ...`)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from sendscript.cli.common import console, load_settings

group_app = typer.Typer(help="Device groups, targets of fan-outs and schedules.",
                        no_args_is_help=True)


@group_app.command("add")
def group_add(name: str, devices: list[str]) -> None:
    """Add devices to a group (creating it)."""
    from sendscript.client import SendScriptClient

    with SendScriptClient(load_settings()) as client:
        try:
            members = client.group_add(name, devices)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    console.print(f"group {name}: {len(members)} device(s)")


@group_app.command("list")
def group_list() -> None:
    """Every group and its devices."""
    from sendscript.client import SendScriptClient

    with SendScriptClient(load_settings()) as client:
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

    with SendScriptClient(load_settings()) as client:
        before = set(client.group_devices(name))
        ok = client.group_remove(name, devices or [])
        gone = len(before - set(client.group_devices(name))) if devices else 0
    if not ok:
        console.print(f"[red]no group {name}[/red]")
        raise typer.Exit(1)
    console.print(f"group {name}: " + (f"removed {gone} device(s)" if devices else "removed"))
