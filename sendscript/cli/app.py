"""The `sendscript` command: every command and group in one list, in the order of
`--help`, and `main()`, which turns an unreachable server into one line on stderr."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

from sendscript.cli import agents, control, groups, roles, schedules, status, tasks, tokens

app = typer.Typer(help="Dispatch scripts to the phones of a device farm.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)

app.add_typer(tasks.task_app, name="task")
app.add_typer(schedules.schedule_app, name="schedule")
app.add_typer(groups.group_app, name="group")
app.add_typer(tasks.batch_app, name="batch")
app.command()(roles.master)
app.command()(roles.consumer)
app.command()(roles.agents)
app.command("console")(roles.console_role)
app.add_typer(tokens.token_app, name="token")
app.command()(roles.simulate)
app.command()(roles.up)
app.command()(tasks.submit)
app.command()(control.recover)
app.command()(status.status)
app.add_typer(control.pause_app, name="pause")
app.command()(control.resume)
app.command()(roles.demo)
app.add_typer(control.device_app, name="device")
agents.agent_app.add_typer(agents.agent_token_app, name="token")
app.add_typer(agents.agent_app, name="agent")
app.add_typer(status.monitor_app, name="monitor")


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
