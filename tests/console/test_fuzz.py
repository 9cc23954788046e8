"""Property-based tests of the console's JSON API: schemathesis generates calls from the
console's own OpenAPI document (valid and invalid ones) and sends them to the console
role process on the real servers; no answer may be a 5xx or break the schema."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import schemathesis

from sendscript.client import SendScriptClient
from tests.console.conftest import ConsoleRole, start_console
from tests.fuzzing import _node_id, fuzz_config  # noqa: F401
from tests.support import Roles


@dataclass
class Fuzzed:
    role: ConsoleRole
    operator: str
    viewer: str


@pytest.fixture
def fuzzed(roles: Roles) -> Fuzzed:
    role = start_console(roles, console_dlq_timeout_s=0.2, console_task_stream_s=0.2)
    with SendScriptClient(roles.settings) as client:
        client.submit_many([{"device_id": f"d{i}", "script": {"id": "s", "args": {"i": i}}}
                            for i in range(3)])
    return Fuzzed(role, role.token("fuzz-op", "operator"), role.token("fuzz-view", "viewer"))


@pytest.fixture
def console_schema(fuzzed: Fuzzed) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{fuzzed.role.url}/openapi.json",
                                         config=fuzz_config(semantic=SEMANTIC))


SEMANTIC = ("^/api/tasks$", "^/api/bulk", "^/api/pauses", "^/api/devices$")
api = schemathesis.pytest.from_fixture("console_schema")


@api.parametrize()
def test_operator_calls(case: schemathesis.Case, fuzzed: Fuzzed) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {fuzzed.operator}"})


@api.parametrize()
def test_viewer_calls(case: schemathesis.Case, fuzzed: Fuzzed) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {fuzzed.viewer}"})


@api.parametrize()
def test_anonymous_calls(case: schemathesis.Case, fuzzed: Fuzzed) -> None:
    case.call_and_validate()


def test_a_cursor_of_a_time_no_date_holds_is_refused(fuzzed: Fuzzed) -> None:
    """["inf", "x"] and friends are base64 of JSON the cursor's shape allows, with a
    time no datetime holds: a 422 that says so, never a 500."""
    with fuzzed.role.client(fuzzed.viewer) as http:
        for before in ("WyJpbmYiLCAieCJd", "WzFlMzAwLCAieCJd", "Wy0xZTIwLCAieCJd"):
            r = http.get("/api/tasks", params={"before": before})
            assert r.status_code == 422, (before, r.status_code, r.text)
            assert "not a cursor" in r.json()["detail"]
        page = http.get("/tasks", params={"before": "WyJpbmYiLCAieCJd"})
        assert page.status_code == 422 and "not a cursor" in page.text


def test_a_range_reaching_the_first_years_is_searched(fuzzed: Fuzzed) -> None:
    """`since` in year 243 (found by the fuzzer: the search's windows went below year 1,
    OverflowError, a 500) searches from the first task on."""
    with fuzzed.role.client(fuzzed.viewer) as http:
        r = http.get("/api/tasks", params={"since": "0243-07-21T18:24:40+23:44"})
        assert r.status_code == 200, r.text
        assert len(r.json()["tasks"]) == 3
        r = http.get("/api/tasks", params={"until": "9999-12-31T23:59:59-23:59"})
        assert r.status_code == 422 and "range" in r.text


def test_what_the_document_promises_callers(fuzzed: Fuzzed) -> None:
    """The contract's HTTP section: times, a missing task's stream, 405, token scopes."""
    with fuzzed.role.client(fuzzed.viewer) as http:
        for since in ("2024-05-01T10:00:00Z", "2024-05-01T12:00:00+02:00",
                      "2024-05-01T10:00", "2024-05-01 10:00:00", ""):
            r = http.get("/api/tasks", params={"since": since})
            assert r.status_code == 200, (since, r.text)
        for since in ("2024-05-01", "1714557600", "2024"):
            r = http.get("/api/tasks", params={"since": since})
            assert r.status_code == 422, (since, r.text)
        r = http.get("/api/stream/tasks/no-such-task")
        assert r.status_code == 404 and r.json()["detail"] == "no task no-such-task"
        r = http.delete("/api/pauses")
        assert r.status_code == 405
        assert r.headers["allow"] == "GET, POST"
    with fuzzed.role.client(fuzzed.operator) as http:
        # The schema's patterns are the store's: what it allows is made, the rest refused.
        ok = http.post("/api/agent-tokens", json={"name": "rack@1.a_b-c", "prefixes": [
            "ph:1@a.b_c-"], "groups": ["lab:1.a_b-c"]})
        assert ok.status_code == 200, ok.text
        assert set(ok.json()) == {"name", "token", "prefixes", "groups"}
        schema = http.get("/openapi.json").json()["components"]["schemas"]["AgentTokenSpec"]
        assert schema["properties"]["groups"]["items"]["pattern"] == r"^[A-Za-z0-9_.:-]{1,200}$"
        for body in ({"name": "x", "groups": ["a@b"]}, {"name": "x", "prefixes": ["a/b"]},
                     {"name": "x:y"}):
            r = http.post("/api/agent-tokens", json=body)
            assert r.status_code == 422, (body, r.text)
        names = [t["name"] for t in http.get("/api/agent-tokens").json()]
        assert names == ["rack@1.a_b-c"]
