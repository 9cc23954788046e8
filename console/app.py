"""The console role (`sendscript console`): pages, the JSON API and live updates, on the
service's own stores. Binds SENDSCRIPT_CONSOLE_HOST (127.0.0.1 by default); on any other
address it refuses to start until an operator token exists (`sendscript token add`).
It answers only the Host names of SENDSCRIPT_CONSOLE_HOSTS (default: its bind address
and localhost), and /healthz and /readyz without a token."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from loguru import logger
from starlette.exceptions import HTTPException
from starlette.routing import Match

from console import api, auth, pages
from console.actions import Actions
from console.context import Console, LoginRequired, same_origin
from console.data import AUDIT, Stores
from console.health import health_router
from console.live import Sampler
from console.metrics import metrics_router
from sendscript.client import SendScriptClient
from sendscript.serving import LOOPBACK, GracefulServer, allowed_hosts, guard_hosts, proxy_options
from sendscript.settings import Settings

STATIC = Path(__file__).parent / "static"


class Refusal(SystemExit):
    """The console will not start as configured (the message says why)."""


def check_bind(settings: Settings, stores: Stores) -> None:
    if settings.console_host not in LOOPBACK and auth.operator_count(stores.db) == 0:
        raise Refusal(
            f"sendscript console: refusing to listen on {settings.console_host}: no operator "
            "token exists. Create one with `sendscript token add NAME --role operator`, or "
            "bind 127.0.0.1 (SENDSCRIPT_CONSOLE_HOST).")
    hosts(settings)


def hosts(settings: Settings) -> list[str]:
    try:
        return allowed_hosts(settings.console_host, settings.console_hosts, "CONSOLE_HOSTS")
    except ValueError as exc:
        raise Refusal(f"sendscript console: {exc}") from None


def build(settings: Settings, stores: Stores | None = None,
          extra_routers: list[Any] | None = None) -> FastAPI:
    """The ASGI app. `extra_routers`: routers other parts add (e.g. the metrics' /metrics)."""
    stores = stores or Stores.open(settings)
    auth.ensure_indexes(stores.db)
    stores.db[AUDIT].create_index([("at", -1)])
    secret = auth.console_secret(stores.db, settings.console_secret)
    sampler = Sampler(stores, settings.console_live_interval_s, settings.console_counts_s)
    console = Console(settings, stores, Actions(stores, SendScriptClient(settings), secret),
                      sampler, secret)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        task = asyncio.create_task(sampler.run(stop))
        try:
            yield
        finally:
            stop.set()
            sampler.poke()
            await asyncio.wait_for(task, 10)
            console.actions.client.close()
            stores.close()

    app = FastAPI(title="sendscript console", version="1", lifespan=lifespan,
                  description="Tasks, devices, schedules, batches, masters, quarantine and "
                  "dead letters of a sendscript service, and the operator's actions. "
                  "Authenticate with `Authorization: Bearer <token>` (`sendscript token add`).")
    app.state.console = console
    app.add_exception_handler(LoginRequired, pages.login_redirect)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, allow_every_method)  # type: ignore[arg-type]

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Any]) -> Response:
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            if not same_origin(request):
                return JSONResponse({"detail": "cross-site request refused"}, status_code=403)
            if request.url.path.startswith("/api/") and not request.headers.get(
                    "content-type", "").startswith("application/json") and int(
                    request.headers.get("content-length") or 0) > 0:
                return JSONResponse({"detail": "send JSON (Content-Type: application/json)"},
                                    status_code=415)
        response: Response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; frame-ancestors 'none'")
        return response

    app.include_router(api.router)
    app.include_router(pages.router)
    app.include_router(health_router(stores))
    # On loopback Prometheus scrapes without a token (as scrapers do); exposed, with
    # SENDSCRIPT_METRICS_TOKEN. It shows counts, never tasks.
    app.include_router(metrics_router(settings, console.principal_of))
    for router in extra_routers or []:
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    guard_hosts(app, hosts(settings))  # last: the outermost, before anything else runs
    return app


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


async def allow_every_method(request: Request, exc: HTTPException) -> Response:
    """A 405 names every method of the path (Starlette names those of the first route
    that matched it alone: `Allow: GET` for /api/pauses, which also takes POST). Each
    method is tried against the routes, as routing would: FastAPI's included routers
    are one route each, whose `methods` say nothing."""
    if exc.status_code == 405:
        allowed = [method for method in METHODS if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL
            for route in request.app.router.routes)]
        exc.headers = {**(exc.headers or {}), "Allow": ", ".join(allowed)}
    return await http_exception_handler(request, exc)


def url(settings: Settings) -> str:
    host = settings.console_host
    return f"http://{'[' + host + ']' if ':' in host else host}:{settings.console_port}/"


def run(settings: Settings) -> int:
    import uvicorn

    from sendscript import runtime

    runtime.setup(settings, "console")
    stores = Stores.open(settings)
    try:
        check_bind(settings, stores)
    except Refusal:
        stores.close()
        raise
    app = build(settings, stores)
    logger.info("console on {}", url(settings))
    config = uvicorn.Config(app, host=settings.console_host, port=settings.console_port,
                            log_level="warning", timeout_graceful_shutdown=3,
                            **proxy_options(settings.trusted_proxies))
    server = GracefulServer(config)
    server.run()
    logger.info("console stopped")
    return 0 if server.started else 1


