"""What one retention sweep costs the embedded server, by how many tasks are stored.

    python -m bench.retention_cost --stored 5000 20000 80000

For each size, a fresh embedded SecantusDB with the service's indexes holds that many
finished tasks, none due yet (finished within the last hour, kept for days), and the
leader's sweep (master/retention.py) runs as a new leader's first sweep does: every
window from the earliest possible time to the cutoff (about twenty reads a
retention class) and as a later sweep does (one window a class). Each is timed in
the server's CPU (from /proc). The same reads sent with a hint naming the
`updated_at` index, as the sweep did before, are timed beside them: the embedded
server answers a hinted query by walking the whole hinted index and decoding every
document in it, so their cost grows with what is stored, while the sweep's own
reads (the window's range first, no hint) cost what the window holds.

Checked at the end, from the store: every task seeded is read back by its id (nothing
was due).
Exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from rich.console import Console
from rich.table import Table

from bench.cpu import tree_cpu_s
from master.retention import BATCH, PurgeWindow, Retention
from sendscript import connect
from sendscript.dev.embedded import MongoServer
from sendscript.models import utcnow
from sendscript.settings import Settings
from sendscript.store import TASKS, UPDATED_INDEX_NAME, ensure_indexes

console = Console()


async def seed(db: AsyncDatabase, n: int) -> None:
    """`n` tasks finished within the last hour: none is due for days."""
    now = utcnow()
    for start in range(0, n, 5000):
        await db[TASKS].insert_many([{
            "_id": f"t{i:08d}", "device_id": f"phone-{i % 2000:05d}", "status": "success",
            "script": {"id": "bench"}, "created_at": now - timedelta(seconds=3600 - i * 3600 / n),
            "updated_at": now - timedelta(seconds=3600 - i * 3600 / n),
            "purge_at": now + timedelta(days=7), "run_at": now, "attempt": 1,
        } for i in range(start, min(n, start + 5000))])


async def hinted_reads(retention: Retention) -> int:
    """The first sweep's reads, each with the hint the sweep used to send."""
    reads, now = 0, utcnow()
    for target in (t for t in retention.targets if t.collection == TASKS):
        window, cutoff = PurgeWindow(), target.cutoff(now)
        while (span := window.next(cutoff)) is not None:
            found = retention.db[TASKS].find(target.due(*span, now), {"_id": 1}).limit(BATCH)
            ids = [d["_id"] async for d in found.hint(UPDATED_INDEX_NAME)]
            window.read(span, len(ids), cutoff)
            reads += 1
    return reads


async def measure(n: int, data: Path) -> dict[str, Any]:
    server = MongoServer(data / str(n))
    server.start()
    try:
        client = connect.mongo_async(Settings(mongo_url=server.url))
        db = connect.database(client)
        await ensure_indexes(db)
        await seed(db, n)
        retention = Retention(Settings(mongo_url=server.url), db)
        pid = server.proc.pid if server.proc else 0

        async def cpu_ms(step: Any) -> float:
            before = tree_cpu_s(pid)
            await step()
            return (tree_cpu_s(pid) - before) * 1000

        first = await cpu_ms(retention.sweep)  # a new leader: every window since EARLIEST
        later = await cpu_ms(retention.sweep)  # the next one: the window since the first
        hinted = await cpu_ms(lambda: hinted_reads(retention))
        # Read back by id: every task seeded is still there, and nothing else.
        ids = {d["_id"] async for d in db[TASKS].find({}, {"_id": 1})}
        await client.close()
        seeded = {f"t{i:08d}" for i in range(n)}
        return {"stored": n, "first_ms": first, "later_ms": later, "hinted_ms": hinted,
                "left": len(ids), "ok": ids == seeded and sum(retention.deleted.values()) == 0}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stored", type=int, nargs="+", default=[5000, 20000, 80000])
    args = parser.parse_args(argv)
    data = Path(tempfile.mkdtemp(prefix="sendscript-retention-"))
    try:
        rows = [asyncio.run(measure(n, data)) for n in args.stored]
    finally:
        shutil.rmtree(data, ignore_errors=True)
    table = Table(title="server CPU of one retention sweep (ms), nothing due")
    for column in ("tasks stored", "first sweep", "later sweep",
                   "first sweep's reads, hinted", "tasks left", "ok"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(f"{r['stored']:,}", f"{r['first_ms']:.0f}", f"{r['later_ms']:.0f}",
                      f"{r['hinted_ms']:.0f}", f"{r['left']:,}", "yes" if r["ok"] else "NO")
    console.print(table)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
