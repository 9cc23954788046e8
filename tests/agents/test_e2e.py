"""End to end on the embedded servers: a fleet of Python agent processes (the SDK)
over pull tasks, some agents SIGKILLed mid-task.

Proves: every task completes exactly once; each task a killed agent held resumes on
another agent from the checkpoint the killed one last saved (between its last
acknowledged and its last sent step); no stale token changes anything; no device ran
two tasks at once (exec records and the agents' own logs). 400 tasks, 20 agents, 5 of
them killed: sized to run in every suite (about a minute). 2,000 tasks (50 agents, no
kills, every task once) is `python -m bench.agents`.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from sendscript.client import SendScriptClient
from sendscript.dev.processes import RoleProcess
from sendscript.settings import Settings
from sendscript.store import RECORDS, TASKS
from tests.agents.support import Api, db_of, new_token, start_agents
from tests.support import Roles, settings_env, wait_for

pytestmark = pytest.mark.e2e
AGENTS, KILLED, DEVICES = 20, 5, 10
FLEET_ENV = {"agent_lease_s": 10, "agent_ttl_s": 3, "agent_heartbeat_s": 0.5,
             "agent_sweep_interval_s": 0.3, "agent_poll_interval_s": 0.05,
             "agent_lease_rate": 200, "agent_lease_burst": 200, "log_level": "WARNING"}


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut by the kill
    return out


def start_agent(settings: Settings, url: str, token: str, agent_id: str, log_dir: Path,
                devices: str = "") -> RoleProcess:
    args = ["--url", url, f"--token={token}", "--id", agent_id, "--labels", "py,chrome",
            "--devices", devices, "--log", str(log_dir / f"{agent_id}.jsonl")]
    proc = RoleProcess(agent_id, args, settings_env(settings), log_dir)
    proc.args = args
    # Not `python -m sendscript`: the test's agent program.
    import subprocess

    out = open(log_dir / f"{agent_id}.out", "ab")
    proc.proc = subprocess.Popen([sys.executable, "-m", "tests.agents.agent_proc", *args],
                                 env=proc.env, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    out.close()
    return proc


def run_fleet(settings: Settings, roles: Roles, tmp_path: Path, n_tasks: int,
              timeout_s: float) -> None:
    for k, v in FLEET_ENV.items():
        setattr(settings, k, v)
    _, url = start_agents(roles)
    token = new_token(settings)
    logs = tmp_path / "agents"
    logs.mkdir()
    specs = []
    for i in range(n_tasks):
        spec: dict[str, Any] = {"mode": "pull", "labels": ["py"], "max_retries": 3,
                                "timeout_s": 60, "script": {"id": "steps", "args": {
                                    "i": i, "steps": 3, "ms": 15}}}
        if i % 4 == 0:
            spec["device_id"] = f"dev-{i // 4 % DEVICES}"
        specs.append(spec)
    with SendScriptClient(settings) as client:
        ids = [s.task_id for s in client.submit_many(specs)]
    fleet: dict[str, RoleProcess] = {}
    try:
        for i in range(AGENTS):
            aid = f"agent-{i:02d}"
            fleet[aid] = start_agent(settings, url, token, aid, logs,
                                     f"dev-{i}" if i < DEVICES else "")
        mongo, db = db_of(settings)
        with mongo:
            def done() -> int:
                dead = [a for a, p in fleet.items() if not p.running and a not in killed]
                assert not dead, f"agent(s) exited: {dead}"
                # The database is this test's own: no long $in (slow on SecantusDB).
                return db[TASKS].count_documents({"mode": "pull", "status": "success"})

            killed: list[str] = []

            wait_for(lambda: done() >= n_tasks // 10, timeout_s, "a tenth done", 0.2)
            killed += kill_mid_task(fleet, logs, KILLED)
            for j, aid in enumerate(killed):  # new agents take their places
                fleet[f"spare-{j}"] = start_agent(settings, url, token, f"spare-{j}", logs,
                                                  _devices(aid))
            wait_for(lambda: done() == n_tasks, timeout_s, f"all {n_tasks} tasks done", 0.5)
            check(settings, db, url, token, ids, logs, killed)
    finally:
        for proc in fleet.values():
            proc.stop(timeout_s=10)


def _devices(agent_id: str) -> str:
    i = int(agent_id.split("-")[1])
    return f"dev-{i}" if i < DEVICES else ""


def kill_mid_task(fleet: dict[str, RoleProcess], logs: Path, count: int) -> list[str]:
    """SIGKILL `count` agents, each while it holds a task with a saved checkpoint."""
    killed: list[str] = []
    deadline = time.monotonic() + 60
    candidates = [a for a in fleet if a.startswith("agent-")][::-1]  # device-less ones first
    while len(killed) < count and time.monotonic() < deadline:
        for aid in candidates:
            if aid in killed or len(killed) >= count:
                continue
            events = read_log(logs / f"{aid}.jsonl")
            open_tasks = _open(events)
            if any(st["acked"] >= 1 for st in open_tasks.values()):
                os.kill(fleet[aid].pid, signal.SIGKILL)
                fleet[aid].proc.wait(10)  # type: ignore[union-attr]
                killed.append(aid)
        time.sleep(0.01)
    assert len(killed) == count, f"killed only {killed}"
    return killed


def _open(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Tasks started and not done, from one agent's log: token, last sent / acked step."""
    state: dict[str, dict[str, Any]] = {}
    for e in events:
        if e["ev"] == "start":
            state[e["task"]] = {"token": e["token"], "sent": 0, "acked": 0,
                                "device": e.get("device"), "start": e["t"],
                                "from": int(e["checkpoint"].get("step", 0))}
            state[e["task"]]["sent"] = state[e["task"]]["acked"] = state[e["task"]]["from"]
        elif e["ev"] == "send" and e["task"] in state:
            state[e["task"]]["sent"] = e["step"]
        elif e["ev"] == "ack" and e["task"] in state:
            state[e["task"]]["acked"] = e["step"]
        elif e["ev"] == "done":
            state.pop(e["task"], None)
    return state


def check(settings: Settings, db: Any, url: str, token: str, ids: list[str], logs: Path,
          killed: list[str]) -> None:
    tasks = {d["_id"]: d for d in db[TASKS].find({})}
    assert set(tasks) == set(ids)
    records = defaultdict(list)
    for r in db[RECORDS].find({}):
        records[r["task_id"]].append(r)
    # Every task completed exactly once.
    assert all(t["status"] == "success" for t in tasks.values())
    for tid in ids:
        assert [r["status"] for r in records[tid]].count("success") == 1, records[tid]
    done_lines = defaultdict(int)
    for path in logs.glob("*.jsonl"):
        for e in read_log(path):
            if e["ev"] == "done":
                done_lines[e["task"]] += 1
    assert all(done_lines[t] >= 1 for t in ids)
    # Each task a killed agent held resumed elsewhere from its last saved checkpoint.
    resumed = 0
    for aid in killed:
        for tid, st in _open(read_log(logs / f"{aid}.jsonl")).items():
            task = tasks[tid]
            nxt = next(r for r in records[tid] if r["lease_token"] == st["token"])
            later = [r for r in records[tid] if r["attempt"] == nxt["attempt"] + 1]
            assert nxt["status"] == "timeout"
            assert later and later[0]["agent"] != aid
            handed = int((later[0].get("checkpoint_in") or {}).get("step", 0))
            assert st["acked"] <= handed <= st["sent"], (tid, st, later[0])
            final = next(r for r in records[tid] if r["status"] == "success")
            assert task["result"]["agent"] == final["agent"] != aid
            assert int(task["result"]["started_from"].get("step", 0)) >= handed
            resumed += 1
            # The killed lease's token changes nothing any more.
            api = Api(url, token, aid)
            for call, body in (("complete", {"result": {"stale": True}}),
                               ("progress", {"checkpoint": {"step": 0}}),
                               ("fail", {"error": "stale"}), ("release", {})):
                status, _ = api.post(call, task_id=tid, lease_token=st["token"], **body)
                assert status == 409, (call, status)
            after = db[TASKS].find_one({"_id": tid})
            assert (after["status"], after["result"], after["checkpoint"], after["attempt"]) \
                == (task["status"], task["result"], task["checkpoint"], task["attempt"])
            api.close()
    assert resumed >= KILLED
    # No device ran two tasks at once: by the exec records, and by the agents' logs.
    by_device = defaultdict(list)
    for recs in records.values():
        for r in recs:
            if r["device_id"] != "*":
                assert r["lock_value"] > 0
                by_device[r["device_id"]].append((r["started_at"], r["finished_at"]))
    for spans in by_device.values():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start
    runs = defaultdict(list)
    for path in logs.glob("*.jsonl"):
        started: dict[str, float] = {}
        events = read_log(path)
        last = events[-1]["t"] if events else 0
        for e in events:
            if e["ev"] == "start" and e.get("device"):
                started[e["task"]] = e["t"]
            elif e["ev"] == "done" and e["task"] in started:
                runs[e["device"]].append((started.pop(e["task"]), e["t"]))
        for tid, t0 in started.items():  # killed mid-task: ran until its last line
            runs[tasks[tid]["device_id"]].append((t0, last))
    assert runs
    for spans in runs.values():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start


def test_fleet_with_killed_agents(settings: Settings, roles: Roles, tmp_path: Path) -> None:
    run_fleet(settings, roles, tmp_path, 400, 120)

