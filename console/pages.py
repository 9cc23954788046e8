"""The pages: server-rendered HTML (Jinja2) over the same reads as the API; a little JS
(static/console.js) makes the live parts live and posts the actions to the API."""

from __future__ import annotations

from pathlib import Path as FsPath
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from console import auth, data, fleet
from console.context import COOKIE, Console, LoginRequired, Who, console_of
from console.filters import NAME, TASK_ID, Page, TaskFilter
from sendscript.agent_store import list_tokens_sync

TEMPLATES = Jinja2Templates(directory=str(FsPath(__file__).parent / "templates"))
router = APIRouter(include_in_schema=False)
Ctx = Annotated[Console, Depends(console_of)]
FILTER_FIELDS = ("device", "group", "queue", "script", "status", "error", "batch", "since",
                 "until")
STATUSES = ("waiting", "pending", "running", "sent", "retry_waiting", "success", "failed",
            "cancelled", "expired")


def fmt_time(value: Any) -> str:
    if hasattr(value, "strftime"):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value or "")


def scope_text(token: dict[str, Any]) -> str:
    """An agent token's scope as `sendscript agent token list` shows it."""
    parts = [f"{p}*" for p in token.get("prefixes", [])]
    parts += [f"group:{g}" for g in token.get("groups", [])]
    return ", ".join(parts) or "all devices"


TEMPLATES.env.filters["t"] = fmt_time
TEMPLATES.env.filters["scope"] = scope_text


def page(request: Request, name: str, who: auth.Principal, status: int = 200,
         **context: Any) -> HTMLResponse:
    return TEMPLATES.TemplateResponse(request, name, {"who": who, "statuses": STATUSES,
                                                      **context}, status_code=status)


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request) -> HTMLResponse:
    return TEMPLATES.TemplateResponse(request, "login.html", {"error": None, "who": None})


@router.post("/login")
async def login(request: Request, c: Ctx) -> Response:
    body = (await request.body())[:2000].decode(errors="replace")
    token = (parse_qs(body).get("token") or [""])[0].strip()
    who = c.principal_of(auth.hash_token(token)) if 0 < len(token) <= 200 else None
    if who is None:
        return TEMPLATES.TemplateResponse(request, "login.html",
                                          {"error": "unknown token", "who": None},
                                          status_code=401)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(COOKIE, auth.make_cookie(c.secret, auth.hash_token(token),
                                                 c.settings.console_session_s),
                        max_age=int(c.settings.console_session_s), httponly=True,
                        samesite="strict", secure=secure_cookie(request, c))
    return response


def secure_cookie(request: Request, c: Console) -> bool:
    """Secure over HTTPS, and always behind trusted proxies: they terminate TLS, and
    one that forgets X-Forwarded-Proto must not get a cookie sent in clear."""
    return request.url.scheme == "https" or bool(c.settings.trusted_proxies)


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE)
    return response


@router.get("/", response_class=HTMLResponse)
def overview(request: Request, who: Who, c: Ctx) -> HTMLResponse:
    snap = c.sampler.latest or c.sampler.sample()
    return page(request, "overview.html", who, o=snap)


@router.get("/tasks", response_class=HTMLResponse)
def tasks(request: Request, who: Who, c: Ctx) -> HTMLResponse:
    params = {k: v for k, v in request.query_params.items() if k in FILTER_FIELDS and v}
    unknown = sorted(set(request.query_params) - set(FILTER_FIELDS) - {"limit", "before"})
    try:
        if unknown:
            raise ValueError(f"unknown parameter(s): {', '.join(unknown)}")
        flt = TaskFilter(**params)
        pg = Page(limit=int(request.query_params.get("limit", 50)),
                  before=request.query_params.get("before") or None)
        result = data.search_tasks(c.stores, flt, pg)
    except (ValidationError, ValueError) as exc:  # SearchError is a ValueError
        return page(request, "tasks.html", who, status=422, error=_reason(exc), q=params,
                    result={"tasks": [], "next": None})
    return page(request, "tasks.html", who, error=None, q=params, result=result)


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'filter'}: {e['msg']}"
                         for e in exc.errors())
    return str(exc)


@router.get("/tasks/{task_id}", response_class=HTMLResponse)
def task(request: Request, who: Who, c: Ctx,
         task_id: Annotated[str, Path(pattern=TASK_ID)]) -> HTMLResponse:
    found = data.task_detail(c.stores, task_id)
    if found is None:
        return page(request, "message.html", who, status=404, message=f"no task {task_id}")
    return page(request, "task.html", who, d=found)


@router.get("/devices", response_class=HTMLResponse)
def devices(request: Request, who: Who, c: Ctx) -> HTMLResponse:
    params = {k: v.strip() for k, v in request.query_params.items() if v.strip()}
    try:
        q = fleet.FleetQuery(**params)
        found = fleet.fleet_page(c.stores, q)
    except (ValidationError, ValueError) as exc:
        return page(request, "devices.html", who, status=422, error=_reason(exc), q=params,
                    found={"devices": [], "next": None})
    return page(request, "devices.html", who, error=None, q=params, found=found)


@router.get("/devices/{device_id}", response_class=HTMLResponse)
def device(request: Request, who: Who, c: Ctx,
           device_id: Annotated[str, Path(pattern=NAME)]) -> HTMLResponse:
    return page(request, "device.html", who, d=data.device_detail(c.stores, device_id))


@router.get("/schedules", response_class=HTMLResponse)
def schedules(request: Request, who: Who, c: Ctx) -> HTMLResponse:
    return page(request, "schedules.html", who, schedules=data.schedules(c.stores))


@router.get("/batches", response_class=HTMLResponse)
def batches(request: Request, who: Who, c: Ctx) -> HTMLResponse:
    return page(request, "batches.html", who, batches=data.batches(c.stores))


@router.get("/masters", response_class=HTMLResponse)
def masters(request: Request, who: Who, c: Ctx) -> HTMLResponse:
    m, consumers = data.heartbeats(c.stores)
    return page(request, "masters.html", who, masters=m, consumers=consumers)


@router.get("/agents", response_class=HTMLResponse)
def agents(request: Request, who: Who, c: Ctx) -> HTMLResponse:
    # Agents' tokens are the operators' (the API refuses viewers their list too).
    tokens = list_tokens_sync(c.stores.db) if who.can_act else None
    return page(request, "agents.html", who, agents=data.agents(c.stores), tokens=tokens,
                ttl_s=c.settings.agent_ttl_s)


@router.get("/quarantine", response_class=HTMLResponse)
def quarantine(request: Request, who: Who, c: Ctx) -> HTMLResponse:
    return page(request, "quarantine.html", who, items=data.quarantine(c.stores))


@router.get("/dead-letters", response_class=HTMLResponse)
def dead_letters(request: Request, who: Who, c: Ctx) -> HTMLResponse:
    try:
        items, error = data.dead_letters(c.settings, 200, c.settings.console_dlq_timeout_s), None
    except Exception as exc:  # Pulsar away: say so on the page, not a 500
        items, error = [], f"could not read {c.settings.dlq_topic}: {exc!r}"
    return page(request, "dead_letters.html", who, items=items, error=error,
                topic=c.settings.dlq_topic)


@router.get("/audit", response_class=HTMLResponse)
def audit(request: Request, who: Who, c: Ctx) -> HTMLResponse:
    return page(request, "audit.html", who, entries=data.audit(c.stores))


def login_redirect(request: Request, exc: LoginRequired) -> Response:
    from fastapi.responses import JSONResponse

    if request.url.path.startswith("/api"):
        return JSONResponse({"detail": "login required: a token (Authorization: Bearer) "
                             "or the console's cookie"}, status_code=401)
    return RedirectResponse("/login", status_code=303)
