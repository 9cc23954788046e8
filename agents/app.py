"""The agents role: `sendscript agents` serves the pull-mode API (agents/routes.py).

One asyncio process: uvicorn serves the routes, a sweep runs beside them (due and
expired tasks, expired leases, lost agents). On SIGTERM it stops taking calls, ends
long polls early (empty), finishes the calls in hand and exits 0.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from loguru import logger

from agents.leases import Leases
from agents.registry import Registry
from agents.routes import HEADROOM, Api
from sendscript import connect
from sendscript.backoff import Backoff
from sendscript.serving import GracefulServer, allowed_hosts, guard_hosts, proxy_options
from sendscript.settings import Settings
from sendscript.store import ensure_indexes, ensure_pull_indexes


class AgentsRole:
    def __init__(self, settings: Settings) -> None:
        settings.require("redis_url", "mongo_url")
        self.settings = settings
        self.redis = connect.redis_async(settings)
        self.mongo = connect.mongo_async(settings)
        self.db = connect.database(self.mongo)
        self.registry = Registry(self.db, settings.agent_ttl_s)
        self.leases = Leases(settings, self.db, self.redis, self.registry)
        limit = max(settings.agent_checkpoint_max_bytes, settings.agent_result_max_bytes)
        self.api = Api(self.leases, self.registry, limit + HEADROOM, settings.agent_lease_rate,
                       settings.agent_lease_burst)

    async def sweep_loop(self) -> None:
        backoff = Backoff(base_s=0.2, cap_s=10.0)
        while not self.leases.stopping.is_set():
            try:
                done = await self.leases.sweep()
                if done:
                    logger.info("agents sweep: {}", done)
                backoff.succeeded("agents sweep")
            except Exception as exc:
                await backoff.failed("agents sweep", exc, self.leases.stopping)
                continue
            try:
                await asyncio.wait_for(self.leases.stopping.wait(),
                                       self.settings.agent_sweep_interval_s)
            except TimeoutError:
                pass

    async def close(self) -> None:
        await self.redis.aclose()
        await self.mongo.close()


def create_app(settings: Settings) -> FastAPI:
    role: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        s = settings
        log_retention = max(s.retention_success_s, s.retention_failed_s)
        await ensure_indexes(role["role"].db, log_retention)
        await ensure_pull_indexes(role["role"].db)
        await role["role"].registry.ensure_indexes()
        sweep = asyncio.create_task(role["role"].sweep_loop(), name="agents-sweep")
        yield
        role["role"].leases.stopping.set()
        await asyncio.gather(sweep, return_exceptions=True)
        await role["role"].close()

    role["role"] = AgentsRole(settings)
    app = FastAPI(title="sendscript agents", lifespan=lifespan, docs_url=None, redoc_url=None)
    origins = [o.strip() for o in settings.agent_cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    app.include_router(role["role"].api.router())
    app.state.role = role["role"]
    # Last: the outermost, so a request naming another host is refused before CORS or
    # any route runs.
    guard_hosts(app, agents_hosts(settings))
    return app


def agents_hosts(settings: Settings) -> list[str]:
    try:
        return allowed_hosts(settings.agents_host, settings.agents_hosts, "AGENTS_HOSTS")
    except ValueError as exc:
        raise SystemExit(f"sendscript agents: {exc}") from None


class _Server(GracefulServer):
    """Ends long polls at once on SIGTERM, so the graceful stop is not held by them."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.config.app.state.role.leases.stopping.set()
        super().handle_exit(sig, frame)


def run(settings: Settings) -> int:
    from sendscript import runtime

    runtime.setup(settings, "agents")
    agents_hosts(settings)  # a bind it cannot name stops it before any connection
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.agents_host, port=settings.agents_port,
                            log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=max(5, int(settings.shutdown_grace_s)),
                            **proxy_options(settings.trusted_proxies))
    logger.info("agents API on http://{}:{}", settings.agents_host, settings.agents_port)
    server = _Server(config)
    server.run()
    logger.info("agents API stopped")
    return 0 if server.started else 1
