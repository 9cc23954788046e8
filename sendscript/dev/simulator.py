"""A simulated farm: the central-control API and devices that report over Pulsar.

`POST /api/script/send` accepts a script for a device, "runs" it for a while and
then publishes the device's task log. A device already running a script refuses
another with HTTP 409 and the refusal is counted: the farm's own check that no
device ever runs two scripts at once. Failures can be injected: HTTP errors,
ERROR / SYSTEM_ERROR results, devices that never report, duplicated logs.

A hidden capacity (`capacity`, sends per second across all devices) makes the farm
behave as a rate-limited API: a send that would put more than `capacity` x
`capacity_window_s` accepted sends into any window of `capacity_window_s` (a sliding
log) is answered 429 with a `Retry-After` header, the seconds until the window has
room again (whole seconds, at least 1) or `retry_after_s` when set. Every 429 is kept
(`/throttled`) so a test can tell which sends came during a hold. All of it can be
changed while the farm runs (`POST /config`).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Any

import pulsar.asyncio as apulsar
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from loguru import logger
from pydantic import BaseModel, Field

from sendscript.backoff import Backoff
from sendscript.pulsar_log import pulsar_logger
from sendscript.tracing import TRACEPARENT, TRACESTATE


class FarmConfig(BaseModel):
    run_ms: float = Field(200.0, ge=0)
    jitter: float = Field(0.5, ge=0, le=1)
    fail_rate: float = Field(0.0, ge=0, le=1)
    system_error_rate: float = Field(0.0, ge=0, le=1)
    http_error_rate: float = Field(0.0, ge=0, le=1)
    http_error_status: int = Field(503, ge=400, le=599)  # e.g. 402: quota exhausted
    http_error_code: str | None = None  # the body's `code` of injected failures
    silent_rate: float = Field(0.0, ge=0, le=1)
    duplicate_rate: float = Field(0.0, ge=0, le=1)
    accept_delay_ms: float = Field(0.0, ge=0)
    progress: bool = True
    error_code: str | None = None  # the code ERROR results carry
    # Devices that always end this way (SUCCESS, ERROR, SYSTEM_ERROR or SILENT), e.g.
    # one sick device among healthy ones; the rates above decide for the others.
    device_outcomes: dict[str, str] = Field(default_factory=dict)
    # The hidden capacity: accepted sends per second over a sliding window (None: no
    # limit); above it a 429 with Retry-After (fixed when retry_after_s is set).
    capacity: float | None = Field(None, gt=0)
    capacity_window_s: float = Field(1.0, gt=0, le=60)
    retry_after_s: float | None = Field(None, ge=0, le=300)
    # A farm that keeps the send's trace context: the W3C `traceparent` and
    # `tracestate` headers of the send come back as the task log's message properties.
    keep_trace: bool = True


@dataclass
class Throttle:
    """A send answered 429: when, for which task, and the Retry-After it carried."""

    device_id: str
    task_id: str
    at: float
    retry_after_s: float


@dataclass
class Run:
    device_id: str
    task_id: str
    record_id: str
    started: float
    ended: float | None = None
    outcome: str | None = None
    script: Any = None  # what the device was sent (a test checks which spec ran)
    trace: dict[str, str] = field(default_factory=dict)  # the send's trace headers


@dataclass
class Farm:
    config: FarmConfig
    running: dict[str, Run] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    counters: Counter[str] = field(default_factory=Counter)
    rand: random.Random = field(default_factory=random.Random)
    throttles: list[Throttle] = field(default_factory=list)
    window: deque[float] = field(default_factory=deque)  # accept times, the capacity's

    def over_capacity(self, now: float) -> float | None:
        """None when a send fits the capacity now, else the Retry-After to answer."""
        c = self.config
        if c.capacity is None:
            return None
        while self.window and self.window[0] <= now - c.capacity_window_s:
            self.window.popleft()
        if len(self.window) < c.capacity * c.capacity_window_s:
            return None
        if c.retry_after_s is not None:
            return c.retry_after_s
        return float(max(1, math.ceil(self.window[0] + c.capacity_window_s - now)))

    def accept(self, body: Any) -> tuple[int, dict[str, Any], Run | None]:
        """Decide on one send request: (HTTP status, response body, run started)."""
        self.counters["requests"] += 1
        if not isinstance(body, dict):
            self.counters["bad_requests"] += 1
            return 400, {"success": False, "error": "body must be a JSON object"}, None
        missing = [k for k in ("deviceId", "taskId", "recordId", "script") if not body.get(k)]
        if missing:
            self.counters["bad_requests"] += 1
            return 400, {"success": False, "error": f"missing {', '.join(missing)}"}, None
        device_id = str(body["deviceId"])
        if self.rand.random() < self.config.http_error_rate:
            self.counters["http_errors"] += 1
            payload: dict[str, Any] = {"success": False, "error": "injected failure"}
            if self.config.http_error_code:
                payload["code"] = self.config.http_error_code
            return self.config.http_error_status, payload, None
        now = time.time()
        if (wait_s := self.over_capacity(now)) is not None:
            self.counters["throttled"] += 1
            self.throttles.append(Throttle(device_id, str(body["taskId"]), now, wait_s))
            return 429, {"success": False, "error": "over capacity",
                         "retry_after_s": wait_s}, None
        if device_id in self.running:
            self.counters["refused_busy"] += 1
            logger.error("device {} asked to run {} while running {}", device_id,
                         body["taskId"], self.running[device_id].task_id)
            return 409, {"success": False, "error": "device is running another script"}, None
        run = Run(device_id, str(body["taskId"]), str(body["recordId"]), now,
                  script=body["script"])
        self.window.append(now)
        self.running[device_id] = run
        self.runs.append(run)
        self.counters["accepted"] += 1
        return 200, {"success": True}, run

    def outcome(self, device_id: str | None = None) -> str | None:
        """How a run ends: a log type, or None for a device that never reports."""
        forced = self.config.device_outcomes.get(device_id or "")
        if forced is not None:
            return None if forced.upper() == "SILENT" else forced.upper()
        r = self.rand.random()
        c = self.config
        if r < c.silent_rate:
            return None
        r -= c.silent_rate
        if r < c.fail_rate:
            return "ERROR"
        r -= c.fail_rate
        if r < c.system_error_rate:
            return "SYSTEM_ERROR"
        return "SUCCESS"

    def run_time_s(self) -> float:
        c = self.config
        spread = c.run_ms * c.jitter
        return max(0.0, self.rand.uniform(c.run_ms - spread, c.run_ms + spread)) / 1000

    def finish(self, run: Run, outcome: str | None) -> None:
        run.ended = time.time()
        run.outcome = outcome or "SILENT"
        if self.running.get(run.device_id) is run:
            del self.running[run.device_id]
        self.counters[f"result_{run.outcome.lower()}"] += 1

    def stats(self) -> dict[str, Any]:
        return {
            **{k: self.counters.get(k, 0) for k in (
                "requests", "accepted", "refused_busy", "throttled", "http_errors",
                "bad_requests",
                "result_success", "result_error", "result_system_error", "result_silent",
                "published", "duplicates")},
            "overlaps": self.counters.get("refused_busy", 0),
            "running": len(self.running),
            "config": self.config.model_dump(),
        }


def log_message(run: Run, log_type: str, message: str, code: str | None = None) -> bytes:
    body = {
        "recordId": run.record_id, "taskId": run.task_id, "deviceId": run.device_id,
        "logType": log_type, "message": message, "timestamp": int(time.time() * 1000),
    }
    if code:
        body["code"] = code
    return json.dumps(body).encode()


class Simulator:
    def __init__(self, pulsar_url: str, topic: str, config: FarmConfig, *,
                 seed: int | None = None) -> None:
        self.farm = Farm(config, rand=random.Random(seed))
        self.pulsar_url = pulsar_url
        self.topic = topic
        self.producer: apulsar.Producer | None = None
        self.client: apulsar.Client | None = None
        self.jobs: set[asyncio.Task[None]] = set()
        self._connecting = asyncio.Lock()
        self.app = self._make_app()

    def _make_app(self) -> FastAPI:
        app = FastAPI(title="sendscript farm simulator")

        @app.post("/api/script/send")
        async def send(request: Request) -> JSONResponse:
            try:
                body = await request.json()
            except ValueError:
                body = None
            status, payload, run = self.farm.accept(body)
            if run is not None:
                run.trace = {k: v for k in (TRACEPARENT, TRACESTATE)
                             if (v := request.headers.get(k))}
            headers = None
            if status == 429:
                headers = {"Retry-After": f"{payload['retry_after_s']:g}"}
            if run is not None:
                job = asyncio.create_task(self._run(run))
                self.jobs.add(job)
                job.add_done_callback(self.jobs.discard)
                if self.farm.config.accept_delay_ms:
                    await asyncio.sleep(self.farm.config.accept_delay_ms / 1000)
            return JSONResponse(payload, status_code=status, headers=headers)

        @app.get("/stats")
        async def stats() -> dict[str, Any]:
            return self.farm.stats()

        @app.get("/runs")
        async def runs() -> list[dict[str, Any]]:
            return [asdict(r) for r in self.farm.runs]

        @app.get("/throttled")
        async def throttled() -> list[dict[str, Any]]:
            return [asdict(t) for t in self.farm.throttles]

        @app.post("/config")
        async def configure(update: dict[str, Any]) -> dict[str, Any]:
            merged = {**self.farm.config.model_dump(), **update}
            self.farm.config = FarmConfig.model_validate(merged)
            return self.farm.config.model_dump()

        @app.get("/health")
        async def health() -> dict[str, str]:
            return {"status": "ok"}

        return app

    async def _run(self, run: Run) -> None:
        duration = self.farm.run_time_s()
        outcome = self.farm.outcome(run.device_id)
        props = run.trace if self.farm.config.keep_trace else {}
        if self.farm.config.progress and duration > 0.05:
            await asyncio.sleep(duration / 2)
            await self._publish(log_message(run, "PROGRESS", "halfway"), props)
            await asyncio.sleep(duration / 2)
        else:
            await asyncio.sleep(duration)
        # The device is free before it reports: the next script may follow the report.
        self.farm.finish(run, outcome)
        if outcome is None:
            return
        text = {"SUCCESS": "done", "ERROR": "script error: element not found",
                "SYSTEM_ERROR": "device system error"}[outcome]
        code = self.farm.config.error_code if outcome == "ERROR" else None
        data = log_message(run, outcome, text, code)
        await self._publish(data, props)
        if self.farm.rand.random() < self.farm.config.duplicate_rate:
            self.farm.counters["duplicates"] += 1
            await self._publish(data, props)

    async def _publish(self, data: bytes, properties: dict[str, str] | None = None) -> None:
        backoff = Backoff(base_s=0.2, cap_s=5.0)
        while True:
            try:
                async with self._connecting:  # one client, however many publish at once
                    if self.producer is None:
                        await self._connect()
                producer = self.producer
                assert producer is not None
                await producer.send(data, properties=properties or None)
                self.farm.counters["published"] += 1
                backoff.succeeded("simulator publish")
                return
            except Exception as exc:
                await self._disconnect()
                await backoff.failed("simulator publish", exc)

    async def _connect(self) -> None:
        self.client = apulsar.Client(self.pulsar_url, operation_timeout_seconds=10,
                                     connection_timeout_ms=5000,
                                     logger=pulsar_logger("simulator"))
        self.producer = await self.client.create_producer(
            self.topic, batching_enabled=True, batching_max_publish_delay_ms=5,
            send_timeout_millis=10000,
        )

    async def _disconnect(self) -> None:
        client, self.client, self.producer = self.client, None, None
        if client is not None:
            try:
                await client.close()
            except Exception:
                pass

    async def serve(self, host: str, port: int) -> None:
        config = uvicorn.Config(self.app, host=host, port=port, log_level="warning",
                                access_log=False, lifespan="off")
        server = uvicorn.Server(config)
        logger.info("farm simulator on http://{}:{} publishing to {}", host, port, self.topic)
        try:
            await server.serve()
        finally:
            for job in list(self.jobs):
                job.cancel()
            await self._disconnect()
