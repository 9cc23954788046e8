"""A Python pull-mode agent: lease tasks from the agents API and run them.

    sendscript agent token add my-host          # prints TOKEN once
    python examples/python_agent.py --url http://127.0.0.1:8470 --token TOKEN

Submit tasks for it with `mode: "pull"` (and labels it carries), e.g.:

    from sendscript.client import SendScriptClient
    with SendScriptClient() as c:
        c.submit_many([{"mode": "pull", "labels": ["python"],
                        "script": {"id": "count", "args": {"to": 5}}}])
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from sendscript.agent import Agent, Fail, LeasedTask, Release, TaskContext


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8470")
    ap.add_argument("--token", required=True)
    ap.add_argument("--labels", default="python")
    ap.add_argument("--concurrency", type=int, default=2)
    args = ap.parse_args()
    agent = Agent(args.url, args.token, labels=args.labels.split(","),
                  concurrency=args.concurrency, version="example-1")

    @agent.handler
    def count(task: LeasedTask, ctx: TaskContext) -> dict[str, Any]:
        if task.script.get("id") != "count":
            raise Fail(f"unknown script {task.script.get('id')!r}", retryable=False)
        to = int(task.script.get("args", {}).get("to", 10))
        n = int(ctx.checkpoint.get("n", 0))  # resume where the last attempt stopped
        while n < to:
            if ctx.stopping.is_set() or ctx.cancelled.is_set():
                raise Release()  # given back; its checkpoint stays for the next agent
            time.sleep(0.5)
            n += 1
            ctx.progress({"n": n})
        return {"counted": n}

    return agent.run()


if __name__ == "__main__":
    raise SystemExit(main())
