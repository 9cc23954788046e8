"""Helpers of the agents tests: the agents role as a process, tokens, API calls."""

from __future__ import annotations

from typing import Any

import httpx
from pymongo import MongoClient

from sendscript import connect
from sendscript.agent_store import add_token_sync
from sendscript.dev.embedded import free_port
from sendscript.dev.processes import RoleProcess
from sendscript.settings import Settings
from tests.support import Roles, wait_for


def start_agents(roles: Roles, name: str = "agents", **env: Any) -> tuple[RoleProcess, str]:
    """The agents role on a free port; (process, base URL) once it answers."""
    port = free_port()
    proc = roles._start(name, ["agents"], agents_port=port, **env)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if not proc.running:
            raise AssertionError(f"agents role exited:\n{proc.log_tail()}")
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 60, "the agents API")
    return proc, url


def new_token(settings: Settings, name: str = "test") -> str:
    with connect.mongo_sync(settings) as mongo:
        return add_token_sync(connect.database(mongo), name)


class Api:
    """One agent's calls, answering (status, body)."""

    def __init__(self, url: str, token: str, agent_id: str) -> None:
        self.url = url
        self.agent_id = agent_id
        self.http = httpx.Client(timeout=30, headers={"Authorization": f"Bearer {token}"})

    def post(self, name: str, **body: Any) -> tuple[int, dict[str, Any]]:
        body.setdefault("agent_id", self.agent_id)
        r = self.http.post(f"{self.url}/api/agents/{name}", json=body)
        return r.status_code, r.json()

    def ok(self, name: str, **body: Any) -> dict[str, Any]:
        status, answer = self.post(name, **body)
        assert status == 200, (name, status, answer)
        return answer

    def close(self) -> None:
        self.http.close()


def db_of(settings: Settings) -> tuple[MongoClient, Any]:
    client = connect.mongo_sync(settings)
    return client, connect.database(client)
