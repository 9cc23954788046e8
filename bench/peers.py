"""sendscript against peer task queues on the same job, servers and machine.

    python -m bench.peers --tasks 5000 --devices 200

Starts one set of embedded servers (Redis, SecantusDB, pulsar-lite), then runs
the reference job through each system in turn, back to back, each run with a
simulated farm of its own whose devices answer at once and report on a Pulsar
topic of the run's own (no sendscript consumer reads the reports of the peers'
jobs, which nothing reads): sendscript (`bench.throughput --run-ms 0`:
master, 2 workers, consumer), Dramatiq (2 processes x 8 threads), Celery
(prefork, 2 processes) and the same job body in 2 plain processes
(bench/peer_jobs/). A peer's job locks the device, makes 8 document writes (the
task and its exec record through their states, the log) and POSTs to the farm
(bench/peer_jobs/job.py). Every system runs
with sendscript's default durability (journaled writes, retryWrites as the URL
decides) and, with `--durability both` (default), again unjournaled: the peers
with their drivers' defaults (no journal, retryable writes), sendscript with
`SENDSCRIPT_MONGO_JOURNAL=false`, marked "as they come". SecantusDB is restarted
empty before each run (same port), so no run pays for another's data or inherits
its retryable-write records.

With `--rounds N` every system runs N times, round after round (each round all
systems back to back), and a last table gives the medians: each ratio to
sendscript is taken within its round, so the drift of the machine's speed between
rounds does not enter it.

Printed: tasks/s of each (first submit -> last done, progress from Redis
counters), its ratio to sendscript at the same durability, and CPU ms per task
by process group from
/proc: the system's own processes, the Mongo, Redis and Pulsar servers and the
farm. The producer (this process) is not counted, for any system.

No system's figure counts a task it did not finish. After each run every task
submitted to it is read back from where its job writes it (sendscript/dev/tally.py):
sendscript's from `script_tasks` (bench.throughput's read-back), a peer's from its
own database's `tasks` collection, by id, where the job marks each task success
after its last write (bench/peer_jobs/job.py). The tally line of each run is
printed; a peer's tasks/s counts only the tasks read back terminal (and no more
than its Redis counter had counted when the clock stopped). Exits 1 when any run's
tally shows a task lost, unfinished or stored twice.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import redis
from rich.console import Console
from rich.table import Table

from bench import throughput
from bench.cpu import CpuMeter
from sendscript import tracing
from sendscript.dev import tally
from sendscript.dev.embedded import EmbeddedServers, ServerProcess, child_env, free_port
from sendscript.dev.otlp import OtlpReceiver
from sendscript.dev.processes import RoleProcess, wait_until
from sendscript.dev.stack import LocalStack
from sendscript.settings import Settings

console = Console(stderr=True)
GROUPS = ("own", "mongo", "redis", "pulsar", "simulator")
TRACED = "sendscript+otel"  # sendscript with end-to-end traces on


@dataclass
class Run:
    system: str
    durable: bool
    tasks: int
    elapsed_s: float
    tasks_per_s: float
    cpu_ms_per_task: dict[str, float]
    ok: bool
    note: str = ""
    read_back: str = ""  # the tally's line (sendscript/dev/tally.py)
    round: int = 1


def peer_command(system: str) -> list[str]:
    py = sys.executable
    if system == "dramatiq":
        return [py, "-m", "dramatiq", "bench.peer_jobs.dramatiq_app", "-p", "2", "-t", "8"]
    if system == "celery":
        return [py, "-m", "celery", "-A", "bench.peer_jobs.celery_app", "worker", "-P",
                "prefork", "-c", "2", "--without-heartbeat", "--without-gossip",
                "--without-mingle", "-l", "WARNING", "-Q", "celery"]
    return [py, "-m", "bench.peer_jobs.plain", "--procs", "2"]


def sender(system: str) -> Callable[[list[tuple[str, str, int]]], None]:
    """How this process submits a batch of (task id, device, n) to the system."""
    if system == "dramatiq":
        from bench.peer_jobs import dramatiq_app

        def send_dramatiq(batch: list[tuple[str, str, int]]) -> None:
            for args in batch:
                dramatiq_app.run.send(*args)
        return send_dramatiq
    if system == "celery":
        from bench.peer_jobs import celery_app

        def send_celery(batch: list[tuple[str, str, int]]) -> None:
            for args in batch:
                celery_app.run.apply_async(args)
        return send_celery
    from bench.peer_jobs.plain import QUEUE
    client = redis.Redis.from_url(os.environ["PEER_REDIS_URL"])

    def send_plain(batch: list[tuple[str, str, int]]) -> None:
        client.lpush(QUEUE, *[json.dumps({"task_id": t, "device_id": d, "n": n})
                              for t, d, n in batch])
    return send_plain


@dataclass(frozen=True)
class Farm:
    """A run's simulated farm: where jobs POST, its process, the topic it reports on."""

    url: str
    pid: int
    topic: str


@contextmanager
def farm_for(name: str, servers: EmbeddedServers, log_dir: Path) -> Iterator[Farm]:
    """A farm for one run, reporting on a topic of that run's own. With one farm for
    all, the peers' results (which their jobs never read) piled up in the sendscript
    consumer's subscription and were applied (saved as logs of unknown records) at
    the start of its next run."""
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
    topic = f"persistent://public/default/peers-{safe}-task-log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = child_env({**servers.env(), "SENDSCRIPT_LOG_LEVEL": "WARNING",
                     "SENDSCRIPT_TASK_LOG_TOPIC": topic})
    sim = RoleProcess(f"simulator-{name}", ["simulate", "--port", str(port), "--run-ms", "0"],
                      env, log_dir).start()
    try:
        wait_until(lambda: _up(url), 60, what="the simulator")
        yield Farm(url, sim.pid, topic)
    finally:
        sim.stop(timeout_s=20)


def run_name(system: str, durable: bool, round_: int) -> str:
    """A run's name: a peer's database, key prefix and log file, and every run's farm."""
    return f"{system}{'' if durable else '_driver'}" + (f"_r{round_}" if round_ > 1 else "")


def run_peer(system: str, durable: bool, servers: EmbeddedServers, farm: Farm,
             opts: argparse.Namespace, log_dir: Path, round_: int = 1) -> Run:
    # a database and key prefix per run, as sendscript's: no run stores into another's
    name = run_name(system, durable, round_)
    env = {"PEER_REDIS_URL": servers["redis"].url, "PEER_MONGO_URL": servers["mongo"].url,
           "PEER_CENTRAL_URL": farm.url, "PEER_NAME": name,
           "PEER_DURABLE": "1" if durable else "0"}
    os.environ.update(env)  # this process's senders and the job module read them
    from bench.peer_jobs import job
    job._ctx = None
    ctx = job.context()
    ctx.ensure_indexes()
    done_key = f"{ctx.prefix}:done"
    ctx.redis.delete(done_key)
    log = open(log_dir / f"{name}.log", "ab")
    proc = subprocess.Popen(peer_command(system), env=child_env(env), stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    log.close()
    send = sender(system)
    try:
        send([("warmup-" + name, "warmup", -1)])
        wait_until(lambda: int(ctx.redis.get(done_key) or 0) >= 1, 90, 0.2,
                   what=f"{name}'s warm-up task")
        meter = CpuMeter({"own": [proc.pid], **server_groups(servers), "simulator": [farm.pid]})
        meter.start()
        t0 = time.time()
        for start in range(0, opts.tasks, 100):
            send([(f"{name}-{i}", f"phone-{i % opts.devices:05d}", i)
                  for i in range(start, min(opts.tasks, start + 100))])
        deadline = time.monotonic() + opts.timeout
        last = 0.0
        while (done := int(ctx.redis.get(done_key) or 0) - 1) < opts.tasks:
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            if time.monotonic() - last > 5:
                last = time.monotonic()
                console.print(f"  {name}: {done}/{opts.tasks} done")
            time.sleep(0.1)
        elapsed = time.time() - t0
        cpu = meter.stop()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    counted = tally.by_ids(ctx.db, [f"{name}-{i}" for i in range(opts.tasks)], "tasks")
    finished = min(done, counted.terminal)  # read back, and done when the clock stopped
    return Run(system, durable, finished, elapsed,
               finished / elapsed if elapsed > 0 else 0.0,
               {k: v * 1000 / max(1, finished) for k, v in cpu.items()}, counted.ok,
               "" if counted.ok else f"only {counted.terminal} of {opts.tasks} finished",
               counted.line())


def start_empty(mongo: ServerProcess) -> None:
    """SecantusDB restarted on an empty data directory (same port): no run pays for
    another's data (its tables, their checkpoints) or inherits its retryable-write
    records, whichever systems ran before it."""
    mongo.stop()
    shutil.rmtree(mongo.data_dir / "db", ignore_errors=True)
    mongo.start()


def server_groups(servers: EmbeddedServers) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for name in ("mongo", "redis", "pulsar"):
        proc = servers[name].proc
        if proc is not None:
            out[name] = [proc.pid]
    return out


def run_sendscript(servers: EmbeddedServers, farm: Farm, opts: argparse.Namespace,
                   log_dir: Path, durable: bool = True, traced: bool = False,
                   round_: int = 1) -> Run:
    """sendscript as shipped (journaled writes), or with `SENDSCRIPT_MONGO_JOURNAL=false`
    (acknowledged by the server, not yet on disk: the peers' driver defaults). `traced`:
    with tracing on in every role and the producer, exporting to a receiver here."""
    if traced:
        with OtlpReceiver() as receiver:
            try:
                run = _run_sendscript(servers, farm, opts, log_dir, durable,
                                      receiver.endpoint, round_)
            finally:
                tracing.shutdown()  # the producer's (this process): the next runs untraced
            wait_until(lambda: len(receiver.received()) >= run.tasks, 10,
                       what="the spans", interval_s=0.2)
            run.system = TRACED
            spans = len(receiver.received())
            run.note += (f"; spans received: {spans} ({spans / max(1, run.tasks):.1f} a task,"
                         f" {len(receiver.traces())} traces)")
            return run
    return _run_sendscript(servers, farm, opts, log_dir, durable, None, round_)


def _run_sendscript(servers: EmbeddedServers, farm: Farm, opts: argparse.Namespace,
                    log_dir: Path, durable: bool, otel_endpoint: str | None,
                    round_: int = 1) -> Run:
    # a database and key prefix per run: the second run must not count the first's tasks
    tag = ("sendscript" if durable else "sendscript_unjournaled") + \
        ("_traced" if otel_endpoint else "") + (f"_r{round_}" if round_ > 1 else "")
    otel = {"otel_enabled": True, "otel_endpoint": otel_endpoint} if otel_endpoint else {}
    base = Settings(redis_url=servers["redis"].url, mongo_url=servers["mongo"].url + tag,
                    pulsar_url=servers["pulsar"].url, central_url=farm.url, workers=2,
                    heartbeat_interval_s=opts.heartbeat, mongo_journal=durable, key_prefix=tag,
                    task_log_topic=farm.topic, **otel)
    stack = LocalStack(base, workers=2, data_dir=log_dir.parent, extra_env={
        "SENDSCRIPT_LOG_LEVEL": "WARNING", "SENDSCRIPT_MONGO_JOURNAL": str(durable).lower(),
        "SENDSCRIPT_HEARTBEAT_INTERVAL_S": str(opts.heartbeat),
        "SENDSCRIPT_TASK_LOG_TOPIC": farm.topic,
        **{f"SENDSCRIPT_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v)
           for k, v in otel.items()}})
    topts = throughput.Options(
        tasks=opts.tasks, devices=opts.devices, workers=2, run_ms=0.0, producer="both",
        batch=100, timeout_s=opts.timeout, heartbeat_s=opts.heartbeat, warmup=1, keep=False,
        json=False)
    stack.start(log_dir=log_dir)
    try:
        r = throughput._measure(stack, topts, {**server_groups(servers),
                                               "simulator": [farm.pid]})
    finally:
        stack.stop()
    cpu = dict(r.cpu_ms_per_task)
    cpu["own"] = cpu.pop("sendscript", 0.0)
    note = (f"round trips/task: redis {r.service_rt_per_task['redis']:.2f}, "
            f"mongo {r.service_rt_per_task['mongo']:.2f}")
    return Run("sendscript", durable, r.tally["terminal"], r.elapsed_s, r.tasks_per_s,
               cpu, r.ok, note, tally.Tally.from_dict(r.tally).line())


def render(runs: list[Run], label: str = "") -> None:
    out = Console(width=160)
    # each run against sendscript (untraced) at the same durability
    base = {r.durable: r.tasks_per_s for r in runs if r.system == "sendscript"}
    table = Table(title="the reference job: tasks/s and CPU ms per task by process "
                        f"(x sendscript: at the same durability){label}")
    for col in ("system", "durability", "tasks/s", "x sendscript", *GROUPS, "all", "ok"):
        table.add_column(col, justify="left" if col in ("system", "durability") else "right")
    for r in runs:
        ratio = f"{r.tasks_per_s / base[r.durable]:.2f}" if base.get(r.durable) else "-"
        cpu = [r.cpu_ms_per_task.get(g, 0.0) for g in GROUPS]
        table.add_row(r.system, "j=true" if r.durable else "as they come",
                      f"{r.tasks_per_s:.1f}", ratio, *[f"{c:.2f}" for c in cpu],
                      f"{sum(cpu):.2f}", "yes" if r.ok else f"[red]{r.note}[/red]")
    out.print(table)
    for r in runs:
        if r.system in ("sendscript", TRACED) and r.note:
            out.print(f"{r.system} ({'j=true' if r.durable else 'as it comes'}): {r.note}")
    for r in runs:
        out.print(f"{r.system} ({'j=true' if r.durable else 'as they come'}): {r.read_back}",
                  markup=False, highlight=False, soft_wrap=True)


def paired_ratio(runs: list[Run], run: Run) -> float | None:
    """`run`'s tasks/s over sendscript's in the same round at the same durability."""
    base = next((r for r in runs if r.system == "sendscript" and r.round == run.round
                 and r.durable == run.durable), None)
    return run.tasks_per_s / base.tasks_per_s if base and base.tasks_per_s else None


def render_rounds(runs: list[Run]) -> None:
    """Medians over the rounds: the machine's speed drifts between runs, so each ratio
    is taken within a round (systems back to back) and the median of those is shown."""
    out = Console(width=170)
    rounds = max(r.round for r in runs)
    table = Table(title=f"medians of {rounds} rounds (min-max); x sendscript: the median of "
                        "each round's ratio at the same durability")
    for col in ("system", "durability", "tasks/s", "x sendscript", *GROUPS, "all", "ok"):
        table.add_column(col, justify="left" if col in ("system", "durability") else "right")
    keys = list(dict.fromkeys((r.system, r.durable) for r in runs))
    for system, durable in keys:
        mine = [r for r in runs if (r.system, r.durable) == (system, durable)]
        rates = [r.tasks_per_s for r in mine]
        ratios = [x for r in mine if (x := paired_ratio(runs, r)) is not None]
        cpu = [statistics.median(r.cpu_ms_per_task.get(g, 0.0) for r in mine) for g in GROUPS]
        table.add_row(system, "j=true" if durable else "as they come",
                      f"{statistics.median(rates):.1f} ({min(rates):.0f}-{max(rates):.0f})",
                      f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
                      if ratios else "-",
                      *[f"{c:.2f}" for c in cpu], f"{sum(cpu):.2f}",
                      "yes" if all(r.ok for r in mine) else "[red]no[/red]")
    out.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=5000)
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--systems", default="sendscript,dramatiq,celery,plain",
                   help="comma-separated, run in this order")
    p.add_argument("--durability", choices=("sendscript", "driver", "both"), default="both",
                   help="peers with sendscript's durability, their drivers' defaults, or both")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--heartbeat", type=float, default=1.0)
    p.add_argument("--tracing", choices=("off", "on", "both"), default="off",
                   help="sendscript untraced, with end-to-end traces on (every role and the "
                        "producer exporting to an OTLP receiver in this process), or both, "
                        "back to back: the cost of tracing")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every system this many times, round after round, and print "
                        "the medians too (each ratio taken within its round)")
    p.add_argument("--json", action="store_true")
    opts = p.parse_args(argv)
    # A background run ignores SIGINT: SIGTERM ends it through the finally blocks, which
    # stop the servers, farm and roles it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    data_dir = Path(tempfile.mkdtemp(prefix="sendscript-peers-"))
    log_dir = data_dir / "logs"
    log_dir.mkdir(parents=True)
    runs: list[Run] = []
    servers = EmbeddedServers(data_dir)
    ok = False
    try:
        servers.start()
        plan: list[tuple[str, bool]] = []
        for system in opts.systems.split(","):
            runs_of = [system]
            if system == "sendscript":
                runs_of = {"off": [system], "on": [TRACED], "both": [system, TRACED]}[
                    opts.tracing]
            for name in runs_of:
                if opts.durability in ("sendscript", "both"):
                    plan.append((name, True))
                if opts.durability in ("driver", "both"):
                    plan.append((name, False))
        for round_ in range(1, max(1, opts.rounds) + 1):
            for system, durable in plan:
                start_empty(servers["mongo"])
                console.print(f"[bold]{system}[/bold] "
                              f"({'j=true' if durable else 'as they come'}), round {round_}")
                with farm_for(run_name(system, durable, round_), servers, log_dir) as farm:
                    if system in ("sendscript", TRACED):
                        run = run_sendscript(servers, farm, opts, log_dir, durable,
                                             traced=system == TRACED, round_=round_)
                    else:
                        run = run_peer(system, durable, servers, farm, opts, log_dir, round_)
                run.round = round_
                console.print(f"  {run.tasks_per_s:.1f} tasks/s")
                runs.append(run)
        ok = all(r.ok for r in runs)
    finally:
        servers.stop()
        if ok:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            console.print(f"logs kept in {log_dir}")
    for round_ in sorted({r.round for r in runs}):
        render([r for r in runs if r.round == round_],
               f", round {round_}" if opts.rounds > 1 else "")
    if opts.rounds > 1 and runs:
        render_rounds(runs)
    if opts.json:
        print(json.dumps([asdict(r) for r in runs]))
    return 0 if ok else 1


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    sys.exit(main())
