"""What each Mongo step of the hot path costs the embedded server, in its CPU.

    python -m bench.mongo_cost --tasks 3000 --batch 32

Starts a fresh embedded SecantusDB, creates the service's indexes and runs the
hot path of an immediate task that succeeds through the service's own stores,
state machines and batch functions, step by step in group-committed batches as
the roles run it: store (intake), claim, exec record, mark sent, save the log,
read the records, apply the result, keep the fleet view (the devices' last
results, as the consumer does). For each step: the server's CPU per task (from
/proc), the commands sent per task, and the wall time. The client has the roles'
options (connect.py) unless `--retry-writes` overrides them.

What each index costs: `--without-index script_tasks.updated_at_1` (repeatable)
drops that index after the service's are made; `--per-index` runs once with every
index and once without each index of the hot path's collections, each run on a
fresh server of its own and all at once, a batch on each in turn (so the noise of
a shared machine falls on them alike), and prints the server ms/task each index
adds to each step (the embedded server rewrites every index entry of a document on
every update, whichever fields changed; a partial index holds entries only for the
documents its filter matches, but the server reads every index's definition for
each document it writes, so even one that no document is in costs a little).

What one document write costs by the indexes of its collection: `--shapes` updates
`--tasks` task documents (status pending -> running) in statements of `--batch`
documents (one update_many over their ids, as the hot path's merged writes) and
one statement a document, on a collection with no index but `_id` and on one with
the service's `script_tasks` indexes, each on the same fresh server; it prints the
server CPU per document write and what each secondary index adds to it, and reads
every document back (all running) before it answers.

What a long `$in` list costs: `--in-lists` reads and then updates (pending ->
running) `--tasks` task documents by id, in statements naming 16, 32, 64, 250 and
2,000 ids (`--in-sizes`), each size on a fresh server of its own with the service's
indexes, a batch of 2,000 tasks on each in turn; it prints the server CPU per
document read and written at each size, marks the size the service's reads and
writes by id go in (`store.ID_CHUNK`), and reads every document back (all
running) before it answers. The embedded server matches each document a statement
fetches against the statement's whole list, so a document costs more the longer
the list.

The lead over the peers that the server allows: `--bound` runs, each durability,
sendscript's hot path (batches of `--batch`) with the service's indexes (less any
`--without-index`), the same with the peers' one index a collection, and the
peers' job itself (eight commands a task, through bench/peer_jobs/job.py's own
write functions and client options), each on a fresh server of its own, a batch
on each in turn; it prints the server's CPU a task of each and the peers' over
each lane's: while the server is the bottleneck of both (bench.peers), sendscript
cannot lead by more than that.

What is timed is store steps, so the run verifies that the steps did what they
were timed doing, from the store itself once they are done: every task read back
by its id with the status the last step gave it (success), every exec record
likewise, and the logs saved counted back (sendscript/dev/tally.py for the first two).
Printed after the figures; exits 1 when a write is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

from pymongo import IndexModel, MongoClient, UpdateOne

from bench.cpu import tree_cpu_s
from bench.peer_jobs import job
from consumers.rules import result_updates
from sendscript import connect, fleet, roundtrips
from sendscript.dev import tally
from sendscript.dev.embedded import MongoServer
from sendscript.models import ExecRecord, LogType, Task, TaskLogMessage, TaskSpec, utcnow
from sendscript.settings import Settings
from sendscript.status import TaskStatus, record_sent, task_cas
from sendscript.store import (
    DEVICES,
    ID_CHUNK,
    LOGS,
    RECORDS,
    TASK_INDEXES,
    TASKS,
    Claim,
    LogStore,
    RecordStore,
    TaskStore,
    all_indexes,
    ensure_indexes,
)
from sendscript.task_search import SEARCH


class Steps:
    """Server CPU, commands and wall time, summed per step name."""

    def __init__(self, server_pid: int) -> None:
        self.pid = server_pid
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)
        self.cmds: dict[str, int] = defaultdict(int)

    async def run(self, name: str, step: Callable[[], Awaitable[Any]]) -> Any:
        before_cpu, before_rt = tree_cpu_s(self.pid), roundtrips.snapshot().get("mongo", 0)
        t0 = perf_counter()
        out = await step()
        self.wall[name] += perf_counter() - t0
        self.cpu[name] += tree_cpu_s(self.pid) - before_cpu
        self.cmds[name] += roundtrips.snapshot().get("mongo", 0) - before_rt
        return out


# What-if: one index a collection besides _id, as the peers' job has (bench/peer_jobs).
PEER_INDEXES = {ours: [IndexModel(job.INDEXES[theirs])] for ours, theirs in
                ((TASKS, "tasks"), (RECORDS, "records"), (LOGS, "logs"))}


# The collections the hot path writes: --per-index drops each of their indexes in turn.
HOT_COLLECTIONS = (TASKS, SEARCH, RECORDS, LOGS, DEVICES)


class Lane:
    """One server's run of the hot path: its database, indexes, steps and writes."""

    def __init__(self, settings: Settings, steps: Steps, indexes: str = "service",
                 without: Sequence[str] = ()) -> None:
        self.settings = settings
        self.steps = steps
        self.indexes = indexes
        self.without = list(without)  # indexes ("collection.name") dropped before the run
        self.client = connect.mongo_async(settings)
        self.db = connect.database(self.client)
        self.store, self.records = TaskStore(self.db), RecordStore(self.db)
        self.logs = LogStore(self.db)
        self.written = fleet.WrittenThisHour()
        self.task_ids: list[str] = []
        self.record_ids: list[str] = []

    async def close(self) -> None:
        await self.client.close()

    def read_back(self) -> tuple[list[str], bool]:
        with MongoClient(self.settings.mongo_url, socketTimeoutMS=120_000) as mongo:
            return read_back(connect.database(mongo), self.task_ids, self.record_ids,
                             (TASKS, RECORDS, LOGS))

    async def setup(self) -> None:
        if self.indexes == "service":
            await ensure_indexes(self.db)
        else:
            for name, models in PEER_INDEXES.items():
                await self.db[name].create_indexes(models)
        for qualified in self.without:
            collection, _, index = qualified.partition(".")
            await self.db[collection].drop_index(index)

    async def batch(self, batch_tasks: list[Task], first_fence: int) -> None:
        steps, store, records = self.steps, self.store, self.records
        n = len(batch_tasks)
        await steps.run("1 store tasks (insert)", lambda: store.store(batch_tasks))
        claims = [Claim(t.id, 0, "w-1") for t in batch_tasks]
        rids = await steps.run("2 claim (pending->running)",
                               lambda: store.claim_many(claims, utcnow()))
        assert all(rids)
        self.task_ids += [t.id for t in batch_tasks]
        self.record_ids += rids
        recs = [ExecRecord(_id=rid, task_id=t.id, attempt=1, device_id=t.device_id,
                           lock_value=first_fence + i, worker="w-1", started_at=utcnow())
                for i, (rid, t) in enumerate(zip(rids, batch_tasks, strict=True))]
        await steps.run("3 exec record (insert)", lambda: records.insert_many(recs))

        async def mark_sent() -> None:
            # as worker/handler.py's _mark_sent_batch
            sent = utcnow()
            await store.run_updates([task_cas(t.id, TaskStatus.RUNNING, TaskStatus.SENT,
                                              sent, attempt=1, extra_filter={"record_id": r})
                                     for t, r in zip(batch_tasks, rids, strict=True)])
            await records.run_updates([record_sent(r, sent, None) for r in rids])
        await steps.run("4 mark sent (task, record)", mark_sent)
        stamp = int(utcnow().timestamp() * 1000)
        msgs = [TaskLogMessage(record_id=r, task_id=t.id, device_id=t.device_id,
                               log_type=LogType.SUCCESS, message="done", timestamp=stamp)
                for r, t in zip(rids, batch_tasks, strict=True)]
        got = await steps.run("5 save logs (insert)",
                              lambda: self.logs.insert_many([x.to_doc(utcnow()) for x in msgs]))
        assert got == n
        found = await steps.run("6 read records", lambda: records.find_many(rids))

        async def apply() -> None:
            writes = result_updates(msgs, found, {}, self.settings, utcnow())
            await store.run_updates(writes.successes())
            await records.run_updates(writes.records)
        await steps.run("7 apply result (task, record)", apply)

        async def keep_fleet() -> None:
            # as consumers/task_log.py's _keep_fleet (its Redis side aside)
            now = utcnow()
            await fleet.write_results(self.db[DEVICES], fleet.device_results(msgs, found), now,
                                      self.written)
        await steps.run("8 keep fleet (devices)", keep_fleet)


class PeerLane:
    """The peers' job on a server of its own: its eight writes a task, each a command
    of its own, on its collections with one index besides `_id` each, through the
    client the peers have at that durability (bench/peer_jobs/job.py, the same
    functions the peers run)."""

    def __init__(self, url: str, steps: Steps, journal: bool) -> None:
        self.url, self.steps = url, steps
        self.mongo: MongoClient[Any] = MongoClient(
            url, event_listeners=[roundtrips.MongoCommandCounter()],
            **job.mongo_options(url, journal))
        self.db = self.mongo["peers_bound"]
        self.task_ids: list[str] = []
        self.record_ids: list[str] = []

    async def setup(self) -> None:
        job.ensure_indexes(self.db)

    async def batch(self, batch_tasks: list[Task], first_fence: int) -> None:
        sent: list[tuple[str, str, str]] = []

        async def before() -> None:
            for i, t in enumerate(batch_tasks):
                rid = job.before_send(self.db, t.id, t.device_id, i, first_fence + i)
                sent.append((t.id, t.device_id, rid))
        await self.steps.run("peer job: before its POST (3 writes)", before)

        async def after() -> None:
            for task_id, device_id, rid in sent:
                job.after_send(self.db, task_id, device_id, rid)
        await self.steps.run("peer job: after its POST (5 writes)", after)
        self.task_ids += [t for t, _, _ in sent]
        self.record_ids += [r for _, _, r in sent]

    def read_back(self) -> tuple[list[str], bool]:
        with MongoClient(self.url, socketTimeoutMS=120_000) as mongo:
            return read_back(mongo[self.db.name], self.task_ids, self.record_ids,
                             ("tasks", "records", "logs"))

    async def close(self) -> None:
        self.mongo.close()


async def hot_path(lanes: Sequence[Lane | PeerLane], tasks: int, batch: int, devices: int) -> None:
    """Run the steps on every lane, a batch at a time on each in turn (the first lane
    of a round rotates), so that lanes compared share the machine's moments alike."""
    try:
        for lane in lanes:
            await lane.setup()
        for round_no, start in enumerate(range(0, tasks, batch)):
            n = min(batch, tasks - start)
            now = utcnow()
            batch_tasks = [Task.from_spec(TaskSpec(
                device_id=f"phone-{(start + i) % devices:05d}",
                script={"id": "bench", "args": {"n": start + i}}), now=now) for i in range(n)]
            turn = round_no % len(lanes)
            for lane in [*lanes[turn:], *lanes[:turn]]:
                await lane.batch(batch_tasks, start + 1)
    finally:
        for lane in lanes:
            await lane.close()


def read_back(db: Any, task_ids: list[str], record_ids: list[str],
              collections: tuple[str, str, str]) -> tuple[list[str], bool]:
    """Every write of the steps, from the store: each task and record success (the
    last step's), and a log a task, in `collections` (tasks, records, logs). The
    lines to print, and whether all are there."""
    tasks_at, records_at, logs_at = collections
    tasks = tally.by_ids(db, task_ids, tasks_at)
    records = tally.by_ids(db, record_ids, records_at)
    logs = db[logs_at].count_documents({})  # a fresh server: only this run's
    n = len(task_ids)
    ok = (tasks.statuses == {"success": n} and tasks.ok and records.ok
          and records.statuses == {"success": n} and logs == n)
    record_statuses = " ".join(f"{k}={v}" for k, v in sorted(records.statuses.items()))
    return [tasks.line(), f"exec records: {record_statuses or 'none'} of {len(record_ids)} "
            f"written ({records.lost} missing); logs: {logs} of {n} saved"], ok


@dataclass
class Run:
    """One lane's run of the hot path, on a fresh server of its own."""

    steps: Steps
    elapsed: float
    verified: list[str]
    ok: bool


def stop_all(servers: Sequence[MongoServer], data: Path) -> None:
    """Stop a run's servers and remove their data."""
    for server in servers:
        server.stop()
    shutil.rmtree(data, ignore_errors=True)


def measure(a: argparse.Namespace, variants: Sequence[Sequence[str]] = ((),)) -> list[Run]:
    """One run a variant (the indexes it drops), all at once, interleaved by batch."""
    data = Path(tempfile.mkdtemp(prefix="sendscript-mongocost-"))
    servers = [MongoServer(data / str(i)) for i in range(len(variants))]
    try:
        lanes = []
        for server, without in zip(servers, variants, strict=True):
            server.start()
            url = server.url
            if a.retry_writes != "url":
                url += f"?retryWrites={a.retry_writes}"
            assert server.proc is not None
            lanes.append(Lane(Settings(mongo_url=url), Steps(server.proc.pid), a.indexes,
                              without))
        t0 = perf_counter()
        asyncio.run(hot_path(lanes, a.tasks, a.batch, a.devices))
        elapsed = perf_counter() - t0
        runs = []
        for lane in lanes:
            verified, ok = lane.read_back()
            runs.append(Run(lane.steps, elapsed / len(lanes), verified, ok))
        return runs
    finally:
        stop_all(servers, data)


BOUND_LANES = ("sendscript", "sendscript, peers' indexes", "peers' job")


def bound(a: argparse.Namespace) -> tuple[list[dict[str, Any]], bool]:
    """The lead over the peers that the server's cost a task allows, each durability:
    sendscript's hot path (batches of `--batch`) with its indexes and with the peers'
    one a collection, and the peers' job (eight commands a task), each on a fresh
    server of its own, all at once, a batch on each in turn."""
    data = Path(tempfile.mkdtemp(prefix="sendscript-mongocost-"))
    durabilities = (("journaled", True), ("as they come", False))
    servers = [MongoServer(data / f"{j}-{k}") for j in range(2) for k in range(3)]
    rows: list[dict[str, Any]] = []
    ok = True
    try:
        lanes: list[Lane | PeerLane] = []
        for server in servers:
            server.start()
        for j, (_, journal) in enumerate(durabilities):
            ours, with_peers, theirs = servers[3 * j:3 * j + 3]
            for server, indexes, without in ((ours, "service", a.without_index),
                                             (with_peers, "peers", [])):
                assert server.proc is not None
                lanes.append(Lane(Settings(mongo_url=server.url, mongo_journal=journal),
                                  Steps(server.proc.pid), indexes, without))
            assert theirs.proc is not None
            lanes.append(PeerLane(theirs.url, Steps(theirs.proc.pid), journal))
        asyncio.run(hot_path(lanes, a.tasks, a.batch, a.devices))
        for j, (durability, _) in enumerate(durabilities):
            for name, lane in zip(BOUND_LANES, lanes[3 * j:3 * j + 3], strict=True):
                verified, lane_ok = lane.read_back()
                ok = ok and lane_ok
                rows.append({"durability": durability, "lane": name,
                             "server_ms_per_task": round(sum(lane.steps.cpu.values())
                                                         / a.tasks * 1000, 3),
                             "commands_per_task": round(sum(lane.steps.cmds.values())
                                                        / a.tasks, 3),
                             "verified": verified})
    finally:
        stop_all(servers, data)
    return rows, ok


def print_bound(a: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    dropped = f" (sendscript without {', '.join(a.without_index)})" if a.without_index else ""
    print(f"{a.tasks} tasks, sendscript's in batches of {a.batch}: the embedded server's "
          f"CPU a task{dropped}")
    print(f"{'durability':14} {'lane':28} {'server ms/task':>15} {'cmds/task':>10} "
          f"{'peers / it':>11}")
    for r in rows:
        peer = next(x for x in rows if x["durability"] == r["durability"]
                    and x["lane"] == BOUND_LANES[2])
        lead = peer["server_ms_per_task"] / r["server_ms_per_task"]
        print(f"{r['durability']:14} {r['lane']:28} {r['server_ms_per_task']:15.3f} "
              f"{r['commands_per_task']:10.3f} {lead:10.2f}x")
    print("peers / it: the peers' job's server CPU a task over this lane's: the most this "
          "lane can lead the peers by while the server is the bottleneck")
    for r in rows:
        for line in r["verified"]:
            print(f"{r['durability']}, {r['lane']}: {line}")


def hot_indexes() -> list[str]:
    """The service's indexes on the hot path's collections, as "collection.name"."""
    return [f"{name}.{model.document['name']}"
            for name, models in all_indexes(30 * 86400).items() if name in HOT_COLLECTIONS
            for model in models]


def print_run(a: argparse.Namespace, run: Run, without: Sequence[str]) -> None:
    steps = run.steps
    total_cpu = sum(steps.cpu.values())
    dropped = f" without {', '.join(without)}" if without else ""
    print(f"{a.tasks} tasks, batches of {a.batch}, retryWrites={a.retry_writes}, "
          f"{a.indexes} indexes{dropped}: "
          f"{a.tasks / run.elapsed:.0f} tasks/s, "
          f"server CPU {total_cpu / a.tasks * 1000:.2f} ms/task, "
          f"{sum(steps.cmds.values()) / a.tasks:.3f} commands/task")
    print(f"{'step':34} {'server ms/task':>15} {'cmds/task':>10} {'wall ms/task':>13}")
    for name in sorted(steps.cpu):
        print(f"{name:34} {steps.cpu[name] / a.tasks * 1000:15.3f} "
              f"{steps.cmds[name] / a.tasks:10.3f} {steps.wall[name] / a.tasks * 1000:13.3f}")
    for line in run.verified:
        print(line)


def ms(run: Run, tasks: int) -> dict[str, float]:
    return {k: v / tasks * 1000 for k, v in run.steps.cpu.items()}


def per_index(a: argparse.Namespace) -> tuple[dict[str, float], dict[str, dict[str, float]], bool]:
    """Server ms/task by step with every index, and what each index adds (the runs
    with it less the run without it) by step; whether every run verified. Two runs
    have every index, the first lane and the last: their mean is the base, and
    their difference says how far apart two runs of one thing come out."""
    indexes = hot_indexes()
    first, *others, last = measure(a, [(), *[[index] for index in indexes], ()])
    print_run(a, first, ())
    a_ms, b_ms = ms(first, a.tasks), ms(last, a.tasks)
    full = {k: (a_ms[k] + b_ms.get(k, 0.0)) / 2 for k in a_ms}
    added: dict[str, dict[str, float]] = {}
    ok = first.ok and last.ok
    for index, run in zip(indexes, others, strict=True):
        ok = ok and run.ok
        without = ms(run, a.tasks)
        added[index] = {k: full[k] - without.get(k, 0.0) for k in full}
    steps = sorted(full)
    print(f"\nserver ms/task each index adds, by step (every index: "
          f"{sum(full.values()):.2f} ms/task, the mean of two runs)")
    print(f"{'index':52} {'total':>6} " + " ".join(f"{k.split()[0]:>5}" for k in steps))
    print(f"{'(every index, by step)':52} {sum(full.values()):6.2f} "
          + " ".join(f"{full[k]:5.2f}" for k in steps))
    print(f"{'(noise: first run less last, both every index)':52} "
          f"{sum(a_ms.values()) - sum(b_ms.values()):6.2f} "
          + " ".join(f"{a_ms[k] - b_ms.get(k, 0.0):5.2f}" for k in steps))
    for index, by_step in added.items():
        print(f"{index:52} {sum(by_step.values()):6.2f} "
              + " ".join(f"{by_step[k]:5.2f}" for k in steps))
    print("steps: " + "; ".join(steps))
    return full, added, ok


def shapes(a: argparse.Namespace) -> tuple[list[dict[str, Any]], bool]:
    """Server CPU per document of a status update, by statement shape and indexes."""
    data = Path(tempfile.mkdtemp(prefix="sendscript-mongocost-"))
    server = MongoServer(data / "shapes")
    rows: list[dict[str, Any]] = []
    ok = True
    try:
        server.start()
        assert server.proc is not None
        with MongoClient(server.url, socketTimeoutMS=120_000) as mongo:
            db = mongo["shapes"]
            for n_case, (indexes, shape) in enumerate(
                    (i, s) for i in ("none", "service") for s in ("update_many", "update_one")):
                col = db[f"c{n_case}"]
                if indexes == "service":
                    col.create_indexes(TASK_INDEXES)
                now = utcnow()
                docs = [Task.from_spec(TaskSpec(device_id=f"phone-{i % a.devices:05d}",
                                                script={"id": "bench", "args": {"n": i}}),
                                       now=now).to_doc() for i in range(a.tasks)]
                col.insert_many(docs)
                ids = [d["_id"] for d in docs]
                update = {"$set": {"status": "running", "updated_at": now, "worker": "w-1"}}
                before = tree_cpu_s(server.proc.pid)
                for start in range(0, len(ids), a.batch):
                    part = ids[start:start + a.batch]
                    if shape == "update_many":
                        col.update_many({"_id": {"$in": part}, "status": "pending"}, update)
                    else:
                        col.bulk_write([UpdateOne({"_id": i, "status": "pending"}, update)
                                        for i in part])
                cpu_ms = (tree_cpu_s(server.proc.pid) - before) * 1000 / a.tasks
                done = col.count_documents({"status": "running"})
                ok = ok and done == a.tasks
                rows.append({"indexes": indexes, "shape": shape, "secondary": len(
                    col.index_information()) - 1, "server_ms_per_doc": round(cpu_ms, 3),
                    "updated": done})
    finally:
        stop_all([server], data)
    return rows, ok


IN_BATCH = 2000  # tasks stored, read and updated on each lane in turn


def in_lists(a: argparse.Namespace) -> tuple[list[dict[str, Any]], bool]:
    """Server CPU per document of reads and updates by `_id $in`, by the list's length:
    a fresh server a length, the same documents on each, a batch on each in turn."""
    data = Path(tempfile.mkdtemp(prefix="sendscript-mongocost-"))
    servers = [MongoServer(data / f"in-{k}") for k in a.in_sizes]
    cpu = {k: {"read": 0.0, "update": 0.0} for k in a.in_sizes}
    ok = True
    try:
        cols = []
        for server in servers:
            server.start()
            assert server.proc is not None
            mongo: MongoClient[Any] = MongoClient(server.url, socketTimeoutMS=300_000)
            cols.append((mongo, mongo["inlists"][TASKS], server.proc.pid))
            cols[-1][1].create_indexes(TASK_INDEXES)
        for start in range(0, a.tasks, IN_BATCH):
            now = utcnow()
            docs = [Task.from_spec(TaskSpec(device_id=f"phone-{i % a.devices:05d}",
                                            script={"id": "bench", "args": {"n": i}}),
                                   now=now).to_doc() for i in range(start, min(a.tasks,
                                                                              start + IN_BATCH))]
            ids = [d["_id"] for d in docs]
            for k, (_, col, pid) in zip(a.in_sizes, cols, strict=True):
                col.insert_many(docs)
                parts = [ids[i:i + k] for i in range(0, len(ids), k)]
                before = tree_cpu_s(pid)
                read = sum(len(list(col.find({"_id": {"$in": part}}, {"status": 1})))
                           for part in parts)
                cpu[k]["read"] += tree_cpu_s(pid) - before
                ok = ok and read == len(ids)
                before = tree_cpu_s(pid)
                for part in parts:
                    flt, update = task_cas(part, TaskStatus.PENDING, TaskStatus.RUNNING, now,
                                           attempt=0, set_={"attempt": 1, "worker": "w-1"})
                    col.update_many(flt, update)
                cpu[k]["update"] += tree_cpu_s(pid) - before
        rows = []
        for k, (mongo, col, _) in zip(a.in_sizes, cols, strict=True):
            running = col.count_documents({"status": "running", "attempt": 1})
            ok = ok and running == a.tasks
            rows.append({"ids_a_statement": k, "read_ms_per_doc": round(
                cpu[k]["read"] * 1000 / a.tasks, 3), "update_ms_per_doc": round(
                cpu[k]["update"] * 1000 / a.tasks, 3), "running": running})
            mongo.close()
    finally:
        stop_all(servers, data)
    return rows, ok


def print_in_lists(a: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    print(f"{a.tasks} task documents read, then updated pending -> running, by `_id $in` "
          f"lists of each length: server CPU per document")
    print(f"{'ids a statement':>16} {'read ms/doc':>12} {'update ms/doc':>14} {'running':>8}")
    for r in rows:
        mark = "  <- store.ID_CHUNK" if r["ids_a_statement"] == ID_CHUNK else ""
        print(f"{r['ids_a_statement']:16d} {r['read_ms_per_doc']:12.3f} "
              f"{r['update_ms_per_doc']:14.3f} {r['running']:8d}{mark}")


def print_shapes(a: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    print(f"{a.tasks} task documents, pending -> running, {a.batch} a statement or one "
          f"each: server CPU per document write")
    print(f"{'statement':12} {'indexes':10} {'secondary':>9} {'ms/doc':>7} {'updated':>8}")
    for r in rows:
        print(f"{r['shape']:12} {r['indexes']:10} {r['secondary']:9d} "
              f"{r['server_ms_per_doc']:7.3f} {r['updated']:8d}")
    for shape in ("update_many", "update_one"):
        bare, full = (next(r for r in rows if r["shape"] == shape and r["indexes"] == i)
                      for i in ("none", "service"))
        per = (full["server_ms_per_doc"] - bare["server_ms_per_doc"]) / max(full["secondary"], 1)
        print(f"{shape}: each secondary index adds {per:.3f} ms a document write")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mongo_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32, help="tasks per group commit (32)")
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--retry-writes", choices=("url", "true", "false"), default="url",
                   help="retryWrites on the client: as connect.py decides (url), or forced")
    p.add_argument("--indexes", choices=("service", "peers"), default="service",
                   help="the service's indexes (store.py), or the peers' one a collection")
    p.add_argument("--without-index", action="append", default=[], metavar="COLL.NAME",
                   help="drop this index (e.g. script_tasks.updated_at_1) before the run")
    p.add_argument("--per-index", action="store_true",
                   help="one run with every index, then one without each index "
                        f"of {', '.join(HOT_COLLECTIONS)}; prints what each adds")
    p.add_argument("--shapes", action="store_true",
                   help="what a document write costs by statement shape and indexes")
    p.add_argument("--in-lists", action="store_true",
                   help="what a read and an update by id cost by the length of the $in list")
    p.add_argument("--in-sizes", type=lambda v: [int(x) for x in v.split(",")],
                   default=[16, 32, 64, 250, 2000], help="the lengths --in-lists compares")
    p.add_argument("--bound", action="store_true",
                   help="the lead over the peers' job the server's cost a task allows")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    for flag, measure_rows, print_rows in (("bound", bound, print_bound),
                                           ("shapes", shapes, print_shapes),
                                           ("in_lists", in_lists, print_in_lists)):
        if getattr(a, flag):
            rows, ok = measure_rows(a)
            print_rows(a, rows)
            if a.json:
                print(json.dumps({"tasks": a.tasks, "batch": a.batch, flag: rows,
                                  "verified": ok}))
            return 0 if ok else 1
    if a.per_index:
        full, added, ok = per_index(a)
        if a.json:
            print(json.dumps({"tasks": a.tasks, "batch": a.batch, "server_ms_per_task": full,
                              "index_adds_ms_per_task": added, "verified": ok}))
        return 0 if ok else 1
    run, = measure(a, [a.without_index])
    print_run(a, run, a.without_index)
    if a.json:
        print(json.dumps({"tasks": a.tasks, "batch": a.batch, "retry_writes": a.retry_writes,
                          "without": a.without_index, "server_ms_per_task": ms(run, a.tasks),
                          "verified": run.ok}))
    return 0 if run.ok else 1


if __name__ == "__main__":
    sys.exit(main())
