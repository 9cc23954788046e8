"""Agents' API tokens as an operator manages them (`sendscript agent token add|list|remove`)
against a running agents process: a removed token is refused within a second, a scoped
token's agents register and lease only their devices, and the API answers only its
own Host names."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from agents.registry import VERDICT_S
from agents.rules import AgentView, Scope, eligible
from sendscript.agent_store import AGENTS, TOKENS
from sendscript.models import ANY_DEVICE
from sendscript.settings import Settings
from sendscript.store import GROUPS
from tests.agents.support import Api, db_of, start_agents
from tests.agents.test_api import FAST, submit
from tests.support import Roles, cli, wait_for


@pytest.fixture
def url(settings: Settings, roles: Roles) -> Iterator[str]:
    for k, v in FAST.items():
        setattr(settings, k, v)
    _, base = start_agents(roles)
    yield base


def token_of(settings: Settings, *args: str) -> str:
    """`sendscript agent token add ARGS`: the token it shows (its last line)."""
    return cli(settings, "agent", "token", "add", *args).strip().splitlines()[-1]


def test_removed_token_is_refused_within_a_second_by_a_running_process(
        settings: Settings, url: str) -> None:
    token, other = token_of(settings, "rack-1"), token_of(settings, "rack-2")
    a = Api(url, token, "a1")
    a.ok("register", devices=["phone-r1"])
    [leased] = submit(settings, 1, device_id="phone-r1")
    [lease] = a.ok("lease", wait_s=5)["tasks"]
    assert lease["task_id"] == leased
    a.ok("heartbeat")  # its verdict is cached now: removal must still reach it

    listed = cli(settings, "agent", "token", "list")
    assert "rack-1" in listed and "rack-2" in listed and token not in listed
    out = cli(settings, "agent", "token", "remove", "rack-1")
    assert "removed" in out
    removed_at = time.monotonic()
    wait_for(lambda: a.post("heartbeat")[0] == 401, 5, "the removed token refused")
    refused_after = time.monotonic() - removed_at
    status, body = a.post("lease")
    assert status == 401 and "unknown agent token" in body["detail"]
    assert a.post("complete", task_id=lease["task_id"], lease_token=lease["lease_token"],
                  result={})[0] == 401
    # Its agent is unbound and asked to stop: another token may take the id over.
    client, db = db_of(settings)
    with client:
        doc = db[AGENTS].find_one({"_id": "a1"})
        assert doc["token"] == "" and doc["stop"] is True
        assert db[TOKENS].count_documents({"name": "rack-1"}) == 0
    b = Api(url, other, "a1")
    b.ok("register", devices=["phone-r1"])
    assert "rack-1" not in cli(settings, "agent", "token", "list")
    # A note, not a timing assertion: how long the old verdict lived (VERDICT_S bounds it).
    print(f"refused {refused_after:.2f}s after removal (cache {VERDICT_S}s)")
    a.close()
    b.close()


def test_scoped_token_registers_and_leases_only_its_devices(settings: Settings,
                                                            url: str) -> None:
    client, db = db_of(settings)
    with client:
        db[GROUPS].insert_one({"_id": "lab", "devices": ["lab-7"]})
    scoped = token_of(settings, "east", "--prefix", "east-", "--group", "lab")
    wide = token_of(settings, "all")
    listed = cli(settings, "agent", "token", "list")
    assert "east-*" in listed and "group:lab" in listed and "all devices" in listed

    e = Api(url, scoped, "east-agent")
    status, body = e.post("register", devices=["east-1", "west-1"])
    assert status == 403 and "west-1" in body["detail"] and "scope" in body["detail"]
    client, db = db_of(settings)
    with client:
        assert db[AGENTS].find_one({"_id": "east-agent"}) is None  # refused: nothing stored
    e.ok("register", devices=["east-1", "lab-7"])

    west = submit(settings, 1, device_id="west-1")
    anywhere = submit(settings, 1)  # names no device
    east = submit(settings, 1, device_id="east-1")
    lab = submit(settings, 1, device_id="lab-7")
    got: set[str] = set()
    wait_for(lambda: got.update(t["task_id"] for t in e.ok("lease", limit=10)["tasks"])
             or got >= set(east + lab), 10, "the scoped agent's own tasks")
    assert got == set(east + lab)  # never west-1, never the device-less task
    w = Api(url, wide, "wide-agent")
    w.ok("register", devices=["west-1"])
    taken: set[str] = set()
    wait_for(lambda: taken.update(t["task_id"] for t in w.ok("lease", limit=10)["tasks"])
             or taken >= set(west + anywhere), 10, "the unscoped agent's tasks")
    assert taken == set(west + anywhere)
    e.close()
    w.close()


def test_agent_token_cli_refuses_bad_input_and_unknown_names(settings: Settings) -> None:
    from tests.e2e.test_cli import fails

    assert "invalid device prefix" in fails(settings, "agent", "token", "add", "x",
                                            "--prefix", "a b")
    assert "invalid token name" in fails(settings, "agent", "token", "add", "no spaces")
    assert "no agent token ghost" in fails(settings, "agent", "token", "remove", "ghost")
    client, db = db_of(settings)
    with client:
        assert db[TOKENS].count_documents({}) == 0


def test_forged_host_is_refused_before_anything_runs(settings: Settings, url: str) -> None:
    token = token_of(settings, "rack")
    port = url.rsplit(":", 1)[1]
    with httpx.Client(timeout=10, headers={"Authorization": f"Bearer {token}"}) as http:
        forged = http.post(f"{url}/api/agents/register", json={"agent_id": "evil"},
                           headers={"Host": f"evil.test:{port}",
                                    "Origin": f"http://evil.test:{port}"})
        assert forged.status_code == 400
        assert http.get(f"{url}/readyz").json()["status"] == "ready"
        assert http.get(f"http://localhost:{port}/healthz").status_code == 200
    client, db = db_of(settings)
    with client:
        assert db[AGENTS].find_one({"_id": "evil"}) is None


def test_scope_rules() -> None:
    scope = Scope(("east-",), ("lab",), frozenset({"lab-7"}))
    assert scope.outside(["east-1", "lab-7", "west-1", "lab-8"]) == ["lab-8", "west-1"]
    agent = AgentView("a", frozenset(), frozenset({"east-1", "west-1"}))
    narrowed = scope.narrow(agent)
    assert narrowed.devices == frozenset({"east-1"}) and not narrowed.anywhere
    assert not eligible({"device_id": ANY_DEVICE}, narrowed)
    assert eligible({"device_id": ANY_DEVICE}, agent)
    assert eligible({"device_id": "east-1"}, narrowed)
    assert not eligible({"device_id": "west-1"}, narrowed)
    assert Scope().narrow(agent) is agent and Scope().allows("anything")
