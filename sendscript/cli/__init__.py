"""The `sendscript` command line (Typer): `main` is its entry point; `app.py` wires the
command groups, one module each."""

from sendscript.cli.app import main

__all__ = ["main"]
