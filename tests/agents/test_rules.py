"""Unit tests of the agents' pure rules and of the pull fields of the task models."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from agents.rules import (
    AgentView,
    RateBudget,
    eligible,
    json_size,
    lease_deadline,
    merge_checkpoint,
    new_token,
    one_per_device,
    parse_token,
)
from sendscript.agent_store import LOST, agent_state
from sendscript.models import ANY_DEVICE, PULL_HOLDER, Task, TaskSpec
from sendscript.status import TASK_TRANSITIONS, TaskStatus

S = TaskStatus


def test_eligible_by_labels_and_devices() -> None:
    a = AgentView("a", frozenset({"chrome", "ru"}), frozenset({"p1"}))
    assert eligible({"device_id": ANY_DEVICE, "labels": ["chrome"]}, a)
    assert eligible({"device_id": "p1"}, a)
    assert not eligible({"device_id": "p2"}, a)
    assert not eligible({"device_id": ANY_DEVICE, "labels": ["chrome", "us"]}, a)
    assert eligible({"device_id": ANY_DEVICE, "labels": []}, AgentView("b"))


def test_one_task_per_device_in_a_batch() -> None:
    tasks = [{"_id": 1, "device_id": "p"}, {"_id": 2, "device_id": "p"},
             {"_id": 3, "device_id": ANY_DEVICE}, {"_id": 4, "device_id": ANY_DEVICE}]
    assert [t["_id"] for t in one_per_device(tasks)] == [1, 3, 4]


def test_tokens_carry_record_and_fence() -> None:
    token = new_token("rec1", 42)
    parts = parse_token(token)
    assert parts is not None and (parts.record_id, parts.fence) == ("rec1", 42)
    assert new_token("rec1", 42) != token
    for bad in ("", "a.b", "a.x.y", "a.1.", ".1.x", "a.1.b.c"):
        assert parse_token(bad) is None


def test_checkpoint_merge_sizes_and_deadlines() -> None:
    assert merge_checkpoint({"a": 1, "b": 2}, {"b": None, "c": 3}) == {"a": 1, "c": 3}
    assert merge_checkpoint(None, {"a": 1}) == {"a": 1}
    assert json_size({"a": "é"}) == len('{"a":"é"}'.encode())
    now = datetime(2026, 1, 1, tzinfo=UTC)
    cap = now + timedelta(seconds=10)
    assert lease_deadline(now, 30, cap) == cap
    assert lease_deadline(now, 5, cap) == now + timedelta(seconds=5)


def test_rate_budget_allows_bursts_then_refills() -> None:
    budget = RateBudget(rate=2, burst=3)
    assert [budget.take("a", 0.0) for _ in range(3)] == [0, 0, 0]
    assert budget.take("a", 0.0) == pytest.approx(0.5)
    assert budget.take("b", 0.0) == 0  # per agent
    assert budget.take("a", 0.5) == 0


def test_agent_state_is_lost_after_the_ttl() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert agent_state({"last_seen": now - timedelta(seconds=5), "state": "active"}, now,
                       10) == "active"
    assert agent_state({"last_seen": now - timedelta(seconds=11), "state": "active"}, now,
                       10) == LOST


def test_pull_specs_become_pull_tasks_held_by_agents() -> None:
    spec = TaskSpec.model_validate({"mode": "pull", "script": {"id": "x"},
                                    "labels": ["b", "a", "a"]})
    assert spec.device_id == ANY_DEVICE
    task = Task.from_spec(spec)
    assert (task.pull, task.master, task.labels) == (True, PULL_HOLDER, ["a", "b"])
    doc = task.to_doc()
    assert doc["mode"] == "pull" and "lease" not in doc and "checkpoint" not in doc
    push = Task.from_spec(TaskSpec.model_validate({"device_id": "d", "script": {}}))
    assert not push.pull and "mode" not in push.to_doc() and "labels" not in push.to_doc()
    with pytest.raises(ValidationError):
        TaskSpec.model_validate({"script": {}})  # a pushed task needs its device
    with pytest.raises(ValidationError):
        TaskSpec.model_validate({"mode": "poll", "device_id": "d", "script": {}})


def test_leases_use_only_existing_transitions() -> None:
    # lease, expiry / release, completion, failure, promotion: all in the push table
    for frm, to in ((S.PENDING, S.RUNNING), (S.RUNNING, S.PENDING), (S.RUNNING, S.SUCCESS),
                    (S.RUNNING, S.FAILED), (S.RUNNING, S.RETRY_WAITING),
                    (S.RETRY_WAITING, S.PENDING), (S.WAITING, S.PENDING),
                    (S.PENDING, S.EXPIRED)):
        assert to in TASK_TRANSITIONS[frm]
