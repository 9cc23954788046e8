"""The console as a role process (`sendscript console`) on the test's own settings, and
tokens made the way an operator makes them (the store's own function, as the CLI)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from console import auth
from sendscript import connect
from sendscript.dev.embedded import free_port
from sendscript.dev.processes import RoleProcess
from sendscript.settings import Settings
from tests.support import Roles, wait_for


@dataclass
class ConsoleRole:
    proc: RoleProcess
    url: str
    settings: Settings

    def token(self, name: str, role: str) -> str:
        mongo = connect.mongo_sync(self.settings)
        try:
            return auth.add_token(connect.database(mongo), name, role)
        finally:
            mongo.close()

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=20)


def start_console(roles: Roles, **env: object) -> ConsoleRole:
    port = free_port()
    proc = roles._start("console", ["console"], console_port=port, console_live_interval_s=0.5,
                        console_counts_s=0.5, **env)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.running, f"console exited:\n{proc.log_tail()}"
        try:
            return httpx.get(f"{url}/openapi.json", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 30, "the console")
    return ConsoleRole(proc, url, roles.settings)


@pytest.fixture
def console_role(roles: Roles) -> Iterator[ConsoleRole]:
    yield start_console(roles)
