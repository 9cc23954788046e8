"""The HTTP JSON routes of the agents API; requests are checked here, decided in leases.

Every route but /healthz and /readyz needs `Authorization: Bearer TOKEN` (a token made by
`sendscript agent token add`). Bodies are read with a size cap, parsed and validated
here, so a malformed call is refused with a 4xx and the reason (`{"detail": ...}`)
before anything is read or written.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agents.answers import Alive, Beat, Ended, Extended, Failed, Leased, Readiness, Registered
from agents.leases import Leases
from agents.registry import Caller, Refused, Registry
from agents.rules import AgentView, RateBudget
from sendscript.health import CHECK_TIMEOUT_S
from sendscript.models import describe_error
from sendscript.serving import host_refused

ID = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:@-]+$")
HEADROOM = 16_384  # a body may exceed the checkpoint / result cap by this much


class Call(BaseModel):
    # strict: "5" is not a number nor 1 a boolean here, as /openapi.json says
    model_config = ConfigDict(extra="forbid", strict=True)
    agent_id: str = ID


class Register(Call):
    name: str = Field("", max_length=200)
    labels: list[str] = Field(default_factory=list, max_length=50)
    devices: list[str] = Field(default_factory=list, max_length=100)
    version: str = Field("", max_length=100)


class LeaseCall(Call):
    limit: int = Field(1, ge=1)
    wait_s: float = Field(0.0, ge=0, le=3600)


class OnLease(Call):
    task_id: str = Field(min_length=1, max_length=200)
    lease_token: str = Field(min_length=1, max_length=200)


class Progress(OnLease):
    checkpoint: dict[str, Any]


class Complete(OnLease):
    result: dict[str, Any] = Field(default_factory=dict)


class Fail(OnLease):
    error: str = Field("failed", max_length=4000)
    retryable: bool = True
    result: dict[str, Any] | None = None


M = TypeVar("M", bound=Call)


async def _probe(call: Any, timeout_s: float = CHECK_TIMEOUT_S) -> dict[str, Any]:
    """A readiness check's answer; it reports any failure, it never raises."""
    try:
        await asyncio.wait_for(call, timeout_s)
        return {"ok": True, "detail": "ok"}
    except TimeoutError:
        return {"ok": False, "detail": f"no answer within {timeout_s:g}s"}
    except Exception as exc:
        return {"ok": False, "detail": f"{type(exc).__name__}: {exc}"[:300]}


class Problem(BaseModel):
    detail: str


WHY = {400: "Body is not a JSON object, or the Host header names no host of the allow-list",
       401: "No valid agent token",
       403: "The agent or the lease is another token's or agent's",
       404: "No such task", 409: "The lease is over, or the state does not allow it",
       413: "Body over the size cap", 422: "Body does not match this document",
       429: "Too many lease calls: wait Retry-After seconds"}


def documented(model: type[Call], answer: type[BaseModel], *statuses: int) -> dict[str, Any]:
    """What /openapi.json says of a route that reads its body itself (size cap first):
    the body's schema, the answer's, and every refusal it may answer (a 400 is also the
    Host guard's, in plain text)."""
    refusals = (400, 401, 413, 422, *statuses)
    responses: dict[int | str, dict[str, Any]] = {
        s: {"model": Problem, "description": WHY[s]} for s in refusals}
    responses[400] = {**responses[400], "description": WHY[400],
                      "content": host_refused()[400]["content"]}
    return {"openapi_extra": {"requestBody": {"required": True, "content": {
                "application/json": {"schema": model.model_json_schema()}}}},
            "responses": responses, "response_model": answer,
            "response_model_exclude_unset": True}


def refused(exc: Refused) -> JSONResponse:
    headers = {"Retry-After": f"{exc.retry_after:.0f}"} if getattr(exc, "retry_after", 0) else {}
    return JSONResponse({"detail": exc.reason}, status_code=exc.status, headers=headers)


ON_LEASE = (403, 404, 409)


class Api:
    def __init__(self, leases: Leases, registry: Registry, body_limit: int, lease_rate: float,
                 lease_burst: int) -> None:
        self.leases = leases
        self.registry = registry
        self.body_limit = body_limit
        self.budget = RateBudget(lease_rate, lease_burst)

    async def _parse(self, request: Request, model: type[M]) -> tuple[Caller, M]:
        header = request.headers.get("authorization", "")
        scheme, _, secret = header.partition(" ")
        caller = await self.registry.authenticate(secret.strip() if scheme.lower() == "bearer"
                                                  else None)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.body_limit:
            raise Refused(413, f"body of {declared} bytes is over {self.body_limit}")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.body_limit:
                raise Refused(413, f"body is over {self.body_limit} bytes")
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise Refused(400, f"body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise Refused(400, f"body must be a JSON object, got {type(data).__name__}")
        try:
            return caller, model.model_validate(data)
        except ValidationError as exc:
            raise Refused(422, describe_error(exc)) from None

    async def _agent(self, request: Request, model: type[M]) -> tuple[AgentView, M]:
        caller, call = await self._parse(request, model)
        return await self.registry.agent(caller, call.agent_id), call

    def router(self) -> APIRouter:
        r = APIRouter()

        async def guarded(work: Any) -> Any:
            try:
                return await work
            except Refused as exc:
                return refused(exc)

        @r.get("/healthz", response_model=Alive, responses=host_refused())
        async def healthz() -> dict[str, Any]:
            return {"ok": True, "status": "ok", "role": "agents"}

        @r.get("/readyz", response_model=Readiness, responses={
            **host_refused(), 503: {"model": Readiness, "description": "Redis or Mongo "
                                    "does not answer: `checks` says which and why"}})
        async def readyz() -> JSONResponse:
            checks = {"redis": await _probe(self.leases.redis.ping()),
                      "mongo": await _probe(self.leases.tasks.database.command("ping"))}
            ready = all(c["ok"] for c in checks.values())
            return JSONResponse({"status": "ready" if ready else "not ready", "role": "agents",
                                 "checks": checks}, status_code=200 if ready else 503)

        @r.post("/api/agents/register", **documented(Register, Registered, 403, 409))
        async def register(request: Request) -> Any:
            async def go() -> dict[str, Any]:
                caller, call = await self._parse(request, Register)
                s = self.leases.settings
                await self.registry.register(caller, call.agent_id, call.name, call.labels,
                                             call.devices, call.version)
                return {"ok": True, "agent_id": call.agent_id, "heartbeat_s": s.agent_heartbeat_s,
                        "ttl_s": s.agent_ttl_s, "lease_s": s.agent_lease_s,
                        "max_wait_s": s.agent_max_wait_s, "max_lease": s.agent_max_lease_batch,
                        "checkpoint_max_bytes": s.agent_checkpoint_max_bytes,
                        "result_max_bytes": s.agent_result_max_bytes}
            return await guarded(go())

        @r.post("/api/agents/heartbeat", **documented(Call, Beat, 403, 404, 409))
        async def heartbeat(request: Request) -> Any:
            async def go() -> dict[str, Any]:
                agent, _ = await self._agent(request, Call)
                doc = await self.registry.heartbeat(agent.id)
                return {"ok": True, "stop": bool(doc.get("stop")),
                        "quiet": self.leases.gates.quiet,
                        "cancel": await self.leases.cancelled_for(agent)}
            return await guarded(go())

        @r.post("/api/agents/lease", **documented(LeaseCall, Leased, 403, 404, 409, 429))
        async def lease(request: Request) -> Any:
            async def go() -> dict[str, Any]:
                agent, call = await self._agent(request, LeaseCall)
                wait = self.budget.take(agent.id)
                if wait > 0:
                    exc = Refused(429, f"too many lease calls from {agent.id}: wait {wait:.2f}s "
                                       "(SENDSCRIPT_AGENT_LEASE_RATE)")
                    exc.retry_after = max(1.0, wait)  # type: ignore[attr-defined]
                    raise exc
                limit = min(call.limit, self.leases.settings.agent_max_lease_batch)
                tasks = await self.leases.lease(agent, limit, call.wait_s)
                return {"ok": True, "tasks": tasks}
            return await guarded(go())

        @r.post("/api/agents/progress", **documented(Progress, Extended, *ON_LEASE))
        async def progress(request: Request) -> Any:
            async def go() -> dict[str, Any]:
                agent, call = await self._agent(request, Progress)
                return await self.leases.progress(agent, call.task_id, call.lease_token,
                                                  call.checkpoint)
            return await guarded(go())

        @r.post("/api/agents/complete", **documented(Complete, Ended, *ON_LEASE))
        async def complete(request: Request) -> Any:
            async def go() -> dict[str, Any]:
                agent, call = await self._agent(request, Complete)
                return await self.leases.complete(agent, call.task_id, call.lease_token,
                                                  call.result)
            return await guarded(go())

        @r.post("/api/agents/fail", **documented(Fail, Failed, *ON_LEASE))
        async def fail(request: Request) -> Any:
            async def go() -> dict[str, Any]:
                agent, call = await self._agent(request, Fail)
                return await self.leases.fail(agent, call.task_id, call.lease_token, call.error,
                                              call.retryable, call.result)
            return await guarded(go())

        @r.post("/api/agents/release", **documented(OnLease, Ended, *ON_LEASE))
        async def release(request: Request) -> Any:
            async def go() -> dict[str, Any]:
                agent, call = await self._agent(request, OnLease)
                return await self.leases.release(agent, call.task_id, call.lease_token)
            return await guarded(go())

        @r.get("/api/agents", responses={**host_refused(),
                                         401: {"model": Problem, "description": WHY[401]}})
        async def listing(request: Request) -> Any:
            async def go() -> dict[str, Any]:
                header = request.headers.get("authorization", "")
                await self.registry.authenticate(header.partition(" ")[2].strip() or None)
                agents = await self.registry.listing()
                return {"agents": json.loads(json.dumps(agents, default=str)),
                        "stats": vars(self.leases.stats),
                        "held": dict(self.leases.gates.held)}
            return await guarded(go())

        return r
