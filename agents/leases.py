"""Leases of pull tasks: lease, progress, complete, fail, release, and the sweep.

Every change is a compare-and-set built by `sendscript.status.task_cas`, with the
lease token (and, for progress, the lease's sequence number) in the filter: a stale
token, a second agent or a repeated call matches nothing and changes nothing. The
statuses are the push side's: pending -> running (leased) -> success / failed /
retry_waiting, or back to pending (released, or its lease expired, keeping its
checkpoint). A task naming a device takes that device's fenced lock
(`sendscript.locks.DeviceLocks`) for the lease, so a device runs one task at a time
whether pushed or pulled; the fence is in the token and the exec record.

Candidates are read in one query for every waiting lease call (a short-lived cache,
best priority first, then oldest); the compare-and-set on the attempt decides races
between calls, processes and hosts.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import redis.asyncio
from loguru import logger
from pymongo import ASCENDING, DESCENDING, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from agents.gates import LeaseGates
from agents.registry import Refused, Registry
from agents.rules import (
    AgentView,
    eligible,
    json_size,
    lease_deadline,
    merge_checkpoint,
    new_token,
    one_per_device,
    parse_token,
)
from sendscript.dedupe import released_at_start
from sendscript.fencing import MongoEpochs
from sendscript.locks import DeviceLocks, LockRequest, lock_owner
from sendscript.models import ANY_DEVICE, PULL, PULL_HOLDER, new_id, utcnow
from sendscript.replicas import NotReplicated, ReplicaWait
from sendscript.retry import decide, failure_cas
from sendscript.settings import Settings
from sendscript.status import RECORD_OPEN, SCHEDULED, RecordStatus, TaskStatus, record_cas, task_cas
from sendscript.store import RECORDS, TASKS, duplicate_indexes

S = TaskStatus
CACHE_SIZE = 500
# A cache that still has candidates is read again this often (new tasks of a higher
# priority); one that has none for a caller, every SENDSCRIPT_AGENT_POLL_INTERVAL_S.
CACHE_MAX_AGE_S = 1.0
LEASE_FIELDS = ("lease", "worker", "record_id")


def _ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


@dataclass
class Stats:
    leased: int = 0
    completed: int = 0
    failed: int = 0
    released: int = 0
    expired: int = 0
    stale: int = 0  # calls refused with 409


class Leases:
    def __init__(self, settings: Settings, db: AsyncDatabase, client: redis.asyncio.Redis,
                 registry: Registry) -> None:
        self.settings = settings
        self.tasks = db[TASKS]
        self.records = db[RECORDS]
        self.registry = registry
        self.redis = client
        self.locks = DeviceLocks(client, settings.keys, MongoEpochs(db, settings.key_prefix),
                                 ReplicaWait.of(settings))
        self.gates = LeaseGates(settings, client, db)
        self.stats = Stats()
        self.outcomes: Counter[str] = Counter()
        self._cache: list[dict[str, Any]] = []
        # Queues with a cap (SENDSCRIPT_QUEUES): their running pull tasks, counted in
        # Mongo at each refresh and raised by this process's leases in between.
        self._running: Counter[str] = Counter()
        self._cache_at = -1e9
        self._refreshing: asyncio.Lock = asyncio.Lock()
        self._arrived = asyncio.Event()  # set after every refresh: waiting calls look again
        self.stopping = asyncio.Event()

    # -- candidates --------------------------------------------------------------------
    async def _refresh(self, max_age_s: float) -> None:
        async with self._refreshing:
            if time.monotonic() - self._cache_at < max_age_s:
                return
            await self.gates.refresh()
            cursor = self.tasks.find({"mode": PULL, "status": str(S.PENDING)}).sort(
                [("priority", DESCENDING), ("created_at", ASCENDING)]).limit(CACHE_SIZE)
            self._cache = [d async for d in cursor]
            for queue in self.settings.queues:
                self._running[queue] = await self.tasks.count_documents(
                    {"mode": PULL, "status": str(S.RUNNING), "queue": queue})
            self._cache_at = time.monotonic()
            self._arrived.set()
            self._arrived = asyncio.Event()

    async def lease(self, agent: AgentView, limit: int, wait_s: float) -> list[dict[str, Any]]:
        """Up to `limit` tasks for this agent, waiting up to wait_s for one."""
        until = time.monotonic() + max(0.0, min(wait_s, self.settings.agent_max_wait_s))
        while True:
            await self._refresh(CACHE_MAX_AGE_S)
            got = await self._take(agent, limit)
            if not got:
                await self._refresh(self.settings.agent_poll_interval_s)
                got = await self._take(agent, limit)
            left = until - time.monotonic()
            if got or left <= 0 or self.stopping.is_set():
                return got
            arrived = self._arrived
            try:
                await asyncio.wait_for(arrived.wait(),
                                       min(left, self.settings.agent_poll_interval_s))
            except TimeoutError:
                pass

    async def _take(self, agent: AgentView, limit: int) -> list[dict[str, Any]]:
        picks: list[dict[str, Any]] = []
        for doc in self._cache:
            if len(picks) >= limit * 2:
                break
            if not eligible(doc, agent):
                continue
            if (scope := self.gates.paused(doc)) is not None:
                self.gates.held[scope] += 1
                continue
            queue = doc.get("queue", "default")
            cap = self.settings.queues.get(queue)
            if cap is not None and self._running[queue] + sum(
                    p.get("queue", "default") == queue for p in picks) >= cap:
                self.gates.held[f"queue_cap:{queue}"] += 1
                continue
            picks.append(doc)
        picks = one_per_device(picks)
        if not picks:
            return []
        taken = {d["_id"] for d in picks}
        # Off the cache before any await: another call on this loop never bids for them.
        self._cache = [d for d in self._cache if d["_id"] not in taken]
        now = utcnow()
        fences = await self._lock(picks, f"agent:{agent.id}")
        locked = [(d, f) for d, f in zip(picks, fences, strict=True) if f is not None]
        admitted = await self.gates.admit([d for d, _ in locked][:limit])
        ids = {d["_id"] for d in admitted}
        unused = [(d["device_id"], f) for d, f in locked if d["_id"] not in ids and f]
        chosen = [(d, f) for d, f in locked if d["_id"] in ids]
        won = await self._claim(agent, chosen, now)
        unused += [(d["device_id"], f) for (d, f), ok in zip(chosen, won, strict=True)
                   if not ok and f]
        if unused:
            await self.locks.release_many(unused)
        answers = []
        records = []
        for (doc, _fence), ok in zip(chosen, won, strict=True):
            if ok:
                answers.append(doc["_answer"])
                records.append(doc["_record"])
                if doc.get("queue", "default") in self.settings.queues:
                    self._running[doc.get("queue", "default")] += 1
        if records:
            await self._insert_records(records)
            self.stats.leased += len(answers)
        return answers

    async def _lock(self, picks: list[dict[str, Any]], worker: str) -> list[int | None]:
        """Per pick: the device lock's fence, 0 for a task naming no device, None where
        the device is busy. Each lock names its task as owner, as a worker's does: what
        holds it is read through the task (sendscript/lock_holders.py)."""
        devices: list[LockRequest] = [
            (d["device_id"], int((d.get("timeout_s", 300) + self.settings.lock_margin_s) * 1000),
             lock_owner(d["_id"], worker))
            for d in picks if d.get("device_id", ANY_DEVICE) != ANY_DEVICE]
        try:
            fences = iter(await self.locks.acquire_many(devices) if devices else [])
        except NotReplicated as exc:  # released already: their tasks wait, as if busy
            logger.warning("device locks held back: {}", exc)
            self.gates.held["not_replicated"] += len(devices)
            fences = iter([0] * len(devices))
        out: list[int | None] = []
        for doc in picks:
            if doc.get("device_id", ANY_DEVICE) == ANY_DEVICE:
                out.append(0)
            else:
                fence = next(fences)
                out.append(fence or None)
        return out

    async def _claim(self, agent: AgentView, chosen: list[tuple[dict[str, Any], int]],
                     now: datetime) -> list[bool]:
        if not chosen:
            return []
        ops = []
        for doc, fence in chosen:
            record_id = new_id()
            token = new_token(record_id, fence)
            attempt = int(doc.get("attempt", 0))
            cap = now + timedelta(seconds=float(doc.get("timeout_s", 300)))
            deadline = lease_deadline(now, self.settings.agent_lease_s, cap)
            lease = {"token": token, "agent": agent.id, "record_id": record_id, "fence": fence,
                     "seq": 0, "leased_at": now, "deadline": deadline, "cap": cap}
            flt, upd = task_cas(doc["_id"], S.PENDING, S.RUNNING, now, attempt=attempt,
                                extra_filter={"mode": PULL},
                                unset=["dedupe_active"] if released_at_start(
                                    doc.get("dedupe_mode")) else (),
                                set_={"attempt": attempt + 1, "record_id": record_id,
                                      "worker": f"agent:{agent.id}", "master": PULL_HOLDER,
                                      "lease": lease})
            ops.append(UpdateOne(flt, upd))
            device = doc.get("device_id", ANY_DEVICE)
            doc["_record"] = {
                "_id": record_id, "task_id": doc["_id"], "attempt": attempt + 1,
                "device_id": device, "lock_value": fence, "worker": f"agent:{agent.id}",
                "started_at": now, "status": str(RecordStatus.RUNNING), "deadline": cap,
                "agent": agent.id, "lease_token": token,
                "checkpoint_in": doc.get("checkpoint"),
            }
            doc["_answer"] = {
                "task_id": doc["_id"], "lease_token": token, "deadline": deadline.isoformat(),
                "deadline_ms": _ms(deadline), "cap_ms": _ms(cap), "attempt": attempt + 1,
                "max_attempts": int(doc.get("max_retries", 0)) + 1,
                "device_id": None if device == ANY_DEVICE else device,
                "script": doc.get("script", {}), "checkpoint": doc.get("checkpoint") or {},
                "labels": doc.get("labels") or [], "priority": doc.get("priority"),
                "queue": doc.get("queue"), "timeout_s": doc.get("timeout_s"),
            }
        result = await self.tasks.bulk_write(ops, ordered=False)
        if result.matched_count == len(chosen):
            return [True] * len(chosen)
        ids = [d["_id"] for d, _ in chosen]
        current = {d["_id"]: (d.get("lease") or {}).get("record_id") async for d in
                   self.tasks.find({"_id": {"$in": ids}}, {"lease.record_id": 1})}
        return [current.get(d["_id"]) == d["_record"]["_id"] for d, _ in chosen]

    async def _insert_records(self, records: list[dict[str, Any]]) -> None:
        try:
            await self.records.insert_many(records, ordered=False)
        except BulkWriteError as exc:
            # A released lease's attempt number is used again: its record (deleted by
            # the release, unless that was cut short) gives way to the new one.
            for i in duplicate_indexes(exc):
                rec = records[i]
                await self.records.delete_many({"task_id": rec["task_id"],
                                                "attempt": rec["attempt"],
                                                "_id": {"$ne": rec["_id"]}})
                await self.records.insert_one(rec)

    # -- calls on a lease ----------------------------------------------------------------
    def _lease_filter(self, agent: AgentView, task_id: str, token: str) -> dict[str, Any]:
        return {"mode": PULL, "lease.token": token, "lease.agent": agent.id}

    async def _refuse_stale(self, agent: AgentView, task_id: str, token: str,
                            outcome: str) -> dict[str, Any]:
        """A CAS matched nothing: a repeat of the call that ended the lease is answered
        as before; anything else is refused with why."""
        doc = await self.tasks.find_one({"_id": task_id},
                                        {"status": 1, "lease": 1, "last_lease": 1, "mode": 1})
        if doc is None or doc.get("mode") != PULL:
            raise Refused(404, f"no pull task {task_id!r}")
        last = doc.get("last_lease") or {}
        if last.get("token") == token and last.get("agent") == agent.id \
                and last.get("outcome") == outcome:
            return {"ok": True, "status": doc["status"], "repeated": True}
        lease = doc.get("lease") or {}
        if lease.get("token") == token and lease.get("agent") != agent.id:
            raise Refused(403, f"task {task_id!r} is leased by another agent")
        self.stats.stale += 1
        why = (f"ended ({last.get('outcome')})" if last.get("token") == token
               else "not held by this token")
        raise Refused(409, f"stale lease for task {task_id!r}: {why}; task is {doc['status']}")

    async def progress(self, agent: AgentView, task_id: str, token: str,
                       checkpoint: dict[str, Any]) -> dict[str, Any]:
        cap_bytes = self.settings.agent_checkpoint_max_bytes
        for _ in range(5):  # another progress call of this lease may land in between
            doc = await self.tasks.find_one({"_id": task_id, **self._lease_filter(
                agent, task_id, token), "status": str(S.RUNNING)},
                {"lease": 1, "checkpoint": 1})
            if doc is None:
                await self._refuse_stale(agent, task_id, token, "progress")
                raise Refused(409, f"stale lease for task {task_id!r}")
            merged = merge_checkpoint(doc.get("checkpoint"), checkpoint)
            if (size := json_size(merged)) > cap_bytes:
                raise Refused(413, f"checkpoint is {size} bytes, over the limit of {cap_bytes} "
                                   "(SENDSCRIPT_AGENT_CHECKPOINT_MAX_BYTES)")
            lease = doc["lease"]
            now = utcnow()
            deadline = lease_deadline(now, self.settings.agent_lease_s, lease["cap"])
            flt, upd = self._progress_cas(task_id, token, lease["seq"], now, merged, deadline)
            if (await self.tasks.update_one(flt, upd)).matched_count:
                return {"ok": True, "deadline": deadline.isoformat(),
                        "deadline_ms": _ms(deadline), "checkpoint_bytes": size}
        raise Refused(409, f"lease of task {task_id!r} kept changing; try again")

    @staticmethod
    def _progress_cas(task_id: str, token: str, seq: int, now: datetime,
                      checkpoint: dict[str, Any], deadline: datetime
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
        # Not a status change: the task stays running; the filter holds the lease's
        # token and sequence number, so a merge never overwrites one made meanwhile.
        return ({"_id": task_id, "status": str(S.RUNNING), "lease.token": token,
                 "lease.seq": seq},
                {"$set": {"checkpoint": checkpoint, "lease.seq": seq + 1,
                          "lease.deadline": deadline, "updated_at": now}})

    async def complete(self, agent: AgentView, task_id: str, token: str,
                       result: dict[str, Any]) -> dict[str, Any]:
        self._check_result(result)
        now = utcnow()
        flt, upd = task_cas(task_id, S.RUNNING, S.SUCCESS, now,
                            extra_filter=self._lease_filter(agent, task_id, token),
                            set_={"result": result, "last_error": None,
                                  "last_lease": self._last(agent, token, "complete")},
                            unset=LEASE_FIELDS)
        if not (await self.tasks.update_one(flt, upd)).matched_count:
            return await self._refuse_stale(agent, task_id, token, "complete")
        await self._end_record(token, RecordStatus.SUCCESS, now, None, result)
        self.stats.completed += 1
        return {"ok": True, "status": str(S.SUCCESS)}

    async def fail(self, agent: AgentView, task_id: str, token: str, error: str,
                   retryable: bool, result: dict[str, Any] | None) -> dict[str, Any]:
        if result is not None:
            self._check_result(result)
        doc = await self.tasks.find_one({"_id": task_id, **self._lease_filter(
            agent, task_id, token), "status": str(S.RUNNING)},
            {"attempt": 1, "max_retries": 1, "queue": 1, "retry_base_s": 1})
        if doc is None:
            return await self._refuse_stale(agent, task_id, token, "fail")
        now = utcnow()
        policy = self.settings.retry_policy(doc.get("max_retries", 0),
                                            doc.get("queue", "default"), doc.get("retry_base_s"))
        reason = f"agent {agent.id}: {error}"[:2000]
        decision = decide(policy, doc["attempt"], retryable, reason, now)
        flt, upd = failure_cas(task_id, [S.RUNNING], doc["attempt"], decision, now,
                               master=PULL_HOLDER)
        flt.update(self._lease_filter(agent, task_id, token))
        upd["$set"]["last_lease"] = self._last(agent, token, "fail")
        if result is not None:
            upd["$set"]["result"] = result
        upd.setdefault("$unset", {}).update({f: "" for f in LEASE_FIELDS})
        if not (await self.tasks.update_one(flt, upd)).matched_count:
            return await self._refuse_stale(agent, task_id, token, "fail")
        await self._end_record(token, RecordStatus.FAILED, now, reason, result)
        self.stats.failed += 1
        status = S.RETRY_WAITING if decision.retry else S.FAILED
        return {"ok": True, "status": str(status),
                "retry_at": decision.run_at.isoformat() if decision.run_at else None}

    async def release(self, agent: AgentView, task_id: str, token: str) -> dict[str, Any]:
        """Given back unstarted: pending again at once, its attempt not used (the
        checkpoint stays for whoever leases it next)."""
        parts = parse_token(token)
        now = utcnow()
        flt, upd = task_cas(task_id, S.RUNNING, S.PENDING, now,
                            extra_filter=self._lease_filter(agent, task_id, token),
                            set_={"last_lease": self._last(agent, token, "release")},
                            inc={"attempt": -1}, unset=LEASE_FIELDS)
        if not (await self.tasks.update_one(flt, upd)).matched_count:
            return await self._refuse_stale(agent, task_id, token, "release")
        if parts is not None:
            await self.records.delete_one({"_id": parts.record_id})
            await self._free(task_id, parts.fence)
        self.stats.released += 1
        self._cache_at = -1e9  # let the next lease call see it at once
        return {"ok": True, "status": str(S.PENDING)}

    def _check_result(self, result: dict[str, Any]) -> None:
        cap = self.settings.agent_result_max_bytes
        if (size := json_size(result)) > cap:
            raise Refused(413, f"result is {size} bytes, over the limit of {cap} "
                               "(SENDSCRIPT_AGENT_RESULT_MAX_BYTES)")

    @staticmethod
    def _last(agent: AgentView, token: str, outcome: str) -> dict[str, Any]:
        return {"token": token, "agent": agent.id, "outcome": outcome}

    async def _end_record(self, token: str, to: RecordStatus, now: datetime,
                          error: str | None, result: dict[str, Any] | None) -> None:
        parts = parse_token(token)
        if parts is None:
            return
        fields: dict[str, Any] = {}
        if error:
            fields["error"] = error
        flt, upd = record_cas(parts.record_id, RECORD_OPEN, to, now, set_=fields or None)
        await self.records.update_one(flt, upd)
        if parts.fence:
            await self._free_fence(parts.record_id, parts.fence)

    async def _free_fence(self, record_id: str, fence: int) -> None:
        doc = await self.records.find_one({"_id": record_id}, {"device_id": 1})
        if doc is not None and doc.get("device_id", ANY_DEVICE) != ANY_DEVICE:
            await self.locks.release_many([(doc["device_id"], fence)])

    async def _free(self, task_id: str, fence: int) -> None:
        if not fence:
            return
        doc = await self.tasks.find_one({"_id": task_id}, {"device_id": 1})
        if doc is not None and doc.get("device_id", ANY_DEVICE) != ANY_DEVICE:
            await self.locks.release_many([(doc["device_id"], fence)])

    async def cancelled_for(self, agent: AgentView) -> list[str]:
        """Tasks this agent holds that were cancelled: it should stop them."""
        return [d["_id"] async for d in self.tasks.find(
            {"lease.agent": agent.id, "status": str(S.CANCELLED)}, {"_id": 1})]

    # -- the sweep ---------------------------------------------------------------------
    async def sweep(self) -> dict[str, int]:
        """Scheduled pull tasks now due -> pending; unstarted ones past expire_at ->
        expired; leases past their deadline, or of lost agents -> another attempt
        (their checkpoint kept) or failed; cancelled tasks' leases -> ended."""
        now = utcnow()
        done: dict[str, int] = {}
        flt, upd = task_cas({"mode": PULL, "run_at": {"$lte": now}}, SCHEDULED, S.PENDING, now)
        if n := (await self.tasks.update_many(flt, upd)).modified_count:
            done["due"] = n
            self._cache_at = -1e9
        flt, upd = task_cas({"mode": PULL, "expire_at": {"$lte": now}},
                            {S.PENDING, *SCHEDULED}, S.EXPIRED, now,
                            set_={"last_error": "expired before an agent started it"})
        if n := (await self.tasks.update_many(flt, upd)).modified_count:
            done["expired"] = n
            await self.redis.hincrby(self.settings.keys.stats, "expired", n)
        lost = await self.registry.mark_lost(now)
        if lost:
            logger.warning("agent(s) lost (silent for {}s): {}", self.settings.agent_ttl_s,
                           lost[:20])
        overdue = [d async for d in self.tasks.find(
            {"mode": PULL, "status": str(S.RUNNING),
             "$or": [{"lease.deadline": {"$lte": now}}, {"lease.agent": {"$in": lost}}]},
            {"lease": 1, "attempt": 1, "max_retries": 1, "device_id": 1})]
        back = 0
        for doc in overdue:
            back += await self._expire(doc, now, doc["lease"].get("agent") in lost)
        if back:
            done["lease_expired"] = back
            self.stats.expired += back
            self._cache_at = -1e9
        cutoff = now - timedelta(seconds=self.settings.agent_ttl_s)
        for doc in [d async for d in self.tasks.find(
                {"mode": PULL, "status": str(S.CANCELLED), "lease.token": {"$exists": True},
                 "updated_at": {"$lte": cutoff}}, {"lease": 1, "device_id": 1})]:
            lease = doc["lease"]
            if (await self.tasks.update_one(
                    {"_id": doc["_id"], "lease.token": lease["token"]},
                    {"$unset": {f: "" for f in LEASE_FIELDS},
                     "$set": {"last_lease": {"token": lease["token"], "agent": lease["agent"],
                                             "outcome": "cancelled"}}})).matched_count:
                await self._end_record(lease["token"], RecordStatus.CANCELLED, now,
                                       "task cancelled", None)
        return done

    async def _expire(self, doc: dict[str, Any], now: datetime, agent_lost: bool) -> int:
        lease = doc["lease"]
        why = (f"agent {lease['agent']} lost" if agent_lost
               else f"lease of agent {lease['agent']} expired without progress")
        last = {"token": lease["token"], "agent": lease["agent"], "outcome": "expired"}
        attempts = int(doc.get("max_retries", 0)) + 1
        extra = {"mode": PULL, "lease.token": lease["token"]}
        if doc["attempt"] >= attempts:
            flt, upd = task_cas(doc["_id"], S.RUNNING, S.FAILED, now, attempt=doc["attempt"],
                                extra_filter=extra, unset=LEASE_FIELDS, set_={
                                    "last_error": f"{why} (attempts exhausted: {doc['attempt']} "
                                                  f"of {attempts})", "last_lease": last})
        else:
            flt, upd = task_cas(doc["_id"], S.RUNNING, S.PENDING, now, attempt=doc["attempt"],
                                extra_filter=extra, unset=LEASE_FIELDS,
                                set_={"last_error": why, "last_lease": last})
        if not (await self.tasks.update_one(flt, upd)).matched_count:
            return 0
        await self._end_record(lease["token"], RecordStatus.TIMEOUT, now, why, None)
        return 1
