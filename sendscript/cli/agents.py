"""Pull-mode agents and their API tokens (`sendscript agent ...`)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from sendscript.cli.common import clock, console, load_settings

agent_app = typer.Typer(help="Pull-mode agents (the agents API).", no_args_is_help=True)
agent_token_app = typer.Typer(help="Agents' API tokens.", no_args_is_help=True)


@agent_app.command("list")
def agent_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
               ) -> None:
    """Registered agents: labels, devices, last seen, active or lost, leases held."""
    from sendscript import connect
    from sendscript.agent_store import agents_sync, leases_held_sync

    settings = load_settings()
    with connect.mongo_sync(settings) as mongo:
        db = connect.database(mongo)
        agents = agents_sync(db, settings.agent_ttl_s)
        held = leases_held_sync(db)
    for a in agents:
        a["leases"] = len(held.get(a["_id"], []))
    if as_json:
        console.print_json(json.dumps(agents, default=str))
        return
    table = Table("agent", "name", "state", "labels", "devices", "version", "leases",
                  "last seen", title=f"agents ({len(agents)})")
    for a in agents:
        state = a["state"] if a["state"] != "lost" else "[red]lost[/red]"
        table.add_row(a["_id"], a.get("name", ""), state, ",".join(a.get("labels", [])),
                      ",".join(a.get("devices", [])), a.get("version", ""), str(a["leases"]),
                      clock(a.get("last_seen")))
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

    with connect.mongo_sync(load_settings()) as mongo:
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

    with connect.mongo_sync(load_settings()) as mongo:
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

    with connect.mongo_sync(load_settings()) as mongo:
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
    from sendscript.agent_store import ask_stop_sync

    with connect.mongo_sync(load_settings()) as mongo:
        asked = ask_stop_sync(connect.database(mongo), agent_id)
    if asked is None:
        console.print(f"[red]no agent {agent_id}[/red]")
        raise typer.Exit(1)
    console.print(f"agent {agent_id} asked to stop")
