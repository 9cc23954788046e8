"""The Python agent SDK: lease pull tasks from the agents API, run them, report.

    from sendscript.agent import Agent

    agent = Agent("http://127.0.0.1:8470", token, labels=["chrome"])

    @agent.handler
    def scrape(task, ctx):
        page = ctx.checkpoint.get("page", 1)         # where the last attempt stopped
        for page in range(page, 6):
            ...
            ctx.progress({"page": page + 1})          # saved; extends the lease
        return {"pages": 5}                           # the result: task succeeds

    agent.run()                                       # until SIGTERM / SIGINT / stop()

A handler that raises fails the attempt (retried per the task's max_retries);
`Fail("why", retryable=False)` fails it for good; `Release()` gives it back
unstarted. The agent heartbeats in a thread of its own; when the API says a task was
cancelled, `ctx.cancelled` is set and `ctx.progress` raises `LeaseLost`. On SIGTERM it
stops leasing, sets `ctx.stopping`, waits up to `grace_s` for its handlers to finish,
then releases whatever is still running (its checkpoint stays for the next agent).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
from loguru import logger

Handler = Callable[["LeasedTask", "TaskContext"], dict[str, Any] | None]


class AgentError(RuntimeError):
    """The API refused a call: its status and reason."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


class LeaseLost(AgentError):
    """The lease is no longer ours (expired, cancelled, taken over): stop the task."""


class Fail(Exception):
    """Raise from a handler to fail the attempt with a reason."""

    def __init__(self, reason: str, retryable: bool = True,
                 result: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.retryable = retryable
        self.result = result


class Release(Exception):
    """Raise from a handler to give the task back unstarted."""


@dataclass(frozen=True)
class LeasedTask:
    id: str
    script: dict[str, Any]
    attempt: int
    max_attempts: int
    device_id: str | None
    labels: list[str]
    lease_token: str
    deadline_ms: int
    raw: dict[str, Any]

    @classmethod
    def of(cls, raw: dict[str, Any]) -> LeasedTask:
        return cls(raw["task_id"], raw.get("script") or {}, raw["attempt"], raw["max_attempts"],
                   raw.get("device_id"), raw.get("labels") or [], raw["lease_token"],
                   raw["deadline_ms"], raw)


@dataclass
class TaskContext:
    """What a handler gets beside its task: the checkpoint to resume from, progress."""

    task: LeasedTask
    agent: Agent
    checkpoint: dict[str, Any]
    stopping: threading.Event
    cancelled: threading.Event = field(default_factory=threading.Event)

    def progress(self, checkpoint: dict[str, Any]) -> None:
        """Save a checkpoint (merged over the last one; a key set to None is dropped)
        and extend the lease. Raises LeaseLost when the lease is gone."""
        if self.cancelled.is_set():
            raise LeaseLost(409, f"task {self.task.id} was cancelled")
        self.agent.call("progress", task_id=self.task.id, lease_token=self.task.lease_token,
                        checkpoint=checkpoint)
        self.checkpoint.update({k: v for k, v in checkpoint.items() if v is not None})
        for k in [k for k, v in checkpoint.items() if v is None]:
            self.checkpoint.pop(k, None)


class Agent:
    def __init__(self, url: str, token: str, *, agent_id: str | None = None,
                 name: str = "", labels: list[str] | tuple[str, ...] = (),
                 devices: list[str] | tuple[str, ...] = (), version: str = "",
                 concurrency: int = 1, wait_s: float = 20.0, grace_s: float = 10.0,
                 timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.agent_id = agent_id or f"py-{socket.gethostname()}-{os.getpid()}"
        self.name = name or self.agent_id
        self.labels = list(labels)
        self.devices = list(devices)
        self.version = version
        self.concurrency = concurrency
        self.wait_s = wait_s
        self.grace_s = grace_s
        self.timeout_s = timeout_s
        self._token = token
        self._handler: Handler | None = None
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=timeout_s),
                                  headers={"Authorization": f"Bearer {token}"})
        self.stopping = threading.Event()
        self._running: dict[str, TaskContext] = {}
        self._lock = threading.Lock()
        self.heartbeat_s = 5.0
        self.quiet = False
        self.done = 0

    def handler(self, fn: Handler) -> Handler:
        """Decorator: the function that runs each leased task."""
        self._handler = fn
        return fn

    # -- API calls -------------------------------------------------------------------
    def call(self, route: str, *, timeout_s: float | None = None, **body: Any) -> dict[str, Any]:
        """POST one API call; AgentError (LeaseLost for a lease that is gone) if refused."""
        body["agent_id"] = self.agent_id
        response = self._http.post(f"{self.url}/api/agents/{route}", json=body,
                                   timeout=timeout_s or self.timeout_s)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            kind = LeaseLost if response.status_code in (404, 409) and route != "lease" \
                else AgentError
            raise kind(response.status_code, str(detail))
        answer: dict[str, Any] = response.json()
        return answer

    def register(self) -> dict[str, Any]:
        answer = self.call("register", name=self.name, labels=self.labels,
                           devices=self.devices, version=self.version)
        self.heartbeat_s = float(answer.get("heartbeat_s", self.heartbeat_s))
        return answer

    # -- running ------------------------------------------------------------------------
    def stop(self) -> None:
        self.stopping.set()

    def run(self, install_signals: bool = True) -> int:
        """Register, then lease and run tasks until stopped. Returns 0."""
        if self._handler is None:
            raise RuntimeError("no handler: decorate a function with @agent.handler")
        if install_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        self._retrying(self.register)
        beat = threading.Thread(target=self._heartbeats, name="agent-heartbeat", daemon=True)
        beat.start()
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="agent-task")
        futures: set[Future[None]] = set()
        try:
            while not self.stopping.is_set():
                futures = {f for f in futures if not f.done()}
                free = self.concurrency - len(futures)
                if free <= 0:
                    self.stopping.wait(0.02)
                    continue
                tasks = self._lease(free)
                for raw in tasks:
                    futures.add(pool.submit(self._run_one, LeasedTask.of(raw)))
        finally:
            self._finish(pool, futures)
        return 0

    def _lease(self, free: int) -> list[dict[str, Any]]:
        wait = min(self.wait_s, 2.0) if self.quiet else self.wait_s
        try:
            answer = self.call("lease", limit=free, wait_s=wait, timeout_s=wait + self.timeout_s)
            return list(answer.get("tasks", []))
        except AgentError as exc:
            pause = 1.0 if exc.status == 429 else 2.0
            logger.warning("lease refused: {}", exc)
        except httpx.HTTPError as exc:
            pause = 1.0 + random.random()
            logger.warning("lease call failed: {!r}", exc)
        self.stopping.wait(pause)
        return []

    def _run_one(self, task: LeasedTask) -> None:
        assert self._handler is not None
        ctx = TaskContext(task, self, dict(task.raw.get("checkpoint") or {}), self.stopping)
        with self._lock:
            self._running[task.id] = ctx
        try:
            try:
                result = self._handler(task, ctx)
            except Release:
                self._quietly("release", task)
                return
            except LeaseLost as exc:
                logger.warning("task {}: lease lost: {}", task.id, exc.detail)
                return
            except Fail as exc:
                self._quietly("fail", task, error=str(exc), retryable=exc.retryable,
                              result=exc.result)
                return
            except Exception as exc:
                self._quietly("fail", task, error=f"{type(exc).__name__}: {exc}")
                return
            self._quietly("complete", task, result=result or {})
            self.done += 1
        finally:
            with self._lock:
                self._running.pop(task.id, None)

    def _quietly(self, name: str, task: LeasedTask, **body: Any) -> None:
        """Report the end of a lease; retried while the API is unreachable (the call is
        idempotent), given up when the lease is gone."""
        for delay in (0.2, 0.5, 1, 2, 4, 8):
            try:
                self.call(name, task_id=task.id, lease_token=task.lease_token, **body)
                return
            except LeaseLost as exc:
                logger.warning("task {}: {} refused: {}", task.id, name, exc.detail)
                return
            except AgentError as exc:
                if exc.status < 500 and exc.status != 429:
                    logger.warning("task {}: {} refused: {}", task.id, name, exc.detail)
                    return
            except httpx.HTTPError as exc:
                logger.warning("task {}: {} failed: {!r}", task.id, name, exc)
            time.sleep(delay)

    def _heartbeats(self) -> None:
        while not self.stopping.wait(self.heartbeat_s):
            try:
                answer = self.call("heartbeat")
            except (AgentError, httpx.HTTPError) as exc:
                logger.warning("heartbeat failed: {!r}", exc)
                continue
            self.quiet = bool(answer.get("quiet"))
            for task_id in answer.get("cancel", []):
                with self._lock:
                    ctx = self._running.get(task_id)
                if ctx is not None:
                    ctx.cancelled.set()
            if answer.get("stop"):
                logger.info("the API asked agent {} to stop", self.agent_id)
                self.stop()

    def _finish(self, pool: ThreadPoolExecutor, futures: set[Future[None]]) -> None:
        """Let running handlers finish within the grace; give back what is left."""
        deadline = time.monotonic() + self.grace_s
        for future in futures:
            future_left = deadline - time.monotonic()
            if future_left <= 0:
                break
            try:
                future.result(timeout=future_left)
            except Exception:  # its outcome was reported by _run_one
                pass
        with self._lock:
            left = list(self._running.values())
        for ctx in left:
            self._quietly("release", ctx.task)
        pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    def _retrying(self, step: Callable[[], Any]) -> Any:
        delay = 0.5
        while True:
            try:
                return step()
            except (httpx.HTTPError, AgentError) as exc:
                # 409 at registration: a live agent still serves one of our devices (one
                # killed a moment ago is lost after SENDSCRIPT_AGENT_TTL_S). Other refusals
                # are for good.
                if self.stopping.is_set() or (isinstance(exc, AgentError)
                                              and exc.status != 409):
                    raise
                logger.warning("register: {!r}; again in {:.1f}s", exc, delay)
                self.stopping.wait(delay)
                delay = min(delay * 2, 10.0)
