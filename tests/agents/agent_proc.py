"""A Python agent process for the end-to-end tests and the benchmark (the SDK as a
user runs it). Each task's script says how many steps and how long each takes; every
step is saved as a checkpoint; the log file (JSON lines, written before and after each
call) tells the test what the agent did, up to the moment it was killed."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from sendscript.agent import Agent, LeasedTask, TaskContext


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--id", required=True)
    ap.add_argument("--labels", default="")
    ap.add_argument("--devices", default="")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--log", required=True)
    args = ap.parse_args()
    out = open(args.log, "a", buffering=1)  # line-buffered: a SIGKILL loses no written line

    def log(**event: Any) -> None:
        out.write(json.dumps({"t": time.time(), "pid": os.getpid(), **event}) + "\n")

    agent = Agent(args.url, args.token, agent_id=args.id,
                  labels=[x for x in args.labels.split(",") if x],
                  devices=[x for x in args.devices.split(",") if x],
                  version="test", concurrency=args.concurrency, wait_s=2.0, grace_s=5.0)

    @agent.handler
    def work(task: LeasedTask, ctx: TaskContext) -> dict[str, Any]:
        handed = dict(ctx.checkpoint)
        log(ev="start", task=task.id, attempt=task.attempt, token=task.lease_token,
            device=task.device_id, checkpoint=handed)
        steps, ms = int(task.script["args"]["steps"]), float(task.script["args"]["ms"])
        for step in range(int(handed.get("step", 0)), steps):
            time.sleep(ms / 1000)
            log(ev="send", task=task.id, step=step + 1)
            ctx.progress({"step": step + 1})
            log(ev="ack", task=task.id, step=step + 1)
        log(ev="done", task=task.id, device=task.device_id)
        return {"started_from": handed, "agent": args.id, "attempt": task.attempt}

    log(ev="up", agent=args.id)
    code = agent.run()
    log(ev="stopped", agent=args.id)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
