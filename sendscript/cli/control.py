"""Operating the service: pauses, benched devices, recovery of stuck work."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from sendscript.cli.common import console, load_settings
from sendscript.cli.status import benched_view, pauses_view


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

    settings = load_settings()
    confirm = settings.orphan_lock_grace_s if lock_confirm_s is None else lock_confirm_s
    found = asyncio.run(recover_once(settings, dry=dry_run, lock_confirm_s=confirm))
    verb = "found" if dry_run else "fixed"
    table = Table("what", verb, "examples", title="sendscript recover")
    table.add_row("results overdue (timed out)", str(len(found.timed_out)),
                  ", ".join(found.timed_out[:3]))
    table.add_row("  of which retried", str(len(found.retried)), "")
    table.add_row("dead masters", str(len(found.dead_masters)), ", ".join(found.dead_masters[:3]))
    table.add_row("  queue items taken over", str(found.adopted_entries), "")
    table.add_row("  attempts never sent, run again", str(len(found.unsent)),
                  ", ".join(found.unsent[:3]))
    table.add_row("tasks requeued", str(len(found.requeued)), ", ".join(found.requeued[:3]))
    table.add_row("orphaned device locks", str(len(found.orphan_locks)),
                  ", ".join(f"{d} (fence {f})" for d, f in found.orphan_locks[:3]))
    console.print(table)
    if not found.any():
        console.print("nothing stuck")


# -- pauses ---------------------------------------------------------------------------------

pause_app = typer.Typer(help="Pause dispatch: everywhere, of a queue, a group or a device.",
                        invoke_without_command=True)
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
    with SendScriptClient(load_settings()) as client:
        try:
            done = client.pause(queue, group, device, reason=reason, hard=hard, by=by_default())
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    console.print(f"paused {done.scope}" + (f": {done.reason}" if done.reason else ""))


@pause_app.command("list")
def pause_list() -> None:
    """The pauses in force."""
    from sendscript.client import SendScriptClient

    with SendScriptClient(load_settings()) as client:
        console.print(pauses_view(client.pauses()))


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

    with SendScriptClient(load_settings()) as client:
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


# -- benched devices -------------------------------------------------------------------

device_app = typer.Typer(help="Devices benched after failures in a row.", no_args_is_help=True)


@device_app.command("list")
def device_list() -> None:
    """The benched devices: until when, why, failures in a row."""
    from sendscript.client import SendScriptClient

    with SendScriptClient(load_settings()) as client:
        console.print(benched_view({"devices": client.benched_devices()}))


@device_app.command("resume")
def device_resume(device: str) -> None:
    """Lift a device's bench (once fixed) and forget its failures: its tasks run at once."""
    from sendscript.client import SendScriptClient

    with SendScriptClient(load_settings()) as client:
        was = client.resume_device(device)
    console.print(f"resumed device {device}" if was
                  else f"device {device} was not benched (its failure streak is cleared)")
