"""The Python SDK as a process: SIGTERM stops it cleanly, finishing the task it holds
within its grace, or giving back (with its checkpoint, no attempt used) one that would
outlast it."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from sendscript.client import SendScriptClient
from sendscript.settings import Settings
from sendscript.store import TASKS
from tests.agents.support import db_of, new_token, start_agents
from tests.agents.test_e2e import read_log, start_agent
from tests.support import Roles, wait_for

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(("ms", "outcome"), [(400, "success"), (4000, "pending")])
def test_sigterm_finishes_or_gives_back_what_it_holds(
        settings: Settings, roles: Roles, tmp_path: Path, ms: int, outcome: str) -> None:
    _, url = start_agents(roles, agent_sweep_interval_s=0.2)
    token = new_token(settings)
    with SendScriptClient(settings) as client:
        [sub] = client.submit_many([{"mode": "pull", "labels": ["py"], "script": {
            "id": "steps", "args": {"steps": 4, "ms": ms}}}])
    proc = start_agent(settings, url, token, "sdk-1", tmp_path)
    log = tmp_path / "sdk-1.jsonl"
    try:
        wait_for(lambda: any(e["ev"] == "ack" for e in read_log(log)), 60,
                 "a saved checkpoint")
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    mongo, db = db_of(settings)
    with mongo:
        doc = db[TASKS].find_one({"_id": sub.task_id})
    assert doc is not None and doc["status"] == outcome
    assert any(e["ev"] == "stopped" for e in read_log(log))
    if outcome == "pending":  # given back: its checkpoint kept, its attempt not used
        assert doc["attempt"] == 0 and doc["checkpoint"]["step"] >= 1
        assert doc["last_lease"]["outcome"] == "release"
