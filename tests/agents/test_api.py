"""The agents API on the real servers, through HTTP: leases, progress, the end of a
lease, and every hostile call refused with a 4xx that changes nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from sendscript import connect, pauses
from sendscript.agent_store import AGENTS, leases_held_sync
from sendscript.client import SendScriptClient
from sendscript.locks import lock_owner, owner_entry
from sendscript.models import PULL_HOLDER
from sendscript.settings import Settings
from sendscript.store import PULL_TASK_INDEXES, RECORDS, TASKS
from tests.agents.support import Api, db_of, new_token, start_agents
from tests.support import Roles, wait_for

FAST = {"agent_lease_s": 3, "agent_ttl_s": 3, "agent_sweep_interval_s": 0.2,
        "agent_poll_interval_s": 0.05, "agent_checkpoint_max_bytes": 1000,
        "agent_result_max_bytes": 2000, "agent_lease_rate": 5, "agent_lease_burst": 5,
        "retry_base_s": 0.2, "retry_jitter": 0}


@pytest.fixture
def api(settings: Settings, roles: Roles) -> Iterator[tuple[str, str]]:
    for k, v in FAST.items():
        setattr(settings, k, v)
    _, url = start_agents(roles)
    yield url, new_token(settings)


def submit(settings: Settings, n: int = 1, **spec: Any) -> list[str]:
    with SendScriptClient(settings) as client:
        specs = [{"mode": "pull", "script": {"id": "scrape", "args": {"i": i}}, **spec}
                 for i in range(n)]
        return [s.task_id for s in client.submit_many(specs)]


def task(settings: Settings, task_id: str) -> dict[str, Any]:
    client, db = db_of(settings)
    with client:
        doc = db[TASKS].find_one({"_id": task_id})
        assert doc is not None
        return doc


def records(settings: Settings, task_id: str) -> list[dict[str, Any]]:
    client, db = db_of(settings)
    with client:
        return list(db[RECORDS].find({"task_id": task_id}).sort("attempt", 1))


def agent(url: str, token: str, agent_id: str, **register: Any) -> Api:
    a = Api(url, token, agent_id)
    a.ok("register", **register)
    return a


def test_lease_progress_complete_and_stale_tokens(settings: Settings,
                                                  api: tuple[str, str]) -> None:
    url, token = api
    client, db = db_of(settings)
    with client:  # the role made the pull indexes its lease queries read
        made = set(db[TASKS].index_information())
    assert {m.document["name"] for m in PULL_TASK_INDEXES} <= made
    [tid] = submit(settings, labels=["chrome"])
    plain = agent(url, token, "plain")
    assert plain.ok("lease", limit=5)["tasks"] == []  # lacks the label
    a = agent(url, token, "a", labels=["chrome", "ru"])
    [leased] = a.ok("lease", limit=5, wait_s=2)["tasks"]
    assert leased["task_id"] == tid and leased["attempt"] == 1 and leased["checkpoint"] == {}
    lt = leased["lease_token"]
    a.ok("progress", task_id=tid, lease_token=lt, checkpoint={"page": 2, "seen": 10})
    a.ok("progress", task_id=tid, lease_token=lt, checkpoint={"page": 3, "seen": None})
    assert task(settings, tid)["checkpoint"] == {"page": 3}
    # Another agent, or a made-up token: refused, nothing changes.
    b = agent(url, token, "b", labels=["chrome"])
    assert b.post("complete", task_id=tid, lease_token=lt, result={})[0] == 403
    assert a.post("complete", task_id=tid, lease_token=lt[:-2] + "xx", result={})[0] == 409
    assert a.post("progress", task_id="nope", lease_token=lt, checkpoint={})[0] == 404
    assert task(settings, tid)["status"] == "running"
    a.ok("complete", task_id=tid, lease_token=lt, result={"rows": 5})
    again = a.ok("complete", task_id=tid, lease_token=lt, result={"rows": 5})
    assert again["repeated"] is True  # a repeat is harmless
    status, body = a.post("fail", task_id=tid, lease_token=lt, error="late")
    assert status == 409 and "ended (complete)" in body["detail"]
    assert a.post("progress", task_id=tid, lease_token=lt, checkpoint={"x": 1})[0] == 409
    done = task(settings, tid)
    assert (done["status"], done["result"], done["checkpoint"]) == ("success", {"rows": 5},
                                                                    {"page": 3})
    assert "lease" not in done and done["master"] == PULL_HOLDER
    [rec] = records(settings, tid)
    assert rec["status"] == "success" and rec["agent"] == "a"


def test_hostile_calls_are_refused_with_a_reason(settings: Settings,
                                                 api: tuple[str, str]) -> None:
    url, token = api
    [tid] = submit(settings)
    a = agent(url, token, "a")
    import httpx

    assert httpx.post(f"{url}/api/agents/lease", json={"agent_id": "a"}).status_code == 401
    bad = httpx.post(f"{url}/api/agents/lease", json={"agent_id": "a"},
                     headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401
    raw = a.http.post(f"{url}/api/agents/lease", content=b"{not json")
    assert raw.status_code == 400 and "not JSON" in raw.json()["detail"]
    assert a.post("lease", limit=0)[0] == 422
    assert Api(url, token, "ghost").post("lease")[0] == 404  # never registered
    [leased] = a.ok("lease", wait_s=2)["tasks"]
    lt = leased["lease_token"]
    status, body = a.post("progress", task_id=tid, lease_token=lt, checkpoint={"x": "y" * 2000})
    assert status == 413 and "CHECKPOINT" in body["detail"]
    assert a.post("complete", task_id=tid, lease_token=lt, result={"x": "y" * 3000})[0] == 413
    huge = a.http.post(f"{url}/api/agents/complete", content=b"x" * 100_000)
    assert huge.status_code == 413
    doc = task(settings, tid)
    assert doc["status"] == "running" and "checkpoint" not in doc
    # A flood of lease calls meets the per-agent budget (5 a second, bursts of 5).
    codes = [a.post("lease")[0] for _ in range(12)]
    assert 429 in codes
    a.ok("complete", task_id=tid, lease_token=lt, result={})


def test_expired_lease_hands_the_checkpoint_to_the_next_agent(
        settings: Settings, api: tuple[str, str]) -> None:
    url, token = api
    [tid] = submit(settings, max_retries=1)
    a = agent(url, token, "a")
    [first] = a.ok("lease", wait_s=2)["tasks"]
    a.ok("progress", task_id=tid, lease_token=first["lease_token"], checkpoint={"page": 4})
    b = agent(url, token, "b")
    # No progress past the lease: the sweep sends it back with its checkpoint.
    [second] = b.ok("lease", wait_s=15)["tasks"]
    assert second["task_id"] == tid and second["attempt"] == 2
    assert second["checkpoint"] == {"page": 4}
    assert a.post("complete", task_id=tid, lease_token=first["lease_token"], result={})[0] == 409
    b.ok("complete", task_id=tid, lease_token=second["lease_token"], result={"ok": 1})
    recs = records(settings, tid)
    assert [r["status"] for r in recs] == ["timeout", "success"]
    assert recs[1]["checkpoint_in"] == {"page": 4}


def test_release_fail_retry_and_attempts(settings: Settings, api: tuple[str, str]) -> None:
    url, token = api
    [tid] = submit(settings, max_retries=1)
    a = agent(url, token, "a")
    [t1] = a.ok("lease", wait_s=2)["tasks"]
    a.ok("release", task_id=tid, lease_token=t1["lease_token"])
    assert a.ok("release", task_id=tid, lease_token=t1["lease_token"])["repeated"]
    [t2] = a.ok("lease", wait_s=2)["tasks"]
    assert t2["attempt"] == 1  # the release used no attempt
    assert a.ok("fail", task_id=tid, lease_token=t2["lease_token"],
                error="boom")["status"] == "retry_waiting"
    [t3] = a.ok("lease", wait_s=10)["tasks"]  # due again after the backoff
    assert t3["attempt"] == 2
    assert a.ok("fail", task_id=tid, lease_token=t3["lease_token"],
                error="boom")["status"] == "failed"
    assert task(settings, tid)["status"] == "failed"
    assert [r["status"] for r in records(settings, tid)] == ["failed", "failed"]


def test_devices_pauses_and_lost_agents(settings: Settings, api: tuple[str, str]) -> None:
    url, token = api
    ids = submit(settings, 2, device_id="phone-1")
    other = agent(url, token, "other")
    assert other.ok("lease", limit=5)["tasks"] == []  # not its device
    a = agent(url, token, "a", devices=["phone-1"])
    status, body = Api(url, token, "b").post("register", devices=["phone-1"])
    assert status == 409 and "phone-1" in body["detail"]
    [one] = a.ok("lease", limit=5, wait_s=1)["tasks"]  # one task per device at a time
    assert a.ok("lease", limit=5)["tasks"] == []
    r = connect.redis_sync(settings)
    fence = int(r.get(settings.keys.device_lock("phone-1")))
    assert one["lease_token"].split(".")[1] == str(fence)
    assert records(settings, one["task_id"])[0]["lock_value"] == fence
    # The lock names its task (and the agent) as owner: the orphan sweep finds the
    # lease's record through it, also once the task is cancelled while leased.
    entry = r.hget(settings.keys.lock_owners, "phone-1")
    assert owner_entry(entry, fence) == (fence, lock_owner(one["task_id"], "agent:a"))
    # A device pause holds the other task; resume lets it go.
    pauses.pause_sync(r, settings.keys, "device:phone-1", "test")
    a.ok("complete", task_id=one["task_id"], lease_token=one["lease_token"], result={})
    assert r.get(settings.keys.device_lock("phone-1")) is None
    # The pause is read at most 1 s late: wait until a lease call finds the task held.
    wait_for(lambda: a.post("lease")[1].get("tasks") == [] and _held(url, token), 10,
             "the paused task held", interval_s=0.3)
    pauses.resume_sync(r, settings.keys, "device:phone-1")
    [two] = a.ok("lease", wait_s=5)["tasks"]
    assert {one["task_id"], two["task_id"]} == set(ids)
    # The agent goes silent: lost, and its lease goes back.
    wait_for(lambda: task(settings, two["task_id"])["status"] == "pending", 15,
             "the lost agent's lease back")
    listed = other.http.get(f"{url}/api/agents").json()["agents"]
    assert {x["_id"]: x["state"] for x in listed}["a"] == "lost"
    r.close()


def _held(url: str, token: str) -> bool:
    return _held_count(url, token, "device:phone-1") > 0


def test_pull_tasks_are_never_held_by_a_master(settings: Settings) -> None:
    ids = submit(settings, 2, run_at=time.time() + 3600)
    with redis.Redis.from_url(settings.redis_url or "") as r:
        assert r.llen(settings.keys.ready) == 2  # refs for a master to take
    for tid in ids:
        doc = task(settings, tid)
        assert (doc["mode"], doc["master"], doc["device_id"], doc["status"]) == (
            "pull", PULL_HOLDER, "*", "waiting")


def test_heartbeat_tells_an_agent_to_cancel_and_to_stop(settings: Settings,
                                                        api: tuple[str, str]) -> None:
    import subprocess
    import sys

    from tests.support import settings_env

    url, token = api
    [tid] = submit(settings)
    a = agent(url, token, "a")
    [leased] = a.ok("lease", wait_s=2)["tasks"]
    assert a.ok("heartbeat") == {"ok": True, "stop": False, "quiet": False, "cancel": []}
    with SendScriptClient(settings) as client:
        assert client.cancel(tid) == "running"
    assert a.ok("heartbeat")["cancel"] == [tid]
    assert a.post("complete", task_id=tid, lease_token=leased["lease_token"], result={})[0] == 409
    done = subprocess.run([sys.executable, "-m", "sendscript", "agent", "stop", "a"],
                          env=settings_env(settings), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert a.ok("heartbeat")["stop"] is True
    listed = subprocess.run([sys.executable, "-m", "sendscript", "agent", "list", "--json"],
                            env=settings_env(settings), capture_output=True, text=True,
                            timeout=60)
    assert '"_id": "a"' in listed.stdout and '"state": "active"' in listed.stdout
    # The sweep ends the cancelled task's lease (record cancelled) once the agent was told.
    wait_for(lambda: records(settings, tid)[0]["status"] == "cancelled", 15,
             "the cancelled lease ended")
    assert "lease" not in task(settings, tid)


def test_queue_caps_and_rate_limits_hold_leases(settings: Settings, roles: Roles) -> None:
    _, url = start_agents(roles, queues="bulk=1", rate_limits="queue:slow=1/1h",
                          agent_poll_interval_s=0.05)
    token = new_token(settings)
    bulk = submit(settings, 2, queue="bulk")
    slow = submit(settings, 2, queue="slow")
    a = agent(url, token, "a")
    got = a.ok("lease", limit=10, wait_s=2)["tasks"]
    by_queue = {q: [t for t in got if t["queue"] == q] for q in ("bulk", "slow")}
    assert len(by_queue["bulk"]) == 1 and len(by_queue["slow"]) == 1
    assert a.ok("lease", limit=10)["tasks"] == []  # the cap and the limit hold the rest
    one = by_queue["bulk"][0]
    a.ok("complete", task_id=one["task_id"], lease_token=one["lease_token"], result={})
    [two] = a.ok("lease", limit=10, wait_s=5)["tasks"]  # the cap's slot is free again
    assert two["queue"] == "bulk" and {one["task_id"], two["task_id"]} == set(bulk)
    assert a.ok("lease", limit=10)["tasks"] == []
    held = [task(settings, t)["status"] for t in slow]
    assert sorted(held) == ["pending", "running"]  # the other waits for the next window


def test_sigterm_answers_a_long_poll_at_once_and_exits_0(settings: Settings,
                                                        roles: Roles) -> None:
    import signal
    import threading

    proc, url = start_agents(roles, agent_poll_interval_s=0.05)
    token = new_token(settings)
    # A paused task: every turn of the long poll counts it as held, which says, from
    # outside, that the call is inside its wait (not still on its way in).
    with connect.redis_sync(settings) as r:
        pauses.pause_sync(r, settings.keys, "global", "test")
    submit(settings)
    a = agent(url, token, "a")
    answers: list[tuple[int, dict[str, Any]]] = []
    waiting = threading.Thread(target=lambda: answers.append(a.post("lease", wait_s=30)))
    waiting.start()
    wait_for(lambda: _held_count(url, token, "global") > 0, 20, "the long poll waiting")
    proc.signal(signal.SIGTERM)
    assert proc.wait(20) == 0  # well before the 30 s long poll would have ended
    waiting.join(20)
    # Ended early and empty, not cut off: the agent is told, and asks again elsewhere.
    assert answers == [(200, {"ok": True, "tasks": []})], answers


def _held_count(url: str, token: str, scope: str) -> int:
    import httpx

    held = httpx.get(f"{url}/api/agents", headers={"Authorization": f"Bearer {token}"},
                     timeout=10).json()["held"]
    return int(held.get(scope, 0))


def test_an_until_start_pull_task_frees_its_key_at_its_lease(settings: Settings,
                                                             api: tuple[str, str]) -> None:
    url, token = api
    keyed = {"dedupe_key": "pk", "dedupe_mode": "until_start"}
    [first] = submit(settings, **keyed)
    assert submit(settings, **keyed) == [first]  # not leased yet: the key is held
    [leased] = agent(url, token, "a").ok("lease", limit=5, wait_s=2)["tasks"]
    assert leased["task_id"] == first
    assert "dedupe_active" not in task(settings, first)
    [second] = submit(settings, **keyed)
    assert second != first and task(settings, second)["dedupe_active"] == "pk"


def test_leases_are_read_only_once_an_agent_has_registered(settings: Settings) -> None:
    # Without agents, the pull indexes may not exist: the read must not scan the tasks.
    lease = {"agent": "a", "token": "t", "deadline": time.time() + 60, "cap": None}
    client, db = db_of(settings)
    with client:
        db[TASKS].insert_one({"_id": "pulled", "mode": "pull", "status": "running",
                              "device_id": "phone-1", "lease": lease})
        assert leases_held_sync(db) == {}
        db[AGENTS].insert_one({"_id": "a", "name": "a"})
        assert [t["task_id"] for t in leases_held_sync(db)["a"]] == ["pulled"]
