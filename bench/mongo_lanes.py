"""What concurrent statements cost the embedded server, against the same ones in a row.

    python -m bench.mongo_lanes --tasks 4000 --batch 32 --clients 4 --rounds 3

Starts a fresh embedded SecantusDB and, in each round, makes the same writes two
ways on collections of their own with the service's `script_tasks` indexes: every
task document pending -> running in statements of `--batch` documents (one
update_many over their ids, as the hot path's merged writes), sent one statement
at a time by one client ("in a row"), then split over `--clients` clients that
send theirs at once ("side by side"). The order of the two alternates by round, so
the drift of a shared machine falls on both alike.

Printed per round and as medians: the server's CPU per document write (from /proc)
and the wall time of each way, and the ratio side by side / in a row. This is why
a worker runs its Mongo steps in one lane (worker/batching.py): SecantusDB is pure
Python, and its storage engine's binding releases the interpreter lock on every
call, so statements that run beside each other hand the lock back and forth
inside each document write. Every document is read back (all running) before a
figure counts; exits 1 when one is missing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from time import perf_counter
from typing import Any

from pymongo import MongoClient
from pymongo.collection import Collection

from bench.cpu import tree_cpu_s
from sendscript.dev.embedded import MongoServer
from sendscript.models import Task, TaskSpec, utcnow
from sendscript.store import TASK_INDEXES


def seed(col: Collection[Any], n: int, devices: int) -> list[str]:
    col.create_indexes(TASK_INDEXES)
    now = utcnow()
    docs = [Task.from_spec(TaskSpec(device_id=f"phone-{i % devices:05d}",
                                    script={"id": "bench", "args": {"n": i}}), now=now).to_doc()
            for i in range(n)]
    col.insert_many(docs)
    return [d["_id"] for d in docs]


def update_all(col: Collection[Any], ids: Sequence[str], batch: int) -> None:
    update = {"$set": {"status": "running", "updated_at": utcnow(), "worker": "w-1"}}
    for start in range(0, len(ids), batch):
        col.update_many({"_id": {"$in": list(ids[start:start + batch])}, "status": "pending"},
                        update)


def one_way(server: MongoServer, name: str, a: argparse.Namespace, clients: int) -> dict[str, Any]:
    """The tasks of a fresh collection moved to running by `clients` clients at once."""
    assert server.proc is not None
    conns = [MongoClient(server.url, socketTimeoutMS=120_000) for _ in range(clients)]
    try:
        ids = seed(conns[0]["lanes"][name], a.tasks, a.devices)
        shares = [ids[k::clients] for k in range(clients)]
        threads = [threading.Thread(target=update_all, args=(c["lanes"][name], share, a.batch))
                   for c, share in zip(conns, shares, strict=True)]
        cpu0, wall0 = tree_cpu_s(server.proc.pid), perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        cpu_s, wall_s = tree_cpu_s(server.proc.pid) - cpu0, perf_counter() - wall0
        running = conns[0]["lanes"][name].count_documents(
            {"_id": {"$in": ids}, "status": "running"})
    finally:
        for c in conns:
            c.close()
    return {"clients": clients, "server_ms_per_doc": round(cpu_s * 1000 / a.tasks, 3),
            "wall_s": round(wall_s, 2), "running": running, "ok": running == a.tasks}


def run(a: argparse.Namespace) -> list[dict[str, Any]]:
    data = Path(tempfile.mkdtemp(prefix="sendscript-lanes-"))
    server = MongoServer(data / "lanes")
    rounds: list[dict[str, Any]] = []
    try:
        server.start()
        for r in range(a.rounds):
            order = (1, a.clients) if r % 2 == 0 else (a.clients, 1)
            ways = {k: one_way(server, f"r{r}_c{k}", a, k) for k in order}
            rounds.append({"round": r + 1, "in_a_row": ways[1], "side_by_side": ways[a.clients],
                           "ratio": round(ways[a.clients]["server_ms_per_doc"]
                                          / ways[1]["server_ms_per_doc"], 2)})
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)
    return rounds


def render(a: argparse.Namespace, rounds: list[dict[str, Any]]) -> None:
    print(f"{a.tasks} task documents pending -> running, {a.batch} a statement: server CPU "
          f"per document write, one client in a row against {a.clients} side by side")
    print(f"{'round':>5} {'in a row ms':>12} {'side by side ms':>16} {'ratio':>6} "
          f"{'wall in a row':>14} {'wall side by side':>18}")
    for r in rounds:
        one, many = r["in_a_row"], r["side_by_side"]
        print(f"{r['round']:>5} {one['server_ms_per_doc']:>12.3f} "
              f"{many['server_ms_per_doc']:>16.3f} {r['ratio']:>6.2f} "
              f"{one['wall_s']:>13.2f}s {many['wall_s']:>17.2f}s")
    med = statistics.median
    print(f"median {med(r['in_a_row']['server_ms_per_doc'] for r in rounds):>11.3f} "
          f"{med(r['side_by_side']['server_ms_per_doc'] for r in rounds):>16.3f} "
          f"{med(r['ratio'] for r in rounds):>6.2f}")
    bad = [r for r in rounds if not (r["in_a_row"]["ok"] and r["side_by_side"]["ok"])]
    print("read back: every document running" if not bad else
          f"read back: documents missing in round(s) {[r['round'] for r in bad]}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=4000)
    p.add_argument("--batch", type=int, default=32, help="documents a statement (32)")
    p.add_argument("--clients", type=int, default=4, help="clients side by side (4)")
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.clients < 2 or a.tasks < a.clients or a.batch < 1 or a.rounds < 1:
        p.error("need --clients >= 2, --tasks >= --clients, --batch >= 1, --rounds >= 1")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    rounds = run(a)
    if a.json:
        print(json.dumps(rounds, indent=2))
    else:
        render(a, rounds)
    return 0 if all(r["in_a_row"]["ok"] and r["side_by_side"]["ok"] for r in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
