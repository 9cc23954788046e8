"""Many hosts for real: masters and consumers each in a network namespace of its own
(veth pairs to a bridge), each host under a CPU quota (cgroup), against a Redis master
with a replica and three Sentinels, the embedded Mongo and Pulsar, and the simulated
farm; faults under load, checked from the farm's side; then throughput by host count.

    sudo python -m bench.scaleout                       # 5,000 tasks with faults, then 1-3 hosts
    python -m bench.scaleout --tasks 600 --no-scaling   # the fault run alone, shorter
    python -m bench.scaleout --env SENDSCRIPT_REDIS_MIN_REPLICAS=1   # passed to every role

The servers and the farm run in the root namespace and listen only on the bridge's
address (a private 10.251.N.0/24 made for the run); every role runs as
`ip netns exec <host> python -m sendscript master|consumer` with its settings in
`SENDSCRIPT_*` variables. The fault run submits `--tasks` tasks (SDK and raw JSON,
with malformed items and task logs, and a cron schedule firing every 2 s) while, in
turn: the Redis master is SIGKILLed (Sentinel promotes the replica), the leading
master's host is partitioned (its link down) for longer than the leader lease and then
healed, Mongo steps down (the embedded SecantusDB runs as a one-member replica set;
`replSetStepDown` makes it a secondary for a few seconds, every write meanwhile
answered NotWritablePrimary), and a master is SIGKILLed and restarted. It then
waits until every task is terminal and checks, with the chaos run's checks
(sendscript/dev/chaos.py, fires.py): 0 overlaps (farm 409s), 0 lost, no attempt
sent twice and no task sent more than max_retries + 1 times or without a recorded
attempt, each cron fire once, nothing deleted early.

Scaling: for 1, 2 and 3 master hosts, with each master host's quota the bottleneck
(Mongo standalone again for this phase: SecantusDB as a replica set would be it),
`--scale-tasks` raw items are pushed at once and read back from Mongo: tasks/s is
their count over the time from the push to the last `finished_at`. Exit status 1 on
any finding or a ratio under `--min-ratio` of N x one host's rate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import redis

from sendscript import connect
from sendscript.dev.chaos import (
    CHAOS_SETTINGS,
    FARM,
    TERMINAL,
    Chaos,
    Report,
    check_refusals,
    print_report,
)
from sendscript.dev.cputime import CpuTimes
from sendscript.dev.embedded import MongoServer, PulsarServer, free_port
from sendscript.dev.fires import FireTally, KeptTally, check_fires, check_kept
from sendscript.dev.hosts import Hosts
from sendscript.dev.processes import RoleProcess, wait_until
from sendscript.dev.readback import tasks_by_arg
from sendscript.dev.topologies import MongoReplicaSet, SentinelGroup
from sendscript.schedules import Schedule
from sendscript.settings import Settings
from sendscript.store import TASKS

CRON = "*/2 * * * * *"
CRON_INTERVAL_S = 2.0
CRON_DEVICES = ["cron-0", "cron-1", "cron-2"]
SCHEDULE = "scaleout-cron"
# The farm for the scaling phase: no failures, short runs, so the masters' work decides.
# The periodic duties at their production intervals and the sweeps at their production
# graces, not the fault run's quick ones: at those an idle master spends about 0.02 CPU,
# a large share of a small quota, and a worker starved by the quota may take longer from
# lock to record than the quick graces let it send (it then undoes the attempt).
SCALING_INTERVALS = {key: Settings.model_fields[key].default for key in (
    "heartbeat_interval_s", "heartbeat_ttl_s", "free_check_interval_s",
    "delay_load_interval_s", "sweep_interval_s", "leader_lease_s", "orphan_grace_s",
    "running_stuck_s", "orphan_lock_grace_s")}
FAST_FARM = ["--run-ms", "20", "--jitter", "0.2", "--no-progress", "--seed", "3"]

# The tasks' result timeout in the fault run: on the loaded machine a result took up to
# 21 s from the device to Mongo, and at 6 s the result timeout retried tasks whose
# success was on its way (two runs and, by a race in the timeout sweep, two success
# records). A silent device (2 % of runs) holds its lock this long.
FAULT_RUN_TASK_TIMEOUT_S = 30.0


@dataclass
class Options:
    masters: int = 3
    consumers: int = 2
    tasks: int = 5000
    # Tasks submitted per second in the fault run, and the devices they go to: below
    # what the cluster settles on a loaded 2-core machine with SecantusDB as a replica
    # set (every retryable write recorded, each write slower past 10,000; at 40 tasks/s
    # a worker's lock-to-record step took 4-30 s), and about 0.1 task/s a device.
    rate: float = 12.0
    devices: int = 120
    # Once `tasks` are submitted, the load goes on at this rate until the last fault is
    # over: every fault strikes under load, and a short run stays short.
    trickle_rate: float = 2.0
    task_timeout_s: float = FAULT_RUN_TASK_TIMEOUT_S  # each task's result timeout
    master_cpu: float = 0.25  # CPUs per master host
    consumer_cpu: float = 0.5
    workers: int = 2
    fault_gap_s: float = 6.0  # between one fault's end and the next
    settle_timeout_s: float = 300.0
    scaling: bool = True
    scale_tasks: int = 1000
    scale_devices: int = 300
    # A master host's quota while throughput is measured: small enough that the masters,
    # not the shared servers (Mongo above all) nor the rest of a 2-core machine, decide.
    scale_master_cpu: float = 0.05
    min_ratio: float = 0.8
    seed: int = 1
    extra_env: dict[str, str] = field(default_factory=dict)


@dataclass
class Faults:
    """What was done to the cluster and what it did, for the tally."""

    redis_failover_s: float | None = None
    partitioned: str | None = None
    partition_s: float = 0.0
    leader_before: str | None = None
    leader_during: str | None = None  # who held the lease while the leader was cut off
    leader_after: str | None = None
    mongo_stepdown: str = "not run"
    master_killed: str | None = None
    master_back_s: float | None = None
    errors: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        out = [f"fault step failed: {e}" for e in self.errors]
        if self.redis_failover_s is None:
            out.append("no Redis failover")
        if not self.mongo_stepdown.startswith("stepped down"):
            out.append(f"no Mongo step-down ({self.mongo_stepdown})")
        if self.partitioned and self.leader_during in (None, self.leader_before):
            out.append(f"no other master took the lease while {self.partitioned} was cut off "
                       f"(held by {self.leader_during})")
        return out


@dataclass
class ScaleRow:
    hosts: int
    tasks: int
    seconds: float
    rate: float
    throttled: float  # share of the master hosts' CPU periods that hit the quota
    statuses: dict[str, int]
    lost: int
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds by role, server
    ready_max: int = 0  # the most items seen waiting in the ready list
    by_master: dict[str, int] = field(default_factory=dict)  # finished tasks by holder


# The fault run's sweep graces: a worker sends only within half the shortest of them and
# the lock margin from its lock (worker/handler.py), and on a loaded machine with the
# replica-set Mongo the lock-to-record step takes seconds; at the quick chaos graces
# (8 s, 6 s) the workers undid hundreds of attempts a minute. The recoveries these
# graces time take longer.
FAULT_RUN_GRACES = {"orphan_lock_grace_s": 30.0, "running_stuck_s": 30.0,
                    "lock_margin_s": 30.0}


class Cluster:
    """Servers on the bridge, hosts in namespaces, roles started in them."""

    def __init__(self, workdir: Path, opts: Options) -> None:
        self.workdir = workdir
        self.opts = opts
        names = [f"m{i + 1}" for i in range(opts.masters)] + \
                [f"c{i + 1}" for i in range(opts.consumers)]
        cpu = {n: opts.master_cpu if n.startswith("m") else opts.consumer_cpu for n in names}
        self.hosts = Hosts(names, cpu)
        self.roles: dict[str, RoleProcess] = {}
        self.group: SentinelGroup | None = None
        self.mongo: MongoReplicaSet | MongoServer | None = None
        self.pulsar: PulsarServer | None = None

    def start(self) -> None:
        self.hosts.start()
        ip = self.hosts.bridge_ip
        self.group = SentinelGroup(self.workdir / "redis", down_after_ms=1000, sentinels=3,
                                   host=ip)
        self.group.start()
        self.mongo = MongoReplicaSet(self.workdir / "servers")
        self.mongo.host = ip
        self.mongo.start()
        self.pulsar = PulsarServer(self.workdir / "servers")
        self.pulsar.host = ip
        self.pulsar.start()

    def settings(self, prefix: str, **overrides: Any) -> Settings:
        assert self.group and self.mongo and self.pulsar
        mongo_url = (self.mongo.database_url(prefix) if isinstance(self.mongo, MongoReplicaSet)
                     else f"{self.mongo.url}{prefix}")
        return Settings(redis_url=self.group.url, mongo_url=mongo_url,
                        pulsar_url=self.pulsar.url,
                        central_url=f"http://{self.hosts.bridge_ip}:{free_port()}",
                        key_prefix=prefix, master_id=f"{prefix}-none",
                        task_log_topic=f"persistent://public/default/{prefix}-log",
                        **{**CHAOS_SETTINGS, "workers": self.opts.workers, **overrides})

    def use_standalone_mongo(self) -> None:
        """A fresh standalone SecantusDB in place of the replica set, for the scaling
        phase: there the masters' CPU quota must be the bottleneck, and SecantusDB as a
        replica set (retryable writes on, each recorded; past 10,000 records a write
        costs 6-8 ms instead of 0.4) would be, long before the masters."""
        if self.mongo is not None:
            self.mongo.stop()
        self.mongo = MongoServer(self.workdir / "servers-scaling")
        self.mongo.host = self.hosts.bridge_ip
        self.mongo.start()

    def cpu_roots(self) -> dict[str, int]:
        """The pids whose process trees the CPU split names: roles and servers."""
        roots = {n: r.pid for n, r in self.roles.items() if r.running}
        servers: list[tuple[str, Any]] = [("mongo", self.mongo), ("pulsar", self.pulsar)]
        if self.group is not None:
            servers += [("redis", self.group.master), ("redis", self.group.replica)]
            servers += [("sentinels", s) for s in self.group.sentinels]
        for i, (name, server) in enumerate(servers):
            if server is not None and server.running:
                roots[name if name not in roots else f"{name}.{i}"] = server.proc.pid
        return roots

    def env(self, settings: Settings) -> dict[str, str]:
        return {**os.environ, **settings.to_env(), **self.opts.extra_env}

    def start_role(self, name: str, args: list[str], env: dict[str, str]) -> RoleProcess:
        host = name if name in self.hosts.names else None
        wrap = (lambda argv, h=host: self.hosts.command(h, argv)) if host else None
        if name.startswith("m"):
            env = {**env, "SENDSCRIPT_MASTER_ID": name}
        self.roles[name] = RoleProcess(name, args, env, self.workdir / "logs", wrap).start()
        return self.roles[name]

    def start_farm(self, settings: Settings, env: dict[str, str], args: list[str]) -> None:
        port = (settings.central_url or "").rsplit(":", 1)[1]
        self.start_role("farm", ["simulate", "--host", self.hosts.bridge_ip, "--port", port,
                                 *args], env)
        wait_until(lambda: _up(f"{settings.central_url}/health"), 60, what="the farm")

    def master_up(self, settings: Settings, name: str) -> bool:
        role = self.roles[name]
        if not role.running:
            raise RuntimeError(f"{name} exited during start:\n{role.log_tail()}")
        info = heartbeat(settings, name)
        return bool(info and info.get("pid") == role.pid
                    and info.get("workers_alive") == settings.workers)

    def stop_roles(self, names: list[str] | None = None) -> None:
        for name in names or list(self.roles):
            role = self.roles.pop(name, None)
            if role is not None:
                role.stop(timeout_s=20)

    def stop(self) -> None:
        try:
            self.stop_roles()
        finally:
            for server in (self.pulsar, self.mongo, self.group):
                if server is not None:
                    try:
                        server.stop()
                    except Exception as exc:  # the rest must still go
                        print(f"scaleout: stopping {server}: {exc!r}", file=sys.stderr)
            self.hosts.stop()

    def log_tails(self) -> str:
        return "\n".join(f"--- {n}\n{r.log_tail(30)}" for n, r in self.roles.items())


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).is_success
    except httpx.HTTPError:
        return False


def heartbeat(settings: Settings, master_id: str) -> dict[str, Any] | None:
    client = connect.redis_sync(settings)
    try:
        raw = client.hget(settings.keys.masters, master_id)
        return json.loads(raw) if raw else None
    except redis.RedisError:
        return None
    finally:
        client.close()


def leader(settings: Settings) -> str | None:
    client = connect.redis_sync(settings)
    try:
        raw = client.get(f"{settings.keys.prefix}:leader")
        return raw.decode() if isinstance(raw, bytes) else raw
    except redis.RedisError:
        return None
    finally:
        client.close()


class FaultRun(Chaos):
    """The chaos run's load (SDK and raw producers, bad inputs) on the multi-host cluster;
    the faults and the settling are this run's own, the checks the chaos run's."""

    def __init__(self, cluster: Cluster, opts: Options) -> None:
        super().__init__(cluster.workdir, devices=opts.devices, rate=opts.rate, seed=opts.seed)
        self.task_timeout_s = opts.task_timeout_s
        self.cluster = cluster
        self.opts = opts
        self.faults = Faults()
        self.fires = FireTally()
        self.kept = KeptTally()
        self.masters = [n for n in cluster.hosts.names if n.startswith("m")]

    def start(self) -> None:  # the servers are the cluster's
        c = self.cluster
        self.settings = c.settings("scaleout", **FAULT_RUN_GRACES)
        self.env = c.env(self.settings)
        farm = []
        for key, value in FARM.items():
            farm += [f"--{key.replace('_', '-')}", str(value)]
        c.start_farm(self.settings, self.env, ["--no-progress", "--seed", "7", *farm])
        for name in c.hosts.names:
            c.start_role(name, ["master" if name.startswith("m") else "consumer"], self.env)
        for name in self.masters:
            wait_until(lambda n=name: c.master_up(self.settings, n), 120, 0.3,
                       what=f"master {name}")
        from sendscript.client import SendScriptClient
        from sendscript.models import TaskTemplate

        client = SendScriptClient(self.settings)
        try:
            template = TaskTemplate(script={"id": "cron"}, timeout_s=self.opts.task_timeout_s)
            client.schedule_add(Schedule(_id=SCHEDULE, cron=CRON, device_ids=CRON_DEVICES,
                                         template=template))
        finally:
            client.close()

    def _redis(self) -> redis.Redis:
        return connect.redis_sync(self.settings)

    def _role(self, name: str, args: list[str]) -> None:
        self.cluster.start_role(name, args, self.env)

    # -- the run ------------------------------------------------------------------------------
    def run_faults(self) -> Report:
        started = time.monotonic()
        self._bad_inputs()
        load = threading.Thread(target=self._load, daemon=True)
        load.start()
        faults = threading.Thread(target=self._faults, daemon=True)
        faults.start()
        # The load goes on until `tasks` are submitted and every fault is done: each
        # fault strikes under load.
        while (len(self.sdk_ids) + self.raw_sent < self.opts.tasks
               or faults.is_alive()) and load.is_alive():
            if len(self.sdk_ids) + self.raw_sent >= self.opts.tasks:
                self.rate = min(self.rate, self.opts.trickle_rate)
            self._supervise()
            time.sleep(0.2)
        self._stop_load.set()
        load.join(120)
        if load.is_alive():
            raise RuntimeError("the load did not stop within 120s")
        self._pause_schedule()
        self.report.duration_s = time.monotonic() - started
        self._settle(self.opts.settle_timeout_s)
        self._check_all()
        return self.report

    def _pause_schedule(self) -> None:
        """No fires after the load; tried for a minute (a loaded Mongo answers late)."""
        from pymongo.errors import PyMongoError

        mongo, db = self._mongo_db()
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    db.schedules.update_one({"_id": SCHEDULE}, {"$set": {"enabled": False}})
                    return
                except PyMongoError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1.0)
        finally:
            mongo.close()

    def _supervise(self) -> None:
        """supervisord's autorestart; a role that died unkilled is counted."""
        for name, role in list(self.cluster.roles.items()):
            if not role.running and name != self.faults.master_killed:
                self.report.exits[name] += 1
                self._event(f"{name} found dead (exit {role.proc and role.proc.returncode})")
                self.cluster.start_role(name, role.args, self.env)

    def _faults(self) -> None:
        steps = [("redis", self._kill_redis_master), ("partition", self._partition_leader),
                 ("mongo", self._mongo_step_down), ("master", self._kill_master)]
        for what, step in steps:
            time.sleep(self.opts.fault_gap_s)
            try:
                step()
            except Exception as exc:  # the tally says which step failed and how
                self.faults.errors.append(f"{what}: {exc!r}")
                self._event(f"{what} fault failed: {exc!r}")

    def _kill_redis_master(self) -> None:
        group = self.cluster.group
        assert group is not None
        self._event("SIGKILL redis master")
        t0 = time.monotonic()
        group.kill_master()
        group.wait_failover()
        self.faults.redis_failover_s = time.monotonic() - t0
        self.report.kills["redis-master"] += 1
        self._event(f"sentinel promoted the replica in {self.faults.redis_failover_s:.1f}s")

    def _partition_leader(self) -> None:
        holder = leader(self.settings)
        # The lease value is `{master_id}#{fencing token}`; the host is the master_id.
        holder_id = holder.rsplit("#", 1)[0] if holder else None
        host = holder_id if holder_id in self.masters else self.masters[0]
        lease = self.settings.leader_lease_s
        down_s = lease + 3  # past the lease, and past another master's renewal
        self.faults.partitioned, self.faults.leader_before = host, holder
        self._event(f"link down: {host} (leader {holder}) for {down_s:.0f}s")
        self.cluster.hosts.link_down(host)
        t0 = time.monotonic()
        try:
            time.sleep(lease + 2)
            self.faults.leader_during = leader(self.settings)
            time.sleep(max(0.0, down_s - (time.monotonic() - t0)))
        finally:
            self.cluster.hosts.link_up(host)
            self.faults.partition_s = time.monotonic() - t0
        self._event(f"link up: {host}")
        time.sleep(lease)
        self.faults.leader_after = leader(self.settings)

    def _mongo_step_down(self) -> None:
        """replSetStepDown (forced): the one member is a secondary for a few seconds,
        every write meanwhile answered NotWritablePrimary; then primary again."""
        from pymongo.errors import PyMongoError

        rs = self.cluster.mongo
        assert rs is not None
        seconds = 5
        self._event(f"mongo replSetStepDown for {seconds}s")
        t0 = time.monotonic()
        try:
            rs.step_down(seconds)
        except PyMongoError as exc:  # the member may drop its connections as it steps down
            self._event(f"replSetStepDown answered {exc!r}")
        if rs.is_primary():
            raise RuntimeError("Mongo still primary after replSetStepDown")
        wait_until(rs.is_primary, 60, 0.2, what="Mongo to be primary again")
        back_s = time.monotonic() - t0
        self.faults.mongo_stepdown = f"stepped down, primary again after {back_s:.1f}s"
        self._event(self.faults.mongo_stepdown)

    def _kill_master(self) -> None:
        name = next((m for m in self.masters if m != self.faults.partitioned), self.masters[0])
        self.faults.master_killed = name
        role = self.cluster.roles[name]
        self._event(f"SIGKILL master {name} {role.pid}")
        role.kill()
        self.report.kills["master"] += 1
        t0 = time.monotonic()
        self.cluster.start_role(name, role.args, self.env)
        try:
            wait_until(lambda: self.cluster.master_up(self.settings, name), 120, 0.3,
                       what=f"the restarted master {name}")
        finally:
            self.faults.master_killed = None
        self.faults.master_back_s = time.monotonic() - t0
        self._event(f"master {name} back in {self.faults.master_back_s:.1f}s")

    # -- settling and checks --------------------------------------------------------------------
    def _lists(self) -> dict[str, str]:
        keys = self.settings.keys
        lists = {"ready": keys.ready}
        for m in self.masters:
            lists |= {f"staging:{m}": keys.staging(m), f"processing:{m}": keys.processing(m)}
        return lists

    def _tend(self) -> None:
        self._supervise()

    def _check_all(self) -> None:
        rep = self.report
        mongo, db = self._mongo_db()
        try:
            tasks, records = self._stored(db, "schedule", "dedupe_key")
            schedule = db.schedules.find_one({"_id": SCHEDULE}) or {"_id": SCHEDULE}
        finally:
            mongo.close()
        runs = self._check_tasks_and_sends(tasks, records)
        self.fires = check_fires(schedule, tasks.values(), runs, len(CRON_DEVICES),
                                 CRON_INTERVAL_S)
        self.kept = check_kept(self.sdk_ids, tasks, records, runs)
        r = self._redis()
        try:
            quarantined = r.lrange(self.settings.keys.quarantine, 0, -1)
            rep.intake_left = {n: int(r.llen(k)) for n, k in self._lists().items()
                               if r.llen(k)}
        finally:
            r.close()
        check_refusals(rep, quarantined, self._dead_letters())

    def problems(self) -> list[str]:
        return (self.report.problems() + self.faults.problems() + self.fires.problems()
                + ([f"{self.kept.deleted_early} deleted early: {self.kept.samples}"]
                   if self.kept.deleted_early else []))

    def _mongo_db(self) -> Any:
        from pymongo import MongoClient

        client: MongoClient[dict[str, Any]] = MongoClient(
            self.settings.mongo_url, serverSelectionTimeoutMS=5000, socketTimeoutMS=60000)
        return client, client.get_default_database("sendscript")


# -- scaling ------------------------------------------------------------------------------------
def measure_scaling(cluster: Cluster, hosts: int, opts: Options) -> ScaleRow:
    """`scale_tasks` raw items pushed at once to `hosts` running masters; read back."""
    prefix = f"scale{hosts}"
    settings = cluster.settings(prefix, **SCALING_INTERVALS)
    env = cluster.env(settings)
    masters = [f"m{i + 1}" for i in range(hosts)]
    consumers = [n for n in cluster.hosts.names if n.startswith("c")]
    cluster.start_farm(settings, env, FAST_FARM)
    try:
        for name in consumers + masters:
            cluster.start_role(name, ["master" if name.startswith("m") else "consumer"], env)
        for name in masters:
            wait_until(lambda n=name: cluster.master_up(settings, n), 120, 0.3,
                       what=f"master {name}")
        for name in masters:  # each counts its peers before the burst (work sharing)
            wait_until(lambda n=name: _peers_seen(settings, n) >= hosts - 1, 60, 0.3,
                       what=f"master {name} to see its peers")
        before = {m: cluster.hosts.throttled(m) or (0, 0) for m in masters}
        roots = cluster.cpu_roots()
        cpu_before = CpuTimes.take(roots)
        items = [json.dumps({"device_id": f"dev-{n % opts.scale_devices:03d}",
                             "script": {"id": "scale", "args": {"n": n}}, "timeout_s": 30})
                 for n in range(opts.scale_tasks)]
        client = connect.redis_sync(settings)
        try:
            pushed_at = datetime.now(UTC)
            for i in range(0, len(items), 500):
                client.lpush(settings.keys.ready, *items[i:i + 500])
        finally:
            client.close()
        depth = _DepthWatch(settings)
        try:
            docs = _wait_read_back(settings, opts.scale_tasks, opts.settle_timeout_s)
        finally:
            depth.stop()
        cpu = CpuTimes.take(roots).since(cpu_before)
        after = {m: cluster.hosts.throttled(m) or (0, 0) for m in masters}
    finally:
        cluster.stop_roles(masters + consumers + ["farm"])
    found = [d[0] for d in docs.values()]
    finished = [d["finished_at"] for d in found if d.get("finished_at")]
    end = max(finished).replace(tzinfo=UTC) if finished else pushed_at
    seconds = max(1e-3, (end - pushed_at).total_seconds())
    periods = sum(after[m][0] - before[m][0] for m in masters)
    throttled = sum(after[m][1] - before[m][1] for m in masters)
    statuses: dict[str, int] = {}
    for d in found:
        statuses[d["status"]] = statuses.get(d["status"], 0) + 1
    # Which master held each task: a burst left on one board ends when that one does.
    by_master = dict(sorted(Counter(str(d.get("master")) for d in found
                                    if d.get("finished_at")).items()))
    return ScaleRow(hosts, len(finished), seconds, len(finished) / seconds,
                    throttled / periods if periods else 0.0, statuses,
                    opts.scale_tasks - len(docs), cpu, depth.most, by_master)


def _peers_seen(settings: Settings, name: str) -> int:
    info = heartbeat(settings, name) or {}
    return int(info.get("backpressure", {}).get("live_peers") or 0)


class _DepthWatch:
    """The ready list's length, twice a second, in a thread: items waiting there mean
    the masters do not keep up with the producer."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        client = connect.redis_sync(self.settings)
        try:
            while not self._stop.wait(0.5):
                try:
                    self.most = max(self.most, int(client.llen(self.settings.keys.ready)))
                except redis.RedisError:
                    pass
        finally:
            client.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _wait_read_back(settings: Settings, count: int, timeout_s: float) -> dict[Any, Any]:
    """Every task read back once all are terminal (or at the deadline). The wait polls a
    count over the status index: reading the documents back costs SecantusDB about a
    second of CPU for 1,000 tasks, and polling that way made the harness, not the
    masters, the bottleneck of the measurement."""
    from pymongo import MongoClient

    client: MongoClient[dict[str, Any]] = MongoClient(settings.mongo_url,
                                                      serverSelectionTimeoutMS=5000)
    db = client.get_default_database()
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            # Each row has a database of its own: its tasks are the only ones counted.
            done = db[TASKS].count_documents({"status": {"$in": sorted(TERMINAL)}})
            if done >= count:
                break
            time.sleep(1.0)
        return tasks_by_arg(db, "n", range(count), ("status", "finished_at", "master"))
    finally:
        client.close()


# -- the whole run -----------------------------------------------------------------------------
@dataclass
class Result:
    report: Report
    faults: Faults
    fires: FireTally
    kept: KeptTally
    problems: list[str]
    scaling: list[ScaleRow]
    quota: str

    def ok(self, min_ratio: float) -> bool:
        return not self.problems and all(r >= min_ratio for r in ratios(self.scaling))


def ratios(rows: list[ScaleRow]) -> list[float]:
    if not rows or rows[0].rate <= 0:
        return []
    return [row.rate / (row.hosts * rows[0].rate) for row in rows]


def run(workdir: Path, opts: Options) -> Result:
    cluster = Cluster(workdir, opts)
    try:
        cluster.start()
        quota = (f"cgroup v{cluster.hosts.quota.version} at {cluster.hosts.quota.root}"
                 if cluster.hosts.quota else f"none: {cluster.hosts.quota_refused}")
        result = Result(Report(), Faults(), FireTally(), KeptTally(), [], [], quota)
        if opts.tasks > 0:
            result = run_faults(cluster, opts, quota)
            print_faults(result, opts)  # before the scaling phase: it takes minutes
            sys.stdout.flush()
        scaling = []
        if opts.scaling:
            cluster.use_standalone_mongo()
            for name in cluster.hosts.names:
                if name.startswith("m"):
                    cluster.hosts.set_cpu(name, opts.scale_master_cpu)
            for n in range(1, opts.masters + 1):
                scaling.append(measure_scaling(cluster, n, opts))
        result.scaling = scaling
        return result
    finally:
        cluster.stop()


def run_faults(cluster: Cluster, opts: Options, quota: str) -> Result:
    fault_run = FaultRun(cluster, opts)
    try:
        fault_run.start()
        report = fault_run.run_faults()
    except Exception:
        print(cluster.log_tails(), file=sys.stderr)
        raise
    finally:
        if fault_run.report.tasks and fault_run.problems():
            print(cluster.log_tails(), file=sys.stderr)
        cluster.stop_roles()
    return Result(report, fault_run.faults, fault_run.fires, fault_run.kept,
                  fault_run.problems(), [], quota)


def print_result(result: Result, opts: Options) -> None:
    if opts.tasks > 0:
        print_faults(result, opts)
    print_scaling(result, opts)


def print_faults(result: Result, opts: Options) -> None:
    print_report(result.report)
    f = result.faults
    print(f"fault tally ({opts.masters} master hosts, {opts.consumers} consumer hosts; CPU "
          f"quota {opts.master_cpu} CPU a master host, {opts.consumer_cpu} a consumer host, "
          f"{result.quota}):")
    failover = f"{f.redis_failover_s:.1f}s" if f.redis_failover_s is not None else "none"
    print(f"  Redis master SIGKILL: replica promoted by 3 Sentinels in {failover}")
    print(f"  partition: {f.partitioned} (leader {f.leader_before}) cut off "
          f"{f.partition_s:.1f}s (lease {CHAOS_SETTINGS['leader_lease_s']}s); lease held "
          f"meanwhile by {f.leader_during}, after healing by {f.leader_after}")
    print(f"  Mongo step-down: {f.mongo_stepdown}")
    back = f"{f.master_back_s:.1f}s" if f.master_back_s is not None else "not back"
    print(f"  master SIGKILL: restarted and heartbeating in {back}")
    for e in f.errors:
        print(f"  FAULT STEP FAILED: {e}")
    fi = result.fires
    print(f"  cron: {fi.fires} fires ({fi.fires_counted} counted by the schedule), "
          f"{fi.tasks} tasks, incomplete {fi.incomplete}, fired twice {fi.double}, "
          f"gaps {fi.gaps}, run to SUCCESS twice {fi.run_twice}")
    k = result.kept
    print(f"  deleted early: {k.deleted_early} (tasks {k.tasks_missing}, records behind farm "
          f"runs {k.records_missing})")


def print_scaling(result: Result, opts: Options) -> None:
    if result.scaling:
        print(f"scaling ({opts.scale_tasks} tasks pushed at once, {opts.scale_devices} "
              f"devices; CPU quota {opts.scale_master_cpu} CPU a master host; read back "
              "from Mongo; the machine is shared and loaded):")
        print("  hosts  tasks  seconds  tasks/s  ratio to N x 1 host  quota throttled")
        for row, ratio in zip(result.scaling, ratios(result.scaling), strict=False):
            print(f"  {row.hosts:>5}  {row.tasks:>5}  {row.seconds:>7.1f}  {row.rate:>7.1f}  "
                  f"{ratio:>19.2f}  {row.throttled:>14.0%}")
            cpu = ", ".join(f"{k} {v:.1f}" for k, v in sorted(row.cpu.items(),
                                                               key=lambda kv: -kv[1]))
            print(f"         CPU s: {cpu}; ready list at most {row.ready_max}")
            print(f"         tasks by master: {row.by_master}")
            if row.lost or set(row.statuses) - {"success"}:
                print(f"         statuses {row.statuses}, lost {row.lost}")
    print("OK" if result.ok(opts.min_ratio) else "FAILED: " + "; ".join(
        result.problems + [f"scaling ratio under {opts.min_ratio}"
                           for r in ratios(result.scaling) if r < opts.min_ratio]))


def parse_args(argv: list[str] | None = None) -> tuple[Options, Path | None]:
    d = Options()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--masters", type=int, default=d.masters)
    p.add_argument("--consumers", type=int, default=d.consumers)
    p.add_argument("--tasks", type=int, default=d.tasks,
                   help="tasks in the fault run (0: no fault run, the scaling phase alone)")
    p.add_argument("--rate", type=float, default=d.rate, help="tasks submitted per second")
    p.add_argument("--devices", type=int, default=d.devices)
    p.add_argument("--trickle-rate", type=float, default=d.trickle_rate,
                   help="tasks/s after --tasks are submitted, until the last fault is over")
    p.add_argument("--master-cpu", type=float, default=d.master_cpu,
                   help="CPU quota of a master host, in CPUs")
    p.add_argument("--consumer-cpu", type=float, default=d.consumer_cpu)
    p.add_argument("--workers", type=int, default=d.workers, help="worker processes a master")
    p.add_argument("--fault-gap", type=float, default=d.fault_gap_s)
    p.add_argument("--settle-timeout", type=float, default=d.settle_timeout_s)
    p.add_argument("--no-scaling", dest="scaling", action="store_false")
    p.add_argument("--scale-tasks", type=int, default=d.scale_tasks)
    p.add_argument("--scale-devices", type=int, default=d.scale_devices)
    p.add_argument("--scale-master-cpu", type=float, default=d.scale_master_cpu,
                   help="CPU quota of a master host in the scaling phase")
    p.add_argument("--min-ratio", type=float, default=d.min_ratio)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for every role (settings this tree may not have)")
    p.add_argument("--workdir", type=Path, help="keep data and logs here")
    a = p.parse_args(argv)
    extra = dict(e.split("=", 1) for e in a.env)
    opts = Options(masters=a.masters, consumers=a.consumers, tasks=a.tasks, rate=a.rate,
                   devices=a.devices, trickle_rate=a.trickle_rate,
                   master_cpu=a.master_cpu, consumer_cpu=a.consumer_cpu,
                   workers=a.workers, fault_gap_s=a.fault_gap,
                   settle_timeout_s=a.settle_timeout, scaling=a.scaling,
                   scale_tasks=a.scale_tasks, scale_devices=a.scale_devices,
                   scale_master_cpu=a.scale_master_cpu, min_ratio=a.min_ratio,
                   seed=a.seed, extra_env=extra)
    return opts, a.workdir


def main(argv: list[str] | None = None) -> int:
    opts, workdir = parse_args(argv)
    from sendscript.dev.hosts import unavailable

    if why := unavailable():
        print(f"scaleout: {why}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="sendscript-scaleout-") as tmp:
        path = workdir or Path(tmp)
        path.mkdir(parents=True, exist_ok=True)
        result = run(path, opts)  # prints the fault run's tally as soon as it has it
    print_scaling(result, opts)
    return 0 if result.ok(opts.min_ratio) else 1


if __name__ == "__main__":
    raise SystemExit(main())
