"""The console's agent views on the real embedded servers, the console and the agents
API each running as their own role process: agents with their state and leases (JSON
and page), a pull task's checkpoint, lease and result, the Stop action (operators,
audited; viewers refused), and never a lease token or an agent's token hash."""

from __future__ import annotations

from datetime import timedelta

from sendscript.agent_store import AGENTS, hash_secret
from sendscript.client import SendScriptClient
from sendscript.models import utcnow
from tests.agents.support import Api, new_token, start_agents
from tests.console.conftest import start_console
from tests.support import Inspect, Roles


def _secrets_absent(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text
    assert "lease_token" not in text


def test_agents_page_api_task_view_and_stop(roles: Roles, inspect: Inspect) -> None:
    settings = roles.settings
    _, agents_url = start_agents(roles)
    c = start_console(roles)
    op, viewer = c.token("ops", "operator"), c.token("eve", "viewer")
    agent_token = new_token(settings)
    a = Api(agents_url, agent_token, "a")
    registered = a.http.post(f"{agents_url}/api/agents/register", json={
        "agent_id": "a", "name": "Alpha", "labels": ["chrome"], "devices": ["phone-7"],
        "version": "1.2"})  # Api.ok's first parameter is itself called `name`
    assert registered.status_code == 200, registered.text
    # A second agent, silent for an hour: written as the registry writes it.
    long_ago = utcnow() - timedelta(hours=1)
    inspect.db[AGENTS].insert_one({
        "_id": "b", "name": "Bravo", "labels": ["ru"], "devices": ["phone-9"],
        "version": "0.9", "token": hash_secret(agent_token), "registered_at": long_ago,
        "last_seen": long_ago, "state": "active", "stop": False})
    with SendScriptClient(settings) as client:
        [tid] = [s.task_id for s in client.submit_many(
            [{"mode": "pull", "script": {"id": "scrape", "args": {}}}])]
    # Leased, a checkpoint, given back; leased again with that checkpoint handed over.
    [first] = a.ok("lease", wait_s=10)["tasks"]
    a.ok("progress", task_id=tid, lease_token=first["lease_token"], checkpoint={"page": 2})
    a.ok("release", task_id=tid, lease_token=first["lease_token"])
    [second] = a.ok("lease", wait_s=10)["tasks"]
    assert second["checkpoint"] == {"page": 2}
    a.ok("progress", task_id=tid, lease_token=second["lease_token"], checkpoint={"page": 3})
    a.ok("heartbeat")
    secrets = (first["lease_token"], second["lease_token"], hash_secret(agent_token),
               agent_token)
    stored = inspect.db.script_tasks.find_one({"_id": tid})
    assert stored["lease"]["token"] == second["lease_token"]  # what must not be shown
    assert stored["last_lease"]["token"] == first["lease_token"]

    with c.client(viewer) as v:
        listing = v.get("/api/agents")
        assert listing.status_code == 200
        _secrets_absent(listing.text, *secrets)
        by_id = {x["id"]: x for x in listing.json()}
        assert set(by_id) == {"a", "b"}
        assert {k: by_id["a"][k] for k in ("name", "labels", "devices", "version", "state",
                                           "leases")} == {
            "name": "Alpha", "labels": ["chrome"], "devices": ["phone-7"], "version": "1.2",
            "state": "active", "leases": 1}
        assert [t["task_id"] for t in by_id["a"]["tasks"]] == [tid]
        assert by_id["a"]["tasks"][0]["deadline"] and by_id["a"]["last_seen"]
        assert (by_id["b"]["state"], by_id["b"]["leases"]) == ("lost", 0)

        html = v.get("/agents")
        assert html.status_code == 200
        _secrets_absent(html.text, *secrets)
        assert 'href="/agents"' in html.text  # the nav link
        for shown in ("Alpha", "Bravo", "chrome", "phone-7", "1.2", "active", "lost",
                      f'href="/tasks/{tid}"', 'data-action="/api/agents/a/stop"'):
            assert shown in html.text

        detail = v.get(f"/api/tasks/{tid}")
        _secrets_absent(detail.text, *secrets)
        body = detail.json()
        assert body["pull"]["checkpoint"] == {"page": 3}
        assert body["pull"]["lease"]["agent"] == "a" and body["pull"]["lease"]["deadline"]
        assert body["pull"]["last_lease"] == {"agent": "a", "outcome": "release"}
        assert "token" not in body["task"]["lease"]
        [record] = body["records"]  # the released attempt's record was removed
        assert (record["agent"], record["checkpoint_in"]) == ("a", {"page": 2})
        page = v.get(f"/tasks/{tid}").text
        _secrets_absent(page, *secrets)
        assert "checkpoint handed over" in page and '<code>{"page": 2}</code>' in page
        assert '<code>{"page": 3}</code>' in page and "· deadline 20" in page

        # A viewer cannot stop an agent: nothing changes, nothing audited.
        refused = v.post("/api/agents/a/stop")
        assert refused.status_code == 403 and "viewer" in refused.json()["detail"]
    assert inspect.db[AGENTS].find_one({"_id": "a"})["stop"] is False
    assert inspect.db.audit.count_documents({}) == 0

    with c.client(op) as o:
        assert o.post("/api/agents/ghost/stop").status_code == 404
        assert o.post("/api/agents/a$b/stop").status_code == 422
        stop = o.post("/api/agents/a/stop")
        assert stop.status_code == 200 and stop.json() == {"stopped": "a", "already": False}
    assert inspect.db[AGENTS].find_one({"_id": "a"})["stop"] is True
    [entry] = inspect.db.audit.find({})
    assert (entry["who"], entry["role"], entry["action"], entry["target"]) == (
        "ops", "operator", "agent stop", "a")
    assert a.ok("heartbeat")["stop"] is True  # the agent hears it

    # The agent finishes what it holds: the result shows, the lease is gone.
    a.ok("complete", task_id=tid, lease_token=second["lease_token"], result={"rows": 5})
    with c.client(viewer) as v:
        body = v.get(f"/api/tasks/{tid}").json()
        assert body["pull"]["result"] == {"rows": 5} and body["pull"]["lease"] is None
        assert body["pull"]["last_lease"] == {"agent": "a", "outcome": "complete"}
        page = v.get(f"/tasks/{tid}")
        _secrets_absent(page.text, *secrets)
        assert '<code>{"rows": 5}</code>' in page.text and "none held" in page.text
        by_id = {x["id"]: x for x in v.get("/api/agents").json()}
        assert (by_id["a"]["leases"], by_id["a"]["stop"]) == (0, True)
        assert "stop asked" in v.get("/agents").text
    a.close()
