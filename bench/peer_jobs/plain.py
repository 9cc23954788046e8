"""The job in plain processes: each pops task messages from a Redis list and runs
them one by one (the floor a task queue adds its cost to).

    python -m bench.peer_jobs.plain --procs 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys

from bench.peer_jobs.job import context, run_job

QUEUE = "peers:plain:queue"


def serve() -> None:
    ctx = context()
    while True:
        item = ctx.redis.brpop([QUEUE], timeout=5)
        if item is None:
            continue
        msg = json.loads(item[1])
        run_job(msg["task_id"], msg["device_id"], msg["n"])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--procs", type=int, default=2)
    a = p.parse_args()
    procs = [multiprocessing.get_context("spawn").Process(target=serve, daemon=True)
             for _ in range(a.procs)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
