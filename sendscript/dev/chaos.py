"""Chaos: keep submitting tasks while killing our processes and the servers, then
check invariants 1-5 from Mongo and from the farm's own record.

    python -m bench.chaos --duration 600 --kill-every 6 --restart-every 60

Under a steady load (SDK and raw JSON producers, with some malformed items and
task logs), with the simulator's failure injection on, it repeatedly SIGKILLs a
random worker, the master and the consumer (each restarted at once, as
supervisord would) and stops Redis, Mongo and Pulsar, by SIGKILL or SIGTERM, and
starts them again. Then it waits, within a bound, until every task is terminal
and reports: tasks, kills, restarts, lost, unsettled, overlaps, duplicate,
excess and unexplained sends, repeated fences, and whether every refused input
carries a reason. Every accepted task (an SDK id, or a raw item's number) is read
back from Mongo and the tally printed as every benchmark prints it (sendscript/dev/tally.py:
terminal by status, lost, unfinished, duplicates; a raw item stored twice is
explained only by a push the producer made again). Any finding makes the run fail
(exit status 1).
`tests/chaos/` runs a short version in CI; `python -m bench.chaos` runs it from the
command line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pulsar
import redis

from sendscript.client import SendScriptClient
from sendscript.dev import tally
from sendscript.dev.embedded import EmbeddedServers, free_port
from sendscript.dev.processes import RoleProcess, wait_until
from sendscript.settings import Settings

TERMINAL = frozenset({"success", "failed", "cancelled", "expired"})
MAX_RETRIES = 3
SAMPLES = 20  # ids and details kept per finding: enough to start debugging
STOP_MODES = ("alternate", "random", "sigkill", "sigterm")

# Fast timeouts so silent devices, dead workers and outages resolve in seconds.
CHAOS_SETTINGS: dict[str, Any] = {
    "workers": 2, "worker_concurrency": 16, "heartbeat_interval_s": 0.5,
    "heartbeat_ttl_s": 3.0, "free_check_interval_s": 1.0, "delay_load_interval_s": 1.0,
    "sweep_interval_s": 1.0, "leader_lease_s": 4.0, "orphan_grace_s": 5.0,
    "running_stuck_s": 6.0, "orphan_lock_grace_s": 8.0, "lock_margin_s": 5.0,
    "retry_base_s": 0.3, "retry_factor": 2.0, "retry_cap_s": 3.0,
    "redis_timeout_s": 2.0, "mongo_timeout_s": 2.0, "pulsar_timeout_s": 3.0,
    "central_timeout_s": 3.0, "shutdown_grace_s": 5.0, "log_level": "INFO",
    # The farm fails on purpose here: a sick device sits out seconds, not minutes,
    # and the hard stop (which waits for a person) is out of reach; the breaker and
    # the lower drop-rate levels act and recover by themselves as in production.
    "bench_cooldown_s": 3.0, "bench_cooldown_max_s": 10.0, "drop_hard_stop_at": 1.0,
}
FARM = {"run_ms": 50, "http_error_rate": 0.05, "fail_rate": 0.05, "system_error_rate": 0.05,
        "silent_rate": 0.02, "duplicate_rate": 0.1}
BAD_ITEMS = ["not json at all", "[1, 2]", json.dumps({"device_id": "x"}),
             json.dumps({"device_id": "x", "script": {"id": "s"}, "priority": 42})]
BAD_LOGS = [b"\xff\xfe garbage", json.dumps({"recordId": "r"}).encode()]


@dataclass
class Report:
    duration_s: float = 0.0
    submitted_sdk: int = 0
    submitted_raw: int = 0
    tasks: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    kills: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # Server restarts in all, and by the signal that stopped the server: SIGKILL
    # (no shutdown: Redis loses up to a second of appendfsync-everysec writes) or
    # SIGTERM (a clean stop).
    restarts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    restarts_sigkill: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    restarts_sigterm: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # Roles found dead that nobody killed (restarted as supervisord would).
    exits: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    failed_reasons: dict[str, int] = field(default_factory=dict)
    lost: int = 0  # accepted tasks (SDK ids, raw items) with no task document at the end
    # Every accepted task read back (sendscript/dev/tally.py), and the tally's line.
    tally: dict[str, Any] = field(default_factory=dict)
    read_back: str = ""
    lost_sdk: list[str] = field(default_factory=list)
    lost_raw: list[int] = field(default_factory=list)
    # When the producer had its answer for each lost item (epoch seconds, one line a batch).
    lost_accepted_at: list[str] = field(default_factory=list)
    # Settling: every task terminal and the intake lists empty, within settle_timeout_s.
    settle_s: float = 0.0
    settle_timed_out: bool = False
    unsettled: int = 0  # tasks not terminal at the end (waiting/retry_waiting included)
    unsettled_tasks: list[str] = field(default_factory=list)
    intake_left: dict[str, int] = field(default_factory=dict)
    overlaps: int = 0
    refused_busy: int = 0
    sends: int = 0
    duplicate_sends: int = 0  # one attempt (record) sent twice
    excess_sends: int = 0  # a task sent more than max_retries + 1 times
    unknown_sends: int = 0  # runs of a task id that Mongo does not know
    unknown_send_samples: list[str] = field(default_factory=list)
    # A run beyond a task's first must be explained by an exec record of its own
    # attempt: a recorded retry. Runs without one are failures, whatever the status.
    unexplained_runs: int = 0
    unexplained: list[str] = field(default_factory=list)
    success_reruns: int = 0  # success tasks the farm accepted more than once (all explained)
    success_unexplained: int = 0  # ... of which some run is not explained
    success_run_twice: int = 0  # success tasks the farm ran to SUCCESS more than once
    success_run_twice_tasks: list[str] = field(default_factory=list)
    phantom_success: int = 0  # success tasks no farm run of which ended SUCCESS
    phantom_success_tasks: list[str] = field(default_factory=list)
    records_success_twice: int = 0  # tasks with two exec records marked success
    # Exec records sharing a lock value with an earlier record: the fence counter
    # went back (Redis lost INCRs); same_device ones can release each other's lock.
    fence_repeats: int = 0
    fence_repeats_same_device: int = 0
    fence_repeat_samples: list[str] = field(default_factory=list)
    quarantined: int = 0
    quarantined_without_reason: int = 0
    bad_items_not_quarantined: int = 0
    dead_lettered: int = 0
    dead_lettered_without_reason: int = 0
    bad_logs_not_dead_lettered: int = 0
    # Raw items a producer pushed again after a push whose answer it lost: each may
    # have landed twice. Tasks beyond one per raw item must be explained by these.
    raw_pushes_retried: int = 0
    raw_duplicates: int = 0
    # Tasks the SDK stored though the call raised (the push after the store failed):
    # not counted as submitted, found and run all the same (by the reconcile of the
    # master the SDK named as holder, or by the orphan sweep).
    stored_unreported: int = 0
    # What was killed or restarted when (epoch seconds, as the farm's run times).
    timeline: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """Every broken check, in words; empty when the run is clean."""
        checks = [
            # A restarted simulator forgets its runs: the farm-side checks lose their record.
            (sum(self.exits.values()), f"roles died without being killed: {dict(self.exits)}"),
            (self.lost, f"invariant 2: {self.lost} accepted task(s) lost"),
            (self.settle_timed_out, f"not settled within the bound ({self.settle_s:.0f}s)"),
            (self.unsettled, f"invariant 2: {self.unsettled} task(s) not terminal"),
            (sum(self.intake_left.values()), f"intake lists not empty: {self.intake_left}"),
            (self.overlaps, f"invariant 1: {self.overlaps} overlapping runs"),
            (self.refused_busy, f"invariant 1: the farm refused {self.refused_busy} sends "
                                "to a busy device"),
            (self.duplicate_sends, f"invariant 3: {self.duplicate_sends} attempts sent twice"),
            (self.excess_sends, f"invariant 3: {self.excess_sends} tasks sent more than "
                                "max_retries + 1 times"),
            (self.unknown_sends, f"{self.unknown_sends} sends of tasks Mongo does not know"),
            (self.unexplained_runs, f"invariant 3: {self.unexplained_runs} runs not explained "
                                    "by an exec record of their own attempt"),
            (self.phantom_success, f"{self.phantom_success} success tasks never ran to "
                                   "SUCCESS on the farm"),
            (self.records_success_twice, f"{self.records_success_twice} tasks with two "
                                         "success records"),
            (self.fence_repeats, f"{self.fence_repeats} exec records reuse a fence "
                                 f"({self.fence_repeats_same_device} on the same device)"),
            (self.quarantined_without_reason, "invariant 4: quarantined items without reason"),
            (self.bad_items_not_quarantined, f"invariant 4: {self.bad_items_not_quarantined} "
                                             "malformed items not quarantined"),
            (self.dead_lettered_without_reason, "invariant 4: dead letters without reason"),
            (self.bad_logs_not_dead_lettered, f"invariant 4: {self.bad_logs_not_dead_lettered} "
                                              "malformed task logs not dead-lettered"),
            (self.raw_duplicates > self.raw_pushes_retried,
             f"{self.raw_duplicates} raw items stored twice, only "
             f"{self.raw_pushes_retried} pushed again"),
        ]
        return [text for failed, text in checks if failed]

    def ok(self) -> bool:
        return not self.problems()


# -- checks on what the run left (pure: documents and farm runs in, findings out) -------------
def check_lost(report: Report, tasks: dict[str, dict[str, Any]], sdk_ids: Iterable[str],
               raw_sent: int, accepted_at: dict[str, float] | None = None) -> None:
    """Accepted tasks with no document; raw items stored more than once.

    `accepted_at` ("sdk:<task id>" or "raw:<number>" -> when the producer's call
    returned) dates the lost ones, to set beside the kills and restarts."""
    sdk_ids = list(sdk_ids)
    report.submitted_sdk, report.submitted_raw = len(sdk_ids), raw_sent
    known = set(sdk_ids)
    counted = tally.count([*sdk_ids, *(f"raw:{n}" for n in range(raw_sent))],
                          ((_accepted_key(i, d), d["status"]) for i, d in tasks.items()))
    report.tally, report.read_back = counted.as_dict(), counted.line()
    report.lost_sdk = [i for i in sdk_ids if i not in tasks]
    raw_tasks = Counter(_raw_number(d) for d in tasks.values() if _raw_number(d) is not None)
    report.lost_raw = [n for n in range(raw_sent) if n not in raw_tasks]
    report.lost = counted.lost
    when: dict[float, list[str]] = defaultdict(list)
    for key in [f"sdk:{i}" for i in report.lost_sdk] + [f"raw:{n}" for n in report.lost_raw]:
        when[(accepted_at or {}).get(key, 0.0)].append(key)
    report.lost_accepted_at = [f"{at:.3f}: {', '.join(keys)}" for at, keys in sorted(
        when.items())][:SAMPLES]
    report.raw_duplicates = sum(n - 1 for n in raw_tasks.values())
    report.stored_unreported = sum(1 for i, d in tasks.items()
                                   if i not in known and _raw_number(d) is None)


def check_settled(report: Report, tasks: dict[str, dict[str, Any]]) -> None:
    """Every task terminal: scheduled ones (waiting, retry_waiting) are not done."""
    report.tasks = len(tasks)
    report.statuses = dict(Counter(d["status"] for d in tasks.values()))
    open_ = [d for d in tasks.values() if d["status"] not in TERMINAL]
    report.unsettled = len(open_)
    report.unsettled_tasks = [
        f"{d['_id']} {d['status']} attempt {d.get('attempt')} device {d.get('device_id')} "
        f"master {d.get('master')} updated {d.get('updated_at')} last_error {d.get('last_error')!r}"
        for d in open_[:SAMPLES]]
    reasons = Counter(_reason(d.get("last_error") or "") for d in tasks.values()
                      if d["status"] == "failed")
    report.failed_reasons = dict(reasons.most_common(8))


def check_sends(report: Report, tasks: dict[str, dict[str, Any]],
                records: Iterable[dict[str, Any]], runs: list[dict[str, Any]]) -> None:
    """What the farm ran against what Mongo recorded (invariants 1 and 3, fences)."""
    records_by_id = {r["_id"]: r for r in records}
    report.sends = len(runs)
    by_device: dict[str, list[dict[str, Any]]] = defaultdict(list)
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    per_record: Counter[str] = Counter()
    for run in runs:
        by_device[run["device_id"]].append(run)
        by_task[run["task_id"]].append(run)
        per_record[run["record_id"]] += 1
    for device_runs in by_device.values():
        device_runs.sort(key=lambda run: run["started"])
        for a, b in itertools.pairwise(device_runs):
            if a["ended"] is None or a["ended"] > b["started"]:
                report.overlaps += 1
    report.duplicate_sends = sum(n - 1 for n in per_record.values() if n > 1)
    for task_id, task_runs in by_task.items():
        doc = tasks.get(task_id)
        if doc is None:
            report.unknown_sends += len(task_runs)
            if len(report.unknown_send_samples) < SAMPLES:
                report.unknown_send_samples.append(f"task {task_id}: " + " ".join(
                    f"[{r['record_id']} {r['device_id']} {r['outcome']} at {r['started']:.3f}]"
                    for r in task_runs))
            continue
        if len(task_runs) > doc.get("max_retries", MAX_RETRIES) + 1:
            report.excess_sends += 1
        attempts = set()
        for run in task_runs:
            record = records_by_id.get(run["record_id"])
            if record is not None and record["task_id"] == task_id:
                attempts.add(record["attempt"])
        unexplained = len(task_runs) - len(attempts)
        success = doc["status"] == "success"
        if unexplained:
            report.unexplained_runs += unexplained
            report.success_unexplained += success
            if len(report.unexplained) < SAMPLES:
                report.unexplained.append(_runs_detail(doc, task_runs, records_by_id))
        if success and len(task_runs) > 1:
            report.success_reruns += 1
        if success and sum(run["outcome"] == "SUCCESS" for run in task_runs) > 1:
            report.success_run_twice += 1
            if len(report.success_run_twice_tasks) < SAMPLES:
                report.success_run_twice_tasks.append(
                    _runs_detail(doc, task_runs, records_by_id))
    for task_id, doc in tasks.items():
        if doc["status"] == "success" and not any(
                run["outcome"] == "SUCCESS" for run in by_task.get(task_id, [])):
            report.phantom_success += 1
            if len(report.phantom_success_tasks) < SAMPLES:
                report.phantom_success_tasks.append(
                    _runs_detail(doc, by_task.get(task_id, []), records_by_id))
    successes = Counter(r["task_id"] for r in records_by_id.values() if r["status"] == "success")
    report.records_success_twice = sum(1 for n in successes.values() if n > 1)
    check_fences(report, records_by_id.values())


def check_fences(report: Report, records: Iterable[dict[str, Any]]) -> None:
    """Every lock value comes from one INCR: two records with the same one mean the
    counter went back, and a late release of one could free the other's lock."""
    by_fence: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if record.get("lock_value"):
            by_fence[int(record["lock_value"])].append(record)
    for fence, same in sorted(by_fence.items()):
        if len(same) < 2:
            continue
        report.fence_repeats += len(same) - 1
        devices = Counter(r["device_id"] for r in same)
        report.fence_repeats_same_device += sum(n - 1 for n in devices.values())
        if len(report.fence_repeat_samples) < SAMPLES:
            report.fence_repeat_samples.append(f"fence {fence}: " + ", ".join(
                f"{r['device_id']}/{r['task_id']}#{r['attempt']}" for r in same))


def check_refusals(report: Report, quarantined: list[bytes], dead_letters: list[bytes]) -> None:
    """Every malformed item and task log refused, each with a reason (invariant 4)."""
    items = [json.loads(q) for q in quarantined]
    report.quarantined = len(items)
    report.quarantined_without_reason = sum(1 for q in items if not q.get("reason"))
    refused = {q.get("item") for q in items}
    report.bad_items_not_quarantined = sum(1 for bad in BAD_ITEMS if bad not in refused)
    letters = [json.loads(d) for d in dead_letters]
    report.dead_lettered = len(letters)
    report.dead_lettered_without_reason = sum(1 for d in letters if not d.get("reason"))
    lettered = {d.get("data") for d in letters}
    report.bad_logs_not_dead_lettered = sum(
        1 for bad in BAD_LOGS if bad.decode("utf-8", "replace") not in lettered)


def _accepted_key(task_id: str, doc: dict[str, Any]) -> str:
    """How the producer named a stored task: a raw item by its number, else its id."""
    n = _raw_number(doc)
    return task_id if n is None else f"raw:{n}"


def _raw_number(doc: dict[str, Any]) -> int | None:
    args = (doc.get("script") or {}).get("args") or {}
    return args.get("raw") if isinstance(args, dict) else None


def _runs_detail(doc: dict[str, Any], runs: list[dict[str, Any]],
                 records: dict[str, dict[str, Any]]) -> str:
    """One task's runs on the farm, each with the exec record (attempt, status) behind it."""
    parts = []
    for run in sorted(runs, key=lambda r: r["started"]):
        rec = records.get(run["record_id"])
        behind = (f"attempt {rec['attempt']} record {rec['status']}" if rec is not None
                  else "no exec record")
        parts.append(f"[{run['record_id']} {run['outcome']} at {run['started']:.3f}: {behind}]")
    return (f"task {doc['_id']} ({doc['status']}, attempt {doc.get('attempt')}, device "
            f"{doc.get('device_id')}): {len(runs)} run(s) " + " ".join(parts))


def _reason(error: str) -> str:
    """The kind of a failure, without its ids and numbers."""
    head = error.split(" (attempts exhausted")[0]
    return head.split(":")[0] + (": " + head.split(":")[1].strip()[:40] if ":" in head else "")


def stop_signal(mode: str, nth: int, rand: random.Random) -> str:
    """How to stop a server for its nth restart (0-based): SIGKILL first when alternating."""
    if mode == "alternate":
        return "SIGKILL" if nth % 2 == 0 else "SIGTERM"
    if mode == "random":
        return rand.choice(("SIGKILL", "SIGTERM"))
    return mode.upper()


class Chaos:
    def __init__(self, workdir: Path, *, devices: int, rate: float, seed: int,
                 server_stop: str = "alternate") -> None:
        if server_stop not in STOP_MODES:
            raise ValueError(f"server_stop must be one of {STOP_MODES}")
        self.workdir = workdir
        self.devices = devices
        self.rate = rate
        self.task_timeout_s = 6.0  # each submitted task's result timeout
        self.server_stop = server_stop
        self.rand = random.Random(seed)
        self.servers = EmbeddedServers(workdir / "servers")
        self.report = Report()
        self.sdk_ids: list[str] = []
        self.raw_sent = 0
        self.accepted_at: dict[str, float] = {}
        self._stop_load = threading.Event()
        self.roles: dict[str, RoleProcess] = {}
        self._restart_error: Exception | None = None
        self._server_rand = random.Random(seed + 1)  # the restart thread's own

    # -- the service --------------------------------------------------------------------
    def start(self) -> None:
        urls = self.servers.start()
        port = free_port()
        self.settings = Settings(**urls, central_url=f"http://127.0.0.1:{port}",
                                 key_prefix="chaos", master_id="chaos-master",
                                 task_log_topic="persistent://public/default/chaos-log",
                                 **CHAOS_SETTINGS)
        self.env = {**os.environ, **self.settings.to_env()}
        args = ["simulate", "--port", str(port), "--no-progress", "--seed", "7"]
        for key, value in FARM.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        self._role("simulator", args)
        wait_until(self._farm_up, 30, what="the simulator")
        self._role("consumer", ["consumer"])
        self._role("master", ["master"])
        wait_until(self._master_up, 60, 0.2, what="the master")

    def _role(self, name: str, args: list[str]) -> None:
        self.roles[name] = RoleProcess(name, args, self.env, self.workdir / "logs").start()

    def _farm_up(self) -> bool:
        try:
            return httpx.get(f"{self.settings.central_url}/health", timeout=1).is_success
        except httpx.HTTPError:
            return False

    def _redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.settings.redis_url or "", socket_timeout=2,
                                    socket_connect_timeout=2)

    def _mongo_db(self) -> Any:
        from pymongo import MongoClient

        client: MongoClient[dict[str, Any]] = MongoClient(
            self.settings.mongo_url, serverSelectionTimeoutMS=5000, socketTimeoutMS=60000)
        return client, client.get_default_database("sendscript")

    def _master_info(self) -> dict[str, Any] | None:
        try:
            r = self._redis()
            raw = r.hget(self.settings.keys.masters, self.settings.master_id)
            r.close()
            return json.loads(raw) if raw else None
        except redis.RedisError:
            return None

    def _master_up(self) -> bool:
        info = self._master_info()
        return bool(info and info.get("workers_alive") == self.settings.workers
                    and info.get("pid") == self.roles["master"].pid)

    # -- load -----------------------------------------------------------------------------
    def _load(self) -> None:
        """Submit at a steady rate, half SDK, half raw JSON; retry through outages.

        A raw batch whose push may have failed is pushed again before the load stops:
        each raw item counted as sent was accepted at least once.
        """
        client: SendScriptClient | None = None
        n = 0
        pending_raw: list[str] | None = None  # a raw batch whose push may have failed
        next_at = time.monotonic()
        while not self._stop_load.is_set() or pending_raw is not None:
            # A short result timeout: a silent device holds its lock seconds, not minutes.
            specs = [{"device_id": f"dev-{self.rand.randrange(self.devices):03d}",
                      "script": {"id": "chaos", "args": {"n": n + i}},
                      "timeout_s": self.task_timeout_s}
                     for i in range(10)]
            try:
                if client is None:
                    client = SendScriptClient(self.settings)
                if pending_raw is not None:  # push it again: at least once
                    self.report.raw_pushes_retried += len(pending_raw)
                    client.push_raw(pending_raw)
                    self._accepted(f"raw:{json.loads(x)['script']['args']['raw']}"
                                   for x in pending_raw)
                    pending_raw = None
                    continue
                if n % 20 == 0:
                    raw = [json.dumps({**s, "script": {"id": "chaos", "args": {
                        "raw": self.raw_sent + i}}}) for i, s in enumerate(specs)]
                    self.raw_sent += len(raw)
                    pending_raw = raw
                    client.push_raw(raw)
                    self._accepted(f"raw:{self.raw_sent - len(raw) + i}" for i in range(len(raw)))
                    pending_raw = None
                else:
                    ids = [s.task_id for s in client.submit_many(specs)]
                    self._accepted(f"sdk:{i}" for i in ids)
                    self.sdk_ids += ids
                n += 10
            except Exception:  # a server is away: the producer retries, as a real one would
                if client is not None:
                    try:
                        client.close()
                    except Exception:
                        pass
                client = None
                time.sleep(0.5)
                continue
            next_at += 10 / self.rate  # a batch of 10; the rate may change
            time.sleep(max(0.0, next_at - time.monotonic()))
        if client is not None:
            client.close()

    def _accepted(self, keys: Iterable[str]) -> None:
        now = time.time()
        for key in keys:
            self.accepted_at[key] = now

    def _bad_inputs(self) -> None:
        r = self._redis()
        r.lpush(self.settings.keys.ready, *BAD_ITEMS)
        r.close()
        client = pulsar.Client(self.settings.pulsar_url or "", operation_timeout_seconds=10)
        try:
            producer = client.create_producer(self.settings.task_log_topic)
            for data in BAD_LOGS:
                producer.send(data)
        finally:
            client.close()

    # -- chaos ------------------------------------------------------------------------------
    def kill_worker(self) -> bool:
        info = self._master_info() or {}
        names = info.get("worker_names") or []
        if not names:
            return False
        pid = int(self.rand.choice(names).rsplit(":", 1)[1])
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        self.report.kills["worker"] += 1
        self._event(f"SIGKILL worker {pid}")
        return True

    def kill_role(self, name: str) -> None:
        self._event(f"SIGKILL {name} {self.roles[name].pid}")
        self.roles[name].kill()
        self.report.kills[name] += 1
        self._role(name, [name])
        if name == "master":
            wait_until(self._master_up, 60, 0.2, what="the restarted master")

    def restart_server(self, name: str, down_s: float) -> str:
        """Stop a server by SIGKILL or SIGTERM, keep it down, start it on the same data."""
        server = self.servers[name]
        how = stop_signal(self.server_stop, self.report.restarts[name], self._server_rand)
        self._event(f"{how} {name}")
        if how == "SIGKILL":
            server.kill()
            self.report.restarts_sigkill[name] += 1
        else:
            server.stop()
            self.report.restarts_sigterm[name] += 1
        time.sleep(down_s)
        server.start()
        self._event(f"{name} up again")
        self.report.restarts[name] += 1
        return how

    def _event(self, what: str) -> None:
        self.report.timeline.append(f"{time.time():.3f} {what}")

    def run(self, duration_s: float, kill_every_s: float, restart_every_s: float,
            down_s: float, settle_timeout_s: float) -> Report:
        started = time.monotonic()
        self._bad_inputs()
        load = threading.Thread(target=self._load, daemon=True)
        load.start()
        # Server restarts on a thread of their own: kills go on while a server is down.
        restarts = threading.Thread(target=self._restarts, daemon=True,
                                    args=(started + duration_s, restart_every_s, down_s))
        restarts.start()
        kinds = ["worker", "master", "consumer"]
        next_kill = started + kill_every_s
        k = 0
        while time.monotonic() - started < duration_s and self._restart_error is None:
            if time.monotonic() >= next_kill:
                kind = kinds[k % 3]
                k += 1
                if kind == "worker":
                    self.kill_worker()
                else:
                    self.kill_role(kind)
                next_kill = time.monotonic() + kill_every_s * self.rand.uniform(0.6, 1.4)
            self._autorestart()
            time.sleep(0.2)
        restarts.join(120)
        if self._restart_error is not None or restarts.is_alive():
            raise RuntimeError(f"a server restart failed: {self._restart_error!r}")
        self._stop_load.set()
        load.join(60)
        if load.is_alive():
            raise RuntimeError("the load did not stop within 60s (a raw push kept failing)")
        self.report.duration_s = time.monotonic() - started
        self._settle(settle_timeout_s)
        self._check()
        return self.report

    def _restarts(self, until: float, every_s: float, down_s: float) -> None:
        """Redis, Mongo and Pulsar in turn, one every `every_s`, until the chaos ends."""
        servers = ["redis", "mongo", "pulsar"]
        s = 0
        try:
            while time.monotonic() + every_s < until:
                time.sleep(every_s)
                self.restart_server(servers[s % 3], down_s)
                s += 1
        except Exception as exc:  # reported by run(): a server that cannot start is fatal
            self._restart_error = exc

    def _autorestart(self) -> None:
        """supervisord's autorestart; a role that died unkilled is counted."""
        for name, role in list(self.roles.items()):
            if not role.running:
                self.report.exits[name] += 1
                self._event(f"{name} found dead (exit code {role.proc and role.proc.returncode})")
                self._role(name, role.args)

    # -- checks -------------------------------------------------------------------------------
    def _lists(self) -> dict[str, str]:
        """The intake lists that must be empty once the run has settled."""
        keys = self.settings.keys
        return {"ready": keys.ready, "staging": keys.staging(self.settings.master_id),
                "processing": keys.processing(self.settings.master_id)}

    def _tend(self) -> None:
        """What keeps the roles up while the run settles."""
        self._autorestart()

    def _settle(self, timeout_s: float) -> None:
        """Wait until every task is terminal and nothing is left in the intake lists."""
        started = time.monotonic()
        lists = self._lists()
        mongo, db = self._mongo_db()
        r = self._redis()
        try:
            while True:
                try:
                    open_ = db.script_tasks.count_documents({"status": {"$nin": sorted(TERMINAL)}})
                    left = {name: int(r.llen(key)) for name, key in lists.items()}
                except Exception:
                    open_, left = -1, {}
                if open_ == 0 and left and not any(left.values()):
                    break
                if time.monotonic() - started > timeout_s:
                    self.report.settle_timed_out = True
                    break
                self._tend()  # a role dying now would never settle
                time.sleep(1.0)
        finally:
            mongo.close()
            r.close()
        self.report.settle_s = time.monotonic() - started

    def _stored(self, db: Any, *more: str) -> tuple[dict[str, dict], list[dict]]:
        """Every task (by id, with `more` fields) and every exec record, as Mongo has them."""
        fields = ["status", "script", "attempt", "max_retries", "last_error", "device_id",
                  "updated_at", "master", *more]
        tasks = {d["_id"]: d for d in db.script_tasks.find({}, dict.fromkeys(fields, 1))}
        records = list(db.task_exec_records.find({}, {
            "task_id": 1, "attempt": 1, "status": 1, "device_id": 1, "lock_value": 1}))
        return tasks, records

    def _check_tasks_and_sends(self, tasks: dict[str, dict], records: list[dict]) -> list[dict]:
        """Settled, nothing lost, and the farm's runs against the records; the runs."""
        rep = self.report
        check_settled(rep, tasks)
        check_lost(rep, tasks, self.sdk_ids, self.raw_sent, self.accepted_at)
        farm = httpx.get(f"{self.settings.central_url}/stats", timeout=30).json()
        runs = httpx.get(f"{self.settings.central_url}/runs", timeout=60).json()
        rep.refused_busy = farm["refused_busy"]
        check_sends(rep, tasks, records, runs)
        return runs

    def _check(self) -> None:
        rep = self.report
        mongo, db = self._mongo_db()
        try:
            tasks, records = self._stored(db)
        finally:
            mongo.close()
        self._check_tasks_and_sends(tasks, records)

        r = self._redis()
        try:
            keys = self.settings.keys
            quarantined = r.lrange(keys.quarantine, 0, -1)
            lists = {"ready": keys.ready, "staging": keys.staging(self.settings.master_id),
                     "processing": keys.processing(self.settings.master_id)}
            rep.intake_left = {n: int(r.llen(k)) for n, k in lists.items() if r.llen(k)}
        finally:
            r.close()
        check_refusals(rep, quarantined, self._dead_letters())

    def _dead_letters(self) -> list[bytes]:
        client = pulsar.Client(self.settings.pulsar_url or "", operation_timeout_seconds=10)
        try:
            reader = client.create_reader(self.settings.dlq_topic, pulsar.MessageId.earliest)
            out = []
            while reader.has_message_available():
                out.append(reader.read_next(timeout_millis=5000).data())
            return out
        finally:
            client.close()

    def stop(self) -> None:
        for role in self.roles.values():
            role.stop(timeout_s=20)
        self.servers.stop()

    def log_tails(self) -> str:
        return "\n".join(f"--- {name}\n{role.log_tail(40)}" for name, role in self.roles.items())


def run_chaos(workdir: Path, *, duration_s: float, kill_every_s: float, restart_every_s: float,
              down_s: float = 2.0, devices: int = 40, rate: float = 20.0, seed: int = 1,
              settle_timeout_s: float = 180.0, server_stop: str = "alternate") -> Report:
    chaos = Chaos(workdir, devices=devices, rate=rate, seed=seed, server_stop=server_stop)
    try:
        chaos.start()
        report = chaos.run(duration_s, kill_every_s, restart_every_s, down_s, settle_timeout_s)
        if not report.ok():
            print(chaos.log_tails(), file=sys.stderr)
        return report
    finally:
        chaos.stop()


def print_report(report: Report) -> None:
    settled = "TIMED OUT settling" if report.settle_timed_out else "settled"
    print(f"chaos: {report.duration_s:.0f}s of chaos, {settled} in {report.settle_s:.0f}s")
    print(f"  tasks {report.tasks} (sdk {report.submitted_sdk}, raw {report.submitted_raw}); "
          f"statuses {report.statuses}; sends to the farm {report.sends}")
    print(f"  kills {dict(report.kills)}; roles that died unkilled {dict(report.exits)}")
    print(f"  server restarts {dict(report.restarts)}: by SIGKILL "
          f"{dict(report.restarts_sigkill)}, by SIGTERM {dict(report.restarts_sigterm)}")
    print(f"  {report.read_back}")
    print(f"  lost {report.lost} (sdk {report.lost_sdk[:SAMPLES]}, raw "
          f"{report.lost_raw[:SAMPLES]}); not terminal {report.unsettled}; intake lists "
          f"left {report.intake_left}")
    for line in report.lost_accepted_at:
        print(f"    lost, accepted at {line}")
    for line in report.unsettled_tasks:
        print(f"    not terminal: {line}")
    print(f"  overlaps {report.overlaps} (farm 409s {report.refused_busy}); duplicate sends "
          f"{report.duplicate_sends}; tasks over max_retries+1 sends {report.excess_sends}; "
          f"sends of unknown tasks {report.unknown_sends}")
    for line in report.unknown_send_samples:
        print(f"    unknown task sent: {line}")
    print(f"  runs not explained by an exec record of their own attempt "
          f"{report.unexplained_runs} (on success tasks: {report.success_unexplained})")
    for line in report.unexplained:
        print(f"    unexplained: {line}")
    print(f"  success tasks accepted more than once {report.success_reruns} (each extra run a "
          f"recorded retry); run to SUCCESS more than once {report.success_run_twice}; "
          f"success without a SUCCESS run {report.phantom_success}; two success records "
          f"{report.records_success_twice}")
    for line in report.success_run_twice_tasks + report.phantom_success_tasks:
        print(f"    success: {line}")
    print(f"  fences reused {report.fence_repeats} (same device "
          f"{report.fence_repeats_same_device})")
    for line in report.fence_repeat_samples:
        print(f"    {line}")
    print(f"  tasks the SDK stored though its call failed (run by their master's reconcile "
          f"or the orphan sweep): "
          f"{report.stored_unreported}")
    print(f"  raw items stored twice {report.raw_duplicates} (pushed again by the producer "
          f"after a lost answer: {report.raw_pushes_retried})")
    print(f"  failed tasks by reason (after max_retries + 1 attempts): {report.failed_reasons}")
    print(f"  quarantined {report.quarantined} ({report.quarantined_without_reason} without "
          f"reason, {report.bad_items_not_quarantined} bad items missing); dead-lettered "
          f"{report.dead_lettered} ({report.dead_lettered_without_reason} without reason, "
          f"{report.bad_logs_not_dead_lettered} bad logs missing)")
    problems = report.problems()
    if problems:
        print(f"  timeline: {'; '.join(report.timeline)}")
    print("  OK" if not problems else "  FAILED: " + "; ".join(problems))


def report_json(report: Report) -> dict[str, Any]:
    """The report as plain JSON types (asdict cannot rebuild its defaultdicts)."""
    return {name: dict(value) if isinstance(value, defaultdict) else value
            for name, value in vars(report).items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of chaos")
    parser.add_argument("--kill-every", type=float, default=6.0,
                        help="seconds between kills (worker, master, consumer in turn)")
    parser.add_argument("--restart-every", type=float, default=60.0,
                        help="seconds between server restarts (redis, mongo, pulsar in turn)")
    parser.add_argument("--down", type=float, default=2.0, help="seconds a server stays down")
    parser.add_argument("--server-stop", choices=STOP_MODES, default="alternate",
                        help="how servers are stopped: alternate (SIGKILL first, then "
                             "SIGTERM, per server), random, or always one signal")
    parser.add_argument("--settle-timeout", type=float, default=180.0,
                        help="seconds to wait, after the chaos, for every task to be terminal")
    parser.add_argument("--devices", type=int, default=40)
    parser.add_argument("--rate", type=float, default=20.0, help="tasks submitted per second")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="also print the report as JSON")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the servers' data and the roles' logs here (default: a "
                             "temporary directory, removed at the end)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sendscript-chaos-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        report = run_chaos(workdir, duration_s=args.duration, kill_every_s=args.kill_every,
                           restart_every_s=args.restart_every, down_s=args.down,
                           devices=args.devices, rate=args.rate, seed=args.seed,
                           settle_timeout_s=args.settle_timeout, server_stop=args.server_stop)
    print_report(report)
    if args.json:
        print(json.dumps(report_json(report)))
    return 0 if report.ok() else 1


if __name__ == "__main__":
    raise SystemExit(main())
