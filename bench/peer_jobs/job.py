"""The job body every peer runs, sync: one task of the reference job, plainly.

Lock the device in Redis (fence from INCR, SET NX PX; a busy device is waited for),
then the 8 document writes of the job — the task inserted, running, the exec
record, POST to central-control, sent (task and record), the log, success (task
and record) — each an update by id with a status filter, then free the device
(compare-and-delete) and count the task done in Redis (progress, not Mongo).

Settings from the environment: PEER_REDIS_URL, PEER_MONGO_URL, PEER_CENTRAL_URL,
PEER_NAME (database `peers_{name}` and key prefix), PEER_DURABLE (1: journaled
writes and retryWrites as sendscript decides from the URL; 0: the driver's
defaults, as the peers come).
"""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import redis
from bson import ObjectId
from pymongo import ASCENDING, MongoClient
from pymongo.errors import DuplicateKeyError

from sendscript.connect import retry_writes

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
LOCK_WAIT_S = 60.0


def _now() -> datetime:
    return datetime.now(UTC)


class Context:
    """One process's clients (thread-safe: Dramatiq runs the job on several threads)."""

    def __init__(self) -> None:
        env = os.environ
        self.name = env.get("PEER_NAME", "plain")
        self.prefix = f"peers:{self.name}"
        self.redis = redis.Redis.from_url(env["PEER_REDIS_URL"], socket_timeout=10)
        url = env["PEER_MONGO_URL"]
        self.mongo: MongoClient[Any] = MongoClient(
            url, **mongo_options(url, env.get("PEER_DURABLE", "1") == "1"))
        self.db = self.mongo[f"peers_{self.name}"]
        self.http = httpx.Client(base_url=env["PEER_CENTRAL_URL"], timeout=10,
                                 limits=httpx.Limits(keepalive_expiry=2.0))
        self.release = self.redis.register_script(RELEASE)

    def ensure_indexes(self) -> None:
        ensure_indexes(self.db)


def mongo_options(url: str, durable: bool) -> dict[str, Any]:
    """The job's client: durable, journaled writes and retryWrites as sendscript
    decides from the URL; else the driver's defaults."""
    kwargs: dict[str, Any] = {"serverSelectionTimeoutMS": 10000, "socketTimeoutMS": 10000}
    if durable:
        kwargs["journal"] = True
        retry = retry_writes(url)
        if retry is not None:
            kwargs["retryWrites"] = retry
    return kwargs


# Two indexes a collection, as the peers have them: _id and one.
INDEXES = {"tasks": [("status", ASCENDING)], "records": [("task_id", ASCENDING)],
           "logs": [("task_id", ASCENDING)]}


def ensure_indexes(db: Any) -> None:
    for collection, keys in INDEXES.items():
        db[collection].create_index(keys)


_ctx: Context | None = None
_ctx_lock = threading.Lock()


def context() -> Context:
    global _ctx
    with _ctx_lock:
        if _ctx is None:
            _ctx = Context()
        return _ctx


def run_job(task_id: str, device_id: str, n: int) -> None:
    ctx = context()
    r, db = ctx.redis, ctx.db
    lock_key = f"{ctx.prefix}:lock:{device_id}"
    fence = r.incr(f"{ctx.prefix}:fence")
    deadline = time.monotonic() + LOCK_WAIT_S
    while not r.set(lock_key, fence, nx=True, px=60_000):
        if time.monotonic() > deadline:
            raise RuntimeError(f"device {device_id} stayed busy")
        time.sleep(0.002)
    try:
        record_id = before_send(db, task_id, device_id, n, fence)
        answer = ctx.http.post("/api/script/send", json={
            "deviceId": device_id, "taskId": task_id, "recordId": record_id,
            "script": {"id": "bench", "args": {"n": n}}})
        answer.raise_for_status()
        after_send(db, task_id, device_id, record_id)
    finally:
        ctx.release(keys=[lock_key], args=[fence])
    r.incr(f"{ctx.prefix}:done")


def before_send(db: Any, task_id: str, device_id: str, n: int, fence: int) -> str:
    """The job's writes before its POST: the task inserted and running, the exec
    record inserted. Its record id."""
    now = _now()
    try:
        db.tasks.insert_one({"_id": task_id, "device_id": device_id,
                             "script": {"id": "bench", "args": {"n": n}},
                             "status": "pending", "attempt": 0, "created_at": now,
                             "updated_at": now})
    except DuplicateKeyError:  # a redelivery: the task is there already
        pass
    db.tasks.update_one({"_id": task_id, "status": "pending"},
                        {"$set": {"status": "running", "attempt": 1, "updated_at": _now()}})
    record_id = str(ObjectId())
    db.records.insert_one({"_id": record_id, "task_id": task_id, "attempt": 1,
                           "device_id": device_id, "lock_value": fence,
                           "status": "running", "started_at": _now()})
    return record_id


def after_send(db: Any, task_id: str, device_id: str, record_id: str) -> None:
    """The job's writes after its POST: sent (task and record), the log, success
    (task and record)."""
    sent = _now()
    db.tasks.update_one({"_id": task_id, "status": "running"},
                        {"$set": {"status": "sent", "updated_at": sent}})
    db.records.update_one({"_id": record_id, "status": "running"},
                          {"$set": {"status": "sent", "sent_at": sent}})
    # The device answers at once: its log and result, saved as a consumer saves them.
    db.logs.insert_one({"_id": f"{record_id}:success", "record_id": record_id,
                        "task_id": task_id, "device_id": device_id,
                        "log_type": "SUCCESS", "message": "done", "timestamp": sent,
                        "received_at": _now()})
    done = _now()
    db.tasks.update_one({"_id": task_id, "status": "sent"},
                        {"$set": {"status": "success", "updated_at": done,
                                  "finished_at": done}})
    db.records.update_one({"_id": record_id, "status": "sent"},
                          {"$set": {"status": "success", "finished_at": done}})
