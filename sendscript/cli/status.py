"""`sendscript status` and `sendscript monitor`: the service at a glance.

`status_view` is the one renderer of the status: `status` prints it once, `status
--watch` redraws it every second; `pause list` and `device list` print its parts."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Group, RenderableType
from rich.table import Table

from sendscript.cli.common import console, load_settings
from sendscript.settings import Settings

monitor_app = typer.Typer(help="Health of the service; progress of tasks.", no_args_is_help=True)


def status(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
           watch: Annotated[bool, typer.Option(
               "--watch", help="A live view, refreshed every second until Ctrl-C.")] = False
           ) -> None:
    """Queue length, tasks by status, locks held, masters and workers alive, consumers."""
    from sendscript.report import gather

    if watch:
        _watch_status(load_settings())
        return
    info = gather(load_settings())
    if as_json:
        console.print_json(json.dumps(info, default=str))
        return
    console.print(status_view(info))


def status_view(info: dict[str, Any]) -> Group:
    """The status as `sendscript status` prints it (and `--watch` redraws it)."""
    cap = info["queue_ready_max"]
    counted = info.get("tasks_counted") or {}
    head = (f"ready queue: {info['queue_ready']}" + (f" (cap {cap})" if cap else "")
            + f"   quarantine: {info['queue_quarantine']}"
            f"   device locks held: {info['locks_held']}"
            f"   workers alive: {info['workers_alive']}"
            + (f"   counts: {counted['lag_s']} s old" if counted.get("lag_s") is not None
               else "")
            + _dedupe_counts(info.get("stats") or {}))
    tasks = Table("status", "tasks", title="tasks")
    for name, n in sorted(info["tasks"].items()):
        tasks.add_row(name, str(n))
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
    consumers = Table("consumer", "alive", "saved", "applied", "dead-lettered", "updated",
                      title="consumers")
    for c in info["consumers"]:
        consumers.add_row(c["name"], "yes" if c["alive"] else "[red]no[/red]", str(c["saved"]),
                          str(c["applied"]), str(c["dead_lettered"]), c["updated_at"])
    return Group(head, tasks, masters, consumers,
                 pauses_view(info.get("pauses", {})),
                 alerts_view(info.get("alerts") or {}, info["masters"]),
                 limits_view(info.get("rate_limits", [])),
                 breaker_view(info.get("breaker") or {}, info["masters"]),
                 benched_view(info.get("benched") or {}))


def _dedupe_counts(stats: dict[str, int]) -> str:
    """Submissions answered by an existing task since the start: duplicates, and those
    of them whose spec replaced a debouncing task's."""
    if not stats.get("deduplicated"):
        return ""
    return (f"   deduplicated: {stats['deduplicated']}"
            f" (debounced: {stats.get('debounced', 0)})")


def _watch_status(settings: Settings) -> None:
    import signal
    import threading

    from rich.live import Live

    from sendscript.report import gather

    # Ctrl-C ends the watch between two draws. As a KeyboardInterrupt it could land
    # inside a client's connect or close, and leave the process hanging at exit.
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        with Live(status_view(gather(settings)), console=console, auto_refresh=False) as live:
            while not stop.wait(1.0):
                try:
                    live.update(status_view(gather(settings)), refresh=True)
                except Exception as exc:  # a server away: say so, keep watching
                    live.update(f"[red]status unavailable: {exc!r}[/red]", refresh=True)
    finally:
        signal.signal(signal.SIGINT, previous)


def pauses_view(pauses: dict[str, Any]) -> RenderableType:
    if not pauses:
        return "no pauses"
    table = Table("scope", "reason", "by", "since", title="pauses")
    for scope, p in pauses.items():
        row = p if isinstance(p, dict) else p.to_dict()
        table.add_row(scope, row["reason"], row["by"], row["at"])
    return table


def breaker_view(shared: dict[str, Any], masters: list[dict[str, Any]]) -> Group:
    """The shared circuit breaker on central-control, then each master's gate and ladder."""
    out: list[RenderableType] = []
    if not shared:
        return Group(*out)
    limits = shared.get("limits", {})
    state = shared.get("state")
    color = {"closed": "green", "degraded": "yellow"}.get(str(state), "red")
    opened = f" (probe in {shared['open_for_s']}s)" if state == "open" else ""
    out.append(
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
            out.append(
                f"  {m['master_id']}: gate {b.get('state')}, held {b.get('held')}; drop rate "
                f"{d.get('level')} ({d.get('dropped')} of {d.get('finished')}, limits "
                f"{drop.get('degrade_at')}/{drop.get('open_at')}/{drop.get('hard_stop_at')} "
                f"over {drop.get('window_s')}s); results lost (retried) "
                f"{d.get('lost_results', 0)}")
    return Group(*out)


def limits_view(limits: list[dict[str, Any]]) -> Group:
    """Rate limits: the rule, this window's use across masters, the live masters' counts."""
    out: list[RenderableType] = []
    if not limits:
        return Group(*out)
    table = Table("limit", "max/time", "used in window", "window left", "reserved", "held",
                  "spent", title="rate limits (window use: all masters; counts: live masters)")
    for lim in limits:
        table.add_row(lim["name"], lim["rule"], str(lim["used"]), f"{lim['left_s']:.1f}s",
                      str(lim["reserved"]), str(lim["held"]), str(lim["spent"]))
    out.append(table)
    for lim in (x for x in limits if "current" in x):  # adaptive: where it is and why
        hold = f", held {lim['hold_s']:.1f}s more (Retry-After)" if lim["hold_s"] else ""
        out.append(f"adaptive {lim['name']}: now {lim['current']:.1f} per "
                   f"{lim['rule'].split('/')[1].split('~')[0]} ({lim['why']}){hold}")
    return Group(*out)


def alerts_view(alerts: dict[str, Any], masters: list[dict[str, Any]]) -> Group:
    """Alert channels and limits, the incidents on across the cluster, each master's sends."""
    out: list[RenderableType] = []
    if not alerts:
        return Group(*out)
    channels = ", ".join(alerts["channels"]) or "none (logged only)"
    out.append(f"alerts: {channels}; at most {alerts['max_per_minute']}/min, "
               f"{alerts['timeout_s']:g}s timeout per POST")
    if alerts["incidents"]:
        table = Table("incident", "key", "state", "announced by", title="incidents")
        for i in alerts["incidents"]:
            table.add_row(i["incident"], i["key"], "[red]on[/red]" if i["on"] else "ended",
                          i["by"])
        out.append(table)
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
    out.append(sends)
    return Group(*out)


def benched_view(benched: dict[str, Any]) -> Group:
    """The benching rule and the devices benched now: until when, why."""
    out: list[RenderableType] = []
    devices, limits = benched.get("devices") or {}, benched.get("limits")
    if limits:
        out.append(f"benching: after {limits['after']} failures in a row, for "
                   f"{limits['cooldown_s']:g}s doubling up to {limits['cooldown_max_s']:g}s;"
                   f" alert above {limits['alert_count']} benched")
    if not devices:
        out.append("no benched devices")
        return Group(*out)
    table = Table("device", "until", "left", "streak", "bench #", "why",
                  title="benched devices")
    for device, b in devices.items():
        table.add_row(device, b["until"], f"{b['left_s']:g}s", str(b["streak"]),
                      str(b["level"]), b["why"])
    out.append(table)
    return Group(*out)


@monitor_app.command("health")
def monitor_health(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Roles alive, servers reachable, breaker, pauses, backpressure, task counts.
    Exits 1 when anything is unhealthy (for scripts and checks)."""
    from sendscript.report import gather, health_checks, reachable

    settings = load_settings()
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

    settings = load_settings()
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
