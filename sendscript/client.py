"""The producer SDK: store a task in Mongo, then push its id onto the ready queue.

    from sendscript.client import SendScriptClient
    with SendScriptClient() as client:            # settings from SENDSCRIPT_* / .env
        sub = client.submit("phone-17", {"id": "open-app", "args": {"app": "x"}})
        print(sub.task_id)

Storing before pushing means a crash between the two leaves a stored `pending`
task that a master finds; pushing first could lose it. A task due now is stored
held by a live master (`master`, one of those whose heartbeat is fresh), so the
master that takes it (that one, when it runs alone) need not write it again to
hold it; that master's own check (master/reconcile.py) queues it if its push is
lost, and the leader recovers it with the master's other tasks if that master
dies. Checked again after the push: if that master is no longer alive then, the
tasks are stored unheld (as with no master alive at all), for the leader's orphan
sweep.

A spec the store would refuse for good (a script over SENDSCRIPT_MAX_SCRIPT_BYTES,
a value BSON cannot hold, a document the server refuses) raises ValueError and
nothing is stored for it; a dedupe key held by a task (per its dedupe mode:
unfinished, or finished within SENDSCRIPT_DEDUPE_WINDOW_S by default) answers that
task with `created=False`; a debounced spec whose key a task still debouncing holds
replaces that task's spec (`debounced=True`).

With SENDSCRIPT_READY_MAX set, a submission raises QueueFull, storing nothing, while
the ready list holds that many items. It is a soft cap: one LLEN before storing, so
producers submitting at the same moment may each add their batch past it.

With SENDSCRIPT_REDIS_MIN_REPLICAS set, each push waits for that many replicas
(SENDSCRIPT_REDIS_WAIT_TIMEOUT_MS at most) and raises `NotReplicated` if fewer
confirmed: the tasks are stored and pushed, but the push may be lost if the Redis
master fails now. Do not submit them again: a stored task whose push is lost is
queued by the master it is held by (after SENDSCRIPT_RECONCILE_GRACE_S) or, held by
none, pushed again by the masters' orphan sweep (after SENDSCRIPT_ORPHAN_GRACE_S).
`NotReplicated.task_ids` names them; `push_raw` items have no stored task behind
them, so a raw item it raises for may be gone.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from loguru import logger
from pymongo import DESCENDING
from pymongo.errors import DuplicateKeyError, PyMongoError

from sendscript import connect, fleet, roundtrips, tracing
from sendscript import pauses as flags
from sendscript.groups import check_name
from sendscript.heartbeat import live_masters
from sendscript.models import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_PRIORITY,
    DEFAULT_QUEUE,
    DEFAULT_TIMEOUT_S,
    MAX_SCRIPT_BYTES,
    FanoutSpec,
    Task,
    TaskSpec,
    id_from_tag,
    new_id,
    parse_when,
    script_refusal,
    utcnow,
)
from sendscript.queue import push_refs
from sendscript.replicas import NotReplicated, ReplicaWait, push
from sendscript.schedules import Schedule
from sendscript.search_reads import batch_counts, batch_ids, newest
from sendscript.settings import Settings
from sendscript.status import (
    CANCELLABLE,
    TERMINAL,
    TaskStatus,
    configure_retention,
    manual_retry,
    task_cas,
)
from sendscript.store import (
    GROUPS,
    ID_CHUNK,
    RECORDS,
    SCHEDULES,
    TASKS,
    all_indexes,
    run_plan_sync,
    store_plan,
)

HOLDER_KEPT_S = 1.0  # how long the SDK keeps the live master it chose
RARE_STATUS = 20  # fewer tasks of a status than this times a list's limit: read them all


@dataclass(frozen=True)
class Submitted:
    task_id: str
    status: str
    created: bool = True  # False when an existing task was returned instead
    # True when this spec replaced that of the existing task, still debouncing.
    debounced: bool = False


@dataclass(frozen=True)
class Batch:
    batch_id: str
    tasks: list[Submitted]


class SubmitRefused(ValueError):
    """The store refused some specs of a `submit_many` for good after the others were
    stored: `reasons` by index; `results` has None at those indexes."""

    def __init__(self, reasons: dict[int, str], results: list[Submitted | None]) -> None:
        first = min(reasons)
        super().__init__(f"{len(reasons)} spec(s) refused; spec {first}: {reasons[first]}")
        self.reasons = reasons
        self.results = results


class QueueFull(RuntimeError):
    """The ready list holds SENDSCRIPT_READY_MAX items or more: nothing was submitted."""

    def __init__(self, length: int, cap: int) -> None:
        super().__init__(f"ready queue full: it holds {length} item(s), cap {cap} "
                         "(SENDSCRIPT_READY_MAX); nothing was submitted, try again later")
        self.length = length
        self.cap = cap


class SendScriptClient:
    def __init__(self, settings: Settings | None = None, **overrides: Any) -> None:
        self.settings = settings or Settings(**overrides)
        self._redis = connect.redis_sync(self.settings)
        self._mongo = connect.mongo_sync(self.settings)
        self._db = connect.database(self._mongo)
        self._keys = self.settings.keys
        self._wait = ReplicaWait.of(self.settings)
        configure_retention(self.settings.retention_success_s, self.settings.retention_failed_s,
                            self.settings.dedupe_window_s)
        self._context = {MAX_SCRIPT_BYTES: self.settings.max_script_bytes}
        self._holder: tuple[float, str | None] = (0.0, None)  # (when chosen, master)
        # The dedupe key's unique index must exist before the first task is stored.
        retention = max(self.settings.retention_success_s, self.settings.retention_failed_s)
        for name, indexes in all_indexes(retention).items():
            self._db[name].create_indexes(indexes)
        tracing.setup(self.settings, "sdk")  # a no-op unless SENDSCRIPT_OTEL_ENABLED

    def submit(
        self,
        device_id: str,
        script: dict[str, Any],
        *,
        priority: int = DEFAULT_PRIORITY,
        run_at: Any = None,
        dedupe_key: str | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        expire_at: Any = None,
        queue: str = DEFAULT_QUEUE,
        retry_base_s: float | None = None,
        dedupe_mode: str | None = None,
        dedupe_window_s: float | None = None,
        debounce_s: float | None = None,
        debounce_max_s: float | None = None,
    ) -> Submitted:
        """One task. With a `dedupe_key`: `dedupe_mode` (until_start, until_result,
        window; none: as SENDSCRIPT_DEDUPE_WINDOW_S says), `dedupe_window_s` (window),
        and a trailing debounce: `debounce_s` quiet, at most `debounce_max_s` after the
        first (docs/contract.md, "Dedupe")."""
        spec = dict(
            device_id=device_id, script=script, priority=priority, run_at=run_at,
            dedupe_key=dedupe_key, max_retries=max_retries, timeout_s=timeout_s,
            expire_at=expire_at, queue=queue, retry_base_s=retry_base_s,
            dedupe_mode=dedupe_mode, dedupe_window_s=dedupe_window_s,
            debounce_s=debounce_s, debounce_max_s=debounce_max_s,
        )
        return self.submit_many([spec])[0]

    def submit_many(self, specs: Iterable[TaskSpec | dict[str, Any]]) -> list[Submitted]:
        """Store many tasks in one write and push them in one call, in the given order.

        A spec whose dedupe key a task holds (unfinished, or finished within the
        dedupe window) is not stored again: its entry names the existing task, with
        `created=False`. A spec that cannot be stored raises ValueError before
        anything is stored; one the server refuses raises SubmitRefused (the others
        are stored and pushed).
        """
        now = utcnow()
        tasks = [Task.from_spec(self._spec(s, i), now=now) for i, s in enumerate(specs)]
        spans = self._begin_traces(tasks)
        try:
            results = self._store_and_push(tasks)
        except BaseException as exc:
            for span in spans:
                tracing.end(span, error=repr(exc))
            raise
        for span, result in zip(spans, results, strict=False):  # none with tracing off
            tracing.end(span, {"sendscript.created": getattr(result, "created", None),
                               "sendscript.existing_task": getattr(result, "task_id", None)},
                        error=result if isinstance(result, str) else None)
        reasons = {i: r for i, r in enumerate(results) if isinstance(r, str)}
        answers = [None if isinstance(r, str) else r for r in results]
        if reasons:
            raise SubmitRefused(reasons, answers)
        return [r for r in answers if r is not None]

    def _begin_traces(self, tasks: list[Task]) -> list[Any]:
        """A submit span each, child of the context a spec gave or of the caller's
        current span (else a new trace), kept with the task: every later span of the
        task joins it. Tracing off here, a caller who traces still passes its context on."""
        if not tracing.ON:
            if (caller := tracing.callers_context()) is not None:
                for task in tasks:
                    task.trace = task.trace or caller
            return []
        spans = []
        for task in tasks:
            span = tracing.begin_trace("sendscript.submit", task.trace, {
                "sendscript.task_id": task.id, "sendscript.device_id": task.device_id,
                "sendscript.queue": task.queue, "sendscript.priority": task.priority,
                "sendscript.run_at": task.run_at})
            task.trace = tracing.carrier(span)
            spans.append(span)
        return spans

    def _spec(self, spec: TaskSpec | dict[str, Any], index: int) -> TaskSpec:
        """A spec validated with this client's limits; ValueError names the spec."""
        if isinstance(spec, TaskSpec):
            reason = script_refusal(spec.script, self.settings.max_script_bytes)
            if reason:
                raise ValueError(f"spec {index}: {reason}")
            return spec
        return TaskSpec.model_validate(spec, context=self._context)

    def submit_fanout(
        self,
        script: dict[str, Any],
        *,
        devices: Sequence[str] | None = None,
        group: str | None = None,
        batch_id: str | None = None,
        **template: Any,
    ) -> Batch:
        """One submission for many devices (a list, or a stored group): a task each,
        under one batch id.

        Stored and pushed `intake_fanout_chunk` devices at a time (in device-id order),
        so masters start on the first devices while the rest are stored. Each task id
        derives from the batch id and the device: calling again with the `batch_id`
        of a submission cut short (the producer died half way) stores the devices it
        had not reached, each exactly once. Refused on its first chunk, nothing of it
        is kept; refused on a later one (the server refusing one device's document),
        ValueError says so and the chunks before stand."""
        spec = FanoutSpec.model_validate(
            dict(script=script, device_ids=list(devices) if devices else None, group=group,
                 **template), context=self._context)
        targets = sorted(set(spec.device_ids or self.group_devices(spec.group or "")))
        if not targets:
            raise ValueError(f"device group {group!r} is unknown or empty")
        batch_id = batch_id or new_id()
        answers: list[Submitted] = []
        # A fan-out is one trace: its tasks share the batch's submit span.
        span = tracing.begin_trace("sendscript.submit_fanout", spec.trace_carrier(), {
            "sendscript.batch_id": batch_id, "sendscript.devices": len(targets)})
        trace = tracing.carrier(span) or spec.trace_carrier() or tracing.callers_context()
        if trace:
            spec = spec.model_copy(update={"traceparent": trace[tracing.TRACEPARENT],
                                           "tracestate": trace.get(tracing.TRACESTATE)})
        try:
            self._fanout_chunks(spec, targets, batch_id, answers)
        except BaseException as exc:
            tracing.end(span, error=repr(exc))
            raise
        tracing.end(span)
        return Batch(batch_id, answers)

    def _fanout_chunks(self, spec: FanoutSpec, targets: list[str], batch_id: str,
                       answers: list[Submitted]) -> None:
        prefix, size = self.settings.key_prefix, self.settings.intake_fanout_chunk
        for start in range(0, len(targets), size):
            now = utcnow()
            tasks = [Task.from_spec(spec.for_device(d), now=now, batch_id=batch_id,
                                    task_id=id_from_tag(prefix, f"batch:{batch_id}:{d}"))
                     for d in targets[start:start + size]]
            results = self._store_and_push(tasks, resumable=True)
            if reason := next((r for r in results if isinstance(r, str)), None):
                stood = f" ({start} device(s) before it stored)" if start else ""
                raise ValueError(f"fan-out refused: {reason}{stood}")
            answers += [r for r in results if not isinstance(r, str)]

    def _store_and_push(self, tasks: list[Task],
                        resumable: bool = False) -> list[Submitted | str]:
        """Store (the one store plan, run on this client's sync collection), then push
        the new ones; per task its answer, or the reason the store refused it. With
        `resumable`, ids are derived and a task stored before is a resumed submission:
        answered `created=False` and pushed again (its push may be what was cut)."""
        self.check_room()
        holder = self._hold(tasks)
        try:
            return self._store_and_push_held(tasks, resumable)
        finally:
            if holder is not None:
                self._confirm_holder(holder, [t.id for t in tasks if t.master == holder])

    def _store_and_push_held(self, tasks: list[Task], resumable: bool) -> list[Submitted | str]:
        window = self.settings.dedupe_window_s
        stored = run_plan_sync(self._db[TASKS], store_plan(tasks, utcnow(), window))
        if stored.stored_before and not resumable:  # fresh ObjectIds never collide
            raise RuntimeError(f"task id {stored.stored_before[0].id} exists already")
        created = {t.id for t in stored.created}
        before = {t.id for t in stored.stored_before}
        out: list[Submitted | str] = []
        for task in tasks:
            if task.id in stored.refused:
                out.append(stored.refused[task.id])
            elif task.id in before:
                out.append(Submitted(task.id, str(task.status), created=False))
            elif task.id in stored.deduplicated:
                existing = stored.deduplicated[task.id]
                out.append(Submitted(existing, stored.existing_status[existing], created=False,
                                     debounced=task.id in stored.debounced))
            else:
                out.append(Submitted(task.id, str(task.status)))
        # Delayed tasks too: a master holding them in its horizon fires them on time.
        pushed = [t.id for t in tasks if t.id in created or t.id in before]
        self._push_refs(pushed)
        return out

    def _hold(self, tasks: list[Task]) -> str | None:
        """Name a live master the holder of the tasks due now (those no master or
        agent holds yet); which one, or None when no master is alive (or Redis does
        not answer). The choice is kept for a second: `_confirm_holder` checks it
        after each push all the same."""
        due = [t for t in tasks if t.master is None and t.status == TaskStatus.PENDING]
        if not due:
            return None
        at, holder = self._holder
        if holder is None or time.monotonic() - at > HOLDER_KEPT_S:
            try:
                live = live_masters(self._redis, self._keys)
            except redis.RedisError:
                live = []
            holder = random.choice(live) if live else None
            self._holder = (time.monotonic(), holder)
        for task in due:
            task.master = holder
        return holder

    def _confirm_holder(self, holder: str, task_ids: list[str]) -> None:
        """After the push: the holder named is still alive, or its tasks are stored
        unheld again. Tasks held by a master that dies after this check are among its
        own when the leader recovers it (that recovery reads Mongo only once the
        master is seen dead); one dead before the check may have been recovered
        before they were stored, and would hold them for nobody."""
        try:
            if self._redis.exists(self._keys.master_alive(holder)):
                return
        except redis.RedisError:
            pass
        self._holder = (0.0, None)
        try:
            self._db[TASKS].update_many(
                {"_id": {"$in": task_ids}, "master": holder,
                 "status": str(TaskStatus.PENDING)},
                {"$unset": {"master": ""}})
        except PyMongoError as exc:
            logger.warning("tasks held by master {}, which is not alive, could not be "
                           "stored unheld ({!r}); its return or its recovery queues them: "
                           "{}", holder, exc, task_ids[:10])

    def _push_refs(self, task_ids: list[str]) -> None:
        """Push stored tasks' ids; NotReplicated names them all (each is stored)."""
        unconfirmed: NotReplicated | None = None
        for start in range(0, len(task_ids), 1000):
            try:
                push_refs(self._redis, self._keys.ready, task_ids[start:start + 1000],
                          self._wait)
            except NotReplicated as exc:  # the rest are pushed all the same
                unconfirmed = exc
        if unconfirmed is not None:
            unconfirmed.task_ids = list(task_ids)
            raise unconfirmed

    def check_room(self) -> None:
        """Raise QueueFull if the ready list is at its cap (one LLEN; none if no cap)."""
        cap = self.settings.ready_max
        if cap:
            length = int(self._redis.llen(self._keys.ready))
            if length >= cap:
                raise QueueFull(length, cap)

    def push_raw(self, items: Sequence[dict[str, Any] | str | bytes]) -> None:
        """Push queue items as a non-Python producer would (raw JSON on the list)."""
        payloads = [i if isinstance(i, str | bytes) else json.dumps(i, default=str)
                    for i in items]
        push(self._redis, self._keys.ready, payloads, self._wait,
             what=f"push of {len(payloads)} raw item(s)")

    def get(self, task_id: str) -> Task | None:
        doc = self._db[TASKS].find_one({"_id": task_id})
        return Task.model_validate(doc) if doc else None

    def records(self, task_id: str) -> list[dict[str, Any]]:
        return list(self._db[RECORDS].find({"task_id": task_id}).sort("attempt", 1))

    def list(self, status: str | None = None, limit: int = 50) -> list[Task]:
        """The newest `limit` tasks (of a status), newest first. A status that few
        tasks have is read through its index and sorted here; a common one by walking
        the tasks newest first until `limit` of it are found: either way the reads are
        bounded by about RARE_STATUS times `limit`."""
        if status and self._db[TASKS].count_documents(
                {"status": status}, limit=limit * RARE_STATUS) < limit * RARE_STATUS:
            found = list(self._db[TASKS].find({"status": status})
                         .sort([("created_at", DESCENDING), ("_id", DESCENDING)]).limit(limit))
        else:
            found = newest(self._db, limit, changing={"status": status} if status else None)
        return [Task.model_validate(d) for d in found]

    # -- cancel -----------------------------------------------------------------------
    def cancel(self, task_id: str, reason: str = "cancelled") -> str | None:
        """Cancel one task. The status it was cancelled from, or None if it had ended.

        A task already sent stays on its device; its result, when it comes, is
        recorded on the exec record but not applied to the task.
        """
        doc = self._db[TASKS].find_one({"_id": task_id}, {"status": 1})
        if doc is None:
            raise KeyError(task_id)
        status = TaskStatus(doc["status"])
        if status not in CANCELLABLE:
            return None
        flt, update = task_cas(task_id, status, TaskStatus.CANCELLED, utcnow(),
                               set_={"last_error": reason})
        if self._db[TASKS].update_one(flt, update).matched_count:
            return str(status)
        return self.cancel(task_id, reason)  # it moved on meanwhile: look again

    def retry(self, task_id: str, attempts: int | None = None) -> bool:
        """Run a failed, expired or cancelled task again (by hand). False if it is not
        in one of those statuses. Raises ValueError if its dedupe key belongs to an
        unfinished task; a finished task holding it (within the dedupe window) gives
        it up: the operator's retry wins, and later duplicates answer this task."""
        flt, update = manual_retry(task_id, utcnow(), attempts)
        for _ in range(2):
            try:
                changed = self._db[TASKS].update_one(flt, update).matched_count == 1
                break
            except DuplicateKeyError:
                if not self._release_finished_holder(task_id):
                    raise ValueError(f"task {task_id}: its dedupe key belongs to an "
                                     "unfinished task") from None
        else:
            raise ValueError(f"task {task_id}: its dedupe key keeps changing hands")
        if changed:
            self._push_refs([task_id])
        return changed

    def _release_finished_holder(self, task_id: str) -> bool:
        """Free the dedupe key of `task_id` from a finished task holding it."""
        doc = self._db[TASKS].find_one({"_id": task_id}, {"dedupe_key": 1})
        key = doc.get("dedupe_key") if doc else None
        if not key:
            return False
        released = self._db[TASKS].update_one(
            {"dedupe_active": key, "_id": {"$ne": task_id},
             "status": {"$in": sorted(str(s) for s in TERMINAL)}},
            {"$unset": {"dedupe_active": ""}})
        return released.matched_count == 1

    def retry_many(self, status: str, since: Any = None, queue: str | None = None,
                   attempts: int | None = None, limit: int = 100_000) -> tuple[int, int]:
        """Retry every task of a status (failed, expired, cancelled) finished since a
        time. (retried, skipped for a dedupe key now taken)."""
        flt: dict[str, Any] = {"status": status}
        if since is not None:
            flt["finished_at"] = {"$gte": parse_when(since)}
        if queue:
            flt["queue"] = queue
        ids = [d["_id"] for d in self._db[TASKS].find(flt, {"_id": 1}).limit(limit)]
        retried = skipped = 0
        for task_id in ids:
            try:
                retried += self.retry(task_id, attempts)
            except ValueError:
                skipped += 1
        return retried, skipped

    def cancel_batch(self, batch_id: str, reason: str = "batch cancelled") -> int:
        """Cancel every unfinished task of a fan-out batch; how many were."""
        cancelled = 0
        for ids in batch_ids(self._db, batch_id, ID_CHUNK):
            flt, update = task_cas({"_id": {"$in": ids}}, CANCELLABLE, TaskStatus.CANCELLED,
                                   utcnow(), set_={"last_error": reason})
            cancelled += self._db[TASKS].update_many(flt, update).modified_count
        return cancelled

    def batch_info(self, batch_id: str) -> dict[str, int]:
        """Tasks of a fan-out batch by status."""
        return batch_counts(self._db, batch_id)

    # -- device groups ------------------------------------------------------------------
    def group_add(self, name: str, devices: Sequence[str]) -> list[str]:
        check_name(name)
        clean = [d.strip() for d in devices if d.strip()]
        self._db[GROUPS].update_one(
            {"_id": name},
            {"$addToSet": {"devices": {"$each": clean}}, "$set": {"updated_at": utcnow()}},
            upsert=True,
        )
        fleet.note_sync(self._redis, self._keys, clean)  # listed by the fleet view
        return self.group_devices(name)

    def group_remove(self, name: str, devices: Sequence[str] = ()) -> bool:
        """Remove devices from a group, or the whole group when none are named."""
        if devices:
            result = self._db[GROUPS].update_one(
                {"_id": name}, {"$pull": {"devices": {"$in": list(devices)}},
                                "$set": {"updated_at": utcnow()}})
            return result.matched_count == 1
        return self._db[GROUPS].delete_one({"_id": name}).deleted_count == 1

    def group_devices(self, name: str) -> list[str]:
        doc = self._db[GROUPS].find_one({"_id": name})
        return list(doc.get("devices", [])) if doc else []

    def groups(self) -> dict[str, list[str]]:
        return {d["_id"]: d.get("devices", []) for d in self._db[GROUPS].find().sort("_id", 1)}

    # -- schedules ----------------------------------------------------------------------
    def schedule_add(self, schedule: Schedule) -> Schedule:
        if reason := script_refusal(schedule.template.script, self.settings.max_script_bytes):
            raise ValueError(reason)
        try:
            self._db[SCHEDULES].insert_one(schedule.to_doc())
        except DuplicateKeyError:
            raise ValueError(f"a schedule named {schedule.name!r} exists") from None
        return schedule

    def schedule_get(self, name: str) -> Schedule | None:
        doc = self._db[SCHEDULES].find_one({"_id": name})
        return Schedule.model_validate(doc) if doc else None

    def schedules(self) -> list[Schedule]:
        return [Schedule.model_validate(d) for d in self._db[SCHEDULES].find().sort("_id", 1)]

    def schedule_pause(self, name: str) -> bool:
        return self._db[SCHEDULES].update_one(
            {"_id": name}, {"$set": {"enabled": False, "updated_at": utcnow()}}
        ).matched_count == 1

    def schedule_resume(self, name: str) -> bool:
        """Enable again from now on: fire times that passed while paused are not made up."""
        schedule = self.schedule_get(name)
        if schedule is None:
            return False
        now = utcnow()
        self._db[SCHEDULES].update_one(
            {"_id": name},
            {"$set": {"enabled": True, "next_fire_at": schedule.rule().next_fire(now),
                      "updated_at": now}},
        )
        return True

    def schedule_remove(self, name: str) -> bool:
        return self._db[SCHEDULES].delete_one({"_id": name}).deleted_count == 1

    # -- pauses (sendscript/pauses.py) -----------------------------------------------
    def pause(self, queue: str | None = None, group: str | None = None,
              device: str | None = None, *, reason: str = "", by: str | None = None,
              hard: bool = False, quota: bool = False) -> flags.Pause:
        """Pause dispatch everywhere, or of a queue, a device group or a device (at most
        one named); every master holds the tasks it covers within a second. Held tasks
        use no attempt. `hard=True` sets the hard stop, which only `resume(hard=True)`
        lifts."""
        scope = flags.scope_of(queue, group, device, hard=hard, quota=quota)
        return flags.pause_sync(self._redis, self._keys, scope, reason,
                                by or f"sdk:{flags.by_default()}")

    def resume(self, queue: str | None = None, group: str | None = None,
               device: str | None = None, *, hard: bool = False,
               quota: bool = False) -> flags.Pause | None:
        """Lift one pause (the global one when none is named; the hard stop only with
        `hard=True`). The pause lifted, or None if it was not set."""
        scope = flags.scope_of(queue, group, device, hard=hard, quota=quota)
        return flags.resume_sync(self._redis, self._keys, scope)

    def pauses(self) -> dict[str, flags.Pause]:
        """Active pauses by scope, the hard stop first."""
        return flags.list_sync(self._redis, self._keys)

    def resume_device(self, device_id: str) -> bool:
        """Lift a benched device's bench and forget its failure streak (it was fixed):
        every master lets its tasks go within a second. False if it was not benched."""
        from sendscript import device_health

        return device_health.resume_sync(self._redis, self._keys, device_id)

    def benched_devices(self) -> dict[str, dict[str, Any]]:
        """Benched devices, soonest end first: until, left_s, why, streak, level, since."""
        from sendscript import device_health

        return device_health.benched_sync(self._redis, self._keys)

    def flush_counters(self, role: str = "producer") -> None:
        roundtrips.flush_sync(self._redis, self._keys.roundtrips, role)

    def close(self) -> None:
        self._redis.close()
        self._mongo.close()

    def __enter__(self) -> SendScriptClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
