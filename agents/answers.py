"""What the agents API answers, as /openapi.json describes it: field for field what the
routes have always sent (sendscript/agent.py reads these names).

A repeated call that ended a lease (complete, fail, release sent again) is answered
as the first was, with `repeated: true`; the routes send only the fields an answer
holds (`response_model_exclude_unset`), so typing never adds nor drops one.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ok: Literal[True] = True


class Registered(Answer):
    agent_id: str
    heartbeat_s: float = Field(description="call heartbeat this often")
    ttl_s: float = Field(description="silent this long, the agent is lost")
    lease_s: float = Field(description="a lease lasts this long unless extended by progress")
    max_wait_s: float = Field(description="the longest long poll of a lease call")
    max_lease: int = Field(description="the most tasks one lease call hands out")
    checkpoint_max_bytes: int
    result_max_bytes: int


class Beat(Answer):
    stop: bool = Field(description="an operator asked this agent to stop")
    quiet: bool = Field(description="the service hands out no task now (paused, quiet)")
    cancel: list[str] = Field(description="tasks it holds that were cancelled: stop them")


class LeasedTask(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task_id: str
    lease_token: str = Field(description="names the lease in progress, complete, fail, release")
    deadline: str = Field(description="ISO 8601: the lease ends then unless extended")
    deadline_ms: int
    cap_ms: int = Field(description="epoch ms: no progress extends the lease beyond it")
    attempt: int
    max_attempts: int
    device_id: str | None
    script: dict[str, Any]
    checkpoint: dict[str, Any] = Field(description="the last checkpoint saved ({}: none)")
    labels: list[str]
    priority: int | None
    queue: str | None
    timeout_s: float | None


class Leased(Answer):
    tasks: list[LeasedTask]


class Extended(Answer):
    deadline: str = Field(description="ISO 8601: the lease's new end")
    deadline_ms: int
    checkpoint_bytes: int = Field(description="the merged checkpoint's size")


class Ended(Answer):
    status: str = Field(description="the task's status now")
    repeated: bool = Field(False, description="true: this call had been made already; "
                                              "answered as then")


class Failed(Ended):
    retry_at: str | None = Field(None, description="ISO 8601: when it runs again; null: "
                                                   "it will not")


class Check(BaseModel):
    ok: bool
    detail: str


class Alive(BaseModel):
    ok: Literal[True] = True
    status: Literal["ok"] = "ok"
    role: str


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    role: str
    checks: dict[str, Check]
