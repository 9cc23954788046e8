"""The producer SDK: store a task in Mongo, then push its id onto the ready queue.

    from sendscript.client import SendScriptClient
    with SendScriptClient() as client:            # settings from SENDSCRIPT_* / .env
        sub = client.submit("phone-17", {"id": "open-app", "args": {"app": "x"}})
        print(sub.task_id)

Storing before pushing means a crash between the two leaves a stored `pending`
task that the master's orphan sweep finds; pushing first could lose it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pymongo import DESCENDING

from sendscript import connect, roundtrips
from sendscript.models import Task, TaskSpec, utcnow
from sendscript.settings import Settings
from sendscript.status import TaskStatus
from sendscript.store import DUPLICATE_KEY, RECORDS, TASKS


@dataclass(frozen=True)
class Submitted:
    task_id: str
    status: str
    created: bool = True  # False when an existing task was returned instead


class SendScriptClient:
    def __init__(self, settings: Settings | None = None, **overrides: Any) -> None:
        self.settings = settings or Settings(**overrides)
        self._redis = connect.redis_sync(self.settings)
        self._mongo = connect.mongo_sync(self.settings)
        self._db = connect.database(self._mongo)
        self._keys = self.settings.keys

    def submit(
        self,
        device_id: str,
        script: dict[str, Any],
        *,
        priority: int = 5,
        run_at: Any = None,
        dedupe_key: str | None = None,
        max_retries: int = 3,
        timeout_s: float = 300.0,
        expire_at: Any = None,
        queue: str = "default",
    ) -> Submitted:
        spec = TaskSpec(
            device_id=device_id, script=script, priority=priority, run_at=run_at,
            dedupe_key=dedupe_key, max_retries=max_retries, timeout_s=timeout_s,
            expire_at=expire_at, queue=queue,
        )
        return self.submit_many([spec])[0]

    def submit_many(self, specs: Iterable[TaskSpec | dict[str, Any]]) -> list[Submitted]:
        """Store many tasks in one write and push them in one call."""
        now = utcnow()
        tasks = [
            Task.from_spec(s if isinstance(s, TaskSpec) else TaskSpec.model_validate(s), now=now)
            for s in specs
        ]
        if not tasks:
            return []
        from pymongo.errors import BulkWriteError

        try:
            self._db[TASKS].insert_many([t.to_doc() for t in tasks], ordered=False)
        except BulkWriteError as exc:  # ids are fresh ObjectIds: only real errors land here
            if any(e.get("code") != DUPLICATE_KEY for e in exc.details.get("writeErrors", [])):
                raise
        due = [t.id for t in tasks if t.status == TaskStatus.PENDING]
        if due:
            self._redis.lpush(self._keys.ready, *[json.dumps({"task_id": i}) for i in due])
        return [Submitted(t.id, str(t.status)) for t in tasks]

    def push_raw(self, items: Sequence[dict[str, Any] | str]) -> None:
        """Push queue items as a non-Python producer would (raw JSON on the list)."""
        payloads = [i if isinstance(i, str) else json.dumps(i, default=str) for i in items]
        if payloads:
            self._redis.lpush(self._keys.ready, *payloads)

    def get(self, task_id: str) -> Task | None:
        doc = self._db[TASKS].find_one({"_id": task_id})
        return Task.model_validate(doc) if doc else None

    def records(self, task_id: str) -> list[dict[str, Any]]:
        return list(self._db[RECORDS].find({"task_id": task_id}).sort("attempt", 1))

    def list(self, status: str | None = None, limit: int = 50) -> list[Task]:
        flt = {"status": status} if status else {}
        cursor = self._db[TASKS].find(flt).sort("created_at", DESCENDING).limit(limit)
        return [Task.model_validate(d) for d in cursor]

    def flush_counters(self, role: str = "producer") -> None:
        roundtrips.flush_sync(self._redis, self._keys.roundtrips, role)

    def close(self) -> None:
        self._redis.close()
        self._mongo.close()

    def __enter__(self) -> SendScriptClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
