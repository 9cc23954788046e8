"""The console's API tokens (`sendscript token ...`)."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from sendscript.cli.common import console, load_settings

token_app = typer.Typer(help="The console's API tokens (viewer or operator).",
                        no_args_is_help=True)


def _token_db() -> Any:
    from sendscript import connect

    settings = load_settings()
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
