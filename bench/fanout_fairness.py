"""Fair intake: single tasks pushed behind a big fan-out, stored and done how soon.

    python -m bench.fanout_fairness                   # 20,000-device fan-out, 20 singles
    python -m bench.fanout_fairness --devices 5000 --json

One fresh `LocalStack` (embedded Redis, SecantusDB and pulsar-lite in a temporary
directory, the simulated farm, the consumer and one master). After a warm-up task
has gone through the whole service:

1. one fan-out item for `--devices` devices is pushed raw onto the ready list, as a
   producer in another language would;
2. `--gap` seconds later, `--singles` single-task items for other, idle devices;
3. Mongo is polled every `--poll` seconds: for each single, the time from its push
   to its task being stored, and to its task being `success`; for the fan-out, the
   time until all its tasks are stored and all are terminal.

Targets (the claim in the README): every single stored within 1 s of its push and
done within 3 s, whatever the fan-out's size. Then every submitted device is read
back from Mongo (sendscript/dev/tally.py, by device id: raw items get their ids
from the master): one task each, terminal. Exits 1 when a target is missed or the
tally is not clean.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter
from pymongo import MongoClient
from rich.console import Console
from rich.table import Table

from sendscript import connect
from sendscript.client import SendScriptClient
from sendscript.dev import tally
from sendscript.dev.stack import LocalStack
from sendscript.settings import Settings
from sendscript.store import TASKS

FAN_SCRIPT = "bench-fair-fanout"
SINGLE_SCRIPT = "bench-fair-single"
STORED_TARGET_S = 1.0
DONE_TARGET_S = 3.0
console = Console(stderr=True)


@dataclass
class Options:
    devices: int = 20_000  # the fan-out's
    singles: int = 20
    gap_s: float = 0.5  # fan-out push -> singles push
    workers: int = 2
    run_ms: float = 20.0
    poll_s: float = 0.02
    timeout_s: float = 900.0
    env: dict[str, str] = field(default_factory=dict)
    keep: bool = False
    json: bool = False


@dataclass
class Result:
    devices: int
    singles: int
    chunk: int
    budget_s: float
    singles_stored_s: list[float | None]  # per single: push -> stored
    singles_done_s: list[float | None]  # per single: push -> success
    fanout_stored_s: float | None  # fan-out push -> every one of its tasks stored
    fanout_done_s: float | None  # fan-out push -> every one of its tasks terminal
    tally: dict[str, Any]
    read_back: str
    ok: bool
    notes: list[str] = field(default_factory=list)

    @property
    def stored_max_s(self) -> float | None:
        return _max(self.singles_stored_s)

    @property
    def done_max_s(self) -> float | None:
        return _max(self.singles_done_s)


def _max(values: list[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else max(
        v for v in values if v is not None)


def role_setting(env: dict[str, str], settings: Settings, name: str) -> Any:
    """A setting as the roles run with it: an `--env` override, else the setting's."""
    raw = env.get(f"SENDSCRIPT_{name.upper()}")
    if raw is None:
        return getattr(settings, name)
    return TypeAdapter(Settings.model_fields[name].annotation).validate_python(raw)


def run(opts: Options) -> Result:
    env = {"SENDSCRIPT_LOG_LEVEL": "WARNING", **opts.env}
    base = Settings(redis_url=None, mongo_url=None, pulsar_url=None, central_url=None,
                    workers=opts.workers, key_prefix="benchfair")
    data_dir = Path(tempfile.mkdtemp(prefix="sendscript-bench-fairness-"))
    stack = LocalStack(base, workers=opts.workers, data_dir=data_dir,
                       sim_args=["--run-ms", str(opts.run_ms), "--jitter", "0", "--no-progress"],
                       extra_env=env)
    console.print(f"starting embedded servers and roles under {data_dir} ...")
    ok = False
    try:
        stack.start(log_dir=data_dir / "logs")
        result = _measure(stack, opts)
        ok = result.ok
        return result
    finally:
        stack.stop()
        if ok and not opts.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            console.print(f"logs and data kept in {data_dir}")


def _measure(stack: LocalStack, opts: Options) -> Result:
    settings = stack.effective
    notes: list[str] = []
    fan_devices = [f"fan-{i:06d}" for i in range(opts.devices)]
    single_devices = [f"idle-{i:03d}" for i in range(opts.singles)]
    with SendScriptClient(settings) as client, \
            MongoClient(settings.mongo_url, socketTimeoutMS=60_000) as mongo:
        db = mongo.get_default_database(connect.DEFAULT_DB)
        warm = client.submit("warm-up", {"id": "bench-fair-warm"})
        if why := tally.wait_terminal(db, {"_id": warm.task_id}, 1, 60, stack.dead_roles):
            notes.append(f"warm-up: {why}")

        fan_at = time.monotonic()
        client.push_raw([{"device_ids": fan_devices, "script": {"id": FAN_SCRIPT}}])
        time.sleep(opts.gap_s)
        singles_at = time.monotonic()
        client.push_raw([{"device_id": d, "script": {"id": SINGLE_SCRIPT}}
                         for d in single_devices])
        stored, done = _watch_singles(db, single_devices, singles_at, opts, notes)
        fan_stored_at = _until(lambda: db[TASKS].count_documents(
            {"script.id": FAN_SCRIPT}) >= opts.devices, opts, notes, "the fan-out stored",
            interval_s=0.2)
        console.print("waiting for every task to be terminal ...")
        if why := tally.wait_terminal(db, {"script.id": FAN_SCRIPT}, opts.devices,
                                      opts.timeout_s, stack.dead_roles, interval_s=0.5):
            notes.append(f"fan-out: {why}")
        fan_done_at = time.monotonic()
        counted = tally.by_key(db, [*fan_devices, *single_devices],
                               {"script.id": {"$in": [FAN_SCRIPT, SINGLE_SCRIPT]}},
                               "device_id")

    def since(start: float, at: float | None) -> float | None:
        return round(at - start, 3) if at is not None else None

    result = Result(
        devices=opts.devices, singles=opts.singles,
        chunk=role_setting(opts.env, settings, "intake_fanout_chunk"),
        budget_s=role_setting(opts.env, settings, "intake_fanout_budget_s"),
        singles_stored_s=[since(singles_at, t) for t in stored],
        singles_done_s=[since(singles_at, t) for t in done],
        fanout_stored_s=since(fan_at, fan_stored_at), fanout_done_s=since(fan_at, fan_done_at),
        tally=counted.as_dict(), read_back=counted.line(), ok=False, notes=notes)
    stored_ok = result.stored_max_s is not None and result.stored_max_s <= STORED_TARGET_S
    done_ok = result.done_max_s is not None and result.done_max_s <= DONE_TARGET_S
    if not stored_ok:
        notes.append(f"a single was stored later than {STORED_TARGET_S:g} s after its push")
    if not done_ok:
        notes.append(f"a single was done later than {DONE_TARGET_S:g} s after its push")
    result.ok = stored_ok and done_ok and counted.ok and not notes
    return result


def _watch_singles(db: Any, devices: list[str], pushed_at: float, opts: Options,
                   notes: list[str]) -> tuple[list[float | None], list[float | None]]:
    """Per single: when its task was first seen stored, and first seen `success`."""
    stored: dict[str, float] = {}
    done: dict[str, float] = {}
    deadline = pushed_at + opts.timeout_s
    while len(done) < len(devices):
        if time.monotonic() > deadline:
            notes.append("timed out waiting for the singles")
            break
        now = time.monotonic()
        for doc in db[TASKS].find({"device_id": {"$in": devices},
                                   "script.id": SINGLE_SCRIPT}, {"device_id": 1, "status": 1}):
            stored.setdefault(doc["device_id"], now)
            if doc["status"] == "success":
                done.setdefault(doc["device_id"], now)
        time.sleep(opts.poll_s)
    return [stored.get(d) for d in devices], [done.get(d) for d in devices]


def _until(check: Any, opts: Options, notes: list[str], what: str,
           interval_s: float) -> float | None:
    deadline = time.monotonic() + opts.timeout_s
    while not check():
        if time.monotonic() > deadline:
            notes.append(f"timed out waiting for {what}")
            return None
        time.sleep(interval_s)
    return time.monotonic()


def render(r: Result, out: Console | None = None) -> None:
    out = out or Console()
    t = Table(title=f"fair intake: {r.singles} singles behind a {r.devices:,}-device fan-out",
              show_header=False)
    t.add_row("fan-out chunk", f"at most {r.chunk} devices a round, fewer beyond "
              f"{r.budget_s:g} s a round (SENDSCRIPT_INTAKE_FANOUT_CHUNK, _BUDGET_S)")
    t.add_row("singles stored (push ->)", _spread(r.singles_stored_s)
              + f"  target <= {STORED_TARGET_S:g} s")
    t.add_row("singles done (push ->)", _spread(r.singles_done_s)
              + f"  target <= {DONE_TARGET_S:g} s")
    t.add_row("fan-out stored (push ->)", _s(r.fanout_stored_s))
    t.add_row("fan-out terminal (push ->)", _s(r.fanout_done_s))
    t.add_row("ok", "yes" if r.ok else "[red]no[/red]")
    for note in r.notes:
        t.add_row("note", note)
    out.print(t)
    out.print(r.read_back, markup=False, highlight=False, soft_wrap=True)


def _spread(values: list[float | None]) -> str:
    seen = sorted(v for v in values if v is not None)
    if not seen:
        return "-"
    missing = len(values) - len(seen)
    text = f"min {seen[0]:.2f} s, median {seen[len(seen) // 2]:.2f} s, max {seen[-1]:.2f} s"
    return text + (f" ({missing} never)" if missing else "")


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench.fanout_fairness",
                                description=(__doc__ or "").split("\n")[0])
    d = Options()
    p.add_argument("--devices", type=int, default=d.devices, help="the fan-out's devices")
    p.add_argument("--singles", type=int, default=d.singles)
    p.add_argument("--gap", dest="gap_s", type=float, default=d.gap_s)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--run-ms", type=float, default=d.run_ms)
    p.add_argument("--poll", dest="poll_s", type=float, default=d.poll_s)
    p.add_argument("--timeout", dest="timeout_s", type=float, default=d.timeout_s)
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="a setting for the roles (repeatable)")
    p.add_argument("--keep", action="store_true", help="keep the data directory")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    env = dict(e.split("=", 1) for e in a.env)
    return Options(devices=a.devices, singles=a.singles, gap_s=a.gap_s, workers=a.workers,
                   run_ms=a.run_ms, poll_s=a.poll_s, timeout_s=a.timeout_s, env=env,
                   keep=a.keep, json=a.json)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    result = run(opts)
    if opts.json:
        print(json.dumps({**asdict(result), "stored_max_s": result.stored_max_s,
                          "done_max_s": result.done_max_s}, indent=2))
    else:
        render(result)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
