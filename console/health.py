"""`/healthz` and `/readyz` of the console, shaped as the other roles' (sendscript/health.py):
alive (this answer ran on the console's loop), and ready (Redis and Mongo answer).
No token: probes carry none, and the answers name no task."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from console.answers import Alive, Readiness
from console.data import Stores
from sendscript.health import CHECK_TIMEOUT_S
from sendscript.serving import host_refused

ROLE = "console"


async def _check(probe: Callable[[], Any], timeout_s: float) -> dict[str, Any]:
    try:
        await asyncio.wait_for(run_in_threadpool(probe), timeout_s)
        return {"ok": True, "detail": "ok"}
    except TimeoutError:
        return {"ok": False, "detail": f"no answer within {timeout_s:g}s"}
    except Exception as exc:  # a probe reports any failure, it never raises
        return {"ok": False, "detail": f"{type(exc).__name__}: {exc}"[:300]}


def health_router(stores: Stores, timeout_s: float = CHECK_TIMEOUT_S) -> APIRouter:
    router = APIRouter(tags=["health"], responses=host_refused())
    started = time.monotonic()

    @router.get("/healthz", response_model=Alive)
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "role": ROLE, "uptime_s": round(time.monotonic() - started, 1)}

    @router.get("/readyz", response_model=Readiness, responses={503: {
        "model": Readiness, "description": "Redis or Mongo does not answer: `checks` says "
                                           "which and why"}})
    async def readyz() -> JSONResponse:
        redis_ok, mongo_ok = await asyncio.gather(
            _check(stores.redis.ping, timeout_s),
            _check(lambda: stores.db.command("ping"), timeout_s))
        checks = {"redis": redis_ok, "mongo": mongo_ok}
        ready = all(c["ok"] for c in checks.values())
        return JSONResponse({"status": "ready" if ready else "not ready", "role": ROLE,
                             "checks": checks}, status_code=200 if ready else 503)

    return router
