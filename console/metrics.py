"""`GET /metrics`: the cluster's Prometheus metrics, served by the console.

Include it with one line: `app.include_router(metrics_router(settings))`.

On loopback it needs no token (as scrapers expect). Exposed (bound off loopback, or
behind trusted proxies) it wants `Authorization: Bearer` with SENDSCRIPT_METRICS_TOKEN,
or any console token when the caller passes `principal_of`.

Every figure comes from Redis, read at scrape time in a handful of round trips:
each role's published counters and histograms (`sendscript.metrics`), the task
counts the leader keeps (`sendscript.counts`), queue lengths, the masters' and
consumers' heartbeats, the shared breaker and the stats hash. No Mongo query.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from fastapi import APIRouter, Request, Response
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from console.auth import hash_token
from sendscript import connect, counts, metrics
from sendscript.breaker import Circuit
from sendscript.limits import parse_limits, window_use
from sendscript.report import breaker_view
from sendscript.serving import exposed, host_refused
from sendscript.settings import Settings

# A console token's holder, or None (console.context.Console.principal_of).
PrincipalOf = Callable[[str], Any]


def cluster_families(r: redis.Redis, settings: Settings) -> Iterator[Metric]:
    keys = settings.keys
    pipe = r.pipeline(transaction=False)
    pipe.hgetall(f"{settings.keys.prefix}:metrics")
    pipe.llen(keys.ready)
    pipe.llen(keys.quarantine)
    pipe.hgetall(keys.masters)
    pipe.hgetall(keys.consumers)
    pipe.hgetall(keys.stats)
    pipe.hget(keys.breaker, "state")
    published, ready, quarantine, masters_raw, consumers_raw, stats, breaker = pipe.execute()
    yield from metrics.families_from(metrics.parse_published(published))

    kept = counts.read_sync(r, settings.keys.prefix)
    yield metrics.gauge("sendscript_tasks", "Tasks stored, by status (kept by the leader)",
                        {(("status", s),): n for s, n in kept.by_status.items()})
    if kept.lag_s is not None:
        yield metrics.gauge("sendscript_task_counts_age_seconds",
                            "Seconds since the task counts' last pass", {(): kept.lag_s})
    yield metrics.gauge("sendscript_queue_length", "Items waiting in a Redis list",
                        {(("list", "ready"),): ready, (("list", "quarantine"),): quarantine})

    alive = _alive(r, [m.decode() for m in masters_raw], keys.master_alive)
    board: dict[tuple[tuple[str, str], ...], float] = {}
    inflight: dict[tuple[tuple[str, str], ...], float] = {}
    workers: dict[tuple[tuple[str, str], ...], float] = {}
    delayed: dict[tuple[tuple[str, str], ...], float] = {}
    for master_id, raw in masters_raw.items():
        name = master_id.decode()
        if not alive.get(name):
            continue
        info = _json(raw)
        label = (("master", name),)
        board[label] = info.get("queued", 0) or 0
        inflight[label] = info.get("inflight", 0) or 0
        workers[label] = info.get("workers_alive", 0) or 0
        delayed[label] = info.get("delayed_held", 0) or 0
    yield metrics.gauge("sendscript_board_queued", "Tasks queued on a master's board", board)
    yield metrics.gauge("sendscript_tasks_inflight", "Tasks a master's workers hold", inflight)
    yield metrics.gauge("sendscript_workers_alive", "A master's workers online", workers)
    yield metrics.gauge("sendscript_delayed_held", "Delayed tasks in a master's heap", delayed)
    yield metrics.gauge("sendscript_masters_alive", "Masters with a fresh heartbeat",
                        {(): sum(1 for v in alive.values() if v)})
    consumers_alive = _alive(r, [c.decode() for c in consumers_raw], keys.consumer_alive)
    yield metrics.gauge("sendscript_consumers_alive", "Consumers with a fresh heartbeat",
                        {(): sum(1 for v in consumers_alive.values() if v)})
    locked = sum(1 for _ in r.scan_iter(match=keys.device_lock_pattern, count=1000))
    yield metrics.gauge("sendscript_devices_locked", "Device locks held", {(): locked})

    view = breaker_view(settings, breaker)
    yield metrics.gauge("sendscript_breaker_state", "The shared circuit breaker: 1 for its state",
                        {(("state", str(c)),): float(view["state"] == str(c)) for c in Circuit})
    yield metrics.counter("sendscript_breaker_trips_total", "Times the breaker opened",
                          {(): view["trips"]})
    yield from _adaptive_limits(r, settings)
    yield metrics.counter("sendscript_events_total",
                          "Counters of the stats hash: quarantined, dead_lettered, expired, ...",
                          {(("kind", k.decode()),): int(v) for k, v in stats.items()
                           if k.decode() != "roundtrips"})


def _adaptive_limits(r: redis.Redis, settings: Settings) -> Iterator[Metric]:
    """An adaptive limit's current value and Retry-After hold, per scope (one call)."""
    adaptive = [lim for lim in parse_limits(settings.rate_limits).values() if lim.adaptive]
    if not adaptive:
        return
    use = window_use(r, settings.keys, adaptive)
    yield metrics.gauge("sendscript_rate_limit_current",
                        "An adaptive rate limit's current value (tokens per its duration)",
                        {(("limit", n),): v["current"] for n, v in use.items()})
    yield metrics.gauge("sendscript_rate_limit_hold_seconds",
                        "Seconds left of a Retry-After hold on an adaptive rate limit",
                        {(("limit", n),): v["hold_s"] for n, v in use.items()})


def _alive(r: redis.Redis, names: list[str], key: Any) -> dict[str, bool]:
    if not names:
        return {}
    pipe = r.pipeline(transaction=False)
    for name in names:
        pipe.exists(key(name))
    return {n: bool(e) for n, e in zip(names, pipe.execute(), strict=True)}


def _json(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


class _Cluster:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client: redis.Redis | None = None

    def collect(self) -> Iterator[Metric]:
        if self.client is None:
            self.client = connect.redis_sync(self.settings)
        started = time.monotonic()
        yield from cluster_families(self.client, self.settings)
        yield metrics.gauge("sendscript_scrape_seconds", "This scrape's own time",
                            {(): time.monotonic() - started})


def render(settings: Settings, collector: _Cluster | None = None) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector or _Cluster(settings))  # type: ignore[arg-type]
    return generate_latest(registry)


def scrape_allowed(settings: Settings, authorization: str,
                   principal_of: PrincipalOf | None = None) -> bool:
    """May this scrape read the metrics? Always on loopback; exposed, with the metrics
    token or (given principal_of) a console token."""
    if not exposed(settings.console_host, settings.trusted_proxies):
        return True
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 200:
        return False
    if settings.metrics_token and hmac.compare_digest(token.encode(),
                                                      settings.metrics_token.encode()):
        return True
    if principal_of is None:
        return False
    return principal_of(hash_token(token)) is not None


def metrics_router(settings: Settings, principal_of: PrincipalOf | None = None) -> APIRouter:
    router = APIRouter()
    cluster = _Cluster(settings)

    @router.get("/metrics", tags=["metrics"], response_class=Response, responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}},
              "description": "Prometheus' text format"},
        401: {"content": {"text/plain": {"schema": {"type": "string"}}},
              "description": "Exposed, and no SENDSCRIPT_METRICS_TOKEN nor console token"},
        **host_refused()})
    def scrape(request: Request) -> Response:  # sync: FastAPI runs it in its thread pool
        if not scrape_allowed(settings, request.headers.get("authorization", ""),
                              principal_of):
            return Response("metrics need Authorization: Bearer <SENDSCRIPT_METRICS_TOKEN>\n",
                            status_code=401, media_type="text/plain",
                            headers={"WWW-Authenticate": "Bearer"})
        return Response(render(settings, cluster), media_type=CONTENT_TYPE_LATEST)

    return router
