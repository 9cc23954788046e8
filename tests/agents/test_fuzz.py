"""Property-based tests of the agents API: schemathesis generates calls from the agents
role's own OpenAPI document (valid and invalid ones) and sends them to the role process
on the real servers, with a registered agent's token and with none; no answer may be a
5xx or break the schema."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import pytest
import schemathesis

from tests.agents.support import new_token, start_agents
from tests.fuzzing import _node_id, fuzz_config  # noqa: F401
from tests.support import Roles

AGENT = "fuzz-agent"


@dataclass
class Fuzzed:
    url: str
    token: str


@pytest.fixture
def fuzzed(roles: Roles) -> Fuzzed:
    # Long polls end at once and lease calls are not rate limited: the fuzzer's calls
    # must each answer in milliseconds.
    _, url = start_agents(roles, agent_max_wait_s=0, agent_lease_rate=1000,
                          agent_lease_burst=1000)
    token = new_token(roles.settings, "fuzz")
    r = httpx.post(f"{url}/api/agents/register", json={"agent_id": AGENT},
                   headers={"Authorization": f"Bearer {token}"}, timeout=20)
    assert r.status_code == 200, r.text
    return Fuzzed(url, token)


@pytest.fixture
def agents_schema(fuzzed: Fuzzed) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json", config=fuzz_config())


api = schemathesis.pytest.from_fixture("agents_schema")


@api.parametrize()
def test_agent_calls(case: schemathesis.Case, fuzzed: Fuzzed) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {fuzzed.token}"})


@api.parametrize()
def test_anonymous_calls(case: schemathesis.Case, fuzzed: Fuzzed) -> None:
    case.call_and_validate()


def test_bodies_are_strict(fuzzed: Fuzzed) -> None:
    """A string is not a number nor 1 a boolean, and an unknown field is refused."""
    headers = {"Authorization": f"Bearer {fuzzed.token}"}
    for body in ({"agent_id": AGENT, "limit": "5"}, {"agent_id": AGENT, "wait_s": "0"},
                 {"agent_id": AGENT, "limits": 1}):
        r = httpx.post(f"{fuzzed.url}/api/agents/lease", json=body, headers=headers,
                       timeout=20)
        assert r.status_code == 422, (body, r.text)
    r = httpx.post(f"{fuzzed.url}/api/agents/lease", json={"agent_id": AGENT, "limit": 5},
                   headers=headers, timeout=20)
    assert r.status_code == 200 and r.json() == {"ok": True, "tasks": []}, r.text
