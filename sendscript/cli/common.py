"""What every command group uses: the terminal, the settings, a time column."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console

from sendscript.settings import Settings, settings_errors

console = Console()
QUEUE_FULL_EXIT = 75  # EX_TEMPFAIL: `submit` refused at SENDSCRIPT_READY_MAX, try later


def load_settings() -> Settings:
    """The settings, or exit 2 with one line per setting that cannot be used."""
    from pydantic import ValidationError

    try:
        return Settings()
    except ValidationError as exc:
        for line in settings_errors(exc):
            typer.echo(f"sendscript: {line}", err=True)
        raise typer.Exit(2) from None


def clock(value: Any) -> str:
    """A time of day to the millisecond, or empty."""
    return value.strftime("%H:%M:%S.%f")[:-3] if value else ""
