"""Starting the roles: master, consumer, agents API, console, the simulated farm,
everything on one host (`up`) and the demo. Each imports its role only when it runs."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from sendscript.cli.common import console, load_settings


def master() -> None:
    """Run the master: intake, per-device dispatch, worker pool."""
    from master.app import run

    raise typer.Exit(run(load_settings()))


def consumer() -> None:
    """Run the Pulsar task-log consumer."""
    from consumers.task_log import run

    raise typer.Exit(run(load_settings()))


def agents() -> None:
    """Run the pull-mode agents API (SENDSCRIPT_AGENTS_HOST / _PORT)."""
    from agents.app import run

    raise typer.Exit(run(load_settings()))


def console_role() -> None:
    """Run the console: pages, JSON API (/openapi.json) and live views, on
    SENDSCRIPT_CONSOLE_HOST:PORT (127.0.0.1:8600)."""
    from console.app import run

    raise typer.Exit(run(load_settings()))


def simulate(
    host: str = "127.0.0.1",
    port: int = 8700,
    run_ms: Annotated[float, typer.Option(help="How long a script runs on a device.")] = 200.0,
    jitter: Annotated[float, typer.Option(help="Run time spread, as a fraction.")] = 0.5,
    fail_rate: Annotated[float, typer.Option(help="Share of runs ending in ERROR.")] = 0.0,
    system_error_rate: Annotated[float, typer.Option(help="Share ending in SYSTEM_ERROR.")] = 0.0,
    http_error_rate: Annotated[float, typer.Option(help="Share of sends answered 503.")] = 0.0,
    silent_rate: Annotated[float, typer.Option(help="Share of runs never reported.")] = 0.0,
    duplicate_rate: Annotated[float, typer.Option(help="Share of results sent twice.")] = 0.0,
    accept_delay_ms: Annotated[float, typer.Option(help="Answer sends this late.")] = 0.0,
    progress: Annotated[bool, typer.Option(help="Report PROGRESS halfway through.")] = True,
    error_code: Annotated[str | None, typer.Option(help="Code carried by ERROR results.")]
    = None,
    capacity: Annotated[float | None, typer.Option(
        help="Hidden capacity: accepted sends per second, all devices; above it 429 "
             "with Retry-After.")] = None,
    retry_after: Annotated[float | None, typer.Option(
        help="Retry-After (s) of the capacity's 429s (default: until the window has "
             "room).")] = None,
    seed: int | None = None,
) -> None:
    """Run a simulated farm: the central-control API plus devices reporting to Pulsar."""
    import asyncio

    from sendscript import log
    from sendscript.dev.simulator import FarmConfig, Simulator

    settings = load_settings()
    settings.require("pulsar_url")
    log.configure("simulator", level=settings.log_level, json=settings.log_json)
    config = FarmConfig(
        run_ms=run_ms, jitter=jitter, fail_rate=fail_rate, system_error_rate=system_error_rate,
        http_error_rate=http_error_rate, silent_rate=silent_rate, duplicate_rate=duplicate_rate,
        accept_delay_ms=accept_delay_ms, progress=progress, error_code=error_code,
        capacity=capacity, retry_after_s=retry_after,
    )
    sim = Simulator(settings.pulsar_url or "", settings.task_log_topic, config, seed=seed)
    asyncio.run(sim.serve(host, port))


def up(
    workers: Annotated[int | None, typer.Option(help="Worker processes.")] = None,
    run_ms: Annotated[float, typer.Option(help="Simulated script run time.")] = 200.0,
) -> None:
    """Everything on one host: embedded servers where no URL is set, master, consumer,
    and the simulated farm where no central-control URL is set. Ctrl-C stops it all."""
    from sendscript.dev.stack import LocalStack

    settings = load_settings()
    stack = LocalStack(settings, workers=workers, sim_args=["--run-ms", str(run_ms)],
                       agents=True, console=True)
    stopping = False

    def _stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    stack.start(log_dir=None)
    console.print(f"[green]sendscript up[/green]: {stack.describe()}")
    if stack.console_url:
        console.print(f"console: {stack.console_url} (log in with a token: "
                      "`sendscript token add NAME --role operator`)")
    console.print("Ctrl-C stops everything.")
    try:
        while not stopping:
            if dead := stack.dead_roles():
                console.print(f"[red]{', '.join(dead)} exited; stopping[/red]")
                break
            time.sleep(0.5)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut it short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
    console.print("stopped")


def demo(
    tasks: Annotated[int, typer.Option(help="Tasks to submit.")] = 300,
    devices: Annotated[int, typer.Option(help="Simulated devices.")] = 30,
    workers: int = 2,
    run_ms: Annotated[float, typer.Option(help="Simulated script run time.")] = 100.0,
    fail_rate: Annotated[float, typer.Option(help="Share of runs the devices fail.")] = 0.0,
    timeout_s: Annotated[float, typer.Option(help="Give up after this long.")] = 300.0,
    data_dir: Annotated[Path | None, typer.Option(help="Where the embedded servers keep data.")]
    = None,
) -> None:
    """Start everything on embedded servers, run a few hundred tasks, print a summary."""
    from sendscript.dev.demo import run_demo

    # SIGTERM unwinds like Ctrl-C, so the servers and roles it started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    settings = load_settings()
    code = run_demo(settings, tasks=tasks, devices=devices, workers=workers, run_ms=run_ms,
                    fail_rate=fail_rate, timeout_s=timeout_s,
                    data_dir=data_dir or settings.data_dir / f"demo-{os.getpid()}")
    raise typer.Exit(code)
