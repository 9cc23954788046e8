"""The JSON API: everything the pages show and do (described at /openapi.json)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from console import data, fleet, live
from console.actions import BulkAction, Refused
from console.answers import (
    AgentRow,
    AgentToken,
    DevicePage,
    NewAgentToken,
    Pause,
    RemovedAgentTokens,
    TaskDetail,
    TaskPage,
    WhoAmI,
)
from console.context import Console, Operator, Who, console_of
from console.filters import NAME, TASK_ID, Page, TaskFilter
from console.search import SearchError
from sendscript import pauses as flags
from sendscript.agent_store import PREFIX, TOKEN_NAME, list_tokens_sync
from sendscript.groups import GROUP_NAME
from sendscript.serving import host_refused


class Problem(BaseModel):
    """Every refusal: `detail` says why (a list of the fields at fault when the request
    does not match this document)."""

    detail: str | list[dict[str, Any]]


def answers(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A 400 is also the Host guard's refusal, in plain text."""
    out: dict[int | str, dict[str, Any]] = {
        status: {"model": Problem, "description": WHY[status]} for status in statuses}
    if 400 in out:
        out[400]["content"] = host_refused()[400]["content"]
    return out


WHY = {400: "Malformed body (not JSON), or the Host header names no host of the allow-list",
       401: "No valid token or cookie",
       403: "A viewer's token, a cross-site request or a bad confirmation",
       404: "No such item", 409: "The item's state does not allow it",
       415: "Body is not application/json",
       422: "The request does not match this document, or asks for what cannot be"}
EVENTS = {200: {"content": {"text/event-stream": {}},
                "description": "Server-Sent Events"}}

# Every route needs a token and a Host of SENDSCRIPT_CONSOLE_HOSTS; every one may
# refuse what it is sent.
router = APIRouter(prefix="/api", responses=answers(400, 401, 422))
OPERATOR = answers(403)  # a viewer's token, or a POST from another site
ACTS = answers(403, 409, 415)  # POSTs with a JSON body: an operator's, state decides
FOUND = answers(404)
TYPED: dict[str, Any] = {"response_model_exclude_unset": True}  # console/answers.py
Ctx = Annotated[Console, Depends(console_of)]
TaskId = Annotated[str, Path(pattern=TASK_ID)]
DeviceId = Annotated[str, Path(pattern=NAME)]
Limit = Annotated[int, Query(ge=1, le=500)]
AgentId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.:@-]{1,200}$")]  # the agents API's ids


class BulkPreview(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: BulkAction
    filter: TaskFilter


class BulkRun(BulkPreview):
    confirm: str = Field(min_length=10, max_length=400)


class PauseScope(BaseModel):
    """What to pause or resume: everything (global), a queue, a group or a device.
    The hard stop and the quota pause are the service's own: resumed by the CLI."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["global", "queue", "group", "device"] = "global"
    name: str | None = Field(None, pattern=NAME)
    reason: str = Field("", max_length=200)

    def scope(self) -> str:
        if self.kind == "global":
            return flags.GLOBAL
        if not self.name:
            raise Refused(f"a {self.kind} pause needs a name", 422)
        try:
            return flags.scope_of(**{self.kind: self.name})
        except ValueError as exc:
            raise Refused(str(exc), 422) from None


def refused(exc: Refused) -> HTTPException:
    return HTTPException(exc.status, str(exc))


async def act(fn: Any, *args: Any) -> Any:
    try:
        return await run_in_threadpool(fn, *args)
    except Refused as exc:
        raise refused(exc) from None


@router.get("/whoami", response_model=WhoAmI, **TYPED)
def whoami(who: Who, c: Ctx) -> dict[str, Any]:
    return {"name": who.name, "role": who.role, "can_act": who.can_act,
            "open": who.name == "local" and c.open_mode()}


@router.get("/overview")
def get_overview(_: Who, c: Ctx) -> dict[str, Any]:
    snap = c.sampler.latest or c.sampler.sample()
    return {**snap, "series": c.sampler.rates.series()}


class TaskSearch(TaskFilter):
    """The filter and the page (`limit`, `before`: the previous page's `next`)."""

    limit: int = Field(50, ge=1, le=200)
    before: str | None = Field(None, pattern=r"^[A-Za-z0-9_=-]{8,200}$")


@router.get("/tasks", response_model=TaskPage, **TYPED)
def search(_: Who, c: Ctx, q: Annotated[TaskSearch, Query()]) -> dict[str, Any]:
    """Tasks matching every field given, newest first, `limit` at a time."""
    try:
        page = Page(limit=q.limit, before=q.before)
        flt = TaskFilter(**q.model_dump(exclude={"limit", "before"}, exclude_none=True))
        return data.search_tasks(c.stores, flt, page)
    except (ValidationError, SearchError) as exc:
        raise HTTPException(422, str(exc)) from None


@router.get("/tasks/{task_id}", responses=FOUND, response_model=TaskDetail, **TYPED)
def task(_: Who, c: Ctx, task_id: TaskId) -> dict[str, Any]:
    found = data.task_detail(c.stores, task_id)
    if found is None:
        raise HTTPException(404, f"no task {task_id}")
    return found


@router.post("/tasks/{task_id}/retry", responses={**ACTS, **FOUND})
async def retry(who: Operator, c: Ctx, task_id: TaskId) -> dict[str, Any]:
    await act(c.actions.retry, who, task_id)
    c.sampler.poke()
    return {"retried": task_id}


@router.post("/tasks/{task_id}/cancel", responses={**ACTS, **FOUND})
async def cancel(who: Operator, c: Ctx, task_id: TaskId) -> dict[str, Any]:
    was = await act(c.actions.cancel, who, task_id)
    c.sampler.poke()
    return {"cancelled": task_id, "was": was}


@router.post("/bulk/preview", responses=ACTS)
async def bulk_preview(who: Operator, c: Ctx, body: BulkPreview) -> dict[str, Any]:
    """How many tasks the action would change, and the confirmation it requires."""
    s = c.settings
    return await act(c.actions.preview, who, body.action, body.filter, s.console_bulk_max,
                     s.console_confirm_ttl_s)


@router.post("/bulk", responses=ACTS)
async def bulk(who: Operator, c: Ctx, body: BulkRun) -> dict[str, Any]:
    out = await act(c.actions.bulk, who, body.action, body.filter, body.confirm,
                    c.settings.console_bulk_max)
    c.sampler.poke()
    return out


@router.get("/devices", response_model=DevicePage, **TYPED)
def devices(_: Who, c: Ctx, q: Annotated[fleet.FleetQuery, Query()]) -> dict[str, Any]:
    """Every device that has run a task or is in a group, in id order, `limit` at a
    time: its state now, last task and result, and results over the last 24 hours."""
    try:
        return fleet.fleet_page(c.stores, q)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


@router.get("/devices/{device_id}")
def device(_: Who, c: Ctx, device_id: DeviceId) -> dict[str, Any]:
    return data.device_detail(c.stores, device_id)


@router.get("/schedules")
def schedules(_: Who, c: Ctx) -> list[dict[str, Any]]:
    return data.schedules(c.stores)


@router.get("/batches")
def batches(_: Who, c: Ctx, limit: Annotated[int, Query(ge=1, le=100)] = 20
            ) -> list[dict[str, Any]]:
    return data.batches(c.stores, limit)


@router.get("/masters")
def masters(_: Who, c: Ctx) -> dict[str, Any]:
    m, consumers = data.heartbeats(c.stores)
    return {"masters": m, "consumers": consumers}


@router.get("/agents", response_model=list[AgentRow], **TYPED)
def agents(_: Who, c: Ctx) -> list[dict[str, Any]]:
    """Pull-mode agents: state, last seen and the leases they hold (tokens never)."""
    return data.agents(c.stores)


@router.post("/agents/{agent_id}/stop", responses={**ACTS, **FOUND})
async def stop_agent(who: Operator, c: Ctx, agent_id: AgentId) -> dict[str, Any]:
    return await act(c.actions.stop_agent, who, agent_id)


class AgentTokenSpec(BaseModel):
    """A new agents' API token; its scope (device id prefixes, device groups) limits
    what its agents may register and lease (none: every device)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=TOKEN_NAME.pattern)
    prefixes: list[Annotated[str, Field(pattern=PREFIX.pattern)]] = Field(
        default_factory=list, max_length=50)
    groups: list[Annotated[str, Field(pattern=GROUP_NAME.pattern)]] = Field(
        default_factory=list, max_length=50)


TokenName = Annotated[str, Path(pattern=TOKEN_NAME.pattern,
                                description="a token's name, or its short id")]


@router.get("/agent-tokens", responses=OPERATOR, response_model=list[AgentToken], **TYPED)
def agent_tokens(_: Operator, c: Ctx) -> list[dict[str, Any]]:
    """Agents' API tokens: name, short id, scope, created, last used (when one of its
    agents was last seen); never the token."""
    return list_tokens_sync(c.stores.db)


@router.post("/agent-tokens", responses=answers(403, 415), response_model=NewAgentToken,
             **TYPED)
async def add_agent_token(who: Operator, c: Ctx, body: AgentTokenSpec) -> dict[str, Any]:
    """Make one; the token is in this answer only."""
    return await act(c.actions.add_agent_token, who, body.name, body.prefixes, body.groups)


@router.post("/agent-tokens/{name}/remove", responses={**OPERATOR, **FOUND},
             response_model=RemovedAgentTokens, **TYPED)
async def remove_agent_token(who: Operator, c: Ctx, name: TokenName) -> dict[str, Any]:
    """Remove the tokens of that name (or short id): refused within a second."""
    return await act(c.actions.remove_agent_token, who, name)


@router.get("/pauses", response_model=dict[str, Pause], **TYPED)
def get_pauses(_: Who, c: Ctx) -> dict[str, Any]:
    return {s: p.to_dict() for s, p in flags.list_sync(c.stores.redis, c.stores.keys).items()}


@router.post("/pauses", responses=ACTS, response_model=Pause, **TYPED)
async def pause(who: Operator, c: Ctx, body: PauseScope) -> dict[str, Any]:
    try:
        scope = body.scope()
    except Refused as exc:
        raise refused(exc) from None
    out = await act(c.actions.pause, who, scope, body.reason)
    c.sampler.poke()
    return out


@router.post("/pauses/resume", responses=ACTS)
async def resume(who: Operator, c: Ctx, body: PauseScope) -> dict[str, Any]:
    try:
        scope = body.scope()
    except Refused as exc:
        raise refused(exc) from None
    lifted = await act(c.actions.resume, who, scope)
    c.sampler.poke()
    return {"scope": scope, "lifted": lifted}


@router.get("/quarantine")
def quarantine(_: Who, c: Ctx, limit: Limit = 200) -> list[dict[str, Any]]:
    return data.quarantine(c.stores, limit)


@router.post("/quarantine/{item_id}/requeue", responses={**ACTS, **FOUND})
async def requeue(who: Operator, c: Ctx,
                  item_id: Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]) -> dict[str, Any]:
    return await act(c.actions.requeue, who, item_id)


@router.get("/dead-letters")
def dead_letters(_: Who, c: Ctx, limit: Limit = 200) -> list[dict[str, Any]]:
    return data.dead_letters(c.settings, limit, c.settings.console_dlq_timeout_s)


@router.get("/audit")
def audit(_: Who, c: Ctx, limit: Limit = 200) -> list[dict[str, Any]]:
    return data.audit(c.stores, limit)


@router.get("/stream/overview", response_class=StreamingResponse, responses=EVENTS)
async def stream_overview(_: Who, c: Ctx, request: Request) -> StreamingResponse:
    """Server-Sent Events: `series` (the last hour of rates) once, then `overview`."""
    return StreamingResponse(c.sampler.stream(request.is_disconnected),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})


@router.get("/stream/tasks/{task_id}", response_class=StreamingResponse,
            responses={**EVENTS, **FOUND})
async def stream_task(_: Who, c: Ctx, task_id: TaskId, request: Request) -> StreamingResponse:
    """Server-Sent Events: `task` (status, attempt, last error) at once, then on each
    change; `{"gone": true}` once the task is gone. No such task: 404."""
    if not await run_in_threadpool(data.task_exists, c.stores, task_id):
        raise HTTPException(404, f"no task {task_id}")
    return StreamingResponse(
        live.task_stream(c.stores, task_id, request.is_disconnected,
                         c.settings.console_task_stream_s),
        media_type="text/event-stream", headers={"Cache-Control": "no-store"})


