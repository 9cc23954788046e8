"""Recovery of abandoned work, one named procedure per kind (rq's registries idea).

- `time_out_results`: tasks sent (or stuck running) past their `timeout_s` get a
  retry or fail, their record is marked `timeout`, their device lock is released
  by its fence; counted in the stats as `result_timeouts`, and those failed for
  good also as `result_timeouts_final`.
- `recover_dead_master`: a master whose heartbeat expired: its processing list is
  taken over and stored, the tasks it held go back to the ready queue, its entry
  is removed.
- `release_stuck_running`: a task left `running` by a worker that lost it before
  sending (no record, or its device lock not held by its attempt's fence) goes
  back to pending.
- `requeue_orphans`: pending tasks no master holds (a producer stored one and died
  before pushing its id) are pushed to the ready queue; the leader pushes only
  those stored a grace before the queue was last drained (`master.queue_drain`),
  so ids still waiting in a deep queue are not pushed twice.
- `release_orphan_locks`: a device lock whose fence no unfinished attempt holds,
  and held no attempt for `orphan_lock_grace_s`, is released.
- `return_lost_tasks`: the tasks a worker held when it died (or was killed as
  hung): those it provably never sent (claimed, no exec record) go back to
  pending with their attempt unused and their lock released, at once; those it
  may have sent wait for their result or result timeout. Run by their master.
- `return_unsent_attempts`: the attempts a dead master's workers held (the master
  died with what its workers told it): each one whose pre-send marker (its exec
  record) is missing is taken from its worker for good (`take_unsent_attempt`:
  recovery stores the record id as never sent, so a worker that outlived its
  master cannot send it any more), goes back to pending with its attempt unused
  and its device lock released, at once; one with a record may have been sent and
  waits for its result or result timeout. Run by the master restarting under that
  id (for its previous life's workers) and by the leader in `recover_dead_master`.

Every step is a compare-and-set or an idempotent move, so two masters running
one by mistake, or a crash half way, do no harm. The leader runs them
(`master.sweeper`), and each of their writes is fenced by its lease's token
(`fence`, `master.leadership`): a master that no longer leads stops at its next
write. `sendscript recover` runs them by hand, unfenced.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import redis.asyncio
from loguru import logger
from pymongo.errors import DuplicateKeyError

from master.leadership import Fence
from sendscript import device_health, lock_holders
from sendscript.device_health import BenchPolicy, Outcome
from sendscript.keys import Keys
from sendscript.locks import DeviceLocks, lock_owner
from sendscript.models import DEFAULT_QUEUE, DEFAULT_TIMEOUT_S, ExecRecord, Task, utcnow
from sendscript.queue import Entry, IntakeQueue, push_refs, ref_item
from sendscript.replicas import ReplicaWait
from sendscript.retry import decide, failure_cas
from sendscript.settings import Settings
from sendscript.status import (
    IN_FLIGHT,
    RECORD_OPEN,
    RETENTION,
    SCHEDULED,
    RecordStatus,
    TaskStatus,
    record_cas,
    task_cas,
)
from sendscript.store import RecordStore, TaskStore, chunks

OPEN = sorted(str(s) for s in IN_FLIGHT)
NEVER_SENT = "never sent: taken back by recovery before its worker sent it"
# Given a dead master's id: a function that stores entries of its processing list
# and acknowledges them there.
IngestFor = Callable[[str], Callable[[list[Entry]], Awaitable[None]]]


@dataclass
class InFlight:
    """A dead master's attempts in flight, as `return_unsent_attempts` left them."""

    released: list[str] = field(default_factory=list)  # never sent: pending again
    waiting: list[str] = field(default_factory=list)  # may have been sent


@dataclass
class Found:
    """What a recovery pass found (and, unless dry, fixed)."""

    timed_out: list[str] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    dead_masters: list[str] = field(default_factory=list)
    adopted_entries: int = 0
    requeued: list[str] = field(default_factory=list)
    orphan_locks: list[tuple[str, int]] = field(default_factory=list)
    unsent: list[str] = field(default_factory=list)  # a dead master's, never sent

    def any(self) -> bool:
        return bool(self.timed_out or self.dead_masters or self.adopted_entries
                    or self.requeued or self.orphan_locks or self.unsent)


class Recovery:
    def __init__(self, settings: Settings, client: redis.asyncio.Redis, tasks: TaskStore,
                 records: RecordStore, fence: Fence | None = None) -> None:
        self.settings = settings
        self.fence = fence  # the leader's token check before each write of a sweep
        self.keys: Keys = settings.keys
        self.redis = client
        self.tasks = tasks
        self.records = records
        self.locks = DeviceLocks(client, self.keys)
        # (device, fence) -> when first seen orphaned (monotonic seconds)
        self._suspect_locks: dict[tuple[str, int], float] = {}

    # -- a dead worker's tasks -------------------------------------------------------------
    async def return_lost_tasks(self, worker: str, task_ids: list[str],
                                fences: dict[str, int] | None = None) -> list[Task]:
        """Put back what a dead worker held, by what it left behind (the worker is
        gone: nothing it does can follow); the tasks of `task_ids` pending now.

        - Claimed by it (running, `worker` it), with no exec record for the claimed
          attempt: no POST ever left (the record is written last before it,
          `worker.handler`). Undone as the worker's own undo would: pending again
          with its attempt counter as before (the attempt is not used; the number
          is reused, and no record of it exists to collide), and its device lock
          released by the fence it said it took (`fences`), so it runs again now.
        - Claimed, with a record: a send may have reached central-control. It stays
          running, lock held: the device's result or the result timeout ends it
          (the timeout closes the record too), never a second send of the attempt.
        - Not claimed (pending) but locked: the lock is released by its fence.
        - Anything else (sent, finished, another worker's now): left alone.
        """
        fences = fences or {}
        now = utcnow()
        tasks = {t.id: t for t in await self.tasks.find_many(task_ids)}
        claimed = [t for t in tasks.values()
                   if t.status == TaskStatus.RUNNING and t.worker == worker and t.record_id]
        records = await self.records.find_many(t.record_id for t in claimed if t.record_id)
        releases: list[tuple[str, int]] = []
        waiting = 0
        for task in claimed:
            if task.record_id in records:
                waiting += 1
                continue
            if await self.tasks.cas(*task_cas(
                task.id, TaskStatus.RUNNING, TaskStatus.PENDING, now, attempt=task.attempt,
                extra_filter={"worker": worker, "record_id": task.record_id},
                inc={"attempt": -1}, unset=("record_id", "worker"),
                set_={"last_error": f"worker {worker} died before sending; attempt not used"},
            )) and task.id in fences:
                releases.append((task.device_id, fences[task.id]))
        releases += [(t.device_id, fences[t.id]) for t in tasks.values()
                     if t.status == TaskStatus.PENDING and t.id in fences]
        await self.locks.release_many(releases)
        if waiting:
            logger.warning("{} task(s) of dead worker {} may have been sent: they wait for "
                           "their result or result timeout", waiting, worker)
        return [t for t in await self.tasks.find_many(task_ids)
                if t.status == TaskStatus.PENDING]

    # -- a dead master's attempts in flight -----------------------------------------------
    async def return_unsent_attempts(self, master_id: str, *, skip_workers: Collection[str] = (),
                                     fenced: bool = False) -> InFlight:
        """The attempts the workers of dead master `master_id` held, by what they left
        behind (their master, and the fences they told it, are gone with it; the
        workers themselves may be gone too or still finishing what they hold).

        - Claimed by one of its workers (running, `worker` named `{master_id}/...`,
          none of `skip_workers`: the live pool of a master recovering its own
          previous life), with no exec record for the claimed attempt: no POST left
          yet. `take_unsent_attempt` makes sure none ever will; then the task is
          pending again with its attempt counter as before, and its device lock,
          if still the one that worker took for this task (`DeviceLocks.owners`),
          is released. It runs again now.
        - Claimed, with a record: a send may have reached central-control. It stays
          running, lock held: its result or its result timeout ends it.
        `fenced`: each write is checked against the leader's token first (the leader,
        in `recover_dead_master`); a master recovering its own id owns these tasks.
        Every write is a compare-and-set or an insert under a unique id, so doing it
        twice is doing it once.
        """
        out = InFlight()
        prefix = f"{master_id}/"
        docs = [d async for d in self.tasks.col.find(
            {"status": str(TaskStatus.RUNNING), "mode": {"$ne": "pull"},
             "worker": {"$regex": f"^{re.escape(prefix)}"}})]
        claimed = [t for t in (Task.model_validate(d) for d in docs)
                   if t.record_id and t.worker not in skip_workers]
        if not claimed:
            return out
        records = await self.records.find_many(t.record_id for t in claimed if t.record_id)
        # A lock its dead worker took for the task, still held, is the claimed
        # attempt's: the claim came after the lock, and while that lock held no
        # other could be taken, by this worker or another (sendscript.locks).
        owners = await self.locks.owners([t.device_id for t in claimed])
        now = utcnow()
        releases: list[tuple[str, int]] = []
        for task, owner in zip(claimed, owners, strict=True):
            if fenced and task.record_id not in records:
                await self._guard(f"take back dead master {master_id}'s unsent attempts")
            if task.record_id in records or not await self.take_unsent_attempt(task, now):
                out.waiting.append(task.id)
                continue
            if not await self.tasks.cas(*task_cas(
                task.id, TaskStatus.RUNNING, TaskStatus.PENDING, now, attempt=task.attempt,
                extra_filter={"worker": task.worker, "record_id": task.record_id},
                inc={"attempt": -1}, unset=("record_id", "worker", "master"),
                set_={"last_error": f"master {master_id} died before its worker sent "
                                    "it; attempt not used"},
            )):
                continue  # moved on meanwhile (another recovery, a timeout, a cancel)
            out.released.append(task.id)
            if owner is not None and owner[1] == lock_owner(task.id, task.worker or ""):
                releases.append((task.device_id, owner[0]))
        if fenced and releases:
            await self._guard(f"release dead master {master_id}'s unsent attempts' locks")
        await self.locks.release_many(releases)
        if out.released or out.waiting:
            logger.warning("dead master {}: {} attempt(s) in flight never sent, back to "
                           "pending now; {} may have been sent and wait for their result",
                           master_id, len(out.released), len(out.waiting))
        return out

    async def take_unsent_attempt(self, task: Task, now: datetime) -> bool:
        """Make sure the claimed attempt of `task` is never sent: store a record under
        the claim's record id, closed as never sent. The worker writes its record
        under that id as the last step before its POST (`worker.handler`), so exactly
        one of the two inserts lands: True if ours did (or an earlier pass's), and
        the worker, should it still run, finds the id taken and gives up; False if
        the worker's did, and the attempt may have been sent.

        The record is filed under attempt `-attempt`: its real attempt number stays
        free for the task's next claim (the attempt is given back), and a negative
        attempt reads as "this one was never sent" in the task's history. If an
        earlier recovery of the same attempt number holds that slot, nothing can be
        stored: False, and the task waits as if sent (its sweeps end it)."""
        assert task.record_id is not None and task.worker is not None
        mark = ExecRecord(
            _id=task.record_id, task_id=task.id, attempt=-task.attempt,
            device_id=task.device_id, lock_value=0, worker=task.worker, started_at=now,
            finished_at=now, status=RecordStatus.CANCELLED, error=NEVER_SENT,
        ).to_doc()
        mark["purge_at"] = RETENTION.purge_at(RecordStatus.CANCELLED, now)
        try:
            await self.records.col.insert_one(mark)
            return True
        except DuplicateKeyError:
            stored = await self.records.col.find_one({"_id": task.record_id}, {"attempt": 1})
            return stored is not None and stored.get("attempt") == -task.attempt

    # -- result timeouts ---------------------------------------------------------------
    async def time_out_results(self, now: datetime, found: Found, dry: bool = False) -> None:
        fields = {"record_id": 1, "attempt": 1, "updated_at": 1, "timeout_s": 1, "status": 1,
                  "max_retries": 1, "queue": 1, "retry_base_s": 1, "device_id": 1}
        overdue = [
            # Pull tasks' leases are the agents role's to end (agents/leases.py).
            d async for d in self.tasks.col.find({"status": {"$in": OPEN},
                                                  "mode": {"$ne": "pull"}}, fields)
            if d["updated_at"] + timedelta(seconds=d.get("timeout_s", DEFAULT_TIMEOUT_S)) <= now
        ]
        if not overdue:
            return
        found.timed_out += [d["_id"] for d in overdue]
        if dry:
            return
        records = await self.records.find_many(d["record_id"] for d in overdue
                                               if d.get("record_id"))
        task_updates, record_updates, releases, retries = [], [], [], []
        for doc in overdue:
            waited = doc.get("timeout_s", DEFAULT_TIMEOUT_S)
            reason = f"result timeout: no result within {waited:g}s"
            policy = self.settings.retry_policy(doc.get("max_retries", 0),
                                                doc.get("queue", DEFAULT_QUEUE),
                                                doc.get("retry_base_s"))
            decision = decide(policy, doc["attempt"], True, reason, now)
            task_updates.append(failure_cas(doc["_id"], IN_FLIGHT,
                                            doc["attempt"], decision, now))
            record: ExecRecord | None = records.get(doc.get("record_id", ""))
            if record is not None:
                record_updates.append(record_cas(record.id, RECORD_OPEN, RecordStatus.TIMEOUT,
                                                 now, set_={"error": reason}))
                releases.append((record.device_id, record.lock_value))
            if decision.retry:
                retries.append(doc["_id"])
        # One by one, to know which this master won: another may be sweeping too.
        won = []
        for flt, upd in task_updates:
            await self._guard("result timeout")
            won.append(await self.tasks.cas(flt, upd))
        mine = {doc["_id"] for doc, ok in zip(overdue, won, strict=True) if ok}
        await self._guard("result timeout records")
        await self.records.run_updates(record_updates)
        await self._guard("result timeout lock releases")
        await self.locks.release_many(releases)
        retries = [t for t in retries if t in mine]
        await self._push(retries)
        found.retried += retries
        if mine:
            # Every timeout is a lost result; one with no attempt left is a lost task,
            # which the drop-rate ladder counts (master/droprate.py).
            await self.redis.hincrby(self.keys.stats, "result_timeouts", len(mine))
            if len(mine) > len(retries):
                await self.redis.hincrby(self.keys.stats, "result_timeouts_final",
                                         len(mine) - len(retries))
            # A sent task's silence counts against its device (one stuck running was
            # never sent to it): one call for the sweep's timeouts.
            await device_health.record_quietly(self.redis, self.keys, BenchPolicy.of(
                self.settings), [Outcome(d["device_id"], False, "result timeout")
                                 for d in overdue if d["_id"] in mine
                                 and d.get("status") == str(TaskStatus.SENT)])
            logger.warning("result timeout for {} task(s); {} will retry", len(mine),
                           len(retries))

    # -- stuck running ------------------------------------------------------------------
    async def release_stuck_running(self, now: datetime, found: Found, dry: bool = False) -> None:
        cutoff = now - timedelta(seconds=self.settings.running_stuck_s)
        stuck = [d async for d in self.tasks.col.find(
            {"status": str(TaskStatus.RUNNING), "updated_at": {"$lte": cutoff},
             "mode": {"$ne": "pull"}},
            {"record_id": 1, "attempt": 1, "device_id": 1})]
        if not stuck:
            return
        records = await self.records.find_many(d["record_id"] for d in stuck
                                               if d.get("record_id"))
        holders = await self.locks.holders([d["device_id"] for d in stuck])
        lost = []
        for doc, holder in zip(stuck, holders, strict=True):
            record = records.get(doc.get("record_id", ""))
            if record is not None and holder == record.lock_value:
                continue  # it may be on the device: the result timeout decides
            lost.append((doc, record))
        found.requeued += [doc["_id"] for doc, _ in lost]
        if dry or not lost:
            return
        back = []
        for doc, record in lost:
            flt, update = task_cas(doc["_id"], TaskStatus.RUNNING, TaskStatus.PENDING, now,
                                   attempt=doc["attempt"], unset=("master",),
                                   set_={"last_error": "its worker lost it before sending"})
            await self._guard("release a task stuck running")
            if await self.tasks.cas(flt, update):
                back.append(doc["_id"])
                if record is not None:
                    await self.records.finish(record.id, RecordStatus.FAILED, now,
                                              "abandoned before sending")
        await self._push(back)
        if back:
            logger.warning("{} task(s) stuck running without a send went back to pending",
                           len(back))

    # -- dead masters ------------------------------------------------------------------
    async def dead_peers(self) -> list[str]:
        """The other masters whose heartbeat is gone."""
        return await self.dead_masters(exclude=self.settings.master_id)

    async def live_peers(self) -> int:
        """How many other masters have a heartbeat."""
        return sum(up for _, up in await self._masters(exclude=self.settings.master_id))

    async def dead_masters(self, exclude: str | None = None) -> list[str]:
        return [i for i, up in await self._masters(exclude) if not up]

    async def _masters(self, exclude: str | None) -> list[tuple[str, bool]]:
        """Every master the masters hash names (but `exclude`), and whether it is alive."""
        ids = [k.decode() for k in await self.redis.hkeys(self.keys.masters)]
        ids = [i for i in ids if i != exclude]
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for master_id in ids:
            pipe.exists(self.keys.master_alive(master_id))
        alive = await pipe.execute()
        return [(i, bool(up)) for i, up in zip(ids, alive, strict=True)]

    async def recover_dead_master(self, dead_id: str, ingest_for: IngestFor, found: Found,
                                  dry: bool = False) -> None:
        """Take over what a dead master held.

        Its queue items are stored from where they are (its staging item is tagged
        into its processing list first); `ingest_for(dead_id)` stores entries and
        acknowledges them on the dead master's list, so a failure half way leaves
        them there for the next sweep.
        """
        found.dead_masters.append(dead_id)
        queue = IntakeQueue(self.redis, self.keys, dead_id)
        if dry:
            found.adopted_entries += await self.redis.llen(self.keys.processing(dead_id))
            found.adopted_entries += await self.redis.llen(self.keys.staging(dead_id))
            return
        await self._guard(f"take over dead master {dead_id}'s queue")
        await queue.tag_staging()
        entries = await queue.unfinished()
        if entries:
            await self._guard(f"store dead master {dead_id}'s queue items")
            await ingest_for(dead_id)(entries)
            found.adopted_entries += len(entries)
        if await self.redis.exists(self.keys.master_alive(dead_id)):
            # It came back (a slow restart) while we took its queue: what it holds in
            # Mongo is its own again, and its board may hold it already.
            logger.info("master {} is back; its held tasks stay its own", dead_id)
            return
        # Its workers' attempts in flight: those never sent run again now (pushed
        # below with its queued tasks); those that may have been sent wait.
        inflight = await self.return_unsent_attempts(dead_id, fenced=True)
        found.unsent += inflight.released
        # What it held in Mongo is nobody's now. Pushed: what is due or soon due, so a
        # master takes it at once; the loaders find later delayed tasks in time.
        soon = utcnow() + timedelta(seconds=self.settings.delay_horizon_s)
        docs = [d async for d in self.tasks.col.find(
            {"master": dead_id, "status": {"$in": [str(TaskStatus.PENDING),
                                                   *[str(s) for s in SCHEDULED]]}},
            {"_id": 1, "status": 1, "run_at": 1})]
        await self._guard(f"disown dead master {dead_id}'s tasks")
        # Touched as the orphan sweep touches what it pushes: else that sweep, which
        # may run right after this one, finds them unheld and older than the grace
        # and pushes them a second time, and two masters queue each of them.
        await self.tasks.col.update_many({"master": dead_id,
                                          "status": {"$in": [str(TaskStatus.PENDING),
                                                             *[str(s) for s in SCHEDULED]]}},
                                         {"$unset": {"master": ""},
                                          "$set": {"updated_at": utcnow()}})
        held = [d["_id"] for d in docs if d["status"] == str(TaskStatus.PENDING)
                or d.get("run_at") is None or d["run_at"] <= soon] + inflight.released
        await self._push(held)
        found.requeued += held
        if await self.redis.llen(self.keys.processing(dead_id)):
            return  # not all stored: the next sweep takes them again
        await self._guard(f"remove dead master {dead_id}")
        await self.redis.hdel(self.keys.masters, dead_id)
        logger.warning("recovered dead master {}: {} queue item(s), {} task(s) requeued",
                       dead_id, len(entries), len(held))

    # -- orphans ----------------------------------------------------------------------------
    async def queue_position(self) -> tuple[int, int]:
        """The intake's sequence (items ever taken) and the items waiting to be taken
        (ready, and each live master's staging), read together (`master.queue_drain`)."""
        masters = [m.decode() if isinstance(m, bytes) else m
                   for m in await self.redis.hkeys(self.keys.masters)]
        pipe = self.redis.pipeline(transaction=True)
        pipe.get(self.keys.intake_seq)
        pipe.llen(self.keys.ready)
        for master in masters:
            pipe.llen(self.keys.staging(master))
        seq, *waiting = await pipe.execute()
        return int(seq or 0), sum(waiting)

    async def requeue_orphans(self, now: datetime, found: Found, dry: bool = False,
                              drained_at: datetime | None = None) -> None:
        """Pending tasks nobody holds, older than the grace (their push may be lost).
        With `drained_at` (when every item then in the ready queue had been taken),
        only tasks older than the grace before it: a task whose id still waits in the
        queue is not pushed a second time."""
        cutoff = min(now, drained_at or now) - timedelta(seconds=self.settings.orphan_grace_s)
        ids = [d["_id"] async for d in self.tasks.col.find(
            {"status": str(TaskStatus.PENDING), "master": None, "updated_at": {"$lte": cutoff}},
            {"_id": 1}).limit(10_000)]
        if not ids:
            return
        found.requeued += ids
        if not dry:
            # Touch them, so the next sweep waits a grace again before pushing twice.
            await self._guard("requeue orphans")
            for part in chunks(ids):
                await self.tasks.col.update_many({"_id": {"$in": part}, "master": None},
                                                 {"$set": {"updated_at": now}})
            await self._push(ids)
            logger.warning("requeued {} pending task(s) no master held", len(ids))

    async def release_orphan_locks(self, found: Found, dry: bool = False,
                                   confirm: bool = True, grace_s: float | None = None) -> None:
        """Locks whose fence no open exec record holds. With `confirm`, a lock is
        released only after it has looked orphaned for `orphan_lock_grace_s` (a
        worker may be between taking a lock and recording its attempt)."""
        held: dict[str, int] = {}
        async for key in self.redis.scan_iter(match=self.keys.device_lock_pattern, count=1000):
            device = key.decode().removeprefix(self.keys.device_lock(""))
            value = await self.redis.get(key)
            if value is not None:
                held[device] = int(value)
        # A fence is in use while its exec record is open; a fence with no record is a
        # worker that died between taking the lock and recording the attempt.
        fenced = {(d, held[d]) for d in await self._held_by_attempts(held)}
        orphans = {(d, f) for d, f in held.items() if (d, f) not in fenced}
        now = time.monotonic()
        self._suspect_locks = {o: self._suspect_locks.get(o, now) for o in orphans}
        grace = self.settings.orphan_lock_grace_s if grace_s is None else grace_s
        sure = sorted(o for o, since in self._suspect_locks.items()
                      if not confirm or now - since >= grace)
        if not sure:
            return
        found.orphan_locks += sure
        if not dry:
            await self._guard("release orphaned locks")
            await self.locks.release_many(sure)
            for o in sure:
                self._suspect_locks.pop(o, None)
            logger.warning("released {} orphaned device lock(s): {}", len(sure), sure[:10])

    async def _held_by_attempts(self, held: dict[str, int]) -> set[str]:
        """The devices of `held` (device -> fence) whose lock an open exec record
        holds, found through the lock's task (sendscript/lock_holders.py)."""
        if not held:
            return set()
        entries = await self.redis.hmget(self.keys.lock_owners, list(held))
        owned = {d: lock_holders.owner_task(e, held[d]) for d, e in zip(held, entries, strict=True)}
        reads = lock_holders.owned_records(held, owned)
        tasks = [t for q in lock_holders.unowned_tasks(held, owned)
                 async for t in self.tasks.col.find(q, lock_holders.TASK_FIELDS)]
        reads += lock_holders.current_records(tasks)
        records = [r for q in reads
                   async for r in self.records.col.find(q, lock_holders.RECORD_FIELDS)]
        return set(lock_holders.holding(held, records))

    async def _guard(self, what: str) -> None:
        if self.fence is not None:
            await self.fence.guard(what)

    async def _push(self, task_ids: list[str]) -> None:
        for start in range(0, len(task_ids), 1000):
            part = task_ids[start:start + 1000]
            if self.fence is None:
                await push_refs(self.redis, self.keys.ready, part, ReplicaWait.of(self.settings))
            else:  # checked and pushed in one script: no window. Not WAITed for: the
                # tasks are in Mongo, and a push a failover loses is the orphan sweep's
                await self.fence.push("requeue", self.keys.ready, [ref_item(t) for t in part])


async def recover_once(settings: Settings, *, dry: bool, lock_confirm_s: float) -> Found:
    """What `sendscript recover` does: every recovery procedure once, by hand.

    Entries adopted from dead masters are stored and their tasks pushed to the
    ready queue for a running master. Orphaned locks are confirmed by a second
    look after `lock_confirm_s`.
    """
    import asyncio

    from master.intake import Intake
    from sendscript import connect
    from sendscript.store import GROUPS

    me = f"recover-{settings.master_id}"
    client = connect.redis_async(settings)
    mongo = connect.mongo_async(settings)
    try:
        db = connect.database(mongo)
        tasks, records = TaskStore(db), RecordStore(db)
        recovery = Recovery(settings, client, tasks, records)

        async def push(found_tasks: list[Task]) -> None:
            await tasks.disown([t.id for t in found_tasks], me)
            await recovery._push([t.id for t in found_tasks])

        pushed: list[Task] = []

        async def count(name: str, n: int) -> None:
            await client.hincrby(settings.keys.stats, name, n)

        def ingest_for(dead_id: str) -> Callable[[list[Entry]], Awaitable[None]]:
            return Intake(settings.model_copy(update={"master_id": me}),
                          IntakeQueue(client, settings.keys, dead_id), tasks, db[GROUPS],
                          pushed.extend, push, count).ingest

        found = Found()
        now = utcnow()
        await recovery.time_out_results(now, found, dry)
        await recovery.release_stuck_running(now, found, dry)
        for dead in await recovery.dead_masters():
            await recovery.recover_dead_master(dead, ingest_for, found, dry)
        if pushed:
            await push(pushed)
        await recovery.requeue_orphans(now, found, dry)
        await recovery.release_orphan_locks(found, dry=True, confirm=False)
        if found.orphan_locks and not dry:
            # A second look this far apart; only what both looks saw is released.
            found.orphan_locks = []
            await asyncio.sleep(lock_confirm_s)
            await recovery.release_orphan_locks(found, grace_s=lock_confirm_s)
        return found
    finally:
        await client.aclose()
        await mongo.close()
