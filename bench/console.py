"""What the console asks of the stores, with 1,000,000 tasks stored: tasks per status
and search pages, in milliseconds per call (median of several).

    python -m bench.console                      # 1,000,000 tasks on embedded servers
    python -m bench.console --tasks 100000 --json
    python -m bench.console --keep DIR           # reuse the data of an earlier run
    python -m bench.console --only fleet         # the fleet view alone (20,000 devices)

1. Fill: `--tasks` task documents `insert_many`ed straight into `script_tasks` in
   batches, each batch's search documents into `task_search` first, as the store
   writes them (the production indexes in place), with a realistic mix: created over
   the last `--days` days, ~90 % success and the rest failed, expired, cancelled,
   pending, waiting, retry_waiting, running, sent; `--devices` devices, a few
   queues and scripts, a fifth of them in fan-out batches, errors on the failed.
2. Counts: the leader's keeper builds its counts once (one pass over the
   collection), then `status`'s read of them is timed, beside the aggregate it
   replaces; then `--moves` tasks change status and one incremental pass is timed.
3. Search (console/search.py): several filters, the first page and a deep page
   (reached by following the cursor `--deep` pages).
4. The write cost of the counts' `updated_at` index: `--writes` status
   changes timed with and without it.
5. The fleet view (bench/fleet_view.py): `--fleet` devices, the Devices page and its
   searches (id prefix, group), first and deep pages, against the console's page
   budget; and the consumer's upkeep of the `devices` documents per result.

What is timed here is store reads and writes, not tasks run, so the run verifies
what it measured rather than any task's status: the documents stored are counted
back exactly (the fill's inserts, every one); the kept counts equal the aggregate,
before and after the moves, and every move changed its task; each search page
timed (first and deep) holds exactly what a direct query of the same filter,
newest first, returns over the span the page covers; every timed write matched
its task. Each check is printed; exits 1 when one fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bson import ObjectId
from pymongo import MongoClient
from rich.console import Console
from rich.table import Table

from bench import fleet_view
from bench.timing import median_ms
from console.search import (
    NEWEST_FIRST,
    SearchPage,
    TaskQuery,
    build_filter,
    decode_cursor,
    search_tasks_sync,
)
from sendscript import connect, counts
from sendscript.dev.embedded import EmbeddedServers
from sendscript.settings import Settings
from sendscript.status import TaskStatus, task_cas
from sendscript.store import GROUPS, TASKS, ensure_indexes
from sendscript.task_search import SEARCH, search_doc

console = Console(stderr=True)
MIX = [("success", 0.90), ("failed", 0.04), ("expired", 0.01), ("cancelled", 0.01),
       ("pending", 0.02), ("waiting", 0.01), ("retry_waiting", 0.005), ("running", 0.003),
       ("sent", 0.002)]
QUEUES = ["default", "default", "default", "bulk", "high"]
TERMINAL = {"success", "failed", "expired", "cancelled"}



def make_docs(start: int, n: int, total: int, now: datetime, days: float, devices: int,
              rng: random.Random) -> list[dict[str, Any]]:
    statuses = [s for s, _ in MIX]
    weights = [w for _, w in MIX]
    span = days * 86400
    docs = []
    for i in range(start, start + n):
        created = now - timedelta(seconds=span * (1 - i / total))  # oldest first
        status = rng.choices(statuses, weights)[0]
        finished = created + timedelta(seconds=rng.uniform(1, 120))
        doc: dict[str, Any] = {
            "_id": str(ObjectId()), "device_id": f"dev-{rng.randrange(devices):05d}",
            "script": {"id": f"script-{rng.randrange(20)}", "args": {"n": i}},
            "priority": 5, "status": status, "run_at": created, "attempt": 1,
            "max_retries": 3, "timeout_s": 300.0, "queue": rng.choice(QUEUES),
            "created_at": created, "updated_at": finished if status in TERMINAL else created,
        }
        if rng.random() < 0.2:
            doc["batch_id"] = f"batch-{i // 500}"
        if status in TERMINAL:
            doc["finished_at"] = finished
            doc["purge_at"] = finished + timedelta(days=30)
        if status == "failed":
            doc["last_error"] = f"ERROR [E_{rng.randrange(5)}]: device said no"
        docs.append(doc)
    return docs


def fill(db: Any, n: int, days: float, devices: int, batch: int) -> dict[str, Any]:
    rng = random.Random(1)
    now = datetime.now(UTC)
    before = db[TASKS].count_documents({})
    started = time.perf_counter()
    for start in range(0, n, batch):
        docs = make_docs(start, min(batch, n - start), n, now, days, devices, rng)
        # as the store writes them: each task's search document, then the task
        db[SEARCH].insert_many([search_doc(d) for d in docs], ordered=False)
        db[TASKS].insert_many(docs, ordered=False)
        if (start // batch) % 10 == 0:
            console.print(f"  {start + batch:,} / {n:,} stored "
                          f"({time.perf_counter() - started:.0f} s)")
    took = time.perf_counter() - started
    stored = db[TASKS].count_documents({}) - before  # read back, not assumed
    return {"tasks": n, "fill_s": round(took, 1), "inserts_per_s": round(n / took),
            "read_back": stored, "all_stored": stored == n}


def search_cases(now: datetime, stored: int) -> dict[str, TaskQuery]:
    return {
        "all, newest first": TaskQuery(),
        "device": TaskQuery(device_id="dev-00042"),
        "group (50 devices)": TaskQuery(group="rack-1"),
        "status failed": TaskQuery(statuses=["failed"]),
        "queue + script": TaskQuery(queue="bulk", script_id="script-3"),
        "error prefix": TaskQuery(error_prefix="ERROR [E_2]"),
        "recent batch": TaskQuery(batch_id=f"batch-{(stored - 1000) // 500}"),
        "last hour": TaskQuery(created_from=now - timedelta(hours=1)),
        "pending, last day": TaskQuery(statuses=["pending"],
                                       created_from=now - timedelta(days=1)),
    }


def bench_search(db: Any, repeat: int, deep: int) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    rows = []
    stored = db[TASKS].estimated_document_count()
    for name, query in search_cases(now, stored).items():
        first = search_tasks_sync(db, query)
        first_ms = median_ms(lambda q=query: search_tasks_sync(db, q), repeat)
        same = same_as_direct(db, query, first)
        page, pages = first, 1
        while page.next_after and pages < deep:
            page = search_tasks_sync(db, _with_after(query, page.next_after))
            pages += 1
        deep_ms = None
        if page.next_after:
            deep_query = _with_after(query, page.next_after)
            deep_ms = median_ms(lambda q=deep_query: search_tasks_sync(db, q), repeat)
            same = same and same_as_direct(db, deep_query, search_tasks_sync(db, deep_query))
        rows.append({"search": name, "first_page_ms": first_ms, "items": len(first.items),
                     "windows": first.queries, "deep_page": pages + 1 if deep_ms else None,
                     "deep_page_ms": deep_ms, "same_as_direct": same})
        console.print(f"  search {name}: {first_ms} ms, deep {deep_ms} ms")
    return rows


def _with_after(query: TaskQuery, after: str) -> TaskQuery:
    return TaskQuery(**{**query.__dict__, "after": after})


def same_as_direct(db: Any, query: TaskQuery, page: SearchPage) -> bool:
    """The page holds exactly the tasks a direct query of its filter returns, newest
    first, over the span it covers: below its cursor (`after`) and down to its last
    item (a full page: those first), to where it stopped (a partial one) or to the
    range's start (the last page)."""
    devices = None
    if query.group is not None:
        doc = db[GROUPS].find_one({"_id": query.group})
        devices = list(doc.get("devices", [])) if doc else []
    created: dict[str, Any] = {}
    lowest = query.created_from
    below = decode_cursor(query.after) if query.after else None
    if below is not None:
        created["$lte"] = below[0]
    full = page.next_after is not None and not page.partial
    if full:
        lowest = page.items[-1]["created_at"]
    elif page.partial and page.searched_to is not None:
        lowest = page.searched_to
    if lowest is not None:
        # ">= lowest" for dates of whole milliseconds (BSON's): the embedded server
        # drops the document at a `$gte` bound read through the batch index
        # (batch_id, created_at descending), and this query must not share a flaw.
        created["$gt"] = lowest - timedelta(milliseconds=1)
    flt = build_filter(query, devices)
    if created:
        flt["created_at"] = created
    # What the search documents answer (device, batch, queue, script, time) read there,
    # the rest matched on the tasks: script_tasks keeps no index on created_at.
    on_tasks = {k: v for k, v in flt.items() if k in ("status", "last_error")}
    found = {("script_id" if k == "script.id" else k): v for k, v in flt.items()
             if k not in on_tasks}
    ids = [d["_id"] for d in db[SEARCH].find(found, {"_id": 1, "created_at": 1})
           .sort(NEWEST_FIRST) if below is None or (d["created_at"], d["_id"]) < below]
    kept = {d["_id"] for i in range(0, len(ids), 250)
            for d in db[TASKS].find({"_id": {"$in": ids[i:i + 250]}, **on_tasks}, {"_id": 1})}
    direct = [i for i in ids if i in kept]
    got = [d["_id"] for d in page.items]
    return got == (direct[:len(got)] if full else direct)


def bench_counts(settings: Settings, db: Any, repeat: int, moves: int) -> dict[str, Any]:
    r = connect.redis_sync(settings)
    out: dict[str, Any] = {}

    async def keeper_pass() -> counts.PassReport:
        client = connect.redis_async(settings)
        mongo = connect.mongo_async(settings)
        try:
            keeper = counts.CountKeeper(settings, client, connect.database(mongo))
            return await keeper.run_pass()
        finally:
            await client.aclose()
            await mongo.close()

    started = time.perf_counter()
    built = asyncio.run(keeper_pass())
    out["build_s"] = round(time.perf_counter() - started, 1)
    out["rebuilt"] = built.rebuilt
    out["status_counts_ms"] = median_ms(lambda: counts.read_sync(r, settings.keys.prefix),
                                        repeat)
    out["counts"] = counts.read_sync(r, settings.keys.prefix).by_status
    started = time.perf_counter()
    agg = {d["_id"]: d["n"] for d in db[TASKS].aggregate(
        [{"$group": {"_id": "$status", "n": {"$sum": 1}}}])}
    out["aggregate_ms"] = round((time.perf_counter() - started) * 1000, 1)
    out["counts_equal_aggregate"] = agg == out["counts"]
    # Some tasks move: pending -> running, as workers would.
    now = datetime.now(UTC)
    moved = [d["_id"] for d in db[TASKS].find({"status": "pending"}, {"_id": 1}).limit(moves)]
    changed = sum(db[TASKS].update_one(*task_cas(task_id, TaskStatus.PENDING,
                                                 TaskStatus.RUNNING, now)).modified_count
                  for task_id in moved)
    out["moves_applied"] = changed == len(moved)
    started = time.perf_counter()
    report = asyncio.run(keeper_pass())
    out["pass_after_moves_ms"] = round((time.perf_counter() - started) * 1000, 1)
    out["moves"] = len(moved)
    out["pass_recounted_buckets"] = report.recounted
    after = counts.read_sync(r, settings.keys.prefix).by_status
    agg["pending"] = agg.get("pending", 0) - len(moved)
    agg["running"] = agg.get("running", 0) + len(moved)
    out["counts_equal_after_moves"] = after == {k: v for k, v in agg.items() if v}
    r.close()
    return out


def bench_index_cost(db: Any, writes: int) -> dict[str, Any]:
    """Status changes with and without the updated_at index: what it costs every write."""
    col = db[TASKS]
    ids = [d["_id"] for d in col.find({"status": "success"}, {"_id": 1}).limit(writes * 2)]
    now = datetime.now(UTC)

    matched = 0

    def touch(part: Sequence[str]) -> float:
        nonlocal matched
        started = time.perf_counter()
        for task_id in part:
            matched += col.update_one({"_id": task_id, "status": "success"},
                                      {"$set": {"updated_at": now, "status": "success"}}
                                      ).matched_count
        return (time.perf_counter() - started) * 1000 / max(1, len(part))

    with_index = touch(ids[:writes])
    col.drop_index("updated_at_1")
    without = touch(ids[writes:])
    col.create_index("updated_at")
    return {"writes": writes, "ms_per_write_with": round(with_index, 3),
            "ms_per_write_without": round(without, 3),
            "all_matched": matched == len(ids) == 2 * writes}


def run(args: argparse.Namespace) -> dict[str, Any]:
    data = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-console-"))
    servers = EmbeddedServers(data, names=["redis", "mongo"])
    servers.start()
    try:
        settings = Settings(_env_file=None, **servers.urls(), key_prefix="benchconsole")
        mongo = MongoClient(settings.mongo_url, tz_aware=True, retryWrites=False)
        db = mongo.get_default_database("sendscript")

        async def indexes() -> None:
            client = connect.mongo_async(settings)
            await ensure_indexes(connect.database(client))
            await client.close()

        asyncio.run(indexes())
        result: dict[str, Any] = {}
        if args.only != "fleet":
            stored = db[TASKS].estimated_document_count()
            if stored < args.tasks:
                console.print(f"storing {args.tasks - stored:,} tasks")
                result["fill"] = fill(db, args.tasks - stored, args.days, args.devices,
                                      args.batch)
            result["stored"] = db[TASKS].count_documents({})
            console.print("counts")
            result["counts"] = bench_counts(settings, db, args.repeat, args.moves)
            console.print("search")
            # the group search's group (made here, not by the fill: the fleet part below
            # removes the groups not its own, and `--keep` may skip the fill)
            db[GROUPS].replace_one({"_id": "rack-1"}, {"_id": "rack-1", "devices": [
                f"dev-{i:05d}" for i in range(50)]}, upsert=True)
            result["search"] = bench_search(db, args.repeat, args.deep)
            console.print("index cost")
            result["index_cost"] = bench_index_cost(db, args.writes)
        if args.only in ("fleet", None):
            console.print(f"fleet view: {args.fleet:,} devices")
            server = servers.servers["mongo"].proc
            result["fleet"] = fleet_view.run(settings, args.fleet, args.repeat, args.deep,
                                             args.fleet_batch, server.pid if server else None)
        mongo.close()
        return result
    finally:
        servers.stop()
        if not args.keep:
            shutil.rmtree(data, ignore_errors=True)


def render(result: dict[str, Any]) -> None:
    out = Console()
    if "counts" in result:
        render_tasks(out, result)
    if "fleet" in result:
        render_fleet(out, result["fleet"])
    for check, passed in checks(result).items():
        out.print(f"verified: {check}: {'yes' if passed else 'NO'}", markup=False,
                  highlight=False)


def render_fleet(out: Console, f: dict[str, Any]) -> None:
    s = f["seed"]
    out.print(f"fleet: {s['stored']:,} devices documents ({s['fill_s']} s through the "
              f"consumer's updates), {s['locked']:,} locked; id index rebuilt from Mongo in "
              f"{s['index_build_s']} s")
    table = Table("page", "first page ms", "deep page", "deep page ms", "within budget",
                  title=f"Devices page reads (median ms; budget {f['budget_ms']} ms)")
    for row in f["pages"]:
        table.add_row(row["page"], str(row["first_ms"]), str(row["deep_page"] or "-"),
                      str(row["deep_ms"] or "-"), "yes" if row["within_budget"] else "NO")
    out.print(table)
    u = f["upkeep"]
    for name, what in (("first_of_hour", "a device's first batch of the hour"),
                       ("steady", "the batches after it")):
        w = u[name]
        out.print(f"consumer upkeep, {what}: {w['ops']} updates for {u['batch']} results on "
                  f"as many devices, {w['wall_ms']} ms wall ({w['wall_ms_per_result']} ms a "
                  f"result), Mongo server CPU {w['server_cpu_ms_per_result']} ms a result")


def render_tasks(out: Console, result: dict[str, Any]) -> None:
    c = result["counts"]
    out.print(f"tasks stored: {result['stored']:,}"
              + (f"  (filled in {result['fill']['fill_s']} s, "
                 f"{result['fill']['inserts_per_s']:,}/s)" if "fill" in result else ""))
    out.print(f"status counts: {c['status_counts_ms']} ms (kept; the aggregate they replace "
              f"{c['aggregate_ms']} ms; equal: {c['counts_equal_aggregate']}); built in "
              f"{c['build_s']} s; a pass after {c['moves']} moves {c['pass_after_moves_ms']} ms "
              f"({c['pass_recounted_buckets']} buckets; equal: {c['counts_equal_after_moves']})")
    table = Table("search", "first page ms", "items", "windows", "deep page", "deep page ms",
                  title="task search (median ms per call)")
    for row in result["search"]:
        table.add_row(row["search"], str(row["first_page_ms"]), str(row["items"]),
                      str(row["windows"]), str(row["deep_page"] or "-"),
                      str(row["deep_page_ms"] or "-"))
    out.print(table)
    ic = result["index_cost"]
    out.print(f"updated_at index: {ic['ms_per_write_with']} ms per status change with it, "
              f"{ic['ms_per_write_without']} ms without ({ic['writes']} writes each)")


def checks(result: dict[str, Any]) -> dict[str, bool]:
    """What the run read back against what it did (see the module's docstring)."""
    out = {}
    if "counts" in result:
        out.update(task_checks(result))
    if "fleet" in result:
        f = result["fleet"]
        wrong = [row["page"] for row in f["pages"] if not row["right"]]
        out["every fleet page holds the next devices in id order, running ones with their "
            "task" + (f" (not: {', '.join(wrong)})" if wrong else "")] = not wrong
        out[f"{f['seed']['devices']:,} devices documents stored"] = \
            f["seed"]["stored"] == f["seed"]["devices"]
    return out


def task_checks(result: dict[str, Any]) -> dict[str, bool]:
    c, fill = result["counts"], result.get("fill")
    out = {}
    if fill is not None:
        out[f"{fill['tasks']:,} inserted, {fill['read_back']:,} counted back"] = \
            fill["all_stored"]
    out["kept counts equal the aggregate"] = c["counts_equal_aggregate"]
    out[f"all {c['moves']} moves changed their task"] = c["moves_applied"]
    out["kept counts equal the aggregate after the moves"] = c["counts_equal_after_moves"]
    differ = [row["search"] for row in result["search"] if not row["same_as_direct"]]
    out["every search page equals a direct query"
        + (f" (not: {', '.join(differ)})" if differ else "")] = not differ
    out["every timed write matched its task"] = result["index_cost"]["all_matched"]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.console", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=1_000_000)
    p.add_argument("--days", type=float, default=7.0)
    p.add_argument("--devices", type=int, default=2000)
    p.add_argument("--batch", type=int, default=10_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--deep", type=int, default=20, help="pages followed to the deep page")
    p.add_argument("--moves", type=int, default=1000)
    p.add_argument("--writes", type=int, default=500)
    p.add_argument("--fleet", type=int, default=20_000, help="devices of the fleet view")
    p.add_argument("--fleet-batch", type=int, default=200,
                   help="results per consumer write timed (SENDSCRIPT_CONSUMER_BATCH)")
    p.add_argument("--only", choices=["tasks", "fleet"], help="run one part alone")
    p.add_argument("--keep", help="data directory kept between runs")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result, default=str))
    else:
        render(result)
    return 0 if all(checks(result).values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
